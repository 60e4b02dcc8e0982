import math

import torch

from reward.loss import accuracy, centering_penalty, preference_loss


def test_preference_loss_matches_hand_computed_values():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    # -log sigmoid(d) = log(1 + exp(-d)) for d = 2, 0, -2
    expected = (math.log(1 + math.exp(-2)) + math.log(2) + math.log(1 + math.exp(2))) / 3
    assert preference_loss(chosen, rejected).item() == pytest_approx(expected)
    # a margin of 1 on the first pair: d = 1
    margin = torch.tensor([1.0, 0.0, 0.0])
    expected_m = (math.log(1 + math.exp(-1)) + math.log(2) + math.log(1 + math.exp(2))) / 3
    assert preference_loss(chosen, rejected, margin).item() == pytest_approx(expected_m)


def test_accuracy_and_centering():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0, 3.0]), torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert accuracy(chosen, rejected).item() == 0.5  # a tie counts as wrong
    assert centering_penalty(torch.tensor([1.0, -3.0]), torch.tensor([2.0, 0.0])).item() == pytest_approx(
        0.5 * (1 + 9 + 4 + 0) / 2
    )


def test_loss_gradient_pushes_chosen_up_and_rejected_down():
    chosen = torch.tensor([0.5], requires_grad=True)
    rejected = torch.tensor([0.5], requires_grad=True)
    preference_loss(chosen, rejected).backward()
    assert chosen.grad.item() == pytest_approx(-0.5) and rejected.grad.item() == pytest_approx(0.5)


def pytest_approx(x):
    import pytest

    return pytest.approx(x, rel=1e-6)
