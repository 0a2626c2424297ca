"""Exact Shapley valuation of modalities from coalition values.

Coalition s (an integer 0 .. 2^M - 1) contains modality i when bit i of s is set; row s of
`coalition_masks` is that membership, and the model evaluates all rows in one batched pass.
"""
from __future__ import annotations

import functools
from math import factorial

import torch


@functools.lru_cache(maxsize=16)
def coalition_masks(n_modalities: int, device: torch.device) -> torch.Tensor:
    """[2^M, M] bool: row s holds the modalities of coalition s (bit i -> modality i)."""
    s = torch.arange(2 ** n_modalities)[:, None]
    return ((s >> torch.arange(n_modalities)) & 1).bool().to(device)


@functools.lru_cache(maxsize=16)
def shapley_matrix(n_modalities: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[2^M, M] weights W with φ = v @ W for coalition values v [.., 2^M].

    φ_m = Σ_{S ∌ m} |S|!(M−|S|−1)!/M! · (v(S ∪ {m}) − v(S)), so coalition S enters φ_m with
    +w(|S|−1) when m ∈ S and −w(|S|) when m ∉ S, where w(k) = k!(M−k−1)!/M!.
    """
    m = n_modalities
    weight = [factorial(k) * factorial(m - k - 1) / factorial(m) for k in range(m)]
    masks = coalition_masks(m, torch.device("cpu"))
    sizes = masks.sum(1)
    matrix = torch.zeros(2 ** m, m, dtype=torch.float64)
    for s in range(2 ** m):
        for i in range(m):
            if masks[s, i]:
                matrix[s, i] = weight[sizes[s] - 1]
            elif sizes[s] < m:
                matrix[s, i] = -weight[sizes[s]]
    return matrix.to(device, dtype)


def shapley_values(coalition_values: torch.Tensor) -> torch.Tensor:
    """coalition_values [2^M, N] (v(S)_i, rows as in `coalition_masks`) -> φ [N, M].

    Efficiency holds exactly: Σ_m φ_m,i = v(M)_i − v(∅)_i.
    """
    n_modalities = (coalition_values.shape[0] - 1).bit_length()
    return coalition_values.t() @ shapley_matrix(n_modalities, coalition_values.device, coalition_values.dtype)


def true_label_probs(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log_probs [K, N, C], labels [N] -> v [K, N], the probability of each utterance's true label."""
    index = labels.expand(log_probs.shape[0], -1).unsqueeze(-1)
    return log_probs.gather(-1, index).squeeze(-1).exp()
