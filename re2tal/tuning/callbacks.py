"""What the Tuner is given besides the trainable: the memory-budget stopper and the callback
that prints one line per evaluation and per trial end (in place of Tune's status tables)."""

from __future__ import annotations

from ray.tune import Callback

from re2tal.config import Config
from re2tal.tuning.space import CASE


class MemoryBudget:
    """Stop condition: a trial whose reported peak memory passes the budget is stopped (and
    recorded `infeasible` by the summary)."""

    def __init__(self, budget_gb: float):
        self.budget_gb = budget_gb

    def __call__(self, trial_id: str, result: dict) -> bool:
        peak = result.get("peak_memory_gb")
        return isinstance(peak, (int, float)) and peak > self.budget_gb


class TrialLines(Callback):
    def __init__(self, cfg: Config):
        self.tune_cfg = cfg.tune

    def _name(self, trial) -> str:
        config = trial.config or {}
        parts = [self.tune_cfg.case_label(config[CASE])] if CASE in config else []
        parts += [f"{k.rsplit('.', 1)[-1]}={config[k]}" for k in self.tune_cfg.space if k in config]
        return f"trial {trial.trial_id}" + (f" [{' '.join(parts)}]" if parts else "")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if "average_mAP" in result:
            peak = result.get("peak_memory_gb")
            memory = f", peak memory {peak:.2f} GB" if isinstance(peak, (int, float)) else ""
            print(f"{self._name(trial)} epoch {result.get('epoch')}: average mAP {result['average_mAP']:.4f}{memory}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        print(f"{self._name(trial)}: ended", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        print(f"{self._name(trial)}: failed (see the summary)", flush=True)
