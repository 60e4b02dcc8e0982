import json
import shutil
from pathlib import Path

import pytest

from core import checkpoint
from core.checkpoint import (
    EXPORT_INFO,
    LATEST,
    TRAINER_STATE,
    atomic_write_text,
    check_resume_layout,
    latest_checkpoint,
    load_checkpoint,
    needs_universal,
    newest_export,
    resume_layout_error,
    save_checkpoint,
)
from core.deepspeed import ConfigError


def make_ckpt(root, name, complete=True):
    d = root / "checkpoints" / name
    d.mkdir(parents=True)
    (d / "shard.pt").write_text("x")
    if complete:
        (d / TRAINER_STATE).write_text(json.dumps({"step": 1}))
    return d


def test_latest_ignores_half_written_checkpoints(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    good = make_ckpt(tmp_path, "step-00000010")
    make_ckpt(tmp_path, ".tmp-step-00000020", complete=False)  # a crash mid-save
    atomic_write_text(tmp_path / "checkpoints" / LATEST, "step-00000010\n")
    assert latest_checkpoint(tmp_path) == good
    # a pointer to something incomplete falls back to the newest complete checkpoint
    make_ckpt(tmp_path, "step-00000030", complete=False)
    atomic_write_text(tmp_path / "checkpoints" / LATEST, "step-00000030\n")
    assert latest_checkpoint(tmp_path) == good


def test_atomic_write_leaves_no_temporary(tmp_path):
    atomic_write_text(tmp_path / "f", "one")
    atomic_write_text(tmp_path / "f", "two")
    assert (tmp_path / "f").read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads fd paths from /proc (Linux)")
def test_atomic_write_syncs_the_file_then_its_rename(tmp_path, monkeypatch):
    """A checkpoint's trainer_state.json is renamed inside the checkpoint's temporary directory just
    before that directory is renamed into place: the inner rename must be on disk first."""
    import core.checkpoint as ckpt

    synced = []
    real_fsync = ckpt.os.fsync
    monkeypatch.setattr(ckpt.os, "fsync", lambda fd: (synced.append(ckpt.os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))  # fmt: skip
    atomic_write_text(tmp_path / "f", "one")
    assert synced == [str(tmp_path / ".f.tmp"), str(tmp_path)]  # the data, then the directory entry


@pytest.mark.parametrize(
    "saved_world, saved_stage, world, stage, ok, universal",
    [
        (1, 0, 1, 0, True, False),
        (1, 0, 2, 0, True, False),  # whole optimizer state loads under any rank count
        (2, 1, 2, 2, True, False),  # ZeRO-1 and 2 share their checkpoint layout
        (2, 3, 2, 3, True, False),
        (2, 2, 4, 2, True, True),  # per-rank ZeRO state for another rank count: through the universal copy
        (2, 1, 3, 2, True, True),
        (2, 3, 1, 3, True, True),
        (1, 0, 2, 2, False, False),  # one fp32 rank ran its ZeRO-2 config at stage 0
        (2, 2, 1, 0, False, False),  # ... and the other way round
        (2, None, 1, 0, False, False),  # an older checkpoint with per-rank ZeRO files
        (2, None, 4, 2, False, False),  # ... which does not say which kind of copy to make
        (2, 2, 2, 3, False, False),
        (2, 2, 4, 3, False, False),
    ],
)
def test_resume_layouts_deepspeed_cannot_restore_are_named(
    saved_world, saved_stage, world, stage, ok, universal
):
    assert (resume_layout_error(saved_world, saved_stage, world, stage) is None) == ok
    assert needs_universal(saved_world, saved_stage, world, stage) == universal


class FakeEngine:
    def __init__(self, stage):
        self.stage = stage

    def zero_optimization_stage(self):
        return self.stage


def test_a_checkpoint_from_another_rank_count_stops_with_what_to_do(tmp_path):
    # this test process is one rank; the checkpoint was written by two under ZeRO-2
    ckpt = make_ckpt(tmp_path, "step-00000010")
    state = {"step": 10, "world_size": 2, "zero_stages": {"model": 2}}
    with pytest.raises(
        ConfigError, match=r"2 rank\(s\) at ZeRO stage 2, and this run has 1 rank\(s\) at ZeRO stage 0"
    ):
        check_resume_layout(FakeEngine(0), ckpt, state)
    # a checkpoint that did not record its stages: DeepSpeed's per-rank ZeRO files tell
    (ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_text("x")
    with pytest.raises(ConfigError, match="a ZeRO stage of 1-3.*resume it with 2 rank"):
        check_resume_layout(FakeEngine(0), ckpt, {"step": 10, "world_size": 2})
    # PPO's engines, each in its own subdirectory: the one that cannot be restored is named (here a bf16
    # run's files, as DeepSpeed names them on GPUs)
    (ckpt / "critic").mkdir()
    (ckpt / "critic" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_text("x")
    with pytest.raises(ConfigError, match=r"\(critic\) was written by 1 rank\(s\) at a ZeRO stage of 1-3"):
        check_resume_layout(
            {"actor": FakeEngine(0), "critic": FakeEngine(0)}, ckpt, {"step": 10, "world_size": 1}
        )
    # a stage-0 checkpoint goes on under more ranks at stage 0, and the same layout always does
    check_resume_layout(FakeEngine(0), ckpt, {"step": 10, "world_size": 1, "zero_stages": {"model": 0}})
    check_resume_layout(FakeEngine(3), ckpt, {"step": 10, "world_size": 1, "zero_stages": {"model": 3}})


class StubEngine:
    """What save_checkpoint asks of a DeepSpeed engine: its shards under save_dir/tag, and its stage."""

    def save_checkpoint(self, save_dir, tag, save_latest):
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / tag / "shard.pt").write_text("x")

    def zero_optimization_stage(self):
        return 0


def test_pruning_keeps_the_checkpoint_just_written_beside_an_earlier_runs_later_ones(tmp_path):
    # an earlier run in the same directory got to steps 75 and 100; a fresh run saves at 25, 50, 75
    for step in (75, 100):
        make_ckpt(tmp_path, f"step-{step:08d}")
    engines = {"actor": StubEngine()}
    for step in (25, 50):
        final = save_checkpoint(engines, tmp_path, step, {}, keep=2)
        assert (final / TRAINER_STATE).is_file() and latest_checkpoint(tmp_path) == final
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert names == ["step-00000025", "step-00000050", "step-00000075", "step-00000100"]
    save_checkpoint(engines, tmp_path, 75, {}, keep=2)  # replaces the earlier run's 75, prunes 25
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert names == ["step-00000050", "step-00000075", "step-00000100"]
    assert json.loads((tmp_path / "checkpoints" / "step-00000075" / TRAINER_STATE).read_text())["step"] == 75
    assert latest_checkpoint(tmp_path).name == "step-00000075"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_a_crash_while_deleting_a_checkpoint_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    engines, root = {"actor": StubEngine()}, tmp_path / "checkpoints"
    for step in (25, 50):
        save_checkpoint(engines, tmp_path, step, {}, keep=0)
    rmtree = shutil.rmtree

    def crash_part_way(path, ignore_errors=False):
        (Path(path) / "actor" / "shard.pt").unlink()  # one shard gone, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", crash_part_way)
    with pytest.raises(KeyboardInterrupt):
        checkpoint._prune(root, 50, keep=1)  # deleting step 25
    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)
    # no step-* lost a shard while keeping the trainer state that marks it complete
    assert [p.name for p in sorted(root.glob("step-*"))] == ["step-00000050"]
    assert (root / "step-00000050" / "actor" / "shard.pt").is_file()
    save_checkpoint(engines, tmp_path, 75, {}, keep=1)  # the next save clears what the crash left
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000075"]


def test_newest_export_reads_the_previous_export_left_by_a_crashed_swap(tmp_path):
    def export(run, name):
        d = tmp_path / "sft" / run / name
        d.mkdir(parents=True)
        (d / EXPORT_INFO).write_text("{}")
        return d

    older = export("a", "export")
    assert newest_export(tmp_path, "sft") == older
    # run b crashed between renaming export -> export.old and export.tmp -> export
    crashed = export("b", "export.old")
    export("b", "export.tmp")
    assert newest_export(tmp_path, "sft") == crashed
    # once its swap completes, its new export is the one, and export.old is not considered
    swapped = export("b", "export")
    assert newest_export(tmp_path, "sft") == swapped


def test_another_rank_count_loads_each_engine_through_one_universal_copy(tmp_path, monkeypatch):
    """Rank 0 converts each engine's shards once, into `<engine dir>/universal` (PPO: actor/, critic/),
    over a stale temporary left by a crash; a later resume reuses the copy; a failed conversion leaves a
    note that stops the other ranks too."""
    from core import deepspeed as ds

    ckpt = make_ckpt(tmp_path, "step-00000010")
    state = {"step": 10, "world_size": 2, "zero_stages": {"actor": 3, "critic": 3}}
    (ckpt / TRAINER_STATE).write_text(json.dumps(state))
    for name in ("actor", "critic"):
        (ckpt / name).mkdir()
        (ckpt / name / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_text("x")
    (ckpt / "actor" / ".universal.tmp").mkdir()  # a conversion cut short
    (ckpt / "actor" / ".universal.tmp" / "half").write_text("x")
    converted, loaded = [], []

    def to_universal(src, out):
        converted.append(
            (src, Path(out).name, sorted(p.name for p in Path(out).iterdir()) if Path(out).exists() else [])
        )
        (Path(out) / "zero").mkdir(parents=True)

    monkeypatch.setattr(ds, "to_universal", to_universal)
    monkeypatch.setattr(ds, "load_universal_checkpoint", lambda e, d, tag: loaded.append((e.stage, d, tag)))
    monkeypatch.setattr(
        ds, "load_checkpoint", lambda *a: pytest.fail("a direct load of another rank count's shards")
    )
    engines = {"actor": FakeEngine(3), "critic": FakeEngine(3)}
    assert load_checkpoint(engines, ckpt)["step"] == 10
    assert converted == [
        (str(ckpt / "actor"), ".universal.tmp", []),
        (str(ckpt / "critic"), ".universal.tmp", []),
    ]
    assert loaded == [(3, str(ckpt / "actor"), "universal"), (3, str(ckpt / "critic"), "universal")]
    assert sorted(p.name for p in (ckpt / "actor").iterdir() if p.is_dir()) == ["universal"]
    load_checkpoint(engines, ckpt)
    assert len(converted) == 2 and len(loaded) == 4  # the copies are reused

    one = make_ckpt(tmp_path, "step-00000020")  # one engine: its shards sit in the step directory itself
    (one / TRAINER_STATE).write_text(json.dumps({"step": 20, "world_size": 4, "zero_stages": {"model": 2}}))

    def fails(src, out):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ds, "to_universal", fails)
    with pytest.raises(RuntimeError, match="disk full"):
        load_checkpoint(FakeEngine(2), one)
    (note,) = one.glob(".universal.failed-*")
    assert "disk full" in note.read_text() and not (one / "universal").exists()
    monkeypatch.setattr(ds, "to_universal", to_universal)
    load_checkpoint(FakeEngine(1), one)  # ZeRO-2 shards into ZeRO-1 under another rank count
    assert loaded[-1] == (1, str(one), "universal") and not list(one.glob(".universal.failed-*"))


def test_fsync_tree_skips_a_file_another_rank_renamed_away(tmp_path, monkeypatch):
    """Every rank syncs the whole checkpoint directory while the others may still write there, and
    safetensors writes a `.tmpXXXX` file first: one listed and then renamed must not fail the save (it
    did, on two ranks saving EMA shards)."""
    import os

    from core import checkpoint

    (tmp_path / "tensors_rank0.safetensors").write_text("x")
    listing = [(str(tmp_path), [], ["tensors_rank0.safetensors", ".tmpcssYtm"])]  # the second is gone
    monkeypatch.setattr(checkpoint.os, "walk", lambda path: iter(listing))
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    checkpoint.fsync_tree(tmp_path)
    assert len(synced) == 2  # the file that is there, and the directory


def test_an_export_finds_its_reference_from_any_directory_and_after_the_tree_moves(tmp_path, monkeypatch):
    from core.checkpoint import model_reference, resolve_reference

    tree = tmp_path / "outputs"
    (tree / "sft" / "a" / "export").mkdir(parents=True)
    (tree / "ppo" / "b" / "export").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    recorded = model_reference(
        "outputs/sft/a/export", tree / "ppo" / "b" / "export"
    )  # as newest_export gives it
    assert recorded == {"path": str(tree / "sft" / "a" / "export"), "from_export": "../../../sft/a/export"}
    monkeypatch.chdir(tmp_path / "outputs")  # another working directory
    assert resolve_reference(recorded, tree / "ppo" / "b" / "export") == str(tree / "sft" / "a" / "export")
    tree.rename(tmp_path / "moved")  # the whole tree moved: the reference moved with it
    moved = tmp_path / "moved"
    assert resolve_reference(recorded, moved / "ppo" / "b" / "export") == str(moved / "sft" / "a" / "export")
    # a hub id, and exports written before references were recorded this way, stay as they are
    assert model_reference("org/model", moved) == {"path": "org/model"}
    assert resolve_reference("outputs/sft/a/export", moved) == "outputs/sft/a/export"


@pytest.mark.parametrize("lora", [False, True])
def test_an_exported_copy_keeps_the_generation_config_loaded_with_the_model(tmp_path, lora):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from core.models import add_lora

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, eos_token_id=2))  # fmt: skip
    model.generation_config = GenerationConfig(
        eos_token_id=[2, 7], do_sample=True, temperature=0.7, top_p=0.8
    )
    if lora:
        model = add_lora(model, r=2, alpha=4, dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    copy = checkpoint._cpu_copy(model, model.state_dict())
    (copy.get_base_model() if lora else copy).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [2, 7] and saved["temperature"] == 0.7 and saved["top_p"] == 0.8, saved
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), copy.state_dict().values()))


