"""Token-level divergences between drafter (student, q) and target (teacher, p) distributions.

Pure tensor functions (no Trainer), following DistillSpec (Zhou et al., arXiv 2310.08461):
forward KL(p || q), reverse KL(q || p), generalized JSD(β) and total variation distance.

TRL ships a generalized JSD only as a private chunked kernel without TVD, temperature or a
plain logits API, so these are written here and unit-tested against brute-force references.
All math runs in float32 whatever the logits' dtype (bf16 logits lose too much in log-softmax).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

DivergenceName = Literal["fkl", "rkl", "jsd", "tvd"]
DIVERGENCES: tuple[str, ...] = ("fkl", "rkl", "jsd", "tvd")


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


def forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || q_student) per position (mode-covering)."""
    return F.kl_div(student_logp, teacher_logp, reduction="none", log_target=True).sum(-1)


def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(q_student || p_teacher) per position (mode-seeking)."""
    return F.kl_div(teacher_logp, student_logp, reduction="none", log_target=True).sum(-1)


def generalized_jsd(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.5
) -> torch.Tensor:
    """JSD(β) = β·KL(p || m) + (1−β)·KL(q || m), m = β·p + (1−β)·q, per position.

    β = 0.5 is the usual Jensen–Shannon divergence. As β → 0, JSD(β)/β → KL(p || q); as β → 1,
    JSD(β)/(1−β) → KL(q || p). β must lie strictly inside (0, 1): use "fkl"/"rkl" for the ends.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be in the open interval (0, 1), got {beta}")
    log_m = torch.logsumexp(
        torch.stack([teacher_logp + math.log(beta), student_logp + math.log(1.0 - beta)]), dim=0
    )
    kl_p_m = F.kl_div(log_m, teacher_logp, reduction="none", log_target=True).sum(-1)
    kl_q_m = F.kl_div(log_m, student_logp, reduction="none", log_target=True).sum(-1)
    return beta * kl_p_m + (1.0 - beta) * kl_q_m


def total_variation(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """TVD = ½·Σ|p − q| per position, in [0, 1]."""
    return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: DivergenceName,
    mask: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> torch.Tensor:
    """Divergence between the two token distributions at every position.

    Args:
        student_logits, teacher_logits: `(..., vocab)` logits at the same positions; the teacher's
            are detached (gradients flow to the drafter only).
        kind: "fkl", "rkl", "jsd" (with `beta`) or "tvd".
        mask: `(...)` bool/0-1 tensor, true where the position counts (assistant tokens); prompt and
            padding positions are excluded.
        temperature: both distributions are softened by it before comparing.
        reduction: "mean" over counted positions, "sum", or "none" (per position, zero where masked).
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; allowed: {', '.join(DIVERGENCES)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)} (drafter and target must share a vocabulary)"
        )
    q = _log_probs(student_logits, temperature)
    p = _log_probs(teacher_logits.detach(), temperature)
    if kind == "fkl":
        per_pos = forward_kl(q, p)
    elif kind == "rkl":
        per_pos = reverse_kl(q, p)
    elif kind == "jsd":
        per_pos = generalized_jsd(q, p, beta)
    else:
        per_pos = total_variation(q, p)
    if mask is not None:
        per_pos = per_pos * mask.to(per_pos.dtype)
    if reduction == "none":
        return per_pos
    if reduction == "sum":
        return per_pos.sum()
    count = mask.sum() if mask is not None else torch.tensor(per_pos.numel())
    return per_pos.sum() / count.clamp(min=1).to(per_pos.dtype)
