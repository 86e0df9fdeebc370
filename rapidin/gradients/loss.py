"""The training loss, exactly as fine-tuning used it: next-token cross-entropy on response tokens only.

Logits at position t predict token t+1 (the causal shift); prompt and padding positions carry no label.
Every loss rapidin differentiates is a weighted sum of per-token losses: the mean over the response
(sample-level influence), one token (token-wise influence), or a target span.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Batch:
    """Right-padded samples. `target_mask[b, t]` is True where token t of sample b is a response label."""

    input_ids: torch.Tensor  # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) int64
    target_mask: torch.Tensor  # (B, T) bool

    def to(self, device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.target_mask.to(device))

    @property
    def mean_response_weights(self) -> torch.Tensor:
        """(B, T-1) weights that turn per-token losses into each sample's mean response loss."""
        return mean_weights(self.target_mask)


def mean_weights(mask: torch.Tensor) -> torch.Tensor:
    """(B, T-1) weights averaging each sample's per-token losses over the tokens marked in `mask` (B, T) bool."""
    labels = mask[:, 1:].double()  # (B, T-1): the loss at t predicts token t+1
    return labels / labels.sum(dim=1, keepdim=True).clamp(min=1)


def collate(samples: list[tuple], pad_id: int) -> Batch:
    """Pad (ids, response_start) pairs on the right into one Batch."""
    width = max(len(ids) for ids, _ in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    target_mask = torch.zeros((len(samples), width), dtype=torch.bool)
    for row, (ids, response_start) in enumerate(samples):
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        target_mask[row, response_start : len(ids)] = True
    return Batch(input_ids, attention_mask, target_mask)


def masked_batch(samples: list[tuple], pad_id: int) -> tuple[Batch, torch.Tensor]:
    """(ids, response_start, loss_mask) triples as one Batch and its (B, T-1) weights averaging each sample's loss
    over its loss mask (every assistant turn of a training conversation; a query's targets): the training loss."""
    batch = collate([(ids, start) for ids, start, _ in samples], pad_id)
    width = batch.input_ids.shape[1]
    masks = torch.zeros((len(samples), width), dtype=torch.bool)  # (B, T)
    for row, (_, _, mask) in enumerate(samples):
        masks[row, : len(mask)] = torch.as_tensor(mask, dtype=torch.bool)
    return batch, mean_weights(masks)


def token_losses(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(B, T-1) cross-entropy of predicting token t+1 at position t; zero where t+1 is not a response label."""
    shifted = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))  # (B, T-1, V)
    targets = batch.input_ids[:, 1:]  # (B, T-1)
    losses = F.cross_entropy(shifted.transpose(1, 2), targets, reduction="none")  # (B, T-1)
    return losses * batch.target_mask[:, 1:]


def weighted_loss(logits: torch.Tensor, batch: Batch, weights: torch.Tensor) -> torch.Tensor:
    """(B,) per-sample losses Σ_t weights[b, t] · ℓ[b, t]; with mean_response_weights, the training loss."""
    losses = token_losses(logits, batch)  # (B, T-1)
    return (losses * weights.to(losses.dtype)).sum(dim=1)
