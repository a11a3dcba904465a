"""What growing and shrinking share: the error, and the models they take."""

import math
import numbers

import keras

from keras_unitscale import parametrization

__all__ = ["GrowthError", "factor", "check_model", "scaled_count"]


class GrowthError(ValueError):
    """A model, layer or factor that cannot be resized, with what was received."""


def factor(name, value, what):
    """A resize factor of `what` ("grow" or "shrink"): a finite number, at least 1 (the other way is the other function)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise GrowthError(f"`{name}` must be a number > 0. Received: {name}={value!r}")
    if value < 1:
        other = "shrink" if what == "grow" else "grow"
        raise GrowthError(
            f"{what} takes a factor of at least 1 (`{name}` divides or multiplies the sizes by it): to go the other "
            f"way, call {other}({name}={1 / value:g}). Received: {name}={value!r}"
        )
    return float(value)


def scaled_count(count, factor, described, received):
    """`count` (units, blocks) times `factor`, which must be a whole number of at least 1.

    `described` names the count in the error ("'hidden0''s units of 16"),
    `received` says what the caller gave ("widths × 1.3").
    """
    new = count * factor
    if abs(new - round(new)) > 1e-9 or round(new) < 1:
        raise GrowthError(
            f"{described} times {factor:g} is {new:g}, not a whole number: choose a factor that gives whole "
            f"numbers. Received: {received}"
        )
    return int(round(new))


def check_model(model, what):
    """A built Sequential or functional model: a subclassed model's sizes are in its code, out of reach."""
    # A functional model keeps its graph (`_nodes_by_depth`); a subclassed one has only its code.
    if not isinstance(model, keras.Model) or not (isinstance(model, keras.Sequential) or hasattr(model, "_nodes_by_depth")):
        raise GrowthError(
            f"{what} takes a Sequential or functional Keras model (a subclassed model's sizes are in its code). "
            f"Received: {type(model).__name__}"
        )
    parametrization.check_built(model)
