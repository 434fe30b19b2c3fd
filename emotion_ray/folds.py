"""Group k-fold plans and their summaries: pure NumPy, no Ray or TensorFlow (crossval.py runs them).

**Folds.** Whole groups (prepare's `group` column: exact copies, near-duplicates, a person's
group key) are dealt to folds, so no group is ever both trained on and held out. The deal is
stratified and balanced (as scikit-learn's StratifiedGroupKFold aims to be): groups are taken
largest first (ties by the sha256 of their key, so input order plays no part), and each goes to
the fold that holds the least of its classes so far, relative to each class's total (ties: the
fold with fewest rows, then the lowest index). Deterministic for a given dataset.

Why not the sha256 of the key mod K, as prepare's split does: with hundreds of rows, hashing
leaves folds tens of percent apart in size and class mix, which adds its own spread to the
fold-to-fold standard deviation the cross-validation is there to measure. A hash is what a
train/test split needs (a picture never moves as data grows); a cross-validation is recomputed
whole every time, so balance wins.

**Inner validation.** Each fold trains on the other K-1 folds; their groups are dealt the same
way into `inner_parts` parts and part 0 is the fold's validation split (early stopping,
temperature), the rest its training split.

**Summaries.** `summarize` gives the mean and sample standard deviation (ddof=1) across folds
of accuracy, macro-F1 and per-class recall, and the pooled confusion matrix: the sum of the
folds' matrices, i.e. every held-out row once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from emotion_ray.errors import ConfigError
from emotion_ray.metrics import classification_metrics


def _key_order(keys: Sequence[str]) -> list[str]:
    return [hashlib.sha256(str(k).encode()).hexdigest() for k in keys]


def deal_groups(group_keys: Sequence[str], labels: Sequence[int] | np.ndarray, parts: int,
                num_classes: int) -> np.ndarray:
    """Each row's part (int64 array, shape (rows,), values 0..parts-1): whole groups, stratified by
    class and balanced in rows (see the module docstring). `group_keys`: each row's group key;
    `labels`: each row's class index (0..num_classes-1). Raises ValueError when there are fewer
    groups than parts (a part would be empty)."""
    keys = np.asarray(group_keys, dtype=object)
    labels = np.asarray(labels, dtype=np.int64)
    if len(keys) != len(labels):
        raise ValueError(f"{len(keys)} group keys for {len(labels)} labels")
    unique, row_group = np.unique(keys.astype(str), return_inverse=True)
    if len(unique) < parts:
        raise ValueError(f"{len(unique)} groups cannot fill {parts} parts")
    counts = np.zeros((len(unique), num_classes), np.int64)  # rows of each class in each group
    np.add.at(counts, (row_group, labels), 1)
    totals = np.maximum(counts.sum(axis=0), 1).astype(float)
    sizes = counts.sum(axis=1)
    hashes = _key_order(unique)
    order = sorted(range(len(unique)), key=lambda g: (-sizes[g], hashes[g]))
    filled = np.zeros((parts, num_classes), np.int64)
    part_of_group = np.empty(len(unique), np.int64)
    for g in order:
        # How full each part already is in this group's classes, each class relative to its total.
        cost = (filled / totals) @ counts[g]
        best = min(range(parts), key=lambda p: (round(float(cost[p]), 12), int(filled[p].sum()), p))
        part_of_group[g] = best
        filled[best] += counts[g]
    return part_of_group[row_group]


@dataclass
class FoldPlan:
    """A group k-fold plan over a pool of rows. `fold`: each row's held-out fold (rows,);
    `inner_val`: (folds, rows) bool, True where a row is in fold k's inner validation split
    (never for rows held out in fold k)."""

    folds: int
    fold: np.ndarray
    inner_val: np.ndarray

    def role(self, k: int) -> np.ndarray:
        """Each row's split in fold k: "test" (held out), "val" (inner validation) or "train"."""
        roles = np.full(len(self.fold), "train", dtype=object)
        roles[self.inner_val[k]] = "val"
        roles[self.fold == k] = "test"
        return roles


def plan_folds(group_keys: Sequence[str], labels: Sequence[int] | np.ndarray, folds: int, inner_parts: int,
               classes: list[str]) -> FoldPlan:
    """The group k-fold plan of a pool (see the module docstring), or ConfigError when the pool
    cannot make it: fewer groups of a class than folds (a fold would hold none of it out), or
    fewer groups in some fold's training part than `inner_parts`."""
    keys = np.asarray(group_keys, dtype=object).astype(str)
    labels = np.asarray(labels, dtype=np.int64)
    for c, name in enumerate(classes):
        n = len(np.unique(keys[labels == c]))
        if n < folds:
            raise ConfigError(f"class {name!r} has {n} group(s) in the pool, fewer than folds={folds}: a fold would "
                              f"hold none of it out; use folds <= {max(n, 2)} or add pictures of it")
    fold = deal_groups(keys, labels, folds, len(classes))
    inner_val = np.zeros((folds, len(keys)), bool)
    for k in range(folds):
        rest = np.flatnonzero(fold != k)
        groups = len(np.unique(keys[rest]))
        if groups < inner_parts:
            raise ConfigError(f"fold {k} trains on {groups} group(s), fewer than inner_parts={inner_parts} needs")
        inner_val[k, rest] = deal_groups(keys[rest], labels[rest], inner_parts, len(classes)) == 0
    return FoldPlan(folds, fold, inner_val)


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """{"mean", "std", "values"} of the values that are not None: std is the sample standard
    deviation (ddof=1; 0.0 for a single value); mean and std are None when no value is left."""
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return {"mean": None, "std": None, "values": list(values)}
    arr = np.asarray(kept)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "values": list(values)}


def summarize(fold_metrics: list[dict[str, Any]], classes: list[str]) -> dict[str, Any]:
    """Across folds: mean ± std of accuracy, macro-F1, macro precision and recall, and each class's
    recall (over the folds that held that class out), and the pooled confusion matrix (the sum of
    the folds' `confusion_matrix`: every held-out row once) with its own metrics
    (metrics.classification_metrics). `fold_metrics`: classification_metrics of each fold, in order."""
    def column(key: str) -> list[float]:
        return [m[key] for m in fold_metrics]

    confusion = sum(np.asarray(m["confusion_matrix"]["rows_true_cols_predicted"], np.int64) for m in fold_metrics)
    pooled = classification_metrics(confusion, classes)
    return {
        "accuracy": mean_std(column("categorical_accuracy")),
        "macro_f1": mean_std(column("macro_f1")),
        "macro_precision": mean_std(column("macro_precision")),
        "macro_recall": mean_std(column("macro_recall")),
        "recall": {c: mean_std([m["per_class"][c]["recall"] if m["per_class"][c]["support"] else None
                                for m in fold_metrics]) for c in classes},
        "pooled": pooled,
    }
