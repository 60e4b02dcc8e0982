import os
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from core.deepspeed import (
    ConfigError,
    build_config,
    clear_stale_build_locks,
    effective_stage,
    gathered_for_generation,
    grad_norm,
    model_init,
    parseable_arch_list,
    train_engine,
    use_environment_op_cache,
)

BASE = dict(stage=2, offload_optimizer=False, offload_param=False, extra={}, micro_batch_size_per_device=4,
            grad_accum_steps=2, global_batch_size=None, precision="fp32", grad_clip=1.0, lr=1e-3, betas=[0.9, 0.95],
            eps=1e-8, weight_decay=0.1)  # fmt: skip


def test_global_batch_is_derived_and_checked():
    cfg = build_config(**BASE)
    assert cfg["train_batch_size"] == 8
    assert build_config(**{**BASE, "global_batch_size": 8})["train_batch_size"] == 8
    with pytest.raises(
        ConfigError, match=r"global_batch_size=16 but micro_batch_size_per_device \(4\) x grad_accum_steps"
    ):
        build_config(**{**BASE, "global_batch_size": 16})


def test_offload_and_stage_combinations_are_checked():
    with pytest.raises(ConfigError, match="offload_param needs ZeRO stage 3"):
        build_config(**{**BASE, "offload_param": True})
    with pytest.raises(ConfigError, match="stage must be"):
        build_config(**{**BASE, "stage": 4})
    z3 = build_config(**{**BASE, "stage": 3, "offload_param": True, "offload_optimizer": True})
    assert z3["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert z3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]


def test_errors_name_the_group_the_user_sets():
    """PPO's engines take their ZeRO settings from actor_ds / critic_ds / frozen_ds, not `deepspeed`."""
    from hydra import compose, initialize_config_dir

    import ppo.config  # noqa: F401  (registers ppo_schema)
    from core.deepspeed import config_from_groups
    from tests.conftest import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("ppo", overrides=["actor_ds.stage=4", "critic_ds.offload_param=true"])
    with pytest.raises(ConfigError, match=r"^actor_ds.stage must be 0, 1, 2 or 3, got 4"):
        config_from_groups(cfg.actor_ds, cfg.train, cfg.actor_optim)
    with pytest.raises(ConfigError, match=r"^critic_ds.offload_param needs ZeRO stage 3"):
        config_from_groups(cfg.critic_ds, cfg.train, cfg.critic_optim)
    with pytest.raises(ConfigError, match=r"^deepspeed.stage must be"):
        build_config(**{**BASE, "stage": 4})


def test_no_secret_in_the_deepspeed_config_it_would_log():
    extra = {"comet": {"enabled": True, "api_key": "abc"}}
    with pytest.raises(
        ConfigError, match=r"deepspeed.extra.comet.api_key: DeepSpeed prints its whole config"
    ):
        build_config(**{**BASE, "extra": extra})
    build_config(**{**BASE, "extra": {"comet": {"enabled": False, "project": "p", "experiment_key": "e1"}}})


def test_extra_keys_merge_deeply_and_cpu_uses_torch_adamw():
    cfg = build_config(
        **{**BASE, "extra": {"zero_optimization": {"reduce_bucket_size": 123}, "steps_per_print": 5}}
    )
    assert cfg["zero_optimization"] == {"stage": 0, "reduce_bucket_size": 123}  # one fp32 rank: stage 0
    assert cfg["steps_per_print"] == 5
    assert cfg["optimizer"]["params"]["torch_adam"] is True  # CPU accelerator, no offload
    assert cfg["optimizer"]["params"]["fused"] is True  # torch's fused CPU AdamW kernel
    offload = build_config(**{**BASE, "offload_optimizer": True})["optimizer"]["params"]
    assert offload["torch_adam"] is False and "fused" not in offload  # DeepSpeedCPUAdam
    assert cfg["bf16"]["enabled"] is False and cfg["fp16"]["enabled"] is False
    # as a config node (the YAML group's `extra`) it merges as deeply: ZeRO's other keys stay
    from omegaconf import OmegaConf

    node = OmegaConf.create({"zero_optimization": {"reduce_bucket_size": 123}})
    assert build_config(**{**BASE, "extra": node})["zero_optimization"] == {
        "stage": 0,
        "reduce_bucket_size": 123,
    }


def test_a_stale_op_build_lock_is_removed_and_a_live_one_kept(tmp_path, monkeypatch):
    # a build killed mid-way leaves torch's `lock`; every later DeepSpeed start would wait on it forever
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, live = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "cpu_adam" / "lock"
    for lock in (stale, live):
        lock.parent.mkdir()
        lock.touch()
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    assert clear_stale_build_locks() == [stale]
    assert not stale.exists() and live.exists()
    # an old lock whose build is still running (a process works in its directory) is kept
    os.utime(live, (hour_ago, hour_ago))
    monkeypatch.chdir(live.parent)
    assert clear_stale_build_locks() == [] and live.exists()


def test_ops_build_inside_the_virtual_environment_unless_told_otherwise(tmp_path, monkeypatch):
    # two environments sharing ~/.cache/torch_extensions rebuilt the CPU comm op at every switch
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr("sys.prefix", str(tmp_path / "venv"))
    monkeypatch.setattr("sys.base_prefix", str(tmp_path / "base"))
    (tmp_path / "venv").mkdir()
    use_environment_op_cache()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "venv" / "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/elsewhere")  # the user's choice stands
    use_environment_op_cache()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/elsewhere"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr("sys.base_prefix", str(tmp_path / "venv"))  # no virtual environment: torch's default
    use_environment_op_cache()
    assert "TORCH_EXTENSIONS_DIR" not in os.environ


