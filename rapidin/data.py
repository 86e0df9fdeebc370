"""Instruction records (Alpaca-style JSONL), the prompt template, and the tokenized store.

A record is one JSON object per line: `instruction` (required), `input` (optional), `output` (the response;
required for training data), `id` (optional, unique) and any other fields kept as metadata (`poisoned`,
`attacked`, ...). Tokenization concatenates the prompt's ids and the response's ids (plus EOS), so the
response boundary is exact; the loss is taken over the response tokens only — or, for a query with
`"targets"` (words of its response, or `[start, end]` character spans), over the response tokens that overlap
them (target-span queries; character offsets come from the fast tokenizer's offset mapping).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from rapidin.errors import DataError
from rapidin.store import atomic_dir, write_settings

log = logging.getLogger(__name__)

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
TEMPLATES = ("alpaca", "chat")


@dataclass(frozen=True)
class Record:
    """One instruction/response pair; `line` is its 1-based line in `source`."""

    source: str
    line: int
    instruction: str
    input: str = ""
    output: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def read_records(path: str | Path, require_output: bool = True) -> list[Record]:
    """Read and validate a JSONL file; any bad line raises DataError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    records, seen_ids = [], {}
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            where = f"{path}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{where}: not valid UTF-8 ({error.reason} at byte {error.start})") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: invalid JSON ({error.msg}, column {error.colno})") from None
            records.append(_record_from_json(obj, str(path), number, require_output))
            if "id" in obj:
                key = json.dumps(obj["id"])
                if key in seen_ids:
                    raise DataError(f"{where}: duplicate id {key} (first on line {seen_ids[key]})")
                seen_ids[key] = number
    if not records:
        raise DataError(f"{path}: empty dataset (no records)")
    return records


def _record_from_json(obj, source: str, line: int, require_output: bool) -> Record:
    where = f"{source}:{line}"
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("instruction", "input", "output"):
        if key in obj and obj[key] is not None and not isinstance(obj[key], str):
            raise DataError(f"{where}: field '{key}' must be a string")
    if not obj.get("instruction", "").strip():
        raise DataError(f"{where}: missing or empty 'instruction'")
    output = obj.get("output")
    if output is None and require_output:
        raise DataError(f"{where}: missing 'output'")
    if output is not None and not output.strip():
        raise DataError(f"{where}: empty response ('output')")
    if "id" in obj and not isinstance(obj["id"], (str, int)):
        raise DataError(f"{where}: field 'id' must be a string or an integer")
    meta = {k: v for k, v in obj.items() if k not in ("instruction", "input", "output")}
    return Record(source, line, obj["instruction"], obj.get("input") or "", output, meta)


