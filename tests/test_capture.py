"""Hook-based per-sample gradients against plain autograd, one sample at a time, in fp64."""

import numpy as np
import pytest
import torch

from rapidin.cache.shard import _chunk_gradients, sample_gradients
from rapidin.errors import RapidinError
from rapidin.gradients.compress import ExactCompressor
from rapidin.gradients.loss import collate, weighted_loss
from rapidin.gradients.model import parameter_blocks, select_modules

from .conftest import random_samples
from .test_tokenwise import in_memory


def autograd_gradient(model, blocks, sample, normalize=True) -> torch.Tensor:
    """∇ of one sample's mean response loss w.r.t. the blocks' parameters (plain autograd), flattened in block order."""
    batch = collate([sample], pad_id=0)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    loss = weighted_loss(logits, batch, batch.mean_response_weights).sum()
    modules = dict(model.named_modules())
    params = [getattr(modules[b.module], b.kind) for b in blocks]
    grads = torch.autograd.grad(loss, params)
    if normalize:
        grads = [g / g.norm() for g in grads]
    return torch.cat([g.flatten() for g in grads])


def test_batched_capture_equals_per_sample_autograd(model64):
    modules = select_modules(model64)
    blocks = parameter_blocks(modules)
    samples = random_samples(6)
    batch = collate(samples, pad_id=0)  # padded: lengths differ
    for normalize in (False, True):
        exact = ExactCompressor(blocks, normalize)
        got = sample_gradients(model64, modules, exact, batch, batch.mean_response_weights)["exact"]
        want = torch.stack([autograd_gradient(model64, blocks, s, normalize) for s in samples])
        assert got.shape == (6, exact.dim)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_capture_restores_requires_grad(model64):
    modules = select_modules(model64, r"mlp")
    assert set(modules) == {f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")}
    batch = collate(random_samples(2), pad_id=0)
    sample_gradients(model64, modules, ExactCompressor(parameter_blocks(modules)), batch, batch.mean_response_weights)
    assert all(p.requires_grad for p in model64.parameters())
    assert all(p.grad is None for p in model64.parameters())


def test_a_non_finite_gradient_is_an_error_naming_its_row_or_a_skipped_nan_row(model64):
    """Token 50's embedding row is NaN: only the samples holding it (rows 1 and 3) have a non-finite loss."""
    modules = select_modules(model64)
    exact = ExactCompressor(parameter_blocks(modules))
    samples = random_samples(5, vocab=40)  # tokens 3…39
    for row in (1, 3):
        samples[row][0][0] = 50
    model64.model.embed_tokens.weight.data[50] = float("nan")
    dataset, rows = in_memory(samples), np.arange(5)
    with pytest.raises(RapidinError, match=r"^row 1: non-finite loss or gradient \(2 such rows"):
        _chunk_gradients(model64, modules, exact, dataset, rows, 4096, 0)
    got = _chunk_gradients(model64, modules, exact, dataset, rows, 4096, 0, on_nonfinite="skip")["exact"]
    assert np.isnan(got[[1, 3]]).all() and np.isfinite(got[[0, 2, 4]]).all()
    clean = [samples[i] for i in (0, 2, 4)]  # the other rows are what they are without the NaN samples
    batch = collate(clean, pad_id=0)
    want = sample_gradients(model64, modules, exact, batch, batch.mean_response_weights)["exact"]
    np.testing.assert_allclose(got[[0, 2, 4]], want.numpy(), rtol=1e-6, atol=1e-9)  # stored as fp32
