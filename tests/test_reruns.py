"""File-driven reruns: after a finished tiny run, each change reruns what depends on it and nothing else."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from .workflow import copy_run, snakemake

pytestmark = pytest.mark.slow

UPSTREAM = {"make_demo_data", "train_demo_model", "complete_queries", "tokenize_dataset"}


@pytest.fixture(scope="module")
def finished(tiny_run, tmp_path_factory) -> Path:
    """A copy of the finished tiny run, for dry runs only."""
    return copy_run(tiny_run.parents[1], tmp_path_factory.mktemp("reruns") / "run")


def planned(workdir: Path, *args: str) -> dict[str, int]:
    """Jobs per rule that `snakemake --dry-run` plans (rule `all` left out)."""
    result = snakemake(workdir, "--dry-run", "--configfile", "config/tiny.yaml", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    table = result.stdout.split("Job stats:")[1].split("total")[0] if "Job stats:" in result.stdout else ""
    return {rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)$", table, re.M) if rule != "all"}


def test_a_finished_run_has_nothing_to_do(finished):
    assert planned(finished) == {}


def test_changing_k_reruns_caching_and_what_follows_but_not_tokenization_or_the_demo_model(finished):
    jobs = planned(finished, "--config", "cache={k: [1024, 2048]}")
    assert jobs.keys() >= {"cache_train_grads", "cache_query_grads", "score_shard", "merge_scores", "write_report"}
    assert jobs["cache_train_grads"] == 2 and jobs.keys().isdisjoint(UPSTREAM)


def test_adding_a_query_reruns_the_query_side_and_scoring_but_not_training_caching(finished, tmp_path):
    workdir = copy_run(finished, tmp_path / "run")
    query = {"id": "added", "instruction": "Name a colour.", "output": "Blue.", "attacked": False}
    with (workdir / "results/tiny/data/queries.jsonl").open("a") as queries:
        queries.write(json.dumps(query) + "\n")
    jobs = planned(workdir)
    assert jobs["tokenize_dataset"] == 1 and jobs["cache_query_grads"] == 1  # the queries only
    assert jobs.keys() >= {"complete_queries", "score_shard", "merge_scores", "write_report"}
    assert jobs.keys().isdisjoint({"make_demo_data", "train_demo_model", "cache_train_grads"})


def test_changing_report_settings_reruns_only_the_report(finished):
    assert planned(finished, "--config", "report={top_n: 3}") == {"write_report": 1}
