"""The main job end to end: real local Ray, real DeepSpeed engines on CPU, real moto S3, real
MLflow stores (SQLite and an `mlflow server`), a tiny synthetic dataset and a tiny reversible Swin.

Every run here uses the same tiny config (a few seconds of training); most of each test's time is
Ray starting worker processes and DeepSpeed initialising.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

import conftest
from re2tal.config import Config, SynthConfig, validate
from re2tal.tasks.localization import Localization

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

SYNTH = SynthConfig(videos=6, val_videos=2, classes=2, duration_s=6, fps=5, size=32, seed=3)
TINY = {
    "data": {"sampling": "uniform", "num_frames": 16, "frame_size": 32, "loader_threads": 1, "prefetch_videos": 1},
    "augment": {"rotation": True, "color_jitter": True},
    "backbone": {"name": "swin_t", "reversible": True, "embed_dim": 8, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1],
                 "window_size": [8, 4, 4], "drop_path": 0.1},
    "head": {"num_classes": 2, "seq_len": 8, "embed_dim": 16, "fpn_levels": 2, "stem_layers": 1, "attn_window": 3,
             "num_attn_heads": 2},
    "optim": {"backbone_lr": 1e-3, "head_lr": 1e-3, "warmup_epochs": 0},
    "train": {"epochs": 2, "num_workers": 2, "report_every_steps": 1, "max_failures": 0},
    "deepspeed": {"zero_stage": 2, "precision": "fp32"},
    "tracking": {"experiment": "re2tal-tests"},
}
STEPS_PER_EPOCH = 2  # 4 training videos / (2 workers x batch 1)
RUN_METRICS = {"loss", "cls_loss", "reg_loss", "lr", "lr_backbone", "average_mAP", "mAP_0.50", "mAP_0.95",
               "peak_memory_gb", "predicted_peak_memory_gb", "clips_per_s", "videos_per_s", "data_wait_fraction", "random_average_mAP"}


tiny_config = functools.partial(conftest.tiny_config, TINY)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions"))}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_set(tmp_path_factory) -> str:
    """The tiny synthetic set in a local folder; returns its annotation file."""
    from re2tal.config import StorageConfig
    from re2tal.data.synth import write_synthetic

    folder = tmp_path_factory.mktemp("synth")
    write_synthetic(str(folder), SYNTH, StorageConfig())
    return str(folder / "annotations.json")


def mlflow_run(cfg: Config, run_id: str):
    from mlflow.tracking import MlflowClient

    from re2tal.tracking import resolve_uri

    client = MlflowClient(resolve_uri(cfg.tracking.tracking_uri))
    return client, client.get_run(run_id)


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return out


# --------------------------------------------------------------------------------------------


def test_two_workers_from_s3_log_everything_to_mlflow_sqlite(ray_cluster, s3, tmp_path):
    from re2tal.data.synth import write_synthetic
    from re2tal.training.driver import fit

    write_synthetic(s3.url("synth"), SYNTH, s3.storage)
    # evaluated only from the second epoch on (without eval_start_epoch, after each of the two)
    cfg = tiny_config(tmp_path, s3.url("synth/annotations.json"), "s3-run", **s3.overrides(), **{"train.eval_start_epoch": 1})
    metrics = fit(cfg, Localization())

    assert metrics["step"] == cfg.train.epochs * STEPS_PER_EPOCH
    assert metrics["epoch"] == cfg.train.epochs
    assert 0.0 <= metrics["average_mAP"] <= 1.0 and metrics["peak_memory_gb"] > 0.1
    checkpoint = Path(metrics["checkpoint"])
    assert (checkpoint / "state").is_dir() and (checkpoint / "worker_rank0.pt").exists() and (checkpoint / "worker_rank1.pt").exists()
    # what the model is, from rank 0: the resolved config (validating again, credentials left out) and the label map
    kept = yaml.safe_load((checkpoint / "config.yaml").read_text())
    assert validate(kept) == cfg.with_overrides({"storage.access_key_id": None, "storage.secret_access_key": None})
    assert yaml.safe_load((checkpoint / "labels.json").read_text()) == ["disk_sway", "square_bob"]

    client, run = mlflow_run(cfg, metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert RUN_METRICS <= set(run.data.metrics), RUN_METRICS - set(run.data.metrics)
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, cfg.train.epochs * STEPS_PER_EPOCH + 1))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "average_mAP")] == [2 * STEPS_PER_EPOCH]
    params = run.data.params
    assert params["backbone.name"] == "swin_t" and params["train.epochs"] == "2"
    assert params["storage.endpoint_url"] == s3.endpoint_url
    assert not any(k.endswith(("access_key_id", "secret_access_key")) for k in params)
    assert "testing" not in str(params.values())  # the credentials
    assert run.data.tags["backbone"] == "swin_t" and run.data.tags["reversible"] == "true"
    assert len(run.data.tags["git_commit"]) in (40, len("unknown"))
    artifacts = artifact_paths(client, run.info.run_id)
    assert {"config/resolved.yaml", "predictions/best.json", "plots/map_per_tiou.png", "plots/pr_curves.png",
            "plots/timeline.png"} <= artifacts
    logged = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config/resolved.yaml")).read_text())
    assert logged["storage"]["secret_access_key"] == "**********"
    assert validate({**logged, "storage": {}}).backbone == cfg.backbone


def test_rerunning_the_same_name_resumes_instead_of_starting_over(ray_cluster, local_set, tmp_path, monkeypatch):
    from re2tal.training.driver import fit

    # relative paths, as in configs/debug.yaml: the workers run in another directory
    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(local_set, tmp_path)
    first = fit(tiny_config(tmp_path, relative, "again", **{"train.storage_path": "runs"}), Localization())
    longer = tiny_config(tmp_path, relative, "again", **{"train.epochs": 3, "train.storage_path": "runs"})
    second = fit(longer, Localization())
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    assert second["step"] == 3 * STEPS_PER_EPOCH
    client, run = mlflow_run(longer, second["mlflow_run_id"])
    assert [m.value for m in client.get_metric_history(run.info.run_id, "resumed_at_step")] == [2 * STEPS_PER_EPOCH]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, 3 * STEPS_PER_EPOCH + 1)), "a step was repeated or lost"
    assert fit(longer, Localization())["step"] == 3 * STEPS_PER_EPOCH  # finished: a third launch trains nothing


def _train_worker_pids() -> set[int]:
    out = set()
    for p in psutil.process_iter(["cmdline"]):
        if any("RayTrainWorker" in part for part in p.info["cmdline"] or ()):
            out.add(p.pid)
    return out


def test_worker_killed_mid_run_resumes_from_checkpoint_with_the_same_steps(ray_cluster, local_set, tmp_path):
    from re2tal.training.driver import fit

    cfg = tiny_config(tmp_path, local_set, "killed", **{"train.epochs": 4, "train.max_failures": 1,
                                                         "train.checkpoint_every_steps": 1})
    run_dir = tmp_path / "runs" / "killed"
    killed: list[int] = []

    def complete(checkpoint: Path) -> bool:  # every worker's files uploaded
        return (checkpoint / "state").is_dir() and all((checkpoint / f"worker_rank{r}.pt").exists() for r in (0, 1))

    def kill_after_first_checkpoint() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not any(complete(c) for c in run_dir.glob("epoch*")):
            time.sleep(0.05)
        time.sleep(6)  # the controller registers a checkpoint when it next polls the workers (every 2 s)
        pids = _train_worker_pids()
        if pids:
            victim = max(pids)
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    killer = threading.Thread(target=kill_after_first_checkpoint)
    killer.start()
    metrics = fit(cfg, Localization())
    killer.join()
    assert killed, "no training worker found to kill"
    assert not psutil.pid_exists(killed[0])
    assert metrics["step"] == 4 * STEPS_PER_EPOCH  # as an uninterrupted run
    client, run = mlflow_run(cfg, metrics["mlflow_run_id"])
    resumed = client.get_metric_history(run.info.run_id, "resumed_at_step")
    assert resumed and resumed[0].value >= 1, "the run did not restart from a checkpoint"
    # Steps after that checkpoint ran twice; restored weights, optimizer, data position and RNG
    # make the second time identical to the first.
    losses: dict[int, list[float]] = {}
    for m in client.get_metric_history(run.info.run_id, "loss"):
        losses.setdefault(m.step, []).append(m.value)
    assert sorted(losses) == list(range(1, 4 * STEPS_PER_EPOCH + 1))
    assert all(max(v) - min(v) < 1e-6 for v in losses.values()), losses


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(ray_cluster, local_set, tmp_path):
    from re2tal.training.driver import TrainingStopped, fit

    # A learning rate this large makes the weights explode in the first update: the loss of the
    # second step is not finite.
    cfg = tiny_config(tmp_path, local_set, "diverges", **{"optim.head_lr": 1e30, "optim.backbone_lr": 1e30,
                                                           "deepspeed.gradient_clipping": 0.0,
                                                           "train.checkpoint_every_steps": 1})
    with pytest.raises(TrainingStopped, match=r"non-finite loss .* step 2; the last good checkpoint is kept"):
        fit(cfg, Localization())
    checkpoints = sorted((tmp_path / "runs" / "diverges").glob("epoch*"))
    assert [c.name for c in checkpoints] == ["epoch0000-step00000001"]
    assert (checkpoints[0] / "state" / "mp_rank_00_model_states.pt").exists()
    client, run = mlflow_run(cfg, client_run_id(cfg))
    assert run.info.status == "FAILED"


def client_run_id(cfg: Config) -> str:
    from mlflow.tracking import MlflowClient

    from re2tal.tracking import RUN_TAG, resolve_uri

    client = MlflowClient(resolve_uri(cfg.tracking.tracking_uri))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    return client.search_runs([exp.experiment_id], f"tags.`{RUN_TAG}` = '{cfg.train.name}'")[0].info.run_id


# --------------------------------------------------------------------------------------------
# the CLI: bad input fails before any worker starts; local mode; eval and predict from a checkpoint


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "re2tal.cli", *args]


def cli_env(extra: dict | None = None) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra or {}))


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), cwd=cwd, env=cli_env(env), capture_output=True, text=True, timeout=timeout)


def write_config(tmp_path: Path, cfg: Config) -> Path:
    path = tmp_path / f"{cfg.train.name}.yaml"
    path.write_text(cfg.to_yaml())
    return path


def test_malformed_config_and_bad_annotations_fail_before_any_worker_starts(tmp_path):
    good = tiny_config(tmp_path, str(tmp_path / "missing.json"), "bad")
    path = write_config(tmp_path, good)
    started = time.time()
    out = run_cli("train", "--config", str(path), "--set", "deepspeed.zero_stage=7")
    assert out.returncode == 2 and "deepspeed.zero_stage" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = run_cli("train", "--config", str(path))  # the annotation file does not exist
    assert out.returncode == 2 and "missing.json" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "Ray" not in out.stderr + out.stdout  # no Ray was started
    assert time.time() - started < 120


def test_local_mode_on_s3_killed_after_a_checkpoint_resumes_and_eval_and_predict_read_its_checkpoint(local_set, s3, tmp_path):
    """`re2tal train --local` with train.storage_path on S3: SIGKILLed once a checkpoint is
    complete there, the same command resumes from the newest complete one (the rule under Ray
    Train) and takes exactly the steps of an uninterrupted run; `re2tal eval` and `predict` read
    its last checkpoint from S3 (predict: the Ray Data job on one video)."""
    storage = {k: v for k, v in s3.overrides().items() if not k.endswith("key_id") and not k.endswith("access_key")}
    cfg = tiny_config(tmp_path, local_set, "local", **{"train.num_workers": 0, "train.checkpoint_every_steps": 1,
                                                       "train.storage_path": s3.url("runs"), **storage})
    path = write_config(tmp_path, cfg)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}  # what the YAML does not hold
    run_dir, steps = f"{s3.bucket}/runs/local", cfg.train.epochs * STEPS_PER_EPOCH * 2  # one worker: 4 steps an epoch

    def complete() -> list[str]:
        s3.fs.invalidate_cache()
        return sorted(Path(p).parent.name for p in s3.fs.glob(f"{run_dir}/epoch*/complete.json"))

    proc = subprocess.Popen(cli_command("train", "--config", str(path), "--local"), env=cli_env(env), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not complete() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    before = complete()
    assert before and before[-1] != f"epoch0002-step{steps:08d}"

    out = run_cli("train", "--config", str(path), "--local", env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "average mAP" in out.stdout and "MLflow run" in out.stdout
    client, run = mlflow_run(cfg, client_run_id(cfg))
    assert run.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "resumed_at_step")] == [int(before[-1].rsplit("step", 1)[1])]
    losses: dict[int, list[float]] = {}
    for m in client.get_metric_history(run.info.run_id, "loss"):
        losses.setdefault(m.step, []).append(m.value)
    assert sorted(losses) == list(range(1, steps + 1))  # no step lost; those redone after the kill repeat exactly
    assert all(max(v) - min(v) < 1e-6 for v in losses.values()), losses
    last = f"epoch0002-step{steps:08d}"
    assert complete() == [f"epoch0001-step{steps - 1:08d}", last]  # train.keep_checkpoints: 2 (the one before: mid-epoch 2)
    checkpoint = s3.url(f"runs/local/{last}")
    assert f"checkpoint: {checkpoint}" in out.stdout
    trained = float(next(line.split()[-2] for line in out.stdout.splitlines() if "│ average mAP " in line))

    out = run_cli("eval", "--config", str(path), "--checkpoint", checkpoint, "--json", str(tmp_path / "eval.json"),
                  "--predictions", str(tmp_path / "pred.json"), env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = yaml.safe_load((tmp_path / "eval.json").read_text())
    assert result["average_mAP"] == pytest.approx(trained, abs=1e-4)  # the same weights, the same numbers

    video = str(sorted(Path(local_set).parent.glob("*.mp4"))[0])
    predicted = tmp_path / "one.json"
    out = run_cli("predict", "--config", str(path), "--model", checkpoint, "--videos", video, "--out", str(predicted), env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    [segments] = yaml.safe_load(predicted.read_text())["results"].values()
    assert segments and all(0 <= s["segment"][0] < s["segment"][1] <= SYNTH.duration_s + 1e-6 for s in segments)
    from re2tal.data.synth import class_names

    assert {s["label"] for s in segments} <= set(class_names(SYNTH.classes))

    out = run_cli("predict", "--config", str(path), "--model", checkpoint, "--videos", str(tmp_path / "nope.mp4"), "--out",
                  str(predicted), env=env)
    assert out.returncode == 2 and "--videos" in out.stderr and "nope.mp4" in out.stderr


# --------------------------------------------------------------------------------------------
# a real MLflow tracking server with artifacts on the S3 endpoint, as on a cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:  # it answers (e.g. 401 without a token): it is up
            return
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                pytest.fail(f"{what} did not start")
            time.sleep(0.5)


class MlflowServer:
    """`mlflow server` on loopback (SQLite store, artifacts on the S3 endpoint), which a test
    may stop (the whole process group, as a crash) and start again on the same port and store."""

    def __init__(self, s3, tmp_path: Path):
        self.port, self.db, self.s3 = _free_port(), tmp_path / "server.db", s3
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(os.environ, MLFLOW_S3_ENDPOINT_URL=self.s3.endpoint_url, AWS_ACCESS_KEY_ID="testing",
                   AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        self.proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.db}",
                                      "--artifacts-destination", f"s3://{self.s3.bucket}/mlartifacts", "--host", "127.0.0.1",
                                      "--port", str(self.port), "--workers", "1"],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_until_serving(f"{self.url}/health", self.proc, 120, "mlflow server")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its gunicorn / uvicorn children
            self.proc.wait(timeout=30)


@pytest.fixture
def mlflow_server(s3, tmp_path):
    server = MlflowServer(s3, tmp_path)
    server.start()
    yield server
    server.stop()


def test_remote_mlflow_server_down_for_30_s_mid_run_neither_stops_nor_slows_training(ray_cluster, local_set, s3, mlflow_server,
                                                                                      tmp_path):
    """The server is stopped once the first step's loss is in, and started again 30 s later: the
    rest of the run is trained meanwhile (its last step is timestamped while the server is down),
    and every step's metrics and the artifacts (on S3) are in the run, which ends FINISHED."""
    from mlflow.tracking import MlflowClient

    from re2tal.training.driver import fit

    cfg = tiny_config(tmp_path, local_set, "remote", **{"tracking.tracking_uri": mlflow_server.url})
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(metrics=fit(cfg, Localization(), show_progress=False)))
    thread.start()
    store = MlflowClient(f"sqlite:///{mlflow_server.db}")  # the server's own store, read while it is down

    def first_loss() -> bool:
        runs = [r for e in store.search_experiments() for r in store.search_runs([e.experiment_id])]
        return any(store.get_metric_history(r.info.run_id, "loss") for r in runs)

    deadline = time.time() + 300
    while not first_loss() and thread.is_alive() and time.time() < deadline:
        time.sleep(0.2)
    down = time.time()
    mlflow_server.stop()
    time.sleep(30)
    up = time.time()
    mlflow_server.start()
    thread.join(timeout=600)

    metrics = out["metrics"]
    assert metrics["step"] == cfg.train.epochs * STEPS_PER_EPOCH
    client, run = mlflow_run(cfg, metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED" and RUN_METRICS <= set(run.data.metrics), RUN_METRICS - set(run.data.metrics)
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, cfg.train.epochs * STEPS_PER_EPOCH + 1))
    # the steps after the stop were trained while it was down: none waited for the server
    assert down * 1000 < max(m.timestamp for m in losses) < up * 1000, [(m.step, m.timestamp / 1000 - down) for m in losses]
    keys = {key for key in s3.fs.find(f"{s3.bucket}/mlartifacts")}
    for name in ("config/resolved.yaml", "predictions/best.json", "plots/map_per_tiou.png", "cache/epoch0002.json"):
        assert any(k.endswith(f"/artifacts/{name}") for k in keys), (name, keys)
    model_id = metrics["model_uri"].removeprefix("models:/")  # the run's model, through the server to S3 too
    assert any(k.endswith(f"/models/{model_id}/artifacts/MLmodel") for k in keys), keys


