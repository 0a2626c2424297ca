"""OGM / OGM-GE: damp the gradient of the dominant modality's encoder."""
from __future__ import annotations

import torch

from utils.dgs.noise import standard_normal_like
from utils.dgs.segments import scale_segments_, segment_stds

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


def modulate(grad: torch.Tensor, sizes: list[int], coeff: torch.Tensor, gaussian_noise: bool) -> torch.Tensor:
    """Flat gradient of one encoder group (tensors of `sizes` concatenated) -> κ g, plus with
    OGM-GE per-tensor noise N(0, std(g_p)²), the std taken before scaling."""
    if not gaussian_noise:
        return grad * coeff
    stds = segment_stds(grad, sizes)
    noise = scale_segments_(standard_normal_like(grad), sizes, stds)
    return noise.addcmul_(grad, coeff)
