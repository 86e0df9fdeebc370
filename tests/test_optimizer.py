"""Adam-normalised gradients against their definition, computed naively in fp64 with autograd."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

from rapidin.cache.shard import sample_gradients
from rapidin.errors import RapidinError
from rapidin.gradients.compress import ExactCompressor
from rapidin.gradients.loss import collate, weighted_loss
from rapidin.gradients.model import parameter_blocks, select_modules
from rapidin.gradients.optimizer import adam_scales, optimizer_file, scale_and_normalize

from .conftest import random_samples, tiny_llama

BETAS, EPS = (0.9, 0.95), 1e-6


def mean_loss_gradients(model, samples, params) -> list[torch.Tensor]:
    """Per parameter, the gradient of the batch's mean of per-sample mean response losses."""
    batch = collate(samples, pad_id=0)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return torch.autograd.grad(weighted_loss(logits, batch, batch.mean_response_weights).mean(), params)


def step_once(model, optimizer, path) -> None:
    """One optimizer step on a few random samples' mean loss; the state_dict saved to `path`."""
    params = list(model.parameters())
    for p, g in zip(params, mean_loss_gradients(model, random_samples(3), params), strict=True):
        p.grad = g
    optimizer.step()
    torch.save(optimizer.state_dict(), path)


def trained_with_naive_moments(tmp_path, steps: int = 3):
    """A tiny fp64 model after `steps` AdamW steps (state saved to tmp_path/optimizer.pt), and the second moments
    v_t = β2 v_{t-1} + (1 − β2) g_t² tracked by hand for every trainable parameter."""
    model = tiny_llama()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2, betas=BETAS, eps=EPS)
    v = [torch.zeros_like(p) for p in params]
    for step in range(steps):
        grads = mean_loss_gradients(model, random_samples(4, seed=10 + step), params)
        for p, g, moment in zip(params, grads, v, strict=True):
            p.grad = g
            moment.mul_(BETAS[1]).add_((1 - BETAS[1]) * g * g)
        optimizer.step()
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    return model, dict(zip([id(p) for p in params], v, strict=True))


def test_adam_normalised_scores_equal_their_definition(tmp_path):
    steps = 3
    model, moments = trained_with_naive_moments(tmp_path, steps)
    modules = select_modules(model)
    blocks = parameter_blocks(modules)
    scales = adam_scales(model, blocks, optimizer_file(tmp_path))

    train, queries = random_samples(5, seed=1), random_samples(2, seed=2)
    exact = ExactCompressor(blocks, normalize=False)
    raw = {
        name: sample_gradients(model, modules, exact, batch, batch.mean_response_weights)["exact"]
        for name, batch in (("train", collate(train, 0)), ("queries", collate(queries, 0)))
    }
    vectors = {name: scale_and_normalize(v, blocks, scales) for name, v in raw.items()}
    scores = vectors["queries"] @ vectors["train"].T  # (2, 5)

    # Naive: per sample and parameter tensor, g / (√(v / (1 − β2^t)) + ε) by autograd, then per-tensor cosines.
    block_params = [getattr(modules[b.module], b.kind) for b in blocks]
    denominators = [(moments[id(p)] / (1 - BETAS[1] ** steps)).sqrt() + EPS for p in block_params]

    def normalised(sample) -> list[torch.Tensor]:
        grads = mean_loss_gradients(model, [sample], block_params)
        return [(g / d) / (g / d).norm() for g, d in zip(grads, denominators, strict=True)]

    expected = torch.tensor(
        [
            [sum((a * b).sum() for a, b in zip(normalised(q), normalised(s), strict=True)) for s in train]
            for q in queries
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-9)
    # and the scaling matters: without it the scores differ
    plain = scale_and_normalize(raw["queries"], blocks, None) @ scale_and_normalize(raw["train"], blocks, None).T
    assert (plain - expected).abs().max() > 1e-2


def test_trainer_param_groups_map_to_their_parameters(tmp_path):
    """A Hugging Face Trainer's optimizer (weight-decay group, then biases and norms) maps state to parameters."""
    model = tiny_llama()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, weight_decay=0.1)
    optimizer = Trainer(model=model, args=args).create_optimizer()
    assert len(optimizer.param_groups) == 2
    step_once(model, optimizer, tmp_path / "optimizer.pt")
    blocks = parameter_blocks(select_modules(model))
    scales = adam_scales(model, blocks, tmp_path / "optimizer.pt")
    modules = dict(model.named_modules())
    beta2, eps = optimizer.param_groups[0]["betas"][1], optimizer.param_groups[0]["eps"]
    for block in blocks:
        v = optimizer.state[getattr(modules[block.module], block.kind)]["exp_avg_sq"]  # by the parameter itself
        torch.testing.assert_close(scales[block.name], (1 / ((v / (1 - beta2)).sqrt() + eps)).float())


def test_state_of_another_model_is_refused(tmp_path):
    other = tiny_llama(hidden=24)
    step_once(other, torch.optim.AdamW(other.parameters()), tmp_path / "optimizer.pt")
    model = tiny_llama()
    with pytest.raises(RapidinError, match=r"cache.adam: .*optimizer.pt does not match the model: state \d+ has shape"):
        adam_scales(model, parameter_blocks(select_modules(model)), tmp_path / "optimizer.pt")
    with pytest.raises(RapidinError, match=r"cache.adam: .* has no optimizer\.pt"):
        optimizer_file(tmp_path / "missing")


def test_state_with_fewer_parameters_is_refused(tmp_path):
    model = tiny_llama()
    torch.save(torch.optim.AdamW(list(model.parameters())[:-1]).state_dict(), tmp_path / "optimizer.pt")
    with pytest.raises(RapidinError, match=r"1 param groups of \[\d+\] parameters, but the model has \d+ trainable"):
        adam_scales(model, parameter_blocks(select_modules(model)), tmp_path / "optimizer.pt")
