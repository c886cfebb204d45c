"""The `search:` section: parsing, every validation error, the Tune space (no Ray run needed)."""
from __future__ import annotations

import pytest

from orchestrator.errors import CvlabError
from orchestrator.search.space import check_search, parse_dimension, parse_space
from orchestrator.config.loader import spec_from_dict


def _spec(space, model="cednet26", **search):
    return spec_from_dict({"model": {"name": model}, "search": {"space": space, **search}})


def test_parse_every_kind_and_tune_space():
    space = parse_space({
        "model.reduction_ratio": {"grid": [1, 2, 4, 8, 16]},
        "model.group_channels": {"choice": [8, 16, 32]},
        "optim.lr": {"loguniform": [1.0e-3, 1.0e-1]},
        "optim.weight_decay": {"uniform": [0, 1.0e-3]},
        "data.batch_size": {"randint": [16, 64]},
    })
    assert space.paths == ["model.reduction_ratio", "model.group_channels", "optim.lr", "optim.weight_decay",
                           "data.batch_size"]
    assert space.grid_size() == 5  # only grids are crossed; choice / ranges are drawn per sample
    assert space["data.batch_size"].check_values() == list(range(16, 65))  # randint includes both ends
    assert space["optim.lr"].check_values() == [1.0e-3, 1.0e-1]
    tune_space = space.to_tune()
    assert tune_space["model.reduction_ratio"] == {"grid_search": [1, 2, 4, 8, 16]}
    from ray.tune.search.sample import Categorical, Float, Integer

    assert isinstance(tune_space["model.group_channels"], Categorical)
    assert isinstance(tune_space["optim.lr"], Float)
    assert tune_space["optim.lr"].lower == pytest.approx(1e-3)
    integer = tune_space["data.batch_size"]
    assert isinstance(integer, Integer) and (integer.lower, integer.upper) == (16, 65)  # Tune's upper is open


@pytest.mark.parametrize("dist, message", [
    ({"normal": [0, 1]}, "unknown distribution 'normal'"),
    ({"grid": []}, "grid list is empty"),
    ({"choice": []}, "choice list is empty"),
    ({"grid": 3}, "grid takes a non-empty list"),
    ({"grid": [1, 2, 1]}, "lists 1 more than once"),
    ({"uniform": [1.0]}, "uniform takes [low, high]"),
    ({"uniform": [1, 2, 3]}, "uniform takes [low, high]"),
    ({"uniform": [0.5, 0.5]}, "needs low < high; got low=0.5, high=0.5"),
    ({"uniform": [2, 1]}, "needs low < high"),
    ({"randint": [5, 1]}, "needs low < high"),
    ({"randint": [1.5, 4]}, "randint bounds must be integers"),
    ({"loguniform": [0, 1]}, "loguniform bounds must be positive"),
    ({"loguniform": [-1e-3, 1e-1]}, "loguniform bounds must be positive"),
    ({"uniform": ["a", 1]}, "bounds must be finite numbers"),
    ({"grid": [1], "choice": [2]}, "exactly one kind"),
    ([1, 2], "exactly one kind"),
])
def test_malformed_distributions(dist, message):
    with pytest.raises(CvlabError) as err:
        parse_dimension("optim.lr", dist)
    assert message in str(err.value)
    assert "search.space['optim.lr']" in str(err.value)


def test_empty_space_and_bad_key():
    with pytest.raises(CvlabError, match="search.space is empty"):
        parse_space({})
    with pytest.raises(CvlabError, match="not a dotted spec path"):
        parse_space({"lr": {"grid": [1]}})


def test_unknown_path_names_the_nearest_one():
    with pytest.raises(CvlabError) as err:
        check_search(_spec({"model.reduction_ratoi": {"grid": [1, 2]}, "optim.learning_rate": {"grid": [0.1]}}))
    text = str(err.value)
    assert "'model.reduction_ratoi' (did you mean 'model.reduction_ratio'?)" in text
    assert "'optim.learning_rate'" in text
    assert "search.space" not in text.split("exist in the spec:")[1]  # never suggests the search itself


