"""The HTML report: settings, metrics, plots, and per query its response shaded token by token with its most
helpful and harmful training samples (their response tokens shaded too, when token-wise influence was run).

Rendered from rapidin/templates/ by Jinja2 with autoescaping, so HTML in user data shows as text. Opening it
needs no network: CSS and a small paging script are inline, the plots are PNGs beside it (relative paths).
Query sections come in pages of PAGE_SIZE, each an inert <template> until shown, after an index of all
queries that links to them (`#q<index>`), so that a report of thousands of queries opens at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jinja2
import numpy as np
import zarr

from rapidin import plots
from rapidin.data import read_records
from rapidin.evaluate import poisoned_labels
from rapidin.score import SIDES
from rapidin.store import atomic_dir, atomic_file

PAGE_SIZE = 25
MAX_PANELS = 12  # score-distribution panels
SHADES = 9  # shading levels per sign


def write_report(
    topk: str,
    out: str,
    plots_dir: str,
    scores: str,
    train: str,
    tokens: str | None = None,
    metrics: str | None = None,
    settings: dict | None = None,
    top_n: int = 10,
) -> None:
    """Render topk.jsonl (with tokens.jsonl, metrics.json and the run's settings, when given) into `out`.

    Args:
        plots_dir: folder for the PNG plots the page embeds; scores: scores.zarr; train: the training set.
        top_n: samples shown per query and side.
    """
    queries = _read_jsonl(topk)
    by_query = {line["query"]["index"]: line for line in _read_jsonl(tokens)} if tokens else {}
    metrics = _read_json(metrics)
    labels = poisoned_labels(read_records(train))
    score_matrix = zarr.open_group(scores, mode="r")["scores"]
    figures = _figures(queries, score_matrix, labels, metrics, plots_dir, Path(out).parent)
    sections = [_section(line, by_query.get(line["query"]["index"], {}), top_n) for line in queries]
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True
    )
    html = environment.get_template("report.html").render(
        name=(settings or {}).get("name", ""),
        settings=settings or {},
        metrics=metrics,
        figures=figures,
        queries=sections,
        pages=[sections[i : i + PAGE_SIZE] for i in range(0, len(sections), PAGE_SIZE)],
        page_size=PAGE_SIZE,
        n_samples=score_matrix.shape[1],
        has_labels=labels is not None,
        top_n=top_n,
        shades=SHADES,
    )
    with atomic_file(out) as handle:
        handle.write(html)


def _figures(queries, scores: zarr.Array, labels, metrics: dict, plots_dir: str, html_dir: Path) -> dict:
    """Write the plots into `plots_dir`: {name: {"src": path relative to the page, "caption": …}}."""
    attacked = [line["query"] for line in queries if line["query"].get("attacked")]
    shown = (attacked or [line["query"] for line in queries])[:MAX_PANELS]
    rows = scores.oindex[[q["index"] for q in shown], :]  # (panels, N)
    caption = f"Influence scores of all training samples for the first {len(shown)} "
    caption += "attacked queries" if attacked else "queries"
    caption += ", poisoned samples in red (log scale)" if labels is not None else " (log scale)"
    figures = {"scores": caption}
    with atomic_dir(plots_dir) as tmp:
        plots.score_distributions(rows, [f"query {q['index']} · {q['id']}" for q in shown], labels, tmp / "scores.png")
        if metrics.get("auprc"):
            plots.metrics_against_k(metrics, tmp / "metrics.png")
            figures["metrics"] = "auPRC and auROC against k, with the auPRC of a random ranking"
    relative = os.path.relpath(plots_dir, html_dir)
    return {name: {"src": f"{relative}/{name}.png", "caption": text} for name, text in figures.items()}


def _section(line: dict, tokens: dict, top_n: int) -> dict:
    """What the page shows of one query (tokens: its line of tokens.jsonl, or {})."""
    query = line["query"]
    heatmaps = {s["index"]: s for side in SIDES for s in tokens.get(side, [])}
    section = {
        **query,
        "targets": [t if isinstance(t, str) else query["output"][t[0] : t[1]] for t in query.get("targets", [])],
        "tokens": _shaded(tokens["tokens"], query["output"], _top_title) if tokens else None,
        "top_score": line["helpful"][0]["score"],
        "poisoned_top": sum(bool(s.get("poisoned")) for s in line["helpful"][:top_n]),
        "matrix": _matrix(tokens) if tokens.get("helpful") else None,
    }
    for side in SIDES:
        section[side] = [
            {**s, "tokens": _shaded(heatmaps[s["index"]]["tokens"], s["output"]) if s["index"] in heatmaps else None}
            for s in line[side][:top_n]
        ]
    return section


def _shaded(tokens: list[dict], text: str, title=lambda t: f"{t['score']:.4g}") -> list[dict]:
    """Tokens with their shading class (sign and level, scaled to the largest |score|) and hover text, then
    the part of `text` that truncation to data.max_length left without tokens, if any."""
    scale = max(abs(t["score"]) for t in tokens) or 1.0
    shaded = [{"text": t["text"], "shade": _shade(t["score"], scale), "title": title(t)} for t in tokens]
    covered = "".join(t["text"] for t in tokens)
    if not covered.startswith(text):
        shaded.append({"text": text[len(covered) :], "shade": "cut", "title": "cut off by data.max_length"})
    return shaded


def _top_title(token: dict) -> str:
    top = ", ".join(f"#{s['index']} ({s['score']:.3g})" for s in token["top"])
    return f"{token['score']:.4g} from the top helpful samples; most influential samples for this token: {top}"


def _shade(score: float, scale: float) -> str:
    level = round(SHADES * min(1.0, abs(score) / scale))
    return f"{'p' if score >= 0 else 'n'}{level}" if level else ""


def _matrix(tokens: dict) -> dict:
    """Token → token table of the most helpful sample: its tokens (rows) × the response tokens (columns)."""
    sample = tokens["helpful"][0]
    values = np.asarray(sample["token_matrix"])  # (R_s, R)
    scale = float(np.abs(values).max()) or 1.0
    columns = [t["text"] for t in tokens["tokens"]]
    rows = []
    for token, row in zip(sample["tokens"], values, strict=True):
        cells = [
            {"shade": _shade(v, scale), "title": f"{token['text']!r} → {column!r}: {v:.4g}"}
            for v, column in zip(row, columns, strict=True)
        ]
        rows.append({"text": token["text"], "cells": cells})
    return {"columns": columns, "rows": rows}


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _read_json(path: str | None) -> dict:
    if not path:
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle) or {}
