"""The accuracy-cost frontier of a search: which trials no other trial beats on every objective.

A trial dominates another when it is at least as good on every objective and strictly better on one (each
objective maximised or minimised on its own). The Pareto front is the trials no other trial dominates. So:
two trials with identical objective values are both on the front (neither is strictly better), a trial tied with
a front member on one objective and worse on another is not, and these take no part (neither on the front nor
counting against it): trials never trained (infeasible: a cost constraint ruled them out), trials that did not
train to the end (stopped early by ASHA, failed: their accuracy is not comparable), trials that lack an
objective value, and trials that reused the measurement of another trial of the same rows (a configuration
drawn again: one point, not two).

Rows are the report rows of `orchestrator.search.report` (`run`, `run_id`, `status`, `complete`, `params`,
`metrics`), with `infeasible` (the violated bound, or empty) and `reused` (the run whose measurement it copied, or
empty). `mark_front` adds `front` (`yes`, `no`, `stopped`, `duplicate`, `no value`, `infeasible`); `write_pareto`
writes `pareto.csv`, `pareto.md` and `pareto.png`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.search import report


@dataclass(frozen=True)
class Objective:
    metric: str
    mode: str  # "max" | "min"

    def better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b


def dominates(a: Sequence[float], b: Sequence[float], objectives: Sequence[Objective]) -> bool:
    """True when `a` is at least as good as `b` on every objective and strictly better on one."""
    strictly = False
    for x, y, obj in zip(a, b, objectives):
        if obj.better(y, x):
            return False
        strictly = strictly or obj.better(x, y)
    return strictly


def front_flags(points: Sequence[Sequence[float] | None], objectives: Sequence[Objective]) -> list[bool]:
    """For each point (objective values in `objectives` order, or None: not comparable), whether it is on the
    Pareto front of the comparable points."""
    comparable = [p is not None and len(p) == len(objectives) and all(math.isfinite(v) for v in p) for p in points]
    flags = []
    for i, p in enumerate(points):
        flags.append(comparable[i] and not any(
            comparable[j] and j != i and dominates(q, p, objectives) for j, q in enumerate(points)))
    return flags


def objective_values(row: dict, objectives: Sequence[Objective]) -> list[float] | None:
    """The row's objective values, or None when it was infeasible or misses one."""
    if row.get("infeasible"):
        return None
    values = []
    for obj in objectives:
        v = report.as_number(row.get("metrics", {}).get(obj.metric))
        if v is None:
            return None
        values.append(v)
    return values


def _standing(row: dict, run_ids: set[str]) -> str | None:
    """Why a row takes no part in the front (a `front` state), or None when it competes."""
    if row.get("infeasible"):
        return "infeasible"
    if row.get("reused") in run_ids:
        return "duplicate"
    if not row.get("complete", True):
        return "stopped"
    return None


def mark_front(rows: Sequence[dict], objectives: Sequence[Objective]) -> list[dict]:
    """Copies of `rows` with `front` set, front members first (best first by the first objective), then the
    dominated trials (same order), the stopped, duplicate and value-less ones, and the infeasible ones."""
    run_ids = {r.get("run_id") for r in rows}
    standing = [_standing(r, run_ids) for r in rows]
    points = [None if why else objective_values(r, objectives) for r, why in zip(rows, standing)]
    flags = front_flags(points, objectives)
    marked = []
    for row, point, on_front, why in zip(rows, points, flags, standing):
        state = why or ("yes" if on_front else "no" if point is not None else "no value")
        marked.append({**row, "front": state})
    first = objectives[0]
    order = {"yes": 0, "no": 1, "stopped": 2, "duplicate": 3, "no value": 4, "infeasible": 5}
    marked.sort(key=lambda r: (order[r["front"]], _sort_key(r, first)))
    return marked


def _sort_key(row: dict, objective: Objective) -> float:
    v = report.as_number(row.get("metrics", {}).get(objective.metric))
    if v is None:
        return math.inf
    return -v if objective.mode == "max" else v


# ------------------------------------------------------------------------------------------------ files
def pareto_columns(param_keys: Sequence[str], objectives: Sequence[Objective]) -> list[str]:
    return ["front", "run", "status", *param_keys, *(o.metric for o in objectives), "infeasible"]


