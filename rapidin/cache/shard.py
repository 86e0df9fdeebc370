"""Per-sample gradient vectors of a tokenized dataset, written to a chunked Zarr store (one per shard).

Store layout (Zarr v3 group): one array per compressor output, rows = samples (`k65536`, … for RapidGrad,
`exact` for `compressor: none`), `ids` (global sample indices of the rows), `done` (one flag per row chunk),
and `attrs["rapidin"]` with every setting the vectors depend on. Rows are computed chunk by chunk, each chunk
in token-budgeted batches; a finished chunk is written by a background thread while the next one is
computed. The store is resumable (store.ResumableStore): a killed job rerun with the same settings continues
from the chunks not yet done.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr

from rapidin.data.tokenize import TokenizedDataset
from rapidin.devices import job_device
from rapidin.errors import RapidinError, StoreMismatchError
from rapidin.gradients.capture import ActivationGradientCapture, math_dtype
from rapidin.gradients.compress import SKETCH_VERSION, Compressor, make_compressor
from rapidin.gradients.loss import Batch, masked_batch, weighted_loss
from rapidin.gradients.model import (
    blocks_fingerprint,
    coverage,
    describe_coverage,
    files_fingerprint,
    load_model,
    parameter_blocks,
    resolve_dtype,
    select_modules,
    tokenizer_fingerprint,
)
from rapidin.gradients.optimizer import adam_scales, optimizer_file
from rapidin.progress import Progress
from rapidin.score.tokenwise import TokenRows
from rapidin.settings import CacheSettings
from rapidin.store import ResumableStore, vector_dims

log = logging.getLogger(__name__)

STORE_DTYPES = {"float16": np.float16, "float32": np.float32}
ON_NONFINITE = ("error", "skip")
CHUNK_BYTES = 16 << 20


def sample_gradients(model, modules, compressor: Compressor, batch: Batch, weights: torch.Tensor) -> dict:
    """Per-sample compressed gradients of Σ_t weights[b, t] ℓ[b, t] for each sample b of the batch.

    A sample whose loss or vector is not finite gets an all-NaN row.
    """
    compressor.start(batch.input_ids.shape[0], batch.input_ids.device, math_dtype(model))
    with ActivationGradientCapture(model, modules, compressor.blocks, compressor.receive):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
        losses = weighted_loss(logits, batch, weights)  # (B,)
        losses.sum().backward()
    outputs = compressor.finish()
    bad = ~torch.isfinite(losses.detach())
    for vectors in outputs.values():
        bad |= ~torch.isfinite(vectors).all(dim=1)
    for vectors in outputs.values():
        vectors[bad] = float("nan")
    return outputs


def token_budget_batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Group positions into batches, longest first, so that batch size × longest length ≤ batch_tokens."""
    order = np.argsort(-lengths, kind="stable")
    batches, current = [], []
    for position in order:
        if current and (len(current) + 1) * lengths[current[0]] > batch_tokens:
            batches.append(np.asarray(current))
            current = []
        current.append(position)
    batches.append(np.asarray(current))
    return batches


def shard_rows(n_samples: int, shard: int, n_shards: int) -> tuple[int, int]:
    """Contiguous [start, stop) rows of one shard; the first n_samples % n_shards shards get one more."""
    if n_shards > n_samples:
        raise RapidinError(f"cache.n_shards: {n_shards} shards for only {n_samples} samples")
    if not 0 <= shard < n_shards:
        raise RapidinError(f"shard {shard} is outside 0…{n_shards - 1}")
    bounds = np.linspace(0, n_samples, n_shards + 1).round().astype(int)
    return int(bounds[shard]), int(bounds[shard + 1])


def cache_gradients(
    tokens: str,
    model_path: str,
    out: str,
    settings: CacheSettings,
    adapter: str | None = None,
    shard: int = 0,
    n_shards: int = 1,
    device: str = "auto",
    per_token: bool = False,
    samples: list[int] | None = None,
) -> None:
    """Compute one shard's per-sample gradient vectors into a Zarr store at `out`.

    Rows are computed, written and flagged done `settings.chunk_rows` at a time (default: about 16 MiB of vectors).

    With `per_token`, the rows are the response tokens of `samples` (default: every sample), each the gradient
    of that token's loss alone (score.tokenwise.TokenRows), with their `sample_index` and `token_position`.
    """
    job = open_shard(tokens, model_path, settings, adapter, shard, n_shards, device, per_token, samples)
    chunks = job.chunks()
    ids, chunk_rows, dtype = np.arange(job.start, job.stop), len(chunks[0]), STORE_DTYPES[settings.dtype]
    check_room(out, len(ids) * sum(job.compressor.arrays.values()) * np.dtype(dtype).itemsize)

    def create(group: zarr.Group) -> None:
        for name, dim in job.compressor.arrays.items():
            group.create_array(
                name,
                shape=(len(ids), dim),
                chunks=(chunk_rows, dim),
                dtype=dtype,
                compressors=None,
                dimension_names=vector_dims(name),
            )
        group.create_array("ids", data=ids, dimension_names=("row",))
        if per_token:
            rows = slice(job.start, job.stop)
            group.create_array("sample_index", data=job.dataset.sample_index[rows], dimension_names=("row",))
            group.create_array("token_position", data=job.dataset.token_position[rows], dimension_names=("row",))

    store = ResumableStore(out, {**job.stamp, "chunk_rows": chunk_rows}, len(chunks), create)

    def write(chunk: int, vectors: dict[str, np.ndarray]) -> None:
        lo = chunk * chunk_rows
        for name, values in vectors.items():
            store.group[name][lo : lo + len(values)] = values
        store.mark_done(chunk)

    job.compute(chunks, store.remaining(), write, f"gradients {Path(out).name}")
    store.publish()


