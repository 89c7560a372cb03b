"""Temporal action localization on pre-extracted features (`re2tal train` with `data.features`):
the localization head alone, trained on `re2tal extract`'s arrays (re2tal.data.features) instead
of a backbone's output on decoded frames.

Everything else is the end-to-end task's (`Localization`): the same detector, label assignment,
losses, evaluation, mAP, MLflow records and Ray Train + DeepSpeed driver and loop. What differs:
the model is `Localizer(FeatureInput(channels), detector)` (no backbone parameters), the worker's
data are windows of features (`dataset`), read by the worker itself (no decoding, no video cache),
and the logged MLflow model predicts from feature files.
"""

from __future__ import annotations

import posixpath
from typing import Any

import numpy as np
from torch import Tensor, nn

from re2tal.config import Config
from re2tal.data.annotations import Video
from re2tal.data.features import FeatureDataset, FeatureMeta, batches, check_files, load_array, make_item, plan_cells, read_meta
from re2tal.errors import BadInput
from re2tal.tasks.localization import FeatureInput, Localization, Localizer, predict
from re2tal.training.loop import Loop


def build_feature_model(cfg: Config, channels: int) -> Localizer:
    """The detector of cfg.head on `channels`-channel features."""
    from re2tal.detection import build_detector

    return Localizer(FeatureInput(channels), build_detector(cfg.head, channels))


class FeatureLocalization(Localization):
    name = "localization_features"

    def check_data(self, cfg: Config):
        """The annotations (as end to end), `features.json`, and a features file for every video
        of both subsets."""
        if cfg.data.loader == "ray_data":
            raise BadInput("data.loader: ray_data decodes videos in Ray Data tasks; with data.features the workers read the "
                           "features themselves (use threads)")
        annotations = super().check_data(cfg)
        subsets = [cfg.data.train_subset, cfg.data.val_subset]
        check_files(cfg.data.features, cfg.storage, annotations, subsets)
        self.meta = read_meta(cfg.data.features, cfg.storage, probe=annotations.subset(subsets[0])[0].id)
        return annotations

    def predict_memory(self, cfg: Config) -> float | None:
        return None  # re2tal plan predicts backbones; a head on features is small

    def build_model(self, cfg: Config) -> Localizer:
        return build_feature_model(cfg, self.meta.channels)

    def dataset(self, loop: Loop, subset: str, training: bool, epoch: int = 0, start: int = 0) -> FeatureDataset:
        w = loop.worker
        return FeatureDataset(loop.cfg, subset, self.meta, loop.annotations, w.rank, w.world_size, epoch, loop.cfg.train.seed,
                              training=training, start=start)

    def inputs(self, loop: Loop, batch: dict) -> tuple[Tensor, Tensor]:
        device = loop.worker.device
        return batch["features"].to(device, loop.dtype), batch["valid"].to(device)

    def finish(self, cfg: Config, metrics: dict[str, Any], tracker) -> dict[str, Any]:
        """The trained head as the run's MLflow model, predicting from feature files."""
        from re2tal.tasks.mlmodel import FeatureLocalizer, log_trained_model

        return log_trained_model(cfg, metrics, tracker, FeatureLocalizer(), lambda c: build_feature_model(c, self.meta.channels),
                                 self.label_map, extra={"features": self.meta.to_json()})


def predict_features(model: nn.Module, cfg: Config, meta: FeatureMeta, url: str, labels: list[str],
                     class_scores: dict | None = None) -> dict[str, Any]:
    """One features file (`<id>.npy`, laid out as `meta` says) through the evaluation's windows:
    {"video", "duration", "segments"}, as `predict_video` answers for a video; the duration is
    what the clips cover."""
    array = load_array(url, cfg.storage)
    name = posixpath.basename(url.rstrip("/")).removesuffix(".npy")
    meta = meta.of(name)
    video = Video(id=name, url=url, duration=meta.duration(len(array)), subset="", index=0,
                  segments=np.zeros((0, 2), np.float32), labels=np.zeros(0, np.int64))
    items = [make_item(array, video, j0, w, meta, cfg.head.seq_len)
             for j0, w in plan_cells(len(array), video, cfg, meta, training=False, rng=np.random.default_rng(0))]
    device = next(model.parameters()).device
    submission = predict(model, batches(items, cfg.data.batch_size), cfg, device, labels, class_scores)
    return {"video": url, "duration": video.duration, "segments": submission["results"].get(name, [])}
