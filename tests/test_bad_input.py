"""Bad input is refused with one line naming file:line or the config key, a non-zero exit status, and nothing
left behind: no output, no `.partial` store, no temporary directory."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from rapidin.cli import main

from .conftest import error_line, tiny_llama
from .workflow import copy_workflow, snakemake

RECORD = '{"instruction": "Name a colour.", "output": "Blue."}\n'
LONG = json.dumps({"instruction": "Repeat.", "output": "blue " * 300}) + "\n"

# case: (data file content, tokenize flags, the error after "rapidin: error: <data file>", as a regex)
DATA = {
    "invalid JSON": (RECORD + '{"instruction": "c", "output": \n', [], r":2: invalid JSON .+"),
    "missing instruction": ('{"output": "Blue."}\n', [], r":1: missing or empty 'instruction'"),
    "missing output": ('{"instruction": "Name a colour."}\n', [], r":1: missing 'output'"),
    "empty response": ('{"instruction": "Name a colour.", "output": " "}\n', [], r":1: empty response \('output'\)"),
    "not UTF-8": ('{"instruction": "caf\xe9", "output": "b"}\n'.encode("latin-1"), [], r":1: not valid UTF-8 .+"),
    "empty dataset": ("\n", [], r": empty dataset \(no records\)"),
    "duplicate ids": (
        '{"id": 7, ' + RECORD[1:] + '{"id": 7, ' + RECORD[1:],
        [],
        r":2: duplicate id 7 \(first on line 1\)",
    ),
    "too long": (LONG, ["--max-length", "200", "--on-long", "error"], r":1: \d+ tokens exceed data\.max_length=200"),
}

# case: (grads flags, the error after "rapidin: error: ", as a regex); MODELS stands for the bad_models directory
GRADS = {
    "K not a power of two": (["--k", "1000"], r"cache\.k: 1000 is not a power of two"),
    "K larger than D": (["--k", "65536"], r"cache\.k: 65536 is larger than the gradient dimension D=\d+"),
    "more shards than samples": (["--n-shards", "301"], r"cache\.n_shards: 301 shards for only 300 samples"),
    "missing model": (
        ["--model", "MODELS/missing"],
        r"model\.path: MODELS/missing is not a Hugging Face model directory \(no config\.json\)",
    ),
    "garbage model": (["--model", "MODELS/garbage"], r"model\.path: MODELS/garbage .+"),
    "BERT model": (
        ["--model", "MODELS/bert"],
        r"model\.path: MODELS/bert is not a causal LM: its predictions depend on later tokens",
    ),
    "adapter for other sizes": (
        ["--adapter", "MODELS/lora_wider"],
        r"model\.adapter: MODELS/lora_wider does not match the model: .*size mismatch .+",
    ),
    "adapter for another architecture": (
        ["--adapter", "MODELS/lora_gpt2"],
        r"model\.adapter: MODELS/lora_gpt2 does not match the model: Target modules \{'c_attn'\} not found .+",
    ),
}

# case: (--config override, the one line naming the key)
CONFIG = {
    "unknown key": ("cache={shards: 3}", "cache: Additional properties are not allowed ('shards' was unexpected)"),
    "unknown section": ("bogus=1", "config: Additional properties are not allowed ('bogus' was unexpected)"),
    "wrong type": ("cache={n_shards: two}", "cache.n_shards: 'two' is not of type 'integer'"),
}


@pytest.fixture(scope="module")
def bad_models(model_and_tokens, tmp_path_factory) -> Path:
    """Model directories that are not causal LMs, each with the good model's tokenizer, and LoRA adapters made
    for other models."""
    root = tmp_path_factory.mktemp("bad_models")
    tokenizer_files = sorted((model_and_tokens / "model").glob("tokenizer*"))
    (root / "garbage").mkdir()
    (root / "garbage/config.json").write_text("{not json")
    BertModel(BertConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)).save_pretrained(
        root / "bert"
    )
    for name in ("garbage", "bert"):
        for file in tokenizer_files:
            shutil.copy(file, root / name)
    wider = tiny_llama(torch.float32, vocab=300, hidden=48)
    get_peft_model(wider, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(root / "lora_wider")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=16, n_layer=1, n_head=2))
    get_peft_model(gpt2, LoraConfig(r=2, target_modules=["c_attn"])).save_pretrained(root / "lora_gpt2")
    return root


def refused(argv: list[str], capsys) -> str:
    """Run `rapidin *argv`, which must exit with status 2; its error line."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    return error_line(capsys)


