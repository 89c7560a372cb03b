"""MLflow's system metrics of a training node, sent through a `Tracker`.

MLflow's own `SystemMetricsMonitor` samples CPU, memory, disk and network (and NVIDIA / AMD GPUs
where pynvml / pyrsmi find one) and logs `system/<name>` metrics that the run page charts under
"System metrics". Its thread logs synchronously and stops for good at the first failed request;
here the same samplers feed rank 0's background tracker instead, so a tracking server that is
down for a while delays the samples but does not end them, and training never waits for it.
"""

from __future__ import annotations

import threading
import time

from re2tal.tracking.tracker import Tracker

PREFIX = "system/"


class SystemMetrics:
    """Samples this node every `interval_s` seconds from a daemon thread and queues the averages
    on `tracker` as `system/<name>` (`system/<node>/<name>` with `node`), steps counting samples
    on from the run's last one (a resumed run goes on where it stopped)."""

    def __init__(self, tracker: Tracker, interval_s: float, node: str | None = None, own_tracker: bool = False):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.tracker, self.interval_s, self.own_tracker = tracker, interval_s, own_tracker
        self.prefix = PREFIX + (f"{node}/" if node else "")
        # MLflow's monitor only for its samplers (which GPU library, which metrics); never started
        self.sampler = SystemMetricsMonitor(tracker.run_id, sampling_interval=interval_s, node_id=node, tracking_uri=tracker.uri)
        self.step = self._next_step()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="re2tal-system-metrics", daemon=True)
        self._thread.start()

    def _next_step(self) -> int:
        try:
            history = self.tracker.client.get_metric_history(self.tracker.run_id, self.prefix + "cpu_utilization_percentage")
        except Exception:  # the server is down: start at 0, the samples still arrive
            return 0
        return max((m.step for m in history), default=-1) + 1

    def _collect(self) -> dict[str, float]:
        self.sampler.collect_metrics()
        values = self.sampler.aggregate_metrics()
        for monitor in self.sampler.monitors:
            monitor.clear_metrics()
        return values

    def _sample(self) -> None:
        self.tracker.metrics({self.prefix + k: v for k, v in self._collect().items()}, step=self.step)
        self.step += 1
        self._last = time.monotonic()

    def _run(self) -> None:
        # psutil's CPU percentage counts from the same thread's previous call: every call is here,
        # and this first one is the baseline
        self._collect()
        self._last = time.monotonic()
        while not self._stop.wait(self.interval_s):
            self._sample()
        if time.monotonic() - self._last >= min(1.0, self.interval_s):  # the last stretch, unless too short to mean much
            self._sample()

    def close(self, timeout: float | None = None) -> None:
        """Stop sampling, after one last sample (so a run shorter than the interval has one too);
        with `own_tracker`, also flush and close the tracker (up to `timeout` s)."""
        self._stop.set()
        self._thread.join()
        if self.own_tracker:
            self.tracker.close(timeout)
