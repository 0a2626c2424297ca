"""The context RNN on the GPU, replayed from CUDA graphs: one forward and one backward graph per
input shape.

Why: on the GPU a training step is bound by the host, not the arithmetic. cuDNN's GRU launches
the kernels of every time step of every layer and direction one by one, and a DGS step runs
two backwards through it: about a third of the step's host time at MELD's lengths. Replaying a
captured graph is one launch.

Shapes: the input is the padded batch [T, B, D], T the batch's longest dialogue (the reverse
direction reads the padded steps, as in the reference, so T cannot be rounded up). A dataset
has a few dozen (T, B); each is captured the first time it is seen (two warm-up runs and the
capture, tens of milliseconds) and replayed in every later epoch.

The layers run as separate cuDNN calls with `F.dropout` between them (on the CPU `model/rnn.py`
draws `F.dropout`'s masks, `model/dropout.py`), rather than with cuDNN's own inter-layer
dropout: that keeps its random state in a buffer which `torch.manual_seed` replaces (a captured
graph would go on using the freed one), while torch's generator is advanced by every replay, so
each step draws a new mask.

Memory: each shape's graphs keep their input, output, and what the backward reads (cuDNN's
reserve space, the dropout mask, the first layer's output): tens of MB per shape at M3Net's
sizes. Their scratch memory is shared by all shapes of the module, so one shape's replay may
overwrite what another shape's forward left for its backward: the backward must come before the
module's next forward (a training step does just that), and a backward through an earlier
forward is refused with an error. The weight gradients of all shapes go to one shared buffer,
copied out after each backward.

Fail-safe: a capture that fails (an error of CUDA's or cuDNN's), or a shape's first replay whose
output or first gradients differ from the eager computation's beyond float32 rounding
(`_FirstReplay`, `rounding_error_bound`), sends that RNN back to eager for the rest of its life,
as without graphs, and leaves a line for the run's log (`take_fallback_notices`). The checks and
the decision take no GPU: `graphed_or_eager` is given the replay to use.
"""
from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.backends.cudnn import rnn as cudnn_rnn

from utils.cuda_capture import (WARMUP_RUNS, capturing, drawing_from, fallback_notice, first_line, generator_state,
                                mismatch, rounding_tolerance)


def context_rnn(rnn: nn.Module, x: torch.Tensor, cuda_graphs: bool = True) -> torch.Tensor:
    """rnn(x)[0] for x [T, B, D]: from CUDA graphs where they apply (`can_graph`) and have not
    failed (`graphed_or_eager`), else eagerly."""
    if cuda_graphs and can_graph(rnn, x):
        return graphed_or_eager(rnn, x)
    return _eager(rnn, x)


