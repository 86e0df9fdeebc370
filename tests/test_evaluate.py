"""The backdoor metrics against hand-worked examples: auPRC and auROC over top-k ∪ bottom-k (with ties, one class
only, k > N/2), the full-ranking AP, the average over attacked queries, NaN samples left out, metrics.json."""

import json

import numpy as np
import pytest
import zarr

from rapidin.evaluate.metrics import backdoor_metrics, evaluate, top_bottom_metrics

from . import reference


def test_top_bottom_metrics_by_hand():
    # ranking 0 (.9), 1 (.8), 3 (.5), 2 (.1), 4 (-.2), 5 (-.7); top-2 ∪ bottom-2 = {0, 1, 4, 5}, labels 1 0 1 0:
    # AP = (1/1 + 2/3) / 2; auROC = 3 of the 4 (poisoned, clean) pairs ordered right (-.2 < .8)
    scores = np.array([0.9, 0.8, 0.1, 0.5, -0.2, -0.7])
    labels = np.array([1, 0, 0, 1, 1, 0], dtype=bool)
    assert top_bottom_metrics(scores, labels, 2) == pytest.approx((5 / 6, 3 / 4))
    # k = 3: {0, 1, 3} ∪ {2, 4, 5} is everything: ranked labels 1 0 1 0 1 0, AP = (1 + 2/3 + 3/5) / 3,
    # auROC = (pairs right: .9 > .8, .1, -.7; .5 > .1, -.7; -.2 > -.7) 6 of 9
    assert top_bottom_metrics(scores, labels, 3) == pytest.approx(((1 + 2 / 3 + 3 / 5) / 3, 6 / 9))


def test_equal_scores_take_the_first_samples_on_top_and_the_last_at_the_bottom():
    scores = np.zeros(6)
    # top-2 = {0, 1}, bottom-2 = {4, 5}: only clean ones chosen, whatever lies in between
    assert top_bottom_metrics(scores, np.array([0, 0, 1, 1, 0, 0], dtype=bool), 2) == (0.0, 0.5)
    # chosen labels 1 1 0 0, all tied: one threshold, precision 2/4 at recall 1; every pair tied: auROC 1/2
    assert top_bottom_metrics(scores, np.array([1, 1, 0, 0, 0, 0], dtype=bool), 2) == pytest.approx((0.5, 0.5))


def test_ties_in_the_chosen_scores():
    # chosen {0, 1} ∪ {2, 3}: scores 1 1 0 0, labels 1 0 1 0. Thresholds 1 (P 1/2, R 1/2) and 0 (P 1/2, R 1):
    # AP = 1/2·1/2 + 1/2·1/2; auROC: (1 vs 1) 1/2 + (1 vs 0) 1 + (0 vs 1) 0 + (0 vs 0) 1/2, over 4 pairs
    assert top_bottom_metrics(np.array([1.0, 1.0, 0.0, 0.0]), np.array([1, 0, 1, 0], dtype=bool), 2) == pytest.approx(
        (0.5, 0.5)
    )


@pytest.mark.parametrize(("labels", "expected"), [([1, 1, 0, 0, 1, 1], (1.0, 0.5)), ([0, 0, 1, 1, 0, 0], (0.0, 0.5))])
def test_one_class_among_the_chosen(labels, expected):
    """All chosen samples poisoned (or none): auPRC is that precision, auROC the uninformative 1/2."""
    scores = np.array([6.0, 5, 4, 3, 2, 1])
    assert top_bottom_metrics(scores, np.array(labels, dtype=bool), 2) == expected


def test_backdoor_metrics_by_hand():
    """Two attacked queries and one clean one (ignored); N = 12, so only k = 5 ≤ N/2 is reported."""
    labels = np.zeros(12, dtype=bool)
    labels[[0, 1, 2]] = True
    first = np.arange(12, 0, -1, dtype=float)  # ranks the poisoned 0, 1, 2 first: AP 1, auROC 1
    second = np.arange(12, dtype=float)  # ranks them last: bottom-5 {0, …, 4}, top-5 {7, …, 11}
    clean = np.full(12, np.pi)
    metrics = backdoor_metrics(np.stack([first, clean, second]), labels, np.array([True, False, True]))
    # second query, k = 5: ranked chosen labels 0 0 0 0 0 0 0 1 1 1 → AP = (1/8 + 2/9 + 3/10) / 3; auROC 0
    # (every poisoned below every clean); full AP over 12: ranks 10, 11, 12 → (1/10 + 2/11 + 3/12) / 3
    second_ap5 = (1 / 8 + 2 / 9 + 3 / 10) / 3
    assert metrics["auprc"] == pytest.approx({"5": (1 + second_ap5) / 2})
    assert metrics["auroc"] == pytest.approx({"5": 0.5})
    assert metrics["ap_full"] == pytest.approx((1 + (1 / 10 + 2 / 11 + 3 / 12) / 3) / 2)
    assert (metrics["n_attacked_queries"], metrics["n_poisoned"], metrics["n_samples"]) == (2, 3, 12)
    assert metrics["n_excluded"] == 0


def test_k_up_to_half_the_samples():
    scores, labels = np.arange(20.0)[None], np.arange(20) < 3
    assert set(backdoor_metrics(scores, labels, np.array([True]))["auprc"]) == {"5", "10"}
    assert set(backdoor_metrics(scores[:, :19], labels[:19], np.array([True]))["auprc"]) == {"5"}


