"""The `data.loader: ray_data` training loader: fetching and decoding run as Ray Data read tasks,
one video per task (one CPU each), on any node of the cluster with free CPUs — CPU-only nodes
included — and each training worker reads its clips with `ray.train.get_dataset_shard`.

    driver:  cursor = make_cursor(); datasets, data_config = training_datasets(cfg, annotations, world_size, cursor)
             TorchTrainer(..., datasets=datasets, dataset_config=data_config)
    worker:  for batch, position in shard_batches(cfg, cursor, rank, epoch, start, count, get_dataset_shard(name(rank))): ...

Same clips as the threaded loader (`re2tal.data.dataset`) for the same seed: worker `rank` gets the
same shard (`shard`: the subset permuted by (seed, epoch), dealt round-robin), each video's clip
comes from the same `plan_windows` / `make_clip` with the generator seeded by (seed, epoch, the
video's index), and clips arrive in shard order (the datasets preserve order). As there, a worker
whose shard runs short of good videos starts over from the shard's first video, skipped videos
count against `data.max_bad_videos` per pass, and every worker yields exactly `count`
micro-batches.

Each rank has a dataset of its own (`train_rank<r>`, not split by Ray Train), whose read tasks
are made when an iteration starts: the datasource asks the `Cursor` (a zero-CPU actor on the
driver's node) which epoch and shard position rank r starts from, which the worker sets just
before iterating. So a new epoch reshuffles, and a worker resumed mid-epoch decodes only the
videos it has not trained on yet (Ray Data decodes a few videos ahead, so the videos past a
pass's end, or of the spare second pass, that were under way when the worker had its micro-batches
are thrown away). The node-local cache is that of the node running each task.
Not covered here (the threaded loader still does it): evaluation, `data.decode_timeout_s`
(a task hung inside a damaged file is not abandoned), and the per-epoch cache-use log (the
tasks' fetches are not counted).
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import numpy as np

from re2tal.config import Config
from re2tal.data.annotations import Annotations, Video
from re2tal.data.dataset import BadVideo, Clip, collate, make_clip, plan_windows, shard
from re2tal.data.video import VideoError, VideoFile, VideoSource
from re2tal.errors import BadInput

log = logging.getLogger("re2tal.data.dataset")


def name(rank: int) -> str:
    return f"train_rank{rank}"


class Cursor:
    """Where each rank's next pass over its dataset starts: (epoch, shard position)."""

    def __init__(self) -> None:
        self.starts: dict[int, tuple[int, int]] = {}

    def set(self, rank: int, epoch: int, start: int) -> None:
        self.starts[rank] = (epoch, start)

    def get(self, rank: int) -> tuple[int, int]:
        return self.starts.get(rank, (0, 0))


def make_cursor():
    """A Cursor actor on this (the driver's) node: it must outlive any worker node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(Cursor).options(num_cpus=0, scheduling_strategy=here).remote()


def decode_row(cfg: Config, video: Video, epoch: int, seed: int, position: int, pass_: int) -> dict[str, Any]:
    """One training video's clip as a row (what one read task does); a bad video gives a row
    with `error` set and no frames."""
    row: dict[str, Any] = {"video_id": video.id, "url": video.url, "position": position, "pass": pass_, "error": ""}
    rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch, video.index])
    jitter = rng if cfg.augment.temporal_jitter else None
    try:
        with VideoSource(cfg.storage).acquire(video.url) as lease:
            file = VideoFile(lease.path, cfg.data.short_side, threads=1)
            [w] = plan_windows(file.info, video, cfg, True, rng)
            clip = make_clip(video, file, w, cfg.data.num_frames, jitter)
    except VideoError as err:
        return row | {"error": str(err), "frames": b"", "shape": [0, 0, 0, 0], "window": [0.0, 0.0], "valid": 0, "duration": 0.0,
                      "fps": 0.0, "segments": [], "labels": []}
    frames = clip["frames"].numpy()
    return row | {"frames": frames.tobytes(), "shape": list(frames.shape), "window": list(clip["window"]), "valid": clip["valid"],
                  "duration": clip["duration"], "fps": clip["fps"], "segments": clip["segments"].reshape(-1).tolist(),
                  "labels": clip["labels"].tolist()}


def to_clip(row: dict[str, Any]) -> Clip:
    import torch

    frames = np.frombuffer(row["frames"], np.uint8).reshape(row["shape"])
    return Clip(video_id=row["video_id"], frames=torch.from_numpy(frames.copy()), window=tuple(row["window"]), valid=int(row["valid"]),
                duration=float(row["duration"]), fps=float(row["fps"]),
                segments=np.asarray(row["segments"], np.float32).reshape(-1, 2), labels=np.asarray(row["labels"], np.int64))


def _datasource_class():
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class ClipSource(Datasource):
        """Rank r's clips of one pass, planned when the pass starts (see the module docstring)."""

        def __init__(self, cfg: Config, videos: list[Video], rank: int, world_size: int, cursor):
            self.cfg, self.videos, self.rank, self.world_size, self.cursor = cfg, videos, rank, world_size, cursor

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list:
            import ray

            epoch, start = ray.get(self.cursor.get.remote(self.rank))
            seed = self.cfg.train.seed
            positions = shard(len(self.videos), self.rank, self.world_size, epoch, seed, shuffle=True)
            # the rest of this pass, then the whole shard once more in case bad videos leave it short
            work = [(i, 0) for i in range(start, len(positions))] + [(i, 1) for i in range(len(positions))]
            d = self.cfg.data
            size = d.num_frames * d.short_side * d.short_side * 16 // 9 * 3
            return [ReadTask(_read_fn(self.cfg, self.videos[positions[i]], epoch, seed, i, p),
                             BlockMetadata(num_rows=1, size_bytes=size, exec_stats=None, input_files=None))
                    for i, p in work]

    return ClipSource


