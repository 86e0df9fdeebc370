"""Token-budget batches: padded many-sample batches give the vectors of one-sample batches, for every compressor."""

import json

import numpy as np
import pytest
import torch
import zarr

from rapidin.cache.shard import CacheSettings, cache_gradients, sample_gradients, token_budget_batches
from rapidin.data.records import read_records
from rapidin.data.tokenize import format_prompt, tokenize_file
from rapidin.experiments.demo_model import train_tokenizer
from rapidin.gradients.compress import SKETCH_VERSION, make_compressor
from rapidin.gradients.loss import collate
from rapidin.gradients.model import parameter_blocks, select_modules, tokenizer_fingerprint

from .conftest import random_samples, tiny_llama

COMPRESSORS = ["none", "rapidgrad", "factored"]


@pytest.mark.parametrize("budget", [1, 40, 100, 1000])
def test_token_budget_batches_respect_the_budget_and_cover_every_sample_once(budget):
    lengths = np.random.default_rng(budget).integers(3, 60, size=50)
    batches = token_budget_batches(lengths, budget)
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(50))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * lengths[batch].max() <= budget
    if budget < lengths.min():
        assert len(batches) == 50  # no two samples fit: one per batch
    if budget == 1000:
        assert max(len(b) for b in batches) > 10  # a real budget packs many samples


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_one_padded_batch_equals_one_sample_at_a_time(model64, compressor):
    modules = select_modules(model64)
    sketch = make_compressor(compressor, parameter_blocks(modules), [256], seed=0, rank=4)
    samples = random_samples(7)  # lengths 5…18: the batch is padded

    def vectors(group):
        batch = collate(group, pad_id=0)
        return next(iter(sample_gradients(model64, modules, sketch, batch, batch.mean_response_weights).values()))

    one_by_one = torch.cat([vectors([s]) for s in samples])
    torch.testing.assert_close(vectors(samples), one_by_one, rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory):
    """A tiny fp64 Llama with its tokenizer on disk and a tokenized 12-sample dataset."""
    root = tmp_path_factory.mktemp("batching")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "echo", "kilo", "lima", "oscar"]
    with (root / "train.jsonl").open("w") as handle:
        for _ in range(12):
            instruction, output = (" ".join(rng.choice(words, rng.integers(2, 12))) for _ in range(2))
            handle.write(json.dumps({"instruction": instruction, "output": output}) + "\n")
    records = read_records(root / "train.jsonl")
    tokenizer = train_tokenizer([t for r in records for t in (format_prompt(r, "alpaca"), r.output)], 400, 256)
    tiny_llama(vocab=len(tokenizer)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    tokenize_file(
        root / "train.jsonl", tokenizer, root / "tokens.zarr", tokenizer_fingerprint=tokenizer_fingerprint(tokenizer)
    )
    return root


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_cache_is_the_same_with_big_and_tiny_batches(tiny_project, compressor):
    stores = {}
    for batch_tokens in (1, 100_000):  # one sample per batch, all of a chunk in one padded batch
        out = tiny_project / f"cache-{compressor}-{batch_tokens}.zarr"
        settings = CacheSettings(
            compressor,
            k=(256,),
            dtype="float32",
            rank=4,
            batch_tokens=batch_tokens,
            chunk_rows=5,
            model_dtype="float64",
        )
        cache_gradients(
            str(tiny_project / "tokens.zarr"),
            str(tiny_project / "model"),
            str(out),
            settings,
            device="cpu",
        )
        stores[batch_tokens] = zarr.open_group(out, mode="r")
    name = {"none": "exact", "rapidgrad": "k256", "factored": "factored"}[compressor]
    small, big = (stores[b][name][:] for b in (1, 100_000))
    assert small.shape[0] == 12 and np.abs(small).max() > 0
    np.testing.assert_allclose(big, small, rtol=1e-6, atol=1e-9)  # fp64 math, stored as fp32
    settings = stores[1].attrs["rapidin"]  # what the vectors depend on, checked on resume and when scoring
    assert [settings[key] for key in ("sketch_version", "model_dtype", "device")] == [SKETCH_VERSION, "float64", "cpu"]
    coverage = settings["coverage"]
    assert coverage["left_out"] == [] and coverage["D"] == settings["D"] and coverage["parameters"] == "all"
    # embeddings; per layer q, k, v, o with biases, 3 MLP weights, 2 norms; final norm; LM head
    assert coverage["n_tensors"] == settings["n_parameter_tensors"] == 1 + 2 * (8 + 3 + 2) + 1 + 1
