"""PPO-ptx's demonstrations: what a cut to the rollout's length leaves of them."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from data.builtin.tokenizer import build_tokenizer
from data.formats import DataError
from data.templates import PromptFormatter
from ppo.ptx import PtxData

TEMPLATE = {
    "chat_template": "never",
    "system": "{content}\n",
    "user": "Q: {content}\n",
    "assistant": "A: {content}",
}


def ptx_data(path, max_len):
    cfg = OmegaConf.create({"path": str(path), "format": "alpaca", "micro_batch_size_per_device": 4})
    return PtxData(cfg, PromptFormatter(build_tokenizer(), **TEMPLATE), max_len, world=1, seed=0, task_seed=0)


def test_demonstrations_cut_before_their_reply_are_left_out_and_the_loss_stays_finite(tmp_path):
    long = " ".join(["the crust was great . the service was slow ."] * 8)  # far over 24 tokens
    short = {"instruction": "hi", "output": "hello"}
    rows = [{"instruction": long, "output": "we will be back"}] * 6 + [short] * 4
    path = tmp_path / "demos.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = ptx_data(path, max_len=24)
    assert len(data.examples) == 4  # the six long ones lost every reply token to the cut
    tok = build_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))  # fmt: skip
    for _ in range(3):  # every micro-batch has targets: no 0/0 token mean
        assert torch.isfinite(data.loss(model, torch.device("cpu")))
    path.write_text("\n".join(json.dumps(r) for r in rows[:9]))  # 3 usable: short of a batch of 4
    with pytest.raises(ValueError, match="lower ptx.micro_batch_size_per_device, or add data"):
        ptx_data(path, max_len=24)
    path.write_text("\n".join(json.dumps(r) for r in rows[:6]))
    with pytest.raises(DataError, match="no demonstration keeps any reply token within 24 tokens"):
        ptx_data(path, max_len=24)
