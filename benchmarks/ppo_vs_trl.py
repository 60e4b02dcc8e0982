#!/usr/bin/env python3
"""PPO step time, this project vs TRL's PPOTrainer, on the seeded workloads of ../shared/bench.

    pip install --target /tmp/trl-peer --no-deps trl==1.12.0      # the peer, apart from the project
    python benchmarks/ppo_vs_trl.py --peer-path /tmp/trl-peer [--sizes tiny small] [--rounds 3] [--steps 6]

For each size: builds the workload (make_workload.py), then runs the project
(`python -m ppo experiment=bench`) and the peer (trl_ppo_peer.py) in turn, `--rounds` times,
alternating which goes first, and prints the median step time of each (the first step of every
run is warm-up and not counted), the ratio project / peer, and the model-FLOPs utilisation of both:
the FLOPs a PPO step needs divided by the fp32 matmul rate torch reaches on this machine (the
faster of its BLAS and oneDNN products, the best of timings before and after the runs; the
utilisation against the BLAS rate alone is printed beside it). Each round's line also gives the
share of CPU time the VM's host took for others during it (steal, from Linux's /proc/stat).
`--peer-malloc-as-project` gives the peer, through glibc's environment, the malloc settings the
project applies to itself on the CPU (`train.keep_freed_memory`), to see what the ratio owes them.
Not part of `make test`: absolute times on a shared machine are noise; the ratio is the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def matmul_rate(n: int = 2048, reps: int = 5, trials: int = 4) -> dict[str, float]:
    """fp32 FLOP/s of a square matmul in torch on this machine, by each of torch's CPU paths: `blas`
    (`a @ b`, MKL on x86) and `onednn` (the oneDNN linear on a prepacked weight, the op the project
    generates with), each the best of a few timings. The MFU denominator is the faster of the two:
    on these AMD cores oneDNN's is 20-25 % above MKL's, and a denominator below what torch can
    reach would flatter every utilisation figure (as would a timing slowed by a busy moment)."""
    import torch

    from core.models import has_onednn_linear

    a, b = torch.randn(n, n), torch.randn(n, n)
    paths = {"blas": lambda: a @ b}
    if has_onednn_linear():
        packed = torch.ops.mkldnn._reorder_linear_weight(b, n)
        paths["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
    rates = {}
    for name, product in paths.items():
        for _ in range(3):
            product()
        best = float("inf")
        for _ in range(trials):
            start = time.perf_counter()
            for _ in range(reps):
                product()
            best = min(best, time.perf_counter() - start)
        rates[name] = 2 * n**3 * reps / best
    return rates


def best_rates(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: max(a.get(k, 0.0), b.get(k, 0.0)) for k in a.keys() | b.keys()}


def step_flops(workload: Path, batch: int, response_len: int) -> float:
    """Model FLOPs of one PPO step on the workload: 2 per parameter per token for each forward,
    6 for each trained forward + backward, plus attention scores (Kaplan et al. 2020 counting).

    Generation (KV cache, prompt + response) 1 forward of the policy; reference 1; reward 1;
    critic 1 (values) + 3 (update); actor 3 (update): 10 N_policy + 10 N_critic per token-row.
    """
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(workload / "tokenizer")
    prompts = [json.loads(line)["prompt"] for line in (workload / "prompts.jsonl").read_text().splitlines()]
    prompt_len = statistics.mean(len(tok(p)["input_ids"]) for p in prompts)
    tokens = batch * (prompt_len + response_len)
    total = 0.0
    for role in ("policy", "reward"):
        c = AutoConfig.from_pretrained(workload / role)
        d, L = c.hidden_size, c.num_hidden_layers
        per_layer = 4 * d * d + 3 * d * c.intermediate_size  # q, k, v, o + gate, up, down
        head = d * c.vocab_size if role == "policy" else d  # LM head vs scalar head
        n = L * per_layer + head
        attn = (
            2 * L * (prompt_len + response_len) * d
        )  # QK^T and AV per token (causal: about half of 4*L*T*d)
        total += 10 * (2 * n + attn) / 2 * tokens
    return total


def cpu_times() -> tuple[int, int] | None:
    """(steal, total) CPU time in jiffies from Linux's /proc/stat, or None elsewhere. Steal is time
    the hypervisor gave this VM's virtual cores to someone else: a round with a high share ran on a
    busy host (both sides of it are slowed, not always equally)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_share(start: tuple[int, int] | None) -> str:
    end = cpu_times()
    if start is None or end is None or end[1] == start[1]:
        return "n/a"
    return f"{100 * (end[0] - start[0]) / (end[1] - start[1]):.1f} %"


