"""PPO losses: the clipped surrogate, the actor's objective, the clipped value loss, entropy. Pure functions.

Reduction: a sum over valid tokens divided by `num_tokens`, which the caller sets to the
valid-token count of the whole minibatch divided by (ranks x micro-batches), so that
splitting a minibatch over ranks and gradient-accumulation steps does not change the update
(the token-mean over the global minibatch, as in the SFT loss).
Shapes: [B, A] over response tokens; masks True = valid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _reduce(x: torch.Tensor, mask: torch.Tensor, num_tokens: float) -> torch.Tensor:
    return (x * mask).sum() / num_tokens


@dataclass
class PolicyLossOut:
    loss: torch.Tensor  # scalar
    clipfrac: torch.Tensor  # scalar, share of valid tokens where the clip was active (local mean)
    approxkl: torch.Tensor  # scalar, 0.5 * mean (log ratio)^2 over local valid tokens


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    num_tokens: float,
) -> PolicyLossOut:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7, https://arxiv.org/abs/1707.06347).

    ratio = pi(a|s) / pi_old(a|s);   L = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)
    """
    # 0 off the mask: padding's old log-probs (a forced pad token after EOS) can be far below the new
    # ones there, and exp of that gap would overflow to inf, then inf * 0 = NaN through the mask
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = _reduce(torch.maximum(unclipped, clipped), mask, num_tokens)
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        clipfrac = ((clipped > unclipped).float() * mask).sum() / n
        approxkl = (0.5 * log_ratio.square() * mask).sum() / n
    return PolicyLossOut(loss, clipfrac, approxkl)


@dataclass
class ValueLossOut:
    loss: torch.Tensor  # scalar
    clipfrac: torch.Tensor  # scalar, share of valid tokens where the clipped error was the larger


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None,
    num_tokens: float,
) -> ValueLossOut:
    """Clipped value loss (the PPO reference implementation, baselines ppo2; Huang et al. 2022, "The 37
    Implementation Details of PPO", detail 9):

        V_clip = V_old + clip(V - V_old, -eps, eps);   L = 1/2 max((V - R)^2, (V_clip - R)^2)

    `clip_eps=None` gives the plain squared error 1/2 (V - R)^2.
    """
    error = (values - returns).square()
    if clip_eps is None:
        return ValueLossOut(0.5 * _reduce(error, mask, num_tokens), torch.zeros((), device=values.device))
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    clipped_error = (clipped_values - returns).square()
    loss = 0.5 * _reduce(torch.maximum(error, clipped_error), mask, num_tokens)
    with torch.no_grad():
        clipfrac = ((clipped_error > error).float() * mask).sum() / mask.sum().clamp(min=1)
    return ValueLossOut(loss, clipfrac)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution per position: [B, A, V] -> [B, A]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_loss(kl: torch.Tensor, mask: torch.Tensor, num_tokens: float) -> torch.Tensor:
    """KL to the reference as a loss term instead of a reward penalty (GRPO, Shao et al. 2024, eq. 3)."""
    return _reduce(kl, mask, num_tokens)


def actor_loss(
    surrogate: torch.Tensor,
    mask: torch.Tensor,
    num_tokens: float,
    entropy: torch.Tensor | None,
    entropy_coef: float,
    kl: torch.Tensor | None,
    kl_coef: float,
) -> torch.Tensor:
    """The actor's objective, a scalar to minimise (without PPO-ptx, which the caller adds):

        L = L_clip - c_ent * H + beta * KL

    L_clip is `policy_loss(...).loss`; the entropy bonus H (`entropy`, [B, A]) rewards exploration
    (Schulman et al. 2017, eq. 9); the KL term is given (`kl`, [B, A], from `kl_estimate`) only when
    the KL is a loss instead of a reward penalty (`ppo.kl_in=loss`). Both reduce like the surrogate.
    """
    loss = surrogate
    if entropy_coef:
        loss = loss - entropy_coef * _reduce(entropy, mask, num_tokens)
    if kl is not None:
        loss = loss + kl_coef * kl_loss(kl, mask, num_tokens)
    return loss
