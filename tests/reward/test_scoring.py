"""The score is read at the last real token (the EOS ending the reply), whatever the padding or packing."""

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from core.models import ModelError, last_index, packing_error, score_head, token_scores
from data.collate import pack_pairs, pack_sequences
from reward.train import EncodedPair, RewardRecipe, collate_pairs
from tests.conftest import StandIn


def tiny_scorer(pad_id: int, attn: str = "sdpa"):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_labels=1, pad_token_id=pad_id, attn_implementation=attn)  # fmt: skip
    return LlamaForSequenceClassification(config).eval()


def scores(model, pairs, pad_id, side):
    ids, mask, _ = collate_pairs(pairs, pad_id, padding_side=side)
    with torch.no_grad():
        values = token_scores(model, score_head(model), ids, mask)  # [2B, T]
    return values.gather(1, last_index(mask)[:, None]).squeeze(1), ids, mask


def alone(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()


EOS = 2
PAIRS = [
    EncodedPair([1, 5, 6, 7, EOS], [1, 5, 9, EOS], 0.0),
    EncodedPair([1, 8, EOS], [1, 8, 10, 11, 12, 13, EOS], 0.0),
]


def test_left_and_right_padding_give_the_unpadded_score():
    model = tiny_scorer(pad_id=0)
    right, _, _ = scores(model, PAIRS, 0, "right")
    left, _, _ = scores(model, PAIRS, 0, "left")
    expected = [alone(model, p.chosen) for p in PAIRS] + [alone(model, p.rejected) for p in PAIRS]
    torch.testing.assert_close(right, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left, torch.tensor(expected), atol=1e-5, rtol=1e-5)


def unpadded_end_score(model, ids):
    mask = torch.ones(1, len(ids), dtype=torch.bool)
    with torch.no_grad():
        return token_scores(model, score_head(model), torch.tensor([ids]), mask)[0, -1].item()


def test_pad_equal_to_eos_still_scores_at_the_real_eos():
    model = tiny_scorer(pad_id=EOS)  # padding with the EOS id
    got, ids, mask = scores(model, PAIRS, EOS, "right")
    idx = last_index(mask)
    assert (ids.gather(1, idx[:, None]).squeeze(1) == EOS).all()
    assert idx.tolist() == [4, 2, 3, 6]  # each row's real EOS, not the first EOS-valued pad
    expected = [unpadded_end_score(model, p.chosen) for p in PAIRS] + [
        unpadded_end_score(model, p.rejected) for p in PAIRS
    ]
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    # the trap this avoids: pooling by "last token that is not the pad id" skips the real EOS
    assert abs(alone(model, PAIRS[0].chosen) - expected[0]) > 1e-4
    left, _, _ = scores(model, PAIRS, EOS, "left")
    torch.testing.assert_close(left, torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_collate_pairs_layout():
    ids, mask, margin = collate_pairs([EncodedPair([1, 2], [1, 2, 3], 0.5)], pad_id=0)
    assert ids.tolist() == [[1, 2, 0], [1, 2, 3]] and mask.tolist() == [[True, True, False], [True] * 3]
    assert margin.tolist() == [0.5]


def packed_scores(model, pairs, pad_id, width):
    rows = pack_sequences([p.chosen for p in pairs] + [p.rejected for p in pairs], width, pad_id)
    with torch.no_grad():
        values = token_scores(model, score_head(model), rows.input_ids, position_ids=rows.position_ids)
    return rows.gather(values), rows


def pair_scores(model, pairs, pad_id, width):
    rows = pack_pairs([(p.chosen, p.rejected) for p in pairs], width, pad_id)
    with torch.no_grad():
        values = token_scores(
            model, score_head(model), rows.input_ids, rows.attention_mask, rows.position_ids
        )
    return rows.gather(values), rows


def test_packed_sequences_give_each_sequence_its_unpadded_score():
    model = tiny_scorer(pad_id=EOS)  # pad == EOS as well: the ends come from the layout, not the ids
    expected = [unpadded_end_score(model, p.chosen) for p in PAIRS] + [
        unpadded_end_score(model, p.rejected) for p in PAIRS
    ]
    for width in (7, 10, 64):  # lengths 5, 4, 7, 3 in rows of [7] [5] [4 3]; [7 3] [5 4]; one row
        got, rows = packed_scores(model, PAIRS, EOS, width)
        assert rows.input_ids.shape[0] == {7: 3, 10: 2, 64: 1}[width]
        torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pairs_packed_with_their_prompt_once_give_each_sequence_its_unpadded_score(attn):
    model = tiny_scorer(pad_id=EOS, attn=attn)  # eager adds the mask to the scores: it must be a float one
    pairs = [*PAIRS, EncodedPair([1, 3, 4, EOS], [1, 3, 4, EOS], 0.0)]  # equal replies: each keeps its EOS
    expected = [unpadded_end_score(model, p.chosen) for p in pairs] + [
        unpadded_end_score(model, p.rejected) for p in pairs
    ]
    # segments of 7 (prompt [1 5] once), 8 ([1 8]) and 5 ([1 3 4]): rows [8] [7] [5]; [8 7] [5]; one row;
    # and at width 7, the second pair apart as sequences of 3 and 7: [7] [7] [5] [3]
    for width, n_rows in ((7, 4), (8, 3), (16, 2), (64, 1)):
        got, rows = pair_scores(model, pairs, EOS, width)
        assert rows.input_ids.shape[0] == n_rows
        torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    # the same loss as padded pairs: what packing changes is only the compute
    padded, _, _ = scores(model, pairs, EOS, "right")
    torch.testing.assert_close(got, padded, atol=1e-5, rtol=1e-5)


def test_packing_error_tells_a_model_that_keeps_sequences_apart_from_one_that_does_not():
    model = tiny_scorer(pad_id=0)
    first, second = PAIRS[1].rejected, PAIRS[0].chosen
    assert packing_error(model, first, second, torch.device("cpu")) < 1e-4

    def ignores_positions(**kwargs):  # plain causal attention over the whole row
        kwargs.pop("position_ids", None)
        return model(**kwargs)

    assert packing_error(ignores_positions, first, second, torch.device("cpu")) > 0.05


def test_reward_setup_refuses_packing_for_models_that_cannot_keep_sequences_apart():
    model = tiny_scorer(pad_id=0)

    def ignores_the_mask(attention_mask=None, **kwargs):  # apart only where positions restart
        return model(**kwargs)

    def without_positions(input_ids, attention_mask=None, output_hidden_states=False, use_cache=False):
        return model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states
        )

    recipe = RewardRecipe.__new__(RewardRecipe)  # only what _check_packing reads
    recipe.device, recipe.train_set = torch.device("cpu"), PAIRS
    recipe.engine = StandIn(model, model)
    recipe._check_packing()  # the real model passes
    recipe.engine = StandIn(model, ignores_the_mask)
    with pytest.raises(ModelError, match="does not keep packed sequences apart.*set data.packing=false"):
        recipe._check_packing()
    # Wrong positions move a rotary model's states only by the rejected reply's offset (0.001 to 0.004
    # relative in these random models, within bf16 rounding); learned absolute positions show it.
    absolute = GPT2ForSequenceClassification(GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=4, num_labels=1,
                                                        pad_token_id=0, bos_token_id=1, eos_token_id=EOS)).eval()  # fmt: skip
    recipe.engine = StandIn(absolute, absolute)
    recipe._check_packing()
    recipe.engine = StandIn(absolute, lambda position_ids=None, **kwargs: absolute(**kwargs))
    with pytest.raises(ModelError, match="does not keep packed sequences apart.*set data.packing=false"):
        recipe._check_packing()
    recipe.engine = StandIn(model, without_positions)
    with pytest.raises(
        ModelError,
        match="LlamaForSequenceClassification failed on such a row \\(TypeError.*set data.packing=false",
    ):
        recipe._check_packing()

    def one_row_packing_only(input_ids, position_ids=None, **kwargs):
        """Like transformers' FlashAttention-2: no 4-D mask, and a batch of rows attends causally over
        each whole row (its variable-length path only reads packing from a batch of one)."""
        if len(input_ids) > 1 and position_ids is not None:
            kwargs["attention_mask"] = torch.ones_like(input_ids)
        return model(input_ids=input_ids, position_ids=position_ids, **kwargs)

    recipe.engine = StandIn(model, one_row_packing_only)
    with pytest.raises(ModelError, match="does not keep packed sequences apart.*set data.packing=false"):
        recipe._check_packing()
