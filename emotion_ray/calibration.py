"""Calibrated confidence: temperature scaling, expected calibration error, reliability bins.

Pure NumPy (no TensorFlow or Ray). Temperature scaling is Guo, Pleiss, Sun and Weinberger,
"On Calibration of Modern Neural Networks", ICML 2017: one scalar T > 0 divides the logits
before the softmax, fitted by minimising the negative log-likelihood (NLL) on held-out data
(here the validation split). It never changes the argmax, so accuracy is untouched; T > 1
softens an over-confident model, T < 1 sharpens an under-confident one.

The models here end in a softmax, so their log-probabilities serve as logits: they differ from
the pre-softmax logits by a per-row constant, which a softmax ignores. A probability that
underflowed to 0 counts as the smallest positive float32 (`TINY`), so its logit stays finite.

A fitted T is kept only when the validation split supports it (choose_temperature: enough rows
and a lower cross-validated NLL); otherwise T = 1, and metrics.json's `temperature_reason` says
why. A kept T that raises the ECE of rows it never saw (test, or held-out validation folds) is
reported as such (calibration_report's `warnings`), never silently.

ECE (the same paper, eq. 3) sorts rows by confidence (their top probability) into equal-width
bins ((b-1)/B, b/B], b = 1..B (B = 15 by default, as in the paper), and averages the gap
|accuracy - mean confidence| of each bin weighted by its share of the rows.
"""

from __future__ import annotations

from typing import Any, NamedTuple

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


# When the validation split supports a temperature (choose_temperature). Guo et al. fit T on
# 5,000-25,000 validation rows; a few dozen make the fitted T noise: the demo's 60 validation
# pictures gave T = 0.54, which took its test ECE from 0.112 to 0.166. Below MIN_VAL_ROWS no fit
# is kept; above, T is kept only when it lowers the NLL of validation rows it was not fitted on
# (CALIBRATION_FOLDS-fold cross-validation) by more than HELD_OUT_GAIN_SE standard errors of that
# gain. Measured on synthetic models (README, calibrated confidence): a calibrated model kept a
# fitted T in 0-7 % of splits of 60-2,000 rows (at 0 standard errors: 12-40 %), an over- or
# under-confident one (true T 0.5 or 2) in 58-70 % at 60 rows and every time from 400; on 5
# seed-CNN runs on 300 demo faces (51-71 validation rows) it kept none, where always fitting
# raised the ECE on 300 unseen faces in 3 of 5 (0.023 -> 0.044 at T = 0.60).
MIN_VAL_ROWS = 50
CALIBRATION_FOLDS = 5
HELD_OUT_GAIN_SE = 1.0


class TemperatureChoice(NamedTuple):
    """choose_temperature's answer: the temperature a run keeps and why.

    temperature: T > 0 kept (1.0: the raw softmax); fit: a code (calibration_report lists them);
    reason: the same in a sentence, for metrics.json's `temperature_reason` and the summary;
    fitted: the NLL-minimising T on every validation row (None when none was fitted), kept or
    not; cross_validation: held_out_nll's figures (None when not run)."""

    temperature: float
    fit: str
    reason: str
    fitted: float | None = None
    cross_validation: dict[str, Any] | None = None


def _row_nll(logits: np.ndarray, labels: np.ndarray, beta: float) -> np.ndarray:
    """(N,) negative log-likelihood of each row of softmax(beta * logits) at its label."""
    z = beta * logits
    top = z.max(axis=1)
    return top + np.log(np.exp(z - top[:, None]).sum(axis=1)) - z[np.arange(len(z)), labels]


def calibration_folds(labels: np.ndarray, folds: int = CALIBRATION_FOLDS, seed: int = 0) -> np.ndarray:
    """(N,) fold index in 0..folds-1 of each row, stratified: each class's rows, in a seeded random
    order, are dealt round-robin, so every fold holds each class in proportion. Deterministic."""
    labels = np.asarray(labels, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]  # by class, shuffled within each class
    fold = np.empty(len(labels), dtype=np.int64)
    fold[order] = np.arange(len(labels)) % folds
    return fold


