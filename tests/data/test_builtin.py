import random
import statistics

from data.builtin import sft_conversations, task
from data.builtin.tokenizer import build_tokenizer

P = "write a review of the pizza you had last week ."


def test_gold_judge_rules():
    g = task.gold_score
    assert (
        g(
            P,
            "the crust was great . the sauce was lovely . the cheese was superb . the toppings was excellent .",
        )
        == 4
    )
    assert g(P, "the crust was awful .") == -1
    assert g(P, "the crust was okay .") == 0
    assert g(P, "the plot was great .") == -1  # off topic (a movie's aspect)
    assert g(P, "the crust was great . the crust was great .") == 0  # +1 then a repeat
    assert g(P, "the crust was great . the sauce was") == 0  # +1, stops mid-sentence
    assert g(P, "crust great crust .") == -1  # does not parse
    assert g(P, "") == -2
    assert g("review the movie near the station .", "the plot was great .") == 1


def test_prompts_split_into_disjoint_train_and_held_out():
    train, held = task.split_prompts(seed=0)
    assert len(train) + len(held) == len(task.all_prompts()) == 300
    assert not set(train) & set(held)
    assert task.split_prompts(seed=0) == (train, held)
    t, e = sft_conversations(200, seed=0, eval_fraction=0.1)
    assert {c.messages[0].content for c in t} <= set(train) and {c.messages[0].content for c in e} <= set(
        held
    )


def test_demonstrations_are_mixed_quality_and_deterministic():
    rng = random.Random(0)
    prompts = task.all_prompts()
    scores = [task.gold_score(p, task.demonstration(p, rng)) for p in prompts * 5]
    assert -1.5 < statistics.mean(scores) < 0.5  # room to improve towards +4
    assert max(scores) >= 3 and min(scores) <= -3
    assert task.sft_examples(20, 1, prompts) == task.sft_examples(20, 1, prompts)


def test_preference_pairs_follow_the_gold_judge_with_noise():
    pairs = task.preference_pairs(1000, seed=0, prompts=task.all_prompts())
    agree = statistics.mean(p.gold_agrees for p in pairs)
    assert 0.75 < agree < 0.95  # noisy like human raters, but mostly right
    assert all(p.chosen != p.rejected for p in pairs)


def test_tokenizer_covers_the_task_and_round_trips():
    tok = build_tokenizer()
    rng = random.Random(1)
    for p in task.all_prompts()[:50]:
        text = task.demonstration(p, rng)
        ids = tok(p + " " + text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == p + " " + text
    assert tok.pad_token_id not in (tok.eos_token_id, tok.bos_token_id)
