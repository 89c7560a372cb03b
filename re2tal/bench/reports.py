"""`re2tal bench reports`: what logging training metrics every step costs a training step.

The debug setup (configs/debug.yaml: the reduced Re²Swin, 2 Ray Train workers with DeepSpeed on
CPU) trains one epoch of its synthetic set (made once under .cache/bench-synth) with metrics
logged every optimizer step (`train.report_every_steps: 1`) and never (a period longer than the
run), alternating, `--repeats` times each. Throughput is the epoch's training clips/s over all
workers (evaluation excluded); a step's time is workers x batch / clips/s. Per-step metrics go to
MLflow from rank 0 in the background; a Ray Train report (which waits for the controller's 2 s
poll) is made only at evaluations and checkpoints, so the two should be equal.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

NEVER = 10**9


def run_epoch(root: Path, every: int, index: int) -> dict:
    from re2tal.config import load_config
    from re2tal.tasks.localization import Localization
    from re2tal.training.driver import fit

    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(repo / "configs" / "debug.yaml", [
        f"data.annotations={repo / '.cache' / 'bench-synth' / 'annotations.json'}", "train.epochs=1",
        f"train.report_every_steps={every}", f"train.name=every{every}-{index}", f"train.storage_path={root / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}"])
    started = time.perf_counter()
    metrics = fit(cfg, Localization(), show_progress=False)
    per_step = cfg.train.num_workers * cfg.data.batch_size * cfg.deepspeed.gradient_accumulation_steps
    return {"report_every_steps": every, "clips_per_s": metrics["clips_per_s"], "step_s": per_step / metrics["clips_per_s"],
            "steps": metrics["step"], "wall_s": time.perf_counter() - started}


def main(args: argparse.Namespace) -> int:
    from re2tal import console

    console.quiet_driver()
    runs: dict[str, list[dict]] = {"every_step": [], "never": []}
    with tempfile.TemporaryDirectory(prefix="re2tal-bench-reports-") as tmp:
        for i in range(args.repeats):
            for key, every in (("never", NEVER), ("every_step", 1)):
                runs[key].append(run_epoch(Path(tmp), every, i))
                print(f"{key}: {runs[key][-1]['step_s']:.3f} s / step", flush=True)
    step = {k: statistics.median(r["step_s"] for r in v) for k, v in runs.items()}
    result = {"config": "configs/debug.yaml, 1 epoch", "runs": runs, "step_s": step,
              "step_time_ratio": step["every_step"] / step["never"]}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"step time with metrics every step / never: {result['step_time_ratio']:.3f}")
    return 0
