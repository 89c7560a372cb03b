"""`re2tal bench all --out DIR`: every benchmark, each in its own process, JSON files into DIR."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

# (file name, arguments of `re2tal bench ...`): the project's targets are measured on these.
BENCHMARKS = [
    ("memory_stage12.json", ["memory", "--stage-blocks", "12"]),
    ("speed_stage12.json", ["speed", "--stage-blocks", "12"]),
    ("memory_swin_t.json", ["memory", "--backbone", "swin_t", "--frames", "32", "--size", "112"]),
    ("speed_swin_t.json", ["speed", "--backbone", "swin_t", "--frames", "32", "--size", "112"]),
    ("memory_tada2d_r50.json", ["memory", "--backbone", "tada2d_r50", "--frames", "32", "--size", "112"]),
    ("speed_tada2d_r50.json", ["speed", "--backbone", "tada2d_r50", "--frames", "32", "--size", "112"]),
    ("tadaconv.json", ["tadaconv"]),
    ("loader.json", ["loader"]),
    ("predict.json", ["predict"]),
    ("map.json", ["map"]),
    ("reports.json", ["reports"]),
]


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name, bench in BENCHMARKS:
        started = time.time()
        print(f"re2tal bench {' '.join(bench)} -> {out / name}", flush=True)
        done = subprocess.run([sys.executable, "-m", "re2tal.cli", "bench", *bench, "--json", str(out / name)])
        print(f"  {'ok' if done.returncode == 0 else 'FAILED'} in {time.time() - started:.0f} s", flush=True)
        if done.returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
