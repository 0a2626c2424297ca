"""MMPareto: merge the multimodal and the unimodal gradient of one encoder."""
from __future__ import annotations

import torch

from utils.dgs.segments import scale_segments_, segment_norms

K_MIN, K_MAX = 0.001, 0.999


def _min_norm_weight(g1g1: torch.Tensor, g2g2: torch.Tensor, g1g2: torch.Tensor) -> torch.Tensor:
    """k1 minimising ‖k1·g1 + (1−k1)·g2‖ over [K_MIN, K_MAX]: ((g2 − g1)·g2) / ‖g1 − g2‖², clipped
    (identical vectors give the lower clip), from the three dot products."""
    # From the three dot products: (g2 − g1)·g2 = g2g2 − g1g2, ‖g1 − g2‖² = g1g1 + g2g2 − 2 g1g2.
    # Used where g1g2 ≤ 0 (conflict), so nothing cancels.
    denom = g1g1 + g2g2 - 2 * g1g2
    k1 = (g2g2 - g1g2) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return k1.clamp(K_MIN, K_MAX)


def _cosine(g1g1: torch.Tensor, g2g2: torch.Tensor, g1g2: torch.Tensor) -> torch.Tensor:
    """Cosine of two vectors from their dot products; 0 when either is zero."""
    return g1g2 / torch.sqrt(g1g1 * g2g2).clamp_min(1e-12)


def pareto_combine(g_mm: torch.Tensor, g_uni: torch.Tensor, sizes: list[int], gamma: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine the flat gradients of one modality group; returns (flat gradient, cosine).

    g_mm, g_uni: the group's tensors flattened and concatenated, `sizes` their numels in order;
    g_mm is overwritten. Agreeing gradients (cos > 0) get k = (½, ½), conflicting ones the
    min-norm weights. Per tensor p: n_p = 2(k1 g_mm,p + k2 g_u,p), rescaled so its norm is at
    least that of the plain sum, times γ: g_p = γ · max(‖g_mm,p + g_u,p‖ / ‖n_p‖, 1) · n_p.
    The group is a few flat operations (three dot products, per-tensor norms and scaling in a few
    kernels, utils/dgs/segments.py), so the cost does not grow with the number of parameter tensors.
    """
    k1, cos = pareto_weight(g_mm @ g_mm, g_uni @ g_uni, g_mm @ g_uni)
    half = torch.lerp(g_uni, g_mm, k1)                                  # n / 2 = k1 g_mm + (1 − k1) g_u
    plain_sum = g_mm.add_(g_uni)
    factors = magnitude_factors(segment_norms(plain_sum, sizes), segment_norms(half, sizes), gamma)
    return scale_segments_(half, sizes, factors), cos


def pareto_weight(g1g1: torch.Tensor, g2g2: torch.Tensor, g1g2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k1, cos) of a group from its three dot products: k1 = ½ where the gradients agree
    (cos > 0), the min-norm weight where they conflict."""
    cos = _cosine(g1g1, g2g2, g1g2)
    return torch.where(cos > 0, torch.full_like(cos, 0.5), _min_norm_weight(g1g1, g2g2, g1g2)), cos


def magnitude_factors(sum_norms: torch.Tensor, half_norms: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per tensor, the factor on n/2 = k1 g_mm + (1 − k1) g_u: 2γ · max(‖g_mm + g_u‖ / ‖n‖, 1)
    (1 where n = 0)."""
    ratio = torch.where(half_norms > 0, sum_norms / (2 * half_norms), torch.ones_like(half_norms))
    return 2 * gamma * ratio.clamp_min(1.0)
