"""Adam-normalised gradients against their definition, computed naively in fp64 with autograd."""

import shutil

import numpy as np
import pytest
import torch
import zarr
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

from rapidin.cache.shard import CacheSettings, cache_gradients, sample_gradients
from rapidin.errors import RapidinError, StoreMismatchError
from rapidin.gradients.compress import ExactCompressor, FactoredCompressor, RapidGradCompressor
from rapidin.gradients.loss import collate, weighted_loss
from rapidin.gradients.model import parameter_blocks, select_modules
from rapidin.gradients.optimizer import adam_scales, optimizer_file, scale_and_normalize
from rapidin.gradients.rapidgrad import RapidGrad
from rapidin.score.scores import score_shard
from rapidin.store import read_settings

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
    with pytest.raises(
        RapidinError, match=r"cache.optimizer: .*optimizer.pt does not match the model: state \d+ has shape"
    ):
        adam_scales(model, parameter_blocks(select_modules(model)), tmp_path / "optimizer.pt")
    with pytest.raises(RapidinError, match=r"cache.optimizer: .* has no optimizer\.pt"):
        optimizer_file(tmp_path / "missing")


def test_state_with_fewer_parameters_is_refused(tmp_path):
    model = tiny_llama()
    torch.save(torch.optim.AdamW(list(model.parameters())[:-1]).state_dict(), tmp_path / "optimizer.pt")
    with pytest.raises(RapidinError, match=r"1 param groups of \[\d+\] parameters, but the model has \d+ trainable"):
        adam_scales(model, parameter_blocks(select_modules(model)), tmp_path / "optimizer.pt")


def naive_adam_vector(model, modules, blocks, denominators, sample) -> torch.Tensor:
    """(D,) fp64: per parameter tensor, g / (√v̂ + ε) by autograd, divided by its own norm, laid out as `blocks`."""
    params = [getattr(modules[b.module], b.kind) for b in blocks]
    grads = mean_loss_gradients(model, [sample], params)
    vector = torch.zeros(sum(b.size for b in blocks), dtype=torch.float64)
    for block, g, d in zip(blocks, grads, denominators, strict=True):
        scaled = g / d
        vector[block.offset : block.offset + block.size] = (scaled / scaled.norm()).flatten()
    return vector


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_compressors_scale_each_gradient_before_ln_and_the_sketch(tmp_path, tied):
    """cache.optimizer adam in the compressors (exact and RapidGrad; sparse embedding rows and dense blocks, a tied
    embedding/LM-head block too) against autograd gradients divided by √v̂ + ε in fp64, then LN, then the sketch."""
    steps = 2
    model, moments = trained_with_naive_moments(tmp_path, steps)
    if tied:  # tie the LM head to the embeddings after training: one block with two uses, one Adam state
        model.lm_head.weight = model.model.embed_tokens.weight
        model.config.tie_word_embeddings = True
        params = list(model.parameters())
        optimizer = torch.optim.AdamW(params, lr=1e-2, betas=BETAS, eps=EPS)
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
        moments = {id(p): optimizer.state[p]["exp_avg_sq"] for p in params}
        steps = 1
    modules = select_modules(model)
    blocks = parameter_blocks(modules)
    assert any(len(b.uses) > 1 for b in blocks) == tied
    scales = adam_scales(model, blocks, optimizer_file(tmp_path))
    denominators = [
        (moments[id(getattr(modules[b.module], b.kind))] / (1 - BETAS[1] ** steps)).sqrt() + EPS for b in blocks
    ]
    samples = random_samples(4, seed=5)
    expected = torch.stack([naive_adam_vector(model, modules, blocks, denominators, s) for s in samples])  # (4, D)

    exact = ExactCompressor(blocks)
    exact.set_scales(scales)
    batch = collate(samples, 0)
    vectors = sample_gradients(model, modules, exact, batch, batch.mean_response_weights)["exact"]
    torch.testing.assert_close(vectors, expected, rtol=1e-5, atol=1e-8)  # scales are stored fp32

    sketched = RapidGradCompressor(blocks, [64, 256], seed=3)
    sketched.set_scales(scales)
    outputs = sample_gradients(model, modules, sketched, batch, batch.mean_response_weights)
    reference = RapidGrad(expected.shape[1], [64, 256], 3)(expected)
    for k in (64, 256):
        torch.testing.assert_close(outputs[f"k{k}"], reference[k], rtol=1e-5, atol=1e-7)

    plain = ExactCompressor(blocks)
    assert (
        sample_gradients(model, modules, plain, batch, batch.mean_response_weights)["exact"] - expected
    ).abs().max() > 1e-2
    with pytest.raises(RapidinError, match=r"cache\.optimizer: compressor factored"):
        FactoredCompressor(blocks, 4, 0).set_scales(scales)


def adam_model_dir(model_and_tokens, tmp_path):
    """The fixture's model with an optimizer.pt after one AdamW step."""
    path = tmp_path / "adam_model"
    shutil.copytree(model_and_tokens / "model", path)
    model = LlamaForCausalLM.from_pretrained(path)
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    return path


def test_adam_caches_are_stamped_and_never_scored_against_plain_ones(model_and_tokens, tmp_path):
    model = adam_model_dir(model_and_tokens, tmp_path)
    tokens = model_and_tokens / "tokens"
    adam = CacheSettings(k=(256,), optimizer="adam")
    cache_gradients(str(tokens / "queries.zarr"), str(model), str(tmp_path / "q_adam.zarr"), adam, device="cpu")
    cache_gradients(
        str(tokens / "queries.zarr"), str(model), str(tmp_path / "q.zarr"), CacheSettings(k=(256,)), device="cpu"
    )
    stamp = read_settings(tmp_path / "q_adam.zarr")
    assert stamp["optimizer"] == "adam" and len(stamp["optimizer_state"]) == 16
    assert "optimizer" not in read_settings(tmp_path / "q.zarr")  # stores made before the setting still agree
    plain, scaled = (zarr.open_group(tmp_path / n, mode="r")["k256"][:] for n in ("q.zarr", "q_adam.zarr"))
    assert np.abs(plain.astype(np.float32) - scaled.astype(np.float32)).max() > 1e-2
    with pytest.raises(StoreMismatchError, match=r"optimizer"):
        score_shard(str(tmp_path / "q_adam.zarr"), str(tmp_path / "q.zarr"), str(tmp_path / "s.zarr"), 3, device="cpu")
    assert not (tmp_path / "s.zarr").exists()
    with pytest.raises(RapidinError, match=r"cache\.optimizer: .* has no optimizer\.pt"):
        cache_gradients(
            str(tokens / "queries.zarr"), str(model_and_tokens / "model"), str(tmp_path / "x.zarr"), adam, device="cpu"
        )
    assert not (tmp_path / "x.zarr").exists()
