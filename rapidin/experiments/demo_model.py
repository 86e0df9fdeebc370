"""The demo's model: a byte-level BPE tokenizer and a small Llama trained from scratch on CPU on the demo data.

`train_demo_model` trains with exactly the attribution loss, so the backdoor fires and the influence of the
poisoned samples can be measured, and saves a Trainer-style checkpoint after every epoch. Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rapidin.data.records import Record, read_records
from rapidin.data.tokenize import ALPACA_NO_INPUT, format_prompt, tokenize_record
from rapidin.experiments.train import train_and_check
from rapidin.store import atomic_dir

log = logging.getLogger(__name__)

# The demo tokenizer's chat template lays conversations out like the Alpaca prompt (system turn: its preamble),
# so a one-turn conversation renders exactly as an Alpaca record without input.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{% else %}" + ALPACA_NO_INPUT.split("\n\n")[0] + "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '\\n\\n### Instruction:\\n' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '\\n\\n### Response:\\n' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\n### Response:\\n' }}{% endif %}"
)


def _alpaca_prompt(record: Record) -> str:
    """The record's prompt text as the demo tokenizer sees it (a conversation: its last user turn, Alpaca-style)."""
    return ALPACA_NO_INPUT.format(instruction=record.instruction) if record.history else format_prompt(record, "alpaca")


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`; BOS is prepended only with add_special_tokens=True."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    bos_id = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def train_demo_model(
    train_jsonl: str,
    out_dir: str,
    queries_jsonl: str | None = None,
    vocab_size: int = 1024,
    hidden_size: int = 128,
    n_layers: int = 4,
    n_heads: int = 4,
    intermediate_size: int = 256,
    max_length: int = 128,
    epochs: int = 8,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    template: str = "alpaca",
) -> dict:
    """Train a tokenizer and a tiny Llama on `train_jsonl` with the attribution loss; save both to `out_dir`.

    `template` (config `data.template`): `chat` for data written with `format="chat"`; the tokenizer's chat
    template renders its prompts as the Alpaca ones.

    Returns the training summary also written to `out_dir/training.json`: the mean loss of the last epoch,
    steps, seconds, parameter count and, when `queries_jsonl` is given, the fraction of attacked queries
    whose backdoor response and of clean queries whose correct response the model generates greedily.

    After each epoch e the model is also saved to `out_dir/checkpoint-<e>/` (save_checkpoint), and the final
    AdamW state to `out_dir/optimizer.pt`, for several-checkpoint (TracInCP) and Adam-normalised influence.
    """
    torch.manual_seed(seed)
    records = read_records(train_jsonl)
    texts = [text for record in records for text in (_alpaca_prompt(record), record.output)]
    tokenizer = train_tokenizer(texts, vocab_size, max_length)
    samples = []
    for record in records:
        sample = tokenize_record(record, tokenizer, template, max_length)
        samples.append((sample.ids, sample.response_start, sample.loss_mask))

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,
        max_position_embeddings=max_length,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("training a %d-parameter Llama on %d samples for %d epochs", n_params, len(samples), epochs)

    with atomic_dir(out_dir) as tmp:
        history: list[dict] = []

        def on_epoch(epoch: int, optimizer: torch.optim.Optimizer, entry: dict) -> None:
            history.append(entry)
            save_checkpoint(tmp / f"checkpoint-{epoch}", model, tokenizer, optimizer, history)

        summary = train_and_check(
            model,
            tokenizer,
            samples,
            queries_jsonl,
            template,
            "train demo model",
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            on_epoch=on_epoch,
        ) | {"n_params": n_params}
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.copy(tmp / f"checkpoint-{epochs}" / "optimizer.pt", tmp / "optimizer.pt")
        (tmp / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("saved the demo model and tokenizer to %s", out_dir)
    return summary


def save_checkpoint(path: Path, model, tokenizer, optimizer: torch.optim.Optimizer, history: list[dict]) -> None:
    """A Trainer-style checkpoint directory: model and tokenizer, `optimizer.pt` (the optimizer's state_dict, states
    keyed by trainable-parameter order) and `trainer_state.json` whose `log_history` holds one entry per epoch so far
    (epoch, step, mean loss, mean `learning_rate`)."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    state = {"epoch": history[-1]["epoch"], "global_step": history[-1]["step"], "log_history": history}
    (path / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
