"""Compressors: per-module (activations, output gradients) of a batch → per-sample gradient vectors.

`ExactCompressor` (`compressor: none`) writes the full D-long gradient; `RapidGradCompressor` sketches it
to each K without ever concatenating it. Both build one module's per-sample gradient blocks at a time,
apply layer-wise normalisation (each parameter tensor scaled to unit L2 norm) and add them to the output.
`FactoredCompressor` (`compressor: factored`) projects the activations and output gradients first and never
builds a per-sample gradient at all. Math is fp32 (fp64 if the model is fp64), whatever dtype the model
runs in.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rapidin.errors import RapidinError
from rapidin.model import Block
from rapidin.rapidgrad import RapidGrad

COMPRESSORS = ("rapidgrad", "factored", "none")


class Compressor:
    """Accumulates per-sample gradient vectors for one batch; subclasses say how a block is added."""

    def __init__(self, blocks: list[Block], normalize: bool = True):
        self.blocks_of: dict[str, list[Block]] = {}
        for block in blocks:
            self.blocks_of.setdefault(block.module, []).append(block)
        self.dim = sum(b.size for b in blocks)
        self.normalize = normalize
        self.outputs: dict[str, torch.Tensor] = {}
        self._seen: set[str] = set()

    @property
    def arrays(self) -> dict[str, int]:
        """Output array names and their lengths."""
        raise NotImplementedError

    def start(self, batch_size: int, device, dtype=torch.float32) -> None:
        self.outputs = {
            name: torch.zeros(batch_size, dim, device=device, dtype=dtype) for name, dim in self.arrays.items()
        }
        self._seen = set()

    def add_module(self, name: str, activations: torch.Tensor, grads: torch.Tensor) -> None:
        """Sink for ActivationGradientCapture: add one module's per-sample weight and bias gradients."""
        a, g = self._receive(name, activations, grads)  # (B, T, in), (B, T, out)
        for block in self.blocks_of[name]:
            weight = block.kind == "weight"
            values = torch.bmm(g.transpose(1, 2), a).flatten(1) if weight else g.sum(dim=1)  # (B, out*in) or (B, out)
            self.add_block(block, self._normalized(values, values.norm(dim=1)))

    def _receive(self, name: str, activations: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One module's (activations, output gradients) in the math dtype; each module may arrive once per batch."""
        if name in self._seen:
            raise RapidinError(f"model.modules: module {name} runs twice in one forward; pick modules that run once")
        self._seen.add(name)
        dtype = self.outputs[next(iter(self.outputs))].dtype
        return activations.to(dtype), grads.to(dtype)

    def _normalized(self, values: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """values (B, n), a temporary, divided in place by the per-sample gradient norms (B,) of their block."""
        if not self.normalize:
            return values
        return values.div_(norms.clamp(min=torch.finfo(values.dtype).tiny).unsqueeze(1))

    def add_block(self, block: Block, values: torch.Tensor) -> None:
        raise NotImplementedError

    def finish(self) -> dict[str, torch.Tensor]:
        missing = set(self.blocks_of) - self._seen
        if missing:
            raise RapidinError(f"model.modules: no gradient reached {sorted(missing)[0]} (unused in the forward?)")
        return self.outputs


class ExactCompressor(Compressor):
    """The full (layer-normalised) gradient, D numbers per sample."""

    @property
    def arrays(self) -> dict[str, int]:
        return {"exact": self.dim}

    def add_block(self, block: Block, values: torch.Tensor) -> None:
        self.outputs["exact"][:, block.offset : block.offset + block.size] = values


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


class FactoredCompressor(Compressor):
    """Per linear module, a rank × rank sketch of its weight gradient and a rank-long one of its bias.

    LoGra/Bergson-style: with seeded random P (rank, out) and Q (rank, in), entries ±1/√rank, the weight
    gradient Σ_t g_t a_tᵀ is sketched as P (Σ_t g_t a_tᵀ) Qᵀ = Σ_t (P g_t)(Q a_t)ᵀ, computed from the
    projected (B, T, rank) factors, so no per-sample (out, in) gradient is ever built; the bias gradient
    Σ_t g_t becomes P Σ_t g_t. Since E[PᵀP] = I and E[QᵀQ] = I, inner products of sketches are unbiased
    estimates of the exact ones. P and Q come from a stable bit stream keyed by (seed, module offset in D),
    so they are the same on any device and in any process.

    Layer-wise normalisation divides each sketch by its block's exact gradient norm (`weight_gradient_norms`,
    a Gram-matrix identity, O(T²(in + out)) per sample), not by the sketch's own norm: that would be cheaper
    but noisy, and a ratio of estimates is no longer an unbiased estimate of the normalised inner product.
    """

    def __init__(self, blocks: list[Block], rank: int, seed: int, normalize: bool = True):
        super().__init__(blocks, normalize)
        if rank < 1:
            raise RapidinError(f"cache.rank: {rank} is not a positive integer")
        self.rank, self.seed = rank, seed
        self.slots: dict[Block, slice] = {}
        start = 0
        for block in blocks:
            size = rank * rank if block.kind == "weight" else rank
            self.slots[block] = slice(start, start + size)
            start += size
        self._projections: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def arrays(self) -> dict[str, int]:
        return {"factored": sum(s.stop - s.start for s in self.slots.values())}

    def add_module(self, name: str, activations: torch.Tensor, grads: torch.Tensor) -> None:
        a, g = self._receive(name, activations, grads)  # (B, T, in), (B, T, out)
        p, q = self._projection(name, g)  # (rank, out), (rank, in)
        pg = g @ p.T  # (B, T, rank)
        for block in self.blocks_of[name]:
            if block.kind == "weight":
                values = torch.bmm(pg.transpose(1, 2), a @ q.T).flatten(1)  # (B, rank*rank)
                norms = weight_gradient_norms(a, g)
            else:
                values, norms = pg.sum(dim=1), g.sum(dim=1).norm(dim=1)  # (B, rank), (B,)
            self.outputs["factored"][:, self.slots[block]] = self._normalized(values, norms)

    def _projection(self, name: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The module's P (rank, out) and Q (rank, in), made once, on `like`'s device and dtype."""
        if name not in self._projections:
            out_features, in_features = self.blocks_of[name][0].shape
            n = self.rank * (out_features + in_features)
            raw = np.random.PCG64([self.seed, self.blocks_of[name][0].offset]).random_raw(math.ceil(n / 64))
            bits = np.unpackbits(raw.astype("<u8").view(np.uint8))[:n]  # stable across numpy versions
            signs = torch.from_numpy(1.0 - 2.0 * bits.reshape(self.rank, -1)) / math.sqrt(self.rank)
            signs = signs.to(like.device, like.dtype)
            self._projections[name] = signs[:, :out_features], signs[:, out_features:]
        return self._projections[name]


def weight_gradient_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(B,) Frobenius norms of the per-sample weight gradients Σ_t g_t a_tᵀ, without building them.

    ‖Σ_t g_t a_tᵀ‖² = Σ_{t,s} (g_t·g_s)(a_t·a_s): two (B, T, T) Gram matrices instead of a (B, out, in) tensor.
    """
    gram = torch.bmm(g, g.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))  # (B, T, T)
    return gram.sum(dim=(1, 2)).clamp(min=0).sqrt()


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
