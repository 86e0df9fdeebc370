"""Optimizer-aware gradients (TrackStar-style): per-block scales 1/(√v̂ + ε) from a checkpoint's Adam state.

Adam moves parameter i by about m_i / (√v̂_i + ε), so a gradient divided elementwise by √v̂ + ε is measured in
the units the optimizer actually stepped in: coordinates with large, noisy gradients (v̂ large) count less.
v̂ = v / (1 − β2^t) is the bias-corrected second moment, with v (`exp_avg_sq`), t (`step`), β2 and ε read
from the state. The scaled gradient is then layer-normalised and sketched as usual (`scale_and_normalize` for
exact vectors; a compressor multiplies each per-sample block by its scale before LN).

A `torch.optim.Adam`/`AdamW` state_dict (as `optimizer.pt` in a Hugging Face Trainer checkpoint) keys its states
by integers, assigned in order over its param groups. Which parameter each integer is, is read from the
groups' `param_names` where the optimizer was built from named parameters; otherwise it is rebuilt: one group
= the model's trainable parameters in order (`AdamW(model.parameters())`); two groups = the Trainer's split
(parameters with weight decay, then those without, by transformers' own rule). Every state's shape is checked
against its parameter.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rapidin.errors import RapidinError
from rapidin.gradients.model import Block


def optimizer_file(directory: str | Path) -> Path:
    """The Adam state of a model or checkpoint directory: its `optimizer.pt`."""
    path = Path(directory) / "optimizer.pt"
    if not path.is_file():
        raise RapidinError(
            f"cache.optimizer: {directory} has no optimizer.pt (the Adam state to normalise gradients by)"
        )
    return path


def adam_scales(model: nn.Module, blocks: list[Block], path: str | Path) -> dict[str, torch.Tensor]:
    """{block name: 1/(√v̂ + ε)} (fp32, the block's shape) for each gradient block, from the state_dict at `path`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        groups, states = state["param_groups"], state["state"]
    except (OSError, RuntimeError, KeyError, TypeError) as error:
        raise RapidinError(f"cache.optimizer: {path} is not an optimizer state_dict: {error}") from None
    index_of = {id(param): index for index, param in enumerate(_state_order(model, groups, path))}
    modules = dict(model.named_modules())
    settings = {index: group for group in groups for index in group["params"]}
    scales = {}
    for block in blocks:
        index = index_of.get(id(getattr(modules[block.module], block.kind)))
        if index is None or index not in states or "exp_avg_sq" not in states[index]:
            raise RapidinError(f"cache.optimizer: {path} has no Adam second moments for {block.name}")
        v = states[index]["exp_avg_sq"].float()
        if tuple(v.shape) != block.shape:
            raise RapidinError(
                f"cache.optimizer: {path} does not match the model: state {index} has shape {tuple(v.shape)} "
                f"but {block.name} is {block.shape}"
            )
        group = settings[index]
        step = float(states[index]["step"])
        v_hat = v / (1 - group["betas"][1] ** step)
        scales[block.name] = 1 / (v_hat.sqrt() + group["eps"])
    return scales


def _state_order(model: nn.Module, groups: list[dict], path) -> list[nn.Parameter]:
    """The model's parameters in the order of the state_dict's integer keys."""
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    sizes = [len(group["params"]) for group in groups]
    if all("param_names" in group for group in groups):
        by_name = dict(named)
        missing = [n for group in groups for n in group["param_names"] if n not in by_name]
        if missing:
            raise RapidinError(f"cache.optimizer: {path} has state for {missing[0]}, which the model has no trainable")
        return [by_name[n] for group in groups for n in group["param_names"]]
    if len(groups) == 1:
        order = [param for _, param in named]
    elif len(groups) == 2:  # transformers.Trainer.create_optimizer: weight-decay group, then the rest
        from transformers import Trainer

        decay = set(Trainer.get_decay_parameter_names(None, model))  # uses no Trainer state
        with_decay, without = [p for n, p in named if n in decay], [p for n, p in named if n not in decay]
        order = with_decay + without if sizes == [len(with_decay), len(without)] else []
    else:
        order = []
    if len(order) != sum(sizes):
        raise RapidinError(
            f"cache.optimizer: {path} does not match the model: {len(groups)} param groups of {sizes} parameters, "
            f"but the model has {len(named)} trainable ones"
        )
    return order


def scale_and_normalize(
    vectors: torch.Tensor, blocks: list[Block], scales: dict[str, torch.Tensor] | None, normalize: bool = True
) -> torch.Tensor:
    """Exact D-long gradients (N, D), blocks laid out as `blocks`: each block times its scale, then (with
    `normalize`) divided by its own L2 norm — what a compressor with these scales caches, before the sketch."""
    out = vectors.clone()
    for block in blocks:
        values = out[:, block.offset : block.offset + block.size]  # (N, size), a view
        if scales is not None:
            values.mul_(scales[block.name].flatten().to(values))
        if normalize:
            values.div_(values.norm(dim=1, keepdim=True).clamp(min=torch.finfo(values.dtype).tiny))
    return out
