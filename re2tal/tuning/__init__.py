"""Ray Tune sweeps over config keys (`tune.space`, `tune.cases`).

Three thin layers (Ray's Train V2 + Tune pattern): the Tuner here; the trial driver `_trial`, which
turns a trial's params into a validated config and runs the same `fit` of the same task as
`re2tal train`, with Tune's report callback; and the per-worker loop of re2tal.training. Each trial is its own
training run named `<tune.name>-<trial id>` (own checkpoints, own MLflow run nested under the
sweep's parent run). Re-running the same sweep name resumes the sweep: Tune restores its trials,
a trial that was cut off resumes from its training checkpoint into the same MLflow child run, and
the summary is logged again on the same parent run.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from re2tal.config import Config
from re2tal.training.task import Task
from re2tal.tuning.space import CASE, param_space, search_algorithm, trial_overrides
from re2tal.tuning.summary import best_config, best_row, columns, label, ranked, rows_from_results, to_csv, trial_name

SWEEP_TAG = "re2tal.sweep"  # on each trial's run: the sweep name
TRIAL_TAG = "re2tal.trial"  # on each trial's run: the Tune trial id
CASE_TAG = "re2tal.case"  # on each trial's run with a case: its label


@dataclasses.dataclass
class SweepResult:
    rows: list[dict[str, Any]]  # one per trial, best first
    columns: list[str]  # of the summary table
    best: dict[str, Any] | None  # the best finished trial's row
    best_config: str | None  # where its config YAML was written
    parent_run_id: str | None


def _trial(params: dict[str, Any], base: Config, task: Task, parent_run_id: str | None) -> None:
    """One trial: a training run of the base config with the trial's values."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from re2tal.tracking.sweep import PARENT_TAG
    from re2tal.training.driver import fit

    trial_id = tune.get_context().get_trial_id()
    cfg = base.with_overrides(trial_config_overrides(params, base, trial_id))
    tags = {SWEEP_TAG: base.tune.name, TRIAL_TAG: trial_id}
    if parent_run_id is not None:
        tags[PARENT_TAG] = parent_run_id
    if CASE in params:
        tags[CASE_TAG] = base.tune.case_label(params[CASE])
    fit(cfg, task, callbacks=[TuneReportCallback()], extra_tags=tags, show_progress=False)


def trial_config_overrides(params: dict[str, Any], base: Config, trial_id: str) -> dict[str, Any]:
    """What turns the sweep's config into a trial's: its values, its run name, and no sweep of its
    own (the cases are checked against the sweep's base config, not against each other: a pst_t
    trial's derived patch_shift would make a swin_t case invalid)."""
    return {**trial_overrides(params, base.tune), "train.name": trial_name(base, trial_id), "tune.space": {}, "tune.cases": []}


def sweep(cfg: Config, task: Task, verbose: bool = False) -> SweepResult:
    """Run (or resume) the sweep of `task`'s training runs; logs and returns its summary."""
    from ray import tune

    from re2tal.errors import BadInput
    from re2tal.raycluster import init_ray
    from re2tal.training.driver import storage_for_ray
    from re2tal.training.paths import absolute_paths

    cfg = absolute_paths(cfg)  # trials run in directories of their own
    if not cfg.tune.space and not cfg.tune.cases:
        raise BadInput("tune.space: is empty and there are no tune.cases; give at least one config key to sweep")
    if cfg.train.num_workers == 0:
        raise BadInput("train.num_workers: 0 (local mode) cannot run under Tune, whose trials need Ray Train workers; use 1 or more")
    task.check_data(cfg)  # bad data fails before any trial starts; the synthetic set is written once, not by each trial
    # Training reports reach Tune at checkpoints and evaluations, but only evaluations carry
    # tune.metric (ASHA skips the others); Tune would otherwise fail the trial at its first
    # checkpoint between evaluations.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if not verbose:  # Tune's newer console output prints experiment and error blocks even when silent
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    init_ray(verbose)
    uri = parent_id = None
    if cfg.tracking.enabled:  # before any trial: the trials' runs nest under it (and the database exists)
        from re2tal.tracking.sweep import open_sweep_run

        uri, parent_id, _ = open_sweep_run(cfg)
    storage_path, storage_fs = storage_for_ray(cfg.train.storage_path, cfg.storage)
    # The trial driver only waits on its TorchTrainer, whose workers hold the CPUs / GPUs. Tune
    # refuses an empty resource request, and a token fraction of a CPU would leave a trial whose
    # workers want all of a node's CPUs (the debug setup: 2 workers on 2 cores) unschedulable:
    # the driver asks for a token 1 MiB of Ray's memory resource instead.
    trainable = tune.with_parameters(tune.with_resources(_trial, {"memory": 2**20}), base=cfg, task=task, parent_run_id=parent_id)
    path = f"{storage_path.rstrip('/')}/{cfg.tune.name}"
    status = "FAILED"
    try:
        if tune.Tuner.can_restore(path, storage_filesystem=storage_fs):
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True, storage_filesystem=storage_fs)
        else:
            tuner = tune.Tuner(trainable, param_space=param_space(cfg.tune), tune_config=_tune_config(cfg),
                               run_config=_run_config(cfg, storage_path, storage_fs, verbose))
        results = tuner.fit()
        result = summarise(cfg, results, uri, parent_id)
        status = "FINISHED"
        return result
    finally:
        if parent_id is not None:
            from re2tal.tracking.sweep import close_sweep_run

            close_sweep_run(uri, parent_id, status)


