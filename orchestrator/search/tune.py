"""`cvlab tune`: architecture / hyperparameter search with Ray Tune, one Ray Train run per trial.

    cvlab tune experiments/tune_reduction_ratio.yaml [--set search.num_samples=2 ...] [--resume]

- Before anything starts, the `search:` section is checked (`orchestrator.search.space.check_search`):
  unknown paths, malformed distributions and every combination the space can produce against the model.
- This process prepares the workload's data once (its job), creates the MLflow experiment and a parent
  run for the search, and runs a `Tuner` whose trainable (`orchestrator.search.trial.trial_main`) runs the
  experiment through the run lifecycle with `TuneReportCallback`: per-epoch metrics reach Tune (ASHA), and
  rank 0 logs them to the trial's nested MLflow run (tag `mlflow.parentRunId`, tag `cvlab.trial_id`).
- A Tune callback here (`orchestrator.search.callbacks`) ends each trial's run: FINISHED when it trained to
  the end, KILLED when the scheduler stopped it early, FAILED on errors; the reason is in `cvlab.end_reason`.
- The search algorithm is Tune's grid/random sampling or Optuna, over one or several objectives
  (`orchestrator.search.searchers`); a search that weighs or bounds cost has every trial measure it first
  (`run.measure_cost`), and a configuration that breaks a bound never trains (`orchestrator.search.trial`).
  `search.warm_start` hands an earlier search's trials to the searcher and the trials (`warm_start`).
- At the end the parent run gets the best trial's config (params `best.*`, `best_config.json`, a runnable
  `best_experiment.yaml`), the summary table (CSV + Markdown) and the plots; with several objectives or
  constraints also the Pareto front (`pareto.csv/.md/.png`, trials tagged `cvlab.pareto`).
- `--resume` finds the newest unfinished search of this experiment in MLflow (parent run tag
  `cvlab.tune_path`) and continues it with `Tuner.restore`: finished trials are not run again; an
  unfinished trial restarts from its last Ray Train checkpoint and keeps its MLflow run (found by trial id).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune
from ray.tune import CLIReporter
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from orchestrator.config.loader import apply_overrides, flatten_spec, spec_to_dict
from orchestrator.environment import temporary_environment
from orchestrator.errors import CvlabError
from orchestrator.jobs import job_for
from orchestrator.names import (
    BEST_RUN_TAG,
    FAILED_TRIALS_TAG,
    KIND_TAG,
    OBJECTIVES_PARAM,
    PARETO_TAG,
    SEARCH_NAME_TAG,
    SEARCH_PATHS_TAG,
    TUNE_PATH_TAG,
    WORKLOAD_TAG,
)
from orchestrator.runs.cost import check_cost_probe
from orchestrator.runs.lifecycle import open_experiment, preflight
from orchestrator.runs.ray_setup import check_fits, ray_session, worker_group_resources
from orchestrator.runs.storage import is_remote_storage, resolve_storage, validate_storage_path
from orchestrator.search import compare, pareto, report, warm_start
from orchestrator.search.callbacks import TrialBookkeeping, make_status_callback
from orchestrator.search.searchers import make_searcher
from orchestrator.search.space import check_search
from orchestrator.search.trial import TrialContext, find_trial_run, trial_main
from orchestrator.tracking.runs import (
    best_metric_key,
    create_run,
    end_run,
    log_metrics,
    log_params,
    make_client,
)
from orchestrator.tracking.server import ui_link
from workloads.logs import ensure_configured

log = logging.getLogger(__name__)

# CPU the trial's own process asks for: it only drives its Ray Train run (workers have their own).
DEFAULT_TRIAL_CPU = 0.25


# ----------------------------------------------------------------------------------------- the driver
def absolute_spec(spec):
    """Local paths made absolute: Tune runs each trial in its own working directory."""
    changes: dict[str, Any] = {"run.storage_path": validate_storage_path(spec.run.storage_path)}
    if not is_remote_storage(spec.data.root):  # a shard set in a bucket stays a URI
        changes["data.root"] = str(Path(spec.data.root).expanduser().absolute())
    for section in ("detection", "segmentation"):
        if getattr(spec, section, None) is not None:
            root = getattr(spec, section).data_root
            changes[f"{section}.data_root"] = str(Path(root).expanduser().absolute())
    return apply_overrides(spec, changes)


def search_base_name(spec) -> str:
    return spec.run.name or spec.experiment.name


def trial_resources(spec) -> dict[str, float]:
    """What the trial's own process asks Tune for (`search.resources_per_trial`, else a quarter CPU)."""
    res = {k.lower() if k.upper() in ("CPU", "GPU") else k: float(v)
           for k, v in spec.search.resources_per_trial.items()}
    if res.get("cpu", 0) <= 0:
        res["cpu"] = DEFAULT_TRIAL_CPU  # Tune rejects trials with zero CPUs
    return res


