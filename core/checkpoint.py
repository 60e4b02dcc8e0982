"""Checkpoints (for resume) and exports (for users and later stages), both written atomically.

Layout under a run directory:

    checkpoints/step-00000040/   DeepSpeed shards of every rank + trainer_state.json + rng_rank*.pt
                   .../universal  DeepSpeed's universal copy, once a resume under another rank count needed it
    checkpoints/latest           the tag of the newest complete checkpoint (one line)
    export/                      Hugging Face model (or peft adapter) + tokenizer + export_info.json

A checkpoint is written to `.tmp-step-N/`, forced to disk, and renamed into place only when every
rank has finished, then `latest` is replaced atomically; an export is written to `export.tmp/` and
swapped in. A crash at any moment, a power cut included, leaves the previous complete checkpoint
(or export: in `export.old/` for the instant between the swap's two renames) readable.
Several nodes must share the run directory's filesystem.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from core import deepspeed as ds
from core import dist, models

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
# DeepSpeed's universal copy of an engine's checkpoint, beside its shards, for another rank count
UNIVERSAL = "universal"
EXPORT_INFO = "export_info.json"
# Written beside a reward model's export: its score mean / std on the eval set (PPO normalises with them).
REWARD_STATS = "reward_stats.json"
# DeepSpeed's per-rank ZeRO files: each rank's share of the optimizer state (ZeRO-3: of the weights too),
# named `bf16_zero_pp_rank_*` when the engine ran in bf16 (the GPU default).
ZERO_SHARDS = "*zero_pp_rank_*"


def atomic_write_text(path: Path, text: str) -> None:
    """Write `path` whole or not at all, durably: a temporary file, synced, renamed over it, and the
    rename synced (its directory), so a power cut leaves the old text or the new, never neither."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_tree(path: Path) -> None:
    """Force every file under `path`, and the directories themselves, to disk (so that a power cut
    after a rename cannot leave the renamed name pointing at empty or short files).

    Every rank runs it over the checkpoint directory while the others may still be writing there: a
    file that vanishes between the listing and the open is another rank's temporary, renamed into
    place by a writer (safetensors' `save_file` writes `.tmpXXXX` first), which syncs its own files.
    """
    for d, _, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(d, name), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(d))


