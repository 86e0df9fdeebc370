"""Compressors: per-module (activations, output gradients) of a batch → per-sample gradient vectors.

`ExactCompressor` (`compressor: none`) writes the full D-long gradient; `RapidGradCompressor` sketches it
to each K without ever concatenating it. Both build one module's per-sample gradient blocks at a time,
apply layer-wise normalisation (each parameter tensor scaled to unit L2 norm) and add them to the output.
Math is fp32 (fp64 if the model is fp64), whatever dtype the model runs in.
"""

from __future__ import annotations

import torch

from rapidin.errors import RapidinError
from rapidin.model import Block
from rapidin.rapidgrad import RapidGrad

COMPRESSORS = ("rapidgrad", "none")


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
        if name in self._seen:
            raise RapidinError(f"model.modules: module {name} runs twice in one forward; pick modules that run once")
        self._seen.add(name)
        dtype = self.outputs[next(iter(self.outputs))].dtype
        a, g = activations.to(dtype), grads.to(dtype)  # (B, T, in), (B, T, out)
        for block in self.blocks_of[name]:
            if block.kind == "weight":
                values = torch.bmm(g.transpose(1, 2), a).flatten(1)  # (B, out*in)
            else:
                values = g.sum(dim=1)  # (B, out)
            if self.normalize:
                values = values / values.norm(dim=1, keepdim=True).clamp(min=torch.finfo(dtype).tiny)
            self.add_block(block, values)

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
        self.sketch.add_block(by_k, values, block.offset)


def make_compressor(name: str, blocks: list[Block], ks: list[int], seed: int, normalize: bool = True) -> Compressor:
    if name == "rapidgrad":
        return RapidGradCompressor(blocks, ks, seed, normalize)
    if name == "none":
        return ExactCompressor(blocks, normalize)
    raise RapidinError(f"cache.compressor: unknown compressor {name!r} (expected one of {COMPRESSORS})")