def test_arch_specific_cuda_archs_are_rewritten_for_deepspeeds_op_builder(monkeypatch):
    # an H200 image set TORCH_CUDA_ARCH_LIST=9.0a, and DeepSpeed's JIT builder could not parse it: the
    # GPU optimizer (FusedAdam) failed to build at the first engine
    from deepspeed.ops.op_builder.fused_adam import FusedAdamBuilder

    def deepspeed_parses(arch_list: str) -> bool:
        builder = FusedAdamBuilder()
        builder.jit_mode, builder._jit_arch_list = True, arch_list  # as its jit_load sets them
        try:
            builder.compute_capability_args()
        except ValueError:
            return False
        return True

    for raw, fixed in (("9.0a", "9.0"), ("8.0 9.0 9.0a", "8.0;9.0"), ("9.0a;10.0f+PTX", "9.0;10.0+PTX")):
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", raw)
        parseable_arch_list()
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == fixed and deepspeed_parses(fixed)
    for kept in ("8.0 8.6", "9.0+PTX"):  # what DeepSpeed reads is left as the user wrote it
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", kept)
        parseable_arch_list()
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == kept
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    parseable_arch_list()
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ


def test_a_single_rank_runs_unpartitioned_where_zero_has_nothing_to_partition():
    def stages(frozen, precision="fp32", offload_optimizer=False, offload_param=False, world=1):
        return [effective_stage(s, world, frozen=frozen, precision=precision, offload_optimizer=offload_optimizer,
                                offload_param=offload_param) for s in (0, 1, 2, 3)]  # fmt: skip

    assert stages(frozen=True) == [0, 1, 2, 0]  # frozen: ZeRO-3 only (1 and 2 partition optimizer state)
    assert stages(frozen=True, offload_param=True) == [0, 1, 2, 3]  # offload: as configured
    assert stages(frozen=False) == [0, 0, 0, 3]  # trained: ZeRO-3 kept (its code paths on a laptop)
    assert stages(frozen=False, offload_optimizer=True) == [0, 1, 2, 3]
    # bf16 / fp16 keep their stage: DeepSpeed's stage 0 would drop the fp32 master weights
    assert stages(frozen=False, precision="bf16") == [0, 1, 2, 3]
    assert stages(frozen=False, precision="fp16") == [0, 1, 2, 3]
    # two ranks: as configured
    assert stages(frozen=True, world=2) == stages(frozen=False, world=2) == [0, 1, 2, 3]
    assert build_config(**{**BASE, "stage": 3, "frozen": True})["zero_optimization"] == {"stage": 0}
    assert build_config(**{**BASE, "stage": 3})["zero_optimization"]["stage"] == 3
    assert build_config(**BASE)["zero_optimization"] == {"stage": 0}
    assert build_config(**{**BASE, "offload_optimizer": True})["zero_optimization"]["stage"] == 2


def test_a_single_fp32_rank_trains_at_stage_0_and_reports_the_gradient_norm():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2))  # fmt: skip
    cfg = build_config(**{**BASE, "grad_accum_steps": 1, "grad_clip": 0.5})  # ZeRO-2 configured
    engine = train_engine(model, cfg, weight_decay=0.0, warmup_steps=0, total_steps=10, min_lr_ratio=1.0)
    assert engine.zero_optimization_stage() == 0
    assert not engine.enable_backward_allreduce  # nothing to average over one rank
    ids = torch.randint(0, 32, (4, 8))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    engine.step()
    assert grad_norm(engine) == pytest.approx(float(expected), rel=1e-5) and float(expected) > 0.5  # pre-clip


def test_a_frozen_zero3_config_turns_deepspeeds_linear_patch_off():
    # a frozen model has no backward: DeepSpeed's memory-efficient linear (which replaces
    # torch.nn.functional.linear for the whole process) is off for it, on for a trained one
    frozen = build_config(**{**BASE, "stage": 3, "offload_param": True, "frozen": True})
    assert frozen["zero_optimization"]["memory_efficient_linear"] is False
    trained = build_config(**{**BASE, "stage": 3})
    assert "memory_efficient_linear" not in trained["zero_optimization"]  # DeepSpeed's default (on)


def test_generation_on_gathered_weights_makes_no_collective_call(monkeypatch):
    """DeepSpeed's root pre-forward hook checks the module order with the other ranks (a collective)
    on every forward while none is recorded: inside gathered_for_generation it must not, or ranks
    that decode different numbers of tokens would leave those checks unpaired."""
    from deepspeed.runtime.zero import partitioned_param_coordinator as ppc

    torch.manual_seed(0)
    cfg = build_config(**{**BASE, "stage": 3, "grad_accum_steps": 1})
    with model_init(cfg):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=2))  # fmt: skip
    engine = train_engine(model, cfg, weight_decay=0.0, warmup_steps=0, total_steps=10, min_lr_ratio=1.0)
    assert engine.zero_optimization_stage() == 3
    checks = []
    check = ppc.assert_ints_same_as_other_ranks
    monkeypatch.setattr(ppc, "assert_ints_same_as_other_ranks", lambda ints: checks.append(1) or check(ints))
    ids = torch.randint(3, 32, (2, 5))
    engine(input_ids=ids)  # a training-mode forward: the hook runs and checks, recording the order
    assert checks
    checks.clear()
    with torch.no_grad(), gathered_for_generation(engine, enabled=True) as module:
        out = module.generate(
            input_ids=ids, do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0
        )
    assert out.shape == (2, 11) and checks == []
    engine(input_ids=ids)  # hooks and the coordinator's own reset_step are back
    assert checks and "reset_step" not in vars(engine.optimizer.parameter_offload.param_coordinator)
