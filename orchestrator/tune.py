"""`cvlab tune`: architecture / hyperparameter search with Ray Tune, one Ray Train run per trial.

    cvlab tune experiments/tune_reduction_ratio.yaml [--set search.num_samples=2 ...] [--resume]

- Before anything starts, the `search:` section is checked (`orchestrator.search_space.check_search`):
  unknown paths, malformed distributions and every combination the space can produce against the model.
- The driver prepares the data once, creates the MLflow experiment and a parent run for the search, and
  runs a `Tuner` whose trainable (`trial_main`) builds and fits a data-parallel `TorchTrainer`
  (`orchestrator.train.build_trainer`) with `TuneReportCallback`: per-epoch metrics reach Tune (ASHA),
  and rank 0 logs them to the trial's nested MLflow run (tag `mlflow.parentRunId`, tag `cvlab.trial_id`).
- A driver-side Tune callback (`make_status_callback`) ends each trial's run: FINISHED when it trained all its
  epochs, KILLED when the scheduler stopped it early, FAILED on errors; the reason is in `cvlab.end_reason`.
- At the end the parent run gets the best trial's config (params `best.*`, `best_config.json`, a runnable
  `best_experiment.yaml`), the summary table (CSV + Markdown) and the plots.
- `--resume` finds the newest unfinished search of this experiment in MLflow (parent run tag
  `cvlab.tune_path`) and continues it with `Tuner.restore`: finished trials are not run again; an
  unfinished trial restarts from its last Ray Train checkpoint and keeps its MLflow run (found by trial id).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import CvlabError

TAG_KIND = "cvlab.kind"
TAG_SEARCH_NAME = "cvlab.search_name"
TAG_SEARCH_PATHS = "cvlab.search_paths"
TAG_TUNE_PATH = "cvlab.tune_path"
TAG_TRIAL_ID = "cvlab.trial_id"
TAG_TRIAL_NAME = "cvlab.trial_name"
TAG_END_REASON = "cvlab.end_reason"
TAG_FAILED_TRIALS = "cvlab.failed_trials"
TAG_PARENT = "mlflow.parentRunId"
# CPU the trial's own process asks for: it only drives its Ray Train run (workers have their own).
DEFAULT_TRIAL_CPU = 0.25
# Worker processes importing torch on a busy machine can take longer than Ray Train's 60 s default.
WORKER_START_TIMEOUT_S = "600"


def _say(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------- contexts
@dataclass
class TrialContext:
    """What every trial needs from the driver; plain data, pickled into the Tune experiment state."""

    spec: dict  # the base experiment spec (absolute paths), as spec_to_dict gives it
    search_paths: list[str]
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    train_storage: str  # where each trial's Ray Train run folder goes (named by trial id)
    data: Any = None  # orchestrator.train.DataInfo from the driver, or None to prepare per trial
    base_tags: dict = field(default_factory=dict)


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def find_trial_run(client, experiment_id: str, parent_run_id: str, trial_id: str):
    """The nested MLflow run of `trial_id` under `parent_run_id`, or None."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}' and tags.`{TAG_TRIAL_ID}` = '{trial_id}'",
        max_results=5,
    )
    return runs[0] if runs else None


def _plain(value: Any) -> Any:
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return value.item()
    return value


