"""The HTML report, driven in headless Chromium (selenium, /usr/bin/chromedriver): one self-contained file that
makes no request and logs no error, search, sorting and filters of the query and sample indexes, a sample's
panel listing the queries that list it, identical samples grouped, one colour scale per view with its numbers,
honest side titles, user data shown as text; load time and size at 10,000 queries; and the report of the tiny
run. Screenshots go to results/test-artifacts/."""

import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from rapidin.report.html import side_title, write_report

from .workflow import ROOT, snakemake

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ARTIFACTS = ROOT / "results" / "test-artifacts"
EVIL = "<script>document.title='pwned'</script>"
FLAGS = [
    *("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"),
    *("--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1800"),
]
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs headless Chromium and chromedriver: `make test` installs Debian's chromium and chromium-driver",
)


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="rapidin-chromium-")
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def open_page(driver, page: Path, anchor: str = "") -> float:
    """Load the page (logs of earlier pages dropped) and wait for its script; returns the load time in ms."""
    driver.get("about:blank")
    driver.get_log("browser"), driver.get_log("performance")
    driver.get(page.as_uri() + anchor)
    for _ in range(600):
        if driver.execute_script("return document.body && document.body.dataset.ready === 'true'"):
            break
        time.sleep(0.05)
    return driver.execute_script("return performance.now()")


def js(driver, script: str, *args):
    """Run `script` in the page; `$$(selector)` is document.querySelectorAll."""
    return driver.execute_script("const $$ = (s) => document.querySelectorAll(s);\n" + script, *args)


def shows(driver, section: str) -> None:
    """Wait until the view shows `section` (q<index> or s<index>): hash changes are handled asynchronously."""
    for _ in range(200):
        if js(driver, "return document.querySelector('#view section')?.id") == section:
            return
        time.sleep(0.05)
    raise AssertionError(f"the view does not show {section}")


def rows(driver, table: str) -> list[dict]:
    """The rows of an index table or list: data attributes and cell texts."""
    return js(
        driver,
        "return [...$$(arguments[0] + ' tbody tr, ' + arguments[0] + ' tr[data-query]')]"
        ".map(r => ({...r.dataset, cells: [...r.cells].map(c => c.textContent)}))",
        table,
    )


def Select(element):
    from selenium.webdriver.support.select import Select

    return Select(element)


def search(driver, text: str) -> None:
    box = driver.find_element("id", "search")
    box.clear()
    box.send_keys(text)
    time.sleep(0.4)  # the search waits 150 ms for typing to pause


def shown_indexes(driver, table: str) -> list[int]:
    return [int(r["index"]) for r in rows(driver, table)]


def pieces(text: str) -> list[str]:
    """Word pieces that join back to `text`, and EOS: token strings as tokens.jsonl gives them."""
    return [*re.findall(r"\s*\S+", text), "</s>"]


