"""The one scaling primitive: a separate scale for the forward and backward pass.

Every unit-scaled op in `keras_unitscale.functional` is written with these three
functions and nothing else that touches gradients. They are built on
`keras.ops.custom_gradient`, so they run on TensorFlow (eager, `tf.function`,
XLA) and JAX; on PyTorch on a `torch.autograd.Function` of the same two
multiplications, which costs an eager step less (see `_torch_scaled`).
"""

import contextlib
import numbers
import threading

import keras
from keras import ops

from keras_unitscale import checks

__all__ = ["scaled", "scale_fwd", "scale_bwd", "scaling_disabled", "with_gradient"]

_state = threading.local()


@contextlib.contextmanager
def scaling_disabled():
    """Within this context `scaled` returns its input: every scale op is removed.

    What remains is the same computation without the unit-scaling factors:
    the baseline that `benchmarks/overhead.py` times the scale ops against,
    and a way to see what a model would do without them. It acts where ops
    are traced or run, so build and first call (or `fit`) a model inside it.

    Examples:
        >>> import numpy as np
        >>> with scaling_disabled():
        ...     y = scaled(np.ones((1,), "float32"), fwd=4.0)
        >>> keras.ops.convert_to_numpy(y).tolist()
        [1.0]
    """
    previous = getattr(_state, "disabled", False)
    _state.disabled = True
    try:
        yield
    finally:
        _state.disabled = previous


def scaling_is_disabled():
    """Whether this thread is inside `scaling_disabled()`."""
    return getattr(_state, "disabled", False)


def _check_scale(name, scale):
    """Rejects a Python scale that is not a finite number; tensors pass through.

    A tensor scale arises only where a size is unknown until run time (a
    `None` batch dimension under `tf.function`); it cannot be checked eagerly.
    """
    if isinstance(scale, bool) or (
        isinstance(scale, numbers.Number) and not checks.finite(scale)
    ):
        raise ValueError(
            f"`{name}` must be a finite number. Received: {name}={scale!r}"
        )
    if isinstance(scale, numbers.Number):
        return float(scale)
    if hasattr(scale, "shape") and len(scale.shape) == 0:
        return scale
    raise ValueError(
        f"`{name}` must be a Python number or a scalar tensor. "
        f"Received: {name}={scale!r}"
    )


def as_tensor(x):
    """`x` as a tensor; a `keras.Variable` is read through `.value`, so mixed-precision autocasting applies."""
    if isinstance(x, keras.Variable):
        x = x.value
    # A backend tensor passes as it is: `convert_to_tensor` would return it
    # too, after checks (for symbolic tensors, nested structures) that an
    # eager step pays for on every scale. A backend's own variable (a
    # `tf.Variable`, which TensorFlow counts as a tensor) is read by it.
    if ops.is_tensor(x) and not hasattr(x, "assign"):
        return x
    return ops.convert_to_tensor(x)


def _is_sparse(x):
    # Keras's sparse tensors: TensorFlow's `SparseTensor` and JAX's `BCOO`.
    return type(x).__name__ in ("SparseTensor", "BCOO")


def _is_one(scale):
    return isinstance(scale, float) and scale == 1.0


def _multiply_in_dtype(x, scale):
    """`x * scale`, with the scale cast to `x`'s own dtype (float16 stays float16)."""
    if _is_one(scale):
        return x
    if isinstance(scale, float):
        # A Python float is weakly typed in Keras's dtype promotion: the
        # product keeps x's dtype, with no cast op (which costs an eager step).
        if keras.backend.backend() == "torch":
            # So it is in PyTorch's own; its operator skips what `ops.multiply`
            # adds per call (converting and checking both arguments), which a
            # PyTorch eager step pays for every scale it applies. (Elsewhere
            # `x` may be a gradient that only `ops.multiply` takes: TensorFlow's
            # IndexedSlices.)
            return x * scale
        return ops.multiply(x, scale)
    return ops.multiply(x, ops.cast(scale, x.dtype))


