"""The search algorithm of `cvlab tune` (`search.algorithm`):

- `random`: Tune's own grid and random sampling (`BasicVariantGenerator`), seeded with `experiment.seed`;
- `optuna`: Ray Tune's `OptunaSearch` over the same space, with every objective of `search.objectives` (a list of
  metrics and modes when there are several: Optuna's multi-objective optimisation). The sampler is Optuna's TPE
  (multi-objective TPE with several objectives) or NSGA-II (`search.sampler`). Every trial carries its
  `search.constraints` values as Optuna constraints, so both learn to avoid configurations that break a bound.

`CostAwareOptunaSearch` adds two things to Tune's `OptunaSearch`: an infeasible trial (a cost bound broken, never
trained: `orchestrator.search.trial`) is told to Optuna as PRUNED, with its constraint values, instead of
as a trial with missing objective values; and `add_earlier_trial` hands it the results of an earlier search
(`search.warm_start`) with every objective.
"""
from __future__ import annotations

import logging
from typing import Any

from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch  # imports optuna only if it is installed

from orchestrator.errors import CvlabError
from orchestrator.search.constraints import INFEASIBLE_KEY, constraint_values

log = logging.getLogger(__name__)

INFEASIBLE_ATTR = "cvlab.infeasible"  # an Optuna trial's user attribute: it broke a bound and never trained
# TPE draws this fraction of a search's trials at random before it models them (at least 2, Optuna's 10 at most).
STARTUP_FRACTION = 3


def optuna_module():
    """The optuna package, or a CvlabError that says how to install it."""
    try:
        import optuna
    except ImportError as err:
        raise CvlabError("search.algorithm: optuna needs the optuna package (pip install 'optuna>=4')") from err
    return optuna


def make_sampler(search, seed: int):
    """Optuna's sampler; both read the constraint values each trial carries (`Trial.set_constraint`)."""
    optuna = optuna_module()
    if search.sampler == "nsga2":
        population = max(2, min(50, search.num_samples // 4))
        return optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
    startup = max(2, min(10, search.num_samples // STARTUP_FRACTION))
    return optuna.samplers.TPESampler(n_startup_trials=startup, seed=seed)


class CostAwareOptunaSearch(OptunaSearch):
    """Tune's OptunaSearch that knows infeasible trials, constraint values and earlier results."""

    def __init__(self, *args, constraints: dict | None = None, **kwargs):
        self._constraints = dict(constraints or {})
        super().__init__(*args, **kwargs)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result, error)
        for name, value in constraint_values(result or {}, self._constraints).items():
            ot_trial.set_constraint(name, value)
        if result and result.get(INFEASIBLE_KEY):
            ot_trial.set_user_attr(INFEASIBLE_ATTR, True)
            self._ot_study.tell(ot_trial, None, state=optuna_module().trial.TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return None
        return super().on_trial_complete(trial_id, result, error)

    def add_earlier_trial(self, params: dict[str, Any], values: list[float] | None, costs: dict[str, float],
                          infeasible: bool) -> None:
        """An earlier search's trial (warm start): COMPLETE with its objective values, or PRUNED when it was
        infeasible or lacks a value of some objective."""
        states = optuna_module().trial.TrialState
        complete = values is not None and not infeasible
        self._ot_study.add_trial(optuna_module().trial.create_trial(
            state=states.COMPLETE if complete else states.PRUNED, values=values if complete else None,
            params=params, distributions=self._space, user_attrs={INFEASIBLE_ATTR: True} if infeasible else {},
            constraints=constraint_values(costs, self._constraints) or None))


def make_searcher(spec, space, concurrency: int, earlier: list[dict] | None = None):
    """The Tune search algorithm for `spec.search` (wrapped to run at most `concurrency` trials at once).

    `earlier`: the warm start's trials (`orchestrator.search.warm_start.earlier_trials`), told to Optuna.
    """
    s = spec.search
    if s.algorithm == "random":
        # Seeded so that a search draws the same random samples each time it is started. The concurrency
        # limit lives here: TuneConfig.max_concurrent_trials is ignored with a SearchGenerator.
        return BasicVariantGenerator(random_state=spec.experiment.seed, max_concurrent=concurrency)
    objectives = s.all_objectives
    several = len(objectives) > 1
    optuna_module()
    searcher = CostAwareOptunaSearch(
        space=CostAwareOptunaSearch.convert_search_space(space.to_tune()),
        metric=[o.metric for o in objectives] if several else objectives[0].metric,
        mode=[o.mode for o in objectives] if several else objectives[0].mode,
        sampler=make_sampler(s, spec.experiment.seed), constraints=s.constraints)
    for trial in earlier or ():
        searcher.add_earlier_trial(trial["params"], trial["values"], trial["costs"], trial["infeasible"])
    if earlier:
        log.info("optuna starts from %d earlier trial(s)", len(earlier))
    return ConcurrencyLimiter(searcher, max_concurrent=concurrency)
