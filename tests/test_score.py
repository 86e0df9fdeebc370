"""Scoring against plain references: shard scores, merged scores and top-k/bottom-k equal an fp64 GEMM of the
fp16 rows and a Python sort over ragged shards; ties never put one sample at both ends; NaN samples (skipped
gradients) are never ranked; topk.jsonl lists exactly those samples."""

import json
import re

import numpy as np
import pytest
import xarray as xr
import zarr

from rapidin.errors import StoreMismatchError
from rapidin.score import scores as score
from rapidin.score.scores import merge_scores, score_shard, write_topk

K = 8
SETTINGS = {"compressor": "rapidgrad", "k": [K], "seed": 0, "D": 100, "model": "m", "normalize": True}


def vector_store(path, vectors: np.ndarray, ids: np.ndarray, chunk_rows: int, compressed: bool = False, **arrays):
    """A gradient store as caching writes it: array `k8` (rows, K) chunked by rows, `ids`, settings."""
    group = zarr.open_group(path, mode="w", zarr_format=3)
    group.create_array(
        f"k{K}", data=vectors, chunks=(chunk_rows, K), compressors="auto" if compressed else None
    )  # uncompressed chunks are read mapped from their files, compressed ones through Zarr
    group.create_array("ids", data=ids)
    for name, values in arrays.items():
        group.create_array(name, data=values)
    group.attrs["rapidin"] = SETTINGS
    return str(path)


def naive_ends(row: np.ndarray, k: int) -> tuple[list[int], list[int]]:
    """Top-k and bottom-k sample indices of one row: sort by (score descending, index ascending), NaN left out;
    bottom-k is that order's end, read backwards, among the samples not in top-k."""
    order = sorted((i for i in range(len(row)) if not np.isnan(row[i])), key=lambda i: (-row[i], i))
    return order[:k], order[k:][::-1][:k]


def score_ragged_shards(tmp_path, queries: np.ndarray, train: np.ndarray, top_k: int, sizes=(10, 7, 6)) -> str:
    """Score `train` (N, K) fp16 in shards of `sizes` rows (chunks of 4 rows, the last one short) and merge."""
    query_store = vector_store(tmp_path / "queries.zarr", queries, np.arange(len(queries)), len(queries))
    shards, lo = [], 0
    for s, size in enumerate(sizes):
        rows = slice(lo, lo + size)
        cache = vector_store(tmp_path / f"cache{s}.zarr", train[rows], np.arange(lo, lo + size), 4, compressed=s == 1)
        score_shard(query_store, cache, str(tmp_path / f"scores{s}.zarr"), top_k, device="cpu")
        shards.append(str(tmp_path / f"scores{s}.zarr"))
        lo += size
    merge_scores(shards, query_store, str(tmp_path / "scores.zarr"))
    return str(tmp_path / "scores.zarr")


def assert_ends_are_naive(group: zarr.Group, k: int) -> None:
    """Each row's top_/bottom_ ids and scores are naive_ends of its stored scores, padded with -1 and NaN."""
    matrix = group["scores"][:]
    for q, row in enumerate(matrix):
        for name, want in zip(("top", "bottom"), naive_ends(row, k), strict=True):
            ids, values = group[f"{name}_ids"][q], group[f"{name}_scores"][q]
            assert ids.tolist() == want + [-1] * (k - len(want)), (name, q)
            np.testing.assert_array_equal(values[: len(want)], row[want])
            assert np.isnan(values[len(want) :]).all()


