"""Hook-based per-sample gradients against plain autograd, one sample at a time, in fp64."""

import numpy as np
import pytest
import torch

from rapidin.cache.shard import _chunk_gradients, sample_gradients
from rapidin.errors import RapidinError
from rapidin.gradients.capture import ActivationGradientCapture, Outer, math_dtype
from rapidin.gradients.compress import ExactCompressor, dense_gradient
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


class Toy(torch.nn.Module):
    """Embedding → `layer` (applied `repeat` times) → a norm called with `norm_args`, as a model's forward."""

    def __init__(self, repeat=1, norm_args=lambda x: ((x,), {})):
        super().__init__()
        self.embed, self.layer, self.norm = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), Norm()
        self.repeat, self.norm_args = repeat, norm_args

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for _ in range(self.repeat):
            x = self.layer(x)
        args, kwargs = self.norm_args(x)
        return self.norm(*args, **kwargs)


class Norm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 2.0, 4))

    def forward(self, x, scale=1.0):
        return x * self.weight * scale


def capture_toy(model, dtype=torch.float32):
    model = model.to(dtype)
    modules = select_modules(model)
    terms = []
    with ActivationGradientCapture(model, modules, parameter_blocks(modules), lambda *term: terms.append(term)):
        model(torch.tensor([[1, 2, 3], [4, 5, 1]])).sum().backward()
    return terms


@pytest.mark.parametrize(
    ("toy", "message"),
    [
        (Toy(repeat=2), r"^model\.modules: layer runs twice in one forward"),
        (
            Toy(norm_args=lambda x: ((x, 2.0), {})),
            r"^model\.modules: cannot capture per-sample gradients of norm \(Norm\)",
        ),
        (Toy(norm_args=lambda x: ((x,), {"scale": 2.0})), r"cannot capture per-sample gradients of norm"),
    ],
)
def test_a_module_run_twice_or_called_with_more_than_one_tensor_is_refused(toy, message):
    """The error leaves the model as it was: trainable parameters trainable again, a frozen one still frozen."""
    other = torch.nn.Parameter(torch.ones(1), requires_grad=False)
    toy.register_parameter("unused", other)
    with pytest.raises(RapidinError, match=message):
        capture_toy(toy)
    assert all(p.requires_grad for n, p in toy.named_parameters() if n != "unused") and not other.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_terms_arrive_in_the_math_dtype_and_equal_autograd(dtype):
    """fp32 math for fp32 and bf16 models, fp64 for fp64 ones: the toy's per-sample gradients (embedding rows,
    linear weight and bias, the norm's weight by vmap of vjp) against one autograd backward per sample."""
    torch.manual_seed(0)
    model = Toy().to(dtype)
    want_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert math_dtype(model) == want_dtype
    terms = capture_toy(model, dtype)
    assert [block.name for block, _ in terms] == ["norm.weight", "layer.weight", "layer.bias", "embed.weight"]
    for _, term in terms:
        values = [term.left, term.right] if isinstance(term, Outer) else [term]
        assert all(v.dtype == want_dtype for v in values if v.is_floating_point())
    got = {block.name: dense_gradient([term], block.shape) for block, term in terms}
    reference = Toy().to(torch.float64)
    reference.load_state_dict(model.state_dict())
    ids = torch.tensor([[1, 2, 3], [4, 5, 1]])
    for b in range(2):
        params = dict(reference.named_parameters())
        grads = torch.autograd.grad(reference(ids[b : b + 1]).sum(), list(params.values()))
        for name, grad in zip(params, grads, strict=True):
            tolerance = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-2, atol=1e-2)
            torch.testing.assert_close(got[name][b].double(), grad.flatten(), **tolerance)
