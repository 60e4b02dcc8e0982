"""Reward-model objective: Bradley-Terry on preference pairs.

InstructGPT (Ouyang et al. 2022, arXiv:2203.02155, eq. 1):
    loss = -E[ log sigmoid( r(x, y_chosen) - r(x, y_rejected) ) ]
with an optional per-pair margin m (Llama 2, Touvron et al. 2023, arXiv:2307.09288, eq. 2):
    loss = -E[ log sigmoid( r_chosen - r_rejected - m ) ]
The Bradley-Terry loss only sees reward differences, so rewards can drift; a small L2 penalty
on the rewards keeps them centred near zero (as in Eisenstein et al. 2023, arXiv:2312.09244).
Reduction: mean over pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def preference_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """chosen, rejected, margin: [B] -> scalar."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def centering_penalty(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean squared reward over both replies of each pair: [B], [B] -> scalar."""
    return 0.5 * (chosen.pow(2) + rejected.pow(2)).mean()


def accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Share of pairs ranked the same way as the label (ties count as wrong): [B], [B] -> scalar."""
    return (chosen > rejected).float().mean()
