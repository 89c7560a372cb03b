"""MLflow side of a sweep: one parent run per sweep, a nested child run per trial.

The parent (tagged `re2tal.sweep_run`) holds the sweep config and, at the end of every launch, the
summary: the trial table (CSV and JSON), the best trial's config as YAML ready for `re2tal train`,
and two plots. Each trial's training run is a child (`mlflow.parentRunId`), so the UI shows the
sweep as one expandable row. Re-launching the same sweep finds the parent again by its tag.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

from re2tal.config import Config
from re2tal.tracking import RUN_TAG, _client, open_tagged_run

SWEEP_RUN_TAG = "re2tal.sweep_run"  # on the parent: the sweep name
PARENT_TAG = "mlflow.parentRunId"  # on each child: the parent's run id (MLflow's nesting tag)
TRIAL_STATUS_TAG = "re2tal.trial_status"  # on each child once the sweep has seen it end


def open_sweep_run(cfg: Config) -> tuple[str, str, bool]:
    """Start (or find and re-open) the parent run of sweep `cfg.tune.name`.

    Returns (tracking uri, parent run id, resumed)."""
    note = f"re2tal sweep `{cfg.tune.name}`: one child run per trial, the summary under `summary/`"
    return open_tagged_run(cfg, SWEEP_RUN_TAG, cfg.tune.name, {"mlflow.note.content": note}, "config/sweep.yaml")


def child_runs(uri: str, parent_id: str) -> dict[str, Any]:
    """The parent's child runs by their training-run name (`re2tal.run` tag)."""
    client = _client(uri)
    exp_id = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=10000)
    return {r.data.tags.get(RUN_TAG): r for r in runs}


def close_child(uri: str, run, status: str) -> None:
    """Record how the sweep saw a trial end. A trial stopped by the scheduler or the memory
    budget is KILLED in MLflow (its training driver, interrupted, may have closed it as FAILED or
    not at all); one that failed and never closed its run is FAILED."""
    client = _client(uri)
    client.set_tag(run.info.run_id, TRIAL_STATUS_TAG, status)
    if status in ("stopped", "infeasible") and run.info.status != "KILLED":
        client.set_terminated(run.info.run_id, status="KILLED")
    elif status in ("oom", "error") and run.info.status == "RUNNING":
        client.set_terminated(run.info.run_id, status="FAILED")


def log_summary(uri: str, parent_id: str, rows: list[dict[str, Any]], csv_text: str, best_yaml: str | None,
                figures: Mapping[str, Any], metrics: Mapping[str, float], tags: Mapping[str, str]) -> None:
    """The sweep's summary on the parent run (artifacts overwrite those of an earlier launch)."""
    import matplotlib.pyplot as plt
    from mlflow.entities import Metric, RunTag

    client = _client(uri)
    client.log_text(parent_id, csv_text, "summary/trials.csv")
    client.log_dict(parent_id, rows, "summary/trials.json")
    if best_yaml is not None:
        client.log_text(parent_id, best_yaml, "summary/best_config.yaml")
    for name, fig in figures.items():
        client.log_figure(parent_id, fig, f"summary/{name}")
        plt.close(fig)
    now = int(time.time() * 1000)
    client.log_batch(parent_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])


def close_sweep_run(uri: str, parent_id: str, status: str) -> None:
    _client(uri).set_terminated(parent_id, status=status)


# ---------------------------------------------------------------------------------------------
# plots


def map_memory_figure(rows: list[dict[str, Any]], labels: list[str], budget_gb: float | None, title: str):
    """Average mAP against peak memory, one point per trial: colour = backbone, filled circle =
    reversible, cross = not; trials without an mAP (oom, infeasible before any evaluation) sit
    at 0 with a hollow marker."""
    from re2tal.tracking import _pyplot

    plt = _pyplot()
    backbones = sorted({r["backbone"] for r in rows})
    colours = {b: plt.cm.tab10(i % 10) for i, b in enumerate(backbones)}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row, text in zip(rows, labels):
        if row.get("peak_memory_gb") is None:
            continue
        value = row.get("average_mAP")
        colour = colours[row["backbone"]]
        marker = "o" if row["reversible"] else "X"
        face = colour if value is not None and row["status"] in ("ok", "stopped") else "none"
        ax.scatter(row["peak_memory_gb"], value or 0.0, s=70, marker=marker, facecolors=face, edgecolors=colour, linewidths=1.5)
        ax.annotate(f"{text} ({row['status']})" if row["status"] != "ok" else text, (row["peak_memory_gb"], value or 0.0),
                    textcoords="offset points", xytext=(5, 4), fontsize="x-small")
    if budget_gb is not None:
        ax.axvline(budget_gb, linestyle="--", color="gray")
    handles = [plt.Line2D([], [], color=colours[b], marker="s", linestyle="", label=b) for b in backbones]
    handles += [plt.Line2D([], [], color="black", marker="o", linestyle="", label="reversible"),
                plt.Line2D([], [], color="black", marker="X", linestyle="", label="not reversible")]
    if budget_gb is not None:
        handles.append(plt.Line2D([], [], color="gray", linestyle="--", label=f"budget {budget_gb:g} GB"))
    ax.legend(handles=handles, fontsize="small", loc="best")
    peaks = [r["peak_memory_gb"] for r in rows if r.get("peak_memory_gb") is not None] + [budget_gb or 0.0]
    ax.set_xlim(0, 1.15 * max(peaks) or 1.0)  # from 0: mAP per GB reads off the slope
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("peak memory per worker (GB)")
    ax.set_ylabel("average mAP")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def map_thresholds_figure(rows: list[dict[str, Any]], labels: list[str], title: str):
    """mAP at each tIoU threshold, one line per trial that was evaluated."""
    from re2tal.tracking import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row, text in zip(rows, labels):
        thresholds = sorted(k for k in row if k.startswith("mAP_") and row[k] is not None)
        if not thresholds:
            continue
        ax.plot([float(k.removeprefix("mAP_")) for k in thresholds], [row[k] for k in thresholds], marker="o",
                linestyle="-" if row["reversible"] else "--", label=f"{text}: {row['average_mAP']:.3f}" if row.get("average_mAP") is not None else text)
    ax.set_xlabel("tIoU threshold")
    ax.set_ylabel("mAP")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    if ax.lines:
        ax.legend(fontsize="x-small", title="trial: average mAP", title_fontsize="x-small")
    fig.tight_layout()
    return fig
