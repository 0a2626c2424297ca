"""Dropout with `F.dropout`'s very masks, drawn twice as fast on the CPU.

On the CPU torch draws a dropout mask (`bernoulli_`) one element at a time, a visible share of
an IEMOCAP step with its two masks of about 1M elements each. Each element is a float64
uniform made of two Mersenne Twister words, compared with the keep probability. `uniform_` on a
float64 tensor takes the same words from the generator in the same order at a third of the cost,
so comparing its numbers with the keep probability gives the same mask, draw for draw (tested
against `F.dropout`, output and generator state). Older torch releases drew CPU masks on Intel
machines from MKL's generator instead; where a first comparison on a small tensor finds other
masks than `bernoulli_`'s, `bernoulli_` itself draws them. On other devices `apply_dropout` is
`F.dropout` itself (the GPU's fused kernel draws its own masks).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """The scaled mask `F.dropout(x, p)` multiplies a CPU tensor x by: 1/(1 − p) where kept, 0
    elsewhere (on other devices a `bernoulli_` mask, the same in distribution)."""
    keep = 1.0 - p
    if keep == 0.0:
        return torch.zeros_like(x)
    if x.device.type != "cpu" or not _uniform_is_bernoulli():
        return torch.empty_like(x).bernoulli_(keep).div_(keep)
    return _uniform_mask(x, keep)


def apply_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`F.dropout(x, p, training)`, the same output for the same seed."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if x.device.type != "cpu" or not training or p == 0.0:
        return F.dropout(x, p, training)
    return x * dropout_mask(x, p)


def _uniform_mask(x: torch.Tensor, keep: float) -> torch.Tensor:
    uniform = torch.empty_like(x, dtype=torch.float64).uniform_()      # x's layout: the same draw order
    return torch.lt(uniform, keep).to(x.dtype).div_(keep)


@functools.lru_cache(maxsize=1)
def _uniform_is_bernoulli() -> bool:
    """Whether this torch's CPU `bernoulli_` draws what `_uniform_mask` draws (checked once, on
    forked generator state)."""
    x = torch.empty(257)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference = torch.empty_like(x).bernoulli_(0.5).div_(0.5)
        torch.manual_seed(0)
        return torch.equal(_uniform_mask(x, 0.5), reference)
