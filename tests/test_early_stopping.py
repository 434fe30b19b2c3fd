"""Early stopping's rule (patience once the run has learned) replayed on measured val_loss curves,
chance level, and what the train summary says about a run that never learned."""

from __future__ import annotations

import math

import pytest

from emotion_ray.config import ConfigError, TrainConfig, build_config
from emotion_ray.early_stopping import learned_below, stops_early
from emotion_ray.metrics import chance_loss

pytestmark = pytest.mark.fast

# val_loss per epoch of the seed CNN with the default recipe (lr 1e-3, batch 32) on 192 demo faces
# at 64 px (seed 2 of the measurement in README, train): at chance (ln 3 = 1.099) for 10 epochs, then learning.
# Its accuracy on 300 unseen faces: 0.337 at epoch 1, 0.56 at 11, 0.747 at 20.
SLOW_START = [1.0914, 1.0974, 1.1017, 1.0942, 1.0809, 1.0893, 1.1, 1.0734, 1.0944, 1.0877, 1.0349, 1.0936, 1.0301,
              1.0083, 0.9926, 0.9468, 0.9341, 0.9419, 0.8633, 0.8564]


def replay(val_losses: list[float], patience: int, bar: float | None) -> tuple[int, int]:
    """(epochs run, best epoch) of a run with these val_losses, as EpochCheckpoint keeps its state."""
    state = {"best_val_loss": None, "best_epoch": None, "bad_epochs": 0}
    for epoch, loss in enumerate(val_losses, 1):
        if state["best_val_loss"] is None or loss < state["best_val_loss"]:
            state.update(best_val_loss=loss, best_epoch=epoch, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        if stops_early(state, patience, bar):
            return epoch, state["best_epoch"]
    return len(val_losses), state["best_epoch"]


def test_chance_level_is_the_loss_of_answering_the_class_shares():
    three = ["angry", "happy", "sad"]
    assert chance_loss({c: 70 for c in three}, {c: 20 for c in three}, three) == pytest.approx(math.log(3))
    # Imbalanced train: the shares (add-one smoothed) are what a model that ignores its input answers.
    train, val = {"angry": 399, "happy": 799, "sad": 499}, {"angry": 10, "happy": 20, "sad": 10}
    shares = {c: (n + 1) / (1697 + 3) for c, n in train.items()}
    expected = -(0.25 * math.log(shares["angry"]) + 0.5 * math.log(shares["happy"]) + 0.25 * math.log(shares["sad"]))
    assert chance_loss(train, val, three) == pytest.approx(expected)
    assert math.isfinite(chance_loss({"angry": 0, "happy": 5, "sad": 5}, val, three))  # a class missing from train
    assert chance_loss(train, {c: 0 for c in three}, three) is None  # no val rows: no chance level


def test_a_run_at_chance_is_not_stopped_until_it_has_learned():
    bar = learned_below(math.log(3), TrainConfig(data="d").early_stopping_chance_margin)
    assert bar == pytest.approx(math.log(3) * 0.95)
    # Patience alone (the old rule, and `early_stopping_chance_margin: null`): stopped after epoch 4,
    # its first epoch kept: a model at chance.
    assert replay(SLOW_START, 3, None) == (4, 1)
    # Now it trains on until it has learned, and patience applies from there: all 20 epochs here.
    assert replay(SLOW_START, 3, bar) == (20, 20)
    # A run that learns and then overfits still stops `patience` epochs after its best.
    overfits = [1.05, 0.9, 0.7, 0.6, 0.65, 0.7, 0.8, 0.9]
    assert replay(overfits, 3, bar) == replay(overfits, 3, None) == (7, 4)
    # Fine-tuning from a model that is already good: epoch 1 beats chance, early stopping acts as before.
    assert replay([0.5, 0.55, 0.6, 0.7, 0.8], 3, bar) == (4, 1)


def test_the_margin_is_validated():
    assert TrainConfig(data="d", early_stopping_chance_margin=None).early_stopping_chance_margin is None
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="early_stopping_chance_margin"):
            build_config(TrainConfig, {"data": "d", "early_stopping_chance_margin": bad})


def test_the_train_summary_says_when_a_run_never_learned_and_why_its_temperature_is_what_it_is():
    from emotion_ray import summary

    cfg = TrainConfig(data="d", epochs=8, mlflow={"enabled": False})
    result = {"run_dir": "runs/small", "epochs_run": 8, "best_epoch": 8, "categorical_accuracy": 0.41,
              "macro_precision": 0.4, "macro_recall": 0.4, "test_rows": 22, "best_val_loss": 1.0734,
              "chance_val_loss": 1.0986, "learned": False, "temperature": 1.0, "ece_before": 0.11, "ece_after": 0.11,
              "temperature_reason": "T = 1: 42 validation rows, fewer than the 50 a temperature needs",
              "calibration": {"warnings": []}}
    text = summary.train_text(result, cfg)
    assert ("warning      not learned: the best val_loss 1.073 is not 5% below chance level 1.099" in text), text
    assert "calibration  T = 1: 42 validation rows, fewer than the 50 a temperature needs; test ECE 0.110 -> 0.110" in text
    learned = summary.train_text({**result, "learned": True, "temperature": 0.54, "ece_after": 0.166,
                                  "temperature_reason": "T = 0.54 kept: ...",
                                  "calibration": {"warnings": ["temperature T = 0.54 raised the test ECE from "
                                                               "0.110 to 0.166 (22 test rows)"]}}, cfg)
    assert "not learned" not in learned
    assert "warning      temperature T = 0.54 raised the test ECE from 0.110 to 0.166" in learned
