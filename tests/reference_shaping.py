"""One encoder group's gradient shaping (MMPareto, then OGM / OGM-GE) computed independently in
float64, with the bound on how far an implementation in a given precision may be from it."""
from __future__ import annotations

import math

import torch

try:
    from tests.tolerance import summation_gamma, unit_roundoff
except ImportError:  # tests/ on sys.path instead of the repo root
    from tolerance import summation_gamma, unit_roundoff


def shaping_reference(g_mm, g_uni, coeff, noise, gamma, dtype: torch.dtype = torch.float32):
    """One group's shaping computed in float64 from the same gradients and noise ξ (None: none),
    and how far an implementation computing in `dtype` may be from it, elementwise.

    g_mm, g_uni (None: no MMPareto): the group's gradient tensors; coeff: κ (None: no OGM).
    Returns (shaped [N], bound [N], cos, cos's bound), the last two None without g_uni. The
    bound covers the implementation's rounding and this reference's own (float64: the same
    analysis with u64). It is the first-order one below, with γ_n of tests/tolerance.py for a sum
    of n terms, taken 1.1 times on a tensor where each statistic's relative error bound is at
    most 10% (the terms first order neglects, products of two such errors and the curvature of
    √ and 1/√, are then under a tenth of it); elsewhere inf, the precision not determining the
    result:
    - the group's A = ‖a‖², B = ‖b‖², C = a·b (a = g_mm, b = g_u, N terms) are within γ_N A,
      γ_N B, γ_N D (D = Σ|a_i b_i|), whatever the order of their sums (flat, or per tensor then
      added); cos = C / √(AB) and k1 = (B − C) / (A + B − 2C) follow, plus their few roundings;
    - per tensor (n terms), ‖a + b‖² is within (γ_n + 2u)(A_p + B_p + 2D_p) (from the vectors or
      as A_p + B_p + 2C_p), ‖h‖² within (γ_n + 6u) Σ(|k1 a_i| + |k2 b_i|)² plus k1's share
      2 δk1 Σ|h_i (a_i − b_i)|, and f = 2γ max(‖a + b‖ / 2‖h‖, 1), 1-Lipschitz in the ratio,
      within the ratio's error;
    - var(h), by any method (two-pass, Welford, Σh² − (Σh)²/n), is within
      3γ_n Σ(|k1 a_i| + |k2 b_i|)² / (n − 1); std(h) within that over 2 std, plus δk1 std(a − b)
      for k1 and 4u ‖|k1 a| + |k2 b|‖ / √(n − 1) for the rounding of the vector it is taken of;
    - an element takes at most 7 roundings (lerp's three, f, κ, the noise's product and sum),
      each at most u of its terms' magnitude κ f (|k1 a_i| + |k2 b_i|) + std |ξ_i|.
    """
    u = _roundoff(dtype)
    a = [x.double().reshape(-1) for x in g_mm]
    b = [torch.zeros_like(x) for x in a] if g_uni is None else [x.double().reshape(-1) for x in g_uni]
    k1, dk1, cos, cos_bound = 1.0, 0.0, None, None
    if g_uni is not None:
        g_n = _gamma(sum(x.numel() for x in a), dtype)
        (sq_a, sq_b, dot, dot_abs), (cos, cos_bound) = _group_sums(a, b), cosine_reference(g_mm, g_uni, dtype)
        assert abs(cos) > cos_bound, "the sign of cos, MMPareto's case, is not determined in this precision"
        if cos > 0:
            k1 = 0.5
        else:
            numerator, denominator = sq_b - dot, sq_a + sq_b - 2 * dot
            k1 = min(max(numerator / denominator, 0.001), 0.999)      # the clip is 1-Lipschitz
            dk1 = (numerator / denominator) * (g_n * ((sq_b + dot_abs) / numerator
                                                      + (sq_a + sq_b + 2 * dot_abs) / denominator) + 4 * u)
    k2, kappa = 1 - k1, 1.0 if coeff is None else float(coeff)
    shaped, bound, start = [], [], 0
    for x, y in zip(a, b):
        n, g_n = x.numel(), _gamma(x.numel(), dtype)
        h, h_abs = k1 * x + k2 * y, k1 * x.abs() + k2 * y.abs()
        sq_h_abs = (h_abs @ h_abs).item()
        f, df, determined = 1.0, 0.0, True
        if g_uni is not None:
            f = 2 * gamma
            sq_sum, sq_h = ((x + y) @ (x + y)).item(), (h @ h).item()
            if sq_h > 0:
                d_sq_sum = (g_n + 2 * u) * (x @ x + y @ y + 2 * (x.abs() @ y.abs())).item()
                d_sq_h = (g_n + 6 * u) * sq_h_abs + 2 * dk1 * (h.abs() @ (x - y).abs()).item()
                ratio = math.sqrt(sq_sum / sq_h) / 2
                d_ratio = _sqrt_error(sq_sum, d_sq_sum) / (2 * math.sqrt(sq_h)) + ratio * (d_sq_h / (2 * sq_h) + 4 * u)
                f, df = 2 * gamma * max(ratio, 1.0), 2 * gamma * d_ratio
                determined = d_sq_sum <= 0.1 * sq_sum and d_sq_h <= 0.1 * sq_h and df <= 0.1 * f
        out = kappa * f * h
        element = kappa * (h.abs() * df + f * (x - y).abs() * dk1) + 7 * u * kappa * f * h_abs
        if noise is not None and n > 1:
            xi = noise[start: start + n].double()
            std_h = h.std().item()
            d_var_h = 3 * g_n * sq_h_abs / (n - 1)
            d_std_h = _sqrt_error(std_h ** 2, d_var_h) + dk1 * (x - y).std().item() + 4 * u * math.sqrt(sq_h_abs / (n - 1))
            std, d_std = f * std_h, df * std_h + f * d_std_h + 2 * u * f * std_h
            out = out + std * xi
            element = element + xi.abs() * (d_std + 7 * u * std)
            determined = determined and d_var_h <= 0.1 * std_h ** 2
        shaped.append(out)
        bound.append(1.1 * element if determined else torch.full_like(element, math.inf))
        start += n
    return torch.cat(shaped), torch.cat(bound), cos, cos_bound


