"""Rollouts: sample responses from the actor, then score them with the frozen models and the critic.

Shapes: B prompts, P prompt tokens (left-padded), A response tokens (right-padded), V vocab.
Masks are True for valid tokens. A response is valid up to and including its first EOS.
The model input for scoring is [prompt | response] of width P + A; the logits / values that
concern response token t are read at position P - 1 + t (the state before the action).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from core import models


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


def response_values(model, head, ids: torch.Tensor, mask: torch.Tensor, prompt_width: int) -> torch.Tensor:
    """The critic's V(s_t) before each response token: ids/mask [B, P + A] -> [B, A] (float32)."""
    return models.token_scores(model, head, ids, mask)[:, prompt_width - 1 : -1]


def sequence_scores(model, head, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A reward model's score at each sequence's last valid token: [B, T] -> [B]."""
    values = models.token_scores(model, head, ids, mask)  # [B, T]
    return values.gather(1, models.last_index(mask)[:, None]).squeeze(1)


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
