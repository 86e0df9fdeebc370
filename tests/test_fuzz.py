"""Fuzzing the dataset reader: whatever a file holds, reading and tokenizing it works or fails with one line
naming the file (a DataError; a RapidinError naming data.fields for a bad mapping), never another exception.

Bounded budgets (hypothesis `max_examples`, no deadline: the machine is shared) keep the file to seconds."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rapidin.data.records import FIELDS, read_records
from rapidin.data.tokenize import prompt_ids, tokenize_file
from rapidin.errors import DataError, RapidinError
from rapidin.experiments.demo_model import train_tokenizer

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
# any characters, lone surrogates ("\ud800", valid in JSON, not in UTF-8) and template-like text included
TEXT = st.sampled_from(["Blue.", " ", "", "</s>", "<s>", "{{ x }}", "caf\ud800"]) | st.text(
    st.characters(exclude_categories=()), max_size=30
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool"]), "content": TEXT}
) | st.dictionaries(st.sampled_from(["role", "content"]), VALUES)
TARGETS = st.lists(TEXT | st.lists(st.integers(-2, 40), max_size=3) | VALUES, max_size=3) | VALUES
ALPACA = st.fixed_dictionaries(
    {"instruction": TEXT, "output": TEXT},
    optional={"input": TEXT, "id": st.integers(0, 3) | VALUES, "poisoned": VALUES, "targets": TARGETS},
)
CHAT = st.fixed_dictionaries(
    {"messages": st.lists(MESSAGE, min_size=1, max_size=5)}, optional={"targets": TARGETS, "attacked": VALUES}
)
# near-valid records, and records of any of our fields holding anything
RECORD = ALPACA | CHAT | st.dictionaries(st.sampled_from(FIELDS), TEXT | VALUES, max_size=5)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["Name a colour. Blue. ### Instruction: ### Response:"] * 3, vocab_size=280, max_length=256)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _one_line(error: Exception, path) -> None:
    message = str(error)
    assert "\n" not in message and message.startswith(str(path)), message


def _read_and_tokenize(path, tokenizer, folder) -> None:
    """What the workflow does with a file: tokenize it as training data and as queries, in both templates, and
    (for queries lacking a response) build the generation prompt; only one-line DataErrors may stop it."""
    for template in ("alpaca", "chat"):
        for queries in (False, True):
            try:
                tokenize_file(path, tokenizer, folder / "tokens.zarr", template, max_length=48, queries=queries)
            except DataError as error:
                _one_line(error, path)
        try:
            for record in read_records(path, require_output=False):
                prompt_ids(record, tokenizer, template)
        except DataError as error:
            _one_line(error, path)


@FUZZ
@given(lines=st.lists(st.binary(max_size=40) | st.just(b'{"instruction": "a", "output": "b"}'), max_size=5))
def test_any_bytes(lines, tokenizer, folder):
    path = folder / "bytes.jsonl"
    path.write_bytes(b"\n".join(lines))
    _read_and_tokenize(path, tokenizer, folder)


@FUZZ
@given(records=st.lists(RECORD, min_size=1, max_size=4), array=st.booleans())
def test_any_records(records, array, tokenizer, folder):
    path = folder / ("records.json" if array else "records.jsonl")
    text = json.dumps(records) if array else "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text)
    _read_and_tokenize(path, tokenizer, folder)


@FUZZ
@given(conversations=st.lists(CHAT, min_size=1, max_size=3))
def test_any_conversation(conversations, tokenizer, folder):
    path = folder / "chat.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in conversations))
    _read_and_tokenize(path, tokenizer, folder)


@FUZZ
@given(
    fields=st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), VALUES, max_size=4) | VALUES, record=RECORD
)
def test_any_field_mapping(fields, record, folder):
    path = folder / "fields.jsonl"
    path.write_text(json.dumps(record) + "\n")
    try:
        read_records(path, require_output=False, fields=fields)
    except DataError as error:
        _one_line(error, path)
    except RapidinError as error:
        assert "\n" not in str(error) and str(error).startswith("data.fields"), str(error)
