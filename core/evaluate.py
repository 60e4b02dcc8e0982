"""Gold evaluation of a policy against a baseline on the built-in task's held-out prompts.

    rlhf evaluate POLICY_DIR [--baseline DIR] [--reference DIR] [--samples-per-prompt N] [--out FILE]

Both policies sample `samples_per_prompt` responses to every held-out prompt (prompts no stage
trained on) with the PPO rollout's sampling settings and the same seed; the gold judge scores each
response, and the i-th sample of one policy is compared with the i-th of the other (a win, a tie or
a loss). The KL is the policy's sequence KL from the reference on its own samples,
sum_t [log pi(y_t | x, y<t) - log pi_ref(y_t | x, y<t)] (the k1 estimate, in nats), averaged.
This is the figure InstructGPT reports as a win rate against its SFT baseline (Ouyang et al.
2022, fig. 1), with a judge that is not the reward model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from core import models
from core.checkpoint import EXPORT_INFO
from data.builtin import task
from data.formats import Message
from data.templates import PromptFormatter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    min_new_tokens: int
    temperature: float
    top_p: float
    top_k: int


@dataclass
class Policy:
    model: torch.nn.Module
    tokenizer: Any
    formatter: PromptFormatter


def load_policy(path: str | Path, template: dict[str, str]) -> Policy:
    """An export (its tokenizer beside it) as a plain fp32 model in eval mode."""
    tokenizer = models.load_tokenizer(None, str(path), trust_remote_code=False)
    model = models.load_model(str(path), {}, tokenizer, "fp32", head="lm").eval()
    return Policy(model, tokenizer, PromptFormatter(tokenizer, **template))


@torch.no_grad()
def sample_responses(
    policy: Policy, prompts: list[str], sampling: Sampling, n: int, seed: int, max_prompt_len: int,
    batch_size: int = 64,
) -> tuple[list[list[int]], list[list[int]]]:  # fmt: skip
    """n sampled responses per prompt: (prompt ids, response ids up to and including EOS) per row.

    Rows are prompt-major: row i * n + j is sample j of prompt i.
    """
    tok = policy.tokenizer
    encoded = [policy.formatter.encode_prompt((Message("user", p),))[-max_prompt_len:] for p in prompts]
    rows = [ids for ids in encoded for _ in range(n)]
    torch.manual_seed(seed)
    responses: list[list[int]] = []
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo : lo + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in chunk])  # [B, P] left-padded
        mask = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in chunk])  # True = valid
        out = policy.model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=sampling.min_new_tokens or None, temperature=sampling.temperature,
            top_p=sampling.top_p, top_k=sampling.top_k, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
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
            input_ids=ids, attention_mask=mask, position_ids=models.positions_from_mask(mask)
        ).logits
        logits = logits[:, width - 1 : -1].float() / temperature  # [B, A, V]: the logits that predict y_t
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, width:, None]).squeeze(-1)  # [B, A]
        out += (logp * mask[:, width:]).sum(1).tolist()
    return out


def decode(policy: Policy, response: list[int]) -> str:
    return policy.tokenizer.decode(response, skip_special_tokens=True).strip()


def gold_evaluation(
    policy_dir: str | Path, baseline_dir: str | Path, reference_dir: str | Path, prompts: list[str], *,
    template: dict[str, str], sampling: Sampling, samples_per_prompt: int, seed: int, max_prompt_len: int,
    num_report_samples: int,
) -> dict[str, Any]:  # fmt: skip
    """Win / tie rates of policy over baseline by the gold judge, mean gold rewards, and the policy's KL."""
    policy, baseline = load_policy(policy_dir, template), load_policy(baseline_dir, template)
    n = samples_per_prompt
    p_rows, p_resp = sample_responses(policy, prompts, sampling, n, seed, max_prompt_len)
    _, b_resp = sample_responses(baseline, prompts, sampling, n, seed, max_prompt_len)
    p_text, b_text = [decode(policy, r) for r in p_resp], [decode(baseline, r) for r in b_resp]
    row_prompts = [p for p in prompts for _ in range(n)]
    p_gold = [task.gold_score(p, t) for p, t in zip(row_prompts, p_text)]
    b_gold = [task.gold_score(p, t) for p, t in zip(row_prompts, b_text)]
    wins = sum(p > b for p, b in zip(p_gold, b_gold))
    ties = sum(p == b for p, b in zip(p_gold, b_gold))
    reference = baseline if Path(reference_dir).resolve() == Path(baseline_dir).resolve() else None
    reference = reference or load_policy(reference_dir, template)
    pad = policy.tokenizer.pad_token_id
    lp = sequence_logprobs(policy.model, p_rows, p_resp, pad, sampling.temperature)
    lp_ref = sequence_logprobs(reference.model, p_rows, p_resp, pad, sampling.temperature)
    kl = [a - b for a, b in zip(lp, lp_ref)]
    total = len(p_gold)
    samples = [
        {"prompt": row_prompts[i], "sft": b_text[i], "sft_gold": b_gold[i], "ppo": p_text[i], "ppo_gold": p_gold[i]}
        for i in range(0, min(total, num_report_samples * n), n)
    ]  # fmt: skip
    return {
        "win_rate": wins / total, "tie_rate": ties / total, "loss_rate": (total - wins - ties) / total,
        "sft_gold_mean": sum(b_gold) / total, "ppo_gold_mean": sum(p_gold) / total,
        "ppo_kl": sum(kl) / total, "num_prompts": len(prompts), "num_comparisons": total,
        "samples_per_prompt": n, "best_gold": task.BEST_SCORE,
        "policy": str(policy_dir), "baseline": str(baseline_dir), "reference": str(reference_dir),
        "samples": samples,
    }  # fmt: skip