def fsync_dir(path: Path) -> None:
    """Make the renames inside a directory durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    """This process's RNG streams: Python's, torch's CPU one and its current GPU's (not every GPU's:
    a resume may see a different set of devices per process)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        if "cuda_device" in state:
            torch.cuda.set_rng_state(state["cuda_device"])
        elif len(state.get("cuda", ())) == torch.cuda.device_count():  # older checkpoints: every GPU's
            torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    engines,
    run_dir: Path,
    step: int,
    trainer_state: dict[str, Any],
    keep: int,
    rank_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save model, optimizer, scheduler (DeepSpeed), RNG of every rank and trainer state at `step`.

    `engines` is one engine, or {name: engine} for a stage that trains several (PPO's actor and
    critic, each in its own subdirectory). `rank_tensors` are this rank's extra tensors (e.g. its
    shard of an EMA), saved as safetensors. Collective. Returns the final checkpoint directory.
    Keeps the newest `keep` checkpoints.
    """
    root = run_dir / CHECKPOINTS
    tag = f"step-{step:08d}"
    tmp = root / f".tmp-{tag}"
    if dist.is_main():
        # what a crash while saving (any step's) or deleting left; saves are collective, one at a time
        for leftover in (*root.glob(".tmp-step-*"), *root.glob(".trash-*")):
            shutil.rmtree(leftover, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    if isinstance(engines, dict):
        for name, engine in engines.items():
            ds.save_checkpoint(engine, str(tmp), name)
    else:
        ds.save_checkpoint(engines, str(root), tmp.name)
    tmp.mkdir(parents=True, exist_ok=True)  # ranks that hold no shard (ZeRO-0/1/2, rank > 0) write RNG too
    torch.save(rng_state(), tmp / f"rng_rank{dist.rank()}.pt")
    if rank_tensors:
        save_file({k: v.detach().contiguous().cpu() for k, v in rank_tensors.items()},
                  tmp / f"tensors_rank{dist.rank()}.safetensors")  # fmt: skip
    fsync_tree(tmp)
    dist.barrier()  # every rank's shards are on disk
    final = root / tag
    if dist.is_main():
        stages = {name: ds.zero_stage(engine) for name, engine in _named(engines).items()}
        layout = {"step": step, "world_size": dist.world_size(), "zero_stages": stages}
        atomic_write_text(tmp / TRAINER_STATE, json.dumps({**trainer_state, **layout}))
        _remove(final)  # a checkpoint of this step from an earlier run in this directory
        os.replace(tmp, final)
        fsync_dir(root)
        atomic_write_text(root / LATEST, tag + "\n")
        fsync_dir(root)
        _prune(root, step, keep)
    dist.barrier()
    return final


def _prune(root: Path, step: int, keep: int) -> None:
    """Keep the newest `keep` checkpoints up to `step` (the one just written counts); `keep` <= 0
    keeps all. Checkpoints of later steps, left in this directory by an earlier run, are not this
    run's to delete: they stay (a step-number sort would otherwise delete the one just written)."""
    if keep <= 0:
        return
    steps = {p: _step_of(p) for p in root.glob("step-*") if p.is_dir()}
    mine = sorted(p for p, n in steps.items() if n is not None and n <= step)
    later = sorted(p.name for p, n in steps.items() if n is not None and n > step)
    if later:
        log.warning("checkpoints of later steps, from an earlier run, stay in %s: %s", root, ", ".join(later))
    for old in mine[:-keep]:
        _remove(old)


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint directory, renamed aside first: a crash mid-delete must not leave a `step-*`
    whose trainer state says complete while shards are gone (the next save clears the `.trash-*`)."""
    trash = checkpoint.with_name(f".trash-{checkpoint.name}-{uuid.uuid4().hex[:8]}")
    if checkpoint.exists():
        os.replace(checkpoint, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _step_of(path: Path) -> int | None:
    try:
        return int(path.name.removeprefix("step-"))
    except ValueError:
        return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None. Ignores half-written `.tmp-*` dirs."""
    root = run_dir / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / TRAINER_STATE).is_file():
            return candidate
    complete = sorted(p for p in root.glob("step-*") if (p / TRAINER_STATE).is_file())
    return complete[-1] if complete else None


def _named(engines) -> dict[str, Any]:
    """{name: engine}: a stage's engines by the subdirectory their shards sit in, or {"model": engine}."""
    return engines if isinstance(engines, dict) else {"model": engines}


def resume_layout_error(saved_world: int, saved_stage: int | None, world: int, stage: int) -> str | None:
    """Why DeepSpeed cannot restore a checkpoint written by `saved_world` ranks at ZeRO stage
    `saved_stage` (None: one of 1-3, from a checkpoint that did not record it) into `world` ranks at
    `stage`, or None when it can.

    Stage 0 saves the whole weights and optimizer state, which load under any rank count. ZeRO-1/2/3
    save each rank's share of the optimizer state (ZeRO-3 also of the weights): DeepSpeed reads them
    directly only under the rank count that wrote them, and under another through a universal copy
    (`needs_universal`); stage 0 does not read them at all. Measured with the built-in SFT: two ranks
    under ZeRO-2 -> one (which runs ZeRO-2 as stage 0, `core.deepspeed.effective_stage`) stopped on an
    AttributeError inside torch's optimizer; one rank -> two under ZeRO-0, and two ranks under ZeRO-1
    -> two under ZeRO-2, resumed; so did two ranks -> one under ZeRO-3 and two -> three under ZeRO-2
    through the universal copy (before it, DeepSpeed stopped on its world-size error).
    """
    partitioned = saved_stage is None or saved_stage > 0
    if partitioned != (stage > 0):
        return ("stage 0 reads whole optimizer state and ZeRO-1/2/3 each rank's share of it; a checkpoint "
                "holds one or the other")  # fmt: skip
    if saved_stage is not None and 3 in (saved_stage, stage) and saved_stage != stage:
        return "a ZeRO-3 checkpoint holds each rank's share of the weights, a ZeRO-1/2 one the whole weights"
    if partitioned and saved_world != world and saved_stage is None:
        return ("the checkpoint does not record its ZeRO stage, which the universal copy that shares ZeRO "
                "state out to another rank count needs")  # fmt: skip
    return None


