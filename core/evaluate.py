"""Evaluation of a policy against a baseline on held-out prompts, by a judge that is not the reward model.

    rlhf evaluate POLICY_DIR [--baseline DIR] [--reference DIR] [--judge auto|gold|sentiment]
                             [--samples-per-prompt N] [--out FILE]

Both policies sample `samples_per_prompt` responses to every held-out prompt (on the built-in task
and held-out files, prompts no stage trained on; on IMDB, the openings of reviews no stage saw, whose
two words often also open a training review) with the PPO rollout's sampling settings and the same
seed; the judge scores each response (the built-in task's gold judge, or on IMDB an independent
sentiment classifier, whose score is P(positive)), and the i-th sample of one policy is compared with
the i-th of the other (a win, a tie or a loss). The KL is the policy's sequence KL from the reference
on its own samples, sum_t [log pi(y_t | x, y<t) - log pi_ref(y_t | x, y<t)] (the k1 estimate, in
nats), averaged. This is the figure InstructGPT reports as a win rate against its SFT baseline
(Ouyang et al. 2022, fig. 1), with a judge that is not the reward model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from core import models
from core.checkpoint import EXPORT_INFO, resolve_reference
from core.config import ConfigError
from data import imdb
from data.builtin import task
from data.formats import Message, load_prompts, opening, split_train_eval
from data.templates import PromptFormatter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    min_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    prepack_weights: bool  # decode on oneDNN-prepacked weights (the PPO run's rollout.prepack_weights)


@dataclass
class Policy:
    model: torch.nn.Module
    tokenizer: Any
    formatter: PromptFormatter


def load_policy(path: str | Path, template: dict[str, str], trust_remote_code: bool = False) -> Policy:
    """An export (its tokenizer beside it) as a plain fp32 model in eval mode. trust_remote_code: run
    the export's own modelling code (a custom-code model's export carries it), as its PPO run did."""
    tokenizer = models.load_tokenizer(None, str(path), trust_remote_code=trust_remote_code)
    model = models.load_model(str(path), {}, tokenizer, "fp32", head="lm",
                              trust_remote_code=trust_remote_code).eval()  # fmt: skip
    return Policy(model, tokenizer, PromptFormatter(tokenizer, **template))


@torch.no_grad()
def sample_responses(
    policy: Policy, prompts: list[tuple[Message, ...]], sampling: Sampling, n: int, seed: int, max_prompt_len: int,
    batch_size: int = 64,
) -> tuple[list[list[int]], list[list[int]]]:  # fmt: skip
    """n sampled responses per prompt (its messages, ending with a user turn, formatted as in PPO):
    (prompt ids, response ids up to and including EOS) per row.

    Rows are prompt-major: row i * n + j is sample j of prompt i. With sampling.prepack_weights,
    decodes on oneDNN-prepacked weights where the model allows it (`models.prepacked_linears`).
    """
    tok = policy.tokenizer
    encoded = [policy.formatter.keep_end(policy.formatter.encode_prompt(p), max_prompt_len) for p in prompts]
    rows = [ids for ids in encoded for _ in range(n)]
    torch.manual_seed(seed)
    responses: list[list[int]] = []
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo : lo + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in chunk])  # [B, P] left-padded
        mask = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in chunk])  # True = valid
        packed = (
            models.prepacked_linears(policy.model, len(chunk)) if sampling.prepack_weights else nullcontext()
        )
        with packed:
            out = policy.model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=sampling.max_new_tokens,
                min_new_tokens=sampling.min_new_tokens or None, temperature=sampling.temperature,
                top_p=sampling.top_p, top_k=sampling.top_k, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )  # fmt: skip
        for row in out[:, width:].tolist():  # [B, A]
            responses.append(row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
    return rows, responses


@torch.no_grad()
def sequence_logprobs(
    model: torch.nn.Module, prompts: list[list[int]], responses: list[list[int]], pad_id: int, temperature: float,
    batch_size: int = 64,
) -> list[float]:  # fmt: skip
    """sum_t log p(y_t | x, y<t) of each response under `model` (at the sampling temperature): [N]."""
    out: list[float] = []
    for lo in range(0, len(prompts), batch_size):
        ps, rs = prompts[lo : lo + batch_size], responses[lo : lo + batch_size]
        width, length = max(map(len, ps)), max(map(len, rs))
        ids = torch.tensor(
            [[pad_id] * (width - len(p)) + p + r + [pad_id] * (length - len(r)) for p, r in zip(ps, rs)]
        )
        mask = torch.tensor([[False] * (width - len(p)) + [True] * (len(p) + len(r)) + [False] * (length - len(r))
                             for p, r in zip(ps, rs)])  # fmt: skip
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=models.positions_from_mask(mask),
            logits_to_keep=length + 1,  # the LM head on positions width - 1 .. end only
        ).logits  # fmt: skip
        logits = logits[:, :-1].float() / temperature  # [B, A, V]: the logits that predict y_t
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, width:, None]).squeeze(-1)  # [B, A]
        out += (logp * mask[:, width:]).sum(1).tolist()
    return out


def decode(policy: Policy, response: list[int]) -> str:
    return policy.tokenizer.decode(response, skip_special_tokens=True).strip()


@dataclass(frozen=True)
class Judge:
    """Scores responses independently of the reward model: (prompts, responses) -> scores."""

    name: str  # "gold" | "sentiment": report keys are sft_<name>_mean, ppo_<name>_mean
    about: str  # one line for the report
    score: Callable[[list[str], list[str]], list[float]]
    # sentiment: a response counts as positive when its score (P(positive)) is above this
    threshold: float | None = None


def gold_judge() -> Judge:
    return Judge("gold", f"the built-in task's gold judge (best score {task.BEST_SCORE:g})",
                 lambda prompts, texts: [float(task.gold_score(p, t)) for p, t in zip(prompts, texts)])  # fmt: skip


def sentiment_judge(path: str, imdb_cfg: Any, on_error: str) -> Judge:
    """The bag-of-words sentiment classifier fit on the IMDB `judge` part (never seen by the reward model)."""
    model = imdb.fit_judge(path, imdb_cfg, on_error)
    return Judge("sentiment", "an independent sentiment classifier (bag-of-words logistic regression fit on "
                 "IMDB reviews the reward model never saw): P(positive), positive above 0.5",
                 lambda prompts, texts: model.positive_prob(texts), threshold=0.5)  # fmt: skip


def compare(
    policy_dir: str | Path, baseline_dir: str | Path, reference_dir: str | Path, prompts: list[tuple[Message, ...]],
    judge: Judge, *,
    template: dict[str, str], sampling: Sampling, samples_per_prompt: int, seed: int, max_prompt_len: int,
    num_report_samples: int, trust_remote_code: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Policy vs baseline on `prompts` by `judge`: win / tie / loss rates, mean scores (and positive shares
    for a sentiment judge), and the policy's KL from the reference on its own samples."""
    if not prompts or samples_per_prompt < 1:
        raise ValueError(f"nothing to compare: {len(prompts)} prompts x {samples_per_prompt} samples")
    policy = load_policy(policy_dir, template, trust_remote_code)
    baseline = load_policy(baseline_dir, template, trust_remote_code)
    n = samples_per_prompt
    p_rows, p_resp = sample_responses(policy, prompts, sampling, n, seed, max_prompt_len)
    _, b_resp = sample_responses(baseline, prompts, sampling, n, seed, max_prompt_len)
    p_text, b_text = [decode(policy, r) for r in p_resp], [decode(baseline, r) for r in b_resp]
    row_prompts = [prompt_text(p) for p in prompts for _ in range(n)]
    p_score, b_score = judge.score(row_prompts, p_text), judge.score(row_prompts, b_text)
    wins = sum(p > b for p, b in zip(p_score, b_score))
    ties = sum(p == b for p, b in zip(p_score, b_score))
    reference = baseline if Path(reference_dir).resolve() == Path(baseline_dir).resolve() else None
    reference = reference or load_policy(reference_dir, template, trust_remote_code)
    lp = sequence_logprobs(policy.model, p_rows, p_resp, policy.tokenizer.pad_token_id, sampling.temperature)
    lp_ref = sequence_logprobs(reference.model, p_rows, p_resp, reference.tokenizer.pad_token_id,
                               sampling.temperature)  # fmt: skip
    kl = [a - b for a, b in zip(lp, lp_ref)]
    total = len(p_score)
    samples = [
        {"prompt": row_prompts[i], "sft": b_text[i], "sft_score": b_score[i], "ppo": p_text[i], "ppo_score": p_score[i]}
        for i in range(0, min(total, num_report_samples * n), n)
    ]  # fmt: skip
    out = {
        "judge": judge.name, "judge_about": judge.about,
        "win_rate": wins / total, "tie_rate": ties / total, "loss_rate": (total - wins - ties) / total,
        f"sft_{judge.name}_mean": sum(b_score) / total, f"ppo_{judge.name}_mean": sum(p_score) / total,
        "ppo_kl": sum(kl) / total, "num_prompts": len(prompts), "num_comparisons": total,
        "samples_per_prompt": n, "policy": str(policy_dir), "baseline": str(baseline_dir),
        "reference": str(reference_dir), "samples": samples,
    }  # fmt: skip
    if judge.threshold is not None:
        out["sft_positive_share"] = sum(s > judge.threshold for s in b_score) / total
        out["ppo_positive_share"] = sum(s > judge.threshold for s in p_score) / total
    return out


