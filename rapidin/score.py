"""Influence scores: query vectors × cached training vectors, streamed chunk by chunk, and their top-k.

Per shard, each cache chunk is converted into a preallocated fp32 buffer and multiplied with all queries at
once (one GEMM per chunk, fp32 accumulation), so memory is bounded by a chunk whatever N is. Merging puts
the shards' columns together into `scores.zarr` (queries × training samples) and `topk.jsonl`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm import tqdm

from rapidin.data import read_records
from rapidin.errors import RapidinError
from rapidin.model import resolve_device
from rapidin.store import atomic_dir, atomic_file, check_agree, read_settings, write_settings

log = logging.getLogger(__name__)

# Settings a query store and a cache must share for their inner products to mean anything.
SHARED_FIELDS = ("model", "adapter", "tokenizer", "template", "parameters", "D", "compressor", "ks", "seed", "normalize")


def vector_array(settings: dict) -> str:
    """The array scored by default: the exact gradients, or the largest K."""
    return "exact" if settings["compressor"] == "none" else f"k{max(settings['ks'])}"


def score_shard(queries: str, cache: str, out: str, top_k: int, array: str | None = None, device: str = "auto") -> None:
    """Scores of all queries against one cache shard, plus that shard's top-k and bottom-k per query."""
    query_settings, cache_settings = read_settings(queries), read_settings(cache)
    check_agree(query_settings, cache_settings, SHARED_FIELDS, queries, cache)
    array = array or vector_array(cache_settings)
    torch_device = resolve_device(device)
    query_vectors = torch.from_numpy(zarr.open_group(queries, mode="r")[array][:].astype(np.float32)).to(torch_device)
    group = zarr.open_group(cache, mode="r")
    rows, ids = group[array], group["ids"][:]
    scores = stream_scores(query_vectors, rows, desc=f"scores {Path(cache).name}")
    k = min(top_k, len(ids))
    top = torch.topk(scores, k, dim=1)
    bottom = torch.topk(scores, k, dim=1, largest=False)
    with atomic_dir(out) as tmp:
        result = zarr.open_group(tmp, mode="w", zarr_format=3)
        result.create_array("scores", data=scores.numpy())
        result.create_array("ids", data=ids)
        result.create_array("top_ids", data=ids[top.indices.numpy()])
        result.create_array("top_scores", data=top.values.numpy())
        result.create_array("bottom_ids", data=ids[bottom.indices.numpy()])
        result.create_array("bottom_scores", data=bottom.values.numpy())
        write_settings(result, {**{f: cache_settings.get(f) for f in SHARED_FIELDS}, "array": array, "top_k": k})


def stream_scores(queries: torch.Tensor, rows: zarr.Array, desc: str = "scores") -> torch.Tensor:
    """(Q, N) = queries (Q, K) @ rows (N, K)ᵀ, reading `rows` one Zarr chunk at a time into an fp32 buffer."""
    n, chunk_rows = rows.shape[0], rows.chunks[0]
    scores = torch.empty(queries.shape[0], n, dtype=torch.float32)
    buffer = torch.empty(chunk_rows, rows.shape[1], dtype=torch.float32)  # (C, K), reused
    for lo in tqdm(range(0, n, chunk_rows), desc=desc, unit="chunk"):
        hi = min(lo + chunk_rows, n)
        block = buffer[: hi - lo]
        block.copy_(torch.from_numpy(rows[lo:hi]))
        scores[:, lo:hi] = (queries @ block.to(queries.device).T).cpu()  # (Q, C)
    return scores


def merge_scores(shards: list[str], train: str, queries: str, out_scores: str, out_topk: str) -> None:
    """Concatenate shard scores into scores.zarr (queries × samples) and write topk.jsonl with texts."""
    groups = [zarr.open_group(s, mode="r") for s in shards]
    first = dict(groups[0].attrs["rapidin"])
    for shard, group in zip(shards[1:], groups[1:], strict=True):
        check_agree(first, dict(group.attrs["rapidin"]), (*SHARED_FIELDS, "array"), shards[0], shard)
    ids = np.concatenate([g["ids"][:] for g in groups])
    if not np.array_equal(ids, np.arange(len(ids))):
        raise RapidinError(f"score shards do not cover training samples 0…{len(ids) - 1} exactly once")
    scores = np.concatenate([g["scores"][:] for g in groups], axis=1)  # (Q, N)
    with atomic_dir(out_scores) as tmp:
        result = zarr.open_group(tmp, mode="w", zarr_format=3)
        result.create_array("scores", data=scores, chunks=(min(len(scores), 64), min(scores.shape[1], 65536)))
        write_settings(result, {**first, "n_queries": scores.shape[0], "n_samples": scores.shape[1]})
    write_topk(groups, train, queries, out_topk)


def write_topk(groups: list[zarr.Group], train: str, queries: str, out: str) -> None:
    """One JSON line per query: the query and its top-k helpful (highest) and harmful (lowest) samples."""
    train_records, query_records = read_records(train), read_records(queries, require_output=False)
    k = groups[0].attrs["rapidin"]["top_k"]

    def best(name: str, largest: bool) -> tuple[np.ndarray, np.ndarray]:
        ids = np.concatenate([g[f"{name}_ids"][:] for g in groups], axis=1)  # (Q, shards·k)
        values = np.concatenate([g[f"{name}_scores"][:] for g in groups], axis=1)
        order = np.argsort(-values if largest else values, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(ids, order, 1), np.take_along_axis(values, order, 1)

    top, bottom = best("top", True), best("bottom", False)
    with atomic_file(out) as handle:
        for q, record in enumerate(query_records):
            line = {
                "query": {"index": q, **describe(record, q)},
                "helpful": [_ranked(train_records, i, s, r) for r, (i, s) in enumerate(zip(*(a[q] for a in top)), 1)],
                "harmful": [_ranked(train_records, i, s, r) for r, (i, s) in enumerate(zip(*(a[q] for a in bottom)), 1)],
            }
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
