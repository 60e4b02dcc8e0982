"""Stage 2 recipe: a reward model from preference pairs.   python -m reward [key=value ...]

The model is the policy's backbone with a scalar head (sequence classification, one label),
initialised from an SFT export when `model.name_or_path` points at one. Its score for a
(prompt, reply) is the head's value at the last real token, the EOS that ends the reply, read
from the attention mask so left or right padding and pad == EOS tokenizers all score the same.

With `data.packing` (the default here) each micro-batch's pairs are laid end to end in rows of
`data.max_len` or twice that (whichever costs the model fewer FLOPs) instead of padded to the
longest, and a pair's two sequences share their prompt: [prompt | chosen reply | rejected reply],
the rejected reply's positions continuing from the prompt and a 4-D mask hiding the chosen reply
from it (`data.collate.pack_pairs`). The same pairs and the same loss, with no padding and each
prompt computed once; every sequence is scored as if alone, which setup checks on the model
before training.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from core import checkpoint, dist, models
from core import deepspeed as ds
from core.logging import MetricsLogger
from data import imdb
from data.builtin import task
from data.collate import GlobalBatches, PackedSequences, layout_pairs, pack_layout
from data.formats import Conversation, Message, PreferencePair, load_preferences, opening, split_train_eval
from data.templates import PromptFormatter
from reward.config import check_config
from reward.loss import accuracy, centering_penalty, preference_loss

log = logging.getLogger(__name__)


@dataclass
class EncodedPair:
    chosen: list[int]
    rejected: list[int]
    margin: float


def collate_pairs(pairs: list[EncodedPair], pad_id: int, padding_side: str = "right"):
    """Chosen rows then rejected rows: input_ids [2B, T], attention_mask [2B, T] (True = valid), margin [B]."""
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
        ids[i, span] = torch.tensor(r)
        mask[i, span] = True
    return ids, mask, torch.tensor([p.margin for p in pairs], dtype=torch.float32)


class RewardRecipe:
    """setup -> train -> cleanup; checkpoints, reward statistics and the export happen inside train."""

    def __init__(self, cfg: DictConfig, run_dir: Path | None = None):
        self.cfg = cfg
        self.run_dir = run_dir or Path(HydraConfig.get().runtime.output_dir)
        self.step = 0
        self.reward_stats: dict[str, float] | None = None  # set by the final evaluation

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        cfg = self.cfg
        check_config(cfg)
        transformers.set_seed(cfg.train.seed)
        self.device = dist.device()
        if dist.keep_freed_cpu_memory(cfg.train.keep_freed_memory):
            log.info("train.keep_freed_memory: glibc keeps freed memory for the next step")
        self.tokenizer = models.load_tokenizer(
            cfg.model.tokenizer, cfg.model.name_or_path, cfg.model.trust_remote_code, cfg.model.revision
        )
        self.formatter = PromptFormatter(self.tokenizer, **cfg.data.template)
        self._setup_data()
        self.ds_config = ds.config_from_groups(cfg.deepspeed, cfg.train, cfg.optim)
        self.zero3 = ds.zero3_init(self.ds_config)  # kept alive: transformers holds a weak reference
        model = models.build_model(
            cfg.model,
            cfg.peft,
            self.tokenizer,
            cfg.train.precision,
            head="score",
            onednn_products=cfg.train.onednn_products,
        )
        o = cfg.optim
        self.engine = ds.train_engine(model, self.ds_config, weight_decay=o.weight_decay, warmup_steps=o.warmup_steps,
                                      total_steps=cfg.train.max_steps, min_lr_ratio=o.min_lr_ratio)  # fmt: skip
        self.head = models.score_head(self.engine.module)
        if cfg.data.packing:
            self._check_packing()
            self.flops = models.forward_flops(self.engine)  # (per token, per attended position)
        config = OmegaConf.to_container(cfg, resolve=True)
        self.logger = MetricsLogger.from_group(
            self.run_dir, cfg.logger, config, cfg.train.max_steps, job_type="reward"
        )
        if cfg.train.resume:
            self.step = checkpoint.resume(self.engine, self.run_dir)
            self.logger.rewind(self.step)
        shares = ds.partition_shares(self.engine.module)
        if self.step == 0:
            self.logger.log(
                {
                    "data/train_pairs": len(self.train_set),
                    "data/eval_pairs": len(self.eval_set),
                    "data/truncated": self.num_truncated,
                    "data/identical_after_cut": self.num_identical,
                    **{f"zero/param_share_rank{r}": share for r, share in enumerate(shares)},
                },
                step=0,
            )

    def _setup_data(self) -> None:
        d = self.cfg.data
        if d.path == "builtin":
            train_prompts, heldout = task.split_prompts(d.builtin.seed)
            n_eval = max(1, int(d.builtin.num_prompts * d.eval_fraction))
            train = self._builtin_pairs(
                task.preference_pairs(d.builtin.num_prompts, d.builtin.seed, train_prompts)
            )
            evals = self._builtin_pairs(task.preference_pairs(n_eval, d.builtin.seed + 1, heldout))
        elif d.format == "imdb":
            train, evals = imdb.reward_pairs(d.path, d.imdb, d.eval_fraction, d.shuffle_seed, d.on_error)
        else:
            train, _ = load_preferences(d.path, d.format, on_error=d.on_error, split=d.split)
            if d.eval_path is not None:
                evals, _ = load_preferences(d.eval_path, d.format, on_error=d.on_error, split=d.split)
            else:
                # a prompt's pairs (several for a ranked one) on one side: eval never scores a prompt it trained on
                train, evals = split_train_eval(
                    train, d.eval_fraction, d.shuffle_seed, group=lambda p: opening(p.prompt)
                )
        self.num_truncated = self.num_identical = 0
        self.train_pairs, self.train_set = self._encode(train)
        self.eval_pairs, self.eval_set = self._encode(evals)
        if self.num_truncated:
            log.warning(
                "data: %d sequences over data.max_len=%d cut from the left", self.num_truncated, d.max_len
            )
        if self.num_identical:
            log.warning("data: %d pairs left out: their replies encode to the same tokens (cut to "
                        "data.max_len=%d, or words the tokenizer does not know)",
                        self.num_identical, d.max_len)  # fmt: skip
        t = self.cfg.train
        self.batches = GlobalBatches(
            len(self.train_set), t.micro_batch_size_per_device, t.grad_accum_steps, dist.world_size(), t.seed
        )
        log.info("data: %d train pairs, %d eval pairs", len(self.train_set), len(self.eval_set))

    @staticmethod
    def _builtin_pairs(pairs: list[task.BuiltinPair]) -> list[PreferencePair]:
        return [
            PreferencePair((Message("user", p.prompt),), p.chosen, p.rejected, 0.0, f"builtin:{i}")
            for i, p in enumerate(pairs)
        ]

    def _encode(self, pairs: list[PreferencePair]) -> tuple[list[PreferencePair], list[EncodedPair]]:
        """(pairs kept, their encodings): a pair whose replies encode to the same tokens (after the cut to
        data.max_len) is left out: its loss is log 2 with no gradient, and in evaluation it can only count
        as wrong."""
        kept, encoded = [], []
        for p in pairs:
            chosen, rejected = (
                self._encode_reply(p.prompt, p.chosen),
                self._encode_reply(p.prompt, p.rejected),
            )
            if chosen == rejected:
                self.num_identical += 1
                continue
            kept.append(p)
            encoded.append(EncodedPair(chosen, rejected, p.margin if self.cfg.loss.use_margin else 0.0))
        return kept, encoded

    def _encode_reply(self, prompt: tuple[Message, ...], reply: str) -> list[int]:
        """Prompt + reply + EOS, cut from the left to data.max_len: the scored end (the EOS) and a leading BOS
        are always kept."""
        ids = self.formatter.encode(
            Conversation((*prompt, Message("assistant", reply))), max_len=10**9
        ).input_ids
        if len(ids) > self.cfg.data.max_len:
            self.num_truncated += 1
            return self.formatter.keep_end(ids, self.cfg.data.max_len)
        return ids

    def _check_packing(self) -> None:
        """Fail before training if the model does not score packed pairs as it scores them alone."""
        pairs = [(p.chosen, p.rejected) for p in self.train_set[:2]]
        self.engine.eval()  # no dropout: the forwards must be comparable
        models.check_pair_packing(self.engine, pairs, self.device)
        self.engine.train()

    # ------------------------------------------------------------------ train

    def rewards(self, pairs: list[EncodedPair]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(chosen [B], rejected [B], margin [B]) rewards of a micro-batch of pairs."""
        margin = torch.tensor([p.margin for p in pairs], dtype=torch.float32, device=self.device)
        if self.cfg.data.packing:
            rows = self._pack(pairs)
            ids, positions = rows.input_ids.to(self.device), rows.position_ids.to(self.device)
            mask = rows.attention_mask  # [R, 1, W, W], built on the device
            values = models.token_scores(self.engine, self.head, ids, mask, positions)  # [R, W]
            scores = rows.gather(values)  # [2B]: chosen then rejected
        else:
            ids, mask, _ = collate_pairs(pairs, self.tokenizer.pad_token_id)
            ids, mask = ids.to(self.device), mask.to(self.device)
            values = models.token_scores(self.engine, self.head, ids, mask)  # [2B, T]
            scores = values.gather(1, models.last_index(mask)[:, None]).squeeze(1)  # [2B]
        chosen, rejected = scores.chunk(2)
        return chosen, rejected, margin

    def _pack(self, pairs: list[EncodedPair]) -> PackedSequences:
        """The pairs in rows of max_len or 2 x max_len tokens, whichever costs the model fewer FLOPs.

        Wider rows let more pairs share their prompt (fewer tokens), but under the 4-D mask every token
        attends over the whole row: R rows of width W cost R x W x (per token + W x per position).
        Only the chosen layout's tensors are built.
        """
        per_token, per_position = self.flops
        seqs = [(p.chosen, p.rejected) for p in pairs]
        layouts = [layout_pairs(seqs, f * self.cfg.data.max_len) for f in (1, 2)]
        best = min(
            layouts, key=lambda lay: len(lay.rows) * lay.width * (per_token + lay.width * per_position)
        )
        return pack_layout(best, self.tokenizer.pad_token_id, self.device)

    def train(self) -> None:
        t, center = self.cfg.train, self.cfg.loss.center_coef
        while self.step < t.max_steps:
            start = time.perf_counter()
            sums = torch.zeros(
                2, device=self.device
            )  # loss, accuracy: summed on the device, one sync per step
            micro = self.batches.micro_batches(self.step, dist.rank())
            for idx in micro:
                chosen, rejected, margin = self.rewards([self.train_set[i] for i in idx])
                loss = preference_loss(chosen, rejected, margin)
                if center > 0:
                    loss = loss + center * centering_penalty(chosen, rejected)
                self.engine.backward(loss)
                self.engine.step()
                sums += torch.stack([loss.detach(), accuracy(chosen, rejected)])
            self.step += 1
            metrics = {"time/step_s": time.perf_counter() - start}
            if (t.log_every and self.step % t.log_every == 0) or self.step == t.max_steps:
                loss_sum, acc_sum = dist.all_reduce_sum(sums.tolist(), self.device)
                n = len(micro) * dist.world_size()
                metrics |= {
                    "train/loss": loss_sum / n,
                    "train/accuracy": acc_sum / n,
                    "train/lr": self.engine.get_lr()[0],
                    "train/epoch": self.step / self.batches.steps_per_epoch,
                }
                if (norm := ds.grad_norm(self.engine)) is not None:  # none: fp32 stage 0, no clipping
                    metrics["train/grad_norm"] = norm
            final = self.step == t.max_steps
            if (t.eval_every and self.step % t.eval_every == 0) or final:
                metrics |= self.evaluate(final=final)
            if len(metrics) > 1:
                self.logger.log(metrics, self.step)
            self.logger.advance(self.step)
            if (t.save_every and self.step % t.save_every == 0) or final:
                checkpoint.save_checkpoint(
                    self.engine, self.run_dir, self.step, {"stage": "reward"}, t.keep_checkpoints
                )
        self.export()

    @torch.no_grad()
    def evaluate(self, final: bool = False) -> dict[str, float]:
        """Accuracy, mean rewards and margin on the eval pairs (all of them when final)."""
        t, world, rank = self.cfg.train, dist.world_size(), dist.rank()
        self.engine.eval()
        micro = t.micro_batch_size_per_device
        n_batches = math.ceil(len(self.eval_set) / (micro * world))
        if t.eval_batches and not final:
            n_batches = min(n_batches, t.eval_batches)
        chosen_all, rejected_all, index_all = [], [], []
        for k in range(n_batches):  # the same number of forwards on every rank (ZeRO-3 gathers collectively)
            lo = (k * world + rank) * micro
            idx = list(range(lo, min(lo + micro, len(self.eval_set)))) or [0]
            chosen, rejected, _ = self.rewards([self.eval_set[i] for i in idx])
            if lo < len(self.eval_set):
                chosen_all += chosen.tolist()
                rejected_all += rejected.tolist()
                index_all += idx
        self.engine.train()
        gathered = dist.all_gather_object((chosen_all, rejected_all, index_all))
        chosen = torch.tensor([c for g in gathered for c in g[0]])
        rejected = torch.tensor([r for g in gathered for r in g[1]])
        index = [i for g in gathered for i in g[2]]
        metrics = {
            "eval/accuracy": accuracy(chosen, rejected).item(),
            "eval/reward_chosen": chosen.mean().item(),
            "eval/reward_rejected": rejected.mean().item(),
            "eval/margin": (chosen - rejected).mean().item(),
        }
        if self.cfg.data.path == "builtin":  # agreement with the noise-free gold judge
            agree = []
            for c, r, i in zip(chosen.tolist(), rejected.tolist(), index):
                p = self.eval_pairs[i]
                gold_c, gold_r = (
                    task.gold_score(p.prompt[-1].content, p.chosen),
                    task.gold_score(p.prompt[-1].content, p.rejected),
                )
                agree.append((c > r) == (gold_c > gold_r))
            metrics["eval/gold_accuracy"] = statistics.mean(agree)
        if final:
            scores = torch.cat([chosen, rejected])
            self.reward_stats = {
                "mean": scores.mean().item(),
                "std": scores.std().item(),
                "count": scores.numel(),
            }
        return metrics

    # ------------------------------------------------------------------ save

    def export(self) -> None:
        if self.reward_stats is None:
            self.evaluate(final=True)
        info = {"stage": "reward", "step": self.step, "peft": self.cfg.peft.type}
        extra = {checkpoint.REWARD_STATS: json.dumps(self.reward_stats, indent=2)}
        checkpoint.export_model(self.engine, self.tokenizer, self.run_dir / "export",
                                merge_lora=self.cfg.peft.merge_on_export, info=info, extra_files=extra)  # fmt: skip

    def cleanup(self) -> None:
        self.logger.close()
