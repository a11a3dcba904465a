"""One record per weight: its role, its weight multiplier and its fixed learning-rate multiplier.

Every fact the package keeps about a trainable variable lives in one
`WeightRecord`, stored as one attribute on the Keras variable itself:

- `role`: the `WeightRole` the variable's layer declared when it built
  (`keras_unitscale.layers` do; plain Keras layers declare none);
- `model_role`: the role `parametrization.tag_model` gave it within a
  model (inferred, or an override), which wins over `role`;
- `multiplier`: the weight multiplier, the fixed factor its layer applies to
  the stored weight in the forward pass (1 unless `UnitScaleCallback` or
  `unit_scale` moved the weight's scale there);
- `lr_multiplier`: a fixed learning-rate multiplier (`unit_scale` sets one
  where it moves a weight to unit scale), or None: then the optimizer takes
  u-μP's learning-rate multiplier from the role.

Layers write the record (`declare`, `set_multiplier`, `set_lr_multiplier`),
and the optimizers, `UnitScaleCallback`, conversion and the parametrization
read it through the functions below; no one reads it through the layer.
The record is saved twice, both read back into it: in the layer's config
(`weight_multipliers=`, `lr_multipliers=`, written into the records when the
layer builds) and with the weights themselves (`saved_state`,
`restore_state`), so that a weights-only checkpoint restores it too.

Examples:
    >>> kernel = keras.Variable(np.ones((4, 2)), name="kernel")
    >>> declare(kernel, WeightRole("hidden", fan_in=4, fan_out=2))
    >>> set_multiplier(kernel, 0.5)
    >>> current = record(kernel)
    >>> current.role.role, current.model_role, current.multiplier, current.lr_multiplier
    ('hidden', None, 0.5, None)
"""

import dataclasses
import math

import numpy as np

from keras_unitscale import checks
from keras_unitscale.rules.mup import WeightRole

__all__ = [
    "WeightRecord", "record", "declare", "is_declared", "role", "model_role", "set_model_role",
    "multiplier", "set_multiplier", "lr_multiplier", "set_lr_multiplier", "check_multipliers",
    "SAVED_KEYS", "saved_state", "restore_state", "copy_record",
]

# The one attribute the record is stored in, on the Keras variable.
_RECORD = "_keras_unitscale_weight"


@dataclasses.dataclass(frozen=True)
class WeightRecord:
    """What the package knows about one weight (see the module docstring).

    Args:
        role: the `WeightRole` its layer declared, or None.
        model_role: the `WeightRole` `parametrization.tag_model` gave it, or None.
        multiplier: the weight multiplier, a finite float > 0.
        lr_multiplier: the fixed learning-rate multiplier, a finite float
            > 0, or None.
    """

    role: WeightRole | None = None
    model_role: WeightRole | None = None
    multiplier: float = 1.0
    lr_multiplier: float | None = None


def record(variable):
    """`variable`'s `WeightRecord`, or None if nothing was ever written for it."""
    return getattr(variable, _RECORD, None)


def _update(variable, **changes):
    current = record(variable) or WeightRecord()
    # Keras variables take attributes; `object.__setattr__` keeps the record
    # out of any tracking a backend's variable class does on assignment.
    object.__setattr__(variable, _RECORD, dataclasses.replace(current, **changes))


def _check_role(name, value):
    if value is not None and not isinstance(value, WeightRole):
        raise ValueError(f"`{name}` must be a WeightRole or None. Received: {name}={value!r}")
    return value


def declare(variable, weight_role):
    """Declares `variable`'s role (a `WeightRole`), keeping its multipliers; layers call this as they build.

    Examples:
        >>> bias = keras.Variable(np.zeros(3), name="bias")
        >>> declare(bias, WeightRole("bias", fan_out=3))
        >>> is_declared(bias), role(bias).role, multiplier(bias)
        (True, 'bias', 1.0)
    """
    _update(variable, role=_check_role("weight_role", weight_role))


def copy_record(source, target):
    """Gives `target` the record of `source` (a layer converted in place takes its twin's)."""
    object.__setattr__(target, _RECORD, record(source))


def is_declared(variable):
    """Whether a layer declared `variable`'s role: true for the weights of `keras_unitscale.layers`."""
    current = record(variable)
    return current is not None and current.role is not None


def role(variable):
    """The `WeightRole` `variable`'s layer declared, or None."""
    current = record(variable)
    return None if current is None else current.role


def model_role(variable):
    """The `WeightRole` `parametrization.tag_model` last gave `variable`, or None."""
    current = record(variable)
    return None if current is None else current.model_role


def set_model_role(variable, weight_role):
    """Sets the role `variable` has within a model (`parametrization.tag_model` calls this)."""
    _update(variable, model_role=_check_role("weight_role", weight_role))


def multiplier(variable):
    """`variable`'s weight multiplier: 1 unless one was set."""
    current = record(variable)
    return 1.0 if current is None else current.multiplier


