"""The Hinton KD loss against values computed by hand, its T^2 scaling and its limits in alpha."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdprune.distillation import kd_loss


def _softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def _by_hand(s: list[float], t: list[float], y: int, temperature: float, alpha: float) -> float:
    p_s = _softmax([v / temperature for v in s])
    p_t = _softmax([v / temperature for v in t])
    kl = sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    ce = -math.log(_softmax(s)[y])
    return alpha * temperature**2 * kl + (1 - alpha) * ce


CASES = [([1.0, 2.0, 0.5], [2.0, 1.0, -1.0], 0, 2.0, 0.5),
         ([0.0, 0.0, 3.0], [1.0, 1.0, 1.0], 2, 4.0, 0.9),
         ([-1.0, 4.0, 2.0], [3.0, 0.0, 1.0], 1, 1.0, 0.3)]


@pytest.mark.parametrize("s, t, y, temperature, alpha", CASES)
def test_matches_hand_computed_value(s, t, y, temperature, alpha):
    got = kd_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([y]), temperature, alpha)
    assert got.item() == pytest.approx(_by_hand(s, t, y, temperature, alpha), rel=1e-5)


def test_batch_mean_reduction():
    s, t, y = zip(*[(c[0], c[1], c[2]) for c in CASES])
    got = kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), 3.0, 0.7).item()
    assert got == pytest.approx(sum(_by_hand(*c[:3], 3.0, 0.7) for c in CASES) / len(CASES), rel=1e-5)


def test_soft_term_is_scaled_by_t_squared():
    s, t, y = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[2.0, 1.0, -1.0]]), torch.tensor([0])
    for temperature in (1.0, 2.0, 5.0):
        kl = F.kl_div(F.log_softmax(s / temperature, 1), F.softmax(t / temperature, 1), reduction="batchmean")
        assert kd_loss(s, t, y, temperature, 1.0).item() == pytest.approx(temperature**2 * kl.item(), rel=1e-5)


def test_t_squared_keeps_the_gradient_scale_at_high_temperature():
    t = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(8, dtype=torch.long)
    norms = []
    for temperature in (10.0, 20.0, 40.0):
        s = torch.randn(8, 10, generator=torch.Generator().manual_seed(1)).requires_grad_()
        kd_loss(s, t, y, temperature, 1.0).backward()
        norms.append(s.grad.norm().item())
    # without T^2 the gradient would shrink 4x per doubling of T; with it, it stays put (1/T^2 -> T^0)
    assert norms[0] / norms[2] == pytest.approx(1.0, rel=0.1)


def test_continuous_in_alpha_with_ce_and_kl_at_the_ends():
    s, t, y = torch.tensor([[0.3, -1.0, 2.0]]), torch.tensor([[1.0, 0.0, 0.5]]), torch.tensor([2])
    ce = F.cross_entropy(s, y).item()
    assert kd_loss(s, t, y, 3.0, 0.0).item() == pytest.approx(ce, rel=1e-6)
    assert kd_loss(s, t, y, 3.0, 1.0).item() == pytest.approx(_by_hand([0.3, -1.0, 2.0], [1.0, 0.0, 0.5], 2, 3.0, 1.0))
    for end in (0.0, 1.0):
        near = [kd_loss(s, t, y, 3.0, abs(end - eps)).item() for eps in (1e-3, 1e-5, 1e-7)]
        at = kd_loss(s, t, y, 3.0, end).item()
        assert abs(near[-1] - at) < abs(near[0] - at) + 1e-12
        assert near[-1] == pytest.approx(at, abs=1e-5)


def test_zero_when_student_matches_teacher_and_alpha_is_one():
    z = torch.randn(4, 5)
    assert kd_loss(z, z.clone(), torch.zeros(4, dtype=torch.long), 2.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_unlabelled_samples_count_in_the_soft_term_only():
    from kdprune.data import UNLABELLED

    s, t = torch.tensor([c[0] for c in CASES]), torch.tensor([c[1] for c in CASES])
    y = torch.tensor([CASES[0][2], UNLABELLED, UNLABELLED])
    soft_all = kd_loss(s, t, y, 2.0, 1.0).item()
    assert soft_all == pytest.approx(sum(_by_hand(*c[:3], 2.0, 1.0) for c in CASES) / 3, rel=1e-5)
    hard = kd_loss(s, t, y, 2.0, 0.0).item()
    assert hard == pytest.approx(_by_hand(*CASES[0][:3], 2.0, 0.0), rel=1e-5)  # the labelled sample alone
    none = torch.full((3,), UNLABELLED)
    assert kd_loss(s, t, none, 2.0, 0.0).item() == 0.0
