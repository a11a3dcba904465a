"""Unit-scaled `LayerNormalization` and `RMSNormalization`."""

import keras
from keras import ops

from keras_unitscale import checks
from keras_unitscale.layers.common import WeightMultipliers
from keras_unitscale.ops import norms


class _Normalization(WeightMultipliers):
    """Keras's constructor and config, with the multipliers and an early check of `epsilon`."""

    def __init__(self, *args, weight_multipliers=None, lr_multipliers=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_weight_multipliers(weight_multipliers, lr_multipliers)
        checks.non_negative("epsilon", self.epsilon)

    def get_config(self):
        return {**super().get_config(), **self.multiplier_config()}


@keras.saving.register_keras_serializable(package="keras_unitscale")
class LayerNormalization(_Normalization, keras.layers.LayerNormalization):
    """Unit-scaled layer normalisation: `keras.layers.LayerNormalization` with the unit-scaled op.

    The normalised output is unit scale already; the gain's and bias's
    gradients are scaled by `1/sqrt(batch)` (`ops.norms.layer_norm`).
    Arguments, defaults (`epsilon=1e-3`, `center` and `scale` on, the
    deprecated `rms_scaling`), weights and their float32 storage are Keras's.

    Args:
        weight_multipliers: fixed forward multipliers on the weights, by
            variable name (see `common.WeightMultipliers`).
        lr_multipliers: fixed learning-rate factors, by variable name.
        The rest: as for `keras.layers.LayerNormalization`.

    Example:

    >>> y = LayerNormalization()(np.array([[1.0, 3.0]], "float32"))
    >>> keras.ops.convert_to_numpy(y).astype("float64").round(2).tolist()
    [[-1.0, 1.0]]
    """


    def build(self, input_shape):
        super().build(input_shape)
        if self.gamma is not None:
            self.declare_role(self.gamma, "norm", fan_out=int(self.gamma.shape[-1]))
        if self.beta is not None:
            self.declare_role(self.beta, "bias", fan_out=int(self.beta.shape[-1]))

    def call(self, inputs):
        outputs = norms.layer_norm(
            inputs, self.multiplied(self.gamma), self.multiplied(self.beta), axis=self.axis,
            epsilon=self.epsilon, rms_scaling=self.rms_scaling,
        )
        return ops.cast(outputs, self.compute_dtype)



@keras.saving.register_keras_serializable(package="keras_unitscale")
class RMSNormalization(_Normalization, keras.layers.RMSNormalization):
    """Unit-scaled RMS normalisation, `x / sqrt(mean(x²) + epsilon) · scale`.

    `keras.layers.RMSNormalization` (Keras ≥ 3.9) with the unit-scaled op:
    a gain called `scale` and no bias, `epsilon=1e-6` by default. The
    gain's gradient is scaled by `1/sqrt(batch)` (`ops.norms.rms_norm`).

    Example:

    >>> y = RMSNormalization(epsilon=0.0)(np.array([[3.0, 4.0]], "float32"))
    >>> keras.ops.convert_to_numpy(y).astype("float64").round(4).tolist()
    [[0.8485, 1.1314]]
    """


    def build(self, input_shape):
        super().build(input_shape)
        self.declare_role(self.scale, "norm", fan_out=int(self.scale.shape[-1]))

    def call(self, x):
        return norms.rms_norm(x, self.multiplied(self.scale), axis=self.axis, epsilon=self.epsilon)

