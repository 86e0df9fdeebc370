"""The paper's studies as tables (Markdown + CSV) and plots, from every method's scores store and timings.

- `backdoor_table`: backdoor retrieval (method.md §7) per method: auPRC/auROC at k, full-ranking AP, cache
  bytes per sample and seconds, plus the headline speedup of retrieval over the cache against exact TracIn,
  which recomputes every training gradient for each new query.
- `error_tracing_table`: precision@k of the swapped samples, whole-response vs target-span queries.
- `compression_table`: Spearman and Pearson correlation of each method's scores with a reference (exact
  TracIn+LN), per query over all training samples, averaged over queries, against cache bytes per sample.

`costs` describe each method: {"scores": its scores store, "cache": a cache store or null, "array": the
cached array it scores, "benchmarks": {"train_cache" | "query_cache" | "score" | "other": [Snakemake
benchmark TSVs]}, optionally "copies": how many caches of that size it needs (one per checkpoint)}.
"""

from __future__ import annotations

import csv
import io
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import zarr
from scipy.stats import pearsonr, spearmanr

from rapidin.evaluate.metrics import KS, TRACING_KS
from rapidin.methods import parse_method
from rapidin.store import atomic_file

METRIC_COLUMNS = [f"auprc@{k}" for k in KS] + [f"auroc@{k}" for k in KS] + ["ap_full"]
STAGES = ("train_cache", "query_cache", "score", "other")


def benchmark_seconds(paths: list[str]) -> float:
    """Wall-clock seconds summed over Snakemake benchmark files (column `s`)."""
    total = 0.0
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            total += sum(float(row["s"]) for row in csv.DictReader(handle, delimiter="\t"))
    return total


def cache_bytes_per_sample(cost: dict) -> int:
    """Bytes one training sample takes in the method's cache (0 for methods without one), times the caches it
    needs (`copies`: one per checkpoint for methods summed over checkpoints)."""
    if not cost.get("cache"):
        return 0
    array = zarr.open_group(cost["cache"], mode="r")[cost["array"]]
    return int(array.shape[1] * array.dtype.itemsize) * cost.get("copies", 1)


def stage_seconds(cost: dict) -> dict[str, float]:
    return {stage: benchmark_seconds(cost["benchmarks"].get(stage, [])) for stage in STAGES}


def cost_columns(cost: dict) -> dict:
    """A method's table columns `cache_bytes_per_sample` and `seconds` (all its jobs' wall-clock time)."""
    return {
        "cache_bytes_per_sample": cache_bytes_per_sample(cost),
        "seconds": round(sum(stage_seconds(cost).values()), 1),
    }


def n_queries(cost: dict) -> int:
    return int(zarr.open_group(cost["scores"], mode="r")["scores"].shape[0])


def _write_tables(rows: list[dict], columns: list[str], markdown: str, out_csv: str, out_md: str) -> None:
    with atomic_file(out_csv) as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    with atomic_file(out_md) as handle:
        handle.write(markdown)


def _markdown(rows: list[dict], columns: list[str]) -> str:
    def cell(value) -> str:
        if value == "" or value is None:
            return "–"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def backdoor_table(
    methods: list[str], metrics: list[str], costs: dict, out_csv: str, out_md: str, plot: str, title: str
) -> list[dict]:
    """One row per method (`metrics` are their metrics.json files, in order); returns the rows."""
    rows = []
    for method, path in zip(methods, metrics, strict=True):
        with open(path, encoding="utf-8") as handle:
            result = json.load(handle)
        row: dict = {"method": method}
        for name in ("auprc", "auroc"):
            row |= {f"{name}@{k}": result.get(name, {}).get(str(k), "") for k in KS}
        row["ap_full"] = result.get("ap_full", "")
        rows.append(row | cost_columns(costs[method]))
    columns = ["method", *METRIC_COLUMNS, "cache_bytes_per_sample", "seconds"]
    shown = [c for c in columns if any(row[c] != "" for row in rows)]  # k > N/2 is not computed
    markdown = f"# {title}\n\n{_markdown(rows, shown)}\n{speedup_note(methods, costs)}"
    _write_tables(rows, columns, markdown, out_csv, out_md)
    _plot_backdoor(rows, plot, title)
    return rows