def _read_fn(cfg: Config, video: Video, epoch: int, seed: int, position: int, pass_: int):
    def read() -> Iterator:
        import pyarrow as pa

        row = decode_row(cfg, video, epoch, seed, position, pass_)  # frames: large_binary, as a clip may pass 2 GB
        yield pa.table({k: pa.array([v], type=pa.large_binary() if k == "frames" else None) for k, v in row.items()})

    return read


def training_datasets(cfg: Config, annotations: Annotations, world_size: int, cursor) -> tuple[dict, Any]:
    """(datasets, dataset_config) for the TorchTrainer: one ordered, unsplit dataset per rank."""
    import ray.data
    import ray.train

    videos = annotations.subset(cfg.data.train_subset)
    most = 2 * (len(videos) // world_size + 1)
    datasets = {name(r): ray.data.read_datasource(_datasource_class()(cfg, videos, r, world_size, cursor),
                                                  override_num_blocks=most, num_cpus=1)
                for r in range(world_size)}
    for ds in datasets.values():  # Ray Train replaces the execution options by the DataConfig's; set both
        ds.context.execution_options.preserve_order = True
        ds.context.enable_progress_bars = False  # the training progress bar is the one to watch
    options = {key: ray.data.ExecutionOptions(preserve_order=True) for key in datasets}
    return datasets, ray.train.DataConfig(datasets_to_split=[], execution_options=options)


def shard_batches(cfg: Config, cursor, rank: int, epoch: int, start: int, count: int, iterator) -> Iterator[tuple[dict, int]]:
    """`count` micro-batches of rank's training shard from video `start` on, with the shard
    position after each, read from its Ray Data `iterator` (see the module docstring)."""
    import ray

    ray.get(cursor.set.remote(rank, epoch, start))
    d = cfg.data
    produced, pass_, bad, group = 0, 0, [], []
    rows = iter(iterator.iter_rows())
    try:
        for row in rows:
            if row["pass"] != pass_:  # starting over: as the threaded loader, a fresh bad-video budget
                if produced == 0:
                    break
                pass_, bad, group = row["pass"], [], []
            if row["error"]:
                bad.append(BadVideo(row["video_id"], row["url"], row["error"]))
                log.error("skipping video %s (%s): %s", row["video_id"], row["url"], row["error"])
                if len(bad) > d.max_bad_videos:
                    raise BadInput(f"{len(bad)} bad videos, more than data.max_bad_videos={d.max_bad_videos}; last: "
                                   f"{row['video_id']} ({row['url']}): {row['error']}")
                continue
            group.append(to_clip(row))
            if len(group) == d.batch_size:
                yield collate(group), row["position"] + 1
                produced, group = produced + 1, []
                if produced == count:
                    return
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()
    raise BadInput(f"data.annotations: no video of worker {rank}'s training shard could be read (epoch {epoch + 1})")
