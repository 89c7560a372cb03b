"""`re2tal predict` and `re2tal eval`: a trained localization model over a collection of videos, as
one Ray Data job (re2tal.raydata.inference: decoding in read tasks on any node's CPUs, the model
in an actor pool, one part per video so that a rerun does only what is missing).

    model = load_model("s3://b/runs/anet/epoch0014-step00012345", None, {"inference.actors": 4}, storage)
    submission, result = predict(model, collection("s3://b/videos/", model.cfg.data, model.cfg.storage), "s3://b/pred.json")

Every video goes through the evaluation's windows (`plan_windows(training=False)`: the whole
video for `data.sampling: uniform`, every sliding window of `data.num_frames` for `sliding`);
each window's candidate segments are decoded on the actor, and the driver post-processes a video
as evaluation does (`to_predictions`: one Soft-NMS over all its windows' candidates) into its part `<OUT>.parts/<id>.json`: {"video",
"url", "record": {"duration", "segments": [{"label", "score", "segment": [s, e]}]}}. When every
video is done (or could not be read) the ActivityNet submission is written to OUT:
{"version", "results": {id: segments}, "external_data"} for the videos of this collection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from re2tal.config import Config, StorageConfig, apply_overrides, validate
from re2tal.data.annotations import Annotations, Video
from re2tal.errors import BadInput
from re2tal.raydata import inference
from re2tal.raydata.inference import Inference, Result, Unit

# --model values that name an MLflow model rather than a checkpoint directory
MLFLOW_SCHEMES = ("models:/", "runs:/")


@dataclass
class Model:
    """A trained localization model, ready to predict."""

    cfg: Config  # its resolved config, overrides applied
    module: nn.Module  # trained weights, on the CPU, in eval mode
    labels: list[str]  # the label map it was trained with (class id -> name)
    source: str  # where it came from
    weights: str  # which weights: "model" or "ema"


def load_model(spec: str, cfg: Config | None, overrides: dict[str, Any], storage: StorageConfig, flag: str = "--model") -> Model:
    """The one place a `--model` is resolved. `cfg`: the config given with --config (overrides
    applied), else the model's own with `overrides` on top; `storage`: how to read the model."""
    if spec.startswith(MLFLOW_SCHEMES):
        return _from_mlflow(spec, cfg, overrides, flag)
    return _from_checkpoint(spec, cfg, overrides, storage, flag)


def _from_mlflow(uri: str, cfg: Config | None, overrides: dict[str, Any], flag: str) -> Model:
    """A model a training run logged (re2tal.tasks.mlmodel), at the tracking URI of the --config
    or of `--set tracking.tracking_uri`, else MLFLOW_TRACKING_URI, else the default
    sqlite:///mlflow.db. Its network is the logged one; the config (its own, or --config)
    says how it predicts."""
    import os

    from re2tal.config import TrackingConfig
    from re2tal.tasks.localization import FeatureInput, Localizer
    from re2tal.tasks.mlmodel import load_model as load_logged
    from re2tal.tracking import resolve_uri

    tracking_uri = (cfg.tracking.tracking_uri if cfg is not None else overrides.get("tracking.tracking_uri")) \
        or os.environ.get("MLFLOW_TRACKING_URI") or TrackingConfig().tracking_uri
    logged, module, labels = load_logged(uri, resolve_uri(tracking_uri))
    if not isinstance(module, Localizer):
        raise BadInput(f"{flag}: {uri} is not a localization model ({type(module).__name__}, e.g. a re2tal finetune classifier)")
    if isinstance(module.backbone, FeatureInput):
        raise BadInput(f"{flag}: {uri} is a head trained on features (data.features): it predicts from feature files "
                       "(mlflow.pyfunc.load_model(uri).predict([...npy])), not from videos")
    if cfg is None:
        cfg = validate(apply_overrides(logged.to_dict(), overrides))
    return Model(cfg, module, labels, uri, "logged")


def _from_checkpoint(url: str, cfg: Config | None, overrides: dict[str, Any], storage: StorageConfig, flag: str) -> Model:
    from re2tal.data.annotations import load_annotations
    from re2tal.tasks.localization import build_model
    from re2tal.training.checkpoints import CONFIG, STATE_TAG, load_weights, local_checkpoint, model_info

    with local_checkpoint(url, storage, flag) as path:
        if not (path / STATE_TAG).is_dir():
            raise BadInput(f"{flag}: {url} is not a re2tal checkpoint (no {STATE_TAG}/ folder); give a checkpoint directory "
                           f"such as <train.storage_path>/<train.name>/epochEEEE-stepSSSSSSSS")
        tree, labels = model_info(path)
        if cfg is None:
            if tree is None:
                raise BadInput(f"{flag}: {url} holds no {CONFIG} (written before checkpoints kept their config): give the run's "
                               "config with --config")
            cfg = validate(apply_overrides(tree, overrides))
        module = build_model(cfg)  # as trained, backbone.pretrained included (it may fix the architecture)
        weights = load_weights(module, path, flag=flag)
    if labels is None:  # older checkpoints: the label map of the config's annotations
        labels = load_annotations(cfg.data, cfg.storage).labels
    return Model(cfg, module.eval(), labels, url, weights)


def storage_for(cfg: Config | None, overrides: dict[str, Any]) -> StorageConfig:
    """How to read a model: the --config's storage, else the standard AWS environment with the
    `storage.*` overrides on top."""
    from pydantic import ValidationError

    from re2tal.config import format_error
    from re2tal.raydata.prepare import storage_from_environment

    if cfg is not None:
        return cfg.storage
    changes = {k.removeprefix("storage."): v for k, v in overrides.items() if k.startswith("storage.")}
    if not changes:
        return storage_from_environment()
    tree = storage_from_environment().model_dump()
    tree = {k: v.get_secret_value() if hasattr(v, "get_secret_value") else v for k, v in tree.items()} | changes
    try:
        return StorageConfig.model_validate(tree)
    except ValidationError as err:
        raise BadInput(f"storage.{format_error(err)}") from None


