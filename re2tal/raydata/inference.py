"""Batch inference over a collection of videos as one Ray Data job: what `re2tal predict`,
`extract` and `eval` share. What is run and what is written comes from an `Inference` (the task
modules re2tal.tasks.predict / extract implement it); this module knows no model.

    read tasks (1 CPU each, any node)      model actors (map_batches)         driver
    video -> units (clips / windows)  -->  batches of units -> outputs   -->  a video's outputs
             + error row if unreadable       (model built once per actor)     complete -> its part

- One read task per video (a custom datasource, as the `ray_data` training loader): it fetches
  the video (node-local cache), decodes its units in chunks (`Inference.units`) and yields them
  as rows, so a long video streams through in bounded memory. A video that cannot be read gives
  one row with `error` set instead (after the units it did decode, which are dropped).
- The model runs in an actor pool (`actors`, each with `gpus_per_actor` GPUs or
  `cpus_per_actor` CPUs): `Inference.model(device)` is called once per actor, then on every
  batch of `batch_size` units.
- The driver gathers each video's outputs; once all `count` units of a video are in, it writes
  the video's files and then its part `<parts>/<id>.json` (`Inference.part`), each atomically
  (a temporary name, then a move), so a video has a part only if everything of it is written.
  A run skips every video that has a part already: a killed job run again does only the rest.

Every actor measures how long it waited for input between batches (`wait_s`, from the moment
its model was ready) against how long it computed (`compute_s`); `wait_fraction` =
wait / (wait + compute) over all actors is the share of model time lost to decoding (and to
Ray's hand-over of batches); `wait_fraction_after_fill` leaves out each actor's wait for its
first batch (the pipeline filling, paid once per job). Read tasks measure their decoding
seconds (`decode_s`, fetching included).
"""

from __future__ import annotations

import json
import logging
import pickle
import posixpath
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterator
from urllib.parse import quote

import numpy as np
from tqdm import tqdm

from re2tal.config import InferenceConfig, StorageConfig
from re2tal.data import storage as st
from re2tal.data.annotations import Video
from re2tal.data.prepare import put_bytes
from re2tal.data.video import VideoError
from re2tal.errors import BadInput


@dataclass(frozen=True)
class Unit:
    """One model input of a video: a clip (extract) or a window (predict)."""

    index: int  # its place among the video's units
    count: int  # how many units the video has
    frames: np.ndarray  # uint8 (N, H, W, 3)
    meta: dict[str, Any]  # JSON-able: what the driver needs back with the output (window, duration, ...)


class Inference(ABC):
    """What a batch-inference job does. The instance is pickled to every read task and actor:
    it holds configs and object refs, no open resources and no model."""

    name = "infer"  # the progress bar's label

    @abstractmethod
    def units(self, video: Video) -> Iterator[list[Unit]]:
        """(Read task) the video's units, in chunks; VideoError if it cannot be read."""

    @abstractmethod
    def model(self, device: str) -> Callable[[list[Unit]], list[Any]]:
        """(Actor, once) a function from a batch of units to one picklable output per unit."""

    @abstractmethod
    def part(self, video: Video, metas: list[dict], outputs: list[Any]) -> tuple[dict, list[tuple[str, bytes]]]:
        """(Driver) a finished video, its units' metas and outputs in unit order -> (its record,
        JSON-able, kept in its part; files (URL, bytes) written before the part)."""


@dataclass
class Result:
    records: dict[str, dict]  # video id -> its part's record, for every video of the collection with a part
    failed: list[dict]  # {"id", "url", "reason"} of the videos that could not be read in this run
    stats: dict[str, Any]


def part_url(parts: str, video_id: str) -> str:
    return f"{parts.rstrip('/')}/{quote(video_id, safe='')}.json"


def done(videos: list[Video], parts: str, storage: StorageConfig) -> set[str]:
    """Ids of the videos that have a part under `parts`."""
    fs, root = st.filesystem(parts, storage)
    if not fs.isdir(root):
        return set()
    fs.invalidate_cache(root)
    present = {posixpath.basename(p) for p in fs.ls(root, detail=False)}
    return {v.id for v in videos if posixpath.basename(part_url(parts, v.id)) in present}


def read_records(parts: str, ids: list[str], storage: StorageConfig) -> dict[str, dict]:
    """The records of these videos' parts (read concurrently on object stores)."""
    if not ids:
        return {}
    fs, _ = st.filesystem(parts, storage)
    paths = {st.filesystem(part_url(parts, i), storage)[1]: i for i in ids}
    return {paths[p]: json.loads(data)["record"] for p, data in fs.cat(list(paths)).items()}


