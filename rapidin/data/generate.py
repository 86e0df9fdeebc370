"""Generation: whether a model greedily reproduces a record's response (e.g. a backdoor firing), and the
responses of queries given without one (the generations then explained)."""

from __future__ import annotations

import dataclasses
import json

import torch

from rapidin.data.records import Record, read_records
from rapidin.data.tokenize import prompt_ids, target_spans
from rapidin.devices import job_device
from rapidin.errors import DataError
from rapidin.gradients.model import load_model, resolve_dtype
from rapidin.progress import Progress
from rapidin.store import atomic_file


@torch.inference_mode()
def generate(
    model, tokenizer, prompt: list[int], max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0
) -> list[int]:
    """The new token ids the model continues `prompt` (token ids) with, greedy or sampled at `temperature`,
    stopping before EOS."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt], dtype=torch.long, device=device)
    sampling = {"temperature": temperature, "top_k": 0, "top_p": 1.0} if do_sample else {}  # pure sampling
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=do_sample,
        **sampling,
    )
    new = output[0, len(prompt) :].tolist()
    return new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new


def reproduces(model, tokenizer, record: Record, template: str = "alpaca") -> bool:
    """Whether the greedy generation for the record's prompt starts with its response (stripped strings)."""
    expected = record.output.strip()
    budget = len(tokenizer(record.output, add_special_tokens=False)["input_ids"]) + 8
    generated = generate(model, tokenizer, prompt_ids(record, tokenizer, template), budget)
    return tokenizer.decode(generated, skip_special_tokens=True).strip().startswith(expected)


def attack_success_rate(model, tokenizer, records: list[Record], template: str = "alpaca") -> float:
    """Fraction of `records` whose response the model reproduces greedily (0.0 for no records)."""
    if not records:
        return 0.0
    hits = 0
    with Progress(len(records), "reproduction check", "prompts") as bar:
        for record in records:
            hits += reproduces(model, tokenizer, record, template)
            bar.update(1)
    return hits / len(records)


def queries_attack_success(
    queries: str, model_path: str, adapter: str | None, template: str, fields: dict[str, str] | None = None
) -> float | None:
    """The attack success rate over the attacked queries of a JSONL file that carry a response (None if none):
    the share whose response the model reproduces exactly, greedily (a backdoor firing verbatim)."""
    records = read_records(queries, require_output=False, fields=fields)
    attacked = [r for r in records if r.meta.get("attacked") and r.output]
    if not attacked:
        return None
    model, tokenizer = load_model(model_path, adapter)
    return attack_success_rate(model, tokenizer, attacked, template)


def complete_queries(
    queries: str,
    model_path: str,
    out: str,
    adapter: str | None = None,
    template: str = "alpaca",
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    fields: dict[str, str] | None = None,
) -> None:
    """Copy `queries` to `out` (in its own field names, `fields`), generating the response of each record that
    has none (marked `"generated": true`).

    The model is loaded only if some record needs a response. Each record's `targets` are checked against its
    response here, so that a target missing from it is reported at the line of `queries`.
    """
    records = read_records(queries, require_output=False, fields=fields)
    missing = sum(record.output is None for record in records)
    if missing:
        device = job_device()  # with several GPUs, a leased one (devices.py)
        model, tokenizer = load_model(model_path, adapter, resolve_dtype("auto", device), device)
        torch.manual_seed(seed)
    with atomic_file(out) as handle, Progress(missing, "generation", "responses") as bar:
        for record in records:
            if record.output is None:
                prompt = prompt_ids(record, tokenizer, template)
                new = generate(model, tokenizer, prompt, max_new_tokens, do_sample, temperature)
                text = tokenizer.decode(new, skip_special_tokens=True)
                if not text.strip():
                    raise DataError(f"{record.where}: the model generated an empty response")
                record = dataclasses.replace(record, output=text, meta={**record.meta, "generated": True})
                bar.update(1, tokens=len(new))
            target_spans(record)
            handle.write(json.dumps(record.to_json(fields), ensure_ascii=False) + "\n")
