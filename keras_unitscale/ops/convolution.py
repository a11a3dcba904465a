"""Unit-scaled convolutions: `conv`, `conv_transpose`, `depthwise_conv`, `separable_conv`.

Each is Keras's op (`keras.ops.conv`, ...) inside the scales of
`rules.conv.conv`: the dense rule counted in taps. Tensors and kernels use
Keras's layouts, and every argument means what it means for Keras's op.
"""

import math

import keras
from keras import ops

from keras_unitscale import checks
from keras_unitscale import precision
from keras_unitscale import rules
from keras_unitscale.ops import activations
from keras_unitscale.ops import torch_fused
from keras_unitscale.ops.common import as_compute_dtype
from keras_unitscale.ops.common import check_dims_match
from keras_unitscale.ops.common import check_rank
from keras_unitscale.ops.common import to_float
from keras_unitscale.ops.common import to_tensor
from keras_unitscale.ops.linear import add_bias
from keras_unitscale.scale import scale_bwd
from keras_unitscale.scale import scale_fwd
from keras_unitscale.scale import scaled
from keras_unitscale.sizes import as_float
from keras_unitscale.sizes import global_numel
from keras_unitscale.sizes import shape as shape_of

__all__ = ["conv", "conv_transpose", "depthwise_conv", "separable_conv"]


def conv(x, kernel, bias=None, strides=1, padding="valid", dilation_rate=1, data_format=None,
         constraint="to_output_scale", scale_power=rules.linear.DENSE_POWERS, fp8=False, weight_multipliers=(1.0, 1.0),
         activation=None, mult=1.0):
    """A unit-scaled convolution: `keras.ops.conv` (+ bias) inside `rules.conv.conv`'s scales.

    Rule, for a kernel `(*kernel_size, in_channels / groups, filters)`: output
    × `fan_in^-p0` with `fan_in = volume(kernel_size) · in_channels / groups`;
    the input's gradient × `fan_out^-p1` with `fan_out = volume(kernel_size) ·
    filters / (groups · volume(strides))`; kernel and bias gradients ×
    `positions^-p2` (batch × output positions), tied as `ops.dense` ties them.
    Keras infers `groups` from the kernel, and so does this op.

    Args:
        x: inputs, `(batch, *spatial, channels)` (or channels first).
        kernel: `(*kernel_size, in_channels / groups, filters)`.
        bias: optional, `(filters,)`.
        strides: as for `keras.ops.conv`.
        padding: as for `keras.ops.conv`.
        dilation_rate: as for `keras.ops.conv`.
        data_format: as for `keras.ops.conv`.
        constraint: as for `ops.dense`.
        scale_power: as for `ops.dense`.
        fp8: as for `ops.dense` (FP8: the convolution's input and kernel in
            E4M3, its output's gradient in E5M2).
        weight_multipliers: as for `ops.dense`.
        activation: as for `ops.dense` (relu's scale joins the convolution's).
        mult: as for `ops.dense`.

    Examples:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(8, 32, 32, 16)).astype("float32")
        >>> w = np.random.default_rng(1).normal(size=(3, 3, 16, 32)).astype("float32")
        >>> y = keras.ops.convert_to_numpy(conv(x, w, padding="same"))
        >>> y.shape, bool(0.9 < y.std() < 1.1)
        ((8, 32, 32, 32), True)
    """
    x, kernel, channel_axis = _checked(x, kernel, data_format)
    kernel_shape = shape_of(kernel)
    in_channels, in_per_group, filters = shape_of(x)[channel_axis], kernel_shape[-2], kernel_shape[-1]
    if in_channels % in_per_group:
        raise ValueError(
            f"The input's {in_channels} channels are not a multiple of the kernel's {in_per_group} input "
            f"channels per group. Received: x.shape={shape_of(x)}, kernel.shape={kernel_shape}"
        )
    groups = in_channels // in_per_group
    strides = _spatial("strides", strides, len(kernel_shape) - 2)
    scales = _scales(x, channel_axis, kernel_shape[:-2], in_per_group, filters // groups, strides, False,
                     constraint, scale_power)
    relu_factor = activations.relu_factor(activation, mult, constraint)
    if relu_factor is not None:  # relu's scale joins the convolution's; plain relu follows
        scales = scales.times(relu_factor)
    if not fp8 and torch_fused.applies(x, (*scales, *weight_multipliers)):
        y = _torch_conv(x, kernel, bias, strides, padding, dilation_rate, groups, channel_axis, scales,
                        weight_multipliers, relu_factor is not None)
        if y is not None:
            return y if relu_factor is not None else activations.apply(y, activation, mult, constraint)
    y = _around(x, kernel, bias, scales, channel_axis, fp8, lambda x, kernel: ops.conv(
        x, kernel, strides=strides, padding=padding, dilation_rate=dilation_rate, data_format=data_format),
        weight_multipliers)
    return ops.relu(y) if relu_factor is not None else activations.apply(y, activation, mult, constraint)


