"""The DGS pieces against hand-computed values: Shapley, MMPareto, OGM coefficients, losses."""
import math

import pytest
import torch

from utils.dgs import shaping_graph
import utils.dgs.noise as noise_module
from utils.dgs.noise import CHUNK, standard_normal_like
from utils.dgs.ogm import modulate, ogm_coefficients
from utils.dgs.pareto import _cosine, _min_norm_weight, pareto_combine
from utils.dgs.segments import _scale_segments_batched_, scale_segments_, segment_norms, segment_stds
from utils.dgs.shaping import shape_group_flat, shape_group_per_tensor, shape_groups
from utils.dgs.shaping_graph import ShapingGraphs
from utils.dgs.shapley import coalition_masks, shapley_matrix, shapley_values, true_label_probs
from utils.training.losses import FocalLoss, inverse_prior_weights

try:
    from tests.reference_shaping import shaping_reference
    from tests.tolerance import FUNCTION_ROUNDINGS, U32, U64, assert_within, float32, rounded, summation_gamma
except ImportError:  # tests/ on sys.path instead of the repo root
    from reference_shaping import shaping_reference
    from tolerance import FUNCTION_ROUNDINGS, U32, U64, assert_within, float32, rounded, summation_gamma

CPU = torch.device("cpu")


def min_norm_weight(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """MMPareto's k1 of two flat vectors, through the library's dot-product form."""
    return _min_norm_weight(g1 @ g1, g2 @ g2, g1 @ g2)


def cosine(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    return _cosine(g1 @ g1, g2 @ g2, g1 @ g2)


# ------------------------------------------------------------------ Shapley
def test_coalition_masks_enumerate_subsets_by_bits():
    masks = coalition_masks(3, CPU)
    assert masks.shape == (8, 3)
    assert masks[0].tolist() == [False, False, False]
    assert masks[5].tolist() == [True, False, True]
    assert masks[7].tolist() == [True, True, True]


def test_shapley_two_players_by_hand():
    # v(∅)=1/8, v({0})=1/2, v({1})=1/4, v({0,1})=7/8: binary fractions, so that every product
    # and partial sum is exact in float32, in any order
    v = torch.tensor([[0.125], [0.5], [0.25], [0.875]])
    phi = shapley_values(v)[0]
    # φ0 = ½(v0 − v∅) + ½(v01 − v1) = ½·3/8 + ½·5/8 = 1/2 ; φ1 = ½·1/8 + ½·3/8 = 1/4
    assert phi.tolist() == [0.5, 0.25]


def test_shapley_three_players_weights():
    w = shapley_matrix(3, CPU)                             # float32: each weight rounded once
    # player 0 from coalition {0} (s=1): weight 0!2!/3! = 1/3 ; from ∅ (s=0): −1/3
    assert w[1, 0].item() == float32(1 / 3)
    assert w[0, 0].item() == float32(-1 / 3)
    # {0,1} (s=3) includes 0 with |S|−1 = 1: 1!1!/3! = 1/6 ; excludes 2 with |S| = 2: −2!0!/3! = −1/3
    assert w[3, 0].item() == float32(1 / 6)
    assert w[3, 2].item() == float32(-1 / 3)
    assert w[7].tolist() == [float32(1 / 3)] * 3


def test_shapley_efficiency_and_symmetry():
    torch.manual_seed(0)
    v = torch.rand(8, 50)
    w = shapley_matrix(3, CPU).double()
    terms = v.double().abs().t() @ w.abs()                 # [50, 3]: Σ_S |v(S) W_S,m|
    # Σ_m φ_m = v(M) − v(∅) exactly for the exact weights. The weights are rounded to float32
    # (u of each term), φ_m is a sum of 8 terms, Σ_m one of 3, v(M) − v(∅) one rounding.
    phi = shapley_values(v)
    bound = (rounded(1) + summation_gamma(8) + summation_gamma(3)) * terms.sum(1) + U32 * (v[7] - v[0]).abs()
    assert_within(phi.sum(1), v[7] - v[0], bound)
    phi64 = shapley_values(v.double())                     # in the values' dtype, from the float32 weights
    bound64 = rounded(1) * terms.sum(1) + (summation_gamma(8, torch.float64) + summation_gamma(3, torch.float64)
                                           ) * terms.sum(1)
    assert phi64.dtype == torch.float64
    assert_within(phi64.sum(1), v[7].double() - v[0].double(), bound64)
    # players 0 and 1 symmetric: v(S ∪ {0}) = v(S ∪ {1}) for S without both; then φ_0 and φ_1
    # are sums of the same terms (the weights equal too), in another order: γ_8 of them apart
    sym = torch.rand(8, 5)
    sym[2] = sym[1]          # {1} = {0}
    sym[6] = sym[5]          # {1,2} = {0,2}
    phi = shapley_values(sym)
    assert_within(phi[:, 0], phi[:, 1], 2 * summation_gamma(8) * (sym.double().abs().t() @ w.abs())[:, 0])


def test_shapley_additive_game_gives_each_its_own_value():
    gains = torch.tensor([0.375, 0.125, -0.0625])          # binary fractions: v is exact in float32
    masks = coalition_masks(3, CPU).float()
    v = (masks @ gains)[:, None] + 0.25
    # φ_m: 8 terms v(S) W_S,m, each weight rounded to float32 once
    w = shapley_matrix(3, CPU).double()
    bound = (rounded(1) + summation_gamma(8)) * (v.double().abs().t() @ w.abs())[0]
    assert_within(shapley_values(v)[0], gains, bound)


def test_true_label_probs():
    log_probs = torch.log(torch.tensor([[[0.2, 0.8], [0.6, 0.4]], [[0.5, 0.5], [0.1, 0.9]]]))
    v = true_label_probs(log_probs, torch.tensor([1, 0]))
    want = torch.tensor([0.8, 0.6, 0.5, 0.1], dtype=torch.float64)
    # p rounded to float32, then exp(log p): log's error δ becomes exp(δ log p), at most that of
    # |log p| / u more roundings (e^x − 1 ≤ γ for x = k u), and exp's own
    roundings = torch.tensor([1 + FUNCTION_ROUNDINGS * (1 + math.ceil(abs(math.log(p)))) for p in want.tolist()])
    assert_within(v.flatten(), want, want * roundings * U32 / (1 - roundings * U32))


# ------------------------------------------------------------------ MMPareto
def test_min_norm_weight_of_conflicting_2d_vectors():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    # minimise ‖k g1 + (1−k) g2‖²: k1 = ((g2 − g1)·g2)/‖g1 − g2‖² = (2 + 1)/5 = 0.6
    k1 = min_norm_weight(g1, g2)
    assert k1.item() == float32(0.6)                       # the dot products are exact: one rounding, the division's
    # q(k) = ‖k g1 + (1−k) g2‖² (in float64) is least at k1 up to that rounding, |k1 − 0.6| ≤ 0.6 u,
    # which raises q by ‖g1 − g2‖² (k1 − 0.6)² at most, and up to q's own few float64 roundings.
    g1, g2, k1 = g1.double(), g2.double(), k1.item()
    q_k1 = ((k1 * g1 + (1 - k1) * g2) ** 2).sum().item()
    for k in torch.linspace(0, 1, 101, dtype=torch.float64).tolist():
        q_k = ((k * g1 + (1 - k) * g2) ** 2).sum().item()
        assert q_k1 <= q_k + ((g1 - g2) ** 2).sum().item() * (0.6 * U32) ** 2 + 8 * U64 * q_k


def test_min_norm_weight_is_clipped():
    # g2 = 2·g1 points the same way: the minimum is at k1 = 1, clipped to 0.999
    assert min_norm_weight(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0])).item() == float32(0.999)
    assert min_norm_weight(torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.0])).item() == float32(0.001)


