"""Early stopping's rule: patience on val_loss, once the run has learned. Pure Python (the
training workers call it each epoch; tests replay measured curves through it).

Patience alone (stop after `patience` epochs without a lower val_loss) assumes the val loss has
passed its minimum. From scratch on small data it has often not even left chance level yet: the
seed CNN on 192-300 demo faces sat at chance (val_loss ~ ln 3) for 2-15 epochs before it fell,
and patience 3 stopped 3 runs of 6 there, keeping a chance-level model (README, train). So a run
is stopped early only once its best val_loss is below chance level (metrics.chance_loss) by a
margin (TrainConfig.early_stopping_chance_margin); before that it trains the epochs it asked for.
"""

from __future__ import annotations

from typing import Any


def learned_below(chance_val_loss: float | None, margin: float | None) -> float | None:
    """The val_loss a run's best epoch must beat before early stopping may end it: `margin` (a
    fraction, TrainConfig.early_stopping_chance_margin) below `chance_val_loss` (metrics.chance_loss
    of the val split). None (no such bar) when either is None."""
    if chance_val_loss is None or margin is None:
        return None
    return chance_val_loss * (1.0 - margin)


def stops_early(state: dict[str, Any], patience: int, bar: float | None) -> bool:
    """Whether early stopping ends the run after the epochs in `state` (fresh_state's keys):
    `patience` epochs without a lower val_loss, once the best val_loss is below `bar` (learned_below;
    None: from the first epoch). A run still at chance has not started to learn: small data can
    sit there for several epochs, and stopping it would keep a chance-level model."""
    learned = bar is None or (state["best_val_loss"] is not None and state["best_val_loss"] < bar)
    return learned and state["bad_epochs"] >= patience
