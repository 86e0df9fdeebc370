"""The report's figures (PNG, matplotlib's Agg backend): score distributions per query, metrics against k.
Each is written to `out`, a path or a binary file object."""

from __future__ import annotations

import math
from pathlib import Path
from typing import BinaryIO

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import NullFormatter

CLEAN, POISONED = "#8a94a6", "#d6453d"


def score_distributions(
    scores: np.ndarray, titles: list[str], labels: np.ndarray | None, out: str | Path | BinaryIO
) -> None:
    """One histogram panel per row of `scores` (queries × samples), poisoned samples (labels True) in red;
    NaN scores (samples left out of the ranking) are not counted."""
    columns = min(3, len(scores))
    rows = math.ceil(len(scores) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.6 * rows), squeeze=False)
    for axis, row, title in zip(axes.flat, scores, titles, strict=False):
        finite = np.isfinite(row)
        bins = np.linspace(row[finite].min(initial=0.0), row[finite].max(initial=0.0), 50)
        poisoned = labels if labels is not None else np.zeros(len(row), dtype=bool)
        axis.hist(row[finite & ~poisoned], bins=bins, color=CLEAN, label="other samples")
        if poisoned.any():
            axis.hist(row[finite & poisoned], bins=bins, color=POISONED, alpha=0.85, label="poisoned samples")
        axis.set_yscale("log")
        axis.yaxis.set_minor_formatter(NullFormatter())
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("influence score", fontsize=8)
        axis.tick_params(labelsize=7)
    for axis in axes.flat[len(scores) :]:
        axis.set_visible(False)
    axes.flat[0].legend(fontsize=7, frameon=False)
    figure.tight_layout()
    figure.savefig(out, dpi=110, format="png")
    plt.close(figure)


def metrics_against_k(metrics: dict, out: str | Path | BinaryIO) -> None:
    """auPRC and auROC of backdoor retrieval against k (top-k ∪ bottom-k per attacked query), with chance level."""
    ks = [int(k) for k in metrics["auprc"]]
    figure, axis = plt.subplots(figsize=(5, 3.2))
    axis.plot(ks, list(metrics["auprc"].values()), "o-", color=POISONED, label="auPRC")
    axis.plot(ks, list(metrics["auroc"].values()), "s--", color="#3b6fd6", label="auROC")
    chance = metrics["n_poisoned"] / metrics["n_samples"]
    axis.axhline(chance, color=CLEAN, linestyle=":", label=f"auPRC by chance ({chance:.3f})")
    axis.set_xscale("log")
    axis.minorticks_off()
    axis.set_xticks(ks, [str(k) for k in ks])
    axis.set_ylim(0, 1.02)
    axis.set_xlabel("k")
    axis.set_title("Backdoor retrieval (mean over attacked queries)", fontsize=10)
    axis.legend(fontsize=8, frameon=False, loc="lower left")
    figure.tight_layout()
    figure.savefig(out, dpi=110, format="png")
    plt.close(figure)
