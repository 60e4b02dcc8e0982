"""The reward recipe's encoding of a pair's replies (the rest runs end to end in test_reward_e2e.py)."""

import json
from pathlib import Path

from hydra import compose, initialize_config_dir

import reward.config  # noqa: F401  (registers reward_schema)
from data.builtin.tokenizer import build_tokenizer
from data.formats import Conversation, Message, PreferencePair
from data.templates import PromptFormatter
from reward.train import RewardRecipe
from tests.conftest import ROOT


def test_a_long_pair_is_cut_from_the_left_keeping_the_bos_and_the_scored_end():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        r = RewardRecipe(compose("reward", overrides=["data.max_len=10"]), run_dir=Path("unused"))
    tok = build_tokenizer()  # adds a BOS, as Llama's tokenizer does
    r.formatter, r.num_truncated = PromptFormatter(tok, **r.cfg.data.template), 0
    prompt = (Message("user", "the crust was great . the service was slow . we will be back"),)
    short = r._encode_reply((Message("user", "ok"),), "good")
    assert r.num_truncated == 0 and short[0] == tok.bos_token_id and short[-1] == tok.eos_token_id
    whole = r.formatter.encode(Conversation((*prompt, Message("assistant", "the service was great"))), 10**9)
    ids = r._encode_reply(prompt, "the service was great")
    assert r.num_truncated == 1 and len(whole.input_ids) > 10
    assert ids == [tok.bos_token_id] + whole.input_ids[-9:]  # the BOS, then the end: the EOS is scored
    assert ids[-1] == tok.eos_token_id


def test_a_ranked_prompts_pairs_are_held_out_together(tmp_path):
    """Three ranked replies make three pairs of one prompt: a split by pair would train on a prompt
    (and replies) that evaluation then scores."""
    path = tmp_path / "ranked.jsonl"
    rows = [
        {
            "prompt": f"question {i}",
            "responses": ["the crust was great .", "the crust was okay .", "the crust was awful ."],
            "ranks": [0, 1, 2],
        }
        for i in range(20)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    overrides = ["data=file", f"data.path={path}", "data.format=ranked", "data.eval_fraction=0.2",
                 "train.micro_batch_size_per_device=4"]  # fmt: skip
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        r = RewardRecipe(compose("reward", overrides=overrides), run_dir=Path("unused"))
    r.formatter = PromptFormatter(build_tokenizer(), **r.cfg.data.template)
    r._setup_data()
    train, held = ({p.prompt for p in pairs} for pairs in (r.train_pairs, r.eval_pairs))
    assert len(r.eval_pairs) == 12 and len(held) == 4  # 20 % of 60 pairs: four prompts, whole
    assert not train & held and len(train) == 16


def test_a_pair_whose_replies_the_cut_makes_alike_is_left_out():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        r = RewardRecipe(compose("reward", overrides=["data.max_len=10"]), run_dir=Path("unused"))
    r.formatter, r.num_truncated, r.num_identical = (
        PromptFormatter(build_tokenizer(), **r.cfg.data.template),
        0,
        0,
    )
    prompt = (Message("user", "review the pizza ."),)
    tail = " the service was slow . we will be back"
    alike = PreferencePair(prompt, "the crust was great ." + tail, "the sauce was awful ." + tail, 0.0, "a")
    apart = PreferencePair(prompt, "the crust was great .", "the sauce was awful .", 0.0, "b")
    kept, encoded = r._encode([alike, apart])
    assert kept == [apart] and r.num_identical == 1 and r.num_truncated >= 2
    assert encoded[0].chosen != encoded[0].rejected