def prompt_text(messages: tuple[Message, ...]) -> str:
    """A prompt as the judges and the report read it: a lone user turn's text, or every turn as `role: text`."""
    if len(messages) == 1 and messages[0].role == "user":
        return messages[0].content
    return "\n".join(f"{m.role}: {m.content}" for m in messages)


JUDGES = ("auto", "gold", "sentiment")


def resolve_judge(data: DictConfig, judge: str) -> str | None:
    """auto -> gold on the built-in task, sentiment on IMDB data, None (no judge) otherwise."""
    if judge not in JUDGES:
        raise ConfigError(f"eval.judge must be one of {', '.join(JUDGES)}; got {judge!r}")
    if judge != "auto":
        return judge
    return "gold" if data.path == "builtin" else "sentiment" if data.format == "imdb" else None


def check_eval(eval_cfg: DictConfig, data: DictConfig) -> None:
    """The pipeline's evaluation settings against the PPO stage's data, at planning (not after the
    three stages): a judge that is not one, the gold judge off the built-in task, no samples."""
    judge = resolve_judge(data, eval_cfg.judge)
    if judge == "gold" and data.path != "builtin":
        raise ConfigError(
            "eval.judge=gold needs the built-in task (ppo.data.path=builtin); IMDB data: sentiment"
        )
    if eval_cfg.samples_per_prompt < 1 or eval_cfg.num_report_samples < 0:
        raise ConfigError(
            f"eval.samples_per_prompt must be at least 1 and eval.num_report_samples at least 0; got "
            f"{eval_cfg.samples_per_prompt} and {eval_cfg.num_report_samples}"
        )


