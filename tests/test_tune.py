"""`cvlab tune`: trial bookkeeping, refusal before start, and a real search killed and resumed.

The end-to-end test runs a 3-trial ASHA search of tiny CedNet-26 trials (1 Ray worker each, 32 px images,
3 epochs) through the CLI in a subprocess, SIGKILLs it once a trial has finished and another is mid-run,
then resumes it in-process and checks through the MLflow client: one parent run, one nested run per trial
(none duplicated), finished trials not re-run, the summary artifacts, and no trial/worker actor or placement
group left. A second search (module fixture: one trial diverges) is checked through the MLflow client and,
served by a real `mlflow server`, in headless Chromium through the UI links cvlab prints.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.errors import CvlabError

REPO = Path(__file__).resolve().parents[1]


def _spec_dict(tmp: Path, **search) -> dict:
    return {
        "experiment": {"name": "tune-test", "seed": 0},
        "model": {"name": "cednet26"},
        "data": {"root": str(tmp / "data"), "generate": True, "num_classes_generated": 3,
                 "per_class_generated": 8, "generated_size": 32, "image_size": 32, "batch_size": 8,
                 "num_workers": 0},
        "optim": {"epochs": 3, "lr": 0.05},
        "scaling": {"num_workers": 1},
        "run": {"storage_path": str(tmp / "runs"), "log_every": 100, "checkpoints_kept": 1},
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "log_model": False},
        "search": {"space": {"model.reduction_ratio": {"grid": [4, 8, 16]}}, "scheduler": "asha",
                   "grace_period": 1, "reduction_factor": 2, "max_concurrent_trials": 2, **search},
    }


# Searches here run with 3 logical CPUs on the 2-core CI machine on purpose: two trials at once, each a
# 1-CPU Ray Train worker plus its trial process, which asks for 0.25 CPU and mostly waits.
SEARCH_CPUS = "3"


def _write(tmp: Path, d: dict) -> Path:
    path = tmp / "search.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------ fast tests
def test_end_status_tells_completed_from_early_stopped():
    from orchestrator.search.callbacks import end_status

    assert end_status({"epoch": 3}, 3, "asha") == ("FINISHED", "completed")
    status, reason = end_status({"epoch": 1}, 3, "asha")
    assert status == "KILLED" and reason == "early-stopped by ASHA after epoch 1 of 3"
    assert end_status({}, 3, "fifo")[0] == "KILLED"


def test_concurrency_plan_and_infeasible_trials():
    from orchestrator.config.loader import spec_from_dict
    from orchestrator.search.tune import plan_concurrency, trial_resources

    spec = spec_from_dict({"model": {"name": "cednet26"}, "scaling": {"num_workers": 2},
                           "search": {"space": {"optim.lr": {"grid": [0.1]}}}})
    assert trial_resources(spec) == {"cpu": 0.25}  # never zero: Tune rejects CPU-less trials
    assert plan_concurrency(spec, {"CPU": 8.0}) == 3  # 3 x (2 workers + 0.25)
    assert plan_concurrency(spec.model_copy(update={"search": spec.search.model_copy(
        update={"max_concurrent_trials": 2})}), {"CPU": 8.0}) == 2
    with pytest.raises(CvlabError, match=r"one trial needs 2.25 CPU .* the Ray cluster has 2"):
        plan_concurrency(spec, {"CPU": 2.0})
    gpu = spec.model_copy(update={"scaling": spec.scaling.model_copy(update={"use_gpu": True})})
    with pytest.raises(CvlabError, match="needs 2 GPU"):
        plan_concurrency(gpu, {"CPU": 64.0})


def test_status_callback_ends_trial_runs_with_a_reason(tmp_path):
    """The driver callback: early-stopped -> KILLED + reason + last metrics; errors -> FAILED."""
    from mlflow import MlflowClient

    from orchestrator.names import END_REASON_TAG as TAG_END_REASON
    from orchestrator.search.callbacks import TrialBookkeeping, make_status_callback

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("cb", artifact_location=(tmp_path / "a").as_uri())
    parent = client.create_run(exp, run_name="search").info.run_id
    runs = {}
    for tid in ("t1", "t2", "t3", "t4"):
        runs[tid] = client.create_run(exp, run_name=tid, tags={"mlflow.parentRunId": parent,
                                                               "cvlab.trial_id": tid}).info.run_id
    client.set_tag(runs["t4"], TAG_END_REASON, "completed")
    client.set_terminated(runs["t4"], "FINISHED")  # ended by the trial itself: left alone
    error_file = tmp_path / "error.txt"
    error_file.write_text("Traceback ...\nRuntimeError: training failed on worker 0: boom\n")
    cb = make_status_callback(TrialBookkeeping(uri, exp, parent, metric="val/top1", mode="max", scheduler="asha",
                                               step_metric="epoch", budget=3, budget_path="optim.epochs"))
    cb = __import__("pickle").loads(__import__("ray.cloudpickle", fromlist=["x"]).dumps(cb))  # as restored
    def trial(tid, **kw):
        return SimpleNamespace(trial_id=tid, error_file=None, **kw)

    cb.on_trial_complete(0, [], trial("t1", last_result={"epoch": 1, "val/top1": 0.25, "val/loss": 1.1}))
    cb.on_trial_complete(0, [], trial("t2", last_result={"epoch": 3, "val/top1": 0.5}))
    cb.on_trial_error(0, [], SimpleNamespace(trial_id="t3", error_file=str(error_file), last_result={}))
    cb.on_trial_complete(0, [], trial("t4", last_result={"epoch": 3, "val/top1": 0.7}))

    r1 = client.get_run(runs["t1"])
    assert r1.info.status == "KILLED"
    assert r1.data.tags[TAG_END_REASON] == "early-stopped by ASHA after epoch 1 of 3"
    assert r1.data.metrics["val/top1"] == 0.25 and r1.data.metrics["epoch"] == 1  # Tune's last result
    r2 = client.get_run(runs["t2"])
    assert (r2.info.status, r2.data.tags[TAG_END_REASON]) == ("FINISHED", "completed")
    r3 = client.get_run(runs["t3"])
    assert r3.info.status == "FAILED"
    assert r3.data.tags[TAG_END_REASON] == "failed: RuntimeError: training failed on worker 0: boom"
    assert client.get_run(runs["t4"]).info.status == "FINISHED"


def test_interrupted_trials_are_told_apart_with_mlflow(tmp_path):
    """Tune's saved state can lack `done` for a trial that returned normally (it is added in place):
    such a TERMINATED trial counts as interrupted only while its MLflow run was never ended."""
    from mlflow import MlflowClient

    from orchestrator.search.tune import _trial_states

    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp = client.create_experiment("states", artifact_location=(tmp_path / "a").as_uri())
    parent = client.create_run(exp, run_name="search").info.run_id
    for tid, status in (("ended", "FINISHED"), ("cut", None), ("early", "KILLED")):
        run_id = client.create_run(exp, tags={"mlflow.parentRunId": parent, "cvlab.trial_id": tid}).info.run_id
        if status:
            client.set_terminated(run_id, status)
    trials = [SimpleNamespace(trial_id="ended", status="TERMINATED", last_result={"epoch": 3}),
              SimpleNamespace(trial_id="cut", status="TERMINATED", last_result={"epoch": 1}),
              SimpleNamespace(trial_id="early", status="TERMINATED", last_result={"epoch": 1, "done": True}),
              SimpleNamespace(trial_id="bad", status="ERROR", last_result={}),
              SimpleNamespace(trial_id="waiting", status="PENDING", last_result={})]
    results = SimpleNamespace(_experiment_analysis=SimpleNamespace(trials=trials))
    statuses, unfinished = _trial_states(results, client, exp, parent)
    assert statuses["ended"] == "TERMINATED" and statuses["bad"] == "ERROR"
    assert unfinished == ["cut", "waiting"]


def test_bad_space_refuses_before_anything_starts(tmp_path, capsys):
    d = _spec_dict(tmp_path)
    d["search"]["space"] = {"model.reduction_ratio": {"grid": [4, 64]}, "model.group_channels": {"grid": [16, 48]}}
    rc = main(["tune", str(_write(tmp_path, d))])
    err = capsys.readouterr().err
    assert rc == 2
    assert "the search cannot start: 3 of 4 combination(s)" in err
    assert "model.reduction_ratio=64, model.group_channels=16:" in err
    assert "Traceback" not in err
    # nothing was started: no MLflow store, no data, no Ray Tune folder
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()
    assert not (tmp_path / "data").exists()


def test_resume_without_an_earlier_search(tmp_path, capsys):
    from orchestrator.config.loader import spec_from_dict
    from orchestrator.search.tune import run_search

    with pytest.raises(CvlabError, match="nothing to resume: experiment 'tune-test' has no search"):
        run_search(spec_from_dict(_spec_dict(tmp_path)), resume=True)


def _cost_spec(**search):
    from orchestrator.config.loader import spec_from_dict

    return spec_from_dict({"model": {"name": "cednet26"}, "search": {
        "space": {"model.reduction_ratio": {"choice": [1, 4, 16]}}, "algorithm": "optuna", "num_samples": 6,
        "objectives": [{"metric": "val/top1"}, {"metric": "cost/train_images_per_s"}],
        "constraints": {"cost/params_m": {"max": 7.2}}, **search}})


def test_optuna_is_told_infeasible_trials_and_earlier_results():
    import math

    from orchestrator.search.constraints import INFEASIBLE_KEY
    from orchestrator.search.searchers import make_searcher
    from orchestrator.search.space import check_search

    spec = _cost_spec()
    earlier = [{"params": {"model.reduction_ratio": 16}, "values": [0.5, 30.0], "costs": {"cost/params_m": 7.0},
                "infeasible": ""},
               {"params": {"model.reduction_ratio": 1}, "values": None, "costs": {"cost/params_m": 7.8},
                "infeasible": "cost/params_m 7.8 > max 7.2"}]
    limiter = make_searcher(spec, check_search(spec), 2, earlier)
    searcher = limiter.searcher
    assert searcher.metric == ["val/top1", "cost/train_images_per_s"] and searcher.mode == ["max", "max"]
    first, second = limiter.suggest("t1"), limiter.suggest("t2")
    assert set(first) == set(second) == {"model.reduction_ratio"}
    limiter.on_trial_complete("t1", {INFEASIBLE_KEY: 1.0, "cost/params_m": 9.0, "val/top1": math.nan,
                                     "cost/train_images_per_s": 12.0})
    limiter.on_trial_complete("t2", {"val/top1": 0.4, "cost/train_images_per_s": 20.0, "cost/params_m": 7.1})
    trials = searcher._ot_study.trials
    assert [(t.state.name, t.values) for t in trials] == [("COMPLETE", [0.5, 30.0]), ("PRUNED", None),
                                                        ("PRUNED", None), ("COMPLETE", [0.4, 20.0])]
    assert [t.user_attrs.get("cvlab.infeasible", False) for t in trials] == [False, True, True, False]
    assert [round(t.constraints["cost/params_m max"], 3) for t in trials] == [-0.2, 0.6, 1.8, -0.1]


def test_warm_start_reads_an_earlier_searchs_trials(tmp_path):
    from mlflow import MlflowClient

    from orchestrator.search import warm_start
    from orchestrator.search.space import check_search

    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp = client.create_experiment("earlier", artifact_location=(tmp_path / "a").as_uri())
    parent = client.create_run(exp, tags={"cvlab.kind": "search"}).info.run_id

    def trial(ratio, status, metrics, epochs=3, **tags):
        run = client.create_run(exp, tags={"mlflow.parentRunId": parent, **tags}).info.run_id
        client.log_param(run, "model.reduction_ratio", ratio)
        client.log_param(run, "optim.epochs", epochs)
        for k, v in metrics.items():
            client.log_metric(run, k, v, step=1)
        client.set_terminated(run, status)
        return run

    done = trial(16, "FINISHED", {"best/val_top1": 0.6, "val/top1": 0.5, "cost/train_images_per_s": 30.0,
                                  "cost/params_m": 7.0}, **{"cvlab.end_reason": "completed"})
    ruled_out = trial(1, "FINISHED", {"cost/params_m": 7.8, "cost/train_images_per_s": 10.0},
                      **{"cvlab.infeasible": "cost/params_m 7.8 > max 7.2", "cvlab.end_reason": "infeasible"})
    stopped = trial(4, "KILLED", {"val/top1": 0.3, "cost/train_images_per_s": 25.0},
                    **{"cvlab.end_reason": "early-stopped by ASHA after epoch 1 of 3"})
    trial(8, "FINISHED", {"val/top1": 0.9}, **{"cvlab.end_reason": "completed"})  # 8: not in the new space
    shorter = trial(16, "FINISHED", {"val/top1": 0.2}, epochs=1, **{"cvlab.end_reason": "completed"})
    trial(16, "FINISHED", {"val/top1": 0.8}, epochs=5, **{"cvlab.extended_from": done})  # --extend: left out
    spec = _cost_spec()
    for source in (parent, "earlier"):
        trials = warm_start.earlier_trials(client, source, check_search(spec), spec.search.all_objectives,
                                           budget=("optim.epochs", 3))
        by_run = {t["run_id"]: t for t in trials}
        assert set(by_run) == {done, ruled_out, stopped, shorter}
        assert not by_run[shorter]["complete"]  # another budget: told, trained again
        assert by_run[done]["values"] == [0.6, 30.0] and by_run[done]["params"] == {"model.reduction_ratio": 16}
        assert by_run[ruled_out]["values"] is None and by_run[ruled_out]["infeasible"]
        assert not by_run[stopped]["complete"]  # tells the searcher, is not reused
        reused = warm_start.reusable(trials)
        assert {v["run_id"] for v in reused.values()} == {done, ruled_out}
    with pytest.raises(CvlabError, match="neither a search's parent run id nor an MLflow experiment"):
        warm_start.earlier_trials(client, "no-such-search", check_search(spec), spec.search.all_objectives)


def test_a_configuration_drawn_again_reuses_the_search_s_own_measurement(tmp_path):
    from mlflow import MlflowClient

    from orchestrator.search.trial import TrialContext, measured_sibling

    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp = client.create_experiment("again", artifact_location=(tmp_path / "a").as_uri())
    parent = client.create_run(exp, tags={"cvlab.kind": "search"}).info.run_id
    ctx = TrialContext(spec={}, search_paths=["model.reduction_ratio"], tracking_uri="", experiment_id=exp,
                       parent_run_id=parent, train_storage="")

    def trial(ratio, status, reason):
        run = client.create_run(exp, tags={"mlflow.parentRunId": parent, "cvlab.end_reason": reason}).info.run_id
        client.log_param(run, "searched.model.reduction_ratio", ratio)
        client.log_metric(run, "val/top1", 0.5, step=2)
        client.set_terminated(run, status)
        return run

    trial("4", "KILLED", "early-stopped by ASHA after epoch 1 of 2")
    done = trial("4", "FINISHED", "completed")
    trial("8", "RUNNING", "")
    assert measured_sibling(client, ctx, {"searched.model.reduction_ratio": "4"}) == {
        "run_id": done, "metrics": {"val/top1": 0.5}, "infeasible": ""}
    assert measured_sibling(client, ctx, {"searched.model.reduction_ratio": "8"}) is None  # still training
    assert measured_sibling(client, ctx, {"searched.model.reduction_ratio": "16"}) is None


def test_bad_search_sections_stop_tune_check_with_exit_2(tmp_path, capsys):
    d = _spec_dict(tmp_path, objectives=[{"metric": "val/top1"}, {"metric": "cost/latency"}])
    assert main(["tune", str(_write(tmp_path, d)), "--check"]) == 2
    assert "search.objectives[1].metric 'cost/latency' is not logged" in capsys.readouterr().err
    d = _spec_dict(tmp_path, algorithm="optuna")  # the grid of _spec_dict
    assert main(["tune", str(_write(tmp_path, d))]) == 2
    err = capsys.readouterr().err
    assert "optuna cannot search a grid (model.reduction_ratio)" in err and "Traceback" not in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------- end to end
def _children(client, parent_id: str):
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def _steps(client, run_id: str, key: str = "val/top1") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the search's whole process group (driver, local Ray cluster, trials, workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def _group_members(pgid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,pgid="], capture_output=True, text=True, check=True).stdout
    return [int(p) for p, g in (ln.split() for ln in out.splitlines() if ln.strip()) if int(g) == pgid]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_search_killed_then_resumed(tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    # Rungs only at epoch 2 (of 3): a trial is never stopped after its first epoch, so once one trial has
    # finished, the next one stays RUNNING with epoch 1 logged for a whole epoch -- the moment to kill.
    d = _spec_dict(tmp_path, grace_period=2)
    d["data"]["per_class_generated"] = 16  # epochs long enough for the poll below to see that moment
    spec_path = _write(tmp_path, d)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600",
           "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "phase1.log", "w")  # noqa: SIM115 - closed after the subprocess ends
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "tune", str(spec_path), "--num-cpus", SEARCH_CPUS],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    # ---- phase 1: wait until one trial finished and another is mid-run (>= 1 epoch logged), then SIGKILL
    before: dict = {}
    try:
        deadline = time.time() + 600
        client = None
        while time.time() < deadline:
            time.sleep(0.5)
            assert proc.poll() is None, "the search ended before it could be interrupted:\n" + \
                (tmp_path / "phase1.log").read_text()[-3000:]
            # open the store only once the driver has created it (two migrations at once collide)
            if "searched path(s)" not in (tmp_path / "phase1.log").read_text():
                continue
            client = client or MlflowClient(uri)
            try:
                exp = client.get_experiment_by_name("tune-test")
                parents = exp and client.search_runs([exp.experiment_id], "tags.`cvlab.kind` = 'search'")
            except Exception:  # noqa: BLE001, S112 - a read racing the driver's write: poll again
                continue
            if not parents:
                continue
            kids = _children(client, parents[0].info.run_id)
            done = [r for r in kids if r.info.status == "FINISHED"]
            mid = [r for r in kids if r.info.status == "RUNNING" and _steps(client, r.info.run_id)]
            if done and mid:
                _kill_group(proc)
                before = {r.info.run_id: (r.info.status, r.info.end_time, _steps(client, r.info.run_id),
                                          r.data.tags["cvlab.trial_id"]) for r in kids}
                parent_id = parents[0].info.run_id
                break
        else:
            pytest.fail("no interruption point within 600 s:\n" + (tmp_path / "phase1.log").read_text()[-3000:])
    finally:
        if proc.poll() is None:
            _kill_group(proc)
        log.close()
    deadline = time.time() + 60  # the kernel reaps the killed group's processes in its own time
    while _group_members(proc.pid) and time.time() < deadline:
        time.sleep(0.5)
    assert _group_members(proc.pid) == []  # SIGKILL of the group left nothing behind
    assert client.get_run(parent_id).info.status == "RUNNING"  # killed: nobody ended it
    finished_before = {rid for rid, (st, *_rest) in before.items() if st == "FINISHED"}
    assert finished_before

    # ---- phase 2: resume in this process, on a Ray cluster the test owns (to inspect actors afterwards)
    import ray

    from orchestrator.config.loader import load_spec
    from orchestrator.search.tune import run_search

    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    monkeypatch.chdir(tmp_path)
    # with the dashboard: Train's PlacementGroupCleaner needs the state API to free stopped trials' groups
    ray.init(num_cpus=int(SEARCH_CPUS))
    try:
        summary = run_search(load_spec(spec_path), resume=True)
        from ray._private.state import actors  # the GCS actor table (the state API needs the dashboard)

        alive = [a["ActorClassName"] for a in actors(actor_state_name="ALIVE").values()]
        # Early-stopped trials' Train runs give their resources back (Train's PlacementGroupCleaner).
        deadline = time.time() + 60
        while time.time() < deadline:
            held = [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]
            if not held:
                break
            time.sleep(1)
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    assert "resuming search tune-test-search-" in out
    leftovers = [c for c in alive if c in ("TrainController", "RayTrainWorker", "ImplicitFunc")
                 or c.startswith("trial_main")]
    assert leftovers == []  # finished and early-stopped trials ended their Train runs and workers
    assert held == [], held  # and no trial's placement group stays reserved

    assert summary["parent_run_id"] == parent_id and not summary["interrupted"]
    assert sorted(summary["statuses"].values()) == ["TERMINATED"] * 3
    kids = _children(client, parent_id)
    trial_ids = [r.data.tags["cvlab.trial_id"] for r in kids]
    assert len(kids) == 3 and sorted(trial_ids) == sorted(summary["statuses"])  # one run per trial
    for r in kids:
        rid = r.info.run_id
        steps = _steps(client, rid)
        assert steps == sorted(set(steps)) and steps and steps[0] == 1  # each epoch logged once
        assert "model.reduction_ratio" in r.data.params and "model.params" in r.data.params
        searched = {k: v for k, v in r.data.params.items() if k.startswith("searched.")}
        assert searched == {"searched.model.reduction_ratio": r.data.params["model.reduction_ratio"]}
        reason = r.data.tags["cvlab.end_reason"]
        if r.info.status == "FINISHED":
            assert reason == "completed" and steps[-1] == 3 and r.data.metrics["epoch"] == 3
        else:
            assert r.info.status == "KILLED" and "early-stopped by ASHA" in reason and steps[-1] < 3, \
                (r.info.status, reason, steps)
        if rid in finished_before:  # not run again
            _, end_time, old_steps, _ = before[rid]
            assert r.info.end_time == end_time and steps == old_steps
    interrupted = [rid for rid, (st, *_r) in before.items() if st == "RUNNING"]
    assert interrupted and all(rid in {r.info.run_id for r in kids} for rid in interrupted)  # same runs reused

    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["cvlab.end_reason"] == "completed"
    assert parent.data.tags["cvlab.best_run_id"] in {r.info.run_id for r in kids}
    assert parent.data.params["best.model.reduction_ratio"] in {"4", "8", "16"}
    assert json.loads(parent.data.tags["cvlab.search_paths"]) == ["model.reduction_ratio"]
    top = {a.path for a in client.list_artifacts(parent_id)}
    assert {"best_config.json", "best_experiment.yaml", "summary", "search_spec.json"} <= top
    summary_files = {Path(a.path).name for a in client.list_artifacts(parent_id, "summary")}
    assert summary_files == {"search_summary.csv", "search_summary.md", "search_metric_vs_params.png",
                             "search_parallel_coordinates.png"}
    local = client.download_artifacts(parent_id, "summary/search_summary.csv", str(tmp_path))
    rows = Path(local).read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("rank,run,status,model.reduction_ratio,val/top1")
    best = json.loads(Path(client.download_artifacts(parent_id, "best_config.json", str(tmp_path))).read_text())
    assert best["spec"]["model"]["reduction_ratio"] == best["searched"]["model.reduction_ratio"]

    # ---- cvlab compare on the same experiment
    assert main(["compare", "tune-test", "--tracking-uri", uri, "--out", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out
    assert table.count("trial_") >= 3 and (tmp_path / "cmp" / "compare_parallel_coordinates.png").exists()


@pytest.fixture(scope="module")
def diverged_search(tmp_path_factory):
    """A 2-trial search through `cvlab tune`, one trial diverging (lr 1e30). The file names no tracking URI
    and a relative data root, as the shipped experiments do: the trials log into the search's default
    ./mlflow.db and read the data where `cvlab tune` runs. Shared by the diverging-trial test and the MLflow
    UI test."""
    tmp = tmp_path_factory.mktemp("diverged")
    d = _spec_dict(tmp, scheduler="fifo", space={"optim.lr": {"grid": [0.05, 1.0e30]}})
    d["optim"].update(epochs=2, warmup_epochs=0.0, label_smoothing=0.0)
    d["tracking"]["tracking_uri"] = None
    d["data"]["root"] = "data"
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.chdir(tmp)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        rc = main(["tune", str(_write(tmp, d)), "--num-cpus", SEARCH_CPUS])
    sys.stdout.write(out.getvalue())  # shown with the failing test's output
    return {"tmp": tmp, "rc": rc, "out": out.getvalue(), "uri": f"sqlite:///{tmp / 'mlflow.db'}"}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_diverging_trial_fails_and_the_search_goes_on(diverged_search):
    """A trial whose loss becomes NaN (lr 1e30) fails with the step named; the other trial still runs to
    the end, the parent run gets its summary, and `cvlab tune` exits 1 naming the failed trial."""
    from mlflow import MlflowClient

    assert diverged_search["rc"] == 1 and "1 trial(s) failed" in diverged_search["out"]

    client = MlflowClient(diverged_search["uri"])
    exp = client.get_experiment_by_name("tune-test").experiment_id
    (parent,) = client.search_runs([exp], "tags.`cvlab.kind` = 'search'")
    kids = {float(r.data.params["optim.lr"]): r for r in _children(client, parent.info.run_id)}
    assert sorted(kids) == [0.05, 1.0e30]
    good, bad = kids[0.05], kids[1.0e30]
    assert good.info.status == "FINISHED" and _steps(client, good.info.run_id) == [1, 2]
    assert bad.info.status == "FAILED"
    assert re.search(r"non-finite training loss .* at epoch 1, step \d+", bad.data.tags["cvlab.end_reason"])
    assert parent.info.status == "FINISHED" and parent.data.tags["cvlab.failed_trials"] == "1"
    assert parent.data.tags["cvlab.best_run_id"] == good.info.run_id
    assert {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "summary")} >= {
        "search_summary.csv", "search_summary.md"}


# ------------------------------------------------------------------------- accuracy against measured cost
PARAMS_BOUND = 7.2  # million parameters: CedNet-26 (3 classes) with reduction ratio 1 has 7.8, with 16 about 7.0


@pytest.fixture(scope="module")
def pareto_search(tmp_path_factory):
    """A 3-trial Optuna search through `cvlab tune`: accuracy against measured training throughput, with a
    parameter bound that reduction ratio 1 breaks (the seeded sampler's third draw is such a configuration).
    Shared by the Pareto, warm-start and extend tests, in this order (they add to the same store)."""
    tmp = tmp_path_factory.mktemp("pareto")
    d = _spec_dict(tmp, scheduler="fifo", algorithm="optuna", num_samples=3,
                   space={"model.reduction_ratio": {"choice": [1, 16]}, "model.kernel_size": {"choice": [3, 7]}},
                   objectives=[{"metric": "val/top1", "mode": "max"},
                               {"metric": "cost/train_images_per_s", "mode": "max"}],
                   constraints={"cost/params_m": {"max": PARAMS_BOUND}})
    del d["search"]["grace_period"], d["search"]["reduction_factor"]
    d["optim"]["epochs"] = 1
    spec_path = _write(tmp, d)
    out = io.StringIO()
    start = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.chdir(tmp)
        rc = main(["tune", str(spec_path), "--num-cpus", SEARCH_CPUS])
    sys.stdout.write(out.getvalue())
    return {"tmp": tmp, "rc": rc, "out": out.getvalue(), "uri": f"sqlite:///{tmp / 'mlflow.db'}", "spec": spec_path,
            "seconds": time.perf_counter() - start}


def _dominated(a: list[float], b: list[float]) -> bool:
    """`a` dominated by `b`, both objectives maximised (written out here, independently of cvlab's)."""
    return b[0] >= a[0] and b[1] >= a[1] and (b[0] > a[0] or b[1] > a[1])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_multi_objective_search_front_and_an_infeasible_trial_that_never_trained(pareto_search):
    """The front the parent run shows (pareto.csv, the cvlab.pareto tags, `cvlab compare --pareto`) is the one
    recomputed here from the trials' logged metrics; the configuration over the parameter bound has a nested
    run with its measured cost and the broken bound, no training step, no Train folder, and Optuna was told."""
    import pickle

    from mlflow import MlflowClient

    assert pareto_search["rc"] == 0, pareto_search["out"][-3000:]
    client = MlflowClient(pareto_search["uri"])
    exp = client.get_experiment_by_name("tune-test").experiment_id
    (parent,) = client.search_runs([exp], "tags.`cvlab.kind` = 'search'")
    kids = _children(client, parent.info.run_id)
    assert len(kids) == 3
    infeasible = [r for r in kids if "cvlab.infeasible" in r.data.tags]
    # (a configuration the sampler drew again reuses the first measurement: one point on the front, not two)
    trained = [r for r in kids if not {"cvlab.infeasible", "cvlab.reused_run"} & set(r.data.tags)]
    assert infeasible and trained
    for r in infeasible:
        assert r.data.params["model.reduction_ratio"] == "1"
        assert r.data.metrics["cost/params_m"] > PARAMS_BOUND
        assert r.data.tags["cvlab.infeasible"] == f"cost/params_m {r.data.metrics['cost/params_m']:.4g} > max 7.2"
        assert not any(k.startswith(("train/", "val/")) or k == "epoch" for k in r.data.metrics)  # never trained
        assert not (Path(parent.data.tags["cvlab.tune_path"]) / "train" / r.data.tags["cvlab.trial_id"]).exists()
        assert r.data.tags["cvlab.pareto"] == "false"
    for r in trained:
        assert r.data.metrics["cost/params_m"] <= PARAMS_BOUND and _steps(client, r.info.run_id) == [1]
        assert r.data.metrics["cost/train_images_per_s"] > 0 and r.data.metrics["cost/probe_s"] > 0

    # the front, recomputed from what each trial logged
    points = {r.info.run_id: [r.data.metrics["best/val_top1"], r.data.metrics["cost/train_images_per_s"]]
              for r in trained}
    front = {rid for rid, p in points.items() if not any(_dominated(p, q) for q in points.values())}
    assert {r.info.run_id for r in kids if r.data.tags["cvlab.pareto"] == "true"} == front
    local = Path(client.download_artifacts(parent.info.run_id, "pareto.csv", str(pareto_search["tmp"])))
    with local.open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["front", "run", "status", "model.reduction_ratio", "model.kernel_size", "val/top1",
                              "cost/train_images_per_s", "infeasible"]
    runs = {r.info.run_name: r.info.run_id for r in kids}
    assert {runs[row["run"]] for row in table if row["front"] == "yes"} == front
    assert table[-1]["front"] == "infeasible"  # front members first, infeasible trials last
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"pareto.csv", "pareto.md", "pareto.png"}

    # Optuna was told: the infeasible trial is PRUNED in its study, with a broken constraint
    tune_path = Path(parent.data.tags["cvlab.tune_path"])
    (state_file,) = tune_path.glob("searcher-state-*.pkl")
    study = pickle.loads(state_file.read_bytes())["_ot_study"]
    told = [t for t in study.trials if t.user_attrs.get("cvlab.infeasible")]
    assert len(told) == len(infeasible) and all(t.state.name == "PRUNED" for t in told)
    assert len(study.trials) == len(kids)
    assert all(t.constraints["cost/params_m max"] > 0 for t in told)
    assert sorted(t.state.name for t in study.trials if t not in told) == ["COMPLETE"] * (len(kids) - len(told))

    # cvlab compare --pareto prints the same front
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["compare", "tune-test", "--pareto", "--tracking-uri", pareto_search["uri"], "--out",
                     str(pareto_search["tmp"] / "cmp")]) == 0
    text = out.getvalue()
    assert f"over val/top1 (max), cost/train_images_per_s (max): {len(front)} of 3 run(s)" in text
    assert (pareto_search["tmp"] / "cmp" / "pareto.png").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_extend_continues_the_best_trial_from_its_checkpoint(pareto_search):
    """`cvlab tune --extend --epochs 2 --top 1` continues the best trial from its epoch-1 checkpoint as a new
    nested run linked to it: epoch numbering goes on at 2, and it trains one epoch's steps, not two."""
    from mlflow import MlflowClient

    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.chdir(pareto_search["tmp"])
        rc = main(["tune", str(pareto_search["spec"]), "--extend", "--epochs", "2", "--top", "1", "--num-cpus",
                   SEARCH_CPUS])
    assert rc == 0, out.getvalue()[-3000:]
    client = MlflowClient(pareto_search["uri"])
    exp = client.get_experiment_by_name("tune-test").experiment_id
    (parent,) = client.search_runs([exp], "tags.`cvlab.kind` = 'search'")
    kids = _children(client, parent.info.run_id)
    (extension,) = [r for r in kids if "cvlab.extended_from" in r.data.tags]
    original = client.get_run(extension.data.tags["cvlab.extended_from"])
    trained = [r for r in kids if "cvlab.trial_id" in r.data.tags and "cvlab.infeasible" not in r.data.tags]
    assert original.data.metrics["best/val_top1"] == max(r.data.metrics["best/val_top1"] for r in trained)
    assert extension.info.status == "FINISHED"
    assert {k: v for k, v in extension.data.params.items() if k.startswith("searched.")} == {
        k: v for k, v in original.data.params.items() if k.startswith("searched.")}
    assert _steps(client, extension.info.run_id) == [2]  # the epoch count goes on
    assert extension.data.metrics["train/resumed_from_epoch"] == 1
    per_epoch = original.data.metrics["train/steps_this_attempt"]
    assert extension.data.metrics["train/steps_this_attempt"] == per_epoch  # one epoch, not two from scratch
    assert extension.data.metrics["cost/params_m"] == original.data.metrics["cost/params_m"]  # carried over
    assert "extended 1 trial(s)" in out.getvalue()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_warm_start_reuses_configurations_already_measured(pareto_search):
    """A grid search over the same values, warm-started from the Optuna search: every configuration that search
    measured (trained, or ruled out by its cost) is reused (nested run tagged cvlab.reused_run with the earlier
    results, no Train folder); only the others are measured."""
    from mlflow import MlflowClient

    client = MlflowClient(pareto_search["uri"])
    exp = client.get_experiment_by_name("tune-test").experiment_id
    (earlier_parent,) = client.search_runs([exp], "tags.`cvlab.kind` = 'search'")
    earlier: dict[tuple, set] = {}  # configuration -> the runs that measured it
    for r in _children(client, earlier_parent.info.run_id):
        if "cvlab.extended_from" not in r.data.tags:
            config = (r.data.params["model.reduction_ratio"], r.data.params["model.kernel_size"])
            earlier.setdefault(config, set()).add(r.info.run_id)
    d = yaml.safe_load(pareto_search["spec"].read_text())
    d["search"].update(algorithm="random", num_samples=1, warm_start=earlier_parent.info.run_id,
                       space={"model.reduction_ratio": {"grid": [1, 16]}, "model.kernel_size": {"grid": [3, 7]}})
    d["run"]["name"] = "warm"
    spec_path = pareto_search["tmp"] / "warm.yaml"
    spec_path.write_text(yaml.safe_dump(d, sort_keys=False))
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.chdir(pareto_search["tmp"])
        rc = main(["tune", str(spec_path), "--num-cpus", SEARCH_CPUS])
    assert rc == 0, out.getvalue()[-3000:]
    (parent,) = client.search_runs([exp], "tags.`cvlab.search_name` = 'warm'")
    kids = _children(client, parent.info.run_id)
    assert len(kids) == 4
    train = Path(parent.data.tags["cvlab.tune_path"]) / "train"
    reused = 0
    for r in kids:
        config = (r.data.params["model.reduction_ratio"], r.data.params["model.kernel_size"])
        if config in earlier:
            reused += 1
            assert r.data.tags["cvlab.reused_run"] in earlier[config]
            assert r.data.tags["cvlab.end_reason"].startswith("reused")
            assert not (train / r.data.tags["cvlab.trial_id"]).exists()  # not trained again
            source = client.get_run(r.data.tags["cvlab.reused_run"])
            for key in ("cost/params_m", "cost/train_images_per_s", "best/val_top1"):
                assert r.data.metrics.get(key) == source.data.metrics.get(key)
        else:
            assert "cvlab.reused_run" not in r.data.tags and "cost/probe_s" in r.data.metrics  # measured here
    assert reused == len(earlier) >= 2
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"pareto.csv", "pareto.png"}


