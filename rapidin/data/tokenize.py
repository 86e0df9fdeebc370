"""The prompt template and the tokenized store: records → (ids, response start, loss mask) rows in Zarr.

Tokenization concatenates the prompt's ids and the response's ids (plus EOS), so the response boundary is exact;
the loss is taken over the response tokens only — or, for a query with `"targets"` (words of its response, or
`[start, end]` character spans), over the response tokens that overlap them (target-span queries; character
offsets come from the fast tokenizer's offset mapping). In a training conversation every assistant turn (its
content and EOS) carries loss; in a query only the response does, earlier turns are prompt.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from rapidin.data.records import Record, first_line, read_records
from rapidin.errors import DataError, RapidinError
from rapidin.store import atomic_dir, write_settings

log = logging.getLogger(__name__)

SHOWN = 5  # truncated samples named in the log before the rest are only counted


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


def format_prompt(record: Record, template: str, tokenizer=None) -> str:
    """The prompt text exactly as the model was trained with (Alpaca by default; `input` is kept)."""
    if template == "alpaca":
        if record.history:
            raise DataError(f"{record.where}: a 'messages' record needs data.template: chat (not alpaca)")
        pattern = ALPACA_WITH_INPUT if record.input else ALPACA_NO_INPUT
        return pattern.format(instruction=record.instruction, input=record.input)
    if template == "chat":
        return _render(record, tokenizer, record.conversation())
    raise ValueError(f"unknown template {template!r} (expected one of {TEMPLATES})")


def check_tokenizer(tokenizer, template: str) -> None:
    """Refuse, in one line naming the config key, a tokenizer that cannot tokenize records for `template`."""
    if tokenizer.eos_token_id is None:
        raise RapidinError(f"model.path: the tokenizer of {tokenizer.name_or_path} has no EOS token to end responses")
    if template == "chat" and not tokenizer.chat_template:
        raise RapidinError(f"data.template: chat, but the tokenizer of {tokenizer.name_or_path} has no chat template")


def _render(record: Record, tokenizer, messages: list[dict]) -> str:
    """The chat template's text of `messages` followed by the assistant's turn opening."""
    from jinja2 import TemplateError

    check_tokenizer(tokenizer, "chat")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as error:
        message = f"the chat template refuses this conversation ({first_line(error)})"
        raise DataError(f"{record.where}: data.template: {message}") from None


def _chat_turns(record: Record, tokenizer) -> list[tuple[str, str | None]]:
    """The conversation cut before each assistant turn: (template text since the last turn, the turn's content).

    The last pair is (text before the response, None). The EOS text a template puts after a turn's content is
    left out: like the response, each earlier assistant turn is tokenized as its content + EOS.
    """
    messages = record.conversation()
    turns, done = [], ""
    for end in [n for n, m in enumerate(messages) if m["role"] == "assistant"] + [len(messages)]:
        head = _render(record, tokenizer, messages[:end])
        if not head.startswith(done):
            raise DataError(
                f"{record.where}: data.template: the chat template does not render messages[{end}]'s earlier "
                "turns as their own prompts did (or changes an assistant turn's text)"
            )
        before = head[len(done) :]
        if done and before.startswith(tokenizer.eos_token):
            before = before[len(tokenizer.eos_token) :]
        turns.append((before, messages[end]["content"] if end < len(messages) else None))
        done = head + (turns[-1][1] or "")
    return turns


def prompt_tokens(record: Record, tokenizer, template: str) -> tuple[list[int], list[bool]]:
    """Token ids of the prompt and, per id, whether it is an earlier assistant turn's (its content or EOS).

    BOS is added where the tokenizer adds one; chat templates carry their own.
    """
    if template != "chat":
        ids = tokenizer(format_prompt(record, template, tokenizer))["input_ids"]
        return ids, [False] * len(ids)
    ids, assistant = [], []
    for before, content in _chat_turns(record, tokenizer):
        text_ids = tokenizer(before, add_special_tokens=False)["input_ids"]
        turn_ids = response_ids(content, tokenizer) if content is not None else []
        ids += text_ids + turn_ids
        assistant += [False] * len(text_ids) + [True] * len(turn_ids)
    return ids, assistant


def prompt_ids(record: Record, tokenizer, template: str) -> list[int]:
    """Token ids of the prompt: everything before the response, as `tokenize_record` tokenizes it."""
    return prompt_tokens(record, tokenizer, template)[0]


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
    loss_mask: list[bool]  # per token: whether its loss counts (assistant turns' tokens, or only the targets')


def tokenize_record(
    record: Record, tokenizer, template: str, max_length: int, on_long: str = "truncate", queries: bool = False
) -> TokenizedSample:
    """Prompt ids + response ids; samples over `max_length` are truncated at the end or rejected.

    The loss covers the response (or its targets) and, unless `queries`, every earlier assistant turn.
    """
    prompt, earlier_turns = prompt_tokens(record, tokenizer, template)
    response = response_ids(record.output, tokenizer)
    ids = prompt + response
    targets = target_mask(record, tokenizer)
    prompt_loss = [False] * len(prompt) if queries or targets is not None else earlier_turns
    loss_mask = prompt_loss + (targets or [True] * len(response))
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
    fields: dict[str, str] | None = None,
    queries: bool = False,
) -> None:
    """Tokenize a dataset into a Zarr group: flat `input_ids`, `loss_mask`; `offsets` (N+1), `response_start` (N).

    `queries`: the file holds queries (the loss covers the response only, not earlier assistant turns).
    The settings attrs name the truncated samples: `truncated` = {"count", "lines"} (lines or rows).
    """
    check_tokenizer(tokenizer, template)
    records = read_records(source, fields=fields)
    samples = [tokenize_record(r, tokenizer, template, max_length, on_long, queries) for r in records]
    truncated = [record for record, sample in zip(records, samples, strict=True) if sample.truncated]
    if truncated:
        shown = ", ".join(r.where for r in truncated[:SHOWN])
        more = f" and {len(truncated) - SHOWN} more" if len(truncated) > SHOWN else ""
        log.warning(
            "%s: %d of %d samples truncated to %d tokens: %s%s",
            source,
            len(truncated),
            len(samples),
            max_length,
            shown,
            more,
        )
    offsets = np.zeros(len(samples) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s.ids) for s in samples])
    with atomic_dir(out) as tmp:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        ids = np.concatenate([np.asarray(s.ids, np.int32) for s in samples])
        group.create_array("input_ids", data=ids, dimension_names=("token",))
        mask = np.concatenate([np.asarray(s.loss_mask, bool) for s in samples])
        group.create_array("loss_mask", data=mask, dimension_names=("token",))
        group.create_array("offsets", data=offsets, dimension_names=("sample_bound",))  # N+1 bounds into token
        starts = np.asarray([s.response_start for s in samples], np.int32)
        group.create_array("response_start", data=starts, dimension_names=("sample",))
        write_settings(
            group,
            {
                "source": str(source),
                "n_samples": len(samples),
                "truncated": {"count": len(truncated), "lines": [r.line for r in truncated]},
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