def held_out_nll(probs: np.ndarray, labels: np.ndarray, folds: int = CALIBRATION_FOLDS) -> dict[str, Any]:
    """K-fold cross-validated temperature scaling on `probs` (N, K) softmax outputs and integer
    `labels` (N,): for each fold, T is fitted (fit_temperature) on the other folds and each of the
    fold's rows scored at that T, so every row's NLL comes from a T that never saw it.

    Returns {"folds", "rows", "nll_raw" (mean NLL at T = 1, nats per row), "nll_held_out" (mean NLL
    at the held-out Ts), "gain" (nll_raw - nll_held_out: > 0 when scaling helps rows it did not
    see), "gain_standard_error" (standard error of that mean over the rows' paired differences),
    "ece_raw", "ece_held_out" (ECE of the rows at T = 1 and at their held-out Ts), "fold_temperatures"}.
    Needs at least `folds` rows (ValueError otherwise)."""
    probs = np.asarray(probs)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) < folds:
        raise ValueError(f"{folds}-fold cross-validation needs at least {folds} rows, got {len(labels)}")
    logits = logits_from_probabilities(probs)
    fold = calibration_folds(labels, folds)
    raw, held_out = _row_nll(logits, labels, 1.0), np.empty(len(labels))
    scaled = np.empty(probs.shape, dtype=np.float64)
    temperatures = []
    for k in range(folds):
        inside = fold == k
        t = fit_temperature(probs[~inside], labels[~inside])
        temperatures.append(t)
        held_out[inside] = _row_nll(logits[inside], labels[inside], 1.0 / t)
        scaled[inside] = _softmax(logits[inside] / t)
    gain = raw - held_out
    return {"folds": folds, "rows": int(len(labels)), "nll_raw": float(raw.mean()),
            "nll_held_out": float(held_out.mean()), "gain": float(gain.mean()),
            "gain_standard_error": float(gain.std(ddof=1) / np.sqrt(len(gain))),
            "ece_raw": expected_calibration_error(probs, labels),
            "ece_held_out": expected_calibration_error(scaled, labels), "fold_temperatures": temperatures}


def choose_temperature(val_probs: np.ndarray, val_labels: np.ndarray, min_rows: int = MIN_VAL_ROWS,
                       folds: int = CALIBRATION_FOLDS, min_gain_se: float = HELD_OUT_GAIN_SE) -> TemperatureChoice:
    """The temperature a run keeps, from its validation rows (raw softmax (N, K), integer labels
    (N,)), and why (a TemperatureChoice; `fit` as calibration_report lists the codes).

    Temperature scaling (Guo et al. 2017) fits T by NLL on the validation rows. The fit is kept
    only when the validation split supports it: at least `min_rows` rows, an NLL minimum inside
    TEMPERATURE_BOUNDS, and a `folds`-fold cross-validated NLL (held_out_nll) lower than the raw
    softmax's by more than `min_gain_se` standard errors of the gain (cross-validation: Stone
    1974, "Cross-validatory choice and assessment of statistical predictions"). Otherwise T = 1.
    Deterministic: calling it again on the same rows gives the same answer."""
    val_probs, val_labels = np.asarray(val_probs), np.asarray(val_labels, dtype=np.int64)
    n = len(val_labels)
    if not n:
        return TemperatureChoice(1.0, "no_rows", "T = 1: no validation rows to fit a temperature on")
    fitted = fit_temperature(val_probs, val_labels)
    lo, hi = TEMPERATURE_BOUNDS
    if (bool((val_probs.argmax(axis=1) == val_labels).all()) or fitted <= lo * (1 + 1e-3)
            or fitted >= hi * (1 - 1e-3)):
        return TemperatureChoice(1.0, "no_minimum_in_range",
                                 f"T = 1: the validation NLL has no minimum for T in [{lo:g}, {hi:g}] "
                                 "(every validation row classified right, or the fit ran to a bound)", fitted)
    if n < min_rows:
        return TemperatureChoice(1.0, "too_few_rows",
                                 f"T = 1: {n} validation rows, fewer than the {min_rows} a temperature needs "
                                 f"(the fit gave T = {fitted:.2f}, not kept)", fitted)
    cv = held_out_nll(val_probs, val_labels, folds)
    figures = (f"{folds}-fold cross-validated NLL on {n} validation rows {cv['nll_raw']:.4f} at T = 1, "
               f"{cv['nll_held_out']:.4f} with T fitted on the other folds (gain {cv['gain']:+.4f} ± "
               f"{cv['gain_standard_error']:.4f})")
    if cv["gain"] <= min_gain_se * cv["gain_standard_error"]:
        return TemperatureChoice(1.0, "no_held_out_gain",
                                 f"T = 1: the fitted T = {fitted:.2f} does not lower the NLL of validation rows it "
                                 f"was not fitted on by more than {min_gain_se:g} standard error"
                                 f"{'' if min_gain_se == 1 else 's'} of the gain: {figures}",
                                 fitted, cv)
    return TemperatureChoice(fitted, "nll_minimum", f"T = {fitted:.2f} kept: {figures}", fitted, cv)


