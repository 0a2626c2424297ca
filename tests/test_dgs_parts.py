"""The DGS pieces against hand-computed values: Shapley, MMPareto, OGM coefficients, losses."""
import math

import pytest
import torch

from utils.losses import FocalLoss, inverse_prior_weights
import utils.noise as noise_module
from utils.modulation import modulate, ogm_coefficients
from utils.noise import CHUNK, standard_normal_like
from utils.pareto import cosine, min_norm_weight, pareto_combine
from utils.segments import _scale_segments_batched_, scale_segments_, segment_norms, segment_stds
from utils import shaping_graph
from utils.shaping import shape_group_flat, shape_group_per_tensor, shape_groups
from utils.shaping_graph import ShapingGraphs
from utils.shapley import coalition_masks, shapley_matrix, shapley_values, true_label_probs

CPU = torch.device("cpu")


# ------------------------------------------------------------------ Shapley
def test_coalition_masks_enumerate_subsets_by_bits():
    masks = coalition_masks(3, CPU)
    assert masks.shape == (8, 3)
    assert masks[0].tolist() == [False, False, False]
    assert masks[5].tolist() == [True, False, True]
    assert masks[7].tolist() == [True, True, True]


def test_shapley_two_players_by_hand():
    # v(∅)=0.1, v({0})=0.5, v({1})=0.2, v({0,1})=0.9
    v = torch.tensor([[0.1], [0.5], [0.2], [0.9]])
    phi = shapley_values(v)[0]
    # φ0 = ½(v0 − v∅) + ½(v01 − v1) = ½·0.4 + ½·0.7 = 0.55 ; φ1 = ½·0.1 + ½·0.4 = 0.25
    assert phi.tolist() == pytest.approx([0.55, 0.25])


def test_shapley_three_players_weights():
    w = shapley_matrix(3, CPU)
    # player 0 from coalition {0} (s=1): weight 0!2!/3! = 1/3 ; from ∅ (s=0): −1/3
    assert w[1, 0].item() == pytest.approx(1 / 3)
    assert w[0, 0].item() == pytest.approx(-1 / 3)
    # {0,1} (s=3) includes 0 with |S|−1 = 1: 1!1!/3! = 1/6 ; excludes 2 with |S| = 2: −2!0!/3! = −1/3
    assert w[3, 0].item() == pytest.approx(1 / 6)
    assert w[3, 2].item() == pytest.approx(-1 / 3)
    assert w[7].tolist() == pytest.approx([1 / 3] * 3)


def test_shapley_efficiency_and_symmetry():
    torch.manual_seed(0)
    v = torch.rand(8, 50)
    phi = shapley_values(v)
    assert torch.allclose(phi.sum(1), v[7] - v[0], atol=1e-6)
    phi64 = shapley_values(v.double())                     # in the values' dtype: efficiency to 1e-15
    assert phi64.dtype == torch.float64 and torch.allclose(phi64.sum(1), v[7].double() - v[0].double(), atol=1e-15)
    # players 0 and 1 symmetric: v(S ∪ {0}) = v(S ∪ {1}) for S without both
    sym = torch.rand(8, 5)
    sym[2] = sym[1]          # {1} = {0}
    sym[6] = sym[5]          # {1,2} = {0,2}
    assert torch.allclose(shapley_values(sym)[:, 0], shapley_values(sym)[:, 1], atol=1e-6)


def test_shapley_additive_game_gives_each_its_own_value():
    gains = torch.tensor([0.3, 0.1, -0.05])
    masks = coalition_masks(3, CPU).float()
    v = (masks @ gains)[:, None] + 0.2
    assert shapley_values(v)[0].tolist() == pytest.approx(gains.tolist(), abs=1e-6)


def test_true_label_probs():
    log_probs = torch.log(torch.tensor([[[0.2, 0.8], [0.6, 0.4]], [[0.5, 0.5], [0.1, 0.9]]]))
    v = true_label_probs(log_probs, torch.tensor([1, 0]))
    assert v.flatten().tolist() == pytest.approx([0.8, 0.6, 0.5, 0.1])


