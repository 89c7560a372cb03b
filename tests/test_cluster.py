"""The job on several nodes: a real multi-node Ray cluster on loopback (one raylet per node,
`ray.cluster_utils.Cluster`), videos and checkpoints on the loopback S3 (moto server), each node
with its own video cache, and nodes that disappear as spot instances do.

Each worker node is started with its own value of `NODE_VAR` in its raylet's environment (and so
in its workers'); `storage.cache_dir: ${NODE_VAR}/cache` then resolves to a different directory on
each node, as the same path does on the separate disks of a real cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from re2tal.tasks.localization import Localization
from test_training import ROOT, SYNTH, STEPS_PER_EPOCH, mlflow_run, tiny_config

pytestmark = pytest.mark.slow
NODE_VAR = "RE2TAL_TEST_NODE_DIR"


class LoopbackCluster:
    """A head without CPUs (driver, Ray Train controller) and 1-CPU worker nodes: one training
    worker fits on each."""

    def __init__(self, root: Path):
        import ray
        from ray.cluster_utils import Cluster

        self.root = root
        # RAY_AUTH_MODE=token (conftest): the raylets and this driver use the default token file.
        subprocess.run([str(Path(sys.executable).with_name("ray")), "get-auth-token", "--generate"], check=True,
                       capture_output=True)
        self.temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # socket paths must stay short
        os.makedirs("/tmp/ray", exist_ok=True)  # where Cluster notes its address (removed by shutdown)
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                                     "temp_dir": self.temp})
        self.nodes: dict[str, object] = {}
        self.node_ids: dict[str, str] = {}  # also of removed nodes
        ray.init(address=self.cluster.address, runtime_env={"env_vars": {
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions"))}})

    def add(self, name: str) -> None:
        self.nodes[name] = self.cluster.add_node(num_cpus=1, env_vars={NODE_VAR: str(self.root / name)})
        self.node_ids[name] = self.nodes[name].node_id

    def name_of(self, node_id: str) -> str:
        return next((n for n, i in self.node_ids.items() if i == node_id), node_id)

    def kill(self, name: str) -> None:
        """The node's raylet and every process on it killed at once (no graceful drain)."""
        self.cluster.remove_node(self.nodes.pop(name), allow_graceful=False)

    def cache_files(self, name: str) -> set[str]:
        data = self.root / name / "cache" / "data"
        return {p.name for p in data.iterdir()} if data.is_dir() else set()

    def close(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture
def cluster(tmp_path):
    c = LoopbackCluster(tmp_path / "nodes")
    yield c
    c.close()


@pytest.fixture(scope="module")
def s3_set(s3_endpoint, tmp_path_factory):
    """The tiny synthetic set on the loopback S3, shared by this module's tests."""
    import s3fs

    from conftest import ACCESS_KEY, REGION, SECRET_KEY
    from re2tal.config import StorageConfig
    from re2tal.data.synth import write_synthetic

    bucket = f"cluster-{os.getpid()}"
    fs = s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True)
    fs.mkdir(bucket)
    storage = StorageConfig(endpoint_url=s3_endpoint, region=REGION, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY,
                            cache_dir=str(tmp_path_factory.mktemp("writer-cache")))
    write_synthetic(f"s3://{bucket}/synth", SYNTH, storage)
    return {"bucket": bucket, "fs": fs, "annotations": f"s3://{bucket}/synth/annotations.json",
            "storage": {"storage.endpoint_url": s3_endpoint, "storage.region": REGION, "storage.access_key_id": ACCESS_KEY,
                        "storage.secret_access_key": SECRET_KEY, "storage.cache_dir": f"${{{NODE_VAR}}}/cache"}}


def cluster_config(tmp_path: Path, s3_set: dict, name: str, **overrides):
    return tiny_config(tmp_path, s3_set["annotations"], name, **{
        **s3_set["storage"], "train.storage_path": f"s3://{s3_set['bucket']}/runs", "train.cpus_per_worker": 1,
        "train.checkpoint_every_steps": 1, **overrides})


