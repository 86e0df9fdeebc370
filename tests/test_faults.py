"""Faults: caching, scoring and the workflow killed with SIGKILL resume from their last finished chunk and end
bit-identical to an uninterrupted run; a full disk leaves a resumable store; stores made with other settings
are started over (partial) or refused (complete), naming the field."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
import zarr.storage._local

from rapidin.cli import main
from rapidin.store import STOP_AFTER_CHUNK

from .conftest import error_line
from .workflow import RAPIDIN, SNAKEMAKE, assert_same_influence, copy_run, snakemake

N_CHUNKS = 100  # shard 0 of 3 of the 300 training samples, one row per chunk


@pytest.fixture(scope="module")
def grads_args(model_and_tokens) -> list[str]:
    """`rapidin grads` arguments without --out: 100 rows in 100 chunks, two sketch sizes."""
    return [
        "grads",
        *("--tokens", str(model_and_tokens / "tokens/train.zarr"), "--model", str(model_and_tokens / "model")),
        *("--k", "1024", "4096", "--shard", "0", "--n-shards", "3", "--chunk-rows", "1"),
    ]


@pytest.fixture(scope="module")
def reference(grads_args, tmp_path_factory) -> Path:
    """The cache computed without interruption."""
    out = tmp_path_factory.mktemp("reference") / "cache.zarr"
    run_in_process(*grads_args, "--out", str(out))
    return out


def run_in_process(*args: str) -> None:
    """`rapidin --threads 1 *args` without an interpreter's start-up; torch's thread count is restored after."""
    threads = torch.get_num_threads()
    try:
        main(["--threads", "1", *args])
    finally:
        torch.set_num_threads(threads)


def chunks_done(partial: Path) -> int | None:
    """Chunks flagged done in a partial store; None until the store is fully created (its settings come last)."""
    try:
        group = zarr.open_group(partial, mode="r")
        return int(group["done"][:].sum()) if "rapidin" in group.attrs else None
    except FileNotFoundError:
        return None


def wait_for_chunks(process: subprocess.Popen, partials: list[Path], at_least: int) -> None:
    """Poll until one of the partial stores has `at_least` chunks done; the process must still be running."""
    while not any((done := chunks_done(p)) is not None and done >= at_least for p in partials):
        assert process.poll() is None, f"the job ended before {at_least} chunks were done"
        time.sleep(0.002)


def run_and_kill(args: list[str], out: Path, stop_after: int, log: Path) -> int:
    """Run `rapidin --threads 1 *args --out out` until it SIGKILLs itself with `stop_after` chunks flagged done
    (the test hook of rapidin.store.ResumableStore); the chunks done."""
    env = {**os.environ, STOP_AFTER_CHUNK: str(stop_after)}
    with log.open("w") as stderr:
        result = subprocess.run([*RAPIDIN, "--threads", "1", *args, "--out", str(out)], stderr=stderr, env=env)
    assert result.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    return chunks_done(Path(f"{out}.partial"))


def done_chunk_mtimes(store: Path, array: str, chunk_file: str) -> dict[int, int]:
    """Modification times of the files of the chunks flagged done; `chunk_file` formats a chunk's file path."""
    done = zarr.open_array(store / "done", mode="r")[:]
    return {int(c): (store / array / "c" / chunk_file.format(c)).stat().st_mtime_ns for c in np.flatnonzero(done)}


def assert_same_store(a: Path, b: Path) -> None:
    """Same settings and bit-identical arrays."""
    group_a, group_b = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    assert dict(group_a.attrs) == dict(group_b.attrs)
    assert sorted(group_a.array_keys()) == sorted(group_b.array_keys())
    for name in group_a.array_keys():
        assert group_a[name][:].tobytes() == group_b[name][:].tobytes(), name


