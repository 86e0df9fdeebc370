"""Shared fixtures: tiny models built in code (no downloads), fp64 where results are compared to exact ones."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rapidin.loss import collate


def tiny_llama(dtype=torch.float64, seed: int = 0, vocab: int = 61, hidden: int = 16) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 3 // 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_bias=True,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def random_samples(n: int, seed: int = 0, vocab: int = 61, lengths=(5, 19)) -> list[tuple[list[int], int]]:
    """(ids, response_start) pairs of varied lengths, response at least 2 tokens."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        length = int(torch.randint(lengths[0], lengths[1], (1,), generator=generator))
        start = int(torch.randint(1, length - 2, (1,), generator=generator))
        samples.append((torch.randint(3, vocab, (length,), generator=generator).tolist(), start))
    return samples


@pytest.fixture
def model64():
    return tiny_llama()


@pytest.fixture
def batch_of(request):
    return lambda samples: collate(samples, pad_id=0)
