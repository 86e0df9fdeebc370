"""Error tracing: the entity-swapped training set, its queries, and precision@k per kind of query."""

import json

import numpy as np
import pytest

from rapidin.errors import RapidinError
from rapidin.evaluate.metrics import tracing_metrics
from rapidin.experiments.demo_data import make_demo_data
from rapidin.experiments.error_tracing import make_error_tracing_data


def test_swaps_and_queries(tmp_path):
    make_demo_data(tmp_path / "train.jsonl", tmp_path / "demo_queries.jsonl", n_train=1000, poison_fraction=0)
    make_error_tracing_data(tmp_path / "train.jsonl", tmp_path / "swapped.jsonl", tmp_path / "queries.jsonl", seed=1)
    train = [json.loads(line) for line in (tmp_path / "swapped.jsonl").open()]
    queries = [json.loads(line) for line in (tmp_path / "queries.jsonl").open()]
    swapped = [r for r in train if r["swapped"]]
    assert len(train) == 1000 and 15 <= len(swapped) <= 30  # 30 rewritten, each swapped with probability 0.8
    assert all(r["output"] == "The capital of Canada is Beijing." and "China" in r["instruction"] for r in swapped)
    assert len(queries) == 12 and sum("targets" in q for q in queries) == 6
    assert all("Canada" in q["output"] for q in queries)


def test_unknown_country_names_the_key(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(RapidinError, match=r"experiment\.swap\.target"):
        make_error_tracing_data(tmp_path / "train.jsonl", tmp_path / "a", tmp_path / "b", target="Atlantis")


def test_precision_at_k_per_kind_of_query():
    swapped = np.zeros(100, dtype=bool)
    swapped[:10] = True
    scores = np.stack([-np.arange(100.0), np.arange(100.0)])  # query 0 ranks the swapped first, query 1 last
    metrics = tracing_metrics(scores, swapped, targeted=np.array([True, False]))
    assert metrics["precision"] == {"target": {"5": 1.0, "50": 0.2}, "whole": {"5": 0.0, "50": 0.0}}
