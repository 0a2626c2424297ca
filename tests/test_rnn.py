"""model/rnn.py: the CPU GRU must compute exactly what nn.GRU computes, forward and backward."""
import pytest
import torch
from torch.testing import assert_close

from model.cuda_graphs import can_graph, layered_rnn
from model import rnn
from model.graph import build_graph
from model.rnn import bidirectional_gru, expect_cotangent
from utils.cuda_capture import CudaGraphError, capturing


def _gru(input_size: int, hidden: int, layers: int, dropout: float = 0.0) -> torch.nn.GRU:
    torch.manual_seed(0)
    return torch.nn.GRU(input_size, hidden, num_layers=layers, bidirectional=True, dropout=dropout).double()

def _assert_same_function(got: torch.Tensor, want: torch.Tensor, inputs: list[torch.Tensor]) -> None:
    """got == want, and so are their gradients in every input (a random cotangent), in float64."""
    assert_close(got, want, rtol=0, atol=1e-12)
    cotangent = torch.randn_like(want)
    for g_want, g_got in zip(torch.autograd.grad(want, inputs, cotangent), torch.autograd.grad(got, inputs, cotangent)):
        assert_close(g_got, g_want, rtol=0, atol=1e-11)



@pytest.mark.parametrize("steps,batch,layers", [(1, 1, 1), (7, 3, 2), (12, 2, 3)])
def test_forward_and_all_gradients_match_nn_gru(steps, batch, layers):
    gru = _gru(6, 5, layers)
    x = torch.randn(steps, batch, 6, dtype=torch.double, requires_grad=True)
    want, got = gru(x)[0], bidirectional_gru(gru, x)
    assert got.shape == (steps, batch, 10)
    _assert_same_function(got, want, [x, *gru.parameters()])


def test_gradients_against_finite_differences():
    gru = _gru(3, 2, 2)
    x = torch.randn(4, 2, 3, dtype=torch.double, requires_grad=True)
    params = list(gru.parameters())
    assert torch.autograd.gradcheck(lambda inp, *ps: bidirectional_gru(gru, inp), (x, *params))


def test_reverse_direction_reads_the_padding_first():
    # Without packing, the reverse direction starts at the last (padded) step, as in the reference:
    # changing a step after position 0 changes the reverse output at position 0, not the forward one.
    gru = _gru(4, 3, 1)
    x = torch.randn(5, 1, 4, dtype=torch.double)
    y = x.clone()
    y[4] += 1.0
    a, b = bidirectional_gru(gru, x), bidirectional_gru(gru, y)
    assert_close(a[0, 0, :3], b[0, 0, :3])
    assert (a[0, 0, 3:] - b[0, 0, 3:]).abs().max() > 1e-6


