"""Stage 1 recipe: supervised fine-tuning.   python -m sft [key=value ...]

Loss: token-level cross-entropy on the assistant replies (and their EOS), averaged over every
target token of the *global* batch, so the result does not depend on how the batch is split
into micro-batches or ranks (the gradient-accumulation bug many trainers had).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import Path

import torch
import transformers
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from core import checkpoint, dist, models
from core import deepspeed as ds
from core.logging import MetricsLogger
from data import builtin, imdb
from data.collate import GlobalBatches, collate, pack
from data.formats import Conversation, load_conversations, opening, split_train_eval
from data.templates import Encoded, PromptFormatter
from sft.config import check_config

log = logging.getLogger(__name__)


class SFTRecipe:
    """setup -> train -> cleanup; checkpoints and the export happen inside train."""

    def __init__(self, cfg: DictConfig, run_dir: Path | None = None):
        self.cfg = cfg
        self.run_dir = run_dir or Path(HydraConfig.get().runtime.output_dir)
        self.step = 0

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        cfg = self.cfg
        check_config(cfg)
        transformers.set_seed(cfg.train.seed)
        self.device = dist.device()
        if dist.keep_freed_cpu_memory(cfg.train.keep_freed_memory):
            log.info("train.keep_freed_memory: glibc keeps freed memory for the next step")
        train, evals = self._load_conversations()
        if cfg.model.tokenizer == models.TRAIN_TOKENIZER:  # on this stage's own text; saved with the export
            texts = (m.content for c in train for m in c.messages)
            self.tokenizer = models.train_tokenizer(texts, cfg.model.train_tokenizer_vocab)
            # every rank trains its own: they must agree token for token
            digest = hashlib.sha256(self.tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
            if len(set(dist.all_gather_object(digest))) > 1:
                raise RuntimeError("model.tokenizer=train: the ranks trained different tokenizers")
        else:
            self.tokenizer = models.load_tokenizer(
                cfg.model.tokenizer, cfg.model.name_or_path, cfg.model.trust_remote_code, cfg.model.revision
            )
        self.formatter = PromptFormatter(self.tokenizer, **cfg.data.template)
        self._setup_data(train, evals)
        self.ds_config = ds.config_from_groups(cfg.deepspeed, cfg.train, cfg.optim)
        self.zero3 = ds.zero3_init(self.ds_config)  # kept alive: transformers holds a weak reference
        model = models.build_model(
            cfg.model,
            cfg.peft,
            self.tokenizer,
            cfg.train.precision,
            head="lm",
            onednn_products=cfg.train.onednn_products,
        )
        o = cfg.optim
        self.engine = ds.train_engine(model, self.ds_config, weight_decay=o.weight_decay, warmup_steps=o.warmup_steps,
                                      total_steps=cfg.train.max_steps, min_lr_ratio=o.min_lr_ratio)  # fmt: skip
        if cfg.data.packing:
            self._check_packing()
        config = OmegaConf.to_container(cfg, resolve=True)
        self.logger = MetricsLogger.from_group(
            self.run_dir, cfg.logger, config, cfg.train.max_steps, job_type="sft"
        )
        if cfg.train.resume:
            self.step = checkpoint.resume(self.engine, self.run_dir)
            self.logger.rewind(self.step)
        shares = ds.partition_shares(self.engine.module)
        trainable, n_params = models.count_parameters(self.engine.module)
        log.info("model: %.2fM parameters, %.2fM trainable; this rank stores %.0f%%",
                 n_params / 1e6, trainable / 1e6, 100 * shares[dist.rank()])  # fmt: skip
        if self.step == 0:
            self.logger.log(
                {
                    "data/train_examples": len(self.train_set),
                    "data/eval_examples": len(self.eval_set),
                    "data/truncated": self.num_truncated,
                    "data/truncated_frac": self.num_truncated / max(self.num_encoded, 1),
                    "model/params": n_params,
                    "model/trainable_params": trainable,
                    **{f"zero/param_share_rank{r}": share for r, share in enumerate(shares)},
                },
                step=0,
            )

    def _check_packing(self) -> None:
        """data.packing: fail before training if the model cannot keep packed sequences apart, as the PPO
        and reward stages check (`models.check_packing`): packed rows rely on its use of position ids."""
        first, second = self.packing_probe[0], self.packing_probe[-1]
        self.engine.eval()  # no dropout: the forwards must be comparable
        models.check_packing(self.engine, first, second, self.device)
        self.engine.train()

    def _load_conversations(self) -> tuple[list[Conversation], list[Conversation]]:
        """(train, eval) demonstrations: built-in, IMDB openings, or any file / hub dataset."""
        d = self.cfg.data
        if d.path == "builtin":
            return builtin.sft_conversations(d.builtin.num_prompts, d.builtin.seed, d.eval_fraction)
        if d.format == "imdb":
            return split_train_eval(
                imdb.sft_conversations(d.path, d.imdb, d.on_error), d.eval_fraction, d.shuffle_seed
            )
        train, _ = load_conversations(d.path, d.format, on_error=d.on_error, split=d.split)
        if d.eval_path is not None:
            evals, _ = load_conversations(d.eval_path, d.format, on_error=d.on_error, split=d.split)
            return train, evals
        return split_train_eval(train, d.eval_fraction, d.shuffle_seed, group=lambda c: opening(c.messages))

    def _setup_data(self, train: list[Conversation], evals: list[Conversation]) -> None:
        d = self.cfg.data
        self.eval_conversations = evals
        self.num_truncated = self.num_encoded = 0
        train_set = self._encode(train)
        self.packing_probe = [e.input_ids for e in train_set[:2]]  # two sequences to pack (`_check_packing`)
        self.eval_set = self._encode(evals)
        self.train_set = pack(train_set, d.max_len) if d.packing else train_set
        if self.num_truncated:
            log.warning(
                "data: %d of %d sequences cut to data.max_len=%d",
                self.num_truncated,
                self.num_encoded,
                d.max_len,
            )
        if evals and not self.eval_set:
            log.warning("data: no eval example keeps a reply token within data.max_len=%d; eval/loss is not "
                        "logged", d.max_len)  # fmt: skip
        t = self.cfg.train
        self.batches = GlobalBatches(
            len(self.train_set), t.micro_batch_size_per_device, t.grad_accum_steps, dist.world_size(), t.seed
        )
        log.info(
            "data: %d train rows (%s), %d eval",
            len(self.train_set),
            "packed" if d.packing else "unpacked",
            len(self.eval_set),
        )

    def _encode(self, conversations: list[Conversation]) -> list[Encoded]:
        out = []
        for conv in conversations:
            enc = self.formatter.encode(conv, self.cfg.data.max_len, self.cfg.data.loss_on)
            self.num_encoded += 1
            self.num_truncated += enc.truncated
            if any(label != -100 for label in enc.labels[1:]):  # a cut that removed every target is useless
                out.append(enc)
        return out

    # ------------------------------------------------------------------ train

    def train(self) -> None:
        t = self.cfg.train
        while self.step < t.max_steps:
            start = time.perf_counter()
            loss_sum, targets = self._train_step(self.step)
            self.step += 1
            metrics = {"time/step_s": time.perf_counter() - start}
            if (t.log_every and self.step % t.log_every == 0) or self.step == t.max_steps:
                total_loss, total_targets = dist.all_reduce_sum([loss_sum, targets], self.device)
                metrics |= {
                    "train/loss": total_loss / total_targets,
                    "train/lr": self.engine.get_lr()[0],
                    "train/epoch": self.step / self.batches.steps_per_epoch,
                    "train/target_tokens": total_targets,
                }
                if (norm := ds.grad_norm(self.engine)) is not None:  # none: fp32 stage 0, no clipping
                    metrics["train/grad_norm"] = norm
            if (t.eval_every and self.step % t.eval_every == 0) or self.step == t.max_steps:
                metrics |= self.evaluate()
            if len(metrics) > 1:
                self.logger.log(metrics, self.step)
            self.logger.advance(self.step)
            if (t.save_every and self.step % t.save_every == 0) or self.step == t.max_steps:
                self.save_checkpoint()
        self.export()

    def _train_step(self, step: int) -> tuple[float, float]:
        """One optimizer step on this rank's share of global batch `step`. Returns (sum of token losses, targets)."""
        t = self.cfg.train
        batches = [collate([self.train_set[i] for i in idx], self.tokenizer.pad_token_id).to(self.device)
                   for idx in self.batches.micro_batches(step, dist.rank())]  # fmt: skip
        local_targets = sum(b.num_targets() for b in batches)
        (global_targets,) = dist.all_reduce_sum([local_targets], self.device)  # sync point, once per step
        # DeepSpeed divides by the accumulation steps and averages over ranks; dividing each
        # micro-batch's summed loss by this makes the update the mean over all global targets.
        norm = global_targets / (t.grad_accum_steps * dist.world_size())
        loss_sum = torch.zeros(
            (), device=self.device
        )  # summed on the device: one sync per step, not per micro-batch
        for b in batches:
            out = self.engine(
                input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                labels=b.labels, num_items_in_batch=norm, use_cache=False,
            )  # fmt: skip
            self.engine.backward(out.loss)
            self.engine.step()
            loss_sum += out.loss.detach() * norm
        return loss_sum.item(), float(local_targets)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-mean eval loss and perplexity over the eval set, and greedy samples (logged)."""
        t, world, rank = self.cfg.train, dist.world_size(), dist.rank()
        self.engine.eval()
        micro = t.micro_batch_size_per_device
        n_batches = math.ceil(len(self.eval_set) / (micro * world))
        if t.eval_batches:
            n_batches = min(n_batches, t.eval_batches)
        loss_sum = count = 0.0
        for k in range(n_batches):  # same number of forwards on every rank (ZeRO-3 gathers collectively)
            rows = self.eval_set[(k * world + rank) * micro : (k * world + rank + 1) * micro]
            # a rank past the end still runs a (discarded) forward: ZeRO-3 gathers collectively
            real = bool(rows)
            b = collate(rows or self.eval_set[:1], self.tokenizer.pad_token_id).to(self.device)
            out = self.engine(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels,
                              num_items_in_batch=1.0, use_cache=False)  # fmt: skip
            if real:
                loss_sum += out.loss.item()
                count += b.num_targets()
        loss_sum, count = dist.all_reduce_sum([loss_sum, count], self.device)
        self._log_samples()
        self.engine.train()
        if not count:  # no eval example kept a reply (warned at setup): no loss, rather than a perfect 0
            return {}
        loss = loss_sum / count
        return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0))}

    def _log_samples(self) -> None:
        n = self.cfg.train.num_samples
        if n <= 0:
            return
        convs = self.eval_conversations[:n]
        prompts = [self.formatter.encode_prompt(c.messages[:-1]) for c in convs]
        width = max(map(len, prompts))
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor(
            [[pad] * (width - len(p)) + p for p in prompts], device=self.device
        )  # [N, P] left-padded
        mask = torch.tensor(
            [[False] * (width - len(p)) + [True] * len(p) for p in prompts], device=self.device
        )
        out = self.engine.module.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=self.cfg.train.sample_max_new_tokens,
            do_sample=False, pad_token_id=pad, eos_token_id=self.tokenizer.eos_token_id,
            synced_gpus=self.engine.zero_optimization_stage() == 3 and dist.world_size() > 1,
        )  # fmt: skip
        rows = [
            {"prompt": c.messages[-2].content, "response": self.tokenizer.decode(o[width:], skip_special_tokens=True),
             "reference": c.messages[-1].content}
            for c, o in zip(convs, out.tolist())
        ]  # fmt: skip
        self.logger.log_samples(rows, self.step)

    # ------------------------------------------------------------------ save

    def save_checkpoint(self) -> None:
        checkpoint.save_checkpoint(
            self.engine, self.run_dir, self.step, {"stage": "sft"}, self.cfg.train.keep_checkpoints
        )

    def export(self) -> None:
        info = {"stage": "sft", "step": self.step, "peft": self.cfg.peft.type}
        checkpoint.export_model(self.engine, self.tokenizer, self.run_dir / "export",
                                merge_lora=self.cfg.peft.merge_on_export, info=info)  # fmt: skip

    def cleanup(self) -> None:
        self.logger.close()
