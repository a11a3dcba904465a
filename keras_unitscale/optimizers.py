"""u-μP optimizers: Keras's `Adam`, `AdamW` and `SGD` with a learning rate per variable.

Each optimizer keeps, beside its usual state, one scalar per trained variable:
the factor on the base learning rate for that variable. By default it is the
u-μP factor of `keras_unitscale.parametrization` for the variable's role,
width and depth (`lr_multipliers` overrides it by variable path), divided by
the forward multiplier `m` the variable's layer applies to it, so that the
effective weight `m·w` moves as an unmultiplied weight would. The factors
are optimizer variables, so they are saved and restored with the optimizer's
state (`model.save`, `BackupAndRestore`), and they are read at run time, so
changing one (`set_lr_multiplier`, as `UnitScaleCallback` does) needs no
retrace.

Roles come from our layers, which declare them. Variables of plain Keras
layers have none until `parametrization.tag_model(model)` infers them
(`UnitScaleCallback` does this itself); until then they take factor 1, as in
the Keras optimizer.

Weight decay is decoupled and, by default, *independent* (as u-μP has it):
each step multiplies a variable by `1 - weight_decay · η_t/η_peak`, where
`η_t/η_peak` follows the learning-rate schedule but neither the base learning
rate nor the variable's factor, so sweeping the learning rate leaves the decay
alone. With `independent_weight_decay=False` the decay is Keras's,
`weight_decay · η_t`, times the variable's factor.

Adam and AdamW also keep a factor on `epsilon` per variable (1 by default).
Adam's update sees the gradient's absolute scale only through `epsilon`;
a model whose gradients are in other units than another's (a unit-scaled
twin from `unit_scale`) follows the other's trajectory exactly when each
variable's `epsilon` is scaled by the ratio of the gradients:
`convert.match_epsilon` measures and sets it.

Models of our layers need no loss scaling in FP16: their gradients are near
unit scale. Keras wraps the optimizer of a `mixed_float16` model in a
`LossScaleOptimizer` unless `compile(..., auto_scale_loss=False)`; ours warn
when that happens to them over unit-scaled layers.

They are subclasses of the Keras optimizers, so they work wherever those do:
`compile`, `LossScaleOptimizer`, `jit_compile`, learning-rate schedules and
callbacks, TensorFlow, JAX and PyTorch (on PyTorch Keras swaps its own exact
`Adam`/`SGD` for fused versions; it leaves subclasses alone).
"""

import math
import warnings

import keras
from keras import ops

from keras_unitscale import checks
from keras_unitscale import parametrization as P

__all__ = ["Adam", "AdamW", "SGD", "ScaledSchedule", "unwrap"]

PARAMETRIZATIONS = ("u-mup", None)


