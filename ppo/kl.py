"""KL between the policy and the frozen reference: per-token estimators and the KL coefficient.

Estimators (Schulman, "Approximating KL Divergence", 2020, http://joschu.net/blog/kl-approx.html),
written with the log-ratio  log_ratio = log pi(a|s) - log pi_ref(a|s)  of the sampled token:

    k1 = log_ratio                        unbiased, high variance, can be negative per token
    k2 = log_ratio**2 / 2                 biased, low variance, >= 0
    k3 = exp(-log_ratio) - 1 + log_ratio  unbiased, low variance, >= 0

The coefficient is fixed, or adapted towards a target KL (Ziegler et al. 2019, "Fine-Tuning
Language Models from Human Preferences", section 2.2, https://arxiv.org/abs/1909.08593).
"""

from __future__ import annotations

import torch

ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate of the sampled tokens: [B, A] -> [B, A]."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        # clamp both terms: exp(-log_ratio) overflows where the policy finds a token far less likely than
        # the reference; clamping the exponent alone would leave the gradient of the linear term, +1,
        # pushing such a token further away from the reference when k3 is a loss (ppo.kl_in=loss)
        log_ratio = log_ratio.clamp(min=-20.0)
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"ppo.kl_estimator must be one of {ESTIMATORS}, got {estimator!r}")


class KLController:
    """The KL coefficient beta: fixed (`target=None`) or adaptive (Ziegler et al. 2019, eq. in 2.2).

    Adaptive:  e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n / horizon),
    where KL is the batch's mean per-sequence KL and n the number of sequences in the batch.
    """

    def __init__(self, init_coef: float, target: float | None, horizon: int):
        if target is not None and (target <= 0 or horizon <= 0):
            raise ValueError(
                "ppo.kl_target and ppo.kl_horizon must be positive for the adaptive KL coefficient"
            )
        self.value = init_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_sequences: int) -> None:
        if self.target is None:
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_sequences / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
