"""CUDA graphs that fail fall back to eager, on the CPU: a capture that raises, a first replay whose
numbers are off, for the context RNN (model/cuda_graphs.py) and the gradient shaping
(utils/dgs/shaping_graph.py). The captures and replays are stand-ins; the decisions are the real ones."""
from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from model import cuda_graphs
from model.cuda_graphs import graphed_or_eager, layered_rnn, take_fallback_notices
from model.m3net import M3Net, ModelConfig
from utils.cuda_capture import UNIT_ROUNDOFF, capturing, rounding_error_bound
from utils.dgs import shaping_graph
from utils.dgs.shaping import shape_groups
from utils.dgs.shaping_graph import ShapingGraphs
from utils.dgs.step import DGSSettings, DGSStep

U = UNIT_ROUNDOFF
SIZES = [[30, 1, 20], [40, 7]]          # two encoder groups of a few tensors each


class _FailingGraph:
    """Stands in for torch.cuda.CUDAGraph: its capture cannot begin, as CUDA refuses one."""

    def capture_begin(self, pool, capture_error_mode):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nCUDA kernel errors ...")

    def capture_end(self):
        raise AssertionError("a capture that did not begin is not ended")


def _failed_capture(*_):
    with capturing(_FailingGraph(), pool=None):
        pass


def _notice(part: str, reason: str) -> str:
    return f"CUDA graphs off for {part}: {reason}; it runs eagerly for the rest of the run"


def _numbers(notice: str) -> tuple[float, float]:
    """The difference and the bound a mismatch notice names."""
    found = re.search(r"by up to (\S+), above its float32 rounding bound (\S+);", notice)
    return float(found[1]), float(found[2])


def test_rounding_error_bound_by_hand():
    # Ten terms: the worst case, nu / (1 − nu), is the smaller.
    assert rounding_error_bound(10) == pytest.approx(10 * U / (1 - 10 * U), rel=1e-12)
    # A million: Higham & Mary's λ√n u, λ = √(2 ln(2n / u)) / (1 − u) = 7.8923 (a failure
    # probability of u), 4.705e-4 against the worst case's 0.0596.
    lam = math.sqrt(2 * (math.log(2e6) + 24 * math.log(2))) / (1 - U)
    assert lam == pytest.approx(7.8923, abs=1e-4)
    assert rounding_error_bound(10**6) == pytest.approx(math.expm1(lam * 1000 * U + 1e6 * U * U / (1 - U)), rel=1e-12)
    assert rounding_error_bound(10**6) == pytest.approx(4.7053e-4, rel=1e-4)
    # The text encoder's ten and a half million: 1.7 in the worst case, 0.16% with the model.
    assert 10_500_000 * U / (1 - 10_500_000 * U) == pytest.approx(1.672, abs=1e-3)
    assert rounding_error_bound(10_500_000) == pytest.approx(1.582e-3, rel=1e-3)


# ---------------------------------------------------------------------- the gradient shaping
def _gradients(seed: int = 0):
    torch.manual_seed(seed)
    g_mm = [[torch.randn(n) for n in group] for group in SIZES]
    g_uni = [[torch.randn(n) - 0.5 * g for n, g in zip(group, gm)] for group, gm in zip(SIZES, g_mm)]
    return g_mm, g_uni, torch.tensor([0.4, 0.9])


def _eager(seed: int, g_mm, g_uni, coeff):
    torch.manual_seed(seed)
    return shape_groups(g_mm, g_uni, coeff, True, 0.7)


def _assert_equal(got, want) -> None:
    assert len(got[0]) == len(want[0]) and all(torch.equal(g, w) for g, w in zip(got[0], want[0]))
    assert torch.equal(got[1], want[1])


def _replaying(monkeypatch, graphs: ShapingGraphs, after=None) -> list[int]:
    """Capture on the CPU: the replay runs the captured body, then `after(graph)` (a fault)."""
    replays = []

    def capture(body, device, pool, stream):
        def replay():
            body()
            replays.append(1)
            if after is not None:
                after(graphs.graphs[next(iter(graphs.graphs))])
        return replay, pool, stream
    monkeypatch.setattr(shaping_graph, "capture", capture)
    return replays


