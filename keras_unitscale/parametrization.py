"""The u-μP parametrization: each weight's role, and the multipliers that follow from it.

u-μP gives every trainable variable a role, and from the role and the
variable's width (and, inside a residual stack, its depth) a forward
multiplier and a learning-rate multiplier:

| role   | init    | forward multiplier | Adam LR        | SGD LR (constrained readout) |
|--------|---------|--------------------|----------------|------------------------------|
| input  | N(0, 1) | fan_in^-1/2 *      | fan_out^-1/2   | fan_out^1/2                  |
| hidden | N(0, 1) | fan_in^-1/2        | fan_in^-1/2    | fan_in^1/2                   |
| output | N(0, 1) | fan_in^-1          | 1              | 1                            |
| bias   | 0       | 1                  | 1              | size                         |
| norm   | 1       | 1                  | 1              | size                         |

Variables inside a stack of `depth` residual blocks take a further learning
rate × `depth^-1/2`. (*) An embedding looks one row up, so its fan-in is 1
and its forward multiplier 1, as u-μP has it for the input weight; an input
`Dense` sums over its input features. `_TABLE` below is the one place these
rules live: the forward multipliers are applied by the ops of
`keras_unitscale.functional` (the tests check that the two agree), the
learning-rate multipliers by `keras_unitscale.optimizers`.

The SGD column is the reference implementation's rule for a readout whose
backward scale is constrained to its forward one
(`readout_constraint="to_output_scale"`), which leaves the gradients below
unit scale. With an unconstrained readout (the default of
`layers.Dense(role="output")`) gradients are unit-scaled, an SGD step is as
large as an Adam step, and SGD takes the Adam column, as the reference does.

Our layers tag their variables when they are built (`tag`). For a model of
plain Keras layers, `tag_model` infers the roles: every `Embedding` is an
input; without one, the first layer with a kernel is the input; the last
`Dense` is the output; 1-D gains are norms and other 1-D variables biases.
"""

import dataclasses
import math
import re
import weakref

import keras

from keras_unitscale import checks

ROLES = ("input", "hidden", "output", "bias", "norm")
FAMILIES = ("adam", "sgd")
READOUT_CONSTRAINTS = (None, "to_output_scale")

# role: (forward multiplier, Adam learning rate, constrained-readout SGD
# learning rate), each as (the size it depends on, its exponent).
FORWARD, ADAM_LR, CONSTRAINED_SGD_LR = range(3)
_TABLE = {
    "input": (("fan_in", -0.5), ("fan_out", -0.5), ("fan_out", 0.5)),
    "hidden": (("fan_in", -0.5), ("fan_in", -0.5), ("fan_in", 0.5)),
    "output": (("fan_in", -1.0), ("fan_in", 0.0), ("fan_in", 0.0)),
    "bias": ((None, 0.0), (None, 0.0), ("fan_out", 1.0)),
    "norm": ((None, 0.0), (None, 0.0), ("fan_out", 1.0)),
}

# The role a layer of ours declares for its variable, and the role
# `tag_model` gives it within a model (recomputed on every call).
_DECLARED = "_keras_unitscale_role"
_IN_MODEL = "_keras_unitscale_model_role"
_OWNER = "_keras_unitscale_owner"
_NORM_NAMES = re.compile(r"(gamma|scale)$")


@dataclasses.dataclass(frozen=True)
class WeightRole:
    """A variable's u-μP role and the sizes its rules depend on.

    Args:
        role: one of "input", "hidden", "output", "bias", "norm".
        fan_in: the number of inputs each output sums over (1 for an
            embedding, which looks one row up).
        fan_out: the number of outputs (the size of a bias or gain).
        depth: the number of residual blocks in the stack the variable
            belongs to, or None outside one.

    Example:

    >>> role = WeightRole("hidden", fan_in=256, fan_out=64)
    >>> role.forward_multiplier(), role.lr_multiplier("adam")
    (0.0625, 0.0625)
    >>> WeightRole("hidden", fan_in=256, fan_out=64, depth=4).lr_multiplier("adam")
    0.03125
    """

    role: str
    fan_in: int | None = None
    fan_out: int | None = None
    depth: int | None = None

    def __post_init__(self):
        checks.one_of("role", self.role, ROLES)
        for name in ("fan_in", "fan_out", "depth"):
            value = getattr(self, name)
            if value is not None:
                checks.positive_int(name, value)
        needed = {size for size, _ in _TABLE[self.role] if size is not None}
        missing = sorted(name for name in needed if getattr(self, name) is None)
        if missing:
            raise ValueError(
                f"A variable with role '{self.role}' needs {missing}. Received: {self!r}"
            )

    def _rule(self, column):
        size, exponent = _TABLE[self.role][column]
        return 1.0 if size is None else float(getattr(self, size) ** exponent)

    def forward_multiplier(self):
        """The factor u-μP applies to this weight in the forward pass."""
        return self._rule(FORWARD)

    def lr_multiplier(self, family="adam", readout_constraint=None):
        """The factor on the base learning rate for this variable.

        Args:
            family: "adam" (Adam, AdamW and other scale-invariant updates) or
                "sgd".
            readout_constraint: the readout's constraint, None or
                "to_output_scale"; only SGD depends on it.
        """
        checks.one_of("family", family, FAMILIES)
        checks.one_of("readout_constraint", readout_constraint, READOUT_CONSTRAINTS)
        constrained_sgd = family == "sgd" and readout_constraint is not None
        depth_factor = 1.0 if self.depth is None else self.depth**-0.5
        return self._rule(CONSTRAINED_SGD_LR if constrained_sgd else ADAM_LR) * depth_factor

    def with_depth(self, depth):
        return dataclasses.replace(self, depth=depth)


