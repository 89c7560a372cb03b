"""What a finished training run holds in MLflow: its model (loadable with `mlflow.pyfunc`,
predicting what the checkpoint predicts), a registered version, its dataset as inputs, and system
metrics. Real local Ray Train workers with DeepSpeed on CPU, a real MLflow SQLite store, the tiny
synthetic set of tests/test_training.py.

One training run (module fixture) serves every test here.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

import conftest
from re2tal.errors import BadInput
from test_training import TINY, local_set, mlflow_run, ray_cluster  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow
REGISTERED = "tiny-localizer"

tiny_config = functools.partial(conftest.tiny_config, TINY)


@pytest.fixture(scope="module")
def trained(ray_cluster, local_set, tmp_path_factory):  # noqa: F811
    """(config, final metrics) of a 2-worker run with the model registered and system metrics
    sampled every second."""
    from re2tal.tasks.localization import Localization
    from re2tal.training.driver import fit

    tmp = tmp_path_factory.mktemp("mlmodel")
    cfg = tiny_config(tmp, local_set, "modelled", **{"tracking.register_model": REGISTERED, "tracking.system_metrics_interval_s": 1})
    return cfg, fit(cfg, Localization(), show_progress=False)


def test_the_logged_model_loads_through_pyfunc_and_predicts_the_checkpoints_segments(trained, local_set, monkeypatch):
    import mlflow.artifacts
    import mlflow.pyfunc
    import torch

    from re2tal.backbones import build_backbone
    from re2tal.data.annotations import load_annotations
    from re2tal.tasks.localization import build_model, predict_video
    from re2tal.tasks.mlmodel import load_model, model_location
    from re2tal.tracking import resolve_uri
    from re2tal.training.checkpoints import load_weights, local_checkpoint

    cfg, metrics = trained
    uri = resolve_uri(cfg.tracking.tracking_uri)
    videos = sorted(str(p) for p in Path(local_set).parent.glob("*.mp4"))[:2]
    model = build_model(cfg)
    with local_checkpoint(metrics["checkpoint"], cfg.storage) as path:
        load_weights(model, path)
    annotations = load_annotations(cfg.data, cfg.storage)
    expected = [predict_video(model, cfg, v, annotations) for v in videos]
    assert any(e["segments"] for e in expected)

    # what `re2tal predict --model` uses: the config, the network with its weights, the labels, from
    # any of the model's URIs at a tracking URI that is not MLflow's global one
    for model_uri in (f"models:/{REGISTERED}/1", metrics["model_uri"], f"runs:/{metrics['mlflow_run_id']}/model"):
        loaded_cfg, network, labels = load_model(model_uri, tracking_uri=uri)
        assert loaded_cfg.head == cfg.head and loaded_cfg.backbone.pretrained is None
        assert labels == annotations.labels
        assert predict_video(network, loaded_cfg, videos[0], None, labels=labels) == expected[0], model_uri
    with pytest.raises(BadInput, match="^--model: models:/nope/1: "):
        load_model("models:/nope/1", tracking_uri=uri)
    # self-contained: the backbone is a backbone file of its own (also for re2tal extract's backbone.pretrained)
    directory = Path(mlflow.artifacts.download_artifacts(model_location(metrics["model_uri"], uri)))
    assert sorted(p.name for p in (directory / "artifacts").iterdir()) == ["backbone.pt", "config.yaml", "labels.json", "weights.pt"]
    backbone = build_backbone(cfg.backbone.model_copy(update={"pretrained": str(directory / "artifacts" / "backbone.pt")}))
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in model.backbone.state_dict().items())

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # how a user points pyfunc at the store
    run_model = f"runs:/{metrics['mlflow_run_id']}/model"
    got = mlflow.pyfunc.load_model(run_model).predict(videos + [str(Path(local_set).parent / "missing.mp4")])
    assert got[:2] == expected
    assert got[2]["video"].endswith("missing.mp4") and "cannot read video" in got[2]["error"]  # the others still answered


def test_re2tal_predict_runs_a_registered_model_as_it_runs_the_checkpoint(trained, local_set, tmp_path):
    """`re2tal predict --model models:/<name>/<version>` (a Ray Data job) predicts what the same
    job predicts with `--model <checkpoint>`, with no --config."""
    from re2tal.data.collection import collection
    from re2tal.tasks.predict import load_model, predict
    from re2tal.tracking import resolve_uri

    cfg, metrics = trained
    at = {"tracking.tracking_uri": resolve_uri(cfg.tracking.tracking_uri)}
    logged = load_model(f"models:/{REGISTERED}/1", None, at, cfg.storage)
    checkpoint = load_model(metrics["checkpoint"], None, {}, cfg.storage)
    assert logged.labels == checkpoint.labels and logged.cfg.head == checkpoint.cfg.head and logged.weights == "logged"
    video = str(sorted(Path(local_set).parent.glob("*.mp4"))[0])
    videos = collection(video, logged.cfg.data, logged.cfg.storage)
    ours, _ = predict(logged, videos, str(tmp_path / "logged.json"), progress=False)
    theirs, _ = predict(checkpoint, videos, str(tmp_path / "checkpoint.json"), progress=False)
    assert ours["results"] == theirs["results"] and ours["results"][videos[0].id]


def test_the_model_is_registered_once_and_linked_to_the_run(trained):
    from re2tal.tasks.localization import Localization
    from re2tal.tracking import resolve_uri
    from re2tal.training.driver import with_tracker

    cfg, metrics = trained
    client, run = mlflow_run(cfg, metrics["mlflow_run_id"])
    assert [o.step for o in run.outputs.model_outputs] == [metrics["step"]]
    model = client.get_logged_model(run.outputs.model_outputs[0].model_id)
    assert (model.name, model.source_run_id, metrics["model_uri"]) == ("model", run.info.run_id, f"models:/{model.model_id}")
    assert model.params["backbone.name"] == "swin_t"
    assert {m.key for m in model.metrics} >= {"average_mAP", "loss"}  # the run's metrics at the model's step
    version = client.get_model_version(REGISTERED, "1")
    assert (version.run_id, version.source, metrics["registered_model"]) == (run.info.run_id, model.artifact_location,
                                                                             f"models:/{REGISTERED}/1")
    assert [(v["name"], str(v["version"])) for v in json.loads(model.tags["mlflow.modelVersions"])] == [(REGISTERED, "1")]

    # a finished run launched again ends in `finish` again: no second model, no second version
    task = Localization()
    task.check_data(cfg)
    ended = {k: v for k, v in metrics.items() if k not in ("model_uri", "registered_model")}  # as fit hands them to finish
    again = with_tracker(resolve_uri(cfg.tracking.tracking_uri), run.info.run_id, cfg, lambda t: task.finish(cfg, ended, t))
    assert again["model_uri"] == metrics["model_uri"] and "registered_model" not in again
    assert len(client.get_run(run.info.run_id).outputs.model_outputs) == 1
    assert [str(v.version) for v in client.search_model_versions(f"name = '{REGISTERED}'")] == ["1"]


def test_the_run_has_its_dataset_as_inputs_and_system_metrics(trained, local_set):
    cfg, metrics = trained
    client, run = mlflow_run(cfg, metrics["mlflow_run_id"])
    inputs = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"}
    train, val = inputs["training"], inputs["validation"]
    assert train.name.endswith("/annotations.json:training") and local_set in train.source
    assert '"num_rows": 4' in train.profile and '"num_rows": 2' in val.profile  # SYNTH: 6 videos, 2 of them validation
    assert len(train.digest) >= 8 and train.digest != val.digest

    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system
    samples = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert sorted(m.step for m in samples) == list(range(len(samples))) and samples
    assert all(m.value > 0 for m in samples)  # two workers train meanwhile: every sample measured (psutil counts per thread)
