"""The two kinds of failure a user can act on; the CLI maps both to exit status 2.

`ConfigError`: the request is wrong (a bad key or value, an input that does not exist, an
output that is not ours). `StageError`: the request was fine but the run cannot go on (GPUs
never came, another run holds the output, a model whose outputs are not probabilities).
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class EmotionRayError(Exception):
    """Base of the errors worded for the person running the command."""


class ConfigError(EmotionRayError, ValueError):
    """A configuration or input problem, worded for the person who wrote the config."""


class StageError(EmotionRayError, RuntimeError):
    """A run that cannot continue for a reason outside the config (resources, locks, models)."""


class InputStallError(StageError):
    """A Train worker's input pipeline (Ray Data) delivered no batch for `input_stall_timeout_s`:
    stuck, not slow (typically its read tasks wait for CPUs that placement groups hold). The
    message names the reservations on the cluster at that moment."""
