"""The SFT stage's config schema: the shared groups plus nothing SFT-only yet.

Registered in Hydra's ConfigStore as `sft_schema`; conf/sft.yaml lists it first in its
defaults, so every value from conf/ is type-checked against these dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from core.config import (
    DataConfig,
    DeepSpeedConfig,
    LoggerConfig,
    ModelConfig,
    OptimConfig,
    PeftConfig,
    TrainConfig,
)


@dataclass
class SFTConfig:
    data_root: str = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


ConfigStore.instance().store(name="sft_schema", node=SFTConfig)
