"""Store helpers: row-chunk reads (the raw-file fast path reads what Zarr reads) and atomic outputs."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch
import zarr
from zarr.codecs import BloscCodec

from rapidin.store import _mapped_chunk, atomic_dir, atomic_file, read_row_chunk


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("compressed", [False, True])
def test_row_chunks_read_as_zarr_reads_them(tmp_path, dtype, compressed):
    rows = np.random.default_rng(0).standard_normal((10, 6)).astype(dtype)  # 3 chunks of 4 rows, the last short
    compressors = [BloscCodec()] if compressed else None
    array = zarr.create_array(
        tmp_path / "a.zarr", shape=rows.shape, chunks=(4, 6), dtype=dtype, compressors=compressors
    )
    array[:8] = rows[:8]  # the last chunk is never written: it reads as the fill value
    expected = np.concatenate([rows[:8], np.zeros((2, 6), dtype)])
    assert (_mapped_chunk(array, 0) is None) == compressed
    assert _mapped_chunk(array, 2) is None
    out = torch.full((4, 6), torch.nan)
    for chunk in range(3):
        got = read_row_chunk(array, chunk, out)
        assert got.dtype == torch.float32
        np.testing.assert_array_equal(got.numpy(), expected[4 * chunk : 4 * chunk + 4].astype(np.float32))
    array[8:] = rows[8:]  # now written, as a full-size edge chunk
    assert _mapped_chunk(array, 2) is not None or compressed
    np.testing.assert_array_equal(read_row_chunk(array, 2, out).numpy(), rows[8:].astype(np.float32))


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "out.txt") as handle:
            handle.write("x")
        with atomic_dir(tmp_path / "out.zarr") as tmp:
            (tmp / "part").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "out.zarr").stat().st_mode) == 0o755
