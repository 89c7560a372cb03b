"""Ray Tune sweeps over config keys (`tune.space`).

Three thin layers (Ray's Train V2 + Tune pattern): the Tuner here; the trial driver `_trial`, which
turns a trial's sampled values into a validated config and runs the same `fit` as `re2tal train`,
with Tune's report callback; and the per-worker loop of re2tal.training. Each trial is its own
training run named `<tune.name>-<trial id>` (own checkpoints, own MLflow run, tagged with the
sweep), and re-running the same sweep name resumes the sweep.
"""

from __future__ import annotations

import os
from typing import Any

from re2tal.config import Config, SearchDim

SWEEP_TAG = "re2tal.sweep"


def search_space(space: dict[str, SearchDim]) -> dict[str, Any]:
    """Ray Tune search space from the config's dimensions (keys stay dotted config keys)."""
    from ray import tune

    out = {}
    for key, dim in space.items():
        if dim.choice is not None:
            out[key] = tune.choice(dim.choice)
        elif dim.uniform is not None:
            out[key] = tune.uniform(*dim.uniform)
        elif dim.loguniform is not None:
            out[key] = tune.loguniform(*dim.loguniform)
        else:
            out[key] = tune.randint(*dim.randint)
    return out


def _trial(params: dict[str, Any], base: Config) -> None:
    """One trial: a training run of the base config with the sampled values."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from re2tal.training.trainer import fit

    trial_id = tune.get_context().get_trial_id()
    cfg = base.with_overrides({**params, "train.name": f"{base.tune.name}-{trial_id}"})
    fit(cfg, callbacks=[TuneReportCallback()], extra_tags={SWEEP_TAG: base.tune.name}, show_progress=False)


def sweep(cfg: Config) -> list[dict[str, Any]]:
    """Run (or resume) the sweep; returns one row per trial, best first."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from re2tal.training.trainer import absolute_paths, init_ray, storage_for_ray

    cfg = absolute_paths(cfg)  # trials run in directories of their own
    # Every training report reaches Tune, but only evaluations carry tune.metric (ASHA skips the
    # others); Tune would otherwise fail the trial at its first step report.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if not cfg.tune.space:
        from re2tal.errors import BadInput

        raise BadInput("tune.space: is empty; give at least one config key to sweep")
    init_ray()
    storage_path, storage_fs = storage_for_ray(cfg.train.storage_path, cfg.storage)
    if cfg.tune.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs, grace_period=cfg.tune.grace_period_epochs)
    else:
        scheduler = FIFOScheduler()
    # The trial driver only waits on its TorchTrainer, whose workers hold the CPUs / GPUs (Tune
    # refuses an empty resource request, hence a token 0.01 CPU).
    trainable = tune.with_parameters(tune.with_resources(_trial, {"CPU": 0.01}), base=cfg)
    path = f"{storage_path.rstrip('/')}/{cfg.tune.name}"
    if tune.Tuner.can_restore(path, storage_filesystem=storage_fs):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True, storage_filesystem=storage_fs)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(cfg.tune.space),
            tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode=cfg.tune.mode, num_samples=cfg.tune.num_samples,
                                        scheduler=scheduler, max_concurrent_trials=cfg.tune.max_concurrent_trials),
            run_config=tune.RunConfig(name=cfg.tune.name, storage_path=storage_path, storage_filesystem=storage_fs),
        )
    results = tuner.fit()
    rows = []
    for result in results:
        row = {"trial": result.path.rsplit("/", 1)[-1] if result.path else None, **{k: result.config.get(k) for k in cfg.tune.space}}
        metrics = result.metrics or {}
        row[cfg.tune.metric] = metrics.get(cfg.tune.metric)
        row["epoch"] = metrics.get("epoch")
        row["error"] = str(result.error).splitlines()[0] if result.error else None
        rows.append(row)
    sign = 1 if cfg.tune.mode == "max" else -1
    rows.sort(key=lambda r: -sign * (r[cfg.tune.metric] if r[cfg.tune.metric] is not None else -sign * float("inf")))
    return rows
