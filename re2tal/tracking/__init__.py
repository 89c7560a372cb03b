"""MLflow tracking: one MLflow run per training run.

The driver opens the run (or finds the one a previous launch of the same `train.name` opened, so a
resumed run keeps logging into it) and logs params, tags and the resolved YAML; rank 0 of the
workers logs metrics and artifacts with the run id. An explicit `MlflowClient` and run id are used
throughout, never MLflow's global active run.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

from re2tal.config import Config, TrackingConfig
from re2tal.tracking.datasets import log_datasets  # noqa: F401
from re2tal.tracking.models import LoggedModel, log_model  # noqa: F401
from re2tal.tracking.system import SystemMetrics  # noqa: F401
from re2tal.tracking.tracker import Tracker, retrying  # noqa: F401  (Tracker: re2tal.tracking.Tracker)

RUN_TAG = "re2tal.run"
# The kind of experiment from which MLflow 3 UIs choose between the GenAI (traces) view and the
# machine-learning (training runs) view. 3.17's UI reads the tag only with its workflow-type switch
# off (it ships on) and otherwise takes the page's `workflowType` parameter: `experiment_url`.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
PARAM_BATCH = 100  # MLflow's limit of params per log_batch call
PARAM_VALUE_CHARS = 6000


def resolve_uri(uri: str) -> str:
    """Absolute form of a relative sqlite URI, so workers with another working directory (Ray
    workers run in their own) write to the same file as the driver."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, cfg: TrackingConfig, uri: str) -> str:
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:  # made by an earlier re2tal or by hand
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # artifacts next to the database, not in whatever cwd is
        location = Path(uri[len("sqlite:///"):]).parent.joinpath("mlartifacts").as_uri()
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(cfg.experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except MlflowException:  # another process (a concurrent trial) created it first: use theirs
        exp = client.get_experiment_by_name(cfg.experiment)
        if exp is None:
            raise
        return exp.experiment_id


def experiment_url(uri: str, experiment_id: str) -> str:
    """Link to the experiment's training-runs view in the MLflow UI (the UI that `mlflow ui`
    serves on its default address for a database URI)."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def open_run(cfg: Config, extra_tags: Mapping[str, str] | None = None) -> tuple[str, str, bool]:
    """Start (or find and re-open) the MLflow run of `cfg.train.name`.

    Returns (tracking uri as workers must use it, run id, resumed)."""
    tags = {"backbone": cfg.backbone.name, "reversible": str(cfg.backbone.reversible).lower(), **(extra_tags or {}),
            "mlflow.note.content": f"re2tal run `{cfg.train.name}`"}
    return open_tagged_run(cfg, RUN_TAG, cfg.train.name, tags, "config/resolved.yaml")


def open_tagged_run(cfg: Config, tag: str, name: str, tags: Mapping[str, str], config_file: str) -> tuple[str, str, bool]:
    """The run of cfg's experiment tagged `tag = name`, set RUNNING again; or a new one named
    `name` with these tags and the config logged (params and `config_file`).

    Returns (tracking uri, run id, resumed)."""
    uri = resolve_uri(cfg.tracking.tracking_uri)
    client = _client(uri)
    exp_id = _experiment_id(client, cfg.tracking, uri)
    found = client.search_runs([exp_id], filter_string=f"tags.`{tag}` = '{name}'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return uri, found[0].info.run_id, True
    run = client.create_run(exp_id, run_name=name, tags={tag: name, "git_commit": git_commit(), **tags})
    log_config(client, run.info.run_id, cfg, config_file)
    return uri, run.info.run_id, False


def log_config(client, run_id: str, cfg: Config, artifact_file: str = "config/resolved.yaml") -> None:
    """The flattened config as params (secrets left out) and the YAML (secrets masked)."""
    from mlflow.entities import Param

    params = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in sorted(cfg.flat().items())]
    params = [Param(p.key, p.value[:PARAM_VALUE_CHARS]) for p in params]
    for i in range(0, len(params), PARAM_BATCH):
        client.log_batch(run_id, params=params[i : i + PARAM_BATCH])
    client.log_text(run_id, cfg.to_yaml(), artifact_file)


def close_run(uri: str, run_id: str, status: str, tags: Mapping[str, str] | None = None, retry_s: float = 0.0) -> None:
    """Tag the run and end it with `status`, retrying for up to `retry_s` while the tracking
    server does not answer."""
    client = _client(uri)

    def close() -> None:
        for k, v in (tags or {}).items():
            client.set_tag(run_id, k, v)
        client.set_terminated(run_id, status=status)

    retrying(close, retry_s)


# ---------------------------------------------------------------------------------------------
# plots (matplotlib, Agg)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def map_figure(result: Mapping[str, Any], title: str):
    """mAP at each tIoU threshold (and the average), from the evaluation result dict."""
    plt = _pyplot()
    thresholds = list(result["mAP"].keys())
    values = [result["mAP"][t] for t in thresholds]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([float(t) for t in thresholds], values, marker="o")
    ax.axhline(result["average_mAP"], linestyle="--", color="gray", label=f"average {result['average_mAP']:.3f}")
    ax.set_xlabel("tIoU threshold")
    ax.set_ylabel("mAP")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def pr_figure(curves: Mapping[str, tuple[Iterable[float], Iterable[float]]], title: str):
    """Precision-recall curves, one per tIoU threshold: {"0.50": (recall, precision), ...}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for tiou, (recall, precision) in curves.items():
        ax.plot(list(recall), list(precision), label=f"tIoU {tiou}")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def timeline_figure(database: Mapping[str, Any], results: Mapping[str, list], video_ids: list[str], top_k: int = 5):
    """Ground truth (top bar of each video) against the top-k predicted segments (below, opacity =
    score) on the time axis, one row per video, colour per class."""
    plt = _pyplot()
    labels = sorted({a["label"] for v in video_ids for a in database[v]["annotations"]} |
                    {p["label"] for v in video_ids for p in results.get(v, [])[:top_k]})
    colours = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
    fig, axes = plt.subplots(len(video_ids), 1, figsize=(8, 1.1 * len(video_ids) + 0.6), squeeze=False)
    for ax, vid in zip(axes[:, 0], video_ids):
        duration = float(database[vid]["duration"])
        for a in database[vid]["annotations"]:
            s, e = a["segment"]
            ax.broken_barh([(s, e - s)], (1.1, 0.8), color=colours[a["label"]])
        preds = sorted(results.get(vid, []), key=lambda p: -p["score"])[:top_k]
        for row, p in enumerate(preds):
            s, e = p["segment"]
            ax.broken_barh([(s, e - s)], (0.9 - (row + 1) * 0.9 / top_k, 0.8 / top_k), color=colours[p["label"]],
                           alpha=max(0.15, min(1.0, p["score"])))
        ax.set_xlim(0, duration)
        ax.set_yticks([1.5, 0.45], ["truth", "pred"])
        ax.set_title(vid, fontsize="small", loc="left")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    fig.legend(handles, list(colours), loc="lower center", ncol=min(6, len(colours)), fontsize="small")
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(obj, f)
    os.replace(f.name, path)
    return path
