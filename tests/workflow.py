"""Running the workflow in a temporary copy of the project, as a user would."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import zarr

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
RAPIDIN = [sys.executable, "-m", "rapidin"]


def copy_workflow(destination: Path) -> Path:
    """workflow/, config/ and the default profile's link copied to `destination` (outputs then land there)."""
    destination.mkdir(parents=True, exist_ok=True)
    for folder in ("workflow", "config"):
        shutil.copytree(ROOT / folder, destination / folder, dirs_exist_ok=True)
    shutil.copy(ROOT / "profiles", destination, follow_symlinks=False)
    return destination


def copy_run(workdir: Path, destination: Path) -> Path:
    """A finished run's working directory (workflow, results, Snakemake's records) copied with its timestamps."""
    return Path(shutil.copytree(workdir, destination, symlinks=True))


def snakemake(workdir: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SNAKEMAKE, "--cores", "2", *args], cwd=workdir, capture_output=True, text=True, timeout=timeout
    )


def rapidin(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*RAPIDIN, *args], cwd=cwd, capture_output=True, text=True)


def assert_same_influence(results: Path, expected: Path) -> None:
    """Two runs' results/<name> hold bit-identical scores (influence/scores.zarr) and influence/topk.jsonl."""
    scores = [zarr.open_array(r / "influence/scores.zarr/scores", mode="r")[:] for r in (results, expected)]
    assert scores[0].tobytes() == scores[1].tobytes()
    assert (results / "influence/topk.jsonl").read_bytes() == (expected / "influence/topk.jsonl").read_bytes()
