"""The script's own loss, made ours: the same value, with its gradient unit-scaled.

Keras's losses average over the rows they see, so the gradient that enters a
model is divided by their count: for a per-token loss over `batch × length`
rows, the logits' gradient of an unlikely class falls below E5M2's smallest
subnormal (2^-16) and FP8 rounds it to zero (measured on the benchmark's
mini GPT: +4.9% final loss, against +0.16% with the unit-scaled loss). The
losses of `keras_unitscale.losses` report the same value with the gradient
not divided; with a twin's optimizer, `convert.match_epsilon` then keeps its
training on the script's trajectory (the only term of Adam's step that sees
a gradient's scale is epsilon).
"""

import keras

from keras_unitscale import losses

__all__ = ["loss_from_keras", "is_loss", "counterpart"]

# Keras's loss classes and ours; the functions Keras resolves a name to, by name.
_COUNTERPARTS = {
    keras.losses.SparseCategoricalCrossentropy: losses.SparseCategoricalCrossentropy,
    keras.losses.CategoricalCrossentropy: losses.CategoricalCrossentropy,
    keras.losses.BinaryCrossentropy: losses.BinaryCrossentropy,
    keras.losses.MeanSquaredError: losses.MeanSquaredError,
}
_FUNCTIONS = {
    "sparse_categorical_crossentropy": losses.SparseCategoricalCrossentropy,
    "categorical_crossentropy": losses.CategoricalCrossentropy,
    "binary_crossentropy": losses.BinaryCrossentropy,
    "mean_squared_error": losses.MeanSquaredError,
}


def is_loss(value):
    """Whether `value` is a Keras loss: a `Loss`, a loss function, or a name `keras.losses.get` knows."""
    if isinstance(value, keras.losses.Loss):
        return True
    if isinstance(value, str):
        try:
            keras.losses.get(value)
        except ValueError:
            return False
        return True
    return callable(value) and getattr(value, "__module__", "").startswith("keras.")


def counterpart(loss):
    """Our class for a Keras loss (an object, a function or a name), or None."""
    if type(loss) in _COUNTERPARTS:
        return _COUNTERPARTS[type(loss)]
    if isinstance(loss, str) or callable(loss) and not isinstance(loss, keras.losses.Loss):
        function = keras.losses.get(loss) if isinstance(loss, str) else loss
        return _FUNCTIONS.get(getattr(function, "__name__", None))
    return None


def loss_from_keras(loss):
    """Our counterpart of a Keras loss, with its arguments: how a script's `compile` keeps its loss.

    Args:
        loss: `keras.losses.SparseCategoricalCrossentropy`,
            `CategoricalCrossentropy`, `BinaryCrossentropy` or
            `MeanSquaredError` (an object, with an averaging reduction), or
            their function or name ("sparse_categorical_crossentropy", "mse").
            One of ours is returned as it is.

    Example:

    >>> ours = loss_from_keras(keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    >>> type(ours).__module__, ours.get_config()["from_logits"]
    ('keras_unitscale.losses', True)
    >>> type(loss_from_keras("mse")).__name__
    'MeanSquaredError'
    """
    if isinstance(loss, tuple(_COUNTERPARTS.values())):
        return loss
    ours = counterpart(loss)
    if ours is None:
        names = ", ".join(k.__name__ for k in _COUNTERPARTS)
        received = repr(loss) if isinstance(loss, str) else getattr(loss, "__name__", type(loss).__name__)
        raise ValueError(
            f"`from_keras` converts Keras's losses {names} (objects, functions or names). "
            f"Received: loss={received}"
        )
    if isinstance(loss, keras.losses.Loss):
        return ours.from_config(loss.get_config())
    return ours()
