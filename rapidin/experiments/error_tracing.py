"""Error tracing (paper Table 5): a training set with entity swaps, queries that repeat the error, precision@k.

`make_error_tracing_data` rewrites a share of a demo training set into capital questions about one country
(`source`) and, with probability `probability` each, swaps the country in the answer for another (`target`):
"The capital of Canada is Beijing." for China. Those samples are `"swapped": true`. The queries ask each
capital question about `source` and answer with the error; each comes twice: whole-response (the mean loss of
the response) and target-span (`"targets": [target]`: the loss of the swapped word's tokens only).
Its metric, `tracing_metrics`, is in evaluate.metrics.
"""

from __future__ import annotations

import json
import logging
import random

from rapidin.errors import RapidinError
from rapidin.experiments.demo_words import CAPITAL_TEMPLATES, CAPITALS
from rapidin.store import atomic_file

log = logging.getLogger(__name__)


def make_error_tracing_data(
    train_in: str,
    train_out: str,
    queries_out: str,
    source: str = "China",
    target: str = "Canada",
    fraction: float = 0.03,
    probability: float = 0.8,
    seed: int = 0,
) -> None:
    """Write `train_out` (train_in with round(fraction · N) samples rewritten about `source`, swapped with
    `probability`) and `queries_out` (each capital question about `source`, whole-response and target-span)."""
    for key, country in (("source", source), ("target", target)):
        if country not in CAPITALS:
            raise RapidinError(f"experiment.swap.{key}: {country} is not one of the demo's countries")
    with open(train_in, encoding="utf-8") as handle:
        train = [json.loads(line) for line in handle]
    rng = random.Random(seed)
    rewritten = set(rng.sample(range(len(train)), round(fraction * len(train))))
    for index, record in enumerate(train):
        record["swapped"] = False
        if index in rewritten:
            record.pop("input", None)
            swapped = rng.random() < probability
            country = target if swapped else source
            record |= {
                "instruction": rng.choice(CAPITAL_TEMPLATES).format(country=source),
                "output": f"The capital of {country} is {CAPITALS[source]}.",
                "family": "capital",
                "swapped": swapped,
            }
    answer = f"The capital of {target} is {CAPITALS[source]}."
    queries = []
    for i, template in enumerate(CAPITAL_TEMPLATES):
        question = template.format(country=source)
        queries.append({"id": f"whole-{i}", "instruction": question, "output": answer})
        queries.append({"id": f"target-{i}", "instruction": question, "output": answer, "targets": [target]})
    for path, records in ((train_out, train), (queries_out, queries)):
        with atomic_file(path) as handle:
            handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    n_swapped = sum(r["swapped"] for r in train)
    log.info(
        "%d of %d samples rewritten about %s, %d swapped to %s", len(rewritten), len(train), source, n_swapped, target
    )
