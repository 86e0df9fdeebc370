"""Influence scores: query vectors × cached training vectors, streamed chunk by chunk, and their top-k.

Per shard, each cache chunk is converted into a preallocated fp32 buffer and multiplied with all queries at
once (one GEMM per chunk, fp32 accumulation), so memory is bounded by two chunks whatever N is; the next
chunk is read while the current one is multiplied. Merging puts
the shards' columns together into one store (rows × training samples, with each row's top-k and bottom-k);
the rows are queries (`scores.zarr`, then `topk.jsonl` with the texts) or, for a per-token query store,
(query, response token) pairs (`token_scores.zarr`, with `query_index` and `token_position` per row).
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import zarr

from rapidin.data.records import read_records
from rapidin.devices import job_device
from rapidin.errors import RapidinError
from rapidin.progress import Progress
from rapidin.store import (
    RANK_DIMS,
    SCORE_DIMS,
    ResumableStore,
    atomic_dir,
    atomic_file,
    check_agree,
    read_row_chunk,
    read_settings,
    write_settings,
)

log = logging.getLogger(__name__)

# Settings a query store and a cache must share for their inner products to mean anything.
SHARED_FIELDS = (
    "model",
    "adapter",
    "tokenizer",
    "template",
    "parameters",
    "D",
    "compressor",
    "k",
    "rank",
    "seed",
    "normalize",
    "sketch_version",
    "model_dtype",
    "device",
    "optimizer",
    "optimizer_state",
)


MAX_WRITE_BATCH = 256  # scored chunks held at most while the writer is busy
TOPK_READ_BYTES = 64 << 20  # scores read at once by running_topk

SIDES = {"helpful": "top", "harmful": "bottom"}  # topk.jsonl's sides and the arrays they come from


def vector_array(settings: dict) -> str:
    """The array scored by default: the exact gradients, the factored sketch, or the largest K."""
    return {"none": "exact", "factored": "factored"}.get(settings["compressor"]) or f"k{max(settings['k'])}"


def score_shard(queries: str, cache: str, out: str, top_k: int, array: str | None = None, device: str = "auto") -> None:
    """Scores of all queries against one cache shard, plus that shard's top-k and bottom-k per query.

    Each cache chunk is read (by a background thread, into one of two preallocated fp32 buffers, pinned for a
    GPU) and multiplied with all queries at once; its (Q, C) scores go to the output store (by another
    thread), which is resumable chunk by chunk. Top-k is then a running merge over the stored score chunks, so
    memory stays at O(chunk · (K + Q) + Q · k) whatever the shard's size.
    """
    query_settings, cache_settings = read_settings(queries), read_settings(cache)
    check_agree(query_settings, cache_settings, SHARED_FIELDS, queries, cache)
    array = array or vector_array(cache_settings)
    torch_device = job_device(device)  # with several GPUs, a leased one
    query_vectors = read_queries(queries, array, torch_device)
    rows = zarr.open_group(cache, mode="r")[array]  # (N, K), chunked by rows
    ids = zarr.open_group(cache, mode="r")["ids"][:]
    n, chunk_rows = rows.shape[0], rows.chunks[0]
    store = open_scores(out, cache_settings, array, query_vectors, ids, chunk_rows, top_k)
    todo = store.remaining()
    buffer = torch.empty(chunk_rows, rows.shape[1], dtype=torch.float32, pin_memory=torch_device.type == "cuda")

    # Scored chunks go to a writer thread in batches: whatever was scored while its last write ran, so a slow
    # write path costs a few large writes, not one small write and one flag update per chunk.
    done = n - sum(min(chunk_rows, n - chunk * chunk_rows) for chunk in todo)
    with ThreadPoolExecutor(max_workers=1) as writer, Progress(n, f"scores {Path(cache).name}", "rows", done) as bar:
        scored, pending_write = [], None
        for chunk in todo:
            block = read_row_chunk(rows, chunk, buffer)  # (C, K) fp32
            scored.append((chunk, (query_vectors @ block.to(torch_device).T).cpu().numpy()))  # (Q, C)
            bar.update(block.shape[0])
            if pending_write is None or pending_write.done() or len(scored) >= MAX_WRITE_BATCH:
                if pending_write is not None:
                    pending_write.result()
                pending_write, scored = writer.submit(write_scores, store, scored), []
        if pending_write is not None:
            pending_write.result()
        write_scores(store, scored)
    finish_scores(store, ids)


def read_queries(queries: str, array: str, device: torch.device) -> torch.Tensor:
    """A query store's vectors `array` as fp32 (Q, K) on `device`."""
    return torch.from_numpy(zarr.open_group(queries, mode="r")[array][:].astype(np.float32)).to(device)


