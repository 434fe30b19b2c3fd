"""Calibrated confidence: temperature scaling, expected calibration error, reliability bins.

Pure NumPy (no TensorFlow or Ray). Temperature scaling is Guo, Pleiss, Sun and Weinberger,
"On Calibration of Modern Neural Networks", ICML 2017: one scalar T > 0 divides the logits
before the softmax, fitted by minimising the negative log-likelihood (NLL) on held-out data
(here the validation split). It never changes the argmax, so accuracy is untouched; T > 1
softens an over-confident model, T < 1 sharpens an under-confident one.

The models here end in a softmax, so their log-probabilities serve as logits: they differ from
the pre-softmax logits by a per-row constant, which a softmax ignores. A probability that
underflowed to 0 counts as the smallest positive float32 (`TINY`), so its logit stays finite.

ECE (the same paper, eq. 3) sorts rows by confidence (their top probability) into equal-width
bins ((b-1)/B, b/B], b = 1..B (B = 15 by default, as in the paper), and averages the gap
|accuracy - mean confidence| of each bin weighted by its share of the rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ECE_BINS = 15
# Searched range of T. A validation split the model classifies perfectly has no NLL minimum at
# all (the NLL keeps falling as T falls and the probabilities sharpen towards one-hot, until it
# is flat at 0 in float64): calibration_report then keeps T = 1 rather than trust the fit.
TEMPERATURE_BOUNDS = (0.05, 20.0)
TINY = float(np.finfo(np.float32).tiny)
UNCERTAIN = "uncertain"  # the label of rows below `min_confidence` (abstention; score and predict)


def logits_from_probabilities(probs: np.ndarray) -> np.ndarray:
    """(N, K) probabilities -> (N, K) float64 log-probabilities, used as logits (0 counts as `TINY`)."""
    return np.log(np.maximum(np.asarray(probs, dtype=np.float64), TINY))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """(N, K) softmax outputs -> (N, K) float32 probabilities of softmax(log(probs) / T).

    Row-wise (a row's result never depends on the other rows). T = 1 returns `probs` itself
    (as float32), so a model without a fitted temperature outputs exactly what it did before.
    Raises ValueError when T is not a positive finite number.
    """
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, not {temperature}")
    if temperature == 1.0:
        return np.asarray(probs, dtype=np.float32)
    return _softmax(logits_from_probabilities(probs) / temperature).astype(np.float32)


def _nll(logits: np.ndarray, labels: np.ndarray, beta: float) -> float:
    """Mean negative log-likelihood of softmax(beta * logits) at the true labels."""
    z = beta * logits
    top = z.max(axis=1)
    log_norm = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(z)), labels]))


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean NLL (nats per row) of `probs` (N, K) at integer `labels` (N,) after temperature T.
    NaN for 0 rows."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return float("nan")
    return _nll(logits_from_probabilities(probs), labels, 1.0 / temperature)


def fit_temperature(probs: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
                    tolerance: float = 1e-6) -> float:
    """The T in `bounds` minimising the NLL of softmax(log(probs) / T) at `labels` (Guo et al. 2017).

    probs: (N, K) softmax outputs on held-out rows (the validation split); labels: (N,) class
    indices. The NLL is convex in beta = 1/T (a log-sum-exp of a linear function of beta minus a
    linear term), so a golden-section search over beta finds the global minimum in the range,
    to `tolerance` in beta. 0 rows give T = 1 (nothing to fit). Raises ValueError on mismatched
    shapes or a label outside 0..K-1.
    """
    probs = np.asarray(probs)
    labels = np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"probabilities {probs.shape} and labels {labels.shape} do not match")
    if len(labels) == 0:
        return 1.0
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(f"labels must be class indices 0..{probs.shape[1] - 1}")
    logits = logits_from_probabilities(probs)
    lo, hi = 1.0 / bounds[1], 1.0 / bounds[0]
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = lo + (1 - ratio) * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = _nll(logits, labels, a), _nll(logits, labels, b)
    while hi - lo > tolerance:
        if fa <= fb:  # the minimum lies in [lo, b]
            hi, b, fb = b, a, fa
            a = lo + (1 - ratio) * (hi - lo)
            fa = _nll(logits, labels, a)
        else:  # in [a, hi]
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = _nll(logits, labels, b)
    return float(1.0 / ((lo + hi) / 2))


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict[str, Any]:
    """Reliability-diagram statistics of `probs` (N, K) against integer `labels` (N,).

    Returns {"edges": B+1 bin edges on [0, 1], "count": rows per bin, "confidence": mean top
    probability per bin, "accuracy": share of those rows whose argmax is the label} (lists of
    B; confidence and accuracy are None for an empty bin). Bin b holds confidences in
    ((b-1)/B, b/B]; a confidence of exactly 0 goes to the first bin.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    confidence = probs.max(axis=1) if len(probs) else np.zeros(0)
    correct = (probs.argmax(axis=1) == labels) if len(probs) else np.zeros(0, bool)
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=bins)
    correct_sum = np.bincount(which, weights=correct.astype(float), minlength=bins)
    mean = lambda total: [float(t / n) if n else None for t, n in zip(total, count)]  # noqa: E731
    return {"edges": np.linspace(0.0, 1.0, bins + 1).tolist(), "count": count.tolist(),
            "confidence": mean(conf_sum), "accuracy": mean(correct_sum)}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float | None:
    """ECE (Guo et al. 2017, eq. 3) of `probs` (N, K) at integer `labels` (N,): the row-weighted
    mean over `bins` equal-width confidence bins of |accuracy - mean confidence|, in [0, 1]
    (0: confidence matches accuracy in every bin). None for 0 rows."""
    stats = reliability_bins(probs, labels, bins)
    total = sum(stats["count"])
    if not total:
        return None
    return float(sum(n / total * abs(acc - conf)
                     for n, acc, conf in zip(stats["count"], stats["accuracy"], stats["confidence"]) if n))


