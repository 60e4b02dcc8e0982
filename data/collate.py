"""Batches: padding, optional packing, and a deterministic order that makes resume exact.

Masks are True = valid token, everywhere in this project.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from data.templates import IGNORE_INDEX, Encoded


@dataclass
class Batch:
    """A padded batch.

    input_ids:      [B, T] token ids (pad_id after each sequence's end)
    labels:         [B, T] target ids, IGNORE_INDEX where no loss (prompt, padding)
    attention_mask: [B, T] bool, True = real token; None for packed rows, where
                    `position_ids` restart at every example and transformers derives a
                    block-diagonal causal mask from them
    position_ids:   [B, T] or None
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None

    def to(self, device: torch.device) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(
            move(self.input_ids), move(self.labels), move(self.attention_mask), move(self.position_ids)
        )

    def num_targets(self) -> int:
        """Tokens that carry loss after the causal shift (label t predicts from t-1)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


@dataclass
class Packed:
    """Several encoded examples concatenated into one row; positions restart at each example."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]


def first_fit(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Indices grouped into rows of at most `width` tokens: first-fit, longest first.

    A sequence longer than `width` gets a row of its own.
    """
    rows: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, n in enumerate(used) if n + lengths[i] <= width), None)
        if r is None:
            rows.append([])
            used.append(0)
            r = len(rows) - 1
        rows[r].append(i)
        used[r] += lengths[i]
    return rows


def pack(examples: Sequence[Encoded], max_len: int) -> list[Packed]:
    """Greedy first-fit packing of whole examples into rows of at most max_len tokens.

    The first label of each example is masked so no example learns from its neighbour's end.
    """
    rows: list[Packed] = []
    for members in first_fit([len(e.input_ids) for e in examples], max_len):
        row = Packed([], [], [])
        for ex in (examples[i] for i in members):
            row.input_ids += ex.input_ids
            row.labels += [IGNORE_INDEX] + ex.labels[1:]
            row.position_ids += list(range(len(ex.input_ids)))
        rows.append(row)
    return rows


@dataclass
class PackedSequences:
    """Sequences laid end to end in rows, for a padding-free forward (no labels: scoring).

    input_ids:      [R, W] (pad_id after each row's last sequence)
    position_ids:   [R, W] restarting at 0 at every sequence (and for the padding, its own segment),
                    so transformers attends only within a sequence (block-diagonal causal mask)
    ends:           [N] flat index (row * W + column) of each sequence's last token, in input order
    attention_mask: None (`pack_sequences`: the mask follows from the positions), or [R, 1, W, W]
                    bool for `pack_pairs`: True = the query token (dim 2) may attend the key (dim 3)
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    ends: torch.Tensor
    attention_mask: torch.Tensor | None = None

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Each sequence's value at its last token: values [R, W] -> [N]."""
        return values.reshape(-1)[self.ends.to(values.device)]


def pack_sequences(seqs: Sequence[Sequence[int]], width: int, pad_id: int) -> PackedSequences:
    """First-fit packing of token sequences into rows of `width` (wider if one sequence is longer)."""
    groups = first_fit([len(s) for s in seqs], width)
    width = max(width, max(map(len, seqs)))
    ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(groups), width), dtype=torch.long)
    ends = torch.empty(len(seqs), dtype=torch.long)
    for r, members in enumerate(groups):
        col = 0
        for i in members:
            n = len(seqs[i])
            ids[r, col : col + n] = torch.tensor(seqs[i])
            positions[r, col : col + n] = torch.arange(n)
            col += n
            ends[i] = r * width + col - 1
        positions[r, col:] = torch.arange(width - col)
    return PackedSequences(ids, positions, ends)


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common start of `a` and `b`, leaving each at least its last token of its own."""
    n, limit = 0, min(len(a), len(b)) - 1
    while n < limit and a[n] == b[n]:
        n += 1
    return n


@dataclass
class _Segment:
    """Tokens that attend only to each other in a packed row: one sequence, or a pair sharing its start."""

    ids: list[int]
    positions: list[int]
    parts: list[int]  # 0: common start or a lone sequence; 1: first's rest; 2: second's rest
    ends: list[tuple[int, int]]  # (index among the packed sequences' ends, offset in the segment)


def _pair_segments(i: int, n: int, a: Sequence[int], b: Sequence[int], width: int) -> list[_Segment]:
    """Pair i of n as one segment [start | rest of a | rest of b], or as two when that is wider than `width`."""
    p = shared_prefix(a, b)
    if len(a) + len(b) - p > width:
        return [_Segment(list(a), list(range(len(a))), [0] * len(a), [(i, len(a) - 1)]),
                _Segment(list(b), list(range(len(b))), [0] * len(b), [(n + i, len(b) - 1)])]  # fmt: skip
    rest = len(b) - p
    return [
        _Segment(
            [*a, *b[p:]],
            [*range(len(a)), *range(p, len(b))],  # the second's rest continues from the start
            [0] * p + [1] * (len(a) - p) + [2] * rest,
            [(i, len(a) - 1), (n + i, len(a) + rest - 1)],
        )
    ]


@dataclass
class PairLayout:
    """Where a micro-batch's pairs go in packed rows, before any tensor is built (cheap to compare)."""

    segments: list[_Segment]
    rows: list[list[int]]  # segment indices of each row
    width: int
    num_pairs: int


def layout_pairs(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], width: int) -> PairLayout:
    """Where pairs go in rows of `width` (wider if one sequence is longer), first fit, longest first.

    A pair is one segment [start | rest of first | rest of second], or its two sequences apart when
    that segment is wider than `width`.
    """
    segments = [seg for i, (a, b) in enumerate(pairs) for seg in _pair_segments(i, len(pairs), a, b, width)]
    rows = first_fit([len(seg.ids) for seg in segments], width)
    return PairLayout(segments, rows, max(width, max(len(seg.ids) for seg in segments)), len(pairs))


