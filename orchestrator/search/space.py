"""The `search:` section of an experiment: parse the space, check it, turn it into a Ray Tune space.

A space maps dotted spec paths to one distribution each:

    search:
      space:
        model.reduction_ratio: {grid: [1, 2, 4, 8, 16]}   # every value, in every sample
        model.group_channels:  {choice: [8, 16, 32]}      # one value drawn per sample
        optim.lr:              {loguniform: [1.0e-3, 1.0e-1]}
        optim.weight_decay:    {uniform: [0.0, 1.0e-3]}
        data.batch_size:       {randint: [16, 64]}        # integers low..high, both included

Everything here is checked before a single trial starts (`check_search`): unknown paths (with the nearest
valid one), malformed distributions, and every combination the space can produce against the model
(`workloads.models.validate_model_config`) and the spec schema.
"""
from __future__ import annotations

import difflib
import itertools
import math
from dataclasses import dataclass
from typing import Any

from ray import tune

from orchestrator.config.loader import apply_overrides, flatten_spec
from orchestrator.config.paths import DOTTED_KEY_FIELDS, nearest_path, valid_paths
from orchestrator.errors import CvlabError
from orchestrator.jobs import job_class, job_for
from orchestrator.search.searchers import optuna_module
from workloads.models import validate_model_config
from workloads.models.config import FAMILY_DEFAULTS, parse_name

# kind -> what its argument is
KINDS: dict[str, str] = {
    "grid": "a non-empty list of values, all of them tried (Tune grid_search)",
    "choice": "a non-empty list of values, one drawn per sample",
    "uniform": "[low, high], a float drawn uniformly",
    "loguniform": "[low, high] with 0 < low, a float drawn uniformly in log space",
    "randint": "[low, high], an integer drawn from low..high (both included)",
}
# Above this many value combinations, paths are checked one at a time instead of jointly.
MAX_JOINT_COMBINATIONS = 20_000
# randint ranges up to this size are checked value by value; larger ones at their ends and middle.
MAX_ENUMERATED_INTS = 256
MAX_LISTED_PROBLEMS = 15