def test_pareto_agreeing_gradients_are_summed_then_scaled_by_gamma():
    g_mm, g_u = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])
    merged, cos = pareto_combine(g_mm, g_u, [2], gamma=0.2)
    # The dot products (5, 10, 5) are exact: cos takes √50's rounding and the division's.
    assert cos.item() == pytest.approx(5 / (math.sqrt(5) * math.sqrt(10)), rel=rounded(2))
    # k = ½: n = g_mm + g_u, s = 1 → γ·n; n/2 = [2, 1.5], its norms and s are exact, 2γ = 0.4 and
    # the scaling are a rounding each
    assert merged.tolist() == pytest.approx([0.8, 0.6], rel=rounded(2))


def test_pareto_conflicting_gradients_min_norm_and_magnitude_rule():
    g_mm, g_u = [torch.tensor([1.0, 0.0]), torch.tensor([2.0])], [torch.tensor([-1.0, 1.0]), torch.tensor([-1.0])]
    flat_mm, flat_u = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([-1.0, 1.0, -1.0])
    merged, cos = pareto_combine(flat_mm.clone(), flat_u, [2, 1], gamma=1.0)   # overwrites its first argument
    # The dot products (5, 3, −3) are exact: cos takes √15's rounding and the division's.
    assert cos.item() == pytest.approx(-3 / (math.sqrt(5) * math.sqrt(3)), rel=rounded(2))
    # k1 = ((g_u − g_mm)·g_u) / ‖g_mm − g_u‖² = (2+1+3)/14; n = 2(k1 g_mm + (1 − k1) g_u) =
    # [−2/7, 8/7 | 4/7]. First tensor: ‖n‖ = √68/7 > ‖g_mm + g_u‖ = 1, kept; second: the plain
    # sum 1 > 4/7, so scaled up to norm 1. Within the float32 bound of shaping_reference.
    _, bound, _, _ = shaping_reference(g_mm, g_u, None, None, 1.0)
    assert_within(merged, torch.tensor([-2 / 7, 8 / 7, 1.0], dtype=torch.float64), bound)


