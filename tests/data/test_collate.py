import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from data.collate import GlobalBatches, collate, pack, pack_pairs, pack_sequences, shared_prefix
from data.templates import IGNORE_INDEX, Encoded


def example(n, start):
    ids = list(range(start, start + n))
    return Encoded(ids, [IGNORE_INDEX] * 2 + ids[2:], False)


def test_packed_rows_give_the_same_logits_as_separate_sequences():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()  # fmt: skip
    examples = [example(7, 3), example(5, 20), example(4, 40)]
    rows = pack(examples, max_len=16)
    assert len(rows) == 1 and len(rows[0].input_ids) == 16
    batch = collate(rows + [pack([example(9, 10)], 16)[0]], pad_id=0)  # second row shorter: padded
    assert batch.attention_mask is None
    with torch.no_grad():
        packed = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
        offset = 0
        for ex in sorted(examples, key=lambda e: -len(e.input_ids)):
            alone = model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]
            n = len(ex.input_ids)
            torch.testing.assert_close(packed[0, offset : offset + n], alone, atol=1e-5, rtol=1e-5)
            offset += n


def test_packing_masks_each_examples_first_label_only():
    """Nothing is learned across a boundary: each example's first label is masked, the rest kept."""
    examples = [
        Encoded(list(range(s, s + n)), list(range(s, s + n)), False) for n, s in ((7, 3), (5, 20), (4, 40))
    ]
    (row,) = pack(examples, max_len=16)
    starts = {i for i, p in enumerate(row.position_ids) if p == 0}
    assert len(starts) == 3
    for i, (token, label) in enumerate(zip(row.input_ids, row.labels)):
        assert label == (IGNORE_INDEX if i in starts else token), i


def test_collate_pads_right_with_true_as_valid():
    b = collate([example(3, 1), example(5, 1)], pad_id=0)
    assert b.input_ids.shape == (2, 5)
    assert b.attention_mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert b.labels[0, 3:].eq(IGNORE_INDEX).all()
    assert b.num_targets() == 1 + 3  # labels after the shift


def test_global_batches_split_the_same_global_batch_over_ranks_and_micro_steps():
    one = GlobalBatches(100, micro_batch=4, grad_accum=1, world_size=1, seed=7)
    two = GlobalBatches(100, micro_batch=2, grad_accum=1, world_size=2, seed=7)
    accum = GlobalBatches(100, micro_batch=1, grad_accum=2, world_size=2, seed=7)
    for step in (0, 5, 24, 25, 60):
        whole = sorted(one.micro_batches(step, 0)[0])
        assert sorted(two.micro_batches(step, 0)[0] + two.micro_batches(step, 1)[0]) == whole
        assert sorted(sum(accum.micro_batches(step, 0) + accum.micro_batches(step, 1), [])) == whole
    assert one.steps_per_epoch == 25
    epoch0 = {i for s in range(25) for i in one.micro_batches(s, 0)[0]}
    assert epoch0 == set(range(100))  # an epoch visits every example once
    assert one.micro_batches(25, 0) != one.micro_batches(0, 0)  # and the next one reshuffles
    with pytest.raises(
        ValueError, match="fewer than one global batch .* lower train.micro_batch_size_per_device"
    ):
        GlobalBatches(3, micro_batch=4, grad_accum=1, world_size=1, seed=0)


def test_pack_sequences_layout_ends_and_positions():
    rows = pack_sequences([[1, 2, 3], [4, 5], [6, 7, 8, 9]], width=6, pad_id=0)
    # longest first: [6 7 8 9 4 5] then [1 2 3] padded; ends are flat indices, in input order
    assert rows.input_ids.tolist() == [[6, 7, 8, 9, 4, 5], [1, 2, 3, 0, 0, 0]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]  # padding: its own segment
    assert rows.ends.tolist() == [8, 5, 3]
    values = torch.arange(12.0).reshape(2, 6)
    assert rows.gather(values).tolist() == [8.0, 5.0, 3.0]


def test_pack_sequences_gives_a_longer_sequence_its_own_wider_row():
    rows = pack_sequences([[1, 2], [3, 4, 5, 6, 7], [8]], width=3, pad_id=0)
    assert rows.input_ids.tolist() == [[3, 4, 5, 6, 7], [1, 2, 8, 0, 0]]
    assert rows.ends.tolist() == [6, 4, 7]


def test_shared_prefix_leaves_each_sequence_its_last_token():
    assert shared_prefix([1, 5, 6, 2], [1, 5, 9, 2]) == 2
    assert shared_prefix([1, 5, 2], [1, 5, 2]) == 2  # equal: each keeps its end
    assert shared_prefix([1, 5], [1, 5, 6, 2]) == 1  # one a start of the other
    assert shared_prefix([7, 5, 2], [1, 5, 2]) == 0


def test_pack_pairs_layout_positions_mask_and_ends():
    # pair 0: prompt [1 5], replies [6 2] and [9 9 2]; pair 1: prompt [1 8], replies [2] and [3 2]
    rows = pack_pairs([([1, 5, 6, 2], [1, 5, 9, 9, 2]), ([1, 8, 2], [1, 8, 3, 2])], width=9, pad_id=0)
    assert rows.input_ids.tolist() == [[1, 5, 6, 2, 9, 9, 2, 0, 0], [1, 8, 2, 3, 2, 0, 0, 0, 0]]
    # the second reply's positions continue from the prompt; padding restarts at 0
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4, 0, 1], [0, 1, 2, 2, 3, 0, 1, 2, 3]]
    assert rows.ends.tolist() == [3, 11, 6, 13]  # firsts then seconds, flat (row * 9 + column)
    mask = rows.attention_mask[0, 0].int().tolist()  # [W, W] of row 0: query rows, key columns
    assert mask[3] == [1, 1, 1, 1, 0, 0, 0, 0, 0]  # first reply's end: its prompt and reply
    assert mask[6] == [1, 1, 0, 0, 1, 1, 1, 0, 0]  # second reply's end: the prompt, not the first reply
    assert mask[8] == [0, 0, 0, 0, 0, 0, 0, 1, 1]  # padding attends only padding (never empty)
    assert not rows.attention_mask[:, 0, :7, 7:].any()  # no real token attends padding
    assert rows.attention_mask.shape == (2, 1, 9, 9)


def test_pack_pairs_lays_a_pair_wider_than_the_row_out_as_two_sequences():
    rows = pack_pairs([([1, 5, 6, 2], [1, 5, 9, 9, 2]), ([1, 8, 2], [1, 8, 3, 2])], width=6, pad_id=0)
    # pair 0 shared would take 7 > 6 tokens: its sequences go apart, positions from 0; pair 1 shares
    assert rows.input_ids.tolist() == [[1, 5, 9, 9, 2, 0], [1, 8, 2, 3, 2, 0], [1, 5, 6, 2, 0, 0]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 4, 0], [0, 1, 2, 2, 3, 0], [0, 1, 2, 3, 0, 1]]
    assert rows.ends.tolist() == [15, 8, 4, 10]
    lone = torch.ones(6, 6, dtype=torch.bool).tril()
    lone[5, :5] = False  # the padding after it attends only itself
    assert rows.attention_mask[0, 0].tolist() == lone.tolist()
