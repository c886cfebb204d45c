"""The `run.fault_kill_rank_at` drill, the same for every workload: the chosen worker leaves a marker (so that
the restarted worker does not repeat it), says so, and sends itself SIGKILL (a lost process) or SIGTERM (a pod
deleted without a drain)."""
from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable

from workloads.object_storage import write_text

log = logging.getLogger(__name__)


def kill_self(signal_name: str, marker: str, rank: int, epoch: int, step: int,
              warn: Callable[[str], None] = log.warning) -> None:
    """Write `marker` (a local path or bucket URI), warn through `warn`, flush the logs, send SIG`signal_name`."""
    sig = signal.Signals[f"SIG{signal_name}"]
    write_text(marker, f"killed worker {rank} (pid {os.getpid()}) at epoch {epoch} step {step}\n")
    warn(f"fault drill: {sig.name} to worker {rank} (pid {os.getpid()}) at epoch {epoch}, step {step}")
    for handler in logging.getLogger("workloads").handlers:
        handler.flush()
    os.kill(os.getpid(), sig)
