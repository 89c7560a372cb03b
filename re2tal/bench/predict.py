"""`re2tal bench predict --json OUT`: videos/s of `re2tal predict` and `re2tal extract` (the Ray Data
job of re2tal.raydata.inference) on the synthetic set, with 1 and 2 CPU model actors, and the
share of the actors' time spent waiting for decoding.

The set is `make demo`'s videos (60 s, 10 fps, 64 x 64), each listed `REPEATS` times under other
ids so that a job runs long enough for a steady state; the model is the demo's reduced reversible
Swin (random weights: speed does not depend on them). predict: one uniform window of 64 frames
per video (debug.yaml's sampling); extract: clips of 8 frames every 16 (TAdaConv's clip
sampling), 37 per video. Ray runs locally with `RAY_CPUS` logical CPUs whatever the machine has,
so that two one-CPU actors leave a CPU for read tasks; on fewer physical cores the actors and
the decoding share them. Each job starts on a fresh output: `videos_per_s` includes starting the
actors' processes and filling the pipeline, `videos_per_s_steady` is from the first video done to
the last.

What the actors wait for (re2tal.raydata.inference): `wait_fraction` (all of it),
`wait_fraction_after_fill` (without each actor's wait for its first batch). Read tasks decode
ahead while an actor's process starts, so a short job hides a decode bottleneck: hence also
`decode_cpus_per_actor` = decode seconds / model seconds per video (the CPUs of read tasks one
actor needs to never wait, at this machine's speeds) and `expected_wait_fraction_if_decode_bound`
= 1 - (read-task CPUs / decode s) / (actors / model s), the wait of a long job.

Goal (the issue's): with decoding spread over read tasks, the actors wait <= 10% of the time when
there are enough CPUs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

RAY_CPUS = 3
REPEATS = {"predict": 16, "extract": 8}  # each file this many times (under other ids): jobs long enough to reach a steady state
ACTORS = (1, 2)
SET = {"videos": 12, "val_videos": 2, "classes": 4, "duration_s": 60.0, "fps": 10.0, "size": 64, "seed": 0}
TREE = {  # configs/debug.yaml's model and sampling
    "data": {"sampling": "uniform", "num_frames": 64, "frame_size": 64},
    "backbone": {"name": "swin_t", "reversible": True, "embed_dim": 24, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 4, 8],
                 "window_size": [8, 4, 4], "drop_path": 0.0},
    "head": {"num_classes": 4, "seq_len": 32, "embed_dim": 64, "fpn_levels": 4, "stem_layers": 1, "attn_window": 7},
    "extract": {"clip_frames": 8, "clip_stride": 16},
    "tracking": {"enabled": False},
}


def run(workdir: Path) -> dict[str, Any]:
    import ray

    from re2tal.config import StorageConfig, SynthConfig, validate
    from re2tal.data.annotations import load_annotations
    from re2tal.data.synth import class_names, write_synthetic
    from re2tal.tasks.extract import extract
    from re2tal.tasks.localization import build_model
    from re2tal.tasks.predict import Model, predict

    synth = SynthConfig(**SET)
    write_synthetic(str(workdir / "synth"), synth, StorageConfig())
    base = validate({**TREE, "data": {**TREE["data"], "annotations": str(workdir / "synth" / "annotations.json")}})
    files = load_annotations(base.data, base.storage).videos
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
    runs = []
    try:
        for actors in ACTORS:
            cfg = base.with_overrides({"inference.actors": actors})
            model = Model(cfg, build_model(cfg).eval(), class_names(synth.classes), "random init", "model")
            started = time.perf_counter()
            _, result = predict(model, repeated(files, REPEATS["predict"]), str(workdir / f"predict{actors}" / "predictions.json"),
                                progress=False)
            runs.append(_figures("predict", actors, result.stats, time.perf_counter() - started))
            started = time.perf_counter()
            _, result = extract(cfg, repeated(files, REPEATS["extract"]), str(workdir / f"extract{actors}"), progress=False)
            runs.append(_figures("extract", actors, result.stats, time.perf_counter() - started))
    finally:
        ray.shutdown()
    return {
        "set": SET, "repeats": REPEATS, "model": TREE, "ray_cpus": RAY_CPUS,
        "machine": {"cpus": os.cpu_count(), "load_average_1_5_15": list(os.getloadavg())},
        "runs": runs,
        "goal": {"wait_fraction_max": 0.1, "met": {f"{r['job']}_{r['actors']}": r["wait_fraction_after_fill"] <= 0.1 for r in runs}},
    }


def repeated(videos: list, times: int) -> list:
    """Each video `times` times under other ids: a longer job from a few files."""
    return [dataclasses.replace(v, id=f"{v.id}-{r}") for r in range(times) for v in videos]


def _figures(job: str, actors: int, stats: dict[str, Any], wall_s: float) -> dict[str, Any]:
    n = max(1, stats["processed"])
    decode, model = stats["decode_s"] / n, stats["actor_compute_s"] / n
    read_cpus = RAY_CPUS - actors
    # a pipeline that runs long enough for Ray Data's read-ahead not to matter: the actors wait
    # for as long as the read tasks deliver fewer videos per second than the actors take
    rate_decode, rate_model = read_cpus / decode if decode else float("inf"), actors / model if model else float("inf")
    return {"job": job, "actors": actors, "read_task_cpus": read_cpus, "videos": stats["processed"], "units": stats["units"],
            "batches": stats["batches"], "videos_per_s": stats["videos_per_s"], "videos_per_s_steady": stats["videos_per_s_steady"],
            "seconds": stats["seconds"], "wall_s": wall_s,
            "wait_fraction": stats["wait_fraction"], "wait_fraction_after_fill": stats["wait_fraction_after_fill"],
            "wait_s_per_batch_after_fill": (stats["actor_wait_s"] - stats["actor_fill_s"]) / max(1, stats["batches"] - actors),
            "decode_s_per_video": decode, "model_s_per_video": model,
            "decode_cpus_per_actor": decode / model if model else None,
            "expected_wait_fraction_if_decode_bound": max(0.0, 1 - rate_decode / rate_model),
            "actor_wait_s": stats["actor_wait_s"], "actor_fill_s": stats["actor_fill_s"], "actor_compute_s": stats["actor_compute_s"]}


def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="re2tal-bench-predict-") as tmp:
        result = run(Path(tmp))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for r in result["runs"]:
        print(f"{r['job']:8s} {r['actors']} actor(s): {r['videos_per_s']:.2f} videos/s ({r['videos_per_s_steady']:.2f} after the "
              f"first video), actors waiting {100 * r['wait_fraction']:.0f}% "
              f"({100 * r['wait_fraction_after_fill']:.0f}% after the first batch); decode {r['decode_s_per_video']:.2f} s, "
              f"model {r['model_s_per_video']:.2f} s per video")
    print(f"-> {out}")
    return 0
