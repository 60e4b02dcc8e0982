"""Typed schemas for the config groups every stage shares.

Types live here; values live in the YAML files under `conf/` (one default in one place).
Fields without a value are `MISSING`, so a group file that forgets one fails loudly, and an
override with a typo or a wrong type fails in Hydra before any model is loaded. A value of the right
type but out of range (`train.max_steps=-1`, `optim.betas=[0.9, 1.5]`) fails in `check_values`, which
every stage calls first in its setup and the pipeline calls for each stage at planning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf

from data.formats import STAGE_FORMATS
from data.templates import CHAT_TEMPLATE_MODES


class ConfigError(ValueError):
    """A setting a user can fix: the message names the key and what it takes."""


# ${project_dir:} in a config: this checkout's root, for files shipped with the project
# (e.g. data/story_openings.jsonl) whatever directory a command runs from.
OmegaConf.register_new_resolver("project_dir", lambda: str(Path(__file__).resolve().parents[1]), replace=True)


@dataclass
class ModelConfig:
    # Hub id or local directory; null builds a fresh model from `arch`.
    name_or_path: str | None = MISSING
    # Tokenizer location; null means "same as name_or_path"; "builtin" is the project's own;
    # "train" (SFT only) trains a byte-level BPE tokenizer of `train_tokenizer_vocab` on the SFT data.
    tokenizer: str | None = MISSING
    train_tokenizer_vocab: int = MISSING
    # Config kwargs (incl. `model_type`) used only when name_or_path is null.
    arch: dict[str, Any] = MISSING
    attn_implementation: str | None = MISSING
    gradient_checkpointing: bool = MISSING
    trust_remote_code: bool = MISSING
    revision: str | None = MISSING


@dataclass
class TemplateConfig:
    # auto: use the tokenizer's chat template when it has one; never: always the strings below.
    chat_template: str = MISSING
    system: str = MISSING
    user: str = MISSING
    assistant: str = MISSING


@dataclass
class BuiltinTaskConfig:
    num_prompts: int = MISSING
    seed: int = MISSING


@dataclass
class ImdbTaskConfig:
    # Seed of the split of the reviews into parts (and of the preference pairs).
    seed: int = MISSING
    # Share of the reviews in each part (data/imdb.py PARTS); each part is label-balanced.
    fractions: dict[str, float] = MISSING
    # Prompt = the first prompt_words words of a review; response = the next response_words.
    prompt_words: int = MISSING
    response_words: int = MISSING
    # Preference pairs per group of reviews sharing an opening (positive over negative).
    pairs_per_group: int = MISSING
    # Windows per judge review (the judge is fit on continuation-sized windows).
    judge_windows_per_review: int = MISSING


@dataclass
class DataConfig:
    # A file, a list of files, a `datasets` hub name, or "builtin".
    path: Any = MISSING
    format: str | None = MISSING
    eval_path: Any = MISSING
    eval_fraction: float = MISSING
    split: str = MISSING
    max_len: int = MISSING
    on_error: str = MISSING
    # responses: loss on assistant turns only; all: on every token.
    loss_on: str = MISSING
    packing: bool = MISSING
    shuffle_seed: int = MISSING
    template: TemplateConfig = field(default_factory=TemplateConfig)
    builtin: BuiltinTaskConfig = field(default_factory=BuiltinTaskConfig)
    # Only for format=imdb (conf/data/imdb.yaml).
    imdb: ImdbTaskConfig | None = MISSING


@dataclass
class DeepSpeedConfig:
    stage: int = MISSING
    offload_optimizer: bool = MISSING
    offload_param: bool = MISSING
    # Raw DeepSpeed config keys merged last, for anything this schema does not name.
    extra: dict[str, Any] = MISSING


@dataclass
class PeftConfig:
    # none | lora
    type: str = MISSING
    r: int = MISSING
    alpha: int = MISSING
    dropout: float = MISSING
    target_modules: Any = MISSING
    # Also export the base model with the adapters merged in.
    merge_on_export: bool = MISSING


@dataclass
class OptimConfig:
    lr: float = MISSING
    weight_decay: float = MISSING
    betas: list[float] = MISSING
    eps: float = MISSING
    grad_clip: float = MISSING
    warmup_steps: int = MISSING
    # cosine decay floor as a fraction of lr
    min_lr_ratio: float = MISSING


@dataclass
class LoggerConfig:
    # wandb | tensorboard | none (metrics.jsonl is always written)
    backend: str = MISSING
    project: str = MISSING
    entity: str | None = MISSING
    group: str | None = MISSING
    name: str | None = MISSING
    # auto: online with credentials and network, else offline with a notice
    mode: str = MISSING
    job_type: str | None = MISSING
    tags: list[str] = MISSING


@dataclass
class TrainConfig:
    max_steps: int = MISSING
    micro_batch_size_per_device: int = MISSING
    grad_accum_steps: int = MISSING
    # Optional check: micro * accum * world size must equal this when set.
    global_batch_size: int | None = MISSING
    seed: int = MISSING
    precision: str = MISSING
    log_every: int = MISSING
    eval_every: int = MISSING
    eval_batches: int = MISSING
    num_samples: int = MISSING
    sample_max_new_tokens: int = MISSING
    save_every: int = MISSING
    keep_checkpoints: int = MISSING
    # Continue from the newest complete checkpoint in <run dir>/checkpoints.
    resume: bool = MISSING
    # CPU only: glibc keeps freed tensor memory for the next step (core.dist.keep_freed_cpu_memory).
    keep_freed_memory: bool = MISSING
    # fp32 on the CPU: the trained models' linear products (forward and backward) through oneDNN.
    onednn_products: bool = MISSING


def plain(node: Any) -> Any:
    """A resolved plain-Python copy of a config node (dicts and lists stay as they are)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


