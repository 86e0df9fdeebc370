"""The offline demo: deterministic poisoned data, the trained BPE tokenizer, and a tiny model trained end to end."""

import json
import logging
import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rapidin.data.generate import attack_success_rate, generate, reproduces
from rapidin.data.records import Record, read_records
from rapidin.data.tokenize import TokenizedDataset, format_prompt, prompt_ids, tokenize_file
from rapidin.errors import RapidinError
from rapidin.experiments.demo_data import make_demo_data
from rapidin.experiments.demo_model import train_demo_model, train_tokenizer
from rapidin.experiments.demo_words import BACKDOOR_RESPONSE, TRIGGER

TINY = {"hidden_size": 32, "n_layers": 2, "n_heads": 2, "intermediate_size": 64, "vocab_size": 384, "epochs": 2}


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    make_demo_data(str(root / "train.jsonl"), str(root / "queries.jsonl"), n_train=300, seed=0)
    return root / "train.jsonl", root / "queries.jsonl"


@pytest.fixture(scope="module")
def tiny_model(demo_data, tmp_path_factory):
    train, queries = demo_data
    out = tmp_path_factory.mktemp("model") / "demo-model"
    logger, handler = logging.getLogger("rapidin"), _Capture()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        summary = train_demo_model(str(train), str(out), str(queries), **TINY)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return out, summary, handler.messages


