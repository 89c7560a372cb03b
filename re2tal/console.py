"""What `re2tal train` and `re2tal tune` let through to the terminal.

Without `--verbose`, lines that Ray, DeepSpeed, torch and MLflow print about themselves rather
than about the user's run stay out: the driver's own library loggers are raised to WARNING (or
above, where their warnings are only about Ray's internals), and the worker output Ray forwards
to the driver is filtered line by line against `WORKER_NOISE`. Everything still reaches Ray's
session logs (`/tmp/ray/session_*/logs`).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Callable

# Forwarded worker lines that are never about the user's run.
WORKER_NOISE = re.compile("|".join([
    r"No CUDA runtime is found",  # torch.utils.cpp_extension, imported by DeepSpeed on CPU
    r"DeepSpeed \S+ built successfully",  # DeepSpeed's shared-memory comm op, once per worker
    r"PreemptionWatcher",  # Ray Train's watcher actor: its max_restarts notice, its shutdown
    r"PlacementGroupCleaner",  # Ray Train's cleaner actor, e.g. "failed to stop ... gracefully" when the machine is busy
    r"PYTHON worker processes have been started",  # the raylet on its own start-up concurrency
    r"mlflow\.store\.db\.utils|\[alembic\.|alembic\.runtime",  # MLflow creating / migrating its sqlite tables
    r"generated new fontManager",  # matplotlib's first-use font cache
    r"Reported metrics: \{",  # Ray Train's per-report line in local mode
]))
# Ray-internal actors whose output is only about Ray itself (e.g. the placement-group cleaner's
# thread traceback when GCS is slow to answer or several Ray instances share a machine).
INTERNAL_ACTORS = ("PlacementGroupCleaner", "PreemptionWatcher")

# Driver loggers -> the level below which they are dropped.
DRIVER_LEVELS = {
    "ray": logging.WARNING,
    "ray._private.authentication": logging.ERROR,  # "token authentication is enabled" on every local start
    "ray.tune": logging.CRITICAL,  # trial tables, tracebacks and timing notes: re2tal prints one line per trial instead
    "ray.train": logging.WARNING,
    "alembic": logging.WARNING,
    "mlflow": logging.WARNING,  # "Creating initial MLflow database tables" when a command opens a new sqlite store
    "DeepSpeed": logging.WARNING,
    "torch.utils.cpp_extension": logging.ERROR,
    "mlflow.pyfunc": logging.ERROR,  # "a Python object as python_model is serialized using CloudPickle" when the model is logged
}


# A traceback's lines after its first: indented frames, chaining notes, the exception line.
TRACEBACK = re.compile(r"^(\s|Traceback |During handling |The above exception |[A-Za-z_][\w.]*(Error|Exception|Exit)\b|$)")


def quiet_driver() -> None:
    """Raise the driver's library loggers (call before Ray or MLflow start; MLflow sets its own
    level on import from MLFLOW_LOGGING_LEVEL, which a local Ray's workers inherit too)."""
    for name, level in DRIVER_LEVELS.items():
        logging.getLogger(name).setLevel(level)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per file of the logged model


def keep_worker_lines(data: dict) -> dict:
    """The batch of forwarded worker output without the noise lines (and the traceback that
    follows a noise line)."""
    if data.get("actor_name") in INTERNAL_ACTORS:
        return {**data, "lines": []}
    kept, skipping = [], False
    for line in data.get("lines", []):
        if WORKER_NOISE.search(line):
            skipping = True
        elif not (skipping and TRACEBACK.match(line)):
            skipping = False
            kept.append(line)
    return {**data, "lines": kept}


def filter_worker_output() -> None:
    """Put `keep_worker_lines` in front of the handler with which Ray prints forwarded worker
    output on the driver (installed by `ray.init(log_to_driver=True)`)."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    name = "ray_print_logs"
    printers = [handler for key, handler in dispatcher.handlers if key == name]
    if not printers or getattr(printers[0], "re2tal_filtered", False):
        return
    dispatcher.remove_handler(name)
    dispatcher.add_handler(name, _filtered(printers[0]))


def _filtered(printer: Callable[[dict], None]) -> Callable[[dict], None]:
    def handle(data: dict) -> None:
        kept = keep_worker_lines(data)
        if kept["lines"]:
            printer(kept)

    handle.re2tal_filtered = True
    return handle
