"""A trained network as the MLflow model of its run, and in the model registry.

MLflow 3 keeps a model as a LoggedModel of the run's experiment (`models:/<model_id>`), linked to
the run as an output (also `runs:/<run_id>/<name>`), with the run's params and its metrics at the
model's step; `tracking.register_model` adds it as a new version of a registered model
(`models:/<registered name>/<version>`). Everything goes through an explicit client for the run's
tracking URI, never MLflow's global tracking URI or active run.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Callable

MODEL_NAME = "model"  # runs:/<run_id>/model


@dataclass(frozen=True)
class LoggedModel:
    model_id: str
    uri: str  # models:/<model_id>
    registered: str | None = None  # models:/<name>/<version>, when registered


def log_model(uri: str, run_id: str, save: Callable[[str, object], None], step: int, register: str | None = None,
              name: str = MODEL_NAME) -> LoggedModel:
    """Make the MLflow model directory that `save(path, mlflow_model)` writes (e.g. through
    `mlflow.pyfunc.save_model(path, ..., mlflow_model=mlflow_model)`) the run's model `name` at
    `step`, and register it as a new version of `register` if given. A run that already holds a
    model `name` at `step` (a finished run launched again) keeps it, and it is not registered twice."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    for output in run.outputs.model_outputs if run.outputs else []:
        model = client.get_logged_model(output.model_id)
        if output.step == step and model.name == name:
            return LoggedModel(model.model_id, f"models:/{model.model_id}")
    model = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id, params=run.data.params)
    with tempfile.TemporaryDirectory(prefix="re2tal-model-") as tmp:
        path = os.path.join(tmp, name)
        save(path, Model(artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id, model_id=model.model_id))
        client.log_model_artifacts(model.model_id, path)
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
    # the run's metrics at the model's step, also as the model's own (the UI's model pages show them)
    metrics = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model.model_id, run_id=run_id)
               for key in run.data.metrics if not key.startswith("system/")
               for m in client.get_metric_history(run_id, key) if m.step == step]
    if metrics:
        client.log_batch(run_id, metrics=metrics)
    registered = register_model(client, register, model.model_id, run_id) if register else None
    return LoggedModel(model.model_id, f"models:/{model.model_id}", registered)


def register_model(client, name: str, model_id: str, run_id: str) -> str:
    """A new version of registered model `name` (created if needed) from a logged model;
    `models:/<name>/<version>`."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    # The logged model's storage location as the source: with `models:/<id>` a SQLite registry
    # looks the model up through MLflow's global tracking URI, which is not necessarily this one.
    model = client.get_logged_model(model_id)
    version = client.create_model_version(name, source=model.artifact_location, run_id=run_id, model_id=model_id)
    # the model's versions, as mlflow.register_model records them (the UI's model page lists them)
    versions = json.loads(model.tags.get(MLFLOW_MODEL_VERSIONS, "[]")) + [{"name": name, "version": version.version}]
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(versions)})
    return f"models:/{name}/{version.version}"
