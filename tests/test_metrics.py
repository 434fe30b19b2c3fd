"""Metrics from a confusion matrix: hand-checked values."""

from __future__ import annotations

import numpy as np
import pytest

from emotion_ray.metrics import classification_metrics, confusion_matrix

pytestmark = pytest.mark.fast


def test_confusion_matrix_counts_true_rows_and_predicted_columns():
    cm = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0], 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert confusion_matrix([], [], 2).tolist() == [[0, 0], [0, 0]]  # an empty test split


def test_metrics_match_hand_computed_values():
    m = classification_metrics([[1, 1, 0], [0, 1, 0], [1, 0, 2]], ["a", "b", "c"])
    assert m["test_rows"] == 6 and m["categorical_accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["a"]["precision"] == pytest.approx(0.5) and m["per_class"]["a"]["recall"] == 0.5
    assert m["per_class"]["c"]["precision"] == 1.0 and m["per_class"]["c"]["recall"] == pytest.approx(2 / 3)
    assert m["per_class"]["c"]["f1"] == pytest.approx(0.8)
    f1s = [0.5, 2 * 0.5 * 1 / 1.5, 0.8]
    assert m["macro_f1"] == pytest.approx(np.mean(f1s))
    assert m["macro_recall"] == pytest.approx(np.mean([0.5, 1.0, 2 / 3]))


def test_a_class_never_predicted_counts_zero_not_nan():
    m = classification_metrics([[2, 0], [1, 0]], ["x", "y"])
    assert m["per_class"]["y"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert classification_metrics(np.zeros((2, 2), int), ["x", "y"])["categorical_accuracy"] == 0.0
