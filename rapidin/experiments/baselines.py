"""The paper's baselines, each giving scores laid out like `influence/scores.zarr` (queries × training samples).

- `random_scores`: independent standard-normal scores (the chance level of every metric).
- `bm25_scores`: Okapi BM25 (bm25s, Lucene variant) of each query's text against each training sample's text.
- the influence-function baseline (LiSSA) is in rapidin.lissa.
"""

from __future__ import annotations

import logging

import numpy as np
import zarr

from rapidin.data.records import Record, read_records
from rapidin.errors import RapidinError
from rapidin.store import atomic_dir, write_settings

log = logging.getLogger(__name__)


def write_scores(out: str, scores: np.ndarray, settings: dict) -> None:
    """A scores store at `out`: array `scores` (Q, N) float32 and `attrs["rapidin"]`."""
    with atomic_dir(out) as tmp:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        group.create_array("scores", data=scores.astype(np.float32), dimension_names=("query", "sample"))
        write_settings(group, {**settings, "n_queries": scores.shape[0], "n_samples": scores.shape[1]})


def random_scores(n_queries: int, n_samples: int, seed: int) -> np.ndarray:
    """(Q, N) independent standard-normal scores."""
    return np.random.default_rng(seed).standard_normal((n_queries, n_samples))


def record_text(record: Record) -> str:
    """The text BM25 sees: instruction, input and response."""
    return " ".join(part for part in (record.instruction, record.input, record.output) if part)


def bm25_scores(train: list[Record], queries: list[Record], k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """(Q, N) Okapi BM25 scores of each query's text (as a bag of words) against each training text."""
    import bm25s

    tokenize = dict(stopwords="en", return_ids=False, show_progress=False)
    index = bm25s.BM25(k1=k1, b=b)
    index.index(bm25s.tokenize([record_text(r) for r in train], **tokenize), show_progress=False)
    query_words = bm25s.tokenize([record_text(q) for q in queries], **tokenize)
    return np.stack([index.get_scores(words) for words in query_words])


def baseline_scores(
    method: str, train: str, queries: str, seed: int = 0, fields: dict[str, str] | None = None
) -> np.ndarray:
    """(Q, N) scores of a text-only baseline: `random` or `bm25`."""
    train_records = read_records(train, fields=fields)
    query_records = read_records(queries, require_output=False, fields=fields)
    if method == "random":
        return random_scores(len(query_records), len(train_records), seed)
    if method == "bm25":
        return bm25_scores(train_records, query_records)
    raise RapidinError(f"experiment.methods: {method} is not a text baseline (random, bm25)")
