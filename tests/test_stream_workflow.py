"""`cache.store: false` through the workflow: the tiny run's scores, top-k and metrics again without writing
any training cache, from the same model and token stores."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml
import zarr

from .workflow import copy_run, snakemake

pytestmark = pytest.mark.slow


def test_streaming_gives_the_cached_scores_without_a_training_cache(tiny_run, tmp_path):
    workdir = copy_run(tiny_run.parents[1], tmp_path / "stream")
    results = workdir / "results/tiny"
    for path in ("cache/train", "scores", "influence", "metrics.json", "report"):
        shutil.rmtree(results / path) if (results / path).is_dir() else (results / path).unlink()
    config = yaml.safe_load((workdir / "config/tiny.yaml").read_text())
    config["cache"]["store"] = False
    (workdir / "stream.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(workdir, "--configfile", "stream.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (results / "logs/stream_shard/00000.log").is_file()
    assert not (results / "cache/train").exists()
    for store in ("influence/scores.zarr", "influence/token_scores.zarr"):
        streamed = zarr.open_array(results / store / "scores", mode="r")[:]
        cached = zarr.open_array(tiny_run / store / "scores", mode="r")[:]
        scale = np.abs(cached).max()
        assert np.abs(streamed - cached).max() <= 1e-4 * scale
    metrics = [json.loads((r / "metrics.json").read_text()) for r in (results, tiny_run)]
    assert metrics[0]["auprc"] == pytest.approx(metrics[1]["auprc"], abs=1e-6)