def speedup_note(methods: list[str], costs: dict) -> str:
    """The paper's headline in kind: a new query's retrieval over the RapidIn cache vs exact TracIn, which
    must recompute every training gradient (the whole training-cache time) for it."""
    parsed = {m: parse_method(m) for m in methods}
    fast = [m for m, p in parsed.items() if p.k is not None and p.seed is None and p.plain]
    exact = next((m for m in ("tracin", "tracin_ln") if m in methods), None)
    notes = [
        "`seconds`: wall-clock time of the method's jobs (training and query gradients, scoring; the RapidIn rows "
        "share one multi-K caching pass, counted in each). `cache_bytes_per_sample`: one training sample's cached "
        "vector."
    ]
    if fast and exact:
        fast = max(fast, key=lambda m: parse_method(m).k)
        f, e = stage_seconds(costs[fast]), stage_seconds(costs[exact])
        retrieval = (f["query_cache"] + f["score"]) / n_queries(costs[fast])
        recompute = e["train_cache"] + (e["query_cache"] + e["score"]) / n_queries(costs[exact])
        notes.append(
            f"Per new query, {exact} recomputes every training gradient and scores it: {recompute:.1f} s; "
            f"{fast} computes the query's gradient and scores it against the cache: {retrieval:.2f} s — "
            f"**{recompute / retrieval:.0f}× faster**."
        )
    return "\n\n".join(notes) + "\n"


def error_tracing_table(
    methods: list[str], metrics: list[str], costs: dict, out_csv: str, out_md: str, plot: str, title: str
) -> list[dict]:
    """One row per method: precision@k of the swapped samples for whole-response and target-span queries."""

    rows = []
    for method, path in zip(methods, metrics, strict=True):
        with open(path, encoding="utf-8") as handle:
            precision = json.load(handle)["precision"]
        row: dict = {"method": method}
        for kind in ("whole", "target"):
            row |= {f"precision@{k}_{kind}": precision[kind][str(k)] for k in TRACING_KS}
        rows.append(row | cost_columns(costs[method]))
    columns = list(rows[0])
    markdown = (
        f"# {title}\n\nPrecision@k of the swapped samples among each query's top k, mean over the whole-response "
        f"queries and over the target-span (token-wise) ones.\n\n{_markdown(rows, columns)}"
    )
    _write_tables(rows, columns, markdown, out_csv, out_md)
    figure, axis = plt.subplots(figsize=(6, 3.8))
    bars = [c for c in columns if c.startswith("precision@")]
    width = 0.8 / len(bars)
    for i, column in enumerate(bars):
        axis.bar(np.arange(len(rows)) + i * width, [r[column] for r in rows], width, label=column)
    axis.set_xticks(np.arange(len(rows)) + 0.4 - width / 2, [r["method"] for r in rows], fontsize=7, rotation=20)
    axis.set_ylabel("precision of swapped samples")
    axis.set_ylim(0, 1.02)
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=7, frameon=False)
    figure.tight_layout()
    _save(figure, plot)
    return rows


def _plot_backdoor(rows: list[dict], out: str, title: str) -> None:
    """auPRC against k, one line per method."""
    figure, axis = plt.subplots(figsize=(6, 3.8))
    for row in rows:
        ks = [k for k in KS if row[f"auprc@{k}"] != ""]
        axis.plot(ks, [row[f"auprc@{k}"] for k in ks], "o-", label=row["method"], markersize=3)
    axis.set_xscale("log")
    axis.set_xlabel("k (top-k ∪ bottom-k per attacked query)")
    axis.set_ylabel("auPRC")
    axis.set_ylim(0, 1.02)
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=7, frameon=False, loc="lower left", ncol=2)
    figure.tight_layout()
    _save(figure, out)


