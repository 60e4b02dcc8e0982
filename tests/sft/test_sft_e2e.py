"""SFT end to end on the built-in default, as a user runs it: `python -m sft ...`."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import ROOT, metric_series, read_metrics, run_stage, stage_env

QUICK = ["logger=none", "train.num_samples=2", "train.sample_max_new_tokens=16"]


def test_sft_default_learns_and_exports_a_loadable_model(tmp_path):
    run = tmp_path / "run"
    run_stage("sft", *QUICK, "train.max_steps=80", "train.eval_every=40", f"hydra.run.dir={run}")
    rows = read_metrics(run)
    losses = [v for _, v in metric_series(rows, "train/loss")]
    assert losses[-1] < 0.6 * losses[0], losses  # loss falls (train.seed 0-4: to 0.37-0.38 of the first)
    evals = metric_series(rows, "eval/loss")
    assert [s for s, _ in evals] == [40, 80] and evals[1][1] < evals[0][1]
    assert all("time/step_s" in r and "train/lr" in r for r in rows if "train/loss" in r)
    # ZeRO-2 on one fp32 rank runs as stage 0, which DeepSpeed leaves without a gradient norm
    assert all(r["train/grad_norm"] > 0 for r in rows if "train/loss" in r)
    assert (run / "samples.jsonl").is_file() and (run / ".hydra" / "config.yaml").is_file()

    model = AutoModelForCausalLM.from_pretrained(run / "export")
    tok = AutoTokenizer.from_pretrained(run / "export")
    prompt = "### Instruction:\nreview the pizza near the station .\n\n### Response:\n"
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
    reply = out[0, ids["input_ids"].shape[1] :].tolist()
    assert tok.eos_token_id in reply, tok.decode(reply)  # it learned to stop
    assert "was" in tok.decode(reply)

    # weights changed: compare with the export of the same run after zero steps
    init = tmp_path / "init"
    run_stage("sft", *QUICK, "train.max_steps=0", f"hydra.run.dir={init}")
    before, after = (
        load_file(init / "export" / "model.safetensors"),
        load_file(run / "export" / "model.safetensors"),
    )
    assert before.keys() == after.keys()
    changed = [k for k in after if not torch.equal(before[k], after[k])]
    assert len(changed) == len(after), set(after) - set(changed)


def test_multirun_sweep_gives_each_job_its_own_directory(tmp_path):
    sweep = tmp_path / "sweep"
    run_stage("sft", "-m", "optim.lr=1e-3,3e-3", "experiment=quick", "train.max_steps=3", "train.log_every=0",
              f"hydra.sweep.dir={sweep}")  # fmt: skip
    for job, lr in (("0", 1e-3), ("1", 3e-3)):
        assert (sweep / job / "export" / "model.safetensors").is_file()
        cfg = OmegaConf.load(sweep / job / ".hydra" / "config.yaml")
        assert cfg.optim.lr == pytest.approx(lr)
        # log_every=0, like eval_every and save_every: the end only
        assert [step for step, _ in metric_series(read_metrics(sweep / job), "train/loss")] == [3]


def test_killed_run_resumes_to_the_same_result(tmp_path):
    args = [*QUICK, "train.max_steps=150", "train.save_every=10", "train.keep_checkpoints=2", "train.eval_every=0",
            "train.log_every=5", "train.num_samples=0"]  # fmt: skip
    straight = tmp_path / "straight"
    run_stage("sft", *args, f"hydra.run.dir={straight}")

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "sft", *args, f"hydra.run.dir={killed}"], cwd=ROOT, env=stage_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while (
        not (killed / "checkpoints" / "latest").exists()
        and time.monotonic() < deadline
        and proc.poll() is None
    ):
        time.sleep(0.02)
    time.sleep(0.3)  # let it get further, maybe into the middle of the next checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "export").exists()
    killed_at = json.loads(
        (
            killed
            / "checkpoints"
            / (killed / "checkpoints" / "latest").read_text().strip()
            / "trainer_state.json"
        ).read_text()
    )["step"]
    assert 0 < killed_at < 150

    run_stage("sft", *args, "train.resume=true", f"hydra.run.dir={killed}")
    a, b = (
        load_file(straight / "export" / "model.safetensors"),
        load_file(killed / "export" / "model.safetensors"),
    )
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    # the metrics file reads as one run: every logged step once, in order
    steps = [r["step"] for r in read_metrics(killed) if "train/loss" in r]
    assert steps == list(range(5, 151, 5))
    assert len(list((killed / "checkpoints").glob("step-*"))) == 2  # keep_checkpoints


def test_lora_exports_adapter_base_and_merged_model(tmp_path):
    from peft import PeftModel

    run = tmp_path / "run"
    run_stage("sft", *QUICK, "peft=lora", "peft.r=4", "peft.merge_on_export=true", "optim.lr=3e-3", "train.max_steps=20",
              "model.gradient_checkpointing=true",
              "train.eval_every=0", f"hydra.run.dir={run}")  # fmt: skip
    export = run / "export"
    adapter = load_file(export / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero: it trained
    base = AutoModelForCausalLM.from_pretrained(export / "base")
    peft_model = PeftModel.from_pretrained(base, export).eval()
    merged = AutoModelForCausalLM.from_pretrained(export / "merged").eval()
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, merged(ids).logits, atol=1e-4, rtol=1e-4)


def test_bad_data_fails_before_training_and_skip_counts(tmp_path):
    data = tmp_path / "d.jsonl"
    good = {"prompt": "review the pizza .", "response": "the crust was great ."}
    data.write_text(
        "\n".join(json.dumps(r) for r in [good] * 30 + [{"prompt": "x", "response": ""}] + [good] * 10)
    )
    common = [
        "data=file",
        f"data.path={data}",
        "experiment=quick",
        "train.max_steps=2",
        f"hydra.run.dir={tmp_path / 'r'}",
    ]
    proc = run_stage("sft", *common, check=False)
    assert proc.returncode != 0
    assert f"{data}:31: field 'response' is empty" in proc.stderr + proc.stdout
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
    proc = run_stage("sft", *common, "data.on_error=skip")
    assert "skipped 1 (1 field 'response' is empty)" in proc.stdout + proc.stderr


def test_packing_trains_and_tensorboard_logs(tmp_path):
    run = tmp_path / "run"
    run_stage("sft", "experiment=quick", "data.packing=true", "train.max_steps=20", "logger=tensorboard",
              f"hydra.run.dir={run}")  # fmt: skip
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    rows = read_metrics(run)
    # 4000 examples of about 30 tokens in rows of data.max_len 64: about two a row (measured: 1924 rows)
    assert rows[0]["data/train_examples"] < 0.55 * 4000
    losses = [v for _, v in metric_series(rows, "train/loss")]
    assert losses[-1] < losses[0]


def test_an_eval_set_cut_before_every_reply_logs_no_eval_loss(tmp_path):
    train, evals, run = tmp_path / "train.jsonl", tmp_path / "eval.jsonl", tmp_path / "r"
    train.write_text(
        "\n".join([json.dumps({"prompt": "review the pizza .", "response": "the crust was great ."})] * 40)
    )
    long = {
        "prompt": " ".join(["review the pizza near the station ."] * 12),
        "response": "the crust was great .",
    }
    evals.write_text("\n".join([json.dumps(long)] * 4))
    proc = run_stage("sft", "data=file", f"data.path={train}", f"data.eval_path={evals}", "data.max_len=48",
                     "experiment=quick", "train.max_steps=2", "train.eval_every=1", f"hydra.run.dir={run}")  # fmt: skip
    rows = read_metrics(run)
    assert rows[0]["data/eval_examples"] == 0 and metric_series(rows, "train/loss")
    assert not any("eval/loss" in r for r in rows), rows  # was 0.0 (perplexity 1.0): a perfect score
    assert "no eval example keeps a reply token within data.max_len=48" in proc.stdout + proc.stderr
