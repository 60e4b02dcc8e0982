"""The pipeline's report: plots of every stage's logged curves, the gold evaluation, samples.

Writes into the run directory:

    report.md     the report, images beside it in plots/
    report.html   the same content in one self-contained file (images inlined)
    report.json   the headline figures (win_rate, tie_rate, sft_gold_mean, ppo_gold_mean, ppo_kl, wall_s, ...;
                  on IMDB sft_positive_share, ppo_positive_share, sft_sentiment_mean, ppo_sentiment_mean)
    plots/*.png   one PNG per plot; plots/data.json holds exactly the points each one draws

After a sweep (`rlhf pipeline -m ...`), `SweepReport` writes sweep_report.{md,html,json} and a
gold-reward-vs-KL frontier plot into the sweep directory.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from hydra.experimental.callback import Callback  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from core.checkpoint import EXPORT_INFO, atomic_write_text, resolve_reference  # noqa: E402
from core.logging import METRICS_FILE  # noqa: E402

log = logging.getLogger(__name__)

REPORT_JSON, REPORT_MD, REPORT_HTML, EVAL_JSON = "report.json", "report.md", "report.html", "eval.json"
# Part of eval.json's key: raised when the evaluation itself changes, so a cached result is redone once
# (2: held-out conversations are sampled whole, not as their last user turn; 3: the hold-out keeps the
# turns of one conversation together, `data.formats.opening`)
EVAL_VERSION = 3
# (file, title, y label, stage, [(metric key, legend label)]): curves against the step
CURVES = (
    ("sft_loss.png", "SFT loss", "cross-entropy (nats/token)", "sft",
     [("train/loss", "train"), ("eval/loss", "eval")]),
    ("reward_accuracy.png", "Reward model accuracy", "pairs ranked right", "reward",
     [("train/accuracy", "train"), ("eval/accuracy", "eval (noisy labels)"), ("eval/gold_accuracy", "eval (gold judge)")]),
    ("ppo_reward.png", "PPO reward-model score", "mean raw score", "ppo",
     [("ppo/reward", "rollout"), ("eval/reward", "held-out prompts")]),
    ("ppo_kl.png", "PPO KL from the reference", "sequence KL (nats)", "ppo", [("ppo/kl", "rollout")]),
    ("ppo_gold.png", "PPO gold reward (built-in judge)", "mean gold score", "ppo",
     [("gold/reward", "rollout"), ("eval/gold_reward", "held-out prompts")]),
)  # fmt: skip


def read_metrics(stage_dir: Path) -> list[dict[str, Any]]:
    path = stage_dir / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(rows: list[dict[str, Any]], x: str, y: str) -> list[list[float]]:
    """[[x, y], ...] for the rows that logged both keys."""
    return [[r[x], r[y]] for r in rows if x in r and y in r and isinstance(r[y], (int, float))]


def plot(path: Path, title: str, xlabel: str, ylabel: str, lines: dict[str, list[list[float]]],
         markers: bool = False) -> bool:  # fmt: skip
    """One PNG with a line per non-empty series; False (no file) when there is nothing to draw."""
    lines = {k: v for k, v in lines.items() if v}
    if not lines:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for label, points in lines.items():
        xs, ys = zip(*points)
        if markers:  # a cloud of (x, y) points, not a curve
            ax.plot(xs, ys, linestyle="none", marker="o", markersize=3, alpha=0.6, label=label)
        else:
            ax.plot(xs, ys, marker="o" if len(points) < 12 else None, markersize=3, label=label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def make_plots(plots_dir: Path, stage_dirs: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Every stage curve plus PPO's reward-vs-KL; returns {file: {title, series}} of the ones drawn."""
    drawn: dict[str, dict[str, Any]] = {}
    rows = {stage: read_metrics(d) for stage, d in stage_dirs.items()}
    for file, title, ylabel, stage, keys in CURVES:
        lines = {label: series(rows.get(stage, []), "step", key) for key, label in keys}
        if plot(plots_dir / file, title, "step", ylabel, lines):
            drawn[file] = {"title": title, "x": "step", "series": {k: v for k, v in lines.items() if v}}
    ppo = rows.get("ppo", [])
    lines = {
        "reward-model score": series(ppo, "ppo/kl", "ppo/reward"),
        "gold reward": series(ppo, "ppo/kl", "gold/reward"),
    }
    if plot(plots_dir / "reward_vs_kl.png", "Reward against KL (one point per PPO step)", "sequence KL (nats)",
            "mean reward", lines, markers=True):  # fmt: skip
        drawn["reward_vs_kl.png"] = {
            "title": "Reward against KL",
            "x": "ppo/kl",
            "series": {k: v for k, v in lines.items() if v},
        }
    atomic_write_text(plots_dir / "data.json", json.dumps(drawn))
    return drawn


