"""What the ops share: tensor argument checks, dtypes, and the elementwise pattern."""

from keras import backend
from keras import ops

from keras_unitscale.ops import torch_fused
from keras_unitscale.scale import as_tensor
from keras_unitscale.scale import scale_bwd
from keras_unitscale.scale import scaled
from keras_unitscale.sizes import is_static
from keras_unitscale.sizes import shape as shape_of

LOW_PRECISION = ("float16", "bfloat16")


def check_rank(name, x, min_rank, max_rank=None):
    rank = len(x.shape)
    if rank < min_rank or (max_rank is not None and rank > max_rank):
        if max_rank is None:
            expected = f"rank >= {min_rank}"
        elif max_rank == min_rank:
            expected = f"rank {min_rank}"
        else:
            expected = f"rank in [{min_rank}, {max_rank}]"
        raise ValueError(
            f"`{name}` must have {expected}. Received: {name}.shape={tuple(x.shape)}"
        )


def check_dims_match(what, left_name, left_dim, right_name, right_dim):
    if is_static(left_dim, right_dim) and left_dim != right_dim:
        raise ValueError(
            f"{what} do not match: {left_name}={left_dim} but {right_name}="
            f"{right_dim}."
        )


def check_same_shape(what, left_name, left, right_name, right):
    left_shape, right_shape = shape_of(left), shape_of(right)
    if is_static(*left_shape, *right_shape) and left_shape != right_shape:
        raise ValueError(
            f"{what}. Received: {left_name}.shape={left_shape}, "
            f"{right_name}.shape={right_shape}"
        )


def to_tensor(x, name):
    if x is None:
        raise ValueError(f"`{name}` must be a tensor. Received: {name}=None")
    return as_tensor(x)


def to_float(x, name, like=None):
    """`x` as a floating-point tensor: integer and boolean inputs are cast to `like`'s dtype, else floatx.

    A unit-scaled op multiplies by non-integer scales; in an integer dtype
    those would round to 0 or 1 (a silently wrong number). Keras's own
    layers return floats for integer inputs too (a `Dense` computes
    `int @ float` in float).
    """
    x = to_tensor(x, name)
    if is_floating(x):
        return x
    target = dtype(like) if like is not None and is_floating(like) else backend.floatx()
    return ops.cast(x, target)


def is_floating(x):
    return "float" in dtype(x)


def as_compute_dtype(weight, x):
    """Casts a weight to `x`'s dtype, as Keras autocasting would inside a layer."""
    weight = as_tensor(weight)
    if weight.dtype != x.dtype:
        weight = ops.cast(weight, x.dtype)
    return weight


def dtype(x):
    return backend.standardize_dtype(x.dtype)


def cast_to(x, target):
    """`ops.cast(x, target)`, or `x` itself where it has that dtype: a layer's closing cast to its compute dtype,
    which an eager step would otherwise pay the op's checks for at every call."""
    return x if dtype(x) == backend.standardize_dtype(target) else ops.cast(x, target)


def in_float32(x):
    """`x` in float32 if it is float16 or bfloat16: statistics and softmaxes are computed there."""
    return ops.cast(x, "float32") if dtype(x) in LOW_PRECISION else x


def elementwise(fn, x, scales, native=None):
    """`scales.output · fn(x)`, whose input gradient is `scales.grad` times `fn`'s.

    Written as one ordinary multiplication by the output scale (the same in
    both passes) around a backward-only `grad / output` on the input: the
    gradient comes out `grad · fn'(x)`, and when the constraint made the two
    scales equal, no custom gradient is traced at all. `native` names `fn`
    among `torch_fused.NATIVE_ACTIVATIONS`, whose fused form eager PyTorch
    runs instead (the same numbers).
    """
    output, grad = scales
    if native is not None and torch_fused.applies(x, scales):
        return torch_fused.activation(native, x, output, grad)
    return scaled(fn(scale_bwd(x, grad / output)), output, output)