def _eager(rnn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    graphs = _GRAPHS.get(rnn)
    if graphs is not None:
        if graphs.fits(rnn) and rnn not in _FALLEN_BACK:
            return layered_rnn(rnn, x)   # its weights are laid out per layer now (`_flatten_per_layer`)
        del _GRAPHS[rnn]                 # stale (the weights moved) or given up: free their memory
        if rnn in _FALLEN_BACK:
            rnn.flatten_parameters()     # nn.GRU's own weight layout again, as without graphs
    return rnn(x)[0]


def can_graph(rnn: nn.Module, x: torch.Tensor) -> bool:
    """Whether `graphed_rnn` applies: a sequence-first GRU or LSTM with biases and no projection
    (the layout `layered_rnn` reads), in training (cuDNN has no backward outside it), all its
    parameters trainable, gradients on, a CUDA input, no other capture going on."""
    return (isinstance(rnn, (nn.GRU, nn.LSTM)) and not rnn.batch_first and rnn.bias and not rnn.proj_size
            and rnn.training and x.is_cuda and torch.is_grad_enabled()
            and all(p.requires_grad for p in rnn.parameters()) and not torch.cuda.is_current_stream_capturing())


def layered_rnn(rnn: nn.GRU | nn.LSTM, x: torch.Tensor, weights: list[torch.Tensor] | None = None) -> torch.Tensor:
    """`rnn(x)[0]` (sequence-first, zero initial state) for x [T, B, D], one layer per call and
    `F.dropout` between layers: [T, B, H · directions]. With dropout on the GPU the same in
    distribution only (cuDNN's own dropout draws other masks); exactly so on the CPU. `weights`:
    stand-ins for `rnn.parameters()`, in their order (per layer, per direction: w_ih, w_hh,
    b_ih, b_hh)."""
    directions = 2 if rnn.bidirectional else 1
    zeros = x.new_zeros(directions, x.shape[1], rnn.hidden_size)
    for layer, layer_weights in enumerate(_per_layer(rnn, weights)):
        if layer > 0:
            x = F.dropout(x, rnn.dropout, rnn.training)
        if isinstance(rnn, nn.LSTM):
            x = torch.lstm(x, (zeros, zeros), layer_weights, True, 1, 0.0, rnn.training, rnn.bidirectional, False)[0]
        else:
            x = torch.gru(x, zeros, layer_weights, True, 1, 0.0, rnn.training, rnn.bidirectional, False)[0]
    return x


def graphed_rnn(rnn: nn.GRU | nn.LSTM, x: torch.Tensor) -> torch.Tensor:
    """`layered_rnn(rnn, x)` for a CUDA x, replayed from the CUDA graphs of x's shape (captured
    on first sight); differentiable in x and the RNN's parameters. Unchecked: training goes
    through `graphed_or_eager`."""
    replay, _ = _replay_for(rnn, x)
    return replay(x, *rnn.parameters())


def _replay_for(rnn: nn.GRU | nn.LSTM, x: torch.Tensor) -> tuple[Callable[..., torch.Tensor], bool]:
    """The replay of x's shape as a differentiable function of (x, *rnn.parameters()), and
    whether its graphs were captured by this call."""
    graphs = _GRAPHS.get(rnn)
    if graphs is None or not graphs.fits(rnn):
        graphs = _GRAPHS[rnn] = _RNNGraphs(rnn)
    key = (tuple(x.shape), x.dtype)
    shape = graphs.shapes.get(key)
    captured = shape is None
    if captured:
        shape = graphs.capture(rnn, x, key)
    return functools.partial(_Replay.apply, shape, graphs), captured


def graphed_or_eager(rnn: nn.GRU | nn.LSTM, x: torch.Tensor,
                     replay_for: Callable[[nn.Module, torch.Tensor], tuple[Callable[..., torch.Tensor], bool]]
                     = _replay_for) -> torch.Tensor:
    """`layered_rnn(rnn, x)` from CUDA graphs, `replay_for(rnn, x)` giving the replay of x's shape
    and whether it was captured just now; that first replay is checked (`_FirstReplay`). Once a
    capture failed or a first replay differed, `rnn(x)[0]` eagerly, as without graphs."""
    if rnn not in _FALLEN_BACK:
        try:
            replay, captured = replay_for(rnn, x)
        except RuntimeError as e:        # a CudaGraphError, or CUDA's own in a warm-up run
            _fall_back(rnn, f"capturing its CUDA graphs failed ({first_line(e)})")
        else:
            params = list(rnn.parameters())
            return _FirstReplay.apply(rnn, replay, x, *params) if captured else replay(x, *params)
    return _eager(rnn, x)


def _per_layer(rnn: nn.GRU | nn.LSTM, weights: list[torch.Tensor] | None = None) -> list[list[torch.Tensor]]:
    """`weights` (default: `rnn.parameters()`, in their order) split into the layers' lists."""
    weights = list(rnn.parameters()) if weights is None else weights
    per_layer = len(weights) // rnn.num_layers
    return [weights[layer * per_layer:(layer + 1) * per_layer] for layer in range(rnn.num_layers)]


def _flatten_per_layer(rnn: nn.GRU | nn.LSTM) -> None:
    """Give each layer's parameters a cuDNN weight buffer of their own, as nn.GRU does for all
    layers together (`flatten_parameters`). A one-layer cuDNN call then reads its weights where
    they are; otherwise cuDNN packs them into a new buffer on every call, which a graph keeps
    for its backward: one copy of the layer's weights (19 MB for M3Net's GRU) per shape."""
    directions = 2 if rnn.bidirectional else 1
    with torch.no_grad():
        for layer, layer_weights in enumerate(_per_layer(rnn)):
            input_size = rnn.input_size if layer == 0 else rnn.hidden_size * directions
            try:
                torch._cudnn_rnn_flatten_weight(layer_weights, 4, input_size, cudnn_rnn.get_cudnn_mode(rnn.mode),
                                                rnn.hidden_size, 0, 1, False, rnn.bidirectional)
            except (RuntimeError, TypeError, AttributeError):   # no cuDNN here: it packs the weights instead
                return


@dataclass
class _ShapeGraphs:
    forward: torch.cuda.CUDAGraph
    backward: torch.cuda.CUDAGraph
    x: torch.Tensor              # static input (its gradient is computed)
    y: torch.Tensor              # static output; its autograd graph holds what the backward reads
    grad_y: torch.Tensor         # static incoming gradient
    grad_x: torch.Tensor         # static gradient of x


class _RNNGraphs:
    """The captured shapes of one RNN module, their memory pool and shared gradient buffer."""

    def __init__(self, rnn: nn.Module):
        _flatten_per_layer(rnn)
        self.params = list(rnn.parameters())
        self.param_ptrs = [p.data_ptr() for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.grads = self.params[0].new_empty(sum(self.sizes))
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(self.params[0].device)
        self.shapes: dict[tuple, _ShapeGraphs] = {}
        self.runs = 0       # forwards replayed so far: a backward must come before the next one

    def fits(self, rnn: nn.Module) -> bool:
        """False once the parameters were replaced or moved (`.to()`, `flatten_parameters()`):
        the graphs read and write the old addresses, and return gradients for the old tensors."""
        params = list(rnn.parameters())
        return (len(params) == len(self.params) and all(p is q for p, q in zip(params, self.params))
                and [p.data_ptr() for p in params] == self.param_ptrs)

    def capture(self, rnn: nn.Module, x: torch.Tensor, key: tuple) -> _ShapeGraphs:
        static_x = x.detach().clone().requires_grad_()
        # The graphs differentiate aliases of the parameters (same memory): the autograd graph
        # kept for the backward's saved state then holds no node of the parameters themselves,
        # whose gradient accumulators belong to the eager steps' stream.
        inputs = [static_x, *(p.detach().requires_grad_() for p in self.params)]
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream), warnings.catch_warnings():
            # Where `_flatten_per_layer` could not lay the weights out, cuDNN packs them itself,
            # inside the graph (each replay reads the current weights); its warning about the
            # cost of that is meant for eager calls.
            warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous")
            # The warm-ups draw dropout masks: the generator is restored after them, so a run's
            # numbers do not depend on when a shape was first seen (a resumed run captures anew).
            with torch.random.fork_rng(devices=[static_x.device]):
                for _ in range(WARMUP_RUNS):
                    y = layered_rnn(rnn, static_x, inputs[1:])
                    torch.autograd.grad(y, inputs, torch.ones_like(y))
            forward, backward = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with capturing(forward, self.pool):
                static_y = layered_rnn(rnn, static_x, inputs[1:])
            grad_y = torch.empty_like(static_y)
            with capturing(backward, self.pool):
                grad_x, *grad_params = torch.autograd.grad(static_y, inputs, grad_y, retain_graph=True)
                torch.cat([g.reshape(-1) for g in grad_params], out=self.grads)
        torch.cuda.current_stream().wait_stream(self.stream)
        self.shapes[key] = _ShapeGraphs(forward, backward, static_x, static_y, grad_y, grad_x)
        return self.shapes[key]


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shape: _ShapeGraphs, graphs: _RNNGraphs, x: torch.Tensor, *params: torch.Tensor):
        shape.x.copy_(x)
        shape.forward.replay()
        graphs.runs += 1
        ctx.shape, ctx.graphs, ctx.run = shape, graphs, graphs.runs
        return shape.y.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        shape, graphs = ctx.shape, ctx.graphs
        if graphs.runs != ctx.run:
            raise RuntimeError("backward through a CUDA-graphed RNN forward after a later forward of the same "
                               "RNN, which reuses its memory; run each backward before the next forward "
                               "(or turn the graphs off: --no-cuda-graphs)")
        shape.grad_y.copy_(grad_y)
        shape.backward.replay()
        grads = graphs.grads.clone().split(graphs.sizes)
        return None, None, shape.grad_x.clone(), *(g.view_as(p) for g, p in zip(grads, graphs.params))


