"""Per-module input activations and output gradients, captured in one forward/backward.

A linear layer y = W a + b has per-sample gradient ∇W = Σ_t g_t a_tᵀ and ∇b = Σ_t g_t, where a_t is its
input and g_t = ∂L/∂y_t at position t. Forward hooks keep a; hooks on the outputs receive g during backward
and hand (a, g) to a sink, which turns them into per-sample gradients or their sketches right away. Samples
in a batch are independent (the batch loss is a sum of per-sample losses), so one backward serves all.

During capture every parameter is frozen and the gradient enters through the input embeddings' output:
autograd computes only activation gradients, never the (batch-summed, useless) weight gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Sink = Callable[[str, torch.Tensor, torch.Tensor], None]


class ActivationGradientCapture:
    """Context manager: during its block, each backward calls sink(name, a (B,T,in), g (B,T,out))."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Linear], sink: Sink):
        self.model, self.modules, self.sink = model, modules, sink
        self._handles, self._requires_grad = [], {}

    def __enter__(self) -> ActivationGradientCapture:
        for param in self.model.parameters():
            self._requires_grad[param] = param.requires_grad
            param.requires_grad_(False)
        embeddings = self.model.get_input_embeddings()
        self._handles.append(embeddings.register_forward_hook(lambda _m, _i, out: out.requires_grad_()))
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def _forward_hook(self, name: str):
        def hook(_module, inputs, output):
            activations = inputs[0].detach()  # (B, T, in)
            output.register_hook(lambda grad: self.sink(name, activations, grad))  # grad: (B, T, out)

        return hook

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for param, flag in self._requires_grad.items():
            param.requires_grad_(flag)
