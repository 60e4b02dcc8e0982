"""The PPO stage's config schema: four model roles, two trained engines, rollout and PPO settings.

Registered in Hydra's ConfigStore as `ppo_schema`; conf/ppo.yaml lists it first. Values live
in the YAML (one comment above each); here only types.
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
class RolloutConfig:
    batch_size: int = MISSING
    samples_per_prompt: int = MISSING
    max_new_tokens: int = MISSING
    min_new_tokens: int = MISSING
    temperature: float = MISSING
    top_p: float = MISSING
    top_k: int = MISSING
    stop_at_eos: bool = MISSING
    gather_once: bool = MISSING
    prepack_weights: bool = MISSING
    prepack_frozen: bool = MISSING
    recompute_logprobs: bool = MISSING
    micro_batch_size_per_device: int = MISSING


@dataclass
class PPOSettings:
    kl_coef: float = MISSING
    kl_estimator: str = MISSING
    kl_in: str = MISSING
    kl_target: float | None = MISSING
    kl_horizon: int = MISSING
    reward_norm: str = MISSING
    reward_clip: float | None = MISSING
    missing_eos_penalty: float = MISSING
    gamma: float = MISSING
    gae_lambda: float = MISSING
    whiten_advantages: bool = MISSING
    clip_eps: float = MISSING
    value_clip_eps: float | None = MISSING
    entropy_coef: float = MISSING
    epochs: int = MISSING
    early_stop_kl: float | None = MISSING
    ema_decay: float | None = MISSING


@dataclass
class PtxConfig:
    coef: float = MISSING
    path: str | None = MISSING
    format: str | None = MISSING
    micro_batch_size_per_device: int = MISSING
    builtin_demonstrations: int = MISSING


@dataclass
class BenchConfig:
    workload: str | None = MISSING
    steps: int = MISSING


@dataclass
class PPOConfig:
    data_root: str = MISSING
    actor: ModelConfig = field(default_factory=ModelConfig)
    critic: ModelConfig = field(default_factory=ModelConfig)
    ref: ModelConfig = field(default_factory=ModelConfig)
    reward_model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    actor_ds: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    critic_ds: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    frozen_ds: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    actor_optim: OptimConfig = field(default_factory=OptimConfig)
    critic_optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOSettings = field(default_factory=PPOSettings)
    ptx: PtxConfig = field(default_factory=PtxConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    # Where `*.name_or_path: null` looks for the newest SFT / reward exports.
    runs_dir: str = MISSING


ConfigStore.instance().store(name="ppo_schema", node=PPOConfig)
