"""Row-chunk reads: the raw-file fast path and Zarr's own read give the same rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from zarr.codecs import BloscCodec

from rapidin.store import _mapped_chunk, read_row_chunk


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