# ------------------------------------------------------------------------- the MLflow UI, in a browser
CHROMIUM = "/usr/bin/chromium"  # Debian's package: Playwright cannot download a browser of its own here
UI_TIMEOUT_MS = 60_000  # the UI's first load on a busy 2-core machine


@contextlib.contextmanager
def _chromium():
    """Headless Chromium driven by Playwright; skips the test when either is missing."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium): the MLflow UI is not "
                    "tested in a browser")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (.[dev])")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        try:
            yield browser
        finally:
            browser.close()


def _open(browser, link: str):
    """The page a user gets by opening `link` in a fresh browser profile (MLflow keeps its GenAI / model
    training toggle per browser: a fresh profile has the default, GenAI)."""
    page = browser.new_context(viewport={"width": 1920, "height": 1080}).new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    page.goto(link)
    return page


def _see(locator, what: str, text: str | None = None):
    from playwright.sync_api import expect

    if text is None:
        expect(locator, what).to_be_visible(timeout=UI_TIMEOUT_MS)
    else:
        expect(locator, what).to_contain_text(text, timeout=UI_TIMEOUT_MS)


def _row(page, run):
    """The Runs table's row of `run` (ag-grid keys its rows by run id)."""
    return page.locator(f'.ag-row[row-id="{run.info.run_id}"]')