def unwrap(optimizer):
    """The optimizer that updates the variables: `optimizer`, or the one a `LossScaleOptimizer` wraps."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def _check_lr_multipliers(lr_multipliers):
    if lr_multipliers is None:
        return {}
    if not isinstance(lr_multipliers, dict):
        raise ValueError(
            "`lr_multipliers` must be a dict mapping a regular expression over variable "
            f"paths to a factor > 0. Received: lr_multipliers={lr_multipliers!r}"
        )
    for pattern, value in lr_multipliers.items():
        checks.positive(f"lr_multipliers[{pattern!r}]", value)
    return {pattern: float(value) for pattern, value in lr_multipliers.items()}


def _schedule_peak(schedule):
    for name in ("warmup_target", "initial_learning_rate"):
        value = getattr(schedule, name, None)
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
    return None


class UnitScaledOptimizer:
    """What the u-μP optimizers add to a Keras optimizer (a mixin placed before it)."""

    family = "adam"

    def _init_unit_scaling(
        self, parametrization, lr_multipliers, independent_weight_decay, peak_learning_rate,
        readout_constraint=None,
    ):
        self.parametrization = checks.one_of("parametrization", parametrization, PARAMETRIZATIONS)
        self.lr_multipliers = _check_lr_multipliers(lr_multipliers)
        self._lr_patterns = list(zip(checks.patterns("lr_multipliers keys", list(self.lr_multipliers)),
                                     self.lr_multipliers.values()))
        self.independent_weight_decay = bool(independent_weight_decay)
        if self.weight_decay is not None:
            checks.non_negative("weight_decay", self.weight_decay)
        self.readout_constraint = checks.one_of(
            "readout_constraint", readout_constraint, P.READOUT_CONSTRAINTS
        )
        if peak_learning_rate is None:
            learning_rate = self._learning_rate
            if isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
                peak_learning_rate = _schedule_peak(learning_rate)
            elif not callable(learning_rate):
                peak_learning_rate = float(ops.convert_to_numpy(learning_rate))
        elif not (isinstance(peak_learning_rate, (int, float)) and 0 < peak_learning_rate < math.inf):
            raise ValueError(
                "`peak_learning_rate` must be a finite number > 0. "
                f"Received: peak_learning_rate={peak_learning_rate!r}"
            )
        if self.weight_decay and self.independent_weight_decay and not peak_learning_rate:
            raise ValueError(
                "Independent weight decay is relative to the peak learning rate, which "
                "this schedule does not say: pass `peak_learning_rate=...`. "
                f"Received: learning_rate={self._learning_rate!r}, peak_learning_rate=None"
            )
        self.peak_learning_rate = None if peak_learning_rate is None else float(peak_learning_rate)

    # The learning-rate factors.

    def default_lr_multiplier(self, variable):
        """The factor `variable` starts with.

        An `lr_multipliers` match, else the factor its layer fixes for it (a
        model from `unit_scale`), else its u-μP factor, else 1; all but the
        fixed factor divided by the forward multiplier `m` its layer applies
        to it, so that the effective weight `m·w` moves as an unmultiplied
        weight would.
        """
        factor = None
        for pattern, value in self._lr_patterns:
            if pattern.search(variable.path):
                factor = value
                break
        if factor is None and P.fixed_lr_multiplier_of(variable) is not None:
            return P.fixed_lr_multiplier_of(variable)
        role = P.role_of(variable)
        if factor is None:
            factor = 1.0 if self.parametrization is None or role is None else role.lr_multiplier(
                self.family, self.readout_constraint
            )
        return factor / P.weight_multiplier_of(variable)

    def load_own_variables(self, store):
        # Keras skips a mismatched optimizer state with a warning; resuming
        # without it would silently restart Adam's moments and our factors.
        if self.built and len(store.keys()) != len(self.variables):
            raise ValueError(
                f"The saved state of optimizer '{self.name}' does not match it: it has "
                f"{len(self.variables)} variables and the file holds {len(store.keys())}. The file is "
                "corrupted, or was saved from a different model or optimizer."
            )
        super().load_own_variables(store)

    def __setattr__(self, name, value):
        # A `LossScaleOptimizer` sets its inner optimizer's `loss_scale_factor`
        # to None as it wraps it: the one sign of being wrapped we get.
        if name == "loss_scale_factor" and value is None and hasattr(self, "parametrization"):
            super().__setattr__("_wrapped_for_loss_scaling", True)
        super().__setattr__(name, value)

    def build(self, variables):
        if self.built:
            return
        if getattr(self, "_wrapped_for_loss_scaling", False) and any(P.is_unit_scaled(v) for v in variables):
            warnings.warn(
                f"A LossScaleOptimizer wraps '{self.name}', but the model's layers are unit-scaled: their "
                "gradients are near 1 and fit FP16 as they are. Loss scaling only adds its bookkeeping and "
                "skips the steps it overflows; compile with `auto_scale_loss=False` to train without it.",
                stacklevel=2,
            )
        super().build(variables)
        self._lr_factors = [
            self.add_variable(
                shape=(),
                initializer=keras.initializers.Constant(self.default_lr_multiplier(variable)),
                dtype="float32",
                aggregation="only_first_replica",
                name=variable.path.replace("/", "_") + "_lr_multiplier",
            )
            for variable in variables
        ]

        if self.family == "adam":
            self._epsilon_factors = [
                self.add_variable(
                    shape=(), initializer="ones", dtype="float32", aggregation="only_first_replica",
                    name=variable.path.replace("/", "_") + "_epsilon_multiplier",
                )
                for variable in variables
            ]

    def _factor(self, attribute, variable, what):
        if not self.built:
            raise ValueError(
                f"The optimizer '{self.name}' is not built yet, so it has no {what} "
                "factors. It builds at the start of `fit`, or call "
                "`optimizer.build(model.trainable_variables)`."
            )
        try:
            return getattr(self, attribute)[self._get_variable_index(variable)]
        except KeyError:
            raise ValueError(
                f"The optimizer '{self.name}' does not train this variable. "
                f"Received: variable.path={variable.path!r}"
            ) from None

    def _lr_factor(self, variable):
        return self._factor("_lr_factors", variable, "learning-rate")

    def _epsilon_factor(self, variable):
        if self.family != "adam":
            raise ValueError(f"The optimizer '{self.name}' has no `epsilon`; Adam and AdamW have.")
        return self._factor("_epsilon_factors", variable, "epsilon")

    def epsilon_multiplier(self, variable):
        """The factor on `epsilon` for `variable` (a Python float; Adam and AdamW)."""
        return float(ops.convert_to_numpy(self._epsilon_factor(variable)))

    def set_epsilon_multiplier(self, variable, value):
        """Sets the factor on `epsilon` for `variable`; set it before training (the moments keep its units)."""
        checks.positive("value", value)
        self._epsilon_factor(variable).assign(float(value))

    def lr_multiplier(self, variable):
        """The factor on the base learning rate for `variable` (a Python float)."""
        return float(ops.convert_to_numpy(self._lr_factor(variable)))

    def set_lr_multiplier(self, variable, value):
        """Sets the factor on the base learning rate for `variable`."""
        checks.positive("value", value)
        self._lr_factor(variable).assign(float(value))

    def reset_lr_multipliers(self):
        """Sets every factor back to its default, e.g. after `parametrization.tag_model` gave roles."""
        for variable in self._trainable_variables:
            self.set_lr_multiplier(variable, self.default_lr_multiplier(variable))

    # The update.

    def _apply_weight_decay(self, variables):
        # Decay is applied per variable in `update_step`, where its learning
        # rate is known (and, under tf.distribute, on each replica's copy).
        return

    def update_step(self, gradient, variable, learning_rate):
        factor = ops.cast(self._lr_factor(variable), "float32")
        learning_rate = ops.cast(learning_rate, "float32")
        if self.weight_decay and self._use_weight_decay(variable):
            if self.independent_weight_decay:
                decay = self.weight_decay * learning_rate / self.peak_learning_rate
            else:
                decay = self.weight_decay * learning_rate * factor
            variable.assign(variable - variable * ops.cast(decay, variable.dtype))
        if self.family != "adam":
            super().update_step(gradient, variable, learning_rate * factor)
            return
        # Keras's update reads `self.epsilon` as it is traced, once per
        # variable. (Scaling the gradient instead would be the same maths, but
        # turns an embedding's sparse gradient dense, and Keras's Adam treats
        # those differently.)
        epsilon = self.epsilon
        self.epsilon = epsilon * ops.cast(self._epsilon_factor(variable), "float32")
        try:
            super().update_step(gradient, variable, learning_rate * factor)
        finally:
            self.epsilon = epsilon

    def get_config(self):
        return {
            **super().get_config(),
            "parametrization": self.parametrization,
            "lr_multipliers": dict(self.lr_multipliers),
            "independent_weight_decay": self.independent_weight_decay,
            "peak_learning_rate": self.peak_learning_rate,
        }


_ARGS = """
    Args:
        learning_rate: the base learning rate: a float or a
            `keras.optimizers.schedules.LearningRateSchedule`.
        parametrization: "u-mup" (each variable's factor from its role, see
            `keras_unitscale.parametrization`) or None (factor 1, as Keras).
        lr_multipliers: {regular expression over variable paths: factor},
            overriding the u-μP factor of the variables it matches (the
            first matching pattern wins).
        weight_decay: decoupled weight decay, None or a float.
        independent_weight_decay: decay independent of the learning rate's
            value (see the module docstring).
        peak_learning_rate: the learning rate the independent decay is
            relative to: by default the float `learning_rate`, or the
            schedule's `warmup_target` or `initial_learning_rate`.
        **kwargs: the Keras optimizer's own arguments ({keras_args}).
