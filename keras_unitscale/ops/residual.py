"""Unit-scaled residual connections (rules: `keras_unitscale.rules.residual`)."""

from keras import ops

from keras_unitscale import rules
from keras_unitscale.ops import torch_fused
from keras_unitscale.ops.common import to_tensor
from keras_unitscale.scale import scale_bwd
from keras_unitscale.scale import scale_fwd

__all__ = ["residual_split", "residual_add", "residual_apply"]


def residual_split(x, tau=1.0):
    """Splits `x` into a residual-branch input and a skip input, before a residual block.

    Rule (`rules.residual.branch_weights`): forward × 1 for both; backward ×
    `tau / sqrt(1 + tau²)` on the residual branch and × `1 / sqrt(1 + tau²)`
    on the skip, so that the gradient arriving at `x` (the sum of the two)
    has unit scale. Pair it with `residual_add` and the same `tau`.

    Args:
        x: the block's input.
        tau: the weight of the residual branch relative to the skip, >= 0.

    Returns:
        `(residual, skip)`, both equal to `x` in the forward pass.

    Examples:
        >>> import numpy as np
        >>> residual, skip = residual_split(np.ones((1,), "float32"), tau=0.5)
        >>> keras.ops.convert_to_numpy(residual).tolist()
        [1.0]
    """
    residual_weight, skip_weight = rules.residual.branch_weights(tau)
    x = to_tensor(x, "x")
    if torch_fused.applies(x, (residual_weight, skip_weight)):
        return torch_fused.residual_split(x, residual_weight, skip_weight)
    return scale_bwd(x, residual_weight), scale_bwd(x, skip_weight)


def residual_add(residual, skip, tau=1.0):
    """Joins a residual branch and its skip: `(tau·residual + skip) / sqrt(1 + tau²)`.

    Rule (`rules.residual.branch_weights`): forward × `tau / sqrt(1 + tau²)`
    on the residual and × `1 / sqrt(1 + tau²)` on the skip (unit scale out
    for unit scale in); backward × 1, since `residual_split` applied the
    backward weights.

    Args:
        residual: the output of the residual branch.
        skip: the skip tensor from `residual_split`.
        tau: the weight of the residual branch relative to the skip, >= 0.

    Returns:
        The joined tensor.

    Examples:
        >>> import numpy as np
        >>> y = residual_add(np.ones((1,), "float32"), np.ones((1,), "float32"), tau=1.0)
        >>> [round(v, 4) for v in keras.ops.convert_to_numpy(y).tolist()]
        [1.4142]
    """
    residual_weight, skip_weight = rules.residual.branch_weights(tau)
    residual = to_tensor(residual, "residual")
    skip = to_tensor(skip, "skip")
    if torch_fused.applies(skip, (residual_weight, skip_weight)) and residual.dtype == skip.dtype and (
            residual.shape == skip.shape):
        return torch_fused.residual_add(residual, skip, residual_weight, skip_weight)
    return ops.add(scale_fwd(residual, residual_weight), scale_fwd(skip, skip_weight))


def residual_apply(fn, x, tau=1.0):
    """Applies a residual block: `residual_add(fn(residual), skip, tau)`.

    Args:
        fn: the residual branch, a callable on one tensor.
        x: the block's input.
        tau: the weight of the residual branch relative to the skip, >= 0.

    Returns:
        The block's output.

    Examples:
        >>> import numpy as np
        >>> y = residual_apply(lambda t: t * 0.0, np.ones((1,), "float32"), tau=1.0)
        >>> [round(v, 4) for v in keras.ops.convert_to_numpy(y).tolist()]
        [0.7071]
    """
    if not callable(fn):
        raise ValueError(f"`fn` must be callable. Received: fn={fn!r}")
    residual, skip = residual_split(x, tau)
    return residual_add(fn(residual), skip, tau)
