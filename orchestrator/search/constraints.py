"""`search.constraints`: bounds on measured costs, judged before a trial trains.

`violations` names what a configuration breaks (a trial that breaks anything is infeasible and never trains);
`constraint_values` gives the same judgement in Optuna's convention (one number per bound, <= 0 when it holds),
which its samplers read from each trial's constraints to prefer feasible regions.
"""
from __future__ import annotations

import math
from typing import Any

INFEASIBLE_KEY = "cvlab/infeasible"  # in an infeasible trial's one Tune result: 1.0


def _bounds(constraints: dict[str, Any]):
    """(metric, side, bound) for every side of every constraint, in a fixed order."""
    for metric, bound in sorted(constraints.items()):
        for side in ("min", "max"):
            value = bound.get(side) if isinstance(bound, dict) else getattr(bound, side)
            if value is not None:
                yield metric, side, float(value)


def violations(costs: dict[str, float], constraints: dict[str, Any]) -> list[str]:
    """The bounds `costs` break, as text (`cost/params_m 12.3 > max 10`); empty when every one holds. A cost the
    probe did not measure breaks its bound (it cannot be shown to hold)."""
    broken = []
    for metric, side, bound in _bounds(constraints):
        value = costs.get(metric)
        if value is None or not math.isfinite(value):
            broken.append(f"{metric} not measured (bound {side} {bound:g})")
        elif (side == "max" and value > bound) or (side == "min" and value < bound):
            broken.append(f"{metric} {value:.4g} {'>' if side == 'max' else '<'} {side} {bound:g}")
    return broken


def constraint_values(costs: dict[str, float], constraints: dict[str, Any]) -> dict[str, float]:
    """One value per bound (`cost/params_m max`), Optuna's convention: <= 0 when it holds, else by how much it
    is broken."""
    values = {}
    for metric, side, bound in _bounds(constraints):
        value = costs.get(metric)
        if value is None or not math.isfinite(value):
            values[f"{metric} {side}"] = math.inf
        else:
            values[f"{metric} {side}"] = value - bound if side == "max" else bound - value
    return values