# ------------------------------------------------------------------ MMPareto
def test_min_norm_weight_of_conflicting_2d_vectors():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    # minimise ‖k g1 + (1−k) g2‖²: k1 = ((g2 − g1)·g2)/‖g1 − g2‖² = (2 + 1)/5 = 0.6
    k1 = min_norm_weight(g1, g2)
    assert k1.item() == pytest.approx(0.6)
    point = k1 * g1 + (1 - k1) * g2
    for k in torch.linspace(0, 1, 101):
        assert torch.linalg.vector_norm(point) <= torch.linalg.vector_norm(k * g1 + (1 - k) * g2) + 1e-6


def test_min_norm_weight_is_clipped():
    # g2 = 2·g1 points the same way: the minimum is at k1 = 1, clipped to 0.999
    assert min_norm_weight(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0])).item() == pytest.approx(0.999)
    assert min_norm_weight(torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.0])).item() == pytest.approx(0.001)


def test_pareto_agreeing_gradients_are_summed_then_scaled_by_gamma():
    g_mm, g_u = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])
    merged, cos = pareto_combine(g_mm, g_u, [2], gamma=0.2)
    assert cos.item() == pytest.approx(5 / (math.sqrt(5) * math.sqrt(10)))
    # k = ½: n = g_mm + g_u, s = 1 → γ·n
    assert merged.tolist() == pytest.approx([0.8, 0.6])


def test_pareto_conflicting_gradients_min_norm_and_magnitude_rule():
    g_mm, g_u = [torch.tensor([1.0, 0.0]), torch.tensor([2.0])], [torch.tensor([-1.0, 1.0]), torch.tensor([-1.0])]
    flat_mm, flat_u = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([-1.0, 1.0, -1.0])
    merged, cos = pareto_combine(flat_mm.clone(), flat_u, [2, 1], gamma=1.0)   # overwrites its first argument
    merged = merged.split([2, 1])
    assert cos.item() == pytest.approx(-3 / (math.sqrt(5) * math.sqrt(3)))
    k1 = ((flat_u - flat_mm) @ flat_u / ((flat_mm - flat_u) @ (flat_mm - flat_u))).item()   # (2+1+3)/14
    assert k1 == pytest.approx(6 / 14)
    for p in range(2):
        n = 2 * (k1 * g_mm[p] + (1 - k1) * g_u[p])
        s = torch.linalg.vector_norm(g_mm[p] + g_u[p]) / torch.linalg.vector_norm(n)
        expected = max(s.item(), 1.0) * n
        assert merged[p].tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    # second tensor: n = 2(6/14·2 − 8/14) = 8/14, plain sum 1 → scaled up to norm 1
    assert merged[1].item() == pytest.approx(1.0, rel=1e-5)


def test_pareto_zero_gradients_stay_zero():
    merged, cos = pareto_combine(torch.zeros(3), torch.zeros(3), [3], gamma=1.0)
    assert merged.tolist() == [0.0, 0.0, 0.0]
    assert cos.item() == 0.0


def test_cosine_of_zero_vector_is_zero():
    assert cosine(torch.zeros(2), torch.tensor([1.0, 0.0])).item() == 0.0


# ------------------------------------------------------------------ OGM
def test_ogm_coefficients_by_hand():
    scores = torch.tensor([0.3, 0.1, 0.1])
    kappa = ogm_coefficients(scores, alpha=0.6)
    # r_0 = 0.3 / 0.1 = 3 → κ = 1 − tanh(1.2); r_1 = 0.1 / 0.2 = 0.5 → 1
    assert kappa.tolist() == pytest.approx([1 - math.tanh(1.2), 1.0, 1.0], rel=1e-6)


def test_ogm_coefficients_floor_negative_scores():
    # A negative score counts as ε = 1e-6: r_0 = 2e-6 / 1e-6 = 2, a ratio tanh does not saturate.
    kappa = ogm_coefficients(torch.tensor([2e-6, -0.1]), alpha=0.5)
    assert kappa.tolist() == pytest.approx([1 - math.tanh(0.5), 1.0], rel=1e-5)


def test_ogm_single_modality_is_untouched():
    assert ogm_coefficients(torch.tensor([0.4]), alpha=1.0).tolist() == [1.0]


