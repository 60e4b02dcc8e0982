"""The PPO recipe's pure parts: how evaluation shares out prompts, and the settings it refuses."""

import json
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import ppo.config  # noqa: F401  (registers ppo_schema)
from core.config import ConfigError
from data.builtin.tokenizer import build_tokenizer
from data.formats import Message
from data.templates import PromptFormatter
from ppo.config import check_config, check_world
from ppo.train import PPORecipe, eval_batches
from tests.conftest import ROOT


@pytest.mark.parametrize("n", [0, 1, 7, 60, 97])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("batch", [1, 4, 32])
def test_eval_batches_are_alike_on_every_rank_and_cover_each_prompt_once(n, world, batch):
    shares = [eval_batches(n, world, rank, batch) for rank in range(world)]
    sizes = {tuple(len(chunk) for chunk, _ in share) for share in shares}
    assert len(sizes) == 1, sizes  # the same batches, of the same sizes: the same collective calls
    own = [i for share in shares for chunk, real in share for i in chunk[:real]]
    assert sorted(own) == list(range(n))
    assert all(len(chunk) <= batch for share in shares for chunk, _ in share)


def test_eval_batches_fill_a_short_rank_with_its_first_prompt():
    # 97 prompts on 2 ranks: 49 + 48; in batches of 32 the second rank's last batch has 16 + 1 filler
    (_, (chunk0, real0)), (_, (chunk1, real1)) = (eval_batches(97, 2, r, 32) for r in (0, 1))
    assert (len(chunk0), real0) == (17, 17)
    assert (len(chunk1), real1) == (17, 16) and chunk1[-1] == chunk1[0] == 81


