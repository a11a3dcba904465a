"""Unit-scaled linear ops: matmul, dense and its readout, add, embedding.

Tensors use Keras layouts: a dense kernel is `(fan_in, fan_out)`. The rules
are in `keras_unitscale.rules.linear`.
"""

import math
import re
import string
from typing import NamedTuple

import numpy as np
from keras import ops

from keras_unitscale import precision
from keras_unitscale import rules
from keras_unitscale.ops import activations
from keras_unitscale.ops import torch_fused
from keras_unitscale.ops.common import as_compute_dtype
from keras_unitscale.ops.common import check_dims_match
from keras_unitscale.ops.common import check_rank
from keras_unitscale.ops.common import dtype
from keras_unitscale.ops.common import is_floating
from keras_unitscale.ops.common import to_float
from keras_unitscale.ops.common import to_tensor
from keras_unitscale.scale import scale_bwd
from keras_unitscale.scale import scale_fwd
from keras_unitscale.scale import scaled
from keras_unitscale.sizes import as_float
from keras_unitscale.sizes import global_numel
from keras_unitscale.sizes import is_static
from keras_unitscale.sizes import shape as shape_of
from keras_unitscale.sizes import static_memo

__all__ = [
    "matmul", "dense", "dense_around", "dense_readout", "add", "sum_of", "embedding", "EinsumSizes",
    "einsum_sizes", "einsum_dense",
]


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

    Examples:
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


def dense(x, kernel, bias=None, constraint="to_output_scale", scale_power=rules.linear.DENSE_POWERS, fp8=False,
          weight_multipliers=(1.0, 1.0), activation=None, mult=1.0):
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
        weight_multipliers: `(kernel's, bias's)` fixed forward multipliers
            (`layers.common.WeightMultipliers`): the op computes with `m·w`,
            and `w`'s gradient is the rule's, as `scale_fwd(w, m)` gives.
        activation: optional, any activation Keras accepts, applied as
            `ops.activations.apply(y, activation, mult, constraint)` does.
        mult: the activation's u-μP multiplier.

    Returns:
        The output, shape `(..., fan_out)`.

    Examples:
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
    bias = None if bias is None else _checked_bias(bias, fan_out)
    scales = _dense_scales(x, fan_in, fan_out, constraint, scale_power)
    relu_factor = activations.relu_factor(activation, mult, constraint)
    if relu_factor is not None:  # relu's scale joins the dense's; plain relu follows
        scales, activation = scales.times(relu_factor), None
    if not fp8 and torch_fused.applies(x, (*scales, *weight_multipliers)):
        return _torch_dense(x, kernel, bias, scales, weight_multipliers, relu_factor is not None,
                            (activation, mult, constraint))
    kernel, bias = _multiplied(kernel, bias, weight_multipliers)

    def product(x):
        y = _matmul(x, scale_bwd(as_compute_dtype(kernel, x), scales.grad_weight), fp8)
        return y if bias is None else add_bias(y, bias, scales.grad_weight)

    y = scale_fwd(product(scale_bwd(x, scales.grad_input)), scales.output)
    return ops.relu(y) if relu_factor is not None else activations.apply(y, activation, mult, constraint)


def _checked_bias(bias, fan_out):
    bias = to_tensor(bias, "bias")
    check_rank("bias", bias, 1, 1)
    check_dims_match("Bias and kernel", "bias.shape[0]", shape_of(bias)[0], "kernel.shape[1]", fan_out)
    return bias


def _torch_dense(x, kernel, bias, scales, weight_multipliers, relu_after, activation):
    """`dense` as eager PyTorch's one autograd function, the activation inside it where PyTorch has its kernels.

    `relu_after`: plain relu follows (its scale is in `scales`); else
    `activation` is `(activation, mult, constraint)` as `dense` takes them.
    """
    bias = None if bias is None else as_compute_dtype(bias, x)
    inside = ("relu", 1.0, 1.0) if relu_after else activations.fusable(*activation)
    y = torch_fused.dense(x, as_compute_dtype(kernel, x), bias, *scales, *weight_multipliers, inside)
    return y if inside is not None else activations.apply(y, *activation)