"""


@keras.saving.register_keras_serializable(package="keras_unitscale")
class Adam(UnitScaledOptimizer, keras.optimizers.Adam):
    __doc__ = (
        """Adam with u-μP's learning rate per variable: the drop-in for `keras.optimizers.Adam`.
"""
        + _ARGS.replace("{keras_args}", "beta_1, beta_2, epsilon, amsgrad, clipnorm, ...")
        + """
    Example:

    >>> model = keras.Sequential([keras.Input((16,)), keras_unitscale.layers.Dense(64, name="hidden"),
    ...                           keras_unitscale.layers.Dense(1, role="output", name="readout")])
    >>> optimizer = Adam(learning_rate=0.01)
    >>> optimizer.build(model.trainable_variables)
    >>> optimizer.lr_multiplier(model.get_layer("hidden").kernel)  # 16 ** -0.5
    0.25
    """
    )

    def __init__(
        self,
        learning_rate=0.001,
        parametrization="u-mup",
        lr_multipliers=None,
        weight_decay=None,
        independent_weight_decay=True,
        peak_learning_rate=None,
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, **kwargs)
        self._init_unit_scaling(parametrization, lr_multipliers, independent_weight_decay, peak_learning_rate)


@keras.saving.register_keras_serializable(package="keras_unitscale")
class AdamW(UnitScaledOptimizer, keras.optimizers.AdamW):
    __doc__ = (
        """AdamW with u-μP's learning rate per variable: the drop-in for `keras.optimizers.AdamW`.

    Adam with decoupled weight decay, independent of the learning rate by
    default (see the module docstring). The default, 4e-6 a step at the peak
    learning rate, is the decay Keras's `AdamW` applies at its defaults
    (`weight_decay=0.004` × `learning_rate=0.001`): Keras multiplies its
    `weight_decay` by the learning rate, an independent decay does not.
