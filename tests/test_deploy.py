"""The workflow deployed as others deploy catalog workflows: run from another directory (`snakemake -s …`) and
used as a Snakemake module (`module rapidin: snakefile: …; use rule * from rapidin`), outputs landing in the
user's directory and nowhere else."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from .workflow import ROOT, SNAKEMAKE

pytestmark = pytest.mark.slow

TARGET = "results/away/cache/queries.zarr/zarr.json"


@pytest.fixture
def user_dir(model_and_tokens, tmp_path) -> Path:
    """A user's directory with a model, data and a config, and no copy of the workflow."""
    shutil.copytree(model_and_tokens / "model", tmp_path / "model")
    for split in ("train", "queries"):
        shutil.copy(model_and_tokens / f"{split}.jsonl", tmp_path / f"{split}.jsonl")
    config = {
        "name": "away",
        "model": {"path": "model"},
        "data": {"train": "train.jsonl", "queries": "queries.jsonl", "max_length": 256},
        "cache": {"k": 1024, "n_shards": 1},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SNAKEMAKE, "--cores", "2", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def written(directory: Path) -> set[Path]:
    return {p.relative_to(directory) for p in directory.rglob("*") if ".snakemake" not in p.parts}


def test_runs_from_another_directory(user_dir):
    before = written(ROOT)
    result = run(user_dir, "-s", str(ROOT / "workflow/Snakefile"), TARGET, "--configfile", "config.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (user_dir / TARGET).is_file()
    assert written(ROOT) == before  # nothing written into the checkout


def test_used_as_a_snakemake_module(user_dir):
    (user_dir / "Snakefile").write_text(
        'configfile: "config.yaml"\n\n\n'
        f"module rapidin:\n    snakefile:\n        {str(ROOT / 'workflow/Snakefile')!r}\n"
        "    config:\n        config\n\n\n"
        "use rule * from rapidin\n"
    )
    dry = run(user_dir, "--dry-run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "make_demo_data" not in dry.stdout and "cache_train_grads" in dry.stdout  # the user's model, not the demo
    result = run(user_dir, TARGET)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (user_dir / TARGET).is_file() and not (user_dir / "workflow").exists()
