"""One readable message for whatever stopped a Ray Train run."""
from __future__ import annotations

from ray.exceptions import RayActorError
from ray.train import TrainingFailedError

from orchestrator.errors import CvlabError


def training_error_message(err: BaseException, what: str = "training") -> str:
    """One readable line from Ray Train's TrainingFailedError (the workers' own error when there is one)."""
    failures = getattr(err, "worker_failures", None)
    if failures:
        rank, exc = min(failures.items())
        cause = getattr(exc, "cause", None) or exc
        return f"{what} failed on worker {rank}: {_last_line(cause)}"
    inner = getattr(err, "controller_failure", None)
    if inner is not None and type(inner).__name__ == "WorkerGroupStartupTimeoutError":
        # Ray Train retried the start (FailureConfig.controller_failure_limit) and gave up: the resources that
        # scaling.num_workers asks for (its min, for a range) never became free.
        first = str(inner).split(". ", 1)[0]
        return (f"{what} could not start its workers: {first[0].lower()}{first[1:]}, on every try; the Ray "
                f"cluster's free resources stayed below what scaling.num_workers asks (other jobs may hold them). "
                f"Lower scaling.num_workers or free the cluster (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S sets "
                f"each wait)")
    if inner is not None:
        return f"{what} failed in the Ray Train controller: {_last_line(inner)}"
    return f"{what} failed: {_last_line(err)}"


def _last_line(err: BaseException) -> str:
    # Ray prefixes remote errors with a traceback; the error's own line is the last one.
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


def as_cvlab_error(err: Exception, what: str = "training") -> Exception:
    """A CvlabError for the failures of `trainer.fit()` that have a known cause; other errors unchanged."""
    if isinstance(err, TrainingFailedError):
        return CvlabError(training_error_message(err, what))
    if isinstance(err, RayActorError):  # Ray's Ctrl-C handler aborts the controller actor
        return CvlabError(f"{what} was aborted: the Ray Train controller exited ({err})")
    return err