def test_killed_caching_resumes_from_its_last_chunk(grads_args, reference, tmp_path, caplog):
    out, partial = tmp_path / "cache.zarr", tmp_path / "cache.zarr.partial"
    kept, done = {}, None
    for stop_after in (0, N_CHUNKS // 3, N_CHUNKS - 1):  # right after the store is created, a third in, at the end
        log = tmp_path / f"{stop_after}.log"
        new_done = run_and_kill(grads_args, out, stop_after, log)
        if done is not None:
            assert f"resuming {partial}: {done} of {N_CHUNKS} chunks done" in log.read_text()
        done = new_done
        assert done == stop_after
        mtimes = done_chunk_mtimes(partial, "k4096", "{}/0")
        assert {c: mtimes[c] for c in kept} == kept  # chunks done before were not written again
        kept = mtimes
    assert not out.exists()

    caplog.set_level(logging.INFO)
    run_in_process(*grads_args, "--out", str(out))
    assert f"resuming {partial}: {done} of {N_CHUNKS} chunks done" in caplog.text
    assert {c: (out / "k4096/c" / f"{c}/0").stat().st_mtime_ns for c in kept} == kept
    assert not partial.exists()
    assert_same_store(out, reference)


def test_killed_scoring_resumes_from_its_last_chunk(reference, tmp_path, caplog):
    # The training cache doubles as the queries: any store made with the same settings will do.
    args = ["score", "--queries", str(reference), "--cache", str(reference), "--top-k", "5"]
    expected, out, partial = tmp_path / "expected.zarr", tmp_path / "scores.zarr", tmp_path / "scores.zarr.partial"
    run_in_process(*args, "--out", str(expected))

    done = run_and_kill(args, out, N_CHUNKS // 3, tmp_path / "killed.log")
    assert done == N_CHUNKS // 3
    kept = done_chunk_mtimes(partial, "scores", "0/{}")
    caplog.set_level(logging.INFO)
    run_in_process(*args, "--out", str(out))
    assert f"resuming {partial}: {done} of {N_CHUNKS} chunks done" in caplog.text
    assert {c: (out / "scores/c" / f"0/{c}").stat().st_mtime_ns for c in kept} == kept
    assert_same_store(out, expected)


def test_scoring_starts_over_a_partial_scored_from_rows_of_another_dtype(reference, tmp_path, caplog):
    """Scores killed a third in against the float16 cache, resumed against the same samples cached in float32
    (`cache.dtype` changed): the partial's float16 scores are not kept; the result is that of a fresh run."""
    wide = Path(shutil.copytree(reference, tmp_path / "wide.zarr"))
    group = zarr.open_group(wide, mode="r+")
    rng = np.random.default_rng(0)
    for name in ("k1024", "k4096"):
        rows = group[name][:].astype(np.float32)  # (N, K), then moved off the float16 grid
        rows += rng.standard_normal(rows.shape, dtype=np.float32) * np.abs(rows).mean()
        group.create_array(name, data=rows, chunks=(1, rows.shape[1]), compressors=None, overwrite=True)
    group.attrs["rapidin"] = {**group.attrs["rapidin"], "dtype": "float32"}
    args = ["score", "--queries", str(reference), "--top-k", "5"]
    expected, out, partial = tmp_path / "expected.zarr", tmp_path / "scores.zarr", tmp_path / "scores.zarr.partial"
    run_in_process(*args, "--cache", str(wide), "--out", str(expected))

    assert run_and_kill([*args, "--cache", str(reference)], out, N_CHUNKS // 3, tmp_path / "killed.log") > 0
    caplog.set_level(logging.INFO)
    run_in_process(*args, "--cache", str(wide), "--out", str(out))
    assert f"{partial} was made with other settings (cache_dtype): starting over" in caplog.text
    assert_same_store(out, expected)


def test_partial_store_made_otherwise_is_started_over_and_caching_is_deterministic(
    grads_args, reference, model_and_tokens, tmp_path, caplog
):
    """A run killed with another seed and other token data (one token changed, as an edited training file would
    give) is not resumed with the current ones; the fresh run is bit-identical to the reference run."""
    tokens = Path(shutil.copytree(model_and_tokens / "tokens/train.zarr", tmp_path / "tokens.zarr"))
    input_ids = zarr.open_array(tokens / "input_ids", mode="r+")
    input_ids[5] = (input_ids[5] + 1) % 100
    out, partial = tmp_path / "cache.zarr", tmp_path / "cache.zarr.partial"
    other = [*grads_args, "--seed", "1", "--tokens", str(tokens)]
    assert run_and_kill(other, out, N_CHUNKS // 3, tmp_path / "killed.log") > 0

    run_in_process(*grads_args, "--out", str(out))
    assert f"{partial} was made with other settings (seed, tokens): starting over" in caplog.text
    assert_same_store(out, reference)


def test_full_disk_leaves_a_resumable_store(grads_args, reference, tmp_path, monkeypatch, capsys, caplog):
    out, partial = tmp_path / "cache.zarr", tmp_path / "cache.zarr.partial"
    put = zarr.storage._local._put

    def disk_full_at_chunk_30(path, *args, **kwargs):
        if Path(path).parts[-3:-1] == ("c", "30"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return put(path, *args, **kwargs)

    monkeypatch.setattr(zarr.storage._local, "_put", disk_full_at_chunk_30)
    with pytest.raises(SystemExit) as exited:
        run_in_process(*grads_args, "--out", str(out))
    assert exited.value.code == 1
    assert error_line(capsys).startswith(f"rapidin: error: [Errno 28] No space left on device: '{partial}/k")
    assert not out.exists()
    assert np.flatnonzero(zarr.open_array(partial / "done", mode="r")[:]).tolist() == list(range(30))

    monkeypatch.undo()
    caplog.set_level(logging.INFO)
    run_in_process(*grads_args, "--out", str(out))
    assert f"resuming {partial}: 30 of {N_CHUNKS} chunks done" in caplog.text
    assert_same_store(out, reference)


@pytest.mark.parametrize(("field", "value"), [("model", "0123456789abcdef"), ("k", [4096]), ("seed", 1), ("rank", 8)])
def test_scoring_refuses_a_cache_made_with_other_settings(reference, tmp_path, capsys, field, value):
    """The cache's recorded settings are changed as another run would have written them."""
    cache = Path(shutil.copytree(reference, tmp_path / "cache.zarr"))
    group = zarr.open_group(cache, mode="r+")
    group.attrs["rapidin"] = {**group.attrs["rapidin"], field: value}
    with pytest.raises(SystemExit) as exited:
        main(["score", "--queries", str(reference), "--cache", str(cache), "--out", str(tmp_path / "scores.zarr")])
    assert exited.value.code == 2
    assert error_line(capsys).startswith(f"rapidin: error: {cache} was made with {field}={value!r} but {reference}")
    assert os.listdir(tmp_path) == ["cache.zarr"]


def test_caching_refuses_tokens_made_with_another_tokenizer(grads_args, model_and_tokens, tmp_path, capsys):
    tokens = Path(shutil.copytree(model_and_tokens / "tokens/train.zarr", tmp_path / "tokens.zarr"))
    group = zarr.open_group(tokens, mode="r+")
    group.attrs["rapidin"] = {**group.attrs["rapidin"], "tokenizer": "0123456789abcdef"}
    with pytest.raises(SystemExit) as exited:
        main([*grads_args, "--tokens", str(tokens), "--out", str(tmp_path / "cache.zarr")])
    assert exited.value.code == 2
    assert error_line(capsys).startswith(f"rapidin: error: {tokens} was tokenized with a different tokenizer")
    assert os.listdir(tmp_path) == ["tokens.zarr"]


def test_killed_workflow_reruns_its_incomplete_jobs(tiny_run, tmp_path):
    """SIGKILL to snakemake and its jobs mid-caching (as a crashed node would), then unlock and rerun: the
    caching jobs resume their partial stores, and the scores equal the uninterrupted run's."""
    workdir = copy_run(tiny_run.parents[1], tmp_path / "run")
    results, target = workdir / "results/tiny", "results/tiny/influence/topk.jsonl"
    for step in ("cache/train", "scores", "influence"):  # a run that got as far as caching the queries
        shutil.rmtree(results / step)
    command = [*SNAKEMAKE, target, "--cores", "2", "--configfile", "config/tiny.yaml"]  # --configfile takes 1+
    process = subprocess.Popen(command, cwd=workdir, start_new_session=True, stdout=subprocess.DEVNULL)
    partials = [results / f"cache/train/{shard}.zarr.partial" for shard in ("00000", "00001")]
    wait_for_chunks(process, partials, 1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    left = {p: chunks_done(p) for p in partials if chunks_done(p) is not None}
    assert left

    assert snakemake(workdir, "--unlock").returncode == 0
    result = snakemake(workdir, "--configfile", "config/tiny.yaml", "--rerun-incomplete", target)
    assert result.returncode == 0, result.stderr[-3000:]
    for partial, done in left.items():
        log = results / "logs/cache_train_grads" / partial.name.replace(".zarr.partial", ".log")
        assert f"resuming {partial.relative_to(workdir)}: {done} of 15 chunks done" in log.read_text()  # 150 rows
    assert_same_influence(results, tiny_run)
