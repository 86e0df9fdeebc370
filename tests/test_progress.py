"""Progress reporting: the plain lines written to a log (rates and ETA against a hand-driven clock, one line
per interval), the tqdm bar on a terminal, one update per batch from the gradient loop and per chunk from scoring."""

import io
import re

import numpy as np

from rapidin.cache.shard import _chunk_gradients, token_budget_batches
from rapidin.gradients.compress import ExactCompressor
from rapidin.gradients.model import parameter_blocks, select_modules
from rapidin.progress import Progress
from rapidin.score.scores import score_shard

from .conftest import random_samples, tiny_llama
from .test_score import K, vector_store
from .test_tokenwise import in_memory


class Clock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_give_counts_rates_tokens_and_eta(monkeypatch):
    clock, log = Clock(), io.StringIO()
    monkeypatch.setattr("rapidin.progress.time.perf_counter", clock)
    with Progress(10, "gradients shard0", interval=0, stream=log) as bar:
        clock.now += 10
        bar.update(2, tokens=50)  # 2 samples in 10 s: 0.2/s, 5 tok/s, 8 left: 40 s
        clock.now += 30
        bar.update(8, tokens=150)  # 10 in 40 s
    lines = log.getvalue().splitlines()
    assert lines == [
        "gradients shard0: 2/10 samples (20%), 0.2 samples/s, 5 tok/s, elapsed 00:10, ETA 00:40",
        "gradients shard0: 10/10 samples (100%), 0.25 samples/s, 5 tok/s, elapsed 00:40",
    ]
    assert "\r" not in log.getvalue()


def test_one_line_per_interval_then_the_last(monkeypatch):
    clock, log = Clock(), io.StringIO()
    monkeypatch.setattr("rapidin.progress.time.perf_counter", clock)
    with Progress(100, "scores", "rows", initial=40, interval=15, stream=log) as bar:
        for _ in range(60):  # one row a second
            clock.now += 1
            bar.update(1)
    done = [int(m) for m in re.findall(r": (\d+)/100 rows", log.getvalue())]
    assert done == [41, 56, 71, 86, 100]  # the first update, every 15 s, the end
    assert "1 rows/s" in log.getvalue().splitlines()[-1]  # the resumed 40 rows do not count in the rate


def test_a_loop_broken_off_reports_where_it_stopped(monkeypatch):
    clock, log = Clock(), io.StringIO()
    monkeypatch.setattr("rapidin.progress.time.perf_counter", clock)
    with Progress(5, "generation", "responses", interval=60, stream=log) as bar:
        for _ in range(3):
            clock.now += 1
            bar.update(1, tokens=7)
    assert [line.split(",")[0] for line in log.getvalue().splitlines()] == [
        "generation: 1/5 responses (20%)",
        "generation: 3/5 responses (60%)",
    ]


def test_nothing_to_do_prints_nothing():
    log, terminal = io.StringIO(), Terminal()
    with Progress(0, "generation", stream=log), Progress(4, "gradients", initial=4, stream=terminal):
        pass
    assert log.getvalue() == terminal.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar_with_tokens_per_second():
    terminal = Terminal()
    with Progress(4, "gradients shard0", stream=terminal) as bar:
        bar.update(2, tokens=30)
        bar.update(2, tokens=30)
    assert "\r" in terminal.getvalue() and "4/4" in terminal.getvalue() and "tok/s" in terminal.getvalue()


def test_gradients_report_every_batch_and_its_tokens():
    samples = random_samples(9, lengths=(5, 12))
    dataset = in_memory(samples)
    model = tiny_llama()
    modules = select_modules(model)
    compressor = ExactCompressor(parameter_blocks(modules))
    rows = np.arange(len(samples))
    lengths = np.array([len(ids) for ids, _ in samples])
    batches = token_budget_batches(lengths, 30)
    log = io.StringIO()
    with Progress(len(samples), "gradients", interval=0, stream=log) as bar:
        _chunk_gradients(model, modules, compressor, dataset, rows, 30, 0, progress=bar)
        assert bar.done == len(samples) and bar.tokens == lengths.sum()
    counts = [int(m) for m in re.findall(r": (\d+)/9 samples", log.getvalue())]
    assert len(batches) > 2 and counts == np.cumsum([len(b) for b in batches]).tolist()


def test_scoring_reports_rows_chunk_by_chunk(tmp_path, capsys):
    queries = vector_store(tmp_path / "queries.zarr", np.ones((2, K), np.float16), np.arange(2), 2)
    cache = vector_store(tmp_path / "cache.zarr", np.ones((10, K), np.float16), np.arange(10), 4)
    score_shard(queries, cache, str(tmp_path / "scores.zarr"), 3, device="cpu")
    lines = [line.split(",")[0] for line in capsys.readouterr().err.splitlines() if line.startswith("scores")]
    assert lines == ["scores cache.zarr: 4/10 rows (40%)", "scores cache.zarr: 10/10 rows (100%)"]  # first, last
