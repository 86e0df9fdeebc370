"""Scale: scoring over a sweep of N, caching at several times the caching benchmark's samples, and on-the-fly
scoring (`cache.store: false`) against caching on the same shard. Every call runs in a fresh process (fresh.py),
so its peak resident memory is its own.

- scoring: `score_shard` at N = n_min, 2·n_min, …, n_max rows × K (random float16 stores, page cache warm, each
  deleted once measured; best of `repeats` runs, as other jobs on the machine only ever add time);
  `scoring_linearity` is the largest relative deviation of the time per row from its mean over the sweep (goal ≤ 0.1);
- caching: `cache_gradients` on the caching benchmark's model at its samples and at 2, 4, … up to `caching_factor`
  times as many; `caching_linearity` is the largest relative deviation of their seconds from the least-squares line
  a + b·N (a fixed cost per job: model load, RapidGrad's permutation; b per sample), `caching_memory_growth` the
  peak memory at the most samples ÷ at the fewest;
- on the fly: `stream_scores` on the larger shard, scoring `n_queries` query vectors; `stream_vs_cache_time` is
  its time ÷ that of `cache_gradients` on the same shard (both end to end, best of two interleaved runs; goal ≤ 1.1).
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from caching import CachingSize, make_project
from fresh import time_fresh
from scoring import write_store

from rapidin.cache.shard import CacheSettings


@dataclass
class ScaleSize:
    """The N sweep of scoring (n_max rows × K float16 on disk at once: 8 GiB by default) and the caching factor."""

    k: int = 4096
    n_min: int = 1 << 17
    n_max: int = 1 << 20
    n_queries: int = 16
    caching_factor: int = 4
    repeats: int = 3  # timed runs of score_shard per N (after one warm-up run), the best kept


def scoring_sweep(root: Path, size: ScaleSize, device: str) -> dict[int, tuple[float, int]]:
    """{N: (seconds, peak RSS bytes)} of score_shard, the page cache warm (as in scoring.py), best of `repeats`."""
    queries = root / "queries.zarr"
    write_store(queries, size.n_queries, size.k, seed=1)
    sweep, n = {}, size.n_min
    while n <= size.n_max:
        cache = root / f"cache-{n}.zarr"
        write_store(cache, n, size.k)
        args = {"queries": str(queries), "cache": str(cache), "top_k": 100, "device": device}
        time_fresh("rapidin.score.scores.score_shard", out=str(root / f"warm-{n}.zarr"), **args)
        runs = [
            time_fresh("rapidin.score.scores.score_shard", out=str(root / f"scores-{n}-{r}.zarr"), **args)
            for r in range(size.repeats)
        ]
        sweep[n] = min(runs)
        for out in [f"warm-{n}.zarr", *(f"scores-{n}-{r}.zarr" for r in range(size.repeats))]:
            shutil.rmtree(root / out)
        shutil.rmtree(cache)
        n *= 2
    return sweep


def linearity(sweep: dict[int, tuple[float, int]]) -> float:
    """The largest relative deviation of seconds per row from their mean."""
    per_row = np.array([seconds / n for n, (seconds, _) in sweep.items()])
    return float(np.abs(per_row - per_row.mean()).max() / per_row.mean())


def caching_and_stream(
    root: Path, caching_size: CachingSize, size: ScaleSize, device: str, model_dtype: str
) -> dict[str, dict]:
    """{"caching": {samples: (seconds, peak)}, "stream": {samples: (seconds, peak)}}, best of two for the larger."""
    settings = CacheSettings(k=(caching_size.k,), batch_tokens=caching_size.batch_tokens, model_dtype=model_dtype)
    result = {"caching": {}, "stream": {}}
    for factor in factors(size.caching_factor):
        n, folder = caching_size.n_samples * factor, root / f"x{factor}"
        folder.mkdir()
        model, tokens = make_project(folder, dataclasses.replace(caching_size, n_samples=n))
        args = {"tokens": tokens, "model_path": model, "settings": settings, "device": device}
        queries = str(folder / "queries.zarr")  # the first n_queries training samples serve as queries
        time_fresh("rapidin.cache.shard.cache_gradients", out=queries, shard=0, n_shards=n // size.n_queries, **args)
        caching, stream = [], []
        for repeat in range(2 if factor == size.caching_factor else 1):  # interleaved: both see the same load
            caching.append(
                time_fresh("rapidin.cache.shard.cache_gradients", out=str(folder / f"cache{repeat}.zarr"), **args)
            )
            if factor == size.caching_factor:
                out = [str(folder / f"scores{repeat}.zarr")]
                stream.append(
                    time_fresh("rapidin.score.stream.stream_scores", queries=[queries], out=out, top_k=100, **args)
                )
        result["caching"][n] = min(caching)
        if stream:
            result["stream"][n] = min(stream)
        shutil.rmtree(folder)
    return result


def factors(largest: int) -> list[int]:
    """1, 2, 4, … up to `largest` (and it)."""
    return sorted({1 << i for i in range(largest.bit_length()) if 1 << i <= largest} | {largest})


def affine_deviation(timed: dict[int, tuple[float, int]]) -> float:
    """The largest relative deviation of seconds from their least-squares line a + b·N over the sizes N."""
    n, seconds = np.array(list(timed), dtype=float), np.array([s for s, _ in timed.values()])
    b, a = np.polyfit(n, seconds, 1)
    return float(np.abs(seconds - (a + b * n)).max() / seconds.min())


def run(root: Path, size: ScaleSize, caching_size: CachingSize, device: str = "cpu", model_dtype: str = "float32"):
    """The scoring sweep and its linearity, caching at 1×, 2×, … caching_factor× samples, and stream ÷ caching."""
    (root / "scoring").mkdir()
    (root / "caching").mkdir()
    sweep = scoring_sweep(root / "scoring", size, device)
    timed = caching_and_stream(root / "caching", caching_size, size, device, model_dtype)
    n = caching_size.n_samples * size.caching_factor
    return {
        "k": size.k,
        "n_queries": size.n_queries,
        "scoring": sweep,
        "caching": timed["caching"],
        "stream": timed["stream"],
        "scoring_linearity": linearity(sweep),
        "caching_linearity": affine_deviation(timed["caching"]),
        "caching_memory_growth": timed["caching"][n][1] / min(timed["caching"].items())[1][1],
        "stream_vs_cache_time": timed["stream"][n][0] / timed["caching"][n][0],
    }
