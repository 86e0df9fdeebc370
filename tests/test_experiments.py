"""Experiment 1 (backdoor retrieval, config/experiments/backdoor.yaml) at tiny scale, on top of the tiny run."""

import csv

import pytest

from rapidin.evaluate import KS

from .workflow import copy_run, copy_workflow, snakemake

pytestmark = pytest.mark.slow

METHODS = ["random", "bm25", "tracin", "tracin_ln", "rapidin_k1024", "rapidin_k4096"]


@pytest.fixture(scope="module")
def backdoor_table(tiny_run, tmp_path_factory) -> list[dict]:
    """The tiny run's workflow with an experiment section added: only the methods' jobs and the table run."""
    workdir = copy_run(tiny_run.parents[1], tmp_path_factory.mktemp("experiment") / "run")
    experiment = f"experiment={{study: backdoor, methods: [{', '.join(METHODS)}]}}"
    result = snakemake(workdir, "--configfile", "config/tiny.yaml", "--config", experiment)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rule train_demo_model" not in result.stdout  # the pipeline's outputs are reused
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


def test_influence_beats_random_and_rapidin_matches_exact_tracin_ln(backdoor_table):
    rows = {row["method"]: row for row in backdoor_table}
    ks = [k for k in KS if rows["random"][f"auprc@{k}"]]  # k ≤ N/2
    for method in ("tracin_ln", "rapidin_k4096"):
        for k in ks:
            assert float(rows[method][f"auprc@{k}"]) > float(rows["random"][f"auprc@{k}"]) + 0.5
            # BM25 is perfect here (the backdoor response is one fixed text): the influence methods match it on
            # the top of the ranking, where the poisoned samples are
            if k <= 10:
                assert float(rows[method][f"auprc@{k}"]) >= float(rows["bm25"][f"auprc@{k}"]) - 1e-6
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
