"""The handlers of `re2tal train | finetune | tune | eval | predict | extract | plan`: which task a
command runs, and what it prints."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from re2tal.config import Config
from re2tal.training.task import Task


def train(args: argparse.Namespace) -> int:
    return _run(args, localization(args.cfg), "train")


def localization(cfg: Config) -> Task:
    """The localization task: end to end from frames, or the head alone on data.features."""
    if cfg.data.features is not None:
        from re2tal.tasks.features import FeatureLocalization

        return FeatureLocalization()
    from re2tal.tasks.localization import Localization

    return Localization()


def finetune(args: argparse.Namespace) -> int:
    from re2tal.tasks.finetune import Finetune

    return _run(args, Finetune(), "finetune")


def _run(args: argparse.Namespace, task: Task, command: str) -> int:
    """Train the task; print its summary table, where the checkpoint, its outputs and the MLflow
    run are."""
    from rich.console import Console
    from rich.table import Table

    from re2tal.training.driver import TrainingStopped, fit

    cfg: Config = args.cfg
    try:
        metrics = fit(cfg, task, local=args.local, verbose=args.verbose)
    except TrainingStopped as err:
        print(f"re2tal {command}: {err}", file=sys.stderr)
        return 1
    table = Table(title=f"re2tal {command} {cfg.train.name}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for label, value in task.summary(metrics):
        table.add_row(label, value)
    console = Console()
    console.print(table)
    if metrics.get("checkpoint"):
        console.print(f"checkpoint: {metrics['checkpoint']}", soft_wrap=True)
    if metrics.get("backbone_file"):
        console.print(f"backbone file: {metrics['backbone_file']}  (a localization config loads it: "
                      f"--set backbone.pretrained={metrics['backbone_file']})", soft_wrap=True)
    if metrics.get("mlflow_run_id"):
        print_mlflow_link(console, cfg, f"MLflow run {metrics['mlflow_run_id']}")
    if metrics.get("model_uri"):
        console.print(f"  model: {metrics['model_uri']} (runs:/{metrics['mlflow_run_id']}/model)"
                      + (f", registered as {metrics['registered_model']}" if metrics.get("registered_model") else ""), soft_wrap=True)
    return 0


def print_mlflow_link(console, cfg: Config, what: str) -> None:
    """Where the run is in MLflow, and a link that opens the experiment's training-runs view."""
    from re2tal.tracking import _client, experiment_url

    uri = cfg.tracking.tracking_uri
    exp = _client(uri).get_experiment_by_name(cfg.tracking.experiment)
    console.print(f"{what} (experiment {cfg.tracking.experiment!r}) in {uri}", soft_wrap=True)
    if uri.startswith("sqlite:"):
        console.print(f"  browse: mlflow ui --backend-store-uri {uri}", soft_wrap=True)
    if exp is not None:
        console.print(f"  open: {experiment_url(uri, exp.experiment_id)}", soft_wrap=True)


def tune(args: argparse.Namespace) -> int:
    """Run the sweep of localization runs; print its trials best first, where the best config is
    and the MLflow link."""
    from rich.console import Console
    from rich.table import Table

    from re2tal.tuning import sweep
    from re2tal.tuning.space import swept_keys
    from re2tal.tuning.summary import fmt

    cfg: Config = args.cfg
    result = sweep(cfg, localization(cfg), verbose=args.verbose)
    # A case's keys are said by its name; the CSV on the parent run has them all.
    case_keys = set(swept_keys(cfg.tune)) - set(cfg.tune.space)
    columns = [c for c in result.columns if c not in case_keys]
    table = Table(title=f"sweep {cfg.tune.name}: {len(result.rows)} trials, best {cfg.tune.metric} ({cfg.tune.mode}) first")
    for column in columns:
        table.add_column(_header(column), justify="right" if column.startswith(("mAP_", "average", "peak", "clips", "step")) else "left")
    for row in result.rows:
        table.add_row(*(fmt(row.get(c)) for c in columns))
    console = Console()
    if not console.is_terminal:  # a job log: no 80-column squeeze
        console = Console(width=max(console.width, 160))
    console.print(table)
    for row in result.rows:
        if row.get("error"):
            console.print(f"trial {row['trial']} ({row['status']}): {row['error']}", soft_wrap=True)
    if result.best_config:
        console.print(f"best trial {result.best['trial']}: {cfg.tune.metric} {fmt(result.best[cfg.tune.metric])}; "
                      f"its config: {result.best_config}", soft_wrap=True)
        console.print(f"  train it again: re2tal train --config {result.best_config}", soft_wrap=True)
    else:
        console.print("no trial finished with a metric: no best config", soft_wrap=True)
    if result.parent_run_id:
        print_mlflow_link(console, cfg, f"MLflow parent run {result.parent_run_id}")
    return 0 if result.best is not None else 1


