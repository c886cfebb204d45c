"""Per-class IoU / accuracy: reported with every validation, and the table a run logs at its end.

`PerClassIoUMetric` is mmseg's `IoUMetric` (mIoU, mAcc, aAcc, in percent) that also returns each class's
IoU and accuracy as `IoU.<class>` / `Acc.<class>` (spaces in class names become '_'), so they reach Ray Train
and MLflow as `val/IoU.<class>` and `val/Acc.<class>`. A class with no pixel in the ground truth (union 0)
has no value (NaN, left out of the reports).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from mmseg.evaluation.metrics import IoUMetric

from . import CLASSES


def class_key(kind: str, name: str) -> str:
    """The evaluator key of one class's metric: kind 'IoU' or 'Acc'."""
    return f"{kind}.{name.replace(' ', '_')}"


class PerClassIoUMetric(IoUMetric):
    """`IoUMetric` whose results also hold each class's IoU and Acc (percent, 2 decimals)."""

    def compute_metrics(self, results: list) -> dict[str, float]:
        metrics = super().compute_metrics(results)  # also logs mmseg's per-class table
        if self.format_only or not results:
            return metrics
        # results: one (intersect, union, pred_area, label_area) tuple of per-class tensors per image.
        intersect, union, _pred, label = (sum(r[i] for r in results).double().cpu().numpy() for i in range(4))
        with np.errstate(divide="ignore", invalid="ignore"):
            iou, acc = intersect / union, intersect / label
        for name, i, a in zip(self.dataset_meta["classes"], iou, acc):
            metrics[class_key("IoU", name)] = round(float(i) * 100, 2)
            metrics[class_key("Acc", name)] = round(float(a) * 100, 2)
        return metrics


def class_iou_table(metrics: Mapping[str, float], classes: Sequence[str] = CLASSES,
                    prefix: str = "val/") -> list[dict]:
    """Rows {class, IoU, Acc} (percent; None where the class had no ground truth) from reported metrics
    (`val/IoU.road`, ...; `prefix=''` for raw evaluator output)."""
    rows = []
    for name in classes:
        row = {"class": name}
        for kind in ("IoU", "Acc"):
            value = metrics.get(prefix + class_key(kind, name))
            row[kind] = None if value is None or not math.isfinite(float(value)) else float(value)
        rows.append(row)
    return rows


def format_class_iou_table(rows: Sequence[Mapping], fmt: str = "markdown") -> str:
    """The rows of `class_iou_table` as a Markdown table ('markdown') or CSV ('csv')."""
    def cell(v):
        return "" if v is None else f"{v:.2f}"

    if fmt == "csv":
        lines = ["class,IoU,Acc"] + [f"{r['class']},{cell(r['IoU'])},{cell(r['Acc'])}" for r in rows]
    elif fmt == "markdown":
        lines = ["| class | IoU | Acc |", "| --- | ---: | ---: |"]
        lines += [f"| {r['class']} | {cell(r['IoU']) or '-'} | {cell(r['Acc']) or '-'} |" for r in rows]
    else:
        raise ValueError(f"fmt={fmt!r}: expected 'markdown' or 'csv'")
    return "\n".join(lines) + "\n"
