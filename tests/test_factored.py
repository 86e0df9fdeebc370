"""`compressor: factored`: exact block norms without the gradient, unbiased and rank-faithful scores."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from rapidin.errors import RapidinError
from rapidin.gradients.capture import ActivationGradientCapture, Outer
from rapidin.gradients.compress import ExactCompressor, FactoredCompressor, dense_gradient, make_compressor, outer_norms
from rapidin.gradients.loss import collate, weighted_loss
from rapidin.gradients.model import Block, parameter_blocks, select_modules

from .conftest import random_samples, tiny_llama


def captured(model, samples) -> list[tuple]:
    """Each block's (block, gradient term) of one batch, recorded once to replay cheaply."""
    modules, record = select_modules(model), []
    batch = collate(samples, pad_id=0)
    with ActivationGradientCapture(model, modules, parameter_blocks(modules), lambda *args: record.append(args)):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        weighted_loss(logits, batch, batch.mean_response_weights).sum().backward()
    return record


def replay(compressor, record) -> torch.Tensor:
    first = record[0][1]
    compressor.start((first.right if isinstance(first, Outer) else first).shape[0], "cpu", torch.float64)
    for block, term in record:
        compressor.receive(block, term)
    return next(iter(compressor.finish().values()))


def test_outer_norms_equal_those_of_the_built_gradients():
    """A linear layer's Σ_t g_t a_tᵀ, an embedding's Σ_t e_{i_t} r_tᵀ, and a tied weight's sum of both."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(3, 7, 5, dtype=torch.float64, generator=generator)  # (B, T, in)
    g = torch.randn(3, 7, 4, dtype=torch.float64, generator=generator)  # (B, T, out)
    g[1, 4:] = 0  # padded positions carry no output gradient
    ids = torch.randint(0, 4, (3, 6), generator=generator)  # (B, T'): repeated tokens sum into one row
    r = torch.randn(3, 6, 5, dtype=torch.float64, generator=generator)  # (B, T', in)
    linear = torch.bmm(g.transpose(1, 2), a)  # (B, out, in)
    embedding = torch.bmm(torch.nn.functional.one_hot(ids, 4).double().transpose(1, 2), r)  # (B, 4, in)
    for terms, built in (
        ([Outer(g, a)], linear),
        ([Outer(ids, r)], embedding),
        ([Outer(g, a), Outer(ids, r)], linear + embedding),
        ([Outer(ids, r), Outer(g, a)], linear + embedding),
    ):
        torch.testing.assert_close(outer_norms(terms), built.flatten(1).norm(dim=1))
        torch.testing.assert_close(dense_gradient(terms, (4, 5)), built.flatten(1))


def test_layout_and_normalisation_use_exact_block_norms():
    model = tiny_llama()
    blocks = parameter_blocks(select_modules(model))
    record = captured(model, random_samples(4))
    raw = replay(FactoredCompressor(blocks, rank=3, seed=0, normalize=False), record)
    normalised = FactoredCompressor(blocks, rank=3, seed=0)
    vectors = replay(normalised, record)
    n_weights = sum(b.outer for b in blocks)
    assert vectors.shape == (4, n_weights * 9 + (len(blocks) - n_weights) * 3)
    exact = replay(ExactCompressor(blocks, normalize=False), record)
    for block in blocks:  # normalised sketch = raw sketch / exact norm of the block's gradient
        norms = exact[:, block.offset : block.offset + block.size].norm(dim=1, keepdim=True)
        slot = normalised.slots[block]
        torch.testing.assert_close(vectors[:, slot], raw[:, slot] / norms)


def test_scores_are_unbiased_over_seeds():
    model = tiny_llama()
    blocks = parameter_blocks(select_modules(model))
    record = captured(model, random_samples(3, seed=4))
    exact = replay(ExactCompressor(blocks), record)
    want = (exact[0] @ exact[1:].T).numpy()  # sums of per-tensor cosines
    estimates = []
    for seed in range(300):
        y = replay(FactoredCompressor(blocks, rank=4, seed=seed), record)
        estimates.append((y[0] @ y[1:].T).numpy())
    estimates = np.array(estimates)
    standard_error = estimates.std(0) / np.sqrt(len(estimates))
    assert np.all(np.abs(estimates.mean(0) - want) < 4 * standard_error), (estimates.mean(0), want)
    assert np.all(estimates.std(0) > 0.01)  # the sketch really is random, and the test has power


def test_scores_rank_like_exact_scores_and_improve_with_rank():
    model = tiny_llama(vocab=257, hidden=32)
    blocks = parameter_blocks(select_modules(model))
    records = [captured(model, random_samples(n, seed=n, vocab=257)) for n in (4, 40)]  # queries, train
    exact_q, exact_t = (replay(ExactCompressor(blocks), r) for r in records)
    exact = exact_q @ exact_t.T  # (4, 40)
    errors = {}
    for rank in (8, 32):
        sketch_q, sketch_t = (replay(FactoredCompressor(blocks, rank, seed=0), r) for r in records)
        scores = sketch_q @ sketch_t.T
        errors[rank] = (scores - exact).abs().mean()
    assert sketch_q.shape[1] < exact_q.shape[1]  # compressed even at rank 32 on this 32-wide model
    for q in range(4):
        rho = spearmanr(exact[q], scores[q]).statistic
        assert rho >= 0.8, f"query {q}: Spearman {rho:.3f} at rank 32"
    # the error falls like 1/√rank, not 1/rank: per stored number, noisier than RapidGrad (README)
    assert errors[32] < 0.7 * errors[8]


def test_same_seed_same_sketch_other_seed_other_sketch():
    model = tiny_llama()
    blocks = parameter_blocks(select_modules(model))
    record = captured(model, random_samples(2))
    first, again, other = (replay(FactoredCompressor(blocks, 4, seed), record) for seed in (1, 1, 2))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_bad_rank_is_refused():
    with pytest.raises(RapidinError, match=r"cache\.rank"):
        make_compressor("factored", parameter_blocks(select_modules(tiny_llama())), [], 0, rank=0)


def test_projections_are_fair_signs_over_root_rank_keyed_by_seed_and_offset():
    """Sketching the unit vectors e_i of a dense block reads its P (rank, n) column by column: every entry ±1/√rank,
    fair coins, so each column has norm 1 (E[PᵀP] = I); P depends on (seed, block offset), not on other blocks."""
    rank, n = 8, 500
    first, second = (Block(((f"m{i}", "weight"),), (n,), i * n, False) for i in range(2))

    def projection(blocks, block, seed=0):
        compressor = FactoredCompressor(blocks, rank, seed, normalize=False)
        compressor.start(n, "cpu", torch.float64)
        for each in blocks:
            compressor.receive(each, torch.eye(n, dtype=torch.float64) if each is block else torch.zeros(n, n))
        return compressor.finish()["factored"][:, compressor.slots[block]].T  # (rank, n)

    p = projection([first, second], second)
    assert p.shape == (rank, n)
    torch.testing.assert_close(p.abs(), torch.full_like(p, rank**-0.5), rtol=1e-15, atol=0)
    assert abs(p.sign().mean().item()) < 5 / (rank * n) ** 0.5
    torch.testing.assert_close(p.norm(dim=0), torch.ones(n, dtype=torch.float64))
    assert torch.equal(projection([second], second), p)  # keyed by its offset, whatever comes before
    assert not torch.equal(projection([first, second], first), p)  # another offset: other signs
    assert not torch.equal(projection([first, second], second, seed=1), p)
