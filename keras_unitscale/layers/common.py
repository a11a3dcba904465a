"""What every unit-scaled layer shares."""

import contextlib

import keras

from keras_unitscale import parametrization
from keras_unitscale import rules
from keras_unitscale import weights
from keras_unitscale.scale import scale_fwd


def unit_normal(seed=None):
    """The unit-variance normal initialiser that unit scaling starts weights from."""
    return keras.initializers.RandomNormal(mean=0.0, stddev=1.0, seed=seed)


def check_fp8(fp8):
    """A layer's `fp8` switch: None (follow `keras_unitscale.precision`'s setting), True or False."""
    if fp8 is None or fp8 is True or fp8 is False:
        return fp8
    raise ValueError(f"`fp8` must be None (follow the global setting), True or False. Received: fp8={fp8!r}")


class WeightMultipliers:
    """Weight multipliers and fixed learning-rate multipliers on a layer's own weights.

    A weight multiplier `m` on a weight `w` makes the layer compute with
    `m·w` in the forward pass while `w`'s gradient stays what the backward
    rule makes it (`scale_fwd`). This is where `UnitScaleCallback` moves a
    weight's scale when it brings the stored weight to unit scale: the
    function is unchanged, and since `keras_unitscale.optimizers` give the
    weight a learning-rate multiplier × `1/m`, so is the training trajectory.

    A weight may also carry a fixed learning-rate multiplier
    (`lr_multipliers`): `unit_scale` sets one where it moves a weight to unit
    scale, so that `keras_unitscale.optimizers` step the converted model
    along the original model's trajectory. It replaces u-μP's learning-rate
    multiplier from the role (and is not divided by `m`); an optimizer's own
    `lr_multipliers` patterns still win.

    Both live in the weights' records (`keras_unitscale.weights`), which this
    mixin reads and writes by variable name. Values given before the layer
    is built (the constructor's `weight_multipliers=` and `lr_multipliers=`,
    from a config too) wait here until the layer declares its weights' roles
    (`declare_role`), which writes them into the records. `get_config` reads
    them back, so they are saved with the model.
    """

    def _init_weight_multipliers(self, weight_multipliers, lr_multipliers=None):
        # Plain dicts, kept out of Keras's attribute tracking: the values
        # that wait for their weights (emptied as the layer builds).
        object.__setattr__(
            self, "_waiting_multipliers", weights.check_multipliers("weight_multipliers", weight_multipliers)
        )
        object.__setattr__(
            self, "_waiting_lr_multipliers", weights.check_multipliers("lr_multipliers", lr_multipliers)
        )

    def multiplier_config(self):
        """The config entries of the weight and learning-rate multipliers, for `get_config`."""
        return {"weight_multipliers": self.weight_multipliers, "lr_multipliers": self.lr_multipliers}

    def _own_weights(self):
        return self._trainable_variables + self._non_trainable_variables

    def _declared_weight(self, name):
        """The layer's weight called `name` once its role is declared (its record holds the values), else None."""
        return next((v for v in self._own_weights() if v.name == name and weights.is_declared(v)), None)

    @property
    def lr_multipliers(self):
        """{variable name: fixed learning-rate multiplier}, for the weights that have one."""
        recorded = {v.name: weights.lr_multiplier(v) for v in self._own_weights() if weights.is_declared(v)}
        recorded = {name: value for name, value in recorded.items() if value is not None}
        return {**recorded, **self._waiting_lr_multipliers}

    def lr_multiplier(self, name):
        """The fixed learning-rate multiplier of the weight called `name`, or None."""
        variable = self._declared_weight(name)
        return self._waiting_lr_multipliers.get(name) if variable is None else weights.lr_multiplier(variable)

    def set_lr_multiplier(self, name, value):
        """Fixes the learning-rate multiplier of the weight called `name` (None removes it)."""
        self._check_weight_name(name)
        if value is not None:
            value = weights.check_multipliers("lr_multipliers", {name: value})[name]
        variable = self._declared_weight(name)
        if variable is not None:
            weights.set_lr_multiplier(variable, value)
        elif value is None:
            self._waiting_lr_multipliers.pop(name, None)
        else:
            self._waiting_lr_multipliers[name] = value

    @property
    def weight_multipliers(self):
        """{variable name: weight multiplier} for the weights whose weight multiplier is not 1."""
        recorded = {v.name: weights.multiplier(v) for v in self._own_weights() if weights.is_declared(v)}
        merged = {**recorded, **self._waiting_multipliers}
        return {name: value for name, value in merged.items() if value != 1.0}

    def weight_multiplier(self, name):
        """The weight multiplier of the weight called `name` (1 unless one was set)."""
        variable = self._declared_weight(name)
        return self._waiting_multipliers.get(name, 1.0) if variable is None else weights.multiplier(variable)

    def _multiplier_of(self, variable):
        """`weight_multiplier(variable.name)` for one of this layer's own weights, read from it without a search."""
        if weights.is_declared(variable):
            return weights.multiplier(variable)
        return self._waiting_multipliers.get(variable.name, 1.0)

    def set_weight_multiplier(self, name, value):
        """Sets the weight multiplier of the weight called `name` (functions traced before keep the old one)."""
        self._check_weight_name(name)
        value = weights.check_multipliers("weight_multipliers", {name: value})[name]
        variable = self._declared_weight(name)
        if variable is not None:
            weights.set_multiplier(variable, value)
        else:
            self._waiting_multipliers[name] = value

    def _check_weight_name(self, name):
        names = [v.name for v in self._own_weights()]
        if self.built and name not in names:
            raise ValueError(
                f"Layer '{self.name}' has no weight called '{name}'. Its weights are {names}. "
                f"Received: name={name!r}"
            )

    def multiplied(self, variable, value=None):
        """`value` (by default `variable`) times `variable`'s weight multiplier, in the forward pass only.

        `value` is what the layer computes with in `variable`'s place: Keras's
        effective kernel, LoRA's update included. None stays None.
        """
        if variable is None:
            return None
        value = variable if value is None else value
        multiplier = self._multiplier_of(variable)
        return value if multiplier == 1.0 else scale_fwd(value, multiplier)

    def forward_multipliers(self, *variables):
        """The weight multipliers of `variables` (1 for None), for an op that applies them itself (`ops.dense`)."""
        return tuple(1.0 if variable is None else self._multiplier_of(variable) for variable in variables)

    def _checkpointed_weights(self):
        """The weights whose values Keras's `save_own_variables` writes: their multipliers are saved beside them."""
        return self._own_weights()

    def save_own_variables(self, store):
        # Beside the values, the multipliers: a weights-only checkpoint then
        # restores a layer that computes and trains as the saved one did.
        super().save_own_variables(store)
        if self.built:
            for key, value in weights.saved_state(self._checkpointed_weights()).items():
                store[key] = value

    def load_own_variables(self, store):
        keys = list(store.keys())
        if all(key in keys for key in weights.SAVED_KEYS):
            weights.restore_state(self._checkpointed_weights(), {key: store[key] for key in weights.SAVED_KEYS})
            store = {key: store[key] for key in keys if key not in weights.SAVED_KEYS}
        # A file saved before the multipliers were saved with the weights has Keras's keys alone.
        super().load_own_variables(store)

    def declare_role(self, variable, role, **sizes):
        """Declares `variable`'s u-μP role in its record, with the values that waited for it."""
        parametrization.tag(variable, role, **sizes)
        if variable.name in self._waiting_multipliers:
            weights.set_multiplier(variable, self._waiting_multipliers.pop(variable.name))
        if variable.name in self._waiting_lr_multipliers:
            weights.set_lr_multiplier(variable, self._waiting_lr_multipliers.pop(variable.name))