def _torch_conv(x, kernel, bias, strides, padding, dilation_rate, groups, channel_axis, scales, weight_multipliers,
                relu):
    """`conv` as eager PyTorch's one autograd function (`torch_fused.conv`); None where its padding is not PyTorch's."""
    spatial_shape = shape_of(x)[1:-1] if channel_axis == -1 else shape_of(x)[2:]
    dilation_rate = _spatial("dilation_rate", dilation_rate, len(strides))
    padding = torch_fused.conv_padding(padding, spatial_shape, shape_of(kernel)[:-2], strides, dilation_rate)
    if padding is None:
        return None
    bias = None if bias is None else as_compute_dtype(to_tensor(bias, "bias"), x)
    layout = (channel_axis == -1, strides, padding, dilation_rate, groups)
    return torch_fused.conv(x, as_compute_dtype(kernel, x), bias, layout, *scales, *weight_multipliers, relu)


def conv_transpose(x, kernel, bias=None, strides=1, padding="valid", output_padding=None, dilation_rate=1,
                   data_format=None, constraint="to_output_scale", scale_power=rules.linear.DENSE_POWERS, fp8=False):
    """A unit-scaled transposed convolution: `keras.ops.conv_transpose` (+ bias) inside `rules.conv.conv`'s scales.

    The kernel is `(*kernel_size, filters, in_channels)`, as Keras lays it
    out. Each output gathers `volume(kernel_size) · in_channels /
    volume(strides)` taps (the output's fan-in) and each input feeds
    `volume(kernel_size) · filters` outputs (its gradient's fan-out); the
    kernel's gradient sums over batch × input positions.

    Examples:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(8, 16, 16, 32)).astype("float32")
        >>> w = np.random.default_rng(1).normal(size=(4, 4, 16, 32)).astype("float32")
        >>> y = keras.ops.convert_to_numpy(conv_transpose(x, w, strides=2, padding="same"))
        >>> y.shape, bool(0.8 < y.std() < 1.2)
        ((8, 32, 32, 16), True)
    """
    x, kernel, channel_axis = _checked(x, kernel, data_format)
    kernel_shape = shape_of(kernel)
    filters, in_channels = kernel_shape[-2], kernel_shape[-1]
    check_dims_match("Input and kernel channels", "x's channels", shape_of(x)[channel_axis],
                     "kernel.shape[-1]", in_channels)
    strides = _spatial("strides", strides, len(kernel_shape) - 2)
    scales = _scales(x, channel_axis, kernel_shape[:-2], in_channels, filters, strides, True,
                     constraint, scale_power)
    return _around(x, kernel, bias, scales, channel_axis, fp8, lambda x, kernel: ops.conv_transpose(
        x, kernel, strides=strides, padding=padding, output_padding=output_padding,
        dilation_rate=dilation_rate, data_format=data_format))


def depthwise_conv(x, kernel, bias=None, strides=1, padding="valid", dilation_rate=1, data_format=None,
                   constraint="to_output_scale", scale_power=rules.linear.DENSE_POWERS, fp8=False):
    """A unit-scaled depthwise convolution: each channel is its own group (`in_per_group = 1`).

    The kernel is `(*kernel_size, in_channels, depth_multiplier)`: fan-in
    `volume(kernel_size)`, fan-out `volume(kernel_size) · depth_multiplier /
    volume(strides)`.

    Examples:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(8, 32, 32, 16)).astype("float32")
        >>> w = np.random.default_rng(1).normal(size=(3, 3, 16, 2)).astype("float32")
        >>> y = keras.ops.convert_to_numpy(depthwise_conv(x, w, padding="same"))
        >>> y.shape, bool(0.9 < y.std() < 1.1)
        ((8, 32, 32, 32), True)
    """
    x, kernel, channel_axis = _checked(x, kernel, data_format)
    kernel_shape = shape_of(kernel)
    check_dims_match("Input and kernel channels", "x's channels", shape_of(x)[channel_axis],
                     "kernel.shape[-2]", kernel_shape[-2])
    strides = _spatial("strides", strides, len(kernel_shape) - 2)
    scales = _scales(x, channel_axis, kernel_shape[:-2], 1, kernel_shape[-1], strides, False,
                     constraint, scale_power)
    return _around(x, kernel, bias, scales, channel_axis, fp8, lambda x, kernel: ops.depthwise_conv(
        x, kernel, strides=strides, padding=padding, dilation_rate=dilation_rate, data_format=data_format))


