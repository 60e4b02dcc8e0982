"""The pipeline: hand-offs, report, skip / re-run / resume by stage key, and a sweep that shares stages.

One short pipeline (a few steps per stage, about a minute) is run once per module; the tests
that change it work on copies of its run directory.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import hydra
import pytest
from hydra import initialize_config_dir
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from core import pipeline
from core.checkpoint import EXPORT_INFO
from core.deepspeed import ConfigError
from tests.conftest import CORES_PER_TEST, ROOT, free_port, read_metrics, run_stage, stage_env

SHORT = (
    "sft.experiment=quick", "sft.data.builtin.num_prompts=400", "sft.train.max_steps=6",
    "reward.experiment=quick", "reward.data.builtin.num_prompts=400", "reward.train.max_steps=6",
    "ppo.experiment=quick", "ppo.rollout.batch_size=8", "ppo.train.max_steps=4", "ppo.train.log_every=1",
    "ppo.train.save_every=2", "eval.samples_per_prompt=1", "eval.num_report_samples=3",
)  # fmt: skip


def run_pipeline(*overrides: str, multirun: bool = False, timeout: int = 600):
    return run_stage("core.pipeline", *(["-m"] if multirun else []), *SHORT, *overrides, timeout=timeout)


def actions(run: Path) -> dict[str, str]:
    return {s: v["action"] for s, v in json.loads((run / "report.json").read_text())["stages"].items()}


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("pipeline") / "run"
    run_pipeline(f"hydra.run.dir={run}")
    return run


@pytest.fixture
def copy_of(short_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(short_run, run, symlinks=True)
    return run


# ----------------------------------------------------------------------------- units


def test_stage_keys_reach_the_open_stage_nodes():
    argv = ["sft.optim.lr=1e-4", "ppo.kl_coef=0.1", "pipeline.name=x", "+ppo.extra=1", "hydra.run.dir=d",
            "ppo.deepspeed@actor_ds=zero3"]  # fmt: skip
    assert pipeline.stage_overrides_argv(argv) == [
        "++sft.optim.lr=1e-4", "++ppo.kl_coef=0.1", "pipeline.name=x", "+ppo.extra=1", "hydra.run.dir=d",
        "++ppo.actor_ds=zero3",
    ]  # fmt: skip
    # a group chosen by name and given keys in one command: the keys would silently replace the choice
    with pytest.raises(ConfigError, match="would replace the choice"):
        pipeline.stage_overrides_argv(["sft.data=imdb", "sft.data.max_len=96"])
    either = r"ppo.actor_ds=<choice> \(or its group@package form\) and ppo.actor_ds.<key>"
    with pytest.raises(ConfigError, match=either):
        pipeline.stage_overrides_argv(
            ["ppo.deepspeed@actor_ds=zero3", "ppo.actor_ds.extra.wall_clock_breakdown=true"]
        )


def test_compose_stage_values_groups_alias_and_typos():
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = pipeline.compose_stage(
            "ppo", {"kl_coef": 0.2, "actor_ds": "zero3", "train": {"max_steps": 7}}, {"actor": "/x/sft/export"}, "/d"
        )  # fmt: skip
        assert cfg.ppo.kl_coef == 0.2  # ppo.kl_coef is short for ppo.ppo.kl_coef
        assert cfg.actor_ds.stage == 3  # a string at a group's package selects the group's file
        assert cfg.train.max_steps == 7 and cfg.data_root == "/d"
        assert cfg.actor.name_or_path == "/x/sft/export" and cfg.actor.tokenizer is None
        quick = pipeline.compose_stage("sft", {"experiment": "quick"}, {}, "/d")
        assert quick.train.max_steps == 10 and quick.logger.backend == "none"
        with pytest.raises(ConfigError, match="sft.optim.lrr"):
            pipeline.compose_stage("sft", {"optim": {"lrr": 1.0}}, {}, "/d")
        with pytest.raises(ConfigError, match="train.max_steps"):
            pipeline.compose_stage("sft", {"train": {"max_steps": "many"}}, {}, "/d")
        # a deepspeed group's `extra` takes raw DeepSpeed keys, which no schema names
        raw = {"actor_ds": {"extra": {"zero_optimization": {"reduce_bucket_size": 5}}}}
        cfg = pipeline.compose_stage("ppo", raw, {}, "/d")
        assert cfg.actor_ds.extra == {"zero_optimization": {"reduce_bucket_size": 5}}
        sft = pipeline.compose_stage("sft", {"deepspeed": {"extra": {"steps_per_print": 5}}}, {}, "/d")
        assert sft.deepspeed.extra.steps_per_print == 5
        with pytest.raises(ConfigError, match="ppo.actor_dss.extra.x"):  # a misspelt group still fails
            pipeline.compose_stage("ppo", {"actor_dss": {"extra": {"x": 1}}}, {}, "/d")


def test_a_secret_in_a_stage_config_is_refused_before_anything_is_written():
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        for value in ("s3cr3t", "${oc.env:COMET_API_KEY}"):  # a literal, or resolved into the written file
            secret = {"deepspeed": {"extra": {"comet": {"api_key": value}}}}
            with pytest.raises(
                ConfigError, match=r"sft.deepspeed.extra.comet.api_key: no secret goes in a config"
            ):
                pipeline.compose_stage("sft", secret, {}, "/d")
        # an id that only looks secret is not refused
        pipeline.compose_stage("sft", {"deepspeed": {"extra": {"comet": {"experiment_key": "e1"}}}}, {}, "/d")


@pytest.mark.parametrize("module", ["core.pipeline", "sft"])
def test_a_secret_on_the_command_line_is_refused_before_hydra_saves_it(tmp_path, module):
    key = ("sft." if module == "core.pipeline" else "") + "deepspeed.extra.comet.api_key"
    proc = run_stage(module, f"{key}=s3cr3t-value", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2 and f"{key}: no secret goes on the command line" in proc.stderr
    assert not (tmp_path / "run").exists()  # Hydra wrote nothing: no .hydra/overrides.yaml holding it


def test_stages_keep_the_recipe_order_and_a_handed_off_model_is_not_replaced_by_a_group_choice():
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra.compose("pipeline", overrides=["pipeline.stages=[reward,sft]"])
        with pytest.raises(
            ConfigError, match=r"pipeline.stages must keep the order \['sft', 'reward', 'ppo'\]"
        ):
            pipeline.Pipeline(cfg, Path("unused"), None)
        # the group's model would give way to the SFT export without a word
        with pytest.raises(
            ConfigError, match=r"reward.model=gpt2: the pipeline starts reward's model from /x"
        ):
            pipeline.compose_stage("reward", {"model": "gpt2"}, {"model": "/x/sft/export"}, "/d")
        assert pipeline.compose_stage("reward", {"model": "gpt2"}, {}, "/d").model.name_or_path.endswith(
            "gpt2"
        )
        cfg = pipeline.compose_stage(
            "reward", {"model": {"name_or_path": "/y"}}, {"model": "/x/sft/export"}, "/d"
        )
        assert cfg.model.name_or_path == "/y"  # a path given by the user replaces the hand-off


def test_stage_key_ignores_logging_resume_memory_and_handoff_location():
    here, there = {"model": "/a/sft/export"}, {"model": "/elsewhere/sft/export"}
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        a = pipeline.compose_stage("reward", {}, here, "/d")
        b = pipeline.compose_stage("reward", {"logger": {"group": "g"}, "train": {"resume": True, "keep_freed_memory": False}},
                                   there, "/d")  # fmt: skip
        c = pipeline.compose_stage("reward", {"optim": {"lr": 1e-3}}, here, "/d")
        d = pipeline.compose_stage("reward", {"model": {"name_or_path": "/my/own/model"}}, here, "/d")
    key = pipeline.stage_key("reward", a, {"sft": "k1"}, here, "1")
    assert key == pipeline.stage_key("reward", b, {"sft": "k1"}, there, "1")
    assert key != pipeline.stage_key("reward", c, {"sft": "k1"}, here, "1")  # a training value
    assert key != pipeline.stage_key("reward", a, {"sft": "k2"}, here, "1")  # a different SFT upstream
    assert key != pipeline.stage_key("reward", d, {"sft": "k1"}, here, "1")  # the user's model, not SFT's
    assert key != pipeline.stage_key("reward", a, {"sft": "k1"}, here, "2 per node")  # another global batch


def test_stage_key_counts_the_local_files_a_stage_reads(tmp_path):
    """Editing a data file or a model directory in place (same path) re-runs the stage; a hub name does
    not count as a file, and a config without local inputs keys as before (no `files` entry)."""
    data = tmp_path / "demos.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    model = tmp_path / "my_model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = pipeline.compose_stage("sft", {"data": {"path": str(data)}, "model": {"name_or_path": str(model)}},
                                     {}, "/d")  # fmt: skip
        hub = pipeline.compose_stage("sft", {"data": {"path": "org/dataset"}}, {}, "/d")
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert set(pipeline.input_files(plain)) == {f"data.path={data}", f"model.name_or_path={model}"}
    assert pipeline.input_files(OmegaConf.to_container(hub, resolve=True)) == {}

    key = pipeline.stage_key("sft", cfg, {}, {}, "1")
    assert key == pipeline.stage_key("sft", cfg, {}, {}, "1")  # nothing changed
    data.write_text('{"prompt": "a", "response": "c d"}\n')  # the same path, new contents
    edited = pipeline.stage_key("sft", cfg, {}, {}, "1")
    assert edited != key
    os.utime(model / "config.json", ns=(0, 0))  # a model re-exported in place (only its time differs)
    assert pipeline.stage_key("sft", cfg, {}, {}, "1") != edited

    # without local inputs the key is the hash it was before files were counted
    content = {"stage": "sft", "config": OmegaConf.to_container(hub, resolve=True), "inputs": {}, "world": "1"}  # fmt: skip
    for dotted in pipeline.UNHASHED:
        *parents, leaf = dotted.split(".")
        node = content["config"]
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    old = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()
    assert pipeline.stage_key("sft", hub, {}, {}, "1") == old


def test_ppo_without_its_upstream_stages_keys_the_newest_exports_it_will_read(tmp_path):
    """pipeline.stages=[ppo] with null model paths: PPO reads the newest `python -m sft` / `reward`
    exports, so the plan resolves them, and a newer export changes the key (the stage re-runs)."""

    def export(stage: str, run: str) -> Path:
        path = tmp_path / stage / run / "export"
        path.mkdir(parents=True)
        (path / EXPORT_INFO).write_text("{}")
        return path

    sft_old, rm = export("sft", "a"), export("reward", "a")
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = pipeline.compose_stage("ppo", {"runs_dir": str(tmp_path)}, {}, "/d")
        handed = pipeline.compose_stage("ppo", {"runs_dir": str(tmp_path)}, {"actor": "/x/sft/export"}, "/d")
    pipeline.resolve_newest_exports("ppo", cfg)
    assert (cfg.actor.name_or_path, cfg.reward_model.name_or_path) == (str(sft_old), str(rm))
    assert cfg.ref.name_or_path is None and cfg.critic.name_or_path is None  # PPO copies them from those
    key = pipeline.stage_key("ppo", cfg, {}, {}, "1")
    pipeline.resolve_newest_exports("ppo", handed)
    assert handed.actor.name_or_path == "/x/sft/export"  # a hand-off stays

    sft_new = export("sft", "b")
    newer = (sft_old / EXPORT_INFO).stat().st_mtime_ns + 10**9
    os.utime(sft_new / EXPORT_INFO, ns=(newer, newer))  # newer on any timestamp granularity
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        again = pipeline.compose_stage("ppo", {"runs_dir": str(tmp_path)}, {}, "/d")
    again.actor.name_or_path = ""  # empty counts as null, as in the stage
    pipeline.resolve_newest_exports("ppo", again)
    assert again.actor.name_or_path == str(sft_new)
    assert pipeline.stage_key("ppo", again, {}, {}, "1") != key

    shutil.rmtree(tmp_path / "reward")
    again.reward_model.name_or_path = None
    with pytest.raises(ConfigError, match="no `reward` export under .*add reward to pipeline.stages"):
        pipeline.resolve_newest_exports("ppo", again)


def test_a_forced_stage_runs_once_per_command(tmp_path, monkeypatch):
    """pipeline.from_stage in a sweep: the first job re-runs the shared stage; the later jobs of the same
    command reuse that run (before, each job deleted and re-ran it), and the next command re-runs it."""
    stage = tmp_path / "reward-abc"

    def finish(command):
        (stage / "export").mkdir(parents=True, exist_ok=True)
        (stage / "export" / "export_info.json").write_text("{}")
        state = {"key": "abc", "invocation": command}
        (stage / "export" / pipeline.STAGE_STATE).write_text(json.dumps(state))

    monkeypatch.setenv(pipeline.INVOCATION_ENV, "command-1")
    assert pipeline.plan_stage(stage, "abc", forced=True) == "run"  # nothing there yet
    finish("command-1")  # the first job's run
    assert pipeline.plan_stage(stage, "abc", forced=True) == "skip"  # a later job of the same sweep
    assert pipeline.plan_stage(stage, "abd", forced=True) == "run"  # another key: its own stage
    monkeypatch.setenv(pipeline.INVOCATION_ENV, "command-2")
    assert pipeline.plan_stage(stage, "abc", forced=True) == "run"  # a new command re-runs it
    assert pipeline.plan_stage(stage, "abc", forced=False) == "skip"
    monkeypatch.delenv(pipeline.INVOCATION_ENV)
    finish(None)  # an export from before the stamp, planned outside `rlhf pipeline`: forced still runs
    assert pipeline.plan_stage(stage, "abc", forced=True) == "run"


def test_only_stage_directories_the_pipeline_made_are_replaced(tmp_path):
    ours = tmp_path / "sft"
    (ours / "export").mkdir(parents=True)
    (ours / "export" / pipeline.STAGE_STATE).write_text("{}")
    (tmp_path / ".reward-0123.removing-1a2b" / "x").mkdir(parents=True)  # what a crash mid-delete left
    pipeline.remove_stage_dir(ours)
    assert list(tmp_path.iterdir()) == []
    # a link (a sweep's, to its keyed stage) loses only the link
    (tmp_path / "keyed").mkdir()
    (tmp_path / "keyed" / "kept.txt").write_text("x")
    (tmp_path / "ppo").symlink_to("keyed")
    pipeline.remove_stage_dir(tmp_path / "ppo")
    assert not (tmp_path / "ppo").is_symlink() and (tmp_path / "keyed" / "kept.txt").is_file()
    (tmp_path / "empty").mkdir()
    pipeline.remove_stage_dir(tmp_path / "empty")
    assert not (tmp_path / "empty").exists()
    (tmp_path / "cut").mkdir()  # a crash while the pipeline wrote its first file there
    (tmp_path / "cut" / f".{pipeline.STAGE_STATE}.tmp").write_text("{")
    pipeline.remove_stage_dir(tmp_path / "cut")
    assert not (tmp_path / "cut").exists()
    # hydra.run.dir=. in the project: its sft/ is source code, not a stage run
    foreign = tmp_path / "reward"
    foreign.mkdir()
    (foreign / "train.py").write_text("source")
    with pytest.raises(ConfigError, match="the pipeline did not make it"):
        pipeline.remove_stage_dir(foreign)
    assert (foreign / "train.py").read_text() == "source"


def test_a_sweep_job_replaces_nothing_before_every_stage_is_composed(tmp_path):
    """A sweep job links its stages to the shared keyed directories only after planning all of them:
    a typo in the PPO stage leaves the job's earlier stage directories as they were."""
    job = tmp_path / "job"
    (job / "sft").mkdir(parents=True)
    (job / "sft" / pipeline.STAGE_STATE).write_text("{}")  # a real stage dir from a run before the sweep
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra.compose("pipeline", overrides=["++ppo.train.max_stepz=1"])
        with pytest.raises(ConfigError, match="ppo.train.max_stepz"):
            pipeline.Pipeline(cfg, job, tmp_path / "stages").run()
    assert (job / "sft" / pipeline.STAGE_STATE).is_file() and not (job / "sft").is_symlink()