def test_a_failed_shaping_capture_shapes_eagerly_from_then_on(monkeypatch):
    captures = []
    monkeypatch.setattr(shaping_graph, "capture", lambda *args: captures.append(1) or _failed_capture())
    graphs = ShapingGraphs()
    g_mm, g_uni, coeff = _gradients()
    for seed in (1, 2):                         # OGM-GE's noise included: the eager shaping's own draws
        torch.manual_seed(seed)
        _assert_equal(graphs(g_mm, g_uni, coeff, True, 0.7), _eager(seed, g_mm, g_uni, coeff))
    assert captures == [1] and graphs.graphs == {}
    reason = "capturing its CUDA graph failed (CUDA error: operation not permitted when stream is capturing)"
    assert graphs.take_notices() == [_notice("the gradient shaping", reason)]
    assert graphs.take_notices() == []


@pytest.mark.parametrize("fault,what", [
    (lambda graph: graph.out[5:9].mul_(1.001), "encoder group 0's shaped gradient (its tensor 0)"),
    (lambda graph: graph.out[-3].add_(1.0), "encoder group 1's shaped gradient (its tensor 1)"),
    (lambda graph: graph.cos[1].add_(1e-3), "encoder group 1's MMPareto cosine")])
def test_a_shaping_replay_off_beyond_rounding_shapes_eagerly_from_then_on(monkeypatch, fault, what):
    graphs = ShapingGraphs()
    replays = _replaying(monkeypatch, graphs, fault)
    g_mm, g_uni, coeff = _gradients()
    torch.manual_seed(1)
    _assert_equal(graphs(g_mm, g_uni, coeff, True, 0.7), _eager(1, g_mm, g_uni, coeff))   # the eager result
    [notice] = graphs.take_notices()
    assert notice.startswith(f"CUDA graphs off for the gradient shaping: the first replay of its graph: {what} "
                             f"differs from the eager one by up to ")
    difference, bound = _numbers(notice)
    eager = _eager(1, g_mm, g_uni, coeff)
    if "cosine" in what:                        # 2 (2γ̃(N) + 3u): N = 47, λ√N u below 47u
        assert difference == pytest.approx(1e-3, rel=1e-3)
        assert bound == pytest.approx(2 * (2 * rounding_error_bound(47) + 3 * U), rel=1e-2)
    elif "tensor 0" in what:                    # 2 γ̃(3·51 + 3·30) max|tensor 0|
        largest = eager[0][0][:30].abs().max().item()
        assert difference == pytest.approx(1e-3 * eager[0][0][5:9].abs().max().item(), rel=1e-2)
        assert bound == pytest.approx(2 * rounding_error_bound(243) * largest, rel=1e-2)
    else:
        assert difference == pytest.approx(1.0, rel=1e-3)
    # From then on eagerly: no replay, the graphs freed.
    assert replays == [1] and graphs.graphs == {}
    torch.manual_seed(2)
    _assert_equal(graphs(g_mm, g_uni, coeff, True, 0.7), _eager(2, g_mm, g_uni, coeff))
    assert replays == [1] and graphs.take_notices() == []


def test_a_shaping_replay_within_rounding_is_kept_and_replayed_unchecked(monkeypatch):
    """Eight roundings' worth off (the bound is over a hundred): the graph stays, its output is
    the step's; the check compared it with the eager shaping drawing the replay's noise, and
    left the generator where the replay left it."""
    graphs = ShapingGraphs()
    replays = _replaying(monkeypatch, graphs, lambda graph: graph.out.mul_(1 + 8 * U))
    g_mm, g_uni, coeff = _gradients()
    torch.manual_seed(1)
    got = graphs(g_mm, g_uni, coeff, True, 0.7)
    after_check = torch.rand(3)
    want = _eager(1, g_mm, g_uni, coeff)
    assert torch.equal(after_check, torch.rand(3))          # the generator: as after the eager shaping alone
    [graph] = graphs.graphs.values()
    assert graph.checked and got[0][0].data_ptr() == graph.out.data_ptr() and graphs.take_notices() == []
    for g, w in zip(got[0], want[0]):
        assert 0 < (g - w).abs().max().item() <= 2e-5 * w.abs().max().item()
    eager_calls = []
    monkeypatch.setattr(shaping_graph, "shape_groups", lambda *args: eager_calls.append(1))
    graphs(g_mm, g_uni, coeff, True, 0.7)
    assert replays == [1, 1] and eager_calls == []          # the second replay is not checked


