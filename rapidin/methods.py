"""The experiments' method names, one grammar for the config check, the rules and the tables.

A method is a base method, then optional suffixes, in this order:

- base: `random`, `bm25`, `lissa`, `tracin` (exact, no LN), `tracin_ln` (exact, LN), `factored`, or
  `rapidin_k<K>[_seed<S>]` (RapidGrad at K, seed S; default cache.seed);
- `_adam`: optimizer-aware gradients (cache.optimizer adam: divided by √v̂ + ε) — tracin_ln and rapidin only;
- `_pre`: preconditioned queries ⟨(C + λI)⁻¹ q, v⟩ (score.precondition, experiment.precondition) — rapidin at
  K ≤ 2^13 only;
- `_tok`: token-level query aggregation (rapidin.score.tokenwise.aggregate_token_scores): each response token's
  gradient scored on its own, the scores standardised over the training samples and averaged in absolute value —
  tracin_ln and rapidin, without `_pre` or `_cp`;
- `_cp`: the lr-weighted sum over model.checkpoints (TracInCP) of the method without `_cp` — every gradient
  method but lissa.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from rapidin.errors import RapidinError

FIXED = ("random", "bm25", "lissa", "tracin", "tracin_ln", "factored")
_RAPIDIN = r"rapidin_k(\d+)(?:_seed(\d+))?"
GRAMMAR = re.compile(rf"(tracin_ln|tracin|factored|{_RAPIDIN})(_adam)?(_pre)?(_tok)?(_cp)?")
_BASE = r"(tracin_ln|tracin|factored|rapidin_k\d+(_seed\d+)?)(_adam)?(_pre)?"
# For Snakemake wildcard constraints: every method scored at model.path's weights from whole-response queries;
# those summed over checkpoints are `{cp_method}_cp` and those from token queries `{token_method}_tok`, with
# cp_method and token_method matching CHECKPOINT_BASE.
PATTERN = "|".join(["random", "bm25", "lissa", _BASE])
CHECKPOINT_BASE = _BASE
EXPECTED = "random, bm25, lissa, tracin, tracin_ln, factored, rapidin_k<K>[_seed<S>], then [_adam][_pre][_tok][_cp]"


class Method(NamedTuple):
    """A parsed method name: RapidIn's sketch size `k` and `seed` (None: the cache's seed), None for the others;
    `adam`, `precondition`, `tokens`, `checkpoints`: its suffixes."""

    name: str
    k: int | None = None
    seed: int | None = None
    adam: bool = False
    precondition: bool = False
    tokens: bool = False
    checkpoints: bool = False

    @property
    def base(self) -> str:
        """The name without its suffixes: tracin_ln, rapidin_k4096_seed1, …"""
        return self.name.removesuffix("_cp").removesuffix("_tok").removesuffix("_pre").removesuffix("_adam")

    @property
    def single(self) -> str:
        """The name without `_cp`: the method scored at one set of weights."""
        return self.name.removesuffix("_cp")

    @property
    def plain(self) -> bool:
        """Neither optimizer-aware, preconditioned, token-aggregated nor summed over checkpoints."""
        return not (self.adam or self.precondition or self.tokens or self.checkpoints)


def parse_method(name: str) -> Method:
    """The method named `name`; anything else is an error naming experiment.methods."""
    if name in FIXED:
        return Method(name)
    match = GRAMMAR.fullmatch(name)
    if not match:
        raise RapidinError(f"experiment.methods: unknown method {name!r} (expected one of {EXPECTED})")
    base, k, seed, adam, pre, tok, cp = match.groups()
    method = Method(
        name,
        None if k is None else int(k),
        None if seed is None else int(seed),
        *map(bool, (adam, pre, tok, cp)),
    )
    if adam and base in ("tracin", "factored"):
        raise RapidinError(f"experiment.methods: {name}: _adam applies to tracin_ln and rapidin_k<K> only")
    if pre and k is None:
        raise RapidinError(f"experiment.methods: {name}: _pre applies to rapidin_k<K> (K ≤ 8192) only")
    if tok and (base in ("tracin", "factored") or pre or cp):
        raise RapidinError(
            f"experiment.methods: {name}: _tok applies to tracin_ln and rapidin_k<K> without _pre or _cp"
        )
    return method