def _cell(page, run, column: str):
    return _row(page, run).locator(f'[role="gridcell"][col-id="{column}"]')


def _check_run_page(page, run, dataset_label: str) -> None:
    """A run's page: its name, its dataset input, and a chart of the metric it logged each epoch."""
    _see(page.get_by_test_id("runs-header"), "the run page", run.info.run_name)
    _see(page.get_by_text(dataset_label), "the run's dataset")
    page.get_by_role("tab", name="Model metrics").click()
    page.get_by_placeholder("Search metric charts").fill("val/top1")
    _see(page.get_by_text(f"{run.info.run_name} (val/top1)"), "the val/top1 chart's legend")


def _check_search_in_runs_table(page, parent, trials, dataset_label: str) -> None:
    """The Runs table: the parent run; opened, its trials with their dataset and their searched value."""
    _see(_row(page, parent).get_by_role("link", name=parent.info.run_name), "the search's parent run")
    assert _row(page, trials[0]).count() == 0  # trials are nested: hidden until their parent is opened
    _row(page, parent).locator("button[data-component-id*='runnamecellrenderer']").first.click()
    for run in trials:
        _see(_row(page, run).get_by_role("link", name=run.info.run_name), "a trial under the parent")
        _see(_cell(page, run, "attributes.`Dataset`"), "the trial's Dataset column", dataset_label)
    page.get_by_role("button", name="Columns").click()
    page.get_by_placeholder("Search columns").fill("searched.")
    page.get_by_test_id("column-selector-tree").get_by_text("searched.optim.lr").click()
    for run in trials:
        _see(_cell(page, run, "params.`searched.optim.lr`"), "the trial's searched value",
             run.data.params["searched.optim.lr"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_mlflow_ui_shows_runs_and_the_search_as_cvlab_links_them(diverged_search, tmp_path, request):
    """The links cvlab prints (`orchestrator.tracking.server.ui_link`), each opened in a fresh headless
    Chromium against a real `mlflow server` holding the diverged search: the model-training view (not the
    GenAI overview), the Runs table with the trials under their parent, their Dataset column and searched
    values, its Chart view of best/val_top1, and the finished trial's val/top1 chart."""
    from mlflow import MlflowClient

    from orchestrator.tracking.server import ui_link

    with _chromium() as browser:
        shutil.copyfile(diverged_search["tmp"] / "mlflow.db", tmp_path / "server.db")
        server = request.getfixturevalue("mlflow_server")  # serves tmp_path/server.db: the search's store
        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name("tune-test").experiment_id
        (parent,) = client.search_runs([exp], "tags.`cvlab.kind` = 'search'")
        kids = {float(r.data.params["optim.lr"]): r for r in _children(client, parent.info.run_id)}
        finished, failed = kids[0.05], kids[1.0e30]
        (dataset,) = finished.inputs.dataset_inputs
        dataset_label = f"{dataset.dataset.name} ({dataset.dataset.digest})"

        # `cvlab run`'s link to a run: the run's page
        page = _open(browser, ui_link(server.uri, exp, finished.info.run_id))
        _check_run_page(page, finished, dataset_label)

        # `cvlab tune`'s link to the search: its parent run's page, whose Runs link leads to the Runs table
        # (a link of the model-training view; the GenAI view has Evaluations instead)
        page = _open(browser, ui_link(server.uri, exp, parent.info.run_id))
        _see(page.get_by_test_id("runs-header"), "the search's parent run page", parent.info.run_name)
        runs = page.get_by_role("link", name="Runs", exact=True).first
        _see(runs, "the model-training view's link to the Runs table")
        runs.click()
        _check_search_in_runs_table(page, parent, [finished, failed], dataset_label)
        # its Chart view, the trials still open: the best value each run logged, side by side
        page.locator('label:has(input[value="CHART"])').click()
        page.get_by_placeholder("Search metric charts").fill("best/val_top1")
        chart = page.get_by_test_id("experiment-view-compare-runs-card").filter(has_text="best/val_top1")
        _see(chart, "the Chart view's best/val_top1 chart", finished.info.run_name)

        # `cvlab compare`'s link to the experiment: the Runs table itself
        page = _open(browser, ui_link(server.uri, exp))
        _see(_row(page, parent).get_by_role("link", name=parent.info.run_name), "the experiment's Runs table")
