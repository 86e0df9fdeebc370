"""One GPU per job on a multi-GPU node: an exclusive, crash-safe lease on a device index.

With `--device auto` and several visible CUDA devices, a job locks `device-<i>.lock` (fcntl.flock) for the
first free index i in a lease directory shared by the node's jobs and keeps it for its lifetime. The kernel
drops a flock when its holder dies, so a crashed job never strands a device. Snakemake's `--resources gpu=N`
bounds how many jobs run at once; the lease decides which GPU each one takes. When CUDA_VISIBLE_DEVICES
narrows a job to one device (as SLURM does), that device is used as is.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

from rapidin.gradients.model import resolve_device

log = logging.getLogger(__name__)

_held: DeviceLease | None = None  # this process's lease, held until it exits


@dataclass
class DeviceLease:
    """An exclusive claim on device `index`, held while `handle` (a locked file) is open."""

    index: int
    handle: IO[str]

    def release(self) -> None:
        self.handle.close()  # closing the file drops the flock


def lease_directory() -> Path:
    """$RAPIDIN_LEASE_DIR, or /tmp/rapidin-leases-<uid>; one subdirectory per set of visible devices."""
    base = os.environ.get("RAPIDIN_LEASE_DIR") or f"/tmp/rapidin-leases-{os.getuid()}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all").replace("/", "_")
    return Path(base) / f"visible-{visible}"


def lease_device(n_devices: int, directory: str | Path, poll_seconds: float = 1.0) -> DeviceLease:
    """Lock the first free index of 0 … n_devices-1 in `directory`; wait while all are taken."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    waiting = False
    while True:
        for index in range(n_devices):
            handle = open(directory / f"device-{index}.lock", "a")  # noqa: SIM115 (held beyond this function)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            return DeviceLease(index, handle)
        if not waiting:
            log.info("all %d devices are leased by other jobs (%s); waiting for one", n_devices, directory)
            waiting = True
        time.sleep(poll_seconds)


def job_device(device: str = "auto") -> torch.device:
    """The torch device of this job: with `auto` and several GPUs, a leased one; otherwise `resolve_device`."""
    global _held
    if device != "auto" or not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return resolve_device(device)
    if _held is None:
        _held = lease_device(torch.cuda.device_count(), lease_directory())
        log.info("leased cuda:%d of %d visible devices", _held.index, torch.cuda.device_count())
    return torch.device("cuda", _held.index)
