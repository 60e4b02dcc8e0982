"""The SFT stage's config schema: the shared groups plus nothing SFT-only yet.

Registered in Hydra's ConfigStore as `sft_schema`; conf/sft.yaml lists it first in its
defaults, so every value from conf/ is type-checked against these dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

from core.config import StageConfig


@dataclass
class SFTConfig(StageConfig):
    """The shared stage groups; SFT adds nothing of its own yet."""


ConfigStore.instance().store(name="sft_schema", node=SFTConfig)
