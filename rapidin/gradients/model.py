"""Loading a Hugging Face causal LM (optionally with a PEFT LoRA adapter) and choosing its gradient space.

The gradient space is every trainable parameter of the model (with an adapter, its trainable LoRA A/B
matrices and whatever else the PEFT config trains), or with `parameters: linear` those of its linear and
Conv1D layers, optionally narrowed by a regular expression on module names. Each parameter tensor is one
block for layer-wise normalisation; a parameter used by two modules (tied embeddings) is one block.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from rapidin.errors import RapidinError

PARAMETER_SETS = ("all", "linear")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Block:
    """One parameter tensor of the gradient space, at `offset` in D, reached as `module.kind` for each of its `uses`.

    A parameter shared by several modules (tied input embeddings and LM head) is one block with several uses;
    its gradient is the sum of theirs. `outer`: its per-sample gradient arrives as outer products (the weight of
    a linear, Conv1D or embedding layer); otherwise as dense values (biases, norm weights, other parameters).
    """

    uses: tuple[tuple[str, str], ...]
    shape: tuple[int, ...]
    offset: int
    outer: bool

    @property
    def module(self) -> str:
        return self.uses[0][0]

    @property
    def kind(self) -> str:
        return self.uses[0][1]

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
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # its "Loading weights" bar would fill every job's log
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
        with warnings.catch_warnings():  # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing`
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    except (ValueError, RuntimeError, KeyError) as error:
        raise RapidinError(f"model.adapter: {adapter} does not match the model: {_first_line(error)}") from None


def _first_line(error: Exception) -> str:
    """The error's message on one line: its first line, with the next one where the first only announces it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]


def module_form(module: nn.Module) -> str:
    """How capture.py gets a module's per-sample gradients: `linear`, `conv1d`, `embedding` or `functional`."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, Conv1D):
        return "conv1d"
    if embedding_scale(module) is not None:
        return "embedding"
    return "functional"


def embedding_scale(module: nn.Module) -> float | None:
    """The factor a plain embedding layer multiplies its rows by: 1 for `nn.Embedding`, `embed_scale` for
    transformers' *ScaledWordEmbedding (Gemma's); None for any other module."""
    if not isinstance(module, nn.Embedding) or module.max_norm is not None or module.scale_grad_by_freq:
        return None
    if type(module).forward is nn.Embedding.forward:
        return 1.0
    if type(module).__name__.endswith("ScaledWordEmbedding") and hasattr(module, "embed_scale"):
        return float(module.embed_scale)  # forward: rows · embed_scale
    return None


def select_modules(model: nn.Module, pattern: str | None = None, parameters: str = "all") -> dict[str, nn.Module]:
    """The modules whose trainable parameters form the gradient space, in model order.

    A module is in if its name matches `pattern` (all if None) and it owns a trainable parameter (with
    `parameters: linear`, linear and Conv1D layers only), or if it shares such a parameter (the input
    embeddings of a tied LM head): every use of a parameter is captured.
    """
    if parameters not in PARAMETER_SETS:
        raise RapidinError(f"cache.parameters: {parameters!r} is not one of {PARAMETER_SETS}")
    chosen = set()
    for name, module in model.named_modules():
        if parameters == "linear" and module_form(module) not in ("linear", "conv1d"):
            continue
        if pattern and not re.search(pattern, name):
            continue
        chosen |= {id(p) for p in module.parameters(recurse=False) if p.requires_grad}
    selected = {
        name: module
        for name, module in model.named_modules()
        if any(id(p) in chosen for p in module.parameters(recurse=False))
    }
    if not selected:
        raise RapidinError(f"model.modules: {pattern!r} selects no trainable parameter of the model")
    return selected


def parameter_blocks(modules: dict[str, nn.Module]) -> list[Block]:
    """One block per distinct trainable parameter of the modules, with its offset in the D-long gradient."""
    uses: dict[int, tuple[nn.Parameter, list]] = {}
    for name, module in modules.items():
        form = module_form(module)
        if form == "functional" and type(module).forward is nn.Module.forward:
            raise RapidinError(
                f"model.modules: cannot capture per-sample gradients of {name} ({type(module).__name__}, which has "
                "no forward of its own); narrow model.modules or set cache.parameters: linear"
            )
        for kind, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                uses.setdefault(id(param), (param, []))[1].append(
                    (name, kind, form != "functional" and kind == "weight")
                )
    blocks, offset = [], 0
    for param, use in uses.values():
        if len({outer for *_, outer in use}) > 1:
            names = [f"{m}.{k}" for m, k, _ in use]
            raise RapidinError(
                f"model.modules: cannot capture {names}: one parameter used by layers of different types"
            )
        blocks.append(Block(tuple((m, k) for m, k, _ in use), tuple(param.shape), offset, use[0][2]))
        offset += param.numel()
    return blocks


def coverage(model: nn.Module, blocks: list[Block], parameters: str = "all") -> dict:
    """What the gradient space covers of the model's trainable parameters: D, tensors, fraction, names left out."""
    covered = {name for b in blocks for name in (f"{m}.{k}" for m, k in b.uses)}
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}  # tied: listed once
    total = sum(p.numel() for p in trainable.values())
    dim = sum(b.size for b in blocks)
    left_out = [name for name in trainable if name not in covered]
    return {"parameters": parameters, "D": dim, "n_tensors": len(blocks), "fraction": dim / total, "left_out": left_out}


def describe_coverage(cover: dict) -> str:
    """One line for the log: 'D = … over N tensors = x % of the model's trainable parameters; left out: …'."""
    left_out = cover["left_out"]
    shown = ", ".join(left_out[:5]) + (f", … ({len(left_out)} tensors)" if len(left_out) > 5 else "")
    return (
        f"D = {cover['D']:,} over {cover['n_tensors']} tensors = {100 * cover['fraction']:.2f} % of the model's "
        f"trainable parameters (cache.parameters: {cover['parameters']}); left out: {shown or 'nothing'}"
    )


def blocks_fingerprint(blocks: list[Block]) -> str:
    """A short hash of the gradient space's layout (every use of each tensor, shapes, order)."""
    layout = json.dumps([(b.uses, b.shape) for b in blocks])
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