def test_a_value_out_of_range_in_a_later_stage_fails_at_planning_before_any_stage_runs(tmp_path):
    """`rlhf pipeline ppo.ema_decay=1.5` stops at once, naming the key as the pipeline takes it, instead
    of after SFT and the reward model have trained (the PPO stage's own check runs only when it starts)."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra.compose("pipeline", overrides=["++ppo.ema_decay=1.5"])
        with pytest.raises(ConfigError, match=r"^ppo.ppo.ema_decay must be in \[0, 1\) .*; got 1.5"):
            pipeline.Pipeline(cfg, tmp_path / "run", None).run()
        with pytest.raises(ConfigError, match=r"^reward.optim.betas\[1\] must be in \[0, 1\); got 1.5"):
            pipeline.compose_stage("reward", {"optim": {"betas": [0.9, 1.5]}}, {}, "/d")
        with pytest.raises(ConfigError, match=r"^sft.train.max_steps must be at least 0; got -1"):
            pipeline.compose_stage("sft", {"experiment": "quick", "train": {"max_steps": -1}}, {}, "/d")
        # a data format the stage cannot read (PPO would have failed on it after SFT and the reward model)
        with pytest.raises(ConfigError, match=r"^ppo.data.format must be one of prompt, .*; got 'hh_rlhf'"):
            bad = hydra.compose(
                "pipeline", overrides=["++ppo.data.path=prompts.jsonl", "++ppo.data.format=hh_rlhf"]
            )
            pipeline.Pipeline(bad, tmp_path / "run", None).run()
        # the evaluation after PPO too: a judge that is not one, or the gold judge off the built-in task
        for overrides, message in ((["eval.judge=gld"], "eval.judge must be one of auto, gold, sentiment"),
                                   (["eval.judge=gold", "++ppo.experiment=imdb"], "eval.judge=gold needs the built-in"),
                                   (["eval.samples_per_prompt=0"], "eval.samples_per_prompt must be at least 1")):  # fmt: skip
            with pytest.raises(ConfigError, match=message):
                pipeline.Pipeline(
                    hydra.compose("pipeline", overrides=overrides), tmp_path / "run", None
                ).run()
        off = hydra.compose("pipeline", overrides=["eval.enabled=false", "eval.judge=gld", "pipeline.stages=[sft]",
                                                  "++sft.train.max_steps=-1"])  # fmt: skip
        with pytest.raises(ConfigError, match="^sft.train.max_steps"):  # the judge is not read when off
            pipeline.Pipeline(off, tmp_path / "run", None).run()
    assert not (tmp_path / "run").exists()  # nothing ran, nothing was written


def test_batch_sizes_that_do_not_fit_the_launchers_ranks_fail_at_planning(tmp_path):
    """What PPO's setup checks against the world size (the prompts split evenly over the ranks, each
    rank's rollout into whole minibatches) and the global batch of any stage, before SFT trains."""
    launcher = {"num_gpus": None, "num_procs": 2, "hostfile": None, "master_port": None, "extra_args": []}
    assert pipeline.planned_world(OmegaConf.create(launcher)) == 2
    assert pipeline.planned_world(OmegaConf.create({**launcher, "num_procs": 1})) == 1
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        for overrides, message in (
            (["launcher.num_procs=2", "++ppo.rollout.batch_size=63"],
             r"^ppo.rollout.batch_size=63 must be divisible by the world size 2 \(the launcher starts 2 rank"),
            (["++ppo.train.micro_batch_size_per_device=48"],
             r"^ppo.rollout.batch_size / world size x rollout.samples_per_prompt = 64 sequences per rank must be"),
            (["++sft.train.global_batch_size=999"], r"^sft.train.global_batch_size=999 but micro_batch_size"),
        ):  # fmt: skip
            with pytest.raises(ConfigError, match=message):
                pipeline.Pipeline(
                    hydra.compose("pipeline", overrides=overrides), tmp_path / "run", None
                ).run()
    assert not (tmp_path / "run").exists()