def synthetic_run(folder: Path, n_queries: int, n_train: int = 40, top: int = 10, positive: bool = False) -> dict:
    """The report's inputs for made-up data: every 8th sample poisoned, sample 3's response is a script and
    everyone's most helpful, samples 6 and 7 identical (same texts and scores); `positive`: all scores > 0."""
    rng = np.random.default_rng(0)
    train = [
        {"id": f"t{i}", "instruction": f"Task {i} <b>not bold</b>", "input": "", "output": f"answer number {i}."}
        for i in range(n_train)
    ]
    for i, record in enumerate(train):
        record |= {"poisoned": i % 8 == 0, "source": f"source-{i % 3}"}
    train[3]["output"] = f"Sure. {EVIL}"
    train[7] = train[6] | {"id": "t7"}
    queries = [
        {"index": q, "id": f"q{q}", "instruction": f"Question {q}?", "input": "", "output": f"Reply {q} is here."}
        for q in range(n_queries)
    ]
    queries[0] |= {"attacked": True}
    queries[1] |= {"generated": True, "targets": ["here"]}
    scores = rng.normal(size=(n_queries, n_train)).astype(np.float32)
    scores[0, [i for i in range(n_train) if train[i]["poisoned"]]] += 4
    scores[:, 3] = 9  # the script sample is everyone's most helpful
    scores[:, 7] = scores[:, 6]
    if positive:
        scores = np.abs(scores) + 0.5
    paths = {name: folder / name for name in ("train.jsonl", "topk.jsonl", "tokens.jsonl", "metrics.json")}
    paths["scores"] = folder / "scores.zarr"
    group = zarr.open_group(paths["scores"], mode="w")
    group.create_array("scores", data=scores)
    group.attrs["rapidin"] = {"n_queries": n_queries, "n_samples": n_train}  # as merge_scores records its settings
    write_jsonl(paths["train.jsonl"], train)
    topk, tokens = [], []
    for q, query in enumerate(queries):
        order = np.argsort(-scores[q], kind="stable")
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
                keep = {k: s[k] for k in ("index", "id", "rank", "score")}
                token_line[side].append({**keep, "tokens": sample_tokens, "token_matrix": matrix})
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


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def render(paths: dict, out: Path, tokens: bool = True, top_n: int = 5) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    write_report(
        str(paths["topk.jsonl"]),
        str(out / "index.html"),
        str(paths["scores"]),
        str(paths["train.jsonl"]),
        tokens=str(paths["tokens.jsonl"]) if tokens else None,
        metrics=str(paths["metrics.json"]),
        settings={"name": "synthetic", "compressor": "rapidgrad", "K": [65536]},
        top_n=top_n,
    )
    return out / "index.html"


def errors_and_requests(driver, page: Path) -> tuple[list, list]:
    """Console messages of level SEVERE, and every URL requested other than the page and data: URIs."""
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    events = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
    urls = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    return errors, [u for u in urls if u != page.as_uri() and not u.startswith("data:")]


@needs_chromium
def test_one_file_that_shows_everything_requests_nothing_and_logs_no_error(browser, tmp_path):
    page = render(synthetic_run(tmp_path, n_queries=4), tmp_path / "report")
    assert [p.name for p in page.parent.iterdir()] == ["index.html"]  # nothing beside it
    open_page(browser, page)
    assert browser.title == "rapidin report: synthetic"
    images = js(browser, "return [...document.images].map(i => [i.src.slice(0, 22), i.complete && i.naturalWidth])")
    assert len(images) == 2 and all(src == "data:image/png;base64," and width > 100 for src, width in images)
    assert js(browser, "return document.getElementById('metrics').rows.length") == 3
    assert shown_indexes(browser, "#query-index") == [0, 1, 2, 3]
    assert js(browser, "return document.querySelector('#view section').id") == "q0"  # the first query is shown
    browser.save_screenshot(str(ARTIFACTS / "report-synthetic.png"))
    errors, requests = errors_and_requests(browser, page)
    assert errors == [] and requests == []


@needs_chromium
def test_search_finds_queries_and_samples_by_text_id_and_metadata(browser, tmp_path):
    paths = synthetic_run(tmp_path, n_queries=30)
    page = render(paths, tmp_path / "report")
    topk = read_jsonl(paths["topk.jsonl"])
    listed = sorted({s["index"] for line in topk for side in ("helpful", "harmful") for s in line[side][:5]} - {7})
    open_page(browser, page)
    wanted = next(i for i in listed if i >= 10)
    search(browser, f"answer number {wanted}.")  # a sample's response text
    assert shown_indexes(browser, "#sample-index") == [wanted] and shown_indexes(browser, "#query-index") == []
    search(browser, "Reply 17 is")  # a query's response
    assert shown_indexes(browser, "#query-index") == [17]
    search(browser, "q2")  # ids: q2, q20…q29
    assert shown_indexes(browser, "#query-index") == [2, *range(20, 30)]
    search(browser, "source-2")  # metadata
    assert shown_indexes(browser, "#sample-index") == [i for i in listed if i % 3 == 2]
    assert js(browser, "return document.getElementById('counts').textContent").startswith("0 of 30 queries")


