"""Stage 3 recipe: PPO on a reward model (InstructGPT, Ouyang et al. 2022).   python -m ppo [key=value ...]

Four models: the actor (policy, from the SFT export) and the critic (value per token, from the
reward-model export) train as DeepSpeed engines; the reference (frozen SFT policy, or the
LoRA actor with its adapters off) and the reward model are frozen inference engines. One PPO
step: 1. generate, 2. score, 3. KL-penalised rewards, 4. GAE, 5. PPO epochs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch
import transformers
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from peft import PeftModel

from core import checkpoint, dist, models
from core import deepspeed as ds
from core.config import ConfigError
from core.logging import MetricsLogger
from data import imdb
from data.builtin import task
from data.collate import GlobalBatches
from data.formats import Message, load_prompts, opening, split_train_eval
from data.templates import PromptFormatter
from ppo import rollout as ro
from ppo.advantages import RunningMoments, gae, masked_whiten, normalise_scores, token_rewards
from ppo.config import check_config, check_world
from ppo.kl import KLController, kl_estimate
from ppo.loss import actor_loss, policy_loss, value_loss
from ppo.ptx import PtxData

log = logging.getLogger(__name__)

MODEL_ROLES = ("actor", "ref", "critic", "reward_model")


def newest_export(runs_dir: str, stage: str) -> str:
    """The newest complete export of `python -m <stage>` under runs_dir, or a clear error."""
    found = checkpoint.newest_export(runs_dir, stage)
    if found is None:
        raise ConfigError(
            f"no `{stage}` export under {runs_dir}/{stage}/: run `python -m {stage}` first, "
            f"or give the path (e.g. {'actor' if stage == 'sft' else 'reward_model'}.name_or_path=DIR)"
        )
    return str(found)


def eval_batches(n: int, world: int, rank: int, batch: int) -> list[tuple[list[int], int]]:
    """This rank's share of n held-out prompts, in generation batches: (prompt indices, own count) each.

    Every rank gets as many batches as every other, of the same sizes, since generating and scoring
    make collective calls (ZeRO-3 gathers, the packing all-reduce) per micro-batch: a rank with
    fewer prompts fills its batches with its first prompt (prompt 0 if it has none), and only the
    first `own count` indices of a batch are its own.
    """
    per_rank = math.ceil(n / world)
    mine = list(range(rank * per_rank, min((rank + 1) * per_rank, n)))
    out = []
    for k in range(0, per_rank, batch):
        own = mine[k : k + batch]
        filler = [own[0] if own else 0] * (min(batch, per_rank - k) - len(own))
        out.append((own + filler, len(own)))
    return out


class PPORecipe:
    """setup -> train -> cleanup; checkpoints, evaluation and the exports happen inside train."""

    def __init__(self, cfg: DictConfig, run_dir: Path | None = None):
        self.cfg = cfg
        self.run_dir = run_dir or Path(HydraConfig.get().runtime.output_dir)
        self.step = 0

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        cfg = self.cfg
        check_config(cfg)
        transformers.set_seed(cfg.train.seed)  # the same new heads / adapters on every rank
        self.device = dist.device()
        if dist.keep_freed_cpu_memory(cfg.train.keep_freed_memory):
            log.info("train.keep_freed_memory: glibc keeps freed memory for the next step")
        self.world = dist.world_size()
        self._resolve_paths()
        self._setup_tokenizers()
        self._setup_data()
        self._setup_models()
        if cfg.data.packing:
            self._check_packing()
        transformers.set_seed(cfg.train.seed + 1 + dist.rank())  # then each rank samples its own responses
        self.kl_ctl = KLController(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon)
        self.score_moments = RunningMoments()
        self.ema = self._actor_copy() if cfg.ppo.ema_decay else None
        config = OmegaConf.to_container(cfg, resolve=True)
        self.logger = MetricsLogger.from_group(
            self.run_dir, cfg.logger, config, cfg.train.max_steps, job_type="ppo"
        )
        if cfg.train.resume:
            self._resume()
        if self.step == 0:
            roles = {**self.engines(), "ref": self.ref, "reward": self.reward}
            shares = {f"zero/{name}_param_share_rank{r}": s for name, engine in roles.items() if engine is not None
                      for r, s in enumerate(ds.partition_shares(engine.module))}  # fmt: skip
            self.logger.log({"data/train_prompts": len(self.train_prompts),
                             "data/eval_prompts": len(self.eval_prompts), **shares}, step=0)  # fmt: skip

    def _resolve_paths(self) -> None:
        """Null model paths: the newest SFT / reward exports (actor, reward), then ref = actor, critic = reward.

        Every rank takes rank 0's answer (an export finishing while the ranks look would otherwise split
        them). A resumed run takes the paths its checkpoint recorded: a newer export
        written since would change its frozen reference and reward model halfway.
        """
        c = self.cfg
        recorded = self._recorded_models() if c.train.resume else {}
        with open_dict(c):  # fill in the resolved paths (they are logged with the config)
            for role, stage in (("actor", "sft"), ("reward_model", "reward")):
                if c[role].name_or_path is None:
                    found = recorded.get(role) or newest_export(c.runs_dir, stage)
                    c[role].name_or_path = dist.all_gather_object(str(found) if found else None)[0]
            for role, source in ((c.ref, c.actor), (c.critic, c.reward_model)):
                if role.name_or_path is None:  # the same checkpoint, loaded the same way
                    for key in ("name_or_path", "revision", "trust_remote_code", "attn_implementation"):
                        role[key] = source[key]
        for role, path in recorded.items():
            if c[role].name_or_path != path:
                log.warning("resume: %s.name_or_path is %s; the checkpoint's run used %s", role, c[role].name_or_path,
                            path)  # fmt: skip
        log.info("models: actor %s | ref %s | critic %s | reward %s", c.actor.name_or_path,
                 c.ref.name_or_path if c.peft.type == "none" else "actor with adapters off",
                 c.critic.name_or_path, c.reward_model.name_or_path)  # fmt: skip

    def _recorded_models(self) -> dict[str, str]:
        """The model paths the newest checkpoint's run used ({} without one, or from before they were kept)."""
        found = checkpoint.latest_checkpoint(self.run_dir)
        if found is None:
            return {}
        return json.loads((found / checkpoint.TRAINER_STATE).read_text()).get("models", {})

    def _setup_tokenizers(self) -> None:
        c = self.cfg

        def tok(m):
            return models.load_tokenizer(m.tokenizer, m.name_or_path, m.trust_remote_code, m.revision)

        self.tokenizer = tok(c.actor)
        self.rm_tokenizer = tok(c.reward_model)
        self.formatter = PromptFormatter(self.tokenizer, **c.data.template)
        self.rm_formatter = PromptFormatter(self.rm_tokenizer, **c.data.template)
        # same vocabulary and specials: the reward model reads the actor's token ids as they are
        self.rm_shares_tokens = (self.rm_tokenizer.get_vocab() == self.tokenizer.get_vocab()
                                 and self.rm_tokenizer.eos_token_id == self.tokenizer.eos_token_id)  # fmt: skip
        if not self.rm_shares_tokens:
            log.info("reward model has its own tokenizer: responses are decoded and re-tokenised for it")
        if tok(c.critic).get_vocab() != self.tokenizer.get_vocab():
            raise ConfigError(
                f"critic.name_or_path={c.critic.name_or_path} has a different tokenizer from the actor; the critic "
                f"reads the actor's tokens. Start it from the actor's checkpoint instead "
                f"(critic.name_or_path={c.actor.name_or_path}, a new value head)"
            )
        # the reference scores the actor's tokens: log pi_ref of other tokens' ids would mean nothing
        # (with LoRA the reference is the actor itself, adapters off, and `ref` is not read)
        if c.peft.type == "none" and tok(c.ref).get_vocab() != self.tokenizer.get_vocab():
            raise ConfigError(
                f"ref.name_or_path={c.ref.name_or_path} has a different tokenizer from the actor; the reference "
                f"reads the actor's tokens, so it must be the actor's starting point or share its vocabulary "
                f"(ref.name_or_path=null takes the actor's)"
            )
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id

    def _setup_data(self) -> None:
        d, c = self.cfg.data, self.cfg
        self.builtin = d.path == "builtin"
        if self.builtin:
            train, held = task.split_prompts(d.builtin.seed)
            train_prompts = [(Message("user", p),) for p in train]
            eval_prompts = [(Message("user", p),) for p in held]
        elif d.format == "imdb":  # openings of reviews no other stage saw (the final evaluation has its own)
            rollout_prompts = imdb.prompts(d.path, d.imdb, "ppo", d.on_error)
            train_prompts, eval_prompts = split_train_eval(rollout_prompts, d.eval_fraction, d.shuffle_seed)
        else:
            train_prompts, _ = load_prompts(d.path, d.format, on_error=d.on_error, split=d.split)
            if d.eval_path is not None:
                eval_prompts, _ = load_prompts(d.eval_path, d.format, on_error=d.on_error, split=d.split)
            else:
                train_prompts, eval_prompts = split_train_eval(train_prompts, d.eval_fraction, d.shuffle_seed,
                                                               group=opening)  # fmt: skip
        self.train_prompts, self.eval_prompts = train_prompts, eval_prompts
        self.train_ids = [self._encode_prompt(p) for p in train_prompts]
        self.eval_ids = [self._encode_prompt(p) for p in eval_prompts]
        r, t = c.rollout, c.train
        check_world(c, self.world)
        self.local_batch = r.batch_size // self.world  # prompts per rank
        self.local_rollout = self.local_batch * r.samples_per_prompt  # sequences per rank
        self.minibatch = t.micro_batch_size_per_device * t.grad_accum_steps  # per rank
        self.prompt_batches = GlobalBatches(len(self.train_ids), self.local_batch, 1, self.world, t.seed,
                                            knobs="rollout.batch_size")  # fmt: skip
        self.ptx = (
            PtxData(c.ptx, self.formatter, d.max_len + r.max_new_tokens, self.world, t.seed, d.builtin.seed)
            if c.ptx.coef
            else None
        )

    def _encode_prompt(self, messages: tuple[Message, ...]) -> list[int]:
        ids = self.formatter.encode_prompt(messages)
        return self.formatter.keep_end(ids, self.cfg.data.max_len)  # the generation cue must stay whole

    def _setup_models(self) -> None:
        c, t = self.cfg, self.cfg.train
        n_updates = t.max_steps * c.ppo.epochs * (self.local_rollout // self.minibatch)

        def train_cfg(zero, optim):
            return ds.config_from_groups(zero, t, optim)

        actor_cfg, critic_cfg = train_cfg(c.actor_ds, c.actor_optim), train_cfg(c.critic_ds, c.critic_optim)
        frozen_cfg = ds.build_config(
            stage=c.frozen_ds.stage, offload_optimizer=False, offload_param=c.frozen_ds.offload_param,
            extra=c.frozen_ds.extra, micro_batch_size_per_device=c.rollout.micro_batch_size_per_device,
            grad_accum_steps=1, global_batch_size=None, precision=t.precision, grad_clip=0.0, lr=0.0,
            betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0, frozen=True, group="frozen_ds",
        )  # fmt: skip

        def engine(model, config, optim):
            return ds.train_engine(model, config, weight_decay=optim.weight_decay, warmup_steps=optim.warmup_steps,
                                   total_steps=n_updates, min_lr_ratio=optim.min_lr_ratio)  # fmt: skip

        with ds.model_init(actor_cfg):
            actor = models.build_model(
                c.actor, c.peft, self.tokenizer, t.precision, head="lm", onednn_products=t.onednn_products
            )
        models.disable_dropout(actor)
        self.actor = engine(actor, actor_cfg, c.actor_optim)
        self.actor_zero3 = c.actor_ds.stage == 3
        no_peft = OmegaConf.create({"type": "none"})
        with ds.model_init(critic_cfg):
            critic = models.build_model(
                c.critic,
                no_peft,
                self.tokenizer,
                t.precision,
                head="score",
                onednn_products=t.onednn_products,
            )
        models.disable_dropout(critic)
        self.critic = engine(critic, critic_cfg, c.critic_optim)
        self.critic_head = models.score_head(self.critic.module)

        def frozen(m, tokenizer, head):
            with ds.model_init(frozen_cfg):
                model = models.load_model(m.name_or_path, {}, tokenizer, t.precision, head=head,
                                          trust_remote_code=m.trust_remote_code, revision=m.revision,
                                          attn_implementation=m.attn_implementation)  # fmt: skip
            return ds.inference_engine(model, frozen_cfg)

        self.lora = isinstance(self.actor.module, PeftModel)
        self.ref = None if self.lora else frozen(c.ref, self.tokenizer, "lm")
        self.reward = frozen(c.reward_model, self.rm_tokenizer, "score")
        self.reward_head = models.score_head(self.reward.module)
        self.rm_stats = self._reward_stats()
        self.frozen_packed = contextlib.ExitStack()  # closed in cleanup()
        if c.rollout.prepack_frozen:  # frozen weights never change: pack them once for the run
            rows = c.rollout.micro_batch_size_per_device * (c.data.max_len + c.rollout.max_new_tokens)
            n = sum(self.frozen_packed.enter_context(models.prepacked_linears(m.module, rows))
                    for m in (self.ref, self.reward) if m is not None)  # fmt: skip
            log.info("rollout.prepack_frozen: %d linear layers of the frozen models prepacked", n)

    def _check_packing(self) -> None:
        """data.packing: fail before training if a model cannot score packed rows (`models.check_packing`)."""
        first, second = self.train_ids[0], self.train_ids[1 % len(self.train_ids)]
        for model, lm in ((self.actor, True), (self.ref, True), (self.critic, False)):
            if model is not None:  # no separate reference with a LoRA actor
                models.check_packing(model, first, second, self.device, lm=lm)
        if not self.rm_shares_tokens:
            first, second = (self.rm_formatter.encode_prompt(p) for p in (self.train_prompts * 2)[:2])
        models.check_packing(self.reward, first, second, self.device)

    def _sequences(
        self, ids: torch.Tensor, mask: torch.Tensor, width: int, pad_id: int | None = None
    ) -> ro.Sequences:
        """A micro-batch as the models take it: packed rows with data.packing, else padded rows.

        Every rank takes the same layout (padded if any rank's micro-batch would stay padded): the
        packed LM path calls the output layer once more, and under ZeRO-3 each call is a collective
        gather that all ranks must make. One all-reduce per micro-batch, only with several ranks.
        """
        pad = self.pad_id if pad_id is None else pad_id
        seqs = ro.Sequences.of(ids, mask, width, pad, self.cfg.data.packing)
        if self.cfg.data.packing and self.world > 1:
            (padded_ranks,) = self._reduce([float(seqs.packed is None)])
            if padded_ranks and seqs.packed is not None:
                return ro.Sequences(ids, mask, width)
        return seqs

    def _reward_stats(self) -> dict[str, float] | None:
        if self.cfg.ppo.reward_norm != "rm_stats":
            return None
        path = Path(self.cfg.reward_model.name_or_path, checkpoint.REWARD_STATS)
        if not path.is_file():
            raise ConfigError(f"ppo.reward_norm=rm_stats needs {path} (written by `python -m reward`); "
                              "use ppo.reward_norm=running or none for this reward model")  # fmt: skip
        stats = json.loads(path.read_text())
        mean, std = stats.get("mean"), stats.get("std")
        # a reward model that gave every evaluation pair the same score saved std 0: (raw - mean) / 0
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in (mean, std)) or std <= 0:
            raise ConfigError(f"ppo.reward_norm=rm_stats: {path} has mean {mean!r} and std {std!r}, which cannot "
                              "normalise scores (a std of 0: the reward model scored every evaluation response "
                              "alike); use ppo.reward_norm=running or none for this reward model")  # fmt: skip
        return stats

    def engines(self) -> dict:
        return {"actor": self.actor, "critic": self.critic}

    # ------------------------------------------------------------------ 1-2. rollout and scoring

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample one response per prompt.

        Returns prompt_ids [B, P] (left-padded), prompt_mask [B, P], response_ids [B, A] and the
        sampling pass's log-probs and entropy [B, A] (see `rollout.sample`).
        """
        r = self.cfg.rollout
        prompt_ids, prompt_mask = ro.pad_rows(prompts, self.pad_id, "left", self.device)
        self.actor.eval()
        gather = r.gather_once and self.actor_zero3
        # per-layer gathering all-gathers in every forward: each rank runs as many as the one that stops
        # last; gathered once, decoding makes no collective call (`ds.gathered_for_generation`)
        synced = self.actor_zero3 and not gather and self.world > 1
        with (
            ds.gathered_for_generation(self.actor, gather) as module,
            self._lora_merged(module, gather),
            models.prepacked_linears(module, len(prompts)) if r.prepack_weights else contextlib.nullcontext(),
        ):
            response, logprobs, entropy = ro.sample(
                module, prompt_ids, prompt_mask, max_new_tokens=r.max_new_tokens, min_new_tokens=r.min_new_tokens,
                temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, eos_id=self.eos_id, pad_id=self.pad_id,
                stop_at_eos=r.stop_at_eos, synced_gpus=synced,
            )  # fmt: skip
        self.actor.train()
        return prompt_ids, prompt_mask, response, logprobs, entropy

    @contextlib.contextmanager
    def _lora_merged(self, module, gathered: bool):
        """LoRA merged into the gathered weights while generating (the partitions are untouched)."""
        if not (self.lora and gathered):
            yield
            return
        module.merge_adapter()
        try:
            yield
        finally:
            module.unmerge_adapter()

    @torch.no_grad()
    def score(self, prompts: list[tuple[Message, ...]], ids: torch.Tensor, mask: torch.Tensor, response: torch.Tensor,
              response_mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Raw reward-model scores [B]; re-tokenised for a reward model with its own tokenizer."""
        if self.rm_shares_tokens:
            return self._chunked(
                lambda i, m: ro.sequence_scores(self.reward, self.reward_head, self._sequences(i, m, 0)),
                ids,
                mask,
            )
        complete = ro.ends_with_eos(response, response_mask, self.eos_id).tolist()
        positions = getattr(self.reward.module.config, "max_position_embeddings", None)
        rows = ro.retokenised(
            self.rm_formatter, prompts, self.decode(response, response_mask), complete, positions
        )
        pad = self.rm_tokenizer.pad_token_id
        rm_ids, rm_mask = ro.pad_rows(rows, pad, "right", self.device)
        return self._chunked(
            lambda i, m: ro.sequence_scores(self.reward, self.reward_head, self._sequences(i, m, 0, pad)),
            rm_ids,
            rm_mask,
        )

    def _chunked(self, fn, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """fn over micro-batches of rollout.micro_batch_size_per_device rows, concatenated."""
        n = self.cfg.rollout.micro_batch_size_per_device
        return torch.cat([fn(ids[i : i + n], mask[i : i + n]) for i in range(0, len(ids), n)])

    @torch.no_grad()
    def ref_logprobs(
        self, ids: torch.Tensor, mask: torch.Tensor, response: torch.Tensor, width: int
    ) -> torch.Tensor:
        """log pi_ref of the response tokens [B, A]: the reference model, or the actor with LoRA off."""
        with self.actor.module.disable_adapter() if self.lora else contextlib.nullcontext():
            return self._logprobs(self.actor if self.lora else self.ref, ids, mask, response, width)

    @torch.no_grad()
    def old_logprobs(
        self, ids: torch.Tensor, mask: torch.Tensor, response: torch.Tensor, width: int
    ) -> torch.Tensor:
        """log pi_old of the response tokens [B, A] from a forward of the actor (rollout.recompute_logprobs)."""
        return self._logprobs(self.actor, ids, mask, response, width)

    def _logprobs(self, model, ids: torch.Tensor, mask: torch.Tensor, response: torch.Tensor, width: int):
        """log pi(a_t | s_t) of `response` [B, A] under `model`, at the rollout temperature, in micro-batches
        of rollout.micro_batch_size_per_device: ids / mask [B, P + A], width = P."""
        T, n = self.cfg.rollout.temperature, self.cfg.rollout.micro_batch_size_per_device
        out = []
        for k in range(0, len(ids), n):
            seqs = self._sequences(ids[k : k + n], mask[k : k + n], width)
            out.append(ro.response_logprobs(model, seqs, response[k : k + n], T)[0])  # [b, A]
        return torch.cat(out)

    def rollout_values(self, step: int, ids: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
        """V_old(s_t) of the rollout [B, A] from the critic before its update.

        The critic's forward on the first minibatch of the first PPO epoch would see exactly these
        weights, so below ZeRO-3 that forward is done here once, with its graph kept for the
        update's backward (`self.critic_graphs`): one critic forward per step fewer.
        """
        head, micro = self.critic_head, self.cfg.train.micro_batch_size_per_device
        values = torch.zeros(ids.shape[0], ids.shape[1] - width, device=self.device)
        self.critic_graphs = {}
        todo = torch.ones(len(ids), dtype=torch.bool)
        if self.cfg.critic_ds.stage < 3:
            first = self._epoch_orders(step, len(ids))[0][: self.minibatch]
            for a in range(self.cfg.train.grad_accum_steps):
                idx = first[a * micro : (a + 1) * micro]
                v = ro.response_values(
                    self.critic, head, self._sequences(ids[idx], mask[idx], width)
                )  # with graph
                self.critic_graphs[a] = v
                values[idx] = v.detach()
                todo[idx] = False
        rest = todo.nonzero().squeeze(1)
        if len(rest):
            self.critic.eval()
            with torch.no_grad():
                values[rest] = self._chunked(
                    lambda i, m: ro.response_values(self.critic, head, self._sequences(i, m, width)),
                    ids[rest],
                    mask[rest],
                )
            self.critic.train()
        return values

    def _epoch_orders(self, step: int, n: int) -> list[torch.Tensor]:
        """The shuffled order of the rollout batch for each PPO epoch: a pure function of (seed, step)."""
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + step)
        return [torch.randperm(n, generator=gen) for _ in range(self.cfg.ppo.epochs)]

    def decode(self, response: torch.Tensor, mask: torch.Tensor) -> list[str]:
        return [
            self.tokenizer.decode(r[m].tolist(), skip_special_tokens=True).strip()
            for r, m in zip(response, mask)
        ]

    def make_rollout(self, step: int) -> tuple[ro.Rollout, dict[str, float], list[dict]]:
        """Steps 1-4 on this rank's share of the prompt batch."""
        c, p = self.cfg, self.cfg.ppo
        reduce = self._reduce
        (index,) = self.prompt_batches.micro_batches(step, dist.rank())
        # each prompt's samples in a row
        index = [i for i in index for _ in range(c.rollout.samples_per_prompt)]
        prompts = [self.train_prompts[i] for i in index]
        # 1. generate
        t0 = time.perf_counter()
        prompt_ids, prompt_mask, response, logprobs, token_entropy = self.generate(
            [self.train_ids[i] for i in index]
        )  # logprobs [B, A]: log pi_old, from the sampling pass
        mask = ro.response_mask(response, self.eos_id, c.rollout.stop_at_eos)  # [B, A]
        has_eos = ro.ends_with_eos(response, mask, self.eos_id)
        entropy = (token_entropy * mask).sum()  # for the metric
        t_gen = time.perf_counter() - t0
        # 2. score: reference log-probs, values, reward-model score
        ids, seq_mask = torch.cat([prompt_ids, response], 1), torch.cat([prompt_mask, mask], 1)
        width = prompt_ids.shape[1]
        if c.rollout.recompute_logprobs:  # or from a forward, as the update will compute log pi
            logprobs = self.old_logprobs(ids, seq_mask, response, width)
        ref_logprobs = self.ref_logprobs(ids, seq_mask, response, width)
        values = self.rollout_values(step, ids, seq_mask, width)
        raw = self.score(prompts, ids, seq_mask, response, mask)
        # 3. KL-penalised rewards (Ziegler et al. 2019 eq. 2): r_t = -beta KL_t, + normalised score at the end
        if p.reward_norm == "running":
            self.score_moments.update(raw, reduce)
            mean, std = self.score_moments.mean, self.score_moments.std
        elif p.reward_norm == "rm_stats":
            mean, std = self.rm_stats["mean"], self.rm_stats["std"]
        else:
            mean, std = 0.0, 1.0
        # a fixed-length rollout (stop_at_eos=false) is never penalised for lacking an EOS
        complete = has_eos if c.rollout.stop_at_eos else torch.ones_like(has_eos)
        scores = normalise_scores(raw, mean, std, p.reward_clip, complete, p.missing_eos_penalty)  # [B]
        kl = kl_estimate(logprobs, ref_logprobs, p.kl_estimator) * mask  # [B, A]
        beta = self.kl_ctl.value if p.kl_in == "reward" else 0.0
        rewards = token_rewards(scores, kl, beta, mask)
        # 4. GAE (Schulman et al. 2016) and whitened advantages
        advantages, returns = gae(rewards, values, mask, p.gamma, p.gae_lambda)
        if p.whiten_advantages:
            advantages = masked_whiten(advantages, mask, reduce)
        rollout = ro.Rollout(prompt_ids, prompt_mask, response, mask, logprobs, ref_logprobs, values, scores, raw,
                             kl, rewards, advantages, returns)  # fmt: skip
        metrics, samples = self._rollout_metrics(rollout, prompts, has_eos, entropy, reduce)
        metrics["time/generate_s"] = t_gen
        return rollout, metrics, samples

    def _reduce(self, values: list[float]) -> list[float]:
        return dist.all_reduce_sum(values, self.device)

    def _rollout_metrics(
        self, r: ro.Rollout, prompts, has_eos, entropy, reduce
    ) -> tuple[dict[str, float], list[dict]]:
        """Global means over the rollout batch (one all-reduce); `entropy` is this rank's summed token entropy."""
        m = r.response_mask
        seq_kl = ((r.logprobs - r.ref_logprobs) * m).sum(1)  # [B] k1 summed over the response
        ret, val = r.returns.double(), r.values.double()
        err = ret - val
        texts = self.decode(r.response_ids, m)
        gold = [task.gold_score(p[-1].content, t) for p, t in zip(prompts, texts)] if self.builtin else []
        local = [float(r.raw_scores.sum()), float(seq_kl.sum()), float(entropy), float(m.sum()),
                 float((~has_eos).sum()), float(len(m)), float(sum(gold)), float(r.scores.sum()),
                 float((ret * m).sum()), float((ret.square() * m).sum()), float((err * m).sum()),
                 float((err.square() * m).sum())]  # fmt: skip
        (s_raw, s_kl, s_ent, n_tok, n_noeos, n, s_gold, s_score, s_ret, s_ret2, s_err, s_err2) = reduce(local)
        var_ret = s_ret2 / n_tok - (s_ret / n_tok) ** 2
        var_err = s_err2 / n_tok - (s_err / n_tok) ** 2
        metrics = {
            "ppo/reward": s_raw / n, "ppo/score": s_score / n, "ppo/kl": s_kl / n, "ppo/kl_coef": self.kl_ctl.value,
            "ppo/entropy": s_ent / n_tok, "ppo/response_len": n_tok / n, "ppo/no_eos_frac": n_noeos / n,
            "ppo/value_explained_var": 1.0 - var_err / max(var_ret, 1e-8),
        }  # fmt: skip
        if self.builtin:
            metrics["gold/reward"] = s_gold / n
        samples = [{"prompt": p[-1].content, "response": t, "reward": float(s)}
                   for p, t, s in zip(prompts, texts, r.raw_scores.tolist())]  # fmt: skip
        return metrics, samples

    # ------------------------------------------------------------------ 5. PPO epochs

    def update(self, r: ro.Rollout, step: int) -> dict[str, float]:
        """PPO epochs over shuffled minibatches (micro x accum per rank); returns global mean statistics."""
        c, p, t = self.cfg, self.cfg.ppo, self.cfg.train
        B, micro, accum = len(r.scores), t.micro_batch_size_per_device, t.grad_accum_steps
        n_mb = B // self.minibatch
        ids, seq_mask = r.sequence
        width = r.prompt_ids.shape[1]
        T = c.rollout.temperature
        # pg, vf, clipfrac, vclipfrac, approxkl, micro count, ptx loss and its tokens: summed on the
        # device, one sync per step
        sums = torch.zeros(8, device=self.device)
        one = torch.ones((), device=self.device)
        stop, updates = False, 0
        for epoch, order in enumerate(self._epoch_orders(step, B)):  # same shuffles on resume
            # global valid tokens per minibatch / (ranks x accum): the loss normaliser (one all-reduce per epoch)
            local = [
                float(r.response_mask[order[k * self.minibatch : (k + 1) * self.minibatch]].sum())
                for k in range(n_mb)
            ]
            denoms = [max(x, 1.0) / (accum * self.world) for x in self._reduce(local)]
            for k in range(n_mb):
                mb_kl = torch.zeros((), device=self.device)
                if self.ptx is not None:  # the ptx term's own normaliser, as denoms[k] for the PPO terms
                    ptx_denom = self.ptx.normaliser(accum)
                for a in range(accum):
                    idx = order[k * self.minibatch + a * micro : k * self.minibatch + (a + 1) * micro]
                    mb, seqs = r.select(idx), self._sequences(ids[idx], seq_mask[idx], width)
                    # actor: clipped surrogate (+ entropy bonus, + KL loss, + ptx)
                    logp, ent = ro.response_logprobs(
                        self.actor, seqs, mb.response_ids, T, entropy=bool(p.entropy_coef)
                    )
                    pl = policy_loss(
                        logp, mb.logprobs, mb.advantages, mb.response_mask, p.clip_eps, denoms[k]
                    )
                    kl = kl_estimate(logp, mb.ref_logprobs, p.kl_estimator) if p.kl_in == "loss" else None
                    loss = actor_loss(pl.loss, mb.response_mask, denoms[k], ent, p.entropy_coef, kl,
                                      self.kl_ctl.value)  # fmt: skip
                    ptx, ptx_tokens = torch.zeros((), device=self.device), 0
                    if self.ptx is not None:
                        ptx, ptx_tokens = self.ptx.loss(self.actor, self.device)
                        loss = loss + c.ptx.coef * ptx / ptx_denom
                    self.actor.backward(loss)
                    self.actor.step()
                    # critic: clipped value loss
                    if (
                        epoch == 0 and k == 0 and a in self.critic_graphs
                    ):  # the rollout's forward, same weights
                        v = self.critic_graphs.pop(a)
                    else:
                        v = ro.response_values(self.critic, self.critic_head, seqs)
                    vl = value_loss(v, mb.values, mb.returns, mb.response_mask, p.value_clip_eps, denoms[k])
                    self.critic.backward(vl.loss)
                    self.critic.step()
                    to_token_mean = denoms[k] / mb.response_mask.sum().clamp(
                        min=1
                    )  # local token means, for logs
                    sums += torch.stack([pl.loss.detach() * to_token_mean, vl.loss.detach() * to_token_mean,
                                         pl.clipfrac, vl.clipfrac, pl.approxkl, one, ptx.detach(),
                                         one * ptx_tokens]).float()  # fmt: skip
                    mb_kl += pl.approxkl
                updates += 1
                if p.early_stop_kl is not None:  # checked after this minibatch's step (see conf/ppo.yaml)
                    (kl_sum,) = self._reduce([float(mb_kl) / accum])  # a sync per minibatch, only when asked
                    if kl_sum / self.world > p.early_stop_kl:
                        stop = True
                        break
            if stop:
                break
        # the updates an early stop skipped still advance both learning-rate schedules, which count
        # every epoch of every step (`n_updates`): the rate is a function of the PPO step
        for engine in (self.actor, self.critic):
            for _ in range(p.epochs * n_mb - updates):
                engine.lr_scheduler.step()
        self.critic_graphs = {}  # an early stop may leave some unused
        total = self._reduce(sums.tolist())
        n = max(total[5], 1.0)
        stats = {"ppo/policy_loss": total[0] / n, "ppo/value_loss": total[1] / n, "ppo/clipfrac": total[2] / n,
                 "ppo/value_clipfrac": total[3] / n, "ppo/approxkl": total[4] / n,
                 "ppo/epochs_done": n / (self.world * n_mb * accum)}  # fmt: skip
        if self.ptx is not None:
            stats["ppo/ptx_loss"] = total[6] / max(total[7], 1.0)  # token mean over every ptx micro-batch
        return stats

    # ------------------------------------------------------------------ loop

    def train(self) -> None:
        t = self.cfg.train
        while self.step < t.max_steps:
            start = time.perf_counter()
            rollout, metrics, samples = self.make_rollout(self.step)
            t1 = time.perf_counter()
            metrics |= self.update(rollout, self.step)
            sequences = self.cfg.rollout.batch_size * self.cfg.rollout.samples_per_prompt
            self.kl_ctl.update(metrics["ppo/kl"], sequences)  # Ziegler et al. 2019
            self._ema_update()
            self.step += 1
            metrics |= {"time/train_s": time.perf_counter() - t1, "time/step_s": time.perf_counter() - start,
                        "train/actor_lr": self.actor.get_lr()[0], "train/critic_lr": self.critic.get_lr()[0]}  # fmt: skip
            final = self.step == t.max_steps
            if (t.eval_every and self.step % t.eval_every == 0) or final:
                metrics |= self.evaluate()
                self.logger.log_samples(samples[: t.num_samples], self.step)
            if (t.log_every and self.step % t.log_every == 0) or final:
                self.logger.log(metrics, self.step)
            self.logger.advance(self.step)
            if (t.save_every and self.step % t.save_every == 0) or final:
                self.save()
        self.export()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean raw reward (and gold reward on the built-in task) of sampled responses to held-out prompts."""
        t = self.cfg.train
        limit = t.eval_batches * self.cfg.rollout.batch_size if t.eval_batches else len(self.eval_prompts)
        prompts, ids = self.eval_prompts[:limit], self.eval_ids[:limit]
        total = [0.0, 0.0, 0.0]  # reward sum, gold sum, count
        for chunk, real in eval_batches(len(ids), self.world, dist.rank(), self.local_batch):
            prompt_ids, prompt_mask, response, _, _ = self.generate([ids[i] for i in chunk])
            mask = ro.response_mask(response, self.eos_id, self.cfg.rollout.stop_at_eos)
            seq_ids, seq_mask = torch.cat([prompt_ids, response], 1), torch.cat([prompt_mask, mask], 1)
            raw = self.score([prompts[i] for i in chunk], seq_ids, seq_mask, response, mask)[:real]
            total[0] += float(raw.sum())
            total[2] += real
            if self.builtin:
                texts = self.decode(response, mask)[:real]
                total[1] += sum(task.gold_score(prompts[i][-1].content, s) for i, s in zip(chunk, texts))
        reward, gold, n = self._reduce(total)
        out = {"eval/reward": reward / max(n, 1)}
        if self.builtin:
            out["eval/gold_reward"] = gold / max(n, 1)
        return out

    def _actor_copy(self) -> list[torch.Tensor]:
        """An fp32 copy of this rank's shards of the actor's weights (where the EMA starts)."""
        return [s.detach().float().clone() for s in ds.local_shards(self.actor)]

    def _ema_update(self) -> None:
        if self.ema is None:
            return
        d = self.cfg.ppo.ema_decay
        for e, s in zip(self.ema, ds.local_shards(self.actor)):
            e.mul_(d).add_(s.detach().float(), alpha=1.0 - d)

    # ------------------------------------------------------------------ save / resume / export

    def save(self) -> None:
        state = {"stage": "ppo", "kl_ctl": self.kl_ctl.state_dict(), "score_moments": self.score_moments.state_dict(),
                 "ptx_calls": self.ptx.calls if self.ptx is not None else 0,
                 "models": {role: str(self.cfg[role].name_or_path) for role in MODEL_ROLES}}  # fmt: skip
        tensors = {f"ema.{i}": e for i, e in enumerate(self.ema)} if self.ema is not None else None
        checkpoint.save_checkpoint(self.engines(), self.run_dir, self.step, state, self.cfg.train.keep_checkpoints,
                                   rank_tensors=tensors)  # fmt: skip

    def _resume(self) -> None:
        state = checkpoint.resume_state(self.engines(), self.run_dir)
        if not state:
            self.logger.rewind(0)  # the run starts over: no row of the one before stays
            return
        self.step = state["step"]
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.score_moments.load_state_dict(state["score_moments"])
        if self.ptx is not None:
            self.ptx.calls = state["ptx_calls"]
        if self.ema is not None:
            saved = state.get("rank_tensors", {})
            if saved:
                self.ema = [saved[f"ema.{i}"].to(e.device) for i, e in enumerate(self.ema)]
            else:  # another world size (ZeRO-0 resumes under any), or a checkpoint saved without an EMA
                log.warning("resume: no saved EMA for this rank; it restarts from the resumed actor")
                self.ema = self._actor_copy()
        self.logger.rewind(self.step)

    def export(self) -> None:
        # the reference names the policy's starting point (`rlhf evaluate` compares against it)
        info = {
            "stage": "ppo",
            "step": self.step,
            "peft": self.cfg.peft.type,
            "ref": checkpoint.model_reference(self.cfg.ref.name_or_path, self.run_dir / "export"),
        }
        merge = self.cfg.peft.merge_on_export
        checkpoint.export_model(
            self.actor, self.tokenizer, self.run_dir / "export", merge_lora=merge, info=info
        )
        checkpoint.export_model(self.critic, self.tokenizer, self.run_dir / "export_critic", merge_lora=False,
                                info={**info, "role": "critic"})  # fmt: skip
        if self.ema is not None:
            with _swapped(ds.local_shards(self.actor), self.ema):
                checkpoint.export_model(self.actor, self.tokenizer, self.run_dir / "export_ema", merge_lora=merge,
                                        info={**info, "ema_decay": self.cfg.ppo.ema_decay})  # fmt: skip

    def cleanup(self) -> None:
        self.frozen_packed.close()
        self.logger.close()


@contextlib.contextmanager
def _swapped(targets: list[torch.Tensor], values: list[torch.Tensor]):
    """Temporarily copy `values` into `targets` (in place), restoring them afterwards."""
    saved = [t.detach().clone() for t in targets]
    for t, v in zip(targets, values):
        t.copy_(v.to(t.dtype))
    try:
        yield
    finally:
        for t, s in zip(targets, saved):
            t.copy_(s)
