"""The whole recipe from one command: SFT -> reward model -> PPO, a gold evaluation and a report.

    rlhf pipeline [key=value ...]                      (or: python -m core.pipeline ...)
    rlhf pipeline sft.optim.lr=1e-4 ppo.kl_coef=0.1    any stage key, prefixed with its stage
    rlhf pipeline -m ppo.kl_coef=0.01,0.05,0.2         a sweep: SFT and reward run once, PPO per value

Each stage runs as its own process (`python -m <stage>`, or under the `deepspeed` launcher) in
`<run>/<stage>`, with its config composed from `conf/<stage>.yaml` plus the overrides under the
pipeline's `sft:` / `reward:` / `ppo:` keys, and the previous stage's export as its model:

    sft/export     -> reward.model (init), ppo.actor, ppo.ref
    reward/export  -> ppo.reward_model, ppo.critic (init)

A stage's *key* is a hash of its resolved config (minus logging and resume switches), the keys
of the stages it reads, and the sizes and modification times of the local files it reads by path
(data files, a model directory given in place of a hand-off). Re-running a command skips each
stage whose export carries the same key, resumes a stage that was interrupted (same key, no
finished export), and re-runs a stage whose config or inputs changed (and so, through the keys,
every stage after it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import hashlib
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from core import checkpoint, dist
from core.checkpoint import EXPORT_INFO, atomic_write_text
from core.config import ConfigError
from core.logging import find_secret
from core.models import TRAIN_TOKENIZER

log = logging.getLogger(__name__)

STAGES = ("sft", "reward", "ppo")
# Whose exports each stage reads (the hand-off), and where they go in its config.
UPSTREAM = {"sft": (), "reward": ("sft",), "ppo": ("sft", "reward")}
HANDOFF = {
    "reward": {"model": "sft"},
    "ppo": {"actor": "sft", "ref": "sft", "reward_model": "reward", "critic": "reward"},
}
# Config parts that change how a run is watched, restarted or allocates memory, not what it computes.
UNHASHED = ("logger", "train.resume", "train.keep_freed_memory")
# Config keys (their last part) whose value names what a stage reads: a local file or directory there
# counts by its files' sizes and modification times too, so editing it in place re-runs the stage.
INPUT_KEYS = ("name_or_path", "tokenizer", "path", "eval_path", "workload")
# Values of those keys that name no path, whatever the working directory holds
PLACEHOLDERS = ("", "builtin", TRAIN_TOKENIZER)
STAGE_STATE = "pipeline_stage.json"  # <stage dir>/ at the start; <stage dir>/export/ when finished
# One `rlhf pipeline` command (every job of its sweep): pipeline.from_stage re-runs a stage once per command
INVOCATION_ENV = "RLHF_PIPELINE_INVOCATION"
STAGE_CONFIG = "pipeline_stage_config"  # <stage dir>/pipeline_stage_config.yaml, what the stage runs


@dataclass
class LauncherConfig:
    num_gpus: int | None = MISSING
    num_procs: int = MISSING
    hostfile: str | None = MISSING
    master_port: int | None = MISSING
    extra_args: list[str] = field(default_factory=list)


@dataclass
class PipelineSection:
    name: str = MISSING
    stages: list[str] = MISSING
    from_stage: str | None = MISSING
    wandb_group: str | None = MISSING


@dataclass
class EvalConfig:
    enabled: bool = MISSING
    samples_per_prompt: int = MISSING
    num_report_samples: int = MISSING
    seed: int = MISSING
    # auto | gold | sentiment (core/evaluate.py JUDGES)
    judge: str = MISSING


@dataclass
class PipelineConfig:
    data_root: str = MISSING
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Overrides of each stage's own config (conf/<stage>.yaml), any key: sft.optim.lr=1e-4
    sft: dict[str, Any] = field(default_factory=dict)
    reward: dict[str, Any] = field(default_factory=dict)
    ppo: dict[str, Any] = field(default_factory=dict)


ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)


# ----------------------------------------------------------------------------- command line


def _package_form(arg: str) -> str:
    """`ppo.deepspeed@actor_ds=zero3` -> `ppo.actor_ds=zero3`; any other argument as it is."""
    head, sep, value = arg.partition("=")
    if "@" in head and head.split(".", 1)[0] in STAGES:
        stage, group_at_package = head.split(".", 1)
        return f"{stage}.{group_at_package.split('@', 1)[1]}{sep}{value}"
    return arg


def stage_overrides_argv(argv: list[str]) -> list[str]:
    """Let `sft.optim.lr=1e-4` reach the open `sft:` node: Hydra needs `++` to add a key there.

    A stage's group-at-package form (`ppo.deepspeed@actor_ds=zero3`, as `python -m ppo` takes it)
    becomes the package key (`ppo.actor_ds=zero3`), which selects the same file.
    A group chosen by name and given keys in the same command (`sft.data=imdb sft.data.max_len=96`)
    is an error: the keys would replace the choice (choose it through a stage experiment instead).
    """
    argv = [_package_form(arg) for arg in argv]
    heads = [arg.split("=", 1)[0].lstrip("+") for arg in argv if "=" in arg]
    for head in heads:
        if (
            head.split(".", 1)[0] in STAGES
            and head.count(".") == 1
            and any(h.startswith(head + ".") for h in heads)
        ):
            raise ConfigError(
                f"{head}=<choice> (or its group@package form) and {head}.<key>=... in one command: the keys "
                f"would replace the choice. "
                f"Select the group in a stage experiment (conf/experiment/*.yaml, e.g. "
                f"{head.split('.')[0]}.experiment=imdb selects data=imdb) and set {head}.<key> here"
            )
    out = []
    for arg in argv:
        head = arg.split("=", 1)[0]
        if "=" in arg and not arg.startswith(("+", "~")) and head.split(".", 1)[0] in STAGES and "." in head:
            arg = "++" + arg
        out.append(arg)
    return out


# ----------------------------------------------------------------------------- stage configs


def _flatten(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict) and (node or not prefix):
        for k, v in node.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, node


def compose_stage(
    stage: str, overrides: dict[str, Any], handoff: dict[str, str], data_root: str
) -> DictConfig:
    """The stage's resolved config: conf/<stage>.yaml, then the hand-off paths, then the user's overrides.

    A string given for a config-group package (`sft.model=gpt2`, `ppo.actor_ds=zero3`,
    `reward.experiment=quick`) selects that group's file; every other key sets a value and is
    type-checked against the stage's schema. In the PPO stage, a key of its `ppo:` section may be
    given without the section (`ppo.kl_coef` = `ppo.ppo.kl_coef`). A secret-looking key is refused,
    and so is a value out of range (the stage's `check_config`, which it would run only when it starts).
    """
    schema = importlib.import_module(f"{stage}.config")  # registers the stage's schema
    base = hydra.compose(config_name=stage, return_hydra_config=True)
    # e.g. {"model@actor": "tiny", "experiment": None} -> package -> "group@package"
    packages = {k.split("@")[-1]: k for k in base.hydra.runtime.choices if not k.startswith("hydra")}
    groups, values = [], []
    for key, value in _flatten(overrides):
        if "." not in key and key in packages and (value is None or isinstance(value, str)):
            if key in handoff:  # the group's model would silently give way to the upstream export
                raise ConfigError(
                    f"{stage}.{key}={value}: the pipeline starts {stage}'s {key} from {handoff[key]}; give "
                    f"{stage}.{key}.name_or_path=... to start from another model, or run {stage} alone"
                )
            groups.append(f"{packages[key]}={'null' if value is None else value}")
        else:
            values.append((key, value))
    cfg = hydra.compose(config_name=stage, overrides=groups)
    with open_dict(cfg):
        cfg.data_root = data_root  # one data root for the whole pipeline
        for role, upstream_path in handoff.items():
            cfg[role].name_or_path = upstream_path
            cfg[role].tokenizer = None  # the tokenizer saved with the export
    for key, value in values:
        head = key.split(".")[0]
        if stage == "ppo" and head not in cfg and head in cfg.ppo:
            key = f"ppo.{key}"
        raw = _open_mapping(cfg, key)
        if raw is None and OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            raise ConfigError(f"{stage}.{key}: conf/{stage}.yaml has no such key")
        try:
            with open_dict(raw) if raw is not None else contextlib.nullcontext():
                OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as e:  # a validation error: re-raise naming the pipeline key
            raise ConfigError(f"{stage}.{key}={value!r}: {e}") from e
    if secret := find_secret(OmegaConf.to_container(cfg, resolve=False)):  # written to disk below
        raise ConfigError(
            f"{stage}.{secret}: no secret goes in a config, which the pipeline writes to the stage's "
            f"directory; give it through the environment"
        )
    OmegaConf.resolve(cfg)
    try:
        schema.check_config(cfg)
    except ConfigError as e:  # its message starts with the stage's own key
        raise ConfigError(f"{stage}.{e}") from e
    return cfg


def _open_mapping(cfg: DictConfig, key: str) -> DictConfig | None:
    """The deepspeed group's `extra` that `key` sets a key inside (raw DeepSpeed keys, which no schema
    names, so any key may go there), or None. The path up to `extra` must exist: a misspelt group
    still fails."""
    parts = key.split(".")
    if "extra" not in parts[:-1]:
        return None
    node = OmegaConf.select(cfg, ".".join(parts[: parts.index("extra") + 1]), default=None)
    return node if isinstance(node, DictConfig) else None


# Model roles a stage fills, when null, with the newest export of a stage's own runs (`python -m ppo`
# alone does): role -> the stage whose runs under the config's runs_dir it reads.
NEWEST_EXPORT = {"ppo": {"actor": "sft", "reward_model": "reward"}}


def resolve_newest_exports(stage: str, cfg: DictConfig) -> None:
    """Fill the null model paths that the stage would fill at run time with the newest export under its
    `runs_dir` (PPO's actor and reward model when the pipeline runs PPO without SFT or reward), in place.

    Resolved here, at planning, the path is part of the stage's config and key (its files counted by
    `input_files`): a newer `python -m sft` export re-runs the stage instead of leaving a PPO run
    trained from the older one "up to date". Roles filled by a hand-off are not null here.
    """
    for role, source in NEWEST_EXPORT.get(stage, {}).items():
        if cfg[role].name_or_path:  # given ("" counts as null, as in the stage)
            continue
        found = checkpoint.newest_export(cfg.runs_dir, source)
        if found is None:
            raise ConfigError(
                f"{stage}.{role}.name_or_path is null and there is no `{source}` export under "
                f"{cfg.runs_dir}/{source}/: add {source} to pipeline.stages, run `python -m {source}` first, "
                f"or give {stage}.{role}.name_or_path=DIR"
            )
        # as found: relative under a relative runs_dir (the stage runs in this working directory), so
        # moving the project keeps the key
        cfg[role].name_or_path = str(found)


def stage_key(
    stage: str, cfg: DictConfig, upstream_keys: dict[str, str], handoff: dict[str, str], world: str
) -> str:
    """sha256 of the resolved stage config (without UNHASHED parts), the keys of its inputs and the
    ranks it runs on (`world`: the global batch, and PPO's number of updates, scale with them).

    A handed-over model path (`handoff`: role -> the upstream export's path) counts by its stage's
    key, not its location, so a run directory that is moved or copied is still up to date; a path
    the user put in its place counts as itself, and so do its files (`input_files`).
    """
    plain = OmegaConf.to_container(cfg, resolve=True)
    for role, upstream in HANDOFF.get(stage, {}).items():
        if upstream in upstream_keys and plain[role]["name_or_path"] == handoff.get(role):
            plain[role]["name_or_path"] = f"<{upstream} export>"
    for dotted in UNHASHED:
        *parents, leaf = dotted.split(".")
        node = plain
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    content = {"stage": stage, "config": plain, "inputs": upstream_keys, "world": world}
    if files := input_files(plain):  # absent without local inputs, so such keys stay as they were
        content["files"] = files
    blob = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def input_files(plain: dict[str, Any]) -> dict[str, list[Any]]:
    """What a stage config reads from local paths (INPUT_KEYS), as `key=path` -> [size, mtime_ns] of a
    file, or [[relative path, size, mtime_ns], ...] of a directory's files (a model directory).

    Sizes and modification times, as make does: hashing contents would read a model's weights on
    every command. Copying an input without keeping its times therefore counts as a change, and
    re-runs the stages that read it. Hub names and `builtin` are not local paths and count as text.
    """
    found = {}
    for key, value in _flatten(plain):
        if key.rsplit(".", 1)[-1] not in INPUT_KEYS:
            continue
        for v in value if isinstance(value, list) else [value]:
            if not isinstance(v, str) or v in PLACEHOLDERS or not (p := Path(v)).exists():
                continue
            if p.is_dir():
                files = sorted(f for f in p.rglob("*") if f.is_file())
                found[f"{key}={v}"] = [[str(f.relative_to(p)), *_size_time(f)] for f in files]
            else:
                found[f"{key}={v}"] = _size_time(p)
    return found


def _size_time(f: Path) -> list[int]:
    st = f.stat()
    return [st.st_size, st.st_mtime_ns]


# ----------------------------------------------------------------------------- stage state


def finished_key(stage_dir: Path) -> str | None:
    """The key of the stage's complete export, or None when it has none."""
    return _finished_state(stage_dir).get("key")


def _finished_state(stage_dir: Path) -> dict[str, Any]:
    state = stage_dir / "export" / STAGE_STATE
    if not (state.is_file() and (stage_dir / "export" / EXPORT_INFO).is_file()):
        return {}
    return json.loads(state.read_text())


def started_key(stage_dir: Path) -> str | None:
    state = stage_dir / STAGE_STATE
    return json.loads(state.read_text())["key"] if state.is_file() else None


def plan_stage(stage_dir: Path, key: str, forced: bool) -> str:
    """skip | resume | run, from what `stage_dir` holds.

    A forced stage (pipeline.from_stage) runs again, unless this same command already ran it: in a
    sweep, the jobs share the stages before the swept keys, and the first job's re-run serves them all.
    """
    done = finished_key(stage_dir) == key
    command = os.environ.get(INVOCATION_ENV)
    ran_by_this_command = (
        done and command is not None and _finished_state(stage_dir).get("invocation") == command
    )
    if forced and not ran_by_this_command:
        return "run"
    if done:
        return "skip"
    if started_key(stage_dir) == key:
        return "resume"
    return "run"


def remove_stage_dir(stage_dir: Path) -> None:
    """Delete a stage directory the pipeline made (its `pipeline_stage.json` at the top or in `export/`,
    or nothing at all), renamed aside first so a crash mid-delete never leaves half a stage behind;
    a link (a sweep's, to its keyed stage) loses only the link.

    Anything else is refused: a `pipeline.name` or `hydra.run.dir` pointing at a directory that holds
    other files (`hydra.run.dir=.` in the project, whose `sft/` is source code) must not lose them.
    """
    for leftover in stage_dir.parent.glob(".*.removing-*"):  # what a crash mid-delete left
        shutil.rmtree(leftover, ignore_errors=True)
    if stage_dir.is_symlink():
        stage_dir.unlink()
        return
    markers = (STAGE_STATE, f".{STAGE_STATE}.tmp", f"export/{STAGE_STATE}")  # the .tmp: a crash writing it
    made = any((stage_dir / m).is_file() for m in markers)
    if not made and any(stage_dir.iterdir()):
        raise ConfigError(
            f"{stage_dir} exists and the pipeline did not make it (no {STAGE_STATE}): it would be replaced. "
            f"Choose another pipeline.name or hydra.run.dir, or move it away yourself"
        )
    trash = stage_dir.with_name(f".{stage_dir.name}.removing-{uuid.uuid4().hex[:8]}")
    stage_dir.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)  # a parallel sweep job may be clearing it as a leftover


@contextlib.contextmanager
def stage_lock(stage_dir: Path) -> Iterator[None]:
    """One process at a time per stage directory (parallel sweep jobs share SFT and reward)."""
    stage_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(stage_dir.parent / f".{stage_dir.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- launching


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


def ranks_per_node(launcher: DictConfig) -> int | None:
    """Processes per node the launcher starts for a stage; None: one plain process, no launcher. With a
    hostfile, without `launcher.num_gpus`, the launcher takes each host's slots instead (`launcher_args`)."""
    if launcher.hostfile and launcher.num_gpus:  # also from a node without GPUs (a login node)
        return launcher.num_gpus
    gpus = _gpus()
    if not gpus and launcher.num_procs <= 1 and not launcher.hostfile:
        return None
    return (launcher.num_gpus or gpus) if gpus else launcher.num_procs


def _visible_gpus_picked(launcher: DictConfig, options: argparse.Namespace | None) -> bool:
    """One GPU node whose GPUs CUDA_VISIBLE_DEVICES picks by number, with nothing else choosing them
    (`launcher.num_gpus` null, no hostfile; `options`: the extra launcher arguments as DeepSpeed reads
    them, or None). DeepSpeed's launcher then runs on exactly those GPUs itself, where `--num_gpus N`
    would make it drop the variable and take GPUs 0..N-1."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    numbers = bool(visible) and all(d.strip().isdigit() for d in visible.split(","))  # not GPU/MIG UUIDs
    free = options is None or (
        not (options.include or options.exclude) and options.num_nodes < 0 and options.num_gpus < 0
    )
    return numbers and free and launcher.num_gpus is None and not launcher.hostfile and _gpus() > 0


def _extra_options(launcher: DictConfig) -> argparse.Namespace | None:
    """`launcher.extra_args` as DeepSpeed's launcher reads them (None when there are none)."""
    if not launcher.extra_args:
        return None
    from core import deepspeed as ds

    options = ds.launcher_options([str(a) for a in launcher.extra_args])
    if options.hostfile != ds.launcher_options([]).hostfile:
        raise ConfigError(
            f"launcher.extra_args={list(launcher.extra_args)}: give the hostfile as launcher.hostfile (the "
            "pipeline checks it and counts its ranks at planning)"
        )
    return options


def launcher_args(launcher: DictConfig, procs: int, master_port: int | None = None) -> list[str]:
    """The `deepspeed` launcher's arguments for a stage (before `--module`): ranks per node, hostfile,
    port and `launcher.extra_args`. Without --num_gpus where the launcher should pick the devices: from
    a hostfile's slots (unless `launcher.num_gpus` is set), beside --include or --exclude (the launcher
    refuses both), and where CUDA_VISIBLE_DEVICES picks the GPUs (`_visible_gpus_picked`)."""
    options = _extra_options(launcher)
    filtered = options is not None and bool(options.include or options.exclude)
    slots = bool(launcher.hostfile) and launcher.num_gpus is None
    args = [] if filtered or slots or _visible_gpus_picked(launcher, options) else ["--num_gpus", str(procs)]
    if launcher.hostfile:
        args += ["--hostfile", launcher.hostfile]
    if master_port is not None:
        args += ["--master_port", str(master_port)]
    return [*args, *(str(a) for a in launcher.extra_args)]


def planned_world(launcher: DictConfig) -> int | None:
    """The number of ranks a stage will run on. With a hostfile or launcher arguments of its own, as
    DeepSpeed's launcher counts them from the stage's launcher arguments (`core.deepspeed.launcher_world`:
    hostfile slots, --include/--exclude, --num_nodes, --num_gpus); None where that cannot be told here
    (the stages check their batch sizes when they start). A hostfile that is not there is refused: the
    launcher would run every stage on this node alone."""
    procs = ranks_per_node(launcher)
    if procs is None:
        return 1  # a plain `python -m <stage>`
    if launcher.hostfile and not os.path.isfile(launcher.hostfile):
        raise ConfigError(
            f"launcher.hostfile={launcher.hostfile}: no such file (DeepSpeed's launcher would run every "
            "stage on this node alone)"
        )
    if not launcher.hostfile and not launcher.extra_args:
        return procs  # this node: --num_gpus procs, or the procs GPUs CUDA_VISIBLE_DEVICES names
    from core import deepspeed as ds

    return ds.launcher_world(launcher_args(launcher, procs))


def check_stage_world(stage: str, cfg: DictConfig, world: int) -> None:
    """The stage's settings that depend on the number of ranks (`<stage>.config.check_world`), at planning."""
    try:
        importlib.import_module(f"{stage}.config").check_world(cfg, world)
    except ConfigError as e:
        raise ConfigError(f"{stage}.{e} (the launcher starts {world} rank(s))") from e


def world_description(launcher: DictConfig) -> str:
    """The ranks a stage runs on, as its key counts them (`stage_key`)."""
    procs = ranks_per_node(launcher)
    if procs is None:
        return "1"
    if launcher.hostfile:  # its slots per node, unless launcher.num_gpus is set (`launcher_args`)
        from core import deepspeed as ds

        hosts = " ".join(f"{host}={slots}" for host, slots in ds.hostfile_slots(launcher.hostfile).items())
        text = f"{launcher.num_gpus or 'its slots'} per node, nodes of {launcher.hostfile} ({hosts})"
    else:
        text = f"{procs} per node"
    options = _extra_options(launcher)  # the extra launcher arguments that choose devices or nodes
    if options is not None:
        chosen = {"include": options.include, "exclude": options.exclude, "num_nodes": options.num_nodes,
                  "num_gpus": options.num_gpus}  # fmt: skip
        text += "".join(f", {k}={v}" for k, v in chosen.items() if v not in ("", -1))
    return text


def stage_command(stage: str, stage_dir: Path, launcher: DictConfig) -> list[str]:
    """`python -m <stage>` or `deepspeed ... --module <stage>`, reading the config written in stage_dir."""
    args = [
        "--config-dir", str(stage_dir.resolve()), "--config-name", STAGE_CONFIG,
        f"hydra.run.dir={stage_dir.resolve()}", f"hydra.job.name={stage}",
    ]  # fmt: skip
    procs = ranks_per_node(launcher)
    if procs is None:
        return [sys.executable, "-m", stage, *args]
    port = launcher.master_port or dist.free_port()
    return [str(Path(sys.executable).parent / "deepspeed"), *launcher_args(launcher, procs, port), "--module", stage,
            *args]  # fmt: skip


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # each stage is its own run with its own process group, and no pipeline command of its own
    launch = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RLHF_RUN_STAMP")
    for var in (*launch, INVOCATION_ENV):
        env.pop(var, None)
    return env


def run_stage(stage: str, cfg: DictConfig, key: str, stage_dir: Path, action: str, launcher: DictConfig,
              wandb_group: str, inputs: dict[str, str]) -> float:  # fmt: skip
    """Run one stage to its export (fresh or resumed); returns its wall time in seconds."""
    if action == "run" and stage_dir.exists():
        log.info("%s: removing %s (config changed or forced)", stage, stage_dir)
        remove_stage_dir(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.train.resume = action == "resume"
        cfg.logger.group = cfg.logger.group or wandb_group
        cfg.logger.job_type = stage
        cfg.logger.name = cfg.logger.name or f"{wandb_group}-{stage}"
    # the marker first: whatever a crash leaves in this directory from here on, the pipeline made it
    atomic_write_text(stage_dir / STAGE_STATE, json.dumps({"stage": stage, "key": key, "inputs": inputs}))
    atomic_write_text(stage_dir / f"{STAGE_CONFIG}.yaml", OmegaConf.to_yaml(cfg))
    cmd = stage_command(stage, stage_dir, launcher)
    log.info("%s: %s\n  $ %s", stage, "resuming" if action == "resume" else "running", " ".join(cmd))
    start = time.perf_counter()
    with open(stage_dir / "stage.log", "a") as out:
        proc = subprocess.run(cmd, env=_child_env(), stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "".join((stage_dir / "stage.log").read_text(errors="replace").splitlines(True)[-30:])
        # exit 2: the stage stopped on a setting to fix (core.cli.reported), its message in the tail
        error = ConfigError if proc.returncode == 2 else RuntimeError
        raise error(f"stage {stage} failed (exit {proc.returncode}); log: {stage_dir / 'stage.log'}\n{tail}")
    # the key goes with the export: a later run skips this stage when its key is the same
    state = {"stage": stage, "key": key, "inputs": inputs, "wall_s": wall, "resumed": action == "resume",
             "invocation": os.environ.get(INVOCATION_ENV)}  # fmt: skip
    atomic_write_text(stage_dir / "export" / STAGE_STATE, json.dumps(state, indent=2))
    return wall


# ----------------------------------------------------------------------------- the pipeline


class Pipeline:
    """Compose every stage first (typos fail before anything runs), then run, skip or resume each."""

    def __init__(self, cfg: DictConfig, run_dir: Path, shared_dir: Path | None):
        self.cfg = cfg
        self.run_dir = run_dir
        # in a sweep, stages live once under the sweep dir (keyed), and each job links to them
        self.shared_dir = shared_dir
        self.stages = list(cfg.pipeline.stages)
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages:
            raise ConfigError(
                f"pipeline.stages must be a non-empty list of {', '.join(STAGES)}; got {self.stages}"
            )
        if self.stages != sorted(set(self.stages), key=STAGES.index):  # each hands its export to the next
            raise ConfigError(
                f"pipeline.stages must keep the order {list(STAGES)}, once each; got {self.stages}"
            )
        frm = cfg.pipeline.from_stage
        if frm is not None and frm not in self.stages:
            raise ConfigError(f"pipeline.from_stage={frm!r} is not one of pipeline.stages {self.stages}")
        self.forced = set(self.stages[self.stages.index(frm) :]) if frm else set()
        name = cfg.pipeline.name
        self.group = cfg.pipeline.wandb_group or (name if run_dir.name == name else f"{name}-{run_dir.name}")

    def stage_dir(self, stage: str, key: str) -> Path:
        """Where the stage runs: <run dir>/<stage>, or in a sweep the keyed directory its jobs share."""
        if self.shared_dir is None:
            return self.run_dir / stage
        return self.shared_dir / f"{stage}-{key[:12]}"

    def link_stage(self, stage: str, target: Path) -> None:
        """In a sweep, <job dir>/<stage> becomes a link to the keyed stage directory."""
        link = self.run_dir / stage
        there = link.is_symlink() or link.exists()
        if self.shared_dir is None or (there and link.resolve() == target.resolve()):
            return
        if there:
            remove_stage_dir(link)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(target, self.run_dir))

    def retire_report(self) -> None:
        """Before a stage runs again: the run directory's report described the stages as they were, and
        would be left standing beside the new ones if this run failed (a sweep's summary would list it).
        The evaluation's cache (eval.json) stays: it is keyed by the PPO export it judged."""
        from core.report import REPORT_HTML, REPORT_JSON, REPORT_MD

        for name in (REPORT_JSON, REPORT_MD, REPORT_HTML):  # report.json first: the sweep summary reads it
            (self.run_dir / name).unlink(missing_ok=True)

    def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        # 1. plan: every stage's config, key and directory (a bad key fails here, before any training)
        keys: dict[str, str] = {}
        dirs: dict[str, Path] = {}
        plans = []
        world = planned_world(self.cfg.launcher)
        for stage in self.stages:
            handoff = {role: str((dirs[up] / "export").resolve())
                       for role, up in HANDOFF.get(stage, {}).items() if up in dirs}  # fmt: skip
            inputs = {u: keys[u] for u in UPSTREAM[stage] if u in keys}
            stage_cfg = compose_stage(
                stage, OmegaConf.to_container(self.cfg[stage]), handoff, self.cfg.data_root
            )
            resolve_newest_exports(stage, stage_cfg)
            if world is not None:
                check_stage_world(stage, stage_cfg, world)
            keys[stage] = stage_key(stage, stage_cfg, inputs, handoff, world_description(self.cfg.launcher))
            dirs[stage] = self.stage_dir(stage, keys[stage])
            plans.append((stage, stage_cfg, inputs))
        if "ppo" in keys and self.cfg.eval.enabled:  # the evaluation after PPO: its settings now, too
            from core import evaluate

            evaluate.check_eval(self.cfg.eval, next(c for s, c, _ in plans if s == "ppo").data)
        for stage in self.stages:  # only once every stage composed: a typo in a later one changes nothing
            self.link_stage(stage, dirs[stage])
        # 2. run, resume or skip each stage in order
        status: dict[str, dict[str, Any]] = {}
        for stage, stage_cfg, inputs in plans:
            with stage_lock(dirs[stage]):
                action = plan_stage(dirs[stage], keys[stage], stage in self.forced)
                if action == "skip":
                    log.info("%s: up to date in %s (key %s); skipped", stage, dirs[stage], keys[stage][:12])
                    wall = 0.0
                else:
                    self.retire_report()
                    wall = run_stage(stage, stage_cfg, keys[stage], dirs[stage], action, self.cfg.launcher,
                                     self.group, inputs)  # fmt: skip
            state = json.loads((dirs[stage] / "export" / STAGE_STATE).read_text())
            status[stage] = {"action": action, "wall_s": wall, "stage_wall_s": state["wall_s"],
                             "dir": str(dirs[stage]), "key": keys[stage]}  # fmt: skip
        return {"stages": status, "stage_dirs": dirs, "start": start}


def _sweep_dir() -> Path | None:
    hc = HydraConfig.get()
    return Path(hc.sweep.dir) / "stages" if hc.mode == RunMode.MULTIRUN else None


# conf/ as a directory (not a module path), so the console script finds it from any working directory
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(config_path=CONF_DIR, config_name="pipeline", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, Any]:
    from core import report
    from core.cli import reported

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with reported("pipeline"):  # a setting to fix (a key, a value, a missing export): its message alone
        result = Pipeline(cfg, run_dir, _sweep_dir()).run()
        return report.finish(cfg, run_dir, result)


def cli(argv: list[str]) -> None:
    """`rlhf pipeline ARGS`: Hydra's command line, with stage keys routed to the stage nodes."""
    from omegaconf import OmegaConf as _O

    _O.register_new_resolver("run_now", lambda pattern: time.strftime(pattern), replace=True)
    # this command's id (pipeline.from_stage); the jobs a sweep launcher starts inherit it
    os.environ[INVOCATION_ENV] = uuid.uuid4().hex
    from core.cli import refuse_secret_overrides, reported

    refuse_secret_overrides(argv)  # before Hydra saves the command line in the run's directory
    with reported("pipeline"):
        sys.argv = [sys.argv[0], *stage_overrides_argv(argv)]
    main()


if __name__ == "__main__":
    cli(sys.argv[1:])