def tag(variable, role, fan_in=None, fan_out=None, depth=None, owner=None):
    """Declares `variable`'s `WeightRole` (our layers call this when they build).

    `owner`, the layer holding the variable, is where its forward multiplier
    is read from (see `weight_multiplier_of`).
    """
    weight_role = role if isinstance(role, WeightRole) else WeightRole(role, fan_in, fan_out, depth)
    setattr(variable, _DECLARED, weight_role)
    if owner is not None:
        setattr(variable, _OWNER, weakref.ref(owner))
    return weight_role


def role_of(variable):
    """`variable`'s `WeightRole`: as `tag_model` last gave it, else as its layer declared it, else None."""
    return getattr(variable, _IN_MODEL, None) or getattr(variable, _DECLARED, None)


def is_unit_scaled(variable):
    """Whether `variable` belongs to a layer of `keras_unitscale.layers` (its role declared by the layer).

    Example:

    >>> ours, plain = keras_unitscale.layers.Dense(4), keras.layers.Dense(4)
    >>> ours.build((None, 8)); plain.build((None, 8))
    >>> is_unit_scaled(ours.kernel), is_unit_scaled(plain.kernel)
    (True, False)
    """
    return getattr(variable, _DECLARED, None) is not None


def weight_multiplier_of(variable):
    """The fixed forward multiplier the layer holding `variable` applies to it (1 for plain layers)."""
    owner = getattr(variable, _OWNER, lambda: None)()
    return owner.weight_multiplier(variable.name) if owner is not None else 1.0


def fixed_lr_multiplier_of(variable):
    """The learning-rate factor the layer holding `variable` fixes for it (`unit_scale` sets them), or None."""
    owner = getattr(variable, _OWNER, lambda: None)()
    return owner.lr_multiplier(variable.name) if owner is not None else None


def set_depth(variables, depth):
    """Marks `variables` as belonging to a residual stack of `depth` blocks."""
    for variable in variables:
        role = getattr(variable, _DECLARED, None)
        if role is not None:
            setattr(variable, _DECLARED, role.with_depth(depth))


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


def _kernel_fans(layer, variable):
    shape = tuple(variable.shape)
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
    if not model.built:
        raise ValueError(
            f"The model '{model.name}' is not built, so its variables do not exist yet. "
            "Build it first: start it with `keras.Input(shape)`, call `model.build(input_shape)`, "
            "or call it on a batch of data."
        )


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

    Example:

    >>> model = keras.Sequential([keras.Input((30,)), keras.layers.Dense(128, activation="relu", name="a"),
    ...                           keras.layers.Dense(64, activation="relu", name="b"),
    ...                           keras.layers.Dense(1, activation="sigmoid", name="c")], name="mlp")
    >>> [(path, role.role) for path, role in tag_model(model).items()]
    [('mlp/a/kernel', 'input'), ('mlp/a/bias', 'bias'), ('mlp/b/kernel', 'hidden'), ('mlp/b/bias', 'bias'), ('mlp/c/kernel', 'output'), ('mlp/c/bias', 'bias')]
    """
    overrides = _check_overrides(overrides)
    check_built(model)
    layers = weighted_layers(model)
    declared = {id(v): getattr(v, _DECLARED, None) for layer in layers for v in owned_variables(layer)}
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
            setattr(variable, _IN_MODEL, _override(overrides, variable, role))
    return {v.path: role_of(v) for v in model.trainable_variables}


def lr_multipliers(model, family="adam", readout_constraint=None, overrides=None):
    """The u-μP learning-rate multiplier of every trainable variable of `model`, by path.

    Example:

    >>> model = keras.Sequential([keras.Input((30,)), keras.layers.Dense(128, name="a"),
    ...                           keras.layers.Dense(64, name="b"), keras.layers.Dense(1, name="c")], name="mlp")
    >>> {path: round(m, 4) for path, m in lr_multipliers(model).items()}
    {'mlp/a/kernel': 0.0884, 'mlp/a/bias': 1.0, 'mlp/b/kernel': 0.0884, 'mlp/b/bias': 1.0, 'mlp/c/kernel': 1.0, 'mlp/c/bias': 1.0}
    """
    roles = tag_model(model, overrides)
    return {path: role.lr_multiplier(family, readout_constraint) for path, role in roles.items()}
