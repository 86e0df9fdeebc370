"""Per-sample gradients of every parameter of the gradient space, captured in one forward/backward.

Forward hooks keep each selected module's input a; hooks on its output receive g = ∂L/∂y during backward,
from which its parameters' per-sample gradients follow (B samples, T positions):
- `nn.Linear`, y = W a + b: ∇W = Σ_t g_t a_tᵀ, ∇b = Σ_t g_t;
- transformers' `Conv1D` (GPT-2), y = a W + b with W (in, out): ∇W = Σ_t a_t g_tᵀ, ∇b = Σ_t g_t;
- `nn.Embedding`, y_t = c E[i_t] (c = 1, or Gemma's embed_scale): ∇E = c Σ_t e_{i_t} g_tᵀ (only the rows of the
  sample's tokens; none for padding_idx);
- any other module (norm weights, biases of other layers, parameters a PEFT config trains): per-sample
  vector-Jacobian products of its own parameters (torch.func: vmap over the batch of vjp of its forward,
  recomputed from the kept input), for modules called with one tensor.
Weights arrive at the sink as `Outer` terms (never built here), everything else as dense (B, n) values, in
the math dtype (fp32, fp64 for an fp64 model). A parameter used by several modules (tied input embeddings and
LM head) gets one term per use; its gradient is their sum. Samples in a batch are independent (the batch loss
is a sum of per-sample losses), so one backward serves all.

During capture every parameter is frozen and the gradient enters through the input embeddings' output:
autograd computes only activation gradients, never the (batch-summed, useless) weight gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from rapidin.errors import RapidinError
from rapidin.gradients.model import Block, embedding_scale, module_form


@dataclass
class Outer:
    """A per-sample matrix gradient Σ_t left_t right_tᵀ, kept as its factors."""

    left: torch.Tensor  # (B, T, m) float, or (B, T) int64 token ids: the one-hot rows of an embedding
    right: torch.Tensor  # (B, T, n)

    @property
    def one_hot(self) -> bool:
        return not self.left.is_floating_point()


Sink = Callable[[Block, "Outer | torch.Tensor"], None]


def math_dtype(model: nn.Module) -> torch.dtype:
    """fp64 for an fp64 model, fp32 otherwise (whatever dtype the model runs in)."""
    return torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32


class ActivationGradientCapture:
    """Context manager: during its block, each backward calls sink(block, term) once per use of each block."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module], blocks: list[Block], sink: Sink):
        self.model, self.modules, self.sink = model, modules, sink
        self.dtype = math_dtype(model)
        self.uses: dict[str, list[tuple[str, Block]]] = {}
        for block in blocks:
            for module, kind in block.uses:
                self.uses.setdefault(module, []).append((kind, block))
        self._handles, self._requires_grad, self._ran = [], {}, set()
        self._replaying, self._batch_size = False, 0

    def __enter__(self) -> ActivationGradientCapture:
        for param in self.model.parameters():
            self._requires_grad[param] = param.requires_grad
            param.requires_grad_(False)
        self._handles.append(self.model.register_forward_pre_hook(self._batch_hook, with_kwargs=True))
        embeddings = self.model.get_input_embeddings()
        self._handles.append(embeddings.register_forward_hook(lambda _m, _i, out: out.requires_grad_()))
        for name in self.uses:
            hook = self._forward_hook(name)
            self._handles.append(self.modules[name].register_forward_hook(hook, with_kwargs=True))
        return self

    def _batch_hook(self, _model, args, kwargs) -> None:
        """The batch size of the model's input ids, which every captured module's output gradient must have."""
        self._batch_size = next(x for x in (*args, *kwargs.values()) if torch.is_tensor(x)).shape[0]

    def _forward_hook(self, name: str):
        def hook(module, args, kwargs, output):
            if self._replaying:  # per_sample_grads recomputing a forward
                return
            if name in self._ran:
                raise RapidinError(f"model.modules: {name} runs twice in one forward; pick modules that run once")
            self._ran.add(name)
            if module_form(module) == "functional" and (len(args) != 1 or kwargs or not torch.is_tensor(output)):
                raise RapidinError(
                    f"model.modules: cannot capture per-sample gradients of {name} ({type(module).__name__}): it is "
                    "not called with one tensor; narrow model.modules or set cache.parameters: linear"
                )
            if not output.requires_grad:  # nothing trainable upstream (position embeddings, maybe (1, T, H)):
                output = output.expand(self._batch_size, *output.shape[1:]).clone().requires_grad_()  # one per sample
            inputs = args[0].detach()
            output.register_hook(lambda grad: self._emit(name, module, inputs, grad))
            return output

        return hook

    def _emit(self, name: str, module: nn.Module, inputs: torch.Tensor, grad: torch.Tensor) -> None:
        """Hand each parameter's per-sample gradient term of one module to the sink."""
        form, uses = module_form(module), self.uses[name]
        if inputs.is_floating_point():
            inputs = inputs.to(self.dtype)
        grad = grad.to(self.dtype)
        if form == "functional":
            self._replaying = True
            try:
                grads = per_sample_grads(module, [kind for kind, _ in uses], inputs, grad)
            finally:
                self._replaying = False
            for kind, block in uses:
                self.sink(block, grads[kind].flatten(1))  # (B, n)
            return
        g = _by_position(grad)  # (B, T, out)
        for kind, block in uses:
            if kind == "bias":
                self.sink(block, g.sum(dim=1))  # (B, out)
            elif form == "linear":
                self.sink(block, Outer(g, _by_position(inputs)))  # W (out, in)
            elif form == "conv1d":
                self.sink(block, Outer(_by_position(inputs), g))  # W (in, out)
            else:  # embedding: W (vocab, hidden)
                ids = inputs.expand(grad.shape[:-1]).reshape(g.shape[:2]).contiguous()  # (B, T); positions: (1, T)
                g = g * embedding_scale(module)
                if module.padding_idx is not None:
                    g = g * (ids != module.padding_idx).unsqueeze(-1)  # that row's gradient is zero
                self.sink(block, Outer(ids, g))

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for param, flag in self._requires_grad.items():
            param.requires_grad_(flag)


def _by_position(x: torch.Tensor) -> torch.Tensor:
    """(B, …, n) → (B, T, n): every position of a sample (T = 1 for a (B, n) input)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def per_sample_grads(module: nn.Module, kinds: list[str], inputs: torch.Tensor, grad: torch.Tensor) -> dict:
    """{kind: (B, *shape)} gradients of ⟨module(inputs[b]), grad[b]⟩ in the module's own parameters, per sample b."""
    params = {kind: getattr(module, kind).detach().to(grad.dtype) for kind in kinds}

    def one(x: torch.Tensor, g: torch.Tensor) -> dict:  # x, g: one sample, without its batch dimension
        _, pullback = vjp(lambda p: functional_call(module, p, (x.unsqueeze(0),)).to(g.dtype), params)
        return pullback(g.unsqueeze(0))[0]

    return vmap(one)(inputs, grad)
