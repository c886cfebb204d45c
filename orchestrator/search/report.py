"""Summaries of a set of trials/runs: a ranked table (CSV + Markdown) and PNG plots.

Shared by `cvlab tune` (artifacts of the search's parent run) and `cvlab compare`. A row is a plain dict:

    {"run": "trial_00000", "status": "FINISHED", "params": {"model.reduction_ratio": 4, ...},
     "metrics": {"val/top1": 61.2, "params_m": 1.3, "gflops": 0.2, "images_per_s": 812.0}}

Plots use matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
from matplotlib import cm, colors
from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

# Extra columns shown after the searched params and the ranking metric, when any row has them.
DEFAULT_EXTRA_METRICS = ("best_epoch", "epoch", "params_m", "gflops", "images_per_s")
# Columns read from the row itself (the rest are params, then metrics): the Pareto front's `front` and
# `infeasible` are set by orchestrator.search.pareto.
ROW_FIELDS = ("run", "status", "front", "infeasible")
# At most this many distinct numbers on an axis are treated as discrete values: one tick each, labelled.
MAX_DISCRETE_VALUES = 12


def as_number(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def rank_rows(rows: Iterable[dict], metric: str, mode: str = "max") -> list[dict]:
    """Best first by `metric` (`mode` max or min); rows without the metric last, in their given order."""
    rows = list(rows)
    with_metric = [r for r in rows if as_number(r.get("metrics", {}).get(metric)) is not None]
    without = [r for r in rows if as_number(r.get("metrics", {}).get(metric)) is None]
    with_metric.sort(key=lambda r: as_number(r["metrics"][metric]), reverse=(mode == "max"))
    return with_metric + without


def fmt_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.3e}"
    return str(v)


def table_columns(rows: Sequence[dict], param_keys: Sequence[str], metric: str,
                  extra_metrics: Sequence[str] = DEFAULT_EXTRA_METRICS) -> list[str]:
    extras = [m for m in extra_metrics if m != metric and any(m in r.get("metrics", {}) for r in rows)]
    return ["rank", "run", "status", *param_keys, metric, *extras]


def table_cells(rows: Sequence[dict], columns: Sequence[str]) -> list[list[Any]]:
    out = []
    for rank, row in enumerate(rows, 1):
        cells = []
        for col in columns:
            if col == "rank":
                cells.append(rank)
            elif col in ROW_FIELDS:
                cells.append(row.get(col))
            elif col in row.get("params", {}):
                cells.append(row["params"][col])
            else:
                cells.append(row.get("metrics", {}).get(col))
        out.append(cells)
    return out


def write_csv(rows: Sequence[dict], columns: Sequence[str], path: Path) -> Path:
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for cells in table_cells(rows, columns):
            w.writerow(["" if c is None else c for c in cells])
    return path


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for cells in table_cells(rows, columns):
        lines.append("| " + " | ".join(fmt_value(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def text_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Fixed-width table for the terminal."""
    body = [[fmt_value(c) for c in cells] for cells in table_cells(rows, columns)]
    widths = [max([len(c)] + [len(r[i]) for r in body]) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------ plots
def _axis_values(values: list[Any]) -> tuple[list[float | None], list[str] | None, bool]:
    """Map one parameter's values to numbers: (positions, category labels or None, log scale?)."""
    nums = [as_number(v) for v in values]
    present = [v for v in values if v is not None]
    if present and all(n is not None for n, v in zip(nums, values) if v is not None):
        pos = [n for n in nums if n is not None]
        log = bool(pos) and min(pos) > 0 and max(pos) / min(pos) >= 8
        return nums, None, log
    cats = sorted({str(v) for v in present})
    return [None if v is None else float(cats.index(str(v))) for v in values], cats, False


def pyplot():
    """pyplot on the Agg backend (no display needed)."""
    matplotlib.use("Agg", force=True)
    return plt


def _discrete_ticks(ax, values: list[float], log: bool) -> None:
    """Label each value of a discrete numeric axis with the value itself (1, 2, 4, 8, not 10^0, 10^1)."""
    ticks = sorted(set(values))
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FixedFormatter([fmt_value(int(v) if v == int(v) else v) for v in ticks]))
    if log:
        ax.xaxis.set_minor_locator(NullLocator())


