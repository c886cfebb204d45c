"""The Pareto front (`orchestrator.search.pareto`): dominance with mixed modes, ties, identical points,
infeasible trials, and the files a search's parent run gets."""
from __future__ import annotations

import csv

from orchestrator.search.pareto import Objective, dominates, front_flags, mark_front, write_pareto

ACC_SPEED = [Objective("val/top1", "max"), Objective("cost/train_images_per_s", "max")]
ACC_MEMORY = [Objective("val/top1", "max"), Objective("cost/peak_memory_mb", "min")]


def _row(run, top1, cost, key="cost/peak_memory_mb", infeasible="", **params):
    metrics = {k: v for k, v in (("val/top1", top1), (key, cost)) if v is not None}
    return {"run": run, "run_id": run, "status": "FINISHED", "params": params, "metrics": metrics,
            "infeasible": infeasible}


def test_dominance_respects_each_objectives_mode():
    assert dominates([0.9, 100.0], [0.8, 200.0], ACC_MEMORY)  # more accurate and less memory
    assert not dominates([0.9, 300.0], [0.8, 200.0], ACC_MEMORY)  # a trade-off: neither dominates
    assert not dominates([0.8, 200.0], [0.9, 300.0], ACC_MEMORY)
    assert dominates([0.9, 300.0], [0.8, 200.0], ACC_SPEED)  # the same numbers, speed maximised
    assert dominates([0.9, 200.0], [0.8, 200.0], ACC_MEMORY)  # tied on one, better on the other
    assert not dominates([0.9, 200.0], [0.9, 200.0], ACC_MEMORY)  # identical: never strictly better


def test_front_with_ties_identical_points_and_mixed_modes():
    points = [
        [0.90, 400.0],  # 0: most accurate
        [0.90, 400.0],  # 1: identical to 0: both on the front
        [0.85, 200.0],  # 2: trade-off
        [0.85, 250.0],  # 3: tied on accuracy with 2, more memory: dominated
        [0.70, 200.0],  # 4: tied on memory with 2, less accurate: dominated
        [0.60, 100.0],  # 5: least memory
        [0.95, float("nan")],  # 6: no value: takes no part
        None,  # 7: infeasible
    ]
    assert front_flags(points, ACC_MEMORY) == [True, True, True, False, False, True, False, False]
    # maximising the second objective instead turns the front around
    assert front_flags(points, ACC_SPEED) == [True, True, False, False, False, False, False, False]


def test_an_infeasible_trial_never_counts_against_the_front():
    # the infeasible trial's numbers would dominate everything, were it compared
    rows = [_row("a", 0.8, 300.0), _row("b", 0.7, 100.0), _row("x", 0.99, 1.0, infeasible="cost/params_m > 1"),
            _row("c", None, 50.0)]
    marked = mark_front(rows, ACC_MEMORY)
    assert [(r["run"], r["front"]) for r in marked] == [("a", "yes"), ("b", "yes"), ("c", "no value"),
                                                         ("x", "infeasible")]


def test_one_objective_front_is_the_best_trials():
    rows = [_row("a", 0.5, None), _row("b", 0.7, None), _row("c", 0.7, None)]
    marked = mark_front(rows, ACC_SPEED[:1])
    assert [(r["run"], r["front"]) for r in marked] == [("b", "yes"), ("c", "yes"), ("a", "no")]


def test_pareto_files_list_the_front_first(tmp_path):
    rows = [_row("dominated", 0.6, 300.0, **{"model.reduction_ratio": 4}),
            _row("accurate", 0.9, 400.0, **{"model.reduction_ratio": 1}),
            _row("lean", 0.7, 100.0, **{"model.reduction_ratio": 16}),
            _row("too-big", None, 900.0, infeasible="cost/peak_memory_mb 900 > max 500",
                 **{"model.reduction_ratio": 2})]
    files = write_pareto(rows, ["model.reduction_ratio"], ACC_MEMORY, tmp_path)
    assert set(files) == {"pareto_csv", "pareto_md", "pareto_png"}
    with files["pareto_csv"].open() as f:
        table = list(csv.DictReader(f))
    assert [(r["front"], r["run"], r["model.reduction_ratio"]) for r in table] == [
        ("yes", "accurate", "1"), ("yes", "lean", "16"), ("no", "dominated", "4"), ("infeasible", "too-big", "2")]
    assert table[3]["infeasible"] == "cost/peak_memory_mb 900 > max 500" and table[3]["val/top1"] == ""
    md = files["pareto_md"].read_text()
    assert md.startswith("Pareto front over `val/top1` (max), `cost/peak_memory_mb` (min): 2 of 4 trial(s)")
    assert files["pareto_png"].stat().st_size > 10_000



def test_stopped_and_duplicate_trials_take_no_part():
    # stopped early by ASHA: its accuracy is partial; a configuration drawn again reuses "a": one point, not two
    rows = [_row("a", 0.8, 300.0), _row("b", 0.7, 100.0), {**_row("early", 0.5, 50.0), "complete": False},
            {**_row("again", 0.8, 300.0), "reused": "a"}, {**_row("warm", 0.75, 200.0), "reused": "elsewhere"}]
    marked = mark_front(rows, ACC_MEMORY)
    assert [(r["run"], r["front"]) for r in marked] == [("a", "yes"), ("warm", "yes"), ("b", "yes"),
                                                         ("early", "stopped"), ("again", "duplicate")]
