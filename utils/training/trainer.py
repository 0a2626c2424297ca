"""Epoch loops, model selection, checkpoints and resume."""
from __future__ import annotations

import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataloader.datasets import DATASETS
from model.checkpoint import link_atomic, save_atomic
from model.m3net import M3Net
from utils.dgs.shapley import coalition_masks
from utils.dgs.step import DGSStep, utterance_labels
from utils.errors import UserError
from utils.files import write_json
from utils.signals import raise_if_stopped, stop_signals_held
from utils.training.metrics import classification_metrics, modality_diagnostics, report
from utils.training.runlog import METRICS_FILE, RunLog


class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf; the message names the epoch and the step or the split."""


def _progress(loader: DataLoader, desc: str):
    return tqdm(loader, desc=desc, leave=False, disable=not sys.stderr.isatty())


@torch.no_grad()
def evaluate(model: M3Net, loader: DataLoader, loss_mm: nn.Module, device: torch.device,
             dataset: str, diagnostics: bool = True) -> dict[str, Any]:
    """Loss and metrics of one split in loader order; 'preds'/'labels' are numpy arrays.

    The loss is L_mm over the whole split at once (with class weights, the weighted mean over all
    its utterances, not a mean of per-batch means). `diagnostics`: also each modality's unimodal
    head, every coalition's accuracy and their Shapley values, and per-class F1
    (`modality_diagnostics`), from the same forward passes: the coalitions reuse each batch's
    encoder outputs.
    """
    info = DATASETS[dataset]
    model.eval()
    coalitions = coalition_masks(len(model.cfg.modalities), device)[:-1]   # the last, all present, is `out`
    log_probs, labels, unimodal, coalition_preds = [], [], defaultdict(list), []
    for batch in _progress(loader, "eval"):
        batch = batch.to(device, non_blocking=True)
        out = model(batch)
        log_probs.append(out.log_probs)
        labels.append(utterance_labels(batch, out))
        if diagnostics:
            for m, logits in out.unimodal_logits.items():
                unimodal[m].append(logits.argmax(-1))
            coalition_preds.append(model.coalition_log_probs(out, coalitions).argmax(-1))
    log_probs, labels = torch.cat(log_probs), torch.cat(labels)
    preds_np, labels_np = log_probs.argmax(-1).cpu().numpy(), labels.cpu().numpy()
    result = {"loss": float(loss_mm(log_probs, labels)),
              **classification_metrics(labels_np, preds_np, info.micro_f1_classes)}
    if diagnostics:
        result.update(modality_diagnostics(
            labels_np, preds_np, {m: torch.cat(p).cpu().numpy() for m, p in unimodal.items()},
            torch.cat(coalition_preds, 1).cpu().numpy(), model.cfg.modalities, model.cfg.modals,
            info.class_names))
    return {**result, "preds": preds_np, "labels": labels_np}


@dataclass
class EpochStats:
    """Per-step statistics, kept on the device as the steps return them and reduced once per
    epoch (no op per step: on the GPU each would be a launch)."""

    steps: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    KEYS = ("loss_mm", "loss_uni", "shapley", "coeff", "cos")

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for key in self.KEYS:
            if key in stats:
                self.steps.setdefault(key, []).append(stats[key])

    def first_bad_step(self) -> int | None:
        """Index of the first step whose losses are not all finite; None if none."""
        losses = torch.cat([torch.stack(self.steps["loss_mm"])[:, None], torch.stack(self.steps["loss_uni"])], 1)
        bad = (~torch.isfinite(losses).all(1)).nonzero()
        return int(bad[0]) if len(bad) else None

    def means(self) -> dict[str, np.ndarray]:
        per_step = {k: torch.stack(v).float() for k, v in self.steps.items()}
        if "cos" in per_step:
            per_step["conflict"] = (per_step["cos"] < 0).float()
        return {k: v.mean(0).cpu().numpy() for k, v in per_step.items()}


@dataclass(frozen=True)
class TrainerSettings:
    dataset: str
    epochs: int
    seed: int
    flags: dict[str, Any]        # the run's flags, saved in every checkpoint


class Trainer:
    """Runs the epochs of a run: train with the DGS step, evaluate, log, checkpoint, select."""

    def __init__(self, settings: TrainerSettings, model: M3Net, step: DGSStep,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, loaders: dict[str, DataLoader],
                 loss_mm: nn.Module, device: torch.device, log: RunLog, class_names: list[str]):
        self.settings, self.model, self.step, self.scheduler = settings, model, step, scheduler
        self.loaders, self.loss_mm, self.device, self.log = loaders, loss_mm, device, log
        self.class_names = class_names
        self.select_on = "valid" if "valid" in loaders else "test"
        self.start_epoch = 0
        self.best: dict[str, Any] = {"epoch": -1, "score": -1.0}

    # ------------------------------------------------------------------ one epoch
    def train_epoch(self, epoch: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        s = self.settings
        # Seed per epoch: a resumed run replays exactly the epochs an uninterrupted one would.
        torch.manual_seed(s.seed * 100003 + epoch)
        self.loaders["train"].generator.manual_seed(s.seed * 100003 + epoch)
        modulation_on = self.step.settings.modulates(epoch)
        self.model.train()
        stats, log_probs, labels = EpochStats(), [], []
        for batch in _progress(self.loaders["train"], f"epoch {epoch}"):
            step_stats = self.step(batch.to(self.device, non_blocking=True), modulation_on)
            raise_if_stopped()
            for notice in self.step.take_notices():      # CUDA graphs that went back to eager, once each
                self.log.line(notice)
            stats.add(step_stats)
            log_probs.append(step_stats["log_probs"])
            labels.append(step_stats["labels"])
        bad = stats.first_bad_step()
        if bad is not None:
            raise TrainingDiverged(f"the loss became NaN/Inf at epoch {epoch + 1}/{s.epochs} (epoch {epoch} in "
                                   f"{METRICS_FILE}), step {bad + 1}/{len(labels)}; {self._kept()}")
        means = stats.means()
        preds_np, labels_np = torch.cat(log_probs).argmax(-1).cpu().numpy(), torch.cat(labels).cpu().numpy()
        micro_f1_classes = DATASETS[s.dataset].micro_f1_classes
        train = {"loss": float(means["loss_mm"]), **classification_metrics(labels_np, preds_np, micro_f1_classes)}
        return train, means

    def _kept(self) -> str:
        """What a run that diverged keeps."""
        last = self.log.dir / "last.pt"
        return (f"{last} holds the last good epoch" if last.is_file() else
                f"nothing was saved before it; remove {self.log.dir} before reusing it")

    def modality_record(self, means: dict[str, np.ndarray]) -> dict[str, dict[str, float | None]]:
        record = {}
        for i, m in enumerate(self.model.cfg.modalities):
            record[m] = {"loss": float(means["loss_uni"][i])}
            for key, name in (("shapley", "shapley"), ("coeff", "coeff"), ("cos", "cos"), ("conflict", "conflict_frac")):
                record[m][name] = float(means[key][i]) if key in means else None
        return record

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict[str, Any]:
        s = self.settings
        for epoch in range(self.start_epoch, s.epochs):
            started = time.perf_counter()
            lr = self.step.optimizer.param_groups[0]["lr"]
            train, means = self.train_epoch(epoch)
            self.scheduler.step()
            results = {name: evaluate(self.model, self.loaders[name], self.loss_mm, self.device, s.dataset)
                       for name in self.loaders if name != "train"}
            for name, result in results.items():
                if not math.isfinite(result["loss"]):
                    raise TrainingDiverged(f"the {name} loss became NaN/Inf at epoch {epoch + 1}/{s.epochs} "
                                           f"(epoch {epoch} in {METRICS_FILE}), evaluated after its training; "
                                           f"{self._kept()}")
            elapsed = time.perf_counter() - started
            record = {"epoch": epoch, "train": train,
                      **{name: _public(r) for name, r in results.items()},
                      "modalities": self.modality_record(means), "lr": lr, "epoch_time_s": elapsed}
            score = results[self.select_on]["weighted_f1"]
            improved = score > self.best["score"]
            if improved:
                self.best = {"epoch": epoch, "score": score, "record": record,
                             "test_preds": results["test"]["preds"].tolist(),
                             "test_labels": results["test"]["labels"].tolist()}
            with stop_signals_held():        # Ctrl-C or SIGTERM stops the run once the epoch is kept
                self._keep_epoch(epoch, record, improved)
        return self.summary()

    def _keep_epoch(self, epoch: int, record: dict[str, Any], improved: bool) -> None:
        """The epoch's line in metrics.jsonl and the log, then its checkpoint: last.pt, and best.pt
        when it is the best so far (the same file, written once)."""
        where = f"epoch {epoch + 1}/{self.settings.epochs}"
        try:
            self.log.epoch(record)
        except OSError as e:                 # a full disk: the file keeps the epochs before
            raise UserError(f"cannot write the metrics of {where}: {self.log.metrics_path} ({e.strerror})") from None
        self.log.line(_epoch_line(record, self.settings.epochs))
        try:
            save_atomic(self.checkpoint(epoch, record), self.log.dir / "last.pt",
                        also=self.log.dir / "best.pt" if improved else None)
        except OSError as e:                 # a full disk, a folder gone or made read-only meanwhile
            raise UserError(f"cannot write the checkpoint of {where}: "
                            f"{e.filename or self.log.dir / 'last.pt'} ({e.strerror})") from None

    def checkpoint(self, epoch: int, record: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.step.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": epoch, "args": self.settings.flags,
                "metrics": record, "best": self.best}

    def resume(self, state: dict[str, Any], path: Path) -> None:
        """Continue after the epoch saved in `state`, this run's last.pt read from `path`."""
        self.model.load_state_dict(state["model"])
        self.step.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.best = state["best"]
        self.start_epoch = state["epoch"] + 1
        with stop_signals_held():
            try:
                self.log.drop_epochs_after(state["epoch"])
                if self.best["epoch"] == state["epoch"]:
                    self._relink_best(path)
            except OSError as e:
                raise UserError(f"--resume: cannot write in {self.log.dir}: {e.filename or self.log.dir} "
                                f"({e.strerror})") from None
        self.log.line(f"resumed from {path} after epoch {state['epoch'] + 1}/{self.settings.epochs} "
                      f"(epoch {state['epoch']} in {METRICS_FILE})")

    def _relink_best(self, last: Path) -> None:
        """best.pt is last.pt when last.pt's epoch is the best: a kill between the two renames of
        its save left the old best.pt (last.pt is renamed first)."""
        best = self.log.dir / "best.pt"
        if not (best.is_file() and os.path.samefile(best, last)):
            link_atomic(last, best)

    def summary(self) -> dict[str, Any]:
        best = self.best
        text, matrix = report(np.array(best["test_labels"]), np.array(best["test_preds"]), self.class_names)
        protocol = ("best validation weighted F1 (--valid)" if self.select_on == "valid"
                    else "best test weighted F1 (the reference protocol; no validation split)")
        summary = {"selected_epoch": best["epoch"], "selected_by": protocol,
                   "metrics": best["record"], "test_classification_report": text,
                   "test_confusion_matrix": matrix}
        path = self.log.dir / "summary.json"
        try:
            write_json(path, summary)
        except OSError as e:                 # a full disk: --resume writes it from last.pt later
            raise UserError(f"cannot write {path} ({e.strerror}); the run's epochs are kept: once it can be written, "
                            f"--resume --log-dir {self.log.dir} writes it without training further") from None
        test = best["record"]["test"]
        self.log.line(f"selected epoch {best['epoch'] + 1}/{self.settings.epochs} (epoch {best['epoch']} in "
                      f"{METRICS_FILE}) by {protocol}: test acc {test['acc']:.2f} "
                      f"weighted F1 {test['weighted_f1']:.2f} macro F1 {test['macro_f1']:.2f} "
                      f"micro F1 {test['micro_f1']:.2f}")
        self.log.line(text.rstrip())
        self.log.line("confusion matrix (rows: true " + " ".join(self.class_names) + ")")
        for name, row in zip(self.class_names, matrix):
            self.log.line(f"  {name:>8} " + " ".join(f"{v:5d}" for v in row))
        return summary


def _public(result: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in result.items() if k not in ("preds", "labels")}


def _epoch_line(record: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {record['epoch'] + 1}/{epochs}"]
    for split in ("train", "valid", "test"):
        if split in record:
            r = record[split]
            parts.append(f"{split} loss {r['loss']:.4f} acc {r['acc']:.2f} wF1 {r['weighted_f1']:.2f}")
    if "unimodal" in record["test"]:
        parts.append("test unimodal acc " + " ".join(f"{m}={v['acc']:.1f}" for m, v in record["test"]["unimodal"].items()))
    mods = record["modalities"]
    for key, label in (("shapley", "shapley"), ("coeff", "coeff"), ("conflict_frac", "conflict")):
        values = {m: v[key] for m, v in mods.items() if v[key] is not None}
        if values:
            parts.append(f"{label} " + " ".join(f"{m}={v:.3f}" for m, v in values.items()))
    parts.append(f"lr {record['lr']:.2g}")
    parts.append(f"{record['epoch_time_s']:.1f}s")
    return " | ".join(parts)
