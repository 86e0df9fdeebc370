"""Several checkpoints (TracInCP, method.md §8): the `model.checkpoints` list and the sum of their scores.

I(s, t) = Σ_c η_c ⟨g_c(s), g_c(t)⟩, each g_c layer-normalised at checkpoint c's weights. Each checkpoint has
its own cache and merged score store (same seed, parameter layout and queries); `combine_scores` adds the
merged stores with weights η_c into one store laid out like `influence/scores.zarr` (or a per-token
`token_scores.zarr`), top-k and bottom-k recomputed, so everything downstream reads it unchanged.

η_c is the checkpoint's `lr` if given, else the last `learning_rate` in its `trainer_state.json`'s
`log_history` (a Hugging Face Trainer logs it every `logging_steps`; the demo logs each epoch's mean), else,
when no checkpoint has either, 1/C for each of the C checkpoints (their mean). Token-aggregated stores
(score.aggregate tokens: each checkpoint's mean |z| of its standardised token scores) are averaged, 1/C each:
standardised at every checkpoint, they carry no step size for η_c to scale (`checkpoint_weights`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from rapidin.errors import RapidinError
from rapidin.score.scores import SHARED_FIELDS, running_topk
from rapidin.store import RANK_DIMS, SCORE_DIMS, atomic_dir, check_agree, read_settings, write_settings

# Settings the checkpoints' score stores must share: all but the weights they were computed at (and the optimizer
# state saved with those weights, for cache.optimizer adam).
PER_CHECKPOINT_FIELDS = ("model", "adapter", "optimizer_state")
COMBINED_FIELDS = (
    *(f for f in SHARED_FIELDS if f not in PER_CHECKPOINT_FIELDS),
    "array",
    "aggregation",
    "top_k",
    "n_queries",
    "n_samples",
)
COLUMN_BYTES = 64 << 20  # scores read per checkpoint at a time


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint directory (full model or adapter) and its weight η in the sum."""

    path: str
    lr: float


def resolve_checkpoints(entries: list[dict]) -> list[Checkpoint]:
    """`model.checkpoints` entries ({path, optional lr}) → checkpoints with their weights."""
    if not entries:
        raise RapidinError("model.checkpoints: the list is empty")
    paths, lrs = [], []
    for i, entry in enumerate(entries):
        key = f"model.checkpoints[{i}]"
        path = Path(entry["path"])
        if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
            raise RapidinError(f"{key}: {path} is not a model or adapter directory (no config.json)")
        lr = entry.get("lr")
        if lr is None:
            lr = _logged_learning_rate(path / "trainer_state.json", key)
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 <= lr < math.inf):
            raise RapidinError(f"{key}: lr {lr!r} is not a finite number ≥ 0")
        paths.append(str(path))
        lrs.append(lr)
    if all(lr is None for lr in lrs):
        return [Checkpoint(path, 1 / len(paths)) for path in paths]
    if None in lrs:
        i = lrs.index(None)
        raise RapidinError(
            f"model.checkpoints[{i}]: no lr and no learning_rate in {paths[i]}/trainer_state.json; "
            "give lr for every checkpoint or for none (equal weights)"
        )
    if sum(lrs) == 0:
        raise RapidinError("model.checkpoints: every lr is 0")
    return [Checkpoint(path, float(lr)) for path, lr in zip(paths, lrs, strict=True)]


def _logged_learning_rate(path: Path, key: str) -> float | None:
    """The last `learning_rate` logged in a Trainer's trainer_state.json, or None without one."""
    if not path.is_file():
        return None
    try:
        history = json.loads(path.read_text())["log_history"]
        logged = [entry["learning_rate"] for entry in history if "learning_rate" in entry]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise RapidinError(f"{key}: {path} is not a Trainer state with a log_history: {error}") from None
    return logged[-1] if logged else None


def checkpoint_weights(checkpoints: list[Checkpoint], stores: list[str]) -> list[float]:
    """Each checkpoint's weight in the sum of its score store: η_c, or 1/C for token-aggregated stores."""
    if "aggregation" in read_settings(stores[0]):
        return [1 / len(checkpoints)] * len(checkpoints)
    return [c.lr for c in checkpoints]


def combine_scores(stores: list[str], weights: list[float], out: str) -> None:
    """Write Σ_c weights[c] · scores_c of merged score stores (rows × samples, same layout) to `out`.

    Sums in fp64, `COLUMN_BYTES` of each store's columns at a time; the top-k and bottom-k per row are those of
    the sum (score.running_topk). `attrs["rapidin"]` is the first store's, plus `checkpoints`: each store's
    model and adapter fingerprints, optimizer state (if any) and weight.
    """
    if len(stores) != len(weights) or not stores:
        raise RapidinError(f"combine_scores: {len(stores)} score stores but {len(weights)} weights")
    groups = [zarr.open_group(s, mode="r") for s in stores]
    settings = [dict(g.attrs["rapidin"]) for g in groups]
    for store, setting in zip(stores[1:], settings[1:], strict=True):
        check_agree(settings[0], setting, COMBINED_FIELDS, stores[0], store)
    arrays = [g["scores"] for g in groups]
    n_queries, n = arrays[0].shape
    chunk = arrays[0].chunks[1]
    step = chunk * max(1, COLUMN_BYTES // (8 * n_queries * chunk))  # whole column chunks
    with atomic_dir(out) as tmp:
        result = zarr.open_group(tmp, mode="w", zarr_format=3)
        combined = result.create_array(
            "scores", shape=(n_queries, n), chunks=arrays[0].chunks, dtype=np.float32, dimension_names=SCORE_DIMS
        )
        for lo in range(0, n, step):
            total = sum(w * a[:, lo : lo + step].astype(np.float64) for a, w in zip(arrays, weights, strict=True))
            combined[:, lo : lo + step] = total.astype(np.float32)  # (Q, step)
        for name, (positions, values) in running_topk(combined, settings[0]["top_k"]).items():
            result.create_array(f"{name}_ids", data=positions, dimension_names=RANK_DIMS)
            result.create_array(f"{name}_scores", data=values, dimension_names=RANK_DIMS)
        for name in ("query", "sample", "query_index", "token_position"):  # coordinates; per-token stores' rows
            if name in groups[0]:
                result.create_array(
                    name, data=groups[0][name][:], dimension_names=(name if name == "sample" else "query",)
                )
        sources = [
            {**{f: s[f] for f in PER_CHECKPOINT_FIELDS if f in s}, "weight": float(w)}
            for s, w in zip(settings, weights, strict=True)
        ]
        write_settings(result, {**settings[0], "checkpoints": sources})