def _multiplied(kernel, bias, weight_multipliers):
    """The kernel and bias times their forward multipliers (their gradients unchanged)."""
    kernel_multiplier, bias_multiplier = weight_multipliers
    return scale_fwd(kernel, kernel_multiplier), None if bias is None else scale_fwd(bias, bias_multiplier)


def add_bias(y, bias, grad_scale):
    """`y + bias` in `y`'s dtype, with the bias's gradient × `grad_scale`.

    The bias's gradient sums the output gradient over every row. Where the
    rows push it the same way (attention's value bias, whose rows a flat
    causal softmax averages alike), that sum grows as the row count, not its
    square root, and in float16 it can overflow before `grad_scale` (a
    `batch^-1/2`) applies: measured on a twin of a miniature GPT with a
    unit-scaled loss, 2048 rows gave inf; and a float16 sum of thousands of
    terms loses what each adds once the total is large (12% of it over 4096
    rows). In float16 the bias is therefore broadcast to the output in
    float32 and cast there, so that its gradient is scaled term by term and
    summed in float32. The forward values are the same.
    """
    if dtype(y) != "float16":
        return ops.add(y, scale_bwd(as_compute_dtype(bias, y), grad_scale))
    rows = scale_bwd(ops.broadcast_to(ops.cast(bias, "float32"), ops.shape(y)), grad_scale)
    return ops.add(y, ops.cast(rows, "float16"))


def _dense_scales(x, fan_in, fan_out, constraint, scale_power):
    batch = global_numel(x) / as_float(fan_in)
    return _dense_rule(fan_in, fan_out, batch, constraint, tuple(scale_power))


# The dense rule for the sizes an eager step meets at every call, computed once each.
_dense_rule = static_memo(rules.linear.dense)


def dense_around(x, fan_in, fan_out, product, constraint="to_output_scale", scale_power=rules.linear.DENSE_POWERS):
    """The dense rule's output and input-gradient scales around any `product(x)` by a `(fan_in, fan_out)` kernel.

    For a product this package does not compute itself: Keras's quantized
    matmuls (int8, int4, float8), whose kernels Keras reads and quantizes.
    The output and `x`'s gradient are scaled as `dense` scales them; the
    weights' gradients are whatever `product` gives them (a quantized kernel
    does not train; a float8 kernel's gradient keeps Keras's scale, which
    Adam-family optimizers do not see).

    Args:
        x: inputs, shape `(..., fan_in)`.
        fan_in: the kernel's input size.
        fan_out: the kernel's output size.
        product: a function of `x` that returns `x @ kernel (+ bias)`.
        constraint: as for `dense`.
        scale_power: as for `dense`.

    Examples:
        >>> import numpy as np
        >>> x = np.ones((2, 4), "float32")
        >>> y = dense_around(x, 4, 1, lambda x: keras.ops.matmul(x, np.ones((4, 1), "float32")))
        >>> keras.ops.convert_to_numpy(y).tolist()
        [[2.0], [2.0]]
    """
    x = to_tensor(x, "x")
    scales = _dense_scales(x, fan_in, fan_out, constraint, scale_power)
    return scale_fwd(product(scale_bwd(x, scales.grad_input)), scales.output)


class EinsumSizes(NamedTuple):
    """The sizes the dense rule takes for an einsum `x, kernel -> y` (see `einsum_sizes`)."""

    fan_in: int  # summed over in the forward pass: the labels not in the output
    fan_out: int  # summed over in x's gradient: the kernel's labels that x lacks
    shared: int  # the size of x's axes that the kernel also has (static: the kernel's)


# Keras's EinsumDense equations: "ab,bc->ac", "...b,bc->...c", "ab...,bc->ac...".
_EINSUM = re.compile(r"^([a-zA-Z.]+),([a-zA-Z]+)->([a-zA-Z.]+)$")


