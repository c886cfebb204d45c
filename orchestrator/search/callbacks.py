"""The search's Tune callback (runs in the `cvlab tune` process): it ends each trial's nested MLflow run
FINISHED, KILLED (stopped early by the scheduler) or FAILED, with the reason in `cvlab.end_reason`."""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ray.tune import Callback

from orchestrator.search.trial import find_trial_run
from orchestrator.tracking.runs import end_run, log_best_metric, log_metrics, logged_steps, make_client

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialBookkeeping:
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    metric: str  # the searched metric
    mode: str
    scheduler: str  # fifo | asha
    step_metric: str  # the progress counter of the workload's reports ("epoch", "iter")
    budget: int  # a full trial's length in step_metric units
    budget_path: str  # the spec path of that length (a search may vary it)


def end_status(last_result: dict | None, budget: int, scheduler: str, step_metric: str = "epoch"
               ) -> tuple[str, str]:
    """(MLflow status, reason) for a trial that Tune completed: trained to the end, or stopped early."""
    last = int((last_result or {}).get(step_metric) or 0)
    if last >= budget:
        return "FINISHED", "completed"
    who = "ASHA" if scheduler == "asha" else "Tune"
    stopped = "early-stopped" if scheduler == "asha" else "stopped"
    return "KILLED", f"{stopped} by {who} after {step_metric} {last} of {budget}"


def make_status_callback(book: TrialBookkeeping):
    """A Tune callback that ends each trial's nested MLflow run with a reason (and its best metric)."""

    class _TrialRunStatus(Callback):
        def _run(self, trial):
            client = make_client(book.tracking_uri)
            return client, find_trial_run(client, book.experiment_id, book.parent_run_id, trial.trial_id)

        def _log_last(self, client, run, result: dict) -> int:
            """Make sure the run has the last metrics Tune saw (a stopped worker may not have logged them);
            returns the last step trained (per Tune or MLflow, whichever is further)."""
            logged = logged_steps(client, run.info.run_id, book.metric)
            step = max(int(result.get(book.step_metric) or 0), max(logged, default=0))
            if step == 0:
                return 0
            # (cost/* is logged once, before training; cvlab/* marks are Tune's only)
            metrics = {k: float(v) for k, v in result.items()
                       if ("/" in k and not k.startswith(("cost/", "cvlab/"))
                           or k in ("images_per_s", "epoch_time_s", "lr"))
                       and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
            if int(result.get(book.step_metric) or 0) == step and step not in logged:
                log_metrics(client, run.info.run_id, metrics, step=step)
            log_metrics(client, run.info.run_id, {book.step_metric: step}, step=step)
            return step

        def on_trial_complete(self, iteration, trials, trial, **info):
            try:
                client, run = self._run(trial)
                if run is None:
                    return
                result = dict(trial.last_result or {})
                result[book.step_metric] = self._log_last(client, run, result)
                if run.info.status != "RUNNING":  # the trial ended its run itself
                    return
                budget = int((getattr(trial, "config", None) or {}).get(book.budget_path, book.budget))
                status, reason = end_status(result, budget, book.scheduler, book.step_metric)
                log_best_metric(client, run.info.run_id, book.metric, book.mode, book.step_metric)
                end_run(client, run.info.run_id, status, reason=reason)
            except Exception as err:  # noqa: BLE001 - never break the search for bookkeeping
                log.warning("could not end the MLflow run of %s: %s", trial, err)

        def on_trial_error(self, iteration, trials, trial, **info):
            try:
                client, run = self._run(trial)
                if run is None:
                    return
                if trial.last_result:
                    self._log_last(client, run, dict(trial.last_result))
                if run.info.status == "RUNNING":
                    error = "see the trial error file"
                    if trial.error_file and os.path.exists(trial.error_file):
                        lines = [ln for ln in Path(trial.error_file).read_text().splitlines() if ln.strip()]
                        error = lines[-1] if lines else error
                    log_best_metric(client, run.info.run_id, book.metric, book.mode, book.step_metric)
                    end_run(client, run.info.run_id, "FAILED", reason=f"failed: {error}", error=error)
            except Exception as err:  # noqa: BLE001 - never break the search for bookkeeping
                log.warning("could not end the MLflow run of %s: %s", trial, err)

    return _TrialRunStatus()