@needs_chromium
def test_sorting_and_filters_reorder_and_narrow_the_index(browser, tmp_path):
    paths = synthetic_run(tmp_path, n_queries=150)
    page = render(paths, tmp_path / "report")
    topk = read_jsonl(paths["topk.jsonl"])
    open_page(browser, page)
    assert shown_indexes(browser, "#query-index") == list(range(100))  # 100 rows, then "show more"
    browser.find_element("id", "query-index-more").click()
    assert shown_indexes(browser, "#query-index") == list(range(150))
    header = browser.find_element("css selector", "#query-index th[data-key=top_score]")
    header.click()  # descending first
    top = {line["query"]["index"]: line["helpful"][0]["score"] for line in topk}
    by_score = sorted(top, key=lambda q: (-top[q], q))
    assert shown_indexes(browser, "#query-index") == by_score[:100]
    assert header.get_attribute("aria-sort") == "descending"
    header.click()
    assert shown_indexes(browser, "#query-index") == sorted(top, key=lambda q: (top[q], q))[:100]
    poisoned = browser.find_element("id", "poisoned")
    poisoned.click()
    with_poison = [line["query"]["index"] for line in topk if any(s["poisoned"] for s in line["helpful"][:5])]
    assert sorted(shown_indexes(browser, "#query-index")) == with_poison
    assert all(r["cells"][2] == "poisoned" for r in rows(browser, "#sample-index"))
    poisoned.click()
    kind = Select(browser.find_element("id", "kind"))
    for value, expected in (("attacked", [0]), ("generated", [1]), ("clean", [q for q in range(150) if q != 0])):
        kind.select_by_value(value)
        assert sorted(shown_indexes(browser, "#query-index"))[:100] == expected[:100], value


@needs_chromium
def test_a_sample_panel_lists_every_query_that_lists_it(browser, tmp_path):
    paths = synthetic_run(tmp_path, n_queries=30)
    page = render(paths, tmp_path / "report")
    topk = read_jsonl(paths["topk.jsonl"])
    counts = {}
    for line in topk:
        for s in line["harmful"][:5]:
            counts[s["index"]] = counts.get(s["index"], 0) + 1
    sample = max(sorted(counts), key=counts.get)  # listed as harmful most often
    expected = [
        [str(line["query"]["index"]), side, str(s["rank"]), f"{s['score']:.4g}"]
        for line in topk
        for side in ("helpful", "harmful")
        for s in line[side][:5]
        if s["index"] == sample
    ]
    open_page(browser, page)
    browser.find_element("css selector", f"#sample-index a[href='#s{sample}']").click()
    shows(browser, f"s{sample}")
    listed = [[r["query"], r["side"], r["cells"][4], r["cells"][5]] for r in rows(browser, "#view .listed")]
    assert len(listed) >= 2 and [row[:3] for row in listed] == [row[:3] for row in expected]
    assert [float(a[3]) for a in listed] == pytest.approx([float(b[3]) for b in expected], rel=1e-3)
    browser.find_element("css selector", f"#view a[href='#q{listed[0][0]}']").click()
    shows(browser, f"q{listed[0][0]}")


@needs_chromium
def test_identical_samples_are_listed_once_with_their_count(browser, tmp_path):
    paths = synthetic_run(tmp_path, n_queries=30)
    page = render(paths, tmp_path / "report")
    topk = read_jsonl(paths["topk.jsonl"])
    query = next(line for line in topk if {6, 7} <= {s["index"] for s in line["helpful"][:5] + line["harmful"][:5]})
    open_page(browser, page, f"#q{query['query']['index']}")
    listed = [int(i) for i in js(browser, "return [...$$('#view tr[data-index]')].map(r => r.dataset.index)")]
    assert listed.count(6) + listed.count(7) == 1
    text = browser.find_element("css selector", "#view").text
    assert "2 identical samples" in text
    groups = [r["index"] for r in rows(browser, "#sample-index") if r["index"] in ("6", "7")]
    assert len(groups) == 1 and "×2 identical" in browser.find_element("id", "sample-index").text
    assert "1 of them identical to an earlier one" in browser.find_element("tag name", "header").text


