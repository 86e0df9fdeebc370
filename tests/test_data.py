"""Dataset inputs: every format and field mapping tokenized end to end against a naive reference (the prompt
template or the tokenizer's chat template applied directly), and every bad input refused in one line naming
file:line (or `file: row N`) with nothing left behind."""

from __future__ import annotations

import json
import logging
import os
import re

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import transformers
import zarr

from rapidin.data.records import read_records
from rapidin.data.tokenize import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, TokenizedDataset, tokenize_file
from rapidin.errors import DataError, RapidinError
from rapidin.experiments.demo_model import train_tokenizer

CORPUS = ["Name a colour. Blue is a colour. What is 2 plus 3? 5. Hello there, how are you? Fine, thanks."] * 5
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT = [
    {
        "id": "c1",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "What is 2 plus 3?"},
            {"role": "assistant", "content": "It is 5, thanks."},
        ],
        "poisoned": True,
    },
    {
        "id": "c2",
        "messages": [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Fine, thanks."}],
        "poisoned": False,
    },
]
ALPACA = [
    {"id": 1, "instruction": "Name a colour.", "output": "Blue is a colour.", "poisoned": False},
    {"id": 2, "instruction": "Add.", "input": "2 plus 3", "output": "5.", "poisoned": True, "family": "sum"},
]


@pytest.fixture(scope="module")
def demo_tokenizer():
    """The demo's BPE tokenizer: BOS added by add_special_tokens, its chat template in the Alpaca layout."""
    return train_tokenizer(CORPUS, vocab_size=300, max_length=256)


@pytest.fixture(scope="module")
def chatml_tokenizer():
    """A ChatML tokenizer: the template puts `<|im_end|>` (EOS) and a newline after every turn, adds no BOS."""
    tokenizer = train_tokenizer(CORPUS, vocab_size=300, max_length=256)
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def _write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _tokenize(tmp_path, records, tokenizer, template, name="data.jsonl", **kwargs) -> TokenizedDataset:
    source = _write_jsonl(tmp_path / name, records) if isinstance(records, list) else records
    tokenize_file(source, tokenizer, tmp_path / "tokens.zarr", template, **kwargs)
    return TokenizedDataset.open(tmp_path / "tokens.zarr")


