"""On-the-fly scoring (`cache.store: false`): one shard's training gradients scored against the cached query
vectors as they are computed, so that only the scores are kept, never the training vectors.

The training side is computed exactly as caching computes it (cache.shard.open_shard: same model, compressor, chunks
and settings); each chunk's vectors are rounded to `cache.dtype`, as a cache would store them, and multiplied on
the job's device with the vectors of every query store (one GEMM per chunk and store). Each output is the store
that `score.scores.score_shard` writes for a cached shard (same arrays, settings and top-k), so merging and all that
follows cannot tell the two modes apart. The outputs are resumable chunk by chunk: a rerun computes only the
chunks that some output still lacks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rapidin.cache.shard import STORE_DTYPES, CacheSettings, open_shard
from rapidin.errors import RapidinError
from rapidin.score.scores import SHARED_FIELDS, finish_scores, open_scores, read_queries, vector_array, write_scores
from rapidin.store import check_agree, read_settings


def stream_scores(
    tokens: str,
    model_path: str,
    queries: list[str],
    out: list[str],
    settings: CacheSettings,
    top_k: int,
    adapter: str | None = None,
    shard: int = 0,
    n_shards: int = 1,
    device: str = "auto",
    array: str | None = None,
) -> None:
    """Score every query store in `queries` against shard `shard` of `n_shards` of the tokenized training set,
    writing `out[i]` for `queries[i]`: one pass over the training gradients serves all of them (the queries and
    their per-token store, say).

    `settings` and `device` mean what they mean for `cache.shard.cache_gradients`; `array` and `top_k` what
    they mean for `score.scores.score_shard`. Each query store must have been made with the same settings
    (score.scores.SHARED_FIELDS), or StoreMismatchError names the first that differs.
    """
    if len(queries) != len(out) or not queries:
        raise RapidinError(f"stream_scores: {len(queries)} query stores for {len(out)} outputs")
    job = open_shard(tokens, model_path, settings, adapter, shard, n_shards, device)
    array = array or vector_array(job.stamp)
    chunks = job.chunks()
    ids, torch_device = np.arange(job.start, job.stop), next(job.model.parameters()).device
    outputs = []  # (score store, its (Q, K) query vectors on the device)
    for query_store, target in zip(queries, out, strict=True):
        check_agree(job.stamp, read_settings(query_store), SHARED_FIELDS, f"{tokens} shard {shard}", query_store)
        query_vectors = read_queries(query_store, array, torch_device)
        outputs.append(
            (open_scores(target, job.stamp, array, query_vectors, ids, len(chunks[0]), top_k), query_vectors)
        )

    def score(chunk: int, vectors: dict[str, np.ndarray]) -> None:
        stored = vectors[array].astype(STORE_DTYPES[settings.dtype])  # (C, K), as a cache holds them
        rows = torch.from_numpy(stored).to(torch_device).float()
        for store, query_vectors in outputs:
            if not store.done[chunk]:
                write_scores(store, [(chunk, (query_vectors @ rows.T).cpu().numpy())])  # (Q, C)

    todo = sorted(set().union(*(store.remaining() for store, _ in outputs)))
    job.compute(chunks, todo, score, f"scores {Path(out[0]).name}")
    for store, _ in outputs:
        finish_scores(store, ids)