@pytest.mark.parametrize("case", DATA)
def test_bad_records_are_refused_naming_file_and_line(case, model_and_tokens, tmp_path, capsys):
    content, flags, message = DATA[case]
    data = tmp_path / "data.jsonl"
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    argv = ["tokenize", "--data", str(data), "--model", str(model_and_tokens / "model"), "--out", str(tmp_path / "t")]
    line = refused([*argv, *flags], capsys)
    assert re.fullmatch(f"rapidin: error: {re.escape(str(data))}{message}", line), line
    assert os.listdir(tmp_path) == ["data.jsonl"]


def test_long_samples_are_truncated_with_a_count(model_and_tokens, tmp_path, caplog):
    data, out = tmp_path / "data.jsonl", tmp_path / "tokens.zarr"
    data.write_text(RECORD + LONG)
    model = model_and_tokens / "model"
    main(["tokenize", "--data", str(data), "--model", str(model), "--out", str(out), "--max-length", "200"])
    assert f"{data}: 1 of 2 samples truncated to 200 tokens" in caplog.text
    assert zarr.open_group(out, mode="r").attrs["rapidin"]["truncated"] == {"count": 1, "lines": [2]}


@pytest.mark.parametrize("case", GRADS)
def test_bad_models_and_settings_are_refused_naming_the_key(case, model_and_tokens, bad_models, tmp_path, capsys):
    flags, message = GRADS[case]
    flags = [flag.replace("MODELS", str(bad_models)) for flag in flags]
    message = message.replace("MODELS", re.escape(str(bad_models)))
    tokens, model = model_and_tokens / "tokens/train.zarr", model_and_tokens / "model"
    argv = ["grads", "--tokens", str(tokens), "--model", str(model), "--k", "1024", "--out", str(tmp_path / "c")]
    line = refused([*argv, *flags], capsys)
    assert re.fullmatch(f"rapidin: error: {message}", line), line
    assert os.listdir(tmp_path) == []


def test_attacked_queries_without_poisoned_samples_skip_the_metrics(tmp_path, caplog):
    scores, train, queries = tmp_path / "scores.zarr", tmp_path / "train.jsonl", tmp_path / "queries.jsonl"
    zarr.open_group(scores, mode="w").create_array("scores", data=np.zeros((1, 2), np.float32))
    train.write_text(RECORD.replace("}", ', "poisoned": false}') * 2)
    queries.write_text(RECORD.replace("}", ', "attacked": true}'))
    out = tmp_path / "metrics.json"
    main(["evaluate", "--scores", str(scores), "--train", str(train), "--queries", str(queries), "--out", str(out)])
    assert json.loads(out.read_text()) == {"attack_success_rate": None}
    assert f"{train} has no poisoned samples: backdoor metrics skipped" in caplog.text


@pytest.mark.parametrize("case", CONFIG)
def test_bad_config_is_refused_naming_the_key(case, tmp_path):
    override, message = CONFIG[case]
    result = snakemake(copy_workflow(tmp_path), "--dry-run", "--config", override)
    assert result.returncode != 0
    assert message in (result.stdout + result.stderr).splitlines()
    assert not (tmp_path / "results").exists()


# Hostile config values through the real entry point (snakemake --configfile): each payload would create a file
# named PWNED* if any value reached the shell unquoted.
INJECTIONS = {
    "model.modules": ({"model": {"modules": "q_proj'; touch PWNED; echo '"}}, "cache/queries.zarr/zarr.json"),
    "model.modules, double quotes": (
        {"model": {"modules": 'q_proj"; touch PWNED; echo "'}},
        "cache/queries.zarr/zarr.json",
    ),
    "model.path": ({"model": {"path": "models/m --help;touch PWNED;#"}}, "cache/queries.zarr/zarr.json"),
    "data.train": ({"data": {"train": "data/$(touch PWNED).jsonl"}}, "tokens/train.zarr/zarr.json"),
    "finetune.target_modules": (
        {"model": {"adapter": "finetune"}, "finetune": {"target_modules": ["q_proj; touch PWNED", "`touch PWNED`"]}},
        "lora_adapter",
    ),
    "experiment.swap.source": (
        {
            "model": {"path": "demo"},
            "data": {"train": "results/hostile/data/train.jsonl", "queries": "results/hostile/data/queries.jsonl"},
            "demo": {"n_train": 40},
            "experiment": {"swap": {"source": "China; touch PWNED", "target": "$(touch PWNED)"}},
        },
        "data/swapped_train.jsonl",
    ),
}