def separable_conv(x, depthwise_kernel, pointwise_kernel, bias=None, strides=1, padding="valid", dilation_rate=1,
                   data_format=None, constraint="to_output_scale", scale_power=rules.linear.DENSE_POWERS, fp8=False):
    """A unit-scaled separable convolution: `depthwise_conv` then a 1×…×1 `conv`, each with its own rule.

    Keras fuses the two; here each is scaled as the op it is, so the
    intermediate tensor is unit-scaled too (its output scale is the depthwise
    op's, and the bias is the pointwise op's). `scale_power` applies to the
    pointwise op, which produces the output.

    Examples:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(8, 32, 32, 16)).astype("float32")
        >>> d = np.random.default_rng(1).normal(size=(3, 3, 16, 2)).astype("float32")
        >>> p = np.random.default_rng(2).normal(size=(1, 1, 32, 24)).astype("float32")
        >>> y = keras.ops.convert_to_numpy(separable_conv(x, d, p, padding="same"))
        >>> y.shape, bool(0.9 < y.std() < 1.1)
        ((8, 32, 32, 24), True)
    """
    h = depthwise_conv(x, depthwise_kernel, strides=strides, padding=padding, dilation_rate=dilation_rate,
                       data_format=data_format, constraint=constraint, fp8=fp8)
    return conv(h, pointwise_kernel, bias, data_format=data_format, constraint=constraint, scale_power=scale_power,
                fp8=fp8)


def _checked(x, kernel, data_format):
    kernel = to_float(to_tensor(kernel, "kernel"), "kernel")
    x = to_float(to_tensor(x, "x"), "x", like=kernel)
    spatial = len(shape_of(kernel)) - 2
    if spatial < 1:
        raise ValueError(f"`kernel` must have rank >= 3. Received: kernel.shape={shape_of(kernel)}")
    check_rank("x", x, spatial + 2, spatial + 2)
    data_format = keras.config.image_data_format() if data_format is None else data_format
    checks.one_of("data_format", data_format, ("channels_last", "channels_first"))
    return x, kernel, -1 if data_format == "channels_last" else 1


def _spatial(name, value, rank):
    """An int or one per spatial axis, as a tuple of `rank` positive ints."""
    values = (value,) * rank if isinstance(value, int) else tuple(value)
    if len(values) != rank:
        raise ValueError(f"`{name}` must be an int or {rank} ints. Received: {name}={value!r}")
    return tuple(checks.positive_int(name, v) for v in values)


def _scales(x, channel_axis, kernel_size, in_per_group, out_per_group, strides, transpose, constraint, powers):
    kernel_volume, stride_volume = math.prod(kernel_size), math.prod(strides)
    # Each kernel tap's gradient sums over the convolution's output positions,
    # or a transpose's input positions. Counted from the input (borders
    # ignored, as the rule ignores them), the count is known before the op
    # runs, under a traced batch too.
    input_positions = global_numel(x) / as_float(shape_of(x)[channel_axis])
    positions = input_positions if transpose else input_positions / stride_volume
    return rules.conv.conv(kernel_volume, in_per_group, out_per_group, stride_volume, positions, transpose,
                           constraint, powers)


def _around(x, kernel, bias, scales, channel_axis, fp8, product, weight_multipliers=(1.0, 1.0)):
    """`product(x, m_k·kernel) + m_b·bias` with the scales applied: the inputs' gradients backward, the output forward.

    `(m_k, m_b)` are the weights' forward multipliers (`ops.dense`'s `weight_multipliers`).
    """
    kernel = as_compute_dtype(kernel, x)
    if not fp8:
        return _through_weights(x, kernel, bias, scales, channel_axis, product, weight_multipliers)
    kernel_multiplier, bias_multiplier = weight_multipliers
    bias = None if bias is None else scale_fwd(bias, bias_multiplier)
    x, kernel = scale_bwd(x, scales.grad_input), scale_bwd(scale_fwd(kernel, kernel_multiplier), scales.grad_weight)
    y = precision.fp8_product(product, x, kernel)
    if bias is not None:
        y = add_bias(y, _channel_bias(bias, y, channel_axis), scales.grad_weight)
    return scale_fwd(y, scales.output)


def _through_weights(x, kernel, bias, scales, channel_axis, product, weight_multipliers):
    """The same scales applied to the weights, not the activations: the output is linear in the kernel and bias.

    `product(x, output·kernel) + output·bias` is the output scaled; `x`'s
    gradient through it is already `output` times the plain one, which the
    rule's tie makes `grad_input` (else `x` takes the ratio backward); and
    the weights take their own backward scales. Every scale then falls on a
    kernel-sized tensor, which costs an eager step (PyTorch's) no pass over
    the activations; the forward multipliers join the output scale there.
    FP8 casts unit-scaled operands, so it keeps `_around`'s order.
    """
    kernel_multiplier, bias_multiplier = weight_multipliers
    x = scale_bwd(x, scales.grad_input / scales.output)
    y = product(x, scaled(kernel, scales.output * kernel_multiplier, scales.grad_weight))
    if bias is None:
        return y
    bias = scaled(_channel_bias(bias, y, channel_axis), scales.output * bias_multiplier, 1.0)
    return add_bias(y, bias, scales.grad_weight)


def _channel_bias(bias, y, channel_axis):
    """The `(filters,)` bias, shaped to broadcast along `y`'s channel axis."""
    shape = [1] * len(shape_of(y))
    shape[channel_axis] = -1
    return ops.reshape(to_tensor(bias, "bias"), shape)
