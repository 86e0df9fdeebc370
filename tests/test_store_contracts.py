"""The stores as others read them: every Zarr store of a run opens in xarray without a warning, with named
dimensions and the ids of its rows and columns."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import xarray as xr

pytestmark = pytest.mark.slow

STORES = [
    "tokens/train.zarr",
    "tokens/queries.zarr",
    "cache/train/00000.zarr",
    "cache/queries.zarr",
    "cache/token_queries.zarr",
    "cache/token_train.zarr",
    "scores/00001.zarr",
    "scores/token_00000.zarr",
    "influence/scores.zarr",
    "influence/token_scores.zarr",
]


@pytest.mark.parametrize("store", STORES)
def test_every_store_opens_in_xarray_without_warnings(tiny_run, store):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset = xr.open_zarr(tiny_run / store, consolidated=False)
    assert dataset.data_vars and dataset.attrs["rapidin"]
    assert not list((tiny_run / store).glob(".snakemake*"))


def test_scores_carry_the_ids_of_their_rows_and_columns(tiny_run):
    dataset = xr.open_zarr(tiny_run / "influence/scores.zarr", consolidated=False)
    n_train = sum(1 for _ in (tiny_run / "data/train.jsonl").open())
    n_queries = sum(1 for _ in (tiny_run / "queries.jsonl").open())
    assert dataset["scores"].dims == ("query", "sample") and dataset["scores"].shape == (n_queries, n_train)
    np.testing.assert_array_equal(dataset["sample"].values, np.arange(n_train))
    np.testing.assert_array_equal(dataset["query"].values, np.arange(n_queries))
    assert dataset["top_ids"].dims == ("query", "rank")
    topk = [json.loads(line) for line in (tiny_run / "influence/topk.jsonl").open()]
    first = topk[1]["helpful"][0]  # the best sample of query 1, as topk.jsonl names it
    assert float(dataset["scores"].sel(query=1, sample=first["index"])) == pytest.approx(first["score"], rel=1e-6)
    cache = xr.open_zarr(tiny_run / "cache/train/00001.zarr", consolidated=False)
    assert cache["k4096"].dims == ("row", "k4096_component")
    np.testing.assert_array_equal(cache["ids"].values, np.arange(n_train // 2, n_train))


def test_the_size_plan_matches_what_was_written(tiny_run):
    """results/<name>/plan.json, written before any heavy job, against the stores written afterwards."""
    plan = json.loads((tiny_run / "plan.json").read_text())
    cache = [xr.open_zarr(tiny_run / f"cache/train/0000{s}.zarr", consolidated=False) for s in (0, 1)]
    assert plan["n_samples"] == sum(c.sizes["row"] for c in cache)
    assert plan["D"] == cache[0].attrs["rapidin"]["D"]
    assert plan["bytes_per_sample"] == sum(
        c[a].shape[1] * c[a].dtype.itemsize for c in cache[:1] for a in ("k1024", "k4096")
    )
    assert plan["cache_bytes"] == sum(c[a].nbytes for c in cache for a in ("k1024", "k4096"))
