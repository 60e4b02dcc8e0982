import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from core.evaluate import (
    Policy,
    Sampling,
    _run_config,
    compare,
    prompt_text,
    sample_responses,
    sequence_logprobs,
    settings_from,
)
from core.models import load_tokenizer
from data.formats import Message
from data.templates import PromptFormatter


def tiny_lm(vocab_size: int = 64, pad_id: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, pad_token_id=pad_id)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_sequence_logprobs_match_each_sequence_alone():
    """Batched (prompts left-padded, responses right-padded, LM head on the response only) equals
    sum_t log softmax(logits / T)[y_t] of each unpadded sequence run by itself."""
    model = tiny_lm()
    g = torch.Generator().manual_seed(1)

    def row(n):
        return torch.randint(3, 64, (n,), generator=g).tolist()

    prompts = [row(5), row(2), row(7)]
    responses = [row(3), row(6), row(1)]
    T = 0.7
    got = sequence_logprobs(model, prompts, responses, pad_id=0, temperature=T, batch_size=2)
    want = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            logits = model(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1 : -1] / T  # [A, V]
            want.append(float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None]).sum()))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-4)


def test_no_prompts_is_an_error_before_any_model_loads(tmp_path):
    # IMDB with fractions.eval=0 gave no prompts: three models loaded, then a ZeroDivisionError
    sampling = Sampling(4, 0, 1.0, 1.0, 0, False)
    with pytest.raises(ValueError, match="nothing to compare: 0 prompts"):
        compare(tmp_path / "none", tmp_path / "none", tmp_path / "none", [], None, template={}, sampling=sampling,
                samples_per_prompt=2, seed=0, max_prompt_len=8, num_report_samples=1)  # fmt: skip


def test_sample_responses_are_prompt_major_and_stop_after_eos():
    tok = load_tokenizer("builtin", None, trust_remote_code=False)
    model = tiny_lm(len(tok), tok.pad_token_id)
    bias = torch.zeros(len(tok))  # EOS about 3 times in 10 per token, so some responses stop early
    bias[tok.eos_token_id] = math.log(0.43 * (len(tok) - 1))
    model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    template = dict(chat_template="never", system="{content}", user="{content}", assistant="{content}")
    policy = Policy(model, tok, PromptFormatter(tok, **template))
    sampling = Sampling(max_new_tokens=8, min_new_tokens=0, temperature=1.0, top_p=1.0, top_k=0,
                        prepack_weights=True)  # fmt: skip
    prompts = [
        (Message("user", "count to three"),),
        (Message("user", "a much longer prompt than the first one"),),
    ]
    kw = dict(n=3, seed=0, max_prompt_len=64, batch_size=4)
    rows, responses = sample_responses(policy, prompts, sampling, **kw)
    assert len(rows) == len(responses) == 6
    assert rows[0] == rows[2] != rows[3] == rows[5]  # row i * n + j: sample j of prompt i
    for r in responses:
        assert 1 <= len(r) <= 8
        assert tok.eos_token_id not in r[:-1]  # cut right after the first EOS
        assert len(r) == 8 or r[-1] == tok.eos_token_id  # a shorter one ended with it
    assert any(len(r) < 8 for r in responses)  # the cut was exercised
    again = sample_responses(policy, prompts, sampling, **kw)
    assert again == (rows, responses)  # seeded
    assert all("forward" not in vars(m) for m in model.modules())  # the prepacked layers were given back


def test_held_out_conversations_are_sampled_whole(tmp_path, shared_data):
    """`rlhf evaluate` (and the pipeline's report) sample a held-out multi-turn prompt with its system
    message and earlier turns, formatted as PPO formats it; before, only its last user turn was kept."""
    rows = [{"messages": [{"role": "system", "content": "be brief ."}, {"role": "user", "content": f"hi {i}"},
                          {"role": "assistant", "content": "hello"}, {"role": "user", "content": "count to three"}]}
            for i in range(10)]  # fmt: skip
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = OmegaConf.create(OmegaConf.to_container(_run_config(tmp_path / "no-run" / "export")))
    cfg.data_root, cfg.data.path, cfg.data.eval_path = str(shared_data), str(data), str(data)
    prompts = settings_from(cfg, judge="sentiment")["prompts"]
    assert len(prompts) == 10 and [m.role for m in prompts[0]] == ["system", "user", "assistant", "user"]
    assert prompt_text(prompts[0]) == "system: be brief .\nuser: hi 0\nassistant: hello\nuser: count to three"
    assert prompt_text((Message("user", "count to three"),)) == "count to three"

    tok = load_tokenizer("builtin", None, trust_remote_code=False)
    formatter = PromptFormatter(tok, **cfg.data.template)
    policy = Policy(tiny_lm(len(tok), tok.pad_token_id), tok, formatter)
    sampling = Sampling(max_new_tokens=2, min_new_tokens=0, temperature=1.0, top_p=1.0, top_k=0,
                        prepack_weights=False)  # fmt: skip
    rows_ids, _ = sample_responses(policy, prompts[:1], sampling, n=1, seed=0, max_prompt_len=512)
    assert rows_ids == [formatter.encode_prompt(prompts[0])]
    assert len(rows_ids[0]) > len(formatter.encode_prompt(prompts[0][-1:]))  # more than the last turn