def _tune_config(cfg: Config):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    t = cfg.tune
    if t.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs, grace_period=t.grace_period_epochs)
    else:
        scheduler = FIFOScheduler()
    return tune.TuneConfig(metric=t.metric, mode=t.mode, num_samples=t.num_samples, scheduler=scheduler,
                           search_alg=search_algorithm(t, cfg.train.seed),
                           max_concurrent_trials=t.max_concurrent_trials if t.search == "optuna" else None)


def _run_config(cfg: Config, storage_path: str, storage_fs, verbose: bool):
    from ray import tune

    from re2tal.tuning.callbacks import MemoryBudget, TrialLines

    stop = MemoryBudget(cfg.tune.memory_budget_gb) if cfg.tune.memory_budget_gb is not None else None
    return tune.RunConfig(name=cfg.tune.name, storage_path=storage_path, storage_filesystem=storage_fs, stop=stop,
                          verbose=None if verbose else 0, callbacks=None if verbose else [TrialLines(cfg)])


def summarise(cfg: Config, results, uri: str | None, parent_id: str | None) -> SweepResult:
    """Rows of every trial, the best trial's config written next to the sweep's Tune state, and
    (with tracking) the summary on the parent run and the trials' child runs closed."""
    from re2tal.data.storage import filesystem

    rows = rows_from_results(results, cfg)
    params = {row["trial"]: r.config for row, r in zip(rows, results)}
    rows = ranked(rows, cfg)
    cols = columns(rows, cfg)
    best = best_row(rows, cfg)
    best_yaml = best_config(cfg, params[best["trial"]]).to_yaml() if best is not None else None
    best_path = None
    if best_yaml is not None:
        best_path = f"{cfg.train.storage_path.rstrip('/')}/{cfg.tune.name}/best_config.yaml"
        fs, remote = filesystem(best_path, cfg.storage)
        fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(remote, "w") as f:
            f.write(best_yaml)
    if parent_id is not None:
        _log_to_parent(cfg, rows, cols, best, best_yaml, uri, parent_id)
    return SweepResult(rows, cols, best, best_path, parent_id)


def _log_to_parent(cfg: Config, rows, cols, best, best_yaml, uri: str, parent_id: str) -> None:
    from re2tal.tracking import sweep as tracking

    children = tracking.child_runs(uri, parent_id)
    for row in rows:
        run = children.get(trial_name(cfg, row["trial"]))
        row["run_id"] = run.info.run_id if run is not None else None
        if run is not None:
            tracking.close_child(uri, run, row["status"])
    labels = [label(r, cfg) for r in rows]
    figures = {
        "map_vs_memory.png": tracking.map_memory_figure(rows, labels, cfg.tune.memory_budget_gb, f"sweep {cfg.tune.name}"),
        "map_per_tiou.png": tracking.map_thresholds_figure(rows, labels, f"sweep {cfg.tune.name}: mAP per tIoU"),
    }
    counts = {f"trials_{s}": sum(r["status"] == s for r in rows) for s in ("ok", "stopped", "infeasible", "oom", "error")}
    metrics = {"trials": len(rows), **counts}
    tags = {}
    if best is not None:
        metrics[f"best_{cfg.tune.metric}"] = best[cfg.tune.metric]
        tags = {"best_trial": best["trial"], "best_run_id": best.get("run_id") or ""}
    tracking.log_summary(uri, parent_id, rows, to_csv(rows, cols + ["run_id"]), best_yaml, figures, metrics, tags)
