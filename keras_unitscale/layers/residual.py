"""Residual connections with a branch weight `tau`: split, add, and a wrapper."""

import keras

from keras_unitscale import checks
from keras_unitscale import functional as U


class _Join(keras.layers.Layer):
    """A weightless layer with a residual branch weight `tau`: the split and the add share it."""

    def __init__(self, tau=1.0, **kwargs):
        super().__init__(**kwargs)
        self.tau = float(checks.non_negative("tau", tau))
        self.supports_masking = True
        self.built = True

    def get_config(self):
        return {**super().get_config(), "tau": self.tau}


@keras.saving.register_keras_serializable(package="keras_unitscale")
class ResidualSplit(_Join):
    """Splits a tensor into `[residual, skip]` before a residual branch.

    Forward both equal the input; backward they weight their gradients
    `tau/sqrt(1+tau²)` and `1/sqrt(1+tau²)` (see `functional.residual_split`).
    Pair it with `ResidualAdd(tau)` after the branch. For a branch that is one
    layer, `Residual(layer, tau)` does both.

    Examples:
        >>> residual, skip = ResidualSplit(tau=0.5)(np.ones((1, 2), "float32"))
        >>> keras.ops.convert_to_numpy(skip).tolist()
        [[1.0, 1.0]]
    """

    def call(self, inputs):
        return list(U.residual_split(inputs, self.tau))

    def compute_output_shape(self, input_shape):
        return [input_shape, input_shape]

    def compute_mask(self, inputs, mask=None):
        return [mask, mask]

@keras.saving.register_keras_serializable(package="keras_unitscale")
class ResidualAdd(_Join):
    """Joins `[residual, skip]`: `(tau·residual + skip) / sqrt(1 + tau²)`.

    See `functional.residual_add`. Takes a list of two tensors, the
    residual branch's output first.

    Examples:
        >>> x = np.ones((1, 2), "float32")
        >>> keras.ops.convert_to_numpy(ResidualAdd(tau=1.0)([x, x])).astype("float64").round(4).tolist()
        [[1.4142, 1.4142]]
    """

    def call(self, inputs):
        if not isinstance(inputs, (list, tuple)) or len(inputs) != 2:
            raise ValueError(
                "`ResidualAdd` takes a list [residual, skip]. "
                f"Received: inputs of type {type(inputs).__name__}"
                + (f" and length {len(inputs)}" if isinstance(inputs, (list, tuple)) else "")
            )
        residual, skip = inputs
        return U.residual_add(residual, skip, self.tau)

    def compute_output_shape(self, input_shape):
        return input_shape[1]

    def compute_mask(self, inputs, mask=None):
        return None if mask is None else mask[1]

@keras.saving.register_keras_serializable(package="keras_unitscale")
class Residual(keras.layers.Layer):
    """Wraps a layer as a residual branch: `ResidualAdd(tau)([layer(residual), skip])`.

    Args:
        layer: the branch, a Keras layer mapping a tensor to one of the same
            shape.
        tau: the branch's weight relative to the skip, >= 0 (u-μP's depth
            rule, `functional.transformer_residual_scaling_rule`, gives one
            per branch).
        **kwargs: base layer arguments.

    Examples:
        >>> from keras_unitscale.layers import Dense
        >>> block = Residual(Dense(8), tau=0.5)
        >>> tuple(block(np.ones((2, 8), "float32")).shape)
        (2, 8)
    """

    def __init__(self, layer, tau=1.0, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(layer, keras.layers.Layer):
            raise ValueError(f"`layer` must be a Keras layer. Received: layer={layer!r}")
        self.layer = layer
        self.tau = float(checks.non_negative("tau", tau))
        self.supports_masking = True

    def build(self, input_shape):
        if not self.layer.built:  # a reloaded branch arrives built
            self.layer.build(input_shape)

    def call(self, inputs, training=None):
        return U.residual_apply(lambda x: self.layer(x, training=training), inputs, self.tau)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "layer": keras.saving.serialize_keras_object(self.layer), "tau": self.tau}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["layer"] = keras.saving.deserialize_keras_object(config["layer"])
        return cls(**config)
