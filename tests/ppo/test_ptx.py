"""PPO-ptx's demonstrations: what a cut to the rollout's length leaves of them."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from data.builtin.tokenizer import build_tokenizer
from data.collate import collate
from data.formats import DataError
from data.templates import PromptFormatter
from ppo.ptx import PtxData

TEMPLATE = {
    "chat_template": "never",
    "system": "{content}\n",
    "user": "Q: {content}\n",
    "assistant": "A: {content}",
}


def ptx_data(path, max_len, micro=4):
    cfg = OmegaConf.create({"path": str(path), "format": "alpaca", "micro_batch_size_per_device": micro})
    return PtxData(cfg, PromptFormatter(build_tokenizer(), **TEMPLATE), max_len, world=1, seed=0, task_seed=0)


def tiny_llama(tok):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))  # fmt: skip


def test_demonstrations_cut_before_their_reply_are_left_out_and_the_loss_stays_finite(tmp_path):
    long = " ".join(["the crust was great . the service was slow ."] * 8)  # far over 24 tokens
    short = {"instruction": "hi", "output": "hello"}
    rows = [{"instruction": long, "output": "we will be back"}] * 6 + [short] * 4
    path = tmp_path / "demos.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = ptx_data(path, max_len=24)
    assert len(data.examples) == 4  # the six long ones lost every reply token to the cut
    model = tiny_llama(build_tokenizer())
    for _ in range(3):  # every micro-batch has targets: no 0/0 token mean
        loss, tokens = data.loss(model, torch.device("cpu"))
        assert tokens > 0 and torch.isfinite(loss)
    path.write_text("\n".join(json.dumps(r) for r in rows[:9]))  # 3 usable: short of a batch of 4
    with pytest.raises(ValueError, match="lower ptx.micro_batch_size_per_device, or add data"):
        ptx_data(path, max_len=24)
    path.write_text("\n".join(json.dumps(r) for r in rows[:6]))
    with pytest.raises(DataError, match="no demonstration keeps any reply token within 24 tokens"):
        ptx_data(path, max_len=24)


def test_the_ptx_term_is_the_minibatchs_token_mean_however_it_is_split(tmp_path):
    """The update adds loss / normaliser per micro-step and DeepSpeed averages over the micro-steps: with
    one micro-batch of 4 or two of 2 the term is the token mean over the same 4 demonstrations."""
    replies = ["great .", "the crust was great . the sauce was awful . the crust was great .", "awful .",
               "the sauce was great ."]  # fmt: skip
    path = tmp_path / "demos.jsonl"
    rows = [{"instruction": f"review {i}", "output": reply} for i, reply in enumerate(replies)]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    tok = build_tokenizer()
    model, cpu = tiny_llama(tok), torch.device("cpu")
    terms = {}
    for micro in (4, 2, 1):
        data = ptx_data(path, max_len=64, micro=micro)
        steps = 4 // micro
        norm = data.normaliser(steps)
        terms[micro] = sum(data.loss(model, cpu)[0] / norm for _ in range(steps)) / steps
    data = ptx_data(path, max_len=64, micro=4)
    b = collate([data.examples[i] for i in data.batches.batch(0)], tok.pad_token_id)
    token_mean = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
    for micro, term in terms.items():
        torch.testing.assert_close(term, token_mean, rtol=1e-5, atol=1e-6, msg=f"micro-batches of {micro}")
    # the demonstrations' target counts differ enough that a mean of micro-batch means would not match
    one_each = ptx_data(path, max_len=64, micro=1)
    means = [loss / n for loss, n in (one_each.loss(model, cpu) for _ in range(4))]
    assert abs(sum(means) / 4 - token_mean) > 1e-3, (means, token_mean)
