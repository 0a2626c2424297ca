"""A bidirectional multi-layer GRU for the CPU, computing exactly what `nn.GRU` computes.

PyTorch's CPU `nn.GRU` backward is autograd over the unrolled cell: at every time step it forms a
full [3H, H] weight gradient and adds it to the running sum, so the backward reads and writes the
recurrent weights several times per step. Here the whole stack is one autograd Function: its
backward loop carries only the hidden-state gradient (one matrix product per step, both
directions at once); the weight gradients are one large product over all time steps at the end,
and the input projection of every step is one product before the loop. Parameters are those of
the `nn.GRU` passed in (checkpoint names and initialisation unchanged). Equations per direction,
gates ordered (r, z, n) as in `nn.GRU`:

    r_t = σ(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)
    z_t = σ(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
    n_t = tanh(W_in x_t + b_in + r_t ⊙ (W_hn h_{t-1} + b_hn))
    h_t = (1 - z_t) ⊙ n_t + z_t ⊙ h_{t-1}

Two backward passes in one. A DGS step differentiates the encoders twice, for L_mm and for ΣL_m
(utils/dgs/step.py). On the CPU the backward recurrence is bound by reading W_hh (6 MB at M3Net's
sizes) for a product with only B rows at every step, so a second cotangent, carried as more rows
of the same products, costs far less than a second pass. `expect_cotangent(output, c)` tells the
GRU that computed `output` the cotangent c of a later backward pass: the next backward pass
through it computes the gradients for both, and the pass that brings c gets the kept ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from model.dropout import dropout_mask
from model.padding import expand_rows, project_rows

WEIGHTS_PER_LAYER = 8    # W_ih, b_ih, W_hh, b_hh, each forward and reverse


@dataclass(frozen=True)
class _Plan:
    """What the GRU's Function needs besides its differentiable inputs."""
    num_layers: int
    dropout: float                     # on the input of every layer after the first, when training
    training: bool
    step_rows: torch.Tensor | None     # the input is distinct rows [R, D], step (t, b) reading row step_rows[t, b]
    read_rows: torch.Tensor | None     # steps t·B + b whose last-layer forward output is read; None: all


def _layer_weights(gru: nn.GRU, layer: int) -> list[nn.Parameter]:
    names = [f"l{layer}", f"l{layer}_reverse"]
    return [getattr(gru, f"{kind}_{name}") for kind in ("weight_ih", "bias_ih", "weight_hh", "bias_hh")
            for name in names]


