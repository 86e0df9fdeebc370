"""model.checkpoints in the workflow: one cache per checkpoint, their lr-weighted sum (token-aggregated: mean) where
the scores always are."""

import json
import re
import shutil

import numpy as np
import yaml
import zarr

from rapidin.config import checkpoint_name

from .workflow import ROOT, copy_run, snakemake

DEMO = "results/tiny/demo_model"


def with_checkpoints(workdir, epochs) -> str:
    """A config file on top of config/tiny.yaml naming the tiny demo's checkpoints after `epochs`."""
    entries = [{"path": f"{DEMO}/checkpoint-{e}"} for e in epochs]
    (workdir / "checkpoints.yaml").write_text(yaml.safe_dump({"model": {"checkpoints": entries}}))
    return "checkpoints.yaml"


def rows(path) -> np.ndarray:
    return zarr.open_group(path, mode="r")["k4096"][:].astype(np.float64)


def test_checkpoint_scores_are_the_lr_weighted_sum_of_each_checkpoints_inner_products(tiny_run, tmp_path):
    workdir = copy_run(tiny_run.parents[1], tmp_path / "run")
    shutil.copytree(ROOT / "workflow/rules", workdir / "workflow/rules", dirs_exist_ok=True)  # this checkout's
    shutil.copy(ROOT / "workflow/Snakefile", workdir / "workflow/Snakefile")
    results = workdir / "results/tiny"
    names = [checkpoint_name(f"{DEMO}/checkpoint-{e}") for e in (1, 2)]
    # the first checkpoint's scores (not the whole run: that would only repeat the one below)
    targets = [f"results/tiny/checkpoints/{names[0]}/influence/{t}scores.zarr/zarr.json" for t in ("", "token_")]
    first = snakemake(workdir, *targets, "--configfile", "config/tiny.yaml", with_checkpoints(workdir, [1]))
    assert first.returncode == 0, first.stderr[-3000:]

    # adding a checkpoint computes only its caches and scores (and what reads the combined scores)
    added = snakemake(workdir, "--configfile", "config/tiny.yaml", with_checkpoints(workdir, [1, 2]))
    assert added.returncode == 0, added.stderr[-3000:]
    cached = set(re.findall(r"--out results/tiny/checkpoints/([^/]+)/cache/", added.stderr))
    assert cached == {names[1]}, cached
    assert "rule train_demo_model" not in added.stderr and "rule cache_train_grads:" not in added.stderr

    # Σ_c lr_c ⟨g_c(s), g_c(t)⟩ from each checkpoint's own caches, with lr_c its epoch's logged mean learning rate
    lrs = [
        json.loads((results / f"demo_model/checkpoint-{e}/trainer_state.json").read_text())["log_history"][-1][
            "learning_rate"
        ]
        for e in (1, 2)
    ]
    assert lrs[0] != lrs[1]
    summed, at_checkpoints = {}, {}
    for token in ("", "token_"):
        per_checkpoint = []
        for name in names:
            cache = results / "checkpoints" / name / "cache"
            train = np.concatenate([rows(cache / f"train/{shard}.zarr") for shard in ("00000", "00001")])
            per_checkpoint.append(rows(cache / f"{token}queries.zarr") @ train.T)  # (rows, 300)
        expected = summed[token] = lrs[0] * per_checkpoint[0] + lrs[1] * per_checkpoint[1]
        at_checkpoints[token] = per_checkpoint
        combined = zarr.open_group(results / f"influence/{token}scores.zarr", mode="r")
        np.testing.assert_allclose(combined["scores"][:], expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
        assert np.abs(per_checkpoint[0] - per_checkpoint[1]).max() > 0.05 * np.abs(expected).max()
        best = np.take_along_axis(expected, combined["top_ids"][:, :1].astype(np.int64), axis=1)[:, 0]
        np.testing.assert_allclose(best, expected.max(axis=1), rtol=1e-4)  # top-k of the sum
        weights = [c["weight"] for c in combined.attrs["rapidin"]["checkpoints"]]
        assert weights == lrs
    # what reads the scores reads the combined ones
    topk = [json.loads(line) for line in (results / "influence/topk.jsonl").read_text().splitlines()]
    scores = zarr.open_array(results / "influence/scores.zarr/scores", mode="r")[:]
    assert [q["helpful"][0]["score"] for q in topk] == list(np.round(scores.max(axis=1), 6)) or all(
        abs(q["helpful"][0]["score"] - best) < 1e-5 for q, best in zip(topk, scores.max(axis=1), strict=True)
    )
    for rule in ("write_topk", "evaluate_backdoor", "attribute_tokens", "write_report"):
        assert f"rule {rule}:" in added.stderr, rule

    # score.aggregate tokens: at each checkpoint, per query the mean over its tokens of |z| (their scores standardised
    # over the samples), then the checkpoints' mean, from the same caches
    aggregated = snakemake(
        workdir, "--configfile", "config/tiny.yaml", "checkpoints.yaml", "--config", "score={aggregate: tokens}"
    )
    assert aggregated.returncode == 0, aggregated.stderr[-3000:]
    assert "rule cache_checkpoint" not in aggregated.stderr and "rule aggregate_token_scores:" in aggregated.stderr
    owner = zarr.open_array(results / f"checkpoints/{names[0]}/cache/token_queries.zarr/sample_index", mode="r")[:]
    assert np.bincount(owner).min() > 1

    def mean_abs_z(scores):  # (query tokens, 300) → (queries, 300)
        z = (scores - scores.mean(axis=1, keepdims=True)) / scores.std(axis=1, keepdims=True)
        return np.array([np.abs(z[owner == q]).mean(axis=0) for q in range(len(summed[""]))])

    expected = sum(mean_abs_z(scores) for scores in at_checkpoints["token_"]) / 2
    assert np.abs(mean_abs_z(summed["token_"]) - expected).max() > 0.05  # not the aggregated lr-weighted sum
    scores = zarr.open_array(results / "influence/scores.zarr/scores", mode="r")[:]
    np.testing.assert_allclose(scores, expected, rtol=1e-4)
    topk = [json.loads(line) for line in (results / "influence/topk.jsonl").read_text().splitlines()]
    assert [q["helpful"][0]["index"] for q in topk] == expected.argmax(axis=1).tolist()
    assert [q["harmful"][0]["index"] for q in topk] == expected.argmin(axis=1).tolist()
    sources = zarr.open_group(results / "influence/scores.zarr", mode="r").attrs["rapidin"]["checkpoints"]
    assert [c["weight"] for c in sources] == [0.5, 0.5]
    report = (results / "report/index.html").read_text()
    assert "Most influential" in report and "Most helpful" not in report
