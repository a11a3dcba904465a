"""What every unit-scaled layer shares: argument checks and the unit initialiser."""

import keras


def unit_normal(seed=None):
    """The unit-variance normal initialiser that unit scaling starts weights from."""
    return keras.initializers.RandomNormal(mean=0.0, stddev=1.0, seed=seed)


def check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return value


def check_role(role, roles):
    if role not in roles:
        raise ValueError(f"Unknown `role`. Expected one of {list(roles)}. Received: role={role!r}")
    return role


def check_rate(name, rate):
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 <= rate < 1:
        raise ValueError(f"`{name}` must be in [0, 1). Received: {name}={rate!r}")
    return float(rate)
