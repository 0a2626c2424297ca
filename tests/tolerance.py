"""Rounding-error bounds from the operands, for the tests' tolerances: a tolerance follows from
the computation's size and conditioning, never from what one machine happened to round.

The model of floating point: every elementary operation (+ − × / √, a fused multiply-add)
returns its exact result times (1 + δ), |δ| ≤ u, the unit roundoff (2⁻²⁴ in float32, 2⁻⁵³ in
float64). A sum of n terms x_i, in any order (sequential, pairwise, blocked, SIMD lanes,
threads: whatever a CPU's kernels do), is then off by at most γ_n Σ|x_i|, and a dot product by
γ_n Σ|x_i y_i|, where

- γ_n = n u / (1 − n u) holds always (Higham, Accuracy and Stability of Numerical Algorithms,
  2nd ed., §3.1 and §4.2), but says little for millions of float32 terms (n u ≈ 0.1 at 1.7M);
- γ_n = exp(λ √n u + n u² / (1 − u)) − 1 ≈ λ √n u holds with probability at least
  1 − 2n exp(−λ² (1 − u)² / 2) when the δ are independent and of mean zero (Higham & Mary, "A
  new approach to probabilistic rounding error analysis", SIAM J. Sci. Comput. 41, 2019, the
  inner-product theorem), true of rounding random data, which is what the tests feed such sums.
  With λ = 10 a failure is less likely than 4e-22 n: below 1e-13 up to n = 1e8.

`summation_gamma` is the smaller of the two; `rounded(k)` is γ_k itself, the relative error of a
result after k roundings, each elementary function (exp, log, tanh, pow: within 2 ulp in
torch's CPU kernels, vectorized or not) counting as FUNCTION_ROUNDINGS. A float64 expected value
carries a few u64 of its own, inside the k²u² that γ_k holds beyond k u in float32.
"""
from __future__ import annotations

import math

import torch

LAMBDA = 10.0

U32 = torch.finfo(torch.float32).eps / 2
U64 = torch.finfo(torch.float64).eps / 2
FUNCTION_ROUNDINGS = 4          # 2 ulp = at most 4u relative


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def summation_gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """γ_n: a sum (or dot product) of n terms in `dtype` is within γ_n Σ|terms| of the exact one."""
    u = unit_roundoff(dtype)
    worst = n * u / (1 - n * u) if n * u < 1 else math.inf
    probable = math.expm1(LAMBDA * math.sqrt(n) * u + n * u * u / (1 - u))
    return min(worst, probable)


def rounded(k: int, dtype: torch.dtype = torch.float32) -> float:
    """γ_k = k u / (1 − k u): the relative error of a product of k factors (1 + δ), |δ| ≤ u."""
    u = unit_roundoff(dtype)
    return k * u / (1 - k * u)


def float32(x: float) -> float:
    """x rounded to float32 once: the value a single rounding of x gives, for exact comparisons."""
    return torch.tensor(x, dtype=torch.float32).item()


def float64_error(x32: torch.Tensor, x64: torch.Tensor) -> float:
    """A bound on the rounding error of x64, a computation in float64, from x32, the same
    computation in float32 on the same (float32) operands, for a deep one (a network's forward or
    backward) whose conditioning no formula gives.

    To first order a computation's rounding error is Σ_j c_j δ_j, linear in its roundings δ_j
    (|δ_j| ≤ u), the c_j set by the computation and its operands, not by the precision; so the
    float64 error is the float32 one scaled by u64 / u32 = 2⁻²⁹, up to how the δ_j happen to
    fall. The float32 error is measured against x64 (whose own is 2⁻²⁹ of it) at the tensor's
    largest, LAMBDA times that covers the fall of the δ_j, and u64 of the tensor's largest
    element, one rounding of the result, floors it (where float32 happens to be exact).
    """
    x32, x64 = x32.detach().double(), x64.detach().double()
    return LAMBDA * (U64 / U32) * (x32 - x64).abs().max().item() + U64 * x64.abs().max().item()


def assert_same_computation(compute, what: str = "") -> None:
    """compute(dtype) -> (got, want), each a tensor or a list of them, computed in `dtype` from
    the same operands (float32 ones; `want` may be exact values): the float64 results agree
    within what the float32 run tells of each side's rounding (float64_error)."""
    (got32, want32), (got64, want64) = ((_tensors(got), _tensors(want)) for got, want in
                                        (compute(torch.float32), compute(torch.float64)))
    assert len(got32) == len(want32) == len(got64) == len(want64)
    for i, (g32, w32, g64, w64) in enumerate(zip(got32, want32, got64, want64)):
        assert g64.dtype == torch.float64, f"{what} [{i}] not computed in float64"
        assert_within(g64, w64, float64_error(g32, g64) + float64_error(w32, w64), f"{what} [{i}]")


def _tensors(x) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def assert_within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor | float, what: str = "") -> None:
    """|got − want| ≤ bound elementwise (all taken in float64); the message names the element
    nearest to or furthest past its bound."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{what} shape {tuple(got.shape)} != {tuple(want.shape)}"
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(want)
    error = (got - want).abs()
    assert torch.isfinite(got).all() and torch.isfinite(want).all(), f"{what} not finite"
    if (error > bound).any():
        ratio = torch.where(bound > 0, error / bound, torch.where(error > 0, math.inf, 0.0))
        i = int(ratio.flatten().argmax())
        raise AssertionError(f"{what} {int((error > bound).sum())}/{error.numel()} elements past their bound; "
                             f"worst at flat index {i}: {got.flatten()[i].item()!r} vs {want.flatten()[i].item()!r}, "
                             f"error {error.flatten()[i].item():.3e} > bound {bound.flatten()[i].item():.3e}")
