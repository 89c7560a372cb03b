"""`re2tal data prepare` (and `jobs/prepare.py` for `ray job submit`): every video of an annotation
file transcoded to the training resolution and frame rate by a Ray Data job on all CPUs of the
cluster (one video per task, one CPU per task), then an annotation file pointing at the copies.

What one video goes through, and the output layout, are in `re2tal.data.prepare`. Here: the list
of videos, the Ray Data map over it, a progress bar, the failures (one line each, the job goes
on), the new annotation file and the summary `prepare.json`. A rerun skips every video already
prepared with the same settings, so a killed or resumed job does only what is missing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import posixpath
import sys
import time
from dataclasses import asdict
from typing import Any

from re2tal.config import DataConfig, StorageConfig
from re2tal.data import storage as st
from re2tal.data.annotations import load_annotations
from re2tal.data.prepare import Settings, prepare_video, prepared_annotations, put_bytes

ANNOTATIONS, SUMMARY = "annotations.json", "prepare.json"


def storage_from_environment() -> StorageConfig:
    """The driver's standard AWS settings, handed to every task so that all nodes reach the same
    endpoint with the same keys (nodes without keys of their own included); unset ones stay unset
    and each node falls back to its own environment / instance profile."""
    env = os.environ
    keys = {"access_key_id": env["AWS_ACCESS_KEY_ID"], "secret_access_key": env["AWS_SECRET_ACCESS_KEY"]} \
        if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY") else {}
    return StorageConfig(endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
                         region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None, **keys)


def _prepare_row(row: dict[str, Any], out_url: str, settings: dict, storage: StorageConfig) -> dict[str, Any]:
    """One Ray Data task: one video (see `re2tal.data.prepare.prepare_video`)."""
    record = prepare_video(row["video_id"], row["source"], out_url, Settings(**settings), storage)
    return {"video_id": row["video_id"], "status": record["status"], "record": json.dumps(record)}


def run(annotations_url: str, out_url: str, settings: Settings, storage: StorageConfig, *, video_root: str | None = None,
        video_prefix: str = "", video_ext: str = "mp4", progress: bool = True) -> dict[str, Any]:
    """Prepare every video of the annotation file into `out_url`; returns the summary (also
    written to `<out>/prepare.json`)."""
    import ray
    import ray.data
    from tqdm import tqdm

    started = time.perf_counter()
    data = DataConfig(annotations=annotations_url, video_root=video_root, video_prefix=video_prefix, video_ext=video_ext,
                      use_annotation_urls=video_root is None)
    annotations = load_annotations(data, storage)
    tree = json.loads(st.read_bytes(annotations_url, storage))
    out_url = out_url.rstrip("/")
    fs, root = st.filesystem(out_url, storage)
    if st.protocol(out_url) == "file":
        fs.makedirs(posixpath.join(root, "videos"), exist_ok=True)

    from re2tal.raycluster import init_ray

    init_ray()
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # its note that its bars are off
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one bar of our own, counting videos
    items = [{"video_id": v.id, "source": v.url} for v in annotations.videos]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items))).map(
        _prepare_row, fn_kwargs={"out_url": out_url, "settings": asdict(settings), "storage": storage}, num_cpus=1)
    records: dict[str, dict] = {}
    failed: list[dict] = []
    counts = {"prepared": 0, "skipped": 0, "failed": 0}
    with tqdm(total=len(items), unit="video", desc="prepare", disable=not progress, file=sys.stderr) as bar:
        for row in ds.iter_rows():
            record = json.loads(row["record"])
            counts[row["status"]] += 1
            if row["status"] == "failed":
                failed.append({"id": record["id"], "source": record["source"], "reason": record["reason"]})
                bar.write(f"cannot prepare {record['id']} ({record['source']}): {record['reason']}", file=sys.stderr)
            else:
                records[row["video_id"]] = record
            bar.set_postfix(counts, refresh=False)
            bar.update()
    put_bytes(fs, posixpath.join(root, ANNOTATIONS), json.dumps(prepared_annotations(tree, records), indent=1).encode())
    summary = {
        "annotations": f"{out_url}/{ANNOTATIONS}", "source_annotations": annotations_url, "settings": asdict(settings),
        "videos": len(items), **{k: v for k, v in counts.items() if k != "failed"},
        "failed": sorted(failed, key=lambda f: f["id"]),
        "source_bytes": sum(r["source_bytes"] for r in records.values()), "bytes": sum(r["bytes"] for r in records.values()),
        "seconds": time.perf_counter() - started,
        "cluster_cpus": ray.cluster_resources().get("CPU", 0),
    }
    put_bytes(fs, posixpath.join(root, SUMMARY), json.dumps(summary, indent=1).encode())
    return summary


def main(args: argparse.Namespace) -> int:
    """`re2tal data prepare`: storage endpoint and credentials from the standard AWS environment."""
    settings = Settings(short_side=args.short_side, fps=args.fps, gop=args.gop if args.gop is not None else max(1, round(args.fps)),
                        crf=args.crf).check()
    summary = run(args.annotations, args.out, settings, storage_from_environment(), video_root=args.video_root,
                  video_prefix=args.video_prefix, video_ext=args.video_ext)
    print(f"prepared {summary['prepared']} videos, {summary['skipped']} already done, {len(summary['failed'])} could not be "
          f"read; {summary['source_bytes'] / 1e6:.1f} MB -> {summary['bytes'] / 1e6:.1f} MB in {summary['seconds']:.1f} s "
          f"on {summary['cluster_cpus']:g} CPUs; annotations: {summary['annotations']}")
    if summary["failed"]:
        print(f"{len(summary['failed'])} videos could not be read (listed above and in {args.out.rstrip('/')}/{SUMMARY}); "
              "they are left out of the new annotation file, and a rerun tries them again", file=sys.stderr)
    return 0