def data(n_queries: int = 3, n: int = 23, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    generator = np.random.default_rng(seed)
    queries = generator.standard_normal((n_queries, K)).astype(np.float16)
    train = generator.standard_normal((n, K)).astype(np.float16)
    train[[4, 12, 20]] = train[8]  # equal scores, within a shard and across shards
    return queries, train


@pytest.mark.parametrize("top_k", [3, 5, 15])  # k < every shard, 2k > a shard, 2k > N
def test_merged_scores_and_ends_equal_a_plain_gemm_and_sort(tmp_path, top_k):
    queries, train = data()
    group = zarr.open_group(score_ragged_shards(tmp_path, queries, train, top_k), mode="r")
    want = queries.astype(np.float64) @ train.astype(np.float64).T  # (Q, N) from the fp16 values
    np.testing.assert_allclose(group["scores"][:], want, rtol=1e-6, atol=1e-6)
    assert group["top_ids"].shape == (3, top_k)
    assert_ends_are_naive(group, top_k)
    tops, bottoms = group["top_ids"][:], group["bottom_ids"][:]
    assert all(not set(t) & set(b) - {-1} for t, b in zip(tops, bottoms, strict=True))


@pytest.mark.parametrize("top_k", [4, 7])  # 2k ≤ the shard's 10 samples; 2k > 10: bottom-k padded with -1
def test_shard_scores_and_ends_equal_a_plain_gemm_and_sort(tmp_path, top_k):
    queries, train = data()
    train = train[:10]
    query_store = vector_store(tmp_path / "queries.zarr", queries, np.arange(3), 3)
    cache = vector_store(tmp_path / "cache.zarr", train, np.arange(40, 50), 4)
    score_shard(query_store, cache, str(tmp_path / "scores.zarr"), top_k, device="cpu")
    group = zarr.open_group(tmp_path / "scores.zarr", mode="r")
    np.testing.assert_allclose(group["scores"][:], queries.astype(float) @ train.astype(float).T, rtol=1e-6, atol=1e-6)
    assert group["ids"][:].tolist() == list(range(40, 50))
    for q, row in enumerate(group["scores"][:]):
        for name, want in zip(("top", "bottom"), naive_ends(row, top_k), strict=True):
            padding = [-1] * (top_k - len(want))
            assert group[f"{name}_ids"][q].tolist() == [40 + i for i in want] + padding  # training ids, not positions
            np.testing.assert_array_equal(group[f"{name}_scores"][q][: len(want)], row[want])
            assert np.isnan(group[f"{name}_scores"][q][len(want) :]).all()


def test_shard_records_what_it_scored_and_opens_in_xarray(tmp_path):
    """A shard's settings: the cache's shared fields, tokens, dtype and chunking, and a fingerprint of the queries
    (equal for the same query vectors, not for others); xarray reads it with named dimensions and the ids."""
    queries, train = data()
    cache = vector_store(tmp_path / "cache.zarr", train[:10], np.arange(40, 50), 4)
    group = zarr.open_group(cache, mode="r+")
    group.attrs["rapidin"] = {**SETTINGS, "tokens": "a1b2", "dtype": "float16"}
    stamps = []
    for name, vectors in (("first", queries), ("again", queries), ("other", queries[::-1].copy())):
        store = vector_store(tmp_path / f"{name}-queries.zarr", vectors, np.arange(3), 3)
        score_shard(store, cache, str(tmp_path / f"{name}.zarr"), 2)  # the default device: the CPU here
        stamps.append(zarr.open_group(tmp_path / f"{name}.zarr", mode="r").attrs["rapidin"])
    first = stamps[0]
    assert {f: first[f] for f in score.SHARED_FIELDS} == {f: SETTINGS.get(f) for f in score.SHARED_FIELDS}
    assert (first["cache_tokens"], first["cache_dtype"], first["chunk_rows"]) == ("a1b2", "float16", 4)
    assert first["queries"] == stamps[1]["queries"] != stamps[2]["queries"]
    dataset = xr.open_zarr(tmp_path / "first.zarr", consolidated=False)
    assert dataset["scores"].dims == ("query", "sample") and dataset["ids"].dims == ("sample",)
    assert {dataset[f"{side}_{kind}"].dims for side in ("top", "bottom") for kind in ("ids", "scores")} == {
        ("query", "rank")
    }


def test_equal_scores_never_put_a_sample_at_both_ends(tmp_path):
    """A zero query scores 0 against every sample: top-k are the first k samples, bottom-k the last ones."""
    queries, train = data()
    queries[1] = 0
    group = zarr.open_group(score_ragged_shards(tmp_path, queries, train, 5), mode="r")
    assert group["top_ids"][1].tolist() == [0, 1, 2, 3, 4]
    assert group["bottom_ids"][1].tolist() == [22, 21, 20, 19, 18]
    assert_ends_are_naive(group, 5)


def test_nan_samples_are_never_ranked(tmp_path):
    """Samples whose gradient was not finite are cached as NaN rows: their scores are NaN, never top or bottom."""
    queries, train = data()
    nan = [0, 9, 10, 16, 17, 18, 19, 20, 21, 22]  # the first row, both ends of shard 0, all but one of shard 2
    train[nan] = np.nan
    group = zarr.open_group(score_ragged_shards(tmp_path, queries, train, 6), mode="r")
    assert np.isnan(group["scores"][:, nan]).all() and not np.isnan(np.delete(group["scores"][:], nan, 1)).any()
    assert_ends_are_naive(group, 6)  # 13 scored samples: 6 top, 6 bottom
    assert not set(nan) & {*group["top_ids"][:].ravel(), *group["bottom_ids"][:].ravel()}


def test_running_topk_over_many_reads(tmp_path, monkeypatch):
    """Columns read a few at a time (as a large shard is) give the same ends as the naive sort."""
    generator = np.random.default_rng(1)
    matrix = generator.standard_normal((4, 50)).astype(np.float32)
    matrix[:, 20:30] = 0.5  # ties spanning reads
    matrix[2, 5:45] = np.nan
    scores = zarr.create_array(tmp_path / "s.zarr", data=matrix, chunks=(4, 3))
    monkeypatch.setattr(score, "TOPK_READ_BYTES", 4 * 4 * 3 * 2)  # two chunks of 3 columns per read
    best = score.running_topk(scores, 7)
    for q, row in enumerate(matrix):
        top, bottom = naive_ends(row, 7)
        assert best["top"][0][q].tolist() == top + [-1] * (7 - len(top))
        assert best["bottom"][0][q].tolist() == bottom + [-1] * (7 - len(bottom))
        np.testing.assert_array_equal(best["top"][1][q][: len(top)], row[top])
        np.testing.assert_array_equal(best["bottom"][1][q][: len(bottom)], row[bottom])


def test_ends_order_signed_zeros_infinities_and_extremes_by_value():
    values = np.array([[-0.0, 0.0, np.inf, -np.inf, 3e38, -3e38, 1e-45, -1e-45, np.nan, 0.0]], dtype=np.float32)
    best = score.ends(values, np.arange(10)[None], 5, np.array([9]))
    top, bottom = naive_ends(values[0], 5)
    assert best["top"][0][0].tolist() == top == [2, 4, 6, 0, 1]  # -0.0 == 0.0: by index
    assert best["bottom"][0][0].tolist() == [*bottom, -1] == [3, 5, 7, 9, -1]


def test_topk_jsonl_lists_the_ends_with_their_texts(tmp_path):
    queries, train = data(n_queries=2, n=23)
    train[[3, 7]] = np.nan
    scores = score_ragged_shards(tmp_path, queries, train, 12)  # 21 scored samples: 12 helpful, 9 harmful
    records = [  # ids on odd samples only (the index stands in), an input and metadata on some, non-ASCII text
        {"instruction": f"do {i}", "output": f"done {i} é"}
        | ({"id": f"s{i}"} if i % 2 else {})
        | ({"input": "ctx", "poisoned": True} if i % 3 == 0 else {})
        for i in range(23)
    ]
    write_jsonl(tmp_path / "train.jsonl", records)
    write_jsonl(tmp_path / "queries.jsonl", [{"instruction": "why", "output": "because"}, {"instruction": "how"}])
    write_topk(scores, str(tmp_path / "train.jsonl"), str(tmp_path / "queries.jsonl"), str(tmp_path / "topk.jsonl"))
    matrix = zarr.open_array(f"{scores}/scores", mode="r")[:]
    text = (tmp_path / "topk.jsonl").read_text(encoding="utf-8")
    assert "done 0 é" in text  # written as UTF-8, not escaped
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["query"] for line in lines] == [
        {"index": 0, "id": 0, "instruction": "why", "input": "", "output": "because"},
        {"index": 1, "id": 1, "instruction": "how", "input": "", "output": None},
    ]
    for q, line in enumerate(lines):
        for side, want in zip(("helpful", "harmful"), naive_ends(matrix[q], 12), strict=True):
            assert line[side] == [
                {"rank": rank, "index": i, "score": float(matrix[q, i]), "id": records[i].get("id", i)}
                | {"instruction": f"do {i}", "input": records[i].get("input", ""), "output": f"done {i} é"}
                | ({"poisoned": True} if i % 3 == 0 else {})
                for rank, i in enumerate(want, 1)
            ]
        assert len(line["harmful"]) == 9


