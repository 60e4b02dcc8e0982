"""Rollout helpers: response masks with early EOS, padding sides, log-probs from logits, packed rows."""

import pytest
import torch

from core.models import positions_from_mask
from ppo.rollout import (
    Rollout,
    Sequences,
    ends_with_eos,
    logprobs_from_logits,
    pad_rows,
    response_logprobs,
    response_mask,
    response_values,
    retokenised,
    sequence_scores,
)

EOS, PAD = 2, 0


def test_response_mask_keeps_tokens_up_to_and_including_the_first_eos():
    ids = torch.tensor([[5, 6, EOS, PAD, PAD], [5, EOS, 7, EOS, PAD], [5, 6, 7, 8, 9]])
    mask = response_mask(ids, EOS, stop_at_eos=True)
    assert mask.tolist() == [[True, True, True, False, False], [True, True, False, False, False], [True] * 5]
    assert ends_with_eos(ids, mask, EOS).tolist() == [True, True, False]
    assert response_mask(ids, EOS, stop_at_eos=False).all()  # fixed-length rollouts keep everything


def test_pad_rows_left_and_right():
    ids, mask = pad_rows([[1, 2, 3], [4]], PAD, "left", torch.device("cpu"))
    assert ids.tolist() == [[1, 2, 3], [PAD, PAD, 4]] and mask.tolist() == [[True] * 3, [False, False, True]]
    ids, mask = pad_rows([[1, 2, 3], [4]], PAD, "right", torch.device("cpu"))
    assert ids.tolist() == [[1, 2, 3], [4, PAD, PAD]] and mask.tolist() == [[True] * 3, [True, False, False]]


def test_logprobs_from_logits_at_a_temperature():
    logits = torch.tensor([[[0.0, 2.0, 0.0]]])  # [B=1, A=1, V=3]
    lp = logprobs_from_logits(logits, torch.tensor([[1]]), temperature=2.0)
    expected = torch.log_softmax(torch.tensor([0.0, 1.0, 0.0]), -1)[1]
    assert torch.allclose(lp, expected.reshape(1, 1))


def test_rollout_select_and_sequence():
    B, P, A = 3, 2, 4
    t = lambda *shape: torch.arange(torch.Size(shape).numel()).reshape(shape).float()  # noqa: E731
    r = Rollout(t(B, P).long(), torch.ones(B, P, dtype=torch.bool), t(B, A).long(), torch.ones(B, A, dtype=torch.bool),
                *(t(B, A) for _ in range(3)), t(B), t(B), *(t(B, A) for _ in range(4)))  # fmt: skip
    sub = r.select(torch.tensor([2, 0]))
    assert sub.scores.tolist() == [2.0, 0.0] and sub.response_ids.shape == (2, A)
    ids, mask = sub.sequence
    assert ids.shape == (2, P + A) and mask.all()


def _tiny_models():
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, pad_token_id=PAD, eos_token_id=EOS)  # fmt: skip
    lm = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    critic = LlamaForSequenceClassification(LlamaConfig(**cfg, num_labels=1)).eval()
    return lm, critic


# one response without EOS (full width), two ended early
PROMPTS = [[5, 6, 7, 8], [9, 10], [11]]
RESPONSES = torch.tensor([[11, 12, 16, 17], [13, EOS, PAD, PAD], [14, 15, EOS, PAD]])


