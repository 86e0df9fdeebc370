"""Caching: each shard's per-sample gradient vectors in a resumable Zarr store (shard), and the size plan (plan)."""