@contextlib.contextmanager
def without_activation(layer):
    """Within this context `layer.activation` is None.

    Keras's quantized calls end with `self.activation(...)`; a unit-scaled
    layer applies its own activation after the dense rule's output scale,
    so it runs Keras's quantized call with none.
    """
    activation = layer.activation
    layer.activation = None
    try:
        yield
    finally:
        layer.activation = activation


class LowRankAdapters:
    """LoRA for the layers whose Keras class has it (Dense, EinsumDense, Embedding).

    Keras adds `(lora_alpha / lora_rank) · A·B` to the kernel; that stays.
    Unit scaling changes two defaults: `A` starts unit-normal (like every
    weight here) and `lora_alpha` defaults to `rules.linear.lora_alpha(rank)
    = rank^1/2`, so the low-rank path is two unit-scaled matmuls and its
    scale does not depend on the rank. u-μP's roles: `A` as the layer's
    kernel (its fan-in), `B` a hidden weight of fan-in `rank`, so the
    optimizers step each by its own learning-rate rule. The kernel's weight
    multiplier multiplies the whole effective kernel, LoRA included, so that
    Keras's merged kernel (saved by `save_own_variables`) reloads exactly.
    """

    def _default_lora_alpha(self, lora_rank, lora_alpha):
        if lora_alpha is None and lora_rank:
            return rules.linear.lora_alpha(lora_rank)
        return lora_alpha

    def enable_lora(self, rank, lora_alpha=None, a_initializer=None, b_initializer="zeros"):
        if lora_alpha is None:
            # Keras's `build` calls `enable_lora(lora_rank)` alone: keep the configured alpha.
            configured = self.lora_alpha if getattr(self, "lora_rank", None) == rank else None
            lora_alpha = configured or rules.linear.lora_alpha(rank)
        super().enable_lora(rank, lora_alpha=lora_alpha, a_initializer=a_initializer or unit_normal(),
                            b_initializer=b_initializer)
        base, factor_a, factor_b = self._lora_variables()
        base_role = weights.role(base)
        role_a, fan_in = ("hidden", int(factor_a.shape[0])) if base_role is None else (base_role.role, base_role.fan_in)
        self.declare_role(factor_a, role_a, fan_in=fan_in, fan_out=rank)
        self.declare_role(factor_b, "hidden", fan_in=rank, fan_out=int(factor_b.shape[-1]))

    def _lora_variables(self):
        """The variable LoRA adapts and its two factors `A` and `B`."""
        return self._kernel, self.lora_kernel_a, self.lora_kernel_b

    def _checkpointed_weights(self):
        # Keras saves the kernel with LoRA's update merged into it, and not the
        # factors (which it zeroes on loading): a file then loads into a layer
        # with or without LoRA enabled.
        checkpointed = super()._checkpointed_weights()
        if not self.lora_enabled:
            return checkpointed
        factors = [id(v) for v in self._lora_variables()[1:]]
        return [v for v in checkpointed if id(v) not in factors]


