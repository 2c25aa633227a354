"""Classification scores from a confusion matrix, shared by training (validation) and ``lmscale eval``."""

from __future__ import annotations

import torch


def accuracy_and_macro_f1(confusion: torch.Tensor) -> tuple[float, float]:
    """Accuracy and macro-averaged F1 of a (true class, predicted class) count matrix. The macro average runs
    over the classes that occur or are predicted (scikit-learn's labels=None); a class's F1 is 2TP/(2TP+FP+FN)."""
    confusion = confusion.double()
    total = confusion.sum()
    if total == 0:
        return float("nan"), float("nan")
    right = confusion.diagonal()
    occurring = (confusion.sum(dim=1) + confusion.sum(dim=0)) > 0
    f1 = 2 * right / (confusion.sum(dim=1) + confusion.sum(dim=0))
    return float(right.sum() / total), float(f1[occurring].mean())


def confusion_counts(targets: torch.Tensor, predictions: torch.Tensor, classes: int) -> torch.Tensor:
    """(classes, classes) counts of (target, prediction) pairs, on their device."""
    flat = targets * classes + predictions
    return torch.bincount(flat, minlength=classes * classes).view(classes, classes).float()
