"""Group k-fold plans and their summaries (folds.py): pure, no Ray."""

from __future__ import annotations

import random

import numpy as np
import pytest

from emotion_ray.errors import ConfigError
from emotion_ray.folds import deal_groups, mean_std, plan_folds, summarize
from emotion_ray.metrics import classification_metrics, confusion_matrix

CLASSES = ["angry", "happy", "sad"]


def pool(groups: int = 60, seed: int = 0) -> tuple[list[str], list[int]]:
    """Rows of `groups` groups of 1-6 pictures, each group one class (a few span two)."""
    rng = random.Random(seed)
    keys, labels = [], []
    for g in range(groups):
        label = g % 3
        for i in range(rng.randint(1, 6)):
            keys.append(f"person{g}")
            labels.append(label if i or g % 7 else (label + 1) % 3)
    return keys, labels


@pytest.mark.fast
def test_folds_keep_groups_whole_and_hold_every_row_out_exactly_once():
    keys, labels = pool()
    plan = plan_folds(keys, labels, 5, 4, CLASSES)
    fold = plan.fold
    assert sorted(set(fold.tolist())) == [0, 1, 2, 3, 4]
    for key in set(keys):  # a group never straddles folds
        assert len({int(f) for f, k in zip(fold, keys) if k == key}) == 1
    roles = np.stack([plan.role(k) for k in range(5)])  # (folds, rows)
    assert ((roles == "test").sum(axis=0) == 1).all()  # held out in exactly one fold
    for k in range(5):
        val_groups = {key for key, r in zip(keys, roles[k]) if r == "val"}
        train_groups = {key for key, r in zip(keys, roles[k]) if r == "train"}
        test_groups = {key for key, r in zip(keys, roles[k]) if r == "test"}
        assert val_groups and train_groups and not (val_groups & train_groups) and not (test_groups & (val_groups | train_groups))


@pytest.mark.fast
def test_folds_are_deterministic_whatever_the_row_order_and_balanced():
    keys, labels = pool(90, seed=3)
    fold = plan_folds(keys, labels, 3, 5, CLASSES).fold
    order = list(range(len(keys)))
    random.Random(1).shuffle(order)
    shuffled = plan_folds([keys[i] for i in order], [labels[i] for i in order], 3, 5, CLASSES).fold
    assert [int(shuffled[j]) for j in np.argsort(order)] == fold.tolist()
    sizes = np.bincount(fold)
    assert sizes.max() - sizes.min() <= 6  # within one largest group
    per_class = np.array([[np.sum((fold == k) & (np.array(labels) == c)) for c in range(3)] for k in range(3)])
    assert (per_class.max(axis=0) - per_class.min(axis=0)).max() <= 6  # stratified


@pytest.mark.fast
def test_single_picture_groups_deal_like_stratified_k_fold():
    labels = [i % 3 for i in range(30)]
    parts = deal_groups([f"g{i}" for i in range(30)], labels, 3, 3)
    counts = np.array([[np.sum((parts == k) & (np.array(labels) == c)) for c in range(3)] for k in range(3)])
    assert counts.min() >= 3 and counts.max() <= 4 and np.bincount(parts).tolist() == [10, 10, 10]


@pytest.mark.fast
def test_a_class_with_fewer_groups_than_folds_is_refused():
    keys = ["a", "a", "b", "g", "c", "d", "e", "f", "h"]
    labels = [0, 0, 0, 0, 1, 1, 2, 2, 2]
    with pytest.raises(ConfigError, match="class 'happy' has 2 group"):
        plan_folds(keys, labels, 3, 2, CLASSES)


@pytest.mark.fast
def test_summary_is_mean_and_sample_std_and_the_pooled_confusion_is_the_sum():
    rng = np.random.default_rng(0)
    folds = []
    for _ in range(4):
        truth = rng.integers(0, 3, 40)
        guess = np.where(rng.random(40) < 0.7, truth, rng.integers(0, 3, 40))
        folds.append(classification_metrics(confusion_matrix(truth, guess, 3), CLASSES))
    out = summarize(folds, CLASSES)
    acc = [m["categorical_accuracy"] for m in folds]
    assert out["accuracy"]["mean"] == pytest.approx(np.mean(acc))
    assert out["accuracy"]["std"] == pytest.approx(np.std(acc, ddof=1))
    assert out["macro_f1"]["values"] == [m["macro_f1"] for m in folds]
    assert out["recall"]["sad"]["mean"] == pytest.approx(np.mean([m["per_class"]["sad"]["recall"] for m in folds]))
    pooled = np.sum([m["confusion_matrix"]["rows_true_cols_predicted"] for m in folds], axis=0)
    assert out["pooled"]["confusion_matrix"]["rows_true_cols_predicted"] == pooled.tolist()
    assert out["pooled"]["test_rows"] == 160
    # A class a fold did not hold out does not count as recall 0 there.
    assert mean_std([0.5, None, 0.7]) == {"mean": pytest.approx(0.6), "std": pytest.approx(np.std([0.5, 0.7], ddof=1)),
                                          "values": [0.5, None, 0.7]}
    assert mean_std([0.5])["std"] == 0.0
