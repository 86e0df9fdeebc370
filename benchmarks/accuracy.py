"""Accuracy per stored number: RapidGrad and factored scores against exact ones (`compressor: none`).

A random-weight Llama (D ≈ 0.3M), 4 queries × 40 training samples of random tokens, fp64; for each setting,
the number of values stored per sample, the mean absolute score error (scores are sums of per-tensor cosines)
and the mean Spearman correlation with the exact ranking.
"""

from __future__ import annotations

import torch
from scipy.stats import spearmanr
from transformers import LlamaConfig, LlamaForCausalLM

from rapidin.cache.shard import sample_gradients
from rapidin.gradients.compress import make_compressor
from rapidin.gradients.loss import collate
from rapidin.gradients.model import parameter_blocks, select_modules

SETTINGS = [("rapidgrad", k, 0) for k in (1024, 4096, 16384)] + [("factored", 0, r) for r in (8, 16, 32)]


def vectors(model, compressor: str, k: int, rank: int, samples) -> torch.Tensor:
    modules = select_modules(model)
    sketch = make_compressor(compressor, parameter_blocks(modules), [k], seed=0, rank=rank)
    batch = collate(samples, pad_id=0)
    return next(iter(sample_gradients(model, modules, sketch, batch, batch.mean_response_weights).values()))


def run() -> dict:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=257,
        hidden_size=128,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=2,
        attention_bias=True,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).double().eval()
    generator = torch.Generator().manual_seed(1)
    samples = []
    for _ in range(44):
        length = int(torch.randint(5, 19, (1,), generator=generator))
        samples.append((torch.randint(3, 257, (length,), generator=generator).tolist(), length // 2))
    queries, train = samples[:4], samples[4:]
    exact = vectors(model, "none", 0, 0, queries) @ vectors(model, "none", 0, 0, train).T  # (4, 40)
    rows = {}
    for compressor, k, rank in SETTINGS:
        query_vectors = vectors(model, compressor, k, rank, queries)
        scores = query_vectors @ vectors(model, compressor, k, rank, train).T
        rho = sum(spearmanr(exact[q], scores[q]).statistic for q in range(4)) / 4
        name = f"rapidgrad K={k}" if compressor == "rapidgrad" else f"factored rank {rank}"
        rows[name] = {"numbers": query_vectors.shape[1], "error": (scores - exact).abs().mean().item(), "spearman": rho}
    return {"D": sum(b.size for b in parameter_blocks(select_modules(model))), "rows": rows}
