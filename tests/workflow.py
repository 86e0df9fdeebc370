"""Running the workflow in a temporary copy of the project, as a user would."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def copy_workflow(destination: Path) -> Path:
    """The Snakefile, workflow/ and config/ copied to `destination` (outputs then land there)."""
    destination.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "Snakefile", destination)
    for folder in ("workflow", "config"):
        shutil.copytree(ROOT / folder, destination / folder, dirs_exist_ok=True)
    return destination


def snakemake(workdir: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SNAKEMAKE, "--cores", "2", *args], cwd=workdir, capture_output=True, text=True, timeout=timeout
    )


def rapidin(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rapidin", *args], cwd=cwd, capture_output=True, text=True)
