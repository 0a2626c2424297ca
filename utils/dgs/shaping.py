"""One encoder group's gradient shaping: MMPareto, then OGM / OGM-GE.

Two implementations of the same arithmetic, one per kind of machine:

- `shape_group_flat` (GPU): each step of utils/dgs/pareto.py and utils/dgs/ogm.py is one
  operation on the group's tensors concatenated: a few large kernels, the fewest launches.
- `shape_group_per_tensor` (CPU): there each of those operations is a pass through memory, about
  twelve passes over 42-126 MB for the text encoder's 10.5M parameters. But every per-tensor
  number the shaping needs follows from five sums over the two gradients a = g_mm,p and
  b = g_u,p of each tensor p (k2 = 1 − k1, h = k1 a + k2 b, n = numel):

      A = ‖a‖²,  B = ‖b‖²,  C = a·b,  Σa,  Σb
      k1, cos     from the group's ΣA, ΣB, ΣC                     (pareto_weight)
      ‖a + b‖² = A + B + 2C,   ‖h‖² = k1²A + k2²B + 2 k1 k2 C
      f         = magnitude_factors(‖a + b‖, ‖h‖, γ)             (MMPareto's g_p = f h)
      std(g_p)² = f² (‖h‖² − (k1 Σa + k2 Σb)² / n) / (n − 1)

  so κ g_p + std(g_p) ξ = κ f k1 · a + κ f k2 · b + std(g_p) · ξ: one pass for the sums and
  one that writes the result over the noise ξ, tensor by tensor (the largest is 6 MB: it stays
  in cache between the operations). Without MMPareto (no b) h = a and f = 1. The noise is the
  flat path's, draw for draw (utils/dgs/noise.py), and the result the same to float32 rounding.
"""
from __future__ import annotations

import torch

from utils.dgs.noise import standard_normal_
from utils.dgs.ogm import modulate
from utils.dgs.pareto import magnitude_factors, pareto_combine, pareto_weight