class FoldedQuantization:
    """Quantizes a layer after folding its weight multipliers into the stored weights.

    Keras quantizes the stored kernel; a weight multiplier would then be
    applied to a quantized copy of the weight without it. Folding keeps the
    function exact: each multiplied weight is assigned `m·w` and its
    multiplier set to 1 (a quantized kernel no longer trains, so the
    learning-rate factor the multiplier implied has nothing left to do).
    """

    # The unit-scaled layers this mixin quantizes: a user's subclass of one
    # may change its call, so, as Keras does for its own layers, it is
    # quantized only when `type_check=False` says it is safe.
    def quantize(self, mode=None, type_check=True, config=None):
        if type_check and type(self).__module__.split(".")[0] != "keras_unitscale":
            raise self._not_implemented_error(self.quantize)
        if self.built:
            for variable in self._own_weights():
                multiplier = self.weight_multiplier(variable.name)
                if multiplier != 1.0 and weights.is_declared(variable):
                    variable.assign(variable * multiplier)
                    weights.set_multiplier(variable, 1.0)
        # Keras refuses to quantize a subclass unless told it is safe: this
        # one is, as its `quantized_call` applies the unit-scaling rule
        # around Keras's quantized computation.
        super().quantize(mode, type_check=False, config=config)
        # Quantizing replaces the kernel variable: its role is declared again.
        self.declare_roles()
