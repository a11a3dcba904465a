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
from keras_unitscale.scale import scale_bwd
from keras_unitscale.sizes import replicas

__all__ = ["loss_from_keras", "is_loss", "counterpart", "InPlaceLoss"]

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

    Examples:
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


class InPlaceLoss:
    """The script's compiled loss made ours on the model `fit` is training (`UnitScaleCallback`): its gradient.

    A callback cannot recompile the model it trains, so the model's
    `compute_loss` is wrapped instead: the total loss it returns, Keras's
    value unchanged (regularisers and `add_loss` terms included), gets the
    backward scale `s` of our counterpart of the compiled loss (its
    `grad_scale`: the rows Keras averages over times the loss's own rule,
    e.g. `V/sqrt(V-1)` on a cross-entropy's logits; times the replicas).
    The loss's own backward then runs in float32 with `s` in it, so the
    logits' gradient leaves it at unit scale, as our loss's does, instead of
    divided by `batch × length` (below E5M2's range in a per-token loss).
    Every gradient in the model is then `s` times the script's, the same `s`
    for all: Adam's and RMSprop's steps see it only through epsilon, which
    `InPlaceEpsilon` multiplies by `factor` (set while a training step is
    traced); Lion's sign step does not see it. SGD's step would, so the
    callback adopts no loss under it.
    """

    def __init__(self, model, ours):
        self.ours = ours
        self.factor = None  # `s` of the step being traced, from its predictions' shape; None outside a step
        keras_compute_loss = model.compute_loss

        def compute_loss(x=None, y=None, y_pred=None, sample_weight=None, training=True):
            loss = keras_compute_loss(x, y, y_pred, sample_weight, training=training)
            if loss is None or keras.tree.is_nested(y_pred):  # one scale per output would not be one `s`
                return loss
            self.factor = ours.grad_scale(y_pred) * replicas()
            return scale_bwd(loss, self.factor)

        object.__setattr__(model, "compute_loss", compute_loss)

    @classmethod
    def adopt(cls, model):
        """Wraps `model.compute_loss` where the compiled loss has a counterpart of ours.

        Returns:
            `(InPlaceLoss, None)`, or `(None, why)` when the loss stays Keras's.
        """
        loss = getattr(model, "loss", None)
        if loss is None or isinstance(loss, (list, tuple, dict)):
            return None, f"it is not one loss (received: loss={loss!r})"
        if type(model).compute_loss is not keras.Model.compute_loss or "compute_loss" in vars(model):
            return None, f"model '{model.name}' computes its loss in its own `compute_loss`"
        ours = counterpart(loss)
        if ours is None:
            name = loss if isinstance(loss, str) else getattr(loss, "name", type(loss).__name__)
            return None, f"keras_unitscale.losses has no counterpart of {name!r}"
        try:
            ours = loss_from_keras(loss)
        except ValueError as error:  # a reduction that is not an average: its rows are not what `s` undoes
            return None, str(error)
        return cls(model, ours), None
