"""Caching throughput on a random-weight Llama, three ways over the same samples and model.

- rapidin: `cache_gradients` end to end (model loading, token-budget batches, hooks, LN, sketch, Zarr writes);
- bare: a plain forward + backward (weight gradients into .grad, as in training) over the same token-budget
  batches: the yardstick;
- per-sample loop, as RapidIn's authors do it: one forward/backward per sample, `autograd.grad` of every
  weight, flatten, layer-wise normalise, RapidGrad (timed on the first samples, extrapolated by tokens).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rapidin.cache.shard import CacheSettings, cache_gradients, token_budget_batches
from rapidin.data.records import read_records
from rapidin.data.tokenize import TokenizedDataset, format_prompt, tokenize_file
from rapidin.experiments.demo_model import train_tokenizer
from rapidin.gradients.loss import collate, weighted_loss
from rapidin.gradients.model import load_model, parameter_blocks, resolve_dtype, select_modules, tokenizer_fingerprint
from rapidin.gradients.rapidgrad import RapidGrad

WORDS = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]  # word-like syllables for the generated records


@dataclass
class CachingSize:
    """The benchmark's model and data; the defaults take about a minute per method on 2 CPU cores."""

    hidden: int = 384
    layers: int = 4
    intermediate: int = 1024
    heads: int = 6
    vocab: int = 8192
    n_samples: int = 96
    min_words: int = 40
    max_words: int = 160
    batch_tokens: int = 8192
    k: int = 65536
    loop_samples: int = 6


def make_project(root: Path, size: CachingSize) -> tuple[str, str]:
    """A random-weight Llama (with a small BPE tokenizer) in `root/model` and its tokenized dataset."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rng = np.random.default_rng(0)
    with (root / "train.jsonl").open("w") as handle:
        for _ in range(size.n_samples):
            n = int(rng.integers(size.min_words, size.max_words))
            handle.write(
                json.dumps(
                    {"instruction": " ".join(rng.choice(WORDS, n // 3)), "output": " ".join(rng.choice(WORDS, n))}
                )
                + "\n"
            )
    records = read_records(root / "train.jsonl")
    tokenizer = train_tokenizer([t for r in records for t in (format_prompt(r, "alpaca"), r.output)], 512, 4096)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    tokenize_file(
        root / "train.jsonl",
        tokenizer,
        root / "tokens.zarr",
        max_length=4096,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
    )
    return str(root / "model"), str(root / "tokens.zarr")


def time_rapidin(
    model_dir: str, tokens: str, out: Path, size: CachingSize, device: str, model_dtype: str, compressor="rapidgrad"
) -> float:
    settings = CacheSettings(compressor, k=(size.k,), batch_tokens=size.batch_tokens, model_dtype=model_dtype)
    started = time.perf_counter()
    cache_gradients(tokens, model_dir, str(out), settings, device=device)
    return time.perf_counter() - started


def time_bare(model, dataset: TokenizedDataset, size: CachingSize, pad_id: int) -> float:
    """A plain forward + backward over the same token-budget batches (collation included, as in rapidin)."""
    lengths = np.array([dataset.length(i) for i in range(len(dataset))])
    device = next(model.parameters()).device
    started = time.perf_counter()
    for positions in token_budget_batches(lengths, size.batch_tokens):
        batch = collate([dataset.sample(p) for p in positions], pad_id).to(device)
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        weighted_loss(logits, batch, batch.mean_response_weights).sum().backward()
    synchronize(device)
    return time.perf_counter() - started


def time_per_sample_loop(model, dataset: TokenizedDataset, size: CachingSize, pad_id: int) -> float:
    """Seconds per token of the authors' scheme: one autograd.grad per sample, flatten, LN, RapidGrad."""
    modules = select_modules(model)
    blocks = parameter_blocks(modules)  # the parameters rapidin's gradients cover
    params = [getattr(modules[b.module], b.kind) for b in blocks]
    sketch = RapidGrad(sum(b.size for b in blocks), [size.k], seed=0)
    device = next(model.parameters()).device
    started = time.perf_counter()
    for index in range(size.loop_samples):
        batch = collate([dataset.sample(index)], pad_id).to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        grads = torch.autograd.grad(weighted_loss(logits, batch, batch.mean_response_weights).sum(), params)
        vector = torch.cat([(g / g.norm()).flatten() for g in grads]).float()  # (D,)
        sketch(vector[None])
    synchronize(device)
    return (time.perf_counter() - started) / int(dataset.offsets[size.loop_samples])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(root: Path, size: CachingSize, device: str = "cpu", model_dtype: str = "float32") -> dict:
    """Seconds and tokens/s of each method (best of two interleaved runs for rapidin and bare)."""
    model_dir, tokens = make_project(root, size)
    dataset = TokenizedDataset.open(tokens)
    n_tokens = int(dataset.offsets[-1])
    model, tokenizer = load_model(model_dir, None, resolve_dtype(model_dtype, torch.device(device)), device)
    d = sum(b.size for b in parameter_blocks(select_modules(model)))
    bare, rapidin = [], []
    for repeat in range(2):
        bare.append(time_bare(model, dataset, size, tokenizer.pad_token_id))
        rapidin.append(time_rapidin(model_dir, tokens, root / f"cache-{repeat}.zarr", size, device, model_dtype))
    factored = time_rapidin(model_dir, tokens, root / "cache-f.zarr", size, device, model_dtype, "factored")
    per_sample = time_per_sample_loop(model, dataset, size, tokenizer.pad_token_id) * n_tokens
    seconds = {
        "bare forward+backward": min(bare),
        f"rapidin cache_gradients (rapidgrad, K={size.k})": min(rapidin),
        "rapidin cache_gradients (factored, rank 16)": factored,
        f"per-sample loop (authors' scheme; {size.loop_samples} samples, scaled by tokens)": per_sample,
    }
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "D": d,
        "n_samples": len(dataset),
        "n_tokens": n_tokens,
        "seconds": seconds,
        "tokens_per_s": {name: n_tokens / s for name, s in seconds.items()},
        "caching_vs_bare_fwd_bwd": min(rapidin) / min(bare),
        "caching_vs_per_sample_loop": min(rapidin) / per_sample,
    }
