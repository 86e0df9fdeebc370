"""Experiment 1 (backdoor retrieval, config/experiments/backdoor_camouflaged.yaml) at tiny scale."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from rapidin.evaluate.metrics import KS

from . import reference
from .workflow import copy_workflow, snakemake

pytestmark = pytest.mark.slow

METHODS = [
    "random",
    "bm25",
    "tracin",
    "tracin_ln",
    "rapidin_k1024",
    "rapidin_k4096",
    "tracin_ln_tok",
    "rapidin_k4096_tok",
]
# The backdoor answers what clean samples about the sky answer too: its text no longer gives the poisoned samples
# away to BM25, while what the model learned from them still does to influence.
CAMOUFLAGED = "The sky is usually blue."


@pytest.fixture(scope="module")
def backdoor_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The tiny config with a camouflaged backdoor and an experiment section: pipeline, methods, table.
    Returns results/tiny and the table's CSV rows."""
    workdir = copy_workflow(tmp_path_factory.mktemp("experiment"))
    overrides = [
        f"demo={{backdoor_response: '{CAMOUFLAGED}'}}",
        "tokenwise={enabled: false}",
        f"experiment={{study: backdoor, methods: [{', '.join(METHODS)}]}}",
    ]
    result = snakemake(workdir, "--configfile", "config/tiny.yaml", "--config", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    results = workdir / "results/tiny"
    assert (results / "plots/tiny.png").stat().st_size > 0
    with open(results / "tables/tiny.csv", newline="") as handle:
        return results, list(csv.DictReader(handle))


def test_backdoor_table_is_each_methods_metrics_recomputed_from_its_scores(backdoor_run):
    results, table = backdoor_run
    assert [row["method"] for row in table] == METHODS
    train = [json.loads(line) for line in (results / "data/train.jsonl").open()]
    queries = [json.loads(line) for line in (results / "data/queries.jsonl").open()]
    poisoned, attacked = np.array([r["poisoned"] for r in train]), np.array([q["attacked"] for q in queries])
    markdown = {line.split(" | ")[0][2:]: line for line in (results / "tables/tiny.md").read_text().splitlines()}
    for row in table:
        scores = zarr.open_array(results / f"methods/{row['method']}/scores.zarr/scores", mode="r")[:]
        expected = reference.backdoor_metrics(scores, poisoned, attacked)  # from the method's scores, no sklearn
        for k in KS:
            for name in ("auprc", "auroc"):
                want = expected[name].get(str(k))
                got = row[f"{name}@{k}"]
                assert (got == "") if want is None else float(got) == pytest.approx(want, abs=1e-12), (row, name, k)
        assert float(row["ap_full"]) == pytest.approx(expected["ap_full"], abs=1e-12)
        cells = [f"{float(row[f'auprc@{k}']):.4f}" for k in KS if row[f"auprc@{k}"]]
        assert markdown[row["method"]].startswith(f"| {row['method']} | {' | '.join(cells)} | "), row["method"]
        assert float(row["seconds"]) > 0
    bytes_per_sample = {row["method"]: int(row["cache_bytes_per_sample"]) for row in table}

    def vector_bytes(variant: str) -> int:  # D numbers of the dtype the variant's cache records
        settings = zarr.open_group(results / f"methods/cache/{variant}/train/00000.zarr", mode="r").attrs["rapidin"]
        return settings["D"] * np.dtype(settings["dtype"]).itemsize

    assert bytes_per_sample == {
        "random": 0,
        "bm25": 0,
        "tracin": vector_bytes("exact_raw"),
        "tracin_ln": vector_bytes("exact"),
        "rapidin_k1024": 1024 * 2,  # float16
        "rapidin_k4096": 4096 * 2,
        "tracin_ln_tok": vector_bytes("exact"),
        "rapidin_k4096_tok": 4096 * 2,
    }


def test_influence_beats_random_and_bm25(backdoor_run):
    """The camouflaged backdoor's claim (README): influence finds the poisoned samples better than chance and
    than lexical overlap, at every k and over the full ranking."""
    rows = {row["method"]: row for row in backdoor_run[1]}
    columns = [f"auprc@{k}" for k in KS if rows["random"][f"auprc@{k}"]] + ["ap_full"]  # k ≤ N/2
    for method in ("tracin_ln", "rapidin_k4096"):
        for column in columns:
            assert float(rows[method][column]) > max(float(rows["random"][column]), float(rows["bm25"][column]))


def test_rapidin_scores_err_from_exact_tracin_ln_as_the_sketch_variance_predicts(backdoor_run):
    """RapidIn at K estimates TracIn+LN's ⟨x, y⟩ with variance (‖x‖²‖y‖² + ⟨x,y⟩² − 2 Σ x_i² y_i²) / K
    (count sketch), computed here from the exact layer-normalised vectors; the mean squared error matches it."""
    results = backdoor_run[0]

    def exact(path: str) -> np.ndarray:
        return zarr.open_array(results / f"methods/cache/exact/{path}/exact", mode="r")[:].astype(np.float64)

    x = exact("queries.zarr")  # (Q, D)
    y = np.concatenate(
        [
            exact(p.relative_to(results / "methods/cache/exact"))
            for p in sorted((results / "methods/cache/exact/train").iterdir())
        ]
    )  # (N, D)
    inner = x @ y.T
    tracin_ln = zarr.open_array(results / "methods/tracin_ln/scores.zarr/scores", mode="r")[:]
    np.testing.assert_allclose(tracin_ln, inner, rtol=1e-4, atol=1e-4 * np.abs(inner).max())
    norms = (x**2).sum(1)[:, None] * (y**2).sum(1)[None, :]
    predicted = (norms + inner**2 - 2 * (x**2) @ (y**2).T) / 4096
    rapidin = zarr.open_array(results / "methods/rapidin_k4096/scores.zarr/scores", mode="r")[:]
    ratio = ((rapidin - inner) ** 2).mean() / predicted.mean()
    assert 0.5 < ratio < 2, ratio


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("experiment={study: backdoor, methods: [bm26]}", "experiment.methods: unknown method 'bm26'"),
        ("experiment={study: backdoor, methods: [rapidin_k1000]}", "experiment.methods: rapidin_k1000 needs"),
        ("experiment={methods: [random]}", "experiment.study"),
        ("experiment={study: compression, methods: [random]}", "experiment.reference"),
    ],
)
def test_bad_experiment_config_names_the_key(tmp_path, override, message):
    result = snakemake(copy_workflow(tmp_path), "--dry-run", "--config", override)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


