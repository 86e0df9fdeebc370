"""On-the-fly scoring (rapidin.score.stream): the same score stores as caching then scoring, with no training vector
written, a refusal of query stores made otherwise, and a kill-and-resume that ends bit-identical."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from rapidin.cache.shard import CacheSettings, cache_gradients
from rapidin.errors import StoreMismatchError
from rapidin.score.scores import merge_scores, score_shard
from rapidin.score.stream import stream_scores
from rapidin.store import STOP_AFTER_CHUNK

SETTINGS = CacheSettings(k=(1024, 4096), model_dtype="float32")  # stored as float16, as caches are by default
SHARD = {"shard": 1, "n_shards": 3}  # rows 100…200 of the 300 training samples
CHUNK_ROWS = 7  # 15 chunks, the last one ragged
CHUNKED = dataclasses.replace(SETTINGS, chunk_rows=CHUNK_ROWS)
TOP_K = 5


@pytest.fixture(scope="module", autouse=True)
def one_thread():  # for every computation of the module, so that streamed runs are bit-identical
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def common(model_and_tokens) -> dict:
    return {"model_path": str(model_and_tokens / "model"), "device": "cpu"}


@pytest.fixture(scope="module")
def query_stores(model_and_tokens, tmp_path_factory) -> list[str]:
    """The queries' vectors and their per-token vectors, as the workflow caches them."""
    root, tokens = tmp_path_factory.mktemp("queries"), str(model_and_tokens / "tokens/queries.zarr")
    stores = [str(root / "queries.zarr"), str(root / "token_queries.zarr")]
    for store, per_token in zip(stores, (False, True), strict=True):
        cache_gradients(tokens, out=store, settings=SETTINGS, per_token=per_token, **common(model_and_tokens))
    return stores


@pytest.fixture(scope="module")
def cached(model_and_tokens, query_stores, tmp_path_factory) -> tuple[Path, list[str]]:
    """The cached path: the training shard's vectors, then each query store scored against them."""
    root = tmp_path_factory.mktemp("cached")
    tokens = str(model_and_tokens / "tokens/train.zarr")
    cache = str(root / "train.zarr")
    cache_gradients(tokens, out=cache, settings=CHUNKED, **SHARD, **common(model_and_tokens))
    scores = [str(root / f"scores-{i}.zarr") for i in range(len(query_stores))]
    for queries, out in zip(query_stores, scores, strict=True):
        score_shard(queries, cache, out, TOP_K, device="cpu")
    return Path(cache), scores


def stream(model_and_tokens, query_stores, out: list[str], **kwargs) -> None:
    tokens, args = str(model_and_tokens / "tokens/train.zarr"), {**common(model_and_tokens), **kwargs}
    stream_scores(tokens, queries=query_stores, out=out, settings=CHUNKED, top_k=TOP_K, **SHARD, **args)


@pytest.fixture(scope="module")
def streamed(model_and_tokens, query_stores, tmp_path_factory) -> list[Path]:
    """The same shard scored on the fly against both query stores, uninterrupted."""
    root = tmp_path_factory.mktemp("streamed")
    out = [root / "scores.zarr", root / "token_scores.zarr"]
    stream(model_and_tokens, query_stores, list(map(str, out)))
    return out


