"""Progress of the long loops (caching, scoring, generation): per-batch updates with rate, tokens/s and ETA.

On a terminal it is a tqdm bar. Otherwise (a snakemake log, a pipe) it writes one plain line per
`interval` seconds, plus the first and the last update, so that the log reads top to bottom and two jobs
sharing a stream never overwrite each other's line with carriage returns.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

LOG_INTERVAL = 15.0  # seconds between two lines when the stream is not a terminal


class Progress:
    """`with Progress(total, "gradients shard0") as bar: … bar.update(batch_size, tokens=n)`.

    Args:
        total: items (samples, rows, queries) to do; initial: items already done (a resumed job).
        unit: the items' name; interval: seconds between log lines (not a terminal); stream: default stderr.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "samples",
        initial: int = 0,
        interval: float = LOG_INTERVAL,
        stream: TextIO | None = None,
    ):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.stream = stream or sys.stderr
        self.done, self.tokens, self._initial = initial, 0, initial
        self._start = self._last_line = time.perf_counter()
        self._last_done = None  # items done at the last line written
        self._bar = None
        if self.stream.isatty() and total > initial:  # nothing to do: no bar
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=f" {unit}", file=self.stream)

    def update(self, n: int, tokens: int = 0) -> None:
        """`n` more items done, `tokens` of them tokens (0 when the loop does not count tokens)."""
        self.done += n
        self.tokens += tokens
        if self._bar is not None:
            if self.tokens:
                self._bar.set_postfix_str(f"{self.tokens / self._elapsed():,.0f} tok/s", refresh=False)
            self._bar.update(n)
        elif (
            self._last_done is None or time.perf_counter() - self._last_line >= self.interval or self.done >= self.total
        ):
            self._write_line()

    def line(self) -> str:
        """The current state in one line: items, percent, rate, tokens/s, elapsed and remaining time."""
        elapsed = self._elapsed()
        rate = (self.done - self._initial) / elapsed
        parts = [f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.done / max(self.total, 1):.0f}%)"]
        parts.append(f"{rate:,.0f} {self.unit}/s" if rate >= 100 else f"{rate:.3g} {self.unit}/s")
        if self.tokens:
            parts.append(f"{self.tokens / elapsed:,.0f} tok/s")
        parts.append(f"elapsed {tqdm.format_interval(elapsed)}")
        if self.done < self.total:
            eta = tqdm.format_interval((self.total - self.done) / rate) if rate > 0 else "?"
            parts.append(f"ETA {eta}")
        return ", ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._last_done not in (None, self.done):  # the last update's line is still due
            self._write_line()

    def _write_line(self) -> None:
        self.stream.write(self.line() + "\n")
        self.stream.flush()
        self._last_line, self._last_done = time.perf_counter(), self.done

    def _elapsed(self) -> float:
        return max(time.perf_counter() - self._start, 1e-9)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
