"""PPO losses and KL estimators against hand-computed numbers."""

import math

import pytest
import torch

from ppo.kl import KLController, kl_estimate
from ppo.loss import actor_loss, entropy_from_logits, kl_loss, policy_loss, value_loss


def test_policy_loss_by_hand():
    # token 1: ratio e^0.5 = 1.6487 > 1.2, A = +1 -> clipped: -min(1.6487, 1.2) = -1.2 (clip active)
    # token 2: ratio e^-0.5 = 0.6065 < 0.8, A = +2 -> -min(1.2131, 1.6) = -1.2131 (not clipped)
    # token 3: padding, ignored
    logp = torch.tensor([[0.5, -0.5, 3.0]])
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, 2.0, 5.0]])
    mask = torch.tensor([[True, True, False]])
    out = policy_loss(logp, old, adv, mask, clip_eps=0.2, num_tokens=2)
    assert out.loss.item() == pytest.approx((-1.2 - 2 * math.exp(-0.5)) / 2, rel=1e-6)
    assert out.clipfrac.item() == pytest.approx(0.5)
    assert out.approxkl.item() == pytest.approx(0.5 * (0.25 + 0.25) / 2)


def test_policy_loss_negative_advantage_clips_below():
    # ratio 0.5 < 0.8 with A = -1: -min(-0.5, -0.8) = 0.8 (the clip keeps pushing it down no further)
    out = policy_loss(torch.tensor([[math.log(0.5)]]), torch.zeros(1, 1), torch.tensor([[-1.0]]),
                      torch.tensor([[True]]), clip_eps=0.2, num_tokens=1)  # fmt: skip
    assert out.loss.item() == pytest.approx(0.8)
    assert out.clipfrac.item() == 1.0


def test_policy_loss_gradient_is_zero_where_clipped():
    logp = torch.tensor([[0.5, -0.5]], requires_grad=True)
    out = policy_loss(logp, torch.zeros(1, 2), torch.tensor([[1.0, 2.0]]), torch.ones(1, 2, dtype=torch.bool),
                      clip_eps=0.2, num_tokens=2)  # fmt: skip
    out.loss.backward()
    assert logp.grad[0, 0].item() == 0.0
    assert logp.grad[0, 1].item() == pytest.approx(-2 * math.exp(-0.5) / 2)


def test_policy_loss_stays_finite_off_the_mask():
    # padding after EOS: the sampling pass's log-prob of the forced pad token can be very low, and a
    # packed forward leaves 0 there; exp(0 - (-1000)) overflows, which must not reach loss or gradient
    logp = torch.tensor([[-0.1, 0.0]], requires_grad=True)
    old = torch.tensor([[-0.1, -1000.0]])
    mask = torch.tensor([[True, False]])
    out = policy_loss(logp, old, torch.tensor([[1.0, 1.0]]), mask, clip_eps=0.2, num_tokens=1)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-1.0)
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 1].item() == 0.0
    assert out.approxkl.item() == 0.0 and out.clipfrac.item() == 0.0


