"""The HTML report: one self-contained file with the run's settings, metrics and plots, a searchable, sortable
and filterable index of the queries and of the training samples they list, and per query its response shaded
token by token with its most helpful and harmful samples; per sample, every query it appears in.

The page is rendered from rapidin/report/templates/ by Jinja2 (autoescaped) around one JSON document of the data;
an inline script (templates/report.js) draws the index tables and the one query or sample shown at a time
from it, with `textContent` only, so that HTML in user data shows as text. The plots are PNGs inlined as data
URIs and a Content-Security-Policy forbids every request, so the file opens, is mailed and archived alone.
Identical training samples (same instruction, input and response) are listed once, with their count.
"""

from __future__ import annotations

import base64
import gc
import io
import json
from contextlib import contextmanager
from pathlib import Path

import jinja2
import numpy as np
import zarr

from rapidin.data.records import Record, read_records
from rapidin.errors import RapidinError
from rapidin.evaluate.metrics import poisoned_labels
from rapidin.report import plots
from rapidin.score.scores import SIDES
from rapidin.store import atomic_file

TEMPLATES = Path(__file__).parent / "templates"
MAX_PANELS = 12  # score-distribution panels
MAX_COPIES = 50  # identical samples named per sample (the count is always given)
TEXT_FIELDS = ("index", "id", "instruction", "input", "output", "rank", "score")
SIDE_TITLES = {  # (side, sign of all its scores, 0 for mixed signs): the list's title
    ("helpful", 1): "Most helpful",
    ("helpful", -1): "Least harmful",
    ("helpful", 0): "Most helpful, then least harmful",
    ("harmful", -1): "Most harmful",
    ("harmful", 1): "Least helpful",
    ("harmful", 0): "Most harmful, then least helpful",
}
UNSIGNED_TITLES = {"helpful": "Most influential", "harmful": "Least influential"}  # score.aggregate tokens: |z|


@contextmanager
def _without_cycle_collection():
    """Many small objects and no cycles: the cycle collector would only rescan them (5× slower at 10k queries)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@_without_cycle_collection()
def write_report(
    topk: str,
    out: str,
    scores: str,
    train: str,
    tokens: str | None = None,
    metrics: str | None = None,
    settings: dict | None = None,
    top_n: int = 10,
    fields: dict[str, str] | None = None,
) -> None:
    """Render topk.jsonl (with tokens.jsonl, metrics.json and the run's settings, when given) into the one file `out`.

    Args:
        scores: scores.zarr (score distributions); train: the training set (poisoned labels, identical samples).
        top_n: samples shown per query and side; fields: the training set's field names (data.fields).
    """
    lines = _read_jsonl(topk)
    token_lines = {line["query"]["index"]: line for line in _read_jsonl(tokens)} if tokens else {}
    records = read_records(train, fields=fields)
    metrics = _read_json(metrics)
    labels = poisoned_labels(records)
    score_group = zarr.open_group(scores, mode="r")
    score_matrix = score_group["scores"]
    signed = "aggregation" not in score_group.attrs["rapidin"]  # token-aggregated scores say how much, not which way
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True)
    html = environment.get_template("report.html").render(
        name=(settings or {}).get("name", ""),
        settings=settings or {},
        metrics=metrics,
        figures=_figures(lines, score_matrix, labels, metrics),
        n_queries=len(lines),
        n_samples=score_matrix.shape[1],
        n_duplicated=sum(len(group) - 1 for group in identical_groups(records).values()),
        has_labels=labels is not None,
        top_n=top_n,
        data=_script_json(report_data(lines, token_lines, records, top_n, signed)),
        style=(TEMPLATES / "report.css").read_text(encoding="utf-8"),
        script=(TEMPLATES / "report.js").read_text(encoding="utf-8"),
    )
    with atomic_file(out) as handle:
        handle.write(html)


def report_data(
    lines: list[dict], token_lines: dict[int, dict], records: list[Record], top_n: int, signed: bool = True
) -> dict:
    """The JSON the page's script draws from: {"top_n", "queries": [...], "samples": {index: sample}}.

    A query's `helpful`/`harmful` entries are [index, rank, score, [[index, rank, score] of identical samples
    merged into this entry]]; `scale` is the largest |score| of its shaded texts (one colour scale per query);
    `signed`: the scores have a direction (helpful, harmful), not only a magnitude (score.aggregate tokens).
    """
    groups = identical_groups(records)
    group_of = {index: key for key, group in groups.items() for index in group}
    samples = {}
    queries = []
    for line in lines:
        view = _query_view(line, token_lines.get(line["query"]["index"], {}), top_n, group_of, signed)
        queries.append(view)
        for side in SIDES:
            for s in line[side][:top_n]:
                if s["index"] not in samples:
                    samples[s["index"]] = _sample(s, groups.get(group_of.get(s["index"]), []))
    return {"top_n": top_n, "queries": queries, "samples": samples}


def identical_groups(records: list[Record]) -> dict[int, list[int]]:
    """Training samples with the same instruction, input and response: {first index: all indices}, groups of 2+."""
    by_text: dict[tuple, list[int]] = {}
    for index, record in enumerate(records):
        by_text.setdefault((record.instruction, record.input, record.output), []).append(index)
    return {group[0]: group for group in by_text.values() if len(group) > 1}


def side_title(side: str, scores: list[float], signed: bool = True) -> str:
    """What a side's list honestly is, by the sign of its scores: "most harmful" only where they are negative;
    unsigned scores (magnitudes) list the most and the least influential samples."""
    if not signed:
        return UNSIGNED_TITLES[side]
    if not scores:  # every ranked sample is in the other list
        return SIDE_TITLES[side, 1 if side == "helpful" else -1]
    sign = 1 if min(scores) >= 0 else -1 if max(scores) < 0 else 0
    return SIDE_TITLES[side, sign]


def _query_view(line: dict, tokens: dict, top_n: int, group_of: dict[int, int], signed: bool) -> dict:
    """One query as the page shows it (tokens: its line of tokens.jsonl, or {})."""
    query = line["query"]
    view = {key: query.get(key, "") for key in ("index", "id", "instruction", "input", "output")}
    view["meta"] = {k: v for k, v in query.items() if k not in (*TEXT_FIELDS, "targets")}
    view["targets"] = [t if isinstance(t, str) else query["output"][t[0] : t[1]] for t in query.get("targets", [])]
    view["titles"] = {side: side_title(side, [s["score"] for s in line[side][:top_n]], signed) for side in SIDES}
    for side in SIDES:
        view[side] = _merge_identical(line[side][:top_n], group_of)
    view["top_score"] = line["helpful"][0]["score"] if line["helpful"] else None
    view["poisoned_top"] = sum(bool(s.get("poisoned")) for s in line["helpful"][:top_n])
    view["tokens"] = _response_tokens(tokens["tokens"], query["output"]) if tokens else None
    shaded = {s["index"]: s for side in SIDES for s in tokens.get(side, [])}
    view["sample_tokens"] = {i: [[t["text"], t["score"]] for t in s["tokens"]] for i, s in shaded.items()}
    view["shaded_per_side"] = max((len(tokens.get(side, [])) for side in SIDES), default=0)
    all_scores = [t[1] for t in view["tokens"] or [] if t[1] is not None]
    all_scores += [t[1] for texts in view["sample_tokens"].values() for t in texts]
    view["scale"] = max(map(abs, all_scores), default=0.0)
    view["matrix"] = _matrix(tokens) if tokens.get("helpful") else None
    return view


def _merge_identical(entries: list[dict], group_of: dict[int, int]) -> list[list]:
    """[index, rank, score, copies] per entry, an identical sample's entry merged into the first one's copies."""
    merged, first = [], {}
    for s in entries:
        key = group_of.get(s["index"], s["index"])
        if key in first:
            first[key][3].append([s["index"], s["rank"], s["score"]])
        else:
            first[key] = [s["index"], s["rank"], s["score"], []]
            merged.append(first[key])
    return merged


def _sample(s: dict, group: list[int]) -> dict:
    """A training sample's texts, metadata and identical samples (`copies`: their number, the first indices)."""
    sample = {key: s.get(key, "") for key in ("index", "id", "instruction", "input", "output")}
    sample["meta"] = {k: v for k, v in s.items() if k not in TEXT_FIELDS}
    others = [i for i in group if i != s["index"]]
    sample["copies"] = {"count": len(others), "indices": others[:MAX_COPIES]}
    sample["group"] = group[0] if group else s["index"]  # the first of the identical samples
    return sample