def test_a_cosine_within_rounding_of_zero_defers_the_check(monkeypatch):
    """Group 0's gradients orthogonal (cos = 0, MMPareto's conflict case): a replay whose cosine is
    a hair above 0 chose the agreeing case by rounding, and its gradients cannot be compared with
    the eager ones: the call gives the eager result, and the next replay is checked instead."""
    graphs = ShapingGraphs()
    faults = [lambda graph: graph.cos[0].fill_(1e-9)]
    replays = _replaying(monkeypatch, graphs, lambda graph: faults and faults.pop()(graph))
    g_mm, g_uni, coeff = _gradients()
    orthogonal = [[torch.tensor([1.0, 0.0] * 15), torch.tensor([0.0]), torch.zeros(20)], g_mm[1]]
    across = [[torch.tensor([0.0, 1.0] * 15), torch.tensor([1.0]), torch.zeros(20)], g_uni[1]]
    torch.manual_seed(1)
    got = graphs(orthogonal, across, coeff, True, 0.7)
    _assert_equal(got, _eager(1, orthogonal, across, coeff))
    assert got[1][0].item() == 0.0 and replays == [1] and graphs.take_notices() == []
    [graph] = graphs.graphs.values()
    assert not graph.checked
    graphs(g_mm, g_uni, coeff, True, 0.7)
    assert graph.checked and replays == [1, 1] and graphs.take_notices() == []


# ---------------------------------------------------------------------- the context RNN
def _rnn(kind=nn.GRU, dropout: float = 0.3):
    torch.manual_seed(0)
    model = nn.Module()                         # the RNN's name in the notices: gru_l
    model.gru_l = kind(6, 5, num_layers=2, bidirectional=True, dropout=dropout)
    return model, model.gru_l, torch.randn(7, 3, 6, requires_grad=True)


class _ScaleGradient(torch.autograd.Function):
    """The identity whose backward scales the gradient: a replay whose backward graph is off."""

    @staticmethod
    def forward(ctx, y, factor):
        ctx.factor = factor
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _replay_for(replay, calls: list):
    """Stands in for the capture of x's shape: captured on the first call, replayed after."""
    def replay_for(rnn, x):
        calls.append(1)
        return replay, len(calls) == 1
    return replay_for


def _output_and_gradients(y, inputs, cotangent):
    return [y.detach(), *torch.autograd.grad(y, inputs, cotangent, retain_graph=True)]


def _assert_all_equal(got, want) -> None:
    assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))


def test_a_failed_rnn_capture_runs_it_eagerly_from_then_on():
    model, rnn, x = _rnn()
    captures = []

    def failing(*args):
        captures.append(1)
        _failed_capture()
    inputs, cotangent = [x, *rnn.parameters()], torch.randn(7, 3, 10)
    for seed in (1, 2):
        torch.manual_seed(seed)
        got = _output_and_gradients(graphed_or_eager(rnn, x, failing), inputs, cotangent)
        torch.manual_seed(seed)
        _assert_all_equal(got, _output_and_gradients(rnn(x)[0], inputs, cotangent))    # nn.GRU itself
    assert captures == [1]
    assert take_fallback_notices(model) == [_notice("the context RNN gru_l", "capturing its CUDA graphs failed "
                                                    "(CUDA error: operation not permitted when stream is capturing)")]
    assert take_fallback_notices(model) == []


@pytest.mark.parametrize("kind", [nn.GRU, nn.LSTM])
@pytest.mark.parametrize("fault,what", [
    (lambda y: y * 1.001, "the output"),
    (lambda y: _ScaleGradient.apply(y, 1.001), "the input's gradient")])
