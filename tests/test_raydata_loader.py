"""The `data.loader: ray_data` loader on a real local Ray: the same clips as the threaded loader
for a seed (uniform and sliding sampling, temporal jitter, random truncation), resuming mid-epoch
at the right video, bad videos skipped within the budget, and a real 2-worker Ray Train run whose
workers take the same number of micro-batches per epoch."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from re2tal.data.annotations import load_annotations
from re2tal.data.dataset import VideoDataset, batches
from re2tal.errors import BadInput
from test_data_io import config, make_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    import ray

    # 2 training workers take 1 CPU each; decoding tasks need CPUs of their own
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


class RayLoader:
    """The ray_data loader's datasets and cursor for a config, as the trainer makes them."""

    def __init__(self, cfg, ann, world: int):
        from re2tal.raydata.loader import make_cursor, training_datasets

        self.cfg, self.cursor = cfg, make_cursor()
        self.datasets, _ = training_datasets(cfg, ann, world, self.cursor)

    def batches(self, rank: int, epoch: int, start: int, count: int):
        from re2tal.raydata.loader import name, shard_batches

        return list(shard_batches(self.cfg, self.cursor, rank, epoch, start, count, self.datasets[name(rank)].iterator()))


def threaded_batches(cfg, ann, rank: int, world: int, epoch: int, start: int):
    ds = VideoDataset(cfg, cfg.data.train_subset, rank, world, epoch, cfg.train.seed, training=True, start=start, annotations=ann)
    index = {v.id: start + i for i, v in enumerate(ds.videos)}
    return [(b, index[b["video_id"][-1]] + 1) for b in batches(ds, cfg.data.batch_size, drop_last=True)]


def assert_same(got, want):
    assert [(b["video_id"], p) for b, p in got] == [(b["video_id"], p) for b, p in want]
    for (a, _), (b, _) in zip(got, want):
        assert torch.equal(a["frames"], b["frames"])  # the same frames: same jitter / truncation draws
        np.testing.assert_allclose(np.array(a["window"]), np.array(b["window"]))
        assert a["valid"].tolist() == b["valid"].tolist()
        for x, y in zip(a["segments"], b["segments"]):
            torch.testing.assert_close(x, y)
        assert [l.tolist() for l in a["labels"]] == [l.tolist() for l in b["labels"]]


@pytest.mark.parametrize("sampling", [{"sampling": "uniform"},
                                      {"sampling": "sliding", "num_frames": 8, "frame_interval": 2, "random_truncate": True}],
                         ids=["uniform", "sliding"])
def test_same_clips_as_the_threaded_loader_for_a_seed_and_resume_mid_epoch(ray_local, tmp_path, make_video, sampling):
    cfg = config(make_dataset(tmp_path, make_video, videos=9), **{"num_frames": 8, "frame_size": 32, "short_side": 32,
                                                                 "batch_size": 2, **sampling}).with_overrides({"train.seed": 7})
    ann = load_annotations(cfg.data, cfg.storage)  # 7 training videos: shards of 4 and 3
    loader = RayLoader(cfg, ann, 2)
    for rank in (0, 1) if sampling["sampling"] == "uniform" else (1,):
        want = threaded_batches(cfg, ann, rank, 2, epoch=3, start=0)
        assert_same(loader.batches(rank, epoch=3, start=0, count=len(want)), want)
    if sampling["sampling"] != "uniform":
        return
    # the same dataset again, another epoch and mid-epoch: each pass is planned when it starts
    resumed = threaded_batches(cfg, ann, 0, 2, epoch=4, start=2)
    assert len(resumed) == 1 and resumed[0][1] == 4
    assert_same(loader.batches(0, epoch=4, start=2, count=1), resumed)


def test_bad_videos_are_skipped_within_the_budget_and_a_short_shard_starts_over(ray_local, tmp_path, make_video, caplog):
    bad = {"garbage": os.urandom(3000), "missing": None}
    cfg = config(make_dataset(tmp_path, make_video, videos=4, bad=bad), num_frames=8, frame_size=32, short_side=32,
                 max_bad_videos=2)
    ann = load_annotations(cfg.data, cfg.storage)  # training: v0, v1, garbage, missing
    got = RayLoader(cfg, ann, 1).batches(0, epoch=0, start=0, count=3)  # 2 good videos: the third batch starts over
    ids = [b["video_id"][0] for b, _ in got]
    assert sorted(ids[:2]) == ["v0", "v1"] and ids[2] == ids[0]
    assert {"garbage", "missing"} <= {r.getMessage().split()[2] for r in caplog.records if "skipping video" in r.getMessage()}
    strict = cfg.with_overrides({"data.max_bad_videos": 1})
    with pytest.raises(BadInput, match=r"2 bad videos, more than data.max_bad_videos=1"):
        RayLoader(strict, ann, 1).batches(0, epoch=0, start=0, count=3)


def test_two_ray_train_workers_read_their_shards_and_take_equal_micro_batches(ray_local, tmp_path, make_video):
    from re2tal.tasks.localization import Localization
    from re2tal.training.driver import fit
    from test_training import tiny_config

    bad = {"garbage": os.urandom(3000)}
    ann = make_dataset(tmp_path, make_video, videos=7, frames=40, bad=bad)  # 5 good + 1 bad training videos
    cfg = tiny_config(tmp_path, ann, "ray-data", **{"data.loader": "ray_data", "data.max_bad_videos": 1, "train.epochs": 2,
                                                    "head.num_classes": 2})
    metrics = fit(cfg, Localization(), show_progress=False)
    assert metrics["step"] == 2 * 3 and metrics["epoch"] == 2  # 6 videos / 2 workers: 3 micro-batches each per epoch
    from mlflow.tracking import MlflowClient

    from re2tal.tracking import resolve_uri

    history = MlflowClient(resolve_uri(cfg.tracking.tracking_uri)).get_metric_history(metrics["mlflow_run_id"], "loss")
    assert sorted(m.step for m in history) == list(range(1, 7))