def scaled(x, fwd=1.0, bwd=1.0):
    """Multiplies `x` by `fwd` in the forward pass and its gradient by `bwd`.

    The scales are applied in `x`'s own dtype, so a float16 tensor stays
    float16 and its gradient keeps that dtype. When `fwd == bwd` this is an
    ordinary multiplication (no custom gradient is needed), and when both are
    1 it returns `x` itself.

    Args:
        x: a tensor or a `keras.Variable` (read through `.value`, so mixed
            precision autocasting applies).
        fwd: the forward scale, a Python number (or a scalar tensor when it
            depends on a size known only at run time).
        bwd: the backward scale, likewise.

    Returns:
        `x * fwd`, whose gradient with respect to `x` is `bwd` times the
        incoming gradient.

    Examples:
        >>> import numpy as np
        >>> y = scaled(np.ones((2,), "float32"), fwd=4.0, bwd=0.5)
        >>> keras.ops.convert_to_numpy(y).tolist()
        [4.0, 4.0]
    """
    fwd = _check_scale("fwd", fwd)
    bwd = _check_scale("bwd", bwd)
    x = as_tensor(x)
    if scaling_is_disabled():
        return x
    if _is_one(fwd) and _is_one(bwd):
        return x
    if "float" not in keras.backend.standardize_dtype(x.dtype):
        # A non-integer scale in an integer dtype rounds: a silently wrong number.
        raise ValueError(
            "`scaled` scales floating-point tensors; cast the tensor first. "
            f"Received: x.dtype={keras.backend.standardize_dtype(x.dtype)}, fwd={fwd!r}, bwd={bwd!r}"
        )
    if fwd is bwd or (isinstance(fwd, float) and isinstance(bwd, float) and fwd == bwd) or _is_sparse(x):
        # A sparse tensor takes no gradient (Keras's sparse inputs are data):
        # only its forward scale applies.
        return _multiply_in_dtype(x, fwd)
    if keras.backend.backend() == "torch":
        return _torch_scaled(x, fwd, bwd)
    return with_gradient(x, lambda v: _multiply_in_dtype(v, fwd), lambda g: _multiply_in_dtype(g, bwd))


_TORCH_FUNCTION = {}  # name -> a `torch.autograd.Function`, made on first use (torch is imported only then)


def _torch_scaled(x, fwd, bwd):
    """`scaled`'s custom gradient on PyTorch: one `torch.autograd.Function` of two multiplications.

    It computes what `with_gradient` does, without what Keras's generic
    custom gradient adds to every call: its inputs saved for the backward
    pass (which keeps every scaled tensor alive until then, though a scale's
    gradient never reads it) and a Keras op around each multiplication. In
    PyTorch's eager mode each of those is Python work per scale per step,
    and a Dense applies four scales.
    """
    if "scaled" not in _TORCH_FUNCTION:
        import torch

        class Scaled(torch.autograd.Function):
            @staticmethod
            def forward(ctx, inputs, forward_scale, backward_scale):
                ctx.backward_scale = backward_scale
                return _multiply_in_dtype(inputs, forward_scale)

            @staticmethod
            def backward(ctx, upstream):
                return _multiply_in_dtype(upstream, ctx.backward_scale), None, None

        _TORCH_FUNCTION["scaled"] = Scaled
    return _TORCH_FUNCTION["scaled"].apply(x, fwd, bwd)


def torch_function_applies(x, scales):
    """Whether a scaled op on `x` may run as a PyTorch autograd function of ours: PyTorch, scaling on,
    Python-number scales, a dense floating `x`.

    `scaled_together` and every op of `ops.torch_fused` (through its `applies`) ask this.
    """
    if keras.backend.backend() != "torch" or scaling_is_disabled():
        return False
    for s in scales:  # a loop, not `all(...)`: asked per op per eager step (see `sizes.is_static`)
        if not isinstance(s, float):
            return False
    return x.dtype.is_floating_point and not x.is_sparse


