"""Logging into an open MLflow run without ever waiting for the tracking server.

Records (metrics, artifacts) are queued by the caller and sent in order by one background thread,
consecutive metrics in batches. A send that fails (the tracking server down, restarting or
unreachable) is retried every few seconds until it goes through, so a training step never waits
for MLflow and nothing queued is dropped while the process lives. `flush` waits for the queue to
empty (bounded), `unsent` lists the metric records still queued so that a checkpoint can keep them
and a resumed run send them (`resend`).
"""

from __future__ import annotations

import collections
import io
import math
import os
import tempfile
import threading
import time
from typing import Any, Callable, Mapping

BATCH = 1000  # MLflow's limit of metrics per log_batch call
RETRY_S = (1.0, 2.0, 4.0)  # waits between attempts, the last repeated


class Tracker:
    """Rank 0's (or the driver's) logging into run `run_id` at `uri`."""

    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.uri, self.run_id = uri, run_id
        self._queue: collections.deque = collections.deque()  # ("metric", Metric) | ("call", fn(client))
        self._cond = threading.Condition()
        self._sending = 0  # records at the queue's head being sent now
        self._closed = False
        self.last_error: str | None = None  # of the latest failed attempt, until one succeeds
        self._thread = threading.Thread(target=self._run, name="re2tal-tracker", daemon=True)
        self._thread.start()

    # -- what callers queue ---------------------------------------------------------------------

    def metrics(self, values: Mapping[str, Any], step: int) -> None:
        """Finite numbers of `values` at `step`, timestamped now."""
        now = int(time.time() * 1000)
        self.resend([{"key": k, "value": float(v), "timestamp": now, "step": step}
                     for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)])

    def resend(self, records: list[dict[str, Any]]) -> None:
        """Queue metric records as `unsent` returns them."""
        from mlflow.entities import Metric

        self._put([("metric", Metric(r["key"], r["value"], r["timestamp"], r["step"])) for r in records])

    def json(self, obj: Any, artifact_file: str) -> None:
        self._put([("call", lambda c: c.log_dict(self.run_id, obj, artifact_file))])

    def text(self, text: str, artifact_file: str) -> None:
        self._put([("call", lambda c: c.log_text(self.run_id, text, artifact_file))])

    def figure(self, fig, artifact_file: str) -> None:
        """Rendered now (matplotlib is not thread-safe), sent later; the figure is closed."""
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format=os.path.splitext(artifact_file)[1].lstrip(".") or "png")
        plt.close(fig)
        self._put([("call", lambda c: _log_bytes(c, self.run_id, buf.getvalue(), artifact_file))])

    def file(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """The file's bytes as they are now, under `artifact_path`/its name."""
        with open(path, "rb") as f:
            data = f.read()
        target = "/".join(p for p in (artifact_path, os.path.basename(path)) if p)
        self._put([("call", lambda c: _log_bytes(c, self.run_id, data, target))])

    # -- waiting for it -------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is sent (or `timeout` s pass); whether it was."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is None else min(left, 1.0))
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the thread; whether everything was sent."""
        sent = self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        return sent

    def unsent(self) -> list[dict[str, Any]]:
        """The metric records not sent yet (the one being sent included), oldest first."""
        with self._cond:
            return [{"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}
                    for kind, m in self._queue if kind == "metric"]

    # -- the thread -----------------------------------------------------------------------------

    def _put(self, items: list[tuple[str, Any]]) -> None:
        if items:
            with self._cond:
                self._queue.extend(items)
                self._cond.notify_all()

    def _run(self) -> None:
        attempt = 0
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                head = list(self._queue)[:BATCH]
                if head[0][0] == "metric":
                    head = head[: next((i for i, (kind, _) in enumerate(head) if kind != "metric"), len(head))]
                else:
                    head = head[:1]
            try:
                if head[0][0] == "metric":
                    self.client.log_batch(self.run_id, metrics=[m for _, m in head])
                else:
                    head[0][1](self.client)
            except Exception as err:  # the server is down or refused it: try again, keep the order
                self.last_error = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
                with self._cond:
                    if self._closed:
                        return
                    self._cond.wait(RETRY_S[min(attempt, len(RETRY_S) - 1)])
                attempt += 1
                continue
            attempt, self.last_error = 0, None
            with self._cond:
                for _ in head:
                    self._queue.popleft()
                self._cond.notify_all()


def _log_bytes(client, run_id: str, data: bytes, artifact_file: str) -> None:
    directory, name = os.path.split(artifact_file)
    with tempfile.TemporaryDirectory(prefix="re2tal-artifact-") as tmp:
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(data)
        client.log_artifact(run_id, path, directory or None)


def retrying(call: Callable[[], Any], seconds: float) -> Any:
    """`call()`, retried on any error every few seconds for up to `seconds`; the last error is
    raised after that."""
    deadline, attempt = time.monotonic() + seconds, 0
    while True:
        try:
            return call()
        except Exception:
            if time.monotonic() >= deadline:
                raise
            time.sleep(RETRY_S[min(attempt, len(RETRY_S) - 1)])
            attempt += 1
