"""Unit-scaled linear ops: matmul, dense and its readout, add, embedding.

Tensors use Keras layouts: a dense kernel is `(fan_in, fan_out)`. The rules
are in `keras_unitscale.rules.linear`.
"""

import numpy as np
from keras import ops

from keras_unitscale import precision
from keras_unitscale import rules
from keras_unitscale.ops.common import as_compute_dtype
from keras_unitscale.ops.common import check_dims_match
from keras_unitscale.ops.common import check_rank
from keras_unitscale.ops.common import dtype
from keras_unitscale.ops.common import to_float
from keras_unitscale.ops.common import to_tensor
from keras_unitscale.scale import scale_bwd
from keras_unitscale.scale import scale_fwd
from keras_unitscale.sizes import as_float
from keras_unitscale.sizes import global_numel
from keras_unitscale.sizes import is_static
from keras_unitscale.sizes import shape as shape_of

__all__ = ["matmul", "dense", "dense_readout", "add", "embedding"]


def matmul(a, b, constraint="to_output_scale"):
    """A unit-scaled matrix product `a @ b`.

    Rule (`rules.linear.matmul`), for `a` of shape `(..., m, k)` and `b` of
    shape `(..., k, n)`: output × `k^-1/2`; gradient of `a` × `n^-1/2`;
    gradient of `b` × `m^-1/2`. The constraint ties the three (by default
    all take `k^-1/2`).

    Args:
        a: left operand, rank >= 2.
        b: right operand, rank >= 2.
        constraint: see `keras_unitscale.constraints`.

    Returns:
        The scaled product, shape `(..., m, n)`.

    Example:

    >>> import numpy as np
    >>> a = np.random.default_rng(0).normal(size=(64, 256)).astype("float32")
    >>> b = np.random.default_rng(1).normal(size=(256, 64)).astype("float32")
    >>> y = keras.ops.convert_to_numpy(matmul(a, b))
    >>> bool(0.9 < y.std() < 1.1)
    True
    """
    a, b = to_tensor(a, "a"), to_tensor(b, "b")
    a, b = to_float(a, "a", like=b), to_float(b, "b", like=a)
    check_rank("a", a, 2)
    check_rank("b", b, 2)
    m, k = shape_of(a)[-2:]
    k_b, n = shape_of(b)[-2:]
    check_dims_match("Inner dimensions", "a.shape[-1]", k, "b.shape[-2]", k_b)
    scales = rules.linear.matmul(m, k, n, constraint)
    a = scale_bwd(a, scales.grad_left)
    b = scale_bwd(b, scales.grad_right)
    return scale_fwd(ops.matmul(a, b), scales.output)


def dense(x, kernel, bias=None, constraint="to_output_scale", scale_power=rules.linear.DENSE_POWERS, fp8=False):
    """A unit-scaled dense (linear) layer: `(x @ kernel + bias) * scale`.

    Rule (`rules.linear.dense`), for a kernel of shape `(fan_in, fan_out)`
    and `batch = size(x) / fan_in`: output × `fan_in^-p0`; gradient of `x` ×
    `fan_out^-p1`; gradients of `kernel` and `bias` × `batch^-p2`, where
    `(p0, p1, p2) = scale_power` (default 1/2 each). The constraint ties the
    output and input-gradient scales only: the weight gradients never meet
    another path, so their scale is free.

    Args:
        x: inputs, shape `(..., fan_in)`.
        kernel: weights, shape `(fan_in, fan_out)` (Keras's layout). Cast to
            `x`'s dtype when it differs.
        bias: optional, shape `(fan_out,)`.
        constraint: see `keras_unitscale.constraints`.
        scale_power: the powers `(p0, p1, p2)` above.
        fp8: a scale-free FP8 matmul: `x` and `kernel` cast to E4M3, the
            gradient of the product to E5M2 (`keras_unitscale.precision`).

    Returns:
        The output, shape `(..., fan_out)`.

    Example:

    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(128, 512)).astype("float32")
    >>> w = np.random.default_rng(1).normal(size=(512, 64)).astype("float32")
    >>> y = keras.ops.convert_to_numpy(dense(x, w))
    >>> y.shape, bool(0.9 < y.std() < 1.1)
    ((128, 64), True)
    """
    kernel = to_float(kernel, "kernel")
    x = to_float(x, "x", like=kernel)
    check_rank("x", x, 1)
    check_rank("kernel", kernel, 2, 2)
    fan_in, fan_out = shape_of(kernel)
    check_dims_match("Input and kernel", "x.shape[-1]", shape_of(x)[-1], "kernel.shape[0]", fan_in)
    if bias is not None:
        bias = to_tensor(bias, "bias")
        check_rank("bias", bias, 1, 1)
        check_dims_match("Bias and kernel", "bias.shape[0]", shape_of(bias)[0], "kernel.shape[1]", fan_out)
    batch = global_numel(x) / as_float(fan_in)
    scales = rules.linear.dense(fan_in, fan_out, batch, constraint, scale_power)
    x = scale_bwd(x, scales.grad_input)
    kernel = scale_bwd(as_compute_dtype(kernel, x), scales.grad_weight)
    y = _matmul(x, kernel, fp8)
    if bias is not None:
        y = ops.add(y, scale_bwd(as_compute_dtype(bias, x), scales.grad_weight))
    return scale_fwd(y, scales.output)


