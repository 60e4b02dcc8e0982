"""Rollouts: sample responses from the actor, then score them with the frozen models and the critic.

Shapes: B sequences (prompts x rollout.samples_per_prompt), P prompt tokens (left-padded), A response
tokens (right-padded), V vocab.
Masks are True for valid tokens. A response is valid up to and including its first EOS.
The model input for scoring is [prompt | response] of width P + A; the logits / values that
concern response token t are read at position P - 1 + t (the state before the action). With
data.packing the models see those sequences without their padding, laid end to end (`Sequences`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from core import models
from data.collate import PackedSequences, pack_sequences
from data.formats import Conversation, Message
from data.templates import PromptFormatter
from ppo.loss import entropy_from_logits


@dataclass
class Rollout:
    """One rank's rollout batch; every tensor is on the training device."""

    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P] bool
    response_ids: torch.Tensor  # [B, A] right-padded
    response_mask: torch.Tensor  # [B, A] bool, up to and including the first EOS
    logprobs: torch.Tensor  # [B, A] log pi_old(a_t | s_t) of the sampled tokens (at the sampling temperature)
    ref_logprobs: torch.Tensor  # [B, A] log pi_ref(a_t | s_t)
    values: torch.Tensor  # [B, A] V_old(s_t), the critic before the update
    scores: torch.Tensor  # [B] reward-model score after normalisation, clipping and the no-EOS penalty
    raw_scores: torch.Tensor  # [B] reward-model score as the model gave it
    kl: torch.Tensor  # [B, A] per-token KL estimate used in the reward
    rewards: torch.Tensor  # [B, A] KL-penalised per-token rewards
    advantages: torch.Tensor  # [B, A]
    returns: torch.Tensor  # [B, A]

    def select(self, index: torch.Tensor) -> Rollout:
        """The rows `index` of every field (a minibatch)."""
        return Rollout(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @property
    def sequence(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[prompt | response] ids and mask: [B, P + A] each."""
        return (torch.cat([self.prompt_ids, self.response_ids], 1),
                torch.cat([self.prompt_mask, self.response_mask], 1))  # fmt: skip


def response_mask(response_ids: torch.Tensor, eos_id: int | None, stop_at_eos: bool) -> torch.Tensor:
    """True up to and including the first EOS of each row (everything when EOS does not stop): [B, A]."""
    if eos_id is None or not stop_at_eos:
        return torch.ones_like(response_ids, dtype=torch.bool)
    is_eos = response_ids == eos_id
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    return ~after_eos


def ends_with_eos(response_ids: torch.Tensor, mask: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """Whether each response's last valid token is EOS: [B] bool."""
    if eos_id is None:
        return torch.zeros(len(response_ids), dtype=torch.bool, device=response_ids.device)
    last = response_ids.gather(1, models.last_index(mask)[:, None]).squeeze(1)
    return (last == eos_id) & mask.any(1)


@torch.no_grad()
def sample(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    min_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    eos_id: int | None,
    pad_id: int,
    stop_at_eos: bool,
    synced_gpus: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample responses with transformers' `generate` (KV cache).

    Returns (response_ids [B, A], logprobs [B, A], entropy [B, A]): the log-probability of each
    sampled token and the policy's entropy, both at `temperature` and before any top-k / top-p
    filtering, read from the sampling pass's own logits (this saves one actor forward). They are
    computed one step at a time, so no [B, A, V] float copy is ever made (with a 128k vocabulary
    that copy alone would take gigabytes). A <= max_new_tokens (generation stops when every row
    has hit EOS).
    """
    out = model.generate(
        input_ids=prompt_ids, attention_mask=prompt_mask.long(), do_sample=True, temperature=temperature,
        top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
        eos_token_id=eos_id if stop_at_eos else None, pad_token_id=pad_id, synced_gpus=synced_gpus,
        output_logits=True, return_dict_in_generate=True, use_cache=True,
    )  # fmt: skip
    response = out.sequences[:, prompt_ids.shape[1] :]  # [B, A]
    logprobs, entropy = [], []
    for t, step_logits in enumerate(out.logits):  # each [B, V], raw (unprocessed) logits
        logp = torch.log_softmax(step_logits.float() / temperature, dim=-1)
        logprobs.append(logp.gather(-1, response[:, t, None]).squeeze(-1))
        entropy.append(-(logp.exp() * logp).sum(-1))
    return response, torch.stack(logprobs, 1), torch.stack(entropy, 1)


# Packed rows are the padded width or twice it, whichever holds the sequences in fewer token slots:
# sequences are often over half the padded width (built-in task: 30 real tokens of 45), so rows of that
# width would hold one each. Wider rows cost attention over their whole width (a block-diagonal mask),
# so a micro-batch stays padded unless packing saves at least MIN_SAVING of the slots. Measured PPO
# step, built-in task (a third padding): unpacked 0.87 s; rows of 1x 0.87 s, 1.5x 0.80 s, 2x 0.73 s,
# 3x 0.74 s, 4x 0.81 s. The `bench` workloads (4 % padding) gain no slots from 2x rows and were 6 %
# slower with them (0.94 s vs 0.89 s), so they stay padded.
ROW_WIDTH_FACTORS = (1, 2)
MIN_SAVING = 0.1


@dataclass
class Sequences:
    """A micro-batch of [prompt | response] sequences as the models take it.

    ids, mask: [b, P + A] (prompts left-padded, responses right-padded, mask True = valid).
    packed:    None for padded rows; with data.packing, each sequence's valid tokens laid end to end
               in rows of 1 or 2 x (P + A) (`data.collate.pack_sequences`: position ids restart per
               sequence, so attention stays within it), outputs read back at flat positions. The same
               numbers (up to rounding) without compute on padding (a third of the tokens on the
               built-in task). A micro-batch with little padding stays padded (see ROW_WIDTH_FACTORS).
    """

    ids: torch.Tensor
    mask: torch.Tensor
    prompt_width: int
    packed: PackedSequences | None = None

    @classmethod
    def of(
        cls, ids: torch.Tensor, mask: torch.Tensor, prompt_width: int, pad_id: int, pack: bool
    ) -> Sequences:
        if not pack:
            return cls(ids, mask, prompt_width)
        seqs = [r[m].tolist() for r, m in zip(ids.cpu(), mask.cpu())]
        layouts = [pack_sequences(seqs, f * ids.shape[1], pad_id) for f in ROW_WIDTH_FACTORS]
        rows = min(layouts, key=lambda r: r.input_ids.numel())  # the narrower rows on a tie
        if rows.input_ids.numel() > (1 - MIN_SAVING) * ids.numel():
            return cls(ids, mask, prompt_width)  # packing would save little: padded rows
        dev = ids.device
        packed = PackedSequences(rows.input_ids.to(dev), rows.position_ids.to(dev), rows.ends.to(dev))
        return cls(ids, mask, prompt_width, packed)

    @property
    def response_mask(self) -> torch.Tensor:
        return self.mask[:, self.prompt_width :]  # [b, A]

    def response_positions(self) -> torch.Tensor:
        """Flat packed index of the position that predicts each valid response token: [n], in the
        row-major order of response_mask (a response's valid tokens are a prefix, each sequence ends
        with its response, so token t of a response of n_i tokens is predicted at end_i - n_i + t)."""
        n = self.response_mask.sum(1)  # [b]
        first = torch.repeat_interleave(self.packed.ends - n, n)  # [n_total]
        offset = torch.arange(len(first), device=first.device) - torch.repeat_interleave(n.cumsum(0) - n, n)
        return first + offset

    def scatter(self, flat: torch.Tensor) -> torch.Tensor:
        """Per-token values at response_positions [n] -> [b, A] (0 at padding)."""
        return flat.new_zeros(self.response_mask.shape).masked_scatter(self.response_mask, flat)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) at `tokens`: logits [B, A, V], tokens [B, A] -> [B, A] (float32)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens[..., None]).squeeze(-1)


def response_logits(model, ids: torch.Tensor, mask: torch.Tensor, prompt_width: int) -> torch.Tensor:
    """The LM's logits that predict each response token: ids/mask [B, P + A] -> [B, A, V].

    The LM head runs on those A positions only (`logits_to_keep`), not on the prompt.
    """
    width = ids.shape[1] - prompt_width
    out = model(input_ids=ids, attention_mask=mask.long(), position_ids=models.positions_from_mask(mask),
                use_cache=False, logits_to_keep=width + 1)  # fmt: skip
    return out.logits[:, :-1]  # [B, A, V]: positions P-1 .. P+A-2


def response_logprobs(
    model, seqs: Sequences, tokens: torch.Tensor, temperature: float, entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(a_t | s_t) of the response `tokens` [b, A] at `temperature`, and (if asked) the
    policy's entropy there: each [b, A] float32, meaningful where seqs.response_mask is True.

    Packed rows run the LM head on the n valid response positions only ([n, V] logits).
    """
    if seqs.packed is None:
        logits = response_logits(model, seqs.ids, seqs.mask, seqs.prompt_width)  # [b, A, V]
        ent = entropy_from_logits(logits.float() / temperature) if entropy else None  # fp32, as log-probs
        return logprobs_from_logits(logits, tokens, temperature), ent
    rows = seqs.packed
    out = model(input_ids=rows.input_ids, position_ids=rows.position_ids, output_hidden_states=True,
                use_cache=False, logits_to_keep=1)  # fmt: skip
    hidden = out.hidden_states[-1].flatten(0, 1)[seqs.response_positions()]  # [n, d]
    logits = models.output_logits(model, hidden)  # [n, V]
    logp = logprobs_from_logits(logits, tokens[seqs.response_mask], temperature)  # [n]
    ent = seqs.scatter(entropy_from_logits(logits.float() / temperature)) if entropy else None
    return seqs.scatter(logp), ent


def response_values(model, head, seqs: Sequences) -> torch.Tensor:
    """The critic's V(s_t) before each response token: [b, A] (float32; 0 at padding when packed)."""
    if seqs.packed is None:
        return models.token_scores(model, head, seqs.ids, seqs.mask)[:, seqs.prompt_width - 1 : -1]
    rows = seqs.packed
    values = models.token_scores(model, head, rows.input_ids, position_ids=rows.position_ids)  # [R, W]
    return seqs.scatter(values.flatten()[seqs.response_positions()])


def sequence_scores(model, head, seqs: Sequences) -> torch.Tensor:
    """A reward model's score at each sequence's last valid token: [b]."""
    if seqs.packed is None:
        values = models.token_scores(model, head, seqs.ids, seqs.mask)  # [b, T]
        return values.gather(1, models.last_index(seqs.mask)[:, None]).squeeze(1)
    rows = seqs.packed
    return rows.gather(models.token_scores(model, head, rows.input_ids, position_ids=rows.position_ids))


def retokenised(
    formatter: PromptFormatter, prompts: list[tuple[Message, ...]], texts: list[str], complete: list[bool],
    max_len: int | None,
) -> list[list[int]]:  # fmt: skip
    """[prompt | response] token ids for a reward model with a tokenizer of its own, one list per row.

    A response that ended with the policy's EOS ends with the reward model's (its formatter closes a
    reply with it); one cut off at max_new_tokens ends without, as on the shared-token path. Rows
    longer than max_len (the reward model's positions) lose their start after any BOS: the scored end stays.
    """
    rows = []
    for prompt, text, done in zip(prompts, texts, complete):
        ids = formatter.encode(Conversation((*prompt, Message("assistant", text))), max_len=10**9).input_ids
        if not done and ids[-1] == formatter.eos_id:
            ids = ids[:-1]
        rows.append(formatter.keep_end(ids, max_len) if max_len else ids)
    return rows


def pad_rows(
    rows: list[list[int]], pad_id: int, side: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of token ids -> (ids [B, T], mask [B, T] bool), padded on `side`."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = True
    return ids.to(device), mask.to(device)
