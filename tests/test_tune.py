"""Sweeps: search spaces and cases, one MLflow parent run per sweep with a nested child run per
trial, the summary (table, best config, plots), memory budget, resuming a killed sweep.

Real local Ray (its own instance: another `ray start` on the machine must not be joined), real
DeepSpeed on CPU, real MLflow SQLite stores, the tiny synthetic set and tiny trials of
tests/test_training.py (one epoch, one worker each).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from re2tal.config import load_config
from re2tal.errors import BadInput
from test_training import ROOT, SYNTH, _free_port, artifact_paths, tiny_config, wait_until_serving

TRIAL = {"train.epochs": 1, "train.num_workers": 1, "train.report_every_steps": 1, "tune.num_samples": 1,
         "tune.scheduler": "fifo", "tune.max_concurrent_trials": 2}


@pytest.fixture(scope="module")
def ray_address():
    """A Ray head of this module's own (`ray start --head`, as on a cluster); yields its address.

    Its processes get RAY_ADDRESS: Ray Train's placement-group cleaner (which releases the CPUs of
    a trial that Tune stopped) finds the cluster through the state API, which refuses to guess
    when another Ray runs on the same machine."""
    import ray

    ray_bin = Path(sys.executable).with_name("ray")
    port, dashboard = _free_port(), _free_port()
    agent_ports = [f"--{flag}={_free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                           "runtime-env-agent-port", "metrics-export-port",
                                                           "ray-client-server-port")]
    address = f"127.0.0.1:{port}"
    # Token authentication on (RAY_AUTH_MODE=token, conftest), with the default token file.
    subprocess.run([str(ray_bin), "get-auth-token", "--generate"], check=True, capture_output=True)
    env = dict(os.environ, RAY_ADDRESS=address, PYTHONPATH=str(ROOT),
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions")),
               RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0")  # one process less per trial; nothing is preempted here
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # socket paths must stay short
    # --block keeps the head's processes in this process group: killing the group stops only them.
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", *agent_ports,
                             f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until_serving(f"http://127.0.0.1:{dashboard}/api/version", head, 180, "ray head")
        ray.init(address=address)
        yield address
    finally:
        ray.shutdown()
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> str:
    from re2tal.config import StorageConfig
    from re2tal.data.synth import write_synthetic

    folder = tmp_path_factory.mktemp("synth")
    write_synthetic(str(folder), SYNTH, StorageConfig())
    return str(folder / "annotations.json")


def sweep_config(tmp_path: Path, annotations: str, name: str, **overrides):
    return tiny_config(tmp_path, annotations, name, **{**TRIAL, "tune.name": name, **overrides})


def client_for(cfg):
    from mlflow.tracking import MlflowClient

    from re2tal.tracking import resolve_uri

    return MlflowClient(resolve_uri(cfg.tracking.tracking_uri))


def sweep_runs(cfg):
    """(parent runs of the sweep, child runs by parent id) in the sweep's MLflow store."""
    from re2tal.tracking.sweep import PARENT_TAG, SWEEP_RUN_TAG

    client = client_for(cfg)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get(SWEEP_RUN_TAG) == cfg.tune.name]
    children: dict[str, list] = {}
    for r in runs:
        if PARENT_TAG in r.data.tags:
            children.setdefault(r.data.tags[PARENT_TAG], []).append(r)
    return parents, children


def summary_rows(cfg, run_id: str) -> list[dict]:
    path = client_for(cfg).download_artifacts(run_id, "summary/trials.csv")
    return list(csv.DictReader(io.StringIO(Path(path).read_text())))


