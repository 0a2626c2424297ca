"""Less work at padded positions: skip what nothing reads there, and compute once what a
dialogue's padded steps share."""
from __future__ import annotations

from typing import Callable

import torch


def project_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`fn` (row-wise, e.g. a linear layer) on the rows `rows` of x viewed as [-1, D]; every other
    row of the result is 0. x [..., D] -> [..., D_out].

    With `rows` the real utterances (`DialogueGraph.utterance_steps` for a sequence-first x), the
    padded positions cost nothing: what the reference computes there never reaches a
    prediction, as long as nothing reads it.
    """
    flat = x.reshape(-1, x.shape[-1])
    projected = fn(flat.index_select(0, rows))
    out = projected.new_zeros(flat.shape[0], projected.shape[-1]).index_copy_(0, rows, projected)
    return out.view(*x.shape[:-1], -1)


# Padded steps that share their input. The loader pads with zeros, and the text norms map those
# zeros to one vector per dialogue (BN and LN act per step, LN2 per dialogue), so a row-wise layer
# before a context RNN needs computing once for all of a dialogue's padded steps.
# `DialogueGraph.distinct_steps` / `step_rows` index them.
def distinct_rows(x: torch.Tensor, distinct_steps: torch.Tensor) -> torch.Tensor:
    """Sequence-first x [T, B, D] -> [R, D]: one row per distinct input step."""
    return x.reshape(-1, x.shape[-1]).index_select(0, distinct_steps)


def expand_rows(rows: torch.Tensor, step_rows: torch.Tensor) -> torch.Tensor:
    """[R, D], one row per distinct step -> sequence-first [T, B, D], step (t, b) = rows[step_rows[t, b]]."""
    return rows.index_select(0, step_rows.reshape(-1)).view(*step_rows.shape, -1)
