"""rapidin.attribute, the notebook API: its scores and top samples against TracIn+LN computed naively in fp64."""

import json

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

import rapidin
from rapidin.data.tokenize import TokenizedDataset, tokenize_file
from rapidin.gradients.model import load_tokenizer, parameter_blocks, select_modules, tokenizer_fingerprint

from .test_tokenwise import naive_gradient

N_TRAIN, N_QUERIES, TOP_K = 12, 2, 3
EXACT = {"compressor": "none", "dtype": "float32", "model_dtype": "float64"}


def records(path, n: int) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]


def naive_vectors(model_dir, data: list[dict], tmp_path, per_token: bool) -> np.ndarray:
    """LN gradients by plain fp64 autograd, one backward per sample (mean response loss) or per response token."""
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    tokenizer = load_tokenizer(str(model_dir))
    store = tmp_path / f"tokens-{per_token}.zarr"
    tokenize_file(tmp_path / "data.jsonl", tokenizer, store, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
    dataset = TokenizedDataset.open(store)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    modules = select_modules(model)
    assert len(parameter_blocks(modules)) > 2
    rows = []
    for i in range(len(dataset)):
        ids, start = dataset.sample(i)
        responses = range(start, len(ids))  # the loss at position p - 1 predicts token p
        for chosen in [[p] for p in responses] if per_token else [list(responses)]:
            weights = np.zeros(len(ids) - 1)
            weights[[p - 1 for p in chosen]] = 1 / len(chosen)
            rows.append(naive_gradient(model, modules, ids, weights).numpy())
    return np.array(rows), [dataset.length(i) - int(dataset.response_start[i]) for i in range(len(dataset))]


@pytest.mark.parametrize("aggregate", ["response", "tokens"])
def test_attribute_returns_exact_tracin_ln_scores_and_their_top_samples(aggregate, model_and_tokens, tmp_path):
    model = model_and_tokens / "model"
    train = records(model_and_tokens / "train.jsonl", N_TRAIN)
    queries = records(model_and_tokens / "queries.jsonl", N_QUERIES)
    found = rapidin.attribute(model, train, queries, device="cpu", aggregate=aggregate, top_k=TOP_K, **EXACT)

    train_vectors, _ = naive_vectors(model, train, tmp_path, per_token=False)  # (N, D)
    query_vectors, lengths = naive_vectors(model, queries, tmp_path, per_token=aggregate == "tokens")
    scores = query_vectors @ train_vectors.T  # (queries or their response tokens, N)
    if aggregate == "tokens":  # mean over a query's tokens of |z|, z a token's scores standardised over the samples
        owner = np.repeat(np.arange(N_QUERIES), lengths)
        z = (scores - scores.mean(axis=1, keepdims=True)) / scores.std(axis=1, keepdims=True)
        scores = np.array([np.abs(z[owner == q]).mean(axis=0) for q in range(N_QUERIES)])
        assert min(lengths) > 1
    np.testing.assert_allclose(found.scores, scores, rtol=1e-4, atol=1e-5 * np.abs(scores).max())
    assert found.scores.shape == (N_QUERIES, N_TRAIN)
    for q in range(N_QUERIES):
        order = np.argsort(-scores[q], kind="stable")
        assert [s["index"] for s in found.helpful[q]] == order[:TOP_K].tolist()
        assert [s["index"] for s in found.harmful[q]] == order[::-1][:TOP_K].tolist()
        assert found.helpful[q][0]["output"] == train[order[0]]["output"]
        assert found.queries[q]["output"] == queries[q]["output"]
    assert found.settings["compressor"] == "none"
    assert ("aggregation" in found.settings) == (aggregate == "tokens")


def test_attribute_refuses_unknown_settings_and_aggregations(model_and_tokens):
    train = records(model_and_tokens / "train.jsonl", 2)
    with pytest.raises(ValueError, match="aggregate must be 'response' or 'tokens', not 'words'"):
        rapidin.attribute(model_and_tokens / "model", train, train, aggregate="words")
    with pytest.raises(TypeError, match="unknown setting 'topk'"):
        rapidin.attribute(model_and_tokens / "model", train, train, topk=3)
