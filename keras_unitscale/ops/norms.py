"""Unit-scaled normalisations: layer norm and RMS norm (rule: `keras_unitscale.rules.norms`)."""

import math

from keras import backend
from keras import ops

from keras_unitscale import checks
from keras_unitscale import rules
from keras_unitscale.ops import torch_fused
from keras_unitscale.ops.common import as_compute_dtype
from keras_unitscale.ops.common import cast_to
from keras_unitscale.ops.common import in_float32
from keras_unitscale.ops.common import to_float
from keras_unitscale.ops.common import to_tensor
from keras_unitscale.scale import scale_bwd
from keras_unitscale.scale import scaled_together
from keras_unitscale.sizes import global_numel
from keras_unitscale.sizes import is_static
from keras_unitscale.sizes import numel
from keras_unitscale.sizes import shape as shape_of

__all__ = ["layer_norm", "rms_norm"]


def _normalized_axes(x, axis):
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    rank = len(x.shape)
    normalized = []
    for a in axes:
        if not isinstance(a, int) or not -rank <= a < rank:
            raise ValueError(
                f"`axis` must name axes of `x` (rank {rank}). Received: axis={axis!r}"
            )
        normalized.append(a % rank)
    return tuple(sorted(set(normalized)))


def _checked_affine(param, name, x, axes):
    """A gain or bias as a tensor, with one element per position of the normalised axes."""
    param = to_tensor(param, name)
    shape = shape_of(x)
    expected = tuple(shape[a] for a in axes)
    if is_static(*expected) and math.prod(shape_of(param)) != math.prod(expected):
        raise ValueError(
            f"`{name}` must have shape {expected} (the normalised axes of `x`). "
            f"Received: {name}.shape={tuple(shape_of(param))}"
        )
    return param


def _affine_grad(x, axes):
    return rules.norms.affine_grad(numel(x, axes), global_numel(x))


def _affine(param, name, x, axes, y):
    """A gain or bias with its gradient scaled, reshaped to broadcast over `x`, in `y`'s dtype."""
    param = scale_bwd(_checked_affine(param, name, x, axes), _affine_grad(x, axes))
    dims = ops.shape(x)
    return as_compute_dtype(ops.reshape(param, [dims[a] if a in axes else 1 for a in range(len(dims))]), y)


def layer_norm(x, gamma=None, beta=None, axis=-1, epsilon=1e-5, rms_scaling=False):
    """Unit-scaled layer normalisation.

    Rule (`rules.norms.affine_grad`, the reference's): the output is
    normalised already (× 1); the gradients of the gain `gamma` and bias
    `beta` × `sqrt(norm_size / size(x))` = `1/sqrt(batch)`, as each sums over
    the batch. Statistics are computed in float32 when `x` is float16 or
    bfloat16.

    Args:
        x: inputs.
        gamma: optional gain, shape of the normalised axes.
        beta: optional bias, shape of the normalised axes.
        axis: an axis or a tuple of axes to normalise over.
        epsilon: added to the variance, >= 0.
        rms_scaling: Keras's deprecated `LayerNormalization(rms_scaling=True)`:
            `x / sqrt(variance + epsilon)`, not centred, gain only (the
            same rule).

    Returns:
        The normalised tensor, `x`'s shape and dtype.

    Examples:
        >>> import numpy as np
        >>> y = layer_norm(np.array([[1.0, 3.0]], "float32"))
        >>> [round(v, 3) for v in keras.ops.convert_to_numpy(y)[0].tolist()]
        [-1.0, 1.0]
    """
    checks.non_negative("epsilon", epsilon)
    x = to_float(x, "x")
    axes = _normalized_axes(x, axis)
    if beta is not None and rms_scaling:
        raise ValueError("`rms_scaling=True` normalises with a gain only. Received: a `beta`")
    if not rms_scaling and _torch_native(x, axes):
        return _torch_layer_norm(x, gamma, beta, axes, epsilon)
    x32 = in_float32(x)
    mean, variance = ops.moments(x32, axes=axes, keepdims=True)
    y = ops.cast((x32 if rms_scaling else x32 - mean) * ops.rsqrt(variance + epsilon), x.dtype)
    if gamma is not None:
        y = y * _affine(gamma, "gamma", x, axes, y)
    if beta is not None:
        y = y + _affine(beta, "beta", x, axes, y)
    return y


def _torch_native(x, axes):
    """Whether PyTorch's own layer norm computes this one: the trailing axes, as Keras's LayerNormalization uses it."""
    rank = len(x.shape)
    return backend.backend() == "torch" and axes == tuple(range(rank - len(axes), rank))


def _torch_layer_norm(x, gamma, beta, axes, epsilon):
    """`layer_norm` through `torch.nn.functional.layer_norm`: one kernel each way, as Keras's own layer uses on PyTorch.

    The same rule: the gain's and bias's gradients scaled (`_affine`), the
    statistics in float32.
    """
    import torch.nn.functional as F

    x32 = in_float32(x)
    normalized_shape = tuple(x.shape[a] for a in axes)
    grad_scale = _affine_grad(x, axes)
    params = [None if param is None else as_compute_dtype(_checked_affine(param, name, x, axes), x32)
              for param, name in ((gamma, "gamma"), (beta, "beta"))]
    if torch_fused.applies(x32, (grad_scale,)):
        params = [_reshaped(param, normalized_shape) for param in params]
        return cast_to(torch_fused.layer_norm(x32, *params, normalized_shape, epsilon, grad_scale), x.dtype)
    params = [_reshaped(param, normalized_shape) for param in scaled_together(params, [1.0, 1.0],
                                                                               [grad_scale, grad_scale])]
    return cast_to(F.layer_norm(x32, normalized_shape, *params, epsilon), x.dtype)


def _reshaped(param, shape):
    return param if param is None or tuple(param.shape) == shape else ops.reshape(param, shape)


def rms_norm(x, gamma=None, axis=-1, epsilon=1e-5):
    """Unit-scaled RMS normalisation, `x / sqrt(mean(x²) + epsilon) * gamma`.

    Rule (`rules.norms.affine_grad`, the reference's): output × 1; gradient
    of `gamma` × `sqrt(norm_size / size(x))`. The RMS is computed in float32
    when `x` is float16 or bfloat16.

    Args:
        x: inputs.
        gamma: optional gain, shape of the normalised axes.
        axis: an axis or a tuple of axes to normalise over.
        epsilon: added to the mean square, >= 0.

    Returns:
        The normalised tensor, `x`'s shape and dtype.

    Examples:
        >>> import numpy as np
        >>> y = rms_norm(np.array([[3.0, 4.0]], "float32"), epsilon=0.0)
        >>> [round(v, 4) for v in keras.ops.convert_to_numpy(y)[0].tolist()]
        [0.8485, 1.1314]
    """
    checks.non_negative("epsilon", epsilon)
    x = to_float(x, "x")
    axes = _normalized_axes(x, axis)
    x32 = in_float32(x)
    mean_square = ops.mean(ops.square(x32), axis=axes, keepdims=True)
    y = ops.cast(x32 * ops.rsqrt(mean_square + epsilon), x.dtype)
    if gamma is not None:
        y = y * _affine(gamma, "gamma", x, axes, y)
    return y
