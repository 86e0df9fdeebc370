"""Training with exactly the attribution loss: the mean next-token cross-entropy over each sample's response.

`train_and_check` is shared by the demo model (every parameter trains) and LoRA fine-tuning (only the adapter's
do): `train_on_samples`, then `backdoor_rates` checks that the backdoor fires and that clean answers survive.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable

import torch
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from rapidin.data.generate import attack_success_rate
from rapidin.data.records import read_records
from rapidin.gradients.loss import masked_batch, weighted_loss

log = logging.getLogger(__name__)


def train_on_samples(
    model,
    samples: list[tuple],
    pad_id: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    desc: str,
    on_epoch: Callable[[int, torch.optim.Optimizer, dict], None] | None = None,
) -> tuple[float, int]:
    """Train the model's trainable parameters on (ids, response_start, loss_mask) samples with the training loss
    (loss.masked_batch); returns (last epoch's mean loss, steps).

    AdamW (weight decay 0.01), cosine schedule with 5 % warm-up, gradients clipped to norm 1, samples shuffled
    each epoch by a `seed`ed generator. The model is left in eval mode. After each epoch, `on_epoch(epoch, optimizer,
    log)` gets the epoch (1-based) and a log entry: epoch, step, the epoch's mean loss and mean learning rate.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    total_steps = epochs * math.ceil(len(samples) / batch_size)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, total_steps // 20), total_steps)
    order = random.Random(seed)
    model.train()
    with tqdm(total=total_steps, desc=desc, unit="step") as progress:
        for epoch in range(epochs):
            indices = list(range(len(samples)))
            order.shuffle(indices)
            epoch_losses, epoch_lrs = [], []
            for start in range(0, len(indices), batch_size):
                batch, weights = masked_batch([samples[i] for i in indices[start : start + batch_size]], pad_id)
                batch = batch.to(device)
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                loss = weighted_loss(logits, batch, weights.to(device)).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                epoch_lrs.append(scheduler.get_last_lr()[0])
                optimizer.step()
                scheduler.step()
                epoch_losses.append(loss.item())
                progress.update()
                progress.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            mean_loss = sum(epoch_losses) / len(epoch_losses)
            log.info("epoch %d/%d: mean loss %.4f", epoch + 1, epochs, mean_loss)
            if on_epoch is not None:
                entry = {"epoch": epoch + 1, "step": (epoch + 1) * total_steps // epochs, "loss": mean_loss}
                on_epoch(epoch + 1, optimizer, entry | {"learning_rate": sum(epoch_lrs) / len(epoch_lrs)})
    model.eval()
    return sum(epoch_losses) / len(epoch_losses), total_steps


def backdoor_rates(model, tokenizer, queries_jsonl: str, template: str) -> tuple[float, float]:
    """(attack success rate, clean accuracy): the fractions of attacked and of clean queries whose response the
    model reproduces greedily."""
    queries = read_records(queries_jsonl)
    attacked = [q for q in queries if q.meta.get("attacked")]
    clean = [q for q in queries if not q.meta.get("attacked")]
    attack_rate = attack_success_rate(model, tokenizer, attacked, template)
    clean_accuracy = attack_success_rate(model, tokenizer, clean, template)
    log.info(
        "attack success rate %.2f on %d attacked queries, clean accuracy %.2f on %d clean queries",
        attack_rate,
        len(attacked),
        clean_accuracy,
        len(clean),
    )
    return attack_rate, clean_accuracy


def train_and_check(
    model, tokenizer, samples: list[tuple], queries_jsonl: str | None, template: str, desc: str, **training
) -> dict:
    """Train (`training`: epochs, batch_size, lr, seed), then rate the backdoor on `queries_jsonl` if given;
    returns the summary saved next to the model as training.json."""
    started = time.perf_counter()
    final_loss, steps = train_on_samples(model, samples, tokenizer.pad_token_id, desc=desc, **training)
    attack_rate = clean_accuracy = None
    if queries_jsonl is not None:
        attack_rate, clean_accuracy = backdoor_rates(model, tokenizer, queries_jsonl, template)
    return {
        "final_loss": final_loss,
        "steps": steps,
        "seconds": round(time.perf_counter() - started, 1),
        "attack_success_rate": attack_rate,
        "clean_accuracy": clean_accuracy,
    }