def needs_universal(saved_world: int, saved_stage: int | None, world: int, stage: int) -> bool:
    """Whether a checkpoint loads through DeepSpeed's universal copy (`universal_copy`): per-rank ZeRO
    state written by another rank count, at a stage of the same kind (ZeRO-1/2 to 1/2, 3 to 3)."""
    return (
        saved_world != world
        and saved_stage is not None
        and saved_stage > 0
        and stage > 0
        and (saved_stage == 3) == (stage == 3)
    )


def universal_copy(engine_dir: Path, poll_s: float = 1.0) -> Path:
    """`<engine_dir>/universal`: DeepSpeed's universal copy of the engine checkpoint in `engine_dir`,
    which any rank count can load, written by rank 0 the first time it is needed. Collective.

    Written beside the shards, so it goes when its checkpoint is pruned; it takes about as much disk
    as the checkpoint's ZeRO state (twice that while converting). Converted into a temporary
    directory and renamed into place, so a crash during the conversion leaves no half-written copy.
    The other ranks wait on the shared filesystem, not in a collective: converting a large model can
    outlast the process group's timeout. If rank 0's conversion fails, it leaves a note that stops
    them too, named for this attempt so that an older failure's note is not read.
    """
    final = engine_dir / UNIVERSAL
    attempt = dist.all_gather_object(uuid.uuid4().hex if dist.is_main() else None)[0]
    failed = engine_dir / f".{UNIVERSAL}.failed-{attempt}"
    if dist.is_main() and not final.is_dir():
        tmp = engine_dir / f".{UNIVERSAL}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for old in engine_dir.glob(f".{UNIVERSAL}.failed-*"):
            old.unlink()
        started = time.perf_counter()
        try:
            ds.to_universal(str(engine_dir), str(tmp))
            fsync_tree(tmp)
            os.replace(tmp, final)
            fsync_dir(engine_dir)
        except BaseException as e:
            atomic_write_text(failed, f"{type(e).__name__}: {e}"[-4000:])
            raise
        log.info(
            "resume: wrote DeepSpeed's universal copy %s in %.1f s", final, time.perf_counter() - started
        )
    while not final.is_dir():
        if failed.is_file():
            raise RuntimeError(f"rank 0 could not write {final}: {failed.read_text()}")
        time.sleep(poll_s)
    dist.barrier()
    return final


def check_resume_layout(engines, checkpoint: Path, state: dict[str, Any]) -> None:
    """Stop with what to do, before DeepSpeed's own error, when the checkpoint's ranks and ZeRO stages
    cannot be restored into this run's (see `resume_layout_error`)."""
    saved_world = state.get("world_size", dist.world_size())
    world = dist.world_size()
    for name, engine in _named(engines).items():
        # older checkpoints did not record their stages: per-rank ZeRO files mean one of 1-3
        shards = any((checkpoint / name if isinstance(engines, dict) else checkpoint).glob(ZERO_SHARDS))
        saved = state.get("zero_stages", {}).get(name, None if shards else 0)
        stage = ds.zero_stage(engine)
        why = resume_layout_error(saved_world, saved, world, stage)
        if why is None:
            continue
        written = f"ZeRO stage {saved}" if saved is not None else "a ZeRO stage of 1-3"
        what = [f"resume it with {saved_world} rank(s) and the deepspeed config that wrote it"]
        if saved == 0:
            what.append("at stage 0 under any rank count (deepspeed=zero0; PPO: deepspeed@actor_ds=zero0 "
                        "deepspeed@critic_ds=zero0)")  # fmt: skip
        what.append("start a new run")
        single = ""
        if 1 in (saved_world, world) and 0 in (saved, stage):
            single = (
                " (A single fp32 rank runs a ZeRO-1/2 config at stage 0: core.deepspeed.effective_stage.)"
            )
        where = f"{checkpoint} ({name})" if isinstance(engines, dict) else str(checkpoint)
        raise ds.ConfigError(
            f"train.resume: {where} was written by {saved_world} rank(s) at {written}, and this run has "
            f"{world} rank(s) at ZeRO stage {stage}: {why}. To go on, {'; or '.join(what)}.{single}"
        )


