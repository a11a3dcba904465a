"""The unit-scaled convolutions: each is its `keras.layers` class with the unit-scaled op.

`Conv1D`, `Conv2D`, `Conv3D` (LoRA as Keras has it), their transposes,
`DepthwiseConv1D`/`2D` and `SeparableConv1D`/`2D`. Each subclasses Keras's
layer and changes what unit scaling changes: kernels start unit-normal, the
call runs `keras_unitscale.ops.conv` (the dense rule counted in taps,
`rules.conv`), and the activation is the unit-scaled op, as in `Dense`.
Everything else (arguments, configs, `compute_output_shape`, variable names,
causal padding, groups) is Keras's.

The unit-scaling arguments every class adds to Keras's:

- role: the kernel's u-μP role, "hidden", "input" or "output" (see `Dense`);
  "output" uses the readout's `1/fan_in` and Keras's plain activation.
- constraint: how the op's forward and backward scales are tied
  (`keras_unitscale.constraints`).
- mult: the u-μP multiplier of the activation.
- weight_multipliers, lr_multipliers: as for `Dense` (set by
  `UnitScaleCallback` and `unit_scale`).
- fp8, fp8_critical: as for `Dense`: the convolution (each, in a separable
  layer) on E4M3 input and kernel, with an E5M2 output gradient.
"""

import math

import keras
from keras import ops

from keras_unitscale import rules
from keras_unitscale.layers import activation as activations
from keras_unitscale.layers.common import LowRankAdapters
from keras_unitscale.layers.common import WeightMultipliers
from keras_unitscale.layers.common import unit_normal
from keras_unitscale.layers.dense import MatmulProjection
from keras_unitscale.ops import convolution as conv_ops

__all__ = [
    "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
    "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D",
]


class Convolution(MatmulProjection, WeightMultipliers):
    """What the unit-scaled convolutions share: their extra arguments, defaults and activation."""

    # The Keras arguments that initialise kernels: unit-normal unless given.
    _KERNEL_INITIALIZERS = ("kernel_initializer",)

    def __init__(self, *args, activation=None, role=None, constraint="default", mult=1.0, weight_multipliers=None,
                 lr_multipliers=None, fp8=None, fp8_critical=False, **kwargs):
        for name in self._KERNEL_INITIALIZERS:
            kwargs[name] = kwargs.get(name) or unit_normal()
        if isinstance(self, LowRankAdapters):
            kwargs["lora_alpha"] = self._default_lora_alpha(kwargs.get("lora_rank"), kwargs.get("lora_alpha"))
        super().__init__(*args, activation=activations.resolve(activation), **kwargs)
        self._init_weight_multipliers(weight_multipliers, lr_multipliers)
        self._init_projection(role, constraint, mult, fp8, fp8_critical)

    def build(self, input_shape):
        super().build(input_shape)
        self.declare_roles()

    @property
    def _input_channels(self):
        return int(self.input_spec.axes[-1 if self.data_format == "channels_last" else 1])

    def weight_op_scales(self):
        """The forward scale each weight meets in the op, in `self.weights` order (for conversion); built layers only.

        Kernel and bias share their op's output scale; a separable layer's
        depthwise kernel meets its own op's.
        """
        return [self._op_scale(*self._taps())] * len(self.weights)

    def _op_scale(self, kernel_volume, in_per_group, out_per_group, transpose=False, powers=None):
        return rules.conv.conv(kernel_volume, in_per_group, out_per_group, math.prod(self.strides),
                               transpose=transpose, constraint=self.constraint,
                               powers=self._scale_power if powers is None else powers).output

    def _op_arguments(self):
        return {"data_format": self.data_format, "constraint": self.constraint, "scale_power": self._scale_power,
                "fp8": self._uses_fp8()}

    def get_config(self):
        return {**super().get_config(), **self.projection_config()}


class ConvND(LowRankAdapters, Convolution):
    """The base of `Conv1D`/`2D`/`3D`: `ops.conv` on Keras's effective kernel (LoRA included).

    LoRA follows `common.LowRankAdapters`: Keras's `A` spans the kernel's
    taps and input channels, so the low-rank path is a convolution of
    fan-in `volume(kernel_size) · in_channels / groups` then a `rank → filters`
    projection, and the default `lora_alpha = rank^1/2` keeps its scale free
    of the rank, as in `Dense`.
    """

    def _taps(self):
        return math.prod(self.kernel_size), self._input_channels // self.groups, self.filters // self.groups

    def declare_roles(self):
        fan_in, fan_out = rules.conv.kernel_fans("conv", self._kernel.shape)
        self.declare_role(self._kernel, self.role, fan_in=fan_in, fan_out=fan_out)
        if self.bias is not None:
            self.declare_role(self.bias, "bias", fan_out=self.filters)

    def call(self, inputs):
        padding = self.padding
        if padding == "causal":  # Conv1D's own padding, as Keras's Conv1D applies it
            inputs = ops.pad(inputs, self._compute_causal_padding())
            padding = "valid"
        x = conv_ops.conv(
            inputs, self.kernel, self.bias, strides=self.strides, padding=padding, dilation_rate=self.dilation_rate,
            weight_multipliers=self.forward_multipliers(self._kernel, self.bias), **self._op_arguments(),
            **self._op_activation(),
        )
        return self._after_op(x)