def settings_from(stage_cfg: DictConfig) -> dict[str, Any]:
    """The evaluation's prompts and sampling from a PPO stage config (its held-out prompts and rollout)."""
    r, d = stage_cfg.rollout, stage_cfg.data
    if d.path != "builtin":
        raise ValueError(
            "the gold evaluation needs the built-in task (data.path=builtin): it has the gold judge"
        )
    return {
        "prompts": task.split_prompts(d.builtin.seed)[1],
        "template": OmegaConf.to_container(d.template, resolve=True),
        "sampling": Sampling(r.max_new_tokens, r.min_new_tokens, r.temperature, r.top_p, r.top_k),
        "max_prompt_len": d.max_len,
    }


# ----------------------------------------------------------------------------- rlhf evaluate


def _run_config(policy_dir: Path) -> DictConfig:
    """The config of the PPO run that wrote `policy_dir`, or conf/ppo.yaml's defaults."""
    for name in ("pipeline_stage_config.yaml", ".hydra/config.yaml"):
        path = policy_dir.parent / name
        if path.is_file():
            return OmegaConf.load(path)
    from hydra import compose, initialize_config_dir

    import ppo.config  # noqa: F401  (the schema)

    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return compose(config_name="ppo")


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="rlhf evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("policy", type=Path, help="an exported policy (e.g. outputs/pipeline/builtin/ppo/export)")
    ap.add_argument(
        "--baseline", help="policy to compare against (default: the PPO run's reference, its SFT export)"
    )
    ap.add_argument("--reference", help="reference for the KL (default: the baseline)")
    ap.add_argument("--samples-per-prompt", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-report-samples", type=int, default=8)
    ap.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not (args.policy / EXPORT_INFO).is_file():
        raise SystemExit(f"rlhf evaluate: {args.policy} is not an export (no {EXPORT_INFO})")
    info = json.loads((args.policy / EXPORT_INFO).read_text())
    baseline = args.baseline or info.get("ref")
    if baseline is None:
        raise SystemExit(f"rlhf evaluate: {args.policy} does not name its reference; give --baseline DIR")
    settings = settings_from(_run_config(args.policy))
    result = gold_evaluation(
        args.policy, baseline, args.reference or baseline, samples_per_prompt=args.samples_per_prompt, seed=args.seed,
        num_report_samples=args.num_report_samples, **settings,
    )  # fmt: skip
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    sys.stdout.write(text + "\n")  # the command's output: the figures as JSON
