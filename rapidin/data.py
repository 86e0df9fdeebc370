"""Instruction records (Alpaca-style or chat `messages`), the prompt template, and the tokenized store.

A dataset is JSON lines (`.jsonl`, or `.json` holding one object per line), a JSON array (`.json`), a Parquet
file (`.parquet`) or a Hugging Face `datasets` directory (`Dataset.save_to_disk`). A record is either Alpaca-style
— `instruction` (required), `input` (optional), `output` (the response; required for training data) — or a chat
conversation, `messages`: [{"role", "content"}, …], whose last assistant turn is the response (a query ending
with another turn has none yet). Both may carry `id` (optional, unique) and any other fields as metadata
(`poisoned`, `attacked`, ...); `fields` maps our field names to the file's.

Tokenization concatenates the prompt's ids and the response's ids (plus EOS), so the response boundary is exact;
the loss is taken over the response tokens only — or, for a query with `"targets"` (words of its response, or
`[start, end]` character spans), over the response tokens that overlap them (target-span queries; character
offsets come from the fast tokenizer's offset mapping). In a training conversation every assistant turn (its
content and EOS) carries loss; in a query only the response does, earlier turns are prompt.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from rapidin.errors import DataError, RapidinError
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
FIELDS = ("id", "instruction", "input", "output", "messages", "targets", "poisoned", "attacked", "generated", "swapped")
BOOLEANS = ("poisoned", "attacked", "generated", "swapped")  # must be JSON true/false where present
SHOWN = 5  # truncated samples named in the log before the rest are only counted


@dataclass(frozen=True)
class Record:
    """One instruction/response pair, or a conversation up to its response.

    `line` is its 1-based line in `source`, or, for tables (Parquet, datasets, JSON arrays; `table`), its
    0-based row. A chat record keeps the messages before its response in `history` (empty: an Alpaca record);
    its `instruction` is then the last user turn.
    """

    source: str
    line: int
    instruction: str
    input: str = ""
    output: str | None = None
    meta: dict = field(default_factory=dict)
    history: tuple[dict, ...] = ()
    table: bool = False

    @property
    def where(self) -> str:
        return _where(self.source, self.line, self.table)

    def conversation(self) -> list[dict]:
        """The messages before the response (an Alpaca record: one user turn, its input after the instruction)."""
        if self.history:
            return list(self.history)
        return [{"role": "user", "content": self.instruction + (f"\n\n{self.input}" if self.input else "")}]

    def to_json(self, fields: dict[str, str] | None = None) -> dict:
        """The record as a JSON object in the file's field names (`fields`), as read_records reads it back."""
        if self.history:
            turns = [{"role": "assistant", "content": self.output}] if self.output is not None else []
            obj = {"messages": [*self.history, *turns], **self.meta}
        else:
            obj = {"instruction": self.instruction, "input": self.input, "output": self.output, **self.meta}
        return {(fields or {}).get(key, key): value for key, value in obj.items()}


def read_records(path: str | Path, require_output: bool = True, fields: dict[str, str] | None = None) -> list[Record]:
    """Read and validate a dataset; any bad record raises DataError naming file:line (or `file: row N`).

    Args:
        path: JSON lines, a JSON array (`.json`), `.parquet`, or a `datasets` directory (see the module docstring).
        require_output: every record must have a response (training data); queries may lack one.
        fields: our field name → the file's (config `data.fields`), e.g. {"output": "answer"}.
    """
    path = Path(path)
    rename = _check_fields(fields)
    if path.is_dir():
        rows, table = _dataset_rows(path), True
    elif not path.is_file():
        raise DataError(f"{path}: no such file or directory")
    elif path.suffix == ".parquet":
        rows, table = _parquet_rows(path), True
    elif path.suffix == ".json" and path.read_bytes().lstrip()[:1] == b"[":
        rows, table = _json_array_rows(path), True
    else:
        rows, table = _json_lines(path), False
    records, seen_ids = [], {}
    for number, obj in rows:
        where = _where(str(path), number, table)
        record = _record_from_json(_renamed(obj, rename, where), str(path), number, require_output, table)
        records.append(record)
        if "id" in record.meta:
            key = json.dumps(record.meta["id"])
            if key in seen_ids:
                first = f"row {seen_ids[key]}" if table else f"line {seen_ids[key]}"
                raise DataError(f"{record.where}: duplicate id {key} (first on {first})")
            seen_ids[key] = number
    if not records:
        raise DataError(f"{path}: empty dataset (no records)")
    return records


def _where(source: str, line: int, table: bool) -> str:
    return f"{source}: row {line}" if table else f"{source}:{line}"


def _json_lines(path: Path) -> Iterator[tuple[int, object]]:
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            text = _decode(raw, f"{path}:{number}").rstrip("\r\n")
            if text.strip():
                yield number, _parse_json(text, path, number)


def _json_array_rows(path: Path) -> Iterator[tuple[int, object]]:
    yield from enumerate(_parse_json(_decode(path.read_bytes(), str(path)), path))


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{where}: not valid UTF-8 ({error.reason} at byte {error.start})") from None