def test_value_loss_by_hand():
    # token 1: V 1.0, old 0.0, R 0.0: err 1.0; clipped V 0.2 -> 0.04; max 1.0
    # token 2: V 0.0, old 1.0, R 1.5: err 2.25; clipped V 0.8 -> 0.49; max 2.25
    v = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.0, 1.0]])
    ret = torch.tensor([[0.0, 1.5]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    out = value_loss(v, old, ret, mask, clip_eps=0.2, num_tokens=2)
    assert out.loss.item() == pytest.approx(0.5 * (1.0 + 2.25) / 2)
    assert out.clipfrac.item() == 0.0
    # token where the clipped error is the larger: V 2.0, old 0.0, R 3.0: err 1, clipped V 0.2 -> 7.84
    out = value_loss(torch.tensor([[2.0]]), torch.zeros(1, 1), torch.tensor([[3.0]]), torch.ones(1, 1, dtype=torch.bool),
                     clip_eps=0.2, num_tokens=1)  # fmt: skip
    assert out.loss.item() == pytest.approx(0.5 * 2.8**2)
    assert out.clipfrac.item() == 1.0
    # clip_eps=None: the plain error on that same token, where clipping would have given 7.84
    plain = value_loss(torch.tensor([[2.0]]), torch.zeros(1, 1), torch.tensor([[3.0]]),
                       torch.ones(1, 1, dtype=torch.bool), clip_eps=None, num_tokens=1)  # fmt: skip
    assert plain.loss.item() == pytest.approx(0.5 * 1.0**2)
    assert plain.clipfrac.item() == 0.0


def test_losses_are_the_same_when_the_batch_is_split():
    """Sum of per-rank losses with the global token normaliser == the whole-batch loss."""
    torch.manual_seed(0)
    logp, old, adv = torch.randn(6, 5), torch.randn(6, 5), torch.randn(6, 5)
    mask = torch.rand(6, 5) > 0.4
    n_tokens = mask.sum().item()
    whole = policy_loss(logp, old, adv, mask, 0.2, n_tokens).loss
    parts = sum(policy_loss(logp[s], old[s], adv[s], mask[s], 0.2, n_tokens / 3).loss
                for s in (slice(0, 2), slice(2, 4), slice(4, 6))) / 3  # fmt: skip
    assert parts.item() == pytest.approx(whole.item(), rel=1e-6)


def test_entropy_and_kl_loss():
    uniform = torch.zeros(1, 1, 4)
    assert entropy_from_logits(uniform).item() == pytest.approx(math.log(4))
    assert kl_loss(torch.tensor([[1.0, 3.0]]), torch.tensor([[True, False]]), num_tokens=1).item() == 1.0


def test_actor_loss_by_hand():
    surrogate = torch.tensor(0.5)
    mask = torch.tensor([[True, True, False]])
    entropy = torch.tensor([[1.0, 2.0, 100.0]])
    kl = torch.tensor([[0.2, 0.4, 100.0]])
    assert actor_loss(surrogate, mask, 2.0, None, 0.0, None, 0.0).item() == 0.5
    # the entropy bonus is subtracted: 0.5 - 0.1 x (1 + 2) / 2; the masked token counts for nothing
    assert actor_loss(surrogate, mask, 2.0, entropy, 0.1, None, 0.0).item() == pytest.approx(0.35)
    # KL as a loss is added with its coefficient: 0.5 + 0.5 x (0.2 + 0.4) / 2
    assert actor_loss(surrogate, mask, 2.0, None, 0.0, kl, 0.5).item() == pytest.approx(0.65)
    assert actor_loss(surrogate, mask, 2.0, entropy, 0.1, kl, 0.5).item() == pytest.approx(0.5)
    assert actor_loss(surrogate, mask, 2.0, entropy, 0.0, None, 0.5).item() == 0.5  # both off


def test_actor_loss_steps_raise_entropy_and_pull_towards_the_reference():
    """The signs: gradient steps on the bonus alone make the policy more uniform; on the k3 term alone
    they bring its log-probs to the reference's (zero advantages, so the surrogate is flat)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5).mul(3).requires_grad_()
    mask = torch.ones(2, 3, dtype=torch.bool)
    actions = torch.randint(5, (2, 3))
    ref = torch.log_softmax(torch.randn(2, 3, 5), -1).gather(-1, actions[..., None])[..., 0]

    def step(entropy_coef, kl_coef):
        logp = torch.log_softmax(logits, -1).gather(-1, actions[..., None])[..., 0]
        pl = policy_loss(logp, logp.detach(), torch.zeros(2, 3), mask, 0.2, 6)
        kl = kl_estimate(logp, ref, "k3") if kl_coef else None
        loss = actor_loss(pl.loss, mask, 6, entropy_from_logits(logits), entropy_coef, kl, kl_coef)
        logits.grad = None
        loss.backward()
        with torch.no_grad():
            logits.sub_(2.0 * logits.grad)
        return logp.detach()

    start = entropy_from_logits(logits).mean().item()
    for _ in range(20):
        step(0.5, 0.0)
    assert entropy_from_logits(logits).mean().item() > start + 0.1
    gap = (step(0.0, 1.0) - ref).abs().mean().item()
    for _ in range(100):
        last = step(0.0, 1.0)
    assert (last - ref).abs().mean().item() < gap / 4


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-2.0, -1.0]])  # log ratio +1, -1
    assert kl_estimate(logp, ref, "k1").tolist() == [[1.0, -1.0]]
    assert kl_estimate(logp, ref, "k2").tolist() == [[0.5, 0.5]]
    k3 = kl_estimate(logp, ref, "k3").tolist()[0]
    assert k3 == pytest.approx([math.exp(-1) - 1 + 1, math.exp(1) - 1 - 1])
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(logp, ref, "k4")


def test_k3_as_a_loss_never_pushes_away_from_the_reference():
    # d k3 / d log_ratio = 1 - exp(-log_ratio): negative below 0 (raise log pi towards the reference);
    # far below, past the overflow clamp, it may vanish but must not turn positive
    log_ratio = torch.tensor([-1.0, -19.0, -30.0, -200.0], requires_grad=True)
    k3 = kl_estimate(log_ratio, torch.zeros(4), "k3")
    k3.sum().backward()
    assert torch.isfinite(k3).all()
    assert log_ratio.grad[0].item() == pytest.approx(1 - math.exp(1))
    assert log_ratio.grad[1].item() == pytest.approx(1 - math.exp(19), rel=1e-5)
    assert (log_ratio.grad[2:] <= 0).all(), log_ratio.grad


def test_kl_estimators_are_unbiased_where_claimed():
    # sample from p, estimate KL(p || q) for two categoricals; k1 and k3 are unbiased, k2 is not.
    # p = (.9, .1), q = (.1, .9): KL = 0.8 ln 9 = 1.758, E[k2] = (ln 9)^2 / 2 = 2.414; the estimators'
    # standard errors over 200k samples are about 0.003
    torch.manual_seed(0)
    p = torch.tensor([0.9, 0.1])
    q = torch.tensor([0.1, 0.9])
    true_kl = (p * (p / q).log()).sum().item()
    assert true_kl == pytest.approx(0.8 * math.log(9))
    a = torch.multinomial(p, 200_000, replacement=True)
    logp, logq = p.log()[a][None], q.log()[a][None]
    assert kl_estimate(logp, logq, "k1").mean().item() == pytest.approx(true_kl, abs=0.02)
    assert kl_estimate(logp, logq, "k3").mean().item() == pytest.approx(true_kl, abs=0.02)
    assert kl_estimate(logp, logq, "k2").mean().item() == pytest.approx(math.log(9) ** 2 / 2, abs=0.02)


def test_adaptive_kl_controller_by_hand():
    c = KLController(0.1, target=6.0, horizon=10_000)
    c.update(current_kl=9.0, n_sequences=100)  # error clip(0.5) = 0.2 -> x (1 + 0.2 * 100 / 10000)
    assert c.value == pytest.approx(0.1 * 1.002)
    c.update(current_kl=5.4, n_sequences=1000)  # error -0.1 -> x (1 - 0.01)
    assert c.value == pytest.approx(0.1 * 1.002 * 0.99)
    fixed = KLController(0.05, target=None, horizon=10_000)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05
    restored = KLController(0.0, None, 1)
    restored.load_state_dict(c.state_dict())
    assert restored.value == c.value