def test_pareto_zero_gradients_stay_zero():
    merged, cos = pareto_combine(torch.zeros(3), torch.zeros(3), [3], gamma=1.0)
    assert merged.tolist() == [0.0, 0.0, 0.0]
    assert cos.item() == 0.0


def test_cosine_of_zero_vector_is_zero():
    assert cosine(torch.zeros(2), torch.tensor([1.0, 0.0])).item() == 0.0


# ------------------------------------------------------------------ OGM
def test_ogm_coefficients_by_hand():
    scores = torch.tensor([0.375, 0.125, 0.125])            # binary fractions: r is exact in float32
    kappa = ogm_coefficients(scores, alpha=0.6)
    # r_0 = 0.375 / 0.125 = 3 → κ = 1 − tanh(1.2); r_1 = 0.125 / 0.25 = 0.5 → 1. α(r_0 − 1) is
    # 1.2 up to 0.6's rounding (1.2 u), tanh adds its own, 1 − tanh one rounding: to first order
    t = math.tanh(1.2)
    bound = (1 - t * t) * 1.2 * U32 + FUNCTION_ROUNDINGS * U32 * t + U32 * (1 - t)
    assert kappa[1:].tolist() == [1.0, 1.0]
    assert kappa[0].item() == pytest.approx(1 - t, abs=bound)


def test_ogm_coefficients_floor_negative_scores():
    # A negative score counts as ε = 1e-6: r_0 = 2e-6 / 1e-6 = 2, a ratio tanh does not saturate.
    kappa = ogm_coefficients(torch.tensor([2e-6, -0.1]), alpha=0.5)
    # In float32 s = [2ε, ε] (2e-6 rounds to twice what 1e-6 does); the others' mean of s_0,
    # Σs − s_0 = 3ε(1 + δ) − 2ε rounded, is within 4u of ε, r_0 within 5u of 2, α(r_0 − 1)
    # (r_0 − 1 exact) within 5u of 0.5; then tanh's error and 1 − tanh's rounding, to first order.
    t = math.tanh(0.5)
    bound = (1 - t * t) * 5 * U32 + FUNCTION_ROUNDINGS * U32 * t + U32 * (1 - t)
    assert kappa[1].item() == 1.0
    assert kappa[0].item() == pytest.approx(1 - t, abs=bound)


def test_ogm_single_modality_is_untouched():
    assert ogm_coefficients(torch.tensor([0.4]), alpha=1.0).tolist() == [1.0]


def test_modulate_scales_and_adds_noise_with_pre_scaling_std():
    torch.manual_seed(0)
    g = torch.cat([torch.randn(20000) * 3.0, torch.randn(30000) * 0.1, torch.randn(1)])
    sizes = [20000, 30000, 1]
    assert torch.equal(modulate(g, sizes, torch.tensor(0.5), gaussian_noise=False), 0.5 * g)   # exact: a power of 2
    noisy = modulate(g, sizes, torch.tensor(0.5), gaussian_noise=True)
    noise = (noisy - 0.5 * g).split(sizes)
    # each tensor's noise has that tensor's std (3 and 0.1); a single-element tensor gets none.
    # Over n ≥ 20000 draws a sample std is off by 1/√(2n) ≤ 0.005 of it (0.03: 6 of those), a
    # mean by std/√n ≤ 0.0071 std (0.03: 4.2 of those).
    for part, original in zip(noise[:2], g.split(sizes)[:2]):
        assert part.std().item() == pytest.approx(original.std().item(), rel=0.03)
        assert abs(part.mean().item()) < 0.03 * original.std().item()
    assert noise[2].item() == 0.0


