"""Rewards per token, GAE, whitening: pure functions over response tokens.

Shapes: B sequences, A response (action) tokens each; masks are True for valid tokens (the
response up to and including its EOS) and False for padding after it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Sums a list of floats over all ranks (core.dist.all_reduce_sum bound to a device), or None for local.
Reduce = Callable[[list[float]], list[float]] | None


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the valid (True) entries of mask, over `dim` or everything."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, reduce: Reduce = None, shift_mean: bool = True
) -> torch.Tensor:
    """(x - mean) / std over valid entries, statistics over every rank when `reduce` is given: [B, A].

    Whitening over the global batch (not per rank) keeps the update independent of how the
    batch is split. Invalid entries come back as 0.
    """
    m = mask.to(torch.float64)
    xd = x.detach().to(torch.float64)
    stats = [float((xd * m).sum()), float((xd.square() * m).sum()), float(m.sum())]
    total, total_sq, count = reduce(stats) if reduce is not None else stats
    count = max(count, 1.0)
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0) * count / max(count - 1.0, 1.0)  # unbiased
    out = (x - mean) * torch.rsqrt(torch.tensor(var + 1e-8, dtype=x.dtype, device=x.device))
    if not shift_mean:
        out = out + mean
    return out * mask


def token_rewards(score: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """KL-penalised reward per token (Ziegler et al. 2019, eq. 2; InstructGPT eq. 2): [B, A].

        r_t = -beta * KL_t          for every valid response token
        r_T += score                at the last valid token T (the sequence-level RM score)

    score: [B]; kl: [B, A] per-token estimate; mask: [B, A] True = valid.
    """
    rewards = -kl_coef * kl * mask
    last = last_valid(mask)  # [B]
    rewards[torch.arange(len(score), device=score.device), last] += score
    return rewards


def last_valid(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last True entry (0 for an empty row): [B, A] -> [B]."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * mask).argmax(dim=-1)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16, https://arxiv.org/abs/1506.02438).

        delta_t = r_t + gamma * V_{t+1} - V_t,    A_t = delta_t + gamma * lam * A_{t+1}

    The episode ends after the last valid token: V and A beyond it count as 0.
    rewards, values: [B, A]; mask: [B, A] -> (advantages [B, A], returns = A + V [B, A]), 0 where invalid.
    """
    valid = mask.to(values.dtype)
    values = values * valid
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):  # A is small (response tokens); a loop is clearer than a scan
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * valid[:, t]
        advantages[:, t] = adv
        # an invalid position passes nothing back: the next valid step sees V = A = 0 beyond the end
        next_value = values[:, t] * valid[:, t]
        next_adv = adv
    return advantages, (advantages + values) * valid


class RunningMoments:
    """Running mean / std of reward-model scores over every rank (Chan et al. 1979 parallel update)."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0.0

    def update(self, x: torch.Tensor, reduce: Reduce = None) -> None:
        xd = x.detach().double()
        stats = [float(xd.sum()), float(xd.square().sum()), float(xd.numel())]
        total, total_sq, n = reduce(stats) if reduce is not None else stats
        if n == 0:
            return
        batch_mean = total / n
        batch_var = max(total_sq / n - batch_mean**2, 0.0)
        delta, new_count = batch_mean - self.mean, self.count + n
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / new_count
        self.mean += delta * n / new_count
        self.var, self.count = m2 / new_count, new_count

    @property
    def std(self) -> float:
        return max(self.var, 1e-8) ** 0.5

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


def normalise_scores(
    raw: torch.Tensor,
    mean: float,
    std: float,
    clip: float | None,
    has_eos: torch.Tensor,
    missing_eos_penalty: float,
) -> torch.Tensor:
    """(raw - mean) / std, clipped to [-clip, clip], minus the penalty where a response has no EOS: [B]."""
    scores = (raw - mean) / std
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return scores - missing_eos_penalty * (~has_eos).to(scores.dtype)