def open_scores(
    out: str, settings: dict, array: str, query_vectors: torch.Tensor, ids: np.ndarray, chunk_rows: int, top_k: int
) -> ResumableStore:
    """The resumable score store of one shard: `scores` (Q, N) in `chunk_rows` columns, `ids` (N,), and the
    training vectors' `settings` (their SHARED_FIELDS and `tokens`) among its own."""
    n_queries, n = query_vectors.shape[0], len(ids)
    stamp = {
        **{f: settings.get(f) for f in SHARED_FIELDS},
        "array": array,
        "top_k": top_k,  # as asked: a shard's ends have min(top_k, its samples) entries, the merged ones min(top_k, N)
        "queries": _fingerprint(query_vectors),
        "cache_rows": [int(ids[0]), int(ids[-1]) + 1],
        "cache_tokens": settings.get("tokens"),
        "cache_dtype": settings.get("dtype"),  # rows rounded to it: a resume must not mix float16 and float32 rows
        "chunk_rows": chunk_rows,
    }

    def create(group: zarr.Group) -> None:
        group.create_array(
            "scores",
            shape=(n_queries, n),
            chunks=(n_queries, chunk_rows),
            dtype=np.float32,
            compressors=None,
            dimension_names=SCORE_DIMS,
        )
        group.create_array("ids", data=ids, dimension_names=("sample",))

    return ResumableStore(out, stamp, -(-n // chunk_rows), create)


def write_scores(store: ResumableStore, scored: list[tuple[int, np.ndarray]]) -> None:
    """Write (chunk, its (Q, C) scores) pairs, chunks ascending, into an open_scores store and flag them done."""
    scores = store.array("scores")
    chunk_rows = scores.chunks[1]
    for run in _contiguous_runs(scored):
        lo = run[0][0] * chunk_rows
        values = np.concatenate([v for _, v in run], axis=1)
        scores[:, lo : lo + values.shape[1]] = values  # one Zarr call for the run's chunks
    store.mark_done([chunk for chunk, _ in scored])


def finish_scores(store: ResumableStore, ids: np.ndarray) -> None:
    """Add each query's top-k and bottom-k (from the stored scores) to an open_scores store and publish it."""
    best = running_topk(store.array("scores"), store.group.attrs["rapidin"]["top_k"])
    for name in ("top", "bottom"):
        positions, values = best[name]
        top_ids = np.where(positions >= 0, ids[positions], -1)
        store.group.create_array(f"{name}_ids", data=top_ids, overwrite=True, dimension_names=RANK_DIMS)
        store.group.create_array(f"{name}_scores", data=values, overwrite=True, dimension_names=RANK_DIMS)
    store.publish()


def _contiguous_runs(scored: list[tuple[int, np.ndarray]]) -> list[list[tuple[int, np.ndarray]]]:
    """Split (chunk, values) pairs, chunks ascending, into runs of consecutive chunks."""
    runs = []
    for item in scored:
        if runs and item[0] == runs[-1][-1][0] + 1:
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


def _fingerprint(vectors: torch.Tensor) -> str:
    return hashlib.sha256(vectors.cpu().numpy().tobytes()).hexdigest()[:16]


def running_topk(scores: zarr.Array, k: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per row, the column positions and values (Q, k) of the k highest ("top") and k lowest ("bottom") scores,
    read TOPK_READ_BYTES of columns at a time; ranked as `ends` ranks them (NaN excluded, the two ends disjoint)."""
    n_queries, n = scores.shape
    step = scores.chunks[1] * max(1, TOPK_READ_BYTES // (4 * n_queries * scores.chunks[1]))
    best = {largest: (torch.empty(n_queries, 0), torch.empty(n_queries, 0, dtype=torch.long)) for largest in (1, 0)}
    n_valid = torch.zeros(n_queries, dtype=torch.long)
    for lo in range(0, n, step):
        chunk = torch.from_numpy(scores[:, lo : lo + step])  # (Q, S)
        columns = torch.arange(lo, lo + chunk.shape[1]).expand(n_queries, -1)
        n_valid += (~chunk.isnan()).sum(1)
        for largest, (best_values, best_positions) in best.items():
            values, positions = torch.cat([best_values, chunk], dim=1), torch.cat([best_positions, columns], dim=1)
            best[largest] = _first(values, positions, k, bool(largest))
    return _disjoint(best, n_valid, k)


def ends(values: np.ndarray, positions: np.ndarray, k: int, n_valid: np.ndarray) -> dict:
    """Top-k and bottom-k (positions, values), each (Q, k), of rows of scores (Q, M) at `positions` (column or
    sample ids, -1 for none), in one strict order: higher score first, equal scores by lower position first.

    NaN scores (samples whose gradient was not finite) are never chosen; bottom-k is the end of that same order
    and takes only from what is not in top-k, so a row with m < 2k scored samples (`n_valid` (Q,)) gets min(k, m)
    top and max(0, m − k) bottom entries; the missing ones have position -1 and score NaN.
    """
    values, positions = torch.from_numpy(values), torch.from_numpy(positions)
    best = {largest: _first(values, positions, k, bool(largest)) for largest in (1, 0)}
    return _disjoint(best, torch.from_numpy(n_valid), k)


def _first(values: torch.Tensor, positions: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k entries of each row (values, positions) (Q, M) in the order of `ends` (its reverse for
    `largest=False`), NaN last: (Q, min(k, M)) each."""
    bits = (values + 0.0).view(torch.int32).long()  # float32 bits (-0 made +0); flipping a negative's 31 low
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # bits makes their integer order the float order
    keys = (ordered << 32) + ((1 << 32) - 1 - positions)  # (Q, M) int64, distinct: equal scores by position
    keys = keys if largest else -keys  # the exact reverse order
    keys = keys.masked_fill(values.isnan(), torch.iinfo(torch.int64).min)
    chosen = torch.topk(keys, min(k, keys.shape[1]), dim=1).indices  # (Q, k), best first
    return values.gather(1, chosen), positions.gather(1, chosen)


def _disjoint(best: dict, n_valid: torch.Tensor, k: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`_first`'s top and bottom (values, positions) cut to min(k, m) and max(0, m − k) entries, m = n_valid."""
    n_top = n_valid.clamp(max=k)
    result = {}
    for name, largest, count in (("top", 1, n_top), ("bottom", 0, (n_valid - n_top).clamp(max=k))):
        values, positions = best[largest]
        keep = torch.arange(values.shape[1]) < count[:, None]  # (Q, k)
        result[name] = positions.where(keep, -1).numpy(), values.where(keep, float("nan")).numpy()
    return result


def merge_scores(shards: list[str], queries: str, out: str) -> None:
    """Concatenate shard scores into one store at `out` (rows × samples) with the top-k and bottom-k per row.

    `queries` is the scored query store: a per-token one (arrays `sample_index`, `token_position`) gives each
    row's `query_index` and `token_position`.
    """
    groups = [zarr.open_group(s, mode="r") for s in shards]
    first = dict(groups[0].attrs["rapidin"])
    for shard, group in zip(shards[1:], groups[1:], strict=True):
        check_agree(first, dict(group.attrs["rapidin"]), (*SHARED_FIELDS, "array"), shards[0], shard)
    ids = np.concatenate([g["ids"][:] for g in groups])
    if not np.array_equal(ids, np.arange(len(ids))):
        raise RapidinError(f"score shards do not cover training samples 0…{len(ids) - 1} exactly once")
    n_queries = groups[0]["scores"].shape[0]
    k = min(groups[0].attrs["rapidin"]["top_k"], len(ids))
    query_store = zarr.open_group(queries, mode="r")
    with atomic_dir(out) as tmp:
        result = zarr.open_group(tmp, mode="w", zarr_format=3)
        merged = result.create_array(
            "scores",
            shape=(n_queries, len(ids)),
            chunks=(n_queries, groups[0]["scores"].chunks[1]),
            dtype=np.float32,
            dimension_names=SCORE_DIMS,
        )
        result.create_array("query", data=query_store["ids"][:], dimension_names=("query",))  # row ids
        result.create_array("sample", data=ids, dimension_names=("sample",))  # training sample (row) of each column
        n_valid = np.zeros(n_queries, dtype=np.int64)  # per row, the samples not NaN
        for group in groups:  # one shard chunk at a time: memory stays O(Q · chunk)
            shard_scores, offset = group["scores"], int(group["ids"][0])
            for lo in range(0, shard_scores.shape[1], shard_scores.chunks[1]):
                block = shard_scores[:, lo : lo + shard_scores.chunks[1]]
                merged[:, offset + lo : offset + lo + block.shape[1]] = block
                n_valid += (~np.isnan(block)).sum(1)
        # A row's top-k lies among its shards' top-k, its bottom-k among their top-k and bottom-k (those are disjoint).
        names = [(g, name) for g in groups for name in ("top", "bottom")]
        candidates = np.concatenate([g[f"{name}_ids"][:] for g, name in names], axis=1)  # (Q, shards · 2k)
        values = np.concatenate([g[f"{name}_scores"][:] for g, name in names], axis=1)
        for name, (best_ids, best_values) in ends(values, candidates.astype(np.int64), k, n_valid).items():
            result.create_array(f"{name}_ids", data=best_ids, dimension_names=RANK_DIMS)
            result.create_array(f"{name}_scores", data=best_values, dimension_names=RANK_DIMS)
        if "sample_index" in query_store:
            result.create_array("query_index", data=query_store["sample_index"][:], dimension_names=("query",))
            result.create_array("token_position", data=query_store["token_position"][:], dimension_names=("query",))
        write_settings(result, {**first, "n_queries": n_queries, "n_samples": len(ids)})


def write_topk(scores: str, train: str, queries: str, out: str, fields: dict[str, str] | None = None) -> None:
    """One JSON line per query: the query and its top-k helpful (highest) and harmful (lowest) samples."""
    train_records = read_records(train, fields=fields)
    query_records = read_records(queries, require_output=False, fields=fields)
    group = zarr.open_group(scores, mode="r")
    sides = {side: (group[f"{name}_ids"][:], group[f"{name}_scores"][:]) for side, name in SIDES.items()}
    with atomic_file(out) as handle:
        for q, record in enumerate(query_records):
            line = {"query": {"index": q, **describe(record, q)}}
            for side, (ids, values) in sides.items():
                line[side] = [
                    _ranked(train_records, i, v, r)
                    for r, (i, v) in enumerate(zip(ids[q], values[q], strict=True), 1)
                    if i >= 0  # none left: NaN (excluded) samples, or fewer than 2k for both sides
                ]
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")


def describe(record, index: int) -> dict:
    """A record as it appears in outputs: id (or its index), texts and metadata."""
    return {
        "id": record.meta.get("id", index),
        "instruction": record.instruction,
        "input": record.input,
        "output": record.output,
        **{k: v for k, v in record.meta.items() if k != "id"},
    }


def _ranked(records, index, score, rank) -> dict:
    return {"rank": rank, "index": int(index), "score": float(score), **describe(records[int(index)], int(index))}