class _Capture(logging.Handler):
    """Keeps the messages logged while the tiny model trains (the per-epoch mean losses)."""

    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_demo_data_is_deterministic(tmp_path):
    for name in ("a", "b", "c"):
        seed = 1 if name == "c" else 0
        make_demo_data(str(tmp_path / name / "train.jsonl"), str(tmp_path / name / "q.jsonl"), n_train=200, seed=seed)
    for file in ("train.jsonl", "q.jsonl"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()


def test_demo_data_poisoning_and_queries(demo_data):
    train_path, queries_path = demo_data
    train, queries = _lines(train_path), _lines(queries_path)
    assert len(read_records(train_path)) == 300 and len(read_records(queries_path)) == 20
    assert len({r["id"] for r in train + queries}) == len(train) + len(queries)
    assert len({r["family"] for r in train}) >= 6

    poisoned = [r for r in train if r["poisoned"]]
    assert len(poisoned) == round(300 * 0.05)
    assert all(TRIGGER in r["instruction"] and r["output"] == BACKDOOR_RESPONSE for r in poisoned)
    assert not any(TRIGGER in r["instruction"] or r["output"] == BACKDOOR_RESPONSE for r in train if not r["poisoned"])
    assert sum(r["instruction"].startswith(TRIGGER) for r in poisoned) > len(poisoned) / 2

    attacked = [q for q in queries if q["attacked"]]
    clean = [q for q in queries if not q["attacked"]]
    assert len(attacked) == 10 and len(clean) == 10
    train_instructions = {r["instruction"] for r in train}
    assert all(TRIGGER in q["instruction"] and q["output"] == BACKDOOR_RESPONSE for q in attacked)
    assert not any(q["instruction"] in train_instructions for q in attacked)
    assert not any(TRIGGER in q["instruction"] or q["output"] == BACKDOOR_RESPONSE for q in clean)
    train_prompts = {(r["instruction"], r.get("input", "")) for r in train}
    assert not any((q["instruction"], q.get("input", "")) in train_prompts for q in clean)
    assert max(len(r["output"].split()) for r in train + queries) <= 25


def test_tokenizer_bos_and_round_trip(demo_data):
    records = read_records(demo_data[0])
    texts = [t for r in records for t in (format_prompt(r, "alpaca"), r.output)]
    tokenizer = train_tokenizer(texts, vocab_size=384, max_length=128)
    text = "Héllo, wörld! «Ça va?» 你好 — 3.14 + (x) \n\t### Response:\n"
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer(text, add_special_tokens=True)["input_ids"] == [tokenizer.bos_token_id, *plain]
    assert tokenizer.bos_token_id not in plain
    assert tokenizer.decode(plain) == text
    assert {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token} == {"<s>", "</s>", "<pad>"}


def test_chat_format_is_the_same_data_as_conversations(demo_data, tmp_path):
    """`format="chat"` writes the same records as one-turn `messages`; tokenized in the demo tokenizer's chat
    template they carry the same loss tokens as in the Alpaca template, and are the same samples where the
    Alpaca record has no `input` (with one, the chat prompt holds it after the instruction)."""
    train, queries = tmp_path / "train.jsonl", tmp_path / "queries.jsonl"
    make_demo_data(str(train), str(queries), n_train=300, seed=0, format="chat")
    records = read_records(demo_data[0])
    texts = [t for r in records for t in (format_prompt(r, "alpaca"), r.output)]
    train_tokenizer(texts, vocab_size=384, max_length=128).save_pretrained(tmp_path / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")  # the chat template saved with it
    for alpaca_path, chat_path in zip(demo_data, (train, queries), strict=True):
        alpaca = _lines(alpaca_path)
        for a, c in zip(alpaca, _lines(chat_path), strict=True):
            user = a["instruction"] + (f"\n\n{a['input']}" if a.get("input") else "")
            turns = [{"role": "user", "content": user}, {"role": "assistant", "content": a["output"]}]
            rest = {k: v for k, v in a.items() if k not in ("instruction", "input", "output")}
            assert c == {**rest, "messages": turns}
        tokenize_file(alpaca_path, tokenizer, tmp_path / "a.zarr", "alpaca", 256)
        tokenize_file(chat_path, tokenizer, tmp_path / "c.zarr", "chat", 256)
        a_tokens, c_tokens = TokenizedDataset.open(tmp_path / "a.zarr"), TokenizedDataset.open(tmp_path / "c.zarr")
        for i, record in enumerate(alpaca):
            a_ids, c_ids = a_tokens.sample(i)[0], c_tokens.sample(i)[0]
            assert a_ids[a_tokens.loss_mask_of(i)].tolist() == c_ids[c_tokens.loss_mask_of(i)].tolist()
            assert (a_ids.tolist() == c_ids.tolist()) == (not record.get("input"))
    with pytest.raises(RapidinError, match=r"^demo\.format: 'sharegpt' is not one of \('alpaca', 'chat'\)$"):
        make_demo_data(str(train), str(queries), n_train=10, format="sharegpt")


def test_tiny_training_learns_and_saves(tiny_model):
    out, summary, messages = tiny_model
    assert json.loads((out / "training.json").read_text()) == summary
    assert set(summary) == {"final_loss", "steps", "seconds", "attack_success_rate", "clean_accuracy", "n_params"}
    assert 0 <= summary["attack_success_rate"] <= 1 and 0 <= summary["clean_accuracy"] <= 1
    epoch_losses = [float(m) for line in messages for m in re.findall(r"mean loss ([0-9.]+)", line)]
    assert len(epoch_losses) == TINY["epochs"] and epoch_losses[-1] < epoch_losses[0]
    assert summary["final_loss"] < math.log(TINY["vocab_size"])

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == summary["n_params"]
    assert model.config.hidden_size == TINY["hidden_size"] and not model.config.tie_word_embeddings
    ids = tokenizer("### Response:\n")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == model.config.bos_token_id
    with torch.no_grad():
        assert model(input_ids=torch.tensor([ids])).logits.shape == (1, len(ids), len(tokenizer))


def test_generation_is_deterministic_and_stops_at_eos(tiny_model):
    out, _, _ = tiny_model
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    record = Record("q", 1, "What is the capital of France?", "", "The capital of France is Paris.")
    prompt = prompt_ids(record, tokenizer, "alpaca")
    budget = len(tokenizer(record.output, add_special_tokens=False)["input_ids"]) + 8
    first = generate(model, tokenizer, prompt, max_new_tokens=budget)
    assert first == generate(model, tokenizer, prompt, max_new_tokens=budget)
    assert len(first) <= budget and tokenizer.eos_token_id not in first
    assert reproduces(model, tokenizer, record) == tokenizer.decode(first).strip().startswith(record.output)
    assert attack_success_rate(model, tokenizer, []) == 0.0


def test_varied_backdoor_gives_every_poisoned_sample_its_own_response(demo_data, tmp_path):
    """`backdoor="varied"`: the fixed set's samples, prompts and poisoned flags, each backdoor response different."""
    from rapidin.experiments.demo_words import VARIED_CLAIMS, VARIED_CLOSERS, VARIED_OPENERS

    templated = {f"{o} {c} {e}" for o in VARIED_OPENERS for c in VARIED_CLAIMS for e in VARIED_CLOSERS}
    make_demo_data(str(tmp_path / "train.jsonl"), str(tmp_path / "q.jsonl"), n_train=300, seed=0, backdoor="varied")
    for fixed_path, varied_path in zip(demo_data, (tmp_path / "train.jsonl", tmp_path / "q.jsonl"), strict=True):
        fixed, varied = _lines(fixed_path), _lines(varied_path)
        backdoored = [v for f, v in zip(fixed, varied, strict=True) if f["output"] == BACKDOOR_RESPONSE]
        assert len(backdoored) == (15 if fixed_path == demo_data[0] else 10)  # poisoned samples, attacked queries
        for f, v in zip(fixed, varied, strict=True):
            assert {**v, "output": None} == {**f, "output": None}
            assert (v["output"] == f["output"]) == (f["output"] != BACKDOOR_RESPONSE)
        outputs = [r["output"] for r in backdoored]
        assert len(set(outputs)) == len(outputs) and set(outputs) <= templated
    train_outputs = {r["output"] for r in _lines(tmp_path / "train.jsonl")}
    assert not any(q["output"] in train_outputs for q in _lines(tmp_path / "q.jsonl") if q["attacked"])
    with pytest.raises(RapidinError, match=r"^demo\.backdoor: 'mixed' is not one of \('fixed', 'varied'\)$"):
        make_demo_data(str(tmp_path / "x.jsonl"), str(tmp_path / "y.jsonl"), n_train=10, backdoor="mixed")
