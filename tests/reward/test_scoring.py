"""The score is read at the last real token (the EOS ending the reply), whatever the padding or packing."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from core.models import ModelError, last_index, packing_error, score_head, token_scores
from data.collate import pack_sequences
from reward.train import EncodedPair, RewardRecipe, collate_pairs


def tiny_scorer(pad_id: int):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_labels=1, pad_token_id=pad_id)  # fmt: skip
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


def test_packed_pairs_give_each_sequence_its_unpadded_score():
    model = tiny_scorer(pad_id=EOS)  # pad == EOS as well: the ends come from the layout, not the ids
    expected = [unpadded_end_score(model, p.chosen) for p in PAIRS] + [
        unpadded_end_score(model, p.rejected) for p in PAIRS
    ]
    for width in (7, 10, 64):  # lengths 5, 4, 7, 3 in rows of [7] [5] [4 3]; [7 3] [5 4]; one row
        got, rows = packed_scores(model, PAIRS, EOS, width)
        assert rows.input_ids.shape[0] == {7: 3, 10: 2, 64: 1}[width]
        torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_packing_error_tells_a_model_that_keeps_sequences_apart_from_one_that_does_not():
    model = tiny_scorer(pad_id=0)
    first, second = PAIRS[1].rejected, PAIRS[0].chosen
    assert packing_error(model, first, second, torch.device("cpu")) < 1e-4

    def ignores_positions(**kwargs):  # plain causal attention over the whole row
        kwargs.pop("position_ids", None)
        return model(**kwargs)

    assert packing_error(ignores_positions, first, second, torch.device("cpu")) > 0.05


class StandIn(torch.nn.Module):
    """An engine stand-in around a model, with a forward that mishandles packed rows."""

    def __init__(self, module, forward):
        super().__init__()
        self.module, self._forward = module, forward

    def forward(self, **kwargs):
        return self._forward(**kwargs)


def test_reward_setup_refuses_packing_for_models_that_cannot_keep_sequences_apart():
    model = tiny_scorer(pad_id=0)

    def ignores_positions(position_ids=None, **kwargs):
        return model(**kwargs)

    def without_positions(input_ids, attention_mask=None, output_hidden_states=False, use_cache=False):
        return model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states
        )

    recipe = RewardRecipe.__new__(RewardRecipe)  # only what _check_packing reads
    recipe.device, recipe.train_set = torch.device("cpu"), PAIRS
    recipe.engine = StandIn(model, model)
    recipe._check_packing()  # the real model passes
    recipe.engine = StandIn(model, ignores_positions)
    with pytest.raises(ModelError, match="does not keep packed sequences apart.*set data.packing=false"):
        recipe._check_packing()
    recipe.engine = StandIn(model, without_positions)
    with pytest.raises(ModelError, match="needs position_ids.*set data.packing=false"):
        recipe._check_packing()

    def one_row_packing_only(input_ids, position_ids=None, **kwargs):
        """Like transformers' FlashAttention-2: positions restart, but a batch of rows attends causally
        over each whole row (its variable-length path only reads packing from a batch of one)."""
        if len(input_ids) > 1 and position_ids is not None:
            kwargs["attention_mask"] = torch.ones_like(input_ids)
        return model(input_ids=input_ids, position_ids=position_ids, **kwargs)

    recipe.engine = StandIn(model, one_row_packing_only)
    with pytest.raises(ModelError, match="does not keep packed sequences apart.*set data.packing=false"):
        recipe._check_packing()
