"""Floating-point formats: where each one can hold a number.

The figures are the formats' definitions (OCP FP8 as XLA and NVIDIA hardware
use it, IEEE half, bfloat16): the largest finite value, the smallest normal
and the smallest subnormal. A value below half the smallest subnormal rounds
to zero (it underflows); a value above the largest finite one saturates (or
overflows to inf, as a plain cast does).
"""

import dataclasses

import numpy as np

__all__ = ["FPFormat", "E4M3", "E5M2", "FP16", "BF16", "FORMATS"]


@dataclasses.dataclass(frozen=True)
class FPFormat:
    """A floating-point format's range.

    Example:

    >>> E4M3.underflow_fraction(np.array([1.0, 2.0**-12, 0.0])), E4M3.saturation_fraction(np.array([500.0, 1.0]))
    (0.5, 0.5)
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    max: float
    smallest_normal: float
    smallest_subnormal: float

    def underflow_fraction(self, values):
        """The fraction of the nonzero `values` that this format rounds to zero."""
        magnitude = np.abs(np.asarray(values, "float64"))
        nonzero = magnitude[magnitude > 0]
        return float(np.mean(nonzero < self.smallest_subnormal / 2)) if nonzero.size else 0.0

    def saturation_fraction(self, values):
        """The fraction of `values` beyond this format's largest finite value."""
        magnitude = np.abs(np.asarray(values, "float64"))
        return float(np.mean(magnitude > self.max)) if magnitude.size else 0.0


E4M3 = FPFormat("E4M3", 4, 3, 448.0, 2.0**-6, 2.0**-9)
E5M2 = FPFormat("E5M2", 5, 2, 57344.0, 2.0**-14, 2.0**-16)
FP16 = FPFormat("FP16", 5, 10, 65504.0, 2.0**-14, 2.0**-24)
BF16 = FPFormat("BF16", 8, 7, 3.3895313892515355e38, 2.0**-126, 2.0**-133)
FORMATS = (FP16, BF16, E4M3, E5M2)