def load_checkpoint(engines, checkpoint: Path) -> dict[str, Any]:
    """Restore engine(s) (model, optimizer, scheduler) and this rank's RNG; returns the trainer state.

    The state gains `rank_tensors` when this rank saved extra tensors (same world size only).
    """
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    check_resume_layout(engines, checkpoint, state)
    saved_world = state.get("world_size", dist.world_size())
    for name, engine in _named(engines).items():
        # DeepSpeed's (load_dir, tag): PPO's engines sit in subdirectories named after them
        load_dir, tag = (
            (checkpoint, name) if isinstance(engines, dict) else (checkpoint.parent, checkpoint.name)
        )
        saved_stage = state.get("zero_stages", {}).get(name)
        if needs_universal(saved_world, saved_stage, dist.world_size(), ds.zero_stage(engine)):
            log.info(
                "resume: %s was written by %d rank(s) at ZeRO stage %d; this run has %d: loading it through "
                "DeepSpeed's universal checkpoint", load_dir / tag, saved_world, saved_stage, dist.world_size(),
            )  # fmt: skip
            uni = universal_copy(load_dir / tag)
            ds.load_universal_checkpoint(engine, str(uni.parent), uni.name)
        else:
            ds.load_checkpoint(engine, str(load_dir), tag)
    rng_file = checkpoint / f"rng_rank{dist.rank()}.pt"
    if state.get("world_size") != dist.world_size():
        log.warning("resume: world size changed (%s -> %d); RNG streams restart and per-rank tensors are "
                    "not restored", state.get("world_size"), dist.world_size())  # fmt: skip
    elif not rng_file.is_file():
        log.warning("resume: %s is missing; this rank's RNG streams restart", rng_file)
    else:
        set_rng_state(torch.load(rng_file, weights_only=True))
        tensors = checkpoint / f"tensors_rank{dist.rank()}.safetensors"
        if tensors.is_file():
            state["rank_tensors"] = load_file(tensors)
    return state


def resume(engines, run_dir: Path) -> int:
    """Restore the newest complete checkpoint of `run_dir` into the engine(s); returns its step (0 if none)."""
    return resume_state(engines, run_dir).get("step", 0)


def resume_state(engines, run_dir: Path) -> dict[str, Any]:
    """Like `resume`, returning the whole trainer state ({} when there is no checkpoint)."""
    found = latest_checkpoint(run_dir)
    if found is None:
        log.warning("resume: no complete checkpoint in %s; starting from step 0", run_dir)
        return {}
    state = load_checkpoint(engines, found)
    log.info("resume: continuing from %s (step %d)", found, state["step"])
    return state


# ----------------------------------------------------------------------------- export


def newest_export(runs_dir: str | Path, stage: str) -> Path | None:
    """The newest complete export of a stage's runs (`<runs_dir>/<stage>/*/export`), or None.

    A run that crashed between the two renames of `_swap_in` has its previous export in `export.old`
    and no `export`: that one counts.
    """
    found = list(Path(runs_dir, stage).glob(f"*/export/{EXPORT_INFO}"))
    found += [p for p in Path(runs_dir, stage).glob(f"*/export.old/{EXPORT_INFO}")
              if not (p.parent.parent / "export").exists()]  # fmt: skip
    found.sort(key=lambda p: p.stat().st_mtime)
    return found[-1].parent if found else None


def model_reference(name_or_path: str, export_dir: Path) -> dict[str, str]:
    """How an export records a model it came from (`export_info.json`): a local directory absolute
    (`path`, for a command run from anywhere) and relative to the export (`from_export`, for a tree
    moved or copied whole); a hub id as it is."""
    if not Path(name_or_path).exists():
        return {"path": name_or_path}
    local = Path(name_or_path).resolve()
    return {"path": str(local), "from_export": os.path.relpath(local, export_dir.resolve())}


