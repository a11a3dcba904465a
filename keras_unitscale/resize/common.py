"""What growing and shrinking share: the error, and the models they take."""

import math
import numbers

import keras

from keras_unitscale import parametrization

__all__ = ["GrowthError", "factor", "check_model"]


class GrowthError(ValueError):
    """A model, layer or factor that cannot be resized, with what was received."""


def factor(name, value):
    """A resize factor: a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise GrowthError(f"`{name}` must be a number > 0. Received: {name}={value!r}")
    return float(value)


def check_model(model, what):
    """A built Sequential or functional model: a subclassed model's sizes are in its code, out of reach."""
    # A functional model keeps its graph (`_nodes_by_depth`); a subclassed one has only its code.
    if not isinstance(model, keras.Model) or not (isinstance(model, keras.Sequential) or hasattr(model, "_nodes_by_depth")):
        raise GrowthError(
            f"{what} takes a Sequential or functional Keras model (a subclassed model's sizes are in its code). "
            f"Received: {type(model).__name__}"
        )
    parametrization.check_built(model)
