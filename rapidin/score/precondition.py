"""A curvature preconditioner in the compressed space: query vectors q ← (C + λI)⁻¹ q.

C = (1/N) Σ_s v_s v_sᵀ is the uncentred covariance (second moment) of the cached training vectors v_s — the
empirical Fisher / Gauss–Newton approximation of the loss curvature, seen through the sketch — over all rows
of the training caches or `max_rows` of them. Scoring the preconditioned queries against the unchanged cache
gives ⟨(C + λI)⁻¹ q, v_s⟩, an influence-function-style score: directions that many training gradients share
(the bulk of C's spectrum) count less, directions particular to few samples count more.

Damping rule: λ = `damping` × tr(C)/K', the mean eigenvalue times a fraction (default 0.1): scale-free (LN'd
or not, any K'), and it keeps C + λI well conditioned when N < K' (C then has K' − N zero eigenvalues).

Cost: the K' × K' matrix in fp64 (8 K'² bytes: 512 MiB at the largest K' = 2^13, plus its Cholesky factor),
N K'² multiply-adds to accumulate it (streamed chunk by chunk, as scoring reads the cache) and K'³/3 to factor
it; the queries then cost one triangular solve each. Only vectors of at most MAX_DIM numbers are accepted:
cache a small K next to the large one (`cache.k: [8192, 65536]`) and precondition and score that one.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import zarr

from rapidin.devices import job_device
from rapidin.errors import RapidinError
from rapidin.score.scores import SHARED_FIELDS, vector_array
from rapidin.store import atomic_dir, check_agree, read_row_chunk, read_settings, write_settings

log = logging.getLogger(__name__)

MAX_DIM = 1 << 13


def training_covariance(
    caches: list[str], array: str, max_rows: int | None = None, device: str = "auto"
) -> tuple[torch.Tensor, int]:
    """(C (K', K') fp64 on the device, rows used): the second moment of the caches' vectors `array`.

    With `max_rows`, whole row chunks evenly spread over all caches, about `max_rows` rows in all.
    """
    torch_device = job_device(device)
    arrays = [zarr.open_group(c, mode="r")[array] for c in caches]
    chunks = [(a, chunk) for a in arrays for chunk in range(-(-a.shape[0] // a.chunks[0]))]
    if max_rows is not None:
        if max_rows < 1:
            raise RapidinError(f"precondition.max_rows: {max_rows} is not a positive integer")
        wanted = min(len(chunks), math.ceil(max_rows / arrays[0].chunks[0]))
        chunks = [chunks[i] for i in np.unique(np.linspace(0, len(chunks) - 1, wanted).round().astype(int))]
    dim = arrays[0].shape[1]
    covariance = torch.zeros(dim, dim, dtype=torch.float64, device=torch_device)
    buffer = torch.empty(max(a.chunks[0] for a in arrays), dim, dtype=torch.float32)
    n = 0
    for rows, chunk in chunks:
        block = read_row_chunk(rows, chunk, buffer).to(torch_device, torch.float64)  # (rows, K')
        covariance.addmm_(block.T, block)
        n += block.shape[0]
    return covariance / n, n


def damped_solve(covariance: torch.Tensor, vectors: torch.Tensor, damping: float) -> tuple[torch.Tensor, float]:
    """((C + λI)⁻¹ v for each row v of vectors (Q, K'), λ = damping · tr(C)/K'), by a Cholesky factorisation;
    `covariance` C (K', K') is overwritten."""
    lam = damping * float(covariance.trace()) / covariance.shape[0]
    covariance.diagonal().add_(lam)
    factor = torch.linalg.cholesky(covariance)  # (K', K') lower triangular
    return torch.cholesky_solve(vectors.T.to(factor.dtype), factor).T, lam  # (Q, K')


def precondition_queries(
    queries: str,
    caches: list[str],
    out: str,
    array: str | None = None,
    damping: float = 0.1,
    max_rows: int | None = None,
    device: str = "auto",
) -> dict:
    """Write `out`: the query store `queries` with its vectors `array` replaced by (C + λI)⁻¹ q.

    `array` defaults to the one scored by default (score.scores.vector_array), which must have at most MAX_DIM numbers.
    The result holds that array only (score it with `array=`), `ids` and any per-token arrays, and the query
    store's settings (so score.check_agree accepts it with the same caches) plus `precondition`: array,
    damping, λ, rows used. Returns that `precondition` entry.
    """
    settings = read_settings(queries)
    for cache in caches:
        check_agree(settings, read_settings(cache), SHARED_FIELDS, queries, cache)
    array = array or vector_array(settings)
    group = zarr.open_group(queries, mode="r")
    if array not in group:
        raise RapidinError(f"precondition.array: {queries} has no array {array!r}")
    dim = group[array].shape[1]
    if dim > MAX_DIM:
        raise RapidinError(
            f"precondition.array: {array} has {dim} numbers per vector, more than {MAX_DIM}; cache a K ≤ {MAX_DIM} "
            f"too (cache.k: [{MAX_DIM}, …]) and precondition that one"
        )
    if not damping > 0:
        raise RapidinError(f"precondition.damping: {damping} is not a positive number")
    covariance, n = training_covariance(caches, array, max_rows, device)
    if not covariance.trace() > 0:
        raise RapidinError(f"precondition: the training vectors {array} of {caches[0]} … are all zero")
    q = torch.from_numpy(group[array][:].astype(np.float64)).to(covariance.device)  # (Q, K')
    solved, lam = damped_solve(covariance, q, damping)
    entry = {"array": array, "damping": damping, "lambda": lam, "rows": n, "max_rows": max_rows}
    log.info("preconditioned %d queries (%s) with C of %d training rows, λ = %.3g", len(q), array, n, lam)
    with atomic_dir(out) as tmp:
        result = zarr.open_group(tmp, mode="w", zarr_format=3)
        dims = group[array].metadata.dimension_names
        result.create_array(
            array, data=solved.float().cpu().numpy(), chunks=(len(q), dim), compressors=None, dimension_names=dims
        )
        for name in ("ids", "sample_index", "token_position"):
            if name in group:
                result.create_array(name, data=group[name][:], dimension_names=group[name].metadata.dimension_names)
        write_settings(result, {**settings, "dtype": "float32", "precondition": entry})
    return entry