def min_confidence_for_precision(probs: np.ndarray, labels: np.ndarray, target: float) -> dict[str, Any]:
    """The lowest `min_confidence` at which the rows kept (top probability >= it) are right at
    least `target` of the time (precision of the kept rows, all classes together), on `probs`
    (N, K) and `labels` (N,). Returns {"target_precision", "min_confidence" (None when no
    threshold reaches the target), "precision", "coverage" (share of rows kept)}."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    out: dict[str, Any] = {"target_precision": target, "min_confidence": None, "precision": None, "coverage": 0.0}
    if not len(probs):
        return out
    confidence = probs.max(axis=1)
    order = np.argsort(-confidence, kind="stable")
    conf_sorted, correct = confidence[order], (probs.argmax(axis=1) == labels)[order]
    precision = np.cumsum(correct) / np.arange(1, len(order) + 1)
    # A threshold keeps every row tied with it: only the last of a run of equal confidences counts.
    last_of_tie = np.append(conf_sorted[1:] != conf_sorted[:-1], True)
    ok = np.flatnonzero((precision >= target) & last_of_tie)
    if len(ok):
        k = int(ok[-1])
        out.update(min_confidence=float(conf_sorted[k]), precision=float(precision[k]),
                   coverage=float((k + 1) / len(order)))
    return out


SUGGESTION_TARGET_PRECISION = 0.9


def choose_temperature(val_probs: np.ndarray, val_labels: np.ndarray) -> tuple[float, str]:
    """(T, fit): the temperature a run keeps, fitted on its validation rows (raw softmax (N, K),
    integer labels (N,)), and why (`fit`, as calibration_report documents it: T is 1 unless
    "nll_minimum"). Deterministic: calling it again on the same rows gives the same T."""
    val_probs, val_labels = np.asarray(val_probs), np.asarray(val_labels, dtype=np.int64)
    fitted = fit_temperature(val_probs, val_labels)
    lo, hi = TEMPERATURE_BOUNDS
    no_minimum = (bool((val_probs.argmax(axis=1) == val_labels).all()) or fitted <= lo * (1 + 1e-3)
                  or fitted >= hi * (1 - 1e-3))
    fit = "no_rows" if not len(val_labels) else "no_minimum_in_range" if no_minimum else "nll_minimum"
    return (fitted if fit == "nll_minimum" else 1.0), fit


def calibration_report(val_probs: np.ndarray, val_labels: np.ndarray, test_probs: np.ndarray,
                       test_labels: np.ndarray, bins: int = ECE_BINS,
                       fitted: tuple[float, str] | None = None) -> dict[str, Any]:
    """Fit T on the validation rows and measure it on the test rows (metrics.json's figures).

    Inputs are raw softmax outputs (N, K) and integer labels (N,) of each split. Returns
    {"temperature", "ece_before", "ece_after" (test ECE at T = 1 and at the fitted T; None
    without test rows), "calibration": {fit, fitted_on, val_rows, bins, val/test NLL before and
    after (nats per row), reliability_before / reliability_after (reliability_bins of test),
    suggested_min_confidence (min_confidence_for_precision on calibrated val rows, target
    SUGGESTION_TARGET_PRECISION)}}. `fit` is "nll_minimum"; or "no_minimum_in_range" when
    every validation row is classified right (the NLL then has no minimum: it falls as T falls)
    or the fit ended on a bound of TEMPERATURE_BOUNDS, and "no_rows" without validation rows:
    in both T is 1, the raw softmax. `fitted`: choose_temperature's answer on these validation
    rows, when the caller already has it (evaluate.py needs T before it reads test).
    """
    val_probs, val_labels = np.asarray(val_probs), np.asarray(val_labels, dtype=np.int64)
    temperature, fit = fitted or choose_temperature(val_probs, val_labels)
    test_after, val_after = apply_temperature(test_probs, temperature), apply_temperature(val_probs, temperature)
    nan_to_none = lambda x: None if np.isnan(x) else x  # noqa: E731 - JSON has no NaN
    return {
        "temperature": temperature,
        "ece_before": expected_calibration_error(test_probs, test_labels, bins),
        "ece_after": expected_calibration_error(test_after, test_labels, bins),
        "calibration": {
            "method": "temperature scaling (Guo et al. 2017), NLL on the validation split",
            "fit": fit, "fitted_on": "val", "val_rows": int(len(val_labels)), "bins": bins,
            "val_nll_before": nan_to_none(negative_log_likelihood(val_probs, val_labels)),
            "val_nll_after": nan_to_none(negative_log_likelihood(val_probs, val_labels, temperature)),
            "test_nll_before": nan_to_none(negative_log_likelihood(test_probs, test_labels)),
            "test_nll_after": nan_to_none(negative_log_likelihood(test_probs, test_labels, temperature)),
            "reliability_before": reliability_bins(test_probs, test_labels, bins),
            "reliability_after": reliability_bins(test_after, test_labels, bins),
            "suggested_min_confidence": min_confidence_for_precision(val_after, val_labels,
                                                                     SUGGESTION_TARGET_PRECISION),
        },
    }