# ----------------------------------------------------------------------------- rendering


def render(blocks: list[tuple[str, Any]], base: Path) -> tuple[str, str]:
    """(markdown, html) of blocks: ("h1"|"h2"|"p", text), ("table", [header, *rows]), ("img", relative path)."""
    md, body = [], []
    for kind, value in blocks:
        if kind in ("h1", "h2"):
            md.append(("#" if kind == "h1" else "##") + f" {value}\n")
            body.append(f"<{kind}>{html.escape(value)}</{kind}>")
        elif kind == "p":
            md.append(f"{value}\n")
            body.append(f"<p>{html.escape(value)}</p>")
        elif kind == "table":
            # model text in a cell: on one line (any line break, a tokenizer's "\r" too, would end the row), its
            # HTML escaped (markdown viewers render raw HTML: a sample's "<script>" would run), "|" escaped
            header, *rows = [
                [html.escape(" ".join(str(c).splitlines()), quote=False).replace("|", "\\|") for c in r]
                for r in value
            ]
            md.append("\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                                + ["| " + " | ".join(r) + " |" for r in rows]) + "\n")  # fmt: skip
            cells = "".join(f"<th>{html.escape(c)}</th>" for c in value[0])
            trs = "".join(
                "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in value[1:]
            )
            body.append(f"<table><tr>{cells}</tr>{trs}</table>")
        elif kind == "img":
            md.append(f"![{value}]({value})\n")
            data = base64.b64encode((base / value).read_bytes()).decode()
            body.append(f'<p><img alt="{html.escape(value)}" src="data:image/png;base64,{data}"></p>')
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}")  # fmt: skip
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>RLHF report</title><style>{style}</style></head>"
    return "\n".join(md), page + "<body>" + "\n".join(body) + "</body></html>\n"


