"""Device leases (with fake devices: processes, threads, crashes) and GPU cache vectors against CPU ones."""

import multiprocessing
import os
import queue
import signal
import threading

import pytest
import torch

from rapidin import devices
from rapidin.cache.shard import sample_gradients
from rapidin.devices import job_device, lease_device
from rapidin.gradients.compress import make_compressor
from rapidin.gradients.loss import collate
from rapidin.gradients.model import parameter_blocks, select_modules

from .conftest import random_samples, tiny_llama

FORK = multiprocessing.get_context("fork")


def lease_within(n_devices, directory, seconds=5.0):
    """lease_device in a thread: the lease, or None if none was free within `seconds`."""
    got = []
    thread = threading.Thread(target=lambda: got.append(lease_device(n_devices, directory, 0.02)), daemon=True)
    thread.start()
    thread.join(seconds)
    return got[0] if got else None


def hold(n_devices, directory, indices, release):
    """A job: lease a device, report its index, keep it until `release` is set."""
    lease = lease_device(n_devices, directory, 0.02)
    indices.put(lease.index)
    release.wait()


def start_holder(n_devices, directory, indices):
    release = FORK.Event()
    process = FORK.Process(target=hold, args=(n_devices, directory, indices, release))
    process.start()
    return process, release


def test_concurrent_processes_get_distinct_devices_and_wait_for_a_free_one(tmp_path):
    indices = FORK.Queue()
    holders = [start_holder(3, tmp_path, indices) for _ in range(3)]
    by_index = {indices.get(timeout=10): holder for holder in holders}
    assert set(by_index) == {0, 1, 2}  # (which process got which index depends on timing)
    late = start_holder(3, tmp_path, indices)
    with pytest.raises(queue.Empty):  # all three devices are taken
        indices.get(timeout=0.3)
    by_index[1][1].set()  # job 1 ends
    assert indices.get(timeout=10) == 1  # the waiting job takes its device
    for process, release in [*by_index.values(), late]:
        release.set()
        process.join(10)
        assert process.exitcode == 0


def test_concurrent_threads_get_distinct_devices(tmp_path):
    start, leases = threading.Barrier(4), []

    def job():
        start.wait()
        leases.append(lease_device(4, tmp_path, 0.02))

    threads = [threading.Thread(target=job) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(lease.index for lease in leases) == [0, 1, 2, 3]
    for lease in leases:
        lease.release()


def test_released_lease_is_reused(tmp_path):
    first, second = lease_device(2, tmp_path), lease_device(2, tmp_path)
    assert (first.index, second.index) == (0, 1)
    assert lease_within(2, tmp_path, 0.2) is None
    first.release()
    assert lease_within(2, tmp_path).index == 0


def test_crashed_holder_frees_its_lease(tmp_path):
    indices = FORK.Queue()
    process, _ = start_holder(1, tmp_path, indices)
    assert indices.get(timeout=10) == 0
    assert lease_within(1, tmp_path, 0.2) is None
    os.kill(process.pid, signal.SIGKILL)  # dies without releasing anything
    process.join(10)
    assert lease_within(1, tmp_path).index == 0


def test_job_device_leases_only_among_several_gpus(tmp_path, monkeypatch):
    monkeypatch.setenv("RAPIDIN_LEASE_DIR", str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    monkeypatch.setattr(devices, "_held", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # narrowed to one GPU (SLURM): no lease
    assert job_device("auto") == torch.device("cuda")
    assert not any(tmp_path.iterdir())
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    other_job = lease_device(2, tmp_path / "visible-4,5")  # takes index 0
    assert job_device("auto") == torch.device("cuda", 1)
    assert job_device("auto") == torch.device("cuda", 1)  # one lease per process, kept
    assert job_device("cpu") == torch.device("cpu")  # an explicit device is never leased
    other_job.release()
    devices._held.release()


def cache_vectors(model, device, dtype, compressor):
    """Per-sample vectors of a few samples with `model` in `dtype` on `device`, as fp32 on the CPU."""
    model = model.to(device, dtype)
    modules = select_modules(model)
    blocks = parameter_blocks(modules)
    batch = collate(random_samples(6, vocab=257, lengths=(20, 60)), pad_id=0).to(device)
    sketch = make_compressor(compressor, blocks, [4096], seed=0, rank=8)
    vectors = sample_gradients(model, modules, sketch, batch, batch.mean_response_weights)
    return next(iter(vectors.values())).float().cpu()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compressor", ["rapidgrad", "factored"])
def test_gpu_cache_vectors_match_cpu_fp32(compressor):
    model = tiny_llama(torch.float32, vocab=257, hidden=64)
    cpu = cache_vectors(model, "cpu", torch.float32, compressor)
    gpu32 = cache_vectors(model, "cuda", torch.float32, compressor)
    torch.testing.assert_close(gpu32, cpu, rtol=1e-3, atol=1e-4)
    bf16 = cache_vectors(model, "cuda", torch.bfloat16, compressor)  # model math in bf16, sketch sums in fp32
    cosine = torch.nn.functional.cosine_similarity(bf16, cpu, dim=1)
    assert (cosine > 0.995).all(), cosine