@dataclass(frozen=True)
class Dimension:
    """One searched path and its distribution."""

    path: str
    kind: str
    values: tuple[Any, ...] = ()  # grid / choice
    low: float | int | None = None  # uniform / loguniform / randint
    high: float | int | None = None

    @property
    def is_model(self) -> bool:
        return self.path.startswith("model.")

    def describe(self) -> str:
        if self.kind in ("grid", "choice"):
            return f"{self.kind} {list(self.values)}"
        return f"{self.kind} [{self.low}, {self.high}]"

    def check_values(self) -> list[Any]:
        """Values that stand for everything this dimension can produce, for up-front validation."""
        if self.kind in ("grid", "choice"):
            return list(self.values)
        if self.kind == "randint":
            low, high = int(self.low), int(self.high)
            if high - low + 1 <= MAX_ENUMERATED_INTS:
                return list(range(low, high + 1))
            return sorted({low, (low + high) // 2, high})
        return [self.low, self.high]

    def to_tune(self):
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "uniform":
            return tune.uniform(float(self.low), float(self.high))
        if self.kind == "loguniform":
            return tune.loguniform(float(self.low), float(self.high))
        return tune.randint(int(self.low), int(self.high) + 1)  # Tune's upper bound is exclusive


@dataclass(frozen=True)
class SearchSpace:
    dimensions: tuple[Dimension, ...]

    @property
    def paths(self) -> list[str]:
        return [d.path for d in self.dimensions]

    def __getitem__(self, path: str) -> Dimension:
        for d in self.dimensions:
            if d.path == path:
                return d
        raise KeyError(path)

    def to_tune(self) -> dict[str, Any]:
        """Ray Tune `param_space`: flat, keyed by the dotted spec path."""
        return {d.path: d.to_tune() for d in self.dimensions}

    def grid_size(self) -> int:
        """Trials per sample: the product of the grid sizes (choice / ranges are drawn, not crossed)."""
        return math.prod(len(d.values) for d in self.dimensions if d.kind == "grid")

    def describe(self) -> dict[str, str]:
        return {d.path: d.describe() for d in self.dimensions}


# ---------------------------------------------------------------------------------------------- parsing
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_dimension(path: str, dist: Any) -> Dimension:
    """Parse one `path: {kind: args}` entry. Raises CvlabError saying what is wrong and what is expected."""
    where = f"search.space[{path!r}]"
    kinds = ", ".join(KINDS)
    if not isinstance(dist, dict) or len(dist) != 1:
        raise CvlabError(
            f"{where}: a distribution is a mapping with exactly one kind, e.g. {{grid: [1, 2, 4]}}; "
            f"got {dist!r} (kinds: {kinds})"
        )
    (kind, arg), = dist.items()
    if kind not in KINDS:
        near = difflib.get_close_matches(str(kind), list(KINDS), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise CvlabError(f"{where}: unknown distribution {kind!r}{hint}; kinds: {kinds}")
    if kind in ("grid", "choice"):
        if not isinstance(arg, (list, tuple)):
            raise CvlabError(f"{where}: {kind} takes {KINDS[kind]}; got {arg!r}")
        if not arg:
            raise CvlabError(f"{where}: {kind} list is empty; give at least one value")
        values = tuple(arg)
        dupes = sorted({repr(v) for v in values if values.count(v) > 1})
        if dupes:
            raise CvlabError(f"{where}: {kind} lists {', '.join(dupes)} more than once")
        return Dimension(path, kind, values=values)

    if not isinstance(arg, (list, tuple)) or len(arg) != 2:
        raise CvlabError(f"{where}: {kind} takes {KINDS[kind]}; got {arg!r}")
    low, high = arg
    if not (_is_number(low) and _is_number(high)):
        raise CvlabError(f"{where}: {kind} bounds must be finite numbers; got [{low!r}, {high!r}]")
    if kind == "randint":
        if float(low) != int(low) or float(high) != int(high):
            raise CvlabError(f"{where}: randint bounds must be integers; got [{low!r}, {high!r}]")
        low, high = int(low), int(high)
    if low >= high:
        raise CvlabError(f"{where}: {kind} needs low < high; got low={low}, high={high}")
    if kind == "loguniform" and low <= 0:
        raise CvlabError(f"{where}: loguniform bounds must be positive (log scale); got low={low}")
    if kind != "randint":
        low, high = float(low), float(high)
    return Dimension(path, kind, low=low, high=high)


def parse_space(space: dict[str, Any]) -> SearchSpace:
    """Parse `search.space` (path -> distribution) without looking at the rest of the spec."""
    if not isinstance(space, dict) or not space:
        raise CvlabError(
            "search.space is empty: map at least one spec path to a distribution, e.g. "
            "search: {space: {model.reduction_ratio: {grid: [1, 2, 4]}}}"
        )
    dims = []
    for path, dist in space.items():
        if not isinstance(path, str) or not path.strip() or "." not in path:
            raise CvlabError(
                f"search.space key {path!r} is not a dotted spec path like 'model.reduction_ratio'"
            )
        dims.append(parse_dimension(path.strip(), dist))
    return SearchSpace(tuple(dims))


# ------------------------------------------------------------------------------------------- validation
def _model_override_names(model_name: str) -> set[str]:
    """Override keys the model family accepts (empty for a name the model table does not know)."""
    try:
        return set(FAMILY_DEFAULTS[parse_name(model_name)[0]])
    except Exception:  # noqa: BLE001 - suggestions only; validate_model_config still judges
        return set()


def check_paths(spec, space: SearchSpace) -> None:
    """Every searched path must exist in the spec (or be a model override); else name the nearest one."""
    # Searching the search itself, the workload kind or where results go makes no sense.
    for path in space.paths:
        if path.split(".")[0] in ("search", "workload", "tracking"):
            raise CvlabError(f"search.space cannot search {path!r}: only the trained run's settings can vary")
    # the search section's own keys are no candidates (they are not searchable)
    valid = {p for p in valid_paths(flatten_spec(spec)) if not p.startswith("search.")}
    model_names = {spec.model.name} if spec.model is not None else set()
    if "model.name" in space.paths:
        model_names |= {str(v) for v in space["model.name"].check_values()}
    for name in model_names:
        valid |= {f"model.{k}" for k in _model_override_names(name)}
    # Keys of a framework config's overrides (`segmentation.overrides.model.neck.op_reduction_ratio`) are the
    # framework's: the combinations check judges them by building the config.
    free = tuple(".".join(f) + "." for f in DOTTED_KEY_FIELDS if f != ("search", "space"))
    bad = []
    for path in space.paths:
        if path in valid or path.startswith(free):
            continue
        near = nearest_path(path, sorted(valid))
        bad.append(f"{path!r}" + (f" (did you mean {near!r}?)" if near else ""))
    if bad:
        raise CvlabError(f"search.space names path(s) that do not exist in the spec: {', '.join(bad)}")


def check_metric(search, reported: tuple[str, ...], workload: str) -> None:
    """`search.metric` must be one the workload reports (the job's `reported_metrics`)."""
    if search.metric not in reported:
        near = difflib.get_close_matches(search.metric, reported, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise CvlabError(f"search.metric {search.metric!r} is not reported by the {workload} workload{hint}; "
                         f"reported metrics: {', '.join(reported)}")


def _unknown(name: str, known: tuple[str, ...], what: str, workload: str) -> str:
    near = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return f"{what} {name!r} is not logged by the {workload} workload{hint}; it logs: {', '.join(known)}"


def check_objectives(search, reported: tuple[str, ...], costs: tuple[str, ...], workload: str) -> None:
    """Every objective must be a metric the trials log: one the workload reports, or a measured cost."""
    for i, objective in enumerate(search.objectives):
        if objective.metric not in reported + costs:
            raise CvlabError(_unknown(objective.metric, reported + costs, f"search.objectives[{i}].metric",
                                      workload))


def check_constraints(search, costs: tuple[str, ...], workload: str) -> None:
    """Constraints bound measured costs only: they are judged before training, when nothing else is known."""
    for metric in search.constraints:
        if not costs:
            raise CvlabError(f"search.constraints: the {workload} workload has no cost probe, so nothing can be "
                             "bounded before training")
        if metric not in costs:
            raise CvlabError(_unknown(metric, costs, "search.constraints: the cost", workload)
                             + " (constraints are checked before training: only measured costs can be bounded)")


def check_algorithm(search, space: SearchSpace) -> None:
    """`search.algorithm: optuna` draws every sample itself: it needs optuna, and a space without grids."""
    if search.algorithm != "optuna":
        return
    optuna_module()
    grids = [d.path for d in space.dimensions if d.kind == "grid"]
    if grids:
        raise CvlabError(f"search.algorithm: optuna cannot search a grid ({', '.join(grids)}): optuna draws "
                         "every value itself; use {choice: [...]} and search.num_samples for the number of trials")


def check_scheduler(spec, budget: int, unit: str) -> None:
    """ASHA's rungs must fit the trial's budget (`budget` in `unit`s: the job's planned steps)."""
    s = spec.search
    if s.scheduler != "asha":
        return
    max_t = s.max_t if s.max_t is not None else budget
    if s.grace_period > max_t:
        raise CvlabError(f"search.grace_period must be in 1..max_t ({max_t} {unit}s), got {s.grace_period}")


def _combinations(space: SearchSpace, dims: list[Dimension]):
    """Every joint assignment of the check values of `dims` (or one path at a time when too many)."""
    if not dims:
        yield {}
        return
    sizes = [len(d.check_values()) for d in dims]
    if math.prod(sizes) <= MAX_JOINT_COMBINATIONS:
        for combo in itertools.product(*(d.check_values() for d in dims)):
            yield dict(zip((d.path for d in dims), combo))
    else:
        for d in dims:
            for v in d.check_values():
                yield {d.path: v}


def _fmt_combo(combo: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in combo.items())


def check_combinations(spec, space: SearchSpace) -> int:
    """Check every combination the space can produce. Returns how many were checked.

    Model paths are checked jointly with `validate_model_config` (their combination is what may not fit a
    layer); every other path is applied to the spec one value at a time, which runs the schema checks and
    the workload's own (`Job.check_variant`: an OpenMMLab config is built, its model on the meta device).
    Raises CvlabError listing the bad combinations and why.
    """
    problems: list[str] = []
    model_dims = [d for d in space.dimensions if d.is_model]
    other_dims = [d for d in space.dimensions if not d.is_model]
    checked = 0
    for combo in _combinations(space, model_dims) if model_dims else ():
        checked += 1
        overrides = {k: v for k, v in spec.model.overrides.items()}
        name = spec.model.name
        for path, value in combo.items():
            key = path.split(".", 1)[1]
            if key == "name":
                name = value
            else:
                overrides[key] = value
        try:
            validate_model_config(name, **overrides)
        except (ValueError, TypeError) as err:
            problems.append(f"{_fmt_combo(combo) or name}: {err}")
    workload_job = job_class(spec.workload)
    for d in other_dims:
        for value in d.check_values():
            checked += 1
            try:
                workload_job(apply_overrides(spec, {d.path: value})).check_variant()
            except (CvlabError, ValueError, TypeError) as err:
                problems.append(f"{d.path}={value!r}: {err}")
    if problems:
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - len(shown)
        lines = "\n".join(f"  - {p}" for p in shown)
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise CvlabError(
            f"the search cannot start: {len(problems)} of {checked} combination(s) of the space are "
            f"invalid:\n{lines}{tail}"
        )
    return checked


def check_search(spec) -> SearchSpace:
    """Parse and check the whole `search:` section against `spec`. Returns the parsed space."""
    if spec.search is None:
        raise CvlabError(
            "this experiment has no `search:` section; add one (search.space, search.metric, ...) "
            "to run `cvlab tune`"
        )
    job = job_for(spec)
    space = parse_space(spec.search.space)
    check_paths(spec, space)
    check_metric(spec.search, job.reported_metrics + job.cost_metrics, spec.workload)
    check_objectives(spec.search, job.reported_metrics, job.cost_metrics, spec.workload)
    check_constraints(spec.search, job.cost_metrics, spec.workload)
    check_algorithm(spec.search, space)
    check_scheduler(spec, job.planned_steps(), job.step_metric)
    check_combinations(spec, space)
    return space