def test_streamed_scores_are_the_cached_paths_and_nothing_else_is_written(query_stores, cached, streamed):
    out, (cache, expected) = streamed, cached
    assert sorted(p.name for p in out[0].parent.iterdir()) == ["scores.zarr", "token_scores.zarr"]  # no vectors
    rows = zarr.open_group(cache, mode="r")["k4096"][:].astype(np.float64)  # (100, K)
    for queries, path, expected_path in zip(query_stores, out, expected, strict=True):
        group, reference = zarr.open_group(path, mode="r"), zarr.open_group(expected_path, mode="r")
        assert dict(group.attrs) == dict(reference.attrs)  # settings, top_k, query fingerprint, rows, tokens
        assert sorted(group.array_keys()) == sorted(reference.array_keys())
        scores = group["scores"][:]
        np.testing.assert_allclose(scores, reference["scores"][:], rtol=1e-4, atol=0)
        # and both against a plain fp64 product of the cached rows with the query vectors
        exact = zarr.open_group(queries, mode="r")["k4096"][:].astype(np.float64) @ rows.T  # (Q, 100)
        np.testing.assert_allclose(scores, exact, rtol=1e-4, atol=1e-5 * np.abs(exact).max())
        np.testing.assert_array_equal(group["ids"][:], np.arange(100, 200))
        for name, sign in (("top", -1), ("bottom", 1)):
            best = np.take_along_axis(exact, group[f"{name}_ids"][:] - 100, 1)  # exact scores of the chosen
            expected_best = sign * np.sort(sign * exact, axis=1)[:, :TOP_K]  # the k best exact scores, in order
            np.testing.assert_allclose(best, expected_best, rtol=1e-4, atol=1e-5 * np.abs(exact).max())
            np.testing.assert_allclose(group[f"{name}_scores"][:], reference[f"{name}_scores"][:], rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_streaming_on_a_gpu_gives_the_scores_of_the_cpu_cache(model_and_tokens, query_stores, cached, tmp_path):
    out = [str(tmp_path / "scores.zarr"), str(tmp_path / "token_scores.zarr")]
    stream(model_and_tokens, query_stores, out, device="cuda")  # fp32 model math on the GPU
    for streamed, expected in zip(out, cached[1], strict=True):
        scores, reference = (
            zarr.open_group(streamed, mode="r")["scores"][:],
            zarr.open_group(expected, mode="r")["scores"][:],
        )
        np.testing.assert_allclose(scores, reference, rtol=1e-3, atol=1e-4 * np.abs(reference).max())


def test_merge_takes_streamed_and_cached_shards_alike(model_and_tokens, query_stores, cached, tmp_path):
    """Shard 1 streamed, shards 0 and 2 cached and scored: one merged store over all 300 samples."""
    queries, (_, expected) = query_stores[0], cached
    tokens = str(model_and_tokens / "tokens/train.zarr")
    shards = []
    for shard in (0, 2):
        cache, scores = str(tmp_path / f"cache-{shard}.zarr"), str(tmp_path / f"scores-{shard}.zarr")
        cache_gradients(tokens, out=cache, settings=SETTINGS, shard=shard, n_shards=3, **common(model_and_tokens))
        score_shard(queries, cache, scores, TOP_K, device="cpu")
        shards.append(scores)
    streamed = str(tmp_path / "scores-1.zarr")
    stream(model_and_tokens, [queries], [streamed])
    merge_scores([shards[0], streamed, shards[1]], queries, str(tmp_path / "merged.zarr"))
    merged = zarr.open_group(tmp_path / "merged.zarr", mode="r")["scores"][:]  # (Q, 300)
    np.testing.assert_array_equal(merged[:, 100:200], zarr.open_group(expected[0], mode="r")["scores"][:])
    assert merged.shape[1] == 300 and np.all(merged != 0)


def test_query_store_made_otherwise_is_refused_naming_the_field(model_and_tokens, tmp_path):
    queries = str(tmp_path / "queries.zarr")
    other = CacheSettings(k=SETTINGS.k, seed=1)
    cache_gradients(
        str(model_and_tokens / "tokens/queries.zarr"), out=queries, settings=other, **common(model_and_tokens)
    )
    with pytest.raises(StoreMismatchError, match=r"queries.zarr was made with seed=1 but .* has seed=0"):
        stream(model_and_tokens, [queries], [str(tmp_path / "scores.zarr")])
    assert not list(tmp_path.glob("scores.zarr*"))


CHILD = """
import sys, torch
from rapidin.cache.shard import CacheSettings
from rapidin.score.stream import stream_scores
torch.set_num_threads(1)
tokens, model, q0, q1, o0, o1 = sys.argv[1:]
stream_scores(tokens, model, [q0, q1], [o0, o1], CacheSettings(k=(1024, 4096), model_dtype="float32", chunk_rows=7), 5,
              shard=1, n_shards=3, device="cpu")
"""


def test_killed_stream_resumes_from_its_last_chunk(model_and_tokens, query_stores, streamed, tmp_path, caplog):
    out = [tmp_path / "scores.zarr", tmp_path / "token_scores.zarr"]
    partials = [Path(f"{o}.partial") for o in out]
    args = [str(model_and_tokens / "tokens/train.zarr"), str(model_and_tokens / "model"), *query_stores, *map(str, out)]
    env = {**os.environ, STOP_AFTER_CHUNK: "6", "TQDM_DISABLE": "1"}
    result = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    # killed once the first store had 6 chunks flagged: the second had not flagged its 6th yet
    assert [int(zarr.open_group(p, mode="r")["done"][:].sum()) for p in partials] == [6, 5]
    kept = {c: (partials[0] / "scores/c/0" / str(c)).stat().st_mtime_ns for c in range(6)}

    caplog.set_level(logging.INFO)
    stream(model_and_tokens, query_stores, list(map(str, out)))
    assert f"resuming {partials[0]}: 6 of 15 chunks done" in caplog.text
    assert f"resuming {partials[1]}: 5 of 15 chunks done" in caplog.text
    assert {c: (out[0] / "scores/c/0" / str(c)).stat().st_mtime_ns for c in range(6)} == kept  # not rewritten
    for resumed, expected in zip(out, streamed, strict=True):
        a, b = zarr.open_group(resumed, mode="r"), zarr.open_group(expected, mode="r")
        assert dict(a.attrs) == dict(b.attrs)
        assert sorted(a.array_keys()) == sorted(b.array_keys())
        for name in b.array_keys():
            assert a[name][:].tobytes() == b[name][:].tobytes(), name  # bit-identical to the uninterrupted run
