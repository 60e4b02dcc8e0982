"""Rollout helpers: response masks with early EOS, padding sides, log-probs from logits."""

import torch

from ppo.rollout import Rollout, ends_with_eos, logprobs_from_logits, pad_rows, response_mask

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


def test_padded_batch_scores_each_row_as_alone():
    """Left-padded prompts of different lengths, responses with early EOS: log-probs and values of the
    valid response tokens equal those of each row run alone without padding."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from ppo.rollout import response_logits, response_values

    torch.manual_seed(0)
    cfg = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, pad_token_id=PAD, eos_token_id=EOS)  # fmt: skip
    lm = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    critic = LlamaForSequenceClassification(LlamaConfig(**cfg, num_labels=1)).eval()
    prompts = [[5, 6, 7, 8], [9, 10]]
    responses = torch.tensor([[11, 12, EOS, PAD], [13, EOS, PAD, PAD]])
    pids, pmask = pad_rows(prompts, PAD, "left", torch.device("cpu"))
    rmask = response_mask(responses, EOS, True)
    ids, mask = torch.cat([pids, responses], 1), torch.cat([pmask, rmask], 1)
    with torch.no_grad():
        lp = logprobs_from_logits(response_logits(lm, ids, mask, pids.shape[1]), responses, 1.0)
        v = response_values(critic, critic.score, ids, mask, pids.shape[1])
        for b, prompt in enumerate(prompts):
            n = int(rmask[b].sum())
            alone = torch.tensor([prompt + responses[b, :n].tolist()])
            ones = torch.ones_like(alone, dtype=torch.bool)
            lp_alone = logprobs_from_logits(
                response_logits(lm, alone, ones, len(prompt)), responses[b : b + 1, :n], 1.0
            )
            v_alone = response_values(critic, critic.score, alone, ones, len(prompt))
            torch.testing.assert_close(lp[b, :n], lp_alone[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v[b, :n], v_alone[0], atol=1e-5, rtol=1e-5)
