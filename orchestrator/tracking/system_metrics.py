"""System metrics (CPU, memory, disk, network, and the GPUs through nvidia-ml-py when there are any) of the
machines a run trains on, as MLflow `system/...` metrics of the run.

MLflow starts its `SystemMetricsMonitor` by itself only for fluent `mlflow.start_run` runs; cvlab runs are
created through the client, so the workers start it explicitly: one monitor per node (its local rank 0).
"""
from __future__ import annotations

import logging

from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

log = logging.getLogger(__name__)


class SystemMetricsRecorder:
    """Picklable: travels to the Ray Train workers in their config; `start()` there, `stop()` at the end."""

    def __init__(self, tracking_uri: str, run_id: str, interval_s: float = 10.0):
        self.tracking_uri, self.run_id, self.interval_s = tracking_uri, run_id, interval_s
        self._monitor = None

    def __getstate__(self):
        return {**self.__dict__, "_monitor": None}

    def start(self, node_id: str | None = None) -> None:
        """Sample every `interval_s` seconds in a background thread; `node_id` names the node when there are
        several (metrics `system/<node_id>/...`). Continues the run's earlier steps after a restart."""
        try:
            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.interval_s,
                                                 resume_logging=True, node_id=node_id,
                                                 tracking_uri=self.tracking_uri)
            self._monitor.start()
        except Exception as err:  # noqa: BLE001 - system metrics must never stop training
            log.warning("system metrics are not recorded: %s: %s", type(err).__name__, err)
            self._monitor = None

    def stop(self) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
