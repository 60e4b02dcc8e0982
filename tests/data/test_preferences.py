import json

import pytest

from data.formats import DataError, Message, PreferencePair, load_preferences, split_hh

HH_CHOSEN = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Fine, thanks."
HH_REJECTED = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Go away."
PROMPT = (Message("user", "Hi there"), Message("assistant", "Hello!"), Message("user", "How are you?"))


def write(tmp_path, rows, name="p.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    "row",
    [
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
        {"prompt": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "How are you?"}], "chosen": "Fine, thanks.", "rejected": "Go away."},
        {"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"},
                           {"from": "human", "value": "How are you?"}],
         "chosen": {"from": "gpt", "value": "Fine, thanks."}, "rejected": {"from": "gpt", "value": "Go away."}},
        {"prompt": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "How are you?"}],
         "chosen": [{"role": "assistant", "content": "Fine, thanks."}], "rejected": [{"role": "assistant", "content": "Go away."}]},
        {"prompt": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "How are you?"}], "responses": ["Go away.", "Fine, thanks."], "ranks": [1, 0]},
    ],
    ids=["hh", "pairwise-strings", "sharegpt_pairs", "pairwise-messages", "ranked-list"],
)  # fmt: skip
def test_every_format_parses_to_the_same_pair(tmp_path, row):
    (pair,), report = load_preferences(write(tmp_path, [row]), None)
    assert isinstance(pair, PreferencePair) and report.kept == 1
    assert pair.prompt == PROMPT and pair.chosen == "Fine, thanks." and pair.rejected == "Go away."


def test_hh_prefix_split_tolerates_replies_that_differ_only_at_the_end():
    chosen = "\n\nHuman: Q1\n\nAssistant: A1\n\nHuman: Q2\n\nAssistant: Same start, good end"
    rejected = "\n\nHuman: Q1\n\nAssistant: A1\n\nHuman: Q2\n\nAssistant: Same start, bad end"
    prompt, c, r = split_hh(chosen, rejected, "x:1")
    assert [m.role for m in prompt] == ["user", "assistant", "user"] and prompt[-1].content == "Q2"
    assert (c, r) == ("Same start, good end", "Same start, bad end")
    with pytest.raises(DataError, match="share no"):
        split_hh("\n\nHuman: a", "\n\nHuman: b", "x:1")


def test_ranked_oasst_tree_expands_every_sibling_pair_with_different_ranks(tmp_path):
    def reply(text, rank, replies=()):
        return {"text": text, "role": "assistant", "rank": rank, "replies": list(replies)}

    follow_up = {"text": "More?", "role": "prompter", "replies": [reply("x", 0), reply("y", 1)]}
    tree = {"prompt": {"text": "Q", "role": "prompter", "replies": [reply("a", 0, [follow_up]), reply("b", 1), reply("c", 2),
                                                                     reply("d", None)]}}  # fmt: skip
    pairs, _ = load_preferences(write(tmp_path, [tree]), "ranked")
    top = [(p.chosen, p.rejected) for p in pairs if len(p.prompt) == 1]
    assert sorted(top) == [
        ("a", "b"),
        ("a", "c"),
        ("b", "c"),
    ]  # 3 ranked siblings -> 3 pairs; unranked ignored
    deep = [p for p in pairs if len(p.prompt) == 3]
    assert [(p.chosen, p.rejected) for p in deep] == [("x", "y")]
    assert deep[0].prompt == (Message("user", "Q"), Message("assistant", "a"), Message("user", "More?"))


def test_margin_and_skips_are_counted(tmp_path):
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2.5},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "p", "chosen": "", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": "b"},
    ]
    pairs, report = load_preferences(write(tmp_path, rows), None)  # skips happen even with on_error=raise
    assert [p.margin for p in pairs] == [2.5, 0.0]
    assert report.skipped == {"identical chosen and rejected": 1, "empty response": 1}


def test_empty_replies_are_counted_and_skipped_in_every_layout(tmp_path):
    """An empty reply given as a message object, and a ranked record left with no usable pair, are
    skipped and counted like an empty string reply, not errors."""
    sharegpt = {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": ""},
                "rejected": {"from": "gpt", "value": "b"}}  # fmt: skip
    pairwise = {"prompt": "q", "chosen": [{"role": "assistant", "content": ""}], "rejected": "b"}
    ranked = [
        {"prompt": "q", "responses": ["a", "b"], "ranks": [0, 0]},  # tied
        {"prompt": "q", "responses": ["a", "a", ""], "ranks": [0, 1, 2]},  # identical, and empty
        {"prompt": "q", "responses": ["a", "b"], "ranks": [0, 1]},
    ]
    for name, rows, skipped in (("s", [sharegpt, sharegpt | {"chosen": {"from": "gpt", "value": "a"}}], 1),
                                ("p", [pairwise, pairwise | {"chosen": "a"}], 1), ("r", ranked, 2)):  # fmt: skip
        path = tmp_path / name / "p.jsonl"
        path.parent.mkdir()
        pairs, report = load_preferences(write(path.parent, rows), None)
        assert len(pairs) == 1 and sum(report.skipped.values()) == skipped, (name, report)
    with pytest.raises(DataError, match="'responses' must be strings"):
        load_preferences(write(tmp_path, [{"prompt": "q", "responses": ["a", 3], "ranks": [0, 1]}]), None)


@pytest.mark.parametrize(
    "rows, pattern",
    [
        (
            [{"prompt": "p", "chosen": 3, "rejected": "b"}],
            r"p.jsonl:1: field 'chosen' must be a string, got int",
        ),
        (
            [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}],
            r"p.jsonl:2: missing field 'rejected'",
        ),
        (
            [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}],
            r"field 'margin' must be a number",
        ),
        ([{"chosen": "no dialogue", "rejected": "here"}], r"share no"),
        (  # the reward model would score a reply to an assistant turn
            [
                {
                    "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                    "chosen": "x",
                    "rejected": "y",
                }
            ],
            r"p.jsonl:1: a prompt must end with a user turn",
        ),  # fmt: skip
        ([{"text": "x"}], r"cannot tell the preference format from fields \['text'\]"),
        (
            [{"prompt": "p", "responses": ["a", "b"], "ranks": [0]}],
            r"'ranks' must be integers, one per response",
        ),
    ],
)
def test_bad_preference_input_names_file_line_and_field(tmp_path, rows, pattern):
    with pytest.raises(DataError, match=pattern):
        load_preferences(write(tmp_path, rows), None)


SHARED_FILES = [
    ("hh-rlhf/harmless-base/test.jsonl.gz", "hh", 2300),
    ("hh-rlhf/helpful-base/test.jsonl.gz", "hh", 2300),
    ("llama-factory/dpo_en_demo.json", "sharegpt_pairs", 300),
    ("oasst-en100/en_100_tree.jsonl", "ranked", 500),
    ("rasbt/instruction-data-with-preference.json", "pairwise", 1000),
]


@pytest.mark.shared_data
@pytest.mark.parametrize("path, fmt, at_least", SHARED_FILES, ids=[p for p, _, _ in SHARED_FILES])
def test_every_shared_preference_file_parses(shared_data, path, fmt, at_least):
    pairs, report = load_preferences(str(shared_data / path), None)  # format auto-detected, no error
    assert len(pairs) >= at_least
    assert all(p.chosen.strip() and p.rejected.strip() and p.chosen != p.rejected for p in pairs)
    assert all(p.prompt and p.prompt[-1].role == "user" for p in pairs)
    assert load_preferences(str(shared_data / path), fmt)[0] == pairs
