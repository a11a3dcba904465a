"""The u-μP parametrization: each weight's role, and the multipliers that follow from it.

u-μP gives every trainable variable a role, and from the role and the
variable's width (and, inside a residual stack, its depth) a forward
multiplier and a learning-rate multiplier. The table of these rules, with
`WeightRole`, `ROLES`, `FAMILIES` and `READOUT_CONSTRAINTS`, lives in
`keras_unitscale.rules.mup` (re-exported here): the ops of
`keras_unitscale.functional` apply the forward multipliers (the tests check
that the two agree), `keras_unitscale.optimizers` the learning-rate
multipliers.

A variable's role, its weight multiplier and its fixed learning-rate
multiplier are kept in its one record (`keras_unitscale.weights`); this
module reads and writes them there. Our layers declare their variables'
roles when they are built (`tag`). For a model of plain Keras layers,
`tag_model` infers the roles: every `Embedding` is an input; without one,
the first layer with a kernel is the input; the last `Dense` is the output;
1-D gains are norms and other 1-D variables biases.
"""

import math
import re

import keras

from keras_unitscale import checks
from keras_unitscale import rules
from keras_unitscale import weights
from keras_unitscale.rules.mup import FAMILIES
from keras_unitscale.rules.mup import READOUT_CONSTRAINTS
from keras_unitscale.rules.mup import ROLES
from keras_unitscale.rules.mup import WeightRole

__all__ = [
    "WeightRole", "ROLES", "FAMILIES", "READOUT_CONSTRAINTS", "tag", "role_of", "is_unit_scaled",
    "weight_multiplier_of", "fixed_lr_multiplier_of", "set_depth", "tag_model", "lr_multipliers",
    "check_built", "owned_variables", "weighted_layers", "variable_owners",
]

_NORM_NAMES = re.compile(r"(gamma|scale)$")


def tag(variable, role, fan_in=None, fan_out=None, depth=None):
    """Declares `variable`'s `WeightRole` in its record (our layers call this when they build).

    Args:
        variable: a Keras variable.
        role: a `WeightRole`, or one of `ROLES` with the sizes below.
        fan_in: a size, as for `WeightRole`.
        fan_out: a size, as for `WeightRole`.
        depth: a size, as for `WeightRole`.

    Returns:
        The `WeightRole`.

    Examples:
        >>> kernel = keras.Variable(np.ones((8, 4)), name="kernel")
        >>> tag(kernel, "hidden", fan_in=8, fan_out=4).lr_multiplier("adam") == 8**-0.5
        True
    """
    weight_role = role if isinstance(role, WeightRole) else WeightRole(role, fan_in, fan_out, depth)
    weights.declare(variable, weight_role)
    return weight_role


def role_of(variable):
    """`variable`'s `WeightRole`: as `tag_model` last gave it, else as its layer declared it, else None."""
    return weights.model_role(variable) or weights.role(variable)


def is_unit_scaled(variable):
    """Whether `variable` belongs to a layer of `keras_unitscale.layers` (its role declared by the layer).

    Examples:
        >>> ours, plain = keras_unitscale.layers.Dense(4), keras.layers.Dense(4)
        >>> ours.build((None, 8)); plain.build((None, 8))
        >>> is_unit_scaled(ours.kernel), is_unit_scaled(plain.kernel)
        (True, False)
    """
    return weights.is_declared(variable)


def weight_multiplier_of(variable):
    """The weight multiplier the layer holding `variable` applies to it (1 for plain layers)."""
    return weights.multiplier(variable)


def fixed_lr_multiplier_of(variable):
    """The fixed learning-rate multiplier of `variable` (`unit_scale` sets them), or None."""
    return weights.lr_multiplier(variable)


def set_depth(variables, depth):
    """Marks `variables` as belonging to a residual stack of `depth` blocks."""
    for variable in variables:
        weight_role = weights.role(variable)
        if weight_role is not None:
            weights.declare(variable, weight_role.with_depth(depth))


def _contracted_size(layer, kernel):
    """The fan-in of an `EinsumDense` kernel: the sizes of the axes it sums over."""
    equation = getattr(layer, "equation", None)
    if not equation or "->" not in equation or "," not in equation:
        return math.prod(kernel.shape[:-1])
    inputs, output = equation.split("->")
    x_axes, kernel_axes = inputs.split(",")
    return math.prod(
        size for letter, size in zip(kernel_axes, kernel.shape)
        if letter in x_axes and letter not in output
    ) or 1


# Keras's convolutions whose kernels are not laid out as (summed axes..., outputs).
_TRANSPOSED = tuple(getattr(keras.layers, f"Conv{n}DTranspose") for n in (1, 2, 3))
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)


