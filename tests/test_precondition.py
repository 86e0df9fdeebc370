"""The compressed-space preconditioner against (C + λI)⁻¹ computed naively in fp64 from the cached vectors."""

import dataclasses

import numpy as np
import pytest
import zarr

from rapidin.cache.shard import CacheSettings, cache_gradients
from rapidin.errors import RapidinError, StoreMismatchError
from rapidin.score import precondition
from rapidin.score.precondition import precondition_queries
from rapidin.score.scores import score_shard

ARRAY = "k256"


@pytest.fixture(scope="module")
def stores(model_and_tokens, tmp_path_factory):
    """RapidGrad (K = 64, 256) vectors of the queries and of two 20-row training shards in 4-row chunks."""
    root = tmp_path_factory.mktemp("precondition")
    tokens, model = model_and_tokens / "tokens", model_and_tokens / "model"
    settings = CacheSettings("rapidgrad", (64, 256), dtype="float32")
    cache_gradients(str(tokens / "queries.zarr"), str(model), str(root / "queries.zarr"), settings, device="cpu")
    chunked = dataclasses.replace(settings, chunk_rows=4)
    for shard in (0, 1):
        cache_gradients(str(tokens / "train.zarr"), str(model), str(root / f"train-{shard}.zarr"), chunked,
                        shard=shard, n_shards=15, device="cpu")  # fmt: skip
    return root


def vectors(path) -> np.ndarray:
    return zarr.open_group(path, mode="r")[ARRAY][:].astype(np.float64)


def naive_preconditioned_scores(queries: np.ndarray, fit: np.ndarray, train: np.ndarray, damping: float) -> np.ndarray:
    """⟨(C + λI)⁻¹ q, v⟩ for C = fitᵀfit / len(fit), λ = damping · tr(C) / K."""
    covariance = fit.T @ fit / len(fit)
    lam = damping * np.trace(covariance) / covariance.shape[0]
    return np.linalg.solve(covariance + lam * np.eye(len(covariance)), queries.T).T @ train.T


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to the fp32 of the stored vectors and of scoring."""
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def scored(stores, preconditioned) -> np.ndarray:
    out = stores / "scores.zarr"
    score_shard(str(preconditioned), str(stores / "train-0.zarr"), str(out), top_k=3, array=ARRAY, device="cpu")
    return zarr.open_group(out, mode="r")["scores"][:]


def test_preconditioned_scores_equal_their_definition(stores):
    caches = [str(stores / f"train-{shard}.zarr") for shard in (0, 1)]
    entry = precondition_queries(str(stores / "queries.zarr"), caches, str(stores / "pre.zarr"), array=ARRAY)
    train = np.concatenate([vectors(c) for c in caches])  # (40, 256): fewer rows than K, so λ matters
    expected = naive_preconditioned_scores(vectors(stores / "queries.zarr"), train, train[:20], 0.1)
    assert_close(scored(stores, stores / "pre.zarr"), expected)
    assert entry["rows"] == 40 and entry["damping"] == 0.1
    assert zarr.open_group(stores / "pre.zarr", mode="r").attrs["rapidin"]["precondition"] == entry
    plain = vectors(stores / "queries.zarr") @ train[:20].T
    assert np.corrcoef(plain.ravel(), expected.ravel())[0, 1] < 0.99  # preconditioning changes the scores


def test_max_rows_takes_whole_chunks_spread_over_the_caches(stores):
    caches = [str(stores / f"train-{shard}.zarr") for shard in (0, 1)]
    entry = precondition_queries(
        str(stores / "queries.zarr"), caches, str(stores / "pre-8.zarr"), array=ARRAY, damping=0.5, max_rows=8
    )
    # 2 × 5 chunks of 4 rows; 8 rows = 2 chunks, evenly spread: the first chunk of the first cache, the last of
    # the second
    fit = np.concatenate([vectors(caches[0])[:4], vectors(caches[1])[16:]])
    expected = naive_preconditioned_scores(vectors(stores / "queries.zarr"), fit, vectors(caches[0]), 0.5)
    assert_close(scored(stores, stores / "pre-8.zarr"), expected)
    assert entry["rows"] == 8


def test_bad_preconditioner_inputs_are_refused(stores, model_and_tokens, monkeypatch):
    queries, cache, out = str(stores / "queries.zarr"), [str(stores / "train-0.zarr")], str(stores / "bad.zarr")
    with pytest.raises(RapidinError, match=r"precondition\.damping: 0 is not a positive number"):
        precondition_queries(queries, cache, out, array=ARRAY, damping=0)
    with pytest.raises(RapidinError, match=r"precondition\.array: .* has no array 'k99'"):
        precondition_queries(queries, cache, out, array="k99")
    monkeypatch.setattr(precondition, "MAX_DIM", 128)
    with pytest.raises(RapidinError, match=r"precondition\.array: k256 has 256 numbers per vector, more than 128"):
        precondition_queries(queries, cache, out, array=ARRAY)
    other = stores / "other-seed.zarr"
    cache_gradients(str(model_and_tokens / "tokens/queries.zarr"), str(model_and_tokens / "model"), str(other),
                    CacheSettings("rapidgrad", (64, 256), seed=1, dtype="float32"), device="cpu")  # fmt: skip
    with pytest.raises(StoreMismatchError, match="seed"):
        precondition_queries(str(other), cache, out, array="k64")