def trial_main(config: dict, ctx: TrialContext) -> None:
    """One Tune trial: a full (data-parallel) Ray Train run of the classification workload."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator import train as train_mod
    from orchestrator.spec_loader import apply_overrides, flatten_spec, spec_from_dict
    from orchestrator.tracking import create_run, end_run, log_params

    tctx = ray.tune.get_context()
    trial_id, trial_name = tctx.get_trial_id(), tctx.get_trial_name()
    overrides = {p: _plain(config[p]) for p in ctx.search_paths}
    spec = apply_overrides(spec_from_dict(ctx.spec, source="<search base spec>"), overrides)

    client = _client(ctx.tracking_uri)
    existing = find_trial_run(client, ctx.experiment_id, ctx.parent_run_id, trial_id)
    if existing is not None:
        from orchestrator.tracking import logged_steps

        # Rank 0 logs an epoch only after the checkpoint covering it, so all epochs in MLflow means the
        # run trained to the end (maybe killed before it was marked FINISHED).
        done_epochs = max(logged_steps(client, existing.info.run_id, "val/top1"), default=0)
        finished = existing.info.status == "FINISHED" and existing.data.tags.get(TAG_END_REASON) == "completed"
        if finished or done_epochs >= spec.optim.epochs:
            # Tune's saved state (written every ~10 s) did not record the end: hand Tune the final
            # metrics instead of training again.
            final = {**existing.data.metrics, "epoch": max(done_epochs, spec.optim.epochs if finished else 0)}
            print(f"[{trial_name}] already trained in MLflow run {existing.info.run_id}; not training again",
                  flush=True)
            ray.tune.report(final)
            if not finished:
                client.set_tag(existing.info.run_id, TAG_END_REASON, "completed")
                end_run(client, existing.info.run_id, "FINISHED")
            return
    if existing is not None:
        run_id = existing.info.run_id
        client.update_run(run_id, status="RUNNING")
        if TAG_END_REASON in existing.data.tags:
            client.delete_tag(run_id, TAG_END_REASON)
        print(f"[{trial_name}] continuing MLflow run {run_id}", flush=True)
    else:
        label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items())
        run_id = create_run(
            client, ctx.experiment_id, f"{trial_name} ({label})"[:240],
            tags={**ctx.base_tags, TAG_KIND: "trial", TAG_TRIAL_ID: trial_id, TAG_TRIAL_NAME: trial_name,
                  TAG_SEARCH_PATHS: json.dumps(ctx.search_paths)},
            parent_run_id=ctx.parent_run_id,
        )
    try:
        data = ctx.data if ctx.data is not None else train_mod.prepare_data(spec)
        stats = train_mod.model_stats(spec, data)
        resolved = {k: v for k, v in flatten_spec(spec).items() if not k.startswith("search.")}
        params = {**resolved, **stats, "data.train_images": data.train_images,
                  "data.val_images": data.val_images, "data.classes": len(data.classes)}
        log_params(client, run_id, params)
        trainer = train_mod.build_trainer(
            spec, run_id=run_id, tracking_uri=ctx.tracking_uri, name=trial_id,
            storage_path=ctx.train_storage, callbacks=[TuneReportCallback()],
            # A restarted trial (resumed search, Tune retry) continues from its last checkpoint.
            resume=existing is not None, data=data,
        )
        result = trainer.fit()
    except Exception as err:
        from ray.train import TrainingFailedError

        # The run is ended by the driver's callback (on_trial_error), not here: when Tune stops a trial
        # (ASHA), its Train run also ends in an exception while this process is torn down, and writing
        # FAILED here would race the callback's KILLED.
        message = train_mod.training_error_message(err) if isinstance(err, TrainingFailedError) \
            else f"{type(err).__name__}: {err}"
        raise RuntimeError(message) from err
    if result.checkpoint is not None:
        client.set_tag(run_id, "cvlab.checkpoint", result.checkpoint.path)
    client.set_tag(run_id, TAG_END_REASON, "completed")
    end_run(client, run_id, "FINISHED")


# ------------------------------------------------------------------------------------- driver callback
def end_status(last_result: dict | None, epochs: int, scheduler: str) -> tuple[str, str]:
    """(MLflow status, reason) for a trial that Tune completed: all epochs trained, or stopped early."""
    last_epoch = int((last_result or {}).get("epoch") or 0)
    if last_epoch >= epochs:
        return "FINISHED", "completed"
    if scheduler == "asha":
        return "KILLED", f"early-stopped by ASHA after epoch {last_epoch} of {epochs}"
    return "KILLED", f"stopped by Tune after epoch {last_epoch} of {epochs}"


def make_status_callback(tracking_uri: str, experiment_id: str, parent_run_id: str, epochs: int,
                         metric: str, scheduler: str):
    """A Tune callback (runs on the driver) that ends each trial's nested MLflow run with a reason."""
    from ray.tune import Callback

    class _TrialRunStatus(Callback):
        def __init__(self):
            self.cfg = {"tracking_uri": tracking_uri, "experiment_id": experiment_id,
                        "parent_run_id": parent_run_id, "epochs": epochs, "metric": metric,
                        "scheduler": scheduler}

        def _run(self, trial):
            client = _client(self.cfg["tracking_uri"])
            run = find_trial_run(client, self.cfg["experiment_id"], self.cfg["parent_run_id"], trial.trial_id)
            return client, run

        def _log_last(self, client, run, result: dict) -> int:
            """Make sure the run has the last metrics Tune saw (a stopped worker may not have logged them);
            returns the last epoch trained (per Tune or MLflow, whichever is further)."""
            from orchestrator.tracking import log_metrics, logged_steps

            logged = logged_steps(client, run.info.run_id, self.cfg["metric"])
            epoch = max(int(result.get("epoch") or 0), max(logged, default=0))
            if epoch == 0:
                return 0
            metrics = {k: v for k, v in result.items()
                       if "/" in k or k in ("images_per_s", "epoch_time_s", "lr")}
            metrics = {k: float(v) for k, v in metrics.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
            if int(result.get("epoch") or 0) == epoch and epoch not in logged:
                log_metrics(client, run.info.run_id, metrics, step=epoch)
            log_metrics(client, run.info.run_id, {"epoch": epoch}, step=epoch)
            return epoch

        def on_trial_complete(self, iteration, trials, trial, **info):
            try:
                client, run = self._run(trial)
                if run is None:
                    return
                result = dict(trial.last_result or {})
                result["epoch"] = self._log_last(client, run, result)
                if run.info.status != "RUNNING":  # the trial ended its run itself
                    return
                epochs = int((getattr(trial, "config", None) or {}).get("optim.epochs", self.cfg["epochs"]))
                status, reason = end_status(result, epochs, self.cfg["scheduler"])
                client.set_tag(run.info.run_id, TAG_END_REASON, reason)
                client.set_terminated(run.info.run_id, status=status)
            except Exception as err:  # noqa: BLE001 - never break the search for bookkeeping
                print(f"cvlab: warning: could not end the MLflow run of {trial}: {err}", file=sys.stderr)

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
                    from orchestrator.tracking import end_run

                    client.set_tag(run.info.run_id, TAG_END_REASON, f"failed: {error}"[:5000])
                    end_run(client, run.info.run_id, "FAILED", error)
            except Exception as err:  # noqa: BLE001 - never break the search for bookkeeping
                print(f"cvlab: warning: could not end the MLflow run of {trial}: {err}", file=sys.stderr)

    return _TrialRunStatus()


# ----------------------------------------------------------------------------------------- the driver
def _absolute_spec(spec):
    """Local paths made absolute: Tune runs each trial in its own working directory."""
    from orchestrator.spec_loader import apply_overrides
    from orchestrator.storage import validate_storage_path

    changes: dict[str, Any] = {"data.root": str(Path(spec.data.root).expanduser().absolute()),
                               "run.storage_path": validate_storage_path(spec.run.storage_path)}
    return apply_overrides(spec, changes)


def _search_base_name(spec) -> str:
    return spec.run.name or spec.experiment.name


def _ensure_ray(num_cpus: int | None) -> bool:
    """Connect to Ray (RAY_ADDRESS / an initialised session) or start a local one; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return True
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", WORKER_START_TIMEOUT_S)
    # One logical CPU above the cores: room for the (mostly idle) trial processes next to the workers.
    ray.init(num_cpus=num_cpus or (os.cpu_count() or 1) + 1, log_to_driver=True)
    return True


def trial_resources(spec) -> dict[str, float]:
    """What the trial's own process asks Tune for (`search.resources_per_trial`, else a quarter CPU)."""
    res = {k.lower() if k.upper() in ("CPU", "GPU") else k: float(v)
           for k, v in spec.search.resources_per_trial.items()}
    if res.get("cpu", 0) <= 0:
        res["cpu"] = DEFAULT_TRIAL_CPU  # Tune rejects trials with zero CPUs
    return res


def worker_group_resources(spec) -> dict[str, float]:
    per = {k.upper() if k.lower() in ("cpu", "gpu") else k: float(v)
           for k, v in spec.scaling.resources_per_worker.items()}
    per.setdefault("CPU", 1.0)
    if spec.scaling.use_gpu:
        per.setdefault("GPU", 1.0)
    return {k: v * spec.scaling.num_workers for k, v in per.items()}


def plan_concurrency(spec, cluster: dict[str, float]) -> int:
    """How many trials fit in the cluster at once (trial process + its worker group).

    Tune only knows about the trial's own process, so without a limit it would start trials whose
    workers then wait for resources. Raises CvlabError when one trial can never fit.
    """
    need = worker_group_resources(spec)
    for k, v in trial_resources(spec).items():
        key = k.upper() if k in ("cpu", "gpu") else k
        need[key] = need.get(key, 0.0) + v
    fits = []
    for key, amount in need.items():
        if amount <= 0:
            continue
        have = cluster.get(key, 0.0)
        if amount > have:
            raise CvlabError(
                f"one trial needs {amount:g} {key} ({spec.scaling.num_workers} worker(s) + the trial process) "
                f"but the Ray cluster has {have:g}; lower scaling.num_workers / resources_per_worker, set "
                "scaling.use_gpu: false, or use a bigger cluster"
            )
        fits.append(math.floor(have / amount + 1e-9))
    limit = max(1, min(fits) if fits else 1)
    if spec.search.max_concurrent_trials:
        limit = min(limit, spec.search.max_concurrent_trials)
    return limit


def _find_search_to_resume(client, experiment_id: str, base: str):
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_KIND}` = 'search' and tags.`{TAG_SEARCH_NAME}` = '{base}'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    return runs[0] if runs else None


def _log_parent_params(client, run_id: str, spec, space) -> None:
    from orchestrator.spec_loader import flatten_spec
    from orchestrator.tracking import log_params

    flat = {k: v for k, v in flatten_spec(spec).items()
            if k not in space.paths and not k.startswith("search.")}
    s = spec.search
    params = {**flat, **{f"search.space.{p}": d for p, d in space.describe().items()},
              "search.metric": s.metric, "search.mode": s.mode, "search.num_samples": s.num_samples,
              "search.scheduler": s.scheduler}
    if s.scheduler == "asha":
        from orchestrator.search_space import max_t_of

        params.update({"search.max_t": max_t_of(spec), "search.grace_period": s.grace_period,
                       "search.reduction_factor": s.reduction_factor})
    log_params(client, run_id, params)


def _make_scheduler(spec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from orchestrator.search_space import max_t_of

    s = spec.search
    if s.scheduler == "asha":
        # time_attr "epoch": rungs in trained epochs, also after a trial restarts from a checkpoint.
        # stop_last_trials=False: trials that reach max_t finish their run instead of being killed.
        return ASHAScheduler(time_attr="epoch", max_t=max_t_of(spec), grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor, stop_last_trials=False)
    return FIFOScheduler()


def _progress_reporter(spec, space):
    from ray.tune import CLIReporter

    s = spec.search
    params = {p: p.split(".", 1)[-1] for p in space.paths}
    metrics = {"epoch": "epoch", s.metric: s.metric}
    for extra in ("val/loss", "images_per_s"):
        if extra != s.metric:
            metrics[extra] = "img/s" if extra == "images_per_s" else extra
    # metric/mode come from TuneConfig (the reporter refuses to be given them twice)
    return CLIReporter(parameter_columns=params, metric_columns=metrics, sort_by_metric=True,
                       max_report_frequency=20, max_progress_rows=40)


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


def _trial_states(results, client, experiment_id: str, parent_run_id: str) -> tuple[dict[str, str], list[str]]:
    """Tune status per trial id, and the trials that did not end (interrupted search).

    After Ctrl-C Tune marks running trials TERMINATED too, without `done` in their last result and without
    calling the callbacks, so their MLflow runs are still RUNNING. `done` alone cannot tell them apart:
    Tune adds it to a trial that returned by editing the last result in place, which the saved
    experiment state can miss. So a TERMINATED trial without `done` counts as unfinished only when its
    MLflow run was not ended (by the trial itself or by the status callback).
    """
    try:
        trials = results._experiment_analysis.trials
    except AttributeError:
        return {}, []
    statuses = {t.trial_id: t.status for t in trials}
    unfinished = []
    for t in trials:
        if t.status == "ERROR" or (t.status == "TERMINATED" and (t.last_result or {}).get("done")):
            continue
        if t.status == "TERMINATED":
            run = find_trial_run(client, experiment_id, parent_run_id, t.trial_id)
            if run is not None and run.info.status != "RUNNING":
                continue
        unfinished.append(t.trial_id)
    return statuses, unfinished


def _mark_interrupted(client, experiment_id: str, parent_run_id: str, trial_ids: list[str]) -> None:
    """Nested runs of trials cut short by an interruption: KILLED until `--resume` continues them."""
    for tid in trial_ids:
        run = find_trial_run(client, experiment_id, parent_run_id, tid)
        if run is not None and run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, TAG_END_REASON, "search interrupted; continue with --resume")
            client.set_terminated(run.info.run_id, status="KILLED")


def run_search(spec, *, resume: bool = False, num_cpus: int | None = None, verbose: int = 2) -> dict[str, Any]:
    """Run (or `resume`) the search described by `spec.search`. Returns a summary dict.

    Summary: parent_run_id, experiment_id, tracking_uri, tune_path, trials (rows best first), best
    (row), statuses (trial id -> Tune status), interrupted (bool), files (report paths).
    """
    from orchestrator.search_space import check_search

    space = check_search(spec)  # nothing starts unless every combination is valid
    spec = _absolute_spec(spec)

    from ray import tune

    from orchestrator import train as train_mod
    from orchestrator.spec_loader import spec_to_dict
    from orchestrator.storage import resolve_storage
    from orchestrator.tracking import (
        check_tracking_server,
        create_run,
        default_artifact_location,
        ensure_experiment,
        resolve_tracking_uri,
    )

    tracking_uri = resolve_tracking_uri(spec)
    check_tracking_server(tracking_uri)
    client = _client(tracking_uri)
    experiment_name = spec.tracking.experiment_name or spec.experiment.name
    try:
        experiment_id = ensure_experiment(client, experiment_name, default_artifact_location(tracking_uri))
    except Exception as err:
        raise CvlabError(f"MLflow at {tracking_uri}: cannot open experiment {experiment_name!r}: {err}") from err
    fs, storage = resolve_storage(spec.run.storage_path)
    base = _search_base_name(spec)

    previous = None
    if resume:
        previous = _find_search_to_resume(client, experiment_id, base)
        if previous is None:
            raise CvlabError(f"nothing to resume: experiment {experiment_name!r} has no search named {base!r} "
                             f"at {tracking_uri}")
        tune_path = previous.data.tags.get(TAG_TUNE_PATH, "")
        if not tune.Tuner.can_restore(tune_path):
            raise CvlabError(f"cannot resume search {previous.info.run_id}: no Tune state at {tune_path!r}")
        parent_run_id = previous.info.run_id
        search_name = tune_path.rstrip("/").rsplit("/", 1)[-1]
        client.update_run(parent_run_id, status="RUNNING")
        _say(f"resuming search {search_name} (MLflow parent run {parent_run_id})")
    else:
        search_name = f"{base}-search-{time.strftime('%Y%m%d-%H%M%S')}"
        if fs is None and os.path.exists(f"{storage}/{search_name}"):
            search_name += f"-{os.getpid()}"
        # A local folder, or the bucket URI (what Tuner.restore and build_trainer expect).
        tune_path = f"{spec.run.storage_path.rstrip('/')}/{search_name}"
        parent_run_id = create_run(
            client, experiment_id, search_name,
            tags={**spec.experiment.tags, TAG_KIND: "search", TAG_SEARCH_NAME: base,
                  TAG_SEARCH_PATHS: json.dumps(space.paths), TAG_TUNE_PATH: tune_path},
        )
        _log_parent_params(client, parent_run_id, spec, space)
        client.log_text(parent_run_id, json.dumps(spec_to_dict(spec), indent=1), "search_spec.json")

    started_ray = False
    interrupted = False
    try:
        data = train_mod.prepare_data(spec)  # generates the embedded dataset once, before any trial
        per_trial_data = any(p.startswith("data.") and p not in ("data.batch_size", "data.num_workers",
                                                                  "data.image_size", "data.val_resize")
                             for p in space.paths)
        for bs in (space["data.batch_size"].check_values() if "data.batch_size" in space.paths
                   else [spec.data.batch_size]):
            from orchestrator.spec_loader import apply_overrides

            train_mod._check_batch(apply_overrides(spec, {"data.batch_size": bs}), data)

        started_ray = _ensure_ray(num_cpus)
        import ray

        concurrency = plan_concurrency(spec, ray.cluster_resources())
        ctx = TrialContext(
            spec=spec_to_dict(spec), search_paths=space.paths, tracking_uri=tracking_uri,
            experiment_id=experiment_id, parent_run_id=parent_run_id,
            train_storage=f"{tune_path}/train", data=None if per_trial_data else data,
            base_tags=dict(spec.experiment.tags),
        )
        trainable = tune.with_resources(tune.with_parameters(trial_main, ctx=ctx), trial_resources(spec))
        _say(f"search {search_name}: {len(space.paths)} searched path(s), "
             f"{space.grid_size() * spec.search.num_samples} trial(s), up to {concurrency} at once, "
             f"scheduler {spec.search.scheduler}; MLflow experiment {experiment_name!r} parent run "
             f"{parent_run_id} ({tracking_uri})")
        for path, desc in space.describe().items():
            _say(f"  {path}: {desc}")

        # The classic CLIReporter table (searched params + metric columns) needs Tune's old output engine.
        old_output = os.environ.get("RAY_AIR_NEW_OUTPUT")
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        try:
            if previous is not None:
                tuner = tune.Tuner.restore(tune_path, trainable=trainable, param_space=space.to_tune(),
                                           resume_unfinished=True, resume_errored=False,
                                           restart_errored=True)
            else:
                s = spec.search
                tuner = tune.Tuner(
                    trainable,
                    param_space=space.to_tune(),
                    tune_config=tune.TuneConfig(
                        metric=s.metric, mode=s.mode, num_samples=s.num_samples,
                        scheduler=_make_scheduler(spec),
                        trial_dirname_creator=_trial_dirname, trial_name_creator=_trial_name,
                        search_alg=_search_alg(spec, concurrency),
                    ),
                    run_config=tune.RunConfig(
                        name=search_name, storage_path=storage, storage_filesystem=fs,
                        callbacks=[make_status_callback(tracking_uri, experiment_id, parent_run_id,
                                                        spec.optim.epochs, s.metric, s.scheduler)],
                        failure_config=tune.FailureConfig(max_failures=spec.run.max_failures),
                        progress_reporter=_progress_reporter(spec, space),
                        verbose=verbose,
                    ),
                )
            results = tuner.fit()
        finally:
            if old_output is None:
                os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
            else:
                os.environ["RAY_AIR_NEW_OUTPUT"] = old_output
        statuses, unfinished = _trial_states(results, client, experiment_id, parent_run_id)
        interrupted = bool(unfinished)
        if interrupted:
            _mark_interrupted(client, experiment_id, parent_run_id, unfinished)
    except KeyboardInterrupt:
        interrupted = True
        statuses = {}
        _end_parent(client, parent_run_id, "KILLED", "interrupted; continue with: cvlab tune <spec> --resume")
        raise
    except BaseException as err:
        _end_parent(client, parent_run_id, "FAILED", f"{type(err).__name__}: {err}")
        raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()

    summary = finalize_search(client, spec, space, experiment_name, experiment_id, parent_run_id)
    summary.update(tracking_uri=tracking_uri, tune_path=tune_path, statuses=statuses, interrupted=interrupted,
                   search_name=search_name)
    if interrupted:
        _end_parent(client, parent_run_id, "KILLED",
                    "interrupted before every trial ended; continue with: cvlab tune <spec> --resume")
    else:
        failed = sum(1 for st in statuses.values() if st == "ERROR")
        if failed:  # the search itself completed; its failed trials are counted (and named by `cvlab tune`)
            client.set_tag(parent_run_id, TAG_FAILED_TRIALS, str(failed))
        client.set_tag(parent_run_id, TAG_END_REASON, "completed")
        client.set_terminated(parent_run_id, "FINISHED")
    return summary


def _search_alg(spec, concurrency: int):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Seeded so that a search draws the same random samples each time it is started. The concurrency
    # limit lives here: TuneConfig.max_concurrent_trials is ignored with a SearchGenerator.
    return BasicVariantGenerator(random_state=spec.experiment.seed, max_concurrent=concurrency)


def _end_parent(client, run_id: str, status: str, reason: str) -> None:
    try:
        client.set_tag(run_id, TAG_END_REASON, reason[:5000])
        client.set_terminated(run_id, status=status)
    except Exception as err:  # noqa: BLE001 - the search's own error matters more
        print(f"cvlab: warning: could not end the parent run {run_id}: {err}", file=sys.stderr)


def finalize_search(client, spec, space, experiment_name: str, experiment_id: str,
                    parent_run_id: str) -> dict[str, Any]:
    """Summary table, plots and the best trial's config, logged to the parent run."""
    import tempfile

    import yaml

    from orchestrator import compare, search_report
    from orchestrator.spec_loader import apply_overrides, spec_to_dict
    from orchestrator.tracking import log_metrics, log_params

    s = spec.search
    try:
        rows, _ = compare.collect(client, experiment_name, s.metric, parent_run_id=parent_run_id)
    except CvlabError:
        rows = []
    for row in rows:  # the searched paths are the columns, whatever the runs have
        row["params"] = {p: row["params"].get(p) for p in space.paths}
    ranked = search_report.rank_rows(rows, s.metric, s.mode)
    best = ranked[0] if ranked and s.metric in ranked[0]["metrics"] else None
    files: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cvlab-search-") as tmp:
        if ranked:
            written = search_report.write_report(ranked, space.paths, s.metric, tmp, mode=s.mode)
            for kind, path in written.items():
                client.log_artifact(parent_run_id, str(path), "summary")
                files[kind] = f"summary/{Path(path).name}"
        if best is not None:
            best_spec = apply_overrides(spec, {p: best["params"][p] for p in space.paths
                                               if best["params"].get(p) is not None})
            best_dict = spec_to_dict(best_spec)
            client.log_text(parent_run_id, json.dumps(
                {"run_id": best["run_id"], "run": best["run"], s.metric: best["metrics"][s.metric],
                 "searched": best["params"], "spec": best_dict}, indent=1), "best_config.json")
            runnable = {k: v for k, v in best_dict.items() if k != "search" and v is not None}
            client.log_text(parent_run_id, "# best trial of the search; run it with: cvlab run <this file>\n"
                            + yaml.safe_dump(runnable, sort_keys=False), "best_experiment.yaml")
            log_params(client, parent_run_id, {f"best.{p}": best["params"][p] for p in space.paths})
            safe = s.metric.replace("/", "_")
            log_metrics(client, parent_run_id, {f"best_{safe}": float(best["metrics"][s.metric]),
                                                "trials": float(len(ranked))}, step=0)
            client.set_tag(parent_run_id, "cvlab.best_run_id", best["run_id"])
            files["best_config"] = "best_config.json"
    return {"parent_run_id": parent_run_id, "experiment_id": experiment_id, "trials": ranked, "best": best,
            "files": files}


# -------------------------------------------------------------------------------------------------- CLI
def _cmd(args) -> int:
    from orchestrator import search_report
    from orchestrator.spec_loader import load_spec

    spec = load_spec(args.spec, args.set)
    if args.check:
        from orchestrator.search_space import check_combinations, check_search

        space = check_search(spec)
        n = check_combinations(spec, space)
        _say(f"search space OK: {n} combination(s) checked; "
             f"{space.grid_size() * spec.search.num_samples} trial(s)")
        for path, desc in space.describe().items():
            _say(f"  {path}: {desc}")
        return 0
    summary = run_search(spec, resume=args.resume, num_cpus=args.num_cpus)
    s = spec.search
    rows = summary["trials"]
    _say("")
    _say(f"search {summary['search_name']}: {len(rows)} trial run(s) in MLflow "
         f"(parent run {summary['parent_run_id']}, {summary['tracking_uri']})")
    if rows:
        cols = search_report.table_columns(rows, list(s.space), s.metric)
        _say(search_report.text_table(rows, cols).rstrip())
    if summary["best"]:
        b = summary["best"]
        _say(f"best: {b['run']} {s.metric}={b['metrics'][s.metric]:.4g} with "
             + ", ".join(f"{k}={v}" for k, v in b["params"].items()))
    _say(f"Tune state: {summary['tune_path']}")
    if summary["interrupted"]:
        _say(f"the search was interrupted; continue it with: cvlab tune {args.spec} --resume")
        return 130
    errored = [t for t, st in summary["statuses"].items() if st == "ERROR"]
    if errored:
        _say(f"{len(errored)} trial(s) failed: {', '.join(errored)} (see the cvlab.end_reason tag of their runs)")
        return 1
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "tune",
        help="search architectures / hyperparameters with Ray Tune (one Ray Train run per trial)",
        description="Run the search in the experiment's `search:` section: every trial is a full Ray Train "
                    "run, tracked as a nested MLflow run under one parent run per search.",
    )
    p.add_argument("spec", help="experiment YAML with a search: section")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec value, e.g. --set search.num_samples=2 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue the newest interrupted search of this experiment (finished trials are kept)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="logical CPUs of the local Ray cluster started when RAY_ADDRESS is unset "
                        "(default: this machine's cores + 1, for the trial processes)")
    p.add_argument("--check", action="store_true",
                   help="only check the search space against the model and exit")
    p.set_defaults(func=_cmd)