def _kernel_fans(layer, variable):
    shape = tuple(variable.shape)
    if isinstance(layer, _DEPTHWISE) or variable is getattr(layer, "depthwise_kernel", None):
        return rules.conv.kernel_fans("depthwise", shape)
    if isinstance(layer, _TRANSPOSED):
        return rules.conv.kernel_fans("transpose", shape, layer.strides)
    if isinstance(layer, keras.layers.EinsumDense):
        fan_in = _contracted_size(layer, variable)
    elif isinstance(layer, keras.layers.Embedding):
        return 1, shape[-1]
    else:
        # Dense (in, out), convolutions (..., in, out), recurrent kernels
        # (in, gates·units): every axis but the last is summed over.
        fan_in = math.prod(shape[:-1])
    return fan_in, max(1, math.prod(shape) // fan_in)


def _inferred_role(layer, variable, is_input, is_output):
    shape = tuple(variable.shape)
    if len(shape) <= 1:
        size = shape[0] if shape else 1
        kind = "norm" if _NORM_NAMES.search(variable.name) else "bias"
        return WeightRole(kind, fan_out=size)
    fan_in, fan_out = _kernel_fans(layer, variable)
    if isinstance(layer, keras.layers.Embedding) or is_input:
        return WeightRole("input", fan_in=fan_in, fan_out=fan_out)
    if is_output:
        return WeightRole("output", fan_in=fan_in, fan_out=fan_out)
    return WeightRole("hidden", fan_in=fan_in, fan_out=fan_out)


def owned_variables(layer):
    """A layer's own trainable variables, not its sublayers'."""
    return list(getattr(layer, "_trainable_variables", []))


def weighted_layers(model):
    """The layers of `model` (itself included, sublayers too) that own trainable variables."""
    return [
        layer for layer in model._flatten_layers(include_self=True, recursive=True)
        if owned_variables(layer)
    ]


def variable_owners(model):
    """Maps `id(variable)` to the layer that owns it, for every trainable variable of `model`."""
    return {id(v): layer for layer in weighted_layers(model) for v in owned_variables(layer)}


def _check_overrides(overrides):
    if overrides is None:
        return []
    if not isinstance(overrides, dict):
        raise ValueError(
            "`overrides` must be a dict mapping a regular expression over variable "
            f"paths to a role or a WeightRole. Received: overrides={overrides!r}"
        )
    for role in overrides.values():
        if not isinstance(role, WeightRole):
            checks.one_of("role", role, ROLES)
    return list(zip(checks.patterns("overrides", list(overrides)), overrides.values()))


def _override(overrides, variable, inferred):
    for pattern, role in overrides:
        if pattern.search(variable.path):
            if isinstance(role, WeightRole):
                return role
            shape = tuple(variable.shape) or (1,)
            fan_in = inferred.fan_in or (shape[0] if len(shape) > 1 else 1)
            fan_out = inferred.fan_out or math.prod(shape) // fan_in
            return WeightRole(role, fan_in=fan_in, fan_out=fan_out, depth=inferred.depth)
    return inferred


def check_built(model):
    """Raises a `ValueError` saying how to build `model` if its variables do not exist yet."""
    checks.built(model)


def tag_model(model, overrides=None):
    """Gives every trainable variable of `model` a `WeightRole`, and returns them by path.

    Variables our layers tagged keep their roles; the others (from plain
    Keras layers) are inferred as the module docstring says. `overrides`
    maps regular expressions over variable paths to roles ("input", ...)
    or `WeightRole`s, and wins over both.

    Args:
        model: a built Keras model.
        overrides: optional dict {pattern: role}.

    Returns:
        dict {variable path: WeightRole}, in the model's variable order.

    Examples:
        >>> model = keras.Sequential([keras.Input((30,)), keras.layers.Dense(128, activation="relu", name="a"),
        ...                           keras.layers.Dense(64, activation="relu", name="b"),
        ...                           keras.layers.Dense(1, activation="sigmoid", name="c")], name="mlp")
        >>> [(path, role.role) for path, role in tag_model(model).items()]
        [('mlp/a/kernel', 'input'), ('mlp/a/bias', 'bias'), ('mlp/b/kernel', 'hidden'), ('mlp/b/bias', 'bias'), ('mlp/c/kernel', 'output'), ('mlp/c/bias', 'bias')]
    """
    overrides = _check_overrides(overrides)
    check_built(model)
    layers = weighted_layers(model)
    declared = {id(v): weights.role(v) for layer in layers for v in owned_variables(layer)}
    declared_roles = {role.role for role in declared.values() if role is not None}
    kernel_layers = [layer for layer in layers if any(len(v.shape) >= 2 for v in owned_variables(layer))]
    # A plain layer is the input if it comes first and the model has no
    # embedding (ours or Keras's) and declares no input; likewise the output.
    has_input = "input" in declared_roles or any(isinstance(layer, keras.layers.Embedding) for layer in layers)
    first = kernel_layers[0] if kernel_layers and not has_input else None
    last = kernel_layers[-1] if kernel_layers and "output" not in declared_roles else None
    if not isinstance(last, (keras.layers.Dense, keras.layers.EinsumDense)):
        last = None
    for layer in layers:
        for variable in owned_variables(layer):
            role = declared[id(variable)] or _inferred_role(
                layer, variable, is_input=layer is first and layer is not last, is_output=layer is last
            )
            weights.set_model_role(variable, _override(overrides, variable, role))
    return {v.path: role_of(v) for v in model.trainable_variables}


def lr_multipliers(model, family="adam", readout_constraint=None, overrides=None):
    """The u-μP learning-rate multiplier of every trainable variable of `model`, by path.

    Examples:
        >>> model = keras.Sequential([keras.Input((30,)), keras.layers.Dense(128, name="a"),
        ...                           keras.layers.Dense(64, name="b"), keras.layers.Dense(1, name="c")], name="mlp")
        >>> {path: round(m, 4) for path, m in lr_multipliers(model).items()}
        {'mlp/a/kernel': 0.0884, 'mlp/a/bias': 1.0, 'mlp/b/kernel': 0.0884, 'mlp/b/bias': 1.0, 'mlp/c/kernel': 1.0, 'mlp/c/bias': 1.0}
    """
    roles = tag_model(model, overrides)
    return {path: role.lr_multiplier(family, readout_constraint) for path, role in roles.items()}
