"""MLflow's system metrics of a training node, sent through a `Tracker`.

MLflow's own `SystemMetricsMonitor` samples CPU, memory, disk and network (and NVIDIA / AMD GPUs
where pynvml / pyrsmi find one) and logs `system/<name>` metrics that the run page charts under
"System metrics". Its thread logs synchronously and stops for good at the first failed request;
here the same samplers feed rank 0's background tracker instead, so a tracking server that is
down for a while delays the samples but does not end them, and training never waits for it.
"""

from __future__ import annotations

import threading

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

    def _sample(self) -> None:
        self.sampler.collect_metrics()
        values = {self.prefix + k: v for k, v in self.sampler.aggregate_metrics().items()}
        for monitor in self.sampler.monitors:
            monitor.clear_metrics()
        self.tracker.metrics(values, step=self.step)
        self.step += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def close(self, timeout: float | None = None) -> None:
        """Stop sampling, after one last sample (a run shorter than the interval has one too);
        with `own_tracker`, also flush and close the tracker (up to `timeout` s)."""
        self._stop.set()
        self._thread.join()
        self._sample()
        if self.own_tracker:
            self.tracker.close(timeout)
