"""Everything that touches DeepSpeed: its config from the Hydra groups, engines, ZeRO-3 helpers.

No other module imports deepspeed. The stage code sees engines (forward / backward / step),
`zero3_init`, which makes ZeRO-3 partition a model as it is created, and helpers to
gather partitioned weights for saving.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.comm.torch import build_shm_op
from deepspeed.runtime.utils import clip_grad_norm_
from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation
from torch.utils.cpp_extension import get_default_build_root
from transformers import get_scheduler
from transformers.integrations import deepspeed as hf_deepspeed

from core import dist
from core.config import ConfigError, check_global_batch, check_zero, plain
from core.logging import find_secret
from core.models import resolve_precision

log = logging.getLogger(__name__)


def build_config(
    *,
    stage: int,
    offload_optimizer: bool,
    offload_param: bool,
    extra: dict[str, Any],
    micro_batch_size_per_device: int,
    grad_accum_steps: int,
    global_batch_size: int | None,
    precision: str,
    grad_clip: float,
    lr: float,
    betas: list[float],
    eps: float,
    weight_decay: float,
    frozen: bool = False,
    group: str = "deepspeed",
) -> dict[str, Any]:
    """The DeepSpeed JSON config for one training engine, or for a `frozen` model (`inference_engine`).

    The global batch is derived (micro x accumulation x world size) and, when
    `global_batch_size` is given, checked against it. `group` names the config group in errors
    (PPO's `actor_ds`, `critic_ds`, `frozen_ds`).
    """
    _init_comm()
    check_zero(group, stage, offload_optimizer, offload_param)
    if micro_batch_size_per_device < 1 or grad_accum_steps < 1:
        raise ConfigError("train.micro_batch_size_per_device and train.grad_accum_steps must be >= 1")
    world = dist.world_size()
    check_global_batch(micro_batch_size_per_device, grad_accum_steps, world, global_batch_size)
    if secret := find_secret(plain(extra)):
        raise ConfigError(
            f"{group}.extra.{secret}: DeepSpeed prints its whole config in the log at start-up, so no "
            f"secret may go in it; give the service its key through its own environment variable "
            f"(COMET_API_KEY, ...)"
        )
    precision = resolve_precision(precision)
    run_stage = effective_stage(stage, world, frozen=frozen, precision=precision,
                                offload_optimizer=offload_optimizer, offload_param=offload_param)  # fmt: skip
    if run_stage != stage:
        what = "frozen model" if frozen else "trained model"
        log.info("ZeRO-%d over a single rank partitions nothing: running this %s at stage 0", stage, what)
        stage = run_stage
    on_cpu = get_accelerator().device_name() == "cpu"
    # On the CPU accelerator DeepSpeed's FusedAdam is a C++ op to compile; torch's AdamW is the same
    # update, and its fused CPU kernel (torch >= 2.4) steps all tensors at once: 0.44 ms against
    # 1.86 ms per step for the built-in model, 14 ms against 55 ms for the 26 M-parameter bench
    # policy, equal to the unfused update up to float rounding. Offloaded runs use DeepSpeedCPUAdam.
    torch_adam = on_cpu and not offload_optimizer
    zero: dict[str, Any] = {"stage": stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not on_cpu}
    if offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": not on_cpu}
    if stage == 3:
        # export gathers the 16-bit (or fp32) weights of every rank into rank 0
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if stage == 3 and frozen:
        # DeepSpeed's memory-efficient linear (on by default under ZeRO-3) frees each gathered weight
        # between forward and backward; a frozen model has no backward. It also replaces
        # torch.nn.functional.linear for the whole process, so every matmul of every model (the
        # trained actor and critic too) would run through its autograd Function. A trained
        # ZeRO-3 model keeps it: there it saves the memory it was made for.
        zero["memory_efficient_linear"] = False
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size_per_device,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size_per_device * grad_accum_steps * world,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": lr,
                "betas": list(betas),
                "eps": eps,
                "weight_decay": weight_decay,
                "torch_adam": torch_adam,
                **({"fused": True} if torch_adam else {}),
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(config, plain(extra))  # plain dicts all the way down: a nested key merges, not replaces


def effective_stage(
    stage: int, world: int, *, frozen: bool, precision: str, offload_optimizer: bool, offload_param: bool
) -> int:
    """The ZeRO stage to run: the configured one, except on a single rank without offload, where a
    partitioning stage has nothing to partition and runs as stage 0 (one rank holds everything anyway):

    - a frozen model under ZeRO-3. Measured on the CPU accelerator, one process: after ZeRO-3 had
      loaded the frozen reference and reward models, every later small matmul in the process ran
      about 3x slower; the whole built-in PPO step took 1.6-2.1 s against 1.0 s with them
      unpartitioned, with bitwise the same metrics.
    - a trained fp32 model under ZeRO-1 or 2 (the stage defaults; fp32 is what `auto` means on
      CPU). Their gradient buckets and partition bookkeeping cost about 5 ms per optimizer step on
      CPU: the built-in SFT step took 43 ms against 38 ms at stage 0, with the same losses to 5
      decimals (the gradient-norm clipping sums in another order). In bf16 / fp16 the stage is
      kept: DeepSpeed's stage 0 would drop ZeRO's fp32 master weights (bf16) or switch to its own
      loss-scaling optimizer (fp16). With `offload_optimizer` it is kept too: that moves the
      optimizer to CPU.

    A trained model under ZeRO-3 keeps its stage: ZeRO-3 on one rank is how a user tries its code
    paths (partitioned init, gathered generation) on a laptop. Two or more ranks: always as configured.
    """
    if world > 1:
        return stage
    if frozen and stage == 3 and not offload_param:
        return 0
    if not frozen and stage in (1, 2) and precision == "fp32" and not offload_optimizer:
        return 0
    return stage


def config_from_groups(zero, train, optim) -> dict[str, Any]:
    """`build_config` from a stage's `deepspeed`, `train` and `optim` groups."""
    return build_config(
        stage=zero.stage, offload_optimizer=zero.offload_optimizer, offload_param=zero.offload_param,
        extra=plain(zero.extra), micro_batch_size_per_device=train.micro_batch_size_per_device,
        grad_accum_steps=train.grad_accum_steps, global_batch_size=train.global_batch_size, precision=train.precision,
        grad_clip=optim.grad_clip, lr=optim.lr, betas=list(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay,
        group=zero._key(),
    )  # fmt: skip


def _init_comm() -> None:
    """Hand DeepSpeed's comm layer the process group core.dist already formed.

    Its config code asks deepspeed.comm (not torch.distributed) for the world size, and would
    otherwise see 1 and reject the derived batch size.
    """
    dist.init_process_group()
    if get_accelerator().device_name() == "cuda":
        parseable_arch_list()
    if get_accelerator().device_name() == "cpu":
        # the CPU comm op is built (or loaded) at every start, locally, in about a minute; on a GPU
        # cluster ops may build for many minutes into a home directory several nodes share, where an
        # old lock can be a live build on another node: left alone there
        use_environment_op_cache()
        clear_stale_build_locks()
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    _unlink_shm_workspace()


def parseable_arch_list() -> None:
    """Rewrite TORCH_CUDA_ARCH_LIST's arch-specific entries ("9.0a", "10.0f") to their base ("9.0", "10.0").

    CUDA images for Hopper and Blackwell set such entries, and DeepSpeed's JIT op builder (0.19) reads the
    variable and parses each minor version as an int: the first FusedAdam build (the GPU optimizer) failed
    with "invalid literal for int() with base 10: '0a'" on an H200 whose image set 9.0a. The ops DeepSpeed
    builds use no arch-specific instructions, so they are built for the base arch; only this process's
    environment changes.
    """
    raw = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if not re.search(r"\d\.\d+[a-z]", raw):
        return
    fixed: list[str] = []
    for entry in raw.replace(" ", ";").split(";"):
        entry = re.sub(r"^(\d+\.\d+)[a-z]", r"\1", entry.strip())
        if entry and entry not in fixed:
            fixed.append(entry)
    log.warning("TORCH_CUDA_ARCH_LIST=%s -> %s for DeepSpeed's op builder, which cannot parse arch-specific "
                "suffixes", raw, ";".join(fixed))  # fmt: skip
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(fixed)


def use_environment_op_cache() -> None:
    """Keep DeepSpeed's JIT-built ops inside this virtual environment (unless TORCH_EXTENSIONS_DIR is set).

    torch's default cache is one directory per user (~/.cache/torch_extensions). Two environments
    (two checkouts, a CI clone beside a working copy) share it, and as each one's build files name
    its own include paths, every switch between them rebuilt the CPU comm op: 25-29 s measured on
    2 cores at the start of a run. Outside a writable virtual environment the default stays.
    """
    if (
        "TORCH_EXTENSIONS_DIR" in os.environ
        or sys.prefix == sys.base_prefix
        or not os.access(sys.prefix, os.W_OK)
    ):
        return
    os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")


def build_cpu_comm_op() -> None:
    """Build (or load) DeepSpeed's CPU shared-memory comm op where runs will look for it (`make install`)."""
    use_environment_op_cache()
    build_shm_op()


def _unlink_shm_workspace() -> None:
    """Unlink this rank's /dev/shm segment of DeepSpeed's CPU allreduce op once every rank has mapped it.

    On the CPU accelerator, with all ranks on one machine, DeepSpeed creates a 66 MB shared-memory
    workspace per rank (`deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`) and never
    unlinks it: every run leaked 66 MB of RAM per rank in /dev/shm, until the machine ran out.
    After the barrier every rank has opened every segment; the mappings stay valid after the
    unlink and the memory is freed when the last rank exits, even a killed one.
    """
    world = dist.world_size()
    if get_accelerator().device_name() != "cpu" or world < 2 or os.environ.get("LOCAL_SIZE") != str(world):
        return  # the op is not in use (the same answer on every rank)
    dist.barrier()
    name = "_".join(("deepspeed_allreduce_buffer", str(os.getuid()), os.environ.get("MASTER_ADDR", ""),
                     os.environ.get("MASTER_PORT", ""), str(dist.rank())))  # fmt: skip
    with contextlib.suppress(FileNotFoundError):
        (Path("/dev/shm") / name).unlink()


# An op builds in about a minute on 2 CPU cores; a lock this old with no compiler at work is stale.
STALE_BUILD_LOCK_S = 600


def clear_stale_build_locks(max_age_s: float = STALE_BUILD_LOCK_S) -> list[Path]:
    """Remove the build locks of DeepSpeed's JIT ops that a killed build left behind.

    DeepSpeed compiles its C++ ops (the CPU comm op at every start, CPU Adam when offloading)
    with torch's cpp_extension, which guards a build with a bare `lock` file and has every other
    process wait, forever and silently, until it is gone. A build killed mid-way (Ctrl-C, a test
    or job timeout, the OOM killer) leaves it behind and every later run hangs at start. A lock
    is stale when it is older than `max_age_s` and no process works in its build directory
    (torch runs ninja there).
    """
    env_root = os.environ.get("TORCH_EXTENSIONS_DIR")
    # <root>/<op>/lock under TORCH_EXTENSIONS_DIR, <root>/py311_cpu/<op>/lock under the default
    locks = Path(env_root).glob("*/lock") if env_root else Path(get_default_build_root()).glob("*/*/lock")
    removed = []
    for lock in locks:
        try:
            age = time.time() - lock.stat().st_mtime
            if age > max_age_s and not _busy(lock.parent):
                lock.unlink()
                removed.append(lock)
                log.warning("removed %s, left %.0f min ago by a build that did not finish", lock, age / 60)
        except FileNotFoundError:  # another rank removed it, or the build finished
            pass
    return removed


def _busy(build_dir: Path) -> bool:
    """Whether a process (a build's ninja or compiler) has `build_dir` as its working directory (Linux)."""
    target = build_dir.resolve()
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            if cwd.resolve(strict=True) == target:
                return True
        except OSError:  # gone, or not ours to read
            continue
    return False


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _merge(dict(base[key]), value)
        else:
            base[key] = value
    return base


def zero3_init(ds_config: dict[str, Any]) -> hf_deepspeed.HfDeepSpeedConfig | None:
    """Register a ZeRO-3 config with transformers, so models created next are partitioned at construction.

    transformers then wraps `from_pretrained` / `from_config` in `deepspeed.zero.Init`: no rank
    ever holds the whole model. It keeps only a weak reference and consults it again in `generate`
    and embedding resizing, so the caller must keep the returned object for the models' lifetime.
    None below stage 3.
    """
    if ds_config["zero_optimization"]["stage"] != 3:
        return None
    return hf_deepspeed.HfDeepSpeedConfig(ds_config)


@contextlib.contextmanager
def model_init(ds_config: dict[str, Any]) -> Iterator[None]:
    """Models created inside are partitioned at construction if `ds_config` is ZeRO-3, plain if not.

    For a stage with several models of different ZeRO stages (PPO); restores the previous
    registration on exit.
    """
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    registration = zero3_init(ds_config)  # alive until the block ends
    if registration is None:
        hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


@contextlib.contextmanager
def zero3_init_disabled() -> Iterator[None]:
    """Build plain (unpartitioned) models, e.g. the CPU copy used for export on rank 0."""
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and norm weights (1-d tensors), as in GPT-2 / nanoGPT."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 partition is flat; ds_shape is the real one
        (decay if ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def train_engine(
    model: torch.nn.Module,
    ds_config: dict[str, Any],
    *,
    weight_decay: float,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float,
):
    """A DeepSpeed engine with AdamW and warmup + cosine decay (to min_lr_ratio x lr)."""

    def scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return get_scheduler(
            "cosine_with_min_lr",
            optimizer,
            num_warmup_steps=warmup_steps,
            num_training_steps=total_steps,
            scheduler_specific_kwargs={"min_lr_rate": min_lr_ratio},
        )

    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=_param_groups(model, weight_decay),
        config=ds_config,
        lr_scheduler=scheduler,
    )
    _record_stage0_grad_norm(engine)
    if engine.zero_optimization_stage() == 0 and dist.world_size() == 1:
        # One rank has no gradients to average, but DeepSpeed's stage-0 path would still flatten them
        # all into a buffer, all-reduce it over that one rank and copy it back: 29 ms per step for the
        # 26 M-parameter bench policy, with bitwise the same weights after (checked).
        engine.enable_backward_allreduce = False
    return engine


def _record_stage0_grad_norm(engine) -> None:
    """Make an fp32 stage-0 engine keep the gradient norm its clipping computes.

    ZeRO-1/2/3 and the fp16 / bf16 optimizers store the norm (`get_global_grad_norm`); DeepSpeed's
    plain fp32 path clips with `clip_fp32_gradients` and drops the norm it returns, so the logged
    norm would be missing (stage 0 is what one fp32 rank runs, see `effective_stage`).
    """
    if engine.zero_optimization_stage() != 0 or engine.fp16_enabled() or engine.bfloat16_enabled():
        return

    def clip_and_record() -> None:
        engine._global_grad_norm = clip_grad_norm_(
            parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(), mpu=engine.mpu
        )

    engine.clip_fp32_gradients = clip_and_record


def grad_norm(engine) -> float | None:
    """The gradient norm (before clipping) of the engine's last optimizer step; None where DeepSpeed
    computes none (an fp32 stage-0 engine without gradient clipping)."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def inference_engine(model: torch.nn.Module, ds_config: dict[str, Any]):
    """A DeepSpeed engine for a frozen model (no optimizer state): under ZeRO-3 its weights stay
    partitioned and are gathered layer by layer in each forward. The model is put in eval mode
    with gradients off.
    """
    config = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


@contextlib.contextmanager
def gathered_for_generation(engine, enabled: bool) -> Iterator[torch.nn.Module]:
    """The engine's module with every ZeRO-3 weight gathered once, for a whole `generate` call.

    Plain ZeRO-3 gathers each layer's weights again for every generated token (one all-gather per
    layer per token); here they are gathered once and DeepSpeed's per-module hooks are lifted for the
    duration (DeepSpeed's own `unwrap_model_for_generation`), so decoding runs on whole local
    weights with the KV cache. Costs one full copy of the model per rank while it lasts. Changes
    made to the weights inside are discarded on exit. Below ZeRO-3, or with enabled=False, the
    module as it is. Collective under ZeRO-3: every rank must enter.
    """
    if not enabled or engine.zero_optimization_stage() != 3:
        yield engine.module
        return
    coordinator = getattr(
        getattr(engine.optimizer, "parameter_offload", engine.optimizer), "param_coordinator", None
    )
    with unwrap_model_for_generation(engine) as unwrapped:
        # DeepSpeed keeps the root module's pre-forward hook, whose `reset_step` checks with every other
        # rank (collectives) while no module order is recorded: once per decoding step, so a rank whose
        # responses all stop early would leave the others waiting. With the weights whole there is
        # nothing to record; the instance attribute shadows the method until deleted.
        if coordinator is not None:
            coordinator.reset_step = lambda: None
        try:
            yield unwrapped.module
        finally:
            if coordinator is not None:
                del coordinator.reset_step
    if coordinator is not None and not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()  # the recorded module order no longer matches (as TRL does)


def local_shards(engine) -> list[torch.Tensor]:
    """The parameter data this rank holds: ZeRO-3 partitions, or whole parameters below stage 3.

    In module order; used for an EMA of the weights that never needs the whole model on one rank.
    """
    return [p.ds_tensor.data if hasattr(p, "ds_tensor") else p.data for p in engine.module.parameters()]


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """Every parameter of the engine's module, whole, on rank 0 (CPU); {} on other ranks.

    Under ZeRO-3 the partitions are gathered layer by layer into rank 0, so no rank needs the
    whole model on its accelerator. Collective: every rank must call it.
    """
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # gathers; rank 0 only gets tensors
        state = state if dist.is_main() else {}
    else:
        state = engine.module.state_dict() if dist.is_main() else {}
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def partition_numel(module: torch.nn.Module) -> tuple[int, int]:
    """(elements this rank stores, elements of the whole model) for the module's parameters.

    Under ZeRO-3 a rank stores its partition of each parameter, and also the whole of each one
    DeepSpeed keeps persistent (below `stage3_param_persistence_threshold`, 1e5 elements by default:
    every matrix of the built-in model), which it gathers once and keeps on every rank.
    """
    local = total = 0
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):  # ZeRO-3 partitioned
            local += p.ds_tensor.numel() + (p.ds_numel if getattr(p, "ds_persist", False) else 0)
            total += p.ds_numel
        else:
            local += p.numel()
            total += p.numel()
    return local, total


def partition_shares(module: torch.nn.Module) -> list[float]:
    """Share of the model's parameter elements each rank stores, indexed by rank (collective)."""
    local, total = partition_numel(module)
    return dist.all_gather_object(local / max(total, 1))


def zero_stage(engine) -> int:
    """The ZeRO stage the engine runs (the configured one after `effective_stage`)."""
    return engine.zero_optimization_stage()


def save_checkpoint(engine, save_dir: str, tag: str) -> None:
    """DeepSpeed's own sharded checkpoint (module, optimizer, scheduler) of every rank under save_dir/tag."""
    engine.save_checkpoint(save_dir, tag=tag, save_latest=False)


def launcher_options(args: list[str]) -> argparse.Namespace:
    """The `deepspeed` launcher's arguments `args` (before the script) as its own parser reads them."""
    from deepspeed.launcher import runner

    try:
        return runner.parse_args([*args, "stage"])
    except SystemExit as e:  # argparse has printed what it did not take
        raise ConfigError(f"the deepspeed launcher does not take the arguments {' '.join(args)}") from e


def hostfile_slots(path: str) -> dict[str, int]:
    """A DeepSpeed hostfile's hosts and their slots, as its launcher reads them."""
    from deepspeed.launcher import runner

    try:
        return dict(runner.fetch_hostfile(path) or {})
    except ValueError as e:  # a malformed line, a host named twice
        raise ConfigError(f"launcher.hostfile={path}: {e}") from e


def launcher_world(launcher_args: list[str]) -> int | None:
    """How many ranks `deepspeed <launcher_args> --module ...` starts, counted with the launcher's own
    functions in the order its `main` applies them: the hostfile's hosts and slots (this node's devices
    when there is no hostfile, those CUDA_VISIBLE_DEVICES names when nothing else picks them), then
    --include / --exclude, then --num_nodes and --num_gpus, then the `--launcher` backend's own checks.
    Raises ConfigError where the launcher would stop on them. None where it cannot be told from here: a
    DeepSpeed without `apply_num_nodes_and_gpus` (its trimming was inline in `main` before), or one node
    with CUDA_VISIBLE_DEVICES set beside --include / --exclude or --num_nodes 1 (the launcher then drops
    the variable and counts every device of the node, which this process cannot see)."""
    from deepspeed.launcher import runner

    if not hasattr(runner, "apply_num_nodes_and_gpus"):
        return None
    args = launcher_options(launcher_args)
    where = f"the deepspeed launcher's arguments {' '.join(launcher_args)}"
    if (args.include or args.exclude) and (args.num_nodes >= 0 or args.num_gpus >= 0):
        raise ConfigError(f"{where}: it takes --include / --exclude or --num_nodes / --num_gpus, not both")
    try:
        if os.path.isfile(args.hostfile):
            pool = runner.fetch_hostfile(args.hostfile)
            active = runner.parse_inclusion_exclusion(pool, args.include, args.exclude)
        elif args.num_nodes > 1:
            raise ConfigError(f"{where}: --num_nodes {args.num_nodes} needs a hostfile with that many nodes")
        elif visible := os.environ.get(get_accelerator().visible_devices_envs()[0], ""):
            if args.num_gpus <= 0 and (args.include or args.exclude or args.num_nodes == 1):
                return None
            ids = [d.strip() for d in visible.split(",")]
            if args.num_gpus <= 0 and not all(d.isdigit() for d in ids):
                raise ConfigError(
                    f"{where}: the launcher reads CUDA_VISIBLE_DEVICES={visible} as device numbers"
                )
            active = {"localhost": [int(d) for d in ids] if args.num_gpus <= 0 else []}
        else:  # no hostfile: this node's devices
            pool = {"localhost": get_accelerator().device_count()}
            active = runner.parse_inclusion_exclusion(pool, args.include, args.exclude)
        active = runner.apply_num_nodes_and_gpus(active, args.num_nodes, args.num_gpus)
        _check_launcher_backend(args, active)
    except ConfigError:
        raise
    except ValueError as e:  # a malformed hostfile, a host or slot not there, what the backend cannot do
        raise ConfigError(f"{where}: {e}") from e
    return sum(len(slots) for slots in active.values())


def _check_launcher_backend(args: argparse.Namespace, active: dict[str, list[int]]) -> None:
    """What `--launcher`'s backend (pdsh, openmpi, slurm, ...) refuses of the resolved hosts and slots,
    and of the arguments when it runs (several hosts): its own checks, raising ValueError."""
    from deepspeed.launcher import runner

    backends = getattr(runner, "LAUNCHER_CLASSES", {})
    backend = backends.get(args.launcher.lower())
    if backend is None:
        if backends:
            raise ValueError(f"unknown --launcher {args.launcher} (DeepSpeed's: {', '.join(backends)})")
        return
    if hasattr(backend, "validate_active_resources"):
        backend.validate_active_resources(active)
    if (args.force_multi or len(active) > 1) and not args.no_ssh:  # the multi-node launch builds the backend
        instance = object.__new__(backend)  # its checks only: the constructor also reads the environment
        instance.args = args
        instance.validate_args()


def load_checkpoint(engine, load_dir: str, tag: str) -> None:
    path, _ = engine.load_checkpoint(
        load_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load checkpoint {load_dir}/{tag}")


PARAM_GROUPS = "param_groups.pt"  # in a universal copy: the optimizer's saved param groups, without params


def to_universal(checkpoint_dir: str, out_dir: str) -> None:
    """Write DeepSpeed's universal copy of one engine's ZeRO checkpoint (`ds_to_universal`): every
    parameter's whole fp32 weight and optimizer moments, which any rank count can share out again.

    Run as its own process: the converter forks worker pools, which a process holding a process
    group and its threads must not do. `--inject_missing_state` adds the version record that only
    Megatron-DeepSpeed models write themselves (ZeRO-1/2 checkpoints of transformers models lack it).
    """
    # each extraction worker loads one rank's whole optimizer shard, beside the run's own engines
    extract = str(max(1, min(2, os.cpu_count() or 1)))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", checkpoint_dir,
           "--output_folder", out_dir, "--num_extract_workers", extract, "--num_merge_workers", "1",
           "--inject_missing_state"]  # fmt: skip
    # it reads and writes files only: no GPU context beside rank 0's resident engines
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(
            f"DeepSpeed's ds_to_universal failed on {checkpoint_dir} ({proc.returncode}):\n{proc.stdout[-2000:]}"
            f"\n{proc.stderr[-4000:]}"
        )
    # it also points a `latest_universal` file beside out_dir at out_dir's name; the caller names what it loads
    (Path(out_dir).parent / "latest_universal").unlink(missing_ok=True)
    optimizer_state = Path(out_dir) / "zero" / "optimizer_state.pt"
    if optimizer_state.is_file():  # ZeRO-3: its saved param groups, for `_mend_zero3_universal_load`
        saved = torch.load(optimizer_state, map_location="cpu", weights_only=False)
        groups = [
            {k: v for k, v in g.items() if k != "params"}
            for g in saved["optimizer_state_dict"]["param_groups"]
        ]
        torch.save(groups, Path(out_dir) / PARAM_GROUPS)


def load_universal_checkpoint(engine, load_dir: str, tag: str) -> None:
    """`load_checkpoint` of a universal copy (`to_universal`) into this run's ranks and ZeRO stage.

    DeepSpeed reads its `checkpoint.load_universal` switch when loading, not when the engine is
    built, so it is turned on for this one load: the engine is not built twice, and the run's own
    checkpoints stay ordinary ones.
    """
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        load_checkpoint(engine, load_dir, tag)
    finally:
        config.load_universal_checkpoint = before
    if engine.zero_optimization_stage() == 3:
        _mend_zero3_universal_load(engine.optimizer, Path(load_dir) / tag)


def _mend_zero3_universal_load(optimizer, folder: Path) -> None:
    """Undo two slips of DeepSpeed's ZeRO-3 universal load (0.19, `load_hp_checkpoint_state_from_checkpoint_dir_stage3`).

    - It gives every parameter sub-group one and the same `step` tensor, and torch's AdamW (the CPU
      optimizer here) advances a step tensor in place, once per sub-group: with weights and norms in
      two sub-groups the count went 3 -> 5 in one step, and the norms' update came out 8 % short (the
      built-in SFT). DeepSpeed's FusedAdam and CPUAdam count steps as numbers, which this leaves be.
    - It gives every param group the first group's hyperparameters, so the no-decay group (norms,
      biases) took the weight decay of the others.
    Each sub-group gets its own step, and each group its own saved hyperparameters, as the ZeRO-1/2
    universal load and every same-rank-count load do.
    """
    state = optimizer.optimizer.state
    seen = set()
    for flat in optimizer.fp32_partitioned_groups_flat:
        step = state.get(flat, {}).get("step")
        if torch.is_tensor(step):
            if id(step) in seen:
                state[flat]["step"] = step.clone()
            seen.add(id(step))
    if (folder / PARAM_GROUPS).is_file():  # written by `to_universal`: a few numbers per group
        saved_groups = torch.load(folder / PARAM_GROUPS, weights_only=True)
    else:  # a copy converted by hand: the groups sit in rank 0's whole optimizer state
        saved = torch.load(folder / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
        saved_groups = saved["optimizer_state_dict"]["param_groups"]
    groups = optimizer.optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise RuntimeError(
            f"{folder}: {len(saved_groups)} saved optimizer param groups, the optimizer has {len(groups)}"
        )
    for group, kept in zip(groups, saved_groups):
        group.update({k: v for k, v in kept.items() if k != "params"})


def consolidated_fp32_state_dict(checkpoint_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights rebuilt from a ZeRO checkpoint's shards (DeepSpeed's zero_to_fp32), for checks."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)
