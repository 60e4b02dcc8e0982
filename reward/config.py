"""The reward stage's config schema: the shared groups plus the loss settings.

Registered in Hydra's ConfigStore as `reward_schema`; conf/reward.yaml lists it first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from core.config import StageConfig


@dataclass
class RewardLossConfig:
    # coefficient of the L2 penalty on rewards (keeps them centred)
    center_coef: float = MISSING
    # use the data's `margin` column in the loss
    use_margin: bool = MISSING


@dataclass
class RewardConfig(StageConfig):
    loss: RewardLossConfig = field(default_factory=RewardLossConfig)


ConfigStore.instance().store(name="reward_schema", node=RewardConfig)