def settings_from(stage_cfg: DictConfig, judge: str = "auto") -> dict[str, Any]:
    """The evaluation's prompts, judge, sampling and trust in model code from a PPO stage config (its
    held-out prompts, its rollout, its actor's `trust_remote_code`: the exports are that actor's kind).

    judge: gold (the built-in task), sentiment (the IMDB classifier), or auto (gold on the built-in
    task, sentiment on IMDB data). Held-out prompts: the built-in task's, the IMDB `eval` part's
    openings, or else the prompts PPO held out of its own data (`data.eval_path` / `eval_fraction`).
    """
    r, d = stage_cfg.rollout, stage_cfg.data
    judge = resolve_judge(d, judge)
    if judge is None:
        raise ValueError("no judge for this PPO data: set eval.judge=sentiment, or eval.enabled=false")
    if judge == "gold" and d.path != "builtin":
        raise ValueError("the gold judge needs the built-in task (data.path=builtin)")
    if d.path == "builtin":
        prompts = [(Message("user", p),) for p in task.split_prompts(d.builtin.seed)[1]]
    elif d.format == "imdb":
        prompts = list(imdb.prompts(d.path, d.imdb, "eval", d.on_error))
    else:
        if d.eval_path is not None:
            held, _ = load_prompts(d.eval_path, d.format, on_error=d.on_error, split=d.split)
        else:
            train, _ = load_prompts(d.path, d.format, on_error=d.on_error, split=d.split)
            held = split_train_eval(train, d.eval_fraction, d.shuffle_seed, group=opening)[1]  # as PPO splits
        prompts = list(held)  # whole conversations (system and earlier turns too), as PPO samples them
    if not prompts:  # before any model loads (IMDB's eval fraction 0, say)
        raise ValueError(f"no held-out prompts to evaluate on in {d.path}: give the data an eval part, or "
                         "eval.enabled=false")  # fmt: skip
    if judge == "gold":
        made = gold_judge()
    else:  # the IMDB judge part: PPO's own IMDB settings, or conf/data/imdb.yaml's under its data root
        imdb_data = d if d.format == "imdb" else _imdb_data(stage_cfg.data_root)
        made = sentiment_judge(imdb_data.path, imdb_data.imdb, imdb_data.on_error)
    return {
        "prompts": prompts,
        "judge": made,
        "template": OmegaConf.to_container(d.template, resolve=True),
        "sampling": Sampling(
            r.max_new_tokens, r.min_new_tokens, r.temperature, r.top_p, r.top_k, r.prepack_weights
        ),
        "max_prompt_len": d.max_len,
        "trust_remote_code": bool(stage_cfg.actor.trust_remote_code),
    }


