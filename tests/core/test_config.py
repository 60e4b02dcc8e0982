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


def test_a_value_out_of_range_ends_the_command_with_its_message_not_a_traceback(tmp_path):
    proc = run_stage("sft", "optim.betas=[0.9,1.5]", f"hydra.run.dir={tmp_path}", check=False)
    out = proc.stderr + proc.stdout
    assert proc.returncode == 2, out
    assert "optim.betas[1] must be in [0, 1); got 1.5" in out and "Traceback" not in out
    assert "optim.betas[1] must be in [0, 1)" in (tmp_path / "sft.log").read_text()  # the run's log file too


def test_in_a_sweep_a_job_that_stops_on_a_setting_leaves_the_others_running(tmp_path):
    proc = run_stage(
        "sft", "-m", "optim.betas=[0.9,1.5],[0.9,2.0]", f"hydra.sweep.dir={tmp_path}", check=False
    )
    out = proc.stderr + proc.stdout
    assert proc.returncode != 0
    assert "optim.betas[1] must be in [0, 1); got 1.5" in out and "got 2.0" in out  # the second job ran too


def test_reported_keeps_the_traceback_with_hydra_full_error_and_for_other_errors(monkeypatch):
    from core.cli import reported
    from core.config import ConfigError

    with pytest.raises(SystemExit) as ended, reported("sft"):
        raise ConfigError("train.max_steps must be at least 1; got 0")
    assert ended.value.code == 2
    with pytest.raises(RuntimeError), reported("sft"):  # not a setting: a bug or a crash keeps its traceback
        raise RuntimeError("boom")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError), reported("sft"):
        raise ConfigError("x")


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


def compose_any(stage, *overrides):
    import importlib

    importlib.import_module(f"{stage}.config")  # registers the stage's schema
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(stage, overrides=list(overrides))


# The stage experiments and the stages they are for (each file's header names them); the pipeline
# experiments are checked at planning in test_pipeline.
STAGE_EXPERIMENTS = {"quick": ("sft", "reward", "ppo"), "imdb": ("sft", "reward", "ppo"),
                     "alpaca_stories": ("sft",), "hh_stories": ("reward",), "bench": ("ppo",)}  # fmt: skip


def test_every_stage_default_and_stage_experiment_passes_its_value_checks():
    """The checks refuse nothing the project ships: each stage's defaults and every stage experiment
    for the stages it is for."""
    import importlib

    composing = set()
    for stage in ("sft", "reward", "ppo"):
        check = importlib.import_module(f"{stage}.config").check_config
        check(compose_any(stage))
        for experiment in sorted(Path(CONF, "experiment").glob("*.yaml")):
            try:
                bench = ["bench.workload=wl", "bench.steps=2"] if stage == "ppo" else []
                compose_any(stage, f"experiment={experiment.stem}", *bench)
            except ConfigCompositionException:  # another stage's (or the pipeline's) experiment
                continue
            composing.add(experiment.stem)
        for experiment, stages in STAGE_EXPERIMENTS.items():
            if stage in stages:
                bench = ["bench.workload=wl", "bench.steps=2"] if experiment == "bench" else []
                check(compose_any(stage, f"experiment={experiment}", *bench))
    # a new stage experiment is listed above with its stages
    assert composing == set(STAGE_EXPERIMENTS), composing ^ set(STAGE_EXPERIMENTS)


@pytest.mark.parametrize(
    "override, message",
    [("train.max_steps=-1", "train.max_steps must be at least 0; got -1"),
     ("train.grad_accum_steps=0", "train.grad_accum_steps must be at least 1; got 0"),
     ("train.save_every=-5", "train.save_every must be at least 0; got -5"),
     ("train.precision=fp8", "train.precision must be one of auto, fp32, bf16, fp16; got 'fp8'"),
     ("data.max_len=0", "data.max_len must be at least 1; got 0"),
     ("data.loss_on=prompt", "data.loss_on must be one of responses, all; got 'prompt'"),
     ("data.on_error=ignore", "data.on_error must be one of raise, skip; got 'ignore'"),
     ("data.eval_fraction=0", "data.eval_fraction must be between 0 and 1 when no data.eval_path is given"),
     ("optim.betas=[0.9,1.5]", r"optim.betas\[1\] must be in \[0, 1\); got 1.5"),
     ("optim.betas=[0.9]", r"optim.betas must be two numbers .*; got \[0.9\]"),
     ("optim.weight_decay=-0.1", "optim.weight_decay must be at least 0; got -0.1"),
     ("optim.eps=0", "optim.eps must be above 0; got 0"),
     ("optim.min_lr_ratio=2", r"optim.min_lr_ratio must be in \[0, 1\]; got 2"),
     ("optim.warmup_steps=-1", "optim.warmup_steps must be at least 0; got -1"),
     ("peft.type=qlora", "peft.type must be one of none, lora; got 'qlora'"),
     ("peft=lora peft.r=0", "peft.r must be at least 1; got 0"),
     ("peft=lora peft.dropout=1", r"peft.dropout must be in \[0, 1\); got 1"),
     ("logger.backend=mlflow", "logger.backend must be one of wandb, tensorboard, none; got 'mlflow'"),
     ("logger.mode=online_maybe", "logger.mode must be one of auto, online, offline, disabled"),
     ("deepspeed.stage=5", "deepspeed.stage must be 0, 1, 2 or 3, got 5")],
)  # fmt: skip
def test_shared_values_out_of_range_are_refused_naming_the_key(override, message):
    from core.config import ConfigError, check_values

    with pytest.raises(ConfigError, match=message):
        check_values(sft_cfg(*override.split()), "sft")


