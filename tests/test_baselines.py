"""The baselines: BM25 against the Okapi formula, LiSSA against exact inverse-Hessian-vector products (fp64)."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import kstest

from rapidin.data.records import Record
from rapidin.errors import RapidinError
from rapidin.experiments.baselines import bm25_scores, random_scores
from rapidin.experiments.lissa import gradient_parameters, lissa, model_hvp
from rapidin.gradients.loss import collate, weighted_loss
from rapidin.gradients.model import blocks_fingerprint, parameter_blocks, select_modules

from .conftest import random_samples, tiny_llama


def okapi(query: list[str], docs: list[list[str]], k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """Okapi BM25 as Lucene computes it (no constant (k1 + 1) factor, idf ln(1 + …)), written out."""
    avgdl = np.mean([len(d) for d in docs])
    scores = np.zeros(len(docs))
    for word in set(query):
        df = sum(word in d for d in docs)
        idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
        for i, doc in enumerate(docs):
            tf = doc.count(word)
            scores[i] += idf * tf / (tf + k1 * (1 - b + b * len(doc) / avgdl))
    return scores


def test_bm25_is_okapi_bm25():
    texts = ["howdy partner cowboy horses", "capital france paris", "capital japan tokyo tokyo", "cowboy prairie"]
    train = [Record("train.jsonl", i + 1, t.split()[0], output=" ".join(t.split()[1:])) for i, t in enumerate(texts)]
    query = Record("queries.jsonl", 1, "Howdy! capital", output="cowboy tokyo")
    scores = bm25_scores(train, [query])
    assert scores.shape == (1, 4)
    np.testing.assert_allclose(
        scores[0], okapi(["howdy", "capital", "cowboy", "tokyo"], [t.split() for t in texts]), rtol=1e-5
    )


def test_random_scores_are_independent_standard_normals_fixed_by_the_seed():
    scores = random_scores(20, 500, seed=1)
    assert scores.shape == (20, 500)
    assert kstest(scores.ravel(), "norm").pvalue > 1e-3  # N(0, 1) by Kolmogorov–Smirnov
    correlations = np.corrcoef(np.vstack([scores, random_scores(1, 500, seed=2)]))[np.triu_indices(21, 1)]
    assert np.abs(correlations).max() < 5 / np.sqrt(500)  # rows, and another seed's, uncorrelated (5 σ)
    np.testing.assert_array_equal(random_scores(20, 500, seed=1), scores)


def test_lissa_converges_to_the_damped_inverse_hessian_product():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 12, generator=generator, dtype=torch.float64)
    hessian = x.T @ x / 40  # a convex quadratic's Hessian (least squares)
    v = torch.randn(3, 12, generator=generator, dtype=torch.float64)
    scale, damping = 2 * float(torch.linalg.eigvalsh(hessian).max()), 0.01
    estimate = lissa(v, lambda h: h @ hessian, depth=3000, scale=scale, damping=damping)
    exact = torch.linalg.solve(hessian + damping * scale * torch.eye(12, dtype=torch.float64), v.T).T
    torch.testing.assert_close(estimate, exact, rtol=1e-8, atol=1e-10)


def test_lissa_refuses_to_diverge():
    hessian = torch.diag(torch.tensor([1.0, 50.0], dtype=torch.float64))
    with pytest.raises(RapidinError, match=r"experiment\.lissa"):
        lissa(torch.ones(1, 2, dtype=torch.float64), lambda h: h @ hessian, depth=2000, scale=10.0, damping=0.0)


def test_model_hvp_matches_forward_over_reverse_differentiation():
    model = tiny_llama()  # fp64
    model.set_attn_implementation("eager")  # SDPA on CPU has no double backward
    pattern = r"layers\.1\.(self_attn\.v_proj|mlp\.down_proj)"  # weights and a bias, in two modules
    modules = select_modules(model, pattern)
    params = gradient_parameters(
        model, {"modules": pattern, "parameters": blocks_fingerprint(parameter_blocks(modules))}
    )
    names = [
        f"{name}.{kind}"
        for name, module in modules.items()
        for kind in ("weight", "bias")
        if getattr(module, kind) is not None
    ]
    batch = collate(random_samples(4), pad_id=0)
    weights = batch.mean_response_weights
    flat = torch.cat([p.detach().flatten() for p in params])  # (D,)
    v = torch.randn(2, len(flat), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    hv = model_hvp(model, params, batch, weights, v)  # (2, D)

    def loss(vector: torch.Tensor) -> torch.Tensor:
        pieces = vector.split([p.numel() for p in params])
        values = {name: piece.view_as(p) for name, piece, p in zip(names, pieces, params, strict=True)}
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        logits = torch.func.functional_call(model, values, (), inputs).logits
        return weighted_loss(logits, batch, weights).mean()

    for row in range(2):  # an independent route to H·v: forward-mode derivative of the reverse-mode gradient
        _, expected = torch.func.jvp(torch.func.grad(loss), (flat,), (v[row],))
        torch.testing.assert_close(hv[row], expected, rtol=1e-4, atol=1e-7)  # norms and softmax run in fp32
