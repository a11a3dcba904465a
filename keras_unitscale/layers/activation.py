"""Unit-scaled activations by name, and the `Activation` layer."""

import keras

from keras_unitscale import checks
from keras_unitscale import constraints
from keras_unitscale import rules
from keras_unitscale.ops.activations import apply
from keras_unitscale.ops.activations import resolve

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


def check_constraint(constraint):
    """Fails early for an unknown constraint (not at the first call); returns it."""
    constraints.get(constraint)
    return constraint


@keras.saving.register_keras_serializable(package="keras_unitscale")
class Activation(keras.layers.Activation):
    """A unit-scaled activation: `keras.layers.Activation` with the unit-scaled op.

    Any activation Keras accepts, by name or as a function: the derived rule
    where there is one (relu, gelu, silu, tanh, sigmoid, softmax), else the
    general one (`keras_unitscale.ops.activations.apply`): output ×
    `1/RMS(f(z))`, input gradient × `1/RMS(f'(z))` for z ~ N(0, 1), tied by
    the constraint.

    Args:
        activation: a name in `keras.activations`, a function, or None.
        mult: the u-μP multiplier inside gelu, silu and softmax.
        constraint: how the op's forward and backward scales are tied (see
            `keras_unitscale.constraints`).
        **kwargs: base layer arguments.

    Examples:
        >>> layer = Activation("relu")
        >>> keras.ops.convert_to_numpy(layer(np.array([[-1.0, 2.0]]))).astype("float64").round(3).tolist()
        [[0.0, 2.828]]
    """

    def __init__(self, activation, mult=1.0, constraint="to_output_scale", **kwargs):
        super().__init__(resolve(activation), **kwargs)
        self.mult = float(checks.positive("mult", mult))
        self.constraint = check_constraint(constraint)

    def call(self, inputs):
        return apply(inputs, self.activation, self.mult, self.constraint)

    def compute_output_shape(self, input_shape):
        if resolve(self.activation) == "glu":  # halves the last axis: the value times the gate
            return (*input_shape[:-1], None if input_shape[-1] is None else input_shape[-1] // 2)
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mult": self.mult, "constraint": self.constraint}
