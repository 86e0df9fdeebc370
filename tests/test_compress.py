"""Compressed scores against exact fp64 scores (`compressor: none`) on a tiny model."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from rapidin.cache.shard import sample_gradients
from rapidin.errors import RapidinError
from rapidin.gradients.capture import Outer
from rapidin.gradients.compress import (
    ExactCompressor,
    FactoredCompressor,
    RapidGradCompressor,
    dense_gradient,
    embedding_rows,
    make_compressor,
)
from rapidin.gradients.loss import collate
from rapidin.gradients.model import Block, parameter_blocks, select_modules

from .conftest import random_samples, tiny_llama


def gradients(model, compressor, samples):
    modules = select_modules(model)
    batch = collate(samples, pad_id=0)
    return sample_gradients(model, modules, compressor, batch, batch.mean_response_weights)


def test_rapidgrad_scores_rank_like_exact_scores_at_k_65536():
    model = tiny_llama(vocab=257, hidden=128)  # D ≈ 300k
    blocks = parameter_blocks(select_modules(model))
    train, queries = random_samples(40, seed=1, vocab=257), random_samples(4, seed=2, vocab=257)
    exact = ExactCompressor(blocks)
    sketch = RapidGradCompressor(blocks, [4096, 65536], seed=0)
    assert exact.dim > 4 * 65536  # the sketch really compresses
    exact_scores = gradients(model, exact, queries)["exact"] @ gradients(model, exact, train)["exact"].T
    queries_k, train_k = gradients(model, sketch, queries), gradients(model, sketch, train)
    for q in range(4):
        rho = spearmanr(exact_scores[q], queries_k["k65536"][q] @ train_k["k65536"].T).statistic
        assert rho >= 0.95, f"query {q}: Spearman {rho:.3f} at K=65536"
    errors = {k: (queries_k[f"k{k}"] @ train_k[f"k{k}"].T - exact_scores).abs().mean() for k in (4096, 65536)}
    assert errors[65536] < errors[4096]  # larger K, closer to exact


def test_layer_normalised_blocks_have_unit_norm():
    model = tiny_llama()
    blocks = parameter_blocks(select_modules(model))
    vectors = gradients(model, ExactCompressor(blocks), random_samples(3))["exact"]
    for block in blocks:
        norms = vectors[:, block.offset : block.offset + block.size].norm(dim=1)
        torch.testing.assert_close(norms, torch.ones(3, dtype=torch.float64))
    # and the exact score is a sum of per-tensor cosines: ⟨g, g⟩ = number of tensors
    torch.testing.assert_close((vectors * vectors).sum(1), torch.full((3,), float(len(blocks)), dtype=torch.float64))


def dense_blocks(*shapes) -> list[Block]:
    """Blocks of norm weights (dense terms), one per shape, laid out one after the other."""
    offsets = np.r_[0, np.cumsum([int(np.prod(s)) for s in shapes])]
    return [Block(((f"m{i}", "weight"),), s, int(offsets[i]), False) for i, s in enumerate(shapes)]


def test_make_compressor_builds_the_named_one():
    blocks = dense_blocks((40,), (30,))
    sketch = make_compressor("rapidgrad", blocks, [8, 32], seed=3, normalize=False)
    assert isinstance(sketch, RapidGradCompressor) and sketch.sketch.ks == [8, 32] and sketch.sketch.seed == 3
    assert sketch.normalize is False  # passed on as given
    assert sketch.arrays == {"k8": 8, "k32": 32} and sketch.dim == 70
    factored = make_compressor("factored", blocks, [], seed=4)
    assert isinstance(factored, FactoredCompressor) and factored.rank == 16 and factored.seed == 4
    assert factored.normalize and factored.arrays == {"factored": 32}  # rank numbers per dense block
    exact = make_compressor("none", blocks, [8], seed=0)
    assert type(exact) is ExactCompressor and exact.arrays == {"exact": 70} and exact.normalize
    with pytest.raises(RapidinError, match=r"^cache\.compressor: unknown compressor 'oporp' \(expected one of"):
        make_compressor("oporp", blocks, [8], 0)


@pytest.mark.parametrize("name", ["none", "rapidgrad", "factored"])
def test_a_zero_block_stays_zero_and_a_missing_one_is_an_error(name):
    """Layer-wise normalisation of an all-zero block gradient (no gradient reaches it for that sample) gives zeros,
    not NaN; a block whose terms never arrive is named at finish."""
    blocks = dense_blocks((40,), (30,))
    compressor = make_compressor(name, blocks, [8], seed=0, rank=4)
    compressor.start(2, "cpu", torch.float64)
    values = torch.randn(2, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    values[1] = 0
    compressor.receive(blocks[0], values.clone())
    with pytest.raises(RapidinError, match=r"^model\.modules: no gradient reached m1\.weight"):
        compressor.finish()
    compressor.receive(blocks[1], torch.zeros(2, 30, dtype=torch.float64))
    out = next(iter(compressor.finish().values()))
    assert out.dtype == torch.float64 and out.shape[0] == 2
    assert torch.equal(out[1], torch.zeros_like(out[1])) and out[0].norm() > 0
    if name == "none":  # the exact vector: the first block normalised, then zeros
        torch.testing.assert_close(out[0], torch.cat([values[0] / values[0].norm(), torch.zeros(30).double()]))


def test_dense_terms_and_embedding_rows_sum_over_uses():
    """Several dense terms of one block add up; embedding terms (token ids, rows) become the rows of the batch's
    distinct tokens, sorted, repeated tokens summed: against one-hot matrices built in full."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(3, 6, dtype=torch.float64, generator=generator) for _ in range(2))
    torch.testing.assert_close(dense_gradient([a, b], (6,)), a + b)
    ids = [torch.tensor([[7, 2, 7], [5, 5, 9]]), torch.tensor([[2, 2], [11, 7]])]
    rights = [torch.randn(2, 3, 4, dtype=torch.float64, generator=generator), torch.randn(2, 2, 4).double()]
    terms = [Outer(i, r) for i, r in zip(ids, rights, strict=True)]
    full = sum(torch.nn.functional.one_hot(i, 12).double().mT @ r for i, r in zip(ids, rights, strict=True))
    rows, values = embedding_rows(terms)
    assert rows.tolist() == [2, 5, 7, 9, 11]
    torch.testing.assert_close(values, full[:, rows])
    torch.testing.assert_close(dense_gradient(terms, (12, 4)), full.flatten(1))
