import gzip
import json

import pytest

from data.formats import Conversation, DataError, Message, load_conversations, opening, split_train_eval


def write_jsonl(path, rows, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return str(path)


ALPACA = {"instruction": "Add", "input": "2 and 3", "output": "5"}
MESSAGES = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]
}
SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
PROMPT = {"prompt": "Hi", "response": "Hello"}


@pytest.mark.parametrize(
    "row, expected",
    [
        (ALPACA, [("user", "Add\n\n2 and 3"), ("assistant", "5")]),
        (MESSAGES, [(m["role"], m["content"]) for m in MESSAGES["messages"]]),
        (SHAREGPT, [("user", "Hi"), ("assistant", "Hello")]),
        (PROMPT, [("user", "Hi"), ("assistant", "Hello")]),
    ],
    ids=["alpaca", "messages", "sharegpt", "prompt"],
)
def test_each_format_autodetected_to_one_record_type(tmp_path, row, expected):
    records, report = load_conversations(write_jsonl(tmp_path / "d.jsonl", [row, row]), None)
    assert report.kept == 2
    assert isinstance(records[0], Conversation)
    assert [(m.role, m.content) for m in records[0].messages] == expected
    assert records[1].source.endswith("d.jsonl:2")


def test_json_list_gz_and_parquet(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([ALPACA, ALPACA]))
    assert len(load_conversations(str(tmp_path / "a.json"), "alpaca")[0]) == 2
    assert len(load_conversations(write_jsonl(tmp_path / "a.jsonl.gz", [PROMPT] * 3, gz=True), None)[0]) == 3
    import pandas as pd

    pd.DataFrame([PROMPT] * 4).to_parquet(tmp_path / "a.parquet")
    assert len(load_conversations(str(tmp_path / "a.parquet"), None)[0]) == 4
    # several files in one list
    both = [str(tmp_path / "a.json"), str(tmp_path / "a.parquet")]
    assert len(load_conversations(both, None)[0]) == 6


def test_jsonl_lines_split_at_newline_only(tmp_path):
    # json.dumps(ensure_ascii=False) writes U+2028 / U+0085 raw; they are not line breaks in JSON Lines
    row = {"prompt": "a\u2028b\x85c\x0cd", "response": "e"}
    path = tmp_path / "d.jsonl"
    path.write_text((json.dumps(row, ensure_ascii=False) + "\n") * 2, encoding="utf-8")
    records, _ = load_conversations(str(path), None)
    assert [m.content for m in records[1].messages] == [row["prompt"], "e"]
    assert records[1].source.endswith("d.jsonl:2")


def test_alpaca_without_input_and_with_system(tmp_path):
    row = {"instruction": "Say hi", "input": "", "output": "hi", "system": "You are kind."}
    (conv,), _ = load_conversations(write_jsonl(tmp_path / "d.jsonl", [row]), "alpaca")
    assert conv.messages == (
        Message("system", "You are kind."),
        Message("user", "Say hi"),
        Message("assistant", "hi"),
    )


def test_alpaca_history_gives_the_earlier_turns(tmp_path):
    # LLaMA-Factory's alpaca records carry earlier turns in `history`; they were dropped
    from data.formats import load_prompts

    row = {"instruction": "And 3?", "output": "9", "system": "Be brief.", "history": [["Square 2", "4"]]}
    (conv,), _ = load_conversations(write_jsonl(tmp_path / "d.jsonl", [row]), "alpaca")
    assert [(m.role, m.content) for m in conv.messages] == [
        ("system", "Be brief."), ("user", "Square 2"), ("assistant", "4"), ("user", "And 3?"), ("assistant", "9")
    ]  # fmt: skip
    (prompt,), _ = load_prompts(str(tmp_path / "d.jsonl"), "sft:alpaca")
    assert prompt == conv.messages[:-1]
    with pytest.raises(DataError, match="d.jsonl:1: field 'history' must be a list of"):
        load_conversations(
            write_jsonl(tmp_path / "d.jsonl", [{**row, "history": ["Square 2", "4"]}]), "alpaca"
        )


