"""Plain reference implementations of the backdoor metrics (method.md §7), written from their definitions without
scikit-learn, to check the metrics.json and tables users read."""

from __future__ import annotations

import numpy as np


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Σ over distinct score thresholds, highest first, of (recall gain) × precision at that threshold."""
    ap, recall_before = 0.0, 0.0
    for threshold in sorted(set(scores.tolist()), reverse=True):
        chosen = scores >= threshold
        hits = int((labels & chosen).sum())
        recall = hits / labels.sum()
        ap += (recall - recall_before) * hits / chosen.sum()
        recall_before = recall
    return ap


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """The share of (positive, negative) pairs ranked right, ties counting one half."""
    positive, negative = scores[labels][:, None], scores[~labels][None, :]
    return float(((positive > negative) + 0.5 * (positive == negative)).mean())


def backdoor_metrics(scores: np.ndarray, labels: np.ndarray, attacked: np.ndarray, ks=(5, 10, 50, 100, 500, 1000)):
    """Per k ≤ N/2: auPRC and auROC over each attacked query's top-k ∪ bottom-k (ranked by score, equal scores by
    index), averaged over attacked queries; and the mean full-ranking AP. NaN samples left out."""
    keep = ~np.isnan(scores[attacked]).any(axis=0)
    scores, labels = scores[:, keep], labels[keep]
    n = len(labels)
    auprc, auc = {}, {}
    for k in (k for k in ks if 2 * k <= n):
        per_query = []
        for row in scores[attacked]:
            order = sorted(range(n), key=lambda i, row=row: (-row[i], i))
            chosen = np.array(order[:k] + order[-k:])
            y, s = labels[chosen], row[chosen]
            per_query.append((y.mean(), 0.5) if y.all() or not y.any() else (average_precision(y, s), auroc(y, s)))
        auprc[str(k)], auc[str(k)] = (float(np.mean(column)) for column in zip(*per_query, strict=True))
    ap_full = float(np.mean([average_precision(labels, row) for row in scores[attacked]]))
    return {"auprc": auprc, "auroc": auc, "ap_full": ap_full}