def test_cannot_search_the_search_itself():
    with pytest.raises(CvlabError, match="cannot search 'search.num_samples'"):
        check_search(_spec({"search.num_samples": {"grid": [1, 2]}}))


def test_every_bad_model_combination_is_listed_before_start():
    # group_channels=48 fits no layer; kernel 4 is even; reduction 16 is fine: 2 x 3 grid -> 4 bad of 6.
    spec = _spec({"model.group_channels": {"grid": [16, 48]}, "model.kernel_size": {"choice": [3, 4, 7]}})
    with pytest.raises(CvlabError) as err:
        check_search(spec)
    text = str(err.value)
    assert "the search cannot start: 4 of 6 combination(s)" in text
    assert "model.group_channels=48, model.kernel_size=3: group_channels=48 does not fit layer" in text
    assert "model.group_channels=16, model.kernel_size=4: kernel_size must be odd" in text
    assert "model.group_channels=16, model.kernel_size=3" not in text  # the valid ones are not listed


def test_combinations_respect_the_base_model_overrides():
    # reduction_ratio 2 is valid on its own; the spec's own group_channels stays in every combination.
    ok = spec_from_dict({"model": {"name": "rednet26", "group_channels": 16},
                         "search": {"space": {"model.reduction_ratio": {"grid": [1, 2, 4]}}}})
    assert check_search(ok).paths == ["model.reduction_ratio"]
    bad = spec_from_dict({"model": {"name": "rednet26", "group_channels": 16},
                          "search": {"space": {"model.kernel_size": {"randint": [2, 5]}}}})
    with pytest.raises(CvlabError) as err:
        check_search(bad)
    text = str(err.value)
    assert "2 of 4 combination(s)" in text  # every integer of the range is checked: 2 and 4 are even
    assert "model.kernel_size=2:" in text and "model.kernel_size=4:" in text


def test_non_model_values_are_checked_against_the_schema():
    with pytest.raises(CvlabError) as err:
        check_search(_spec({"optim.name": {"choice": ["sgd", "adam"]}}))
    assert "optim.name='adam'" in str(err.value)


@pytest.mark.parametrize("search, message", [
    ({"metric": "val/acc"}, "search.metric 'val/acc' is not reported"),
    ({"scheduler": "asha", "grace_period": 0}, "search.grace_period: got 0 (int): must be greater than or equal to 1"),
    ({"scheduler": "asha", "max_t": 3, "grace_period": 5}, "grace_period must be in 1..max_t (3 epochs)"),
    ({"scheduler": "asha", "reduction_factor": 1.0}, "search.reduction_factor: got 1.0 (float): must be greater than 1"),
    ({"num_samples": 0}, "search.num_samples: got 0 (int): must be greater than or equal to 1"),
    ({"max_concurrent_trials": 0}, "search.max_concurrent_trials: got 0 (int): must be greater than or equal to 1"),
])
def test_search_settings(search, message):
    with pytest.raises(CvlabError) as err:
        check_search(_spec({"optim.lr": {"grid": [0.1]}}, **search))
    assert message in str(err.value)


def test_no_search_section():
    with pytest.raises(CvlabError, match="no `search:` section"):
        check_search(spec_from_dict({"model": {"name": "cednet26"}}))


def test_shipped_search_experiments_are_valid():
    from pathlib import Path

    from orchestrator.config.loader import load_spec

    root = Path(__file__).resolve().parents[1] / "experiments"
    small = check_search(load_spec(root / "tune_reduction_ratio.yaml"))
    assert small["model.reduction_ratio"].values == (1, 2, 4, 8, 16)
    big = check_search(load_spec(root / "tune_cednet50_imagenet.yaml"))
    assert big.paths == ["model.reduction_ratio", "model.group_channels", "model.kernel_size"]
    assert big.grid_size() == 45
    pareto = load_spec(root / "tune_pareto.yaml")
    assert len(check_search(pareto).paths) == 3 and pareto.search.algorithm == "optuna"
    assert [o.metric for o in pareto.search.all_objectives] == ["val/top1", "cost/train_images_per_s"]