def write_pareto(rows: Sequence[dict], param_keys: Sequence[str], objectives: Sequence[Objective],
                 out_dir: Path) -> dict[str, Path]:
    """`pareto.csv`, `pareto.md` (front members first) and `pareto.png` in `out_dir`; returns them by kind."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    marked = mark_front(rows, objectives)
    columns = pareto_columns(param_keys, objectives)
    written = {"pareto_csv": report.write_csv(marked, columns, out_dir / "pareto.csv")}
    goals = ", ".join(f"`{o.metric}` ({o.mode})" for o in objectives)
    size = sum(r["front"] == "yes" for r in marked)
    md = out_dir / "pareto.md"
    md.write_text(f"Pareto front over {goals}: {size} of {len(marked)} trial(s), front members first.\n\n"
                  + report.markdown_table(marked, columns))
    written["pareto_md"] = md
    png = plot_front(marked, param_keys, objectives, out_dir / "pareto.png")
    if png is not None:
        written["pareto_png"] = png
    return written


def _label(row: dict, param_keys: Sequence[str]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={report.fmt_value(row['params'].get(k))}" for k in param_keys
                     if row.get("params", {}).get(k) is not None)


def plot_front(marked: Sequence[dict], param_keys: Sequence[str], objectives: Sequence[Objective],
               path: Path) -> Path | None:
    """The first objective against the second: dominated trials grey, the front joined and labelled with its
    searched values, infeasible trials as crosses at their measured value of a cost objective (else left
    out). With one objective, the first objective against the trial's rank. None when nothing can be drawn."""
    plt = report.pyplot()
    x_obj = objectives[1] if len(objectives) > 1 else None
    y_obj = objectives[0]

    def xy(row, rank):
        x = rank if x_obj is None else report.as_number(row.get("metrics", {}).get(x_obj.metric))
        return x, report.as_number(row.get("metrics", {}).get(y_obj.metric))

    pts = {state: [] for state in ("yes", "no", "stopped", "infeasible")}
    for rank, row in enumerate(marked, 1):
        if row["front"] in pts:
            pts[row["front"]].append((row, *xy(row, rank)))
    if not pts["yes"] and not pts["no"]:
        return None
    fig, ax = plt.subplots(figsize=(8, 5.5))
    dominated = [(x, y) for _r, x, y in pts["no"] if x is not None and y is not None]
    if dominated:
        ax.scatter(*zip(*dominated), color="0.65", s=30, label="dominated", zorder=2)
    stopped = [(x, y) for _r, x, y in pts["stopped"] if x is not None and y is not None]
    if stopped:
        ax.scatter(*zip(*stopped), color="0.65", marker="v", s=30, label="stopped early (not compared)", zorder=2)
    front = sorted(((r, x, y) for r, x, y in pts["yes"]), key=lambda t: t[1])
    if front:
        ax.plot([x for _r, x, _y in front], [y for _r, _x, y in front], "-o", color="tab:blue", ms=7,
                label="Pareto front", zorder=3)
        for row, x, y in front:
            ax.annotate(_label(row, param_keys), (x, y), textcoords="offset points", xytext=(5, 6), fontsize=8)
    crosses = [(x, y) for _r, x, y in pts["infeasible"] if x is not None]
    if crosses:  # never trained: no accuracy; drawn at the bottom of the plot, at their measured cost
        bottom = min(y for _r, _x, y in pts["yes"] + pts["no"] + pts["stopped"] if y is not None)
        ax.scatter([x for x, _y in crosses], [bottom] * len(crosses), marker="x", color="tab:red", s=50,
                   label="infeasible (not trained; at its measured cost)", zorder=2)
    ax.set_xlabel(f"{x_obj.metric} ({x_obj.mode})" if x_obj else "trial, best first")
    ax.set_ylabel(f"{y_obj.metric} ({y_obj.mode})")
    ax.grid(alpha=0.3)
    ax.margins(x=0.2, y=0.1)  # room for the labels
    ax.legend(fontsize=8, loc="best")
    extra = f" and {len(objectives) - 2} more objective(s)" if len(objectives) > 2 else ""
    ax.set_title(f"Pareto front: {len(front)} of {len(marked)} trials{extra}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the labels may reach past the axes
    plt.close(fig)
    return path


def front_summary(marked: Sequence[dict], param_keys: Sequence[str], objectives: Sequence[Objective]) -> list[str]:
    """One line per front member, for the terminal."""
    lines = []
    for row in marked:
        if row["front"] != "yes":
            continue
        values = ", ".join(f"{o.metric}={report.fmt_value(row['metrics'].get(o.metric))}" for o in objectives)
        lines.append(f"  {row['run'].split(' (')[0]}: {values} ({_label(row, param_keys)})")
    return lines


def as_objectives(items: Sequence[Any]) -> list[Objective]:
    """Objectives from the spec's `search.objectives` entries (objects or dicts with metric and mode)."""
    out = []
    for item in items:
        metric = item["metric"] if isinstance(item, dict) else item.metric
        mode = item["mode"] if isinstance(item, dict) else item.mode
        out.append(Objective(metric, mode))
    return out