def cosine_reference(g_mm, g_uni, dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """MMPareto's cosine of a group's g_mm and g_u in float64, and how far an implementation
    in `dtype` may be from it: C's error γ_N D over √(AB), A's and B's γ_N each, half of it
    through the square root, and the product's, the root's and the division's roundings."""
    a, b = [x.double().reshape(-1) for x in g_mm], [y.double().reshape(-1) for y in g_uni]
    sq_a, sq_b, dot, dot_abs = _group_sums(a, b)
    cos = dot / math.sqrt(sq_a * sq_b)
    return cos, _gamma(sum(x.numel() for x in a), dtype) * (dot_abs / math.sqrt(sq_a * sq_b) + abs(cos)) \
        + 3 * _roundoff(dtype) * abs(cos)


def _group_sums(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float, float, float]:
    """‖a‖², ‖b‖², a·b and Σ|a_i b_i| over the group's tensors."""
    return (sum(x @ x for x in a).item(), sum(y @ y for y in b).item(), sum(x @ y for x, y in zip(a, b)).item(),
            sum(x.abs() @ y.abs() for x, y in zip(a, b)).item())


def _roundoff(dtype: torch.dtype) -> float:
    """u of the implementation plus u64 of this reference: the bound covers both."""
    return unit_roundoff(dtype) + unit_roundoff(torch.float64)


def _gamma(n: int, dtype: torch.dtype) -> float:
    return summation_gamma(n, dtype) + summation_gamma(n, torch.float64)


def _sqrt_error(value: float, error: float) -> float:
    """How far √value may be off when value is off by `error`: error / 2√value to first order,
    and never more than √error."""
    return math.sqrt(error) if value == 0 else min(math.sqrt(error), error / (2 * math.sqrt(value)))
