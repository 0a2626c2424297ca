"""Multimodal losses: class-weighted NLL (IEMOCAP) and focal loss (MELD)."""
from __future__ import annotations

import torch
from torch import nn

FOCAL_GAMMA = 2.5


class FocalLoss(nn.Module):
    """mean_i −(1 − p_{i,y})^γ log p_{i,y} on log-probabilities (true-class term only)."""

    def __init__(self, gamma: float = FOCAL_GAMMA):
        super().__init__()
        self.gamma = gamma

    def forward(self, log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        log_p = log_probs.gather(1, labels[:, None]).squeeze(1)
        return (-(1 - log_p.exp()) ** self.gamma * log_p).mean()


def inverse_prior_weights(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """1 / class frequency of the training labels (0 for a class that never occurs)."""
    prior = torch.bincount(labels, minlength=n_classes).double() / labels.numel()
    return torch.where(prior > 0, 1 / prior, torch.zeros_like(prior)).float()


def multimodal_loss(kind: str, class_weights: torch.Tensor | None) -> nn.Module:
    """The L_mm of a dataset (`DatasetInfo.loss`): focal loss, or NLL weighted by `class_weights`."""
    return FocalLoss() if kind == "focal" else nn.NLLLoss(weight=class_weights)
