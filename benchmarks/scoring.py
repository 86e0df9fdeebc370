"""Scoring throughput: `score_shard` on a cache store against the same work done two other ways.

- in-memory GEMM: the cache's rows already in RAM as one fp32 (N, K) tensor, queries @ rowsᵀ: the floor;
- per-sample loop, as RapidIn's authors do it: one `torch.save` file per cached sample, each loaded and dotted
  with every query in Python (timed on the first `loop_samples` files, extrapolated to N).
Scaling: `score_shard` at N, 2N and 4N rows, each in a fresh process, with its time and peak memory.
The stores hold random vectors: scoring time does not depend on their values.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from fresh import time_fresh

from rapidin.cache.shard import CHUNK_BYTES
from rapidin.store import write_settings


@dataclass
class ScoringSize:
    """Rows, sketch size and queries; the defaults take about a minute on 2 CPU cores (4N rows: 4.3 GB of disk)."""

    n: int = 8192
    k: int = 65536
    n_queries: int = 16
    loop_samples: int = 512


def write_store(path: Path, n: int, k: int, seed: int = 0) -> None:
    """A cache-like store: `k<K>` (n, K) float16 in ~16 MiB row chunks (as `cache_gradients` writes), `ids`."""
    chunk_rows = max(1, CHUNK_BYTES // (k * 2))
    group = zarr.open_group(path, mode="w", zarr_format=3)
    rows = group.create_array(f"k{k}", shape=(n, k), chunks=(min(n, chunk_rows), k), dtype=np.float16, compressors=None)
    block = np.random.default_rng(seed).standard_normal((min(n, chunk_rows), k), np.float32).astype(np.float16)
    for lo in range(0, n, chunk_rows):
        rows[lo : lo + chunk_rows] = block[: min(chunk_rows, n - lo)]
    group.create_array("ids", data=np.arange(n))
    write_settings(group, {"compressor": "rapidgrad", "k": [k], "seed": 0, "normalize": True, "D": 1 << 24})


def time_score_shard(queries: Path, cache: Path, out: Path, device: str) -> tuple[float, int]:
    """Seconds of `score_shard` in a fresh process and that process's peak resident memory in bytes."""
    return time_fresh(
        "rapidin.score.scores.score_shard",
        queries=str(queries),
        cache=str(cache),
        out=str(out),
        top_k=100,
        device=device,
    )


def time_gemm(queries: torch.Tensor, cache: Path, k: int) -> float:
    """Seconds of queries (Q, K) @ rowsᵀ with all rows already in RAM as one fp32 (N, K) tensor (moved to a GPU)."""
    rows = torch.from_numpy(zarr.open_group(cache, mode="r")[f"k{k}"][:].astype(np.float32))
    started = time.perf_counter()
    queries @ rows.to(queries.device).T  # (Q, N)
    synchronize(queries.device)
    return time.perf_counter() - started


def time_per_sample_files(queries: torch.Tensor, cache: Path, size: ScoringSize, folder: Path) -> float:
    """Seconds for N samples: one file per sample, loaded one by one, one dot per query (page cache warm)."""
    folder.mkdir()
    n = min(size.n, size.loop_samples)
    for i, row in enumerate(zarr.open_group(cache, mode="r")[f"k{size.k}"][:n]):
        torch.save(torch.from_numpy(row), folder / f"{i}.pt")
        (folder / f"{i}.pt").read_bytes()
    scores = torch.empty(len(queries), n, device=queries.device)
    started = time.perf_counter()
    for i in range(n):
        vector = torch.load(folder / f"{i}.pt").to(queries.device).float()  # (K,)
        for q, query in enumerate(queries):
            scores[q, i] = torch.dot(query, vector)
    synchronize(queries.device)
    return (time.perf_counter() - started) * size.n / n


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(root: Path, size: ScoringSize, device: str = "cpu") -> dict:
    """Seconds and GB/s of cache read of each method at N; seconds and peak memory of score_shard at N, 2N, 4N."""
    queries_path = root / "queries.zarr"
    write_store(queries_path, size.n_queries, size.k, seed=1)
    queries = torch.from_numpy(zarr.open_group(queries_path, mode="r")[f"k{size.k}"][:].astype(np.float32))
    queries = queries.to(device)
    scaling = {}
    for n in (size.n, 2 * size.n, 4 * size.n):
        cache = root / f"cache-{n}.zarr"
        write_store(cache, n, size.k)
        time_score_shard(queries_path, cache, root / f"warm-{n}.zarr", device)  # page cache warm, as for the GEMM
        scaling[n] = time_score_shard(queries_path, cache, root / f"scores-{n}.zarr", device)
        if n == size.n:
            gemm = min(time_gemm(queries, cache, size.k) for _ in range(3))
            files = time_per_sample_files(queries, cache, size, root / "per-sample")
        shutil.rmtree(cache)
    score = scaling[size.n][0]
    cache_gb = size.n * size.k * 2 / 1e9
    return {
        "n": size.n,
        "k": size.k,
        "n_queries": size.n_queries,
        "cache_gb": cache_gb,
        "seconds": {"score_shard": score, "in-memory GEMM (fp32)": gemm, "per-sample files loop": files},
        "cache_gb_per_s": {
            "score_shard": cache_gb / score,
            "in-memory GEMM (fp32)": cache_gb / gemm,
            "per-sample files loop": cache_gb / files,
        },
        "scaling": scaling,
        "scoring_vs_inmemory_gemm": gemm / score,
        "scoring_vs_per_sample_loop": files / score,
    }