def run_cli(*args: str, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "re2tal.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def cli_env(ray_address: str) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), RAY_ADDRESS=ray_address)


def terminated_trials(experiment_dir: Path) -> int:
    """Trials Tune has saved as finished in its experiment state (what a restore starts from)."""
    count = 0
    for path in glob.glob(str(experiment_dir / "experiment_state-*.json")):
        try:
            state = json.loads(Path(path).read_text())
        except (OSError, ValueError):  # being rewritten
            continue
        count = max(count, sum(json.loads(t[0])["status"] == "TERMINATED" for t in state["trial_data"]))
    return count


# --------------------------------------------------------------------------------------------
# the config: validated at load, one line naming the key


@pytest.mark.parametrize("tune, message", [
    ({"search": "grid", "space": {"optim.head_lr": {"loguniform": [1e-4, 1e-2]}}}, "tune.space.optim.head_lr: search: grid can only enumerate"),
    ({"search": "optuna", "space": {"augment.hflip": {"grid": [True, False]}}}, "tune.space.augment.hflip: search: optuna proposes"),
    ({"search": "optuna", "cases": [{"augment.hflip": True}]}, "tune.cases: search: optuna proposes"),
    ({"cases": [{"augment.hflipp": True}]}, "tune.cases.0.augment.hflipp: not a config key"),
    ({"cases": [{"name": "x", "augment.crop_scale": [0.9, 0.1]}]}, "tune.cases.0: gives an invalid config (augment.crop_scale"),
    ({"cases": [{"name": "x"}]}, "tune.cases.0: sets no config key"),
    ({"cases": [{"name": "a", "augment.hflip": True}, {"name": "a", "augment.hflip": False}]}, "tune.cases: case names repeat (a)"),
    ({"space": {"augment.hflip": {"grid": []}}}, "tune.space.augment.hflip.grid: needs at least one value"),
    ({"space": {"augment.hflip": {"grid": [True], "choice": [False]}}}, "give exactly one of choice / grid"),
    ({"space": {"augment.hflip": {"grid": [True]}}, "cases": [{"augment.hflip": False}]}, "tune.cases.0: augment.hflip is also a key of tune.space"),
    ({"memory_budget_gb": 0}, "tune.memory_budget_gb"),
])
def test_bad_sweep_settings_are_one_line_errors_naming_the_key(tmp_path, tune, message):
    tree = yaml.safe_load((ROOT / "configs/tune/augment_ablation.yaml").read_text())
    tree["tune"] = {k: v for k, v in tree["tune"].items() if k != "cases"} | tune
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(BadInput) as err:
        load_config(path)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_search_spaces_reach_tune_as_grids_choices_and_optuna_suggestions():
    from ray import tune

    from re2tal.tuning.space import CASE, param_space, search_algorithm, trial_overrides

    cfg = load_config(ROOT / "configs/tune/backbones.yaml")
    space = param_space(cfg.tune)
    assert space["backbone.reversible"] == tune.grid_search([True, False]) and space[CASE] == tune.grid_search([0, 1, 2, 3])
    assert trial_overrides({"backbone.reversible": False, CASE: 2}, cfg.tune) == {"backbone.reversible": False, "backbone.name": "slowfast_r50"}
    # search: grid enumerates choice keys too; random samples them
    augment = load_config(ROOT / "configs/tune/augment.yaml")
    assert isinstance(param_space(augment.tune)["augment.hflip"], tune.search.sample.Categorical)
    grid = augment.with_overrides({"tune.search": "grid"})
    assert param_space(grid.tune)["augment.hflip"] == tune.grid_search([True, False])
    # Optuna (TPE, through Ray Tune's OptunaSearch) proposes values for the dotted keys
    optuna = augment.with_overrides({"tune.search": "optuna", "tune.space": {"augment.hflip": {"choice": [True, False]},
                                                                             "optim.head_lr": {"loguniform": [1e-4, 1e-2]}}})
    searcher = search_algorithm(optuna.tune, seed=0)
    assert searcher.set_search_properties(optuna.tune.metric, optuna.tune.mode, param_space(optuna.tune))
    suggested = [searcher.suggest(f"t{i}") for i in range(3)]
    assert all(s["augment.hflip"] in (True, False) and 1e-4 <= s["optim.head_lr"] <= 1e-2 for s in suggested), suggested
    assert len({s["optim.head_lr"] for s in suggested}) == 3
    optuna.with_overrides(trial_overrides(suggested[0], optuna.tune))  # a valid trial config


@pytest.mark.parametrize("name", ["augment_ablation", "backbones", "anet_augment_ablation", "augment", "zoo"])
def test_every_trial_of_the_shipped_sweeps_is_a_valid_training_config(name):
    import itertools

    from re2tal.tuning import trial_config_overrides
    from re2tal.tuning.space import CASE

    cfg = load_config(ROOT / f"configs/tune/{name}.yaml")
    grids = {k: d.bounds() for k, d in cfg.tune.space.items()}  # every value of these choice / grid keys
    trials = [dict(zip(grids, values)) | ({CASE: i} if cfg.tune.cases else {})
              for values in itertools.product(*grids.values()) for i in range(len(cfg.tune.cases) or 1)]
    names = {cfg.with_overrides(trial_config_overrides(t, cfg, f"t{n}")).backbone.name for n, t in enumerate(trials)}
    assert len(trials) == {"augment_ablation": 6, "backbones": 8, "anet_augment_ablation": 6, "augment": 32, "zoo": 12}[name]
    assert names == {"backbones": {"swin_t", "pst_t", "slowfast_r50", "tada2d_r50"},
                     "zoo": {"swin_s", "swin_b", "mvit_v2_s", "r2plus1d_18", "r3d_18", "mc3_18"}}.get(name, {"swin_t"})


def test_trial_status_names_out_of_memory_wherever_it_comes_from():
    import ray.exceptions
    import torch

    from re2tal.tuning.summary import trial_row

    cfg = load_config(ROOT / "configs/tune/augment_ablation.yaml")
    reports = [{"trial_id": "t", "epoch": 0.5, "peak_memory_gb": 3.5}]

    def status(error):
        return trial_row(reports[-1], reports, {"case": 0}, error, cfg)["status"]

    def remote(cause: BaseException) -> BaseException:  # how a trial's exception reaches the driver
        return ray.exceptions.RayTaskError("ImplicitFunc.train", f"Traceback ...\n{type(cause).__name__}: {cause}", cause)

    assert status(remote(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))) == "oom"
    assert status(remote(MemoryError())) == "oom"
    assert status(remote(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))) == "oom"
    assert status(ray.exceptions.OutOfMemoryError("Task was killed due to the node running low on memory.")) == "oom"
    assert status(remote(ValueError("bad value"))) == "error"
    row = trial_row(reports[-1], reports, {"case": 0}, remote(MemoryError()), cfg)
    assert row["peak_memory_gb"] == 3.5 and row["case"] == "none"  # the last peak memory it reported
    assert trial_row(reports[-1], reports, {"case": 0}, None, cfg.with_overrides({"tune.memory_budget_gb": 3.0}))["status"] == "infeasible"