# --------------------------------------------------------------------------------------------
# ray start --head + ray job submit, as on a cluster


def test_ray_job_submit_runs_the_training_job_on_a_token_authenticated_cluster(local_set, tmp_path):
    """The README's commands: on the head `export RAY_AUTH_MODE=token`, `ray get-auth-token
    --generate`, `ray start --head`; from another machine (its own home, no token of its own) the
    copied token through RAY_AUTH_TOKEN_PATH, then `ray job submit --working-dir .` from a
    checkout whose config has relative paths (as configs/debug.yaml): the head refuses a wrong
    token; without --base-dir the job stops before training, naming the key; with
    `--base-dir $PWD` the run, its checkpoints and its MLflow records land in the checkout."""
    ray_bin = Path(sys.executable).with_name("ray")
    port, dashboard = _free_port(), _free_port()
    # Its own agent ports: the defaults are taken while another local Ray (the other tests') runs.
    agent_ports = [f"--{flag}={_free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                           "runtime-env-agent-port", "metrics-export-port",
                                                           "ray-client-server-port")]
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    base |= {"RAY_ADDRESS": "", "PYTHONPATH": "", "RAY_AUTH_MODE": "token",
             "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # the job's `python` is this venv's
    head_env = base | {"HOME": str(tmp_path / "head-home")}
    remote_env = base | {"HOME": str(tmp_path / "laptop-home")}
    subprocess.run([str(ray_bin), "get-auth-token", "--generate"], env=head_env, check=True, capture_output=True)
    token = tmp_path / "head-home" / ".ray" / "auth_token"
    assert token.stat().st_size > 0
    # the user's checkout: the job entry points, the data and a config with relative paths
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "jobs", checkout / "jobs")
    shutil.copytree(Path(local_set).parent, checkout / "data" / "synth")
    cfg = tiny_config(tmp_path, "data/synth/annotations.json", "submitted", **{"train.epochs": 1, "train.storage_path": "runs"})
    tree = yaml.safe_load(cfg.to_yaml()) | {"tracking": cfg.tracking.model_dump() | {"tracking_uri": "sqlite:///mlflow.db"}}
    (checkout / "tiny.yaml").write_text(yaml.safe_dump(tree))
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    # --block keeps the head's processes in this process group, so stopping it stops only them
    # (`ray stop` would stop every Ray on the machine).
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", *agent_ports,
                             f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                            env=head_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"

    def submit(*flags: str, env: dict) -> subprocess.CompletedProcess:
        command = [str(ray_bin), "job", "submit", "--address", address, "--working-dir", ".", "--",
                   "python", "jobs/train.py", "--config", "tiny.yaml", *flags]
        for _ in range(60):  # the head's job agent comes up a little after its dashboard
            job = subprocess.run(command, env=env, cwd=checkout, capture_output=True, text=True, timeout=600)
            if "No available agent" not in job.stderr:
                return job
            time.sleep(2)
        return job

    try:
        wait_until_serving(f"{address}/api/version", head, 180, "ray head")
        wrong = submit(env=remote_env | {"RAY_AUTH_TOKEN": "0" * 32})  # a token, but not the head's
        assert wrong.returncode != 0 and "Forbidden: Invalid authentication token" in wrong.stderr, wrong.stderr[-2000:]
        assert "couldn't find an authentication token" not in wrong.stderr  # refused by the head, not by the client
        copied = tmp_path / "laptop-home" / "head-token"
        copied.parent.mkdir(parents=True)
        shutil.copy(token, copied)
        with_token = remote_env | {"RAY_AUTH_TOKEN_PATH": str(copied)}

        stopped = submit(env=with_token)  # relative paths and no --base-dir: they would point into Ray's copy
        logs = stopped.stdout + stopped.stderr
        assert stopped.returncode != 0 and "re2tal train: error: data.annotations: 'data/synth/annotations.json' is a relative path, " \
            "and this job runs in Ray's temporary copy of its working directory" in logs and "--base-dir $PWD" in logs, logs[-3000:]
        assert not (checkout / "runs").exists() and not (checkout / "mlflow.db").exists()

        job = submit("--base-dir", str(checkout), env=with_token)  # what `--base-dir $PWD` expands to
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout + job.stderr and "average mAP" in job.stdout
        assert any((checkout / "runs" / "submitted").glob("epoch0001-*/state"))
        from mlflow.tracking import MlflowClient

        store = MlflowClient(f"sqlite:///{checkout / 'mlflow.db'}")
        runs = store.search_runs([store.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
        assert [(r.info.run_name, r.info.status) for r in runs] == [("submitted", "FINISHED")]
        assert "loss" in runs[0].data.metrics and "average_mAP" in runs[0].data.metrics
    finally:
        # SIGTERM would make the head drain for up to a minute; nothing of it is needed after.
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)