def _imdb_data(data_root: str) -> DictConfig:
    """conf/data/imdb.yaml (over its base) with `data_root` filled in."""
    conf = Path(__file__).resolve().parents[1] / "conf" / "data"
    merged = OmegaConf.merge(OmegaConf.load(conf / "base.yaml"), OmegaConf.load(conf / "imdb.yaml"))
    merged.pop("defaults", None)
    return OmegaConf.merge({"data_root": data_root}, {"data": merged}).data


# ----------------------------------------------------------------------------- rlhf evaluate


def _run_config(policy_dir: Path) -> DictConfig:
    """The config of the PPO run that wrote `policy_dir` over conf/ppo.yaml's defaults (a key added
    since that run takes its default), or the defaults alone."""
    from hydra import compose, initialize_config_dir

    import ppo.config  # noqa: F401  (the schema)

    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        defaults = compose(config_name="ppo")
    for name in ("pipeline_stage_config.yaml", ".hydra/config.yaml"):
        path = policy_dir.parent / name
        if path.is_file():  # untyped, so that the run's own keys stay, even ones since removed
            return OmegaConf.merge(OmegaConf.create(OmegaConf.to_container(defaults)), OmegaConf.load(path))
    return defaults


EVAL_KEYS = ("samples_per_prompt", "seed", "num_report_samples", "judge")  # flags that default as the report


def eval_defaults(policy_dir: Path) -> DictConfig:
    """The `eval` settings `rlhf evaluate` starts from, so that it repeats the report's evaluation: those
    of the pipeline run whose PPO stage wrote `policy_dir` (<run>/ppo/export, beside <run>/.hydra, where
    a pipeline experiment may have changed them), else conf/pipeline.yaml's."""
    settings = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "pipeline.yaml").eval
    run = policy_dir.parent.parent / ".hydra" / "config.yaml"
    saved = OmegaConf.load(run).get("eval") if run.is_file() else None
    if isinstance(saved, DictConfig):
        settings = OmegaConf.merge(settings, {k: saved[k] for k in EVAL_KEYS if k in saved})
    return settings


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rlhf evaluate", description=__doc__.split("\n\n")[0])
    report = "default: the pipeline run's eval.%s, or conf/pipeline.yaml's"
    ap.add_argument("policy", type=Path, help="an exported policy (e.g. outputs/pipeline/builtin/ppo/export)")
    ap.add_argument(
        "--baseline", help="policy to compare against (default: the PPO run's reference, its SFT export)"
    )
    ap.add_argument("--reference", help="reference for the KL (default: the baseline)")
    ap.add_argument("--samples-per-prompt", type=int, help=report % "samples_per_prompt")
    ap.add_argument("--seed", type=int, help=report % "seed")
    ap.add_argument("--num-report-samples", type=int, help=report % "num_report_samples")
    ap.add_argument("--judge", choices=JUDGES, help="gold (built-in task), sentiment (IMDB classifier); auto "
                    "picks by the run's data; " + report % "judge")  # fmt: skip
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="run the exports' own modelling code (a custom-code model's exports need it)")  # fmt: skip
    ap.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    return ap


def cli(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    defaults = eval_defaults(args.policy)
    for key in EVAL_KEYS:
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    logging.basicConfig(level=logging.WARNING)
    if not (args.policy / EXPORT_INFO).is_file():
        raise SystemExit(f"rlhf evaluate: {args.policy} is not an export (no {EXPORT_INFO})")
    info = json.loads((args.policy / EXPORT_INFO).read_text())
    baseline = args.baseline or (resolve_reference(info["ref"], args.policy) if info.get("ref") else None)
    if baseline is None:
        raise SystemExit(f"rlhf evaluate: {args.policy} does not name its reference; give --baseline DIR")
    settings = settings_from(_run_config(args.policy), args.judge)
    # only on the command line: the run config beside a downloaded export is no reason to run its code
    settings["trust_remote_code"] = args.trust_remote_code
    result = compare(
        args.policy, baseline, args.reference or baseline, samples_per_prompt=args.samples_per_prompt, seed=args.seed,
        num_report_samples=args.num_report_samples, **settings,
    )  # fmt: skip
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    sys.stdout.write(text + "\n")  # the command's output: the figures as JSON
