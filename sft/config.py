"""The SFT stage's config schema: the shared groups plus nothing SFT-only yet.

Registered in Hydra's ConfigStore as `sft_schema`; conf/sft.yaml lists it first in its
defaults, so every value from conf/ is type-checked against these dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

from core.config import StageConfig, check_values
from core.config import check_world as check_shared_world


@dataclass
class SFTConfig(StageConfig):
    """The shared stage groups; SFT adds nothing of its own yet."""


ConfigStore.instance().store(name="sft_schema", node=SFTConfig)


def check_config(cfg) -> None:
    """The ranges and choices of the shared groups (`core.config.check_values`), before anything loads;
    the pipeline calls it at planning too."""
    check_values(cfg, "sft")


def check_world(cfg, world: int) -> None:
    """The settings that depend on the number of ranks (the global batch); the pipeline calls it at
    planning when its launcher fixes the world, the stage's DeepSpeed config at start-up."""
    check_shared_world(cfg, world)