@pytest.mark.parametrize(
    "rows, fmt, pattern",
    [
        ([{"instruction": "x"}], "alpaca", r"d.jsonl:1: missing field 'output'"),
        (
            [ALPACA, {"instruction": "x", "output": 3}],
            "alpaca",
            r"d.jsonl:2: field 'output' must be a string, got int",
        ),
        ([{"prompt": "x", "response": "  "}], "prompt", r"d.jsonl:1: field 'response' is empty"),
        ([{"messages": "hi"}], "messages", r"d.jsonl:1: field 'messages' must be a non-empty list"),
        (
            [{"messages": [{"role": "bot", "content": "x"}]}],
            "messages",
            r"messages\[0\]: field 'role' must be one of",
        ),
        (
            [{"messages": [{"role": "user", "content": "x"}]}],
            "messages",
            r"d.jsonl:1: conversation has no assistant turn",
        ),
        (
            [{"conversations": [{"from": "gpt", "value": ""}]}],
            "sharegpt",
            r"conversations\[0\]: field 'value' is empty",
        ),
        ([{"text": "x"}], None, r"d.jsonl:1: cannot tell the data format from fields \['text'\]"),
        ([ALPACA], "csv", r"data.format='csv' is not one of"),
    ],
)
def test_bad_input_names_file_line_and_field(tmp_path, rows, fmt, pattern):
    with pytest.raises(DataError, match=pattern):
        load_conversations(write_jsonl(tmp_path / "d.jsonl", rows), fmt)


def test_malformed_json_line_and_missing_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(PROMPT) + "\n{not json\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: malformed JSON line"):
        load_conversations(str(path), None)
    with pytest.raises(DataError, match=r"nope.jsonl: no such file"):
        load_conversations(str(tmp_path / "nope.jsonl"), None)
    with pytest.raises(DataError, match=r"no such file \(and not a `datasets` hub name"):
        load_conversations("missing_file_without_extension", None)


def test_on_error_skip_skips_malformed_lines_and_detects_on_the_next_row(tmp_path):
    """A line that does not parse is a bad record like any other: skipped and counted under skip,
    also before the format is known (the next good row tells it)."""
    path = tmp_path / "d.jsonl"
    path.write_text("{not json\n" + json.dumps(PROMPT) + "\n[1, 2\n" + json.dumps(PROMPT) + "\n")
    records, report = load_conversations(str(path), None, on_error="skip")
    assert len(records) == 2 and report.kept == 2
    assert sum(report.skipped.values()) == 2 and all("malformed JSON line" in k for k in report.skipped)
    with pytest.raises(DataError, match=r"d.jsonl:1: malformed JSON line"):
        load_conversations(str(path), None)
    path.write_text("{not json\n[1, 2\n")  # nothing but bad lines: the counts still reach the message
    with pytest.raises(
        DataError, match=r"contains no records \(0 records, skipped 2 \(.*malformed JSON line"
    ):
        load_conversations(str(path), None, on_error="skip")


def test_a_json_file_may_hold_an_array_a_jsonl_file_only_lines(tmp_path):
    for indent in (None, 1):  # json.dump's one line, and one element per line
        array = json.dumps([PROMPT, PROMPT], indent=indent)
        (tmp_path / "a.json").write_text(array)
        records, _ = load_conversations(str(tmp_path / "a.json"), None)
        assert len(records) == 2
        # an array named .jsonl is a mistake about the whole file: it stops the run even under skip,
        # where its lines would be dropped one by one (all but the last element of an indented array)
        (tmp_path / "a.jsonl").write_text(array)
        for on_error in ("raise", "skip"):
            with pytest.raises(DataError, match=r"a.jsonl: starts with '\[', a JSON array\? .* a.json$"):
                load_conversations(str(tmp_path / "a.jsonl"), None, on_error=on_error)


def test_a_byte_order_mark_and_an_upper_case_gz_suffix_are_read(tmp_path):
    # a BOM (Windows editors) made the first JSON Lines record malformed and an array file unreadable
    text = json.dumps([ALPACA, ALPACA])
    (tmp_path / "a.json").write_text(text, encoding="utf-8-sig")
    (tmp_path / "a.jsonl").write_text(
        "\n".join(json.dumps(r) for r in (ALPACA, ALPACA)), encoding="utf-8-sig"
    )
    with gzip.open(tmp_path / "A.JSONL.GZ", "wt", encoding="utf-8") as f:  # was read as plain text
        f.write(json.dumps(PROMPT) + "\n")
    assert len(load_conversations(str(tmp_path / "a.json"), "alpaca")[0]) == 2
    records, report = load_conversations(str(tmp_path / "a.jsonl"), None)
    assert report.kept == 2 and records[0].messages[-1].content == "5"
    assert load_conversations(str(tmp_path / "A.JSONL.GZ"), None)[1].kept == 1