def pack_pairs(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    width: int,
    pad_id: int,
    device: torch.device | None = None,
) -> PackedSequences:
    """Pairs of sequences with a common start (a prompt and two replies), the start computed once."""
    return pack_layout(layout_pairs(pairs, width), pad_id, device)


def pack_layout(layout: PairLayout, pad_id: int, device: torch.device | None = None) -> PackedSequences:
    """The rows of a `layout_pairs` layout, with the mask that keeps each sequence as if alone.

    The second's positions continue from the start, and the mask lets a token see the earlier
    tokens of its own segment except the second's tokens the first's rest, so each sequence's
    hidden states are those it has alone, with fewer tokens to compute (a reward pair's prompt once
    instead of twice). ends: [2N], every first, then every second, in input order. The mask
    [R, 1, W, W] is built on `device` (the model's: no large copy). The model must take a 4-D mask
    (`core.models.check_pair_packing`).
    """
    n_rows, width = len(layout.rows), layout.width
    ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    positions = torch.zeros((n_rows, width), dtype=torch.long)
    segment = torch.full((n_rows, width), -1, dtype=torch.long)  # -1 = padding
    part = torch.zeros((n_rows, width), dtype=torch.long)
    ends = torch.empty(2 * layout.num_pairs, dtype=torch.long)
    for r, members in enumerate(layout.rows):
        col = 0
        for k in members:
            seg = layout.segments[k]
            span = slice(col, col + len(seg.ids))
            ids[r, span], positions[r, span] = torch.tensor(seg.ids), torch.tensor(seg.positions)
            segment[r, span], part[r, span] = k, torch.tensor(seg.parts)
            for index, offset in seg.ends:
                ends[index] = r * width + col + offset
            col += len(seg.ids)
        positions[r, col:] = torch.arange(width - col)
    segment, part = segment.to(device), part.to(device)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()  # [W, W]
    same = segment[:, :, None] == segment[:, None, :]  # [R, W, W]; the padding is one segment of its own
    second_to_first = (part[:, :, None] == 2) & (part[:, None, :] == 1)
    mask = causal & same & ~second_to_first  # [R, W, W]
    return PackedSequences(ids, positions, ends, mask[:, None])


def collate(examples: Sequence[Encoded | Packed], pad_id: int) -> Batch:
    """Right-pad a list of encoded (or packed) examples into a Batch."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    packed = isinstance(examples[0], Packed)
    mask = None if packed else torch.zeros((len(examples), width), dtype=torch.bool)
    positions = torch.zeros((len(examples), width), dtype=torch.long) if packed else None
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        if packed:
            # padding forms its own segment (positions restart at 0): real tokens never attend to it
            positions[i, :n] = torch.tensor(e.position_ids)
            positions[i, n:] = torch.arange(width - n)
        else:
            mask[i, :n] = True
    return Batch(ids, labels, mask, positions)


class GlobalBatches:
    """Which examples each rank sees at each step: a pure function of (seed, step).

    Each epoch is a fresh seeded permutation; step s takes the s-th global batch of it
    (the last incomplete batch of an epoch is dropped). Rank r's micro-batch m of step s is
    a fixed slice of that global batch, so one process with micro batch 4 and two processes
    with micro batch 2 train on the same global batch, and resuming at step s needs only s.
    """

    def __init__(
        self, num_examples: int, micro_batch: int, grad_accum: int, world_size: int, seed: int,
        knobs: str = "train.micro_batch_size_per_device or train.grad_accum_steps",
    ):  # fmt: skip
        """`knobs`: the settings that size the batch, named in the error when the data is short of one."""
        self.micro, self.accum, self.world = micro_batch, grad_accum, world_size
        self.global_batch = micro_batch * grad_accum * world_size
        if num_examples < self.global_batch:
            raise ValueError(
                f"{num_examples} examples are fewer than one global batch ({self.global_batch}); "
                f"lower {knobs}, or add data"
            )
        self.num_examples, self.seed = num_examples, seed
        self.steps_per_epoch = num_examples // self.global_batch
        self._epoch_order: tuple[int, torch.Tensor] | None = None  # the last epoch's permutation

    def batch(self, step: int) -> list[int]:
        """Example indices of the whole global batch at `step` (0-based): every rank's micro-batches."""
        epoch, within = divmod(step, self.steps_per_epoch)
        if self._epoch_order is None or self._epoch_order[0] != epoch:  # one permutation per epoch, not step
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch_order = epoch, torch.randperm(self.num_examples, generator=generator)
        start = within * self.global_batch
        return self._epoch_order[1][start : start + self.global_batch].tolist()

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Example indices of rank `rank`'s `accum` micro-batches at `step` (0-based)."""
        batch = self.batch(step)
        # layout of the global batch: [micro step][rank][example]
        per_micro = self.micro * self.world
        return [
            batch[m * per_micro + rank * self.micro : m * per_micro + (rank + 1) * self.micro]
            for m in range(self.accum)
        ]
