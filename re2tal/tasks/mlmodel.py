"""The trained network as an MLflow model: what a finished `re2tal train` / `re2tal finetune` run
logs (the run's model `model`, registered with `tracking.register_model`), and how such a model
URI becomes a network again (`load_model`, for `re2tal predict --model`).

It is a pyfunc model that runs on whole videos:

    mlflow.pyfunc.load_model("runs:/<run_id>/model").predict(["s3://bucket/a.mp4", "b.mp4"])
    -> [{"video": "s3://bucket/a.mp4", "duration": 61.2, "segments": [{"label", "score", "segment": [s, e]}, ...]}, ...]

(a localizer: the evaluation's windows and post-processing, as `re2tal predict`; a head trained on
features takes `.npy` feature files instead; a fine-tuned classifier answers each video's top
classes). Its directory holds, beside MLflow's own files:

    artifacts/config.yaml   the run's resolved config, storage credentials left out (as a checkpoint's)
    artifacts/backbone.pt   the trained backbone's state dict in its own layout, fp32: it is built
                            as `backbone.pretrained` builds one from such a file (the file fixes
                            what the config leaves open, e.g. SlowFast's fusion convs), so the model
                            needs neither the pretrained file nor the checkpoint
    artifacts/weights.pt    the rest of the network's state dict (head), fp32; both the EMA
                            weights when the run kept them
    artifacts/labels.json   the label map (class id -> name), as a checkpoint's
    artifacts/features.json (a head on features) the features it was trained on

The python model is pickled by reference to its class here, so the model loads where re2tal is
installed; requirements.txt lists re2tal's own pinned dependencies.
"""

from __future__ import annotations

import json
import re
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import mlflow.pyfunc
import torch
from torch import nn

from re2tal.config import Config
from re2tal.errors import BadInput


