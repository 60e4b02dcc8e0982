import copy
import os

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from core.models import (
    PAD_TOKEN,
    ModelError,
    add_lora,
    load_model,
    load_tokenizer,
    prepacked_linears,
    resolve_precision,
    train_tokenizer,
)


def test_builtin_tokenizer_keeps_its_own_pad():
    tok = load_tokenizer("builtin", None, trust_remote_code=False)
    assert tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id


def test_trained_tokenizer_round_trips_and_saves(tmp_path):
    texts = ["This movie was a delight from start to finish.", "A dull, overlong film; I left early."] * 50
    tok = train_tokenizer(texts, vocab_size=300)
    assert len(tok) <= 300 and tok.pad_token_id not in (tok.eos_token_id, tok.bos_token_id)
    ids = tok("This film was dull")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == "This film was dull"
    assert (
        tok.decode(tok("Ünïcödé 🙂")["input_ids"], skip_special_tokens=True) == "Ünïcödé 🙂"
    )  # byte-level: no unknowns
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("This film was dull")["input_ids"] == ids and again.eos_token == "</s>"
    with pytest.raises(ModelError, match="only the sft stage"):
        load_tokenizer("train", None, trust_remote_code=False)


@pytest.mark.parametrize(
    "name, expected_pad",
    [
        ("gpt2", PAD_TOKEN),
        ("llama2-sentencepiece", "<unk>"),
        ("qwen2", "<|endoftext|>"),
        ("gpt-neox-pythia", "<|padding|>"),
    ],
)
def test_real_tokenizers_get_a_pad_token_that_is_not_eos(shared_data, name, expected_pad):
    tok = load_tokenizer(str(shared_data / "tokenizers" / name), None, trust_remote_code=False)
    assert tok.pad_token == expected_pad
    assert tok.pad_token_id != tok.eos_token_id


def test_new_pad_token_grows_the_embeddings(shared_data):
    tok = load_tokenizer(str(shared_data / "tokenizers" / "gpt2"), None, trust_remote_code=False)
    raw = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2")
    assert len(tok) == len(raw) + 1
    model = load_model(str(shared_data / "models" / "stories260K-hf"), {}, tok, "fp32")
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id


def test_fresh_model_from_arch_uses_the_tokenizer_size():
    tok = load_tokenizer("builtin", None, trust_remote_code=False)
    model = load_model(None, {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                  "num_attention_heads": 2}, tok, "fp32")  # fmt: skip
    assert model.config.vocab_size == len(tok) and model.config.eos_token_id == tok.eos_token_id
    with pytest.raises(ModelError, match="model_type"):
        load_model(None, {"hidden_size": 32}, tok, "fp32")


def test_clear_errors_for_bad_model_settings(tmp_path):
    with pytest.raises(ModelError, match="cannot load a tokenizer from"):
        load_tokenizer(str(tmp_path / "missing"), None, trust_remote_code=False)
    with pytest.raises(ModelError, match="nothing to load a tokenizer from"):
        load_tokenizer(None, None, trust_remote_code=False)
    with pytest.raises(ModelError, match="train.precision must be"):
        resolve_precision("fp8")
    assert resolve_precision("auto") in ("fp32", "bf16", "fp16")


def test_disable_dropout_sets_every_dropout_to_zero():
    from transformers import GPT2Config, GPT2LMHeadModel

    from core.models import disable_dropout

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    disable_dropout(model)
    model.train()
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_disable_dropout_also_zeroes_the_attention_rate_of_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.models import disable_dropout

    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, attention_dropout=0.5, attn_implementation="eager")  # fmt: skip
    model = LlamaForCausalLM(config).train()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    torch.manual_seed(0)
    assert not torch.equal(model(ids).logits, model(ids).logits)  # a plain float rate, no nn.Dropout
    disable_dropout(model)
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert model.config.attention_dropout == 0.5  # the export keeps the model's own config


