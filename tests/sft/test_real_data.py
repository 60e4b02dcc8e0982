"""Real tokenizers and a real pretrained model from ../shared/data on the real Alpaca sample.

Each case runs a few SFT steps in-process and checks that EOS is learned as the response end:
every training sequence ends its reply with the EOS id as a target, and the model's
log-probability of EOS right after each held-out reply rises.
"""

import pytest
import torch
from hydra import compose, initialize_config_dir

import sft.config  # noqa: F401
from sft.train import SFTRecipe
from tests.conftest import ROOT

pytestmark = pytest.mark.shared_data

CASES = {
    "gpt2": ["model.tokenizer=${data_root}/tokenizers/gpt2"],
    "llama2": ["model.tokenizer=${data_root}/tokenizers/llama2-sentencepiece"],
    "qwen2": ["model.tokenizer=${data_root}/tokenizers/qwen2"],  # has a chat template: used
    "neox": ["model.tokenizer=${data_root}/tokenizers/gpt-neox-pythia"],
    "stories260k": ["model=stories260k"],  # pretrained weights and their own tokenizer
}


def eos_logprob_at_reply_end(recipe: SFTRecipe) -> float:
    """Mean log p(EOS | reply) at the end of each eval reply."""
    eos, total, n = recipe.tokenizer.eos_token_id, 0.0, 0
    model = recipe.engine.module
    with torch.no_grad():
        for enc in recipe.eval_set[:16]:
            ids = torch.tensor([enc.input_ids])
            logp = model(input_ids=ids, use_cache=False).logits[0].log_softmax(-1)  # [T, V]
            ends = [t for t in range(1, len(enc.labels)) if enc.labels[t] == eos]
            total += sum(logp[t - 1, eos].item() for t in ends)
            n += len(ends)
    return total / n


@pytest.mark.parametrize("case", list(CASES))
def test_real_tokenizer_learns_eos_at_response_end(shared_data, tmp_path, case):
    overrides = [*CASES[case], "data=alpaca", f"data_root={shared_data}", "data.max_len=96", "logger=none",
                 "deepspeed=zero0", "train.max_steps=25", "train.micro_batch_size_per_device=4", "optim.lr=3e-3",
                 "optim.warmup_steps=2", "train.eval_every=0", "train.eval_batches=2", "train.num_samples=1",
                 "train.sample_max_new_tokens=8", "train.save_every=0", "data.builtin.num_prompts=10"]  # fmt: skip
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sft", overrides=overrides)
    recipe = SFTRecipe(cfg, run_dir=tmp_path)
    recipe.setup()
    tok = recipe.tokenizer
    assert tok.pad_token_id != tok.eos_token_id
    whole = [enc for enc in recipe.train_set[:200] if not enc.truncated]
    assert len(whole) >= 20, (case, len(whole))  # stories260k: 30 of 200 fit in 96 tokens
    for enc in whole:  # each ends with its reply's EOS as a target (nothing after it, e.g. ChatML's newline)
        assert enc.input_ids[-1] == enc.labels[-1] == tok.eos_token_id, case
    before = eos_logprob_at_reply_end(recipe)
    recipe.train()
    after = eos_logprob_at_reply_end(recipe)
    recipe.cleanup()
    assert after > before + 1.0, (case, before, after)
    assert (tmp_path / "export" / "config.json").is_file()
