"""The reward stage end to end: `python -m reward ...` on the built-in task, under the launcher, on real data."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from core.deepspeed import consolidated_fp32_state_dict
from tests.conftest import PARTITION_ALL, deepspeed_launcher, metric_series, read_metrics, run_stage

QUICK = ["logger=none", "train.eval_every=0", "train.log_every=1"]


def test_reward_export_loads_as_sequence_classifier_with_stats(tmp_path):
    run = tmp_path / "rw"
    run_stage("reward", *QUICK, "train.max_steps=30", "data.builtin.num_prompts=600", f"hydra.run.dir={run}")
    rows = read_metrics(run)
    assert {"train/loss", "train/accuracy"} <= rows[-1].keys() and rows[-1]["train/grad_norm"] > 0
    final = rows[-1]
    for key in (
        "eval/accuracy",
        "eval/reward_chosen",
        "eval/reward_rejected",
        "eval/margin",
        "eval/gold_accuracy",
    ):
        assert key in final
    # 30 steps already rank held-out pairs above chance (measured over train.seed 0-4: accuracy 0.67-0.80,
    # gold 0.70-0.83 on 30 pairs, margin 0.60-1.01; seed 0, the one tested: 0.73, 0.77, 0.73)
    assert (
        final["eval/margin"] > 0 and final["eval/accuracy"] >= 0.6 and final["eval/gold_accuracy"] >= 0.6
    ), final
    stats = json.loads((run / "export" / "reward_stats.json").read_text())
    assert stats["count"] == 2 * rows[0]["data/eval_pairs"] and stats["std"] > 0
    model = AutoModelForSequenceClassification.from_pretrained(run / "export")
    tok = AutoTokenizer.from_pretrained(run / "export")
    assert model.config.num_labels == 1
    ids = tok(
        "### Instruction:\nreview the pizza .\n\n### Response:\nthe crust was great .</s>",
        return_tensors="pt",
    )
    assert model(**ids).logits.shape == (1, 1)


@pytest.mark.slow
def test_builtin_reward_model_agrees_with_the_noise_free_gold_judge(tmp_path):
    run = tmp_path / "rw"
    run_stage("reward", "logger=none", "train.eval_every=0", f"hydra.run.dir={run}", timeout=900)
    final = read_metrics(run)[-1]
    # Agreement with the noise-free judge on 2000 pairs of held-out prompts: the target itself. The
    # default reaches 0.9065; over train.seed 1-4 it reached 0.9085, 0.9100, 0.9040 and 0.9050.
    assert final["eval/gold_accuracy"] >= 0.9, final


@pytest.mark.distributed
def test_zero3_two_ranks_partition_and_export_the_gathered_weights(tmp_path):
    run = tmp_path / "z3"
    run_stage("reward", *QUICK, "deepspeed=zero3", PARTITION_ALL, "train.max_steps=6", "train.micro_batch_size_per_device=4",
              "data.builtin.num_prompts=200", f"hydra.run.dir={run}", launcher=deepspeed_launcher(2))  # fmt: skip
    rows = read_metrics(run)
    assert rows[0]["zero/param_share_rank0"] == pytest.approx(0.5, abs=0.05)
    assert rows[0]["zero/param_share_rank1"] == pytest.approx(0.5, abs=0.05)
    assert len(metric_series(rows, "train/loss")) == 6
    exported = load_file(run / "export" / "model.safetensors")
    ckpt = run / "checkpoints"
    gathered = consolidated_fp32_state_dict(str(ckpt), (ckpt / "latest").read_text().strip())
    assert "score.weight" in exported
    for key, value in exported.items():
        torch.testing.assert_close(value, gathered[key], rtol=0, atol=0)


@pytest.mark.shared_data
def test_hh_rlhf_harmless_with_the_gpt2_tokenizer(shared_data, tmp_path):
    run = tmp_path / "hh"
    run_stage("reward", *QUICK, "data=hh_harmless", f"data_root={shared_data}", "model.tokenizer=${data_root}/tokenizers/gpt2",
              "data.max_len=256", "train.max_steps=5", "train.micro_batch_size_per_device=4", "train.eval_batches=2",
              f"hydra.run.dir={run}")  # fmt: skip
    rows = read_metrics(run)
    assert (
        rows[0]["data/train_pairs"] == 2077 and rows[0]["data/eval_pairs"] == 231
    )  # 90 / 10 of the 2308 pairs left when the 4 rows with an empty reply are skipped (2312 rows)
    assert rows[0]["data/truncated"] > 0 and len(metric_series(rows, "train/loss")) == 5
    assert (run / "export" / "reward_stats.json").is_file()


def test_lora_reward_model_exports_adapter_with_trained_head_and_merged_model(tmp_path):
    from peft import PeftModel

    run = tmp_path / "lora"
    run_stage("reward", *QUICK, "peft=lora", "peft.r=4", "peft.merge_on_export=true", "train.max_steps=5",
              "data.builtin.num_prompts=300", f"hydra.run.dir={run}")  # fmt: skip
    export = run / "export"
    adapter = load_file(export / "adapter_model.safetensors")
    assert any("lora_" in k for k in adapter) and any(
        "score" in k for k in adapter
    )  # the new head trains too
    base = AutoModelForSequenceClassification.from_pretrained(export / "base")
    peft_model = PeftModel.from_pretrained(base, export).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(export / "merged").eval()
    ids = torch.tensor([[1, 5, 6, 7, 2]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, merged(ids).logits, atol=1e-4, rtol=1e-4)
