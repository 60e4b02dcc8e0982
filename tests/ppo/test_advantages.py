"""GAE, per-token rewards and whitening against plain reference computations."""

import math

import pytest
import torch

from ppo.advantages import (
    RunningMoments,
    gae,
    last_valid,
    masked_mean,
    masked_whiten,
    normalise_scores,
    token_rewards,
)


def reference_gae(rewards, values, length, gamma, lam):
    """Textbook GAE for one episode of `length` steps, V = 0 after the end."""
    adv = [0.0] * length
    running = 0.0
    for t in reversed(range(length)):
        next_v = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv


def test_gae_matches_a_plain_loop_with_different_lengths():
    torch.manual_seed(0)
    lengths = [5, 2, 1, 4]
    mask = torch.tensor([[t < n for t in range(5)] for n in lengths])
    rewards = torch.randn(4, 5) * mask
    values = torch.randn(4, 5)
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for b, n in enumerate(lengths):
        expected = reference_gae(rewards[b].tolist(), values[b].tolist(), n, 0.9, 0.8)
        assert advantages[b, :n].tolist() == pytest.approx(expected, abs=1e-6)
        assert advantages[b, n:].abs().sum() == 0 and returns[b, n:].abs().sum() == 0
        assert returns[b, :n].tolist() == pytest.approx(
            [a + v for a, v in zip(expected, values[b, :n].tolist())], abs=1e-6
        )


def test_gae_by_hand():
    # one episode of 2 steps: r = [0, 1], V = [0.5, 0.25], gamma = 1, lambda = 0.5
    # delta_1 = 1 + 0 - 0.25 = 0.75;  delta_0 = 0 + 0.25 - 0.5 = -0.25
    # A_1 = 0.75;  A_0 = -0.25 + 0.5 * 0.75 = 0.125
    adv, ret = gae(torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.5, 0.25, 9.0]]),
                   torch.tensor([[True, True, False]]), gamma=1.0, lam=0.5)  # fmt: skip
    assert adv.tolist() == [[0.125, 0.75, 0.0]]
    assert ret.tolist() == [[0.625, 1.0, 0.0]]


def test_token_rewards_put_the_score_on_the_last_valid_token():
    mask = torch.tensor([[True, True, True], [True, False, False]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 7.0, 7.0]])
    r = token_rewards(torch.tensor([1.0, -2.0]), kl, kl_coef=0.5, mask=mask)
    assert torch.allclose(r, torch.tensor([[-0.05, -0.1, 1.0 - 0.15], [-2.0 - 0.25, 0.0, 0.0]]))
    assert last_valid(mask).tolist() == [2, 0]


def test_masked_whiten_uses_valid_entries_only():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -100.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    out = masked_whiten(x, mask)
    mean, std = 2.5, math.sqrt(((1.5**2 + 0.5**2) * 2) / 3)  # unbiased over 1, 2, 3, 4
    assert out[mask].tolist() == pytest.approx([(v - mean) / std for v in (1, 2, 3, 4)], rel=1e-5)
    assert out[~mask].tolist() == [0.0, 0.0]
    assert masked_mean(x, mask).item() == pytest.approx(2.5)


def test_masked_whiten_with_a_reduce_uses_global_statistics():
    # two "ranks" holding halves of one batch whiten exactly as the whole batch does; the stand-in
    # all-reduce sums what each half hands it (collected in a first pass), as dist.all_reduce_sum would
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    mask = torch.rand(4, 6) > 0.3
    whole = masked_whiten(x, mask)
    halves = [(x[:2], mask[:2]), (x[2:], mask[2:])]
    sent = []
    for h, hm in halves:
        masked_whiten(h, hm, lambda stats: sent.append(stats) or stats)
    summed = [sum(col) for col in zip(*sent)]
    split = torch.cat([masked_whiten(h, hm, lambda stats: summed) for h, hm in halves])
    assert torch.allclose(whole, split, atol=1e-5)
    assert not torch.allclose(whole, torch.cat([masked_whiten(h, hm) for h, hm in halves]), atol=1e-3)


def test_running_moments_by_hand_and_over_ranks():
    """Scores 1, 2, 3 then 4, 5: mean 3, variance 2 (population, as over every score seen)."""
    m = RunningMoments()
    m.update(torch.tensor([1.0, 2.0, 3.0]))
    assert (m.mean, m.var, m.count) == (pytest.approx(2.0), pytest.approx(2 / 3), 3.0)
    m.update(torch.tensor([4.0, 5.0]))
    assert (m.mean, m.var, m.std) == (pytest.approx(3.0), pytest.approx(2.0), pytest.approx(math.sqrt(2)))
    # two ranks with a share of each batch each, through the all-reduce, reach the same moments
    shares = [(torch.tensor([1.0]), torch.tensor([2.0, 3.0])), (torch.tensor([4.0]), torch.tensor([5.0]))]
    ranks = [RunningMoments(), RunningMoments()]
    for batch in zip(*shares):  # batch = (rank 0's share, rank 1's share)
        sent = [[float(x.sum()), float(x.square().sum()), float(x.numel())] for x in batch]
        summed = [sum(col) for col in zip(*sent)]
        for rank, x in zip(ranks, batch):
            rank.update(x, lambda stats, summed=summed: summed)
    for rank in ranks:
        assert (rank.mean, rank.var, rank.count) == (pytest.approx(m.mean), pytest.approx(m.var), m.count)
    restored = RunningMoments()
    restored.load_state_dict(m.state_dict())
    assert restored.state_dict() == m.state_dict()
    constant = RunningMoments()
    constant.update(torch.full((4,), 7.0))
    assert constant.std == pytest.approx(1e-4)  # the floor: a constant batch does not divide by zero


def test_normalise_scores_by_hand():
    # mean 1, std 2, clip 2, penalty 0.5: 3 -> 1; -10 -> -5.5 -> -2 (clipped); 1 without EOS -> 0 - 0.5
    raw = torch.tensor([3.0, -10.0, 1.0])
    has_eos = torch.tensor([True, True, False])
    out = normalise_scores(raw, 1.0, 2.0, 2.0, has_eos, 0.5)
    assert out.tolist() == [1.0, -2.0, -0.5]
    assert normalise_scores(raw, 1.0, 2.0, None, has_eos, 0.0).tolist() == [1.0, -5.5, 0.0]
