"""Hydra composition: the schema type-checks every group and override before anything loads."""

import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

import sft.config  # registers sft_schema
from core import dist
from tests.conftest import ROOT, run_stage

CONF = str(ROOT / "conf")


def sft_cfg(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("sft", overrides=list(overrides))


def test_default_composes_with_every_group():
    cfg = sft_cfg()
    assert cfg.model.tokenizer == "builtin" and cfg.model.name_or_path is None
    assert cfg.data.path == "builtin" and cfg.deepspeed.stage == 2 and cfg.peft.type == "none"
    assert cfg.logger.backend == "wandb" and cfg.model.trust_remote_code is False
    OmegaConf.to_container(cfg, resolve=True)  # no missing values anywhere


@pytest.mark.parametrize("group", ["deepspeed=zero0", "deepspeed=zero1", "deepspeed=zero3", "deepspeed=zero3_offload",
                                   "peft=lora", "logger=tensorboard", "logger=none", "data=alpaca", "model=stories260k",
                                   "model=gpt2", "experiment=quick", "experiment=alpaca_stories"])  # fmt: skip
def test_every_group_option_composes(group):
    OmegaConf.to_container(sft_cfg(group), resolve=True)


def test_overrides_are_typed():
    assert sft_cfg("optim.lr=3e-4").optim.lr == pytest.approx(3e-4)
    with pytest.raises(ConfigCompositionException, match="Could not override 'optim.lrr'"):
        sft_cfg("optim.lrr=3e-4")
    with pytest.raises((ValidationError, ConfigCompositionException)):
        sft_cfg("train.max_steps=many")
    with pytest.raises((ValidationError, ConfigCompositionException)):
        sft_cfg("deepspeed.offload_param=maybe")


def test_a_typo_on_the_command_line_fails_at_once_with_hydras_message():
    start = time.monotonic()
    proc = run_stage("sft", "optim.lrr=3e-4", "hydra.run.dir=/tmp/never", check=False)
    assert proc.returncode != 0
    assert "Key 'lrr' not in 'OptimConfig'" in proc.stderr + proc.stdout
    assert "data:" not in proc.stdout + proc.stderr  # nothing was loaded
    assert time.monotonic() - start < 60


def test_launcher_local_rank_argument_is_stripped():
    argv = ["sft", "--local_rank=1", "a=1", "--local-rank", "0", "b=2", "--local_rank", "3"]
    assert dist.strip_launcher_args(argv) == ["sft", "a=1", "b=2"]


def test_run_stamp_comes_from_the_environment_when_set(monkeypatch):
    monkeypatch.setenv(dist.RUN_STAMP_ENV, "2026-01-02T03:04:05.000006")
    assert dist.shared_run_stamp().strftime("%Y-%m-%d_%H-%M-%S-%f") == "2026-01-02_03-04-05-000006"


def test_yaml_has_a_comment_above_every_train_key():
    lines = (Path(CONF) / "sft.yaml").read_text().splitlines()
    start = lines.index("train:")
    for i, line in enumerate(lines[start + 1 :], start + 1):
        if not line.startswith("  ") or line.startswith("   "):
            if not line.strip():
                break
            continue
        if line.strip().startswith("#"):
            continue
        prev = lines[i - 1].strip()
        assert prev.startswith("#"), f"no comment directly above: {line}"


def _uncommented_keys(path: Path) -> list[str]:
    """Keys holding a value whose line has no comment directly above it (the `defaults` list and
    Hydra's own `hydra:` settings aside)."""
    lines, missing, skip = path.read_text().splitlines(), [], False
    for i, line in enumerate(lines):
        if line and not line[0].isspace() and not line.startswith("#"):
            skip = line.startswith(("defaults:", "hydra:"))
        key, colon, value = line.partition(":")
        if skip or not colon or not key.strip() or key.strip().startswith(("#", "-")) or not value.strip():
            continue
        if not (i and lines[i - 1].strip().startswith("#")):
            missing.append(f"{path.relative_to(ROOT)}:{i + 1}: {line.strip()}")
    return missing


def test_every_knob_has_a_comment_directly_above_it():
    """The stage files and the files that hold each group's values: one comment above every key."""
    conf = Path(CONF)
    files = [*conf.glob("*.yaml"), *conf.glob("*/base.yaml"), conf / "optim" / "adamw.yaml"]
    assert len(files) >= 10  # 4 stage files, 5 group bases, adamw
    assert [m for f in sorted(files) for m in _uncommented_keys(f)] == []


def test_the_schemas_hold_types_only():
    """One default in one place: every value lives in conf/, so no schema field has a default of its own
    (a schema default would silently apply where a group file leaves the key out)."""
    import dataclasses

    import ppo.config
    import reward.config

    seen, todo, defaults = set(), [sft.config.SFTConfig, reward.config.RewardConfig, ppo.config.PPOConfig], []
    while todo:
        schema = todo.pop()
        if schema in seen:
            continue
        seen.add(schema)
        for f in dataclasses.fields(schema):
            if f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
                if dataclasses.is_dataclass(value):
                    todo.append(type(value))
                    continue
                defaults.append(f"{schema.__name__}.{f.name} = {value!r}")
            elif f.default != "???":
                defaults.append(f"{schema.__name__}.{f.name} = {f.default!r}")
    assert len(seen) >= 15 and defaults == []
