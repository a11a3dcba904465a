"""u-μP optimizers: Keras's `Adam`, `AdamW`, `RMSprop`, `Lion` and `SGD` with a learning rate per variable.

Each optimizer keeps, beside its usual state, a learning-rate multiplier per
trained variable, the factor on the base learning rate for that variable (one
vector variable, an entry per trained variable: a handful of arrays in the
optimizer's state, not one per variable, which JAX's step carries in and out
one by one). By default it is u-μP's learning-rate multiplier for the
variable's role, width and depth (`keras_unitscale.parametrization`), or the
fixed one in the variable's record (`keras_unitscale.weights`, set by
`unit_scale`); the optimizer's `lr_multipliers` patterns override both. All
but the fixed one are divided by the weight multiplier `m` the variable's
layer applies to it, so that the effective weight `m·w` moves as an
unmultiplied weight would. They are optimizer variables: saved and restored
with its state (`model.save`, `BackupAndRestore`), read at run time (a change
needs no retrace). A state loaded before the optimizer is built
(`load_weights` before the first `fit`, which Keras would skip) waits for `build`.

Roles come from our layers. Plain Keras layers' variables have none until
`parametrization.tag_model(model)` infers them (the callback does); until
then their learning-rate multiplier is 1, as in the Keras optimizer.

Weight decay is decoupled and, by default, *independent* (as u-μP has it):
each step multiplies a variable by `1 - weight_decay · η_t/η_peak`, where
`η_t/η_peak` follows the schedule but neither the base learning rate nor the
variable's multiplier: sweeping the learning rate leaves the decay alone. With `independent_weight_decay=False` the decay is Keras's,
`weight_decay · η_t`, times the variable's learning-rate multiplier.

Adam, AdamW and RMSprop also keep an epsilon multiplier per variable (1 by
default). Their update sees the gradient's absolute scale only through `epsilon`;
a model whose gradients are in other units than another's (a unit-scaled
twin from `unit_scale`) follows the other's trajectory exactly when each
variable's `epsilon` is scaled by the ratio of the gradients (by its square
in RMSprop, which adds `epsilon` under the square root):
`convert.match_epsilon` measures the ratio and sets it. Lion's update is the
sign of a moment, blind to the gradient's scale: it has no epsilon.

Models of our layers need no loss scaling in FP16 (their gradients are near
unit scale): ours warn when Keras wraps them in a `LossScaleOptimizer` over
unit-scaled layers, as it does unless `compile(..., auto_scale_loss=False)`.

They are subclasses of the Keras optimizers, so they work wherever those do:
`compile`, `LossScaleOptimizer`, `jit_compile`, learning-rate schedules and
callbacks, TensorFlow, JAX and PyTorch (on PyTorch Keras swaps its own exact
`Adam`/`SGD` for fused versions; it leaves subclasses alone).
"""

import contextlib
import math
import warnings

import keras
import numpy as np
from keras import ops

from keras_unitscale import checks
from keras_unitscale import parallel_updates
from keras_unitscale import parametrization as P
from keras_unitscale import weights
from keras_unitscale.sizes import replicas

__all__ = ["Adam", "AdamW", "RMSprop", "Lion", "SGD", "ScaledSchedule", "schedule_peak", "unwrap"]

PARAMETRIZATIONS = ("u-mup", None)


def unwrap(optimizer):
    """The optimizer that updates the variables: `optimizer`, or the one a `LossScaleOptimizer` wraps."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def _eagerly():
    """A context that runs now, outside any function being traced.

    TensorFlow builds an optimizer inside the first trace of the training
    step: a restore there would become part of the step and reset the state
    at every step. `tf.init_scope` lifts it out, as TensorFlow lifts variable
    initialisers; the other backends build eagerly.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.init_scope()
    return contextlib.nullcontext()


def schedule_peak(schedule):
    for name in ("warmup_target", "initial_learning_rate"):
        value = getattr(schedule, name, None)
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
    return None


