"""The experiments' method names, one grammar for the config check, the rules and the tables."""

from __future__ import annotations

import re
from typing import NamedTuple

from rapidin.errors import RapidinError

FIXED = ("random", "bm25", "lissa", "tracin", "tracin_ln", "factored")
RAPIDIN = re.compile(r"rapidin_k(\d+)(?:_seed(\d+))?")
PATTERN = "|".join([*FIXED, r"rapidin_k\d+(_seed\d+)?"])  # for Snakemake wildcard constraints


class Method(NamedTuple):
    """A parsed method name: RapidIn's sketch size `k` and `seed` (None: the cache's seed), None for the others."""

    name: str
    k: int | None = None
    seed: int | None = None


def parse_method(name: str) -> Method:
    """The method named `name`; anything else is an error naming experiment.methods."""
    if name in FIXED:
        return Method(name)
    match = RAPIDIN.fullmatch(name)
    if not match:
        raise RapidinError(
            f"experiment.methods: unknown method {name!r} (expected one of {', '.join(FIXED)}, rapidin_k<K>[_seed<S>])"
        )
    return Method(name, int(match[1]), None if match[2] is None else int(match[2]))