def test_forward_flops_counts_the_layers_and_attention_of_the_config():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from core.models import forward_flops

    d, ff, layers, kv = 32, 64, 3, 16  # 4 heads of 8, 2 key-value heads
    config = LlamaConfig(vocab_size=50, hidden_size=d, intermediate_size=ff, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1)  # fmt: skip
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * ff + 2 * d  # q, o; k, v; the MLP; two norms
    weights = layers * per_layer + d + d  # the final norm and the score head; embeddings excluded
    assert forward_flops(LlamaForSequenceClassification(config)) == (2.0 * weights, 4.0 * layers * d)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
def test_prepacked_linears_generate_the_same_and_give_the_layers_back():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, pad_token_id=0)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(3, 64, (4, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded prompt

    def greedy():
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=0)  # fmt: skip

    with torch.no_grad():
        plain = greedy()
        with prepacked_linears(model, rows=len(ids)) as n:
            assert all("forward" in vars(m) for m in model.modules() if type(m) is torch.nn.Linear)
            packed = greedy()
    assert n == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the LM head
    assert torch.equal(packed.sequences, plain.sequences)
    for a, b in zip(packed.logits, plain.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not any("forward" in vars(m) for m in model.modules())  # nn.Linear.forward again
    with pytest.raises(KeyError), prepacked_linears(model, rows=4):
        raise KeyError("an error inside")
    assert not any("forward" in vars(m) for m in model.modules())
    model.lm_head.weight.data = torch.empty(0)  # what ZeRO-3 leaves of a partitioned weight
    with prepacked_linears(model, rows=4) as n:
        assert n == 2 * 7 and "forward" not in vars(model.lm_head)
    down = model.model.layers[0].mlp.down_proj
    own = down.forward = down.forward  # a forward of its own, as accelerate's hooks set: left alone
    with prepacked_linears(model, rows=4) as n:
        assert n == 2 * 7 - 1 and down.forward is own
    assert down.forward is own
    with prepacked_linears(model.to(torch.bfloat16), rows=4) as n:
        assert n == 0  # fp32 only


def test_prepacked_linears_give_back_the_layers_packed_before_a_packing_fails(monkeypatch):
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4))  # fmt: skip
    reorder, calls = torch.ops.mkldnn._reorder_linear_weight, []

    def fails_third(weight, rows):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("oneDNN could not pack")
        return reorder(weight, rows)

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", fails_third)
    with pytest.raises(RuntimeError, match="could not pack"), prepacked_linears(model, rows=4):
        pass
    assert len(calls) == 3 and not any("forward" in vars(m) for m in model.modules())


def test_weights_load_from_safetensors_only(tmp_path):
    """A checkpoint saved as safetensors loads; the same weights as a pickled pytorch_model.bin are refused
    before anything is unpickled."""
    tok = load_tokenizer("builtin", None, trust_remote_code=False)
    arch = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2}  # fmt: skip
    model = load_model(None, arch, tok, "fp32")
    model.save_pretrained(tmp_path / "safe")
    again = load_model(str(tmp_path / "safe"), {}, tok, "fp32")
    torch.testing.assert_close(again.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    model.config.save_pretrained(tmp_path / "pickled")  # the old layout: config + a pickled state dict
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    loads = []
    real_load = torch.load
    torch.load = lambda *a, **kw: loads.append(a) or real_load(*a, **kw)
    try:
        with pytest.raises(ModelError, match="only safetensors weights are loaded"):
            load_model(str(tmp_path / "pickled"), {}, tok, "fp32")
    finally:
        torch.load = real_load
    assert loads == []

    # online, a hub repo without safetensors is not swapped for a conversion bot's branch; a wrong path
    # is named without the pickle hint
    from transformers import AutoModelForCausalLM

    seen, before = [], os.environ.get("DISABLE_SAFETENSORS_CONVERSION")

    def fake(*args, **kwargs):
        seen.append(os.environ.get("DISABLE_SAFETENSORS_CONVERSION"))
        raise OSError("no such repo")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AutoModelForCausalLM, "from_pretrained", fake)
        with pytest.raises(ModelError) as err:
            load_model("org/not-here", {}, tok, "fp32")
    assert seen == ["1"] and os.environ.get("DISABLE_SAFETENSORS_CONVERSION") == before  # restored
    assert "safetensors" not in str(err.value) and "no such repo" in str(err.value)