@static_memo
def _einsum_specs(equation, x_rank):
    """The equation's labels for x, the kernel and the output, with an ellipsis spelled out for `x_rank`."""
    match = _EINSUM.match(equation) if isinstance(equation, str) else None
    if match is None:
        raise ValueError(
            "`equation` must be an einsum of an input and a kernel, such as 'ab,bc->ac' or "
            f"'...b,bc->...c'. Received: equation={equation!r}"
        )
    x_spec, kernel_spec, out_spec = match.groups()
    ellipses = (x_spec.count("..."), out_spec.count("..."))
    if ellipses not in ((0, 0), (1, 1)) or x_spec.replace("...", "").count(".") or out_spec.replace(
        "...", ""
    ).count("."):
        raise ValueError(
            "`equation` may have one ellipsis, in both the input and the output, or none. "
            f"Received: equation={equation!r}"
        )
    if ellipses == (1, 1):
        elided = x_rank - (len(x_spec) - 3)
        if elided < 0:
            raise ValueError(
                f"The input has rank {x_rank}, fewer axes than `equation` names. Received: equation={equation!r}"
            )
        fresh = "".join(c for c in string.ascii_letters if c not in equation)[:elided]
        x_spec, out_spec = x_spec.replace("...", fresh), out_spec.replace("...", fresh)
    for name, spec in (("input", x_spec), ("kernel", kernel_spec), ("output", out_spec)):
        if len(set(spec)) != len(spec):
            raise ValueError(
                f"`equation` repeats a label in its {name} ({spec!r}); a traced or diagonal einsum is not a "
                f"dense op. Received: equation={equation!r}"
            )
    if len(x_spec) != x_rank:
        raise ValueError(
            f"`equation` names {len(x_spec)} input axes but the input has rank {x_rank}. "
            f"Received: equation={equation!r}"
        )
    return x_spec, kernel_spec, out_spec


def einsum_sizes(equation, x_shape, kernel_shape):
    """The fan-in, fan-out and shared size of the einsum `equation` of an `x_shape` input and a `kernel_shape` kernel.

    Each is the number of terms a sum adds up: the forward pass sums over the
    labels missing from the output (`fan_in`: for Keras's projections the
    kernel's contracted axes, those it shares with the input and not with
    the output), x's gradient over the kernel's labels that x lacks
    (`fan_out`: the kernel's other axes, less any axis x, kernel and output
    all share), and the kernel's gradient over x's labels that the kernel
    lacks: `size(x) / shared`, the batch of `rules.linear.dense`.

    Examples:
        >>> einsum_sizes("abc,cde->abde", (2, 5, 16), (16, 4, 8))
        EinsumSizes(fan_in=16, fan_out=32, shared=16)
        >>> einsum_sizes("...cd,cde->...e", (2, 5, 4, 8), (4, 8, 16))
        EinsumSizes(fan_in=32, fan_out=16, shared=32)
    """
    x_spec, kernel_spec, out_spec = _einsum_specs(equation, len(x_shape))
    if len(kernel_spec) != len(kernel_shape):
        raise ValueError(
            f"`equation` names {len(kernel_spec)} kernel axes but the kernel has shape {tuple(kernel_shape)}. "
            f"Received: equation={equation!r}"
        )
    sizes = dict(zip(x_spec, x_shape))
    sizes.update(zip(kernel_spec, kernel_shape))  # the kernel's sizes are static

    def product(labels):
        result = 1
        for label in sorted(labels):
            result = result * sizes[label]
        return result

    return EinsumSizes(
        fan_in=product(set(x_spec + kernel_spec) - set(out_spec)),
        fan_out=product(set(kernel_spec) - set(x_spec)),
        shared=product(set(x_spec) & set(kernel_spec)),
    )


# Per static shapes, as `_dense_rule`: an eager step asks at every call of every projection.
_einsum_sizes = static_memo(einsum_sizes)


