"""Messages go through `logging`: one logger per module (`logging.getLogger(__name__)`), configured once per
process: by the CLI (`-v` / `-q`) or the run lifecycle on the driver, by `workloads.runtime.start_worker` in a Ray
worker.

Progress (INFO) goes to stdout as plain lines; warnings and errors go to stderr as `cvlab: warning: ...`.
Verbosity: -1 quiet (warnings and errors only), 0 progress, 1 debug plus Ray's own info chatter.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

OUR_LOGGERS = ("orchestrator", "workloads")
_state = {"verbosity": None}
# Ray Train's controller starts its preemption watcher with actor handles as arguments, and Ray's core worker
# then logs an error-level note that such an actor may not restart if those are lost: Ray's own bookkeeping,
# nothing a user can act on. Ray drops worker lines matching this variable, read when `ray` is first imported.
RAY_NOISE_REGEX = r"PreemptionWatcher.*max_restarts"
# Ray's note, when it starts a local cluster, that token authentication is on by default.
RAY_AUTH_NOTE = "Token authentication is enabled for this Ray cluster"


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            message += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.WARNING:
            return f"cvlab: {record.levelname.lower()}: {message}"
        return message


class _CurrentStream(logging.StreamHandler):
    """Writes to whatever sys.stdout / sys.stderr is at the time (test capture and Ray replace them)."""

    def __init__(self, name: str, level_filter):
        super().__init__()
        self._name = name
        self.addFilter(level_filter)

    @property
    def stream(self):
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, _value):  # StreamHandler.__init__ assigns it
        pass


def configure(verbosity: int = 0) -> None:
    """(Re)configure the cvlab loggers; Ray's Python loggers are kept to warnings unless `verbosity` >= 1."""
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    out = _CurrentStream("stdout", lambda r: r.levelno < logging.WARNING)
    err = _CurrentStream("stderr", lambda r: r.levelno >= logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(_Formatter())
    for name in OUR_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [out, err]
        logger.setLevel(level)
        logger.propagate = False
    # Other libraries' progress chatter (Ray's start-up, MLflow's database and system-metrics notes) only with -v.
    for name in ("ray", "mlflow"):
        logging.getLogger(name).setLevel(logging.INFO if verbosity > 0 else logging.WARNING)
    auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    auth.filters[:] = [] if verbosity > 0 else [lambda record: RAY_AUTH_NOTE not in record.getMessage()]
    if verbosity < 1:  # the OpenMMLab stack's deprecation notices, every time it is imported
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(mmengine|mmseg|mmdet|mmcv)(\.|$)")
        # MLflow sets its loggers' level when it is imported (perhaps after this, and in every Ray worker,
        # which inherits the environment): say it there. Also no download progress bars and no "View run at"
        # lines.
        for key, value in (("MLFLOW_LOGGING_LEVEL", "WARNING"), ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"),
                           ("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true"),
                           ("RAY_DEDUP_LOGS_SKIP_REGEX", RAY_NOISE_REGEX)):
            os.environ.setdefault(key, value)
    _state["verbosity"] = verbosity


def ensure_configured() -> None:
    """Configure with the default verbosity unless the CLI (or a caller) already did."""
    if _state["verbosity"] is None:
        configure(0)


def verbosity() -> int:
    """The configured verbosity (0 when not configured); workers get it to set their own output."""
    return _state["verbosity"] or 0