class TrainedModel(mlflow.pyfunc.PythonModel):
    """Loads config, label map and weights into `self.cfg`, `self.labels`, `self.model` (CPU, eval
    mode); a subclass says how the network is built and what `predict` does with a list of URLs
    (its input type hint is the model's signature; its output has none: MLflow's for a list of
    dicts is `Any`, which it warns about on every load)."""

    def build(self, cfg: Config, artifacts: dict[str, str]) -> nn.Module:
        raise NotImplementedError

    def load_context(self, context) -> None:
        import yaml

        from re2tal.config import validate

        files = context.artifacts
        self.cfg = validate(yaml.safe_load(Path(files["config"]).read_text()))
        self.labels = json.loads(Path(files["labels"]).read_text())
        # the backbone from its own file, as backbone.pretrained builds one (the file fixes its architecture)
        built = self.cfg.with_overrides({"backbone.pretrained": files["backbone"]}) if "backbone" in files else self.cfg
        self.model = self.build(built, files)
        head = torch.load(files["weights"], map_location="cpu", weights_only=True)
        missing, unexpected = self.model.load_state_dict(head, strict=False)
        if unexpected or any(not k.startswith("backbone.") for k in missing):
            raise BadInput(f"the model's weights do not fit its config's network (missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.model.eval()

    def names(self, class_scores: dict | None) -> list[str]:
        """The head's class names (`label_names` of the label map)."""
        from re2tal.data.annotations import Annotations
        from re2tal.tasks.localization import label_names

        return label_names(self.cfg, Annotations(url="", videos=[], labels=self.labels), class_scores)

    def class_scores(self) -> dict | None:
        from re2tal.tasks.localization import Localization

        return Localization().class_scores(self.cfg)


class VideoLocalizer(TrainedModel):
    """A localizer on videos: each URL's segments (`re2tal.tasks.localization.predict_video`)."""

    def build(self, cfg: Config, artifacts: dict[str, str]) -> nn.Module:
        from re2tal.tasks.localization import build_model

        return build_model(cfg)

    def predict(self, context, model_input: list[str]):
        from re2tal.tasks.localization import predict_video

        scores = self.class_scores()
        names = self.names(scores)
        return [_or_error(url, lambda: predict_video(self.model, self.cfg, url, None, scores, labels=names)) for url in model_input]


class FeatureLocalizer(TrainedModel):
    """A head trained on features (data.features): each `.npy` feature file's segments, read with
    the clip geometry of the features it was trained on."""

    def build(self, cfg: Config, artifacts: dict[str, str]) -> nn.Module:
        from re2tal.data.features import FeatureMeta
        from re2tal.tasks.features import build_feature_model

        self.meta = FeatureMeta.from_json(json.loads(Path(artifacts["features"]).read_text()))
        return build_feature_model(cfg, self.meta.channels)

    def predict(self, context, model_input: list[str]):
        from re2tal.tasks.features import predict_features

        scores = self.class_scores()
        names = self.names(scores)
        return [_or_error(url, lambda: predict_features(self.model, self.cfg, self.meta, url, names, scores)) for url in model_input]


class VideoClassifier(TrainedModel):
    """A fine-tuned classifier (re2tal finetune): each video's top classes on its evaluation clip."""

    def build(self, cfg: Config, artifacts: dict[str, str]) -> nn.Module:
        from re2tal.tasks.finetune import build_classifier

        return build_classifier(cfg)

    def predict(self, context, model_input: list[str]):
        from re2tal.tasks.finetune import classify_video

        return [_or_error(url, lambda: classify_video(self.model, self.cfg, url, self.labels)) for url in model_input]


def _or_error(url: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One input's answer; one that cannot be read answers `error` instead of failing the others."""
    try:
        return run()
    except BadInput as err:
        return {"video": url, "error": str(err)}


# --------------------------------------------------------------------------------------------
# logging at the end of a run


def requirements() -> list[str]:
    """re2tal's pinned runtime dependencies, as installed here."""
    try:
        return [r for r in metadata.requires("re2tal") or [] if "extra ==" not in r]
    except metadata.PackageNotFoundError:
        return []


def trained_network(cfg: Config, build: Callable[[Config], nn.Module], checkpoint: str) -> nn.Module:
    """The network `build` makes, with the weights of a checkpoint (EMA if kept); built as trained,
    backbone.pretrained included (it may fix the architecture)."""
    from re2tal.training.checkpoints import load_weights, local_checkpoint

    model = build(cfg)
    with local_checkpoint(checkpoint, cfg.storage) as path:
        load_weights(model, path)
    return model.eval()


def log_trained_model(cfg: Config, metrics: dict[str, Any], tracker, python_model: TrainedModel,
                      build: Callable[[Config], nn.Module], labels: list[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Log the network of the run's last checkpoint as the run's model (`python_model` answers
    its predict), with the run's label map `labels`, registered as a new version of
    tracking.register_model if set; `extra`: more
    JSON artifacts ({name: object} -> artifacts/<name>.json). Adds `model_uri` (and
    `registered_model`) to the metrics. Without MLflow or a checkpoint, nothing; a tracking server
    that does not take it within tracking.retry_s is a printed line, not a failed run (the
    checkpoint keeps the weights)."""
    from re2tal import tracking
    from re2tal.training.checkpoints import config_yaml

    if tracker is None or metrics.get("checkpoint") is None:
        return metrics
    model = trained_network(cfg, build, metrics["checkpoint"])
    state = {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in model.state_dict().items()}
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}

    def save(path: str, mlflow_model) -> None:
        with tempfile.TemporaryDirectory(prefix="re2tal-model-") as tmp:
            files = {"config": Path(tmp, "config.yaml"), "weights": Path(tmp, "weights.pt"), "labels": Path(tmp, "labels.json")}
            files["config"].write_text(config_yaml(cfg))
            torch.save({k: v for k, v in state.items() if not k.startswith("backbone.")}, files["weights"])
            if backbone:
                files["backbone"] = Path(tmp, "backbone.pt")
                torch.save(backbone, files["backbone"])
            files["labels"].write_text(json.dumps(labels))
            for name, obj in (extra or {}).items():
                files[name] = Path(tmp, f"{name}.json")
                files[name].write_text(json.dumps(obj))
            mlflow.pyfunc.save_model(path, python_model=python_model, artifacts={k: str(v) for k, v in files.items()},
                                     mlflow_model=mlflow_model, pip_requirements=requirements(),
                                     metadata={"re2tal_model": type(python_model).__name__, "git_commit": tracking.git_commit(),
                                               "checkpoint": metrics["checkpoint"]})

    try:
        logged = tracking.retrying(lambda: tracking.log_model(tracker.uri, tracker.run_id, save, step=int(metrics.get("step") or 0),
                                                              register=cfg.tracking.register_model), cfg.tracking.retry_s)
    except Exception as err:
        print(f"re2tal: the model was not logged to MLflow at {tracker.uri} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
              f"its weights are in {metrics['checkpoint']}", flush=True)
        return metrics
    metrics["model_uri"] = logged.uri
    if logged.registered:
        metrics["registered_model"] = logged.registered
    return metrics


# --------------------------------------------------------------------------------------------
# loading


def load_model(uri: str, tracking_uri: str | None = None) -> tuple[Config, nn.Module, list[str]]:
    """A model URI (`runs:/<run_id>/model`, `models:/<model_id>`, `models:/<name>/<version>` or
    `models:/<name>@<alias>` at `tracking_uri`, default MLflow's; or a local model directory) as
    (its config, the network with its trained weights on the CPU in eval mode, its label map).
    BadInput if there is no such re2tal model."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        location = model_location(uri, tracking_uri)
        local = mlflow.artifacts.download_artifacts(artifact_uri=location, tracking_uri=tracking_uri, registry_uri=tracking_uri)
        wrapper = mlflow.pyfunc.load_model(local).unwrap_python_model()
    except (MlflowException, OSError) as err:
        raise BadInput(f"--model: {uri}: {str(err).splitlines()[0][:300]}") from None
    if not isinstance(wrapper, TrainedModel):
        raise BadInput(f"--model: {uri} is an MLflow model, but not one logged by re2tal ({type(wrapper).__name__})")
    return wrapper.cfg, wrapper.model, wrapper.labels


def model_location(uri: str, tracking_uri: str | None) -> str:
    """Where the artifacts of a model URI are, looked up at `tracking_uri` (MLflow resolves
    `models:/` and `runs:/` URIs at its global tracking URI, whatever it is handed):
    `models:/<model_id>`, `models:/<name>/<version>`, `models:/<name>@<alias>`, or
    `runs:/<run_id>/<name>` (the run's latest logged model of that name). Other URIs unchanged."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    if match := re.fullmatch(r"models:/(m-[0-9a-f]+)", uri):
        return client.get_logged_model(match.group(1)).artifact_location
    if match := re.fullmatch(r"models:/([^/@]+)/(\d+)", uri):
        return client.get_model_version_download_uri(match.group(1), match.group(2))
    if match := re.fullmatch(r"models:/([^/@]+)@([^/]+)", uri):
        version = client.get_model_version_by_alias(match.group(1), match.group(2)).version
        return client.get_model_version_download_uri(match.group(1), version)
    if match := re.fullmatch(r"runs:/([0-9a-f]+)/([^/]+)", uri):
        run = client.get_run(match.group(1))
        models = [(o.step, client.get_logged_model(o.model_id)) for o in (run.outputs.model_outputs if run.outputs else [])]
        named = [(step, m) for step, m in models if m.name == match.group(2)]
        if named:
            return max(named, key=lambda sm: sm[0])[1].artifact_location
    return uri
