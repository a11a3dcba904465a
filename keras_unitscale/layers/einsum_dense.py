"""The unit-scaled `EinsumDense` layer."""

import keras

from keras_unitscale.layers.common import FoldedQuantization
from keras_unitscale.layers.common import LowRankAdapters
from keras_unitscale.layers.common import WeightMultipliers
from keras_unitscale.layers.common import unit_normal
from keras_unitscale.layers.common import without_activation
from keras_unitscale.layers.dense import MatmulProjection
from keras_unitscale.ops import linear
from keras_unitscale.sizes import shape as shape_of

# The quantization modes whose stored kernel is not the kernel's own shape (Keras keeps that in
# `original_kernel_shape`).
_RESHAPED_MODES = ("int4", "gptq", "awq")


@keras.saving.register_keras_serializable(package="keras_unitscale")
class EinsumDense(MatmulProjection, FoldedQuantization, LowRankAdapters, WeightMultipliers, keras.layers.EinsumDense):
    """A unit-scaled einsum layer: `keras.layers.EinsumDense` with the unit-scaled op.

    Computes `activation(einsum(equation, inputs, kernel) + bias)` with
    `ops.linear.einsum_dense`: the kernel starts at unit variance and the op
    applies the dense rule (`rules.linear.dense`) with the einsum's own
    sizes (`ops.linear.einsum_sizes`): output × `fan_in^-1/2`, where
    `fan_in` is the product of the kernel's contracted axes (shared with the
    input, absent from the output); input gradient × `fan_out^-1/2`, the
    product of the kernel's other axes; kernel and bias gradients ×
    `batch^-1/2`, the number of terms each of their gradients sums. So the
    output, the input gradient and the weight gradients all start near unit
    scale whatever the sizes. `EinsumDense("...b,bc->...c", n)` computes
    what `Dense(n)` does.

    Everything else is Keras's `EinsumDense`: configs, masking, variable
    names and paths, and these two, where the unit-scaling rule applies on
    top of Keras's computation:

    - LoRA (`lora_rank`, `enable_lora`): Keras adds `(lora_alpha / rank) ·
      A·B` to the kernel, `A` of shape `kernel.shape[:-1] + (rank,)`, `B` of
      `(rank, kernel.shape[-1])`. Here `A` starts unit-normal and
      `lora_alpha` defaults to `rules.linear.lora_alpha(rank) = rank^1/2`,
      so with unit-variance factors the update `A·B · rank^-1/2` has unit
      variance and the low-rank path's output is unit-scaled whatever the
      rank (`common.LowRankAdapters`, which also declares the factors' u-μP
      roles: `A` the kernel's, with its fan-in; `B` hidden, of fan-in `rank`).
    - Quantization (`quantize("int8" | "int4" | "float8")`, the quantized
      dtype policies): Keras's quantized einsum, run without its activation,
      inside the dense rule's output and input-gradient scales
      (`ops.linear.dense_around`); weight multipliers are folded into the
      stored kernel first (`common.FoldedQuantization`).

    Args:
        equation: as for `keras.layers.EinsumDense`.
        output_shape: as for `keras.layers.EinsumDense`.
        bias_axes: as for `keras.layers.EinsumDense`.
        activation: any activation Keras accepts, as for `Dense`: the
            unit-scaled op (`ops.activations.apply`), except sigmoid and
            softmax, which give probabilities (Keras's plain function, and
            the readout's role by default), as in `Dense`.
        kernel_initializer: defaults to unit-variance normal.
        bias_initializer: as for `keras.layers.EinsumDense`.
        kernel_regularizer: as for `keras.layers.EinsumDense`.
        bias_regularizer: as for `keras.layers.EinsumDense`.
        kernel_constraint: as for `keras.layers.EinsumDense`.
        bias_constraint: as for `keras.layers.EinsumDense`.
        lora_rank: as for `keras.layers.EinsumDense`.
        gptq_unpacked_column_size: as for `keras.layers.EinsumDense`.
        quantization_config: as for `keras.layers.EinsumDense`.
        lora_alpha: as for Keras; defaults to `rank^1/2` (see above).
        role: as for `Dense`; the readout role ("output") applies `fan_in^-1`
            instead of `fan_in^-1/2`.
        constraint: as for `Dense`.
        mult: as for `Dense`.
        weight_multipliers: as for `Dense`.
        lr_multipliers: as for `Dense`.
        fp8: as for `Dense`.
        fp8_critical: as for `Dense`.
        **kwargs: base layer arguments (`name`, `dtype`, `activity_regularizer`, ...).

    Examples:
        >>> layer = EinsumDense("abc,cde->abde", output_shape=(None, 4, 16), bias_axes="de")
        >>> y = layer(np.random.default_rng(0).normal(size=(8, 32, 256)))
        >>> tuple(y.shape), bool(0.9 < float(keras.ops.sqrt(keras.ops.mean(y**2))) < 1.1)
        ((8, 32, 4, 16), True)
    """

    def __init__(
        self,
        equation,
        output_shape,
        activation=None,
        bias_axes=None,
        kernel_initializer=None,
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        lora_rank=None,
        lora_alpha=None,
        gptq_unpacked_column_size=None,
        quantization_config=None,
        role=None,
        constraint="default",
        mult=1.0,
        weight_multipliers=None,
        lr_multipliers=None,
        fp8=None,
        fp8_critical=False,
        **kwargs,
    ):
        super().__init__(
            equation,
            output_shape,
            activation=activation,
            bias_axes=bias_axes,
            kernel_initializer=kernel_initializer or unit_normal(),
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            lora_rank=lora_rank,
            lora_alpha=self._default_lora_alpha(lora_rank, lora_alpha),
            gptq_unpacked_column_size=gptq_unpacked_column_size,
            quantization_config=quantization_config,
            **kwargs,
        )
        self._init_weight_multipliers(weight_multipliers, lr_multipliers)
        self._init_projection(role, constraint, mult, fp8, fp8_critical)

    def build(self, input_shape):
        super().build(input_shape)
        self.declare_roles()

    def _kernel_shape(self):
        """The kernel's logical shape (a quantized kernel may be stored flattened and packed)."""
        if self.quantization_mode in _RESHAPED_MODES:
            return tuple(self.original_kernel_shape)
        return tuple(self._kernel.shape)

    def _stored_kernel(self):
        kernel = getattr(self, "_kernel", None)
        return self.quantized_kernel if kernel is None else kernel

    def declare_roles(self):
        """Declares the weights' u-μP roles (after building, and again after quantizing).

        The kernel's fan-in is the product of its contracted axes (those the
        output lacks), its fan-out the product of the rest.
        """
        kernel_shape = self._kernel_shape()
        output_labels = self.equation.split("->")[1]
        kernel_labels = self.equation.split("->")[0].split(",")[1]
        fan_in = 1
        for label, size in zip(kernel_labels, kernel_shape):
            if label not in output_labels:
                fan_in *= int(size)
        fan_out = 1
        for size in kernel_shape:
            fan_out *= int(size)
        self.declare_role(self._stored_kernel(), self.role, fan_in=fan_in, fan_out=fan_out // fan_in)
        if self.bias is not None:
            self.declare_role(self.bias, "bias", fan_out=_size(self.bias.shape))

    def call(self, inputs, training=None):
        # Keras's `kernel` is the effective one, LoRA's low-rank update included.
        x = linear.einsum_dense(
            self.equation, inputs, self.kernel, self.bias, constraint=self.constraint, scale_power=self._scale_power,
            fp8=self._uses_fp8(), weight_multipliers=self.forward_multipliers(self._kernel, self.bias),
        )
        return self._activate(x)

    def quantized_call(self, inputs, training=None):
        def product(x):
            with without_activation(self):
                return super(EinsumDense, self).quantized_call(x, training=training)

        inputs = keras.ops.convert_to_tensor(inputs)
        sizes = linear.einsum_sizes(self.equation, shape_of(inputs), self._kernel_shape())
        x = linear.dense_around(inputs, sizes.fan_in, sizes.fan_out, product, self.constraint, self._scale_power)
        return self._activate(x)

    def get_config(self):
        return {**super().get_config(), **self.projection_config()}


def _size(shape):
    result = 1
    for dim in shape:
        result *= int(dim)
    return result
