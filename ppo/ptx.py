"""PPO-ptx: a language-modelling loss on demonstrations mixed into the actor's update.

InstructGPT (Ouyang et al. 2022, eq. 2) adds gamma * E_pretrain[log pi(x)] to the PPO objective
so the policy keeps the abilities RLHF would otherwise erode ("alignment tax").
"""

from __future__ import annotations

import logging

import torch

from core import dist
from data.builtin import sft_conversations
from data.collate import GlobalBatches, collate
from data.formats import DataError, load_conversations
from data.templates import IGNORE_INDEX, PromptFormatter

log = logging.getLogger(__name__)


class PtxData:
    """Demonstrations for the ptx loss, one micro-batch per actor micro-step, in a seeded order."""

    def __init__(self, cfg, formatter: PromptFormatter, max_len: int, world: int, seed: int, task_seed: int):
        if cfg.path == "builtin":  # demonstrations on the training prompts only (held-out ones stay unseen)
            convs, _ = sft_conversations(cfg.builtin_demonstrations, task_seed, 0.0)
        else:
            convs, _ = load_conversations(cfg.path, cfg.format)
        encoded = [formatter.encode(c, max_len=max_len) for c in convs]
        # a cut that removed every target would make a micro-batch of them a 0/0 (NaN) token mean
        self.examples = [e for e in encoded if any(label != IGNORE_INDEX for label in e.labels[1:])]
        if len(self.examples) < len(encoded):
            log.warning("ptx: %d of %d demonstrations have no reply left within %d tokens; left out",
                        len(encoded) - len(self.examples), len(encoded), max_len)  # fmt: skip
        if not self.examples:
            raise DataError(f"ptx.path={cfg.path}: no demonstration keeps any reply token within {max_len} "
                            "tokens (data.max_len + rollout.max_new_tokens)")  # fmt: skip
        self.targets = [sum(label != IGNORE_INDEX for label in e.labels[1:]) for e in self.examples]
        self.pad_id, self.world = formatter.tokenizer.pad_token_id, world
        self.batches = GlobalBatches(len(self.examples), cfg.micro_batch_size_per_device, 1, world, seed,
                                     knobs="ptx.micro_batch_size_per_device")  # fmt: skip
        self.calls = 0  # how many micro-batches were drawn (restored on resume through the step count)

    def normaliser(self, micro_steps: int) -> float:
        """What each summed micro-batch loss of the next minibatch (`micro_steps` per rank) is divided by.

        Its target tokens over every rank / (micro-steps x ranks), as for the PPO terms: DeepSpeed then
        averages over micro-steps and ranks, so the ptx term is the token mean over the whole minibatch
        whatever its split, like the SFT stage's loss. A mean of per-micro-batch token means would weight
        the tokens of short micro-batches more, and differently for another micro-batch size.
        """
        tokens = sum(self.targets[i] for call in range(self.calls, self.calls + micro_steps)
                     for i in self.batches.batch(call))  # fmt: skip
        return max(tokens, 1) / (micro_steps * self.world)

    def loss(self, engine, device: torch.device) -> tuple[torch.Tensor, int]:
        """The next micro-batch's (this rank's share) LM loss summed over its target tokens: (scalar, count)."""
        (index,) = self.batches.micro_batches(self.calls, dist.rank())
        self.calls += 1
        b = collate([self.examples[i] for i in index], self.pad_id).to(device)
        out = engine(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels, use_cache=False)
        n = sum(self.targets[i] for i in index)  # the tokens transformers' loss averages over
        return out.loss * n, n
