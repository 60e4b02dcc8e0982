"""The reward stage's config schema: the shared groups plus the loss settings.

Registered in Hydra's ConfigStore as `reward_schema`; conf/reward.yaml lists it first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from core.config import StageConfig, check_at_least, check_values
from core.config import check_world as check_shared_world


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


def check_config(cfg) -> None:
    """The ranges and choices of the shared groups (`core.config.check_values`) and the loss's, before
    anything loads; the pipeline calls it at planning too."""
    check_values(cfg, "reward")
    check_at_least(0, {"loss.center_coef": cfg.loss.center_coef})


def check_world(cfg, world: int) -> None:
    """The settings that depend on the number of ranks (the global batch); the pipeline calls it at
    planning when its launcher fixes the world, the stage's DeepSpeed config at start-up."""
    check_shared_world(cfg, world)
