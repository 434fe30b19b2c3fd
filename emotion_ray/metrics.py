"""Classification metrics from a confusion matrix: pure NumPy, no TensorFlow or Ray."""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion_matrix(true_index: np.ndarray, predicted_index: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts: rows are the true class, columns the predicted one."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (np.asarray(true_index, dtype=np.int64), np.asarray(predicted_index, dtype=np.int64)), 1)
    return confusion


def classification_metrics(confusion, classes: list[str]) -> dict[str, Any]:
    """Accuracy, micro and macro precision / recall, macro-F1 and per-class figures.

    Overall precision and recall are micro averages, which equal accuracy for single-label
    argmax predictions (and Keras' Precision/Recall on one-hot labels); a class never predicted
    (or absent) counts 0 precision (or recall) in the macro averages, as scikit-learn's
    `zero_division=0` does. F1 per class is the harmonic mean of its precision and recall.
    """
    confusion = np.asarray(confusion)
    total = int(confusion.sum())
    true_pos = np.diag(confusion).astype(float)
    predicted, actual = confusion.sum(axis=0).astype(float), confusion.sum(axis=1).astype(float)
    precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
    recall = np.divide(true_pos, actual, out=np.zeros_like(true_pos), where=actual > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(both), where=both > 0)
    accuracy = float(true_pos.sum() / total) if total else 0.0
    return {
        "test_rows": total,
        "categorical_accuracy": accuracy,
        "precision": accuracy,
        "recall": accuracy,
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "per_class": {
            c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                "support": int(actual[i])}
            for i, c in enumerate(classes)
        },
        "confusion_matrix": {"labels": classes, "rows_true_cols_predicted": confusion.tolist()},
    }


def chance_loss(train_counts: dict[str, int], eval_counts: dict[str, int], classes: list[str]) -> float | None:
    """Chance level of the categorical cross-entropy (nats per row): the loss on a split with
    `eval_counts` rows per class of a model that answers every row with the training split's class
    shares (`train_counts`), the best a model that ignores its input can do there. ln K for K
    balanced classes (1.099 for three). Shares are add-one smoothed ((n_c + 1) / (n + K), Laplace's
    rule), so a class missing from train stays finite. None when the split has no rows."""
    n_eval = sum(eval_counts.get(c, 0) for c in classes)
    if not n_eval:
        return None
    n_train = sum(train_counts.get(c, 0) for c in classes)
    return float(-sum(eval_counts.get(c, 0) / n_eval * np.log((train_counts.get(c, 0) + 1) / (n_train + len(classes)))
                      for c in classes))