def test_a_save_clears_what_a_crash_left_while_saving_another_step(tmp_path):
    # a save killed at step 40 left its whole temporary copy; a resume saving other steps never cleared it
    engines, root = {"actor": StubEngine()}, tmp_path / "checkpoints"
    (root / ".tmp-step-00000040" / "actor").mkdir(parents=True)
    (root / ".tmp-step-00000040" / "actor" / "shard.pt").write_text("x")
    save_checkpoint(engines, tmp_path, 25, {}, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000025"]


def test_a_lora_export_names_its_own_base_for_peft_to_load(tmp_path):
    # the adapter named no base (a model built from a config) or a LoRA export without config.json (PPO on a
    # LoRA SFT run): peft's loaders could not load the export by its path, though its base/ was beside it
    from types import SimpleNamespace

    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.models import add_lora, load_tokenizer

    tok = load_tokenizer("builtin", None, trust_remote_code=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))  # fmt: skip
    model = add_lora(model, r=2, alpha=4, dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    with torch.no_grad():  # a trained adapter (peft starts B at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    engine = SimpleNamespace(module=model, zero_optimization_stage=lambda: 0)
    export = tmp_path / "run" / "export"
    checkpoint.export_model(engine, tok, export, merge_lora=False, info={"stage": "sft"})
    adapter = json.loads((export / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(export.resolve() / "base")
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(export)).eval()
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model.eval()(ids).logits, atol=1e-5)


def test_a_lora_export_in_a_copied_tree_merges_into_the_copys_own_base(tmp_path):
    # a pipeline run copied whole (its stages then skip as up to date): the reward model's adapters named
    # the original tree's SFT export by absolute path, so the copy merged into weights it did not train on
    import shutil
    from types import SimpleNamespace

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.models import add_lora, load_tokenizer, merged_adapter_export

    tok = load_tokenizer("builtin", None, trust_remote_code=False)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    run = tmp_path / "run"
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(run / "sft" / "export")
    tok.save_pretrained(run / "sft" / "export")
    base = LlamaForCausalLM.from_pretrained(run / "sft" / "export")
    model = add_lora(base, r=2, alpha=4, dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    engine = SimpleNamespace(module=model, zero_optimization_stage=lambda: 0)
    checkpoint.export_model(
        engine, tok, run / "reward" / "export", merge_lora=False, info={"stage": "reward"}
    )
    shutil.copytree(run, tmp_path / "copy")
    torch.manual_seed(1)  # the original's SFT stage runs again: other weights
    LlamaForCausalLM(config).save_pretrained(run / "sft" / "export")
    name = "model.layers.0.mlp.up_proj.weight"
    own = LlamaForCausalLM.from_pretrained(tmp_path / "copy" / "sft" / "export").state_dict()[name]
    _, state = merged_adapter_export(str(tmp_path / "copy" / "reward" / "export"), trust_remote_code=False)
    assert torch.equal(state[name], own)  # B = 0: the merge leaves the base's weights as they are
    shutil.rmtree(run)  # and with the original gone
    _, state = merged_adapter_export(str(tmp_path / "copy" / "reward" / "export"), trust_remote_code=False)
    assert torch.equal(state[name], own)
