"""OGM / OGM-GE: damp the gradient of the dominant modality's encoder (SPEC §4 step 4)."""
from __future__ import annotations

import torch

SCORE_FLOOR = 1e-6   # ε: Shapley scores can be ≤ 0; the ratio needs positive numbers


def ogm_coefficients(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """scores [M] (batch Shapley scores) -> κ [M].

    r_m = max(s_m, ε) / mean_{k≠m} max(s_k, ε);  κ_m = 1 − tanh(α (r_m − 1)) if r_m > 1 else 1.
    With a single modality there is nothing to balance: κ = 1.
    """
    m = scores.numel()
    if m < 2:
        return torch.ones_like(scores)
    s = scores.clamp_min(SCORE_FLOOR)
    others = (s.sum() - s) / (m - 1)
    ratio = s / others
    return torch.where(ratio > 1, 1 - torch.tanh(alpha * (ratio - 1)), torch.ones_like(ratio))


def modulate(grads: list[torch.Tensor], coeff: torch.Tensor, gaussian_noise: bool) -> list[torch.Tensor]:
    """g ← κ g (+ N(0, std(g)²) noise with OGM-GE, std taken before scaling)."""
    scaled = torch._foreach_mul(grads, coeff)
    if not gaussian_noise:
        return scaled
    return [s + torch.randn_like(g) * (g.std() if g.numel() > 1 else torch.zeros((), device=g.device))
            for s, g in zip(scaled, grads)]