def _header(column: str) -> str:
    """Short table header of a summary column: `mAP@0.50`, `hflip` for `augment.hflip`."""
    names = {"average_mAP": "avg mAP", "peak_memory_gb": "peak GB", "clips_per_s": "clips/s"}
    if column in names:
        return names[column]
    if column.startswith("mAP_"):
        return "mAP@" + column.removeprefix("mAP_")
    return column.rsplit(".", 1)[-1]


def evaluate(args: argparse.Namespace) -> int:
    """Predict the validation subset with a checkpoint (the predict job) and score it."""
    from re2tal.tasks.predict import evaluate, load_model
    from re2tal.tracking import write_json

    cfg: Config = args.cfg
    model = load_model(args.checkpoint, cfg, {}, cfg.storage, flag="--checkpoint")
    result, submission, job = evaluate(model, args.predictions)
    result["weights"] = model.weights
    if args.json:
        write_json(result, args.json)
    print(f"{len(submission['results'])} videos of subset {cfg.data.val_subset!r}, {model.weights} weights"
          + (f", {len(job.failed)} could not be read" if job.failed else ""))
    for t, v in result["mAP"].items():
        print(f"mAP@{t}  {v:.4f}")
    print(f"average mAP  {result['average_mAP']:.4f}")
    return 0


def predict(args: argparse.Namespace) -> int:
    """`re2tal predict`: the model (its own config, overrides on top) over the collection."""
    from re2tal.config import parse_override
    from re2tal.data.collection import collection, is_annotations
    from re2tal.tasks.predict import load_model, predict, storage_for
    from re2tal.training.paths import absolute_paths

    overrides = dict(parse_override(o) for o in args.overrides)
    given = getattr(args, "cfg", None)
    model = load_model(args.model, given, overrides, storage_for(given, overrides))
    model.cfg = cfg = absolute_paths(model.cfg, args.base_dir)
    data = cfg.data
    if is_annotations(args.videos) and args.videos != data.annotations and "data.video_root" not in overrides:
        data = data.model_copy(update={"video_root": None})  # another file's videos are found next to it
    subsets = [args.subset or data.val_subset] if is_annotations(args.videos) else [args.subset] if args.subset else None
    submission, job = predict(model, collection(args.videos, data, cfg.storage, subsets), args.out)
    _summary("predicted", job.stats, len(submission["results"]), f"submission: {args.out}; per video: {args.out}.parts/")
    return 0


def extract(args: argparse.Namespace) -> int:
    """`re2tal extract`: the config's backbone over the collection (default: data.annotations)."""
    from re2tal.data.collection import collection
    from re2tal.data.synth import ensure_synthetic
    from re2tal.tasks.extract import FEATURES, extract

    cfg: Config = args.cfg
    if args.videos is None and cfg.data.synth is not None:
        ensure_synthetic(cfg.data, cfg.storage)
    videos = collection(args.videos or cfg.data.annotations, cfg.data, cfg.storage, [args.subset] if args.subset else None)
    features, job = extract(cfg, videos, args.out)
    _summary("extracted", job.stats, len(features["videos"]), f"features: {args.out.rstrip('/')}/<video_id>.npy, "
             f"{features['channels']} channels per clip; {args.out.rstrip('/')}/{FEATURES}")
    return 0


def _summary(verb: str, stats: dict[str, Any], outputs: int, where: str) -> None:
    print(f"{verb} {stats['processed']} videos ({stats['done_before']} done before, {stats['failed']} could not be read) in "
          f"{stats['seconds']:.1f} s, {stats['videos_per_s']:.2f} videos/s; {stats['actors']} model actors waited "
          f"{100 * stats['wait_fraction']:.0f}% of their time for input. {outputs} of {stats['videos']} videos have results.")
    print(where)


def plan(args: argparse.Namespace) -> int:
    """`re2tal plan` of a localization config: the table, and the JSON with --json."""
    from pathlib import Path

    from re2tal.errors import BadInput
    from re2tal.planning.plan import format_plan, make_plan
    from re2tal.tasks.localization import build_model

    if args.gpu_memory_gb <= 0:
        raise BadInput(f"--gpu-memory-gb: must be positive, got {args.gpu_memory_gb}")
    result = make_plan(args.cfg, build_model, args.gpu_memory_gb)
    print(format_plan(result))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return 0
