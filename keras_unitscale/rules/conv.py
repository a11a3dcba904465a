"""Rules of the convolutions: the dense rule over each output position's taps.

A convolution is a dense op applied at every output position: each output sums
`fan_in` products (its receptive field), each input feeds `fan_out` outputs,
and each weight's gradient sums over every output position of the batch (a
transpose's over every input position: each input meets each tap once). So
the scales are `rules.linear.dense`'s, with sizes counted in taps, as the
reference package counts them (`unit_scaling.functional.conv1d`):

    fan_in  = kernel_volume · in_per_group           (/ stride_volume for a transpose)
    fan_out = kernel_volume · out_per_group / stride_volume   (× stride_volume for a transpose)
    batch   = batch size · output positions   (input positions for a transpose)

where a group is `groups` for `Conv`, the input channel for a depthwise
convolution (`in_per_group = 1`, `out_per_group = depth_multiplier`). Strides
thin the taps: with stride `s` each input of a convolution feeds `1/s` of the
outputs it would feed at stride 1, and each output of a transpose gathers `1/s`
of the inputs. Padding and dilation are ignored, as in the reference: they
change the counts only at the borders.
"""

import math

from keras_unitscale import checks
from keras_unitscale.rules.linear import DENSE_POWERS
from keras_unitscale.rules.linear import dense

__all__ = ["conv", "kernel_fans", "KERNEL_KINDS"]

# How a kernel's axes are laid out: Keras's `Conv` (taps..., in_per_group, out), `ConvTranspose`
# (taps..., out, in), `DepthwiseConv` and a separable's depthwise kernel (taps..., in, multiplier).
KERNEL_KINDS = ("conv", "transpose", "depthwise")


def conv(
    kernel_volume,
    in_per_group,
    out_per_group,
    stride_volume=1,
    positions=None,
    transpose=False,
    constraint="to_output_scale",
    powers=DENSE_POWERS,
):
    """The scales of a convolution (or its transpose): `rules.linear.dense` with the taps above.

    Args:
        kernel_volume: the product of the kernel's spatial sizes.
        in_per_group: the channels each group reads and writes.
        out_per_group: the channels each group reads and writes.
        stride_volume: the product of the strides.
        positions: the terms each weight's gradient sums, the batch size
            times the output positions (a transpose's input positions);
            None: the weight-gradient scale is not computed.
        transpose: a transposed convolution (strides spread its inputs out).
        constraint: as for `rules.linear.dense`.
        powers: as for `rules.linear.dense`.

    Returns:
        A `rules.linear.DenseScales`.

    Examples:
        >>> conv(9, 16, 32, positions=64, constraint=None)
        DenseScales(output=0.08333333333333333, grad_input=0.05892556509887896, grad_weight=0.125)
        >>> conv(9, 16, 32, stride_volume=4, constraint=None).grad_input == (9 * 32 / 4) ** -0.5
        True
    """
    for name, value in (("kernel_volume", kernel_volume), ("in_per_group", in_per_group),
                        ("out_per_group", out_per_group), ("stride_volume", stride_volume)):
        checks.positive_int(name, value)
    fan_in, fan_out = kernel_volume * in_per_group, kernel_volume * out_per_group
    if transpose:
        fan_in = fan_in / stride_volume
    else:
        fan_out = fan_out / stride_volume
    return dense(fan_in, fan_out, positions, constraint, powers)


def kernel_fans(kind, kernel_shape, strides=1):
    """`(fan_in, fan_out)` of a convolution kernel, the u-μP role's sizes (the module docstring's, in taps).

    One place for both our layers, which declare the role, and
    `parametrization.tag_model`, which infers it for Keras's layers.

    Args:
        kind: one of `KERNEL_KINDS` (a separable's pointwise kernel is a "conv").
        kernel_shape: the kernel's shape, as Keras lays it out.
        strides: the strides, a tuple or one int for every spatial axis (used by transposes).

    Examples:
        >>> kernel_fans("depthwise", (3, 3, 16, 1))  # each output sums its own channel's 9 taps
        (9, 16)
        >>> kernel_fans("transpose", (3, 3, 8, 4), strides=2)
        (9, 8)
    """
    checks.one_of("kind", kind, KERNEL_KINDS)
    shape = tuple(int(size) for size in kernel_shape)
    taps = math.prod(shape[:-2])
    if kind == "depthwise":
        return taps, shape[-2] * shape[-1]
    if kind == "transpose":
        stride_volume = math.prod(strides) if isinstance(strides, (tuple, list)) else int(strides) ** len(shape[:-2])
        return max(taps * shape[-1] // stride_volume, 1), shape[-2]
    return taps * shape[-2], shape[-1]