def plot_metric_vs_params(rows: Sequence[dict], param_keys: Sequence[str], metric: str,
                          path: Path, mode: str = "max", title: str | None = None) -> Path | None:
    """One scatter panel per searched parameter (see `metric_vs_params_figure`), written to `path`."""
    fig = metric_vs_params_figure(rows, param_keys, metric, mode, title)
    if fig is None:
        return None
    path = Path(path)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def metric_vs_params_figure(rows: Sequence[dict], param_keys: Sequence[str], metric: str, mode: str = "max",
                            title: str | None = None):
    """The metric of every run against each searched parameter (a matplotlib Figure, or None).

    Runs that did not finish (stopped early by the scheduler, failed) get their own marker and the epoch
    they reached, and the "best per value" line joins finished runs only, so an early-stopped value is
    never drawn as if it were a bad one. Discrete numeric values get one labelled tick each.
    """
    rows = [r for r in rows if as_number(r.get("metrics", {}).get(metric)) is not None]
    if not rows or not param_keys:
        return None
    plt = pyplot()
    n = len(param_keys)
    cols = min(n, 3)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    y = [as_number(r["metrics"][metric]) for r in rows]
    complete = [r.get("complete", True) for r in rows]
    for i, key in enumerate(param_keys):
        ax = axes[i // cols][i % cols]
        xs, cats, log = _axis_values([r.get("params", {}).get(key) for r in rows])
        done = [(x, yy) for x, yy, c in zip(xs, y, complete) if x is not None and c]
        cut = [(x, yy, r) for x, yy, c, r in zip(xs, y, complete, rows) if x is not None and not c]
        ax.scatter([p[0] for p in done], [p[1] for p in done], s=36, alpha=0.85, color="tab:blue",
                   marker="o", label="finished")
        if cut:
            ax.scatter([p[0] for p in cut], [p[1] for p in cut], s=44, alpha=0.85, color="tab:red", marker="x",
                       label="stopped early / failed")
            for x, yy, r in cut:
                epoch = as_number(r["metrics"].get("epoch"))
                if epoch is not None:
                    ax.annotate(f"ep {int(epoch)}", (x, yy), textcoords="offset points", xytext=(4, -10),
                                fontsize=7, color="tab:red")
        present = [x for x in xs if x is not None]
        discrete = cats is not None or len(set(present)) <= MAX_DISCRETE_VALUES
        if cats is not None:
            ax.set_xticks(range(len(cats)), cats, rotation=30 if max(map(len, cats)) > 4 else 0)
        elif log:
            ax.set_xscale("log")
        if cats is None and discrete:
            _discrete_ticks(ax, present, log)
        if discrete and done:
            # discrete values: each value's best finished run (runs that trained equally long)
            pick = max if mode == "max" else min
            best: dict[float, float] = {}
            for x, yy in done:
                best[x] = pick(best[x], yy) if x in best else yy
            xs_sorted = sorted(best)
            ax.plot(xs_sorted, [best[x] for x in xs_sorted], color="tab:orange", lw=1, alpha=0.7,
                    label="best finished run per value")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if cut and i == 0:
            ax.legend(fontsize=7, loc="best")
    for j in range(n, nrows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle(title or f"{metric} per searched hyperparameter ({len(rows)} runs)")
    fig.tight_layout()
    return fig


def plot_parallel_coordinates(rows: Sequence[dict], param_keys: Sequence[str], metric: str,
                              path: Path, mode: str = "max", title: str | None = None) -> Path | None:
    """Every run as a line through one vertical axis per parameter plus the metric, coloured by metric."""
    rows = [r for r in rows if as_number(r.get("metrics", {}).get(metric)) is not None]
    if not rows:
        return None
    plt = pyplot()
    axes_keys = list(param_keys) + [metric]
    columns = []  # (normalised positions, tick positions, tick labels)
    for key in axes_keys:
        raw = [r["metrics"][metric] for r in rows] if key == metric else \
            [r.get("params", {}).get(key) for r in rows]
        xs, cats, log = _axis_values(raw)
        if cats is not None:
            span = max(len(cats) - 1, 1)
            norm = [None if x is None else x / span for x in xs]
            ticks = [i / span for i in range(len(cats))]
            columns.append((norm, ticks, cats))
            continue
        vals = [x for x in xs if x is not None]
        tr = (lambda v: math.log10(v)) if log else (lambda v: v)
        lo, hi = (tr(min(vals)), tr(max(vals))) if vals else (0.0, 1.0)
        span = (hi - lo) or 1.0
        norm = [None if x is None else (tr(x) - lo) / span for x in xs]
        uniq = sorted(set(vals))
        tick_vals = uniq if len(uniq) <= 6 else [min(vals), max(vals)]
        columns.append((norm, [(tr(v) - lo) / span for v in tick_vals], [fmt_value(v) for v in tick_vals]))

    metric_vals = [as_number(r["metrics"][metric]) for r in rows]
    cnorm = colors.Normalize(min(metric_vals), max(metric_vals) if max(metric_vals) > min(metric_vals)
                             else min(metric_vals) + 1e-9)
    cmap = matplotlib.colormaps["viridis"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.9 * len(axes_keys)), 4.2))
    order = sorted(range(len(rows)), key=lambda i: metric_vals[i], reverse=(mode == "min"))
    for i in order:  # best drawn last (on top)
        pts = [(j, col[0][i]) for j, col in enumerate(columns) if col[0][i] is not None]
        finished = rows[i].get("complete", True)  # runs stopped early: dashed, with an x
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=cmap(cnorm(metric_vals[i])), lw=1.6,
                alpha=0.85, marker="o" if finished else "x", ms=3 if finished else 5,
                linestyle="-" if finished else "--")
    for j, (_, ticks, labels) in enumerate(columns):
        ax.axvline(j, color="0.3", lw=0.8)
        for t, lab in zip(ticks, labels):
            ax.text(j + 0.03, t, lab, fontsize=7, va="center", ha="left", color="0.15")
    ax.set_xticks(range(len(axes_keys)), axes_keys, rotation=15, fontsize=8)
    ax.set_yticks([])
    ax.set_xlim(-0.15, len(axes_keys) - 0.6)
    ax.set_ylim(-0.05, 1.05)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    sm = cm.ScalarMappable(norm=cnorm, cmap=cmap)
    sm.set_array([])
    fig.colorbar(sm, ax=ax, label=metric, pad=0.02)
    ax.set_title(title or f"All runs: parallel coordinates ({len(rows)} runs)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(rows: Sequence[dict], param_keys: Sequence[str], metric: str, out_dir: Path,
                 mode: str = "max", prefix: str = "search",
                 extra_metrics: Sequence[str] = DEFAULT_EXTRA_METRICS) -> dict[str, Path]:
    """Rank `rows` and write `<prefix>_summary.csv/.md`, `<prefix>_metric_vs_params.png` and
    `<prefix>_parallel_coordinates.png` into `out_dir`. Returns the written paths by kind."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranked = rank_rows(rows, metric, mode)
    columns = table_columns(ranked, param_keys, metric, extra_metrics)
    written: dict[str, Path] = {}
    written["csv"] = write_csv(ranked, columns, out_dir / f"{prefix}_summary.csv")
    md = out_dir / f"{prefix}_summary.md"
    md.write_text(f"Ranked by `{metric}` ({mode}), best first.\n\n" + markdown_table(ranked, columns))
    written["md"] = md
    p = plot_metric_vs_params(ranked, param_keys, metric, out_dir / f"{prefix}_metric_vs_params.png",
                              mode=mode)
    if p:
        written["metric_vs_params"] = p
    p = plot_parallel_coordinates(ranked, param_keys, metric, out_dir / f"{prefix}_parallel_coordinates.png",
                                  mode=mode)
    if p:
        written["parallel_coordinates"] = p
    return written