def test_nan_samples_are_left_out():
    """A NaN score (a sample skipped for a non-finite gradient) takes the sample out of every metric."""
    labels = np.zeros(12, dtype=bool)
    labels[[0, 1, 2]] = True
    scores = np.arange(12, 0, -1, dtype=float)[None].repeat(2, 0)
    scores[0, [1, 5]] = np.nan  # for one attacked query only: left out for all of them
    scores[1, :] = np.nan  # a clean query: not looked at
    metrics = backdoor_metrics(scores, labels, np.array([True, False]))
    assert (metrics["n_excluded"], metrics["n_samples"], metrics["n_poisoned"]) == (2, 10, 2)
    # left: poisoned 0, 2 ranked first among 10 → perfect; k ≤ 10/2
    assert metrics["auprc"] == {"5": 1.0} and metrics["auroc"] == {"5": 1.0} and metrics["ap_full"] == 1.0


def test_evaluate_writes_metrics_json(tmp_path):
    # only poisoned samples and attacked queries carry the flag; a query may lack its response
    train = [{"instruction": f"i{n}", "output": "o"} | ({"poisoned": True} if n in (3, 4) else {}) for n in range(10)]
    queries = [{"instruction": "q", "output": "o", "attacked": True}, {"instruction": "q"}]
    for name, records in (("train", train), ("queries", queries)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    scores = np.array([[0.0, 1, 2, 9, 3, 4, 5, 6, 7, np.nan], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=np.float32)
    zarr.open_group(tmp_path / "scores.zarr", mode="w").create_array("scores", data=scores)
    out = tmp_path / "metrics.json"
    evaluate(str(tmp_path / "scores.zarr"), str(tmp_path / "train.jsonl"), str(tmp_path / "queries.jsonl"), str(out))
    metrics = json.loads(out.read_text())
    # sample 9 left out; ranking of the 9 others: 3 (poisoned), 8, 7, 6, 5, 4 (poisoned), 2, 1, 0
    # full AP = (1/1 + 2/6) / 2; no k of KS is ≤ 9 // 2
    assert metrics["ap_full"] == pytest.approx((1 + 2 / 6) / 2)
    assert metrics["auprc"] == {} and metrics["attack_success_rate"] is None
    assert (metrics["n_excluded"], metrics["n_samples"], metrics["n_poisoned"]) == (1, 9, 2)


def test_evaluate_without_attacked_queries_skips_the_backdoor_metrics(tmp_path, caplog):
    (tmp_path / "train.jsonl").write_text('{"instruction": "i", "output": "o", "poisoned": true}\n')
    (tmp_path / "queries.jsonl").write_text('{"instruction": "q", "output": "o"}\n')
    zarr.open_group(tmp_path / "scores.zarr", mode="w").create_array("scores", data=np.ones((1, 1), np.float32))
    out = tmp_path / "metrics.json"
    metrics = evaluate(
        str(tmp_path / "scores.zarr"), str(tmp_path / "train.jsonl"), str(tmp_path / "queries.jsonl"), str(out), 0.5
    )
    assert metrics == json.loads(out.read_text()) == {"attack_success_rate": 0.5}
    assert f"{tmp_path / 'queries.jsonl'} has no attacked queries: backdoor metrics skipped" in caplog.text


def test_evaluate_error_tracing_precision(tmp_path, caplog):
    """Swapped samples (error tracing): precision@k among each query's top-k, whole-response and target-span
    queries averaged apart; no poisoned samples, so no backdoor metrics."""
    train = [{"instruction": f"i{n}", "output": "o"} | ({"swapped": True} if n < 3 else {}) for n in range(12)]
    queries = [
        {"instruction": "q", "output": "in Canada"},
        {"instruction": "q", "output": "in Canada", "targets": ["Canada"]},
        {"instruction": "q"},
    ]
    for name, records in (("train", train), ("queries", queries)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    scores = np.zeros((3, 12), dtype=np.float32)
    scores[0, [0, 1, 6]] = [9, 8, 1]  # ranks 1, 2, 7 (then ties by index: 2, 3, 4, 5, 7, …)
    scores[1, [0, 1, 2]] = [3, 2, 1]  # ranks 1, 2, 3
    scores[2] = -np.arange(12)  # 0, 1, 2 first
    scores[2, [0, 1, 2]] = -20  # … now last
    zarr.open_group(tmp_path / "scores.zarr", mode="w").create_array("scores", data=scores)
    out = tmp_path / "metrics.json"
    evaluate(str(tmp_path / "scores.zarr"), str(tmp_path / "train.jsonl"), str(tmp_path / "queries.jsonl"), str(out))
    # whole: query 0 has 0, 1, 2 in its top 5 (2 is first among the tied zeros), query 2 none: (3/5 + 0) / 2
    assert json.loads(out.read_text()) == {
        "attack_success_rate": None,
        "precision": {"whole": {"5": 0.3, "50": 0.25}, "target": {"5": 0.6, "50": 0.25}},
        "n_swapped": 3,
        "n_samples": 12,
    }
    assert f"{tmp_path / 'train.jsonl'} has no poisoned samples: backdoor metrics skipped" in caplog.text


def test_metrics_equal_the_plain_reference_on_random_scores_with_ties_and_nan():
    """Against tests/reference.py (the definitions, without scikit-learn): 5 queries (3 attacked) over 230 samples,
    scores rounded to few values (many ties), two NaN samples."""
    generator = np.random.default_rng(0)
    labels = generator.random(230) < 0.2
    scores = np.round(generator.standard_normal((5, 230)) + labels, 1)
    scores[:, [7, 100]] = np.nan
    attacked = np.array([True, False, True, True, False])
    got = backdoor_metrics(scores, labels, attacked)
    want = reference.backdoor_metrics(scores, labels, attacked)
    assert set(got["auprc"]) == {"5", "10", "50", "100"}  # 228 scored samples: k ≤ 114
    for name in ("auprc", "auroc", "ap_full"):
        assert got[name] == pytest.approx(want[name], abs=1e-12), name
