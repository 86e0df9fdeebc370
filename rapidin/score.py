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
from tqdm import tqdm

from rapidin.data import read_records
from rapidin.devices import job_device
from rapidin.errors import RapidinError
from rapidin.store import (
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
    "ks",
    "rank",
    "seed",
    "normalize",
)


MAX_WRITE_BATCH = 256  # scored chunks held at most while the writer is busy

SIDES = {"helpful": "top", "harmful": "bottom"}  # topk.jsonl's sides and the arrays they come from


def vector_array(settings: dict) -> str:
    """The array scored by default: the exact gradients, the factored sketch, or the largest K."""
    return {"none": "exact", "factored": "factored"}.get(settings["compressor"]) or f"k{max(settings['ks'])}"


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
    query_vectors = torch.from_numpy(zarr.open_group(queries, mode="r")[array][:].astype(np.float32)).to(torch_device)
    rows = zarr.open_group(cache, mode="r")[array]  # (N, K), chunked by rows
    ids = zarr.open_group(cache, mode="r")["ids"][:]
    n, chunk_rows = rows.shape[0], rows.chunks[0]
    n_queries, k = query_vectors.shape[0], min(top_k, n)
    stamp = {
        **{f: cache_settings.get(f) for f in SHARED_FIELDS},
        "array": array,
        "top_k": k,
        "queries": _fingerprint(query_vectors),
        "cache_rows": [int(ids[0]), int(ids[-1]) + 1],
        "cache_tokens": cache_settings.get("tokens"),
        "chunk_rows": chunk_rows,
    }

    def create(group: zarr.Group) -> None:
        group.create_array(
            "scores", shape=(n_queries, n), chunks=(n_queries, chunk_rows), dtype=np.float32, compressors=None
        )
        group.create_array("ids", data=ids)

    store = ResumableStore(out, stamp, -(-n // chunk_rows), create)
    scores, todo = store.array("scores"), store.remaining()
    buffer = torch.empty(chunk_rows, rows.shape[1], dtype=torch.float32, pin_memory=torch_device.type == "cuda")

    def write(scored: list[tuple[int, np.ndarray]]) -> None:  # (chunk, its (Q, C) scores), chunks ascending
        for run in _contiguous_runs(scored):
            lo = run[0][0] * chunk_rows
            values = np.concatenate([v for _, v in run], axis=1)
            scores[:, lo : lo + values.shape[1]] = values  # one Zarr call for the run's chunks
        store.mark_done([chunk for chunk, _ in scored])

    # Scored chunks go to a writer thread in batches: whatever was scored while its last write ran, so a slow
    # write path costs a few large writes, not one small write and one flag update per chunk.
    with ThreadPoolExecutor(max_workers=1) as writer:
        scored, pending_write = [], None
        for chunk in tqdm(todo, desc=f"scores {Path(cache).name}", unit="chunk"):
            block = read_row_chunk(rows, chunk, buffer)  # (C, K) fp32
            scored.append((chunk, (query_vectors @ block.to(torch_device).T).cpu().numpy()))  # (Q, C)
            if pending_write is None or pending_write.done() or len(scored) >= MAX_WRITE_BATCH:
                if pending_write is not None:
                    pending_write.result()
                pending_write, scored = writer.submit(write, scored), []
        if pending_write is not None:
            pending_write.result()
        write(scored)
    best = running_topk(scores, k)
    for name in ("top", "bottom"):
        positions, values = best[name]
        store.group.create_array(f"{name}_ids", data=ids[positions], overwrite=True)
        store.group.create_array(f"{name}_scores", data=values, overwrite=True)
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
    """Per row, the column positions and values (Q, k) of the k largest ("top") and k smallest ("bottom")
    scores, read about 64 MiB of columns at a time."""
    n_queries, n = scores.shape
    step = scores.chunks[1] * max(1, (64 << 20) // (4 * n_queries * scores.chunks[1]))
    best = {largest: (torch.empty(n_queries, 0), torch.empty(n_queries, 0, dtype=torch.long)) for largest in (1, 0)}
    for lo in range(0, n, step):
        chunk = torch.from_numpy(scores[:, lo : lo + step])  # (Q, S)
        columns = torch.arange(lo, lo + chunk.shape[1]).expand(n_queries, -1)
        for largest, (best_values, best_positions) in best.items():
            values, positions = torch.cat([best_values, chunk], dim=1), torch.cat([best_positions, columns], dim=1)
            top = torch.topk(values, min(k, values.shape[1]), dim=1, largest=bool(largest), sorted=True)
            best[largest] = top.values, torch.gather(positions, 1, top.indices)
    return {name: (best[largest][1].numpy(), best[largest][0].numpy()) for name, largest in (("top", 1), ("bottom", 0))}


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
    k = groups[0].attrs["rapidin"]["top_k"]
    query_store = zarr.open_group(queries, mode="r")
    with atomic_dir(out) as tmp:
        result = zarr.open_group(tmp, mode="w", zarr_format=3)
        merged = result.create_array(
            "scores", shape=(n_queries, len(ids)), chunks=(n_queries, groups[0]["scores"].chunks[1]), dtype=np.float32
        )
        for group in groups:  # one shard chunk at a time: memory stays O(Q · chunk)
            shard_scores, offset = group["scores"], int(group["ids"][0])
            for lo in range(0, shard_scores.shape[1], shard_scores.chunks[1]):
                block = shard_scores[:, lo : lo + shard_scores.chunks[1]]
                merged[:, offset + lo : offset + lo + block.shape[1]] = block
        for name, largest in (("top", True), ("bottom", False)):
            candidates = np.concatenate([g[f"{name}_ids"][:] for g in groups], axis=1)  # (Q, shards·k)
            values = np.concatenate([g[f"{name}_scores"][:] for g in groups], axis=1)
            order = np.argsort(-values if largest else values, axis=1, kind="stable")[:, :k]
            result.create_array(f"{name}_ids", data=np.take_along_axis(candidates, order, 1))
            result.create_array(f"{name}_scores", data=np.take_along_axis(values, order, 1))
        if "sample_index" in query_store:
            result.create_array("query_index", data=query_store["sample_index"][:])
            result.create_array("token_position", data=query_store["token_position"][:])
        write_settings(result, {**first, "n_queries": n_queries, "n_samples": len(ids)})


def write_topk(scores: str, train: str, queries: str, out: str) -> None:
    """One JSON line per query: the query and its top-k helpful (highest) and harmful (lowest) samples."""
    train_records, query_records = read_records(train), read_records(queries, require_output=False)
    group = zarr.open_group(scores, mode="r")
    sides = {side: (group[f"{name}_ids"][:], group[f"{name}_scores"][:]) for side, name in SIDES.items()}
    with atomic_file(out) as handle:
        for q, record in enumerate(query_records):
            line = {"query": {"index": q, **describe(record, q)}}
            for side, (ids, values) in sides.items():
                line[side] = [
                    _ranked(train_records, i, v, r) for r, (i, v) in enumerate(zip(ids[q], values[q], strict=True), 1)
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
