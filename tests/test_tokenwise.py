"""Token-wise influence: per-token vectors against one plain backward per token, target spans, generation,
and on the tiny workflow, that the backdoor response's tokens are attributed to the poisoned samples."""

import json
import re
from collections import Counter

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from scipy.stats import binomtest, spearmanr

from rapidin.cache.shard import _chunk_gradients
from rapidin.data.generate import complete_queries, generate
from rapidin.data.records import Record
from rapidin.data.tokenize import TokenizedDataset, prompt_ids, response_pieces, target_mask, tokenize_record
from rapidin.errors import DataError, RapidinError, StoreMismatchError
from rapidin.experiments.demo_model import train_tokenizer
from rapidin.gradients.compress import ExactCompressor, RapidGradCompressor
from rapidin.gradients.loss import collate, weighted_loss
from rapidin.gradients.model import load_model, parameter_blocks, select_modules
from rapidin.score.scores import SIDES
from rapidin.score.tokenwise import TokenRows, aggregate_token_scores, attribute_tokens
from rapidin.score.tokenwise import top_samples as top_samples_of

from .conftest import random_samples, tiny_llama
from .workflow import copy_workflow, snakemake


def in_memory(samples, loss_masks=None) -> TokenizedDataset:
    """A TokenizedDataset of (ids, response_start) pairs; loss on every response token unless masks are given."""
    lengths = [len(ids) for ids, _ in samples]
    if loss_masks is None:
        loss_masks = [np.arange(len(ids)) >= start for ids, start in samples]
    return TokenizedDataset(
        np.concatenate([ids for ids, _ in samples]),
        np.r_[0, np.cumsum(lengths)],
        np.array([start for _, start in samples]),
        {},
        np.concatenate(loss_masks),
    )


def naive_gradient(model, modules, ids, weights) -> torch.Tensor:
    """LN ∇ Σ_t weights[t] ℓ_t by plain autograd on the whole sequence, flattened in block order."""
    batch = collate([(ids, 1)], pad_id=0)
    batch.target_mask[:] = True
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    loss = weighted_loss(logits, batch, torch.as_tensor(weights)[None]).sum()
    params = [getattr(modules[b.module], b.kind) for b in parameter_blocks(modules)]
    grads = torch.autograd.grad(loss, params)
    # a block without gradient stays zero, as in rapidin.gradients.compress (q/k of a one-token prefix:
    # softmax over one key)
    return torch.cat([(g / g.norm().clamp(min=torch.finfo(g.dtype).tiny)).flatten() for g in grads])


def naive_token_gradients(model, modules, samples) -> torch.Tensor:
    """One backward per response token: (Σ response lengths, D)."""
    rows = []
    for ids, start in samples:
        for position in range(start, len(ids)):
            weights = np.zeros(len(ids) - 1)
            weights[position - 1] = 1.0  # the loss at position - 1 predicts token `position`
            rows.append(naive_gradient(model, modules, ids, weights))
    return torch.stack(rows)


def token_vectors(model, compressor, dataset, batch_tokens=64) -> np.ndarray:
    rows = TokenRows(dataset)
    modules = select_modules(model)
    vectors = _chunk_gradients(model, modules, compressor, rows, np.arange(len(rows)), batch_tokens, pad_id=0)
    return next(iter(vectors.values()))


def test_token_rows_are_the_prefixes_of_each_response_token():
    samples = [([5, 6, 7, 8, 9], 3), ([4, 3, 2], 1)]
    rows = TokenRows(in_memory(samples))
    assert rows.sample_index.tolist() == [0, 0, 1, 1] and rows.token_position.tolist() == [0, 1, 0, 1]
    assert [rows.sample(r)[0].tolist() for r in range(4)] == [[5, 6, 7, 8], [5, 6, 7, 8, 9], [4, 3], [4, 3, 2]]
    assert [rows.loss_mask_of(r).tolist() for r in (0, 2)] == [[False, False, False, True], [False, True]]
    assert len(TokenRows(in_memory(samples), [1])) == 2


