import pytest

from data.builtin.tokenizer import build_tokenizer
from data.collate import collate
from data.formats import Conversation, DataError, Message
from data.templates import IGNORE_INDEX, PromptFormatter

TEMPLATE = {
    "system": "{content}\n\n",
    "user": "### Instruction:\n{content}\n\n### Response:\n",
    "assistant": "{content}",
}


def formatter(tok, mode="auto"):
    return PromptFormatter(tok, chat_template=mode, **TEMPLATE)


def conv(*turns):
    return Conversation(tuple(Message(r, c) for r, c in turns))


def labelled_text(tok, enc):
    return [tok.convert_ids_to_tokens(i) for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]


def test_single_turn_labels_cover_exactly_the_reply_and_eos():
    tok = build_tokenizer()
    f = formatter(tok)
    c = conv(("user", "review the pizza ."), ("assistant", "the crust was great ."))
    enc = f.encode(c, max_len=64)
    assert labelled_text(tok, enc) == ["the", "crust", "was", "great", ".", "</s>"]
    assert enc.input_ids[0] == tok.bos_token_id and enc.input_ids[-1] == tok.eos_token_id
    # the generation prompt is exactly the unlabelled prefix
    prompt = f.encode_prompt(c.messages[:-1])
    assert enc.input_ids[: len(prompt)] == prompt
    assert all(lab == IGNORE_INDEX for lab in enc.labels[: len(prompt)])
    assert not enc.truncated


def test_multi_turn_loss_on_every_assistant_turn_and_loss_on_all():
    tok = build_tokenizer()
    f = formatter(tok)
    c = conv(("system", "review"), ("user", "the pizza"), ("assistant", "the crust was great ."),
             ("user", "the movie"), ("assistant", "the plot was boring ."))  # fmt: skip
    enc = f.encode(c, max_len=128)
    assert labelled_text(tok, enc) == [
        "the",
        "crust",
        "was",
        "great",
        ".",
        "</s>",
        "the",
        "plot",
        "was",
        "boring",
        ".",
        "</s>",
    ]
    assert enc.labels.count(tok.eos_token_id) == 2
    every = f.encode(c, max_len=128, loss_on="all")
    assert sum(lab != IGNORE_INDEX for lab in every.labels) == len(every.input_ids) - 1  # all but BOS
    with pytest.raises(DataError, match="loss_on"):
        f.encode(c, max_len=128, loss_on="prompt")


MULTI_TURN = (("system", "review"), ("user", "the pizza"), ("assistant", "the crust was great ."),
              ("user", "the movie"), ("assistant", "the plot was boring ."))  # fmt: skip


def assert_prompts_are_training_prefixes(f, c):
    """Every assistant turn's generation prompt is the unlabelled prefix of the training sequence before it
    (earlier replies with the EOS training gave them): what PPO's rollouts and the samples start from."""
    enc = f.encode(c, max_len=512)
    for i, m in enumerate(c.messages):
        if m.role == "assistant":
            prompt = f.encode_prompt(c.messages[:i])
            assert enc.input_ids[: len(prompt)] == prompt, (i, f.tokenizer.decode(prompt))
            assert enc.labels[len(prompt) - 1] == IGNORE_INDEX and enc.labels[len(prompt)] != IGNORE_INDEX


@pytest.mark.parametrize("mode", ["never", "auto"])
def test_multi_turn_prompts_are_prefixes_of_the_training_sequence(mode):
    tok = build_tokenizer()
    tok.chat_template = CHAT_TEMPLATE.replace(" </s> {% endfor %}", " {% endfor %}")  # turns without an EOS
    f = formatter(tok, mode)
    assert f.use_chat_template == (mode == "auto")
    assert_prompts_are_training_prefixes(f, conv(*MULTI_TURN))


@pytest.mark.parametrize("name", ["gpt2", "llama2-sentencepiece", "gpt-neox-pythia", "qwen2"])
def test_multi_turn_prompts_are_prefixes_with_real_tokenizers(shared_data, name):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / name)
    c = conv(("user", "Hello there"), ("assistant", "Hello friend"), ("user", "And 3+3?"), ("assistant", "6"))
    for mode in ("never", "auto"):
        assert_prompts_are_training_prefixes(formatter(tok, mode), c)


