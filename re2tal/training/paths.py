"""Relative local paths in a config, and what they are relative to.

Ray Train workers and Tune trials run in directories of their own, so every relative local path
(and a relative sqlite tracking URI) is made absolute on the driver before anything starts:
against the current directory, or against `--base-dir DIR`.

A job under `ray job submit --working-dir .` runs in Ray's temporary copy of that directory (under
the Ray session's `runtime_resources/`, deleted with the session): a relative path there would
leave the run's checkpoints, MLflow records and outputs in that copy. Such a job must say where it
was submitted from (`--base-dir $PWD`, on a cluster whose nodes see that directory, e.g. one
machine) or use absolute paths on shared storage or object-store URLs; otherwise it stops before
training with one line naming the key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from re2tal.config import Config
from re2tal.data.storage import protocol
from re2tal.errors import BadInput

PATH_KEYS = ("data.annotations", "data.video_root", "data.features", "backbone.pretrained", "head.nms.external_scores", "train.storage_path",
             "finetune.output")
SQLITE = "sqlite:///"


def ray_job_copy() -> str | None:
    """The working directory of this process when it is a `ray job submit` driver running in
    Ray's copy of the submitted working directory; else None."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray's job supervisor for the driver
    if not raw:
        return None
    try:
        working_dir = json.loads(raw).get("runtime_env", {}).get("working_dir")
    except (ValueError, AttributeError):
        return None
    return os.getcwd() if working_dir else None


def _relative(value: object) -> bool:
    return isinstance(value, str) and protocol(value) == "file" and "://" not in value and not os.path.isabs(os.path.expanduser(value))


def resolve(value: str, what: str, base_dir: str | None = None) -> str:
    """A local path made absolute against `base_dir` (default: the current directory); a URL or
    an absolute path unchanged. `what` names the key or flag in errors."""
    if not _relative(value):
        return value
    return str(Path(_base(what, value, base_dir), os.path.expanduser(value)).resolve())


def _base(what: str, value: str, base_dir: str | None) -> str:
    if base_dir is not None:
        if not os.path.isabs(base_dir) or not os.path.isdir(base_dir):
            raise BadInput(f"--base-dir: {base_dir} is not an absolute path of a directory on this node "
                           f"(on a cluster of machines give {what} as an absolute path on shared storage or an s3:// URL)")
        return base_dir
    copy = ray_job_copy()
    if copy is not None:
        raise BadInput(f"{what}: {value!r} is a relative path, and this job runs in Ray's temporary copy of its working directory "
                       f"({copy}), which Ray deletes: submit it with --base-dir $PWD (on one machine), or make {what} absolute "
                       "on shared storage or an s3:// URL")
    return os.getcwd()


def absolute_paths(cfg: Config, base_dir: str | None = None) -> Config:
    """The config with every relative local path (PATH_KEYS, a relative sqlite tracking URI)
    made absolute against `base_dir` (default: the current directory; see the module docstring
    for jobs)."""
    changes, flat = {}, cfg.flat()
    for key in PATH_KEYS:
        if _relative(flat[key]):
            changes[key] = resolve(flat[key], key, base_dir)
    uri = cfg.tracking.tracking_uri
    if uri.startswith(SQLITE) and not uri.startswith(SQLITE + "/"):
        changes["tracking.tracking_uri"] = SQLITE + resolve(uri[len(SQLITE):], "tracking.tracking_uri", base_dir)
    return cfg.with_overrides(changes) if changes else cfg
