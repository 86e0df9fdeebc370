"""The workflow on a real SLURM cluster: tests/cluster/setup-slurm.sh starts a single-node one on loopback, and
the tiny run's caching and scoring go through the SLURM profile as sbatch jobs, with the local run's results."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from .workflow import ROOT, SNAKEMAKE, assert_same_influence, copy_run

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


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    result = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)], capture_output=True, text=True
    )
    return dict(line.split("|") for line in result.stdout.split())


def test_tiny_run_on_slurm_matches_the_local_run(slurm, tiny_run, tmp_path):
    workdir = copy_run(tiny_run.parents[1], tmp_path / "run")
    run = ["--workflow-profile", str(cluster_profile(workdir)), "--configfile", "config/tiny.yaml"]
    rerun = ["--forcerun", "cache_train_grads", "cache_query_grads"]  # the local run's data, model and tokens stay
    targets = ["results/tiny/influence/scores.zarr/zarr.json", "results/tiny/influence/topk.jsonl"]
    command = ["timeout", "-k", "10", "400", *SNAKEMAKE, *targets, *run, *rerun]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]

    submitted = re.findall(r"submitted with SLURM jobid (\d+) \(log: \S+/rule_(\w+)/", result.stdout + result.stderr)
    rules = sorted(rule for _, rule in submitted)
    assert rules == ["cache_query_grads", "cache_train_grads", "cache_train_grads", "score_shard", "score_shard"]
    assert set(sacct_states([job for job, _ in submitted]).values()) == {"COMPLETED"}

    assert_same_influence(workdir / "results/tiny", tiny_run)
