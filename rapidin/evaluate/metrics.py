"""The paper's backdoor-retrieval protocol (method.md §7) on merged scores.

For each attacked query, rank all training samples by score, take the top-k and bottom-k, label each
"poisoned or not" and compute auPRC (average precision) and auROC over those 2k; average over queries,
for k in 5, 10, 50, 100, 500, 1000 with k ≤ N/2. `ap_full` is the average precision over the full ranking.
Training records marked `swapped` (error tracing) add the precision@k of
`tracing_metrics` (error tracing: rapidin.experiments.error_tracing).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import zarr
from sklearn.metrics import average_precision_score, roc_auc_score

from rapidin.data.records import Record, read_records
from rapidin.store import atomic_file

log = logging.getLogger(__name__)

KS = (5, 10, 50, 100, 500, 1000)
TRACING_KS = (5, 50)  # error tracing's precision@k


def poisoned_labels(train: list[Record]) -> np.ndarray | None:
    """Boolean labels from the records' `poisoned` field, or None when the data carries none."""
    if not any("poisoned" in r.meta for r in train):
        return None
    return np.array([bool(r.meta.get("poisoned", False)) for r in train])


def top_bottom_metrics(scores: np.ndarray, labels: np.ndarray, k: int) -> tuple[float, float]:
    """(auPRC, auROC) of `labels` over one query's top-k ∪ bottom-k samples ranked by score."""
    order = np.argsort(-scores, kind="stable")
    chosen = np.concatenate([order[:k], order[-k:]])
    y, s = labels[chosen], scores[chosen]
    if y.all() or not y.any():  # one class only: precision is that class, ranking is uninformative
        return float(y.mean()), 0.5
    return float(average_precision_score(y, s)), float(roc_auc_score(y, s))


def backdoor_metrics(scores: np.ndarray, labels: np.ndarray, attacked: np.ndarray) -> dict:
    """Averages over the attacked queries (rows of scores (Q, N)) of top/bottom-k auPRC, auROC and full AP.

    Samples with a NaN score for an attacked query (their gradient was not finite) are left out of every metric
    (`n_excluded`); `n_samples` and `n_poisoned` count the samples ranked.
    """
    excluded = np.isnan(scores[attacked]).any(axis=0)  # (N,)
    scores, labels = scores[:, ~excluded], labels[~excluded]
    n = scores.shape[1]
    ks = [k for k in KS if k <= n // 2]
    rows = np.flatnonzero(attacked)
    per_k = {k: np.array([top_bottom_metrics(scores[q], labels, k) for q in rows]) for k in ks}
    return {
        "auprc": {str(k): float(v[:, 0].mean()) for k, v in per_k.items()},
        "auroc": {str(k): float(v[:, 1].mean()) for k, v in per_k.items()},
        "ap_full": float(np.mean([average_precision_score(labels, scores[q]) for q in rows])),
        "n_attacked_queries": len(rows),
        "n_poisoned": int(labels.sum()),
        "n_samples": n,
        "n_excluded": int(excluded.sum()),
    }


def evaluate(
    scores_path: str,
    train: str,
    queries: str,
    out: str,
    attack_success_rate: float | None = None,
    fields: dict[str, str] | None = None,
) -> dict:
    """Write metrics.json; metrics are skipped (with a warning) unless poisoned samples and attacked queries exist."""
    scores = zarr.open_group(scores_path, mode="r")["scores"][:]
    train_records = read_records(train, fields=fields)
    query_records = read_records(queries, require_output=False, fields=fields)
    labels = poisoned_labels(train_records)
    attacked = np.array([bool(r.meta.get("attacked", False)) for r in query_records])
    metrics: dict = {"attack_success_rate": attack_success_rate}
    if any("swapped" in r.meta for r in train_records):  # error tracing
        swapped = np.array([bool(r.meta.get("swapped", False)) for r in train_records])
        metrics |= tracing_metrics(
            scores, swapped, np.array([r.meta.get("targets") is not None for r in query_records])
        )
    if labels is None or not labels.any():
        log.warning("%s has no poisoned samples: backdoor metrics skipped", train)
    elif not attacked.any():
        log.warning("%s has no attacked queries: backdoor metrics skipped", queries)
    else:
        metrics = {**backdoor_metrics(scores, labels, attacked), **metrics}
    with atomic_file(out) as handle:
        json.dump(metrics, handle, indent=2)
    return metrics


def tracing_metrics(scores: np.ndarray, swapped: np.ndarray, targeted: np.ndarray) -> dict:
    """Precision@k of swapped samples among the top-k of each query (rows of scores (Q, N)), mean over the
    whole-response queries and over the target-span ones (`targeted`)."""
    top = np.argsort(-scores, axis=1, kind="stable")  # (Q, N)
    result = {}
    for kind, rows in (("whole", ~targeted), ("target", targeted)):
        if rows.any():
            result[kind] = {str(k): float(swapped[top[rows, :k]].mean()) for k in TRACING_KS}
    return {"precision": result, "n_swapped": int(swapped.sum()), "n_samples": scores.shape[1]}
