"""Loading a Hugging Face causal LM (optionally with a PEFT LoRA adapter) and choosing its gradient space.

The gradient space is the weights (and biases) of the selected `nn.Linear` modules: with an adapter, its
trainable LoRA A/B matrices; otherwise every linear layer of the model (attention, MLP, LM head), optionally
narrowed by a regular expression on module names. Each parameter tensor is one block for layer-wise
normalisation.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rapidin.errors import RapidinError

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Block:
    """One parameter tensor of the gradient space: `module.kind` ("weight" or "bias"), at `offset` in D."""

    module: str
    kind: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def name(self) -> str:
        return f"{self.module}.{self.kind}"


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on GPU (sketches still accumulate in fp32) and float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def _check_model_dir(path: str) -> None:
    if not (Path(path) / "config.json").is_file():
        raise RapidinError(f"model.path: {path} is not a Hugging Face model directory (no config.json)")


def load_tokenizer(path: str):
    """The model directory's tokenizer, with a pad token (EOS if it has none)."""
    from transformers import AutoTokenizer

    _check_model_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (ValueError, OSError) as error:
        raise RapidinError(f"model.path: {path} has no usable tokenizer: {_first_line(error)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, adapter: str | None = None, dtype: torch.dtype = torch.float32, device="cpu"):
    """Load (model, tokenizer) in eval mode; errors name the config key at fault."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (ValueError, OSError) as error:
        raise RapidinError(f"model.path: {path} is not a causal LM: {_first_line(error)}") from None
    if adapter:
        model = _attach_adapter(model, adapter)
    model = model.to(device).eval()
    _check_causal(model, path)
    return model, tokenizer


def _check_causal(model, path: str) -> None:
    """Refuse a model whose predictions depend on later tokens (an encoder such as BERT loads as a "causal LM")."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.arange(8).remainder(vocab).repeat(2, 1)  # (2, 8): two sequences differing in the last token only
    ids[1, -1] = (ids[1, -1] + 1) % vocab
    with torch.no_grad():
        logits = model(input_ids=ids.to(next(model.parameters()).device)).logits.float()
    if not torch.allclose(logits[0, :-1], logits[1, :-1], rtol=1e-3, atol=1e-4):
        raise RapidinError(f"model.path: {path} is not a causal LM: its predictions depend on later tokens")


def _attach_adapter(model, adapter: str):
    from peft import PeftModel

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise RapidinError(f"model.adapter: {adapter} is not a PEFT adapter directory (no adapter_config.json)")
    try:
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    except (ValueError, RuntimeError, KeyError) as error:
        raise RapidinError(f"model.adapter: {adapter} does not match the model: {_first_line(error)}") from None


def _first_line(error: Exception) -> str:
    """The error's message on one line: its first line, with the next one where the first only announces it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]


def select_modules(model: nn.Module, pattern: str | None = None) -> dict[str, nn.Linear]:
    """The linear modules whose parameters form the gradient space, in model order."""
    trainable_only = hasattr(model, "peft_config")
    selected = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if trainable_only and not module.weight.requires_grad:
            continue
        if pattern and not re.search(pattern, name):
            continue
        selected[name] = module
    if not selected:
        raise RapidinError(f"model.modules: {pattern!r} selects no linear module of the model")
    return selected


def parameter_blocks(modules: dict[str, nn.Linear]) -> list[Block]:
    """One block per weight and bias of the selected modules, with their offsets in the D-long gradient."""
    blocks, offset = [], 0
    for name, module in modules.items():
        for kind in ("weight", "bias"):
            param = getattr(module, kind)
            if param is None:
                continue
            blocks.append(Block(name, kind, tuple(param.shape), offset))
            offset += param.numel()
    return blocks


def blocks_fingerprint(blocks: list[Block]) -> str:
    """A short hash of the gradient space's layout (names, shapes, order)."""
    layout = json.dumps([(b.name, b.shape) for b in blocks])
    return hashlib.sha256(layout.encode()).hexdigest()[:16]


def files_fingerprint(directory: str | None) -> str:
    """A cheap content fingerprint of a model or adapter directory: config and weight files (size, head, tail)."""
    if not directory:
        return ""
    digest = hashlib.sha256()
    for file in sorted(Path(directory).iterdir()):
        if file.suffix not in (".json", ".safetensors", ".bin", ".model", ".txt") or not file.is_file():
            continue
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as handle:
            digest.update(handle.read(1 << 20))
            handle.seek(max(0, size - (1 << 20)))
            digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's full definition (vocabulary, merges, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
