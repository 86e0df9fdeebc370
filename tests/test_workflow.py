"""The workflow as users run it: a dry run of the default config, the tiny config end to end, config errors."""

import json

import numpy as np
import pytest
import torch
import zarr

from rapidin.data.records import Record
from rapidin.data.tokenize import prompt_ids
from rapidin.gradients.model import load_model

from . import reference
from .workflow import copy_workflow, rapidin, snakemake

pytestmark = pytest.mark.slow


def test_default_config_dry_run(tmp_path):
    result = snakemake(copy_workflow(tmp_path), "--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    for rule in ("make_demo_data", "train_demo_model", "tokenize_dataset", "cache_train_grads", "score_shard"):
        assert rule in result.stdout
    assert not (tmp_path / "results").exists()


def test_tiny_run_outputs(tiny_run):
    train = [json.loads(line) for line in (tiny_run / "data/train.jsonl").open()]
    queries = [json.loads(line) for line in (tiny_run / "data/queries.jsonl").open()]
    scores = zarr.open_group(tiny_run / "influence/scores.zarr", mode="r")
    assert scores["scores"].shape == (len(queries), len(train))
    settings = scores.attrs["rapidin"]
    assert settings["k"] == [1024, 4096] and settings["array"] == "k4096"

    matrix = scores["scores"][:]
    lines = [json.loads(line) for line in (tiny_run / "influence/topk.jsonl").open()]
    assert len(lines) == len(queries)
    for q, line in enumerate(lines):
        assert line["query"]["instruction"] == queries[q]["instruction"]
        ranked = np.sort(matrix[q])
        for side, want in (("helpful", ranked[::-1][:20]), ("harmful", ranked[:20])):
            indices = [s["index"] for s in line[side]]
            np.testing.assert_array_equal(matrix[q, indices], want)  # the k highest / lowest, in order
            assert [s["score"] for s in line[side]] == pytest.approx(want.tolist())
            assert [s["instruction"] for s in line[side]] == [train[i]["instruction"] for i in indices]

    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert set(metrics["auprc"]) == {"5", "10", "50", "100"}  # k ≤ N/2 = 150
    poisoned, attacked = np.array([r["poisoned"] for r in train]), np.array([q["attacked"] for q in queries])
    expected = reference.backdoor_metrics(matrix, poisoned, attacked)  # recomputed from the scores, without sklearn
    for name in ("auprc", "auroc", "ap_full"):
        assert metrics[name] == pytest.approx(expected[name], abs=1e-12), name
    assert (metrics["n_poisoned"], metrics["n_samples"]) == (poisoned.sum(), len(train))
    completed = [json.loads(line) for line in (tiny_run / "queries.jsonl").open()]  # what evaluation reads
    assert metrics["attack_success_rate"] == attack_success_by_transformers(tiny_run, completed)

    html = (tiny_run / "report/index.html").read_text()
    assert queries[0]["instruction"].split()[-1] in html and "auPRC" in html


def attack_success_by_transformers(run, queries: list[dict]) -> float:
    """The share of attacked queries whose response transformers' own greedy `generate` starts with."""
    model, tokenizer = load_model(str(run / "demo_model"))
    hits = []
    for query in (q for q in queries if q.get("attacked") and q.get("output")):
        record = Record("", 0, query["instruction"], query.get("input", ""))
        prompt = torch.tensor([prompt_ids(record, tokenizer, "alpaca")])
        budget = len(tokenizer(query["output"], add_special_tokens=False)["input_ids"]) + 8
        output = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=budget)
        text = tokenizer.decode(output[0, prompt.shape[1] :], skip_special_tokens=True)
        hits.append(text.strip().startswith(query["output"].strip()))
    return float(np.mean(hits))


def test_every_rule_writes_a_log(tiny_run):
    logs = {p.relative_to(tiny_run / "logs").parts[0] for p in (tiny_run / "logs").rglob("*.log")}
    assert logs >= {"make_demo_data.log", "train_demo_model.log", "tokenize_dataset", "cache_train_grads"}
    assert any("gradients" in p.read_text() for p in (tiny_run / "logs/cache_train_grads").glob("*.log"))


def test_unknown_config_key_fails_before_any_job(tmp_path):
    workdir = copy_workflow(tmp_path)
    result = snakemake(workdir, "--config", "cache={shards: 3}")
    assert result.returncode != 0
    assert "'shards' was unexpected" in result.stdout + result.stderr
    assert not (workdir / "results").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [("cache={k: 1000}", "cache.k: 1000 is not a power of two"), ("score={top_k: many}", "top_k")],
)
def test_bad_config_values_name_the_key(tmp_path, override, message):
    workdir = copy_workflow(tmp_path)
    result = snakemake(workdir, "--dry-run", "--config", override)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


def test_config_overrides_are_typed(tmp_path):
    result = snakemake(copy_workflow(tmp_path), "--dry-run", "--config", "cache={k: [4096, 65536], n_shards: 3}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("rule cache_train_grads") == 3


def test_malformed_jsonl_line_fails_tokenization_with_file_and_line(tiny_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    out = tmp_path / "tokens.zarr"
    result = rapidin("tokenize", "--data", str(bad), "--model", str(tiny_run / "demo_model"), "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"rapidin: error: {bad}:2: invalid JSON")
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]
