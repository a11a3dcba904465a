"""formats: rounding into FP8, FP16 and BF16 agrees with ml_dtypes bit for bit, saturates, and is unbiased when stochastic."""

import keras
import ml_dtypes
import numpy as np
import pytest
from keras import ops

from keras_unitscale import formats as F
from keras_unitscale.scale import with_gradient

NUMPY_DTYPES = {"E4M3": ml_dtypes.float8_e4m3fn, "E5M2": ml_dtypes.float8_e5m2, "FP16": np.float16,
                "BF16": ml_dtypes.bfloat16}
FORMATS = [F.E4M3, F.E5M2, F.FP16, F.BF16]


def _grid(fmt):
    """Every value of the format in float32, the midpoints between them, points just off both, and beyond max."""
    if fmt.exponent_bits == 8:  # bfloat16: all 2^16 bit patterns
        values = np.arange(2**16, dtype=np.uint16).view(ml_dtypes.bfloat16).astype("float32")
    else:
        bits = np.arange(2 ** (1 + fmt.exponent_bits + fmt.mantissa_bits), dtype=np.uint16 if fmt.mantissa_bits > 3
                         else np.uint8)
        values = bits.view(NUMPY_DTYPES[fmt.name]).astype("float32")
    values = np.unique(values[np.isfinite(values)])
    mids = (values[1:].astype("float64") + values[:-1]) / 2
    near = np.concatenate([mids, np.nextafter(mids.astype("float32"), np.inf), np.nextafter(mids.astype("float32"), -np.inf)])
    beyond = np.array([fmt.max * 1.01, fmt.max * 4, 3e38, np.inf], "float32")
    tiny = np.array([fmt.smallest_subnormal / 2, fmt.smallest_subnormal * 0.49, fmt.smallest_subnormal * 0.51,
                     1e-45], "float32")
    return np.concatenate([values, near.astype("float32"), beyond, -beyond, tiny, -tiny])


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_nearest_is_bit_exact_with_ml_dtypes_and_saturates(fmt):
    x = _grid(fmt)
    if fmt is F.BF16 and keras.backend.backend() != "torch":
        # BF16's subnormals are float32's too, and XLA flushes float32
        # subnormals to zero (so do GPUs by default): not a rounding question.
        x = x[(np.abs(x) >= 2.0**-126) | (x == 0)]
    got = ops.convert_to_numpy(F.quantize(x, fmt))
    inside = np.abs(x) <= fmt.max
    expected = x[inside].astype(NUMPY_DTYPES[fmt.name]).astype("float32")
    np.testing.assert_array_equal(got[inside].view(np.uint32), expected.view(np.uint32))  # signs of zero included
    assert np.all(got[~inside] == np.sign(x[~inside]) * np.float32(fmt.max))
    # Below half the smallest subnormal, values flush to (signed) zero.
    flushed = (np.abs(x) < fmt.smallest_subnormal / 2) & (x != 0)
    assert np.all(got[flushed] == 0)


def test_nan_stays_nan_and_dtype_is_kept():
    x = np.array([np.nan, 1.3, 1e9], "float32")
    got = ops.convert_to_numpy(F.quantize(x, "E4M3"))
    assert np.isnan(got[0]) and got[1] == 1.25 and got[2] == 448.0
    half = F.quantize(ops.cast(np.array([1e9, 1.3], "float32"), "float16"), F.E5M2)
    assert keras.backend.standardize_dtype(half.dtype) == "float16"
    assert ops.convert_to_numpy(half).tolist() == [57344.0, 1.25]


@pytest.mark.parametrize("fmt", [F.E4M3, F.E5M2, F.FP16], ids=lambda f: f.name)
def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours(fmt):
    rng = np.random.default_rng(0)
    # One value per binade, subnormals included, each drawn 100 000 times.
    exponents = np.arange(np.log2(fmt.smallest_subnormal) + 1, np.log2(fmt.max) - 1, 3)
    points = (2.0**exponents * rng.uniform(1.05, 1.95, exponents.size)).astype("float32")
    points *= np.where(rng.random(points.size) < 0.5, -1.0, 1.0).astype("float32")
    x = np.repeat(points[None, :], 100_000, axis=0)
    got = ops.convert_to_numpy(F.quantize(x, fmt, rounding="stochastic", seed=1))
    down = ops.convert_to_numpy(F.quantize(points, fmt))  # one neighbour; the other is a step away
    representable = got.astype(NUMPY_DTYPES[fmt.name]).astype("float32") == got
    assert representable.all()
    for column, point in enumerate(points):
        assert len(np.unique(got[:, column])) <= 2, (point, np.unique(got[:, column]))
        assert down[column] in got[:, column]
    relative_bias = np.abs(got.astype("float64").mean(axis=0) - points) / np.abs(points)
    assert relative_bias.max() < 1e-3, dict(zip(points.tolist(), relative_bias.tolist()))


def test_stochastic_rounding_saturates_and_keeps_exact_values():
    x = np.array([448.0, -448.0, 1e6, 0.0, 1.5, 2.0**-9], "float32")
    got = ops.convert_to_numpy(F.quantize(x, F.E4M3, rounding="stochastic", seed=3))
    assert got.tolist() == [448.0, -448.0, 448.0, 0.0, 1.5, 2.0**-9]


def _value_and_grad(fn, x, upstream):
    """fn(x) and the gradient of sum(fn(x) * upstream) with respect to x."""
    return ops.convert_to_numpy(fn(x)), ops.convert_to_numpy(_grad(fn, x, upstream))


def _grad(fn, x, upstream):
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.grad(lambda v: (fn(v) * upstream).sum())(x)
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            total = tf.reduce_sum(fn(x) * upstream)
        return tape.gradient(total, x)
    import torch

    x = torch.tensor(x, requires_grad=True)
    (fn(x) * torch.tensor(upstream)).sum().backward()
    return x.grad


def test_quantize_fwd_rounds_the_value_and_passes_the_gradient():
    x = np.array([1.05, 1000.0], "float32")
    upstream = np.array([1.07, 1e-9], "float32")
    value, grad = _value_and_grad(lambda v: F.quantize_fwd(v, "E4M3"), x, upstream)
    assert value.tolist() == [1.0, 448.0]
    np.testing.assert_array_equal(grad, upstream)


def test_quantize_bwd_rounds_the_gradient_only():
    x = np.array([1.07, 1000.0], "float32")
    upstream = np.array([1.07, 1e-9], "float32")
    value, grad = _value_and_grad(lambda v: F.quantize_bwd(v, "E5M2"), x, upstream)
    np.testing.assert_array_equal(value, x)
    assert grad.tolist() == [1.0, 0.0]  # 1e-9 is below E5M2's smallest subnormal


def test_with_gradient_is_the_primitive_under_both():
    x = np.array([2.0], "float32")
    value, grad = _value_and_grad(lambda v: with_gradient(v, lambda a: a * 3.0, lambda g: g * 5.0), x,
                                  np.array([1.0], "float32"))
    assert value.tolist() == [6.0] and grad.tolist() == [5.0]


def test_errors_name_what_was_given():
    with pytest.raises(ValueError, match=r"format='E3M4'"):
        F.quantize(np.ones(2, "float32"), "E3M4")
    with pytest.raises(ValueError, match=r"rounding='up'"):
        F.quantize(np.ones(2, "float32"), F.E4M3, rounding="up")
    with pytest.raises(ValueError, match=r"x.dtype=int32"):
        F.quantize(np.ones(2, "int32"), F.E4M3)
