"""RapidGrad: the OPORP sketch of a D-long vector into K numbers (pad, permute, ±1, sum groups of D/K).

The permutation is a keyed bijection on [0, 2^b) with 2^b ≥ max(D, K): rounds of add-key, xor-shift and
multiply-by-odd, all modulo 2^b. It mixes globally (one output bucket draws from the whole vector, unlike the
authors' reshape-permute, which is block-local when D is a power of two), costs no memory, is computed on the
fly for any slice of indices on any device, and is the same on CPU and GPU and across torch versions: it is
regenerated from (seed, D), never stored. Padding is implicit: padded entries are zero and never visited.

Since the sketch S is linear, a gradient can be sketched block by block: S(x) = Σ_blocks S(x_block), and a
layer-wise-normalised block is sketched as S(x_block) / ‖x_block‖.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rapidin.errors import RapidinError

ROUNDS = 4


class RapidGrad:
    """The sketch for gradients of length `dim`, to each size in `ks` (powers of two), from `seed`."""

    def __init__(self, dim: int, ks: list[int], seed: int):
        for k in ks:
            if k <= 0 or k & (k - 1):
                raise RapidinError(f"cache.k: {k} is not a power of two")
            if k > dim:
                raise RapidinError(f"cache.k: {k} is larger than the gradient dimension D={dim}")
        self.dim, self.ks, self.seed = dim, list(ks), seed
        self.bits = max(math.ceil(math.log2(max(dim, 2))), int(math.log2(max(ks))))
        rng = np.random.default_rng([seed, dim])
        mult_bits = min(self.bits, 62 - self.bits)
        self._keys = [
            [
                (int(rng.integers(0, 1 << self.bits)), int(rng.integers(0, 1 << (mult_bits - 1))) * 2 + 1)
                for _ in range(ROUNDS)
            ]
            for _ in ("permutation", "sign")
        ]

    def _mix(self, x: torch.Tensor, keys) -> torch.Tensor:
        """A keyed bijection of b-bit integers (int64 tensor in, int64 tensor out)."""
        mask, shift = (1 << self.bits) - 1, max(1, self.bits // 2)
        for add, multiply in keys:
            x = (x + add) & mask
            x = x ^ (x >> shift)
            x = (x * multiply) & mask
        return x ^ (x >> shift)

    def positions_and_signs(self, start: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Permuted positions (int64) and ±1 signs (int8) of input indices start … start+length-1."""
        index = torch.arange(start, start + length, dtype=torch.int64, device=device)
        position = self._mix(index, self._keys[0])
        sign = 1 - 2 * (self._mix(position, self._keys[1]) & 1).to(torch.int8)
        return position, sign

    def buckets(self, position: torch.Tensor, k: int) -> torch.Tensor:
        """Output bucket of each permuted position: consecutive groups of 2^b / k positions."""
        return position >> (self.bits - int(math.log2(k)))

    def add_block(self, outputs: dict[int, torch.Tensor], values: torch.Tensor, start: int) -> None:
        """Sketch a (B, n) slice of the gradient, which sits at indices start … start+n-1, into outputs[k] (B, k)."""
        position, sign = self.positions_and_signs(start, values.shape[1], values.device)
        signed = values * sign.to(values.dtype)  # (B, n)
        for k in self.ks:
            outputs[k].index_add_(1, self.buckets(position, k), signed)

    def __call__(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Sketch whole vectors x (B, D) → {k: (B, k)}."""
        outputs = {k: x.new_zeros(x.shape[0], k) for k in self.ks}
        self.add_block(outputs, x, 0)
        return outputs