def _save(figure, out: str) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    with atomic_file(out, "wb") as handle:
        handle.write(buffer.getvalue())


def row_correlations(scores: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Mean over rows (queries) of the Spearman and Pearson correlations of two (Q, N) score matrices."""
    pairs = [(spearmanr(a, b).statistic, pearsonr(a, b).statistic) for a, b in zip(scores, reference, strict=True)]
    spearman, pearson = np.mean(pairs, axis=0)
    return float(spearman), float(pearson)


def compression_table(
    reference: str, methods: list[str], costs: dict, out_csv: str, out_md: str, plot: str, title: str
) -> list[dict]:
    """One row per method: its K and seed (RapidIn), correlations with method `reference`, bytes per sample."""
    target = zarr.open_group(costs[reference]["scores"], mode="r")["scores"][:]
    rows = []
    for method in methods:
        scores = zarr.open_group(costs[method]["scores"], mode="r")["scores"][:]
        parsed = parse_method(method)
        spearman, pearson = row_correlations(scores, target)
        rows.append(
            {
                "method": method,
                "k": "" if parsed.k is None else parsed.k,
                "seed": "" if parsed.k is None else parsed.seed or 0,
                "spearman": spearman,
                "pearson": pearson,
                "cache_bytes_per_sample": cache_bytes_per_sample(costs[method]),
            }
        )
    columns = ["method", "k", "seed", "spearman", "pearson", "cache_bytes_per_sample"]
    markdown = (
        f"# {title}\n\nCorrelation with {reference} per query over all training samples, mean over queries.\n\n"
        f"{_markdown(rows, columns)}"
    )
    _write_tables(rows, columns, markdown, out_csv, out_md)
    _plot_compression(rows, plot, reference, title)
    return rows


def _plot_compression(rows: list[dict], out: str, reference: str, title: str) -> None:
    """Correlation with the reference against cache bytes per sample: RapidIn per seed, other methods as points."""
    figure, axis = plt.subplots(figsize=(6, 3.8))
    rapidin = [r for r in rows if r["k"] != ""]
    for i, seed in enumerate(sorted({r["seed"] for r in rapidin})):
        points = sorted(
            (r["cache_bytes_per_sample"], r["spearman"], r["pearson"]) for r in rapidin if r["seed"] == seed
        )
        x, spearman, pearson = zip(*points, strict=True)
        axis.plot(x, spearman, "o-", color="#d6453d", alpha=0.7, label=None if i else "RapidIn Spearman")
        axis.plot(x, pearson, "s--", color="#3b6fd6", alpha=0.7, label=None if i else "RapidIn Pearson")
    for row in rows:
        if row["k"] == "" and row["method"] != reference:
            axis.plot(row["cache_bytes_per_sample"], row["spearman"], "k^", label=f"{row['method']} Spearman")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("cache bytes per training sample")
    axis.set_ylabel(f"correlation with {reference}")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=7, frameon=False, loc="lower right")
    figure.tight_layout()
    _save(figure, out)


def write_table(
    study: str,
    methods: list[str],
    costs: dict,
    out_csv: str,
    out_md: str,
    plot: str,
    title: str,
    metrics: list[str] | None = None,
    reference: str | None = None,
) -> list[dict]:
    """The table and plot of `study`: backdoor and error_tracing from each method's metrics.json (`metrics`, in
    order), compression from the methods' scores against `reference`."""
    if study == "backdoor":
        return backdoor_table(methods, metrics, costs, out_csv, out_md, plot, title)
    if study == "error_tracing":
        return error_tracing_table(methods, metrics, costs, out_csv, out_md, plot, title)
    return compression_table(reference, methods, costs, out_csv, out_md, plot, title)