def _f(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def write_report(run_dir: Path, stage_dirs: dict[str, Path], stages: dict[str, dict[str, Any]],
                 evaluation: dict[str, Any] | None, wall_s: float) -> dict[str, Any]:  # fmt: skip
    """report.md / report.html / report.json and plots/ in run_dir; returns report.json's content."""
    drawn = make_plots(run_dir / "plots", stage_dirs)
    figures = {k: v for k, v in (evaluation or {}).items() if k != "samples"}
    summary = {**figures, "wall_s": wall_s, "stages": stages, "plots": sorted(drawn)}
    blocks: list[tuple[str, Any]] = [("h1", f"RLHF pipeline report: {run_dir.name}")]
    blocks.append(("table", [["stage", "this run", "wall time of the run that made it (s)", "export"]]
                   + [[s, v["action"], _f(v["stage_wall_s"], 1), f"{v['dir']}/export"] for s, v in stages.items()]))  # fmt: skip
    blocks.append(("p", f"Wall time of this command: {wall_s:.1f} s."))
    if evaluation:
        e, name, base = evaluation, evaluation["judge"], evaluation.get("baseline_name", "SFT")
        header = [
            "win rate",
            "tie rate",
            "loss rate",
            f"{base} {name} mean",
            f"PPO {name} mean",
            "PPO KL (nats)",
        ]
        row = [_f(e["win_rate"]), _f(e["tie_rate"]), _f(e["loss_rate"]), _f(e[f"sft_{name}_mean"]),
               _f(e[f"ppo_{name}_mean"]), _f(e["ppo_kl"])]  # fmt: skip
        if "ppo_positive_share" in e:
            header[:0], row[:0] = [f"{base} positive share", "PPO positive share"], [
                _f(e["sft_positive_share"]), _f(e["ppo_positive_share"])]  # fmt: skip
        blocks += [("h2", f"Evaluation ({name} judge): the PPO policy against the {base} policy on held-out prompts"),
                   ("p", f"{e['num_prompts']} held-out prompts x {e['samples_per_prompt']} samples = "
                         f"{e['num_comparisons']} comparisons, judged by {e['judge_about']}; not the reward model."),
                   ("table", [header, row])]  # fmt: skip
    blocks.append(("h2", "Curves"))
    blocks += [("img", f"plots/{file}") for file in drawn]
    if evaluation and evaluation["samples"]:
        base = evaluation.get("baseline_name", "SFT")
        blocks += [("h2", f"Samples on held-out prompts ({base} | PPO, {evaluation['judge']} score in brackets)"),
                   ("table", [["prompt", base, "PPO"]] + [
                       [s["prompt"], f"{s['sft']} [{s['sft_score']:.3g}]", f"{s['ppo']} [{s['ppo_score']:.3g}]"]
                       for s in evaluation["samples"]])]  # fmt: skip
    md, page = render(blocks, run_dir)
    atomic_write_text(run_dir / REPORT_MD, md)
    atomic_write_text(run_dir / REPORT_HTML, page)
    atomic_write_text(run_dir / REPORT_JSON, json.dumps(summary, indent=2))
    return summary


# ----------------------------------------------------------------------------- after the stages


def _evaluate(
    cfg: DictConfig, run_dir: Path, stage_dirs: dict[str, Path], keys: dict[str, str], ppo_ran: bool
) -> dict | None:
    """The gold evaluation of the PPO export (cached in eval.json under the PPO stage's key and the
    export's own record, for as long as PPO is skipped: a forced or resumed PPO run writes a new
    export under the same key, and in a sweep another job of the same command may have)."""
    from core import evaluate

    ppo_dir = stage_dirs.get("ppo")
    if not cfg.eval.enabled or ppo_dir is None:
        return None
    ppo_cfg = OmegaConf.load(ppo_dir / "pipeline_stage_config.yaml")
    if evaluate.resolve_judge(ppo_cfg.data, cfg.eval.judge) is None:
        log.info(
            "evaluation skipped: no judge for this PPO data (set eval.judge=sentiment to use the IMDB one)"
        )
        return None
    # the export's own record (its command's id, its wall time) tells one PPO run from another
    export_record = (ppo_dir / "export" / "pipeline_stage.json").read_text()
    eval_key = hashlib.sha256(
        json.dumps([EVAL_VERSION, keys["ppo"], export_record, OmegaConf.to_container(cfg.eval)]).encode()
    ).hexdigest()
    cached = run_dir / EVAL_JSON
    if not ppo_ran and cached.is_file() and json.loads(cached.read_text()).get("key") == eval_key:
        log.info("evaluation: up to date in %s", cached)
        return json.loads(cached.read_text())["result"]
    start = time.perf_counter()
    # the SFT export of this run (wherever the run directory now is), else the reference PPO resolved
    # and recorded with its export (a null `ref` follows the actor, wherever that came from)
    baseline = (
        str(stage_dirs["sft"] / "export")
        if "sft" in stage_dirs
        else resolve_reference(
            json.loads((ppo_dir / "export" / EXPORT_INFO).read_text())["ref"], ppo_dir / "export"
        )
    )
    result = evaluate.compare(
        ppo_dir / "export", baseline, baseline,
        samples_per_prompt=cfg.eval.samples_per_prompt, seed=cfg.eval.seed,
        num_report_samples=cfg.eval.num_report_samples, **evaluate.settings_from(ppo_cfg, cfg.eval.judge),
    )  # fmt: skip
    result["baseline_name"] = "SFT" if "sft" in stage_dirs else "reference"  # the report's column label
    result["eval_wall_s"] = time.perf_counter() - start
    atomic_write_text(cached, json.dumps({"key": eval_key, "result": result}))
    return result


def finish(cfg: DictConfig, run_dir: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Evaluate, write the report, print where it is; returns report.json's content."""
    stage_dirs: dict[str, Path] = result["stage_dirs"]
    keys = {s: v["key"] for s, v in result["stages"].items()}
    ppo_ran = result["stages"].get("ppo", {}).get("action", "skip") != "skip"
    evaluation = _evaluate(cfg, run_dir, stage_dirs, keys, ppo_ran)
    summary = write_report(
        run_dir, stage_dirs, result["stages"], evaluation, time.perf_counter() - result["start"]
    )
    if evaluation and evaluation["judge"] == "gold":
        log.info("gold evaluation: PPO beats SFT on %.1f%% (ties %.1f%%); gold mean SFT %.3f -> PPO %.3f; KL %.3f",
                 100 * evaluation["win_rate"], 100 * evaluation["tie_rate"], evaluation["sft_gold_mean"],
                 evaluation["ppo_gold_mean"], evaluation["ppo_kl"])  # fmt: skip
    elif evaluation:
        log.info("sentiment evaluation: positive share SFT %.1f%% -> PPO %.1f%%; KL %.3f",
                 100 * evaluation["sft_positive_share"], 100 * evaluation["ppo_positive_share"],
                 evaluation["ppo_kl"])  # fmt: skip
    log.info("report: %s (and report.html, report.json)", run_dir / REPORT_MD)
    return summary


class SweepReport(Callback):
    """After `rlhf pipeline -m ...`: one report comparing the jobs (gold reward against KL)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        runs = []
        for report in sorted(sweep.glob(f"*/{REPORT_JSON}"), key=lambda p: p.parent.name):
            overrides_file = report.parent / ".hydra" / "overrides.yaml"
            overrides = (
                OmegaConf.to_container(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
            )
            runs.append({"run": report.parent.name, "overrides": [o.lstrip("+") for o in overrides],
                         **json.loads(report.read_text())})  # fmt: skip
        if not runs:
            return
        # label each run by what sets it apart; the overrides every run shares are listed once
        common = set.intersection(*(set(r["overrides"]) for r in runs))
        for r in runs:
            r["overrides"] = " ".join(o for o in r["overrides"] if o not in common) or r["run"]
        name = runs[0].get("judge", "gold")  # the judge's score: gold, or sentiment (P(positive))
        keys = ("ppo_kl", f"ppo_{name}_mean", f"sft_{name}_mean", "win_rate", "tie_rate")
        table = [
            ["run", "overrides", "PPO KL", f"PPO {name} mean", f"SFT {name} mean", "win rate", "tie rate"]
        ]
        table += [[r["run"], r["overrides"], *(_f(r.get(k, "n/a")) for k in keys)] for r in runs]
        blocks: list[tuple[str, Any]] = [("h1", f"Sweep report: {sweep}")]
        if common:
            blocks.append(("p", "Every run: " + " ".join(sorted(common))))
        blocks.append(("table", table))
        points = [r for r in runs if "ppo_kl" in r and keys[1] in r]
        if points:
            fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
            ax.scatter([r["ppo_kl"] for r in points], [r[keys[1]] for r in points])
            for r in points:
                ax.annotate(r["overrides"], (r["ppo_kl"], r[keys[1]]), fontsize=7)
            frontier = _frontier([(r["ppo_kl"], r[keys[1]]) for r in points])
            ax.plot(*zip(*frontier), linestyle="--", alpha=0.6, label=f"frontier (more {name} for less KL)")
            ax.set(title=f"{name.capitalize()} score against KL, one point per run",
                   xlabel="PPO KL from the reference (nats)", ylabel=f"PPO {name} mean (held-out prompts)")  # fmt: skip
            ax.legend()
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(sweep / "sweep_frontier.png")
            plt.close(fig)
            blocks.append(("img", "sweep_frontier.png"))
        md, page = render(blocks, sweep)
        atomic_write_text(sweep / "sweep_report.md", md)
        atomic_write_text(sweep / "sweep_report.html", page)
        atomic_write_text(sweep / "sweep_report.json", json.dumps(runs, indent=2))
        log.info("sweep report: %s", sweep / "sweep_report.md")


def _frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both KL (lower) and gold (higher), by KL."""
    out: list[tuple[float, float]] = []
    for kl, gold in sorted(points, key=lambda p: (p[0], -p[1])):  # at equal KL the better gold first
        if not out or gold > out[-1][1]:
            out.append((kl, gold))
    return out