def set_multiplier(variable, value):
    """Sets `variable`'s weight multiplier, a finite number > 0.

    Only a layer that applies it (`keras_unitscale.layers`, through
    `layer.multiplied`) computes with it; functions traced before keep the
    old value.

    Examples:
        >>> kernel = keras.Variable(np.ones((4, 2)), name="kernel")
        >>> set_multiplier(kernel, 2)
        >>> multiplier(kernel)
        2.0
        >>> set_multiplier(kernel, -1.0)
        Traceback (most recent call last):
        ...
        ValueError: `multiplier` must be a finite number > 0. Received: multiplier=-1.0
    """
    _update(variable, multiplier=float(checks.positive("multiplier", value)))


def lr_multiplier(variable):
    """`variable`'s fixed learning-rate multiplier, or None."""
    current = record(variable)
    return None if current is None else current.lr_multiplier


def set_lr_multiplier(variable, value):
    """Fixes `variable`'s learning-rate multiplier (a finite number > 0); None removes it.

    `keras_unitscale.optimizers` start the variable at this learning-rate
    multiplier instead of u-μP's (and do not divide it by the weight
    multiplier); an optimizer's own `lr_multipliers` patterns still win.

    Examples:
        >>> kernel = keras.Variable(np.ones((4, 2)), name="kernel")
        >>> set_lr_multiplier(kernel, 0.25)
        >>> lr_multiplier(kernel)
        0.25
        >>> set_lr_multiplier(kernel, None); lr_multiplier(kernel) is None
        True
    """
    if value is not None:
        value = float(checks.positive("lr_multiplier", value))
    _update(variable, lr_multiplier=value)


def check_multipliers(argument, values, keys="variable names"):
    """`values`, a dict {str: finite number > 0}, with float values; None gives {}.

    The check of every `weight_multipliers=` and `lr_multipliers=` argument
    (of the layers and the optimizers). A `ValueError` names the argument
    and the value received.

    Args:
        argument: the argument's name, for the message.
        values: the dict, or None.
        keys: what the keys are, for the message.

    Examples:
        >>> check_multipliers("weight_multipliers", {"kernel": 2})
        {'kernel': 2.0}
        >>> check_multipliers("weight_multipliers", {"kernel": 0})
        Traceback (most recent call last):
        ...
        ValueError: `weight_multipliers['kernel']` must be a finite number > 0. Received: weight_multipliers['kernel']=0, in weight_multipliers={'kernel': 0}
    """
    if values is None:
        return {}
    if not isinstance(values, dict) or not all(isinstance(key, str) for key in values):
        raise ValueError(
            f"`{argument}` must be a dict mapping {keys} to finite numbers > 0. "
            f"Received: {argument}={values!r}"
        )
    try:
        return {key: float(checks.positive(f"{argument}[{key!r}]", value)) for key, value in values.items()}
    except ValueError as error:
        raise ValueError(f"{error}, in {argument}={values!r}") from None


# The keys, beside Keras's "0", "1", ..., under which a layer saves its
# weights' multipliers with the weights themselves.
SAVED_KEYS = ("weight_multipliers", "lr_multipliers")


def saved_state(variables):
    """The multipliers of `variables`, as arrays to save beside their values (see `restore_state`).

    A weight file (`save_weights`, `ModelCheckpoint(save_weights_only=True)`,
    `BackupAndRestore`) then restores a model that trains as the saved one
    did, not only one that holds the same values. A fixed learning-rate
    multiplier that is not set is saved as NaN.

    Examples:
        >>> kernel = keras.Variable(np.ones((4, 2)), name="kernel")
        >>> set_multiplier(kernel, 0.5)
        >>> {key: value.tolist() for key, value in saved_state([kernel]).items()}
        {'weight_multipliers': [0.5], 'lr_multipliers': [nan]}
    """
    lr_multipliers = [lr_multiplier(v) for v in variables]
    return {
        "weight_multipliers": np.array([multiplier(v) for v in variables], "float64"),
        "lr_multipliers": np.array([math.nan if m is None else m for m in lr_multipliers], "float64"),
    }


def restore_state(variables, saved):
    """Writes multipliers saved by `saved_state` back into the records of `variables` (the same order).

    Examples:
        >>> kernel = keras.Variable(np.ones((4, 2)), name="kernel")
        >>> restore_state([kernel], {"weight_multipliers": np.array([2.0]), "lr_multipliers": np.array([0.5])})
        >>> multiplier(kernel), lr_multiplier(kernel)
        (2.0, 0.5)
    """
    multipliers = np.asarray(saved["weight_multipliers"], "float64").reshape(-1)
    lr_multipliers = np.asarray(saved["lr_multipliers"], "float64").reshape(-1)
    if not len(multipliers) == len(lr_multipliers) == len(variables):
        raise ValueError(
            f"The saved multipliers are for {len(multipliers)} weights, but there are {len(variables)}: "
            f"{[v.path for v in variables]}. The file was saved from a different layer."
        )
    for variable, value, lr_value in zip(variables, multipliers, lr_multipliers):
        set_multiplier(variable, float(value))
        set_lr_multiplier(variable, None if math.isnan(lr_value) else float(lr_value))
