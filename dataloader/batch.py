"""The batch a loader yields: sequence-first, zero-padded, as the reference code lays it out."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Batch:
    """One batch of B dialogues padded to T utterances.

    text:    [4, T, B, 1024]  the four RoBERTa layers r1..r4, stacked
    audio:   [T, B, Da]
    visual:  [T, B, Dv]
    qmask:   [T, B, S]        speaker one-hot
    umask:   [B, T]           1.0 for real utterances, 0.0 for padding
    labels:  [B, T]           long, 0 at padding
    lengths: [B]              long, utterances per dialogue (always on the CPU)
    ids:     dialogue ids, in batch order
    """

    text: torch.Tensor
    audio: torch.Tensor
    visual: torch.Tensor
    qmask: torch.Tensor
    umask: torch.Tensor
    labels: torch.Tensor
    lengths: torch.Tensor
    ids: list

    def _map_tensors(self, fn) -> "Batch":
        """Apply fn to every tensor that travels to the device (lengths and ids stay on the CPU)."""
        return Batch(**{f.name: getattr(self, f.name) if f.name in ("lengths", "ids") else fn(getattr(self, f.name))
                        for f in fields(self)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True)."""
        return self._map_tensors(lambda t: t.pin_memory())