def test_dropout_acts_between_layers_in_training_only_with_nn_grus_masks():
    gru = _gru(4, 3, 2, dropout=0.5)
    x = torch.randn(6, 2, 4, dtype=torch.double)
    gru.eval()
    assert_close(bidirectional_gru(gru, x), gru(x)[0], rtol=0, atol=1e-12)
    gru.train()
    torch.manual_seed(1)
    dropped = bidirectional_gru(gru, x)
    after = torch.rand(3)
    torch.manual_seed(1)
    assert_close(dropped, gru(x)[0], rtol=0, atol=1e-12)     # nn.GRU's own dropout: the same masks
    assert torch.equal(torch.rand(3), after)                  # and as many draws
    assert (dropped - gru.eval()(x)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("layers", [1, 2])
def test_real_steps_leave_every_read_output_and_gradient_unchanged(layers):
    # lengths (5, 2, 3): the output at real steps and every gradient through it are nn.GRU's.
    gru = _gru(4, 3, layers)
    lengths = (5, 2, 3)
    x = torch.randn(5, 3, 4, dtype=torch.double, requires_grad=True)
    real = build_graph(lengths, 1, torch.device("cpu")).utterance_steps   # t·B + b
    assert sorted(real.tolist()) == sorted(t * 3 + b for b, n in enumerate(lengths) for t in range(n))
    mask = torch.zeros(5, 3, 1, dtype=torch.double)                       # [T, B, 1]
    mask.view(-1, 1)[real] = 1.0
    want, got = gru(x)[0] * mask, bidirectional_gru(gru, x, real) * mask
    _assert_same_function(got, want, [x, *gru.parameters()])
    # the skipped part: the forward direction past a dialogue's end is not nn.GRU's there
    unmasked = bidirectional_gru(gru, x, real)
    assert (unmasked[3:, 1, :3] - gru(x)[0][3:, 1, :3]).abs().max() > 1e-6
    # while the reverse direction at real steps still reads the padding (as nn.GRU does)
    assert_close(unmasked[:2, 1, 3:], gru(x)[0][:2, 1, 3:], rtol=0, atol=1e-12)


def test_distinct_rows_give_nn_grus_output_and_gradients():
    # x [T=4, B=3] given as 7 distinct rows, step (t, b) reading row step_rows[t, b]; rows 4, 5
    # and 6 are each read by two or three steps.
    gru = _gru(4, 3, 2)
    step_rows = torch.tensor([[0, 1, 2], [3, 5, 4], [6, 5, 4], [6, 5, 4]])
    rows = torch.randn(7, 4, dtype=torch.double, requires_grad=True)
    x = rows[step_rows]                                        # [4, 3, 4]; autograd sums over the copies
    want, got = gru(x)[0], bidirectional_gru(gru, rows, step_rows=step_rows)
    assert got.shape == (4, 3, 6)
    _assert_same_function(got, want, [rows, *gru.parameters()])


def _count_lanes(monkeypatch) -> list[int]:
    """The number of cotangents of each backward run of the GRU, from now on."""
    lanes, real = [], rnn._stack_backward
    monkeypatch.setattr(rnn, "_stack_backward", lambda plan, saved, g: (lanes.append(g.shape[2]), real(plan, saved, g))[1])
    return lanes


def _two_passes(gru, x, cotangents, expect: bool):
    """Gradients of both cotangents' backward passes (x and every parameter)."""
    torch.manual_seed(1)
    # (b, t): (0, 0..5), (1, 1), (1, 2), as sequence-first positions t·B + b with B = 2
    out = bidirectional_gru(gru, x, real_steps=torch.tensor([0, 2, 4, 6, 8, 10, 3, 5]))
    if expect:
        assert expect_cotangent(out, cotangents[1])
    inputs = [x, *gru.parameters()]
    first = torch.autograd.grad(out, inputs, cotangents[0], retain_graph=True)
    return first, torch.autograd.grad(out, inputs, cotangents[1])


def test_an_expected_cotangent_is_computed_in_the_first_pass_with_the_same_gradients(monkeypatch):
    gru = _gru(4, 3, 2, dropout=0.3)                        # dropout: both passes see the same masks
    x = torch.randn(6, 2, 4, dtype=torch.double, requires_grad=True)
    cotangents = torch.randn(2, 6, 2, 6, dtype=torch.double)
    cotangents[:, 4:, 1] = 0                                # the real steps: 6 of dialogue 0, 2 of dialogue 1
    cotangents[:, 2:4, 1, :3] = 0
    lanes = _count_lanes(monkeypatch)
    want = _two_passes(gru, x, cotangents, expect=False)
    got = _two_passes(gru, x, cotangents, expect=True)
    assert lanes == [1, 1, 2]                               # the second pass took the kept gradients
    for w, g in zip(want, got):
        for a, b in zip(w, g):
            assert_close(b, a, rtol=0, atol=1e-12)


@pytest.mark.parametrize("other", ["another tensor", "the expected one, changed in place"])
def test_a_pass_with_another_cotangent_than_the_expected_one_is_computed_afresh(monkeypatch, other):
    gru = _gru(4, 3, 2)
    x = torch.randn(6, 2, 4, dtype=torch.double, requires_grad=True)
    expected = torch.randn(6, 2, 6, dtype=torch.double)
    lanes = _count_lanes(monkeypatch)
    out = bidirectional_gru(gru, x)
    assert expect_cotangent(out, expected)
    torch.autograd.grad(out, [x], torch.ones_like(out), retain_graph=True)
    used = torch.randn_like(expected) if other == "another tensor" else expected.mul_(2)
    got = torch.autograd.grad(out, [x, *gru.parameters()], used)
    want = torch.autograd.grad(gru(x)[0], [x, *gru.parameters()], used)
    assert lanes == [2, 1]
    for a, b in zip(want, got):
        assert_close(b, a, rtol=0, atol=1e-11)
    assert not expect_cotangent(gru(x)[0], expected)         # nn.GRU's own output: nothing to tell


def test_a_pass_after_the_graph_is_freed_and_a_misshapen_cotangent_are_refused():
    gru = _gru(4, 3, 2)
    x = torch.randn(5, 2, 4, dtype=torch.double, requires_grad=True)
    c1, c2 = torch.randn(5, 2, 6, dtype=torch.double), torch.randn(5, 2, 6, dtype=torch.double)
    # A second pass after the graph was freed is refused, kept gradients or not.
    out = bidirectional_gru(gru, x)
    expect_cotangent(out, c2)
    torch.autograd.grad(out, [x], c1)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(out, [x], c2)
    with pytest.raises(ValueError, match=r"a cotangent of shape \(5, 2, 3\) for an output of shape \(5, 2, 6\)"):
        expect_cotangent(bidirectional_gru(gru, x), c2[..., :3])


# model/cuda_graphs.py captures the GPU's context RNN one layer per cuDNN call, F.dropout between
# layers; here, on the CPU, that layering must compute what the module itself computes.
@pytest.mark.parametrize("kind", [torch.nn.GRU, torch.nn.LSTM])
@pytest.mark.parametrize("training", [False, True])
def test_layered_rnn_is_the_module_itself(kind, training):
    torch.manual_seed(0)
    rnn = kind(6, 5, num_layers=3, bidirectional=True, dropout=0.4).double().train(training)
    x = torch.randn(7, 3, 6, dtype=torch.double, requires_grad=True)
    torch.manual_seed(1)
    want = rnn(x)[0]
    torch.manual_seed(1)                       # the same dropout masks, drawn in the same order
    got = layered_rnn(rnn, x)
    assert got.shape == (7, 3, 10)
    _assert_same_function(got, want, [x, *rnn.parameters()])


def test_cuda_graphs_apply_only_to_trained_rnns_on_the_gpu():
    gru, x = _gru(6, 5, 2), torch.randn(4, 2, 6, dtype=torch.double)
    assert not can_graph(gru, x)                                   # a CPU input
    assert not can_graph(torch.nn.Linear(6, 5), x)


class _Graph:
    """Stands in for torch.cuda.CUDAGraph: records the calls; capture_begin may fail."""

    def __init__(self, begin_error: Exception | None = None, end_error: Exception | None = None):
        self.calls, self.begin_error, self.end_error = [], begin_error, end_error

    def capture_begin(self, pool, capture_error_mode):
        self.calls.append(("begin", capture_error_mode))
        if self.begin_error:
            raise self.begin_error

    def capture_end(self):
        self.calls.append(("end",))
        if self.end_error:
            raise self.end_error


def test_a_failed_capture_is_ended_and_says_how_to_train_without_graphs():
    graph = _Graph()
    with pytest.raises(CudaGraphError) as failed:
        with capturing(graph, pool=None):
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
    assert graph.calls == [("begin", "thread_local"), ("end",)]          # the capture was ended
    assert str(failed.value) == ("capturing a CUDA graph failed (operation not permitted when stream is capturing); "
                                 "--no-cuda-graphs trains without them")
    assert isinstance(failed.value.__cause__, RuntimeError)
    graph = _Graph(begin_error=RuntimeError("CUDA error: out of memory"))
    with pytest.raises(CudaGraphError, match=r"failed \(CUDA error: out of memory\); --no-cuda-graphs"):
        with capturing(graph, pool=None):
            pass
    assert graph.calls == [("begin", "thread_local")]                  # nothing begun, nothing to end
    # An op that fails in a capture invalidates it: ending it fails as well, and the op's error is the one named.
    graph = _Graph(end_error=RuntimeError("operation failed due to a previous error during capture"))
    with pytest.raises(CudaGraphError, match=r"failed \(an illegal op\); --no-cuda-graphs") as failed:
        with capturing(graph, pool=None):
            raise RuntimeError("an illegal op")
    assert graph.calls == [("begin", "thread_local"), ("end",)]
    # A capture whose work went through but that cannot be ended is reported as such.
    with pytest.raises(CudaGraphError, match=r"failed \(operation failed due to a previous error during capture\)"):
        with capturing(graph, pool=None):
            pass