def test_run_config_is_the_runs_own_with_later_keys_from_the_defaults(tmp_path):
    """`rlhf evaluate` on an export whose run predates a key (here rollout.prepack_weights) reads
    the run's own settings and the key's default from conf/ppo.yaml; a run that set it keeps its value."""
    defaults = _run_config(tmp_path / "no-run" / "export")  # no saved config: conf/ppo.yaml
    assert defaults.rollout.prepack_weights is True
    run = OmegaConf.to_container(defaults)
    run["rollout"]["temperature"] = 0.5
    del run["rollout"]["prepack_weights"]
    run["rollout"]["since_removed"] = 1  # a key the schema no longer has
    (tmp_path / "old" / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(run), tmp_path / "old" / ".hydra" / "config.yaml")
    old = _run_config(tmp_path / "old" / "export")
    assert old.rollout.temperature == 0.5 and old.rollout.prepack_weights is True
    assert old.rollout.since_removed == 1
    run["rollout"]["prepack_weights"] = False
    (tmp_path / "new").mkdir()
    OmegaConf.save(OmegaConf.create(run), tmp_path / "new" / "pipeline_stage_config.yaml")
    new = _run_config(tmp_path / "new" / "export")
    assert new.rollout.prepack_weights is False
    assert settings_from(new)["sampling"] == Sampling(
        defaults.rollout.max_new_tokens, defaults.rollout.min_new_tokens, 0.5, defaults.rollout.top_p,
        defaults.rollout.top_k, prepack_weights=False,
    )  # fmt: skip
    assert settings_from(new)["trust_remote_code"] is False  # the run's actor setting, off by default
    run["actor"]["trust_remote_code"] = True
    OmegaConf.save(OmegaConf.create(run), tmp_path / "new" / "pipeline_stage_config.yaml")
    assert settings_from(_run_config(tmp_path / "new" / "export"))["trust_remote_code"] is True


def test_the_command_runs_an_exports_code_only_with_the_flag(tmp_path, monkeypatch):
    """`rlhf evaluate` trusts remote code on --trust-remote-code alone, even when the run config beside
    the export (here: actor.trust_remote_code=true) says its PPO run did."""
    import json

    from core import evaluate

    run = OmegaConf.to_container(_run_config(tmp_path / "no-run" / "export"))
    run["actor"]["trust_remote_code"] = True
    (tmp_path / "run" / "export").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(run), tmp_path / "run" / "pipeline_stage_config.yaml")
    (tmp_path / "run" / "export" / "export_info.json").write_text(json.dumps({"ref": str(tmp_path / "sft")}))
    seen = []
    monkeypatch.setattr(evaluate, "compare", lambda *a, **kw: seen.append(kw["trust_remote_code"]) or {})
    evaluate.cli([str(tmp_path / "run" / "export")])
    evaluate.cli([str(tmp_path / "run" / "export"), "--trust-remote-code"])
    assert seen == [False, True]


def test_the_command_samples_as_the_pipelines_report_by_default(tmp_path, monkeypatch):
    """`rlhf evaluate EXPORT` repeats the report's evaluation: its sampling defaults are the `eval` keys of
    the pipeline run that wrote the export, else conf/pipeline.yaml's."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from core import evaluate, pipeline  # noqa: F401 (pipeline registers the schema conf/pipeline.yaml names)

    with initialize_config_dir(str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
        report = compose("pipeline").eval
    (tmp_path / "run" / "export").mkdir(parents=True)
    (tmp_path / "run" / "export" / "export_info.json").write_text(json.dumps({"ref": str(tmp_path / "sft")}))
    seen = []
    monkeypatch.setattr(evaluate, "compare", lambda *a, **kw: seen.append(kw) or {})
    evaluate.cli([str(tmp_path / "run" / "export")])
    evaluate.cli([str(tmp_path / "run" / "export"), "--samples-per-prompt", "2"])
    for key in ("samples_per_prompt", "seed", "num_report_samples"):
        assert seen[0][key] == report[key], key
    assert seen[1]["samples_per_prompt"] == 2
    # an export of a pipeline run (<run>/ppo/export) takes that run's eval settings, which a pipeline
    # experiment may have changed (imdb_sentiment: 2 samples per prompt)
    run = tmp_path / "pipeline"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"eval": {"samples_per_prompt": 2, "seed": 7, "enabled": True}}),
                   run / ".hydra" / "config.yaml")  # fmt: skip
    (run / "ppo" / "export").mkdir(parents=True)
    (run / "ppo" / "export" / "export_info.json").write_text(json.dumps({"ref": str(run / "sft" / "export")}))
    evaluate.cli([str(run / "ppo" / "export")])
    evaluate.cli([str(run / "ppo" / "export"), "--seed", "1"])
    assert (seen[2]["samples_per_prompt"], seen[2]["seed"], seen[2]["num_report_samples"]) == (
        2,
        7,
        report.num_report_samples,
    )
    assert seen[3]["seed"] == 1
