"""The loss: response tokens only, logits at t predicting token t+1, checked against a hand computation."""

import math

import torch

from rapidin.gradients.loss import collate, masked_batch, mean_weights, token_losses, weighted_loss


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


def test_collate_pads_on_the_right_and_marks_responses():
    batch = collate([([4, 5, 6, 7], 2), ([8, 9], 1), ([3, 2, 1], 3)], pad_id=9)
    assert batch.input_ids.tolist() == [[4, 5, 6, 7], [8, 9, 9, 9], [3, 2, 1, 9]]
    assert batch.input_ids.dtype == torch.long and batch.attention_mask.dtype == torch.long
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert batch.target_mask.dtype == torch.bool  # no response in the third sample: nothing to predict
    assert batch.target_mask.tolist() == [[0, 0, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]]


def test_mean_weights_average_over_each_samples_labels():
    """Hand-worked: label counts 3, 1 and 0 (B = 3 ≠ T − 1 = 4); the first token is never a label (no logit
    predicts it), and a sample without labels gets zero weights, not NaN."""
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 0, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    want = [[1 / 3, 0, 1 / 3, 1 / 3], [0, 1, 0, 0], [0, 0, 0, 0]]
    assert mean_weights(mask).dtype == torch.float64
    assert mean_weights(mask).tolist() == want
    batch = collate([([1, 2, 3, 4, 5], 1)], pad_id=0)
    assert batch.mean_response_weights.tolist() == [[0.25] * 4]


def test_half_precision_logits_give_fp32_losses():
    """fp16 and bf16 logits are cross-entropied in fp32, as in fp64 from the same (rounded) logits."""
    batch = collate([([1, 2, 3, 4, 5, 6], 2), ([3, 1, 4], 1)], pad_id=0)
    logits = 8 * torch.randn(2, 6, 50, generator=torch.Generator().manual_seed(1))
    for dtype in (torch.float16, torch.bfloat16):
        low = logits.to(dtype)
        want = weighted_loss(low.double(), batch, batch.mean_response_weights)
        got = weighted_loss(low, batch, batch.mean_response_weights)
        assert got.dtype == torch.float32 and token_losses(low, batch).dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


def test_batch_moves_every_tensor():
    batch = collate([([1, 2, 3], 1), ([4, 5], 1)], pad_id=0).to("meta")
    for tensor in (batch.input_ids, batch.attention_mask, batch.target_mask):
        assert tensor.device.type == "meta" and tensor.shape == (2, 3)
    assert [batch.input_ids.dtype, batch.attention_mask.dtype, batch.target_mask.dtype] == [
        torch.long,
        torch.long,
        torch.bool,
    ]


def test_masked_batch_averages_over_each_samples_loss_mask():
    """Hand-worked: the weights follow the loss mask (turns with gaps, a mask shorter than the padded batch), not
    response_start; the batch is that of collate."""
    samples = [([1, 2, 3, 4, 5], 1, [False, True, False, True, True]), ([6, 7, 8], 2, [False, False, True])]
    batch, weights = masked_batch(samples, pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]]
    assert batch.target_mask.tolist() == [[0, 1, 1, 1, 1], [0, 0, 1, 0, 0]]
    assert weights.dtype == torch.float64 and weights.tolist() == [[1 / 3, 0, 1 / 3, 1 / 3], [0, 1, 0, 0]]