def _batch(pack: bool) -> Sequences:
    pids, pmask = pad_rows(PROMPTS, PAD, "left", torch.device("cpu"))
    rmask = response_mask(RESPONSES, EOS, True)
    ids, mask = torch.cat([pids, RESPONSES], 1), torch.cat([pmask, rmask], 1)
    return Sequences.of(ids, mask, pids.shape[1], PAD, pack)


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_batch_scores_each_row_as_alone(pack):
    """Left-padded prompts of different lengths, responses with early EOS, padded or packed rows:
    log-probs and values of the valid response tokens equal those of each row run alone."""
    lm, critic = _tiny_models()
    seqs = _batch(pack)
    assert (seqs.packed is not None) == pack
    if pack:  # 8 + 4 + 4 valid tokens: 2 rows of 8 (16 slots of 24), or 1 of 16: the narrower rows
        assert seqs.packed.input_ids.shape == (2, 8)
    with torch.no_grad():
        lp, ent = response_logprobs(lm, seqs, RESPONSES, 1.0, entropy=True)
        v = response_values(critic, critic.score, seqs)
        scores = sequence_scores(critic, critic.score, seqs)
        for b, prompt in enumerate(PROMPTS):
            n = int(seqs.response_mask[b].sum())
            alone_ids = torch.tensor([prompt + RESPONSES[b, :n].tolist()])
            alone = Sequences(alone_ids, torch.ones_like(alone_ids, dtype=torch.bool), len(prompt))
            lp_alone, ent_alone = response_logprobs(lm, alone, RESPONSES[b : b + 1, :n], 1.0, entropy=True)
            v_alone = response_values(critic, critic.score, alone)
            torch.testing.assert_close(lp[b, :n], lp_alone[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ent[b, :n], ent_alone[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v[b, :n], v_alone[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                scores[b], sequence_scores(critic, critic.score, alone)[0], atol=1e-5, rtol=1e-5
            )


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_bf16_logits_give_log_probs_and_entropy_in_fp32_at_the_temperature(pack):
    """A bf16 model's logits are divided by the temperature in fp32, for the entropy as for the log-probs
    (dividing in bf16 first rounds each logit to 8 bits of mantissa: entropy off by 0.013 here)."""
    lm, _ = _tiny_models()
    with torch.no_grad():
        lm.lm_head.weight.mul_(30)  # logits up to about 10, as a trained model's
    lm = lm.to(torch.bfloat16)
    seqs, T = _batch(pack), 0.7
    with torch.no_grad():
        lp, ent = response_logprobs(lm, seqs, RESPONSES, T, entropy=True)
        logits = lm(input_ids=seqs.ids, attention_mask=seqs.mask.long(), position_ids=positions_from_mask(seqs.mask),
                    use_cache=False).logits[:, seqs.prompt_width - 1 : -1].float()  # fmt: skip
    valid = seqs.response_mask
    logp = torch.log_softmax(logits / T, -1)
    want_ent = -(logp.exp() * logp).sum(-1)
    want_lp = logp.gather(-1, RESPONSES[..., None]).squeeze(-1)
    torch.testing.assert_close(ent[valid], want_ent[valid], atol=1e-4, rtol=0)
    torch.testing.assert_close(lp[valid], want_lp[valid], atol=1e-4, rtol=0)


def test_a_micro_batch_with_little_padding_stays_padded():
    """Packing must save at least MIN_SAVING of the token slots; else wider rows only add attention."""
    ids = torch.arange(1, 13).reshape(3, 4)
    full = torch.ones_like(ids, dtype=torch.bool)
    assert Sequences.of(ids, full, 2, PAD, pack=True).packed is None
    half = full.clone()
    half[:, :2] = False  # half of every row is padding: 3 x 2 tokens fit in 2 rows of 4
    seqs = Sequences.of(ids, half, 2, PAD, pack=True)
    assert seqs.packed.input_ids.shape == (2, 4)
    assert seqs.packed.input_ids.tolist() == [[3, 4, 7, 8], [11, 12, PAD, PAD]]


def test_packed_rows_give_the_padded_gradients():
    """The PPO update backpropagates through packed rows: same gradients as through padded ones."""
    lm, critic = _tiny_models()
    grads = []
    for pack in (False, True):
        lm.zero_grad()
        seqs = _batch(pack)
        lp, _ = response_logprobs(lm, seqs, RESPONSES, 1.0)
        v = response_values(critic, critic.score, seqs)
        ((lp + v) * seqs.response_mask).sum().backward()
        grads.append([p.grad.clone() for p in (*lm.parameters(), *critic.parameters())])
        critic.zero_grad()
    for padded, packed in zip(*grads):
        torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-4)


def test_packing_check_refuses_logits_that_are_not_the_output_layer_on_the_last_hidden_state():
    """Gathered-position logits are the output layer on hidden_states[-1]: a model that caps or scales its
    logits (Gemma 2's final_logit_softcapping) would train on other numbers, so setup refuses to pack it."""
    from core.models import ModelError, check_packing

    lm, _ = _tiny_models()
    cpu = torch.device("cpu")
    check_packing(lm, [5, 6, 7], [8, 9], cpu, lm=True)  # a plain Llama passes

    class SoftCapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = lm

        def forward(self, **kwargs):
            out = lm(**kwargs)
            out.logits = 2.0 * torch.tanh(out.logits / 2.0)
            return out

    check_packing(SoftCapped(), [5, 6, 7], [8, 9], cpu)  # hidden states still kept apart
    with pytest.raises(ModelError, match="not its output embeddings.*set data.packing=false"):
        check_packing(SoftCapped(), [5, 6, 7], [8, 9], cpu, lm=True)


def _layout_on_rank(rank: int, port: int, out) -> None:
    import os

    from omegaconf import OmegaConf

    from ppo.train import PPORecipe

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    recipe = PPORecipe.__new__(PPORecipe)  # only what _sequences reads
    recipe.cfg = OmegaConf.create({"data": {"packing": True}})
    recipe.world, recipe.device, recipe.pad_id = 2, torch.device("cpu"), PAD
    ids = torch.arange(1, 13).reshape(3, 4)
    mask = torch.ones_like(ids, dtype=torch.bool)
    if rank == 0:
        mask[:, :2] = False  # rank 0's micro-batch would pack (half padding), rank 1's would not
    alone = Sequences.of(ids, mask, 2, PAD, pack=True).packed is not None
    out[rank] = (alone, recipe._sequences(ids, mask, 2).packed is not None)
    torch.distributed.destroy_process_group()


def test_ranks_agree_on_packed_or_padded_rows():
    """Under ZeRO-3 the packed LM path gathers the output layer once more: a rank that packs while
    another pads would desynchronise the collectives, so every rank takes the padded layout then."""
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    out = mp.Manager().dict()
    mp.spawn(_layout_on_rank, args=(free_port(), out), nprocs=2)
    assert out[0] == (True, False) and out[1] == (False, False)


def test_retokenised_rows_close_only_the_responses_that_ended_with_eos():
    from data.builtin.tokenizer import build_tokenizer
    from data.formats import Message
    from data.templates import PromptFormatter

    tok = build_tokenizer()
    f = PromptFormatter(
        tok, chat_template="never", system="{content}", user="{content} :", assistant=" {content}"
    )
    prompt = (Message("user", "review the pizza ."),)
    done, cut = retokenised(
        f, [prompt, prompt], ["the crust was great .", "the crust was"], [True, False], None
    )
    assert done[-1] == tok.eos_token_id and done.count(tok.eos_token_id) == 1
    assert cut == done[: len(cut)] and tok.eos_token_id not in cut  # the same start, no EOS made up
    (short,) = retokenised(f, [prompt], ["the crust was great ."], [True], 4)
    assert done[0] == tok.bos_token_id
    assert short == [tok.bos_token_id] + done[-3:]  # cut from the left after the BOS: the scored end stays


def test_sampling_stops_at_eos_but_not_before_min_new_tokens():
    """A policy that almost always says EOS: it ends every response at once, or right after
    rollout.min_new_tokens tokens; with stop_at_eos off every response runs to max_new_tokens."""
    from ppo.rollout import sample

    lm, _ = _tiny_models()
    bias = torch.zeros(lm.config.vocab_size)
    bias[EOS] = 30.0
    lm.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    pids, pmask = pad_rows(PROMPTS, PAD, "left", torch.device("cpu"))

    def run(min_new: int, stop: bool) -> torch.Tensor:
        torch.manual_seed(0)
        response, logprobs, _ = sample(lm, pids, pmask, max_new_tokens=6, min_new_tokens=min_new, temperature=1.0,
                                       top_p=1.0, top_k=0, eos_id=EOS, pad_id=PAD, stop_at_eos=stop,
                                       synced_gpus=False)  # fmt: skip
        assert logprobs.shape == response.shape
        return response

    assert run(0, True).tolist() == [[EOS]] * 3  # all stop at once: nothing after
    response = run(3, True)
    assert response.shape == (3, 4) and (response[:, :3] != EOS).all() and (response[:, 3] == EOS).all()
    assert response_mask(response, EOS, True).sum(1).tolist() == [4, 4, 4]
    assert run(0, False).shape == (3, 6)


def test_top_k_and_top_p_filter_the_sampling():
    """top_k=1, or a nucleus too small for a second token, leaves only the most likely token: greedy decoding."""
    from ppo.rollout import sample

    lm, _ = _tiny_models()
    pids, pmask = pad_rows(PROMPTS, PAD, "left", torch.device("cpu"))
    greedy = lm.generate(input_ids=pids, attention_mask=pmask.long(), do_sample=False, max_new_tokens=6,
                         eos_token_id=None, pad_token_id=PAD)[:, pids.shape[1] :]  # fmt: skip
    common = dict(max_new_tokens=6, min_new_tokens=0, temperature=1.0, eos_id=EOS, pad_id=PAD, stop_at_eos=False,
                  synced_gpus=False)  # fmt: skip
    torch.manual_seed(0)
    assert torch.equal(sample(lm, pids, pmask, top_p=1.0, top_k=1, **common)[0], greedy)
    torch.manual_seed(0)
    assert torch.equal(sample(lm, pids, pmask, top_p=1e-6, top_k=0, **common)[0], greedy)
    torch.manual_seed(0)
    assert not torch.equal(sample(lm, pids, pmask, top_p=1.0, top_k=0, **common)[0], greedy)  # plain sampling