def write(url: str, data: bytes, storage: StorageConfig) -> None:
    """`data` at `url`, whole or not at all."""
    fs, path = st.filesystem(url, storage)
    if st.protocol(url) == "file":
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    put_bytes(fs, path, data)


# --------------------------------------------------------------------------------------------
# the Ray Data pipeline


def _error_row(video: Video, reason: str) -> dict[str, Any]:
    return {"video_id": video.id, "index": -1, "count": 0, "frames": b"", "shape": [0, 0, 0, 0], "meta": "{}", "error": reason,
            "decode_s": 0.0}


def _read_fn(job: Inference, video: Video):
    def read() -> Iterator:
        import pyarrow as pa

        def table(rows: list[dict]) -> pa.Table:  # frames: large_binary, as a long window may pass 2 GB
            return pa.table({k: pa.array([r[k] for r in rows], type=pa.large_binary() if k == "frames" else None) for k in rows[0]})

        started = time.perf_counter()
        try:
            for chunk in job.units(video):
                seconds = (time.perf_counter() - started) / len(chunk)
                yield table([{"video_id": video.id, "index": u.index, "count": u.count, "frames": u.frames.tobytes(),
                              "shape": list(u.frames.shape), "meta": json.dumps(u.meta), "error": "", "decode_s": seconds}
                             for u in chunk])
                started = time.perf_counter()
        except VideoError as err:
            yield table([_error_row(video, str(err))])

    return read


def _datasource(job: Inference, videos: list[Video], unit_bytes: int):
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class VideoUnits(Datasource):
        """One read task per video, yielding its units (see the module docstring)."""

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list:
            return [ReadTask(_read_fn(job, v), BlockMetadata(num_rows=None, size_bytes=unit_bytes, exec_stats=None, input_files=None))
                    for v in videos]

    return VideoUnits()


class ModelActor:
    """A map_batches actor: the job's model, applied to batches of units; times its waits."""

    def __init__(self, job: Inference, device: str, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.apply = job.model(device)
        self.idle_since = time.perf_counter()  # the model is ready: from now on it waits for input
        self.first = True

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        rows = [i for i, e in enumerate(batch["error"]) if not e]
        units = [Unit(int(batch["index"][i]), int(batch["count"][i]),
                      np.frombuffer(batch["frames"][i], np.uint8).reshape([int(x) for x in batch["shape"][i]]).copy(),  # writable
                      json.loads(batch["meta"][i])) for i in rows]
        outputs = [b""] * len(batch["error"])
        for i, out in zip(rows, self.apply(units) if units else []):
            outputs[i] = pickle.dumps(out)
        n = len(outputs)
        wait, compute, fill = np.zeros(n), np.zeros(n), np.zeros(n)  # the batch's, on its first row
        wait[0], compute[0] = started - self.idle_since, time.perf_counter() - started
        fill[0], self.first = wait[0] if self.first else 0.0, False  # the wait for the pipeline's first units
        self.idle_since = time.perf_counter()
        return {k: batch[k] for k in ("video_id", "index", "count", "meta", "error", "decode_s")} | {
            "output": np.array(outputs, dtype=object), "wait_s": wait, "fill_s": fill, "compute_s": compute}


def run(job: Inference, videos: list[Video], parts: str, storage: StorageConfig, settings: InferenceConfig, *, batch_size: int,
        unit_bytes: int, progress: bool = True) -> Result:
    """Run `job` over the videos that have no part under `parts` yet (see the module docstring)
    with the actors `settings` ask for; the records of every video of `videos` that has a part
    when it ends, the failures, and the job's figures (`stats`). `unit_bytes`: about how big a
    unit's frames are (Ray Data's memory budget)."""
    import ray
    import ray.data

    from re2tal.raycluster import init_ray

    before = done(videos, parts, storage)
    todo = [v for v in videos if v.id not in before]
    init_ray()
    actors, gpus_per_actor = _actors(settings, ray.cluster_resources())
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # its note that its bars are off
    ray.data.DataContext.get_current().enable_progress_bars = False  # one bar of our own, counting videos
    gather = _Gather(job, todo, parts, storage)
    started = time.perf_counter()
    with tqdm(total=len(todo), unit="video", desc=job.name, disable=not progress, file=sys.stderr, dynamic_ncols=True,
              bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}]") as bar:  # videos/s, also below 1
        if todo:
            ds = ray.data.read_datasource(_datasource(job, todo, unit_bytes), override_num_blocks=len(todo), num_cpus=1)
            device, threads = "cuda" if gpus_per_actor else "cpu", max(1, int(settings.cpus_per_actor))  # torch threads = its CPUs
            ds = ds.map_batches(ModelActor, fn_constructor_args=(job, device, threads),
                                batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                                num_cpus=settings.cpus_per_actor, num_gpus=gpus_per_actor or None)
            for row in ds.iter_rows():
                bar.update(gather.add(row))
    seconds = time.perf_counter() - started
    t = gather.totals
    busy, fill = t["wait_s"] + t["compute_s"], t["fill_s"]
    processed, finished = len(gather.records), gather.finished
    stats = {"videos": len(videos), "done_before": len(before), "processed": processed, "failed": len(gather.failed),
             "seconds": seconds, "videos_per_s": processed / seconds if seconds > 0 else 0.0,
             # from the first video done to the last: without starting the actors and filling the pipeline
             "videos_per_s_steady": (len(finished) - 1) / (finished[-1] - finished[0]) if len(finished) > 2 else None,
             "units": t["units"], "batches": t["batches"], "actors": actors, "cpus_per_actor": settings.cpus_per_actor,
             "gpus_per_actor": gpus_per_actor, "batch_size": batch_size, "actor_wait_s": t["wait_s"], "actor_fill_s": fill,
             "actor_compute_s": t["compute_s"], "decode_s": t["decode_s"], "wait_fraction": t["wait_s"] / busy if busy > 0 else 0.0,
             "wait_fraction_after_fill": (t["wait_s"] - fill) / (busy - fill) if busy > fill else 0.0}
    return Result(gather.records | read_records(parts, sorted(before), storage), gather.failed, stats)