def test_truncation_is_flagged():
    tok = build_tokenizer()
    enc = formatter(tok).encode(
        conv(("user", "review the pizza ."), ("assistant", "the crust was great .")), max_len=8
    )
    assert enc.truncated and len(enc.input_ids) == 8 == len(enc.labels)


def test_pad_equal_to_eos_never_hides_the_real_eos():
    tok = build_tokenizer()
    tok.pad_token = tok.eos_token  # the trap: padding with EOS
    f = formatter(tok)
    short = f.encode(conv(("user", "review the cafe ."), ("assistant", "the coffee was great .")), 64)
    long = f.encode(
        conv(("user", "review the cafe ."), ("assistant", "the coffee was great . the cakes was okay .")), 64
    )
    batch = collate([short, long], pad_id=tok.pad_token_id)
    n = len(short.input_ids)
    assert batch.labels[0, n - 1] == tok.eos_token_id  # the real EOS is a target
    assert (batch.labels[0, n:] == IGNORE_INDEX).all()  # the EOS-valued padding is not
    assert batch.attention_mask[0, :n].all() and not batch.attention_mask[0, n:].any()


CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)


def test_chat_template_used_when_present_and_segments_rebuild_the_rendering():
    tok = build_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    f = formatter(tok)
    assert f.use_chat_template and f.bos_ids == []
    c = conv(
        ("user", "review the pizza ."),
        ("assistant", "the crust was great ."),
        ("user", "and ?"),
        ("assistant", "the sauce was okay ."),
    )
    msgs = [{"role": m.role, "content": m.content} for m in c.messages]
    assert "".join(t for t, _ in f.segments(c.messages)) == tok.apply_chat_template(msgs, tokenize=False)
    enc = f.encode(c, 128)
    assert labelled_text(tok, enc) == [
        "the",
        "crust",
        "was",
        "great",
        ".",
        "</s>",
        "the",
        "sauce",
        "was",
        "okay",
        ".",
        "</s>",
    ]
    assert not formatter(tok, mode="never").use_chat_template
    with pytest.raises(DataError, match="no chat template"):
        formatter(build_tokenizer(), mode="always")


def test_template_strings_must_have_content_placeholder():
    with pytest.raises(DataError, match=r"data.template.user must contain '\{content\}'"):
        PromptFormatter(
            build_tokenizer(), chat_template="never", system="{content}", user="Q:", assistant="{content}"
        )


def test_real_chat_template_qwen2(shared_data):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "qwen2")
    f = formatter(tok)
    c = conv(("user", "What is 2+2?"), ("assistant", "4"), ("user", "And 3+3?"), ("assistant", "6"))
    enc = f.encode(c, 256)
    text = tok.decode([i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX])
    # between turns the template's newline stays; after the last EOS, where generation stops, it goes
    assert text == "4<|im_end|>\n6<|im_end|>"
    assert enc.labels.count(tok.eos_token_id) == 2 and enc.input_ids[-1] == tok.eos_token_id


@pytest.mark.parametrize("mode", ["never", "auto"])
def test_keep_end_cuts_from_the_left_but_keeps_the_bos(mode):
    tok = build_tokenizer()  # adds a BOS, as Llama's tokenizer does
    f = formatter(tok, mode)
    ids = f.encode_prompt((Message("user", "the crust was great . the service was slow ."),))
    assert ids[0] == tok.bos_token_id and len(ids) > 6
    cut = f.keep_end(ids, 6)
    assert cut == [tok.bos_token_id] + ids[-5:]  # the generation cue (the end) stays whole
    assert f.keep_end(ids, len(ids)) == ids and f.keep_end(ids, 1) == ids[-1:]
    no_bos = ids[1:]
    assert f.keep_end(no_bos, 6) == no_bos[-6:]  # nothing to keep when the ids do not start with one


def test_keep_end_keeps_the_llama2_bos(shared_data):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "llama2-sentencepiece")
    f = formatter(tok)
    ids = f.encode_prompt((Message("user", "one two three four five six seven eight nine ten"),))
    cut = f.keep_end(ids, 8)
    assert len(cut) == 8 and cut[0] == tok.bos_token_id == 1 and cut[1:] == ids[-7:]
    assert tok.decode(cut[1:]).endswith("### Response:\n")