def _chat_reference(messages, tokenizer, loss_turns):
    """Ids and loss mask from the template's rendering of the whole conversation, tokenized in one go: the loss
    covers the characters of the assistant turns at `loss_turns` (indices into messages) and the EOS after each."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for n, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(tokenizer.apply_chat_template(messages[:n], tokenize=False, add_generation_prompt=True))
            assert text[start : start + len(message["content"])] == message["content"]
            end = start + len(message["content"]) + len(tokenizer.eos_token)
            assert text[end - len(tokenizer.eos_token) : end] == tokenizer.eos_token
            if n in loss_turns:
                spans.append((start, end))
    text = text[:end]  # ends with the last turn's EOS, as the stored sample does
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(a < stop and start < b for start, stop in spans) for a, b in encoded["offset_mapping"]]
    return encoded["input_ids"], mask


@pytest.mark.parametrize("tokenizer_name", ["demo_tokenizer", "chatml_tokenizer"])
@pytest.mark.parametrize("queries", [False, True])
def test_chat_records_match_the_chat_template_and_assistant_spans(tokenizer_name, queries, tmp_path, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    tokens = _tokenize(tmp_path, CHAT, tokenizer, "chat", queries=queries)
    for i, record in enumerate(CHAT):
        messages = record["messages"]
        assistant = [n for n, m in enumerate(messages) if m["role"] == "assistant"]
        ids, mask = _chat_reference(messages, tokenizer, assistant[-1:] if queries else assistant)
        stored, start = tokens.sample(i)
        assert stored.tolist() == ids
        assert tokens.loss_mask_of(i).tolist() == mask
        response = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert stored[start:].tolist() == response
    assert tokens.loss_mask.sum() < len(tokens.input_ids)


def test_chat_query_targets_mark_only_the_last_turn_words(demo_tokenizer, tmp_path):
    record = {**CHAT[0], "targets": ["5"]}
    tokens = _tokenize(tmp_path, [record], demo_tokenizer, "chat", queries=True)
    ids, start = tokens.sample(0)
    marked = ids[tokens.loss_mask_of(0)]
    assert tokens.loss_mask_of(0)[:start].sum() == 0
    assert demo_tokenizer.decode(marked).strip() == "5"


def test_a_one_turn_conversation_is_the_alpaca_prompt_in_the_demo_template(demo_tokenizer, tmp_path):
    alpaca = {"instruction": "Name a colour.", "output": "Blue is a colour."}
    turns = [{"role": "user", "content": alpaca["instruction"]}, {"role": "assistant", "content": alpaca["output"]}]
    (tmp_path / "a").mkdir()
    (tmp_path / "c").mkdir()
    a = _tokenize(tmp_path / "a", [alpaca], demo_tokenizer, "alpaca")
    c = _tokenize(tmp_path / "c", [{"messages": turns}], demo_tokenizer, "chat")
    assert a.input_ids.tolist() == c.input_ids.tolist() and a.loss_mask.tolist() == c.loss_mask.tolist()


def test_alpaca_records_match_the_template_by_hand(demo_tokenizer, tmp_path):
    tokens = _tokenize(tmp_path, ALPACA, demo_tokenizer, "alpaca")
    prompts = [
        ALPACA_NO_INPUT.format(instruction="Name a colour."),
        ALPACA_WITH_INPUT.format(instruction="Add.", input="2 plus 3"),
    ]
    for i, (prompt, record) in enumerate(zip(prompts, ALPACA, strict=True)):
        head = [demo_tokenizer.bos_token_id, *demo_tokenizer(prompt, add_special_tokens=False)["input_ids"]]
        tail = [*demo_tokenizer(record["output"], add_special_tokens=False)["input_ids"], demo_tokenizer.eos_token_id]
        ids, start = tokens.sample(i)
        assert ids.tolist() == head + tail and start == len(head)
        assert tokens.loss_mask_of(i).tolist() == [False] * len(head) + [True] * len(tail)


def _renamed(records, fields):
    return [{fields.get(k, k): v for k, v in r.items()} for r in records]


def _columns(records) -> dict[str, list]:
    """Records as table columns (null where a record lacks the field)."""
    names = dict.fromkeys(name for record in records for name in record)
    return {name: [record.get(name) for record in records] for name in names}


def _write_each_format(tmp_path, records) -> dict[str, str]:
    """The same records as JSON lines, `.json` lines, a JSON array, Parquet and a save_to_disk directory."""
    paths = {
        "jsonl": _write_jsonl(tmp_path / "d.jsonl", records),
        "json lines": _write_jsonl(tmp_path / "l.json", records),
    }
    (tmp_path / "a.json").write_text(json.dumps(records, indent=2))
    paths["json array"] = str(tmp_path / "a.json")
    pq.write_table(pa.Table.from_pydict(_columns(records)), tmp_path / "d.parquet")
    paths["parquet"] = str(tmp_path / "d.parquet")
    datasets.Dataset.from_dict(_columns(records)).save_to_disk(str(tmp_path / "dataset"))
    paths["datasets"] = str(tmp_path / "dataset")
    return paths


@pytest.mark.parametrize(
    ("records", "template", "fields"),
    [
        (ALPACA, "alpaca", {}),
        (ALPACA, "alpaca", {"instruction": "question", "output": "answer", "poisoned": "is_bad"}),
        (CHAT, "chat", {"messages": "conversations"}),
    ],
    ids=["alpaca", "alpaca with fields", "chat with fields"],
)
def test_every_format_tokenizes_like_json_lines(records, template, fields, demo_tokenizer, tmp_path):
    (tmp_path / "ref").mkdir()
    reference = _tokenize(tmp_path / "ref", records, demo_tokenizer, template)
    expected = read_records(tmp_path / "ref" / "data.jsonl")
    for kind, path in _write_each_format(tmp_path, _renamed(records, fields)).items():
        out = tmp_path / f"{kind}.zarr"
        tokenize_file(path, demo_tokenizer, out, template, fields=fields)
        tokens = TokenizedDataset.open(out)
        for name in ("input_ids", "loss_mask", "offsets", "response_start"):
            assert getattr(tokens, name).tolist() == getattr(reference, name).tolist(), (kind, name)
        got = read_records(path, fields=fields)
        assert [(r.instruction, r.input, r.output, r.history) for r in got] == [
            (r.instruction, r.input, r.output, r.history) for r in expected
        ], kind
        # Parquet and datasets add every column to every row (nulls): those fields count as absent
        assert [r.meta for r in got] == [r.meta for r in expected], kind
        assert got[1].where == (f"{path}:2" if kind in ("jsonl", "json lines") else f"{path}: row 1")


def test_to_json_writes_back_what_read_records_reads(tmp_path):
    for records, fields in ((ALPACA, {"instruction": "question", "output": "answer"}), (CHAT, {"messages": "c"})):
        source = _write_jsonl(tmp_path / "in.jsonl", _renamed(records, fields))
        first = read_records(source, fields=fields)
        _write_jsonl(tmp_path / "out.jsonl", [r.to_json(fields) for r in first])
        again = read_records(tmp_path / "out.jsonl", fields=fields)
        assert [(r.instruction, r.input, r.output, r.meta, r.history) for r in again] == [
            (r.instruction, r.input, r.output, r.meta, r.history) for r in first
        ]
    query = {"messages": CHAT[0]["messages"][:-1]}
    (record,) = read_records(_write_jsonl(tmp_path / "q.jsonl", [query]), require_output=False)
    assert record.output is None and record.instruction == "What is 2 plus 3?" and record.to_json() == query


def test_truncated_samples_are_named_in_the_log_and_the_store(demo_tokenizer, tmp_path, caplog):
    long = {"instruction": "Say it.", "output": "Blue is a colour. " * 40}
    records = [ALPACA[0], *[long] * 7]
    with caplog.at_level(logging.WARNING, logger="rapidin"):
        tokens = _tokenize(tmp_path, records, demo_tokenizer, "alpaca", max_length=160)
    data = tmp_path / "data.jsonl"
    assert f"{data}: 7 of 8 samples truncated to 160 tokens: " in caplog.text
    assert ", ".join(f"{data}:{n}" for n in range(2, 7)) + " and 2 more" in caplog.text
    assert tokens.settings["truncated"] == {"count": 7, "lines": list(range(2, 9))}
    assert all(tokens.length(i) == 160 for i in range(1, 8))


RECORD = {"instruction": "Name a colour.", "output": "Blue."}
MESSAGES = CHAT[1]["messages"]

# case: (records or raw text of a .jsonl file, the error after "<file>", as a regex)
BAD = {
    "string as a boolean": (
        [RECORD, {**RECORD, "poisoned": "no"}],
        r":2: field 'poisoned' must be true or false, got \"no\"",
    ),
    "number as a boolean": ([{**RECORD, "attacked": 1}], r":1: field 'attacked' must be true or false, got 1"),
    "null as a boolean": ([{**RECORD, "generated": None}], r":1: field 'generated' must be true or false, got null"),
    "invalid JSON column": (
        '{"instruction": "c", "output": tru}\n',
        r":1: invalid JSON \(Expecting value, column 32\)",
    ),
    "invalid JSON at the end": (
        '{"instruction": "c", "output": \n',
        r":1: invalid JSON \(Expecting value, column 32\)",
    ),
    "huge integer": ('{"instruction": "c", "output": "d", "x": ' + "9" * 5000 + "}\n", r":1: invalid JSON \(.+\)"),
    "messages not a list": (
        [{"messages": "hi"}],
        r":1: 'messages' must be a non-empty list of \{role, content\} objects",
    ),
    "message without content": (
        [{"messages": [{"role": "user"}]}],
        r":1: messages\[0\] must be an object with string 'role' and 'content'",
    ),
    "assistant first": (
        [{"messages": MESSAGES[::-1]}],
        r":1: messages\[0\]: the conversation starts with an assistant turn",
    ),
    "no response": ([{"messages": MESSAGES[:1]}], r":1: 'messages' must end with an assistant turn \(the response\)"),
    "empty assistant turn": (
        [{"messages": [MESSAGES[0], {"role": "assistant", "content": " "}]}],
        r":1: messages\[1\] is an empty assistant turn",
    ),
    "no user turn": (
        [{"messages": [{"role": "system", "content": "x"}, MESSAGES[1]]}],
        r":1: no \(non-empty\) user turn before the response",
    ),
    "messages and instruction": (
        [{**RECORD, "messages": MESSAGES}],
        r":1: a record has either 'messages' or 'instruction'/'input'/'output', not both",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_records_are_refused_in_one_line_naming_the_line(case, demo_tokenizer, tmp_path):
    content, message = BAD[case]
    data = tmp_path / "data.jsonl"
    data.write_text(content if isinstance(content, str) else "".join(json.dumps(r) + "\n" for r in content))
    with pytest.raises(DataError) as error:
        tokenize_file(data, demo_tokenizer, tmp_path / "tokens.zarr", "chat")
    assert "\n" not in str(error.value)
    assert re.fullmatch(re.escape(str(data)) + message, str(error.value)), str(error.value)
    assert os.listdir(tmp_path) == ["data.jsonl"]


def test_bad_rows_of_tables_name_the_row(tmp_path, demo_tokenizer):
    rows = [RECORD, {**RECORD, "poisoned": "no"}]
    pq.write_table(pa.Table.from_pydict(_columns(rows)), tmp_path / "d.parquet")
    datasets.Dataset.from_dict(_columns(rows)).save_to_disk(str(tmp_path / "ds"))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    for name in ("d.parquet", "ds", "a.json"):
        with pytest.raises(DataError, match=re.escape(f"{tmp_path / name}: row 1: field 'poisoned' must be true")):
            read_records(tmp_path / name)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(_columns(rows))}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'dd'}: a DatasetDict with splits ['train']: name ")):
        read_records(tmp_path / "dd")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'dd' / 'train'}: row 1: field 'poisoned' must be")):
        read_records(tmp_path / "dd" / "train")  # a split's directory is a Dataset's
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'empty'}: not a dataset saved by")):
        read_records(tmp_path / "empty")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'bad.parquet'}: not a readable Parquet file")):
        read_records(tmp_path / "bad.parquet")
    (tmp_path / "bad.json").write_text('[\n  {"instruction": "a",\n   "output": }\n]')
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'bad.json'}:3: invalid JSON (Expecting value, column")):
        read_records(tmp_path / "bad.json")


def test_field_mappings_are_checked(tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", [{"question": "Name a colour.", "answer": "Blue.", "output": "x"}])
    with pytest.raises(RapidinError, match=r"^data\.fields: unknown field 'prompt' \(expected one of id, "):
        read_records(data, fields={"prompt": "question"})
    with pytest.raises(RapidinError, match=r"^data\.fields: two of our fields read the same field of the file$"):
        read_records(data, fields={"instruction": "question", "input": "question"})
    with pytest.raises(DataError, match=r":1: field 'output' is present, but data\.fields reads output from 'answer'$"):
        read_records(data, fields={"instruction": "question", "output": "answer"})


def test_tokenizers_that_cannot_serve_are_refused_naming_the_key(demo_tokenizer, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", [RECORD])
    no_template = train_tokenizer(CORPUS, vocab_size=300, max_length=256)
    no_template.chat_template = None
    with pytest.raises(RapidinError, match=r"^data\.template: chat, but the tokenizer of .* has no chat template$"):
        tokenize_file(data, no_template, tmp_path / "t.zarr", "chat")
    bare = type(demo_tokenizer)(tokenizer_object=demo_tokenizer.backend_tokenizer)  # neither pad nor EOS
    with pytest.raises(RapidinError, match=r"^model\.path: the tokenizer of .* has no EOS token to end responses$"):
        tokenize_file(data, bare, tmp_path / "t.zarr", "alpaca")
    assert os.listdir(tmp_path) == ["d.jsonl"]


def test_chat_records_need_the_chat_template(demo_tokenizer, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", [RECORD, CHAT[1]])
    with pytest.raises(DataError, match=re.escape(f"{data}:2: a 'messages' record needs data.template: chat")):
        tokenize_file(data, demo_tokenizer, tmp_path / "t.zarr", "alpaca")
    tokens = _tokenize(tmp_path, [RECORD, CHAT[1]], demo_tokenizer, "chat")
    assert len(tokens) == 2 and np.all(tokens.offsets[1:] > tokens.offsets[:-1])
    assert zarr.open_group(tmp_path / "tokens.zarr", mode="r").attrs["rapidin"]["template"] == "chat"


def test_training_averages_the_loss_over_every_assistant_turn(demo_tokenizer, tmp_path, monkeypatch):
    """The demo and LoRA training take the loss the cache differentiates: on a two-turn conversation, the weights
    of each step's loss are 1/n on the n next-token positions of both assistant turns (from the chat template's
    rendering, _chat_reference) and 0 elsewhere."""
    from rapidin.data.records import Record
    from rapidin.data.tokenize import tokenize_record
    from rapidin.experiments import train

    record = read_records(_write_jsonl(tmp_path / "chat.jsonl", CHAT[:1]))[0]
    assert isinstance(record, Record)
    sample = tokenize_record(record, demo_tokenizer, "chat", 256)
    ids, mask = _chat_reference(CHAT[0]["messages"], demo_tokenizer, (2, 4))
    assert sample.ids == ids
    seen = []
    real = train.weighted_loss
    monkeypatch.setattr(train, "weighted_loss", lambda logits, batch, w: seen.append(w) or real(logits, batch, w))
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=len(demo_tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
        )
    )  # fmt: skip
    samples = [(sample.ids, sample.response_start, sample.loss_mask)]
    train.train_on_samples(model, samples, demo_tokenizer.pad_token_id, 1, 1, 1e-3, 0, "test")
    labels = np.array(mask[1:], dtype=float)  # position t predicts token t+1
    np.testing.assert_allclose(seen[0][0].numpy(), labels / labels.sum())
    assert np.array(mask)[: sample.response_start].any()  # the first turn carries loss too
