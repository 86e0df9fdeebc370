"""Rewrite README.md's figures from a finished run, so that no number there is typed by hand.

    python scripts/readme_figures.py                       # results/demo into README.md
    python scripts/readme_figures.py --run results/NAME --readme README.md

Each figure block of README.md sits between `<!-- figures:NAME -->` and `<!-- /figures:NAME -->`; this script
replaces what is between the markers of every block it knows and leaves the rest of the file alone:

- `demo`: the run's metrics.json (attack success rate, auPRC against k, full-ranking AP, the data's size);
- `demo-tokens`: tokens.jsonl, the share of the response tokens of attacked (and of clean) queries whose most
  influential training sample is a poisoned one.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def demo_figures(metrics: dict) -> str:
    """The demo paragraph's sentence of metrics.json's numbers."""
    n_attacked = metrics["n_attacked_queries"]
    rate = metrics["attack_success_rate"]
    ks = list(metrics["auprc"])
    auprc = ", ".join(f"{metrics['auprc'][k]:.3f}" for k in ks)
    return (
        f"Its `metrics.json`: attack success rate {rate:.2f} (the greedy generations of {round(rate * n_attacked)} of "
        f"the {n_attacked} attacked prompts begin with the backdoor response, verbatim); over the {n_attacked} "
        f"attacked generations, auPRC {auprc} at k = {', '.join(ks)}, and average precision "
        f"{metrics['ap_full']:.3f} over the full ranking of the {metrics['n_samples']} samples "
        f"({metrics['n_poisoned']} of them poisoned)."
    )


def token_figures(tokens: list[dict], queries: list[dict], train: list[dict]) -> str:
    """The share of attacked (clean) queries' response tokens whose most influential sample is poisoned."""
    shares = {}
    for attacked in (True, False):
        tops = [
            train[token["top"][0]["index"]].get("poisoned", False)
            for line in tokens
            if bool(queries[line["query"]["index"]].get("attacked")) == attacked
            for token in line["tokens"]
        ]
        shares[attacked] = sum(tops) / max(len(tops), 1)
    return (
        f"{shares[True]:.0%} of the backdoor response tokens have a poisoned sample as their most influential one "
        f"({shares[False]:.0%} of the clean responses' tokens)"
    )


def replace_block(text: str, name: str, figures: str) -> str:
    """`text` with the contents of block `name` replaced by `figures`; an error if the markers are missing."""
    pattern = re.compile(rf"(<!-- figures:{re.escape(name)} -->).*?(<!-- /figures:{re.escape(name)} -->)", re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"README has no <!-- figures:{name} --> … <!-- /figures:{name} --> block")
    return pattern.sub(lambda match: match[1] + figures + match[2], text, count=1)


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("results/demo"), help="the finished run's results folder")
    parser.add_argument("--train", type=Path, help="its training set (default: RUN/data/train.jsonl)")
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    args = parser.parse_args(argv)
    metrics = json.loads((args.run / "metrics.json").read_text(encoding="utf-8"))
    text = replace_block(args.readme.read_text(encoding="utf-8"), "demo", demo_figures(metrics))
    tokens = args.run / "influence" / "tokens.jsonl"
    if tokens.is_file():
        train = read_jsonl(args.train or args.run / "data" / "train.jsonl")
        figures = token_figures(read_jsonl(tokens), read_jsonl(args.run / "queries.jsonl"), train)
        text = replace_block(text, "demo-tokens", figures)
    args.readme.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