def test_an_rnn_replay_off_beyond_rounding_runs_it_eagerly_from_then_on(kind, fault, what):
    """The output off, or the gradients of the first backward: that call's output and gradients
    (two backwards through one forward, as a DGS step takes) are the eager ones, the dropout
    masks drawn as the replay drew them; later calls run the module eagerly."""
    model, rnn, x = _rnn(kind)
    calls = []
    replay_for = _replay_for(lambda x, *weights: fault(layered_rnn(rnn, x, weights)), calls)
    inputs, cotangents = [x, *rnn.parameters()], (torch.randn(7, 3, 10), torch.randn(7, 3, 10))
    torch.manual_seed(1)
    y = graphed_or_eager(rnn, x, replay_for)
    got = [_output_and_gradients(y, inputs, c) for c in cotangents]
    torch.manual_seed(1)
    y = layered_rnn(rnn, x)
    for g, c in zip(got, cotangents):
        _assert_all_equal(g, _output_and_gradients(y, inputs, c))
    [notice] = take_fallback_notices(model)
    assert notice.startswith(f"CUDA graphs off for the context RNN gru_l: the first replay of its graphs for input "
                             f"(7, 3, 6): {what} differs from the eager one by up to ")
    difference, bound = _numbers(notice)
    forward_terms = 7 * ((6 + 5 + 2) + (10 + 5 + 2))        # T Σ_l (D_l + H + 2)
    gates = 4 if kind is nn.LSTM else 3
    if what == "the output":
        assert difference == pytest.approx(1e-3 * y.abs().max().item(), rel=0.05)
        assert bound == pytest.approx(2 * rounding_error_bound(forward_terms) * y.abs().max().item(), rel=1e-2)
    else:                                                   # + T (L G H (1 + directions) + B)
        dx = got[0][1]
        assert difference == pytest.approx(1e-3 * dx.abs().max().item(), rel=0.05)
        backward_terms = forward_terms + 7 * (2 * gates * 5 * 3 + 3)
        assert bound == pytest.approx(2 * rounding_error_bound(backward_terms) * dx.abs().max().item(), rel=1e-2)
    torch.manual_seed(2)
    later = _output_and_gradients(graphed_or_eager(rnn, x, replay_for), inputs, cotangents[0])
    torch.manual_seed(2)
    _assert_all_equal(later, _output_and_gradients(rnn(x)[0], inputs, cotangents[0]))
    assert calls == [1] and take_fallback_notices(model) == []


def test_an_rnn_replay_within_rounding_is_kept_and_replayed_unchecked():
    """Sixteen roundings' worth off, dropout on: kept (the check drew the replay's masks), the
    replay's output is the step's, the generator is where the replay left it, and the second
    replay is not checked."""
    model, rnn, x = _rnn()
    calls, replayed = [], []

    def replay(x, *weights):
        replayed.append(1)
        return layered_rnn(rnn, x, weights) * (1 + 16 * U)
    replay_for = _replay_for(replay, calls)
    inputs, cotangent = [x, *rnn.parameters()], torch.randn(7, 3, 10)
    torch.manual_seed(1)
    got = _output_and_gradients(graphed_or_eager(rnn, x, replay_for), inputs, cotangent)
    after_check = torch.rand(3)
    torch.manual_seed(1)
    want = _output_and_gradients(layered_rnn(rnn, x), inputs, cotangent)
    assert torch.equal(after_check, torch.rand(3))
    for g, w in zip(got, want):                             # the replay's: 16 roundings off
        assert 0 < (g - w).abs().max().item() <= 32 * U * w.abs().max().item()
    assert take_fallback_notices(model) == [] and rnn not in cuda_graphs._FALLEN_BACK
    graphed_or_eager(rnn, x, replay_for)
    assert calls == [1, 1] and replayed == [1, 1]           # checked: the replay alone, no eager run


def test_the_step_gives_each_notice_once(monkeypatch):
    model = M3Net(ModelConfig(4, 2, 8, 8, dropout=0.0))
    step = DGSStep(model, torch.optim.SGD(model.parameters(), lr=0.0), nn.NLLLoss(), DGSSettings())
    assert step.take_notices() == []
    x = torch.randn(3, 2, 1024)
    graphed_or_eager(model.gru_l, x, _failed_capture)
    monkeypatch.setattr(shaping_graph, "capture", _failed_capture)
    step.shaping_graphs(*_gradients(), True, 0.7)
    reason = "capturing its CUDA graph{} failed (CUDA error: operation not permitted when stream is capturing)"
    assert step.take_notices() == [_notice("the context RNN gru_l", reason.format("s")),
                                   _notice("the gradient shaping", reason.format(""))]
    assert step.take_notices() == []
