"""Metrics from a Ray Train worker to one MLflow run, one step at a time (the epoch; the iteration for
iteration-based loops such as segmentation's), surviving a tracking server that goes away."""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from orchestrator.environment import temporary_environment
from orchestrator.errors import CvlabError
from orchestrator.tracking.runs import log_metrics, log_params, logged_steps, make_client

log = logging.getLogger(__name__)


class MlflowMetricLogger:
    """Logs metrics by step (an epoch, or an iteration) to one MLflow run; picklable, so it travels to Ray
    workers. The methods say "epoch" for the step whatever it counts.

    `logged_epochs()` reads the run's history of `key` so a restarted or resumed run skips epochs that
    are already there.

    The tracking server may go away during a run: `log_epoch` never raises for that. Epochs that cannot
    be sent wait in a bounded queue (`max_pending` epochs; the oldest are dropped, with a warning, when it
    overflows) and are sent, in order, by the next `log_epoch` or by `flush()` once the server answers
    again. While the server is away each attempt fails fast (`request_retries` HTTP retries,
    `request_timeout_s` per request) so training is not held up; `flush(timeout_s)` at the end of training
    keeps retrying for up to `flush_timeout_s`.
    """

    def __init__(self, tracking_uri: str, run_id: str, key: str = "val/top1", skip: Iterable[str] = ("epoch",),
                 *, max_pending: int = 10000, request_retries: int = 1, request_timeout_s: float = 10.0,
                 flush_timeout_s: float = 300.0, retry_interval_s: float = 2.0):
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.key = key
        self.skip = tuple(skip)
        self.max_pending = max_pending
        self.request_retries = request_retries
        self.request_timeout_s = request_timeout_s
        self.flush_timeout_s = flush_timeout_s
        self.retry_interval_s = retry_interval_s
        self._client = None
        self._pending: list[tuple[int, dict[str, float]]] = []
        self._away_since: float | None = None
        self.dropped = 0  # epochs lost to an overflowing queue

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    @property
    def client(self):
        if self._client is None:
            self._client = make_client(self.tracking_uri)
        return self._client

    @property
    def pending(self) -> list[int]:
        """Epochs waiting to be sent."""
        return [e for e, _ in self._pending]

    def _http_env(self):
        """Fail fast while the server is away (MLflow's default retries block for minutes; it reads these settings
        only from the environment)."""
        return temporary_environment(
            MLFLOW_HTTP_REQUEST_MAX_RETRIES=str(self.request_retries),
            MLFLOW_HTTP_REQUEST_TIMEOUT=str(int(max(1, self.request_timeout_s))),
            MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="0")

    def logged_epochs(self) -> set[int]:
        """Epochs already in the run (retried for up to `flush_timeout_s` while the server is away)."""
        deadline = time.monotonic() + self.flush_timeout_s
        while True:
            try:
                with self._http_env():
                    return logged_steps(self.client, self.run_id, self.key) | set(self.pending)
            except Exception as err:  # requests/urllib3/MlflowException: the server is not answering
                if time.monotonic() >= deadline:
                    raise CvlabError(f"MLflow tracking server {self.tracking_uri} stayed unreachable for "
                                     f"{self.flush_timeout_s:g} s: {err}") from err
                self._note_away(err)
                time.sleep(self.retry_interval_s)

    def _note_away(self, err: BaseException) -> None:
        if self._away_since is None:
            self._away_since = time.monotonic()
            first = str(err).strip().splitlines()
            log.warning(f"MLflow tracking server {self.tracking_uri} is not answering "
                       f"({type(err).__name__}: {first[-1] if first else ''}); training goes on and "
                       f"{len(self._pending)} epoch(s) of metrics wait to be sent")

    def _send_pending(self) -> bool:
        """Send queued epochs in order; True when the queue is empty afterwards."""
        while self._pending:
            epoch, metrics = self._pending[0]
            try:
                with self._http_env():
                    log_metrics(self.client, self.run_id, metrics, epoch)
            except Exception as err:  # the server is away (connection refused, timeout, 5xx)
                self._note_away(err)
                return False
            self._pending.pop(0)
            if self._away_since is not None:
                self._away_since = None
                self._say_back()
        return True

    def _say_back(self) -> None:
        log.warning("MLflow tracking server %s answers again; sending %d queued epoch(s)", self.tracking_uri,
                    len(self._pending))

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Queue the epoch's metrics and send what the server takes; never raises for an absent server."""
        self._pending.append((epoch, {k: v for k, v in metrics.items() if k not in self.skip}))
        if len(self._pending) > self.max_pending:
            lost = self._pending[: len(self._pending) - self.max_pending]
            del self._pending[: len(lost)]
            self.dropped += len(lost)
            log.warning(f"MLflow metric queue is full ({self.max_pending} epochs): dropped epoch(s) "
                       f"{[e for e, _ in lost]}")
        self._send_pending()

    def log_params(self, params: dict) -> None:
        """Log params the run does not have yet; a server that is away (or a changed value) only warns."""
        try:
            with self._http_env():
                log_params(self.client, self.run_id, params)
        except Exception as err:  # noqa: BLE001 - params are never worth stopping training for
            log.warning("MLflow params not logged: %s: %s", type(err).__name__, err)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Send every queued epoch, retrying for up to `timeout_s` (default `flush_timeout_s`).

        Returns True when all were sent; otherwise warns naming the epochs that never reached MLflow.
        """
        deadline = time.monotonic() + (self.flush_timeout_s if timeout_s is None else timeout_s)
        while not self._send_pending():
            if time.monotonic() >= deadline:
                log.warning(f"MLflow tracking server {self.tracking_uri} did not come back: the metrics of "
                           f"epoch(s) {self.pending} were not logged")
                return False
            time.sleep(self.retry_interval_s)
        return True


