"""Floating-point formats: where each one can hold a number, and rounding into it.

The figures are the formats' definitions (OCP FP8 as XLA and NVIDIA hardware
use it, IEEE half, bfloat16): the largest finite value, the smallest normal
and the smallest subnormal. A value below half the smallest subnormal rounds
to zero (it underflows); a value above the largest finite one saturates (or
overflows to inf, as a plain cast does).

`quantize(x, format)` rounds a tensor to a format's values and returns it in
its own dtype, saturating at the format's maximum; `quantize_fwd` and
`quantize_bwd` round only the value or only its gradient. Round-to-nearest
is the backends' native cast (TensorFlow, JAX and PyTorch all have the FP8
dtypes), so on an FP8 GPU XLA can see it as one.
"""

import dataclasses

import keras
import numpy as np
from keras import ops

from keras_unitscale import checks
from keras_unitscale.scale import with_gradient

__all__ = ["FPFormat", "E4M3", "E5M2", "FP16", "BF16", "FORMATS", "ROUNDINGS", "get", "quantize",
           "quantize_fwd", "quantize_bwd"]

ROUNDINGS = ("nearest", "stochastic")


@dataclasses.dataclass(frozen=True)
class FPFormat:
    """A floating-point format's range.

    Examples:
        >>> E4M3.underflow_fraction(np.array([1.0, 2.0**-12, 0.0])), E4M3.saturation_fraction(np.array([500.0, 1.0]))
        (0.5, 0.5)
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    max: float
    smallest_normal: float
    smallest_subnormal: float
    dtype: str

    def underflow_fraction(self, values):
        """The fraction of the nonzero `values` that this format rounds to zero."""
        magnitude = np.abs(np.asarray(values, "float64"))
        nonzero = magnitude[magnitude > 0]
        return float(np.mean(nonzero < self.smallest_subnormal / 2)) if nonzero.size else 0.0

    def saturation_fraction(self, values):
        """The fraction of `values` beyond this format's largest finite value."""
        magnitude = np.abs(np.asarray(values, "float64"))
        return float(np.mean(magnitude > self.max)) if magnitude.size else 0.0


E4M3 = FPFormat("E4M3", 4, 3, 448.0, 2.0**-6, 2.0**-9, "float8_e4m3fn")
E5M2 = FPFormat("E5M2", 5, 2, 57344.0, 2.0**-14, 2.0**-16, "float8_e5m2")
FP16 = FPFormat("FP16", 5, 10, 65504.0, 2.0**-14, 2.0**-24, "float16")
BF16 = FPFormat("BF16", 8, 7, 3.3895313892515355e38, 2.0**-126, 2.0**-133, "bfloat16")
FORMATS = (FP16, BF16, E4M3, E5M2)


def get(fmt):
    """The `FPFormat` named by `fmt`: itself, a name ("E4M3", "e5m2", "FP16", "BF16") or a dtype ("float8_e4m3fn").

    Examples:
        >>> get("e4m3") is E4M3, get("bfloat16") is BF16
        (True, True)
    """
    if isinstance(fmt, FPFormat):
        return fmt
    for known in FORMATS:
        if isinstance(fmt, str) and fmt.lower() in (known.name.lower(), known.dtype):
            return known
    raise ValueError(
        "`format` must be an FPFormat or one of "
        f"{[f.name for f in FORMATS] + [f.dtype for f in FORMATS]}. Received: format={fmt!r}"
    )


def quantize(x, fmt, rounding="nearest", seed=None):
    """`x` rounded to the values of format `fmt`, in `x`'s own dtype.

    Values beyond the format's largest finite value become ±max (never inf
    or NaN; NaN stays NaN). With `rounding="nearest"` this is the backend's
    native cast (round to nearest, ties to even): values below half the
    smallest subnormal flush to zero, as the hardware does. With
    `"stochastic"`, `x` rounds to one of its two neighbours in the format
    with probabilities that make the result unbiased, subnormals included.

    Args:
        x: a floating-point tensor.
        fmt: an `FPFormat` or its name (see `get`).
        rounding: "nearest" or "stochastic".
        seed: for stochastic rounding: an int, or a `keras.random.SeedGenerator`
            (needed inside a traced function such as a JAX train step).

    Returns:
        A tensor of `x`'s shape and dtype holding values of `fmt`.

    Examples:
        >>> import numpy as np
        >>> x = np.array([1.05, 500.0, -1e6, 2.0**-12], "float32")
        >>> keras.ops.convert_to_numpy(quantize(x, "E4M3")).tolist()
        [1.0, 448.0, -448.0, 0.0]
    """
    fmt = get(fmt)
    checks.one_of("rounding", rounding, ROUNDINGS)
    x = ops.convert_to_tensor(x)
    dtype = keras.backend.standardize_dtype(x.dtype)
    if "float" not in dtype:
        raise ValueError(f"`quantize` rounds floating-point tensors. Received: x.dtype={dtype}")
    # float32 holds every format's values exactly, and clipping there keeps
    # ±max exact whatever x's own dtype can represent.
    values = ops.clip(ops.cast(x, "float32"), -fmt.max, fmt.max)
    if rounding == "nearest":
        rounded = ops.cast(ops.cast(values, fmt.dtype), "float32")
    else:
        rounded = ops.clip(_round_stochastically(values, fmt, seed), -fmt.max, fmt.max)
    return ops.cast(rounded, dtype)


def _round_stochastically(values, fmt, seed):
    magnitude = ops.maximum(ops.abs(values), fmt.smallest_normal)
    exponent = ops.floor(ops.log2(magnitude))
    # log2 may land a hair off an exact power of two: put the exponent right.
    exponent = ops.where(ops.power(2.0, exponent) > magnitude, exponent - 1.0, exponent)
    exponent = ops.where(ops.power(2.0, exponent + 1.0) <= magnitude, exponent + 1.0, exponent)
    spacing = ops.power(2.0, exponent - fmt.mantissa_bits)  # the gap between neighbours at this size
    in_steps = values / spacing
    below = ops.floor(in_steps)
    up = ops.cast(keras.random.uniform(ops.shape(values), seed=seed) < in_steps - below, "float32")
    return (below + up) * spacing


def quantize_fwd(x, fmt, rounding="nearest", seed=None):
    """`quantize(x, fmt, ...)` in the forward pass; the gradient passes through unchanged (straight-through).

    Examples:
        >>> import numpy as np
        >>> keras.ops.convert_to_numpy(quantize_fwd(np.array([1.05], "float32"), E4M3)).tolist()
        [1.0]
    """
    fmt = get(fmt)
    return with_gradient(x, lambda v: quantize(v, fmt, rounding, seed), lambda g: g)


def quantize_bwd(x, fmt):
    """`x` unchanged in the forward pass; its gradient rounded to `fmt` (to nearest, saturating).

    Examples:
        >>> import numpy as np
        >>> keras.ops.convert_to_numpy(quantize_bwd(np.array([1.07], "float32"), E5M2)).tolist()
        [1.0700000524520874]
    """
    fmt = get(fmt)
    return with_gradient(x, lambda v: v, lambda g: quantize(g, fmt))
