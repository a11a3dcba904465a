"""Unit-scaled `LayerNormalization` and `RMSNormalization`."""

import keras

from keras_unitscale import checks
from keras_unitscale import functional as U
from keras_unitscale.layers.common import WeightMultipliers


def _axes(axis):
    return [axis] if isinstance(axis, int) else list(axis)


def _check_axis(axis, input_shape):
    rank = len(input_shape)
    for a in _axes(axis):
        if not isinstance(a, int) or not -rank <= a < rank:
            raise ValueError(
                f"`axis` must name axes of the input (rank {rank}). Received: axis={axis!r}"
            )
        if input_shape[a] is None:
            raise ValueError(
                f"The normalised axes must have known sizes. Received: axis={axis!r}, "
                f"input_shape={tuple(input_shape)}"
            )
    return tuple(input_shape[a] for a in _axes(axis))


class _Normalization(WeightMultipliers, keras.layers.Layer):
    """Shared arguments, weights and config of the two normalisation layers."""

    def __init__(self, axis=-1, epsilon=1e-3, center=True, scale=True, beta_initializer="zeros",
                 gamma_initializer="ones", beta_regularizer=None, gamma_regularizer=None,
                 beta_constraint=None, gamma_constraint=None, weight_multipliers=None, lr_multipliers=None,
                 **kwargs):
        super().__init__(**kwargs)
        self._init_weight_multipliers(weight_multipliers, lr_multipliers)
        self.axis = axis if isinstance(axis, int) else tuple(axis)
        self.epsilon = float(checks.non_negative("epsilon", epsilon))
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.beta_regularizer = keras.regularizers.get(beta_regularizer)
        self.gamma_regularizer = keras.regularizers.get(gamma_regularizer)
        self.beta_constraint = keras.constraints.get(beta_constraint)
        self.gamma_constraint = keras.constraints.get(gamma_constraint)
        self.supports_masking = True

    def build(self, input_shape):
        shape = _check_axis(self.axis, input_shape)
        self.gamma = self.beta = None
        if self.scale:
            self.gamma = self.add_weight(name="gamma", shape=shape, initializer=self.gamma_initializer,
                                         regularizer=self.gamma_regularizer, constraint=self.gamma_constraint)
            self.declare_role(self.gamma, "norm", fan_out=int(self.gamma.shape[-1]))
        if self.center:
            self.beta = self.add_weight(name="beta", shape=shape, initializer=self.beta_initializer,
                                        regularizer=self.beta_regularizer, constraint=self.beta_constraint)
            self.declare_role(self.beta, "bias", fan_out=int(self.beta.shape[-1]))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "axis": self.axis,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": keras.initializers.serialize(self.beta_initializer),
            "gamma_initializer": keras.initializers.serialize(self.gamma_initializer),
            "beta_regularizer": keras.regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": keras.regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": keras.constraints.serialize(self.beta_constraint),
            "gamma_constraint": keras.constraints.serialize(self.gamma_constraint),
            **self.multiplier_config(),
        }


@keras.saving.register_keras_serializable(package="keras_unitscale")
class LayerNormalization(_Normalization):
    """Unit-scaled layer normalisation: the drop-in for `keras.layers.LayerNormalization`.

    The normalised output is unit scale already; the gain's and bias's
    gradients are scaled by `1/sqrt(batch)` (see `functional.layer_norm`).
    Arguments and defaults are Keras's (`epsilon=1e-3`, `center` and `scale`
    on).

    Example:

    >>> y = LayerNormalization()(np.array([[1.0, 3.0]], "float32"))
    >>> keras.ops.convert_to_numpy(y).astype("float64").round(2).tolist()
    [[-1.0, 1.0]]
    """

    def call(self, inputs):
        return U.layer_norm(inputs, self.multiplied(self.gamma), self.multiplied(self.beta), axis=self.axis, epsilon=self.epsilon)


@keras.saving.register_keras_serializable(package="keras_unitscale")
class RMSNormalization(_Normalization):
    """Unit-scaled RMS normalisation, `x / sqrt(mean(x²) + epsilon) * gamma`.

    The drop-in for `keras.layers.RMSNormalization` (Keras ≥ 3.9): a gain and
    no bias, `epsilon=1e-6` by default. The gain's gradient is scaled by
    `1/sqrt(batch)` (see `functional.rms_norm`).

    Example:

    >>> y = RMSNormalization(epsilon=0.0)(np.array([[3.0, 4.0]], "float32"))
    >>> keras.ops.convert_to_numpy(y).astype("float64").round(4).tolist()
    [[0.8485, 1.1314]]
    """

    def __init__(self, axis=-1, epsilon=1e-6, scale=True, gamma_initializer="ones",
                 gamma_regularizer=None, gamma_constraint=None, weight_multipliers=None, lr_multipliers=None,
                 **kwargs):
        kwargs.pop("center", None)
        super().__init__(axis=axis, epsilon=epsilon, center=False, scale=scale,
                         gamma_initializer=gamma_initializer, gamma_regularizer=gamma_regularizer,
                         gamma_constraint=gamma_constraint, weight_multipliers=weight_multipliers,
                         lr_multipliers=lr_multipliers,
                         **kwargs)

    def call(self, inputs):
        return U.rms_norm(inputs, self.multiplied(self.gamma), axis=self.axis, epsilon=self.epsilon)

    def get_config(self):
        config = super().get_config()
        for key in ("center", "beta_initializer", "beta_regularizer", "beta_constraint"):
            config.pop(key)
        return config
