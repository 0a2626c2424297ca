"""Classification metrics of an evaluation split (SPEC §5)."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score


def classification_metrics(labels: np.ndarray, preds: np.ndarray, dataset: str) -> dict[str, float]:
    """Accuracy and F1 scores in percent.

    micro_f1 is over all classes for IEMOCAP, and over the classes other than neutral (0) for
    MELD, as MELD papers report it.
    """
    micro_labels = list(range(1, 7)) if dataset == "MELD" else None
    return {
        "acc": 100 * accuracy_score(labels, preds),
        "weighted_f1": 100 * f1_score(labels, preds, average="weighted", zero_division=0),
        "macro_f1": 100 * f1_score(labels, preds, average="macro", zero_division=0),
        "micro_f1": 100 * f1_score(labels, preds, labels=micro_labels, average="micro", zero_division=0),
    }


def report(labels: np.ndarray, preds: np.ndarray, class_names: list[str]) -> tuple[str, list[list[int]]]:
    """Classification report text and confusion matrix (rows: true class)."""
    classes = list(range(len(class_names)))
    text = classification_report(labels, preds, labels=classes, target_names=class_names, digits=4, zero_division=0)
    return text, confusion_matrix(labels, preds, labels=classes).tolist()