_GRAPHS: weakref.WeakKeyDictionary[nn.Module, _RNNGraphs] = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------- falling back to eager
def _sum_lengths(rnn: nn.GRU | nn.LSTM, x: torch.Tensor) -> tuple[int, int]:
    """How many terms are summed, along all the sums it depends on, into an element of the RNN's
    output and into one of its gradients (the n of `rounding_error_bound`).

    Output: every step's pre-activations sum D_l + H products and two biases (D_l: the layer's
    input width), and an output element depends on those of up to T steps in every layer; the
    gates pass errors on with a slope of at most one (tanh, the sigmoid, convex state updates),
    and the recurrence is taken not to amplify them (it would make the gradients explode).
    Gradients: the output's sums (the backward reads the forward's activations), then at every
    step of every layer those over the gates (G·H of them, G = 3 for a GRU, 4 for an LSTM) for
    the hidden state's gradient and over both directions' gates for the input's; a weight's
    gradient last sums over the T·B rows. The terms' sizes are taken as the result's: each
    tensor's tolerance is `rounding_tolerance(n, max|eager result|)`. Where a result cancels
    large terms its bound is too small and the check errs on the side of eager: a false alarm
    costs speed, not correctness.
    """
    steps, batch = x.shape[0], x.shape[1]
    directions = 2 if rnn.bidirectional else 1
    gates = 4 if isinstance(rnn, nn.LSTM) else 3
    widths = [rnn.input_size] + [rnn.hidden_size * directions] * (rnn.num_layers - 1)
    forward = steps * sum(width + rnn.hidden_size + 2 for width in widths)
    backward = forward + steps * (rnn.num_layers * gates * rnn.hidden_size * (1 + directions) + batch)
    return forward, backward


