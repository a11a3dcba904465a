"""Shared helpers of the test suite."""

import keras
import numpy as np

BACKEND = keras.backend.backend()


def rms(array):
    if keras.ops.is_tensor(array):  # a PyTorch tensor that requires a gradient has no `__array__` of its own
        array = keras.ops.convert_to_numpy(array)
    return float(np.sqrt(np.mean(np.square(np.asarray(array, dtype="float64")))))


def unit_normal(*shape, seed=0, dtype="float32"):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)