class ConvNDTranspose(Convolution):
    """The base of the transposed convolutions: `ops.conv_transpose`."""

    def _taps(self):
        return math.prod(self.kernel_size), self._input_channels, self.filters, True

    def declare_roles(self):
        fan_in, fan_out = rules.conv.kernel_fans("transpose", self.kernel.shape, self.strides)
        self.declare_role(self.kernel, self.role, fan_in=fan_in, fan_out=fan_out)
        if self.bias is not None:
            self.declare_role(self.bias, "bias", fan_out=self.filters)

    def call(self, inputs):
        x = conv_ops.conv_transpose(
            inputs, self.multiplied(self.kernel), self.multiplied(self.bias), strides=self.strides,
            padding=self.padding, output_padding=self.output_padding, dilation_rate=self.dilation_rate,
            **self._op_arguments(),
        )
        return self._activate(x)


class DepthwiseConvND(Convolution):
    """The base of the depthwise convolutions: `ops.depthwise_conv`, each channel its own group."""

    _KERNEL_INITIALIZERS = ("depthwise_initializer",)

    def _taps(self):
        return math.prod(self.kernel_size), 1, self.depth_multiplier

    def declare_roles(self):
        fan_in, outputs = rules.conv.kernel_fans("depthwise", self.kernel.shape)
        self.declare_role(self.kernel, self.role, fan_in=fan_in, fan_out=outputs)
        if self.bias is not None:
            self.declare_role(self.bias, "bias", fan_out=outputs)

    def call(self, inputs):
        x = conv_ops.depthwise_conv(
            inputs, self.multiplied(self.kernel), self.multiplied(self.bias), strides=self.strides,
            padding=self.padding, dilation_rate=self.dilation_rate, **self._op_arguments(),
        )
        return self._activate(x)


class SeparableConvND(Convolution):
    """The base of the separable convolutions: `ops.separable_conv`, a depthwise then a pointwise op."""

    _KERNEL_INITIALIZERS = ("depthwise_initializer", "pointwise_initializer")

    def weight_op_scales(self):
        # The depthwise op (stride applied, the dense powers), then the pointwise 1×…×1 op.
        depthwise = self._op_scale(math.prod(self.kernel_size), 1, self.depth_multiplier,
                                   powers=rules.linear.DENSE_POWERS)
        pointwise = rules.conv.conv(1, self._input_channels * self.depth_multiplier, self.filters,
                                    constraint=self.constraint, powers=self._scale_power).output
        return [depthwise, pointwise] + [pointwise] * (self.bias is not None)

    def declare_roles(self):
        self.declare_role(self.depthwise_kernel, "hidden",
                          **dict(zip(("fan_in", "fan_out"), rules.conv.kernel_fans("depthwise", self.depthwise_kernel.shape))))
        self.declare_role(self.pointwise_kernel, self.role,
                          **dict(zip(("fan_in", "fan_out"), rules.conv.kernel_fans("conv", self.pointwise_kernel.shape))))
        if self.bias is not None:
            self.declare_role(self.bias, "bias", fan_out=self.filters)

    def call(self, inputs):
        x = conv_ops.separable_conv(
            inputs, self.multiplied(self.depthwise_kernel), self.multiplied(self.pointwise_kernel),
            self.multiplied(self.bias), strides=self.strides, padding=self.padding,
            dilation_rate=self.dilation_rate, **self._op_arguments(),
        )
        return self._activate(x)


def _unit_scaled(base, keras_class):
    """Our class of `keras_class`: `base`'s unit scaling on Keras's layer, registered for `.keras` files."""
    cls = type(keras_class.__name__, (base, keras_class), {
        "__module__": __name__,
        "__doc__": f"A unit-scaled `keras.layers.{keras_class.__name__}`: {base.__doc__.split(': ', 1)[1]}\n\n"
                   "Arguments: Keras's, plus the unit-scaling ones of `keras_unitscale.layers.conv`.",
    })
    return keras.saving.register_keras_serializable(package="keras_unitscale")(cls)


Conv1D = _unit_scaled(ConvND, keras.layers.Conv1D)
Conv2D = _unit_scaled(ConvND, keras.layers.Conv2D)
Conv3D = _unit_scaled(ConvND, keras.layers.Conv3D)
Conv1DTranspose = _unit_scaled(ConvNDTranspose, keras.layers.Conv1DTranspose)
Conv2DTranspose = _unit_scaled(ConvNDTranspose, keras.layers.Conv2DTranspose)
Conv3DTranspose = _unit_scaled(ConvNDTranspose, keras.layers.Conv3DTranspose)
DepthwiseConv1D = _unit_scaled(DepthwiseConvND, keras.layers.DepthwiseConv1D)
DepthwiseConv2D = _unit_scaled(DepthwiseConvND, keras.layers.DepthwiseConv2D)
SeparableConv1D = _unit_scaled(SeparableConvND, keras.layers.SeparableConv1D)
SeparableConv2D = _unit_scaled(SeparableConvND, keras.layers.SeparableConv2D)