def registered(s3_set: dict, name: str) -> list[str]:
    """Checkpoints Ray Train has registered for run `name` (its snapshot in S3), oldest first."""
    path = f"{s3_set['bucket']}/runs/{name}/checkpoint_manager_snapshot.json"
    try:
        snapshot = json.loads(s3_set["fs"].cat_file(path))
    except FileNotFoundError:
        return []
    return [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]]


def checkpoint_dirs(s3_set: dict, name: str) -> set[str]:
    fs = s3_set["fs"]
    fs.invalidate_cache()
    return {Path(p).name for p in fs.ls(f"{s3_set['bucket']}/runs/{name}", detail=False) if Path(p).name.startswith("epoch")}


def fit_in_background(cfg) -> tuple[threading.Thread, dict]:
    from re2tal.training.driver import fit

    out: dict = {}

    def run() -> None:
        try:
            out["metrics"] = fit(cfg, Localization(), show_progress=False)
        except BaseException as err:  # handed to the test thread
            out["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def cache_artifacts(cfg, run_id: str) -> list[dict]:
    """The per-epoch, per-node cache use rank 0 logged (`cache/epochNNNN.json`)."""
    client, _ = mlflow_run(cfg, run_id)
    names = sorted(a.path for a in client.list_artifacts(run_id, "cache"))
    return [json.loads(Path(client.download_artifacts(run_id, n)).read_text()) for n in names]


# --------------------------------------------------------------------------------------------


def test_node_lost_mid_run_resumes_on_a_replacement_node_from_s3(cluster, s3_set, tmp_path):
    """A worker node killed mid-run: the group restarts on a replacement node from the last
    checkpoint Ray registered before the kill, and the run's per-step losses equal those of an
    uninterrupted run of the same config."""
    from re2tal.training.driver import fit

    cluster.add("a")
    cluster.add("b")
    reference = fit(cluster_config(tmp_path, s3_set, "spot-reference"), Localization(), show_progress=False)
    cfg = cluster_config(tmp_path, s3_set, "spot", **{"train.max_failures": 1, "train.node_wait_s": 120})
    thread, out = fit_in_background(cfg)
    wait_for(lambda: registered(s3_set, "spot") or "error" in out, 600, "the first checkpoint")
    # The driver's progress queue must not live on a node that may go (it took the restarted
    # workers with it when it did).
    from ray._private.state import actors  # the state API proper needs a dashboard

    queues = [a for a in actors(actor_state_name="ALIVE").values() if a["ActorClassName"] == "_QueueActor"]
    assert queues and {a["Address"]["NodeID"] for a in queues} == {cluster.cluster.head_node.node_id}, queues
    killed_at = time.time()
    cluster.kill("b")
    # A checkpoint is registered only once every worker's part is in: none can be after the kill,
    # and the restarted group (new workers, DeepSpeed) takes far longer than reading this.
    last_registered = registered(s3_set, "spot")[-1]
    cluster.add("c")  # the replacement (an autoscaler's new node)
    thread.join(timeout=600)
    assert "error" not in out, out.get("error")
    metrics = out["metrics"]

    assert metrics["step"] == cfg.train.epochs * STEPS_PER_EPOCH  # as an uninterrupted run
    client, run = mlflow_run(cfg, metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    # System metrics come from each machine's first worker (Ray Train's local rank 0): these
    # loopback nodes share one IP, one machine to Ray Train, so one sampler and plain names (on a
    # cluster of machines: system/node<k>/...)
    _, reference_run = mlflow_run(cfg, reference["mlflow_run_id"])
    system = {k for k in reference_run.data.metrics if k.startswith("system/")}
    assert "system/cpu_utilization_percentage" in system and not any(k.startswith("system/node") for k in system), system
    resumed = [m.value for m in client.get_metric_history(run.info.run_id, "resumed_at_step")]
    assert resumed == [int(last_registered.rsplit("step", 1)[1])], (resumed, last_registered)
    losses: dict[int, list[float]] = {}
    for m in client.get_metric_history(run.info.run_id, "loss"):
        losses.setdefault(m.step, []).append(m.value)
    expected = {m.step: m.value for m in client.get_metric_history(reference["mlflow_run_id"], "loss")}
    assert sorted(losses) == sorted(expected) == list(range(1, cfg.train.epochs * STEPS_PER_EPOCH + 1)), "a step was lost or added"
    # every step, the ones redone after the restart included, as in the uninterrupted run
    assert all(abs(v - expected[step]) < 1e-5 for step, values in losses.items() for v in values), (losses, expected)
    first_after = min(m.timestamp for m in client.get_metric_history(run.info.run_id, "loss") if m.timestamp > killed_at * 1000)
    print(f"node killed -> first step after the resume: {first_after / 1000 - killed_at:.1f} s")

    # Checkpoints live in S3, at most keep_checkpoints of them, the newest the final one.
    assert metrics["checkpoint"].startswith(f"s3://{s3_set['bucket']}/runs/spot/")
    assert checkpoint_dirs(s3_set, "spot") == set(registered(s3_set, "spot"))
    assert len(registered(s3_set, "spot")) == cfg.train.keep_checkpoints

    # Node c joined after the loss with an empty cache, and its worker ran to the end: every
    # video it fetched is in the per-epoch artifacts. One file per download means no video came
    # twice; and it used its own cache directory, as node a did.
    epochs = cache_artifacts(cfg, run.info.run_id)
    for e in epochs:
        print(f"epoch {e['epoch']}: " + ", ".join(f"{cluster.name_of(n)}: {u['misses']} videos, {u['bytes_fetched'] / 1e6:.2f} MB"
                                                   for n, u in e["nodes"].items()))
    c_use = [e["nodes"][cluster.node_ids["c"]] for e in epochs if cluster.node_ids["c"] in e["nodes"]]
    assert c_use, epochs
    assert sum(u["misses"] for u in c_use) == len(cluster.cache_files("c")) > 0
    for name in ("a", "c"):
        assert {d for e in epochs for d in e["nodes"].get(cluster.node_ids[name], {}).get("cache_dirs", [])} \
            == {str(cluster.root / name / "cache")}


def test_without_a_replacement_the_run_fails_in_one_line_and_a_relaunch_skips_a_half_uploaded_checkpoint(
        cluster, s3_set, tmp_path):
    from re2tal.training.driver import TrainingStopped, fit

    cluster.add("a")
    cluster.add("b")
    cfg = cluster_config(tmp_path, s3_set, "stranded", **{"train.max_failures": 1, "train.node_wait_s": 8})
    thread, out = fit_in_background(cfg)
    wait_for(lambda: registered(s3_set, "stranded") or "error" in out, 600, "the first checkpoint")
    killed_at = time.time()
    cluster.kill("b")
    thread.join(timeout=600)
    waited = time.time() - killed_at
    # it waits train.node_wait_s for room, then ends, long before Ray's own 60 s default
    assert cfg.train.node_wait_s <= waited < 50, waited
    err = out.get("error")
    assert isinstance(err, TrainingStopped), err
    message = str(err)
    assert "\n" not in message
    assert "train.node_wait_s=8 s for 2 workers x {CPU: 1}" in message, message
    assert "the last checkpoint under" in message and "is kept" in message, message
    _, run = mlflow_run(cfg, _run_id(cfg))
    assert run.info.status == "FAILED"
    kept = registered(s3_set, "stranded")
    assert kept and set(kept) <= checkpoint_dirs(s3_set, "stranded")

    # What a node killed in the middle of uploading the next checkpoint leaves in S3: a directory
    # with a later name and only some of the files.
    fs, base = s3_set["fs"], f"{s3_set['bucket']}/runs/stranded"
    half = "epoch0009-step00000099"
    fs.copy(f"{base}/{kept[-1]}/worker_rank0.pt", f"{base}/{half}/worker_rank0.pt")
    fs.pipe_file(f"{base}/{half}/state/mp_rank_00_model_states.pt", b"truncated")

    cluster.add("c")  # capacity is back: relaunch the same run
    metrics = fit(cfg, Localization(), show_progress=False)
    assert metrics["step"] == cfg.train.epochs * STEPS_PER_EPOCH
    client, run = mlflow_run(cfg, metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    resumed_step = int(kept[-1].rsplit("step", 1)[1])
    assert [m.value for m in client.get_metric_history(run.info.run_id, "resumed_at_step")] == [resumed_step]
    assert half not in registered(s3_set, "stranded")


def _run_id(cfg) -> str:
    from test_training import client_run_id

    return client_run_id(cfg)