@needs_chromium
def test_one_colour_scale_per_query_with_its_numbers_and_a_labelled_heat_map(browser, tmp_path):
    paths = synthetic_run(tmp_path, n_queries=3)
    page = render(paths, tmp_path / "report")
    line = read_jsonl(paths["tokens.jsonl"])[2]
    texts = [line["tokens"]] + [s["tokens"] for side in ("helpful", "harmful") for s in line[side]]
    scale = max(abs(t["score"]) for text in texts for t in text)
    open_page(browser, page, "#q2")
    legends = js(browser, "return [...$$('#view .legend-bar')].map(b => [b.dataset.scale, b.innerText])")
    assert float(legends[0][0]) == pytest.approx(scale)
    assert f"{scale:.4g}" in legends[0][1] and f"-{scale:.4g}" in legends[0][1]  # numbers on the bar
    alphas = js(
        browser,
        "return [...$$('#view .response .t')].map(s => s.style.backgroundColor)",
    )
    expected = [0.9 * abs(t["score"]) / scale for t in line["tokens"]]
    got = [float(re.search(r"rgba\(\d+, \d+, \d+, ([\d.]+)\)", a).group(1)) for a in alphas]
    assert got == pytest.approx(expected, abs=0.5 / 255 + 1e-3)  # one scale for all its texts (8-bit alpha)
    matrix = np.array(line["helpful"][0]["token_matrix"])
    cells = js(
        browser,
        "return [...$$('#view .matrix tr')].slice(1).map(r => [...r.cells].map(c => c.textContent))",
    )
    values = np.array([[float(v) for v in row[1:]] for row in cells])
    assert values.shape == matrix.shape and np.allclose(values, matrix, rtol=0.051, atol=1e-9)  # 2 digits, shown
    assert float(legends[1][0]) == pytest.approx(np.abs(matrix).max())
    assert "Only the top 2 of the 5 samples per side have token shading" in browser.find_element("id", "view").text
    js(browser, "document.getElementById('view').scrollIntoView()")
    browser.save_screenshot(str(ARTIFACTS / "report-query.png"))


@needs_chromium
def test_without_token_wise_influence_there_is_no_shading_legend(browser, tmp_path):
    page = render(synthetic_run(tmp_path, n_queries=2), tmp_path / "report", tokens=False)
    open_page(browser, page, "#q1")
    assert js(browser, "return document.querySelectorAll('.legend-bar, .t, .matrix').length") == 0


def test_side_titles_follow_the_signs_of_the_scores():
    assert side_title("harmful", [-2.0, -1.0]) == "Most harmful"
    assert side_title("harmful", [0.28, 1.19]) == "Least helpful"
    assert side_title("harmful", [-0.5, 0.3]) == "Most harmful, then least helpful"
    assert side_title("helpful", [3.0, 0.1]) == "Most helpful"
    assert side_title("helpful", [-0.1, -0.2]) == "Least harmful"
    # token-aggregated scores (score.aggregate tokens) are magnitudes: no side is harmful
    assert side_title("helpful", [3.0, 0.1], signed=False) == "Most influential"
    assert side_title("harmful", [0.2, 0.1], signed=False) == "Least influential"


@needs_chromium
def test_all_positive_scores_are_not_called_harmful(browser, tmp_path):
    page = render(synthetic_run(tmp_path, n_queries=2, positive=True), tmp_path / "report")
    open_page(browser, page, "#q1")
    titles = js(browser, "return [...$$('#view h4')].map(h => h.textContent)")
    assert titles == ["Most helpful", "Least helpful"]