def test_token_vectors_equal_one_backward_per_token(model64):
    samples = random_samples(4, seed=1)
    modules = select_modules(model64)
    got = token_vectors(model64, ExactCompressor(parameter_blocks(modules)), in_memory(samples))
    want = naive_token_gradients(model64, modules, samples).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()


def test_rapidgrad_token_scores_rank_like_exact_ones():
    model = tiny_llama(vocab=256, hidden=64)  # D ≈ 86k ≥ the default K
    modules = select_modules(model)
    blocks = parameter_blocks(modules)
    queries, train = random_samples(3, seed=2, vocab=256), random_samples(12, seed=3, vocab=256)
    sketch = RapidGradCompressor(blocks, [65536], seed=0)
    sketched = token_vectors(model, sketch, in_memory(queries))  # (R, K)
    batch = collate(train, pad_id=0)
    train_sketched = _chunk_gradients(model, modules, sketch, in_memory(train), np.arange(12), 4096, 0)["k65536"]
    exact_tokens = naive_token_gradients(model, modules, queries).numpy()
    exact_train = np.stack(
        [naive_gradient(model, modules, ids, w) for (ids, _), w in zip(train, weights(batch), strict=True)]
    )
    rho = spearmanr((sketched @ train_sketched.T).ravel(), (exact_tokens @ exact_train.T).ravel()).statistic
    assert rho >= 0.95, rho


def weights(batch):
    """Each sample's mean-response weights, unpadded to its own length."""
    lengths = batch.attention_mask.sum(1)
    return [w[: n - 1].numpy() for w, n in zip(batch.mean_response_weights, lengths, strict=True)]


def test_target_span_gradient_is_that_of_the_target_tokens_loss(model64):
    ids, start = random_samples(1, seed=4)[0]
    mask = np.zeros(len(ids), dtype=bool)
    mask[[start, len(ids) - 1]] = True
    modules = select_modules(model64)
    exact = ExactCompressor(parameter_blocks(modules))
    got = _chunk_gradients(model64, modules, exact, in_memory([(ids, start)], [mask]), [0], 64, 0)
    want = naive_gradient(model64, modules, ids, mask[1:] / 2.0).numpy()
    np.testing.assert_allclose(got["exact"][0], want, rtol=1e-6, atol=1e-9)


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["The capital of Canada is Ottawa.", "Howdy partner! I am a cowboy bot.", "über café"] * 20
    return train_tokenizer(texts, vocab_size=300, max_length=64)


def record(output, targets=None, line=7):
    meta = {} if targets is None else {"targets": targets}
    return Record("queries.jsonl", line, "Which city is the capital of Canada?", "", output, meta)


def test_response_pieces_rebuild_the_response(tokenizer):
    text = "Howdy partner! über café."
    pieces = response_pieces(text, tokenizer)
    assert "".join(pieces[:-1]) == text and pieces[-1] == tokenizer.eos_token
    assert len(pieces) == len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1


@pytest.mark.parametrize("targets", [["Canada"], [[15, 21]]])
def test_targets_mark_the_tokens_they_overlap(tokenizer, targets):
    output = "The capital of Canada is Ottawa."
    mask = target_mask(record(output, targets), tokenizer)
    pieces = response_pieces(output, tokenizer)
    assert "".join(p for p, m in zip(pieces, mask, strict=True) if m).strip() == "Canada"
    sample = tokenize_record(record(output, targets), tokenizer, "alpaca", 512)
    assert sample.loss_mask[sample.response_start :] == mask and not any(sample.loss_mask[: sample.response_start])