def test_on_error_skip_counts_every_reason(tmp_path):
    rows = [PROMPT, {"prompt": "x", "response": ""}, {"prompt": "x"}, {"prompt": "x", "response": ""}, PROMPT]
    records, report = load_conversations(write_jsonl(tmp_path / "d.jsonl", rows), "prompt", on_error="skip")
    assert len(records) == 2 and report.kept == 2
    assert report.skipped == {"field 'response' is empty": 2, "missing field 'response'": 1}
    assert "skipped 3" in report.summary()
    with pytest.raises(DataError, match="no usable records"):
        load_conversations(write_jsonl(tmp_path / "e.jsonl", rows[1:4]), "prompt", on_error="skip")


def test_split_train_eval_is_seeded_and_disjoint():
    train, evals = split_train_eval(list(range(100)), 0.1, seed=3)
    assert len(evals) == 10 and len(train) == 90 and not set(train) & set(evals)
    assert split_train_eval(list(range(100)), 0.1, seed=3) == (train, evals)
    with pytest.raises(DataError, match="eval_fraction"):
        split_train_eval(list(range(10)), 0.0, seed=0)
    # a large fraction of few records still leaves one to train on (it held out all 10)
    train, evals = split_train_eval(list(range(10)), 0.96, seed=0)
    assert len(train) == 1 and len(evals) == 9
    train, evals = split_train_eval(list(range(3)), 0.9, seed=0, group=lambda r: r)
    assert len(train) == 1 and len(evals) == 2