def einsum_dense(equation, x, kernel, bias=None, constraint="to_output_scale",
                 scale_power=rules.linear.DENSE_POWERS, fp8=False, weight_multipliers=(1.0, 1.0)):
    """A unit-scaled einsum dense op: `(einsum(equation, x, kernel) + bias) * scale`, Keras's `EinsumDense`.

    Rule (`rules.linear.dense`), with the sizes of `einsum_sizes`: output ×
    `fan_in^-p0`; gradient of `x` × `fan_out^-p1`, tied by the constraint;
    gradient of `kernel` × `batch^-p2` with `batch = size(x) / shared` (all
    replicas), and of `bias` × `(size(y) / size(bias))^-p2`, the number of
    output elements each bias element is added to. For `"...b,bc->...c"`
    this is `dense` exactly.

    Args:
        equation: an einsum of the input and the kernel, as Keras's
            `EinsumDense` takes ("ab,bc->ac", "...b,bc->...c",
            "ab...,bc->ac...").
        x: the input.
        kernel: the kernel, cast to `x`'s dtype when it differs.
        bias: optional, broadcastable to the output.
        constraint: see `keras_unitscale.constraints`.
        scale_power: the powers `(p0, p1, p2)` (see `dense`).
        fp8: as for `dense`.
        weight_multipliers: as for `dense`.

    Returns:
        The output, shaped by `equation`.

    Examples:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(16, 8, 256)).astype("float32")
        >>> w = np.random.default_rng(1).normal(size=(256, 4, 16)).astype("float32")
        >>> y = keras.ops.convert_to_numpy(einsum_dense("abc,cde->abde", x, w))
        >>> y.shape, bool(0.9 < y.std() < 1.1)
        ((16, 8, 4, 16), True)
    """
    kernel = to_float(kernel, "kernel")
    x = to_float(x, "x", like=kernel)
    sizes = _einsum_sizes(equation, shape_of(x), shape_of(kernel))
    scales = _dense_rule(sizes.fan_in, sizes.fan_out, global_numel(x) / as_float(sizes.shared), constraint,
                         tuple(scale_power))
    bias = None if bias is None else to_tensor(bias, "bias")
    if not fp8 and torch_fused.applies(x, (*scales, *weight_multipliers)):
        y = _torch_einsum_dense(equation, x, kernel, bias, scales, weight_multipliers,
                                lambda outputs: _einsum_bias_scale(sizes, outputs, bias, constraint, scale_power))
        if y is not None:
            return y
    kernel, bias = _multiplied(kernel, bias, weight_multipliers)
    y = _einsum(equation, scale_bwd(x, scales.grad_input),
                scale_bwd(as_compute_dtype(kernel, x), scales.grad_weight), fp8)
    if bias is not None:
        y = add_bias(y, bias, _einsum_bias_scale(sizes, global_numel(y), bias, constraint, scale_power))
    return scale_fwd(y, scales.output)


def _torch_einsum_dense(equation, x, kernel, bias, scales, weight_multipliers, bias_scale):
    """`einsum_dense` as eager PyTorch's one autograd function (`dense`'s where it is a matmul); None where neither is.

    `bias_scale(outputs)` is the rule's bias scale for an output of `outputs` elements.
    """
    specs = _einsum_specs(equation, len(x.shape))
    kernel, bias = as_compute_dtype(kernel, x), None if bias is None else as_compute_dtype(bias, x)
    as_dense = torch_fused.einsum_as_dense(specs, x, kernel, bias)
    if as_dense is not None:
        rows, matrix, bias_row, output_shape = as_dense
        y = torch_fused.dense(rows, matrix, bias_row, *scales, *weight_multipliers)
        return y if tuple(y.shape) == output_shape else y.reshape(output_shape)
    transposes = torch_fused.einsum_transposes(*specs)
    if transposes is None:
        return None
    bias_grad = None if bias is None else bias_scale(math.prod(torch_fused.einsum_output_shape(specs, x, kernel)))
    return torch_fused.einsum_dense(specs, transposes, x, kernel, bias, *scales, bias_grad, *weight_multipliers)


