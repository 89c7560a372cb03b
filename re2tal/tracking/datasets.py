"""The run's data as MLflow dataset inputs (`mlflow.data`): what the run page's "Datasets used"
lists, with a digest that changes when the data does."""

from __future__ import annotations

import posixpath
import warnings

from re2tal.config import Config
from re2tal.data.annotations import Annotations

CONTEXTS = (("training", "train_subset"), ("validation", "val_subset"))


def dataset_name(url: str) -> str:
    """The last two parts of a URL (`synth/annotations.json`, `prepared/features`)."""
    parts = [p for p in url.rstrip("/").split("/") if p]
    return posixpath.join(*parts[-2:]) if parts else url


def subset_frame(annotations: Annotations, subset: str, features: str | None = None):
    """One row per video of the subset: id, subset, duration (s), number of actions, URL (and
    its features file)."""
    import pandas as pd

    videos = annotations.subset(subset)
    frame = pd.DataFrame({"video_id": [v.id for v in videos], "subset": [v.subset for v in videos],
                          "duration_s": [float(v.duration) for v in videos], "actions": [len(v.segments) for v in videos],
                          "url": [v.url for v in videos]})
    if features is not None:
        frame["features"] = [f"{features.rstrip('/')}/{v.id}.npy" for v in videos]
    return frame


def log_datasets(client, run_id: str, cfg: Config, annotations: Annotations) -> None:
    """The training and validation subsets as the run's inputs (contexts `training` and
    `validation`), sourced from the annotation file, or from `data.features` when the run reads
    features. Logging the same data again (a resumed run) adds nothing."""
    import mlflow.data
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    source = cfg.data.features or cfg.data.annotations
    inputs = []
    for context, key in CONTEXTS:
        subset = getattr(cfg.data, key)
        with warnings.catch_warnings():  # MLflow's notes on local sources, integer columns and pandas 4
            warnings.simplefilter("ignore")
            data = mlflow.data.from_pandas(subset_frame(annotations, subset, cfg.data.features), source=source,
                                           name=f"{dataset_name(source)}:{subset}").to_dict()
        inputs.append(DatasetInput(Dataset(**data), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    client.log_inputs(run_id, datasets=inputs)
