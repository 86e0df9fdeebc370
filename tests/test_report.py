"""The HTML report, rendered in headless Chromium: what it shows, that user data cannot inject scripts, that
1,000 queries page well; and `snakemake --report` on the tiny run. Screenshots go to results/test-artifacts/."""

import json
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import zarr

from rapidin.report import PAGE_SIZE, write_report

from .workflow import ROOT, snakemake

CHROMIUM = shutil.which("chromium")
ARTIFACTS = ROOT / "results" / "test-artifacts"
EVIL = "<script>document.title='pwned'</script>"
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="needs headless Chromium: `make test` installs Debian's chromium (as root)"
)


def chromium(url: str, *flags: str) -> str:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=4000", *flags, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


def dump_dom(page: Path, anchor: str = "") -> "Dom":
    return Dom(chromium(page.as_uri() + anchor, "--dump-dom"))


def screenshot(page: Path, name: str, height: int = 2400) -> Path:
    """A screenshot of the page, kept in results/test-artifacts/ for people to look at."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    chromium(page.as_uri(), f"--screenshot={ARTIFACTS / name}", f"--window-size=1400,{height}", "--hide-scrollbars")
    return ARTIFACTS / name


class Dom(HTMLParser):
    """The rendered elements (tag, attributes; not the inert contents of <template>s) and title of a DOM dump."""

    def __init__(self, html: str):
        super().__init__()
        self.html, self.elements, self.title, self._in_title, self._templates = html, [], "", False, 0
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self._templates += tag == "template"
        if not self._templates:
            self.elements.append((tag, dict(attrs)))
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        self._templates -= tag == "template"

    def handle_data(self, data):
        if self._in_title:
            self.title += data
            self._in_title = False

    def find(self, tag: str, **attrs) -> list[dict]:
        return [a for t, a in self.elements if t == tag and all(a.get(k) == v for k, v in attrs.items())]

    def shaded_tokens(self) -> list[dict]:
        spans = [a for t, a in self.elements if t == "span" and "title" in a]
        return [a for a in spans if re.fullmatch(r"t [pn]\d", a.get("class", ""))]


def pieces(text: str) -> list[str]:
    """Word pieces that join back to `text`, and EOS: token strings as tokens.jsonl gives them."""
    return [*re.findall(r"\s*\S+", text), "</s>"]


def synthetic_run(folder: Path, n_queries: int, n_train: int = 40, top: int = 10) -> dict:
    """The report's inputs for made-up data: every 8th sample poisoned, sample 3's response is a script."""
    rng = np.random.default_rng(0)
    train = [
        {"id": f"t{i}", "instruction": f"Task {i} <b>not bold</b>", "input": "", "output": f"answer number {i}."}
        for i in range(n_train)
    ]
    for i, record in enumerate(train):
        record["poisoned"] = i % 8 == 0
    train[3]["output"] = f"Sure. {EVIL}"
    queries = [
        {"index": q, "id": f"q{q}", "instruction": f"Question {q}?", "input": "", "output": f"Reply {q} is here."}
        for q in range(n_queries)
    ]
    queries[0] |= {"attacked": True}
    queries[1] |= {"generated": True, "targets": ["here"]}
    scores = rng.normal(size=(n_queries, n_train)).astype(np.float32)
    scores[0, [i for i in range(n_train) if train[i]["poisoned"]]] += 4
    scores[:, 3] = 9  # the script sample is everyone's most helpful
    paths = {name: folder / name for name in ("train.jsonl", "topk.jsonl", "tokens.jsonl", "metrics.json")}
    paths["scores"] = folder / "scores.zarr"
    zarr.open_group(paths["scores"], mode="w").create_array("scores", data=scores)
    write_jsonl(paths["train.jsonl"], train)
    topk, tokens = [], []
    for q, query in enumerate(queries):
        order = np.argsort(-scores[q])
        line = {"query": query}
        for side, ranked in (("helpful", order[:top]), ("harmful", order[::-1][:top])):
            line[side] = [
                {"rank": r + 1, "index": int(i), "score": float(scores[q, i]), **train[i]} for r, i in enumerate(ranked)
            ]
        topk.append(line)
        response = [
            {"text": t, "score": float(rng.normal()), "top": [{"index": 3, "score": 9.0}]}
            for t in pieces(query["output"])
        ]
        token_line = {"query": {"index": q, "id": query["id"]}, "tokens": response}
        for side in ("helpful", "harmful"):
            token_line[side] = []
            for s in line[side][:2]:
                sample_tokens = [{"text": t, "score": float(rng.normal())} for t in pieces(s["output"])]
                matrix = rng.normal(size=(len(sample_tokens), len(response))).round(3).tolist()
                token_line[side].append(
                    {
                        **{k: s[k] for k in ("index", "id", "rank", "score")},
                        "tokens": sample_tokens,
                        "token_matrix": matrix,
                    }
                )
        tokens.append(token_line)
    write_jsonl(paths["topk.jsonl"], topk)
    write_jsonl(paths["tokens.jsonl"], tokens)
    metrics = {
        "auprc": {"5": 0.9, "10": 0.8},
        "auroc": {"5": 0.95, "10": 0.9},
        "ap_full": 0.7,
        "n_poisoned": 5,
        "n_samples": n_train,
    }
    paths["metrics.json"].write_text(json.dumps(metrics))
    return paths


def write_jsonl(path: Path, lines: list[dict]) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def render(paths: dict, out: Path) -> Path:
    write_report(
        str(paths["topk.jsonl"]),
        str(out / "index.html"),
        str(out / "plots"),
        str(paths["scores"]),
        str(paths["train.jsonl"]),
        tokens=str(paths["tokens.jsonl"]),
        metrics=str(paths["metrics.json"]),
        settings={"name": "synthetic", "compressor": "rapidgrad", "K": [65536]},
        top_n=5,
    )
    return out / "index.html"


@needs_chromium
def test_report_shows_queries_tokens_samples_metrics_and_plots(tmp_path):
    page = render(synthetic_run(tmp_path, n_queries=4), tmp_path / "report")
    dom = dump_dom(page)
    assert dom.title == "rapidin report: synthetic"
    assert [a["id"] for a in dom.find("section")] == ["q0", "q1", "q2", "q3"]
    assert len(dom.find("tr", **{"class": "poisoned"})) >= 1 and dom.find("table", id="metrics")
    assert {"#q0", "#q3"} <= {a.get("href") for a in dom.find("a")}  # the index links to the sections
    shaded = dom.shaded_tokens()
    assert len(shaded) > 4 * 10 and all(a["title"] for a in shaded)  # responses and top samples
    assert "generated by the model" in dom.html and "targets: here" in dom.html
    images = dom.find("img")
    assert [a["src"] for a in images] == ["plots/metrics.png", "plots/scores.png"]
    assert all(a.get("data-loaded") == "true" for a in images)  # the PNGs are found and decode
    shot = screenshot(page, "report-synthetic.png")
    assert shot.stat().st_size > 50_000


@needs_chromium
def test_html_in_user_data_is_shown_as_text_never_run(tmp_path):
    page = render(synthetic_run(tmp_path, n_queries=2), tmp_path / "report")
    dom = dump_dom(page)
    assert dom.title == "rapidin report: synthetic"  # the sample's script did not run
    assert len(dom.find("script")) == 1  # the report's own
    assert not dom.find("b")[1:] or all(a == {} for a in dom.find("b"))  # "<b>not bold</b>" stays text
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in dom.html.replace("&#39;", "'")


@needs_chromium
def test_a_thousand_queries_come_in_pages(tmp_path):
    started = time.perf_counter()
    page = render(synthetic_run(tmp_path, n_queries=1000, top=10), tmp_path / "report")
    assert time.perf_counter() - started < 60
    assert page.stat().st_size < 40e6
    dom = dump_dom(page, "#q950")
    first = 950 // PAGE_SIZE * PAGE_SIZE
    assert [a["id"] for a in dom.find("section")] == [f"q{i}" for i in range(first, first + PAGE_SIZE)]
    pages = [a for a in dom.find("a") if a.get("class", "").startswith("page")]
    assert len(pages) == 1000 // PAGE_SIZE and dom.find("a", **{"class": "page current"})[0]["href"] == f"#q{first}"
    assert len(dom.find("tr")) > 1000  # the index lists every query


@pytest.mark.slow
@needs_chromium
def test_tiny_run_report_in_the_browser(tiny_run):
    page = tiny_run / "report/index.html"
    dom = dump_dom(page)
    queries = [json.loads(line) for line in (tiny_run / "queries.jsonl").open()]
    assert [a["id"] for a in dom.find("section")] == [f"q{i}" for i in range(len(queries))]
    assert len(dom.shaded_tokens()) > 100
    assert all(a.get("data-loaded") == "true" for a in dom.find("img")) and len(dom.find("img")) == 2
    assert "auPRC" in dom.html and "attacked" in dom.html
    screenshot(page, "report-tiny.png", height=3000)


@pytest.mark.slow
def test_snakemake_report_collects_the_main_outputs(tiny_run):
    workdir = tiny_run.parents[1]
    result = snakemake(workdir, "--configfile", "config/tiny.yaml", "--report", "report.html")
    assert result.returncode == 0, result.stderr[-2000:]
    report = (workdir / "report.html").read_text()
    for name in (
        "index.html",
        "scores.png",
        "metrics.png",
        "topk.jsonl",
        "tokens.jsonl",
        "metrics.json",
        "queries.jsonl",
    ):
        assert name in report