def format_prompt(record: Record, template: str, tokenizer=None) -> str:
    """The prompt text exactly as the model was trained with (Alpaca by default; `input` is kept)."""
    if template == "alpaca":
        pattern = ALPACA_WITH_INPUT if record.input else ALPACA_NO_INPUT
        return pattern.format(instruction=record.instruction, input=record.input)
    if template == "chat":
        content = record.instruction + (f"\n\n{record.input}" if record.input else "")
        messages = [{"role": "user", "content": content}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown template {template!r} (expected one of {TEMPLATES})")


def prompt_ids(record: Record, tokenizer, template: str) -> list[int]:
    """Token ids of the prompt (with BOS where the tokenizer adds one; chat templates carry their own)."""
    text = format_prompt(record, template, tokenizer)
    return tokenizer(text, add_special_tokens=template != "chat")["input_ids"]


def response_ids(text: str, tokenizer) -> list[int]:
    """Token ids of a response, terminated by EOS as in training."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def response_offsets(text: str, tokenizer) -> list[tuple[int, int]]:
    """Character [start, end) of each response token in `text` (EOS excluded), as `response_ids` tokenizes it."""
    return tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]


def response_pieces(text: str, tokenizer) -> list[str]:
    """The response cut at its tokens' ends: one string per response token (EOS last, as the EOS string).

    Pieces concatenate back to `text`; characters no token covers join the next piece, and a character split
    over several byte-level tokens goes to the first of them (the others get "").
    """
    pieces, done = [], 0
    for _, end in response_offsets(text, tokenizer):
        pieces.append(text[done : max(done, end)])
        done = max(done, end)
    if pieces:
        pieces[-1] += text[done:]
    return [*pieces, tokenizer.eos_token]


def target_spans(record: Record) -> list[tuple[int, int]] | None:
    """Character spans of the response named by the record's `targets` (None: no targets, the whole response).

    Each target is a word (every occurrence in the response counts) or a `[start, end]` character span.
    """
    targets = record.meta.get("targets")
    if targets is None:
        return None
    if not isinstance(targets, list) or not targets:
        raise DataError(f"{record.where}: 'targets' must be a non-empty list of words or [start, end] spans")
    spans = []
    for target in targets:
        if isinstance(target, str) and target:
            found = [(m.start(), m.end()) for m in re.finditer(re.escape(target), record.output)]
            if not found:
                raise DataError(f"{record.where}: target {target!r} not found in the response {record.output!r}")
            spans += found
        elif _is_span(target, len(record.output)):
            spans.append((target[0], target[1]))
        else:
            raise DataError(
                f"{record.where}: target {target!r} is neither a word nor a [start, end] character span of the "
                f"response ({len(record.output)} characters)"
            )
    return spans


def _is_span(target, length: int) -> bool:
    return (
        isinstance(target, list)
        and len(target) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in target)
        and 0 <= target[0] < target[1] <= length
    )


def target_mask(record: Record, tokenizer) -> list[bool] | None:
    """Per response token (EOS last): whether it overlaps the record's targets; None without targets."""
    spans = target_spans(record)
    if spans is None:
        return None
    offsets = response_offsets(record.output, tokenizer)
    return [any(start < b and a < end for a, b in spans) for start, end in offsets] + [False]


@dataclass
class TokenizedSample:
    ids: list[int]
    response_start: int
    truncated: bool
    loss_mask: list[bool]  # per token: whether its loss counts (response tokens, or only the targets')


def tokenize_record(
    record: Record, tokenizer, template: str, max_length: int, on_long: str = "truncate"
) -> TokenizedSample:
    """Prompt ids + response ids; samples over `max_length` are truncated at the end or rejected."""
    prompt = prompt_ids(record, tokenizer, template)
    response = response_ids(record.output, tokenizer)
    ids = prompt + response
    loss_mask = [False] * len(prompt) + (target_mask(record, tokenizer) or [True] * len(response))
    if len(ids) <= max_length:
        return TokenizedSample(ids, len(prompt), False, loss_mask)
    if on_long == "error":
        raise DataError(f"{record.where}: {len(ids)} tokens exceed data.max_length={max_length}")
    if len(prompt) >= max_length:
        raise DataError(
            f"{record.where}: the prompt alone has {len(prompt)} tokens, no response fits in "
            f"data.max_length={max_length}"
        )
    if not any(loss_mask[:max_length]):
        raise DataError(f"{record.where}: no target token is left after truncation to data.max_length={max_length}")
    return TokenizedSample(ids[:max_length], len(prompt), True, loss_mask[:max_length])


def tokenize_file(
    source: str | Path,
    tokenizer,
    out: str | Path,
    template: str = "alpaca",
    max_length: int = 512,
    on_long: str = "truncate",
    tokenizer_fingerprint: str = "",
) -> None:
    """Tokenize a JSONL file into a Zarr group: flat `input_ids`, `loss_mask`; `offsets` (N+1), `response_start` (N)."""
    records = read_records(source)
    samples = [tokenize_record(r, tokenizer, template, max_length, on_long) for r in records]
    n_truncated = sum(s.truncated for s in samples)
    if n_truncated:
        log.warning("%s: %d of %d samples truncated to %d tokens", source, n_truncated, len(samples), max_length)
    offsets = np.zeros(len(samples) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s.ids) for s in samples])
    with atomic_dir(out) as tmp:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        group.create_array("input_ids", data=np.concatenate([np.asarray(s.ids, np.int32) for s in samples]))
        group.create_array("loss_mask", data=np.concatenate([np.asarray(s.loss_mask, bool) for s in samples]))
        group.create_array("offsets", data=offsets)
        group.create_array("response_start", data=np.asarray([s.response_start for s in samples], np.int32))
        write_settings(
            group,
            {
                "source": str(source),
                "n_samples": len(samples),
                "n_truncated": n_truncated,
                "template": template,
                "max_length": max_length,
                "tokenizer": tokenizer_fingerprint,
            },
        )


@dataclass
class TokenizedDataset:
    """Read side of the tokenized store; `sample(i)` gives (ids, response_start), `loss_mask_of(i)` its loss mask."""

    input_ids: np.ndarray
    offsets: np.ndarray
    response_start: np.ndarray
    settings: dict
    loss_mask: np.ndarray  # flat, like input_ids

    @classmethod
    def open(cls, path: str | Path) -> TokenizedDataset:
        group = zarr.open_group(path, mode="r")
        arrays = (group[name][:] for name in ("input_ids", "offsets", "response_start"))
        return cls(*arrays, dict(group.attrs["rapidin"]), group["loss_mask"][:])

    def __len__(self) -> int:
        return len(self.response_start)

    def sample(self, index: int) -> tuple[np.ndarray, int]:
        return self.input_ids[self.offsets[index] : self.offsets[index + 1]], int(self.response_start[index])

    def length(self, index: int) -> int:
        return int(self.offsets[index + 1] - self.offsets[index])

    def loss_mask_of(self, index: int) -> np.ndarray:
        """(length,) bool: the tokens whose loss the sample's gradient averages."""
        return self.loss_mask[self.offsets[index] : self.offsets[index + 1]]