def plan_concurrency(spec, cluster: dict[str, float]) -> int:
    """How many trials fit in the cluster at once (trial process + its worker group).

    Tune only knows about the trial's own process, so without a limit it would start trials whose
    workers then wait for resources. Raises CvlabError when one trial can never fit.
    """
    need = worker_group_resources(spec)
    for k, v in trial_resources(spec).items():
        key = k.upper() if k in ("cpu", "gpu") else k
        need[key] = need.get(key, 0.0) + v
    limit = check_fits(need, cluster, "one trial", f"{spec.scaling.describe()} + the trial process")
    if spec.search.max_concurrent_trials:
        limit = min(limit, spec.search.max_concurrent_trials)
    return limit


def find_newest_search(client, experiment_id: str, base: str):
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{KIND_TAG}` = 'search' and tags.`{SEARCH_NAME_TAG}` = '{base}'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    return runs[0] if runs else None


def _log_parent_params(client, run_id: str, spec, space, job) -> None:
    flat = {k: v for k, v in flatten_spec(spec).items()
            if k not in space.paths and not k.startswith("search.")}
    s = spec.search
    params = {**flat, **{f"search.space.{p}": d for p, d in space.describe().items()},
              "search.metric": s.metric, "search.mode": s.mode, "search.num_samples": s.num_samples,
              "search.scheduler": s.scheduler, "search.algorithm": s.algorithm,
              OBJECTIVES_PARAM: json.dumps([[o.metric, o.mode] for o in s.all_objectives])}
    if s.algorithm == "optuna":
        params["search.sampler"] = s.sampler
    if s.constraints:
        params["search.constraints"] = json.dumps({k: b.model_dump(exclude_none=True) for k, b in s.constraints.items()})
    if s.warm_start:
        params["search.warm_start"] = s.warm_start
    if s.scheduler == "asha":
        params.update({"search.max_t": _max_t(spec, job), "search.grace_period": s.grace_period,
                       "search.reduction_factor": s.reduction_factor})
    log_params(client, run_id, params)


def _max_t(spec, job) -> int:
    """ASHA's budget in the workload's steps: `search.max_t`, else a full run's length."""
    return int(spec.search.max_t if spec.search.max_t is not None else job.planned_steps())


def _make_scheduler(spec, job):
    s = spec.search
    if s.scheduler == "asha":
        # time_attr = the reports' progress counter (epoch): rungs in trained steps, also after a trial
        # restarts from a checkpoint. stop_last_trials=False: trials that reach max_t finish their run.
        return ASHAScheduler(time_attr=job.step_metric, max_t=_max_t(spec, job), grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor, stop_last_trials=False)
    return FIFOScheduler()


def _progress_reporter(spec, space, job):
    s = spec.search
    params = {p: p.split(".", 1)[-1] for p in space.paths}
    metrics = {job.step_metric: job.step_metric, **{o.metric: o.metric for o in s.all_objectives}}
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
            end_run(client, run.info.run_id, "KILLED", reason="search interrupted; continue with --resume")


@dataclass
class _Search:
    """What the steps of one search share: the spec and its space, the prepared job, where it is tracked and
    stored, and its MLflow parent run."""

    spec: Any
    space: Any
    job: Any
    shared_data: dict | None
    tracking_uri: str
    client: Any
    experiment_name: str
    experiment_id: str
    fs: Any
    storage: str
    search_name: str = ""
    tune_path: str = ""
    parent_run_id: str = ""
    resumed: bool = False
    earlier: list = field(default_factory=list)  # the warm start's trials (`orchestrator.search.warm_start`)


def run_search(spec, *, resume: bool = False, num_cpus: int | None = None, verbose: int = 2) -> dict[str, Any]:
    """Run (or `resume`) the search described by `spec.search`. Returns a summary dict.

    Summary: parent_run_id, experiment_id, tracking_uri, tune_path, trials (rows best first), best
    (row), statuses (trial id -> Tune status), interrupted (bool), files (report paths).
    """
    search = _prepare_search(spec)
    _open_parent(search, resume)
    statuses, interrupted = _fit_search(search, num_cpus, verbose)
    return _end_search(search, statuses, interrupted)


def _prepare_search(spec) -> _Search:
    """Check every combination, the tracking server and the GPU request; prepare the data once (and check each
    searched batch size against it); open the experiment and the storage. Nothing starts on a bad value."""
    ensure_configured()
    space = check_search(spec)  # nothing starts unless every combination is valid
    spec = _with_cost_measured(absolute_spec(spec))
    tracking_uri = preflight(spec)
    # Generates the embedded data once, before any trial; checks every searched batch size against it.
    job = job_for(spec)
    job.prepare()
    for bs in (space["data.batch_size"].check_values() if "data.batch_size" in space.paths else []):
        job_for(apply_overrides(spec, {"data.batch_size": bs}), data=job.data).prepare()
    shared_data = None if any(p in job.data_paths for p in space.paths) else job.data

    if spec.run.measure_cost:
        check_cost_probe(job)

    client = make_client(tracking_uri)
    earlier = []
    if spec.search.warm_start:
        earlier = warm_start.earlier_trials(client, spec.search.warm_start, space, spec.search.all_objectives,
                                            budget=(job.budget_path, job.planned_steps()))
    experiment_name, experiment_id = open_experiment(client, spec, tracking_uri)
    fs, storage = resolve_storage(spec.run.storage_path, retry_limit_s=spec.run.storage_retry_limit_s)
    return _Search(spec=spec, space=space, job=job, shared_data=shared_data, tracking_uri=tracking_uri,
                   client=client, experiment_name=experiment_name, experiment_id=experiment_id, fs=fs,
                   storage=storage, earlier=earlier)


def _with_cost_measured(spec):
    """Every trial measures its cost when the search weighs or bounds it (`run.measure_cost` on)."""
    s = spec.search
    weighs = any(o.metric.startswith("cost/") for o in s.all_objectives)
    if (s.constraints or weighs) and not spec.run.measure_cost:
        return apply_overrides(spec, {"run.measure_cost": True})
    return spec


def _open_parent(search: _Search, resume: bool) -> None:
    """The MLflow parent run and the Tune folder: the earlier search's when resuming, else new ones."""
    spec, client = search.spec, search.client
    base = search_base_name(spec)
    if resume:
        previous = find_newest_search(client, search.experiment_id, base)
        if previous is None:
            raise CvlabError(f"nothing to resume: experiment {search.experiment_name!r} has no search named "
                             f"{base!r} at {search.tracking_uri}")
        search.tune_path = previous.data.tags.get(TUNE_PATH_TAG, "")
        if not tune.Tuner.can_restore(search.tune_path):
            raise CvlabError(f"cannot resume search {previous.info.run_id}: no Tune state at {search.tune_path!r}")
        search.parent_run_id = previous.info.run_id
        search.search_name = search.tune_path.rstrip("/").rsplit("/", 1)[-1]
        search.resumed = True
        client.update_run(search.parent_run_id, status="RUNNING")
        log.info("resuming search %s (MLflow parent run %s)", search.search_name, search.parent_run_id)
        return
    search.search_name = f"{base}-search-{time.strftime('%Y%m%d-%H%M%S')}"
    if search.fs is None and os.path.exists(f"{search.storage}/{search.search_name}"):
        search.search_name += f"-{os.getpid()}"
    # A local folder, or the bucket URI (what Tuner.restore and the trials' storage expect).
    search.tune_path = f"{spec.run.storage_path.rstrip('/')}/{search.search_name}"
    search.parent_run_id = create_run(
        client, search.experiment_id, search.search_name,
        tags={**spec.experiment.tags, KIND_TAG: "search", SEARCH_NAME_TAG: base, WORKLOAD_TAG: spec.workload,
              SEARCH_PATHS_TAG: json.dumps(search.space.paths), TUNE_PATH_TAG: search.tune_path},
    )
    _log_parent_params(client, search.parent_run_id, spec, search.space, search.job)
    client.log_text(search.parent_run_id, json.dumps(spec_to_dict(spec), indent=1), "search_spec.json")


def _fit_search(search: _Search, num_cpus: int | None, verbose: int) -> tuple[dict[str, str], bool]:
    """Start (or connect to) Ray and run the trials; the parent run ends KILLED on Ctrl-C and FAILED on an
    error. Returns (Tune status per trial id, whether some trial did not end)."""
    client, parent_run_id = search.client, search.parent_run_id
    # Tune runs each trial in a folder of its own; keep the working directory, so that relative paths in the
    # experiment (data roots, config files) mean in a trial what they mean to `cvlab run` (Tune passes this
    # variable on to the trial processes).
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    try:
        # The CPUs: room for the idle trial processes besides their workers. The classic CLIReporter table
        # (searched params + metric columns) needs Tune's old output engine, which Tune reads when the Tuner is
        # built and while it fits; the user's setting is back afterwards.
        with ray_session(num_cpus or (os.cpu_count() or 1) + 1), temporary_environment(RAY_AIR_NEW_OUTPUT="0"):
            results = _build_tuner(search, verbose).fit()
        statuses, unfinished = _trial_states(results, client, search.experiment_id, parent_run_id)
        if unfinished:
            _mark_interrupted(client, search.experiment_id, parent_run_id, unfinished)
        return statuses, bool(unfinished)
    except KeyboardInterrupt:
        end_run(client, parent_run_id, "KILLED", reason="interrupted; continue with: cvlab tune <spec> --resume",
                quiet=True)
        raise
    except BaseException as err:
        end_run(client, parent_run_id, "FAILED", reason=f"{type(err).__name__}: {err}", quiet=True)
        raise


def _build_tuner(search: _Search, verbose: int):
    """The Tuner of the search: restored from its folder when resuming, else new, over `trial_main`."""
    spec, space, job = search.spec, search.space, search.job
    concurrency = plan_concurrency(spec, ray.cluster_resources())
    # Trials log where the search does (the URI resolved here, not again in each trial process).
    trial_spec = spec_to_dict(spec)
    trial_spec.setdefault("tracking", {})["tracking_uri"] = search.tracking_uri
    ctx = TrialContext(
        spec=trial_spec, search_paths=space.paths, tracking_uri=search.tracking_uri,
        experiment_id=search.experiment_id, parent_run_id=search.parent_run_id,
        train_storage=f"{search.tune_path}/train", data=search.shared_data, base_tags=dict(spec.experiment.tags),
        constraints={k: b.model_dump() for k, b in spec.search.constraints.items()},
        tune_metrics=[o.metric for o in spec.search.all_objectives],
        earlier=warm_start.reusable(search.earlier),
    )
    trainable = tune.with_resources(tune.with_parameters(trial_main, ctx=ctx), trial_resources(spec))
    log.info("search %s: %d searched path(s), %d trial(s), up to %d at once, scheduler %s; MLflow experiment "
             "%r parent run %s (%s)", search.search_name, len(space.paths),
             space.grid_size() * spec.search.num_samples, concurrency, spec.search.scheduler,
             search.experiment_name, search.parent_run_id, search.tracking_uri)
    for path, desc in space.describe().items():
        log.info("  %s: %s", path, desc)
    link = ui_link(search.tracking_uri, search.experiment_id, search.parent_run_id)
    if link:
        log.info("MLflow UI: %s", link)
    # Tune saves its experiment state at most every 10 s by default: a search killed in between loses the
    # trials started meanwhile, and --resume would start them again as new trials (new MLflow runs).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # Optuna holds the space itself (Tune refuses a second, unresolved one in param_space).
    param_space = {} if spec.search.algorithm == "optuna" else space.to_tune()
    if search.resumed:
        return tune.Tuner.restore(search.tune_path, trainable=trainable, param_space=param_space,
                                  resume_unfinished=True, resume_errored=False, restart_errored=True)
    book = TrialBookkeeping(
        tracking_uri=search.tracking_uri, experiment_id=search.experiment_id, parent_run_id=search.parent_run_id,
        metric=spec.search.metric, mode=spec.search.mode, scheduler=spec.search.scheduler,
        step_metric=job.step_metric, budget=job.planned_steps(), budget_path=job.budget_path)
    s = spec.search
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=s.metric, mode=s.mode, num_samples=s.num_samples, scheduler=_make_scheduler(spec, job),
            trial_dirname_creator=_trial_dirname, trial_name_creator=_trial_name,
            search_alg=make_searcher(spec, space, concurrency, search.earlier),
        ),
        run_config=tune.RunConfig(
            name=search.search_name, storage_path=search.storage, storage_filesystem=search.fs,
            callbacks=[make_status_callback(book)],
            failure_config=tune.FailureConfig(max_failures=spec.run.max_failures),
            progress_reporter=_progress_reporter(spec, space, job),
            verbose=verbose,
        ),
    )


def _end_search(search: _Search, statuses: dict[str, str], interrupted: bool) -> dict[str, Any]:
    """The summary on the parent run (tables, plots, best config), then the parent ends: KILLED when some
    trial did not end, else FINISHED with the count of failed trials."""
    client, parent_run_id = search.client, search.parent_run_id
    summary = finalize_search(client, search.spec, search.space, search.experiment_name, search.experiment_id,
                              parent_run_id)
    summary.update(tracking_uri=search.tracking_uri, tune_path=search.tune_path, statuses=statuses,
                   interrupted=interrupted, search_name=search.search_name)
    if interrupted:
        end_run(client, parent_run_id, "KILLED",
                reason="interrupted before every trial ended; continue with: cvlab tune <spec> --resume", quiet=True)
    else:
        failed = sum(1 for st in statuses.values() if st == "ERROR")
        if failed:  # the search itself completed; its failed trials are counted (and named by `cvlab tune`)
            client.set_tag(parent_run_id, FAILED_TRIALS_TAG, str(failed))
        end_run(client, parent_run_id, "FINISHED", reason="completed")
    return summary


def finalize_search(client, spec, space, experiment_name: str, experiment_id: str,
                    parent_run_id: str) -> dict[str, Any]:
    """Summary table, plots, the best trial's config and (several objectives or constraints) the Pareto front,
    logged to the parent run."""
    s = spec.search
    objectives = [o.metric for o in s.all_objectives]
    try:
        rows, _ = compare.collect(client, experiment_name, s.metric, parent_run_id=parent_run_id,
                                  objectives=objectives)
    except CvlabError:
        rows = []
    for row in rows:  # the searched paths are the columns, whatever the runs have
        row["params"] = {p: row["params"].get(p) for p in space.paths}
    ranked = report.rank_rows(rows, s.metric, s.mode)
    best = ranked[0] if ranked and s.metric in ranked[0]["metrics"] else None
    files: dict[str, Any] = {}
    front: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="cvlab-search-") as tmp:
        if ranked:
            extra = [*report.DEFAULT_EXTRA_METRICS, *objectives[1:]]
            written = report.write_report(ranked, space.paths, s.metric, tmp, mode=s.mode, extra_metrics=extra)
            for kind, path in written.items():
                client.log_artifact(parent_run_id, str(path), "summary")
                files[kind] = f"summary/{Path(path).name}"
        if ranked and (len(objectives) > 1 or s.constraints):
            front = _log_pareto(client, parent_run_id, ranked, space, pareto.as_objectives(s.all_objectives), tmp)
            files.update({"pareto_csv": "pareto.csv", "pareto_md": "pareto.md", "pareto_png": "pareto.png"})
        if best is not None:
            _log_best(client, spec, space, parent_run_id, best, len(ranked))
            files["best_config"] = "best_config.json"
    return {"parent_run_id": parent_run_id, "experiment_id": experiment_id, "trials": ranked, "best": best,
            "files": files, "front": front}


def _log_pareto(client, parent_run_id: str, rows: list[dict], space, objectives, tmp: str) -> list[dict]:
    """pareto.csv/.md/.png on the parent run, and every trial tagged `cvlab.pareto: true|false`. Returns the rows,
    front members first."""
    written = pareto.write_pareto(rows, space.paths, objectives, Path(tmp) / "pareto")
    for path in written.values():
        client.log_artifact(parent_run_id, str(path))
    marked = pareto.mark_front(rows, objectives)
    for row in marked:
        client.set_tag(row["run_id"], PARETO_TAG, "true" if row["front"] == "yes" else "false")
    return marked


def _log_best(client, spec, space, parent_run_id: str, best: dict, trials: int) -> None:
    """The best trial (first objective): best_config.json, a runnable best_experiment.yaml, params and tag."""
    s = spec.search
    best_spec = apply_overrides(spec, {p: best["params"][p] for p in space.paths if best["params"].get(p) is not None})
    best_dict = spec_to_dict(best_spec)
    client.log_text(parent_run_id, json.dumps(
        {"run_id": best["run_id"], "run": best["run"], s.metric: best["metrics"][s.metric],
         "searched": best["params"], "spec": best_dict}, indent=1), "best_config.json")
    runnable = {k: v for k, v in best_dict.items() if k != "search" and v is not None}
    client.log_text(parent_run_id, "# best trial of the search; run it with: cvlab run <this file>\n"
                    + yaml.safe_dump(runnable, sort_keys=False), "best_experiment.yaml")
    log_params(client, parent_run_id, {f"best.{p}": best["params"][p] for p in space.paths})
    log_metrics(client, parent_run_id, {best_metric_key(s.metric): float(best["metrics"][s.metric]),
                                        "trials": float(trials)}, step=0)
    client.set_tag(parent_run_id, BEST_RUN_TAG, best["run_id"])
