"""The script's own optimizer, made ours: `from_keras` (a new one) and `adopt` (in place).

A twin from `unit_scale`, or a model `UnitScaleCallback` converted in place,
stores its weights at unit scale, each with a fixed learning-rate
multiplier that only `keras_unitscale.optimizers` read.
"""

import warnings

import keras

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
    epsilon and EMA, Keras's weight decay as ours computes it (see
    `_config_as_ours`); a `LossScaleOptimizer` is rebuilt around it.
    Clipping is kept, and warned about: it compares the gradient's size,
    which unit scaling changes, with a threshold.

    Args:
        optimizer: an unbuilt `keras.optimizers.Adam`, `AdamW`, `SGD`,
            `RMSprop` or `Lion` (or a name Keras knows, "adam"), possibly
            in a `LossScaleOptimizer`.
        parametrization: "u-mup" (u-μP's learning rate per role, where no
            fixed multiplier says otherwise) or None.

    Examples:
        >>> ours = from_keras(keras.optimizers.AdamW(0.01, weight_decay=0.1, beta_1=0.8))
        >>> type(ours).__name__, ours.beta_1, ours.weight_decay, ours.peak_learning_rate
        ('AdamW', 0.8, 0.1, 1.0)
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
    warn_if_clipping(optimizer)
    return ours.from_config({**_config_as_ours(optimizer), "parametrization": parametrization})


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
    warn_if_clipping(optimizer)
    peak_learning_rate = _config_as_ours(optimizer).get("peak_learning_rate")  # from Keras's config, before the swap
    optimizer.__class__ = ours
    optimizer._init_unit_scaling(None, None, True, peak_learning_rate, None)
    if optimizer.built:
        optimizer._build_multipliers(optimizer._trainable_variables)
    return optimizer


def _config_as_ours(optimizer):
    """`optimizer`'s config for `ours`, its decay as ours computes Keras's.

    Keras's decay removes `weight_decay · η_t` a step; our independent decay
    removes `weight_decay · η_t / η_peak`: with `η_peak = 1` it is Keras's,
    whatever the schedule.
    """
    config = optimizer.get_config()
    if config.get("weight_decay"):
        config["peak_learning_rate"] = 1.0
    return {**config, "independent_weight_decay": True}


def warn_if_clipping(optimizer):
    """Clipping compares the gradient's size with a threshold, and unit scaling changes that size: say so."""
    clips = {key: getattr(optimizer, key, None) for key in ("clipnorm", "clipvalue", "global_clipnorm")}
    clips = {key: value for key, value in clips.items() if value is not None}
    if clips:
        warnings.warn(
            f"'{optimizer.name}' clips gradients ({', '.join(f'{k}={v}' for k, v in clips.items())}), by their "
            "size, which unit scaling changes: clipping will act at other steps than in the original script. "
            "Scale the threshold by the gradients' ratio (`convert.match_epsilon` returns it per weight) or "
            "leave clipping off.",
            stacklevel=3,
        )
