"""One Dynamic Gradient Shaping training step, top to bottom.

    forward            -> multimodal log-probs, unimodal logits per modality
    losses             -> L_mm, L_m
    Shapley valuation  -> all 2^M coalitions in one no-grad pass -> batch scores s_m
    gradients          -> g_mm (all parameters) and g_u,m (encoder m + head m): two backward
                          passes (three autograd calls: the g_mm pass split at the encoder outputs)
    MMPareto           -> per encoder group, merge g_mm,m and g_u,m
    OGM / OGM-GE       -> κ_m from s_m scales encoder m's gradient (+ noise)
    optimizer step

Nothing in a step waits on the device: statistics stay tensors until the epoch ends.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from dataloader.batch import Batch
from model.cuda_graphs import take_fallback_notices
from model.m3net import M3Net, ModelOutput
from model.rnn import expect_cotangent
from utils.dgs.ogm import ogm_coefficients
from utils.dgs.shaping import shape_groups
from utils.dgs.shaping_graph import ShapingGraphs
from utils.dgs.shapley import coalition_masks, shapley_values, true_label_probs


@dataclass(frozen=True)
class DGSSettings:
    pareto: bool = True          # MMPareto combination (else g_mm + g_u)
    shapley: bool = True         # Shapley valuation every step (needed for OGM)
    modulation: str = "OGM_GE"   # Normal | OGM | OGM_GE
    alpha: float = 0.6           # OGM strength
    pareto_gamma: float = 1.0    # MMPareto magnitude factor
    unimodal_loss: bool = True   # the encoders learn from ΣL_m too (else the heads alone, on detached z_m)
    modulation_epochs: tuple[int, int] | None = None   # first and last epoch (0-based) of OGM; None: all

    def modulates(self, epoch: int) -> bool:
        """Whether OGM (OGM-GE's noise included) shapes the gradients in `epoch` (0-based)."""
        return self.modulation_epochs is None or self.modulation_epochs[0] <= epoch <= self.modulation_epochs[1]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Adam:
    """Adam (L2 weight decay, as the reference), fused into one kernel where this torch has it."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:          # torch < 2.4 fuses on CUDA only
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, foreach=True)


def unimodal_losses(logits: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """L_m = CE(head_m(z_m), y) per modality."""
    return {m: F.cross_entropy(z, labels) for m, z in logits.items()}


def utterance_labels(batch: Batch, out: ModelOutput) -> torch.Tensor:
    """Labels of the real utterances in the model's output order: [N]."""
    return batch.labels.reshape(-1).index_select(0, out.graph.flat_valid)


@torch.no_grad()
def modality_scores(model: M3Net, out: ModelOutput, labels: torch.Tensor) -> torch.Tensor:
    """Batch Shapley score s_m = mean_i φ_m,i of each modality: [M] (no dropout in the head)."""
    coalitions = coalition_masks(out.nodes.shape[-2], labels.device)
    return shapley_values(true_label_probs(model.coalition_log_probs(out, coalitions), labels)).mean(0)


class DGSStep:
    """Callable training step; owns the parameter grouping it needs."""

    def __init__(self, model: M3Net, optimizer: torch.optim.Optimizer, loss_mm: nn.Module,
                 settings: DGSSettings):
        self.model, self.optimizer, self.loss_mm, self.settings = model, optimizer, loss_mm, settings
        self.modalities = model.cfg.modalities
        self.groups = model.encoder_groups()
        self.group_sizes = {m: [p.numel() for p in group] for m, group in self.groups.items()}
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.encoder_params = [p for m in self.modalities for p in self.groups[m]]
        self.head_params = model.head_parameters()
        self.unimodal_params = self.encoder_params + self.head_params
        unimodal = set(map(id, self.unimodal_params))
        self.fusion_params = [p for p in self.params if id(p) not in unimodal]     # graph, classifier
        self.shaping_graphs = ShapingGraphs()

    def __call__(self, batch: Batch, modulation_on: bool) -> dict[str, torch.Tensor]:
        s = self.settings
        with record_function("dgs.forward"):
            out = self.model(batch)
            labels = utterance_labels(batch, out)
            loss_mm = self.loss_mm(out.log_probs, labels)
            logits = (out.unimodal_logits if s.unimodal_loss
                      else self.model.unimodal_logits(out.encoded, out.graph, detach=True))
            loss_uni = unimodal_losses(logits, labels)
        stats = {"loss_mm": loss_mm.detach(), "loss_uni": torch.stack(list(loss_uni.values())).detach(),
                 "log_probs": out.log_probs.detach(), "labels": labels}

        coeff = None
        if s.shapley:
            with record_function("dgs.valuation"):
                stats["shapley"] = modality_scores(self.model, out, labels)
            if modulation_on and s.modulation != "Normal":
                coeff = ogm_coefficients(stats["shapley"], s.alpha)
                stats["coeff"] = coeff

        with record_function("dgs.backward"):
            grads, g_uni = self._backward(loss_mm, sum(loss_uni.values()), list(out.encoded.values()))
        with record_function("dgs.shaping"):
            cosines = self.shape(grads, g_uni, coeff)
            if cosines is not None:
                stats["cos"] = cosines

        with record_function("dgs.optimizer"):
            for p in self.params:
                p.grad = grads.get(id(p))
            self.optimizer.step()
        return stats

    def shape(self, grads: dict[int, torch.Tensor | None], g_uni: dict[int, torch.Tensor | None] | None,
              coeff: torch.Tensor | None) -> torch.Tensor | None:
        """MMPareto (when g_uni is given), then OGM / OGM-GE (when coeff [M] is), on each encoder
        group's gradient in `grads` (replaced there); returns the groups' MMPareto cosines [M]."""
        if g_uni is None and coeff is None:
            return None
        s = self.settings
        groups = [self.groups[m] for m in self.modalities]
        g_mm = [_grads_of(grads, group) for group in groups]
        # On the GPU, from a CUDA graph: ~180 launches for three groups, replayed in one (eagerly
        # once its graphs failed: `take_notices`).
        shape_all = self.shaping_graphs if self.model.cuda_graphs and g_mm[0][0].is_cuda else shape_groups
        flats, cosines = shape_all(g_mm, None if g_uni is None else [_grads_of(g_uni, group) for group in groups],
                                   coeff, s.modulation == "OGM_GE", s.pareto_gamma)
        for m, group, flat in zip(self.modalities, groups, flats):
            grads.update((id(p), g.view_as(p)) for p, g in zip(group, flat.split(self.group_sizes[m])))
        return cosines

    def take_notices(self) -> list[str]:
        """Lines for the run's log, each given once: which of the CUDA graphs of the steps so far
        (the model's context RNNs', the gradient shaping's) went back to eager, and why."""
        return take_fallback_notices(self.model) + self.shaping_graphs.take_notices()

    def _backward(self, loss_mm: torch.Tensor, loss_uni: torch.Tensor, encoded: list[torch.Tensor]
                  ) -> tuple[dict[int, torch.Tensor | None], dict[int, torch.Tensor | None] | None]:
        """Gradients keyed by parameter id, and, for MMPareto, the unimodal ones apart.

        Without MMPareto only g_mm + g_u is needed: the gradient of the summed loss, one backward
        pass. With it, ∂L_mm over everything and ∂ΣL_m over encoders and heads: two passes. Either
        way heads end up with ∂L_m and the graph and classifier with ∂L_mm.
        """
        if not self.settings.pareto:
            return _named(self.params, torch.autograd.grad(loss_mm + loss_uni, self.params, allow_unused=True)), None
        # The ∂L_mm pass in two halves, split at the encoder outputs z_m: the fusion's gradients
        # and ∂L_mm/∂z_m first (that half stops at the z_m and frees what it went through), the
        # encoders' last. In between the ∂ΣL_m pass, which keeps the encoders' graph for the last
        # half. Told ∂L_mm/∂z_m ahead, a CPU GRU encoder runs both of its backward recurrences
        # during that pass, as one (model/rnn.py). Encoder parameters reach L_mm only through the
        # z_m; a fusion parameter upstream of them would make the last half fail, loudly.
        n_fusion = len(self.fusion_params)
        fusion_and_z = torch.autograd.grad(loss_mm, self.fusion_params + encoded, allow_unused=True)
        g_mm = _named(self.fusion_params, fusion_and_z[:n_fusion])
        z_and_cotangent = [(z, dz) for z, dz in zip(encoded, fusion_and_z[n_fusion:]) if dz is not None]
        for z, dz in z_and_cotangent:
            expect_cotangent(z, dz)
        g_uni = _named(self.unimodal_params, torch.autograd.grad(loss_uni, self.unimodal_params, retain_graph=True,
                                                                 allow_unused=True))
        zs, cotangents = zip(*z_and_cotangent)
        g_mm.update(_named(self.encoder_params, torch.autograd.grad(zs, self.encoder_params, cotangents,
                                                                    allow_unused=True)))
        g_mm.update((id(p), g_uni[id(p)]) for p in self.head_params)
        return g_mm, g_uni


def _named(params: list[nn.Parameter], grads: tuple) -> dict[int, torch.Tensor | None]:
    return {id(p): g for p, g in zip(params, grads)}


def _grads_of(grads: dict[int, torch.Tensor | None], params: list[nn.Parameter]) -> list[torch.Tensor]:
    """The gradients of `params`, zeros where a parameter got none."""
    return [torch.zeros_like(p) if grads[id(p)] is None else grads[id(p)] for p in params]
