"""`rapidin.attribute`: influence scores and top-k in memory, for notebook-sized data.

It runs the workflow's own steps (rapidin.steps) one after the other in a temporary directory: complete the
queries, tokenize, cache the training and query gradients (one shard; with aggregate="tokens", one query row per
response token), score, merge (and aggregate the tokens' scores), top-k. For large runs, use the workflow
(sharded, resumable, on a cluster) or call those steps yourself.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from rapidin import steps
from rapidin.settings import CacheSettings, DataSettings, GenerateSettings, ScoreSettings

SETTINGS = (DataSettings, CacheSettings, ScoreSettings, GenerateSettings)


@dataclass
class Attribution:
    """What `attribute` found: `scores` (queries × training samples), and per query its `helpful` and `harmful`
    samples (rank, index, id, score, text and metadata, as in topk.jsonl), with the `queries` explained."""

    scores: np.ndarray
    queries: list[dict]
    helpful: list[list[dict]]
    harmful: list[list[dict]]
    settings: dict


def _settings(options: dict) -> dict[type, object]:
    """Each keyword option given to the settings dataclass that has a field of that name."""
    by_class = {cls: {} for cls in SETTINGS}
    for name, value in options.items():
        owners = [cls for cls in SETTINGS if name in {f.name for f in dataclasses.fields(cls)}]
        if not owners:
            known = sorted({f.name for cls in SETTINGS for f in dataclasses.fields(cls)})
            raise TypeError(f"attribute() got an unknown setting {name!r} (known: {', '.join(known)})")
        if name == "k":  # one K or several, as in the config
            value = (value,) if isinstance(value, int) else tuple(value)
        by_class[owners[0]][name] = value
    return {cls: cls(**values) for cls, values in by_class.items()}


def _jsonl(data, path: Path) -> str:
    """A data file's path as it is, or records (dicts) written to `path` as JSONL."""
    if isinstance(data, str | Path):
        return str(data)
    path.write_text("".join(json.dumps(record) + "\n" for record in data), encoding="utf-8")
    return str(path)


def attribute(
    model: str | Path,
    train,
    queries,
    adapter: str | Path | None = None,
    device: str = "auto",
    aggregate: str = "response",
    **options,
) -> Attribution:
    """Which training samples made the model say each query's response?

    Args:
        model: a Hugging Face causal LM directory.
        train: the training set: a data file (JSONL, …) or a list of records (dicts: instruction, input, output, …).
        queries: the generations to explain, likewise; a record without `output` is answered by the model first.
        adapter: an optional PEFT adapter directory (gradients over its trainable parameters).
        device: cpu, cuda, cuda:N or auto.
        aggregate: "response" (each query's whole-response gradient) or "tokens" (each response token's scored on
            its own, ranked by the mean |z| of the standardised token scores: config score.aggregate).
        options: any setting by its field name: DataSettings (template, max_length, …), CacheSettings
            (compressor, k, seed, …), ScoreSettings (top_k), GenerateSettings (max_new_tokens, …).

    Example: `rapidin.attribute("models/my-llm", "train.jsonl", [{"instruction": "Hi?", "output": "Howdy!"}],
    k=4096, top_k=5).helpful[0]`.
    """
    if aggregate not in ("response", "tokens"):
        raise ValueError(f"attribute(): aggregate must be 'response' or 'tokens', not {aggregate!r}")
    chosen = _settings(options)
    data, cache, score, generate = (chosen[cls] for cls in SETTINGS)
    model, adapter = str(model), adapter and str(adapter)
    with tempfile.TemporaryDirectory(prefix="rapidin-") as tmp:
        root = Path(tmp)
        train_file = _jsonl(train, root / "train.jsonl")
        query_file = str(root / "queries.jsonl")
        steps.complete_queries(
            _jsonl(queries, root / "given_queries.jsonl"), model, query_file, adapter, data, generate
        )
        per_token = aggregate == "tokens"
        for split, path in (("train", train_file), ("queries", query_file)):
            steps.tokenize(path, model, str(root / f"tokens/{split}.zarr"), data)
            steps.grads(
                str(root / f"tokens/{split}.zarr"),
                model,
                str(root / f"cache/{split}.zarr"),
                adapter,
                cache,
                device=device,
                per_token=per_token and split == "queries",
            )
        steps.score(
            str(root / "cache/queries.zarr"),
            str(root / "cache/train.zarr"),
            str(root / "scores/0.zarr"),
            score,
            device=device,
        )
        merged = root / ("token_scores.zarr" if per_token else "scores.zarr")
        steps.merge([str(root / "scores/0.zarr")], str(root / "cache/queries.zarr"), str(merged))
        if per_token:
            steps.aggregate_tokens(str(merged), str(root / "scores.zarr"))
        steps.topk(str(root / "scores.zarr"), train_file, query_file, str(root / "topk.jsonl"))
        group = zarr.open_group(root / "scores.zarr", mode="r")
        lines = [json.loads(line) for line in (root / "topk.jsonl").read_text(encoding="utf-8").splitlines()]
        return Attribution(
            scores=group["scores"][:],
            queries=[line["query"] for line in lines],
            helpful=[line["helpful"] for line in lines],
            harmful=[line["harmful"] for line in lines],
            settings=dict(group.attrs["rapidin"]),
        )
