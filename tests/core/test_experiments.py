"""The real-data pipeline experiments, shortened: conf/experiment/imdb_sentiment.yaml and stories_positive.yaml.

A slice of IMDB (every 10th review) under a temporary data root, a few steps per stage: every
stage runs, the SFT stage trains its own tokenizer, the sentiment judge evaluates, and the
stories experiment rewards a SentencePiece policy with the IMDB reward model (another tokenizer).
Skipped without ../shared/data. The full runs and their figures are in the README ("Real data").
"""

import gzip
import json
import math

import pytest
from transformers import AutoTokenizer

from tests.conftest import run_stage

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]


@pytest.fixture
def data_root(shared_data, tmp_path):
    root = tmp_path / "data_root"
    root.mkdir()
    (root / "imdb").mkdir()
    with gzip.open(shared_data / "imdb" / "train.jsonl.gz", "rt", encoding="utf-8") as f:
        lines = [line for line in f.read().split("\n") if line]
    with gzip.open(root / "imdb" / "train.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines[::10]) + "\n")  # the file is sorted by label: a stride keeps both
    (root / "models").mkdir()
    (root / "models" / "stories260K-hf").symlink_to(shared_data / "models" / "stories260K-hf")
    return root


def check_sentiment_report(run, baseline_name):
    report = json.loads((run / "report.json").read_text())
    assert report["judge"] == "sentiment" and report["baseline_name"] == baseline_name
    for key in ("sft_positive_share", "ppo_positive_share", "sft_sentiment_mean", "ppo_sentiment_mean"):
        assert 0.0 <= report[key] <= 1.0, key
    assert math.isfinite(report["ppo_kl"]) and report["num_comparisons"] == report["num_prompts"]
    md = (run / "report.md").read_text()
    assert "sentiment judge" in md and f"| prompt | {baseline_name} | PPO |" in md
    return report


def test_imdb_sentiment_then_stories_positive(data_root, tmp_path):
    imdb_run, stories_run = tmp_path / "imdb", tmp_path / "stories"
    short = ("sft.train.max_steps=6", "reward.train.max_steps=6", "ppo.train.max_steps=3", "ppo.rollout.batch_size=16",
             "ppo.rollout.micro_batch_size_per_device=16", "ppo.train.micro_batch_size_per_device=16",
             "ppo.train.save_every=0", "eval.samples_per_prompt=1", "eval.num_report_samples=2")  # fmt: skip
    run_stage("core.pipeline", "experiment=imdb_sentiment", f"data_root={data_root}", f"hydra.run.dir={imdb_run}",
              *short, timeout=900)  # fmt: skip
    report = check_sentiment_report(imdb_run, "SFT")
    assert {s: v["action"] for s, v in report["stages"].items()} == {
        "sft": "run",
        "reward": "run",
        "ppo": "run",
    }
    # the SFT stage trained a byte-level BPE tokenizer on its reviews; the later stages use it
    tok = AutoTokenizer.from_pretrained(imdb_run / "sft" / "export")
    assert (
        len(tok) <= 4096
        and tok.eos_token == "</s>"
        and tok.decode(tok(" a film")["input_ids"][1:]) == " a film"
    )
    for stage in ("reward", "ppo"):
        assert len(AutoTokenizer.from_pretrained(imdb_run / stage / "export")) == len(tok)

    run_stage("core.pipeline", "experiment=stories_positive", f"data_root={data_root}",
              f"hydra.run.dir={stories_run}", f"ppo.reward_model.name_or_path={imdb_run / 'reward' / 'export'}",
              "ppo.train.max_steps=2", "ppo.rollout.batch_size=16", "ppo.rollout.micro_batch_size_per_device=16",
              "ppo.train.micro_batch_size_per_device=16", "ppo.train.save_every=0", "eval.samples_per_prompt=1",
              timeout=600)  # fmt: skip
    report = check_sentiment_report(stories_run, "reference")
    assert list(report["stages"]) == ["ppo"]
    assert "re-tokenised" in (stories_run / "ppo" / "stage.log").read_text()
    assert (
        len(AutoTokenizer.from_pretrained(stories_run / "ppo" / "export")) == 512
    )  # stories260K's SentencePiece