class _FirstReplay(torch.autograd.Function):
    """A shape's first replay, checked against `layered_rnn` on the same inputs and dropout
    masks: the forward output, then the gradients of the first backward. Where they differ
    (`_sum_lengths`), the eager results are returned, for this call and its later backwards, and
    the RNN goes back to eager."""

    @staticmethod
    def forward(ctx, rnn: nn.GRU | nn.LSTM, replay: Callable[..., torch.Tensor], x: torch.Tensor,
                *params: torch.Tensor) -> torch.Tensor:
        drawn_from = generator_state(x.device)
        with torch.enable_grad():
            # Aliases of the inputs (same memory), differentiated in the backward through each
            # computation's own autograd graph.
            inputs = [x.detach().requires_grad_(), *(p.detach().requires_grad_() for p in params)]
            graphed = replay(*inputs)
            with drawing_from(drawn_from, x.device):
                eager = layered_rnn(rnn, inputs[0], inputs[1:])
        forward_terms, ctx.backward_terms = _sum_lengths(rnn, x)
        why = mismatch("the output", graphed, eager, rounding_tolerance(forward_terms, eager.abs().max().item()))
        ctx.rnn, ctx.inputs, ctx.shape = rnn, inputs, tuple(x.shape)
        ctx.graphed, ctx.eager = (None if why else graphed), eager
        if why:
            _fall_back(rnn, f"the first replay of its graphs for input {ctx.shape}: {why}")
        return (eager if why else graphed).detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        if ctx.graphed is not None and ctx.eager is not None:
            got = torch.autograd.grad(ctx.graphed, ctx.inputs, grad_y, retain_graph=True)
            want = torch.autograd.grad(ctx.eager, ctx.inputs, grad_y, retain_graph=True)
            names = ["the input's gradient", *(f"the gradient of {name}" for name, _ in ctx.rnn.named_parameters())]
            for name, g, w in zip(names, got, want):
                why = mismatch(name, g, w, rounding_tolerance(ctx.backward_terms, w.abs().max().item()))
                if why:
                    _fall_back(ctx.rnn, f"the first replay of its graphs for input {ctx.shape}: {why}")
                    ctx.graphed = None
                    return None, None, *want
            ctx.eager = None                 # checked: later backwards replay alone
            return None, None, *got
        chosen = ctx.eager if ctx.graphed is None else ctx.graphed
        return None, None, *torch.autograd.grad(chosen, ctx.inputs, grad_y, retain_graph=True)


@dataclass
class _Fallback:
    reason: str
    reported: bool = False


# RNNs sent back to eager, for the rest of their life; a weak key, as `_GRAPHS`.
_FALLEN_BACK: weakref.WeakKeyDictionary[nn.Module, _Fallback] = weakref.WeakKeyDictionary()


def _fall_back(rnn: nn.Module, reason: str) -> None:
    _FALLEN_BACK.setdefault(rnn, _Fallback(reason))


def take_fallback_notices(model: nn.Module) -> list[str]:
    """One line for the run's log for each RNN in `model` sent back to eager since the last call."""
    if all(fallback.reported for fallback in _FALLEN_BACK.values()):
        return []                        # every step asks: most of the time, nothing to look for
    notices = []
    for name, module in model.named_modules():
        fallback = _FALLEN_BACK.get(module)
        if fallback is not None and not fallback.reported:
            fallback.reported = True
            notices.append(fallback_notice(f"the context RNN {name or type(module).__name__}", fallback.reason))
    return notices
