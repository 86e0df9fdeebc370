"""The size plan of a run, before any heavy job: N, D, K, bytes per sample, the cache and score bytes, the free
disk where they go, and a refusal (one line naming the key to change) when they would not fit.

D and the numbers stored per sample come from the model built on PyTorch's meta device (no weights are read)
through the gradient space caching uses (cache.shard.gradient_space), so they are the ones the cache will record.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rapidin.cache.shard import STORE_DTYPES, CacheSettings, gradient_space
from rapidin.errors import RapidinError

SCORE_BYTES = np.dtype(np.float32).itemsize
SUGGESTIONS = {"rapidgrad": "lower cache.k", "factored": "lower cache.rank", "none": "set cache.compressor: rapidgrad"}


def gradient_layout(model_path: str, adapter: str | None, settings: CacheSettings) -> tuple[int, dict[str, int]]:
    """D and the arrays caching writes ({name: numbers per sample}) for the model (and PEFT adapter) at these paths."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as error:
        raise RapidinError(f"model.path: {model_path} is not a Hugging Face model directory ({error})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        if adapter:
            from peft import PeftConfig, get_peft_model

            lora = PeftConfig.from_pretrained(adapter)
            lora.inference_mode = False  # trainable, as model.load_model attaches it
            model = get_peft_model(model, lora)
    _, _, compressor = gradient_space(model, settings)
    return compressor.dim, compressor.arrays


@dataclass(frozen=True)
class SizePlan:
    """Sizes in bytes; `cache_bytes` is 0 with `store: false` (the training vectors are never written)."""

    results_dir: str
    n_samples: int
    n_shards: int
    n_queries: int
    n_token_rows: int
    D: int
    arrays: dict[str, int]
    compressor: str
    dtype: str
    store: bool
    bytes_per_sample: int
    cache_bytes: int
    query_bytes: int
    score_bytes: int
    free_bytes: int
    existing_bytes: int

    @property
    def needed_bytes(self) -> int:
        """What the run still has to find room for: its outputs less what results_dir already holds of them."""
        return max(0, self.cache_bytes + self.query_bytes + self.score_bytes - self.existing_bytes)

    def lines(self) -> list[str]:
        where = self.results_dir
        numbers = sum(self.arrays.values())
        cache = f"{size(self.cache_bytes)} in {where}/cache/train" if self.store else "not written (cache.store: false)"
        return [
            f"plan: N = {self.n_samples:,} training samples in {self.n_shards} shards, {self.n_queries:,} queries"
            f" ({self.n_token_rows:,} query tokens scored token-wise)",
            f"plan: D = {self.D:,}, {self.compressor} {', '.join(self.arrays)}: {numbers:,} numbers per sample in "
            f"{self.dtype}, {size(self.bytes_per_sample)} per sample",
            f"plan: training cache {cache}; query cache {size(self.query_bytes)}; scores {size(self.score_bytes)}",
            f"plan: {size(self.needed_bytes)} to write, {size(self.free_bytes)} free in {where} "
            f"({size(self.existing_bytes)} of the outputs already there)",
        ]

    def check(self) -> None:
        """Raise RapidinError, in one line naming the config keys to change, if the outputs would not fit."""
        if self.needed_bytes <= self.free_bytes:
            return
        if self.store and self.needed_bytes - self.cache_bytes <= self.free_bytes:
            dtype = "" if self.dtype == "float16" else ", set cache.dtype: float16"
            raise RapidinError(
                f"cache.store: the training cache of {self.n_samples:,} samples needs {size(self.cache_bytes)} "
                f"({size(self.bytes_per_sample)} each) but {self.results_dir} has {size(self.free_bytes)} free; "
                f"{SUGGESTIONS[self.compressor]}{dtype}, or set cache.store: false to keep only the scores"
            )
        raise RapidinError(
            f"{self.results_dir}: the run needs {size(self.needed_bytes)} (scores of "
            f"{self.n_queries + self.n_token_rows:,} query rows × {self.n_samples:,} samples: {size(self.score_bytes)})"
            f" but only {size(self.free_bytes)} is free there"
        )


def plan(
    n_samples: int,
    n_queries: int,
    D: int,
    arrays: dict[str, int],
    settings: CacheSettings,
    n_shards: int,
    store: bool,
    results_dir: str | Path,
    n_token_rows: int = 0,
) -> SizePlan:
    """The sizes of a run's vectors and scores under `results_dir` (results/<name>), with that file system's free space.

    `D` and `arrays` as gradient_layout gives them; `n_token_rows`: the queries' response tokens when token-wise
    influence is on (each is a query row of its own). Scores count each shard's store and the merged one
    (float32, rows × N each); the per-token vectors of the queries' top samples (a few rows each) are not counted.
    """
    results_dir = Path(results_dir)
    bytes_per_sample = sum(arrays.values()) * np.dtype(STORE_DTYPES[settings.dtype]).itemsize
    rows = n_queries + n_token_rows
    outputs = ["cache/train", "cache/queries.zarr", "cache/token_queries.zarr", "scores", "influence"]
    return SizePlan(
        results_dir=str(results_dir),
        n_samples=n_samples,
        n_shards=n_shards,
        n_queries=n_queries,
        n_token_rows=n_token_rows,
        D=D,
        arrays=dict(arrays),
        compressor=settings.compressor,
        dtype=settings.dtype,
        store=store,
        bytes_per_sample=bytes_per_sample,
        cache_bytes=n_samples * bytes_per_sample if store else 0,
        query_bytes=rows * bytes_per_sample,
        score_bytes=2 * rows * n_samples * SCORE_BYTES,
        free_bytes=shutil.disk_usage(_existing_ancestor(results_dir)).free,
        existing_bytes=sum(_disk_use(results_dir / path) for path in outputs),
    )


def size(n_bytes: int) -> str:
    """Bytes in binary units: 512 B, 1.5 KiB, 7.0 GiB."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            return f"{n_bytes} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB"


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _disk_use(path: Path) -> int:
    """Bytes of the files under `path` (0 if it does not exist)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0