def test_merge_refuses_shards_that_do_not_cover_the_samples(tmp_path):
    queries, train = data()
    query_store = vector_store(tmp_path / "queries.zarr", queries, np.arange(3), 3)
    shards = []
    for s, rows in enumerate([np.arange(0, 10), np.arange(11, 20)]):  # sample 10 missing
        cache = vector_store(tmp_path / f"cache{s}.zarr", train[rows], rows, 4)
        score_shard(query_store, cache, str(tmp_path / f"scores{s}.zarr"), 3, device="cpu")
        shards.append(str(tmp_path / f"scores{s}.zarr"))
    with pytest.raises(score.RapidinError, match="do not cover training samples 0…18 exactly once"):
        merge_scores(shards, query_store, str(tmp_path / "scores.zarr"))


def test_merged_token_scores_carry_each_rows_query_and_token(tmp_path):
    queries, train = data(n_queries=4)
    query_store = vector_store(
        tmp_path / "tokens.zarr",
        queries,
        np.arange(4),
        4,
        sample_index=np.array([0, 0, 2, 2]),
        token_position=np.array([0, 1, 0, 1]),
    )
    cache = vector_store(tmp_path / "cache.zarr", train, np.arange(23), 4)
    score_shard(query_store, cache, str(tmp_path / "s.zarr"), 2, device="cpu")
    merge_scores([str(tmp_path / "s.zarr")], query_store, str(tmp_path / "merged.zarr"))
    group = zarr.open_group(tmp_path / "merged.zarr", mode="r")
    assert group["query_index"][:].tolist() == [0, 0, 2, 2] and group["token_position"][:].tolist() == [0, 1, 0, 1]


