"""MMPareto: merge the multimodal and the unimodal gradient of one encoder (SPEC §4 step 2)."""
from __future__ import annotations

import torch

K_MIN, K_MAX = 0.001, 0.999


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def min_norm_weight(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """k1 minimising ‖k1·g1 + (1−k1)·g2‖ over [0.001, 0.999] for flat vectors g1, g2 (0-dim tensor).

    k1 = ((g2 − g1)·g2) / ‖g1 − g2‖², clipped; identical vectors give the lower clip.
    """
    diff = g1 - g2
    denom = diff @ diff
    k1 = -(diff @ g2) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return k1.clamp(K_MIN, K_MAX)


def cosine(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """Cosine of two flat vectors; 0 when either is zero."""
    norms = torch.linalg.vector_norm(g1) * torch.linalg.vector_norm(g2)
    return (g1 @ g2) / norms.clamp_min(1e-12)


def pareto_combine(g_mm: list[torch.Tensor], g_uni: list[torch.Tensor], gamma: float
                   ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Combine per-tensor gradients of one modality group; returns (gradients, cosine).

    Agreeing gradients (cos > 0) get k = (½, ½), conflicting ones the min-norm weights. Per
    tensor p: n_p = 2(k1 g_mm,p + k2 g_u,p), rescaled so its norm is at least that of the plain
    sum, times γ: g_p = γ · max(‖g_mm,p + g_u,p‖ / ‖n_p‖, 1) · n_p.
    """
    flat_mm, flat_uni = _flat(g_mm), _flat(g_uni)
    cos = cosine(flat_mm, flat_uni)
    k1 = torch.where(cos > 0, torch.full_like(cos, 0.5), min_norm_weight(flat_mm, flat_uni))
    combined = torch._foreach_add(torch._foreach_mul(g_mm, 2 * k1), torch._foreach_mul(g_uni, 2 * (1 - k1)))
    sum_norms = torch._foreach_norm(torch._foreach_add(g_mm, g_uni))
    new_norms = torch._foreach_norm(combined)
    scales = [gamma * torch.where(n > 0, s / n, torch.ones_like(n)).clamp_min(1.0)
              for s, n in zip(sum_norms, new_norms)]
    return torch._foreach_mul(combined, scales), cos