"""
        + _ARGS.replace("{keras_args}", "beta_1, beta_2, epsilon, amsgrad, clipnorm, ...")
        + """
    Example:

    >>> model = keras.Sequential([keras.Input((16,)), keras_unitscale.layers.Dense(64, name="hidden")])
    >>> optimizer = AdamW(learning_rate=0.01)
    >>> optimizer.build(model.trainable_variables)
    >>> optimizer.lr_multiplier(model.get_layer("hidden").kernel), optimizer.weight_decay
    (0.25, 4e-06)
    """
    )

    def __init__(
        self,
        learning_rate=0.001,
        parametrization="u-mup",
        lr_multipliers=None,
        weight_decay=4e-6,
        independent_weight_decay=True,
        peak_learning_rate=None,
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, **kwargs)
        self._init_unit_scaling(parametrization, lr_multipliers, independent_weight_decay, peak_learning_rate)


@keras.saving.register_keras_serializable(package="keras_unitscale")
class SGD(UnitScaledOptimizer, keras.optimizers.SGD):
    __doc__ = (
        """SGD (momentum, Nesterov) with u-μP's learning rate per variable: the drop-in for `keras.optimizers.SGD`.

    The factors follow u-μP's SGD column when the readout's backward scale is
    constrained to its forward one (`readout_constraint="to_output_scale"`,
    matching `layers.Dense(role="output", constraint="to_output_scale")`);
    with the default unconstrained readout, gradients are unit-scaled and the
    factors are Adam's (see `keras_unitscale.parametrization`).
"""
        + _ARGS.replace("{keras_args}", "momentum, nesterov, clipnorm, ...")
        + """        readout_constraint: None or "to_output_scale", as the readout's.

    Example:

    >>> layers = keras_unitscale.layers
    >>> model = keras.Sequential([
    ...     keras.Input((16,)), layers.Dense(64, name="hidden"),
    ...     layers.Dense(1, role="output", constraint="to_output_scale", name="readout")])
    >>> optimizer = SGD(0.1, momentum=0.9, readout_constraint="to_output_scale")
    >>> optimizer.build(model.trainable_variables)
    >>> optimizer.lr_multiplier(model.get_layer("hidden").kernel)  # fan_in ** 0.5
    4.0
    """
    )

    family = "sgd"

    def __init__(
        self,
        learning_rate=0.01,
        parametrization="u-mup",
        lr_multipliers=None,
        weight_decay=None,
        independent_weight_decay=True,
        peak_learning_rate=None,
        readout_constraint=None,
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, **kwargs)
        self._init_unit_scaling(
            parametrization, lr_multipliers, independent_weight_decay, peak_learning_rate, readout_constraint
        )

    def get_config(self):
        return {**super().get_config(), "readout_constraint": self.readout_constraint}


@keras.saving.register_keras_serializable(package="keras_unitscale")
class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A learning-rate schedule times a constant factor (how `UnitScaleCallback` scales a schedule).

    Example:

    >>> schedule = ScaledSchedule(keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5), factor=2.0)
    >>> round(float(schedule(10)), 6)
    0.1
    """

    def __init__(self, schedule, factor):
        self.schedule = keras.optimizers.schedules.deserialize(schedule) if isinstance(schedule, dict) else schedule
        if not isinstance(self.schedule, keras.optimizers.schedules.LearningRateSchedule):
            raise ValueError(
                f"`schedule` must be a LearningRateSchedule. Received: schedule={schedule!r}"
            )
        self.factor = float(checks.positive("factor", factor))

    def __call__(self, step):
        return self.schedule(step) * self.factor

    def get_config(self):
        return {"schedule": keras.optimizers.schedules.serialize(self.schedule), "factor": self.factor}
