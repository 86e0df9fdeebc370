"""Hook-based per-sample gradients against plain autograd, one sample at a time, in fp64."""

import torch

from rapidin.compress import ExactCompressor
from rapidin.grads import sample_gradients
from rapidin.loss import collate, weighted_loss
from rapidin.model import parameter_blocks, select_modules

from .conftest import random_samples


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