def run(cmd: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def project_median(workload: Path, steps: int, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)  # metrics.jsonl is appended to: a reused --workdir would mix runs
    run([sys.executable, "-m", "ppo", "experiment=bench", f"bench.workload={workload}", f"bench.steps={steps}",
         f"hydra.run.dir={out}"], dict(os.environ, WANDB_MODE="disabled"))  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["time/step_s"] for r in rows if "time/step_s" in r]
    return statistics.median(times[1:])


def peer_median(workload: Path, steps: int, env: dict[str, str], bench_dir: Path) -> float:
    out = run([sys.executable, str(bench_dir / "trl_ppo_peer.py"), str(workload), "--steps", str(steps)], env)
    return json.loads(out.strip().splitlines()[-1])["median_step_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer-path", required=True, help="directory where trl==1.12.0 is installed (--target)")
    ap.add_argument("--bench-dir", default=str(ROOT.parent / "shared" / "bench"))
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--peer-malloc-as-project", action="store_true",
                    help="give the peer the glibc malloc settings the project applies itself (train.keep_freed_memory)")  # fmt: skip
    args = ap.parse_args()
    bench_dir = Path(args.bench_dir)
    peer_env = dict(os.environ, PYTHONPATH=args.peer_path, WANDB_MODE="disabled")
    if args.peer_malloc_as_project:  # glibc's environment spelling of what the project sets with mallopt
        from core.dist import MMAP_THRESHOLD_MAX, TRIM_THRESHOLD_OFF

        peer_env.update(
            MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD_MAX), MALLOC_TRIM_THRESHOLD_=str(TRIM_THRESHOLD_OFF)
        )
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ppo-bench-"))
    rates = matmul_rate()
    print(
        "fp32 matmul rate (GFLOP/s): " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in rates.items()), flush=True
    )
    for size in args.sizes:
        workload = work / f"workload-{size}"
        if not (workload / "prompts.jsonl").is_file():
            run(
                [sys.executable, str(bench_dir / "make_workload.py"), str(workload), "--size", size],
                dict(os.environ),
            )
        ours, peer = [], []
        for r in range(args.rounds):
            cpu_start = cpu_times()
            first_ours = r % 2 == 0  # alternate the order: neither side always runs on a warmer machine
            for who in ("ours", "peer") if first_ours else ("peer", "ours"):
                if who == "ours":
                    ours.append(project_median(workload, args.steps, work / f"run-{size}-{r}"))
                else:
                    peer.append(peer_median(workload, args.steps, peer_env, bench_dir))
            print(f"{size} round {r}: project {ours[-1]:.3f} s/step, TRL {peer[-1]:.3f} s/step, "
                  f"CPU time stolen by the host {steal_share(cpu_start)}", flush=True)  # fmt: skip
        rates = best_rates(rates, matmul_rate())  # again after the runs: the machine's best of the two
        rate, blas = max(rates.values()), rates["blas"]
        o, p = statistics.median(ours), statistics.median(peer)
        flops = step_flops(workload, batch=32, response_len=32)
        print(json.dumps({"size": size, "project_median_step_s": round(o, 4), "trl_median_step_s": round(p, 4),
                          "ratio_project_over_trl": round(o / p, 3), "step_gflop": round(flops / 1e9, 2),
                          "mfu_project": round(flops / o / rate, 3), "mfu_trl": round(flops / p / rate, 3),
                          "matmul_gflops": round(rate / 1e9, 1),
                          # against `a @ b` alone: the denominator of the README's earlier rows
                          "mfu_project_blas": round(flops / o / blas, 3), "mfu_trl_blas": round(flops / p / blas, 3),
                          "matmul_gflops_blas": round(blas / 1e9, 1),
                          "peer_malloc_as_project": args.peer_malloc_as_project}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