def bidirectional_gru(gru: nn.GRU, x: torch.Tensor, real_steps: torch.Tensor | None = None,
                      step_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Output of `gru` (bidirectional, sequence-first, zero initial state) for x [T, B, D]: [T, B, 2H].

    step_rows [T, B]: x is given as its distinct rows [R, D] instead, step (t, b) reading row
    step_rows[t, b] (`model/padding.py: distinct_rows`); the first layer's input projection is then
    computed once per distinct row.
    real_steps: sequence-first positions t·B + b of the real (unpadded) steps
    (`DialogueGraph.utterance_steps`), for a caller that reads the output there only. The last layer's forward direction then works on those steps only (its input
    projection, unless x is given as distinct rows, and its W_hh gradient): its outputs at the
    padding are read by no later step, so they, and gradients through them, are left unspecified.
    The reverse direction still starts at the last padded step.
    """
    plan = _Plan(gru.num_layers, gru.dropout, gru.training, step_rows, real_steps)
    weights = [w for layer in range(gru.num_layers) for w in _layer_weights(gru, layer)]
    return _BidirectionalGRU.apply(plan, x, *weights)


def expect_cotangent(output: torch.Tensor, cotangent: torch.Tensor) -> bool:
    """Tell the GRU that computed `output` (`bidirectional_gru`) the cotangent of a later backward
    pass: the next pass through it then computes that pass's gradients too, and keeps them for the
    first later pass that brings an equal cotangent (the tensor itself unchanged, or equal values;
    any other pass computes afresh). False, and nothing done, for a tensor from anything else."""
    node = output.grad_fn
    if not isinstance(node, _BidirectionalGRU._backward_cls):
        return False
    if cotangent.shape != output.shape:
        raise ValueError(f"a cotangent of shape {tuple(cotangent.shape)} for an output of shape {tuple(output.shape)}")
    node.next_cotangent = cotangent
    return True


class _Layer(NamedTuple):
    """What the backward reads of one layer."""
    x: torch.Tensor | None          # its input after dropout (None for the first: the Function's input)
    mask: torch.Tensor | None       # the dropout mask on that input, scaled by 1/(1-p)
    states: torch.Tensor            # h_0..h_T, as `_recurrence` returns them
    gates: torch.Tensor
    pre: torch.Tensor


class _BidirectionalGRU(torch.autograd.Function):
    """All layers of a bidirectional GRU: input projections, recurrences, dropout between layers."""

    @staticmethod
    def forward(ctx, plan: _Plan, x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        inputs, layers = x, []
        for layer in range(plan.num_layers):
            w_ih, b_ih, w_hh, b_hh = _pairs(weights, layer)
            mask = None
            if layer > 0 and plan.training and plan.dropout > 0:
                mask = dropout_mask(x, plan.dropout)               # F.dropout's: the same for the same seed
                x = x * mask
            step_rows = plan.step_rows if layer == 0 else None
            read_rows = plan.read_rows if layer == plan.num_layers - 1 else None
            gi_forward = _project(x, w_ih[0], b_ih[0], step_rows, read_rows)
            gi_reverse = _project(x, w_ih[1], b_ih[1], step_rows, None)
            states, gates, pre = _recurrence(torch.stack([gi_forward, gi_reverse.flip(0)], dim=1), w_hh, b_hh)
            layers += _Layer(x if layer > 0 else None, mask, states, gates, pre)
            x = torch.cat([states[1:, 0], states[1:, 1].flip(0)], dim=-1)
        # Intermediates too: autograd frees them after the last pass, and refuses a pass after
        # that, or after an in-place change to any of them.
        ctx.save_for_backward(inputs, *weights, *layers)
        ctx.plan = plan
        ctx.next_cotangent, ctx.kept = None, None
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        saved = ctx.saved_tensors              # read on every pass: autograd's checks apply to the kept path too
        if ctx.kept is not None:
            cotangent, version, grads = ctx.kept
            ctx.kept = None
            if cotangent._version == version and (grad_output is cotangent or torch.equal(grad_output, cotangent)):
                return (None, *grads)
        lanes = [grad_output] if ctx.next_cotangent is None else [grad_output, ctx.next_cotangent]
        per_lane = _stack_backward(ctx.plan, saved, torch.stack(lanes, dim=2))
        if len(lanes) == 2:
            ctx.kept, ctx.next_cotangent = (lanes[1], lanes[1]._version, per_lane[1]), None
        return (None, *per_lane[0])


def _pairs(weights, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(forward, reverse) pairs of W_ih, b_ih, W_hh, b_hh of one layer."""
    own = weights[WEIGHTS_PER_LAYER * layer: WEIGHTS_PER_LAYER * (layer + 1)]
    return [(own[i], own[i + 1]) for i in range(0, WEIGHTS_PER_LAYER, 2)]


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, step_rows: torch.Tensor | None,
             read_rows: torch.Tensor | None) -> torch.Tensor:
    """W x_t + b for every step: [T, B, 3H]; with read_rows, at those steps only (0 elsewhere)."""
    if step_rows is not None:
        return expand_rows(torch.addmm(bias, x, weight.t()), step_rows)
    if read_rows is None:
        return torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight.t()).view(*x.shape[:2], -1)
    return project_rows(lambda rows: torch.addmm(bias, rows, weight.t()), x, read_rows)


