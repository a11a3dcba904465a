"""The script's own optimizer, made ours: `from_keras` (a new one) and `adopt` (in place).

A twin from `unit_scale`, or a model `UnitScaleCallback` converted in place,
stores its weights at unit scale, each with a fixed learning-rate
multiplier that only `keras_unitscale.optimizers` read.
"""

import keras
import numpy as np
from keras import ops

from keras_unitscale import optimizers

__all__ = ["from_keras", "adopt"]


# Keras's optimizers and ours, subclasses first. Keras's classes only (on PyTorch, Keras makes its
# `Adam` a fused subclass of its own): a user's subclass may change the update.
_COUNTERPARTS = (
    (keras.optimizers.AdamW, optimizers.AdamW), (keras.optimizers.Adam, optimizers.Adam),
    (keras.optimizers.SGD, optimizers.SGD), (keras.optimizers.RMSprop, optimizers.RMSprop),
    (keras.optimizers.Lion, optimizers.Lion),
)


def counterpart(optimizer):
    """Our class for a Keras optimizer, or None (a user's subclass, Adagrad, ...)."""
    if not type(optimizer).__module__.startswith("keras."):
        return None
    return next((ours for keras_class, ours in _COUNTERPARTS if isinstance(optimizer, keras_class)), None)


def from_keras(optimizer, parametrization="u-mup"):
    """Our counterpart of a Keras optimizer, with its arguments: how a script's `compile` keeps its optimizer.

    A twin from `unit_scale` needs one of our optimizers (module docstring).
    This makes the script's optimizer ours: the same learning rate or schedule, moments,
    epsilon, clipping and EMA; Keras's weight decay, `weight_decay · η_t` a
    step, becomes the independent decay that removes the same fraction a
    step (`weight_decay · η_peak`); a `LossScaleOptimizer` is rebuilt around it.

    Args:
        optimizer: an unbuilt `keras.optimizers.Adam`, `AdamW`, `SGD`,
            `RMSprop` or `Lion` (or a name Keras knows, "adam"), possibly
            in a `LossScaleOptimizer`.
        parametrization: "u-mup" (u-μP's learning rate per role, where no
            fixed multiplier says otherwise) or None.

    Example:

    >>> ours = from_keras(keras.optimizers.AdamW(0.01, weight_decay=0.1, beta_1=0.8))
    >>> type(ours).__name__, ours.beta_1, ours.weight_decay, ours.independent_weight_decay
    ('AdamW', 0.8, 0.001, True)
    """
    optimizer = keras.optimizers.get(optimizer)
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        config = optimizer.get_config()
        config.pop("inner_optimizer")
        return keras.optimizers.LossScaleOptimizer(from_keras(optimizer.inner_optimizer, parametrization), **config)
    if isinstance(optimizer, optimizers.UnitScaledOptimizer):
        return optimizer
    ours = counterpart(optimizer)
    if ours is None:
        raise ValueError(
            f"`from_keras` converts Keras's {', '.join(k.__name__ for k, _ in _COUNTERPARTS)}. "
            f"Received: optimizer={type(optimizer).__name__}"
        )
    if optimizer.built:
        raise ValueError(
            f"`from_keras` converts an optimizer before it trains: '{optimizer.name}' is built, and its state "
            "would be lost. Convert it before `compile`/`fit`, or build a new one."
        )
    return ours.from_config({**_config_as_ours(optimizer, ours), "parametrization": parametrization})


def adopt(optimizer):
    """Makes a Keras optimizer ours in place, its state kept: what `UnitScaleCallback` does to the script's.

    As `from_keras`, without u-μP's parametrization: variables with a fixed
    learning-rate multiplier (layers converted in place) take it, the others
    keep the script's learning rate. Returns `optimizer`, or None where it
    has no counterpart (Adagrad, ...).
    """
    ours = counterpart(optimizer)
    if ours is None:
        return None
    config = _config_as_ours(optimizer, ours)
    optimizer.__class__ = ours
    optimizer.weight_decay = config.get("weight_decay")
    optimizer._init_unit_scaling(None, None, True, config.get("peak_learning_rate"), None)
    if optimizer.built:
        optimizer._build_multipliers(optimizer._trainable_variables)
    return optimizer


def _config_as_ours(optimizer, ours):
    """`optimizer`'s config for `ours`: Keras's weight decay as the independent decay of the same fraction a step."""
    config = optimizer.get_config()
    if config.get("weight_decay"):
        learning_rate = optimizer._learning_rate
        peak = (optimizers.schedule_peak(learning_rate)
                if isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule)
                # A float rate is stored in float32: its shortest decimal is the one the script gave.
                else None if callable(learning_rate) else float(str(np.float32(ops.convert_to_numpy(learning_rate)))))
        if not peak:
            raise ValueError(
                f"`from_keras` turns '{optimizer.name}'s weight decay, relative to the learning rate, into one "
                "relative to the schedule's peak, which this schedule does not say. Build "
                f"`keras_unitscale.optimizers.{ours.__name__}(..., peak_learning_rate=...)` instead. "
                f"Received: learning_rate={learning_rate!r}"
            )
        config.update(weight_decay=config["weight_decay"] * peak, peak_learning_rate=peak)
    return {**config, "independent_weight_decay": True}

