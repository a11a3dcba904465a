"""Unit-scaled `LayerNormalization`, `RMSNormalization`, `BatchNormalization` and `GroupNormalization`."""

import math

import keras

from keras_unitscale import checks
from keras_unitscale import rules
from keras_unitscale import sizes
from keras_unitscale.layers.common import WeightMultipliers
from keras_unitscale.ops import norms
from keras_unitscale.ops import torch_fused
from keras_unitscale.ops.common import cast_to
from keras_unitscale.scale import as_tensor
from keras_unitscale.scale import scaled_together
from keras_unitscale.sizes import global_numel


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

    The arguments not listed below are as for `keras.layers.LayerNormalization`.

    Args:
        weight_multipliers: fixed forward multipliers on the weights, by
            variable name (see `common.WeightMultipliers`).
        lr_multipliers: fixed learning-rate factors, by variable name.

    Examples:
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
        return cast_to(outputs, self.compute_dtype)



@keras.saving.register_keras_serializable(package="keras_unitscale")
class RMSNormalization(_Normalization, keras.layers.RMSNormalization):
    """Unit-scaled RMS normalisation, `x / sqrt(mean(x²) + epsilon) · scale`.

    `keras.layers.RMSNormalization` (Keras ≥ 3.9) with the unit-scaled op:
    a gain called `scale` and no bias, `epsilon=1e-6` by default. The
    gain's gradient is scaled by `1/sqrt(batch)` (`ops.norms.rms_norm`).

    Examples:
        >>> y = RMSNormalization(epsilon=0.0)(np.array([[3.0, 4.0]], "float32"))
        >>> keras.ops.convert_to_numpy(y).astype("float64").round(4).tolist()
        [[0.8485, 1.1314]]
    """


    def build(self, input_shape):
        super().build(input_shape)
        self.declare_role(self.scale, "norm", fan_out=int(self.scale.shape[-1]))

    def call(self, x):
        return norms.rms_norm(x, self.multiplied(self.scale), axis=self.axis, epsilon=self.epsilon)


class _AffineGradients(_Normalization):
    """Keras's normalisation, its gain's and bias's gradients scaled by the norm rule (`rules.norms.affine_grad`).

    Each entry of a per-channel gain sums its gradient over every other
    element of the batch; `affine_grad(channels, size)` brings the sum back
    to unit scale, as for the layer norm's gain. The forward pass is Keras's
    (normalised already); the weights are lent to Keras's `call` with their
    gradients scaled and their weight multipliers applied.
    """

    def build(self, input_shape):
        super().build(input_shape)
        if self.gamma is not None:
            self.declare_role(self.gamma, "norm", fan_out=math.prod(self.gamma.shape))
        if self.beta is not None:
            self.declare_role(self.beta, "bias", fan_out=math.prod(self.beta.shape))

    def _affine_grad_scale(self, inputs):
        """The gradient scale of the gain and bias (`rules.norms.affine_grad`) for a call on `inputs`."""
        weight = self.gamma if self.gamma is not None else self.beta
        return rules.norms.affine_grad(math.prod(weight.shape), global_numel(inputs))

    def _keras_call_with_affine_gradients(self, keras_call, inputs):
        """`keras_call(inputs)` with the gain and bias lent as their gradient-scaled, multiplied values."""
        variables = {name: getattr(self, name) for name in ("gamma", "beta")}
        if all(v is None for v in variables.values()):
            return keras_call(inputs)
        grad_scale = self._affine_grad_scale(inputs)
        lent = scaled_together(list(variables.values()), list(self.forward_multipliers(*variables.values())),
                               [grad_scale] * len(variables))
        # Plain attributes for the time of the call (outside Keras's tracking, which holds the variables).
        for name, value in zip(variables, lent):
            if value is not None:
                object.__setattr__(self, name, value)
        try:
            return keras_call(inputs)
        finally:
            for name, variable in variables.items():
                object.__setattr__(self, name, variable)