def gradient_space(model, settings: CacheSettings) -> tuple[dict, list, Compressor]:
    """The modules whose parameters form the gradient space, their blocks, and the compressor of their vectors."""
    if settings.on_nonfinite not in ON_NONFINITE:
        raise RapidinError(f"cache.on_nonfinite: {settings.on_nonfinite!r} is not one of {ON_NONFINITE}")
    modules = select_modules(model, settings.modules, settings.parameters)
    blocks = parameter_blocks(modules)
    compressor = make_compressor(
        settings.compressor, blocks, list(settings.k), settings.seed, settings.normalize, settings.rank
    )
    return modules, blocks, compressor


@dataclass
class ShardJob:
    """One shard's rows [start, stop) of a dataset, the model and compressor that turn them into vectors and
    the settings `stamp` of those vectors: what caching and on-the-fly scoring (rapidin.score.stream) share."""

    dataset: TokenizedDataset | TokenRows
    model: torch.nn.Module
    modules: dict
    compressor: Compressor
    pad_id: int
    stamp: dict
    start: int
    stop: int
    settings: CacheSettings

    def chunks(self) -> list[np.ndarray]:
        """The shard's global rows in chunks of `cache.chunk_rows` (default: about 16 MiB of `cache.dtype` vectors)."""
        ids = np.arange(self.start, self.stop)
        row_bytes = max(self.compressor.arrays.values()) * np.dtype(STORE_DTYPES[self.settings.dtype]).itemsize
        chunk_rows = min(len(ids), self.settings.chunk_rows or max(1, CHUNK_BYTES // row_bytes))
        return [ids[lo : lo + chunk_rows] for lo in range(0, len(ids), chunk_rows)]

    def compute(self, chunks: list[np.ndarray], todo: list[int], write, desc: str) -> None:
        """The vectors of chunks `todo` (indices into `chunks`), each handed to write(chunk, vectors) on a
        background thread while the next chunk is computed."""
        done = self.stop - self.start - sum(len(chunks[c]) for c in todo)
        with (
            ThreadPoolExecutor(max_workers=1) as pool,
            Progress(self.stop - self.start, desc, initial=done) as bar,
        ):
            pending = None
            for chunk in todo:
                rows = chunks[chunk]
                vectors = _chunk_gradients(
                    self.model,
                    self.modules,
                    self.compressor,
                    self.dataset,
                    rows,
                    self.settings.batch_tokens,
                    self.pad_id,
                    bar,
                    self.settings.on_nonfinite,
                )
                if pending is not None:
                    pending.result()
                pending = pool.submit(write, chunk, vectors)  # the next chunk is computed while this one is written
            if pending is not None:
                pending.result()


def open_shard(
    tokens: str,
    model_path: str,
    settings: CacheSettings,
    adapter: str | None = None,
    shard: int = 0,
    n_shards: int = 1,
    device: str = "auto",
    per_token: bool = False,
    samples: list[int] | None = None,
) -> ShardJob:
    """One shard's data, model (on the job's device) and compressor, with the settings their vectors depend on."""
    dataset = TokenizedDataset.open(tokens)
    if per_token:
        dataset = TokenRows(dataset, samples)
    start, stop = shard_rows(len(dataset), shard, n_shards)
    torch_device = job_device(device)  # with several GPUs, a leased one (devices.py)
    model, tokenizer = load_model(model_path, adapter, resolve_dtype(settings.model_dtype, torch_device), torch_device)
    if dataset.settings["tokenizer"] != tokenizer_fingerprint(tokenizer):
        raise StoreMismatchError(f"{tokens} was tokenized with a different tokenizer than {model_path}'s")
    modules, blocks, compressor = gradient_space(model, settings)
    optimizer = optimizer_stamp(model, blocks, compressor, settings, adapter or model_path)
    cover = coverage(model, blocks, settings.parameters)
    log.info("%s", describe_coverage(cover))
    stamp = {
        "compressor": settings.compressor,
        "k": list(settings.k) if settings.compressor == "rapidgrad" else [],
        "rank": settings.rank if settings.compressor == "factored" else None,
        "seed": settings.seed,
        "dtype": settings.dtype,
        "normalize": settings.normalize,
        "modules": settings.modules,
        "model": files_fingerprint(model_path),
        "adapter": files_fingerprint(adapter),
        "tokenizer": dataset.settings["tokenizer"],
        "template": dataset.settings["template"],
        "max_length": dataset.settings["max_length"],
        "parameters": blocks_fingerprint(blocks),
        "n_parameter_tensors": len(blocks),
        "coverage": cover,
        "D": compressor.dim,
        "sketch_version": SKETCH_VERSION,
        "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": torch_device.type,
        "loss": "token" if per_token else "mean_response",
        "samples": samples,
        "rows": [start, stop],
        "n_samples": len(dataset),
        "tokens": tokens_fingerprint(dataset, range(start, stop)),
        **optimizer,
    }
    log.info(
        "shard %d/%d: rows %d…%d, D=%d, arrays %s", shard, n_shards, start, stop, compressor.dim, compressor.arrays
    )
    return ShardJob(dataset, model, modules, compressor, tokenizer.pad_token_id, stamp, start, stop, settings)


def optimizer_stamp(model, blocks, compressor: Compressor, settings: CacheSettings, directory: str) -> dict:
    """cache.optimizer adam: give the compressor the per-block scales 1/(√v̂ + ε) of `directory`'s optimizer.pt;
    returns what the vectors then also depend on (`optimizer`, `optimizer_state`: the state file's fingerprint),
    nothing for `none` (so stores made before the setting existed still agree)."""
    if settings.optimizer == "none":
        return {}
    if settings.optimizer != "adam":
        raise RapidinError(f"cache.optimizer: {settings.optimizer!r} is not one of ('none', 'adam')")
    path = optimizer_file(directory)
    compressor.set_scales(adam_scales(model, blocks, path))
    log.info("gradients divided elementwise by sqrt(v_hat) + eps of %s", path)
    return {"optimizer": settings.optimizer, "optimizer_state": file_fingerprint(path)}


def file_fingerprint(path: Path) -> str:
    """A cheap content fingerprint of one file: its size, first and last MiB."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with path.open("rb") as handle:
        digest.update(handle.read(1 << 20))
        handle.seek(max(0, size - (1 << 20)))
        digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


def check_room(out: str, n_bytes: int) -> None:
    """Refuse, before computing anything, a cache that would not fit the free disk where it goes."""
    where = Path(out).resolve().parent
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if n_bytes > free:
        raise RapidinError(
            f"cache.store: {out} needs {n_bytes / 2**30:.2f} GiB but {where} has {free / 2**30:.2f} GiB free;"
            " lower cache.k (or cache.rank), keep cache.dtype float16, or set cache.store: false"
        )


def tokens_fingerprint(dataset, rows) -> str:
    """A hash of the rows' token ids and loss masks: a partial store made from other data is not resumed."""
    digest = hashlib.sha256()
    for row in rows:
        ids, _ = dataset.sample(row)
        digest.update(np.int64(len(ids)).tobytes() + np.asarray(ids, np.int64).tobytes())
        digest.update(np.asarray(dataset.loss_mask_of(row), bool).tobytes())
    return digest.hexdigest()[:16]


def loss_batch(dataset, rows, pad_id: int, device) -> tuple[Batch, torch.Tensor]:
    """The dataset rows as one Batch on `device`, with (B, T-1) weights averaging each row's loss over its loss mask."""
    batch, weights = masked_batch([(*dataset.sample(row), dataset.loss_mask_of(row)) for row in rows], pad_id)
    return batch.to(device), weights.to(device)


def _chunk_gradients(
    model,
    modules,
    compressor,
    dataset,
    rows,
    batch_tokens,
    pad_id,
    progress: Progress | None = None,
    on_nonfinite: str = "error",
) -> dict[str, np.ndarray]:
    """Vectors for the given global rows, in row order: {array name: (len(rows), dim) float32}.

    Each row's gradient is that of its mean loss over its loss mask: the response, a query's targets, or one token.
    `progress` is told each batch's rows and (unpadded) tokens. A row with a non-finite loss or gradient is an
    error, or with `on_nonfinite="skip"` a logged all-NaN row.
    """
    device = next(model.parameters()).device
    lengths = np.array([dataset.length(i) for i in rows])
    result = {name: np.zeros((len(rows), dim), np.float32) for name, dim in compressor.arrays.items()}
    for positions in token_budget_batches(lengths, batch_tokens):
        batch, weights = loss_batch(dataset, [rows[p] for p in positions], pad_id, device)
        for name, vectors in sample_gradients(model, modules, compressor, batch, weights).items():
            result[name][positions] = vectors.float().cpu().numpy()
        if progress is not None:
            progress.update(len(positions), tokens=int(lengths[positions].sum()))
    bad = [int(rows[p]) for p in np.flatnonzero(np.isnan(next(iter(result.values()))).any(axis=1))]
    if bad and on_nonfinite == "error":
        raise RapidinError(
            f"row {bad[0]}: non-finite loss or gradient ({len(bad)} such rows among rows {rows[0]}…{rows[-1]}); "
            "cache.on_nonfinite: skip writes them as NaN rows"
        )
    if bad:
        log.warning("skipped %d rows with a non-finite loss or gradient (written as NaN): %s", len(bad), bad)
    return result
