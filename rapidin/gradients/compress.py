"""Compressors: per-block gradient terms of a batch (capture.py) → per-sample gradient vectors.

`ExactCompressor` (`compressor: none`) writes the full D-long gradient; `RapidGradCompressor` sketches it
to each K without ever concatenating it. Both build one block's per-sample gradient at a time (an embedding:
only the rows of the batch's tokens), apply layer-wise normalisation (each parameter tensor scaled to unit L2
norm) and add it to the output. `FactoredCompressor` (`compressor: factored`) projects the factors of weight
gradients first and never builds a per-sample weight gradient at all. Math is fp32 (fp64 if the model is
fp64), whatever dtype the model runs in.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rapidin.errors import RapidinError
from rapidin.gradients.capture import Outer
from rapidin.gradients.model import Block
from rapidin.gradients.rapidgrad import RapidGrad

COMPRESSORS = ("rapidgrad", "factored", "none")
# What a cached vector means: bumped when capture, normalisation or a sketch changes (other versions are refused).
SKETCH_VERSION = 2


class Compressor:
    """Accumulates per-sample gradient vectors for one batch; subclasses say how a block is added."""

    def __init__(self, blocks: list[Block], normalize: bool = True):
        self.blocks = blocks
        self.dim = sum(b.size for b in blocks)
        self.normalize = normalize
        self.scales: dict[str, torch.Tensor] = {}  # optimizer-aware: per block name, a factor per element
        self.outputs: dict[str, torch.Tensor] = {}
        self._terms: dict[Block, list] = {}
        self._done: set[Block] = set()

    @property
    def arrays(self) -> dict[str, int]:
        """Output array names and their lengths."""
        raise NotImplementedError

    def start(self, batch_size: int, device, dtype=torch.float32) -> None:
        self.outputs = {
            name: torch.zeros(batch_size, dim, device=device, dtype=dtype) for name, dim in self.arrays.items()
        }
        self._terms, self._done = {}, set()

    def receive(self, block: Block, term: Outer | torch.Tensor) -> None:
        """Sink for ActivationGradientCapture: a block is added once the terms of all its uses are in."""
        terms = self._terms.setdefault(block, [])
        terms.append(term)
        if len(terms) == len(block.uses):
            self.add_terms(block, self._terms.pop(block))
            self._done.add(block)

    def set_scales(self, scales: dict[str, torch.Tensor]) -> None:
        """Optimizer-aware gradients: each block's gradient is multiplied elementwise by `scales[block.name]`
        (the block's shape) before layer-wise normalisation and compression (gradients.optimizer.adam_scales)."""
        missing = [b.name for b in self.blocks if b.name not in scales]
        if missing:
            raise RapidinError(f"cache.optimizer: no optimizer scales for {missing[0]}")
        self.scales = {b.name: scales[b.name].reshape(b.shape) for b in self.blocks}

    def _scale(self, block: Block, like: torch.Tensor) -> torch.Tensor | None:
        scale = self.scales.get(block.name)
        return None if scale is None else scale.to(like.device, like.dtype)

    def add_terms(self, block: Block, terms: list) -> None:
        """Add one block's (optimizer-scaled) layer-normalised per-sample gradient: sparse embedding rows, or all."""
        if all(isinstance(t, Outer) and t.one_hot for t in terms):
            ids, rows = embedding_rows(terms)  # (U,), (B, U, n)
            scale = self._scale(block, rows)
            if scale is not None:
                rows.mul_(scale[ids])  # (U, n) broadcast over the batch
            flat = rows.flatten(1)
            self.add_rows(block, ids, self._normalized(flat, flat.norm(dim=1)).view_as(rows))
        else:
            values = dense_gradient(terms, block.shape)  # (B, size)
            scale = self._scale(block, values)
            if scale is not None:
                values.mul_(scale.flatten())
            self.add_block(block, self._normalized(values, values.norm(dim=1)))

    def _normalized(self, values: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """values (B, n), a temporary, divided in place by the per-sample gradient norms (B,) of their block."""
        if not self.normalize:
            return values
        return values.div_(norms.clamp(min=torch.finfo(values.dtype).tiny).unsqueeze(1))

    def add_block(self, block: Block, values: torch.Tensor) -> None:
        """Add a block's (B, size) gradient, a temporary the method may overwrite."""
        raise NotImplementedError

    def add_rows(self, block: Block, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Add the rows `ids` (U,) of a (rows, n) block, (B, U, n); its other rows are zero."""
        raise NotImplementedError

    def finish(self) -> dict[str, torch.Tensor]:
        missing = [b.name for b in self.blocks if b not in self._done]
        if missing:
            raise RapidinError(f"model.modules: no gradient reached {missing[0]} (unused in the forward?)")
        return self.outputs


def dense_gradient(terms: list, shape: tuple[int, ...]) -> torch.Tensor:
    """(B, size): the sum of a block's terms, dense (B, n) values or Outer products built as (B, m, n)."""
    if not isinstance(terms[0], Outer):
        return torch.stack(terms).sum(dim=0) if len(terms) > 1 else terms[0]
    values = terms[0].right.new_zeros(terms[0].right.shape[0], *shape)  # (B, m, n)
    for term in terms:
        if term.one_hot:
            values.scatter_add_(1, term.left.unsqueeze(-1).expand_as(term.right), term.right)
        else:
            values.baddbmm_(term.left.mT, term.right)
    return values.flatten(1)


def embedding_rows(terms: list[Outer]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows touched by a batch's token ids, (U,) sorted, and each sample's gradient on them (B, U, n)."""
    ids = torch.unique(torch.cat([t.left.flatten() for t in terms]))  # (U,)
    right = terms[0].right
    rows = right.new_zeros(right.shape[0], len(ids), right.shape[2])  # (B, U, n)
    for term in terms:
        local = torch.searchsorted(ids, term.left)  # (B, T): each token's row among the U
        rows.scatter_add_(1, local.unsqueeze(-1).expand_as(term.right), term.right)
    return ids, rows


class ExactCompressor(Compressor):
    """The full (layer-normalised) gradient, D numbers per sample."""

    @property
    def arrays(self) -> dict[str, int]:
        return {"exact": self.dim}

    def add_block(self, block: Block, values: torch.Tensor) -> None:
        self.outputs["exact"][:, block.offset : block.offset + block.size] = values

    def add_rows(self, block: Block, ids: torch.Tensor, rows: torch.Tensor) -> None:
        exact = self.outputs["exact"][:, block.offset : block.offset + block.size]
        exact.view(-1, *block.shape)[:, ids] = rows


class RapidGradCompressor(Compressor):
    """RapidGrad sketches to each K in `ks`, from one pass."""

    def __init__(self, blocks: list[Block], ks: list[int], seed: int, normalize: bool = True):
        super().__init__(blocks, normalize)
        self.sketch = RapidGrad(self.dim, ks, seed)

    @property
    def arrays(self) -> dict[str, int]:
        return {f"k{k}": k for k in self.sketch.ks}

    def add_block(self, block: Block, values: torch.Tensor) -> None:
        by_k = {k: self.outputs[f"k{k}"] for k in self.sketch.ks}
        self.sketch.add_block(by_k, values, block.offset, overwrite=True)

    def add_rows(self, block: Block, ids: torch.Tensor, rows: torch.Tensor) -> None:
        by_k = {k: self.outputs[f"k{k}"] for k in self.sketch.ks}
        n = block.shape[1]
        index = block.offset + (ids.unsqueeze(1) * n + torch.arange(n, device=ids.device)).flatten()  # (U*n,)
        self.sketch.add_at(by_k, rows.flatten(1), index)


class FactoredCompressor(Compressor):
    """Per weight matrix a rank × rank sketch of its gradient, per other tensor (bias, norm weight) a rank-long one.

    LoGra/Bergson-style: with seeded random P (rank, m) and Q (rank, n), entries ±1/√rank, a weight gradient
    Σ_t l_t r_tᵀ (m, n) is sketched as P (Σ_t l_t r_tᵀ) Qᵀ = Σ_t (P l_t)(Q r_t)ᵀ, computed from the projected
    (B, T, rank) factors, so no per-sample (m, n) gradient is ever built (an embedding's one-hot l_t projects to
    a column of P; a tied weight sums the products of both its uses); any other block v (n numbers) becomes P v.
    Since E[PᵀP] = I and E[QᵀQ] = I, inner products of sketches are unbiased estimates of the exact ones. P and
    Q come from a stable bit stream keyed by (seed, block offset in D), so they are the same on any device and
    in any process.

    Layer-wise normalisation divides each sketch by its block's exact gradient norm (`outer_norms`, a
    Gram-matrix identity, O(T²(m + n)) per sample), not by the sketch's own norm: that would be cheaper but
    noisy, and a ratio of estimates is no longer an unbiased estimate of the normalised inner product.
    """

    def __init__(self, blocks: list[Block], rank: int, seed: int, normalize: bool = True):
        super().__init__(blocks, normalize)
        if rank < 1:
            raise RapidinError(f"cache.rank: {rank} is not a positive integer")
        self.rank, self.seed = rank, seed
        self.slots: dict[Block, slice] = {}
        start = 0
        for block in blocks:
            size = rank * rank if block.outer else rank
            self.slots[block] = slice(start, start + size)
            start += size
        self._projections: dict[Block, tuple[torch.Tensor, ...]] = {}

    @property
    def arrays(self) -> dict[str, int]:
        return {"factored": sum(s.stop - s.start for s in self.slots.values())}

    def set_scales(self, scales: dict[str, torch.Tensor]) -> None:
        raise RapidinError(
            "cache.optimizer: compressor factored never builds the gradient to scale; use rapidgrad or none"
        )

    def add_terms(self, block: Block, terms: list) -> None:
        if not block.outer:
            values = dense_gradient(terms, block.shape)  # (B, n)
            (p,) = self._projection(block, values)  # (rank, n)
            sketch, norms = values @ p.T, values.norm(dim=1)  # (B, rank), (B,)
        else:
            right = terms[0].right
            p, q = self._projection(block, right)  # (rank, m), (rank, n)
            sketch = right.new_zeros(right.shape[0], self.rank, self.rank)  # (B, rank, rank)
            for term in terms:
                left = p.T[term.left] if term.one_hot else term.left @ p.T  # (B, T, rank)
                sketch.baddbmm_(left.mT, term.right @ q.T)
            sketch, norms = sketch.flatten(1), outer_norms(terms)
        self.outputs["factored"][:, self.slots[block]] = self._normalized(sketch, norms)

    def _projection(self, block: Block, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The block's P (rank, m) and Q (rank, n), or P (rank, size), made once, on `like`'s device and dtype."""
        if block not in self._projections:
            sizes = list(block.shape) if block.outer else [block.size]
            n = self.rank * sum(sizes)
            raw = np.random.PCG64([self.seed, block.offset]).random_raw(math.ceil(n / 64))
            bits = np.unpackbits(raw.astype("<u8").view(np.uint8))[:n]  # stable across numpy versions
            signs = torch.from_numpy(1.0 - 2.0 * bits.reshape(self.rank, -1)) / math.sqrt(self.rank)
            self._projections[block] = signs.to(like.device, like.dtype).split(sizes, dim=1)
        return self._projections[block]


def outer_norms(terms: list[Outer]) -> torch.Tensor:
    """(B,) Frobenius norms of per-sample gradients Σ_i Σ_t l_it r_itᵀ (the terms i), without building them.

    ‖Σ_i Σ_t l_it r_itᵀ‖² = Σ_{i,j} Σ_{t,s} (l_it·l_js)(r_it·r_js): (B, T, T) Gram matrices instead of (B, m, n).
    """
    total = 0
    for x in terms:
        for y in terms:
            total = total + (_left_dots(x, y) * torch.bmm(x.right, y.right.mT)).sum(dim=(1, 2))
    return total.clamp(min=0).sqrt()


def _left_dots(x: Outer, y: Outer) -> torch.Tensor:
    """(B, Tx, Ty) inner products l_xt·l_ys of two terms' left factors (one-hot ones as token ids)."""
    if x.one_hot and y.one_hot:
        return (x.left.unsqueeze(2) == y.left.unsqueeze(1)).to(x.right.dtype)
    if x.one_hot:
        return _left_dots(y, x).mT
    if y.one_hot:
        return x.left.gather(2, y.left.unsqueeze(1).expand(-1, x.left.shape[1], -1))  # l_xt[id_ys]
    return torch.bmm(x.left, y.left.mT)


def make_compressor(
    name: str, blocks: list[Block], ks: list[int], seed: int, normalize: bool = True, rank: int = 16
) -> Compressor:
    if name == "rapidgrad":
        return RapidGradCompressor(blocks, ks, seed, normalize)
    if name == "factored":
        return FactoredCompressor(blocks, rank, seed, normalize)
    if name == "none":
        return ExactCompressor(blocks, normalize)
    raise RapidinError(f"cache.compressor: unknown compressor {name!r} (expected one of {COMPRESSORS})")
