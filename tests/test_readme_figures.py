"""scripts/readme_figures.py: README's figure blocks rewritten from a small fake run, numbers worked by hand."""

import importlib.util
import json

import pytest

from .workflow import ROOT

spec = importlib.util.spec_from_file_location("readme_figures", ROOT / "scripts" / "readme_figures.py")
readme_figures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme_figures)

README = """# title
Before. <!-- figures:demo -->stale 0.5<!-- /figures:demo --> After.
Tokens: <!-- figures:demo-tokens -->stale 1 %<!-- /figures:demo-tokens -->.
"""


def fake_run(folder):
    metrics = {
        "auprc": {"5": 1.0, "100": 0.9994},
        "auroc": {"5": 1.0, "100": 0.97},
        "ap_full": 0.93125,
        "n_attacked_queries": 4,
        "n_poisoned": 2,
        "n_samples": 10,
        "attack_success_rate": 0.75,
    }
    (folder / "influence").mkdir(parents=True)
    (folder / "data").mkdir()
    (folder / "metrics.json").write_text(json.dumps(metrics))
    train = [{"instruction": f"i{i}", "output": "o", "poisoned": i in (2, 5)} for i in range(10)]
    queries = [{"instruction": "q", "output": "r", "attacked": q < 2} for q in range(3)]

    def token(top):
        return {"text": "x", "score": 0.1, "top": [{"index": top, "score": 1.0}]}

    tokens = [  # attacked: 3 of 4 tokens topped by a poisoned sample; clean: 1 of 4
        {"query": {"index": 0, "id": 0}, "tokens": [token(2), token(5), token(1)]},
        {"query": {"index": 1, "id": 1}, "tokens": [token(2)]},
        {"query": {"index": 2, "id": 2}, "tokens": [token(5), token(0), token(3), token(4)]},
    ]
    for name, lines in (("data/train.jsonl", train), ("queries.jsonl", queries), ("influence/tokens.jsonl", tokens)):
        (folder / name).write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_figures_come_from_the_run_and_nothing_else_changes(tmp_path):
    fake_run(tmp_path / "run")
    readme = tmp_path / "README.md"
    readme.write_text(README)
    readme_figures.main(["--run", str(tmp_path / "run"), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("# title\nBefore. <!-- figures:demo -->Its `metrics.json`: attack success rate 0.75 (the")
    assert "greedy generations of 3 of the 4 attacked prompts begin with the backdoor response, verbatim" in text
    assert "auPRC 1.000, 0.999 at k = 5, 100, and average precision 0.931" in text
    assert "full ranking of the 10 samples (2 of them poisoned).<!-- /figures:demo --> After." in text
    assert "<!-- figures:demo-tokens -->75% of the backdoor response tokens" in text
    assert "(25% of the clean responses' tokens)<!-- /figures:demo-tokens -->.\n" in text
    readme_figures.main(["--run", str(tmp_path / "run"), "--readme", str(readme)])
    assert readme.read_text() == text  # rerunning changes nothing


def test_a_readme_without_the_markers_is_an_error(tmp_path):
    fake_run(tmp_path / "run")
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="figures:demo"):
        readme_figures.main(["--run", str(tmp_path / "run"), "--readme", str(readme)])
    assert readme.read_text() == "# no markers\n"


def test_the_real_readme_has_both_blocks():
    text = (ROOT / "README.md").read_text()
    for name in ("demo", "demo-tokens"):
        assert text.count(f"<!-- figures:{name} -->") == text.count(f"<!-- /figures:{name} -->") == 1
