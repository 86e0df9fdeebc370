"""Compressed scores against exact fp64 scores (`compressor: none`) on a tiny model."""

import torch
from scipy.stats import spearmanr

from rapidin.cache.shard import sample_gradients
from rapidin.gradients.compress import ExactCompressor, RapidGradCompressor
from rapidin.gradients.loss import collate
from rapidin.gradients.model import parameter_blocks, select_modules

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