def _matmul(a, b, fp8):
    """`a @ b`; with `fp8`, on E4M3 inputs and with an E5M2 output gradient (no scales: the ops keep unit scale)."""
    if not fp8:
        return ops.matmul(a, b)
    a, b = precision.cast_inputs(a, b)
    return precision.cast_output_gradient(ops.matmul(a, b))


def dense_readout(x, kernel, bias=None, constraint=None, fp8=False):
    """A unit-scaled readout: the final dense layer, scaled by `1/fan_in`.

    Rule (`rules.linear.readout`): as `dense` with `scale_power=(1, 1/2,
    1/2)`: output × `fan_in^-1` (u-μP's readout multiplier, which keeps the
    logits from growing with width as training aligns the weights with their
    input); gradient of `x` × `fan_out^-1/2`; weight gradients ×
    `batch^-1/2`. Unconstrained by default: nothing follows the readout but
    the loss, so its edge is cut.

    Args:
        x: inputs, shape `(..., fan_in)`.
        kernel: weights, shape `(fan_in, fan_out)`.
        bias: optional, shape `(fan_out,)`.
        constraint: see `keras_unitscale.constraints`.
        fp8: as for `dense`.

    Returns:
        The output, shape `(..., fan_out)`.

    Example:

    >>> import numpy as np
    >>> x = np.ones((2, 4), "float32")
    >>> keras.ops.convert_to_numpy(dense_readout(x, np.ones((4, 1), "float32"))).tolist()
    [[1.0], [1.0]]
    """
    return dense(x, kernel, bias, constraint=constraint, scale_power=rules.linear.READOUT_POWERS, fp8=fp8)


def add(a, b, constraint="to_output_scale"):
    """A unit-scaled sum `a + b` of two independent unit-scaled tensors.

    Rule (`rules.linear.add`): output × `2^-1/2` (× 1 when either operand is
    a scalar or has one element); the gradient of each operand ×
    `1/sqrt(f)`, where `f` is how many times broadcasting reuses each of its
    elements (the gradient sums `f` terms). A Python number operand gives
    the plain sum.

    For a residual connection use `residual_split` / `residual_add`, which
    weight the two branches.

    Args:
        a: a tensor or a Python number.
        b: a tensor or a Python number.
        constraint: see `keras_unitscale.constraints`.

    Returns:
        The scaled sum, with the broadcast shape.

    Example:

    >>> import numpy as np
    >>> y = add(np.ones((2,), "float32"), np.ones((2,), "float32"))
    >>> [round(v, 4) for v in keras.ops.convert_to_numpy(y).tolist()]
    [1.4142, 1.4142]
    """
    if isinstance(a, (int, float)) or isinstance(b, (int, float)):
        return ops.add(a, b)
    a, b = to_tensor(a, "a"), to_tensor(b, "b")
    a, b = to_float(a, "a", like=b), to_float(b, "b", like=a)
    a_shape, b_shape = shape_of(a), shape_of(b)
    try:
        if is_static(*a_shape, *b_shape):
            np.broadcast_shapes(a_shape, b_shape)
    except ValueError:
        raise ValueError(
            "`a` and `b` cannot be broadcast together. Received: "
            f"a.shape={a_shape}, b.shape={b_shape}"
        ) from None
    scales = rules.linear.add(a_shape, b_shape, constraint)
    a = scale_bwd(a, scales.grad_left)
    b = scale_bwd(b, scales.grad_right)
    return scale_fwd(ops.add(a, b), scales.output)


def embedding(ids, table):
    """A unit-scaled embedding lookup.

    Rule (`rules.linear.embedding_grad`, the reference's): output × 1 (rows
    of a unit-variance table are already unit scale); gradient of `table` ×
    `sqrt(vocab / num_tokens)`, since the gradient of a row sums over the
    tokens that chose it, about `num_tokens / vocab` of them.

    Args:
        ids: integer token ids, any shape.
        table: the embedding table, shape `(vocab, dim)`.

    Returns:
        The rows of `table`, shape `ids.shape + (dim,)`.

    Example:

    >>> import numpy as np
    >>> table = np.arange(6, dtype="float32").reshape(3, 2)
    >>> keras.ops.convert_to_numpy(embedding(np.array([2, 0]), table)).tolist()
    [[4.0, 5.0], [0.0, 1.0]]
    """
    ids = to_tensor(ids, "ids")
    table = to_tensor(table, "table")
    check_rank("table", table, 2, 2)
    if "int" not in dtype(ids):
        raise ValueError(
            f"`ids` must have an integer dtype. Received: ids.dtype={dtype(ids)}"
        )
    grad_scale = rules.linear.embedding_grad(shape_of(table)[0], global_numel(ids))
    return ops.take(scale_bwd(table, grad_scale), ids, axis=0)