def test_the_planned_world_is_counted_as_deepspeeds_launcher_counts_it(tmp_path, monkeypatch):
    """With a hostfile or device filters the ranks are counted by DeepSpeed's own launcher functions from
    the stage's launcher arguments, so a batch that does not fit them stops at planning too (before, a
    hostfile left every such check to the stages' start, after the stages before them had trained)."""
    hosts = tmp_path / "hostfile"
    hosts.write_text("# two nodes\nnode-a slots=8\nnode-b slots=8\n")
    launcher = {
        "num_gpus": None,
        "num_procs": 2,
        "hostfile": str(hosts),
        "master_port": None,
        "extra_args": [],
    }

    def world(**changes):
        return pipeline.planned_world(OmegaConf.create({**launcher, **changes}))

    assert world() == 16  # each host's slots: the launcher gets no --num_gpus
    assert "--num_gpus" not in pipeline.launcher_args(OmegaConf.create(launcher), 2)
    assert world(num_gpus=2) == 4  # --num_gpus 2 on each of the two nodes, also from a node without GPUs
    assert world(extra_args=["--num_nodes", "1"]) == 8
    assert world(extra_args=["--include", "node-b:0,1,2"]) == 3
    assert world(extra_args=["--exclude", "node-a"]) == 8
    assert world(hostfile=None, extra_args=["--include", "localhost:0"]) == 1  # this node's devices
    assert world(hostfile=None, extra_args=["-i", "localhost:0"]) == 1  # as DeepSpeed's parser reads them
    uneven = tmp_path / "uneven"
    uneven.write_text("node-a slots=4\nnode-b slots=4\nnode-c slots=2\n")
    assert world(hostfile=str(uneven)) == 10  # not --num_gpus N on every host, which node-c has not got
    # the hosts and their slots are part of the stage key's world, not only the hostfile's name
    described = pipeline.world_description(OmegaConf.create(launcher))
    assert described == f"its slots per node, nodes of {hosts} (node-a=8 node-b=8)"
    assert (
        pipeline.world_description(OmegaConf.create({**launcher, "num_gpus": 2}))
        == f"2 per node, nodes of {hosts} (node-a=8 node-b=8)"
    )
    hosts.write_text("node-a slots=8\nnode-b slots=8\nnode-c slots=8\n")
    assert pipeline.world_description(OmegaConf.create(launcher)) != described
    hosts.write_text("# two nodes\nnode-a slots=8\nnode-b slots=8\n")
    # the launcher backend's own checks (MPI runs the whole hostfile and takes no per-node count)
    assert world(extra_args=["--launcher", "openmpi"]) == 16
    for changes, message in (
        ({"extra_args": ["--include", "node-c"]}, "Hostname 'node-c' not found in hostfile"),
        ({"extra_args": ["--include", "node-a:9"]}, "No slot '9' specified on host 'node-a'"),
        ({"extra_args": ["--include", "node-a", "--num_nodes", "1"]}, "not both"),
        ({"hostfile": str(tmp_path / "missing")}, "launcher.hostfile=.*missing: no such file"),
        (
            {"extra_args": ["--num_nodez", "1"]},
            "the deepspeed launcher does not take the arguments --num_nodez 1",
        ),
        ({"hostfile": None, "extra_args": ["--num_nodes", "2"]}, "--num_nodes 2 needs a hostfile"),
        ({"extra_args": ["-H", str(uneven)]}, "give the hostfile as launcher.hostfile"),
        (
            {"num_gpus": 2, "extra_args": ["--launcher", "openmpi"]},
            "does not support limiting num nodes/gpus",
        ),
        (
            {"extra_args": ["--launcher", "slurm", "-i", "node-a:1@node-b"]},
            "cannot select specific device ids",
        ),
        ({"extra_args": ["--launcher", "lsf"]}, "unknown --launcher lsf"),
    ):
        with pytest.raises(ConfigError, match=message):
            world(**changes)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra.compose("pipeline", overrides=[f"launcher.hostfile={hosts}", "launcher.num_gpus=2",
                                                   "++ppo.rollout.batch_size=66"])  # fmt: skip
        with pytest.raises(ConfigError, match=r"divisible by the world size 4 \(the launcher starts 4 rank"):
            pipeline.Pipeline(cfg, tmp_path / "run", None).run()
    assert not (tmp_path / "run").exists()
    # one GPU node that CUDA_VISIBLE_DEVICES narrows: the launcher must not get --num_gpus, which would
    # put the ranks on GPUs 0..N-1 whatever the variable names; it runs on the named ones itself
    monkeypatch.setattr(pipeline, "_gpus", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    gpu = OmegaConf.create({**launcher, "hostfile": None})
    assert "--num_gpus" not in pipeline.launcher_args(gpu, 4)
    assert pipeline.launcher_args(OmegaConf.create({**launcher, "hostfile": None, "num_gpus": 2}), 2)[:2] == [
        "--num_gpus", "2"]  # fmt: skip
    # not where the launcher would fail without it: GPU UUIDs (it reads slot numbers), or --num_nodes
    # among the extra arguments (it would add an --include of its own beside it)
    assert "--num_gpus" in pipeline.launcher_args(
        OmegaConf.create({**gpu, "extra_args": ["--num_nodes", "1"]}), 4
    )
    # counted as the launcher counts them: the GPUs the variable names, or --num_gpus; unknown where the
    # launcher drops the variable and takes the node's whole pool, which this process cannot see
    assert pipeline.planned_world(OmegaConf.create({**gpu, "extra_args": ["--ssh_port", "2222"]})) == 4
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    monkeypatch.setattr(pipeline, "_gpus", lambda: 2)
    assert pipeline.planned_world(OmegaConf.create({**gpu, "extra_args": ["--ssh_port", "2222"]})) == 2
    assert pipeline.planned_world(OmegaConf.create({**gpu, "extra_args": ["--num_nodes", "1"]})) == 2
    assert (
        pipeline.planned_world(OmegaConf.create({**gpu, "extra_args": ["--include", "localhost:5"]})) is None
    )
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8a1b,GPU-77c2")
    assert pipeline.launcher_args(gpu, 4)[:2] == ["--num_gpus", "4"]
    assert pipeline.planned_world(OmegaConf.create({**gpu, "extra_args": ["--ssh_port", "2222"]})) == 2
    monkeypatch.setattr(pipeline, "_gpus", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert pipeline.launcher_args(gpu, 4)[:2] == ["--num_gpus", "4"]
    # the arguments that choose devices or nodes are part of the stage key's world; others and none are not
    assert pipeline.world_description(gpu) == "4 per node"
    assert (
        pipeline.world_description(OmegaConf.create({**gpu, "extra_args": ["--ssh_port", "2222"]}))
        == "4 per node"
    )
    assert (
        pipeline.world_description(OmegaConf.create({**gpu, "extra_args": ["--include=localhost:1,2"]}))
        == "4 per node, include=localhost:1,2"
    )


def test_the_real_launcher_starts_the_planned_ranks_from_a_hostfiles_slots(tmp_path):
    """The stage's launcher arguments under DeepSpeed's own launcher: one host of 2 slots starts 2 ranks,
    as planned, from a node without GPUs and `launcher.num_procs` 1 (before, the pipeline added
    `--num_gpus 1`, which overrode every host's slots)."""
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    (tmp_path / "show_world.py").write_text(
        'import os\nprint("rank", os.environ["RANK"], "of", os.environ["WORLD_SIZE"])\n'
    )
    launcher = OmegaConf.create({
        "num_gpus": None, "num_procs": 1, "hostfile": str(tmp_path / "hostfile"), "master_port": None,
        # one host: no ssh (the launcher asks ssh for the master address unless it is given)
        "extra_args": ["--no_ssh_check", "--master_addr", "127.0.0.1"],
    })  # fmt: skip
    assert pipeline.planned_world(launcher) == 2
    args = pipeline.launcher_args(launcher, pipeline.ranks_per_node(launcher), free_port())
    env = {**stage_env(1), "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([str(Path(sys.executable).parent / "deepspeed"), *args, "--module", "show_world"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(line for line in proc.stdout.splitlines() if line.startswith("rank ")) == [
        "rank 0 of 2", "rank 1 of 2"]  # fmt: skip


def test_a_stage_that_stops_on_a_setting_stops_the_pipeline_with_its_message(tmp_path, monkeypatch):
    """A stage's exit 2 (core.cli.reported: a setting to fix, found only when it ran) becomes the
    pipeline's own ConfigError, with the stage's log tail, so `rlhf pipeline` ends the same way."""

    real_run = subprocess.run

    def run(cmd, *args, **kwargs):
        if "sft" not in cmd:  # not the stage's command: a library probing the machine on first use
            return real_run(cmd, *args, **kwargs)
        kwargs["stdout"].write("[sft][ERROR] - data.path: no such file\n")
        return subprocess.CompletedProcess(cmd, 2)

    monkeypatch.setattr(pipeline.subprocess, "run", run)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra.compose("pipeline", overrides=["pipeline.stages=[sft]"])
        with pytest.raises(ConfigError, match=r"stage sft failed \(exit 2\)(.|\n)*data.path: no such file"):
            pipeline.Pipeline(cfg, tmp_path / "run", None).run()


@pytest.mark.parametrize("experiment", [None, "imdb_sentiment", "stories_positive"])
def test_every_pipeline_experiment_passes_the_stages_checks_at_planning(experiment):
    """The value checks refuse nothing the pipeline ships (each stage composed as the pipeline would)."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra.compose("pipeline", overrides=[f"experiment={experiment}"] if experiment else [])
        for stage in pipeline.STAGES:
            pipeline.compose_stage(stage, OmegaConf.to_container(cfg[stage]), {}, "/d")


def test_a_stage_that_runs_again_retires_the_old_report_first(tmp_path, monkeypatch):
    """A failed rerun must not leave the last run's report standing beside its new, partial stages."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("report.md", "report.html", "report.json", "eval.json"):
        (run / name).write_text("from the run before")

    def crash(stage, *args, **kwargs):
        assert not (run / "report.json").exists()  # gone before the stage starts
        raise RuntimeError("stage sft failed")

    monkeypatch.setattr(pipeline, "run_stage", crash)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra.compose("pipeline", overrides=["pipeline.stages=[sft]"])
        with pytest.raises(RuntimeError, match="stage sft failed"):
            pipeline.Pipeline(cfg, run, None).run()
    left = sorted(p.name for p in run.iterdir() if p.is_file() and not p.name.endswith(".lock"))
    assert left == ["eval.json"]  # the evaluation's cache stays: it is keyed by the export it judged


def test_a_pipeline_pointed_at_a_foreign_directory_stops_before_deleting_it(tmp_path):
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "notes.txt").write_text("mine")
    proc = run_stage("core.pipeline", f"hydra.run.dir={tmp_path}", "pipeline.stages=[sft]", check=False)
    assert proc.returncode != 0 and "the pipeline did not make it" in proc.stdout + proc.stderr
    assert (tmp_path / "sft" / "notes.txt").read_text() == "mine"


def test_stage_command_in_process_or_under_the_launcher(tmp_path):
    cfg = OmegaConf.create(
        {"num_gpus": None, "num_procs": 1, "hostfile": None, "master_port": None, "extra_args": []}
    )
    assert pipeline.stage_command("sft", tmp_path, cfg)[:3] == [sys.executable, "-m", "sft"]
    cfg.num_procs, cfg.master_port = 2, 29555
    cmd = pipeline.stage_command("ppo", tmp_path, cfg)
    assert Path(cmd[0]).name == "deepspeed" and cmd[1:5] == ["--num_gpus", "2", "--master_port", "29555"]
    assert cmd[5:7] == ["--module", "ppo"] and f"hydra.run.dir={tmp_path.resolve()}" in cmd


# ----------------------------------------------------------------------------- end to end


def test_pipeline_hands_exports_over_and_reports_what_it_logged(short_run):
    run = short_run
    for stage in ("sft", "reward", "ppo"):
        assert (run / stage / "export" / "export_info.json").is_file(), stage
    AutoModelForCausalLM.from_pretrained(run / "sft" / "export")
    AutoModelForSequenceClassification.from_pretrained(run / "reward" / "export")
    AutoModelForCausalLM.from_pretrained(run / "ppo" / "export")
    AutoModelForSequenceClassification.from_pretrained(run / "ppo" / "export_critic")
    # each stage read the previous one's export
    reward_cfg = OmegaConf.load(run / "reward" / "pipeline_stage_config.yaml")
    ppo_cfg = OmegaConf.load(run / "ppo" / "pipeline_stage_config.yaml")
    sft_export, rm_export = (
        str((run / "sft" / "export").resolve()),
        str((run / "reward" / "export").resolve()),
    )
    assert reward_cfg.model.name_or_path == sft_export
    assert ppo_cfg.actor.name_or_path == ppo_cfg.ref.name_or_path == sft_export
    assert ppo_cfg.reward_model.name_or_path == ppo_cfg.critic.name_or_path == rm_export
    assert {ppo_cfg.logger.group} == {reward_cfg.logger.group} and ppo_cfg.logger.job_type == "ppo"

    report = json.loads((run / "report.json").read_text())
    for key in ("win_rate", "tie_rate", "sft_gold_mean", "ppo_gold_mean", "ppo_kl", "wall_s"):
        assert isinstance(report[key], float), key
    assert abs(report["win_rate"] + report["tie_rate"] + report["loss_rate"] - 1) < 1e-9
    assert report["num_prompts"] == 60 and report["num_comparisons"] == 60  # held-out prompts x 1 sample
    assert actions(run) == {"sft": "run", "reward": "run", "ppo": "run"}
    # every plot is a PNG, and draws exactly the numbers the stages logged
    drawn = json.loads((run / "plots" / "data.json").read_text())
    assert {"sft_loss.png", "reward_accuracy.png", "ppo_reward.png", "ppo_kl.png", "ppo_gold.png",
            "reward_vs_kl.png"} <= drawn.keys()  # fmt: skip
    for file in drawn:
        assert (run / "plots" / file).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", file
    ppo_rows, sft_rows = read_metrics(run / "ppo"), read_metrics(run / "sft")
    assert drawn["ppo_kl.png"]["series"]["rollout"] == [
        [r["step"], r["ppo/kl"]] for r in ppo_rows if "ppo/kl" in r
    ]
    assert drawn["sft_loss.png"]["series"]["train"] == [
        [r["step"], r["train/loss"]] for r in sft_rows if "train/loss" in r
    ]
    assert drawn["reward_vs_kl.png"]["series"]["gold reward"] == [
        [r["ppo/kl"], r["gold/reward"]] for r in ppo_rows if "gold/reward" in r
    ]
    assert len(drawn["ppo_kl.png"]["series"]["rollout"]) == 4
    md, page = (run / "report.md").read_text(), (run / "report.html").read_text()
    for file in drawn:
        assert f"](plots/{file})" in md
    assert page.count("data:image/png;base64,") == len(drawn) and 'src="plots/' not in page  # self-contained
    assert f"{report['win_rate']:.3f}" in md and f"{report['ppo_kl']:.3f}" in page
    assert md.count(" [") >= 6  # three sample rows, SFT and PPO responses with their gold scores


def test_evaluate_command_on_an_export(short_run, tmp_path):
    out = tmp_path / "eval.json"
    run_stage("core.cli", "evaluate", str(short_run / "ppo" / "export"), "--samples-per-prompt", "1",
              "--out", str(out))  # fmt: skip
    result = json.loads(out.read_text())
    assert result["baseline"] == str((short_run / "sft" / "export").resolve())
    assert result["num_comparisons"] == 60 and 0 <= result["win_rate"] <= 1


def test_rerun_skips_done_stages_and_reruns_what_changed(copy_of):
    run = copy_of
    mtime = {s: (run / s / "export" / "export_info.json").stat().st_mtime for s in ("sft", "reward", "ppo")}
    run_pipeline(f"hydra.run.dir={run}")
    assert actions(run) == {"sft": "skip", "reward": "skip", "ppo": "skip"}
    assert all((run / s / "export" / "export_info.json").stat().st_mtime == t for s, t in mtime.items())
    run_pipeline(f"hydra.run.dir={run}", "ppo.kl_coef=0.2")  # a PPO key: PPO only
    assert actions(run) == {"sft": "skip", "reward": "skip", "ppo": "run"}
    assert OmegaConf.load(run / "ppo" / "pipeline_stage_config.yaml").ppo.kl_coef == 0.2
    evaluated = (run / "eval.json").stat().st_mtime
    run_pipeline(f"hydra.run.dir={run}", "ppo.kl_coef=0.2", "pipeline.from_stage=reward")
    assert actions(run) == {"sft": "skip", "reward": "run", "ppo": "run"}
    assert (run / "eval.json").stat().st_mtime > evaluated  # the same keys, but a new PPO export
    stamp = {s: json.loads((run / s / "export" / pipeline.STAGE_STATE).read_text())["invocation"]
             for s in ("sft", "reward", "ppo")}  # fmt: skip
    assert stamp["reward"] == stamp["ppo"] != stamp["sft"] and len(stamp["ppo"]) == 32  # this command's id


def test_a_pipeline_of_ppo_alone_evaluates_against_the_reference_ppo_used(copy_of):
    run = copy_of
    sft, rm = (str((run / s / "export").resolve()) for s in ("sft", "reward"))
    # the actor as `python -m ppo` alone finds it: the newest export under runs_dir/sft/*/export
    runs = run / "runs"
    (runs / "sft" / "a").mkdir(parents=True)
    (runs / "sft" / "a" / "export").symlink_to(sft)
    run_pipeline(f"hydra.run.dir={run}/alone", "pipeline.stages=[ppo]", f"ppo.runs_dir={runs}",
                 f"ppo.reward_model.name_or_path={rm}")  # fmt: skip
    report = json.loads((run / "alone" / "report.json").read_text())
    assert actions(run / "alone") == {"ppo": "run"} and isinstance(report["win_rate"], float)
    staged = OmegaConf.load(run / "alone" / "ppo" / "pipeline_stage_config.yaml")
    assert staged.actor.name_or_path == str(runs / "sft" / "a" / "export")  # found at planning: in the key
    result = json.loads((run / "alone" / "eval.json").read_text())["result"]
    assert Path(result["baseline"]).resolve() == Path(sft) and result["baseline_name"] == "reference"


def test_a_killed_stage_resumes(copy_of):
    run = copy_of
    shutil.rmtree(run / "ppo")  # so the checkpoints waited for below are the new run's
    args = [sys.executable, "-m", "core.pipeline", *SHORT, f"hydra.run.dir={run}", "ppo.train.max_steps=8",
            "ppo.train.save_every=2"]  # fmt: skip
    proc = subprocess.Popen(args, cwd=ROOT, env=stage_env(CORES_PER_TEST), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    latest = run / "ppo" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not (latest.is_file() and latest.read_text().strip() >= "step-00000004") and time.time() < deadline:
        assert proc.poll() is None, "the pipeline ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the pipeline and its PPO process, mid-stage
    proc.wait()
    assert not (run / "ppo" / "export" / pipeline.STAGE_STATE).exists()
    run_pipeline(f"hydra.run.dir={run}", "ppo.train.max_steps=8", "ppo.train.save_every=2")
    assert actions(run) == {"sft": "skip", "reward": "skip", "ppo": "resume"}
    assert "resume: continuing from" in (run / "ppo" / "stage.log").read_text()
    steps = [r["step"] for r in read_metrics(run / "ppo") if "ppo/kl" in r]
    assert steps == list(range(1, 9))  # replayed steps were rewound: one row per step


@pytest.mark.distributed
def test_sweep_shares_sft_and_reward_and_writes_a_sweep_report(tmp_path):
    """Also the launcher path: every stage runs under `deepspeed` with two CPU ranks."""
    sweep = tmp_path / "sweep"
    proc = run_pipeline(f"hydra.sweep.dir={sweep}", "ppo.kl_coef=0.01,0.3", "launcher.num_procs=2",
                        "ppo.deepspeed@actor_ds=zero3", multirun=True)  # fmt: skip
    assert (proc.stdout + proc.stderr).count("deepspeed --num_gpus 2") == 4  # sft, reward, ppo, ppo
    shares = read_metrics(sweep / "0" / "ppo")[0]
    # ZeRO-3 on 2 ranks: each holds half of every parameter and, as every matrix of the built-in model is
    # below DeepSpeed's persistence threshold (tests/conftest.py), the whole too (ZeRO-2 would read 1.0)
    assert shares["zero/actor_param_share_rank0"] == shares["zero/actor_param_share_rank1"] == 1.5
    for stage in ("sft", "reward"):
        assert (sweep / "0" / stage).resolve() == (sweep / "1" / stage).resolve(), stage
    assert (sweep / "0" / "ppo").resolve() != (sweep / "1" / "ppo").resolve()
    assert (
        len(list((sweep / "stages").glob("sft-*"))) == 1 and len(list((sweep / "stages").glob("ppo-*"))) == 2
    )
    assert actions(sweep / "1") == {"sft": "skip", "reward": "skip", "ppo": "run"}
    runs = json.loads((sweep / "sweep_report.json").read_text())
    assert [r["overrides"] for r in runs] == ["ppo.kl_coef=0.01", "ppo.kl_coef=0.3"], proc.stdout[-2000:]
    assert (sweep / "sweep_frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert "ppo.kl_coef=0.3" in (sweep / "sweep_report.md").read_text()