# --------------------------------------------------------------------------------------------
# the job


class Predict(Inference):
    """Units are a video's evaluation windows; an output is a window's candidate segments (grid units)."""

    name = "predict"

    def __init__(self, cfg: Config, module_ref, names: list[str], class_scores: dict | None):
        self.cfg, self.module_ref, self.names, self.class_scores = cfg, module_ref, names, class_scores

    def units(self, video: Video) -> Iterator[list[Unit]]:
        from re2tal.data.dataset import make_clip, plan_windows
        from re2tal.data.video import VideoFile, VideoSource

        d = self.cfg.data
        with VideoSource(self.cfg.storage).acquire(video.url) as lease:
            file = VideoFile(lease.path, d.short_side, threads=1)
            windows = plan_windows(file.info, video, self.cfg, training=False, rng=np.random.default_rng(0))
            for i, w in enumerate(windows):
                clip = make_clip(video, file, w, d.num_frames, None)
                yield [Unit(i, len(windows), clip["frames"].numpy(),
                            {"window": list(clip["window"]), "valid": clip["valid"], "duration": clip["duration"]})]

    def model(self, device: str) -> Callable[[list[Unit]], list[dict[str, np.ndarray]]]:
        import ray

        from re2tal.detection import postprocess
        from re2tal.tasks.localization import model_input

        cfg, module = self.cfg, ray.get(self.module_ref).to(device).eval()
        dtype = next(module.parameters()).dtype

        def apply(units: list[Unit]) -> list[dict[str, np.ndarray]]:
            # one clip at a time into the input: windows of videos of different sizes share a batch
            frames = torch.cat([model_input(torch.from_numpy(u.frames)[None], cfg, device, dtype) for u in units])
            valid = torch.tensor([u.meta["valid"] for u in units], dtype=torch.float32, device=device) / cfg.data.num_frames
            with torch.no_grad():
                clips = postprocess(module(frames, valid), cfg.head.nms)
            return [{k: v.cpu().numpy() for k, v in c.items()} for c in clips]

        return apply

    def part(self, video: Video, metas: list[dict], outputs: list[Any]) -> tuple[dict, list]:
        submission = self.submission([{k: torch.from_numpy(v) for k, v in o.items()} for o in outputs], [video.id] * len(outputs),
                                     [m["window"] for m in metas], [m["duration"] for m in metas])
        return {"duration": metas[0]["duration"], "segments": submission["results"][video.id]}, []

    def submission(self, clips: list, videos: list[str], windows: list, durations: list) -> dict[str, Any]:
        from re2tal.detection import to_predictions

        h = self.cfg.head  # one Soft-NMS per video: over all its windows' candidates with sliding windows, as evaluation
        return to_predictions(clips, videos, windows, durations, self.names, h.nms, h.seq_len, self.class_scores,
                              sliding=self.cfg.data.sampling == "sliding")


def predict(model: Model, videos: list[Video], out: str, progress: bool = True) -> tuple[dict[str, Any], Result]:
    """Predict every video of the collection that has no part under `<out>.parts/` yet, then
    write the submission of all of them to `out`; (the submission, the job's result)."""
    import ray

    from re2tal.raycluster import init_ray
    from re2tal.tasks.localization import Localization, label_names

    cfg = model.cfg
    scores = Localization().class_scores(cfg)
    if scores is not None:
        missing = [v.id for v in videos if v.id not in scores]
        if missing:
            raise BadInput(f"head.nms.external_scores: no class scores for video {missing[0]!r} ({len(missing)} videos without)")
    names = label_names(cfg, Annotations(url=model.source, videos=[], labels=model.labels), scores)
    init_ray()
    job = Predict(cfg, ray.put(model.module), names, scores)
    d = cfg.data
    result = inference.run(job, videos, f"{out}.parts", cfg.storage, cfg.inference, batch_size=cfg.inference.batch_size or d.batch_size,
                           unit_bytes=d.num_frames * d.short_side * d.short_side * 16 // 9 * 3, progress=progress)
    submission = job.submission([], [], [], [])  # the envelope: version, external_data
    submission["results"] = {v.id: result.records[v.id]["segments"] for v in videos if v.id in result.records}
    inference.write(out, json.dumps(submission).encode(), cfg.storage)
    return submission, result


def evaluate(model: Model, out: str | None, progress: bool = True) -> tuple[dict[str, Any], dict[str, Any], Result]:
    """`re2tal eval`: predict the validation subset (into `out`, or a temporary folder) and score
    it; (the metrics, the submission, the job's result)."""
    import tempfile

    from re2tal.evaluation import parse_thresholds
    from re2tal.evaluation import evaluate as score
    from re2tal.tasks.localization import Localization, ground_truth

    cfg, task = model.cfg, Localization()
    annotations = task.check_data(cfg)
    videos = annotations.subset(cfg.data.val_subset)
    with tempfile.TemporaryDirectory(prefix="re2tal-eval-") as tmp:
        submission, result = predict(model, videos, out or f"{tmp}/predictions.json", progress)
    truth = ground_truth(cfg, annotations, cfg.data.val_subset, task.class_scores(cfg))
    return score(truth, submission, cfg.data.val_subset, parse_thresholds(cfg.train.tiou_thresholds)), submission, result