def write_jsonl(path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_merge_refuses_shards_scored_otherwise_naming_both(tmp_path):
    queries, train = data()
    query_store = vector_store(tmp_path / "queries.zarr", queries, np.arange(3), 3)
    shards = []
    for s, rows in enumerate([np.arange(0, 10), np.arange(10, 23)]):
        cache = vector_store(tmp_path / f"cache{s}.zarr", train[rows], rows, 4)
        score_shard(query_store, cache, str(tmp_path / f"scores{s}.zarr"), 3, device="cpu")
        shards.append(str(tmp_path / f"scores{s}.zarr"))
    group = zarr.open_group(shards[1], mode="r+")
    group.attrs["rapidin"] = {**group.attrs["rapidin"], "array": "k4"}
    message = f"{shards[1]} was made with array='k4' but {shards[0]} has array='k8'"
    with pytest.raises(StoreMismatchError, match=re.escape(message)):
        merge_scores(shards, query_store, str(tmp_path / "scores.zarr"))
    assert not (tmp_path / "scores.zarr").exists()


def test_shard_records_the_cache_rows_it_scored(tmp_path):
    """A shard of training ids 40…49 is stamped with the half-open range [40, 50)."""
    queries, train = data()
    query_store = vector_store(tmp_path / "queries.zarr", queries, np.arange(3), 3)
    cache = vector_store(tmp_path / "cache.zarr", train[:10], np.arange(40, 50), 4)
    score_shard(query_store, cache, str(tmp_path / "scores.zarr"), 2, device="cpu")
    assert zarr.open_group(tmp_path / "scores.zarr", mode="r").attrs["rapidin"]["cache_rows"] == [40, 50]


def test_scoring_refuses_queries_sketched_otherwise_naming_both(tmp_path):
    queries, train = data()
    query_store = vector_store(tmp_path / "queries.zarr", queries, np.arange(3), 3)
    cache = vector_store(tmp_path / "cache.zarr", train, np.arange(23), 4)
    group = zarr.open_group(cache, mode="r+")
    group.attrs["rapidin"] = {**SETTINGS, "seed": 1}
    message = f"{cache} was made with seed=1 but {query_store} has seed=0"
    with pytest.raises(StoreMismatchError, match=re.escape(message)):
        score_shard(query_store, cache, str(tmp_path / "scores.zarr"), 3, device="cpu")
    assert not (tmp_path / "scores.zarr").exists()


def test_shard_killed_after_its_ends_were_written_resumes(tmp_path, monkeypatch):
    """A job killed between writing top-/bottom-k and publishing reruns to the same, naive, ends."""
    queries, train = data()
    query_store = vector_store(tmp_path / "queries.zarr", queries, np.arange(3), 3)
    cache = vector_store(tmp_path / "cache.zarr", train, np.arange(23), 4)
    out = str(tmp_path / "scores.zarr")

    def killed(_store):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(score.ResumableStore, "publish", killed)
        with pytest.raises(KeyboardInterrupt):
            score_shard(query_store, cache, out, 4, device="cpu")
    assert zarr.open_group(f"{out}.partial", mode="r")["top_ids"].shape == (3, 4)
    score_shard(query_store, cache, out, 4, device="cpu")
    group = zarr.open_group(out, mode="r")
    np.testing.assert_allclose(group["scores"][:], queries.astype(float) @ train.astype(float).T, rtol=1e-6, atol=1e-6)
    for q, row in enumerate(group["scores"][:]):
        assert [group["top_ids"][q].tolist(), group["bottom_ids"][q].tolist()] == list(map(list, naive_ends(row, 4)))


def test_a_resumed_shard_counts_on_from_the_rows_it_had_scored(tmp_path, monkeypatch, capsys):
    """Killed when writing its second chunk (4 of its 10 rows written), the rerun scores the other 6 and its progress
    lines count on from 4: 8/10, then 10/10 rows; the scores are the plain GEMM's."""
    queries, train = data()
    train = train[:10]
    query_store = vector_store(tmp_path / "queries.zarr", queries, np.arange(3), 3)
    cache = vector_store(tmp_path / "cache.zarr", train, np.arange(40, 50), 4)
    out = str(tmp_path / "scores.zarr")
    write, written = score.write_scores, []

    def killed_after_the_first(store, scored):
        if written:
            raise KeyboardInterrupt
        written.extend(chunk for chunk, _ in scored)
        write(store, scored)

    with monkeypatch.context() as patch:
        patch.setattr(score, "write_scores", killed_after_the_first)
        with pytest.raises(KeyboardInterrupt):
            score_shard(query_store, cache, out, 3, device="cpu")
    assert written == [0]
    capsys.readouterr()
    score_shard(query_store, cache, out, 3, device="cpu")
    assert re.findall(r"scores cache\.zarr: (\d+/\d+) rows", capsys.readouterr().err) == ["8/10", "10/10"]
    scores = zarr.open_group(out, mode="r")["scores"][:]
    np.testing.assert_allclose(scores, queries.astype(float) @ train.astype(float).T, rtol=1e-6, atol=1e-6)


def test_topk_jsonl_reads_renamed_fields(tmp_path):
    """`fields` maps our names to the files' own: texts come from `prompt` and `answer`."""
    queries, train = data(n_queries=1)
    train = train[:5]
    scores = score_ragged_shards(tmp_path, queries, train, 2, sizes=(5,))
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"do {i}", "answer": f"done {i}"} for i in range(5)])
    write_jsonl(tmp_path / "queries.jsonl", [{"prompt": "why"}])
    fields = {"instruction": "prompt", "output": "answer"}
    train_file, query_file = str(tmp_path / "train.jsonl"), str(tmp_path / "queries.jsonl")
    write_topk(scores, train_file, query_file, str(tmp_path / "t.jsonl"), fields)
    (line,) = [json.loads(text) for text in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert line["query"]["instruction"] == "why"
    top, _ = naive_ends(queries[0].astype(np.float64) @ train.astype(np.float64).T, 2)
    assert [(h["instruction"], h["output"]) for h in line["helpful"]] == [(f"do {i}", f"done {i}") for i in top]
