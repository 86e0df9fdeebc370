"""The influence-function baseline: the queries' inverse-Hessian-vector products H⁻¹∇L(t) by the LiSSA recursion
(Agarwal et al. 2017; Koh & Liang 2017), over the same parameters as the cached gradients. Scored against the
cached plain (no LN, exact) training gradients, they give ⟨∇L(s), H⁻¹∇L(t)⟩.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
import zarr
from tqdm import tqdm

from rapidin.cache.shard import loss_batch
from rapidin.data.tokenize import TokenizedDataset
from rapidin.errors import RapidinError, StoreMismatchError
from rapidin.gradients.loss import weighted_loss
from rapidin.gradients.model import blocks_fingerprint, load_model, parameter_blocks, select_modules
from rapidin.store import atomic_dir, read_settings, write_settings

log = logging.getLogger(__name__)


def lissa(
    v: torch.Tensor, hvp: Callable[[torch.Tensor], torch.Tensor], depth: int, scale: float, damping: float
) -> torch.Tensor:
    """Estimate (H + damping·scale·I)⁻¹ v for each row of v (Q, D) by the LiSSA recursion.

    h₀ = v, h_j = v + (1 − damping) h_{j−1} − H h_{j−1} / scale; its fixed point is h = scale (H + λI)⁻¹ v
    with λ = damping·scale, so the estimate is h_depth / scale. `hvp` maps (Q, D) to H times each row (each
    call may use a fresh random batch: the stochastic recursion). Converges when scale exceeds the largest
    eigenvalue of H + λI; a non-convex loss needs λ above |its most negative eigenvalue|.
    """
    h = v.clone()
    for _ in tqdm(range(depth), desc="LiSSA", unit="step"):
        h = v + (1 - damping) * h - hvp(h) / scale
        if not torch.isfinite(h).all():
            raise RapidinError("experiment.lissa: the recursion diverged; raise scale (or damping)")
    return h / scale


def model_hvp(model, params: list[torch.Tensor], batch, weights: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """H·v for each row of vectors (Q, D), H the Hessian of the batch's mean training loss in the flattened
    `params` (D numbers, in order), by double backpropagation."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
    loss = weighted_loss(logits, batch, weights).mean()
    grads = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, create_graph=True)])  # (D,)
    rows = []
    for q, v in enumerate(vectors):
        second = torch.autograd.grad(grads @ v.to(grads.dtype), params, retain_graph=q < len(vectors) - 1)
        rows.append(torch.cat([s.flatten() for s in second]))
    return torch.stack(rows).to(vectors.dtype)  # (Q, D)


def gradient_parameters(model, settings: dict) -> list[torch.Tensor]:
    """The parameter tensors of a cache's gradient space, in its order; refuses a model with another layout."""
    blocks = parameter_blocks(
        select_modules(model, settings["modules"], settings.get("coverage", {}).get("parameters", "all"))
    )
    if blocks_fingerprint(blocks) != settings["parameters"]:
        raise StoreMismatchError("model: its selected parameters differ from those of the query store")
    modules = dict(model.named_modules())
    return [getattr(modules[b.module], b.kind) for b in blocks]


def lissa_queries(
    queries: str,
    tokens: str,
    model_path: str,
    out: str,
    adapter: str | None = None,
    depth: int = 100,
    scale: float = 10.0,
    damping: float = 0.01,
    batch_size: int = 8,
    seed: int = 0,
) -> None:
    """Write `out`, a copy of the query store `queries` (exact gradients without LN) with H⁻¹∇L(t) per query.

    H is the Hessian of the mean training loss over the store's parameters, sampled on a fresh random batch of
    `batch_size` training samples (`tokens`) at each of `depth` LiSSA steps. The model runs in fp32, eager
    attention (double backpropagation).
    """
    settings = read_settings(queries)
    if settings["compressor"] != "none" or settings["normalize"]:
        raise RapidinError(f"{queries}: LiSSA needs exact gradients without layer-wise normalisation")
    model, tokenizer = load_model(model_path, adapter)
    model.set_attn_implementation("eager")
    params = gradient_parameters(model, settings)
    dataset = TokenizedDataset.open(tokens)
    rng = np.random.default_rng(seed)
    group = zarr.open_group(queries, mode="r")
    v = torch.from_numpy(group["exact"][:].astype(np.float32))  # (Q, D)

    def sampled_hvp(vectors: torch.Tensor) -> torch.Tensor:
        rows = rng.choice(len(dataset), size=min(batch_size, len(dataset)), replace=False)
        batch, weights = loss_batch(dataset, rows, tokenizer.pad_token_id, params[0].device)
        return model_hvp(model, params, batch, weights, vectors)

    ihvp = lissa(v, sampled_hvp, depth, scale, damping)
    lissa_settings = {"depth": depth, "scale": scale, "damping": damping, "batch_size": batch_size, "seed": seed}
    log.info(
        "LiSSA %s: |H⁻¹v| / |v| = %.3g (mean over queries)", lissa_settings, (ihvp.norm(dim=1) / v.norm(dim=1)).mean()
    )
    with atomic_dir(out) as tmp:
        result = zarr.open_group(tmp, mode="w", zarr_format=3)
        result.create_array(
            "exact",
            data=ihvp.numpy(),
            chunks=(len(ihvp), ihvp.shape[1]),
            compressors=None,
            dimension_names=group["exact"].metadata.dimension_names,
        )
        result.create_array("ids", data=group["ids"][:], dimension_names=group["ids"].metadata.dimension_names)
        write_settings(result, {**settings, "dtype": "float32", "lissa": lissa_settings})
