"""Classification metrics of an evaluation split."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

from utils.dgs.shapley import coalition_masks, shapley_values


def classification_metrics(labels: np.ndarray, preds: np.ndarray,
                           micro_f1_classes: tuple[int, ...] | None) -> dict[str, float]:
    """Accuracy and F1 scores in percent; micro_f1 over `micro_f1_classes` (the dataset's
    `DatasetInfo.micro_f1_classes`; None: all)."""
    micro_labels = list(micro_f1_classes) if micro_f1_classes is not None else None
    return {**prediction_scores(labels, preds),
            "micro_f1": 100 * f1_score(labels, preds, labels=micro_labels, average="micro", zero_division=0)}


def prediction_scores(labels: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    """Accuracy, weighted F1 and macro F1 in percent."""
    return {
        "acc": 100 * accuracy_score(labels, preds),
        "weighted_f1": 100 * f1_score(labels, preds, average="weighted", zero_division=0),
        "macro_f1": 100 * f1_score(labels, preds, average="macro", zero_division=0),
    }


def report(labels: np.ndarray, preds: np.ndarray, class_names: list[str]) -> tuple[str, list[list[int]]]:
    """Classification report text and confusion matrix (rows: true class)."""
    classes = list(range(len(class_names)))
    text = classification_report(labels, preds, labels=classes, target_names=class_names, digits=4, zero_division=0)
    return text, confusion_matrix(labels, preds, labels=classes).tolist()


def modality_diagnostics(labels: np.ndarray, preds: np.ndarray, unimodal_preds: dict[str, np.ndarray],
                         coalition_preds: np.ndarray, modalities: str, modals: str,
                         class_names: tuple[str, ...]) -> dict[str, dict]:
    """What each modality does on a held-out split, in percent.

    unimodal_preds: each modality's head's predictions [N]; coalition_preds [2^M − 1, N]: the
    multimodal predictions of every coalition but the full one (whose are `preds`), rows as in
    `coalition_masks` over `modalities` (the model's order). Returns
    - unimodal: {m: acc, weighted_f1, macro_f1} of each head;
    - coalition_acc: {coalition: accuracy}, a coalition named by its letters in `modals` order
      (the flag's), "" the empty one;
    - shapley: {m: exact Shapley value of that accuracy}: they sum to acc(all) − acc("");
    - per_class_f1: {class name: F1} of the multimodal predictions.
    """
    unimodal = {m: prediction_scores(labels, unimodal_preds[m]) for m in modals}
    correct = np.concatenate([coalition_preds, preds[None]]) == labels
    accuracy = 100 * correct.mean(1, dtype=np.float64)                           # [2^M]
    members = coalition_masks(len(modalities), torch.device("cpu")).tolist()
    names = ["".join(m for m in modals if member[modalities.index(m)]) for member in members]
    phi = shapley_values(torch.from_numpy(accuracy)[:, None])[0].tolist()       # float64: [M]
    f1 = f1_score(labels, preds, labels=list(range(len(class_names))), average=None, zero_division=0)
    return {"unimodal": unimodal,
            "coalition_acc": dict(zip(names, accuracy.tolist())),
            "shapley": {m: phi[modalities.index(m)] for m in modals},
            "per_class_f1": dict(zip(class_names, (100 * f1).tolist()))}