# --------------------------------------------------------------------------------------------
# sweeps on local Ray


@pytest.mark.slow
def test_augment_ablation_killed_and_resumed_ends_with_six_child_runs_under_one_parent(ray_address, synth, tmp_path):
    ablation = load_config(ROOT / "configs/tune/augment_ablation.yaml")
    cfg = sweep_config(tmp_path, synth, "ablation", **{"tune.search": "grid", "tune.cases": ablation.tune.cases})
    config = tmp_path / "ablation.yaml"
    config.write_text(cfg.to_yaml())
    env = cli_env(ray_address)

    # The first driver is killed (SIGKILL, nothing cleaned up) once Tune has saved two finished trials.
    first = subprocess.Popen([sys.executable, "-m", "re2tal.cli", "tune", "--config", str(config)], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while terminated_trials(tmp_path / "runs" / "ablation") < 2 and first.poll() is None and time.time() < deadline:
            time.sleep(1)
        assert first.poll() is None, "the sweep ended before it could be killed"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    parents, _ = sweep_runs(cfg)
    assert len(parents) == 1 and parents[0].info.status == "RUNNING"
    parent_id = parents[0].info.run_id

    out = run_cli("tune", "--config", str(config), env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    parents, children = sweep_runs(cfg)
    assert [p.info.run_id for p in parents] == [parent_id] and parents[0].info.status == "FINISHED"
    runs = children[parent_id]
    assert sorted(r.data.tags["re2tal.case"] for r in runs) == sorted(c["name"] for c in ablation.tune.cases)
    for run in runs:
        case = next(c for c in ablation.tune.cases if c["name"] == run.data.tags["re2tal.case"])
        assert {k: run.data.params[k] for k in case if k != "name"} == {k: json.dumps(v) for k, v in case.items() if k != "name"}
        assert run.info.status == "FINISHED" and run.data.tags["re2tal.trial_status"] == "ok"
        assert {"average_mAP", "peak_memory_gb", "mAP_0.50"} <= set(run.data.metrics)
        assert run.data.tags["re2tal.sweep"] == "ablation"

    rows = summary_rows(cfg, parent_id)
    assert sorted(r["case"] for r in rows) == sorted(c["name"] for c in ablation.tune.cases)
    assert all(r["status"] == "ok" and 0 <= float(r["average_mAP"]) <= 1 and float(r["peak_memory_gb"]) > 0.1 for r in rows)
    assert {"case", "status", "average_mAP", "mAP_0.50", "mAP_0.75", "mAP_0.95", "peak_memory_gb", "clips_per_s", "step",
            "augment.rotation"} <= set(rows[0])
    averages = [float(r["average_mAP"]) for r in rows]
    assert averages == sorted(averages, reverse=True)  # best first
    assert {"summary/trials.csv", "summary/trials.json", "summary/best_config.yaml", "summary/map_vs_memory.png",
            "summary/map_per_tiou.png", "config/sweep.yaml"} <= artifact_paths(client_for(cfg), parent_id)
    parent = client_for(cfg).get_run(parent_id)
    assert parent.data.metrics["trials_ok"] == 6 and parent.data.tags["best_trial"] == rows[0]["trial"]
    exp = client_for(cfg).get_experiment_by_name(cfg.tracking.experiment)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"

    # What the terminal shows: the table best first, where the best config is; no Ray / DeepSpeed noise.
    shown = out.stdout + out.stderr
    for noise in ("No CUDA runtime", "built successfully", "PreemptionWatcher", "PlacementGroupCleaner", "Trial status",
                  "Token authentication", "mlflow.store.db", "INFO"):
        assert noise not in shown, (noise, shown[-3000:])
    assert "crop+flip+color jitter" in out.stdout and "workflowType=machine_learning" in out.stdout
    best = tmp_path / "runs" / "ablation" / "best_config.yaml"
    assert f"its config: {best}" in out.stdout.replace("\n", "")

    # The best trial's config trains as it is.
    best_cfg = load_config(best)
    assert best_cfg.train.name == "ablation-best" and not best_cfg.tune.cases
    case = next(c for c in ablation.tune.cases if c["name"] == rows[0]["case"])
    assert all(best_cfg.flat()[k] == v for k, v in case.items() if k != "name")
    from re2tal.cli import main

    assert main(["train", "--config", str(best), "--local"]) == 0  # in this process: no second start-up
    assert any((tmp_path / "runs" / "ablation-best").glob("epoch0001-*/state"))


@pytest.mark.slow
def test_grid_of_two_keys_runs_each_pair_once_and_trials_over_the_memory_budget_are_infeasible(ray_address, synth, tmp_path):
    from re2tal.tasks.localization import Localization
    from re2tal.tuning import sweep

    # The wide head (~50M parameters) needs about 1 GB more per worker than the tiny one.
    cfg = sweep_config(tmp_path, synth, "grid", **{
        "tune.space": {"head.embed_dim": {"grid": [16, 1024]}, "augment.hflip": {"grid": [True, False]}},
        "tune.memory_budget_gb": 1.9})
    result = sweep(cfg, Localization())
    pairs = sorted((r["head.embed_dim"], r["augment.hflip"]) for r in result.rows)
    assert pairs == [(16, False), (16, True), (1024, False), (1024, True)]
    status = {(r["head.embed_dim"], r["augment.hflip"]): r["status"] for r in result.rows}
    assert status == {(16, False): "ok", (16, True): "ok", (1024, False): "infeasible", (1024, True): "infeasible"}, result.rows
    for row in result.rows:
        if row["status"] == "infeasible":
            assert row["peak_memory_gb"] > 1.9 and row["epoch"] < 1  # stopped at its first report
    assert result.best["head.embed_dim"] == 16
    parents, children = sweep_runs(cfg)
    assert len(parents) == 1 and len(children[parents[0].info.run_id]) == 4
    for run in children[parents[0].info.run_id]:
        wide = run.data.params["head.embed_dim"] == "1024"
        assert run.data.tags["re2tal.trial_status"] == ("infeasible" if wide else "ok")
        assert run.info.status == ("KILLED" if wide else "FINISHED")
    assert sorted(r["status"] for r in summary_rows(cfg, parents[0].info.run_id)) == ["infeasible", "infeasible", "ok", "ok"]
