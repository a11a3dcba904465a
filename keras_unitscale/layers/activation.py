"""Unit-scaled activations by name, and the `Activation` layer."""

import keras

from keras_unitscale import checks
from keras_unitscale import constraints
from keras_unitscale import rules
from keras_unitscale.ops.activations import apply

NAMES = rules.activations.NAMES
PROBABILITIES = ("sigmoid", "softmax")  # on a Dense, these give predictions: see Dense


def check(name, argument="activation"):
    """Returns a canonical activation name, or raises for one we have no rule for."""
    if name is None:
        return "linear"
    if not isinstance(name, str) or name not in NAMES:
        raise ValueError(
            f"Unknown unit-scaled activation. Expected one of {list(NAMES)} or None. "
            f"Received: {argument}={name!r}"
        )
    return name


@keras.saving.register_keras_serializable(package="keras_unitscale")
class Activation(keras.layers.Layer):
    """Applies a unit-scaled activation: the drop-in for `keras.layers.Activation`.

    Args:
        activation: one of "linear", "relu", "gelu", "silu" ("swish"),
            "tanh", "sigmoid", "softmax" (the unit-scaled ops of
            `keras_unitscale.functional`).
        mult: the u-μP multiplier inside gelu, silu and softmax.
        constraint: how the op's forward and backward scales are tied (see
            `keras_unitscale.constraints`).

    Example:

    >>> layer = Activation("relu")
    >>> keras.ops.convert_to_numpy(layer(np.array([[-1.0, 2.0]]))).astype("float64").round(3).tolist()
    [[0.0, 2.828]]
    """

    def __init__(self, activation, mult=1.0, constraint="to_output_scale", **kwargs):
        super().__init__(**kwargs)
        self.activation = check(activation)
        self.mult = float(checks.positive("mult", mult))
        constraints.get(constraint)  # an unknown name fails here, not at the first call
        self.constraint = constraint
        self.supports_masking = True
        self.built = True

    def call(self, inputs):
        return apply(inputs, self.activation, self.mult, self.constraint)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "activation": self.activation,
            "mult": self.mult,
            "constraint": self.constraint,
        }