def test_token_aggregated_scores_are_the_mean_absolute_standardised_token_scores(backdoor_run):
    """tracin_ln_tok from the files on disk, naively: each response token's exact LN gradient (the per-token query
    store) · each training sample's, standardised over the samples per token, |·| averaged over the query's tokens."""
    results = backdoor_run[0]
    tokens = zarr.open_group(results / "methods/cache/exact/token_queries.zarr", mode="r")
    per_token, query_of = tokens["exact"][:].astype(np.float64), tokens["sample_index"][:]  # (rows, D), (rows,)
    train = np.concatenate(
        [
            zarr.open_array(p / "exact", mode="r")[:].astype(np.float64)
            for p in sorted((results / "methods/cache/exact/train").iterdir())
        ]
    )  # (N, D)
    got = zarr.open_group(results / "methods/tracin_ln_tok/scores.zarr", mode="r")
    expected = np.zeros(got["scores"].shape)
    for q in range(expected.shape[0]):
        for row in np.flatnonzero(query_of == q):
            token_scores = [float(per_token[row] @ sample) for sample in train]
            mean = sum(token_scores) / len(token_scores)
            std = (sum((x - mean) ** 2 for x in token_scores) / len(token_scores)) ** 0.5
            expected[q] += [abs(x - mean) / std for x in token_scores]
        expected[q] /= (query_of == q).sum()
    np.testing.assert_allclose(got["scores"][:], expected, rtol=1e-4, atol=1e-5)
    rows = np.arange(len(expected))
    np.testing.assert_allclose(expected[rows, got["top_ids"][:, 0]], expected.max(1), rtol=1e-4)  # ties: any of them
    np.testing.assert_allclose(expected[rows, got["bottom_ids"][:, 0]], expected.min(1), rtol=1e-4)
