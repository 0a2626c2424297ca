"""A bidirectional multi-layer GRU for the CPU, computing exactly what `nn.GRU` computes.

PyTorch's CPU `nn.GRU` backward is autograd over the unrolled cell: at every time step it forms a
full [3H, H] weight gradient and adds it to the running sum, so the backward reads and writes the
recurrent weights several times per step. Here the backward loop carries only the hidden-state
gradient (one matrix product per step, both directions at once); the weight gradients are one
large product over all time steps at the end, and the input projection of every step is one
product before the loop. Parameters are those of the `nn.GRU` passed in (checkpoint names and
initialisation unchanged). Equations per direction, gates ordered (r, z, n) as in `nn.GRU`:

    r_t = σ(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)
    z_t = σ(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
    n_t = tanh(W_in x_t + b_in + r_t ⊙ (W_hn h_{t-1} + b_hn))
    h_t = (1 - z_t) ⊙ n_t + z_t ⊙ h_{t-1}
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.padding import expand_rows, project_steps


class _BidirectionalRecurrence(torch.autograd.Function):
    """The recurrent part of one bidirectional layer.

    gi:   [T, 2, B, 3H] input projections W_i x_t + b_i, direction 1 already reversed in time
    w_hh: [2, 3H, H], b_hh: [2, 3H]
    forward_rows: None, or the steps t·B + b whose direction-0 outputs are read, when no other
          is: the others then get a zero gradient, and W_hh's is summed over these rows only.
    returns h_1..h_T: [T, 2, B, H] (direction 1 in its own, reversed, time order)
    """

    @staticmethod
    def forward(ctx, gi: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor,
                forward_rows: torch.Tensor | None) -> torch.Tensor:
        steps, dirs, batch, three_h = gi.shape
        hidden = three_h // 3
        w_t = w_hh.transpose(1, 2).contiguous()       # a transposed view makes bmm copy it every step
        bias = b_hh[:, None, :].expand(dirs, batch, three_h)
        states = gi.new_zeros(steps + 1, dirs, batch, hidden)            # h_0 = 0, then h_1..h_T
        gates = gi.new_empty(steps, dirs, batch, three_h)                # r, z, n per step
        hn = gi.new_empty(steps, dirs, batch, hidden)                    # W_hn h_{t-1} + b_hn
        for t in range(steps):
            gh = torch.baddbmm(bias, states[t], w_t)
            rz, n = gates[t].split([2 * hidden, hidden], -1)
            torch.sigmoid(gi[t, ..., : 2 * hidden] + gh[..., : 2 * hidden], out=rz)
            r, z = rz.chunk(2, -1)
            hn[t] = gh[..., 2 * hidden:]
            torch.tanh(torch.addcmul(gi[t, ..., 2 * hidden:], r, hn[t]), out=n)
            torch.addcmul(n, z, states[t] - n, out=states[t + 1])
        ctx.save_for_backward(w_hh, states, gates, hn)
        ctx.forward_rows = forward_rows
        return states[1:]

    @staticmethod
    def backward(ctx, grad_states: torch.Tensor):
        w_hh, states, gates, hn = ctx.saved_tensors
        steps, dirs, batch, hidden = grad_states.shape
        grad_gi = gates.new_empty(steps, dirs, batch, 3 * hidden)       # ∂/∂(W_i x + b_i)
        grad_gh = gates.new_empty(dirs, steps, batch, 3 * hidden)       # ∂/∂(W_h h + b_h), per direction
        grad_h = torch.zeros_like(grad_states[0])
        for t in reversed(range(steps)):
            grad_h = grad_h + grad_states[t]
            r, z, n = gates[t].chunk(3, -1)
            h_prev = states[t]
            d_r, d_z, d_n = grad_gi[t].chunk(3, -1)
            # n_t: through (1 - z) ⊙ n, then tanh'
            torch.mul(grad_h * (1 - z), 1 - n * n, out=d_n)
            # z_t: h_t = n + z ⊙ (h_{t-1} - n), then σ'
            torch.mul(grad_h * (h_prev - n), z * (1 - z), out=d_z)
            # r_t: enters n through r ⊙ hn, then σ'
            torch.mul(d_n * hn[t], r * (1 - r), out=d_r)
            gh_rz, gh_n = grad_gh[:, t].split([2 * hidden, hidden], -1)
            gh_rz.copy_(grad_gi[t, ..., : 2 * hidden])
            torch.mul(d_n, r, out=gh_n)
            grad_h = torch.baddbmm(grad_h * z, grad_gh[:, t], w_hh)
        # Weight gradients over all steps at once: Σ_t ∂gh_tᵀ h_{t-1}, rows t·B + b.
        flat_gh = grad_gh.view(dirs, steps * batch, 3 * hidden)
        flat_h = states[:-1].transpose(0, 1).reshape(dirs, steps * batch, hidden)
        rows = ctx.forward_rows
        if rows is None:
            grad_w_hh = torch.bmm(flat_gh.transpose(1, 2), flat_h)
        else:
            # ∂gh is exactly 0 in direction 0 past each dialogue's end: no step there is read.
            grad_w_hh = torch.stack([flat_gh[0, rows].T @ flat_h[0, rows], flat_gh[1].T @ flat_h[1]])
        grad_b_hh = grad_gh.sum((1, 2))
        return grad_gi, grad_w_hh, grad_b_hh, None


def bidirectional_gru(gru: nn.GRU, x: torch.Tensor, real_steps: torch.Tensor | None = None,
                      step_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Output of `gru` (bidirectional, sequence-first, zero initial state) for x [T, B, D]: [T, B, 2H].

    step_rows [T, B]: x is given as its distinct rows [R, D] instead, step (t, b) reading row
    step_rows[t, b] (`model/padding.py: distinct_rows`); the first layer's input projection is then
    computed once per distinct row.
    real_steps: positions b·T + t of the real (unpadded) steps, for a caller that reads the output
    there only. The last layer's forward direction then works on those steps only (its input
    projection, its W_hh gradient): its outputs at the padding are read by no later step, so they
    are left unspecified. The reverse direction still starts at the last padded step.
    """
    hidden = gru.hidden_size
    for layer in range(gru.num_layers):
        if layer > 0:
            x = F.dropout(x, gru.dropout, gru.training)
        names = [f"l{layer}", f"l{layer}_reverse"]
        w_ih = torch.cat([getattr(gru, f"weight_ih_{n}") for n in names])            # [6H, D]
        b_ih = torch.cat([getattr(gru, f"bias_ih_{n}") for n in names])
        w_hh = torch.stack([getattr(gru, f"weight_hh_{n}") for n in names])          # [2, 3H, H]
        b_hh = torch.stack([getattr(gru, f"bias_hh_{n}") for n in names])
        if layer == 0 and step_rows is not None:
            forward_gi, reverse_gi = expand_rows(F.linear(x, w_ih, b_ih), step_rows).chunk(2, -1)
        elif real_steps is not None and layer == gru.num_layers - 1:
            three_h = 3 * hidden
            forward_gi = project_steps(lambda rows: F.linear(rows, w_ih[:three_h], b_ih[:three_h]),
                                       x, real_steps)                                      # [T, B, 3H]
            reverse_gi = F.linear(x, w_ih[three_h:], b_ih[three_h:])
        else:
            forward_gi, reverse_gi = F.linear(x, w_ih, b_ih).chunk(2, -1)
        gi = torch.stack([forward_gi, reverse_gi.flip(0)], dim=1)                   # [T, 2, B, 3H]
        forward_rows = None
        if real_steps is not None and layer == gru.num_layers - 1:
            steps, batch = gi.shape[0], gi.shape[2]
            forward_rows = real_steps % steps * batch + real_steps // steps            # b·T + t -> t·B + b
        states = _BidirectionalRecurrence.apply(gi, w_hh, b_hh, forward_rows)
        x = torch.cat([states[:, 0], states[:, 1].flip(0)], dim=-1)
    return x