def resolve_reference(recorded: str | dict[str, str], export_dir: Path) -> str:
    """The model an export's `export_info.json` records (`model_reference`): beside the export where the
    tree moved with it, else where it was (older exports recorded the path as it was given)."""
    if isinstance(recorded, str):
        return recorded
    moved = Path(export_dir, recorded["from_export"]) if "from_export" in recorded else None
    return str(moved.resolve()) if moved is not None and moved.exists() else recorded["path"]


def export_model(
    engine,
    tokenizer,
    out_dir: Path,
    *,
    merge_lora: bool,
    info: dict[str, Any],
    extra_files: dict[str, str] | None = None,
) -> None:
    """Write the trained model in Hugging Face format to `out_dir` (collective; rank 0 writes).

    Full fine-tuning: `from_pretrained`-ready weights (safetensors) + tokenizer.
    LoRA: the peft adapter (`PeftModel.from_pretrained`), the base weights in `base/` when the base
    came from a config rather than a loadable path, and with merge_lora the merged model in `merged/`.
    `extra_files` (name -> text) are written beside the model. Works for any head (LM or score).
    """
    state = ds.full_state_dict(engine)  # ZeRO-3: gathered into rank 0 here
    if dist.is_main():
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model = _cpu_copy(engine.module, state)
        peft = model.peft_config["default"] if isinstance(model, PeftModel) else None
        # the adapter needs its base, and a base built from a config exists nowhere else; nor does one that
        # was itself a LoRA export merged on loading (`models.merged_adapter_export`): it goes in base/
        own_base = peft is not None and (
            not peft.base_model_name_or_path or models.is_adapter_export(peft.base_model_name_or_path)
        )
        if own_base:  # where peft's loaders (`AutoPeftModelForCausalLM`) look for it
            peft.base_model_name_or_path = str(out_dir.resolve() / "base")
        elif peft is not None:  # a base given as a relative local path would be read from the loader's cwd
            base = model_reference(peft.base_model_name_or_path, out_dir)
            peft.base_model_name_or_path = base["path"]
            # and relative to the export, so a tree moved or copied whole merges into its own copy of the base
            info = {**info, "adapter_base": base}
        # with its own base/ (whose embeddings are the run's, grown or not), the adapter needs no copy of them
        model.save_pretrained(tmp, **({"save_embedding_layers": False} if own_base else {}))
        tokenizer.save_pretrained(tmp)
        if peft is not None:
            if own_base:
                _save_plain(copy.deepcopy(model).unload(), tokenizer, tmp / "base")
            if merge_lora:
                _save_plain(copy.deepcopy(model).merge_and_unload(), tokenizer, tmp / "merged")
        for name, text in (extra_files or {}).items():  # e.g. reward statistics, inside the atomic swap
            (tmp / name).write_text(text, encoding="utf-8")
        atomic_write_text(tmp / EXPORT_INFO, json.dumps(info, indent=2))
        fsync_tree(tmp)
        _swap_in(tmp, out_dir)
        log.info("exported to %s", out_dir)
    dist.barrier()


def _cpu_copy(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain CPU model of the same class and config holding `state` (built outside ZeRO-3 init)."""
    dtype = next(iter(state.values())).dtype
    with ds.zero3_init_disabled():
        if isinstance(module, PeftModel):
            base = module.get_base_model()
            cpu = get_peft_model(
                type(base)(copy.deepcopy(base.config)), copy.deepcopy(module.peft_config["default"])
            )
        else:
            cpu = type(module)(copy.deepcopy(module.config))
    # a model built from its config gets a generation config made from it alone: keep the one loaded with
    # the model (a chat model's several EOS ids, its sampling defaults) in the export
    source, target = (m.get_base_model() if isinstance(m, PeftModel) else m for m in (module, cpu))
    if getattr(source, "generation_config", None) is not None:
        target.generation_config = copy.deepcopy(source.generation_config)
    cpu.to(dtype)
    cpu.load_state_dict(state)
    return cpu


def _save_plain(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace `final` by `tmp`. Between the two renames only `<final>.old` holds the previous export
    (`newest_export` reads it there); a crashed swap left it too, and it goes once `tmp` is in place."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
