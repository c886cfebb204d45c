"""`cvlab compare` and the search report (table + plots) on a real MLflow store, without Ray."""
from __future__ import annotations

import csv
import json

import pytest

from orchestrator.cli import main
from orchestrator.search.report import rank_rows, write_report


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite MLflow store (created once: migrations are slow) with a search (parent + 4 trial runs)
    in experiment `cmp-exp` and two plain runs in experiment `plain`."""
    from mlflow import MlflowClient

    tmp_path = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("cmp-exp", artifact_location=(tmp_path / "art").as_uri())
    paths = ["model.reduction_ratio", "optim.lr"]
    parent = client.create_run(exp, run_name="search", tags={"cvlab.kind": "search",
                                                             "cvlab.search_paths": json.dumps(paths)})
    pid = parent.info.run_id
    trials = [(1, 0.1, 0.61, "FINISHED", None), (4, 0.01, 0.72, "FINISHED", None),
              (16, 0.05, 0.40, "KILLED", "early-stopped by ASHA after epoch 1 of 3"),
              (8, 0.2, None, "FAILED", "failed: boom")]
    ids = {}
    for rr, lr, top1, status, reason in trials:
        run = client.create_run(exp, run_name=f"trial rr={rr}", tags={
            "mlflow.parentRunId": pid, "cvlab.kind": "trial", "cvlab.search_paths": json.dumps(paths),
            "cvlab.trial_id": f"t{rr}", **({"cvlab.end_reason": reason} if reason else {})})
        rid = run.info.run_id
        ids[rr] = rid
        for k, v in {"model.reduction_ratio": rr, "optim.lr": lr, "model.params": 7_000_000 + rr,
                     "model.gflops": 0.03 + rr / 1000, "data.root": "/x"}.items():
            client.log_param(rid, k, v)
        if top1 is not None:
            for epoch in (1, 2):
                client.log_metric(rid, "val/top1", top1 * epoch / 2, step=epoch)
            client.log_metric(rid, "images_per_s", 100.0 + rr, step=2)
            client.log_metric(rid, "epoch", 2, step=2)
        client.set_terminated(rid, status)
    client.set_terminated(pid, "FINISHED")
    plain = client.create_experiment("plain", artifact_location=(tmp_path / "a").as_uri())
    for lr, acc in ((0.1, 0.5), (0.3, 0.7)):
        rid = client.create_run(plain, run_name=f"lr{lr}").info.run_id
        client.log_param(rid, "optim.lr", lr)
        client.log_param(rid, "model.name", "cednet26")  # same everywhere: not a column
        client.log_metric(rid, "val/top1", acc)
        client.set_terminated(rid)
    return {"uri": uri, "client": client, "parent": pid, "ids": ids, "tmp": tmp_path}


def test_compare_cli_ranks_runs_and_writes_table_and_plots(store, capsys):
    out = store["tmp"] / "out"
    rc = main(["compare", "cmp-exp", "--tracking-uri", store["uri"], "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    header = next(ln for ln in lines if ln.startswith("rank"))
    for col in ("model.reduction_ratio", "optim.lr", "val/top1", "params_m", "gflops", "images_per_s", "status"):
        assert col in header
    body = lines[lines.index(header) + 2:lines.index(header) + 6]
    # best first: rr=4 (0.72), rr=1 (0.61), rr=16 (0.40, stopped early), then the failed run without metric
    assert [ln.split()[1:3] for ln in body] == [["trial", "rr=4"], ["trial", "rr=1"], ["trial", "rr=16"],
                                                 ["trial", "rr=8"]]
    assert "KILLED (early-stopped by ASHA" in body[2]
    assert "FAILED" in body[3]
    assert "search" not in [ln.split()[1] for ln in body]  # the parent run is not a row
    with open(out / "compare_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model.reduction_ratio"] for r in rows] == ["4", "1", "16", "8"]
    assert float(rows[0]["val/top1"]) == pytest.approx(0.72)
    assert float(rows[0]["params_m"]) == pytest.approx(7.000004)
    for png in ("compare_metric_vs_params.png", "compare_parallel_coordinates.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert (out / "compare_summary.md").read_text().count("\n| ") == 1 + 4  # header + 4 runs


def test_compare_min_mode_and_parent_filter(store, capsys):
    rc = main(["compare", "cmp-exp", "--tracking-uri", store["uri"], "--out", str(store["tmp"] / "o2"),
               "--metric", "val/top1", "--mode", "min", "--parent", store["parent"]])
    assert rc == 0
    words = [ln.split() for ln in capsys.readouterr().out.splitlines()]
    body = [w for w in words if len(w) > 2 and w[0].isdigit() and w[1] == "trial"]
    assert [b[2] for b in body] == ["rr=16", "rr=1", "rr=4", "rr=8"]  # lowest first in min mode


def test_compare_errors(store, capsys):
    assert main(["compare", "cmp-exq", "--tracking-uri", store["uri"]]) == 2
    err = capsys.readouterr().err
    assert "no MLflow experiment named 'cmp-exq' (did you mean 'cmp-exp'?)" in err
    assert main(["compare", "cmp-exp", "--tracking-uri", store["uri"], "--metric", "val/nope",
                 "--out", str(store["tmp"] / "o3")]) == 2
    assert "no run of 'cmp-exp' has metric 'val/nope'" in capsys.readouterr().err


def test_report_without_search_tags_uses_varying_params(store, tmp_path, capsys):
    assert main(["compare", "plain", "--tracking-uri", store["uri"], "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    header = next(ln for ln in out.splitlines() if ln.startswith("rank"))
    assert "optim.lr" in header and "model.name" not in header
    assert "best: lr0.3" in out


def test_rank_rows_and_report_handle_categorical_and_missing(tmp_path):
    rows = [
        {"run": "a", "status": "FINISHED", "params": {"model.name": "cednet26", "optim.lr": 0.1},
         "metrics": {"val/loss": 0.9}},
        {"run": "b", "status": "FINISHED", "params": {"model.name": "rednet26", "optim.lr": 0.001},
         "metrics": {"val/loss": 0.5}},
        {"run": "c", "status": "FAILED", "params": {"model.name": "rednet26"}, "metrics": {}},
    ]
    assert [r["run"] for r in rank_rows(rows, "val/loss", "min")] == ["b", "a", "c"]
    assert [r["run"] for r in rank_rows(rows, "val/loss", "max")] == ["a", "b", "c"]
    written = write_report(rows, ["model.name", "optim.lr"], "val/loss", tmp_path, mode="min")
    assert set(written) == {"csv", "md", "metric_vs_params", "parallel_coordinates"}
    assert written["md"].read_text().splitlines()[4].startswith("| 1 | b |")


def test_metric_vs_params_marks_stopped_runs_and_labels_discrete_values():
    """Early-stopped runs get their own marker and the epoch they reached; the best-per-value line joins
    finished runs only; a discrete searched value is labelled 1, 2, 4, 8, 16 (not 10^0, 10^1)."""
    from orchestrator.search.report import metric_vs_params_figure

    rows = [{"run": f"r{r}", "complete": r in (2, 4, 16), "params": {"model.reduction_ratio": r},
             "metrics": {"val/top1": top1, "epoch": 6 if r in (2, 4, 16) else 2}}
            for r, top1 in ((1, 0.3), (2, 0.85), (4, 0.8), (8, 0.35), (16, 0.77))]
    fig = metric_vs_params_figure(rows, ["model.reduction_ratio"], "val/top1")
    ax = fig.axes[0]
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "8", "16"]
    markers = {c.get_label(): c.get_offsets().data[:, 0].tolist() for c in ax.collections}
    assert markers["finished"] == [2, 4, 16] and sorted(markers["stopped early / failed"]) == [1, 8]
    assert sorted(t.get_text() for t in ax.texts) == ["ep 2", "ep 2"]
    (line,) = [ln for ln in ax.get_lines() if ln.get_label().startswith("best")]
    assert line.get_xdata().tolist() == [2, 4, 16]  # no line through the runs stopped at epoch 2
