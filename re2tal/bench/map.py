"""`re2tal bench map`: time of an ActivityNet-size mAP evaluation.

A synthetic problem shaped like ActivityNet v1.3 validation (about 5,000 videos, 1.5 segments
of one class per video, 200 classes) with 100 predictions per video (500k): most near a ground-
truth segment with jittered boundaries and the right label, the rest random. Timed separately:
reading the JSON text, parsing + checking it into arrays, and the mAP computation itself at the
10 ActivityNet thresholds (best of a few repeats; wall and CPU time, as a busy machine inflates
the first).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from re2tal.evaluation.formats import parse_ground_truth, parse_predictions
from re2tal.evaluation.metrics import ANET_THRESHOLDS, evaluate_detection


def synthetic_problem(videos: int = 5000, predictions_per_video: int = 100, classes: int = 200,
                      seed: int = 0) -> tuple[dict, dict]:
    """(ground truth, predictions) as ActivityNet JSON trees."""
    rng = np.random.default_rng(seed)
    names = [f"action {i:03d}" for i in range(classes)]
    duration = rng.uniform(20.0, 240.0, videos)
    video_class = rng.integers(0, classes, videos)
    gt_count = rng.choice([1, 1, 1, 2, 2, 3], videos)
    database, results = {}, {}
    for v in range(videos):
        d = duration[v]
        length = d * rng.uniform(0.05, 0.6, gt_count[v])
        start = rng.uniform(0.0, 1.0, gt_count[v]) * (d - length)
        gt = np.stack([start, start + length], axis=1)
        database[f"v{v:05d}"] = {"subset": "validation", "duration": float(d),
                                 "annotations": [{"segment": s.tolist(), "label": names[video_class[v]]} for s in gt]}
        n = predictions_per_video
        near = rng.random(n) < 0.7
        base = gt[rng.integers(0, len(gt), n)]
        jitter = rng.normal(0.0, 0.15, (n, 2)) * (base[:, 1:] - base[:, :1])
        rand_start = rng.uniform(0.0, d, n)
        rand = np.stack([rand_start, rand_start + rng.uniform(0.0, d - rand_start)], axis=1)
        seg = np.clip(np.where(near[:, None], base + jitter, rand), 0.0, d)
        seg.sort(axis=1)
        label = np.where(rng.random(n) < 0.8, video_class[v], rng.integers(0, classes, n))
        score = rng.random(n)
        results[f"v{v:05d}"] = [{"label": names[c], "score": float(s), "segment": g.tolist()}
                                for c, s, g in zip(label, score, seg)]
    return {"version": "VERSION 1.3", "database": database}, {"version": "VERSION 1.3", "results": results, "external_data": {}}


def run(videos: int = 5000, predictions_per_video: int = 100, classes: int = 200, repeats: int = 3, seed: int = 0) -> dict:
    gt_tree, pred_tree = synthetic_problem(videos, predictions_per_video, classes, seed)
    gt_text, pred_text = json.dumps(gt_tree), json.dumps(pred_tree)
    del gt_tree, pred_tree

    t0 = time.perf_counter()
    gt_tree, pred_tree = json.loads(gt_text), json.loads(pred_text)
    t1 = time.perf_counter()
    gt, preds = parse_ground_truth(gt_tree, "validation"), parse_predictions(pred_tree)
    t2 = time.perf_counter()
    compute, compute_cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = evaluate_detection(gt, preds, ANET_THRESHOLDS)
        compute.append(time.perf_counter() - start)
        compute_cpu.append(time.process_time() - start_cpu)
    return {
        "benchmark": "map",
        "videos": len(gt.videos),
        "classes": len(gt.labels),
        "ground_truth_segments": int(gt.label.size),
        "predictions": int(preds.score.size),
        "thresholds": len(ANET_THRESHOLDS),
        "prediction_json_mb": round(len(pred_text) / 2**20, 1),
        "json_load_s": round(t1 - t0, 4),
        "parse_s": round(t2 - t1, 4),
        "compute_s": round(min(compute), 4),
        "compute_s_all": [round(c, 4) for c in compute],
        "compute_cpu_s": round(min(compute_cpu), 4),
        "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "total_s": round(t2 - t0 + min(compute), 4),
        "average_mAP": result["average_mAP"],
        "mAP": result["mAP"],
    }


def main(args: argparse.Namespace) -> int:
    result = run(videos=getattr(args, "videos", 5000))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"mAP of {result['predictions']:,} predictions ({result['videos']} videos, {result['classes']} classes, "
          f"{result['thresholds']} thresholds): compute {result['compute_s']:.3f} s (CPU {result['compute_cpu_s']:.3f} s), "
          f"parse {result['parse_s']:.3f} s, "
          f"JSON load {result['json_load_s']:.3f} s -> {out}")
    return 0