def _parse_json(text: str, path: Path, line: int = 0):
    """json.loads; an error names file:line (`line`, else the error's line in the document) and the column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{line or error.lineno}: invalid JSON ({error.msg}, column {error.colno})") from None
    except (ValueError, RecursionError) as error:  # an integer of over 4300 digits; nesting too deep
        raise DataError(f"{path}:{line or 1}: invalid JSON ({_first_line(error)})") from None


def _parquet_rows(path: Path) -> Iterator[tuple[int, object]]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable Parquet file ({_first_line(error)})") from None
    yield from _table_rows(table.to_pylist())


def _dataset_rows(path: Path) -> Iterator[tuple[int, object]]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        raise DataError(f"{path}: not a dataset saved by Dataset.save_to_disk ({_first_line(error)})") from None
    if isinstance(dataset, datasets.DatasetDict):
        example = path / next(iter(dataset), "<split>")
        raise DataError(f"{path}: a DatasetDict with splits {list(dataset)}: name one split's directory ({example})")
    yield from _table_rows(dataset.to_list())


def _table_rows(rows: list[dict]) -> Iterator[tuple[int, object]]:
    """Rows with their nulls dropped (a table has every column on every row: null means absent)."""
    for number, row in enumerate(rows):
        yield number, {key: value for key, value in row.items() if value is not None}


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _check_fields(fields: dict[str, str] | None) -> dict[str, str]:
    """The file's field name → ours, from config `data.fields` (ours → the file's)."""
    fields = fields or {}
    if not isinstance(fields, dict):
        raise RapidinError(f"data.fields: must map our field names to the file's, got {fields!r}")
    for ours, theirs in fields.items():
        if ours not in FIELDS:
            raise RapidinError(f"data.fields: unknown field {ours!r} (expected one of {', '.join(FIELDS)})")
        if not isinstance(theirs, str) or not theirs:
            raise RapidinError(f"data.fields.{ours}: must be a field name (a non-empty string)")
    if len(set(fields.values())) < len(fields):
        raise RapidinError("data.fields: two of our fields read the same field of the file")
    return {theirs: ours for ours, theirs in fields.items() if theirs != ours}


def _renamed(obj, rename: dict[str, str], where: str):
    if not rename or not isinstance(obj, dict):
        return obj
    ours = set(rename.values())
    for key in obj:
        if key in ours and key not in rename:
            theirs = next(t for t, o in rename.items() if o == key)
            raise DataError(f"{where}: field '{key}' is present, but data.fields reads {key} from '{theirs}'")
    return {rename.get(key, key): value for key, value in obj.items()}


def _record_from_json(obj, source: str, line: int, require_output: bool, table: bool = False) -> Record:
    where = _where(source, line, table)
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    try:  # what every later step writes back out: JSON, UTF-8
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as error:  # a table's dates or bytes; a lone surrogate "\ud800"
        raise DataError(f"{where}: not JSON with valid Unicode text ({_first_line(error)})") from None
    if "id" in obj and (not isinstance(obj["id"], str | int) or isinstance(obj["id"], bool)):
        raise DataError(f"{where}: field 'id' must be a string or an integer")
    for key in BOOLEANS:
        if key in obj and not isinstance(obj[key], bool):
            raise DataError(f"{where}: field '{key}' must be true or false, got {json.dumps(obj[key])}")
    if "messages" in obj:
        return _chat_record(obj, source, line, require_output, table, where)
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
    meta = {k: v for k, v in obj.items() if k not in ("instruction", "input", "output")}
    return Record(source, line, obj["instruction"], obj.get("input") or "", output, meta, table=table)


def _chat_record(obj: dict, source: str, line: int, require_output: bool, table: bool, where: str) -> Record:
    """A `messages` record: the response is its last turn when that is the assistant's (else none yet)."""
    if any(key in obj for key in ("instruction", "input", "output")):
        raise DataError(f"{where}: a record has either 'messages' or 'instruction'/'input'/'output', not both")
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for n, message in enumerate(messages):
        if not (isinstance(message, dict) and all(isinstance(message.get(k), str) for k in ("role", "content"))):
            raise DataError(f"{where}: messages[{n}] must be an object with string 'role' and 'content'")
        if message["role"] == "assistant" and not message["content"].strip():
            raise DataError(f"{where}: messages[{n}] is an empty assistant turn")
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: messages[0]: the conversation starts with an assistant turn")
    has_output = messages[-1]["role"] == "assistant"
    history = messages[:-1] if has_output else messages
    if require_output and not has_output:
        raise DataError(f"{where}: 'messages' must end with an assistant turn (the response)")
    users = [m["content"] for m in history if m["role"] == "user"]
    if not users or not users[-1].strip():
        raise DataError(f"{where}: no (non-empty) user turn before the response")
    output = messages[-1]["content"] if has_output else None
    meta = {k: v for k, v in obj.items() if k != "messages"}
    return Record(source, line, users[-1], "", output, meta, tuple(dict(m) for m in history), table)


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
        message = f"the chat template refuses this conversation ({_first_line(error)})"
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
