"""Per-tensor statistics and scaling on a flat vector of concatenated parameter tensors (the
gradient shaping works on each encoder group flattened; `sizes` are its tensors' numels in order).

On the GPU a step is bound by kernel launches, not arithmetic: the scaling there is one kernel
over the whole vector, whatever the number of tensors (the text encoder has 26). On the CPU there
are no launches to save, and per-tensor operations that stay in cache are the faster ones
(scaling tensor by tensor beats an expanded per-element factor by an order of magnitude).
The stds stay per tensor everywhere: torch.segment_reduce, which could take them in a few
kernels, costs more host time on the GPU than the 26 reductions it would replace.
"""
from __future__ import annotations

import functools

import torch


def segment_norms(flat: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """‖x_p‖₂ of each tensor p: [P]."""
    return torch.stack(torch._foreach_norm(flat.split(sizes)))


def segment_stds(flat: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Sample standard deviation (n − 1) of each tensor: [P]; 0 for a one-element tensor."""
    zero = flat.new_zeros(())
    return torch.stack([part.std() if part.numel() > 1 else zero for part in flat.split(sizes)])


def scale_segments_(flat: torch.Tensor, sizes: list[int], factors: torch.Tensor) -> torch.Tensor:
    """x_p *= factors[p] for each tensor p, in place; returns flat."""
    if flat.device.type == "cpu":
        torch._foreach_mul_(flat.split(sizes), list(factors.unbind()))
        return flat
    return _scale_segments_batched_(flat, sizes, factors)


# The GPU's version (tested against the per-tensor one on the CPU).
def _scale_segments_batched_(flat: torch.Tensor, sizes: list[int], factors: torch.Tensor) -> torch.Tensor:
    return flat.mul_(factors.index_select(0, segment_ids(tuple(sizes), flat.device)))


@functools.lru_cache(maxsize=32)
def segment_ids(sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[Σ sizes] int32: the tensor each element belongs to (int32: 42 MB for the text encoder)."""
    ids = torch.arange(len(sizes), dtype=torch.int32)
    return ids.repeat_interleave(torch.tensor(sizes)).to(device)