def calibration_report(val_probs: np.ndarray, val_labels: np.ndarray, test_probs: np.ndarray,
                       test_labels: np.ndarray, bins: int = ECE_BINS,
                       fitted: TemperatureChoice | None = None) -> dict[str, Any]:
    """Choose T on the validation rows (choose_temperature) and measure it on the test rows
    (metrics.json's figures).

    Inputs are raw softmax outputs (N, K) and integer labels (N,) of each split. Returns
    {"temperature", "temperature_reason" (why T is what it is, a sentence), "ece_before",
    "ece_after" (test ECE at T = 1 and at the kept T; None without test rows), "calibration":
    {method, fit, fitted_on, val_rows, bins, fitted_temperature (the NLL fit on every validation
    row, kept or not), cross_validation (held_out_nll's figures, or None), val/test NLL before and
    after (nats per row), reliability_before / reliability_after (reliability_bins of test),
    suggested_min_confidence (min_confidence_for_precision on calibrated val rows, target
    SUGGESTION_TARGET_PRECISION), ece_worse (whether the kept T raised the ECE of rows it was not
    fitted on: the test split, or the validation rows held out by the cross-validation), warnings
    (a sentence for each such case; the train summary prints them)}}.

    `fit` is "nll_minimum" when T was kept; otherwise T = 1 (the raw softmax) and it says why:
    "no_rows" (no validation rows), "no_minimum_in_range" (every validation row classified right,
    when the NLL falls as T falls, or the fit ended on a bound of TEMPERATURE_BOUNDS),
    "too_few_rows" (fewer than MIN_VAL_ROWS), "no_held_out_gain" (the cross-validated NLL did not
    improve enough). `fitted`: choose_temperature's answer on these validation rows, when the
    caller already has it (evaluate.py needs T before it reads test). The test split never
    chooses T: a T that made test ECE worse is reported, not undone.
    """
    val_probs, val_labels = np.asarray(val_probs), np.asarray(val_labels, dtype=np.int64)
    choice = fitted or choose_temperature(val_probs, val_labels)
    temperature = choice.temperature
    test_after, val_after = apply_temperature(test_probs, temperature), apply_temperature(val_probs, temperature)
    nan_to_none = lambda x: None if np.isnan(x) else x  # noqa: E731 - JSON has no NaN
    ece_before = expected_calibration_error(test_probs, test_labels, bins)
    ece_after = expected_calibration_error(test_after, test_labels, bins)
    warnings = []
    if temperature != 1.0 and ece_before is not None and ece_after > ece_before:
        warnings.append(f"temperature T = {temperature:.2f} raised the test ECE from {ece_before:.3f} to "
                        f"{ece_after:.3f} ({len(test_labels)} test rows)")
    cv = choice.cross_validation
    if temperature != 1.0 and cv and cv["ece_held_out"] > cv["ece_raw"]:
        warnings.append(f"temperature scaling raised the ECE of held-out validation rows from {cv['ece_raw']:.3f} "
                        f"to {cv['ece_held_out']:.3f} ({cv['folds']}-fold cross-validation)")
    return {
        "temperature": temperature,
        "temperature_reason": choice.reason,
        "ece_before": ece_before,
        "ece_after": ece_after,
        "calibration": {
            "method": "temperature scaling (Guo et al. 2017), NLL on the validation split, kept when a "
                      f"{CALIBRATION_FOLDS}-fold cross-validated NLL improves",
            "fit": choice.fit, "fitted_on": "val", "val_rows": int(len(val_labels)), "bins": bins,
            "fitted_temperature": choice.fitted, "cross_validation": cv,
            "val_nll_before": nan_to_none(negative_log_likelihood(val_probs, val_labels)),
            "val_nll_after": nan_to_none(negative_log_likelihood(val_probs, val_labels, temperature)),
            "test_nll_before": nan_to_none(negative_log_likelihood(test_probs, test_labels)),
            "test_nll_after": nan_to_none(negative_log_likelihood(test_probs, test_labels, temperature)),
            "reliability_before": reliability_bins(test_probs, test_labels, bins),
            "reliability_after": reliability_bins(test_after, test_labels, bins),
            "suggested_min_confidence": min_confidence_for_precision(val_after, val_labels,
                                                                     SUGGESTION_TARGET_PRECISION),
            "ece_worse": bool(warnings),
            "warnings": warnings,
        },
    }
