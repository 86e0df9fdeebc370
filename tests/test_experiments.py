"""Experiment 1 (backdoor retrieval, config/experiments/backdoor_camouflaged.yaml) at tiny scale."""

import csv

import pytest

from rapidin.evaluate import KS

from .workflow import copy_workflow, snakemake

pytestmark = pytest.mark.slow

METHODS = ["random", "bm25", "tracin", "tracin_ln", "rapidin_k1024", "rapidin_k4096"]
# The backdoor answers what clean samples about the sky answer too: its text no longer gives the poisoned samples
# away to BM25, while what the model learned from them still does to influence.
CAMOUFLAGED = "The sky is usually blue."


@pytest.fixture(scope="module")
def backdoor_table(tmp_path_factory) -> list[dict]:
    """The tiny config with a camouflaged backdoor and an experiment section: pipeline, methods, table."""
    workdir = copy_workflow(tmp_path_factory.mktemp("experiment"))
    overrides = [
        f"demo={{backdoor_response: '{CAMOUFLAGED}'}}",
        "tokenwise={enabled: false}",
        f"experiment={{study: backdoor, methods: [{', '.join(METHODS)}]}}",
    ]
    result = snakemake(workdir, "--configfile", "config/tiny.yaml", "--config", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (workdir / "results/tiny/tables/tiny.md").read_text().count("\n| ") == len(METHODS) + 2  # header, rule, rows
    assert (workdir / "results/tiny/plots/tiny.png").stat().st_size > 0
    with open(workdir / "results/tiny/tables/tiny.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_backdoor_table_columns_and_rows(backdoor_table):
    columns = ["method", *[f"auprc@{k}" for k in KS], *[f"auroc@{k}" for k in KS], "ap_full"]
    assert list(backdoor_table[0]) == [*columns, "cache_bytes_per_sample", "seconds"]
    assert [row["method"] for row in backdoor_table] == METHODS
    bytes_per_sample = {row["method"]: int(row["cache_bytes_per_sample"]) for row in backdoor_table}
    assert bytes_per_sample["rapidin_k4096"] == 4096 * 2 and bytes_per_sample["random"] == 0
    assert all(float(row["seconds"]) > 0 for row in backdoor_table)


def test_influence_beats_random_and_bm25_and_rapidin_matches_exact_tracin_ln(backdoor_table):
    rows = {row["method"]: row for row in backdoor_table}
    columns = [f"auprc@{k}" for k in KS if rows["random"][f"auprc@{k}"]] + ["ap_full"]  # k ≤ N/2
    for method in ("tracin_ln", "rapidin_k4096"):
        for column in columns:
            assert float(rows[method][column]) > float(rows["random"][column]) + 0.5
            assert float(rows[method][column]) > float(rows["bm25"][column]) + 0.05
    assert abs(float(rows["rapidin_k4096"]["auprc@100"]) - float(rows["tracin_ln"]["auprc@100"])) <= 0.02


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("experiment={study: backdoor, methods: [bm26]}", "experiment.methods.0"),
        ("experiment={study: backdoor, methods: [rapidin_k1000]}", "experiment.methods: rapidin_k1000 needs"),
        ("experiment={methods: [random]}", "experiment.study"),
        ("experiment={study: compression, methods: [random]}", "experiment.reference"),
    ],
)
def test_bad_experiment_config_names_the_key(tmp_path, override, message):
    result = snakemake(copy_workflow(tmp_path), "--dry-run", "--config", override)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