def _actors(settings: InferenceConfig, cluster: dict[str, float]) -> tuple[int, int]:
    """(actors, GPUs per actor) that `settings` ask for and the cluster can hold, leaving CPUs
    for the read tasks."""
    cpus, gpus = cluster.get("CPU", 0), cluster.get("GPU", 0)
    if settings.use_gpu:
        actors = settings.actors or int(gpus)
        if not 0 < actors <= gpus:
            raise BadInput(f"inference.use_gpu: {actors} actors of one GPU each, but the cluster has {gpus:g} GPUs")
        return actors, 1
    actors = settings.actors or 1
    if actors * settings.cpus_per_actor >= cpus:
        raise BadInput(f"inference.actors: {actors} actors of inference.cpus_per_actor={settings.cpus_per_actor:g} CPUs leave none "
                       f"of the cluster's {cpus:g} CPUs for decoding")
    return actors, 0


class _Gather:
    """The driver's side: a video's outputs until all its units are in, then its files and part."""

    def __init__(self, job: Inference, todo: list[Video], parts: str, storage: StorageConfig):
        self.job, self.parts, self.storage = job, parts, storage
        self.open = {v.id: v for v in todo}  # neither done nor failed yet
        self.units: dict[str, dict[int, tuple[dict, Any]]] = {}
        self.records: dict[str, dict] = {}
        self.failed: list[dict] = []
        self.finished: list[float] = []  # when each video's part was written
        self.totals = {"wait_s": 0.0, "fill_s": 0.0, "compute_s": 0.0, "decode_s": 0.0, "units": 0, "batches": 0}

    def add(self, row: dict[str, Any]) -> int:
        """Take one output row; 1 if it finished a video (done or failed), else 0."""
        for key in ("wait_s", "fill_s", "compute_s", "decode_s"):
            self.totals[key] += float(row[key])
        self.totals["batches"] += row["compute_s"] > 0  # a batch's figures are on its first row
        video = self.open.get(row["video_id"])
        if video is None:  # failed already: units it decoded before failing may still come
            return 0
        if row["error"]:
            del self.open[video.id]
            self.units.pop(video.id, None)
            self.failed.append({"id": video.id, "url": video.url, "reason": row["error"]})
            tqdm.write(f"cannot read {video.id} ({video.url}): {row['error']}", file=sys.stderr)  # above the progress bar
            return 1
        self.totals["units"] += 1
        units = self.units.setdefault(video.id, {})
        units[int(row["index"])] = (json.loads(row["meta"]), pickle.loads(row["output"]))
        if len(units) < int(row["count"]):
            return 0
        ordered = [units[i] for i in range(len(units))]
        record, files = self.job.part(video, [m for m, _ in ordered], [o for _, o in ordered])
        for url, data in files:
            write(url, data, self.storage)
        write(part_url(self.parts, video.id), json.dumps({"video": video.id, "url": video.url, "record": record}).encode(), self.storage)
        self.records[video.id] = record
        del self.open[video.id], self.units[video.id]
        self.finished.append(time.perf_counter())
        return 1
