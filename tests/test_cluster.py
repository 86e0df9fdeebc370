"""The workflow on a real SLURM cluster: tests/cluster/setup-slurm.sh starts a single-node one on loopback, and
the tiny run's caching and scoring go through the SLURM profile as sbatch jobs in 8 shards, cached and on the fly
(`cache.store: false`), with the local 2-shard run's results."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from .workflow import ROOT, SNAKEMAKE, copy_run

pytestmark = pytest.mark.cluster

CLUSTER = Path(__file__).parent / "cluster"
SLURM_CONFIGS = (Path("/etc/slurm/slurm.conf"), Path("/etc/slurm/slurmdbd.conf"))
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "sbatch", "sacct")


def why_no_cluster() -> str | None:
    """Why this machine cannot start the test cluster, or None."""
    if os.geteuid() != 0:
        return "needs root: it starts SLURM's daemons"
    if not Path("/etc/debian_version").exists():
        return "needs Debian: it installs SLURM 22.05 with apt"
    if not all(shutil.which(d) for d in DAEMONS):
        update = subprocess.run(["timeout", "120", "apt-get", "update", "-qq"], capture_output=True, text=True)
        if update.returncode != 0:
            return f"SLURM is not installed and apt-get update fails: {update.stderr.strip()[-200:]}"
    return None


@pytest.fixture(scope="module")
def slurm():
    """The cluster, started for these tests (and stopped after them) unless it was up already."""
    reason = why_no_cluster()
    if reason:
        pytest.skip(reason)
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True) if shutil.which("scontrol") else None
    was_up = ping is not None and "UP" in ping.stdout
    configs = {path: path.read_bytes() if path.exists() else None for path in SLURM_CONFIGS}
    setup = subprocess.run(["timeout", "-k", "10", "300", CLUSTER / "setup-slurm.sh"], capture_output=True, text=True)
    assert setup.returncode == 0, setup.stdout[-2000:] + setup.stderr[-2000:]
    yield
    if not was_up:
        subprocess.run([CLUSTER / "stop-slurm.sh"], capture_output=True)
        restore(configs)


def restore(configs: dict[Path, bytes | None]) -> None:
    """Put SLURM's config files back as they were: a left-over slurm.conf naming a stopped controller makes
    every later Snakemake start wait ~10 s (the SLURM executor plugin runs `scontrol show config` on import)."""
    for path, content in configs.items():
        if content is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(content)


def cluster_profile(workdir: Path) -> Path:
    """The SLURM profile fitted to the test cluster: its partition and account, no GPU, 1 CPU and 1 GB per job,
    and a first status check after 2 s."""
    profile = yaml.safe_load((ROOT / "workflow/profiles/slurm/config.yaml").read_text())
    profile["default-resources"] = {"slurm_partition": "debug", "slurm_account": "ci", "runtime": 10, "mem_mb": 1000}
    profile["set-threads"] = dict.fromkeys(profile["set-threads"], 1)
    for resources in profile["set-resources"].values():
        resources.update(gpu=0, mem_mb=1000)
    profile["slurm-init-seconds-before-status-checks"] = 2
    path = workdir / "workflow/profiles/slurm-test/config.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(profile))
    return path.parent


def submitted_jobs(result: subprocess.CompletedProcess) -> list[tuple[str, str]]:
    """(SLURM job id, rule) of every job Snakemake submitted with sbatch, from its log."""
    return re.findall(r"submitted with SLURM jobid (\d+) \(log: \S+/rule_(\w+)/", result.stdout + result.stderr)


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    result = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)], capture_output=True, text=True
    )
    return dict(line.split("|") for line in result.stdout.split())


def assert_close_influence(results: Path, expected: Path, rtol: float = 1e-4) -> None:
    """Two runs' merged scores (influence/scores.zarr) agree to `rtol` of the largest |score|, and their top-k
    (there and in influence/topk.jsonl) list, rank by rank, the same samples with those scores and texts, or
    samples whose scores tie within that tolerance: another sharding batches other samples together, so the
    sums run in another order, and duplicates of one sample (equal scores) may swap places."""
    stores = [zarr.open_group(r / "influence/scores.zarr", mode="r") for r in (results, expected)]
    reference = stores[1]["scores"][:]
    tol = rtol * float(np.abs(reference).max())
    for name in ("scores", "top_scores", "bottom_scores"):
        got, want = (store[name][:] for store in stores)
        assert got.shape == want.shape and np.abs(got - want).max() <= tol, name
    for name in ("top_ids", "bottom_ids"):
        for row, got, want in zip(reference, stores[0][name][:], stores[1][name][:], strict=True):
            assert_ranked_alike(list(got), list(want), row, tol)
    topks = [[json.loads(line) for line in (r / "influence/topk.jsonl").open()] for r in (results, expected)]
    for got, want in zip(*topks, strict=True):
        assert got["query"] == want["query"]
        row = reference[want["query"]["index"]]
        for side in ("helpful", "harmful"):
            assert_ranked_alike([s["index"] for s in got[side]], [s["index"] for s in want[side]], row, tol)
            assert [s["score"] for s in got[side]] == pytest.approx([s["score"] for s in want[side]], abs=tol)
            assert [s["rank"] for s in got[side]] == [s["rank"] for s in want[side]]
            texts = {s["index"]: {k: v for k, v in s.items() if k not in ("rank", "score")} for s in want[side]}
            for sample in got[side]:
                text = {k: v for k, v in sample.items() if k not in ("rank", "score")}
                assert texts.get(sample["index"], text) == text


def assert_ranked_alike(got: list[int], want: list[int], reference: np.ndarray, tol: float) -> None:
    """Rank by rank, `got` names `want`'s sample or one whose reference score ties with it within `tol`."""
    assert len(set(got)) == len(got) == len(want)
    assert all(g == w or abs(reference[g] - reference[w]) <= tol for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("store", [True, False], ids=["cached", "on-the-fly"])
def test_eight_shards_on_slurm_match_the_local_run(slurm, tiny_run, tmp_path, store):
    """cache.n_shards: 8 through the SLURM profile: one sbatch job per shard and step (caching then scoring, or
    stream_shard computing and scoring at once), merged into the local 2-shard run's scores and top-k; on the
    fly, no training cache is ever written. The local run's data, model and tokens stay; cached, the queries'
    vectors are made again through sbatch too."""
    workdir = copy_run(tiny_run.parents[1], tmp_path / "run")
    results = workdir / "results/tiny"
    for path in ("cache/train", "scores", "influence"):
        shutil.rmtree(results / path)
    config = yaml.safe_load((workdir / "config/tiny.yaml").read_text())
    config["cache"].update(n_shards=8, store=store)
    (workdir / "shards.yaml").write_text(yaml.safe_dump(config))
    run = ["--workflow-profile", str(cluster_profile(workdir)), "--configfile", "shards.yaml"]
    if store:
        run += ["--forcerun", "cache_query_grads"]
    targets = ["results/tiny/influence/scores.zarr/zarr.json", "results/tiny/influence/topk.jsonl"]
    command = ["timeout", "-k", "10", "400", *SNAKEMAKE, *targets, *run]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]

    submitted = submitted_jobs(result)
    heavy = {"cache_query_grads": 1, "cache_train_grads": 8, "score_shard": 8} if store else {"stream_shard": 8}
    assert Counter(rule for _, rule in submitted) == heavy
    assert set(sacct_states([job for job, _ in submitted]).values()) == {"COMPLETED"}
    shards = [f"{shard:05d}" for shard in range(8)]
    tokens = [""] if store else ["", "token_"]  # a stream job scores the query tokens in the same pass
    assert sorted(p.name for p in (results / "scores").iterdir()) == [f"{t}{s}.zarr" for t in tokens for s in shards]
    if store:
        assert sorted(p.name for p in (results / "cache/train").iterdir()) == [f"{s}.zarr" for s in shards]
    else:
        assert not (results / "cache/train").exists()

    assert_close_influence(results, tiny_run)