def test_a_lora_export_loads_as_its_adapters_merged_into_the_base(tmp_path, monkeypatch):
    """The layout `export_model` writes for a LoRA run (adapter + tokenizer, base/ when the base was built
    from a config) loads as the model that run trained, for the next stage (PPO from a LoRA SFT export)."""
    tok = load_tokenizer("builtin", None, trust_remote_code=False)
    arch = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2}  # fmt: skip
    torch.manual_seed(0)
    lora = add_lora(load_model(None, arch, tok, "fp32"), r=4, alpha=8, dropout=0.0, target_modules="all-linear",
                    task_type="CAUSAL_LM")  # fmt: skip
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # trained adapters: not the identity
    export = tmp_path / "export"
    lora.save_pretrained(export)
    tok.save_pretrained(export)
    copy.deepcopy(lora).unload().save_pretrained(export / "base")
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        want = lora(input_ids=ids).logits
        base = copy.deepcopy(lora).unload()(input_ids=ids).logits
        got = load_model(str(export), {}, tok, "fp32")(input_ids=ids).logits
        critic = load_model(str(export), {}, tok, "fp32", head="score")  # a critic from a LoRA SFT export
    assert (want - base).abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert type(critic).__name__ == "LlamaForSequenceClassification"
    # an architecture transformers has no class for (custom code): a clear error, not a KeyError
    from core import models as core_models

    monkeypatch.setitem(core_models.MAPPINGS, "lm", {})
    with pytest.raises(ModelError, match="a LoRA export of a LlamaConfig model.*peft.merge_on_export=true"):
        load_model(str(export), {}, tok, "fp32")
    monkeypatch.undo()
    (export / "adapter_model.safetensors").rename(export / "adapter_model.bin")
    with pytest.raises(ModelError, match="a peft adapter without adapter_model.safetensors"):
        load_model(str(export), {}, tok, "fp32")


