"""The trainer's one error type."""
from __future__ import annotations

import math


class TrainingError(RuntimeError):
    """Training cannot go on (NaN/inf, no usable prompts, bad checkpoint); the message names the step."""


def check_finite(step: int, what: str, value: float) -> None:
    """Raise TrainingError naming the step and the quantity when ``value`` is NaN or ±inf."""
    if not math.isfinite(value):
        raise TrainingError(f"step {step}: {what} is {value} (not finite); lower train.learning_rate, raise "
                            f"gradient accumulation, or check the rewards")
