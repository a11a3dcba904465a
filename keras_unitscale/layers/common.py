"""What every unit-scaled layer shares."""

import keras


def unit_normal(seed=None):
    """The unit-variance normal initialiser that unit scaling starts weights from."""
    return keras.initializers.RandomNormal(mean=0.0, stddev=1.0, seed=seed)