def _recurrence(gi: torch.Tensor, w_hh: tuple[torch.Tensor, torch.Tensor], b_hh: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both directions of one layer. gi [T, 2, B, 3H]: W_i x_t + b_i, direction 1 reversed in time.

    Returns h_0..h_T [T+1, 2, B, H] (h_0 = 0; direction 1 in its own time order), the gates
    (r, z, n) [T, 2, B, 3H], and `pre` [T, 2, B, 3H]: the pre-activations of r and z, then
    W_hn h_{t-1} + b_hn (what r multiplies).
    """
    steps, dirs, batch, three_h = gi.shape
    hidden = three_h // 3
    # W_hᵀ per direction: bmm copies a transposed operand at every step; a 2-D copy_ of a
    # transpose is the fast one.
    w_t = gi.new_empty(dirs, hidden, three_h)
    for d in range(dirs):
        w_t[d].copy_(w_hh[d].t())
    # Each step adds W_h h_{t-1} to this in place: r and z get their whole pre-activation,
    # n its W_hn h_{t-1} + b_hn.
    b_rz, b_n = torch.stack(b_hh)[:, None, :].split([2 * hidden, hidden], -1)
    pre = torch.cat([gi[..., : 2 * hidden] + b_rz, b_n.expand(steps, dirs, batch, hidden)], dim=-1)
    states = gi.new_zeros(steps + 1, dirs, batch, hidden)
    gates = gi.new_empty(steps, dirs, batch, three_h)
    # Views per step, made once: in the loop, indexing would cost as much as the small ops.
    h, pre_t, gi_n = states.unbind(0), pre.unbind(0), gi[..., 2 * hidden:].unbind(0)
    pre_rz, hn = _per_step(pre, [2 * hidden, hidden])
    rz, n = _per_step(gates, [2 * hidden, hidden])
    r, z, _ = _per_step(gates, [hidden] * 3)
    for t in range(steps):
        torch.baddbmm(pre_t[t], h[t], w_t, out=pre_t[t])       # not baddbmm_: the profiler counts no FLOPs for it
        torch.sigmoid(pre_rz[t], out=rz[t])
        torch.tanh(torch.addcmul(gi_n[t], r[t], hn[t]), out=n[t])
        torch.lerp(n[t], h[t], z[t], out=h[t + 1])
    return states, gates, pre


def _per_step(x: torch.Tensor, sizes: list[int], dim: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """x split along its last dimension into `sizes`; of each part, the views per step (along `dim`)."""
    return [part.unbind(dim) for part in x.split(sizes, -1)]


def _stack_backward(plan: _Plan, saved: tuple, grad_output: torch.Tensor) -> list[list[torch.Tensor]]:
    """Gradients in the Function's input order (x, then the weights), for each of the K cotangents
    in grad_output [T, B, K, 2H]: K lists. The cotangents share every matrix product as rows."""
    n_weights = WEIGHTS_PER_LAYER * plan.num_layers
    inputs, weights = saved[0], saved[1: 1 + n_weights]
    layers = [_Layer(*saved[i: i + len(_Layer._fields)]) for i in range(1 + n_weights, len(saved), len(_Layer._fields))]
    lanes = grad_output.shape[2]
    grads: list[list[torch.Tensor | None]] = [[None] * len(weights) for _ in range(lanes)]
    grad_x = grad_output
    for layer in reversed(range(plan.num_layers)):
        x, mask, states, gates, pre = layers[layer]
        x = inputs if layer == 0 else x
        w_ih, _, w_hh, _ = _pairs(weights, layer)
        hidden = w_hh[0].shape[1]
        step_rows = plan.step_rows if layer == 0 else None
        read_rows = plan.read_rows if layer == plan.num_layers - 1 else None
        grad_states = torch.stack([grad_x[..., :hidden], grad_x[..., hidden:].flip(0)], dim=1)   # [T, 2, B, K, H]
        grad_gi, grad_w_hh, grad_b_hh = _recurrence_backward(grad_states, torch.stack(w_hh), states, gates, pre,
                                                             read_rows)
        # The reverse direction's rows are in reversed time: pair them with the input reversed.
        # With distinct rows the projection was computed at every step (`_project`).
        grad_x, grad_w_ih, grad_b_ih = _projection_backward(
            [grad_gi[0], grad_gi[1]], x, w_ih, [step_rows, None if step_rows is None else step_rows.flip(0)],
            [read_rows if step_rows is None else None, None])
        if mask is not None:
            grad_x = grad_x * mask.unsqueeze(-2)
        start = WEIGHTS_PER_LAYER * layer
        for k in range(lanes):
            grads[k][start: start + WEIGHTS_PER_LAYER] = [*grad_w_ih[k], *grad_b_ih[k], *grad_w_hh[k], *grad_b_hh[k]]
    return [[grad_x[..., k, :], *grads[k]] for k in range(lanes)]


def _recurrence_backward(grad_states: torch.Tensor, w_hh: torch.Tensor, states: torch.Tensor, gates: torch.Tensor,
                         pre: torch.Tensor, read_rows: torch.Tensor | None):
    """Backward of `_recurrence` for K cotangents at once.

    grad_states [T, 2, B, K, H] (direction 1 in its own time order), w_hh [2, 3H, H].
    read_rows: steps t·B + b of direction 0 whose outputs are read; at all others its gradient
    is exactly 0 (no read step comes after them), so W_hh's gradient is summed over these only.
    Returns ∂(W_i x + b_i) [2, T, B, K, 3H], and per cotangent ∂W_hh and ∂b_hh of both directions.
    """
    steps, dirs, batch, lanes, hidden = grad_states.shape
    three_h = 3 * hidden
    r, z, n = gates.unsqueeze(3).chunk(3, -1)                  # [T, 2, B, 1, H]: shared by the cotangents
    h_prev = states[:-1].unsqueeze(3)
    # What ∂h_t is multiplied by to give ∂ of each pre-activation, for all steps at once
    # (none depends on the cotangent): pre_n ← ∂h_t, pre_z ← ∂h_t, pre_r ← ∂pre_n.
    n_factor = (1 - z) * (1 - n * n)
    z_factor = (h_prev - n) * z * (1 - z)
    r_factor = pre[..., 2 * hidden:].unsqueeze(3) * r * (1 - r)
    grad_gi = grad_states.new_empty(dirs, steps, batch, lanes, three_h)     # ∂(W_i x + b_i)
    grad_gh = grad_states.new_empty(dirs, steps, batch, lanes, three_h)     # ∂(W_h h + b_h)
    # Views per step, made once (as in `_recurrence`).
    cotangent_t, r_t, z_t = grad_states.unbind(0), r.unbind(0), z.unbind(0)
    n_factor_t, z_factor_t, r_factor_t = n_factor.unbind(0), z_factor.unbind(0), r_factor.unbind(0)
    d_r, d_z, d_gh_n = _per_step(grad_gh, [hidden] * 3, dim=1)             # r, z: ∂gh = ∂gi
    _, _, d_n = _per_step(grad_gi, [hidden] * 3, dim=1)
    grad_gh_t = grad_gh.view(dirs, steps, batch * lanes, three_h).unbind(1)
    grad_h = cotangent_t[-1]
    for t in reversed(range(steps)):
        torch.mul(grad_h, n_factor_t[t], out=d_n[t])
        torch.mul(grad_h, z_factor_t[t], out=d_z[t])
        torch.mul(d_n[t], r_factor_t[t], out=d_r[t])
        torch.mul(d_n[t], r_t[t], out=d_gh_n[t])
        if t == 0:
            break                                              # h_0 = 0 needs no gradient
        grad_h = torch.baddbmm(torch.addcmul(cotangent_t[t - 1], grad_h, z_t[t]).view(dirs, batch * lanes, hidden),
                               grad_gh_t[t], w_hh).view_as(grad_h)
    grad_gi[..., : 2 * hidden] = grad_gh[..., : 2 * hidden]
    # Weight gradients: Σ_t ∂gh_tᵀ h_{t-1} over the rows t·B + b, per cotangent.
    flat_gh = grad_gh.view(dirs, steps * batch, lanes, three_h)
    flat_h = [states[:-1, d].reshape(steps * batch, hidden) for d in range(dirs)]
    read = [read_rows, None]
    grad_w_hh, grad_b_hh = [], []
    for k in range(lanes):
        g = [flat_gh[d, :, k] if read[d] is None else flat_gh[d, read[d], k] for d in range(dirs)]
        grad_w_hh.append([g[d].T @ (flat_h[d] if read[d] is None else flat_h[d][read[d]]) for d in range(dirs)])
        grad_b_hh.append([flat_gh[d, :, k].sum(0) for d in range(dirs)])
    return grad_gi, grad_w_hh, grad_b_hh


def _projection_backward(grad_gi: list[torch.Tensor], x: torch.Tensor, w_ih: tuple[torch.Tensor, torch.Tensor],
                         step_rows: list[torch.Tensor | None], read_rows: list[torch.Tensor | None]):
    """Backward of the input projections of both directions.

    grad_gi: per direction [T, B, K, 3H], its steps in the order of `step_rows[d]` (when x is
    distinct rows) or of x itself; direction 1 is reversed in time, so its x (or step_rows) is.
    read_rows[d]: the only steps with a nonzero gradient (`_project`).
    Returns ∂x [*x.shape[:-1], K, D], and per cotangent ∂W_ih and ∂b_ih of both directions.
    """
    lanes, three_h = grad_gi[0].shape[-2:]
    grad_x = x.new_zeros(*x.shape[:-1], lanes, x.shape[-1])
    flat_grad_x = grad_x.view(-1, lanes, x.shape[-1])
    grad_w = [[None, None] for _ in range(lanes)]
    grad_b = [[None, None] for _ in range(lanes)]
    for d, g in enumerate(grad_gi):
        g = g.reshape(-1, lanes, three_h)                      # [T·B, K, 3H]
        if d == 1 and step_rows[d] is None:
            inputs = x.flip(0).reshape(-1, x.shape[-1])
        else:
            inputs = x.reshape(-1, x.shape[-1])
        if step_rows[d] is not None:                           # steps sharing a row: their gradients add up
            g = g.new_zeros(x.shape[0], lanes, three_h).index_add_(0, step_rows[d].reshape(-1), g)
        if read_rows[d] is not None:
            g, inputs = g[read_rows[d]], inputs[read_rows[d]]
        for k in range(lanes):
            grad_w[k][d] = g[:, k].T @ inputs
            grad_b[k][d] = g[:, k].sum(0)
        dx = (g.reshape(-1, three_h) @ w_ih[d]).view(-1, lanes, x.shape[-1])
        if read_rows[d] is not None:
            flat_grad_x.index_add_(0, read_rows[d], dx)
        elif d == 1 and step_rows[d] is None:
            grad_x += dx.view_as(grad_x).flip(0)
        else:
            flat_grad_x += dx
    return grad_x, grad_w, grad_b
