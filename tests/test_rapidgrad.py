"""RapidGrad: a bijective, globally mixing permutation; unbiased inner products; blockwise == whole."""

import hashlib

import numpy as np
import pytest
import torch

from rapidin.errors import RapidinError
from rapidin.gradients.rapidgrad import RapidGrad


def test_permutation_is_a_bijection_and_signs_are_balanced():
    sketch = RapidGrad(dim=1 << 16, ks=[1 << 8], seed=3)
    position, sign = sketch.positions_and_signs(0, 1 << 16, "cpu")
    assert torch.equal(position.sort().values, torch.arange(1 << 16))
    assert sign.abs().eq(1).all()
    # fair coins independent of the buckets (D = 2^16 makes their total 0 by construction, so test within buckets):
    # each bucket's 256 signs sum to ~ N(0, 256), so Σ sum² / 256 is chi-square with 256 degrees of freedom
    sums = torch.zeros(1 << 8, dtype=torch.float64).index_add_(0, sketch.buckets(position, 1 << 8), sign.double())
    assert abs((sums**2 / 256).sum().item() - 256) < 5 * 512**0.5
    assert abs((sign[1:].double() * sign[:-1]).mean()) < 5 / 256  # neighbours uncorrelated (5 σ)


def test_buckets_draw_from_the_whole_vector():
    """Each bucket's sources spread over every 1/16 of the input (the authors' shuffle is block-local)."""
    dim, k = 1 << 20, 1 << 10
    sketch = RapidGrad(dim, [k], seed=0)
    position, _ = sketch.positions_and_signs(0, dim, "cpu")
    bucket = sketch.buckets(position, k)
    region = torch.arange(dim) // (dim // 16)
    counts = torch.zeros(k, 16).index_put_((bucket, region), torch.ones(dim), accumulate=True)
    assert counts.sum(1).eq(dim // k).all()  # every bucket sums exactly D/K inputs
    assert (counts > 0).all(), "some bucket misses a region of the input"
    expected = dim // k / 16  # 64 sources per region on average: chi-square against uniform
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    dof = k * 15
    assert abs(chi2 - dof) < 5 * (2 * dof) ** 0.5


def test_inner_products_are_unbiased():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3000, dtype=torch.float64, generator=generator)
    x[1] = 0.6 * x[0] + 0.8 * x[1]
    exact = (x[0] @ x[1]).item()
    estimates = []
    for seed in range(2000):
        y = RapidGrad(3000, [256], seed)(x)[256]
        estimates.append((y[0] @ y[1]).item())
    mean, standard_error = np.mean(estimates), np.std(estimates) / np.sqrt(len(estimates))
    assert abs(mean - exact) < 4 * standard_error
    # variance matches the count-sketch formula (‖x‖²‖y‖² + ⟨x,y⟩² − 2Σx_i²y_i²)/K up to sampling noise
    predicted = ((x[0] @ x[0]) * (x[1] @ x[1]) + exact**2 - 2 * (x[0] ** 2 @ x[1] ** 2)).item() / 256
    assert np.var(estimates) == pytest.approx(predicted, rel=0.15)


def test_blockwise_sketch_equals_whole_and_several_k_from_one_pass():
    x = torch.randn(3, 1000, dtype=torch.float64)
    sketch = RapidGrad(1000, [64, 256], seed=7)
    whole = sketch(x)
    parts = {k: torch.zeros(3, k, dtype=torch.float64) for k in (64, 256)}
    for start in range(0, 1000, 300):
        sketch.add_block(parts, x[:, start : start + 300], start)
    for k in (64, 256):
        torch.testing.assert_close(parts[k], whole[k])
    # the coarser sketch is the finer one with neighbouring buckets summed
    torch.testing.assert_close(whole[64], whole[256].reshape(3, 64, 4).sum(-1))


def test_same_seed_same_sketch_other_seed_other_sketch():
    x = torch.randn(2, 500, dtype=torch.float64)
    assert torch.equal(RapidGrad(500, [64], 1)(x)[64], RapidGrad(500, [64], 1)(x)[64])
    assert not torch.equal(RapidGrad(500, [64], 1)(x)[64], RapidGrad(500, [64], 2)(x)[64])


@pytest.mark.parametrize("k", [0, -4, 3, 6, 12, 1000, 2048])  # not a power of two, or larger than D
def test_bad_k_is_refused(k):
    with pytest.raises(RapidinError, match=r"cache\.k"):
        RapidGrad(1024, [k], 0)


def reference_positions_and_signs(indices: list[int], seed: int, dim: int, bits: int) -> list[tuple[int, int]]:
    """The documented permutation and signs in pure Python ints: SHA-256 round keys of (seed, D), add-key,
    xor-shift and multiply-by-odd rounds modulo 2^bits, sign = low bit of the position's own mix."""

    def keys(mixer: str) -> list[tuple[int, int]]:
        mult_bits = min(bits, 62 - bits)
        out = []
        for r in range(4):
            digest = hashlib.sha256(f"rapidgrad:{seed}:{dim}:{mixer}:{r}".encode()).digest()
            add = int.from_bytes(digest[:8], "little") % 2**bits
            out.append((add, 2 * (int.from_bytes(digest[8:16], "little") % 2 ** (mult_bits - 1)) + 1))
        return out

    def mix(x: int, round_keys: list[tuple[int, int]]) -> int:
        mask, shift = 2**bits - 1, max(1, bits // 2)
        for add, multiply in round_keys:
            x = (x + add) & mask
            x ^= x >> shift
            x = (x * multiply) & mask
        return x ^ (x >> shift)

    permutation, sign = keys("permutation"), keys("sign")
    return [(p, 1 - 2 * (mix(p, sign) & 1)) for p in (mix(i, permutation) for i in indices)]


# A few positions and signs of the reference above, pinned: a change of the sketch must be deliberate.
PINNED = {
    (0, 1000, 10): [(0, (610, 1)), (1, (292, -1)), (999, (363, -1))],
    (7, 10**9 + 7, 30): [(0, (536455346, 1)), (123456789, (764073016, -1)), (10**9 + 6, (100515217, 1))],
}


@pytest.mark.parametrize(("seed", "dim", "bits"), list(PINNED))
def test_keys_are_a_fixed_function_of_seed_and_dim(seed, dim, bits):
    """Positions and signs equal an independent pure-Python implementation of the documented scheme, whatever the
    numpy version (no random generator stream is involved)."""
    sketch = RapidGrad(dim, [1 << 6], seed)
    assert sketch.bits == bits
    indices = [i for i, _ in PINNED[(seed, dim, bits)]] + list(range(100, 140))
    position, sign = sketch.permute(torch.tensor(indices))
    want = reference_positions_and_signs(indices, seed, dim, bits)
    assert list(zip(position.tolist(), sign.tolist(), strict=True)) == want
    pinned = [want[indices.index(i)] for i, _ in PINNED[(seed, dim, bits)]]
    assert pinned == [expected for _, expected in PINNED[(seed, dim, bits)]]


@pytest.mark.parametrize("k", [1, 2, 4, 64, 1024])
def test_every_power_of_two_up_to_d_is_accepted(k):
    assert RapidGrad(1024, [k], 0)(torch.ones(1, 1024))[k].shape == (1, k)