def _einsum_bias_scale(sizes, outputs, bias, constraint, scale_power):
    """The bias's gradient scale: the dense rule's, over the number of outputs each bias element is added to."""
    bias_batch = outputs / as_float(max(int(np.prod(shape_of(bias))), 1))
    return rules.linear.dense(sizes.fan_in, sizes.fan_out, bias_batch, constraint, scale_power).grad_weight


def _einsum(equation, a, b, fp8):
    """`einsum(equation, a, b)`; with `fp8`, as `precision.fp8_product` runs it."""
    product = lambda a, b: ops.einsum(equation, a, b)  # noqa: E731
    return precision.fp8_product(product, a, b) if fp8 else product(a, b)


def _matmul(a, b, fp8):
    """`a @ b`; with `fp8`, as `precision.fp8_product` runs it."""
    return precision.fp8_product(ops.matmul, a, b) if fp8 else ops.matmul(a, b)


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

    Examples:
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

    Examples:
        >>> import numpy as np
        >>> y = add(np.ones((2,), "float32"), np.ones((2,), "float32"))
        >>> [round(v, 4) for v in keras.ops.convert_to_numpy(y).tolist()]
        [1.4142, 1.4142]
    """
    if isinstance(a, (int, float)) or isinstance(b, (int, float)):
        return ops.add(a, b)
    return sum_of([a, b], constraint, names=("a", "b"))


def sum_of(tensors, constraint="to_output_scale", names=None):
    """A unit-scaled sum of independent unit-scaled tensors (Keras's `Add` of any number of inputs).

    Rule (`rules.linear.sum_of`): output × `k^-1/2`, `k` the number of
    operands with more than one element; each operand's gradient ×
    `1/sqrt(f)`, `f` how many times broadcasting reuses its elements.

    Args:
        tensors: a list of tensors that broadcast together.
        constraint: see `keras_unitscale.constraints`.
        names: the operands' names in errors (default `tensors[i]`).

    Returns:
        The scaled sum, with the broadcast shape.

    Examples:
        >>> import numpy as np
        >>> y = sum_of([np.ones((2,), "float32")] * 4)
        >>> keras.ops.convert_to_numpy(y).tolist()
        [2.0, 2.0]
    """
    names = names or [f"tensors[{i}]" for i in range(len(tensors))]
    tensors = [to_tensor(t, name) for t, name in zip(tensors, names)]
    like = next((t for t in tensors if is_floating(t)), None)
    tensors = [to_float(t, name, like=like) for t, name in zip(tensors, names)]
    shapes = [shape_of(t) for t in tensors]
    try:
        if is_static(*[dim for shape in shapes for dim in shape]):
            np.broadcast_shapes(*shapes)
    except ValueError:
        received = ", ".join(f"{name}.shape={shape}" for name, shape in zip(names, shapes))
        raise ValueError(f"{' and '.join(f'`{n}`' for n in names)} cannot be broadcast together. Received: {received}") from None
    output, *grads = rules.linear.sum_of(shapes, constraint)
    total = scale_bwd(tensors[0], grads[0])
    for tensor, grad in zip(tensors[1:], grads[1:]):
        total = ops.add(total, scale_bwd(tensor, grad))
    return scale_fwd(total, output)


def embedding(ids, table, table_multiplier=1.0):
    """A unit-scaled embedding lookup.

    Rule (`rules.linear.embedding_grad`, the reference's): output × 1 (rows
    of a unit-variance table are already unit scale); gradient of `table` ×
    `sqrt(vocab / num_tokens)`, since the gradient of a row sums over the
    tokens that chose it, about `num_tokens / vocab` of them.

    Args:
        ids: integer token ids, any shape.
        table: the embedding table, shape `(vocab, dim)`.
        table_multiplier: the table's fixed forward multiplier, as `dense`'s
            `weight_multipliers` (its gradient is the rule's).

    Returns:
        The rows of `table`, shape `ids.shape + (dim,)`.

    Examples:
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
    if torch_fused.applies(table, (table_multiplier, grad_scale)):
        return torch_fused.embedding(ids, table, table_multiplier, grad_scale)
    return ops.take(scaled(table, table_multiplier, grad_scale), ids, axis=0)
