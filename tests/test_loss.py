"""The loss: response tokens only, logits at t predicting token t+1, checked against a hand computation."""

import math

import torch

from rapidin.gradients.loss import collate, token_losses, weighted_loss


def test_masked_shifted_loss_matches_hand_computation():
    vocab = 5
    samples = [([1, 2, 3, 4], 2), ([1, 3, 2], 1)]  # (ids, response_start): responses [3, 4] and [3, 2]
    batch = collate(samples, pad_id=0)
    logits = torch.randn(2, 4, vocab, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def nll(b, position, target):  # −log softmax(logits[b, position])[target]
        row = logits[b, position]
        return (torch.logsumexp(row, 0) - row[target]).item()

    # sample 0: tokens 3 (position 2) and 4 (position 3) are labels, predicted at positions 1 and 2
    # sample 1: tokens 3 (position 1) and 2 (position 2), predicted at positions 0 and 1; position 3 is padding
    want0 = (nll(0, 1, 3) + nll(0, 2, 4)) / 2
    want1 = (nll(1, 0, 3) + nll(1, 1, 2)) / 2
    got = weighted_loss(logits, batch, batch.mean_response_weights)
    assert math.isclose(got[0].item(), want0, rel_tol=1e-12)
    assert math.isclose(got[1].item(), want1, rel_tol=1e-12)

    per_token = token_losses(logits, batch)
    assert per_token.shape == (2, 3)
    assert per_token[0, 0] == 0 and per_token[1, 2] == 0  # prompt and padding carry no loss


def test_padding_does_not_change_a_sample_loss():
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 7, dtype=torch.float64)
    alone = collate([([1, 2, 3, 4, 5, 6], 3)], pad_id=0)
    padded = collate([([1, 2, 3, 4, 5, 6], 3), ([1, 2], 1)], pad_id=0)
    two = torch.cat([logits, torch.randn(1, 6, 7, dtype=torch.float64)])
    a = weighted_loss(logits, alone, alone.mean_response_weights)
    b = weighted_loss(two, padded, padded.mean_response_weights)
    assert torch.equal(a[0], b[0])
