"""Influence scores: query vectors × cached training vectors, streamed chunk by chunk, and their top-k.

Per shard, each cache chunk is converted into a preallocated fp32 buffer and multiplied with all queries at
once (one GEMM per chunk, fp32 accumulation), so memory is bounded by a chunk whatever N is. Merging puts
the shards' columns together into one store (rows × training samples, with each row's top-k and bottom-k);
the rows are queries (`scores.zarr`, then `topk.jsonl` with the texts) or, for a per-token query store,
(query, response token) pairs (`token_scores.zarr`, with `query_index` and `token_position` per row).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm import tqdm

from rapidin.data import read_records
from rapidin.errors import RapidinError
from rapidin.devices import job_device
from rapidin.store import ResumableStore, atomic_dir, atomic_file, check_agree, read_settings, write_settings

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


SIDES = {"helpful": "top", "harmful": "bottom"}  # topk.jsonl's sides and the arrays they come from


def vector_array(settings: dict) -> str:
    """The array scored by default: the exact gradients, the factored sketch, or the largest K."""
    return {"none": "exact", "factored": "factored"}.get(settings["compressor"]) or f"k{max(settings['ks'])}"


def score_shard(queries: str, cache: str, out: str, top_k: int, array: str | None = None, device: str = "auto") -> None:
    """Scores of all queries against one cache shard, plus that shard's top-k and bottom-k per query.

    Each cache chunk is read into a preallocated fp32 buffer and multiplied with all queries at once; its
    (Q, C) scores go straight to the output store, which is resumable chunk by chunk. Top-k is then a running
    merge over the stored score chunks, so memory stays at O(Q · (chunk + k)) whatever the shard's size.
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
    buffer = torch.empty(chunk_rows, rows.shape[1], dtype=torch.float32)  # (C, K), reused for every chunk
    for chunk in tqdm(store.remaining(), desc=f"scores {Path(cache).name}", unit="chunk"):
        lo, hi = chunk * chunk_rows, min((chunk + 1) * chunk_rows, n)
        block = buffer[: hi - lo]
        block.copy_(torch.from_numpy(rows[lo:hi]))  # fp16 → fp32 conversion into the buffer
        store.group["scores"][:, lo:hi] = (query_vectors @ block.to(torch_device).T).cpu().numpy()  # (Q, C)
        store.mark_done(chunk)
    for name, largest in (("top", True), ("bottom", False)):
        positions, values = running_topk(store.group["scores"], k, largest)
        store.group.create_array(f"{name}_ids", data=ids[positions], overwrite=True)
        store.group.create_array(f"{name}_scores", data=values, overwrite=True)
    store.publish()


def _fingerprint(vectors: torch.Tensor) -> str:
    return hashlib.sha256(vectors.cpu().numpy().tobytes()).hexdigest()[:16]


def running_topk(scores: zarr.Array, k: int, largest: bool) -> tuple[np.ndarray, np.ndarray]:
    """Column positions and values (Q, k) of the k largest (or smallest) scores per row, read chunk by chunk."""
    n_queries, n = scores.shape
    step = scores.chunks[1]
    best_values = torch.empty(n_queries, 0)
    best_positions = torch.empty(n_queries, 0, dtype=torch.long)
    for lo in range(0, n, step):
        chunk = torch.from_numpy(scores[:, lo : lo + step])  # (Q, C)
        values = torch.cat([best_values, chunk], dim=1)
        positions = torch.cat([best_positions, torch.arange(lo, lo + chunk.shape[1]).expand(n_queries, -1)], dim=1)
        top = torch.topk(values, min(k, values.shape[1]), dim=1, largest=largest, sorted=True)
        best_values, best_positions = top.values, torch.gather(positions, 1, top.indices)
    return best_positions.numpy(), best_values.numpy()


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