def test_modulate_noise_on_groups_larger_than_a_noise_chunk():
    # Chunks of the CPU noise cross the tensor boundaries here (utils/dgs/noise.py)
    torch.manual_seed(1)
    sizes = [3 * CHUNK + 17, CHUNK // 3, 5000]
    g = torch.cat([torch.randn(n) * s for n, s in zip(sizes, (2.0, 0.05, 1e-3))])
    noise = (modulate(g, sizes, torch.tensor(0.25), gaussian_noise=True) - 0.25 * g).split(sizes)
    # n ≥ 5000 draws: a sample std within 1/√(2n) ≤ 0.01 of the std, a mean within std/√n ≤
    # 0.0142 std; 0.05 and 0.07 are 5 of those.
    for part, original in zip(noise, g.split(sizes)):
        assert part.std().item() == pytest.approx(original.std().item(), rel=0.05)
        assert abs(part.mean().item()) < 0.07 * original.std().item()


# ------------------------------------------------------------------ per-tensor operations on a flat group
def test_segment_operations_by_hand():
    flat, sizes = torch.tensor([1.0, 2.0, 3.0, 5.0, 3.0, 4.0]), [3, 1, 2]
    # stds (n − 1): [1, 2, 3] -> 1; [5] -> 0 by convention; [3, 4] -> sqrt(0.5)
    # Small integers: sums, means and squares are exact, the square root is the one rounding.
    expected_stds = [1.0, 0.0, math.sqrt(0.5)]
    assert segment_stds(flat, sizes).tolist() == pytest.approx(expected_stds, rel=rounded(1))
    assert segment_norms(flat, sizes).tolist() == pytest.approx([math.sqrt(14), 5.0, 5.0], rel=rounded(1))
    factors = torch.tensor([2.0, -1.0, 0.5])
    expected = [2.0, 4.0, 6.0, -5.0, 1.5, 2.0]
    assert scale_segments_(flat.clone(), sizes, factors).tolist() == expected
    assert _scale_segments_batched_(flat.clone(), sizes, factors).tolist() == expected


# ------------------------------------------------------------------ a group's shaping, flat (GPU) and per tensor (CPU)
def _group_gradients():
    """Tensors larger than a noise chunk, a one-element one, a tiny-scale one, an all-zero one;
    unimodal gradients partly opposed to the multimodal ones."""
    torch.manual_seed(6)
    shapes = [(3, CHUNK + 5), (1,), (50, 100), (12, CHUNK), (7,)]           # (12, CHUNK): 1.5M, the largest M3Net tensor
    g_mm = [torch.randn(s) * sc for s, sc in zip(shapes, (1.0, 2.0, 0.01, 3.0, 0.0))]
    g_uni = [torch.randn(s) * sc - 0.3 * g for s, sc, g in zip(shapes, (0.5, 1.0, 0.02, 1.0, 0.0), g_mm)]
    return g_mm, g_uni


def _noise_drawn(seed: int, sizes: list[int]) -> list[torch.Tensor]:
    """The noise ξ the shaping of groups of `sizes` draws after torch.manual_seed(seed), group by group."""
    torch.manual_seed(seed)
    return [standard_normal_like(torch.empty(n)) for n in sizes]


@pytest.mark.parametrize("pareto,modulation", [(True, "Normal"), (True, "OGM"), (True, "OGM_GE"),
                                               (False, "OGM"), (False, "OGM_GE"), (True, "OGM_GE outside")])
def test_per_tensor_shaping_equals_the_flat_one_noise_included(pareto, modulation):
    # "OGM_GE outside": the epochs outside --modulation_starts/ends have no κ, and so no noise.
    # Both against the float64 shaping of the same gradients and noise, within their float32 bound
    # (tests/reference_shaping.py).
    g_mm, g_uni = _group_gradients()
    coeff = None if modulation in ("Normal", "OGM_GE outside") else torch.tensor(0.4)
    kwargs = dict(g_uni=g_uni if pareto else None, coeff=coeff, gaussian_noise=modulation.startswith("OGM_GE"),
                  gamma=0.7)
    torch.manual_seed(5)
    flat, flat_cos = shape_group_flat(g_mm, **kwargs)
    torch.manual_seed(5)                           # the same noise, draw for draw
    per_tensor, per_tensor_cos = shape_group_per_tensor(g_mm, **kwargs)
    if modulation == "OGM_GE outside":
        assert torch.equal(per_tensor, shape_group_per_tensor(g_mm, g_uni, None, False, 0.7)[0])
    assert per_tensor.shape == flat.shape == (sum(g.numel() for g in g_mm),) and per_tensor.dtype == torch.float32
    noise = _noise_drawn(5, [flat.numel()])[0] if kwargs["gaussian_noise"] and coeff is not None else None
    want, bound, want_cos, cos_bound = shaping_reference(g_mm, kwargs["g_uni"], coeff, noise, 0.7)
    assert torch.isfinite(bound).all()
    assert_within(flat, want, bound, "flat")
    assert_within(per_tensor, want, bound, "per tensor")
    assert per_tensor[-7:].tolist() == [0.0] * 7              # zero gradients stay zero, noise included
    if pareto:
        assert per_tensor_cos.dtype == torch.float32
        assert abs(flat_cos.item() - want_cos) <= cos_bound and abs(per_tensor_cos.item() - want_cos) <= cos_bound
        assert want_cos < 0                                 # the min-norm branch was exercised
    else:
        assert per_tensor_cos is None and flat_cos is None


def test_shaping_reference_by_hand():
    # The conflicting-gradients case of test_pareto_conflicting_...: k1 = 6/14, n = 2(k1 g_mm + (1 − k1) g_u)
    # = [−2/7, 8/7 | 4/7]; the first tensor keeps n (‖n‖ > ‖g_mm + g_u‖ = 1), the second is scaled
    # up to ‖g_mm + g_u‖ = 1; then κ = 0.5. The reference is itself a float64 computation: within
    # its float64 bound of the exact values.
    g_mm, g_uni = [torch.tensor([1.0, 0.0]), torch.tensor([2.0])], [torch.tensor([-1.0, 1.0]), torch.tensor([-1.0])]
    want, bound, cos, cos_bound = shaping_reference(g_mm, g_uni, torch.tensor(0.5), None, 1.0, torch.float64)
    assert cos == pytest.approx(-3 / (math.sqrt(5) * math.sqrt(3)), abs=cos_bound)
    assert_within(want, torch.tensor([-1 / 7, 4 / 7, 0.5], dtype=torch.float64), bound)
    # OGM-GE's noise: std of each tensor of h (n − 1), times ξ.
    noise = torch.tensor([1.0, -2.0, 3.0])
    want, bound, _, _ = shaping_reference([torch.tensor([1.0, 3.0]), torch.tensor([2.0])], None, torch.tensor(0.5),
                                          noise, 1.0, torch.float64)
    assert_within(want, torch.tensor([0.5 + math.sqrt(2), 1.5 - 2 * math.sqrt(2), 1.0], dtype=torch.float64), bound)


def test_per_tensor_shaping_by_hand():
    # The conflicting-gradients case of test_pareto_conflicting_..., then OGM-GE's noise std per tensor.
    g_mm, g_uni = [torch.tensor([1.0, 0.0]), torch.tensor([2.0])], [torch.tensor([-1.0, 1.0]), torch.tensor([-1.0])]
    merged, cos = shape_group_per_tensor(g_mm, g_uni, None, False, 1.0)
    want, bound, want_cos, cos_bound = shaping_reference(g_mm, g_uni, None, None, 1.0)
    assert abs(cos.item() - want_cos) <= cos_bound
    assert_within(merged, want, bound)                                   # [−2/7, 8/7, 1] (above)
    torch.manual_seed(0)
    g = [torch.randn(40000) * 3.0, torch.randn(30000) * 0.1]
    noisy, _ = shape_group_per_tensor(g, None, torch.tensor(0.5), True, 1.0)
    # The std of n samples is off by about 1/√(2n) of it (0.004 at 30000): 0.03 is over 7 of those.
    for part, original in zip((noisy - 0.5 * torch.cat(g)).split([40000, 30000]), g):
        assert part.std().item() == pytest.approx(original.std().item(), rel=0.03)


def test_per_tensor_shaping_keeps_its_digits_where_the_sums_cancel():
    """Where a statistic is a small difference of the float32 sums of pass 1, it is taken from the
    vectors (CANCELLATION): ‖h‖ when g_u ≈ −2 g_mm (1 + cos ≈ 1e-7), the noise's std when a tensor's
    mean is 1000 times its spread. Reference: the shaping in float64."""
    torch.manual_seed(0)
    a = [torch.randn(1000), torch.randn(30)]
    b = [-2 * a[0] + 3e-4 * torch.randn(1000), torch.randn(30)]
    got, _ = shape_group_per_tensor(a, b, None, False, 1.0)
    want, bound, _, _ = shaping_reference(a, b, None, None, 1.0)
    # There h = k1 a + k2 b is 1e-4 of its terms: k1's rounding turns it, so its elements are not
    # determined in float32 (bound inf). Its norm is: the output is f h with f ∝ ‖a + b‖ / ‖h‖
    # (f > 2γ), so ‖f h‖ = γ ‖a + b‖ as long as ‖h‖ is taken of the vector h itself, off by the
    # error of ‖a + b‖ (its square within γ_n (‖a‖² + ‖b‖² + 2 Σ|a_i b_i|), over 2 ‖a + b‖²) and
    # the output's two roundings.
    assert torch.isinf(bound[:1000]).all() and torch.isfinite(bound[1000:]).all()
    assert_within(got[1000:], want[1000:], bound[1000:])
    x, y = a[0].double(), b[0].double()
    norm_rel = summation_gamma(1000) * (x @ x + y @ y + 2 * (x.abs() @ y.abs())).item() / (2 * ((x + y) @ (x + y)).item())
    assert got[:1000].norm().item() == pytest.approx(want[:1000].norm().item(), rel=norm_rel + 3 * U32)   # 0.4% off before
    g = [1.0 + 1e-3 * torch.randn(300000)]
    torch.manual_seed(1)
    noisy, _ = shape_group_per_tensor(g, None, torch.tensor(0.5), True, 1.0)
    # The std of 300000 samples is off by about 1/√(2n) = 0.0013 of it: 0.01 is over 7 of those;
    # the subtraction loses 0.5's rounding, 3e-8, against a noise of 1e-3.
    assert (noisy - 0.5 * g[0]).std().item() == pytest.approx(g[0].std().item(), rel=0.01)   # 3.4% short before


def _replayed_by_calling(monkeypatch) -> list:
    """Stand in for CUDA graph capture on the CPU: the replay runs the captured body again, so the
    plumbing around it (inputs loaded, outputs read) is what is tested. Returns the captures made."""
    captures = []

    def capture(body, device, pool, stream):
        captures.append(device)
        return body, pool, stream
    monkeypatch.setattr(shaping_graph, "capture", capture)
    return captures


def test_graphed_shaping_reads_each_calls_gradients_and_equals_the_eager_one(monkeypatch):
    captures = _replayed_by_calling(monkeypatch)
    g_mm, g_uni = _group_gradients()
    groups_mm, groups_uni = [g_mm[:2], g_mm[2:]], [g_uni[:2], g_uni[2:]]   # two groups, as encoders
    coeff = torch.tensor([0.4, 0.9])
    graphs = ShapingGraphs()
    first_cos = None
    for scale in (1.0, -2.0):                            # the second call: other gradients, the same graph
        mm = [[g * scale for g in group] for group in groups_mm]
        torch.manual_seed(5)
        got, got_cos = graphs(mm, groups_uni, coeff, True, 0.7)
        torch.manual_seed(5)
        eager, eager_cos = shape_groups(mm, groups_uni, coeff, True, 0.7)
        assert [g.shape for g in got] == [w.shape for w in eager] == [(3 * (CHUNK + 5) + 1,), (5000 + 12 * CHUNK + 7,)]
        assert got_cos.shape == (2,)
        noise = _noise_drawn(5, [g.numel() for g in got])
        for i in range(2):                               # against the float64 shaping, as in the test above
            want, bound, want_cos, cos_bound = shaping_reference(mm[i], groups_uni[i], coeff[i], noise[i], 0.7)
            assert torch.isfinite(bound).all()
            assert_within(got[i], want, bound, f"graphed, group {i}")
            assert_within(eager[i], want, bound, f"eager, group {i}")
            assert abs(got_cos[i].item() - want_cos) <= cos_bound and abs(eager_cos[i].item() - want_cos) <= cos_bound
        if first_cos is None:
            first_cos, first_cos_then = got_cos, got_cos.clone()
    assert len(captures) == 1
    assert torch.equal(first_cos, first_cos_then)         # not overwritten by the second call
    # Outside the modulation epochs there is no κ: another graph, no cosines without g_u.
    got, cos = graphs(groups_mm, groups_uni, None, True, 0.7)
    eager, _ = shape_groups(groups_mm, groups_uni, None, True, 0.7)
    assert len(captures) == 2
    for i in range(2):
        want, bound, _, _ = shaping_reference(groups_mm[i], groups_uni[i], None, None, 0.7)
        assert_within(got[i], want, bound, f"graphed, group {i}")
        assert_within(eager[i], want, bound, f"eager, group {i}")
    got, cos = graphs(groups_mm, None, coeff, False, 0.7)
    assert len(captures) == 3 and cos is None
    assert torch.equal(got[1], coeff[1] * torch.cat([g.reshape(-1) for g in groups_mm[1]]))   # one rounding, the same


# ------------------------------------------------------------------ noise
def test_cpu_noise_is_standard_normal_across_chunks():
    torch.manual_seed(2)
    x = standard_normal_like(torch.empty(8 * CHUNK + 3))
    assert x.shape == (8 * CHUNK + 3,) and x.dtype == torch.float32
    # n = 1.05M draws: the mean's standard error is 1/√n = 0.00098, the std's 1/√(2n) = 0.00069;
    # 0.005 and 0.0035 are 5 of those.
    assert abs(x.mean().item()) < 0.005 and x.std().item() == pytest.approx(1.0, abs=0.0035)
    # the normal's mass within 1σ and 2σ: 0.6827, 0.9545 (±0.002 is > 4 standard errors here)
    assert (x.abs() < 1).float().mean().item() == pytest.approx(0.6827, abs=0.002)
    assert (x.abs() < 2).float().mean().item() == pytest.approx(0.9545, abs=0.002)
    # chunks come from different generators: no two alike, uncorrelated (the correlation of
    # 131072 independent pairs has a standard error of 1/√n = 0.0028: 0.015 is 5.4 of those)
    first, second = x[:CHUNK], x[CHUNK:2 * CHUNK]
    assert not torch.equal(first, second)
    assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1].item()) < 0.015


