"""Divergences against brute-force references (pure functions, no Trainer)."""

import math

import pytest
import torch

from sd2_hf.training.losses import DIVERGENCES, token_divergence


def _brute(p, q, kind, beta=0.5):
    """Python-loop references on probability vectors p (teacher) and q (student)."""
    p, q = p.double().tolist(), q.double().tolist()
    if kind == "fkl":
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    if kind == "rkl":
        return sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
    if kind == "tvd":
        return 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q))
    m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
    kl_pm = sum(pi * math.log(pi / mi) for pi, mi in zip(p, m))
    kl_qm = sum(qi * math.log(qi / mi) for qi, mi in zip(q, m))
    return beta * kl_pm + (1 - beta) * kl_qm


@pytest.fixture()
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 5, 11, generator=g) * 2, torch.randn(3, 5, 11, generator=g) * 2


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_matches_brute_force(logits, kind, beta):
    s, t = logits
    got = token_divergence(s, t, kind, beta=beta, reduction="none")
    p, q = t.softmax(-1), s.softmax(-1)
    for i in range(3):
        for j in range(5):
            assert got[i, j].item() == pytest.approx(
                _brute(p[i, j], q[i, j], kind, beta), rel=1e-4, abs=1e-6
            )


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_zero_for_identical(logits, kind):
    s, _ = logits
    assert token_divergence(s, s.clone(), kind).abs().item() < 1e-6


def test_jsd_half_is_jensen_shannon(logits):
    s, t = logits
    p, q = t.softmax(-1), s.softmax(-1)
    m = (p + q) / 2
    js = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    torch.testing.assert_close(
        token_divergence(s, t, "jsd", beta=0.5, reduction="none"), js, rtol=1e-4, atol=1e-6
    )
    # JS divergence is bounded by ln 2
    assert js.max().item() <= math.log(2) + 1e-6


def test_jsd_limits(logits):
    s, t = logits
    eps = 1e-4
    fkl = token_divergence(s, t, "fkl", reduction="none")
    rkl = token_divergence(s, t, "rkl", reduction="none")
    low = token_divergence(s, t, "jsd", beta=eps, reduction="none") / eps
    high = token_divergence(s, t, "jsd", beta=1 - eps, reduction="none") / eps
    torch.testing.assert_close(low, fkl, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(high, rkl, rtol=2e-2, atol=1e-3)


def test_tvd_in_unit_interval():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(64, 50, generator=g) * 5, torch.randn(64, 50, generator=g) * 5
    tvd = token_divergence(s, t, "tvd", reduction="none")
    assert tvd.min().item() >= 0 and tvd.max().item() <= 1
    # disjoint one-hot-like distributions approach 1
    a = torch.full((1, 4), -1e4)
    b = a.clone()
    a[0, 0] = b[0, 1] = 0
    assert token_divergence(a, b, "tvd").item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_gradients_flow_to_student_only(logits, kind):
    s, t = (x.clone().requires_grad_(True) for x in logits)
    token_divergence(s, t, kind).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_mask_and_temperature(logits):
    s, t = logits
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, :2] = True
    per_pos = token_divergence(s, t, "fkl", reduction="none")
    masked_mean = token_divergence(s, t, "fkl", mask=mask)
    assert masked_mean.item() == pytest.approx(per_pos[0, :2].mean().item(), rel=1e-5)
    assert token_divergence(s, t, "fkl", mask=mask, reduction="sum").item() == pytest.approx(
        per_pos[0, :2].sum().item(), rel=1e-5
    )
    hot = token_divergence(s, t, "fkl", temperature=4.0)
    assert hot.item() < token_divergence(s, t, "fkl").item()  # softer distributions are closer


def test_bad_arguments(logits):
    s, t = logits
    with pytest.raises(ValueError, match="allowed: fkl, rkl, jsd, tvd"):
        token_divergence(s, t, "kl")
    with pytest.raises(ValueError, match="open interval"):
        token_divergence(s, t, "jsd", beta=1.0)
    with pytest.raises(ValueError, match="share a vocabulary"):
        token_divergence(s, t[..., :-1], "fkl")