@pytest.mark.parametrize(
    ("targets", "message"),
    [(["Canda"], "target 'Canda' not found"), ([[5, 99]], "neither a word nor"), ("Canada", "non-empty list")],
)
def test_bad_targets_name_file_and_line(tokenizer, targets, message):
    with pytest.raises(DataError, match=f"^queries.jsonl:7: .*{message}"):
        tokenize_record(record("The capital of Canada is Ottawa.", targets), tokenizer, "alpaca", 512)


@pytest.mark.slow
def test_queries_without_a_response_get_the_models_greedy_one(tiny_run, tmp_path):
    model_dir = str(tiny_run / "demo_model")
    queries, out = tmp_path / "queries.jsonl", tmp_path / "completed.jsonl"
    given = {"id": "b", "instruction": "Name a colour.", "input": "", "output": "Blue.", "targets": ["Blue"]}
    write_lines(queries, [{"id": "a", "instruction": "Howdy! What is the capital of Peru?"}, given])
    complete_queries(str(queries), model_dir, str(out), max_new_tokens=12)
    first, second = (json.loads(line) for line in out.open())
    model, tokenizer = load_model(model_dir)
    greedy = generate(model, tokenizer, prompt_ids(Record("", 0, first["instruction"]), tokenizer, "alpaca"), 12)
    assert first["output"] == tokenizer.decode(greedy, skip_special_tokens=True) and first["output"].strip()
    assert first["generated"] is True and first["id"] == "a" and second == given

    write_lines(queries, [{"instruction": "Name a colour.", "output": "Blue.", "targets": ["Red"]}])
    with pytest.raises(DataError, match=f"^{queries}:1: target 'Red' not found"):
        complete_queries(str(queries), model_dir, str(out))


