"""Instruction records: reading a dataset file (JSON lines, JSON array, Parquet, a `datasets` directory) into `Record`s.

A record is either Alpaca-style — `instruction` (required), `input` (optional), `output` (the response; required
for training data) — or a chat conversation, `messages`: [{"role", "content"}, …], whose last assistant turn is the
response (a query ending with another turn has none yet). Both may carry `id` (optional, unique) and any other
fields as metadata (`poisoned`, `attacked`, ...); `fields` maps our field names to the file's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rapidin.errors import DataError, RapidinError

log = logging.getLogger(__name__)


FIELDS = ("id", "instruction", "input", "output", "messages", "targets", "poisoned", "attacked", "generated", "swapped")
BOOLEANS = ("poisoned", "attacked", "generated", "swapped")  # must be JSON true/false where present


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
        raise DataError(f"{path}:{line or 1}: invalid JSON ({first_line(error)})") from None


def _parquet_rows(path: Path) -> Iterator[tuple[int, object]]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable Parquet file ({first_line(error)})") from None
    yield from _table_rows(table.to_pylist())


def _dataset_rows(path: Path) -> Iterator[tuple[int, object]]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        raise DataError(f"{path}: not a dataset saved by Dataset.save_to_disk ({first_line(error)})") from None
    if isinstance(dataset, datasets.DatasetDict):
        example = path / next(iter(dataset), "<split>")
        raise DataError(f"{path}: a DatasetDict with splits {list(dataset)}: name one split's directory ({example})")
    yield from _table_rows(dataset.to_list())


def _table_rows(rows: list[dict]) -> Iterator[tuple[int, object]]:
    """Rows with their nulls dropped (a table has every column on every row: null means absent)."""
    for number, row in enumerate(rows):
        yield number, {key: value for key, value in row.items() if value is not None}


def first_line(error: Exception) -> str:
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
        raise DataError(f"{where}: not JSON with valid Unicode text ({first_line(error)})") from None
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
