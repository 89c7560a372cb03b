"""A finished (or resumed) sweep as one row per trial: swept values, status, mAP, memory,
throughput; the best trial and its config; the table as text.

Status of a trial:
- `ok`: trained every epoch;
- `stopped`: stopped early by the ASHA scheduler (its metrics are those of an earlier epoch);
- `infeasible`: stopped because its peak memory passed `tune.memory_budget_gb`;
- `oom`: died of out-of-memory (CUDA OOM, host MemoryError / allocation failure, Ray's OOM killer);
- `error`: failed otherwise (`error` holds the last line of the error).
"""

from __future__ import annotations

import csv
import io
import math
import re
from typing import Any

from re2tal.config import Config
from re2tal.tuning.space import CASE, swept_keys, trial_overrides

# Errors that mean "out of memory" wherever they come from: torch.OutOfMemoryError (CUDA),
# MemoryError and the CPU allocator's failure, Ray's memory monitor killing a worker.
OOM = re.compile(r"OutOfMemoryError|out of memory|\bMemoryError\b|can't allocate memory|"
                 r"killed due to (the node|memory) running low on memory|memory monitor", re.IGNORECASE)
SHOWN_THRESHOLDS = ("0.50", "0.75", "0.95")
METRICS = ("peak_memory_gb", "clips_per_s", "step", "epoch")


def trial_name(cfg: Config, trial_id: str) -> str:
    """`train.name` of a trial's training run (its checkpoints and its MLflow child run)."""
    return f"{cfg.tune.name}-{trial_id}"


def rows_from_results(results, cfg: Config) -> list[dict[str, Any]]:
    """One row per trial of a Ray Tune ResultGrid, in trial order."""
    return [trial_row(r.metrics or {}, _history(r), r.config or {}, r.error, cfg) for r in results]


def _history(result) -> list[dict[str, Any]]:
    df = result.metrics_dataframe
    return df.to_dict("records") if df is not None else [result.metrics or {}]


def trial_row(last: dict[str, Any], history: list[dict[str, Any]], params: dict[str, Any], error: BaseException | None,
              cfg: Config) -> dict[str, Any]:
    """A trial's row from its last result, all its reported results and its params."""
    values = _last_values(history + [last])
    peaks = [v for r in history + [last] if _number(v := r.get("peak_memory_gb"))]
    values["peak_memory_gb"] = max(peaks) if peaks else None
    overrides = trial_overrides(params, cfg.tune)
    trial_cfg = {**cfg.flat(), **overrides}
    row: dict[str, Any] = {"trial": last.get("trial_id") or values.get("trial_id")}
    if cfg.tune.cases:
        row["case"] = cfg.tune.case_label(params[CASE]) if CASE in params else None
    row |= {key: overrides.get(key) for key in swept_keys(cfg.tune)}
    row["status"] = _status(values, error, cfg)
    row |= {key: values.get(key) for key in sorted(values) if key.startswith("mAP_")}
    row["average_mAP"] = values.get("average_mAP")
    if cfg.tune.metric not in row:
        row[cfg.tune.metric] = values.get(cfg.tune.metric)
    row |= {key: values.get(key) for key in METRICS}
    row["backbone"], row["reversible"] = trial_cfg["backbone.name"], trial_cfg["backbone.reversible"]
    row["error"] = _last_line(error) if error is not None else None
    return row


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _last_values(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The latest finite value of every metric over a trial's reports."""
    out: dict[str, Any] = {}
    for report in history:
        for key, value in report.items():
            if _number(value) or (isinstance(value, str) and key == "trial_id"):
                out[key] = value
    return out


def _status(values: dict[str, Any], error: BaseException | None, cfg: Config) -> str:
    if error is not None:
        return "oom" if OOM.search(_full_text(error)) else "error"
    budget, peak = cfg.tune.memory_budget_gb, values.get("peak_memory_gb")
    if budget is not None and peak is not None and peak > budget:
        return "infeasible"
    if (values.get("epoch") or 0) < cfg.train.epochs:
        return "stopped"
    return "ok"


def _full_text(error: BaseException) -> str:
    """The error with its causes (Ray wraps a trial's exception; its text holds the remote
    traceback, whose chained causes name the original error)."""
    parts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        parts.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return "\n".join(parts)


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def ranked(rows: list[dict[str, Any]], cfg: Config) -> list[dict[str, Any]]:
    """Rows best first: finished trials by the metric, then the others (stopped, infeasible,
    oom, error) in that order."""
    sign = -1 if cfg.tune.mode == "max" else 1
    order = {"ok": 0, "stopped": 1, "infeasible": 2, "oom": 3, "error": 4}

    def key(row: dict[str, Any]) -> tuple:
        value = row.get(cfg.tune.metric)
        return (order[row["status"]], 0 if _number(value) else 1, sign * value if _number(value) else 0.0)

    return sorted(rows, key=key)


def best_row(rows: list[dict[str, Any]], cfg: Config) -> dict[str, Any] | None:
    """The finished trial with the best metric (None if no trial finished with one)."""
    first = ranked(rows, cfg)[:1]
    return first[0] if first and first[0]["status"] == "ok" and _number(first[0].get(cfg.tune.metric)) else None


def best_config(cfg: Config, params: dict[str, Any]) -> Config:
    """The resolved config of a trial as a plain training run (`<sweep>-best`, no tune section,
    credentials left to the environment), ready for `re2tal train --config`."""
    overrides = trial_overrides(params, cfg.tune) | {"train.name": f"{cfg.tune.name}-best", "tune": {}}
    if cfg.storage.access_key_id is not None:
        overrides |= {"storage.access_key_id": None, "storage.secret_access_key": None}
    return cfg.with_overrides(overrides)


def columns(rows: list[dict[str, Any]], cfg: Config) -> list[str]:
    """Columns of the summary table: the trial, what was swept, how it ended, the metric and
    mAP at 0.5 / 0.75 / 0.95 (every threshold if those are not all evaluated), memory, speed."""
    thresholds = sorted({k.removeprefix("mAP_") for r in rows for k in r if k.startswith("mAP_")})
    shown = [t for t in SHOWN_THRESHOLDS if t in thresholds]
    if len(shown) < len(SHOWN_THRESHOLDS):
        shown = thresholds
    cols = ["trial"] + (["case"] if cfg.tune.cases else []) + swept_keys(cfg.tune) + ["status", "average_mAP"]
    if cfg.tune.metric not in cols:
        cols.append(cfg.tune.metric)
    return cols + [f"mAP_{t}" for t in shown] + ["peak_memory_gb", "clips_per_s", "step"]


def fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def to_csv(rows: list[dict[str, Any]], cols: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(cols + ["error"])
    for row in rows:
        writer.writerow([fmt(row.get(c)) for c in cols + ["error"]])
    return out.getvalue()


def to_markdown(rows: list[dict[str, Any]], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in cols) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def label(row: dict[str, Any], cfg: Config) -> str:
    """Short name of a trial for plots and progress lines: its case and its other swept values."""
    parts = [row["case"]] if row.get("case") else []
    parts += [f"{k.rsplit('.', 1)[-1]}={fmt(row[k])}" for k in cfg.tune.space if k in row]
    return " ".join(parts) or str(row["trial"])