@keras.saving.register_keras_serializable(package="keras_unitscale")
class BatchNormalization(_AffineGradients, keras.layers.BatchNormalization):
    """Unit-scaled batch normalisation: `keras.layers.BatchNormalization` with the norm rule on its weights' gradients.

    The output is Keras's, normalised already; the gain's and bias's
    gradients × `sqrt(channels / size)` = `1/sqrt(batch × positions)`, the
    rows each sums over. Arguments, moving statistics, renorm, masking and
    `synchronized` are Keras's.

    The arguments not listed below are as for `keras.layers.BatchNormalization`.

    Args:
        weight_multipliers: fixed forward multipliers on the gain and bias,
            by variable name (see `common.WeightMultipliers`).
        lr_multipliers: fixed learning-rate factors, by variable name.

    Examples:
        >>> y = BatchNormalization()(np.array([[1.0], [3.0]], "float32"), training=True)
        >>> keras.ops.convert_to_numpy(y).astype("float64").round(2).tolist()
        [[-1.0], [1.0]]
    """

    # Keras reads `training` and `mask` from the signature: it is Keras's.
    def call(self, inputs, training=None, mask=None):
        scales = self._torch_kernel_scales(inputs) if training and self.trainable and mask is None else None
        if scales is not None:
            return self._torch_training_call(inputs, *scales)
        keras_call = super().call
        return self._keras_call_with_affine_gradients(lambda x: keras_call(x, training=training, mask=mask), inputs)

    def _torch_kernel_scales(self, inputs):
        """`(gradient scale, gain's multiplier, bias's multiplier)` where `torch_fused.batch_norm` computes this
        training call, else None: PyTorch, float32, channels last, a gain or bias, no renorm, 2 rows or more
        (Keras's ops say what fewer give)."""
        rank = len(inputs.shape)
        # PyTorch asked first: elsewhere the scales would be computed here and again for Keras's call.
        if (keras.backend.backend() != "torch" or self.renorm or (self.gamma is None and self.beta is None)
                or self.axis % rank != rank - 1 or self.compute_dtype != "float32"
                or keras.backend.standardize_dtype(inputs.dtype) != "float32" or not sizes.is_static(*inputs.shape)
                or math.prod(inputs.shape[:-1]) < 2):
            return None
        scales = (self._affine_grad_scale(inputs), *self.forward_multipliers(self.gamma, self.beta))
        return scales if torch_fused.applies(inputs, scales) else None

    def _torch_training_call(self, inputs, grad_scale, gamma_multiplier, beta_multiplier):
        """Keras's training call on PyTorch's kernels: the same output and moving statistics, one autograd function."""
        outputs, mean, variance = torch_fused.batch_norm(
            inputs, None if self.gamma is None else as_tensor(self.gamma),
            None if self.beta is None else as_tensor(self.beta), self.epsilon, gamma_multiplier, beta_multiplier,
            grad_scale)
        # Keras's update, as its `call` writes it.
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return outputs


@keras.saving.register_keras_serializable(package="keras_unitscale")
class GroupNormalization(_AffineGradients, keras.layers.GroupNormalization):
    """Unit-scaled group normalisation: `keras.layers.GroupNormalization` with the norm rule on its weights' gradients.

    As `BatchNormalization`: Keras's output, the gain's and bias's gradients
    × `sqrt(channels / size)`.

    The arguments not listed below are as for `keras.layers.GroupNormalization`.

    Args:
        weight_multipliers: fixed forward multipliers on the gain and bias.
        lr_multipliers: fixed learning-rate factors, by variable name.

    Examples:
        >>> y = GroupNormalization(groups=1)(np.array([[1.0, 3.0]], "float32"))
        >>> keras.ops.convert_to_numpy(y).astype("float64").round(2).tolist()
        [[-1.0, 1.0]]
    """

    def call(self, inputs):
        return self._keras_call_with_affine_gradients(super().call, inputs)