@dataclass
class StageConfig:
    """The groups every training stage composes (conf/<stage>.yaml lists them)."""

    data_root: str = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------- value checks

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LOGGER_BACKENDS = ("wandb", "tensorboard", "none")
LOGGER_MODES = ("auto", "online", "offline", "disabled")


def check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def check_format(key: str, value: str | None, stage: str) -> None:
    """A data format name the stage reads (`data.formats.STAGE_FORMATS`); null (detect) passes."""
    if value is not None:
        check_choice(key, value, STAGE_FORMATS[stage])


def check_at_least(minimum: int, values: dict[str, int | float]) -> None:
    for key, value in values.items():
        if value < minimum:
            raise ConfigError(f"{key} must be at least {minimum}; got {value}")


def check_in(key: str, value: float | None, low: float, high: float, *, high_open: bool = True) -> None:
    """low <= value < high (or <= high); None passes (the keys where null means off)."""
    if value is not None and not (low <= value < high if high_open else low <= value <= high):
        raise ConfigError(f"{key} must be in [{low}, {high}{')' if high_open else ']'}; got {value}")


def check_zero(group: str, stage: int, offload_optimizer: bool, offload_param: bool) -> None:
    """A deepspeed group's ZeRO stage and the offloads it allows (`group` as the user sets it)."""
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{group}.stage must be 0, 1, 2 or 3, got {stage}")
    if offload_param and stage != 3:
        raise ConfigError(f"{group}.offload_param needs ZeRO stage 3")
    if offload_optimizer and stage == 0:
        raise ConfigError(f"{group}.offload_optimizer needs ZeRO stage 1, 2 or 3")


def check_global_batch(micro_batch_size_per_device: int, grad_accum_steps: int, world: int,
                       global_batch_size: int | None) -> None:  # fmt: skip
    """train.global_batch_size, when set, must be micro x accumulation x world size."""
    derived = micro_batch_size_per_device * grad_accum_steps * world
    if global_batch_size is not None and global_batch_size != derived:
        raise ConfigError(
            f"train.global_batch_size={global_batch_size} but micro_batch_size_per_device "
            f"({micro_batch_size_per_device}) x grad_accum_steps ({grad_accum_steps}) x world size ({world}) "
            f"= {derived}; fix one of them or set train.global_batch_size=null"
        )