# ------------------------------------------------------------------ objectives, constraints, algorithm
@pytest.mark.parametrize("search, message", [
    ({"objectives": [{"metric": "val/top1"}, {"metric": "cost/speed"}]},
     "search.objectives[1].metric 'cost/speed' is not logged by the classification workload"),
    ({"objectives": [{"metric": "val/top1"}, {"metric": "val/top1", "mode": "min"}]},
     "search.objectives name val/top1 more than once"),
    ({"metric": "val/loss", "objectives": [{"metric": "val/top1"}, {"metric": "cost/gflops", "mode": "min"}]},
     "search.metric/mode (val/loss, max) must be the first objective (val/top1, max)"),
    ({"objectives": [{"metric": "val/top1", "mode": "sideways"}]}, "search.objectives.0.mode"),
    ({"constraints": {"val/top1": {"max": 1}}},
     "search.constraints: the cost 'val/top1' is not logged by the classification workload"),
    ({"constraints": {"cost/params_mb": {"max": 1}}}, "(did you mean 'cost/params_m'?)"),
    ({"constraints": {"cost/params_m": {}}}, "a constraint needs min, max or both"),
    ({"constraints": {"cost/params_m": {"min": 5, "max": 1}}}, "min (5.0) is greater than max (1.0)"),
    ({"algorithm": "bayes"}, "search.algorithm"),
    ({"algorithm": "optuna"}, "search.algorithm: optuna cannot search a grid (optim.lr)"),
    ({"sampler": "cmaes", "algorithm": "optuna"}, "search.sampler"),
])
def test_bad_objectives_constraints_and_algorithms(search, message):
    with pytest.raises(CvlabError) as err:
        check_search(_spec({"optim.lr": {"grid": [0.1]}}, **search))
    assert message in str(err.value)


def test_objectives_set_the_metric_and_cost_objectives_are_valid():
    spec = _spec({"model.reduction_ratio": {"choice": [2, 4]}}, algorithm="optuna", objectives=[
        {"metric": "val/top1", "mode": "max"}, {"metric": "cost/train_images_per_s", "mode": "max"}],
        constraints={"cost/params_m": {"max": 10}})
    check_search(spec)
    assert (spec.search.metric, spec.search.mode) == ("val/top1", "max")
    assert [o.metric for o in spec.search.all_objectives] == ["val/top1", "cost/train_images_per_s"]
    single = _spec({"optim.lr": {"grid": [0.1]}}, metric="val/loss", mode="min").search.all_objectives
    assert [(o.metric, o.mode) for o in single] == [("val/loss", "min")]


def test_constraints_are_judged_on_every_bound():
    from orchestrator.search.constraints import constraint_values, violations

    bounds = {"cost/params_m": {"max": 10.0}, "cost/train_images_per_s": {"min": 50.0, "max": None}}
    assert violations({"cost/params_m": 9.5, "cost/train_images_per_s": 60.0}, bounds) == []
    assert violations({"cost/params_m": 12.25, "cost/train_images_per_s": 40.0}, bounds) == [
        "cost/params_m 12.25 > max 10", "cost/train_images_per_s 40 < min 50"]
    assert violations({}, {"cost/params_m": {"max": 1.0}}) == ["cost/params_m not measured (bound max 1)"]
    # Optuna's convention, bounds sorted by metric: <= 0 holds, > 0 by how much it is broken
    assert constraint_values({"cost/params_m": 12.0, "cost/train_images_per_s": 60.0}, bounds) == {
        "cost/params_m max": 2.0, "cost/train_images_per_s min": -10.0}
