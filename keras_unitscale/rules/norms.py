"""Rules of the normalisations (layer norm, RMS norm)."""

from keras_unitscale.sizes import as_float
from keras_unitscale.sizes import at_least_one
from keras_unitscale.sizes import power

__all__ = ["affine_grad"]


def affine_grad(norm_size, size):
    """The gradient scale of a norm's gain and bias: `sqrt(norm_size / size)` = `1/sqrt(batch)`.

    The output is normalised already (× 1). A gain of `norm_size` elements
    sums its gradient over the `size / norm_size` rows (`size` counts every
    element over all replicas).

    Examples:
        >>> affine_grad(64, 64 * 16)
        0.25
    """
    return power(as_float(norm_size) / as_float(at_least_one(size)), 0.5)