@pytest.mark.parametrize(
    "stage, override, message",
    [("sft", "data.format=hh", "data.format must be one of alpaca, messages, sharegpt, prompt, imdb; got 'hh'"),
     ("reward", "data.format=alpaca", "data.format must be one of pairwise, hh, sharegpt_pairs, ranked, imdb"),
     ("ppo", "data.format=pref:hhh", "data.format must be one of prompt, sft:alpaca, .*; got 'pref:hhh'"),
     ("ppo", "ptx.coef=0.1 ptx.path=demos.jsonl ptx.format=imdb",
      "ptx.format must be one of alpaca, messages, sharegpt, prompt; got 'imdb'")],
)  # fmt: skip
def test_a_data_format_the_stage_cannot_read_is_refused_before_loading(stage, override, message):
    """Before, a misspelt or another stage's format failed only once the stage started reading its data
    (inside the pipeline: after the stages before it had run)."""
    import importlib

    from core.config import ConfigError

    check = importlib.import_module(f"{stage}.config").check_config
    with pytest.raises(ConfigError, match=message):
        check(compose_any(stage, "data.path=data.jsonl", *override.split()))
    # where the format is not read it is not checked: the built-in task, ptx off or built-in
    check(compose_any(stage, "data.path=builtin", "ptx.coef=0" if stage == "ppo" else "data.format=null",
                      *(o for o in override.split() if "format" in o)))  # fmt: skip


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo"])
def test_every_format_a_stage_takes_its_loader_reads(stage, tmp_path):
    """Each name the check takes passes it, and the stage's loader takes it too (it gets past its own
    format check to the empty file)."""
    import importlib

    from data import formats as data_formats
    from data.formats import DataError

    check = importlib.import_module(f"{stage}.config").check_config
    load = {"sft": data_formats.load_conversations, "reward": data_formats.load_preferences,
            "ppo": data_formats.load_prompts}[stage]  # fmt: skip
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for fmt in (*data_formats.STAGE_FORMATS[stage], None):
        check(compose_any(stage, "data.path=data.jsonl", f"data.format={'null' if fmt is None else fmt}"))
        if fmt == "imdb":  # read by data/imdb.py, not by the record loaders
            continue
        with pytest.raises(DataError) as error:
            load(str(empty), fmt)
        assert "is not one of" not in str(error.value), (fmt, error.value)


def test_an_eval_file_frees_eval_fraction_and_lora_values_count_only_with_lora():
    from core.config import check_values

    check_values(sft_cfg("data.eval_fraction=0", "data.eval_path=x.jsonl"), "sft")
    check_values(sft_cfg("peft=none", "peft.r=0"), "sft")


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_a_stage_checks_its_values_before_loading_anything(stage, tmp_path):
    import importlib

    from core.config import ConfigError

    recipe = importlib.import_module(f"{stage}.train")
    cls = {"sft": "SFTRecipe", "reward": "RewardRecipe"}[stage]
    cfg = compose_any(
        stage, "optim.betas=[0.9,1.5]", "model.name_or_path=/nonexistent", "data.path=/nonexistent"
    )
    with pytest.raises(ConfigError, match=r"optim.betas\[1\] must be in \[0, 1\)"):
        getattr(recipe, cls)(cfg, run_dir=tmp_path).setup()
    with pytest.raises(ConfigError, match="loss.center_coef must be at least 0"):
        importlib.import_module("reward.config").check_config(compose_any("reward", "loss.center_coef=-1"))