def _response_tokens(tokens: list[dict], text: str) -> list[list]:
    """[text, score, its most influential samples [[index, score], …]] per response token, then as [text, None,
    []] the part of `text` that truncation to data.max_length left without tokens, if any."""
    shaded = [[t["text"], t["score"], [[s["index"], s["score"]] for s in t["top"]]] for t in tokens]
    covered = "".join(t["text"] for t in tokens)
    if not covered.startswith(text):
        shaded.append([text[len(covered) :], None, []])
    return shaded


def _matrix(tokens: dict) -> dict:
    """Token → token values of the most helpful sample: its tokens (rows) × the response tokens (columns)."""
    sample = tokens["helpful"][0]
    values = np.asarray(sample["token_matrix"], dtype=float)  # (R_s, R)
    return {
        "sample": sample["index"],
        "rows": [t["text"] for t in sample["tokens"]],
        "columns": [t["text"] for t in tokens["tokens"]],
        "values": values.tolist(),
        "scale": float(np.abs(values).max(initial=0.0)),
    }


def _figures(lines: list[dict], scores: zarr.Array, labels, metrics: dict) -> dict:
    """The plots as {name: {"src": PNG data URI, "caption": …}}."""
    attacked = [line["query"] for line in lines if line["query"].get("attacked")]
    shown = (attacked or [line["query"] for line in lines])[:MAX_PANELS]
    rows = scores.oindex[[q["index"] for q in shown], :]  # (panels, N)
    caption = f"Influence scores of all training samples for the first {len(shown)} "
    caption += "attacked queries" if attacked else "queries"
    caption += ", poisoned samples in red (log scale)" if labels is not None else " (log scale)"
    png = io.BytesIO()
    plots.score_distributions(rows, [f"query {q['index']} · {q['id']}" for q in shown], labels, png)
    figures = {"scores": {"src": _data_uri(png), "caption": caption}}
    if metrics.get("auprc"):
        png = io.BytesIO()
        plots.metrics_against_k(metrics, png)
        caption = "auPRC and auROC against k, with the auPRC of a random ranking"
        figures["metrics"] = {"src": _data_uri(png), "caption": caption}
    return figures


def _data_uri(png: io.BytesIO) -> str:
    return "data:image/png;base64," + base64.b64encode(png.getvalue()).decode("ascii")


def _script_json(data: dict) -> str:
    """JSON safe inside <script type="application/json">: no `<`, `>` or `&` that could close the element."""
    try:
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:
        raise RapidinError("report: a score in topk.jsonl or tokens.jsonl is not finite (NaN or infinity)") from None
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _read_json(path: str | None) -> dict:
    if not path:
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle) or {}
