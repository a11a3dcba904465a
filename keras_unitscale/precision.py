"""Scale-free FP8 matmuls: where they apply, and the casts they make.

Unit scaling keeps a matmul's inputs and its output gradient near unit
scale, which is the middle of FP8's range: a plain cast, with no per-tensor
scale and no amax history, keeps them. An FP8 matmul here casts its inputs
(activations and weights) to E4M3 and the gradient arriving at its output
to E5M2, and computes in the layer's dtype on those values. On a GPU with
FP8 (Hopper and later), XLA rewrites such a cast-then-dot into an FP8 GEMM,
forward and backward; elsewhere it simulates FP8's rounding exactly.

The matmul-bearing layers of `keras_unitscale.layers` (`Dense`, the
projections of `MultiHeadAttention`, `LSTM`'s kernels, and through them
`TransformerBlock`) take `fp8=None | True | False`. `None` follows the global
setting, `fp8()` as a context or `set_fp8()`. u-μP's two *critical* matmuls,
the attention output projection and the MLP's down projection, stay in the
layer's dtype under the global setting unless `critical=True`; a layer's own
`fp8=True` always applies.

The setting is read when a layer is traced, so compile (or first call) the
model under it: `compile` starts Keras's step functions afresh.
"""

import contextlib

from keras_unitscale import formats as F

__all__ = ["FORWARD_FORMAT", "BACKWARD_FORMAT", "fp8", "set_fp8", "fp8_setting", "uses_fp8", "cast_inputs",
           "cast_output_gradient"]

# OCP FP8 as the hardware uses it: more mantissa forward, more range backward.
FORWARD_FORMAT = F.E4M3
BACKWARD_FORMAT = F.E5M2

_setting = {"enabled": False, "critical": False}


def set_fp8(enabled=True, critical=False):
    """Sets the global FP8 setting for layers with `fp8=None`.

    Args:
        enabled: run their matmuls in FP8.
        critical: also the critical ones (attention output and MLP down
            projections).

    Example:

    >>> set_fp8(True); fp8_setting()
    {'enabled': True, 'critical': False}
    >>> set_fp8(False)
    """
    _setting.update(enabled=bool(enabled), critical=bool(critical))


def fp8_setting():
    """The global FP8 setting, {"enabled": bool, "critical": bool}."""
    return dict(_setting)


@contextlib.contextmanager
def fp8(enabled=True, critical=False):
    """Within this context, layers with `fp8=None` run their matmuls in FP8 (see `set_fp8`).

    Example:

    >>> with fp8():
    ...     fp8_setting()
    {'enabled': True, 'critical': False}
    >>> fp8_setting()
    {'enabled': False, 'critical': False}
    """
    previous = fp8_setting()
    set_fp8(enabled, critical)
    try:
        yield
    finally:
        set_fp8(**previous)


def uses_fp8(layer_fp8, critical=False):
    """Whether a matmul runs in FP8, given its layer's `fp8` (None, True or False) and whether it is critical."""
    if layer_fp8 is not None:
        return bool(layer_fp8)
    return _setting["enabled"] and (_setting["critical"] or not critical)


def cast_inputs(*tensors):
    """The matmul's inputs rounded to E4M3 (saturating), with straight-through gradients."""
    return [F.quantize_fwd(t, FORWARD_FORMAT) for t in tensors]


def cast_output_gradient(y):
    """`y` unchanged, with the gradient that reaches it rounded to E5M2 (saturating)."""
    return F.quantize_bwd(y, BACKWARD_FORMAT)