def shape_group(g_mm: list[torch.Tensor], g_uni: list[torch.Tensor] | None, coeff: torch.Tensor | None,
                gaussian_noise: bool, gamma: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The shaped gradient of one encoder group, flat (its tensors' gradients concatenated in
    order), and the group's MMPareto cosine.

    g_mm: the gradient of each parameter tensor, of L_mm (of the summed loss without MMPareto);
    g_uni: those of ΣL_m, or None for no MMPareto; coeff: κ of this modality (0-dim), or None
    for no OGM; gaussian_noise: OGM-GE's noise on top of κ.
    """
    implementation = shape_group_per_tensor if g_mm[0].device.type == "cpu" else shape_group_flat
    return implementation(g_mm, g_uni, coeff, gaussian_noise, gamma)


def shape_groups(g_mm: list[list[torch.Tensor]], g_uni: list[list[torch.Tensor]] | None, coeff: torch.Tensor | None,
                 gaussian_noise: bool, gamma: float) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """`shape_group` of every encoder group i (κ = coeff[i]): their flat gradients, and their
    MMPareto cosines [G] (None without MMPareto)."""
    flats, cosines = [], []
    for i, group in enumerate(g_mm):
        flat, cos = shape_group(group, None if g_uni is None else g_uni[i], None if coeff is None else coeff[i],
                                gaussian_noise, gamma)
        flats.append(flat)
        cosines.append(cos)
    return flats, None if g_uni is None else torch.stack(cosines)


def shape_group_flat(g_mm: list[torch.Tensor], g_uni: list[torch.Tensor] | None, coeff: torch.Tensor | None,
                     gaussian_noise: bool, gamma: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    return shape_flat(_concat(g_mm), None if g_uni is None else _concat(g_uni), [g.numel() for g in g_mm],
                      coeff, gaussian_noise, gamma)


def shape_flat(g_mm: torch.Tensor, g_uni: torch.Tensor | None, sizes: list[int], coeff: torch.Tensor | None,
               gaussian_noise: bool, gamma: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`shape_group_flat` on the group's gradients already flat (tensors of `sizes` concatenated);
    overwrites g_mm."""
    cos = None
    if g_uni is not None:
        g_mm, cos = pareto_combine(g_mm, g_uni, sizes, gamma)
    if coeff is not None:
        g_mm = modulate(g_mm, sizes, coeff, gaussian_noise)
    return g_mm, cos


def shape_group_per_tensor(g_mm: list[torch.Tensor], g_uni: list[torch.Tensor] | None,
                           coeff: torch.Tensor | None, gaussian_noise: bool, gamma: float
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    gaussian_noise = gaussian_noise and coeff is not None              # OGM-GE's noise comes with κ only
    a = [g.reshape(-1) for g in g_mm]
    b = None if g_uni is None else [g.reshape(-1) for g in g_uni]
    sizes = [x.numel() for x in a]
    n = torch.tensor(sizes, dtype=torch.float64)
    sq_a, sq_b, dot_ab, sum_a, sum_b = _tensor_sums(a, b).unbind(1)       # pass 1; per tensor, float64
    # Without MMPareto h = a and f = 1.
    k1, cos = (1.0, None) if b is None else pareto_weight(sq_a.sum(), sq_b.sum(), dot_ab.sum())
    k2 = 1 - k1
    sq_h = k1 * k1 * sq_a + k2 * k2 * sq_b + 2 * k1 * k2 * dot_ab
    sq_sum = sq_a + sq_b + 2 * dot_ab                                     # ‖a + b‖²
    var_h = (sq_h - (k1 * sum_a + k2 * sum_b) ** 2 / n) / (n - 1).clamp_min(1)
    h_of = _recompute_cancelled(a, b, k1, n, sq_a + sq_b, sq_h, sq_sum, var_h, gaussian_noise)
    factors = (torch.ones_like(n) if b is None else
               magnitude_factors(sq_sum.clamp_min(0).sqrt(), sq_h.clamp_min(0).sqrt(), gamma))
    kappa = 1.0 if coeff is None else coeff.double()
    weight_a, weight_b = (kappa * factors * k1).tolist(), (kappa * factors * k2).tolist()
    out = a[0].new_empty(sum(sizes))
    if gaussian_noise:
        stds = torch.where(n > 1, factors * var_h.clamp_min(0).sqrt(), torch.zeros_like(n)).tolist()
        standard_normal_(out)
    weight_h = (kappa * factors).tolist()
    for p, out_p in enumerate(out.split(sizes)):                         # pass 2
        if b is not None and p in h_of:
            # h first, as the flat path forms it: scaled apart, f k1 a and f k2 b would cancel.
            terms = [(h_of[p], weight_h[p])]
        else:
            terms = [(a[p], weight_a[p])] + ([] if b is None else [(b[p], weight_b[p])])
        if gaussian_noise:
            out_p.mul_(stds[p])
        else:
            torch.mul(*terms.pop(0), out=out_p)
        for x, weight in terms:
            out_p.add_(x, alpha=weight)
    return out, None if cos is None else cos.to(out.dtype)


# The sums of pass 1 are float32. Where a statistic is their difference and far smaller than
# them, the digits it needs are lost: ‖h‖² or ‖a + b‖² when a and b nearly cancel, the variance
# when a tensor's mean is far above its spread. Below this fraction of the terms it is taken from
# the vectors themselves (rare: real gradients do not come near it).
CANCELLATION = 1e-2


def _recompute_cancelled(a: list[torch.Tensor], b: list[torch.Tensor] | None, k1: torch.Tensor | float,
                         n: torch.Tensor, sq_ab: torch.Tensor, sq_h: torch.Tensor, sq_sum: torch.Tensor,
                         var_h: torch.Tensor, with_var: bool) -> dict[int, torch.Tensor]:
    """Replace, in place, ‖h‖², ‖a + b‖² and var(h) of the tensors where they cancelled (above),
    taken from h = k1 a + (1 − k1) b formed as the flat path forms it; sq_ab: ‖a‖² + ‖b‖².
    Returns those tensors' h by index."""
    k1 = float(k1)
    lost = sq_h < CANCELLATION * max(k1, 1 - k1) ** 2 * sq_ab
    if b is not None:
        lost |= sq_sum < CANCELLATION * sq_ab
    if with_var:
        lost |= var_h * (n - 1) < CANCELLATION * sq_h
    h_of = {}
    for p in lost.nonzero().flatten().tolist():
        h = h_of[p] = a[p] if b is None else torch.lerp(b[p], a[p], k1)
        if b is not None:
            sq_sum[p] = (a[p] + b[p]).double().square().sum()
        sq_h[p] = h.double().square().sum()
        var_h[p] = h.double().var() if h.numel() > 1 else 0.0
    return h_of


def _tensor_sums(a: list[torch.Tensor], b: list[torch.Tensor] | None) -> torch.Tensor:
    """[P, 5] float64: ‖a_p‖², ‖b_p‖², a_p·b_p, Σa_p, Σb_p (b's terms 0 without b)."""
    if b is None:
        zero = a[0].new_zeros(())
        rows = [torch.stack([x @ x, zero, zero, x.sum(), zero]) for x in a]
    else:
        rows = [torch.stack([x @ x, y @ y, x @ y, x.sum(), y.sum()]) for x, y in zip(a, b)]
    return torch.stack(rows).double()


def _concat(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])