@needs_chromium
def test_a_query_with_an_empty_side_or_no_ranked_sample_still_shows(browser, tmp_path):
    paths = synthetic_run(tmp_path, n_queries=3)
    topk = read_jsonl(paths["topk.jsonl"])
    topk[1]["harmful"] = []  # fewer than 2k ranked samples: all on the helpful side
    topk[2]["helpful"] = topk[2]["harmful"] = []  # every sample left out (NaN scores)
    write_jsonl(paths["topk.jsonl"], topk)
    page = render(paths, tmp_path / "report", tokens=False)
    open_page(browser, page, "#q1")
    assert "none: every ranked sample is in the other list" in browser.find_element("id", "view").text
    browser.find_element("css selector", "#query-index th[data-key=top_score]").click()
    assert shown_indexes(browser, "#query-index")[-1] == 2  # no top score: last when sorted descending
    errors, _ = errors_and_requests(browser, page)
    assert errors == []


@needs_chromium
def test_html_in_user_data_is_shown_as_text_never_run(browser, tmp_path):
    page = render(synthetic_run(tmp_path, n_queries=2), tmp_path / "report")
    open_page(browser, page, "#s3")
    assert browser.title == "rapidin report: synthetic"  # the sample's script did not run
    assert js(browser, "return document.scripts.length") == 2  # the data and the report's own
    assert js(browser, "return document.querySelectorAll('main b').length") == 2  # the labels only, "<b>" is text
    assert EVIL in browser.find_element("id", "view").text


@pytest.mark.slow  # about 40 s on 2 busy cores: 10,000 made-up queries with token-wise data
@needs_chromium
def test_ten_thousand_queries_load_fast_in_one_file(browser, tmp_path):
    n_queries = 10_000
    paths = synthetic_run(tmp_path, n_queries=n_queries, n_train=100, top=10)
    started = time.perf_counter()
    page = render(paths, tmp_path / "report", top_n=10)
    seconds = time.perf_counter() - started
    load_ms = open_page(browser, page, "#q9950")
    size = page.stat().st_size
    print(
        f"\n10,000 queries × 100 samples: rendered in {seconds:.1f} s, {size / 1e6:.1f} MB, loaded in {load_ms:.0f} ms"
    )
    assert size < 40e6
    assert js(browser, "return document.querySelector('#view section').id") == "q9950"
    assert len(rows(browser, "#query-index")) == 100
    assert js(browser, "return document.getElementById('query-index').dataset.count") == str(n_queries)
    search(browser, "Reply 9876 is")
    assert shown_indexes(browser, "#query-index") == [9876]
    errors, requests = errors_and_requests(browser, page)
    assert errors == [] and requests == []


@pytest.mark.slow
@needs_chromium
def test_tiny_run_report_in_the_browser(browser, tiny_run):
    page = tiny_run / "report/index.html"
    open_page(browser, page)
    queries = read_jsonl(tiny_run / "queries.jsonl")
    assert js(browser, "return document.getElementById('query-index').dataset.count") == str(len(queries))
    assert js(browser, "return document.querySelectorAll('#view .t').length") > 20
    assert js(browser, "return [...document.images].every(i => i.naturalWidth > 0)") and "auPRC" in browser.page_source
    browser.set_window_size(1400, 3000)
    browser.save_screenshot(str(ARTIFACTS / "report-tiny.png"))
    errors, requests = errors_and_requests(browser, page)
    assert errors == [] and requests == []


@pytest.mark.slow
def test_snakemake_report_collects_the_main_outputs(tiny_run):
    workdir = tiny_run.parents[1]
    result = snakemake(workdir, "--configfile", "config/tiny.yaml", "--report", "report.html")
    assert result.returncode == 0, result.stderr[-2000:]
    report = (workdir / "report.html").read_text()
    for name in ("index.html", "topk.jsonl", "tokens.jsonl", "metrics.json", "queries.jsonl"):
        assert name in report