def recipe(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return PPORecipe(compose("ppo", overrides=list(overrides)), run_dir=Path("unused"))


def cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("ppo", overrides=list(overrides))


def test_kl_as_a_loss_refuses_k1():
    with pytest.raises(ConfigError, match="kl_in=loss needs ppo.kl_estimator=k2 or k3"):
        check_config(cfg("ppo.kl_in=loss", "ppo.kl_estimator=k1"))
    for estimator in ("k2", "k3"):
        check_config(cfg("ppo.kl_in=loss", f"ppo.kl_estimator={estimator}"))
    check_config(cfg("ppo.kl_in=reward", "ppo.kl_estimator=k1"))


@pytest.mark.parametrize(
    "override, message",
    [("ppo.kl_estimator=k4", "ppo.kl_estimator must be one of k1, k2, k3; got 'k4'"),
     ("ppo.reward_norm=rm", "ppo.reward_norm must be one of none, rm_stats, running; got 'rm'"),
     ("ppo.epochs=0", "ppo.epochs must be at least 1; got 0"),
     ("rollout.batch_size=0", "rollout.batch_size must be at least 1; got 0"),
     ("train.max_steps=-1", "train.max_steps must be at least 1; got -1"),
     ("rollout.max_new_tokens=0", "rollout.max_new_tokens must be at least 1; got 0"),
     ("rollout.min_new_tokens=40", r"rollout.min_new_tokens must not exceed max_new_tokens \(32\); got 40"),
     ("rollout.temperature=0", "rollout.temperature must be above 0"),
     ("rollout.top_p=1.5", r"rollout.top_p must be in \(0, 1\]"),
     ("rollout.top_k=-1", "rollout.top_k must be at least 0; got -1"),
     ("ppo.ema_decay=1.5", r"ppo.ema_decay must be in \[0, 1\) \(0 or null: no EMA\); got 1.5"),
     ("ppo.gae_lambda=1.2", r"ppo.gae_lambda must be in \[0, 1\]; got 1.2"),
     ("ppo.clip_eps=0", "ppo.clip_eps must be above 0; got 0"),
     ("ppo.value_clip_eps=-0.2", "ppo.value_clip_eps must be above 0 or null; got -0.2"),
     ("ppo.kl_target=0", "ppo.kl_target must be above 0 or null; got 0"),
     ("ppo.kl_coef=-0.1", "ppo.kl_coef must be at least 0; got -0.1"),
     ("ptx.coef=-1", "ptx.coef must be at least 0; got -1"),
     ("experiment=bench bench.workload=wl", "bench.steps must be at least 1; got 0"),
     ("actor_optim.lr=-1", "actor_optim.lr must be at least 0; got -1"),
     ("critic_optim.betas=[0.9,1.0]", r"critic_optim.betas\[1\] must be in \[0, 1\); got 1.0"),
     ("critic_ds.stage=4", "critic_ds.stage must be 0, 1, 2 or 3, got 4"),
     ("actor_ds.offload_param=true", "actor_ds.offload_param needs ZeRO stage 3")],
)  # fmt: skip
def test_misspelt_choices_and_values_out_of_range_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        check_config(cfg(*override.split()))


def test_values_at_the_edges_of_their_ranges_pass():
    # the frozen models have no optimizer: their offload_optimizer is not read, so not refused either
    check_config(cfg("deepspeed@frozen_ds=zero0", "frozen_ds.offload_optimizer=true"))
    check_config(cfg("ppo.early_stop_kl=-1"))  # a threshold below any KL: one minibatch per update
    check_config(cfg("ppo.ema_decay=0.99", "rollout.min_new_tokens=32", "ppo.gamma=1", "ppo.gae_lambda=0",
                     "ppo.value_clip_eps=null", "ppo.kl_target=6", "rollout.top_p=1", "actor_optim.lr=0",
                     "ptx.coef=0", "ptx.micro_batch_size_per_device=0"))  # fmt: skip
    with pytest.raises(ConfigError, match="ptx.micro_batch_size_per_device must be at least 1; got 0"):
        check_config(cfg("ptx.coef=0.5", "ptx.micro_batch_size_per_device=0"))  # read only when ptx is on


def test_batch_sizes_are_checked_against_the_world_size():
    check_world(cfg(), 1)
    check_world(cfg(), 2)  # 64 prompts: 32 per rank, one minibatch of 32
    with pytest.raises(ConfigError, match="rollout.batch_size=64 must be divisible by the world size 3"):
        check_world(cfg(), 3)
    with pytest.raises(ConfigError, match="= 16 sequences per rank must be a multiple of .* = 32"):
        check_world(cfg("rollout.batch_size=32"), 2)
    check_world(cfg("rollout.batch_size=32", "rollout.samples_per_prompt=2"), 2)  # 32 sequences per rank
    with pytest.raises(ConfigError, match=r"train.global_batch_size=32 but .* x world size \(2\) = 64"):
        check_world(cfg("train.global_batch_size=32"), 2)


def test_setup_checks_the_values_before_loading_anything():
    with pytest.raises(ConfigError, match="ppo.epochs must be at least 1"):
        recipe("ppo.epochs=0", "actor.name_or_path=/nonexistent").setup()


def test_a_reference_or_critic_without_a_path_loads_its_sources_checkpoint_the_same_way():
    r = recipe("actor.name_or_path=org/policy", "actor.revision=v1", "actor.attn_implementation=eager",
               "reward_model.name_or_path=org/rm", "reward_model.trust_remote_code=true",
               "ref.name_or_path=null", "critic.name_or_path=null")  # fmt: skip
    r._resolve_paths()
    c = r.cfg
    assert (c.ref.name_or_path, c.ref.revision, c.ref.attn_implementation) == ("org/policy", "v1", "eager")
    assert (c.critic.name_or_path, c.critic.trust_remote_code, c.critic.revision) == ("org/rm", True, None)
    # a reference given by path keeps its own settings
    r = recipe("actor.name_or_path=org/policy", "actor.revision=v1", "reward_model.name_or_path=org/rm",
               "ref.name_or_path=org/other")  # fmt: skip
    r._resolve_paths()
    assert (r.cfg.ref.name_or_path, r.cfg.ref.revision) == ("org/other", None)


def test_a_resumed_run_keeps_the_models_its_checkpoint_recorded(tmp_path, caplog):
    # null paths took the newest exports at every start: an SFT or reward run finished since would have
    # changed the resumed run's frozen reference and reward model halfway
    from core.checkpoint import TRAINER_STATE

    for stage, run in (("sft", "a"), ("reward", "a"), ("sft", "b"), ("reward", "b")):  # b: newer
        (tmp_path / "runs" / stage / run / "export").mkdir(parents=True)
        (tmp_path / "runs" / stage / run / "export" / "export_info.json").write_text("{}")
        time.sleep(0.01)
    old = {role: str(tmp_path / "runs" / stage / "a" / "export")
           for role, stage in (("actor", "sft"), ("ref", "sft"), ("critic", "reward"), ("reward_model", "reward"))}  # fmt: skip
    saved = tmp_path / "run" / "checkpoints" / "step-00000002"
    saved.mkdir(parents=True)
    (saved / TRAINER_STATE).write_text(json.dumps({"step": 2, "models": old}))

    def resolved(*overrides):
        r = recipe(f"runs_dir={tmp_path / 'runs'}", *overrides)
        r.run_dir = tmp_path / "run"
        r._resolve_paths()
        return {role: r.cfg[role].name_or_path for role in old}

    assert resolved("train.resume=true") == old
    newest = {role: path.replace("/a/", "/b/") for role, path in old.items()}
    assert resolved("train.resume=false") == newest  # a fresh run takes the newest
    with caplog.at_level("WARNING"):  # a path given anew is the user's choice, with a warning
        assert resolved("train.resume=true", f"reward_model.name_or_path={newest['reward_model']}") == {
            **old, "critic": newest["critic"], "reward_model": newest["reward_model"]}  # fmt: skip
    assert "resume: reward_model.name_or_path is" in caplog.text


def test_a_critic_or_reference_with_another_vocabulary_than_the_actor_is_refused(tmp_path):
    """Both read the actor's token ids; the reward model may differ (its text is re-tokenised)."""
    same, other = tmp_path / "same", tmp_path / "other"
    build_tokenizer().save_pretrained(same)
    extended = build_tokenizer()
    extended.add_tokens(["<extra>"])
    extended.save_pretrained(other)
    roles = ("actor", "critic", "ref", "reward_model")

    def setup(peft="none", **tokenizers):
        r = recipe(*(f"{role}.name_or_path={same}" for role in roles), f"peft={peft}",
                   *(f"{role}.tokenizer={tokenizers.get(role, same)}" for role in roles))  # fmt: skip
        r._setup_tokenizers()
        return r

    assert setup(reward_model=other).rm_shares_tokens is False
    with pytest.raises(ConfigError, match="critic.name_or_path=.* has a different tokenizer from the actor"):
        setup(critic=other)
    with pytest.raises(ConfigError, match="ref.name_or_path=.* has a different tokenizer from the actor"):
        setup(ref=other)
    setup(peft="lora", ref=other)  # the reference is the actor with its adapters off: `ref` is not read


def test_long_prompts_are_cut_from_the_left_keeping_the_bos_and_the_generation_cue():
    r = recipe("data.max_len=8")
    # the built-in tokenizer adds a BOS, as Llama's does
    r.formatter = PromptFormatter(build_tokenizer(), **r.cfg.data.template)
    messages = (Message("user", "the crust was great . the service was slow . we will be back"),)
    whole = r.formatter.encode_prompt(messages)
    assert len(whole) > 8
    cut = r._encode_prompt(messages)
    assert cut == [whole[0]] + whole[-7:] and whole[0] == r.formatter.tokenizer.bos_token_id


def test_saved_reward_statistics_that_cannot_normalise_are_refused(tmp_path):
    stats = tmp_path / "reward_stats.json"
    r = recipe("ppo.reward_norm=rm_stats", f"reward_model.name_or_path={tmp_path}")
    stats.write_text(json.dumps({"mean": 0.5, "std": 2.0, "count": 60}))
    assert r._reward_stats() == {"mean": 0.5, "std": 2.0, "count": 60}
    for mean, std in ((0.5, 0.0), (0.5, -1.0), (float("nan"), 1.0), (0.5, float("inf")), (0.5, None)):
        stats.write_text(json.dumps({"mean": mean, "std": std, "count": 60}))
        with pytest.raises(ConfigError, match="cannot normalise scores .* use ppo.reward_norm=running"):
            r._reward_stats()