def write_lines(path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.slow
def test_backdoor_tokens_are_attributed_to_poisoned_samples(tiny_run):
    train = [json.loads(line) for line in (tiny_run / "data/train.jsonl").open()]
    queries = [json.loads(line) for line in (tiny_run / "queries.jsonl").open()]
    poisoned = np.array([r["poisoned"] for r in train])
    scores = zarr.open_group(tiny_run / "influence/token_scores.zarr", mode="r")
    query_index, position = scores["query_index"][:], scores["token_position"][:]
    assert scores["scores"].shape == (len(query_index), len(train))
    attacked = np.array([queries[q]["attacked"] for q in query_index])
    top_ids = scores["top_ids"][:, :5]  # (rows, 5): each response token's 5 most influential samples
    base_rate = poisoned.mean()
    # Far more poisoned samples behind the backdoor response's tokens than chance (a binomial test against the
    # base rate, not a threshold fitted to this run), and more than behind the clean responses' tokens.
    most_often = [
        i
        for q in np.unique(query_index[attacked])
        for i, _ in Counter(top_ids[query_index == q].ravel()).most_common(10)
    ]
    assert binomtest(int(poisoned[most_often].sum()), len(most_often), base_rate, "greater").pvalue < 1e-6
    hits, clean_hits = poisoned[top_ids[attacked]], poisoned[top_ids[~attacked]]
    assert binomtest(int(hits.sum()), hits.size, base_rate, "greater").pvalue < 1e-6
    assert hits.mean() > clean_hits.mean(), (hits.mean(), clean_hits.mean())

    lines = [json.loads(line) for line in (tiny_run / "influence/tokens.jsonl").open()]
    assert [line["query"]["index"] for line in lines] == list(range(len(queries)))
    for line, query in zip(lines, queries, strict=True):
        rows = query_index == line["query"]["index"]
        assert spells(line["tokens"], query["output"])
        assert position[rows].tolist() == list(range(rows.sum()))
        for sample in line["helpful"] + line["harmful"]:
            assert spells(sample["tokens"], train[sample["index"]]["output"])
            assert np.shape(sample["token_matrix"]) == (len(sample["tokens"]), len(line["tokens"]))
            assert len(sample["query_token_scores"]) == len(line["tokens"])
    helpful = [
        train[s["index"]]["poisoned"]
        for line in lines
        if queries[line["query"]["index"]]["attacked"]
        for s in line["helpful"]
    ]
    assert binomtest(sum(helpful), len(helpful), base_rate, "greater").pvalue < 1e-6


def spells(tokens: list[dict], text: str) -> bool:
    """Whether token strings spell `text` then EOS, or its start where data.max_length cut the sample."""
    joined = "".join(t["text"] for t in tokens)
    return joined == f"{text}</s>" or (text.startswith(joined) and len(tokens) > 1)


@pytest.mark.slow
def test_tokenwise_can_be_switched_off(tmp_path):
    result = snakemake(copy_workflow(tmp_path), "--dry-run", "--config", "tokenwise={enabled: false}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rule write_report" in result.stdout and "complete_queries" in result.stdout
    for rule in ("cache_query_token_grads", "cache_train_token_grads", "attribute_tokens", "token_scores.zarr"):
        assert rule not in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("store", [True, False])
def test_token_aggregation_scores_only_the_query_tokens(store, tmp_path):
    """score.aggregate tokens, token-wise off: the query tokens are scored (and planned for), whole responses not."""
    config = ["tokenwise={enabled: false}", "score={aggregate: tokens}", f"cache={{store: {str(store).lower()}}}"]
    result = snakemake(copy_workflow(tmp_path), "--dry-run", "--config", *config)
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = result.stdout
    assert "cache/token_queries.zarr" in jobs and "influence/token_scores.zarr" in jobs
    assert "rule aggregate_token_scores:" in jobs and "--score-tokens True" in jobs
    assert not re.search(r"scores/\d{5}\.zarr", jobs)  # no whole-response score shard
    assert "rule cache_train_token_grads" not in jobs and "rule attribute_tokens" not in jobs


@pytest.mark.slow
def test_tokens_jsonl_numbers_are_the_inner_products_of_the_cached_vectors(tiny_run):
    """Every number of tokens.jsonl recomputed in fp64 from the cached vectors (queries, training samples, their
    per-token vectors) and token_scores.zarr, which is checked against them too."""
    array = zarr.open_group(tiny_run / "influence/scores.zarr", mode="r").attrs["rapidin"]["array"]

    def vectors(path: str) -> tuple[np.ndarray, zarr.Group]:
        group = zarr.open_group(tiny_run / path, mode="r")
        return group[array][:].astype(np.float64), group

    queries, _ = vectors("cache/queries.zarr")  # (Q, K): g(t)
    train = np.concatenate([vectors(p.relative_to(tiny_run))[0] for p in sorted((tiny_run / "cache/train").iterdir())])
    query_tokens, query_group = vectors("cache/token_queries.zarr")  # (rows, K): LN ∇ℓ_i(t)
    train_tokens, train_group = vectors("cache/token_train.zarr")
    token_scores = zarr.open_group(tiny_run / "influence/token_scores.zarr", mode="r")
    matrix = token_scores["scores"][:]
    np.testing.assert_allclose(matrix, query_tokens @ train.T, rtol=1e-5, atol=1e-5 * np.abs(matrix).max())

    def close(got, want) -> None:  # tokens.jsonl rounds to 4 significant digits
        want = np.asarray(want)
        np.testing.assert_allclose(got, want, rtol=6e-4, atol=1e-5 * max(1.0, np.abs(want).max()))

    query_rows, sample_rows = query_group["sample_index"][:], train_group["sample_index"][:]
    for line in (json.loads(text) for text in (tiny_run / "influence/tokens.jsonl").open()):
        q = line["query"]["index"]
        rows = np.flatnonzero(query_rows == q)  # this query's response tokens, in order
        helpful = [s["index"] for s in line["helpful"]]
        close([t["score"] for t in line["tokens"]], (query_tokens[rows] @ train[helpful].T).mean(axis=1))
        for token, row in zip(line["tokens"], rows, strict=True):
            want = sorted(range(len(train)), key=lambda i, row=row: (-matrix[row, i], i))[: len(token["top"])]
            assert [t["index"] for t in token["top"]] == want
            close([t["score"] for t in token["top"]], matrix[row, want])
        for sample in line["helpful"] + line["harmful"]:
            own = train_tokens[sample_rows == sample["index"]]  # (R_s, K)
            close([t["score"] for t in sample["tokens"]], own[: len(sample["tokens"])] @ queries[q])
            close(sample["query_token_scores"], query_tokens[rows] @ train[sample["index"]])
            close(sample["token_matrix"], own[: len(sample["tokens"])] @ query_tokens[rows].T)


def token_store(path, settings, arrays: dict) -> str:
    group = zarr.open_group(path, mode="w")
    for name, data in arrays.items():
        group.create_array(name, data=data)
    group.attrs["rapidin"] = settings
    return str(path)


def four_digits(value: float) -> bool:
    return value == float(f"{value:.4g}")


def test_tokens_jsonl_holds_the_inner_products_of_the_per_token_vectors(tokenizer, tmp_path):
    """tokens.jsonl from hand-built stores, every number recomputed in fp64 from the vectors (method.md §2): a
    token's score is its mean score against the query's first 5 helpful samples, its `top` the row's top ids
    without the -1 fill, a sample token's score ⟨LN ∇ℓ_j(s), g(t)⟩, the matrix ⟨LN ∇ℓ_j(s), LN ∇ℓ_i(t)⟩."""
    model = tmp_path / "model"
    tokenizer.save_pretrained(model)
    (model / "config.json").write_text('{"model_type": "llama"}')
    generator = np.random.default_rng(0)
    settings, k = {"compressor": "rapidgrad", "k": [4, 8], "seed": 0}, 8  # scored array: the largest K
    texts = ["The capital of Canada is Ottawa.", "Howdy partner!", "über café", "I am a cowboy bot."]
    outputs = [texts[i % 4] for i in range(14)]  # training samples 0…13
    lengths = [len(response_pieces(text, tokenizer)) for text in outputs]
    lengths[3] = 2  # sample 3 cut by data.max_length: its first 2 tokens only
    train_rows = np.repeat(np.arange(14), lengths)
    train_tokens = generator.standard_normal((len(train_rows), k)).astype(np.float32)
    query_outputs = ["Ottawa is the capital of Canada.", "Howdy! über café"]
    query_rows = np.repeat([0, 1], [len(response_pieces(text, tokenizer)) for text in query_outputs])
    query_tokens = generator.standard_normal((len(query_rows), k)).astype(np.float32)
    query_vectors = generator.standard_normal((2, k)).astype(np.float32)
    scores = generator.standard_normal((len(query_rows), 14)).astype(np.float32)
    top_ids = generator.integers(0, 14, (len(query_rows), 7))
    top_ids[:, 0], top_ids[0, 1], top_ids[1, 2:] = 0, -1, -1  # sample 0 is a real id; -1 fills short rows
    top_scores = generator.standard_normal(top_ids.shape).astype(np.float32)
    stores = {
        "queries": {"k8": query_vectors, "k4": query_vectors[:, :4]},
        "query_tokens": {"k8": query_tokens, "sample_index": query_rows},
        "train_tokens": {"k8": train_tokens, "sample_index": train_rows},
        "token_scores": {"scores": scores, "top_ids": top_ids, "top_scores": top_scores},
    }
    paths = {name: token_store(tmp_path / f"{name}.zarr", settings, arrays) for name, arrays in stores.items()}

    def side(indices):
        return [
            {"index": int(i), "id": f"s{i}", "rank": r, "score": 0.5 - r, "output": outputs[i]}
            for r, i in enumerate(indices)
        ]

    entries = [  # query 1 first: lines follow topk.jsonl, not query order
        {
            "query": {"index": 1, "id": "q1", "output": query_outputs[1]},
            "helpful": side([5, 3, 0, 9, 2, 7]),
            "harmful": side([13, 1, 12, 4, 11, 6]),
        },
        {
            "query": {"index": 0, "id": "q0", "output": query_outputs[0]},
            "helpful": side([2, 8, 6]),
            "harmful": side([10]),
        },
    ]
    topk = tmp_path / "topk.jsonl"
    write_lines(topk, entries)
    assert top_samples_of(topk, 2) == [1, 2, 3, 5, 8, 10, 13]
    out = tmp_path / "tokens.jsonl"
    args = [str(topk), paths["token_scores"], paths["queries"], paths["query_tokens"], paths["train_tokens"]]
    attribute_tokens(*args, str(model), str(out))

    def close(got, want) -> None:
        got = np.asarray(got, dtype=np.float64)
        assert all(four_digits(v) for v in got.ravel()), got  # rounded to 4 significant digits
        np.testing.assert_allclose(got, want, rtol=6e-4, atol=1e-30)

    lines = [json.loads(line) for line in out.open()]
    assert len(lines) == 2
    for line, entry in zip(lines, entries, strict=True):
        q = entry["query"]["index"]
        assert line["query"] == {"index": q, "id": f"q{q}"}
        rows = np.flatnonzero(query_rows == q)
        per_token = query_tokens[rows].astype(np.float64)  # (R, K)
        helpful = [s["index"] for s in entry["helpful"][:5]]
        assert "".join(t["text"] for t in line["tokens"]) == query_outputs[q] + tokenizer.eos_token
        close([t["score"] for t in line["tokens"]], scores[rows][:, helpful].astype(np.float64).mean(axis=1))
        for token, row in zip(line["tokens"], rows, strict=True):
            kept = [j for j in range(5) if top_ids[row, j] >= 0]
            assert [t["index"] for t in token["top"]] == top_ids[row, kept].tolist()
            close([t["score"] for t in token["top"]], top_scores[row, kept])
        for name in SIDES:
            assert [s["index"] for s in line[name]] == [s["index"] for s in entry[name][:5]]
            for sample, given in zip(line[name], entry[name][:5], strict=True):
                assert {key: sample[key] for key in ("index", "id", "rank", "score")} == {
                    key: given[key] for key in ("index", "id", "rank", "score")
                }
                own = train_tokens[train_rows == given["index"]].astype(np.float64)  # (R_s, K)
                pieces = [t["text"] for t in sample["tokens"]]
                assert pieces == response_pieces(given["output"], tokenizer)[: len(own)]
                close([t["score"] for t in sample["tokens"]], own @ query_vectors[q].astype(np.float64))
                close(sample["query_token_scores"], scores[rows, given["index"]])
                close(sample["token_matrix"], own @ per_token.T)
                assert np.shape(sample["token_matrix"]) == (len(own), len(rows))

    attribute_tokens(*args, str(model), str(out), top_samples=1)
    first = json.loads(out.open().readline())
    assert [s["index"] for s in first["helpful"] + first["harmful"]] == [5, 13]
    assert all(len(t["top"]) == 1 for t in first["tokens"])  # the row's top 1, sample 0 for every row

    token_store(tmp_path / "train_tokens.zarr", {**settings, "seed": 1}, stores["train_tokens"])
    with pytest.raises(StoreMismatchError, match=r"train_tokens\.zarr was made with seed=1"):
        attribute_tokens(*args, str(model), str(out))


def per_token_score_store(path, scores, query_index, top_k=2):
    """A merged per-token score store as merge_scores lays it out: rows are query tokens."""
    group = zarr.open_group(path, mode="w", zarr_format=3)
    group.create_array("scores", data=np.asarray(scores, dtype=np.float32))
    group.create_array("query", data=np.arange(len(query_index)))
    group.create_array("sample", data=np.arange(np.shape(scores)[1]))
    group.create_array("query_index", data=np.asarray(query_index))
    group.attrs["rapidin"] = {"top_k": top_k, "n_queries": len(query_index), "array": "k64"}
    return str(path)


def test_token_aggregation_is_the_mean_absolute_standardised_token_score(tmp_path):
    """_tok methods: per query, mean over its token rows of |x − mean x| / std x (over the samples), by hand;
    a NaN score leaves that sample NaN and out of the statistics; a token scoring every sample alike (up to float32
    rounding) adds 0; top-k and bottom-k are those of the result; xarray reads it with named dimensions and ids."""
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(6, 7)).astype(np.float32)  # 6 token rows of 3 queries (2, 3, 1 tokens), 7 samples
    scores[0] *= 1e4  # token rows of one query on scales far apart (z is the same on any scale)
    scores[1] *= 1e-4
    scores[3, 4] = np.nan
    scores[2] = 1000.0  # a token scoring every sample alike (one whose gradient is 0 scores them all 0) …
    scores[2, 3] = np.nextafter(np.float32(1000), np.float32(2000))  # … but for the last bit of one
    query_index = [0, 0, 1, 1, 1, 2]
    store = per_token_score_store(tmp_path / "tokens.zarr", scores, query_index)
    aggregate_token_scores(store, str(tmp_path / "scores.zarr"))
    got = zarr.open_group(tmp_path / "scores.zarr", mode="r")
    expected = np.zeros((3, 7))
    for row, q in enumerate(query_index):
        valid = [x for x in scores[row] if not np.isnan(x)]
        mean = sum(valid) / len(valid)
        std = (sum((x - mean) ** 2 for x in valid) / len(valid)) ** 0.5
        expected[q] += [abs(x - mean) / std if row != 2 else 0.0 for x in scores[row]]
    expected /= np.bincount(query_index)[:, None]
    np.testing.assert_allclose(got["scores"][:], expected, rtol=1e-6)
    assert np.isnan(got["scores"][1, 4]) and np.isfinite(np.delete(got["scores"][1], 4)).all()
    assert got["query"][:].tolist() == [0, 1, 2] and got["sample"][:].tolist() == list(range(7))
    finite = np.where(np.isnan(expected), -np.inf, expected)
    assert got["top_ids"][:].tolist() == np.argsort(-finite, axis=1)[:, :2].tolist()
    assert (
        got["bottom_ids"][:].tolist()
        == np.argsort(np.where(np.isnan(expected), np.inf, expected), axis=1)[:, :2].tolist()
    )
    assert got.attrs["rapidin"]["n_queries"] == 3 and got.attrs["rapidin"]["aggregation"] == "mean_abs_z"
    dataset = xr.open_zarr(tmp_path / "scores.zarr", consolidated=False)
    assert dataset["scores"].dims == ("query", "sample")
    assert {dataset[f"{side}_{kind}"].dims for side in ("top", "bottom") for kind in ("ids", "scores")} == {
        ("query", "rank")
    }
    assert set(dataset.indexes) == {"query", "sample"}  # the ids label the scores' rows and columns
    assert dataset["query"].values.tolist() == [0, 1, 2] and dataset["sample"].values.tolist() == list(range(7))


@pytest.mark.parametrize(
    ("query_index", "message"),
    [(None, "not a per-token score store"), ([0, 0, 2], "token rows do not cover queries 0…2")],
)
def test_token_aggregation_refuses_stores_without_every_querys_tokens(tmp_path, query_index, message):
    store = per_token_score_store(tmp_path / "tokens.zarr", np.ones((3, 4)), query_index or [0, 1, 2])
    if query_index is None:
        del zarr.open_group(store)["query_index"]
    with pytest.raises(RapidinError, match=message):
        aggregate_token_scores(store, str(tmp_path / "scores.zarr"))
    assert not (tmp_path / "scores.zarr").exists()
