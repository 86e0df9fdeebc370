"""Shared fixtures: tiny models built in code (no downloads), fp64 where results are compared to exact ones."""

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rapidin.data.tokenize import tokenize_file
from rapidin.experiments.demo_data import make_demo_data
from rapidin.experiments.demo_model import train_tokenizer
from rapidin.gradients.loss import collate
from rapidin.gradients.model import load_tokenizer, tokenizer_fingerprint

from .workflow import copy_workflow, snakemake


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


def error_line(capsys) -> str:
    """The one `rapidin: error:` line a refused command wrote, which must end its stderr."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert sum(line.startswith("rapidin: error:") for line in lines) == 1 and lines[-1].startswith("rapidin: error:")
    return lines[-1]


@pytest.fixture(scope="session")
def model_and_tokens(tmp_path_factory) -> Path:
    """Demo data (train.jsonl, queries.jsonl), an untrained tiny Llama with its own tokenizer (model/) and the
    data tokenized with it (tokens/{train,queries}.zarr), built in seconds."""
    root = tmp_path_factory.mktemp("model_and_tokens")
    make_demo_data(root / "train.jsonl", root / "queries.jsonl", n_train=300, n_attacked=3, n_clean=2)
    tokenizer = train_tokenizer((root / "train.jsonl").read_text().splitlines(), vocab_size=300, max_length=1024)
    tiny_llama(torch.float32, vocab=len(tokenizer), hidden=32).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    tokenizer = load_tokenizer(str(root / "model"))
    for split in ("train", "queries"):
        out = root / f"tokens/{split}.zarr"
        tokenize_file(root / f"{split}.jsonl", tokenizer, out, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
    return root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The tiny config run once per test session, end to end, in a temporary copy of the workflow."""
    workdir = copy_workflow(tmp_path_factory.mktemp("tiny"))
    result = snakemake(workdir, "--configfile", "config/tiny.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir / "results" / "tiny"


@pytest.fixture
def batch_of(request):
    return lambda samples: collate(samples, pad_id=0)