def test_modulate_scales_and_adds_noise_with_pre_scaling_std():
    torch.manual_seed(0)
    g = torch.cat([torch.randn(20000) * 3.0, torch.randn(30000) * 0.1, torch.randn(1)])
    sizes = [20000, 30000, 1]
    assert torch.allclose(modulate(g, sizes, torch.tensor(0.5), gaussian_noise=False), 0.5 * g)
    noisy = modulate(g, sizes, torch.tensor(0.5), gaussian_noise=True)
    noise = (noisy - 0.5 * g).split(sizes)
    # each tensor's noise has that tensor's std (3 and 0.1); a single-element tensor gets none
    for part, original in zip(noise[:2], g.split(sizes)[:2]):
        assert part.std().item() == pytest.approx(original.std().item(), rel=0.03)
        assert abs(part.mean().item()) < 0.03 * original.std().item()
    assert noise[2].item() == 0.0


def test_modulate_noise_on_groups_larger_than_a_noise_chunk():
    # Chunks of the CPU noise cross the tensor boundaries here (utils/noise.py)
    torch.manual_seed(1)
    sizes = [3 * CHUNK + 17, CHUNK // 3, 5000]
    g = torch.cat([torch.randn(n) * s for n, s in zip(sizes, (2.0, 0.05, 1e-3))])
    noise = (modulate(g, sizes, torch.tensor(0.25), gaussian_noise=True) - 0.25 * g).split(sizes)
    for part, original in zip(noise, g.split(sizes)):
        assert part.std().item() == pytest.approx(original.std().item(), rel=0.03)
        assert abs(part.mean().item()) < 0.05 * original.std().item()


# ------------------------------------------------------------------ per-tensor operations on a flat group
def test_segment_operations_by_hand():
    flat, sizes = torch.tensor([1.0, 2.0, 3.0, 5.0, 3.0, 4.0]), [3, 1, 2]
    # stds (n − 1): [1, 2, 3] -> 1; [5] -> 0 by convention; [3, 4] -> sqrt(0.5)
    expected_stds = [1.0, 0.0, math.sqrt(0.5)]
    assert segment_stds(flat, sizes).tolist() == pytest.approx(expected_stds)
    assert segment_norms(flat, sizes).tolist() == pytest.approx([math.sqrt(14), 5.0, 5.0])
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


@pytest.mark.parametrize("pareto,modulation", [(True, "Normal"), (True, "OGM"), (True, "OGM_GE"),
                                               (False, "OGM"), (False, "OGM_GE"), (True, "OGM_GE outside")])
def test_per_tensor_shaping_equals_the_flat_one_noise_included(pareto, modulation):
    # "OGM_GE outside": the epochs outside --modulation_starts/ends have no κ, and so no noise.
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
    for f, t in zip(flat.split([g.numel() for g in g_mm]), per_tensor.split([g.numel() for g in g_mm])):
        assert torch.allclose(t, f, rtol=0, atol=5e-6 * f.abs().max().item()), (f - t).abs().max()
    assert per_tensor[-7:].tolist() == [0.0] * 7              # zero gradients stay zero, noise included
    if pareto:
        assert per_tensor_cos.dtype == torch.float32 and per_tensor_cos.item() == pytest.approx(flat_cos.item(), abs=1e-6)
        assert flat_cos.item() < 0                          # the min-norm branch was exercised
    else:
        assert per_tensor_cos is None and flat_cos is None


def test_per_tensor_shaping_by_hand():
    # The conflicting-gradients case of test_pareto_conflicting_..., then OGM-GE's noise std per tensor.
    g_mm, g_uni = [torch.tensor([1.0, 0.0]), torch.tensor([2.0])], [torch.tensor([-1.0, 1.0]), torch.tensor([-1.0])]
    merged, cos = shape_group_per_tensor(g_mm, g_uni, None, False, 1.0)
    assert cos.item() == pytest.approx(-3 / (math.sqrt(5) * math.sqrt(3)))
    k1 = 6 / 14
    n0 = 2 * (k1 * g_mm[0] + (1 - k1) * g_uni[0])                        # plain sum [0, 1]: ‖·‖ 1 < ‖n0‖
    assert merged.tolist() == pytest.approx(n0.tolist() + [1.0], rel=1e-6)
    torch.manual_seed(0)
    g = [torch.randn(40000) * 3.0, torch.randn(30000) * 0.1]
    noisy, _ = shape_group_per_tensor(g, None, torch.tensor(0.5), True, 1.0)
    for part, original in zip((noisy - 0.5 * torch.cat(g)).split([40000, 30000]), g):
        assert part.std().item() == pytest.approx(original.std().item(), rel=0.03)


def test_per_tensor_shaping_keeps_its_digits_where_the_sums_cancel():
    """Where a statistic is a small difference of the float32 sums of pass 1, it is taken from the
    vectors (CANCELLATION): ‖h‖ when g_u ≈ −2 g_mm (1 + cos ≈ 1e-7), the noise's std when a tensor's
    mean is 1000 times its spread. Reference: the flat path in float64."""
    torch.manual_seed(0)
    a = [torch.randn(1000), torch.randn(30)]
    b = [-2 * a[0] + 3e-4 * torch.randn(1000), torch.randn(30)]
    got, _ = shape_group_per_tensor(a, b, None, False, 1.0)
    want, _ = shape_group_flat([x.double() for x in a], [x.double() for x in b], None, False, 1.0)
    assert got[:1000].norm().item() == pytest.approx(want[:1000].norm().item(), rel=1e-5)   # 0.4% off before
    assert torch.allclose(got.double(), want, rtol=0, atol=3e-5 * want.abs().max().item())
    g = [1.0 + 1e-3 * torch.randn(300000)]
    torch.manual_seed(1)
    noisy, _ = shape_group_per_tensor(g, None, torch.tensor(0.5), True, 1.0)
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
    results = []
    for scale in (1.0, -2.0):                            # the second call: other gradients, the same graph
        mm = [[g * scale for g in group] for group in groups_mm]
        torch.manual_seed(5)
        got, got_cos = graphs(mm, groups_uni, coeff, True, 0.7)
        torch.manual_seed(5)
        want, want_cos = shape_groups(mm, groups_uni, coeff, True, 0.7)
        assert [g.shape for g in got] == [w.shape for w in want] == [(3 * (CHUNK + 5) + 1,), (5000 + 12 * CHUNK + 7,)]
        for g, w in zip(got, want):
            assert torch.allclose(g, w, rtol=0, atol=5e-6 * w.abs().max().item()), (g - w).abs().max()
        assert got_cos.shape == (2,) and torch.allclose(got_cos, want_cos, atol=1e-6)
        results.append((got_cos, want_cos))
    assert len(captures) == 1
    assert torch.allclose(results[0][0], results[0][1], atol=1e-6)     # not overwritten by the second call
    assert not torch.allclose(results[0][0], results[1][0])
    # Outside the modulation epochs there is no κ: another graph, no cosines without g_u.
    got, cos = graphs(groups_mm, groups_uni, None, True, 0.7)
    want, _ = shape_groups(groups_mm, groups_uni, None, True, 0.7)
    assert len(captures) == 2
    assert all(torch.allclose(g, w, rtol=0, atol=5e-6 * w.abs().max().item()) for g, w in zip(got, want))
    got, cos = graphs(groups_mm, None, coeff, False, 0.7)
    assert len(captures) == 3 and cos is None
    assert torch.allclose(got[1], 0.9 * torch.cat([g.reshape(-1) for g in groups_mm[1]]))


# ------------------------------------------------------------------ noise
def test_cpu_noise_is_standard_normal_across_chunks():
    torch.manual_seed(2)
    x = standard_normal_like(torch.empty(8 * CHUNK + 3))
    assert x.shape == (8 * CHUNK + 3,) and x.dtype == torch.float32
    assert abs(x.mean().item()) < 0.003 and x.std().item() == pytest.approx(1.0, abs=0.003)
    # the normal's mass within 1σ and 2σ: 0.6827, 0.9545 (±0.002 is > 4 standard errors here)
    assert (x.abs() < 1).float().mean().item() == pytest.approx(0.6827, abs=0.002)
    assert (x.abs() < 2).float().mean().item() == pytest.approx(0.9545, abs=0.002)
    # chunks come from different generators: no two alike, uncorrelated
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
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]])
    loss = FocalLoss(2.5)(probs.log(), torch.tensor([0, 2]))
    expected = (-(0.3 ** 2.5) * math.log(0.7) - (0.5 ** 2.5) * math.log(0.5)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_inverse_prior_weights():
    w = inverse_prior_weights(torch.tensor([0, 0, 0, 1]), 3)
    assert w.tolist() == pytest.approx([4 / 3, 4.0, 0.0])
