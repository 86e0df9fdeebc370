"""Atomic publication of output directories and the settings stamped on every Zarr store.

Every store carries `attrs["rapidin"]`: the settings it was made with. A step that combines stores checks
that the fields they must share agree and refuses with the first differing field otherwise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import zarr

from rapidin import __version__
from rapidin.errors import StoreMismatchError


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator:
    """Open a temporary sibling file that replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_settings(group: zarr.Group, settings: dict) -> None:
    group.attrs["rapidin"] = {**settings, "rapidin_version": __version__}


def read_settings(path: str | Path) -> dict:
    return dict(zarr.open_group(path, mode="r").attrs["rapidin"])


def check_agree(a: dict, b: dict, fields: tuple[str, ...], a_name: str, b_name: str) -> None:
    """Raise StoreMismatchError naming the first of `fields` on which two stores' settings differ."""
    for key in fields:
        if a.get(key) != b.get(key):
            raise StoreMismatchError(
                f"{b_name} was made with {key}={b.get(key)!r} but {a_name} has {key}={a.get(key)!r}; "
                f"rebuild it with the current settings"
            )
