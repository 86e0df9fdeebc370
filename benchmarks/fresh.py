"""One rapidin call timed in a fresh Python process: its seconds (imports excluded) and that process's peak
resident memory, so that calls at different sizes are measured alike and none inherits another's memory."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

CHILD = """
import importlib, json, re, sys, time
from rapidin.cache.shard import CacheSettings
module, name = sys.argv[1].rsplit(".", 1)
kwargs = json.loads(sys.argv[2])
if "settings" in kwargs:
    kwargs["settings"] = CacheSettings(**kwargs["settings"])
function = getattr(importlib.import_module(module), name)
started = time.perf_counter()
function(**kwargs)
seconds = time.perf_counter() - started
peak_kib = re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)
print(seconds, peak_kib)
"""  # VmHWM: this process's own peak (ru_maxrss would count the parent's memory, inherited at fork)


def time_fresh(function: str, **kwargs) -> tuple[float, int]:
    """Seconds of `function(**kwargs)` ("module.name"; a CacheSettings `settings` is passed on as such) in a fresh
    process, and that process's peak resident memory in bytes."""
    if "settings" in kwargs:
        kwargs["settings"] = dataclasses.asdict(kwargs["settings"])
    command = [sys.executable, "-c", CHILD, function, json.dumps(kwargs)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"{function} failed:\n{result.stderr[-3000:]}")
    seconds, peak_kib = result.stdout.split()[-2:]
    return float(seconds), int(peak_kib) * 1024
