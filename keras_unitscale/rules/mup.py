"""u-μP's role table: each weight's forward multiplier and learning-rate multipliers, from its role and sizes.

| role   | init    | forward multiplier | Adam LR        | SGD LR (constrained readout) |
|--------|---------|--------------------|----------------|------------------------------|
| input  | N(0, 1) | fan_in^-1/2 *      | fan_out^-1/2   | fan_out^1/2                  |
| hidden | N(0, 1) | fan_in^-1/2        | fan_in^-1/2    | fan_in^1/2                   |
| output | N(0, 1) | fan_in^-1          | 1              | 1                            |
| bias   | 0       | 1                  | 1              | size                         |
| norm   | 1       | 1                  | 1              | size                         |

The forward column is the dense rule's forward scale (`rules.linear`, the
readout's for "output"): the ops apply it, and this table reads it from
there. Variables inside a stack of `depth` residual blocks take a further
learning rate × `depth^-1/2`. (*) An embedding looks one row up, so its
fan-in is 1 and its forward multiplier 1.

The SGD column is the reference implementation's rule for a readout whose
backward scale is constrained to its forward one
(`readout_constraint="to_output_scale"`), which leaves the gradients below
unit scale. With an unconstrained readout (the default of
`layers.Dense(role="output")`) gradients are unit-scaled, an SGD step is as
large as an Adam step, and SGD takes the Adam column, as the reference does.
"""

import dataclasses

from keras_unitscale import checks
from keras_unitscale.rules import linear

__all__ = ["ROLES", "FAMILIES", "READOUT_CONSTRAINTS", "WeightRole"]

ROLES = ("input", "hidden", "output", "bias", "norm")
FAMILIES = ("adam", "sgd")
READOUT_CONSTRAINTS = (None, "to_output_scale")

# role: (the dense rule's powers for its forward multiplier, or None for 1;
# Adam learning rate, constrained-readout SGD learning rate, each as (the
# size it depends on, its exponent)).
_TABLE = {
    "input": (linear.DENSE_POWERS, ("fan_out", -0.5), ("fan_out", 0.5)),
    "hidden": (linear.DENSE_POWERS, ("fan_in", -0.5), ("fan_in", 0.5)),
    "output": (linear.READOUT_POWERS, (None, 0.0), (None, 0.0)),
    "bias": (None, (None, 0.0), ("fan_out", 1.0)),
    "norm": (None, (None, 0.0), ("fan_out", 1.0)),
}


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

    Examples:
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
        powers, adam, sgd = _TABLE[self.role]
        needed = {size for size, _ in (adam, sgd) if size is not None} | ({"fan_in"} if powers else set())
        missing = sorted(name for name in needed if getattr(self, name) is None)
        if missing:
            raise ValueError(
                f"A variable with role '{self.role}' needs {missing}. Received: {self!r}"
            )

    def _size_rule(self, rule):
        size, exponent = rule
        return 1.0 if size is None else float(getattr(self, size) ** exponent)

    def forward_multiplier(self):
        """The factor u-μP applies to this weight in the forward pass: the dense rule's forward scale."""
        powers = _TABLE[self.role][0]
        return 1.0 if powers is None else float(linear.forward_scale(self.fan_in, powers))

    def lr_multiplier(self, family="adam", readout_constraint=None):
        """u-μP's factor on the base learning rate for this variable.

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
        return self._size_rule(_TABLE[self.role][2 if constrained_sgd else 1]) * depth_factor

    def with_depth(self, depth):
        return dataclasses.replace(self, depth=depth)