def check_world(cfg: Any, world: int) -> None:
    """The shared settings that depend on the number of ranks, checked once it is known: the global
    batch. (The pipeline calls each stage's `check_world` at planning when its launcher fixes the world.)"""
    t = cfg.train
    check_global_batch(t.micro_batch_size_per_device, t.grad_accum_steps, world, t.global_batch_size)


def check_values(
    cfg: Any, stage: str, *, optim: tuple[str, ...] = ("optim",), zero: tuple[str, ...] = ("deepspeed",)
) -> None:
    """Range and choice checks of the shared groups (train, data, peft, logger, and the optimizer and
    deepspeed groups named), before anything is loaded: a value a run would otherwise take silently
    (`optim.betas=[0.9, 1.5]`, a negative weight decay) or fail on deep inside, after minutes of work.
    `stage` names the data formats it reads (`data.formats.STAGE_FORMATS`). Raises ConfigError naming
    the key."""
    t, d, p = cfg.train, cfg.data, cfg.peft
    check_at_least(1, {"train.micro_batch_size_per_device": t.micro_batch_size_per_device,
                       "train.grad_accum_steps": t.grad_accum_steps, "data.max_len": d.max_len})  # fmt: skip
    # max_steps 0: the starting model exported as it is (SFT, reward); PPO asks for at least one step
    check_at_least(0, {"train.max_steps": t.max_steps})
    check_at_least(0, {f"train.{k}": t[k] for k in ("log_every", "eval_every", "eval_batches", "num_samples",
                                                    "sample_max_new_tokens", "save_every")})  # fmt: skip
    check_choice("train.precision", t.precision, PRECISIONS)
    check_choice("data.loss_on", d.loss_on, ("responses", "all"))
    check_choice("data.on_error", d.on_error, ("raise", "skip"))
    check_choice("data.template.chat_template", d.template.chat_template, CHAT_TEMPLATE_MODES)
    if d.path != "builtin":  # the built-in task reads no format
        check_format("data.format", d.format, stage)
    if d.eval_path is None and not 0 < d.eval_fraction < 1:
        raise ConfigError(
            f"data.eval_fraction must be between 0 and 1 when no data.eval_path is given; got {d.eval_fraction}"
        )
    check_choice("peft.type", p.type, ("none", "lora"))
    if p.type == "lora":
        check_at_least(1, {"peft.r": p.r})
        if not p.alpha > 0:
            raise ConfigError(f"peft.alpha must be above 0; got {p.alpha}")
        check_in("peft.dropout", p.dropout, 0, 1)
    check_choice("logger.backend", cfg.logger.backend, LOGGER_BACKENDS)
    check_choice("logger.mode", cfg.logger.mode, LOGGER_MODES)
    for g in optim:
        o = cfg[g]
        check_at_least(0, {f"{g}.lr": o.lr, f"{g}.weight_decay": o.weight_decay, f"{g}.grad_clip": o.grad_clip,
                           f"{g}.warmup_steps": o.warmup_steps})  # fmt: skip
        if len(o.betas) != 2:
            raise ConfigError(f"{g}.betas must be two numbers (Adam's beta1, beta2); got {list(o.betas)}")
        for i, beta in enumerate(o.betas):
            check_in(f"{g}.betas[{i}]", beta, 0, 1)
        if not o.eps > 0:
            raise ConfigError(f"{g}.eps must be above 0; got {o.eps}")
        check_in(f"{g}.min_lr_ratio", o.min_lr_ratio, 0, 1, high_open=False)
    for g in zero:
        check_zero(g, cfg[g].stage, cfg[g].offload_optimizer, cfg[g].offload_param)