class UnitScaledOptimizer:
    """What the u-μP optimizers add to a Keras optimizer (a mixin placed before it)."""

    # u-μP's learning-rate column: "adam" for the updates that do not scale
    # with the gradient (Adam, RMSprop, Lion), "sgd" for those that do.
    family = "adam"
    # How the update's epsilon meets the gradient's scale r: Adam adds it to
    # sqrt(v) ~ r (power 1), RMSprop to v ~ r² (power 2); None: no epsilon.
    epsilon_power = 1

    # The arguments of Adam, RMSprop and Lion (AdamW and SGD change defaults; SGD alone reads `readout_constraint`).
    def __init__(self, learning_rate=0.001, parametrization="u-mup", lr_multipliers=None, weight_decay=None,
                 independent_weight_decay=True, peak_learning_rate=None, readout_constraint=None, **kwargs):
        if readout_constraint is not None and self.family != "sgd":
            raise ValueError(
                f"`readout_constraint` is SGD's: {type(self).__name__}'s update does not scale with the gradient. "
                f"Received: readout_constraint={readout_constraint!r}"
            )
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, **kwargs)
        self._init_unit_scaling(
            parametrization, lr_multipliers, independent_weight_decay, peak_learning_rate, readout_constraint
        )

    def _init_unit_scaling(
        self, parametrization, lr_multipliers, independent_weight_decay, peak_learning_rate, readout_constraint,
    ):
        self.parametrization = checks.one_of("parametrization", parametrization, PARAMETRIZATIONS)
        self.lr_multipliers = weights.check_multipliers(
            "lr_multipliers", lr_multipliers, keys="regular expressions over variable paths"
        )
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
                peak_learning_rate = schedule_peak(learning_rate)
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

    # The learning-rate multipliers.

    def default_lr_multiplier(self, variable):
        """The learning-rate multiplier `variable` starts with.

        An `lr_multipliers` match, else the fixed one in its record (a model
        from `unit_scale`), else u-μP's for its role, else 1; all but the
        fixed one divided by the weight multiplier `m` its layer applies to
        it, so that the effective weight `m·w` moves as an unmultiplied
        weight would.
        """
        matched = next((value for pattern, value in self._lr_patterns if pattern.search(variable.path)), None)
        fixed = weights.lr_multiplier(variable)
        if matched is None and fixed is not None:
            return fixed
        role = P.role_of(variable)
        if matched is not None:
            lr_multiplier = matched
        elif self.parametrization is None or role is None:
            lr_multiplier = 1.0
        else:
            lr_multiplier = role.lr_multiplier(self.family, self.readout_constraint)
        return lr_multiplier / weights.multiplier(variable)

    def load_own_variables(self, store):
        # Keras skips the state of an optimizer not built yet, with a warning:
        # a model given `load_weights` before its first `fit` would restart
        # Adam's moments, the step count and our learning-rate multipliers.
        # The state waits for `build` instead (`fit` builds the optimizer
        # before the first step).
        if not self.built:
            object.__setattr__(self, "_waiting_state", {key: np.array(store[key]) for key in store.keys()})
            return
        # Keras skips a mismatched optimizer state with a warning; resuming
        # without it would silently restart Adam's moments and our
        # learning-rate multipliers.
        if not store.keys() and getattr(self, "_wrapped_for_loss_scaling", False):
            raise ValueError(
                f"The file holds no state for optimizer '{self.name}' where loading looks for it: a "
                "LossScaleOptimizer wraps it now. The model was most likely saved compiled with "
                "`auto_scale_loss=False` under mixed_float16, which Keras's compile config does not record, so "
                "`load_model` compiled it again with loss scaling. Load it with `compile=False` and compile it "
                "as before (`auto_scale_loss=False`): the weights and multipliers load; the optimizer restarts."
            )
        if len(store.keys()) != len(self.variables):
            raise ValueError(
                f"The saved state of optimizer '{self.name}' does not match it: it has "
                f"{len(self.variables)} variables and the file holds {len(store.keys())}. The file is "
                "corrupted, or was saved from a different model or optimizer, or by an earlier keras_unitscale "
                "that kept its multipliers as one variable per weight (not one vector per kind)."
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
        if getattr(self, "_wrapped_for_loss_scaling", False) and any(weights.is_declared(v) for v in variables):
            warnings.warn(
                f"A LossScaleOptimizer wraps '{self.name}', but the model's layers are unit-scaled: their "
                "gradients are near 1 and fit FP16 as they are. Loss scaling only adds its bookkeeping and "
                "skips the steps it overflows; compile with `auto_scale_loss=False` to train without it.",
                stacklevel=2,
            )
        super().build(variables)
        self._build_multipliers(variables)

    def _build_multipliers(self, variables):
        # One vector per kind, entry i for the variable at Keras's index i (`_get_variable_index`).
        defaults = np.array([self.default_lr_multiplier(variable) for variable in variables], "float32")
        self._lr_multipliers = self._per_variable_vector(
            lambda shape, dtype: ops.cast(defaults, dtype), "lr_multipliers", len(variables))
        if self.epsilon_power is not None:
            self._epsilon_multipliers = self._per_variable_vector("ones", "epsilon_multipliers", len(variables))
            # The batch rule of a model converted in place (`convert.epsilon.InPlaceEpsilon`), saved with the state
            # so that a resumed run steps as the first did: each weight's power, and the rows its multiplier is for
            # (0: none).
            self._epsilon_batch_powers = self._per_variable_vector("zeros", "epsilon_batch_powers", len(variables))
            self._epsilon_reference_rows = self.add_variable(
                shape=(), initializer="zeros", dtype="float32", aggregation="only_first_replica",
                name="epsilon_reference_rows",
            )
        waiting = getattr(self, "_waiting_state", None)
        if waiting is not None:
            object.__setattr__(self, "_waiting_state", None)
            with _eagerly():
                self.load_own_variables(waiting)

    def _per_variable_vector(self, initializer, name, size):
        return self.add_variable(shape=(size,), initializer=initializer, dtype="float32",
                                 aggregation="only_first_replica", name=name)

    def _index(self, variable, what):
        """`variable`'s entry in the per-variable vectors, after checking that it has one."""
        if not self.built:
            raise ValueError(
                f"The optimizer '{self.name}' is not built yet, so it has no {what} "
                "multipliers. It builds at the start of `fit`, or call "
                "`optimizer.build(model.trainable_variables)`."
            )
        if what == "epsilon" and self.epsilon_power is None:
            raise ValueError(f"The optimizer '{self.name}' has no `epsilon`; Adam, AdamW and RMSprop have.")
        try:
            return self._get_variable_index(variable)
        except KeyError:
            raise ValueError(
                f"The optimizer '{self.name}' does not train this variable. "
                f"Received: variable.path={variable.path!r}"
            ) from None

    @staticmethod
    def _entry(vector, index):
        return float(ops.convert_to_numpy(vector)[index])

    @staticmethod
    def _set_entry(vector, index, value):
        """Sets one entry of `vector`, or (`index` and `value` lists) several in one assignment."""
        values = np.array(ops.convert_to_numpy(vector))
        values[index] = value
        vector.assign(values)

    @staticmethod
    def epsilon_batch_factor(variable):
        """A factor on `variable`'s epsilon multiplier in the step being traced: 1, unless `UnitScaleCallback` matched
        the epsilon of a model it converted in place (`convert.epsilon.InPlaceEpsilon`), which sets its own."""
        return 1.0

    def epsilon_multiplier(self, variable):
        """The epsilon multiplier of `variable`: the ratio of its gradient's scale to the original's (a Python float).

        The update uses `epsilon × multiplier ** epsilon_power`.
        """
        index = self._index(variable, "epsilon")  # the checks, before the vector is looked for
        return self._entry(self._epsilon_multipliers, index)

    def set_epsilon_multiplier(self, variable, value):
        """Sets the epsilon multiplier of `variable`; set it before training (the moments keep its units)."""
        checks.positive("value", value)
        index = self._index(variable, "epsilon")
        self._set_entry(self._epsilon_multipliers, index, float(value))

    def epsilon_batch_rule(self, variable):
        """`(rows₀, p)`: `variable`'s epsilon multiplier holds at `rows₀` rows and scales as `(rows₀ / rows)^p`, as set by
        `UnitScaleCallback` on a model it converted in place; None where none was set."""
        index = self._index(variable, "epsilon")
        rows = float(ops.convert_to_numpy(self._epsilon_reference_rows))
        if rows == 0:
            return None
        return rows, self._entry(self._epsilon_batch_powers, index)

    def set_epsilon_batch_rule(self, variable, reference_rows, power):
        """Sets `variable`'s batch rule (see `epsilon_batch_rule`); one `reference_rows` holds for every variable."""
        index = self._index(variable, "epsilon")
        checks.positive("reference_rows", reference_rows)
        self._epsilon_reference_rows.assign(float(reference_rows))
        self._set_entry(self._epsilon_batch_powers, index, float(power))

    def lr_multiplier(self, variable):
        """The learning-rate multiplier of `variable`, the factor on the base learning rate (a Python float)."""
        index = self._index(variable, "learning-rate")
        return self._entry(self._lr_multipliers, index)

    def set_lr_multiplier(self, variable, value):
        """Sets the learning-rate multiplier of `variable`."""
        checks.positive("value", value)
        index = self._index(variable, "learning-rate")
        self._set_entry(self._lr_multipliers, index, float(value))

    def reset_lr_multipliers(self, variables=None):
        """Sets the learning-rate multipliers of `variables` (default: every one it trains) back to their defaults
        (after `parametrization.tag_model`, say), in one assignment."""
        variables = self._trainable_variables if variables is None else list(variables)
        indices = [self._index(variable, "learning-rate") for variable in variables]
        if indices:
            self._set_entry(self._lr_multipliers, indices, [self.default_lr_multiplier(v) for v in variables])

    # The update.

    def _apply_weight_decay(self, variables):
        # Decay is applied per variable in `update_step`, where its learning
        # rate is known (and, under tf.distribute, on each replica's copy).
        return

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        # On PyTorch an Adam or RMSprop updates every variable at once, as Keras's own do (`parallel_updates`).
        if parallel_updates.applies(self, grads, trainable_variables):
            parallel_updates.update(self, grads, trainable_variables, learning_rate)
            return
        # Each vector is read once per step and split into its entries (one op each on TensorFlow's graph, not a
        # read per variable), except across `tf.distribute` replicas, whose updates run on each replica's copy.
        steps_once = bool(self._trainable_variables) and replicas() == 1
        object.__setattr__(self, "_step_multipliers", {
            name: ops.unstack(ops.convert_to_tensor(getattr(self, name)), num=len(self._trainable_variables))
            for name in ("_lr_multipliers", "_epsilon_multipliers") if steps_once and hasattr(self, name)})
        try:
            super()._backend_update_step(grads, trainable_variables, learning_rate)
        finally:
            object.__setattr__(self, "_step_multipliers", {})

    def _step_multiplier(self, name, variable):
        """`variable`'s entry of the vector `name` in the step being traced or run, as float32."""
        index = self._get_variable_index(variable)
        entries = getattr(self, "_step_multipliers", {}).get(name)
        return ops.cast(getattr(self, name)[index] if entries is None else entries[index], "float32")

    def decay_fraction(self, learning_rate, lr_multiplier):
        """The fraction of a weight its decoupled weight decay removes this step (see the module docstring)."""
        if self.independent_weight_decay:
            return self.weight_decay * learning_rate / self.peak_learning_rate
        return self.weight_decay * learning_rate * lr_multiplier

    def scaled_epsilon(self, multiplier, batch_factor=1.0):
        """The epsilon of a variable whose epsilon multiplier is `multiplier` and batch factor `batch_factor`."""
        power = self.epsilon_power
        if isinstance(batch_factor, (int, float)):
            # A Python number (the rows are static) joins epsilon in Python: one op less per variable per step.
            epsilon = self.epsilon * batch_factor**power
        else:
            epsilon, multiplier = self.epsilon, multiplier * batch_factor
        # Adam's power of 1 is the multiplier itself: no power op for it.
        return epsilon * (multiplier if power == 1 else multiplier**power)

    def update_step(self, gradient, variable, learning_rate):
        lr_multiplier = self._step_multiplier("_lr_multipliers", variable)
        learning_rate = ops.cast(learning_rate, "float32")
        if self.weight_decay and self._use_weight_decay(variable):
            decay = self.decay_fraction(learning_rate, lr_multiplier)
            variable.assign(variable - variable * ops.cast(decay, variable.dtype))
        if self.epsilon_power is None:
            super().update_step(gradient, variable, learning_rate * lr_multiplier)
            return
        # Keras's update reads `self.epsilon` as it is traced, once per
        # variable. (Scaling the gradient instead would be the same maths, but
        # turns an embedding's sparse gradient dense, and Keras's Adam treats
        # those differently.)
        epsilon = self.epsilon
        multiplier = self._step_multiplier("_epsilon_multipliers", variable)
        self.epsilon = self.scaled_epsilon(multiplier, self.epsilon_batch_factor(variable))
        try:
            super().update_step(gradient, variable, learning_rate * lr_multiplier)
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
        parametrization: "u-mup" (each variable's learning-rate multiplier
            from its role, see `keras_unitscale.parametrization`) or None
            (learning-rate multiplier 1, as Keras).
        lr_multipliers: {regular expression over variable paths:
            learning-rate multiplier}, overriding the default one of the
            variables it matches (the first matching pattern wins).
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
    Examples:
        >>> model = keras.Sequential([keras.Input((16,)), keras_unitscale.layers.Dense(64, name="hidden"),
        ...                           keras_unitscale.layers.Dense(1, role="output", name="readout")])
        >>> optimizer = Adam(learning_rate=0.01)
        >>> optimizer.build(model.trainable_variables)
        >>> optimizer.lr_multiplier(model.get_layer("hidden").kernel)  # 16 ** -0.5
        0.25
    """
    )


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
    Examples:
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
        super().__init__(learning_rate, parametrization, lr_multipliers, weight_decay, independent_weight_decay,
                         peak_learning_rate, **kwargs)


@keras.saving.register_keras_serializable(package="keras_unitscale")
class RMSprop(UnitScaledOptimizer, keras.optimizers.RMSprop):
    __doc__ = (
        """RMSprop with u-μP's learning rate per variable: the drop-in for `keras.optimizers.RMSprop`.

    Its update, `g / sqrt(v + epsilon)`, does not scale with the gradient,
    so its learning-rate multipliers are Adam's. `epsilon` sits under the
    square root: a gradient `r` times another's needs `epsilon × r²` to move
    alike (`epsilon_power = 2`, see `epsilon_multiplier`).
"""
        + _ARGS.replace("{keras_args}", "rho, momentum, epsilon, centered, clipnorm, ...")
        + """
    Examples:
        >>> model = keras.Sequential([keras.Input((16,)), keras_unitscale.layers.Dense(64, name="hidden")])
        >>> optimizer = RMSprop(learning_rate=0.01)
        >>> optimizer.build(model.trainable_variables)
        >>> optimizer.lr_multiplier(model.get_layer("hidden").kernel)  # 16 ** -0.5, as Adam's
        0.25
    """
    )

    epsilon_power = 2


@keras.saving.register_keras_serializable(package="keras_unitscale")
class Lion(UnitScaledOptimizer, keras.optimizers.Lion):
    __doc__ = (
        """Lion with u-μP's learning rate per variable: the drop-in for `keras.optimizers.Lion`.

    Its update is the sign of a moment, of size 1 per entry whatever the
    gradient's scale: its learning-rate multipliers are Adam's, and it has
    no epsilon.
"""
        + _ARGS.replace("{keras_args}", "beta_1, beta_2, clipnorm, ...")
        + """
    Examples:
        >>> model = keras.Sequential([keras.Input((16,)), keras_unitscale.layers.Dense(64, name="hidden")])
        >>> optimizer = Lion(learning_rate=1e-4)
        >>> optimizer.build(model.trainable_variables)
        >>> optimizer.lr_multiplier(model.get_layer("hidden").kernel)
        0.25
    """
    )

    epsilon_power = None


@keras.saving.register_keras_serializable(package="keras_unitscale")
class SGD(UnitScaledOptimizer, keras.optimizers.SGD):
    __doc__ = (
        """SGD (momentum, Nesterov) with u-μP's learning rate per variable: the drop-in for `keras.optimizers.SGD`.

    The learning-rate multipliers follow u-μP's SGD column when the readout's backward scale is
    constrained to its forward one (`readout_constraint="to_output_scale"`,
    matching `layers.Dense(role="output", constraint="to_output_scale")`);
    with the default unconstrained readout, gradients are unit-scaled and the
    learning-rate multipliers are Adam's (see `keras_unitscale.parametrization`).
"""
        + _ARGS.replace("{keras_args}", "momentum, nesterov, clipnorm, ...")
        + """        readout_constraint: None or "to_output_scale", as the readout's.

    Examples:
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
    epsilon_power = None

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
        super().__init__(learning_rate, parametrization, lr_multipliers, weight_decay, independent_weight_decay,
                         peak_learning_rate, readout_constraint, **kwargs)

    def get_config(self):
        return {**super().get_config(), "readout_constraint": self.readout_constraint}


@keras.saving.register_keras_serializable(package="keras_unitscale")
class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A learning-rate schedule times a constant factor (how `UnitScaleCallback` scales a schedule).

    Examples:
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
