"""Argument checks shared by the ops and layers: each raises a `ValueError` naming the value."""

import math
import re


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def finite(value):
    # Comparisons, not `math.isfinite`: NaN fails both, and under
    # `torch.compile` a float traced as a symbol can be compared in the graph,
    # where `math.isfinite` breaks it.
    return -math.inf < value < math.inf


def positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return value


def positive(name, value):
    if not _is_number(value) or not (value > 0 and finite(value)):
        raise ValueError(f"`{name}` must be a finite number > 0. Received: {name}={value!r}")
    return value


def non_negative(name, value):
    if not _is_number(value) or not (value >= 0 and finite(value)):
        raise ValueError(f"`{name}` must be a finite number >= 0. Received: {name}={value!r}")
    return value


def rate(name, value):
    if not _is_number(value) or not 0 <= value < 1:
        raise ValueError(f"`{name}` must be in [0, 1). Received: {name}={value!r}")
    return float(value)


def index(name, value, upper, upper_name):
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < upper:
        raise ValueError(
            f"`{name}` must be an integer in [0, {upper_name}={upper}). Received: {name}={value!r}"
        )
    return value


def one_of(name, value, options):
    if value not in options:
        raise ValueError(f"Unknown `{name}`. Expected one of {list(options)}. Received: {name}={value!r}")
    return value


def patterns(name, value):
    """A regular expression or a list of them, compiled; None gives []."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    try:
        return [re.compile(item) for item in items]
    except (re.error, TypeError) as error:
        raise ValueError(
            f"`{name}` must be a regular expression or a list of them. Received: {name}={value!r} ({error})"
        ) from None


def built(model, what=None):
    """Raises a `ValueError` saying how to build `model` if its variables do not exist yet.

    Args:
        model: a Keras model (or layer).
        what: the function that needs the variables, named first in the message.

    Returns:
        `model`.
    """
    if not model.built:
        asking = f"`{what}` needs a built model. " if what else ""
        raise ValueError(
            f"{asking}The model '{model.name}' is not built, so its variables do not exist yet. "
            "Build it first: start it with `keras.Input(shape)`, call `model.build(input_shape)`, "
            "or call it on a batch of data."
        )
    return model
