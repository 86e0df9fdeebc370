"""Token-wise influence (method.md §2): per-token gradient vectors, and `tokens.jsonl` from them.

A per-token gradient is the gradient of one response token's loss, LN ∇ℓ_j. Under causal attention ℓ_j depends
only on the tokens up to j, so it equals the mean-loss gradient of the sample's prefix ending at token j with a
loss mask on token j alone. `TokenRows` views a tokenized dataset as these prefix rows, one per response token,
and the sample machinery (cache.shard.cache_gradients: token-budgeted batches, per-sample gradients from one
forward/backward per batch, the cache's compressor and settings) turns them into vectors comparable with the
cached ones — exactly the per-token gradients with `compressor: none`, the same sketch of them otherwise.

Cost, honestly: each token costs one forward and one backward over its prefix (batched with other rows, so no
per-token Python overhead). A response of R tokens after a P-token prompt takes Σ_j (P + j) ≈ R·P + R²/2 token
passes, about R/2 to R times its mean-loss gradient. The alternative — one forward, then a vmapped backward of
the R one-hot losses (`torch.autograd.grad(..., is_grads_batched=True)`) — still needs R vector-Jacobian
products, each over the full length, so it saves only the repeated forwards (at most a third, when P ≫ R; it
loses when R ≫ P), and the capture hooks do not compose with vmap. Schemes that make token gradients "almost
free" (projected activations × projected output gradients) are exact only at the last layer.

Granularities written to `tokens.jsonl` (per query line):
- generated token ← training sample: each response token's scores against all samples are rows of
  `token_scores.zarr`; a token's `score` is its mean score against the query's top helpful samples, `top` its
  own most influential samples;
- training token → generation: per token of the query's top helpful and harmful samples, ⟨LN ∇ℓ_j(s), g(t)⟩;
- token → token: per top sample, the matrix ⟨LN ∇ℓ_j(s), LN ∇ℓ_i(t)⟩ (sample tokens × response tokens).

Token-level query aggregation (methods ending in `_tok`, `aggregate_token_scores`) ranks training samples for a
whole response from its tokens' scores: I(s, t) = mean_i |z_i(s)|, z_i token i's scores standardised over the
training samples. Trained to convergence, a poisoned sample pushes some of a response's tokens up and others
down, so the whole-response gradient's inner product cancels; per token, and in magnitude, it does not. The
score says how strongly a sample shapes the response, not in which direction: helpful is "most influential",
harmful "least influential".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import zarr

from rapidin.data.tokenize import TokenizedDataset, response_pieces
from rapidin.errors import RapidinError
from rapidin.gradients.model import load_tokenizer
from rapidin.score.scores import SHARED_FIELDS, SIDES, running_topk, vector_array
from rapidin.store import RANK_DIMS, SCORE_DIMS, atomic_dir, atomic_file, check_agree, read_settings, write_settings

FLOAT32_RESOLUTION = float(np.finfo(np.float32).eps)  # scores are stored in float32: smaller spreads are rounding


class TokenRows:
    """One row per response token of the chosen samples: the prefix ending at that token, loss on it alone.

    Reads like a TokenizedDataset (`len`, `sample`, `length`, `loss_mask_of`, `settings`) for cache.shard.
    `sample_index[r]` is row r's sample and `token_position[r]` its token's index in the response (0 = first).
    """

    def __init__(self, dataset: TokenizedDataset, samples: list[int] | None = None):
        self.dataset, self.settings = dataset, dataset.settings
        samples = np.arange(len(dataset)) if samples is None else np.asarray(samples, dtype=np.int64)
        counts = [dataset.length(i) - int(dataset.response_start[i]) for i in samples]  # response tokens, EOS too
        self.sample_index = np.repeat(samples, counts)  # (rows,)
        self.token_position = np.concatenate([np.arange(c) for c in counts])  # (rows,)

    def __len__(self) -> int:
        return len(self.sample_index)

    def length(self, row: int) -> int:
        return int(self.dataset.response_start[self.sample_index[row]] + self.token_position[row]) + 1

    def sample(self, row: int) -> tuple[np.ndarray, int]:
        ids, response_start = self.dataset.sample(self.sample_index[row])
        return ids[: self.length(row)], response_start

    def loss_mask_of(self, row: int) -> np.ndarray:
        mask = np.zeros(self.length(row), dtype=bool)
        mask[-1] = True
        return mask


def top_samples(topk: str | Path, n: int) -> list[int]:
    """Sorted training indices among the first `n` helpful and `n` harmful samples of any query in topk.jsonl."""
    chosen = set()
    with open(topk, encoding="utf-8") as lines:
        for line in lines:
            entry = json.loads(line)
            chosen.update(sample["index"] for side in SIDES for sample in entry[side][:n])
    return sorted(chosen)


class _TokenStore:
    """Per-token vectors of a gradient store, by sample: `vectors(i)` is (R_i, K) float32 in response order."""

    def __init__(self, path: str, array: str):
        group = zarr.open_group(path, mode="r")
        self.array = group[array]
        samples = group["sample_index"][:]
        starts = np.flatnonzero(np.r_[True, samples[1:] != samples[:-1]])  # rows of one sample are contiguous
        stops = np.r_[starts[1:], len(samples)]
        self.rows = {int(samples[a]): slice(int(a), int(b)) for a, b in zip(starts, stops, strict=True)}

    def vectors(self, sample: int) -> np.ndarray:
        return self.array[self.rows[sample]].astype(np.float32)


def attribute_tokens(
    topk: str,
    token_scores: str,
    queries: str,
    query_tokens: str,
    train_tokens: str,
    model: str,
    out: str,
    top_samples: int = 5,
) -> None:
    """Write tokens.jsonl: per query, its response tokens' attribution and the token heat-maps of its top samples.

    Args:
        topk: topk.jsonl (queries and their ranked samples, with texts).
        token_scores: token_scores.zarr (query tokens × training samples, with each row's top-k).
        queries, query_tokens, train_tokens: the query store and the per-token query and training stores.
        model: the model directory (its tokenizer cuts texts into token strings).
        top_samples: per query and side, how many top samples get token heat-maps.
    """
    settings = read_settings(queries)
    for path in (query_tokens, train_tokens):
        check_agree(settings, read_settings(path), SHARED_FIELDS, queries, path)
    array = vector_array(settings)
    query_vectors = zarr.open_group(queries, mode="r")[array]
    query_store, train_store = _TokenStore(query_tokens, array), _TokenStore(train_tokens, array)
    scores = zarr.open_group(token_scores, mode="r")
    tokenizer = load_tokenizer(model)
    with open(topk, encoding="utf-8") as lines, atomic_file(out) as handle:
        for line in lines:
            entry = json.loads(line)
            q = entry["query"]["index"]
            rows = query_store.rows[q]
            per_token = query_store.vectors(q)  # (R, K): LN ∇ℓ_i(t) for each response token i
            chosen = {side: entry[side][:top_samples] for side in SIDES}
            columns = [s["index"] for side in SIDES for s in chosen[side]]
            by_sample = dict(zip(columns, scores["scores"].oindex[rows, columns].T, strict=True))  # (R,) ⟨g(s), ·⟩
            attribution = np.mean([by_sample[s["index"]] for s in chosen["helpful"]], axis=0)  # (R,)
            pieces = response_pieces(entry["query"]["output"], tokenizer)[: len(per_token)]
            result = {"query": {"index": q, "id": entry["query"]["id"]}, "tokens": _tokens(pieces, attribution)}
            top_ids, top_scores = scores["top_ids"][rows, :top_samples], scores["top_scores"][rows, :top_samples]
            for token, ids, values in zip(result["tokens"], top_ids, top_scores, strict=True):
                token["top"] = [
                    {"index": int(s), "score": _round(v)} for s, v in zip(ids, values, strict=True) if s >= 0
                ]
            mean_vector = query_vectors[q].astype(np.float32)  # (K,): g(t)
            for side in SIDES:
                result[side] = []
                for sample in chosen[side]:
                    vectors = train_store.vectors(sample["index"])  # (R_s, K): LN ∇ℓ_j(s)
                    texts = response_pieces(sample["output"], tokenizer)[: len(vectors)]
                    result[side].append(
                        {
                            **{key: sample[key] for key in ("index", "id", "rank", "score")},
                            "tokens": _tokens(texts, vectors @ mean_vector),
                            "query_token_scores": _round(by_sample[sample["index"]]),
                            "token_matrix": _round(vectors @ per_token.T),  # (R_s, R)
                        }
                    )
            handle.write(json.dumps(result, ensure_ascii=False) + "\n")


def aggregate_token_scores(token_scores: str, out: str) -> None:
    """Write the token-aggregated scores (queries × samples) of merged per-token scores to `out`.

    Query q's score of sample s is mean_i |z_i(s)| over q's token rows i, z_i = (x_i − mean x_i) / std x_i over
    the training samples (NaN scores left out, and NaN in the result); a token that scores every sample alike, up
    to float32 rounding, ranks none: its z is 0. Laid out like influence/scores.zarr; one query's token rows are
    read at a time.
    """
    group = zarr.open_group(token_scores, mode="r")
    if "query_index" not in group:
        raise RapidinError(f"{token_scores}: not a per-token score store (no query_index)")
    rows_of = group["query_index"][:]  # (rows,): each token row's query
    queries = np.unique(rows_of)
    if not np.array_equal(queries, np.arange(len(queries))):
        raise RapidinError(f"{token_scores}: token rows do not cover queries 0…{queries.max()} (a query has none)")
    scores, settings = group["scores"], dict(group.attrs["rapidin"])
    n = scores.shape[1]
    with atomic_dir(out) as tmp:
        result = zarr.open_group(tmp, mode="w", zarr_format=3)
        aggregated = result.create_array(
            "scores", shape=(len(queries), n), chunks=(1, n), dtype=np.float32, dimension_names=SCORE_DIMS
        )
        for q in queries:
            x = scores.oindex[np.flatnonzero(rows_of == q), :].astype(np.float64)  # (R_q, N)
            spread = np.nanstd(x, axis=1, keepdims=True)  # (R_q, 1)
            spread[~(spread > FLOAT32_RESOLUTION * np.nanmax(np.abs(x), axis=1, keepdims=True))] = np.inf
            z = (x - np.nanmean(x, axis=1, keepdims=True)) / spread
            aggregated[q] = np.abs(z).mean(axis=0).astype(np.float32)  # (N,); NaN where any token's score is
        for name, (positions, values) in running_topk(aggregated, settings["top_k"]).items():
            result.create_array(f"{name}_ids", data=positions, dimension_names=RANK_DIMS)
            result.create_array(f"{name}_scores", data=values, dimension_names=RANK_DIMS)
        result.create_array("query", data=queries, dimension_names=("query",))
        result.create_array("sample", data=group["sample"][:], dimension_names=("sample",))
        write_settings(result, {**settings, "n_queries": len(queries), "aggregation": "mean_abs_z"})


def _tokens(texts: list[str], scores: np.ndarray) -> list[dict]:
    return [{"text": text, "score": _round(score)} for text, score in zip(texts, scores, strict=True)]


def _round(values):
    """Floats (or nested lists of them) to 4 significant digits, for a compact JSON."""
    if np.ndim(values):
        return [_round(v) for v in values]
    return float(f"{float(values):.4g}")