@pytest.fixture
def hostile_workdir(model_and_tokens, tmp_path) -> Path:
    """A workflow copy with the test model under models/m and the test data under data/."""
    workdir = copy_workflow(tmp_path / "work")
    shutil.copytree(model_and_tokens / "model", workdir / "models/m")
    (workdir / "data").mkdir()
    for split in ("train", "queries"):
        shutil.copy(model_and_tokens / f"{split}.jsonl", workdir / f"data/{split}.jsonl")
    return workdir


def run_config(workdir: Path, overrides: dict, *targets: str):
    """snakemake with a config file of the test model and data, `overrides` merged section by section."""
    config = {
        "name": "hostile",
        "model": {"path": "models/m"},
        "data": {"train": "data/train.jsonl", "queries": "data/queries.jsonl", "max_length": 256},
        "cache": {"k": 1024, "n_shards": 1, "compressor": "rapidgrad"},
        "tokenwise": {"enabled": False},
        "finetune": {"epochs": 1},
    }
    for section, values in overrides.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    (workdir / "hostile.yaml").write_text(yaml.safe_dump(config))
    return snakemake(workdir, *targets, "--configfile", "hostile.yaml")  # --configfile takes several values


@pytest.mark.parametrize("case", INJECTIONS)
def test_config_values_never_reach_the_shell(case, hostile_workdir):
    overrides, target = INJECTIONS[case]
    if case == "model.path":  # an existing directory of that name
        shutil.copytree(hostile_workdir / "models/m", hostile_workdir / overrides["model"]["path"])
    if case == "data.train":
        shutil.copy(hostile_workdir / "data/train.jsonl", hostile_workdir / overrides["data"]["train"])
    result = run_config(hostile_workdir, overrides, f"results/hostile/{target}")
    assert not list(hostile_workdir.rglob("PWNED*")), result.stdout[-2000:]
    if case in ("model.path", "data.train"):  # odd but valid values: the run succeeds
        assert result.returncode == 0, result.stderr[-2000:]
    else:  # no such module, no such country: refused
        assert result.returncode != 0


def test_paths_with_spaces_work(hostile_workdir):
    shutil.copytree(hostile_workdir / "models/m", hostile_workdir / "models/demo copy")
    (hostile_workdir / "my data").mkdir()
    shutil.copy(hostile_workdir / "data/train.jsonl", hostile_workdir / "my data/train set.jsonl")
    overrides = {"model": {"path": "models/demo copy"}, "data": {"train": "my data/train set.jsonl"}}
    result = run_config(hostile_workdir, overrides, "results/hostile/scores/00000.zarr/zarr.json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (hostile_workdir / "results/hostile/scores/00000.zarr/zarr.json").is_file()


# case: (config overrides, the one line naming the key)
REFUSED = {
    "name ..": ({"name": ".."}, "name: '..' does not match '^[A-Za-z0-9_-][A-Za-z0-9_.-]*$'"),
    "name .": ({"name": "."}, "name: '.' does not match '^[A-Za-z0-9_-][A-Za-z0-9_.-]*$'"),
    "name with a slash": ({"name": "a/b"}, "name: 'a/b' does not match '^[A-Za-z0-9_-][A-Za-z0-9_.-]*$'"),
    "missing queries": (
        {"data": {"queries": "data/nope.jsonl"}},
        "data.queries: no such file or directory: data/nope.jsonl",
    ),
    "missing model": ({"model": {"path": "models/nope"}}, "model.path: no such file or directory: models/nope"),
    "missing adapter": (
        {"model": {"adapter": "adapters/nope"}},
        "model.adapter: no such file or directory: adapters/nope",
    ),
    "unknown method": (
        {"experiment": {"study": "backdoor", "methods": ["tracin", "magic"]}},
        "experiment.methods: unknown method 'magic' (expected one of random, bm25, lissa, tracin, tracin_ln,"
        " factored, rapidin_k<K>[_seed<S>], then [_adam][_pre][_tok][_cp])",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_bad_config_values_are_one_line_naming_the_key(case, hostile_workdir):
    overrides, message = REFUSED[case]
    before = sorted(p.relative_to(hostile_workdir.parent) for p in hostile_workdir.parent.rglob("*"))
    result = run_config(hostile_workdir, overrides, "--dry-run")
    assert result.returncode != 0
    assert message in (result.stdout + result.stderr).splitlines(), (result.stdout + result.stderr)[-2000:]
    after = sorted(p.relative_to(hostile_workdir.parent) for p in hostile_workdir.parent.rglob("*"))
    assert [p for p in after if p not in before and ".snakemake" not in p.parts and p.name != "hostile.yaml"] == []