def test_a_grouped_split_keeps_each_conversation_on_one_side():
    records = list(range(100))
    plain = split_train_eval(records, 0.1, seed=3)
    assert split_train_eval(records, 0.1, seed=3, group=lambda r: r) == plain  # distinct keys: the same split
    train, evals = split_train_eval(records, 0.1, seed=3, group=lambda r: r // 4)  # 25 groups of 4
    assert not {r // 4 for r in train} & {r // 4 for r in evals}
    assert sorted(train + evals) == records and len(evals) == 8  # whole groups, as many as fit in 10
    # a group too large to hold out stays in training; the singletons fill the held-out count
    train, evals = split_train_eval(records, 0.1, seed=3, group=lambda r: r if r >= 50 else -1)
    assert len(evals) == 10 and all(r >= 50 for r in evals) and set(range(50)) <= set(train)
    assert (
        split_train_eval(records, 0.1, seed=3, group=lambda r: 0) == plain
    )  # nothing fits: record by record
    u, a = Message("user", "q"), Message("assistant", "a")
    system = Message("system", "be brief")
    assert opening((system, u, a, Message("user", "more"))) == (system, u)
    assert opening((u,)) == opening((u, a, Message("user", "again"))) == (u,)


def test_load_prompts_from_every_prompt_bearing_format(tmp_path):
    from data.formats import load_prompts

    rows = {
        "prompt": [{"prompt": "hi"}, {"prompt": [{"role": "user", "content": "hi"}]}],
        "sft:alpaca": [{"instruction": "hi", "output": "x"}],
        "sft:messages": [
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
            {"messages": [{"role": "user", "content": "hi"}]},  # prompt-only, in the same layout
        ],
        "sft:sharegpt": [{"conversations": [{"from": "human", "value": "hi"}]}],
        "pref:pairwise": [{"prompt": "hi", "chosen": "a", "rejected": "b"}],
        "pref:hh": [{"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"}],
    }
    for fmt, records in rows.items():
        path = tmp_path / f"{fmt.replace(':', '_')}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in records))
        for given in (fmt, fmt.split(":")[-1], None):  # explicit, without its prefix, and detected
            prompts, _ = load_prompts(str(path), given)
            assert prompts == [(Message("user", "hi"),)], (fmt, given, prompts)  # deduplicated


def test_sft_records_give_their_prompt_whatever_their_final_reply(tmp_path):
    """A prompt-only export in an SFT layout often leaves the reply empty: it is not read."""
    from data.formats import load_prompts

    rows = {
        "alpaca": {"instruction": "q", "output": ""},
        "messages": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
        "sharegpt": {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
    }
    for fmt, row in rows.items():
        path = tmp_path / f"{fmt}.jsonl"
        path.write_text(json.dumps(row))
        assert load_prompts(str(path), fmt)[0] == [(Message("user", "q"),)], fmt


def test_preference_records_give_their_prompt_whatever_their_replies(tmp_path):
    """A pair a reward model cannot use (identical or empty replies, tied ranks) is still a good
    rollout prompt; an OpenAssistant tree gives every user turn, ranked replies or not."""
    from data.formats import load_preferences, load_prompts

    def hh(a: str, b: str) -> dict:
        return {"chosen": f"\n\nHuman: q\n\nAssistant: {a}", "rejected": f"\n\nHuman: q\n\nAssistant: {b}"}

    tree = {"prompt": {"role": "prompter", "text": "q", "replies": [
        {"role": "assistant", "text": "a", "rank": 0, "replies": [
            {"role": "prompter", "text": "again", "replies": [{"role": "assistant", "text": "b"}]}]}]}}  # fmt: skip
    rows = {
        "pairwise": [{"prompt": "q", "chosen": "same", "rejected": "same"}, {"prompt": "q", "chosen": "", "rejected": "b"}],
        "hh": [hh("same", "same"), hh("", "b")],
        "sharegpt_pairs": [{"conversations": [{"from": "human", "value": "q"}], "chosen": "x", "rejected": "x"}],
        "ranked": [{"prompt": "q", "responses": ["a", "b"], "ranks": [1, 1]}],
    }  # fmt: skip
    for fmt, records in rows.items():
        path = tmp_path / f"{fmt}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in records))
        with pytest.raises(DataError, match="no usable records"):
            load_preferences(str(path), fmt)  # no pair to learn from
        assert load_prompts(str(path), fmt)[0] == [(Message("user", "q"),)], fmt
    path = tmp_path / "tree.jsonl"
    path.write_text(json.dumps(tree))
    prompts, report = load_prompts(str(path), "ranked")
    assert (
        prompts
        == [
            (Message("user", "q"),),
            (Message("user", "q"), Message("assistant", "a"), Message("user", "again")),
        ]
        and not report.skipped
    )


def test_a_prompt_that_does_not_end_with_a_user_turn_is_one_bad_record(tmp_path):
    from data.formats import load_prompts

    path = tmp_path / "p.jsonl"
    good = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    bad = {"messages": [{"role": "system", "content": "only a system turn"}]}
    path.write_text("\n".join(json.dumps(r) for r in (good, bad)))
    with pytest.raises(DataError, match=r"p.jsonl:2: a prompt must end with a user turn"):
        load_prompts(str(path), "messages")
    prompts, report = load_prompts(str(path), "messages", on_error="skip")
    assert (
        prompts == [(Message("system", "be brief"), Message("user", "hi"))]
        and sum(report.skipped.values()) == 1
    )


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "Hi", "completion": "Hello"},
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "completion": [{"role": "assistant", "content": "Hello"}],
        },
    ],
    ids=["strings", "conversational"],
)
def test_trl_prompt_completion_records_are_demonstrations(tmp_path, row):
    records, _ = load_conversations(write_jsonl(tmp_path / "d.jsonl", [row]), None)
    assert [m.role for m in records[0].messages][-2:] == ["user", "assistant"]
    assert records[0].messages[-1].content == "Hello"
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'completion' is empty"):
        load_conversations(write_jsonl(tmp_path / "d.jsonl", [{**row, "completion": " "}]), None)


def test_a_reply_labelled_undesirable_is_not_a_demonstration(tmp_path):
    """KTO's unpaired data ({"prompt", "completion", "label"}): a false label marks a bad reply."""
    rows = [
        {"prompt": "Say hi", "completion": "hi", "label": True},
        {"prompt": "Say hi", "completion": "go away", "label": False},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"d.jsonl:2: label=false marks an undesirable reply"):
        load_conversations(path, None)
    records, report = load_conversations(path, None, on_error="skip")
    assert [r.messages[-1].content for r in records] == ["hi"] and sum(report.skipped.values()) == 1


def test_data_split_names_a_hub_split_and_a_local_file_is_read_whole(tmp_path):
    import pandas as pd

    pd.DataFrame([PROMPT] * 3).to_parquet(tmp_path / "a.parquet")
    assert len(load_conversations(str(tmp_path / "a.parquet"), None, split="test")[0]) == 3
    assert len(load_conversations(write_jsonl(tmp_path / "a.jsonl", [PROMPT]), None, split="test")[0]) == 1
