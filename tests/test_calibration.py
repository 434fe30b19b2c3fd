"""Temperature scaling, ECE and reliability bins: hand-checked values and synthetic models whose
miscalibration is known."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emotion_ray.calibration import (
    MIN_VAL_ROWS,
    apply_temperature,
    calibration_folds,
    calibration_report,
    choose_temperature,
    expected_calibration_error,
    fit_temperature,
    held_out_nll,
    min_confidence_for_precision,
    negative_log_likelihood,
    reliability_bins,
)

pytestmark = pytest.mark.fast


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def synthetic(rows: int, true_temperature: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z) (so softmax(z) is perfectly calibrated) and a model that
    outputs softmax(z / true_temperature): over-confident when true_temperature < 1."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (rows, 3))
    p = softmax(z)
    labels = (rng.random(rows)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    return softmax(z / true_temperature).astype(np.float32), labels


def test_ece_matches_a_hand_computed_value():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.7, 0.3]])
    labels = np.array([0, 1, 1, 0])
    # 0.9 (bin (13/15, 14/15]): accuracy 1/2, gap 0.4, half the rows; 0.7 (bin (10/15, 11/15]): accuracy 1, gap 0.3.
    assert expected_calibration_error(probs, labels) == pytest.approx(0.5 * 0.4 + 0.5 * 0.3)
    stats = reliability_bins(probs, labels)
    assert len(stats["count"]) == 15 and stats["count"][13] == 2 and stats["count"][10] == 2 and sum(stats["count"]) == 4
    assert stats["accuracy"][13] == 0.5 and stats["confidence"][10] == pytest.approx(0.7)
    assert stats["accuracy"][0] is None  # an empty bin
    # Confidence equal to accuracy in every bin: 0. No rows: None.
    assert expected_calibration_error(np.array([[0.5, 0.5], [0.5, 0.5]]), np.array([0, 1])) == pytest.approx(0.0)
    assert expected_calibration_error(np.zeros((0, 3)), np.zeros(0)) is None
    # Bin edges belong to the bin below ((b-1)/B, b/B]; 1.0 is in the last bin.
    assert reliability_bins(np.array([[1.0, 0.0], [0.6, 0.4]]), np.array([0, 0]), bins=5)["count"] == [0, 0, 1, 0, 1]


def test_temperature_scaling_keeps_argmax_and_t1_is_the_raw_output():
    probs, _ = synthetic(200, 0.5, seed=1)
    probs[0] = [1.0, 0.0, 0.0]  # an underflowed probability stays finite
    for t in (0.3, 2.0, 7.0):
        scaled = apply_temperature(probs, t)
        assert scaled.dtype == np.float32 and np.isfinite(scaled).all()
        assert np.allclose(scaled.sum(axis=1), 1, atol=1e-6) and (scaled.argmax(1) == probs.argmax(1)).all()
    assert (apply_temperature(probs, 2.0).max(1) <= probs.max(1) + 1e-7).all()  # softer
    assert (apply_temperature(probs, 1.0) == probs).all()
    # A row's result does not depend on the rows beside it.
    assert (apply_temperature(probs[5:9], 2.0) == apply_temperature(probs, 2.0)[5:9]).all()
    with pytest.raises(ValueError, match="positive"):
        apply_temperature(probs, 0.0)


@pytest.mark.parametrize("true_temperature", [0.4, 2.5])
def test_fit_recovers_the_miscalibration_and_lowers_ece_on_held_out_rows(true_temperature):
    val_probs, val_labels = synthetic(3000, true_temperature, seed=2)
    test_probs, test_labels = synthetic(3000, true_temperature, seed=3)  # held out: not used to fit
    t = fit_temperature(val_probs, val_labels)
    # The model divided the calibrated logits by true_temperature: T undoes it (T > 1 for an over-confident one).
    assert t == pytest.approx(1 / true_temperature, rel=0.1)
    assert (t > 1) == (true_temperature < 1)
    before = expected_calibration_error(test_probs, test_labels)
    after = expected_calibration_error(apply_temperature(test_probs, t), test_labels)
    assert before > 0.05 and after < before / 3, (before, after)
    # The golden-section search lands on the NLL's minimum: no grid point does better.
    grid = np.exp(np.linspace(np.log(0.1), np.log(10), 400))
    best_on_grid = min(negative_log_likelihood(val_probs, val_labels, g) for g in grid)
    assert negative_log_likelihood(val_probs, val_labels, t) <= best_on_grid + 1e-9


def test_fit_with_nothing_to_fit_and_bad_input():
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0)) == 1.0
    with pytest.raises(ValueError, match="do not match"):
        fit_temperature(np.full((2, 3), 1 / 3), np.array([0]))
    with pytest.raises(ValueError, match="class indices"):
        fit_temperature(np.full((2, 3), 1 / 3), np.array([0, 3]))


def test_min_confidence_for_a_target_precision():
    probs = np.array([[0.95, 0.05], [0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.55, 0.45]])
    labels = np.array([0, 0, 1, 0, 0, 1])  # right, right, wrong, right, right, wrong
    # Kept rows at each threshold: 1/1, 2/2, 2/3, 3/4, 4/5, 4/6 right.
    assert min_confidence_for_precision(probs, labels, 0.75) == {
        "target_precision": 0.75, "min_confidence": 0.6, "precision": 0.8, "coverage": pytest.approx(5 / 6)}
    assert min_confidence_for_precision(probs, labels, 0.9)["min_confidence"] == 0.9
    assert min_confidence_for_precision(probs[2:3], labels[2:3], 0.5)["min_confidence"] is None  # never reached
    # Tied confidences are kept or dropped together.
    tied = min_confidence_for_precision(np.array([[0.8, 0.2], [0.8, 0.2]]), np.array([0, 1]), 0.9)
    assert tied["min_confidence"] is None


def test_calibration_report_is_json_and_measures_on_test():
    val_probs, val_labels = synthetic(500, 0.5, seed=4)
    test_probs, test_labels = synthetic(500, 0.5, seed=5)
    report = calibration_report(val_probs, val_labels, test_probs, test_labels)
    json.dumps(report, allow_nan=False)
    assert report["temperature"] == fit_temperature(val_probs, val_labels)
    assert report["ece_before"] == expected_calibration_error(test_probs, test_labels)
    cal = report["calibration"]
    assert cal["val_rows"] == 500 and sum(cal["reliability_after"]["count"]) == 500
    assert cal["val_nll_after"] < cal["val_nll_before"] and cal["test_nll_after"] < cal["test_nll_before"]
    assert cal["suggested_min_confidence"]["target_precision"] == 0.9
    assert cal["fit"] == "nll_minimum"
    empty = calibration_report(np.zeros((0, 3)), np.zeros(0), np.zeros((0, 3)), np.zeros(0))
    assert empty["temperature"] == 1.0 and empty["ece_before"] is None and empty["calibration"]["fit"] == "no_rows"
    json.dumps(empty, allow_nan=False)


def test_a_perfectly_classified_validation_split_keeps_the_raw_softmax():
    """Every val row right: the NLL falls as T falls, without a minimum; sharpening to the bound
    would make every test error a confident one, so T stays 1."""
    val_probs, _ = synthetic(300, 1.0, seed=6)
    val_labels = val_probs.argmax(axis=1)
    assert fit_temperature(val_probs, val_labels) < 0.07  # towards the lower bound, where the NLL is flat at 0
    test_probs, test_labels = synthetic(300, 1.0, seed=7)
    report = calibration_report(val_probs, val_labels, test_probs, test_labels)
    assert report["temperature"] == 1.0 and report["calibration"]["fit"] == "no_minimum_in_range"
    assert report["ece_after"] == report["ece_before"]


def test_cross_validation_holds_every_row_out_once_in_stratified_folds():
    probs, labels = synthetic(103, 0.5, seed=8)
    fold = calibration_folds(labels)
    assert (fold == calibration_folds(labels)).all()  # deterministic
    assert sorted(np.unique(fold)) == [0, 1, 2, 3, 4]
    for k in range(3):  # each class dealt round-robin: its rows spread over the folds within one
        per_fold = np.bincount(fold[labels == k], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1, per_fold
    cv = held_out_nll(probs, labels)
    assert cv["rows"] == 103 and len(cv["fold_temperatures"]) == 5
    assert cv["nll_raw"] == pytest.approx(negative_log_likelihood(probs, labels))
    # Each held-out NLL uses a T fitted without its rows: never below what the full-data fit gets on them.
    assert cv["nll_held_out"] >= negative_log_likelihood(probs, labels, fit_temperature(probs, labels)) - 1e-12
    with pytest.raises(ValueError, match="at least 5 rows"):
        held_out_nll(probs[:4], labels[:4])


def test_a_small_validation_split_keeps_the_raw_softmax_and_says_why():
    """A really over-confident model, but fewer validation rows than a temperature needs: T = 1."""
    val_probs, val_labels = synthetic(MIN_VAL_ROWS - 1, 0.5, seed=9)
    test_probs, test_labels = synthetic(2000, 0.5, seed=10)
    assert abs(fit_temperature(val_probs, val_labels) - 1) > 0.3  # a fit exists, and it is not kept
    report = calibration_report(val_probs, val_labels, test_probs, test_labels)
    assert report["temperature"] == 1.0 and report["calibration"]["fit"] == "too_few_rows"
    assert f"{MIN_VAL_ROWS - 1} validation rows" in report["temperature_reason"]
    assert report["ece_after"] == report["ece_before"] and report["calibration"]["warnings"] == []
    json.dumps(report, allow_nan=False)


def test_a_noisy_fit_on_a_calibrated_model_is_not_kept():
    """A calibrated model (true T = 1) and 120 validation rows: the fitted T strays from 1 by noise;
    on rows it was not fitted on it does not help, so T = 1, and the test split (2,000 rows, never
    used to choose) confirms that keeping it would have raised the ECE."""
    val_probs, val_labels = synthetic(120, 1.0, seed=23)  # fitted T = 0.69: sharpening, as the demo's 0.54
    test_probs, test_labels = synthetic(2000, 1.0, seed=12)
    fitted = fit_temperature(val_probs, val_labels)
    assert abs(fitted - 1) > 0.25, fitted
    choice = choose_temperature(val_probs, val_labels)
    assert (choice.temperature, choice.fit, choice.fitted) == (1.0, "no_held_out_gain", fitted)
    cv = choice.cross_validation
    assert cv["gain"] <= cv["gain_standard_error"] and "not fitted on" in choice.reason
    report = calibration_report(val_probs, val_labels, test_probs, test_labels, fitted=choice)
    assert report["temperature"] == 1.0 and report["temperature_reason"] == choice.reason
    assert report["calibration"]["fitted_temperature"] == fitted and report["calibration"]["cross_validation"] == cv
    raw_ece = expected_calibration_error(test_probs, test_labels)
    assert expected_calibration_error(apply_temperature(test_probs, fitted), test_labels) > raw_ece
    assert report["ece_after"] == report["ece_before"] == raw_ece


@pytest.mark.parametrize("true_temperature", [0.5, 2.0])
def test_a_real_miscalibration_on_enough_rows_is_kept_and_helps_held_out_rows(true_temperature):
    val_probs, val_labels = synthetic(400, true_temperature, seed=13)
    test_probs, test_labels = synthetic(2000, true_temperature, seed=14)
    report = calibration_report(val_probs, val_labels, test_probs, test_labels)
    cal = report["calibration"]
    assert cal["fit"] == "nll_minimum" and report["temperature"] == fit_temperature(val_probs, val_labels)
    assert report["temperature"] == pytest.approx(1 / true_temperature, rel=0.2)
    cv = cal["cross_validation"]
    assert cv["gain"] > 3 * cv["gain_standard_error"] and cv["ece_held_out"] < cv["ece_raw"]
    assert cal["test_nll_after"] < cal["test_nll_before"] and report["ece_after"] < report["ece_before"] / 2
    assert report["temperature_reason"].startswith(f"T = {report['temperature']:.2f} kept")
    assert cal["warnings"] == [] and cal["ece_worse"] is False


def test_a_kept_temperature_that_makes_test_ece_worse_is_reported():
    """Val over-confident (T ~ 2 kept), test calibrated (a shift between them): the softened test
    probabilities are under-confident. The test split does not overrule val, but the report says so."""
    val_probs, val_labels = synthetic(400, 0.5, seed=15)
    test_probs, test_labels = synthetic(2000, 1.0, seed=16)
    report = calibration_report(val_probs, val_labels, test_probs, test_labels)
    assert report["temperature"] > 1.5 and report["ece_after"] > report["ece_before"]
    cal = report["calibration"]
    assert cal["ece_worse"] is True
    assert any(f"raised the test ECE from {report['ece_before']:.3f} to {report['ece_after']:.3f}" in w
               for w in cal["warnings"]), cal["warnings"]