def test_cpu_noise_follows_the_global_seed_not_the_thread_count(monkeypatch):
    shape = (3, CHUNK + 11)
    torch.manual_seed(3)
    reference = standard_normal_like(torch.empty(shape))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        monkeypatch.setattr(noise_module, "_threads", None)          # a one-thread pool
        torch.manual_seed(3)
        assert torch.equal(standard_normal_like(torch.empty(shape)), reference)
    finally:
        torch.set_num_threads(threads)
    torch.manual_seed(4)
    assert not torch.equal(standard_normal_like(torch.empty(shape)), reference)


# ------------------------------------------------------------------ losses
def test_focal_loss_by_hand():
    probs = torch.tensor([[0.75, 0.125, 0.125], [0.25, 0.25, 0.5]])       # exact in float32
    loss = FocalLoss(2.5)(probs.log(), torch.tensor([0, 2]))
    p = [0.75, 0.5]
    terms = [-((1 - x) ** 2.5) * math.log(x) for x in p]
    # log p: 4u (FUNCTION_ROUNDINGS) relative; exp(log p) = p to 4u (|log p| + 1); 1 − p to that
    # times p / (1 − p), plus a rounding; its 2.5th power to 2.5 times that plus 4u; the term
    # to that plus log's 4u and the product's u; the mean: the sum's rounding (÷2 is exact).
    function = FUNCTION_ROUNDINGS * U32
    bound = U32 * abs(sum(terms)) / 2
    for x, term in zip(p, terms):
        rel_q = x * function * (abs(math.log(x)) + 1) / (1 - x) + U32
        bound += abs(term) * (2.5 * rel_q + 2 * function + U32) / 2
    assert loss.item() == pytest.approx(sum(terms) / 2, abs=bound)


def test_inverse_prior_weights():
    w = inverse_prior_weights(torch.tensor([0, 0, 0, 1]), 3)
    assert w.tolist() == pytest.approx([4 / 3, 4.0, 0.0], rel=rounded(2))   # 1 / (3/4) in float64, then to float32
