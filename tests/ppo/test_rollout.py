"""Rollout helpers: response masks with early EOS, padding sides, log-probs from logits."""

import torch

from ppo.rollout import Rollout, ends_with_eos, logprobs_from_logits, pad_rows, response_mask

EOS, PAD = 2, 0


def test_response_mask_keeps_tokens_up_to_and_including_the_first_eos():
    ids = torch.tensor([[5, 6, EOS, PAD, PAD], [5, EOS, 7, EOS, PAD], [5, 6, 7, 8, 9]])
    mask = response_mask(ids, EOS, stop_at_eos=True)
    assert mask.tolist() == [[True, True, True, False, False], [True, True, False, False, False], [True] * 5]
    assert ends_with_eos(ids, mask, EOS).tolist() == [True, True, False]
    assert response_mask(ids, EOS, stop_at_eos=False).all()  # fixed-length rollouts keep everything


def test_pad_rows_left_and_right():
    ids, mask = pad_rows([[1, 2, 3], [4]], PAD, "left", torch.device("cpu"))
    assert ids.tolist() == [[1, 2, 3], [PAD, PAD, 4]] and mask.tolist() == [[True] * 3, [False, False, True]]
    ids, mask = pad_rows([[1, 2, 3], [4]], PAD, "right", torch.device("cpu"))
    assert ids.tolist() == [[1, 2, 3], [4, PAD, PAD]] and mask.tolist() == [[True] * 3, [True, False, False]]


def test_logprobs_from_logits_at_a_temperature():
    logits = torch.tensor([[[0.0, 2.0, 0.0]]])  # [B=1, A=1, V=3]
    lp = logprobs_from_logits(logits, torch.tensor([[1]]), temperature=2.0)
    expected = torch.log_softmax(torch.tensor([0.0, 1.0, 0.0]), -1)[1]
    assert torch.allclose(lp, expected.reshape(1, 1))


def test_rollout_select_and_sequence():
    B, P, A = 3, 2, 4
    t = lambda *shape: torch.arange(torch.Size(shape).numel()).reshape(shape).float()  # noqa: E731
    r = Rollout(t(B, P).long(), torch.ones(B, P, dtype=torch.bool), t(B, A).long(), torch.ones(B, A, dtype=torch.bool),
                *(t(B, A) for _ in range(3)), t(B), t(B), *(t(B, A) for _ in range(4)))  # fmt: skip
    sub = r.select(torch.tensor([2, 0]))
    assert sub.scores.tolist() == [2.0, 0.0] and sub.response_ids.shape == (2, A)
    ids, mask = sub.sequence
    assert ids.shape == (2, P + A) and mask.all()
