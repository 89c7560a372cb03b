"""From the config's `tune` section to what Ray Tune takes: the param space, the search
algorithm, and back from a trial's params to config overrides.

A trial's params are the dotted config keys it sets, plus `case` (the index into `tune.cases`)
when the sweep has cases. Grid keys and cases become `tune.grid_search` entries, so Ray's
BasicVariantGenerator crosses them and repeats the product `num_samples` times (its documented
meaning); with `search: grid` the choice keys are enumerated too.
"""

from __future__ import annotations

from typing import Any

from re2tal.config import CASE_NAME, TuneConfig

CASE = "case"  # param holding the index of the trial's entry of tune.cases


def param_space(tune_cfg: TuneConfig) -> dict[str, Any]:
    """Ray Tune param space (keys stay dotted config keys)."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, dim in tune_cfg.space.items():
        if dim.grid is not None or (tune_cfg.search == "grid" and dim.choice is not None):
            out[key] = tune.grid_search(list(dim.grid if dim.grid is not None else dim.choice))
        elif dim.choice is not None:
            out[key] = tune.choice(dim.choice)
        elif dim.uniform is not None:
            out[key] = tune.uniform(*dim.uniform)
        elif dim.loguniform is not None:
            out[key] = tune.loguniform(*dim.loguniform)
        else:
            out[key] = tune.randint(*dim.randint)
    if tune_cfg.cases:
        out[CASE] = tune.grid_search(list(range(len(tune_cfg.cases))))
    return out


def search_algorithm(tune_cfg: TuneConfig, seed: int):
    """Optuna's TPE sampler through Ray Tune's OptunaSearch (Tune limits its concurrency), or
    Ray's variant generator (random draws, grid enumeration) with a fixed seed, so the same sweep
    draws the same trials, limiting concurrency itself."""
    if tune_cfg.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed, max_concurrent=tune_cfg.max_concurrent_trials)


def trial_overrides(params: dict[str, Any], tune_cfg: TuneConfig) -> dict[str, Any]:
    """Config overrides of a trial: its sampled / enumerated keys and its case's keys."""
    out = {k: v for k, v in params.items() if k != CASE}
    if CASE in params:
        out |= {k: v for k, v in tune_cfg.cases[params[CASE]].items() if k != CASE_NAME}
    return out


def swept_keys(tune_cfg: TuneConfig) -> list[str]:
    """Every config key some trial sets, in config order: space keys, then case keys."""
    keys = list(tune_cfg.space)
    for case in tune_cfg.cases:
        keys += [k for k in case if k != CASE_NAME and k not in keys]
    return keys