def test_a_lora_reward_model_on_an_sft_export_loads_with_its_trained_score(tmp_path):
    """The reward stage's usual recipe with peft=lora: the base is a full SFT export (a causal LM, loadable
    from its path, so the export has no base/) and merge_on_export is off. PPO loads it as the reward
    model and the critic's start: the base gets a one-label head for the adapter's trained score."""
    tok = load_tokenizer("builtin", None, trust_remote_code=False)
    arch = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2}  # fmt: skip
    torch.manual_seed(0)
    sft = tmp_path / "sft"
    load_model(None, arch, tok, "fp32").save_pretrained(sft)
    tok.save_pretrained(sft)
    rm = add_lora(load_model(str(sft), {}, tok, "fp32", head="score"), r=4, alpha=8, dropout=0.0,
                  target_modules="all-linear", task_type="SEQ_CLS")  # fmt: skip
    with torch.no_grad():
        for name, p in rm.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(0, 0.5)  # trained adapters and score head
    export = tmp_path / "export"
    rm.save_pretrained(export)
    tok.save_pretrained(export)
    assert not (export / "base").exists() and not (export / "merged").exists()
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        want = rm(input_ids=ids).logits
        got = load_model(str(export), {}, tok, "fp32", head="score")(input_ids=ids).logits
    assert got.shape == (1, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_lora_export_of_a_base_whose_vocabulary_grew_loads(tmp_path):
    """A tokenizer given a pad token it lacked (GPT-2) grows the base's embeddings by a row before LoRA:
    peft then saves the whole embedding and output matrices in the adapter, which need a base of the same
    size to load into (the export has no base/: the base is loadable from its path)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer("builtin", None, trust_remote_code=False)
    torch.manual_seed(0)
    base = tmp_path / "base"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok) - 1, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(base)  # fmt: skip
    model = load_model(str(base), {}, tok, "fp32")
    assert model.get_input_embeddings().weight.shape[0] == len(tok)  # grown for the tokenizer
    lora = add_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    export = tmp_path / "export"
    lora.save_pretrained(export)
    tok.save_pretrained(export)
    ids = torch.tensor([[1, 5, 9, len(tok) - 1]])  # the new last row too
    with torch.no_grad():
        want = lora(input_ids=ids).logits
        got = load_model(str(export), {}, tok, "fp32")(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_model_loading_mistakes_are_model_errors_naming_the_setting(tmp_path):
    import json

    tok = load_tokenizer("builtin", None, trust_remote_code=False)
    with pytest.raises(ModelError, match="model.arch.vocab_size is set from the tokenizer"):
        load_model(None, {"model_type": "llama", "vocab_size": 99}, tok, "fp32")
    with pytest.raises(ModelError, match="model.arch: .*lama"):
        load_model(None, {"model_type": "lama"}, tok, "fp32")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "not_a_model"}))
    with pytest.raises(ModelError, match="model.name_or_path: cannot load"):
        load_model(str(unknown), {}, tok, "fp32")
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({
        "model_type": "mycustom", "auto_map": {"AutoConfig": "c.MyConfig", "AutoModelForCausalLM": "m.MyModel"}
    }))  # fmt: skip
    with pytest.raises(ModelError, match="model.trust_remote_code=true"):
        load_model(str(custom), {}, tok, "fp32")


def test_a_lora_adapter_from_elsewhere_merges_without_a_tokenizer_at_its_base_revision(tmp_path, monkeypatch):
    from core import models as core_models
    from core.models import merged_adapter_export

    tok = load_tokenizer("builtin", None, trust_remote_code=False)
    torch.manual_seed(0)
    base = tmp_path / "base_model"  # a base loadable by path, not an export's own base/
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(base)  # fmt: skip
    lora = add_lora(LlamaForCausalLM.from_pretrained(base), r=2, alpha=4, dropout=0.0, target_modules="all-linear",
                    task_type="CAUSAL_LM", revision="v1.0")  # fmt: skip
    lora.save_pretrained(tmp_path / "adapter")  # no tokenizer beside it (transformers 5: ValueError)
    asked = []
    load = core_models.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(core_models.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **kw: asked.append(kw.get("revision")) or load(*a, **kw))  # fmt: skip
    config, state = merged_adapter_export(str(tmp_path / "adapter"), trust_remote_code=False)
    assert asked == ["v1.0"]  # the base at the revision the LoRA run loaded, not the hub's newest
    assert config.vocab_size == len(tok) and state


def test_onednn_products_give_nn_linears_outputs_and_gradients():
    from core.models import OneDNNLinear, has_onednn_linear, use_onednn_products

    if not has_onednn_linear():
        pytest.skip("this torch has no oneDNN linear")
    tok = load_tokenizer("builtin", None, trust_remote_code=False)
    arch = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4}  # fmt: skip
    torch.manual_seed(0)
    plain_model = load_model(None, arch, tok, "fp32")
    model = copy.deepcopy(plain_model)
    n = use_onednn_products(model)
    assert (
        n == 2 * 7 + 1 and sum(type(m) is OneDNNLinear for m in model.modules()) == n
    )  # 7 per layer, lm_head
    assert model.state_dict().keys() == plain_model.state_dict().keys()
    ids = torch.randint(3, len(tok), (3, 11))
    for m in (plain_model, model):
        m.zero_grad()
        m(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain_model(input_ids=ids).logits)
    for (name, a), b in zip(model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    # a bias, a 1-d input, and an input that needs no gradient (a frozen embedding's output)
    layer = torch.nn.Linear(8, 5)
    fast = copy.deepcopy(layer)
    fast.__class__ = OneDNNLinear
    for x in (torch.randn(8), torch.randn(2, 3, 8)):
        torch.testing.assert_close(fast(x), layer(x))
    x = torch.randn(4, 8, requires_grad=True)
    fast(x).square().sum().backward()
    layer(x.detach().requires_grad_()).square().sum().backward()
    torch.testing.assert_close(fast.bias.grad, layer.bias.grad)
    torch.testing.assert_close(fast.weight.grad, layer.weight.grad)
    # bf16 (or any other dtype) runs nn.Linear's own product
    assert fast.to(torch.bfloat16)(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    # generation's prepacking still takes these layers, and gives them back
    with prepacked_linears(model, 3) as packed:
        assert packed == n
    assert all("forward" not in vars(m) for m in model.modules())
