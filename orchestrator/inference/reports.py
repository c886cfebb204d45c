"""What an evaluation leaves in MLflow besides its metrics: a per-class table and a confusion-matrix picture."""
from __future__ import annotations

import csv
import os
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

# Above this many classes the confusion matrix is drawn without class names on its axes.
MAX_LABELLED_CLASSES = 40


def per_class_table(per_class: dict[str, dict[str, Any]], out_dir: str) -> list[str]:
    """`per_class_accuracy.csv` and `.md`: class, images, top-1, top-5 (worst top-1 first)."""
    rows = sorted(per_class.items(), key=lambda kv: (kv[1]["top1"] is None, kv[1]["top1"] or 0.0))
    csv_path = os.path.join(out_dir, "per_class_accuracy.csv")
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["class", "images", "top1", "top5"])
        for name, r in rows:
            writer.writerow([name, r["images"], "" if r["top1"] is None else f"{r['top1']:.4f}",
                             "" if r["top5"] is None else f"{r['top5']:.4f}"])
    md_path = os.path.join(out_dir, "per_class_accuracy.md")
    lines = ["| class | images | top-1 | top-5 |", "|---|---:|---:|---:|"]
    for name, r in rows:
        cells = ["-" if r[k] is None else f"{r[k]:.4f}" for k in ("top1", "top5")]
        lines.append(f"| {name} | {r['images']} | {cells[0]} | {cells[1]} |")
    with open(md_path, "w") as fh:
        fh.write("Per-class accuracy, worst top-1 first.\n\n" + "\n".join(lines) + "\n")
    return [csv_path, md_path]


def confusion_png(confusion: list[list[int]], classes: list[str], out_dir: str) -> str:
    """`confusion_matrix.png`: rows = true class, columns = prediction, each row normalised to its images."""
    matplotlib.use("Agg", force=True)
    counts = np.asarray(confusion, dtype=np.float64)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    n = len(classes)
    side = min(12.0, 3.0 + 0.35 * n)
    fig, ax = plt.subplots(figsize=(side, side))
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    if n <= MAX_LABELLED_CLASSES:
        ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(n), classes, fontsize=7)
        if n <= 15:
            for i in range(n):
                for j in range(n):
                    if counts[i, j]:
                        ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                                color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix ({int(counts.sum())} images; rows normalised)")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = os.path.join(out_dir, "confusion_matrix.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
