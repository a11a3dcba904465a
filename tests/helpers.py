"""Shared helpers of the test suite."""

import keras
import numpy as np

BACKEND = keras.backend.backend()


def rms(array):
    return float(np.sqrt(np.mean(np.square(np.asarray(array, dtype="float64")))))


def unit_normal(*shape, seed=0, dtype="float32"):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)
