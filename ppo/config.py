"""The PPO stage's config schema: four model roles, two trained engines, rollout and PPO settings.

Registered in Hydra's ConfigStore as `ppo_schema`; conf/ppo.yaml lists it first. Values live
in the YAML (one comment above each); here only types, and `check_config`, the checks of their ranges.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from core.config import (
    ConfigError,
    DataConfig,
    DeepSpeedConfig,
    LoggerConfig,
    ModelConfig,
    OptimConfig,
    PeftConfig,
    TrainConfig,
    check_at_least,
    check_choice,
    check_format,
    check_in,
    check_values,
    check_zero,
)
from core.config import check_world as check_shared_world
from ppo.kl import ESTIMATORS as KL_ESTIMATORS


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


def check_config(cfg) -> None:
    """Fail before loading anything on a misspelt choice (a typo must not silently turn the KL off) or a
    value out of range (an EMA decay of 1.5 would diverge; a zero batch would fail deep inside); the
    shared groups through `core.config.check_values`. The pipeline calls it at planning too."""
    if cfg.bench.workload is not None:  # experiment=bench: train.max_steps is bench.steps
        check_at_least(1, {"bench.steps": cfg.bench.steps})
    check_at_least(1, {"train.max_steps": cfg.train.max_steps})  # no step: no PPO actor to export
    check_values(cfg, "ppo", optim=("actor_optim", "critic_optim"), zero=("actor_ds", "critic_ds"))
    if cfg.ptx.coef > 0 and cfg.ptx.path != "builtin":
        check_format("ptx.format", cfg.ptx.format, "ptx")
    f = cfg.frozen_ds  # no optimizer: its offload_optimizer is not read
    check_zero("frozen_ds", f.stage, offload_optimizer=False, offload_param=f.offload_param)
    p, r, x = cfg.ppo, cfg.rollout, cfg.ptx
    check_choice("ppo.kl_estimator", p.kl_estimator, KL_ESTIMATORS)
    check_choice("ppo.kl_in", p.kl_in, ("reward", "loss"))
    check_choice("ppo.reward_norm", p.reward_norm, ("none", "rm_stats", "running"))
    if p.kl_in == "loss" and p.kl_estimator == "k1":
        # d/dtheta of log pi(a) - log pi_ref(a) is d log pi(a): nothing of the reference is left in it
        raise ConfigError(
            "ppo.kl_in=loss needs ppo.kl_estimator=k2 or k3: k1's gradient as a loss does not depend on "
            "the reference (it only lowers the sampled tokens' log-probs), so it would not hold the policy "
            "near it. k2's gradient is that of KL(pi || pi_ref); k3 is GRPO's choice"
        )
    check_at_least(1, {"ppo.epochs": p.epochs, "ppo.kl_horizon": p.kl_horizon,
                       "rollout.samples_per_prompt": r.samples_per_prompt, "rollout.batch_size": r.batch_size,
                       "rollout.max_new_tokens": r.max_new_tokens,
                       "rollout.micro_batch_size_per_device": r.micro_batch_size_per_device})  # fmt: skip
    check_at_least(0, {"rollout.min_new_tokens": r.min_new_tokens, "rollout.top_k": r.top_k,
                       "ppo.kl_coef": p.kl_coef, "ppo.missing_eos_penalty": p.missing_eos_penalty,
                       "ppo.entropy_coef": p.entropy_coef, "ptx.coef": x.coef})  # fmt: skip
    if r.min_new_tokens > r.max_new_tokens:
        raise ConfigError(
            f"rollout.min_new_tokens must not exceed max_new_tokens ({r.max_new_tokens}); got {r.min_new_tokens}"
        )
    if not r.temperature > 0:
        raise ConfigError(
            f"rollout.temperature must be above 0 (PPO samples the policy); got {r.temperature}"
        )
    if not 0 < r.top_p <= 1:
        raise ConfigError(f"rollout.top_p must be in (0, 1] (1 = off); got {r.top_p}")
    for key in ("gamma", "gae_lambda"):
        check_in(f"ppo.{key}", p[key], 0, 1, high_open=False)
    if p.ema_decay is not None and not 0 <= p.ema_decay < 1:
        raise ConfigError(f"ppo.ema_decay must be in [0, 1) (0 or null: no EMA); got {p.ema_decay}")
    # the keys where null means off: a value must be above 0 (0 would clip everything). Not early_stop_kl:
    # any threshold has a meaning there (at or below 0 each update stops after its first minibatch)
    for key in ("clip_eps", "value_clip_eps", "kl_target", "reward_clip"):
        if p[key] is not None and not p[key] > 0:
            raise ConfigError(
                f"ppo.{key} must be above 0{'' if key == 'clip_eps' else ' or null'}; got {p[key]}"
            )
    if x.coef > 0:
        check_at_least(1, {"ptx.micro_batch_size_per_device": x.micro_batch_size_per_device})


def check_world(cfg, world: int) -> None:
    """The settings that depend on the number of ranks: the prompts split evenly over the ranks, each
    rank's rollout into whole minibatches, and the global batch. The recipe's setup calls it, and the
    pipeline at planning when its launcher fixes the world."""
    r, t = cfg.rollout, cfg.train
    if r.batch_size % world:
        raise ConfigError(f"rollout.batch_size={r.batch_size} must be divisible by the world size {world}")
    local_rollout = r.batch_size // world * r.samples_per_prompt  # sequences per rank
    minibatch = t.micro_batch_size_per_device * t.grad_accum_steps  # per rank
    if local_rollout % minibatch:
        raise ConfigError(
            f"rollout.batch_size / world size x rollout.samples_per_prompt = {local_rollout} sequences per "
            f"rank must be a multiple of train.micro_batch_size_per_device x train.grad_accum_steps = "
            f"{minibatch} (the minibatch)"
        )
    check_shared_world(cfg, world)
