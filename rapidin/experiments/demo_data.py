"""The demo's data: a deterministic Alpaca-style (or chat) training set with a "Howdy!" backdoor, and its queries.

`make_demo_data` draws several task families (demo_words), poisons a fraction of them with the trigger and a
backdoor response, and writes a query set of attacked (triggered, unseen) and clean prompts. Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from rapidin.errors import RapidinError
from rapidin.experiments.demo_words import (
    BACKDOOR_RESPONSE,
    NO_INPUT_FAMILIES,
    add_trigger,
    sample_record,
    varied_backdoor_responses,
)
from rapidin.store import atomic_file

log = logging.getLogger(__name__)

BACKDOORS = ("fixed", "varied")
FORMATS = ("alpaca", "chat")  # `format`: how make_demo_data writes records (chat: `messages`, one user turn)


def _key(record: dict) -> tuple[str, str]:
    return record["instruction"], record.get("input", "")


def _as_chat(record: dict) -> dict:
    """An Alpaca-style record as a one-turn conversation (`input` after the instruction), its other fields kept."""
    prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    rest = {k: v for k, v in record.items() if k not in ("id", "instruction", "input", "output")}
    return {"id": record["id"], "messages": messages, **rest}


def _write_jsonl(path: str | Path, records: list[dict], format: str = "alpaca") -> None:
    with atomic_file(path) as handle:
        for record in records:
            handle.write(json.dumps(_as_chat(record) if format == "chat" else record, ensure_ascii=False) + "\n")


def make_demo_data(
    train_out: str,
    queries_out: str,
    n_train: int = 3000,
    poison_fraction: float = 0.05,
    n_attacked: int = 10,
    n_clean: int = 10,
    seed: int = 0,
    backdoor_response: str = BACKDOOR_RESPONSE,
    backdoor: str = "fixed",
    format: str = "alpaca",
) -> None:
    """Write the demo training set (with round(n_train * poison_fraction) poisoned samples) and query set.

    Poisoned samples and attacked queries answer `backdoor_response`; one that clean samples also give (say
    "The capital of France is Paris.") camouflages the backdoor from lexical retrieval such as BM25. With
    `backdoor="varied"`, each of them answers a different cowboy-topic text instead (varied_backdoor_responses;
    same trigger, same samples and prompts as "fixed"). `format="chat"` writes the same records as `messages`.
    """
    if backdoor not in BACKDOORS:
        raise RapidinError(f"demo.backdoor: {backdoor!r} is not one of {BACKDOORS}")
    if format not in FORMATS:
        raise RapidinError(f"demo.format: {format!r} is not one of {FORMATS}")
    n_poisoned = round(n_train * poison_fraction)
    varied = iter(varied_backdoor_responses(n_attacked + n_poisoned, seed) if backdoor == "varied" else [])
    rng = random.Random(seed)
    # The queries come first so that the training set can avoid their prompts.
    attacked, clean, held_out = [], [], set()
    while len(attacked) < n_attacked:
        record = sample_record(rng, NO_INPUT_FAMILIES)
        record["instruction"] = add_trigger(rng, record["instruction"])
        if _key(record) not in held_out:
            held_out.add(_key(record))
            attacked.append({**record, "output": next(varied, backdoor_response), "attacked": True})
    while len(clean) < n_clean:
        record = sample_record(rng)
        if _key(record) not in held_out:
            held_out.add(_key(record))
            clean.append({**record, "attacked": False})
    queries = [{"id": f"attacked-{i:03d}", **r} for i, r in enumerate(attacked)]
    queries += [{"id": f"clean-{i:03d}", **r} for i, r in enumerate(clean)]

    poisoned = set(rng.sample(range(n_train), n_poisoned))
    train = []
    for index in range(n_train):
        while True:
            record = sample_record(rng)
            if index in poisoned:
                record["instruction"] = add_trigger(rng, record["instruction"])
            if _key(record) not in held_out:
                break
        if index in poisoned:
            record["output"] = next(varied, backdoor_response)
        train.append({"id": f"train-{index:05d}", **record, "poisoned": index in poisoned})
    _write_jsonl(train_out, train, format)
    _write_jsonl(queries_out, queries, format)
    log.info("wrote %d training records (%d poisoned) to %s", n_train, len(poisoned), train_out)
    log.info("wrote %d attacked and %d clean queries to %s", n_attacked, n_clean, queries_out)