def scaled_together(xs, fwds, bwds):
    """`scaled(x, fwd, bwd)` of each `x` in `xs` (None stays None): a layer's small weights, all at once.

    The same numbers as one `scaled` per tensor. On PyTorch, with Python-number
    scales, they are one autograd function for all of them (an eager step
    then pays one Python call each way, not one per weight).

    Examples:
        >>> import numpy as np
        >>> gain, bias = scaled_together([np.ones((2,), "float32"), None], [2.0, 1.0], [0.5, 0.5])
        >>> keras.ops.convert_to_numpy(gain).tolist(), bias
        ([2.0, 2.0], None)
    """
    present = [i for i, x in enumerate(xs) if x is not None]
    tensors = [as_tensor(xs[i]) for i in present]
    scales = [(_check_scale("fwd", fwds[i]), _check_scale("bwd", bwds[i])) for i in present]
    if len(tensors) > 1 and all(torch_function_applies(t, s) for t, s in zip(tensors, scales)):
        outputs = _torch_scaled_together(tensors, scales)
    else:
        outputs = [scaled(t, f, b) for t, (f, b) in zip(tensors, scales)]
    result = list(xs)
    for i, output in zip(present, outputs):
        result[i] = output
    return result


def _torch_scaled_together(tensors, scales):
    """`scaled_together` on PyTorch: one `torch.autograd.Function` of a multiplication per tensor each way."""
    if "together" not in _TORCH_FUNCTION:
        import torch

        class ScaledTogether(torch.autograd.Function):
            @staticmethod
            def forward(ctx, scales, *inputs):
                ctx.backward_scales = [b for _, b in scales]
                return tuple(_multiply_in_dtype(x, f) for x, (f, _) in zip(inputs, scales))

            @staticmethod
            def backward(ctx, *upstream):
                return None, *(None if g is None else _multiply_in_dtype(g, b)
                               for g, b in zip(upstream, ctx.backward_scales))

        _TORCH_FUNCTION["together"] = ScaledTogether
    return _TORCH_FUNCTION["together"].apply(scales, *tensors)


def with_gradient(x, forward, backward):
    """`forward(x)`, whose gradient with respect to `x` is `backward(upstream)`.

    The custom gradient under `scaled` (but on PyTorch, see `_torch_scaled`)
    and under `formats.quantize_fwd` / `quantize_bwd`: a function of the value in the forward pass, another of
    the gradient in the backward pass, each elementwise and shape-keeping.

    Args:
        x: a tensor.
        forward: tensor -> tensor, applied to `x`.
        backward: tensor -> tensor, applied to the incoming gradient.

    Examples:
        >>> import numpy as np
        >>> y = with_gradient(np.ones((2,), "float32"), lambda v: v + 1, lambda g: g)
        >>> keras.ops.convert_to_numpy(y).tolist()
        [2.0, 2.0]
    """
    # The gradient function takes `*args` and an optional `upstream` keyword
    # because PyTorch calls it as `grad(*saved_inputs, upstream=g)` while
    # TensorFlow and JAX call it as `grad(g)`. Nothing but `x` is passed into
    # the custom-gradient function: keyword arguments and non-tensor
    # arguments are not supported there on every backend.
    @ops.custom_gradient
    def _with_gradient(inputs):
        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            return backward(upstream)

        return forward(inputs), grad

    return _with_gradient(as_tensor(x))


def scale_fwd(x, scale):
    """Multiplies `x` by `scale` in the forward pass only; its gradient is unchanged.

    Args:
        x: a tensor or a `keras.Variable`.
        scale: the forward scale.

    Returns:
        `x * scale`, with the identity as its gradient.

    Examples:
        >>> import numpy as np
        >>> keras.ops.convert_to_numpy(scale_fwd(np.ones((1,), "float32"), 3.0)).tolist()
        [3.0]
    """
    return scaled(x, fwd=scale, bwd=1.0)


def scale_bwd(x, scale):
    """Leaves `x` unchanged in the forward pass and multiplies its gradient by `scale`.

    Args:
        x: a tensor or a `keras.Variable`.
        scale: the backward scale.

    Returns:
        `x`, whose gradient is `scale` times the incoming gradient.

    Examples:
        >>> import numpy as np
        >>> keras.ops.convert_to_numpy(scale_bwd(np.ones((1,), "float32"), 3.0)).tolist()
        [1.0]
    """
    return scaled(x, fwd=1.0, bwd=scale)
