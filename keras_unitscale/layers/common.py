"""What every unit-scaled layer shares."""

import keras

from keras_unitscale import parametrization
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

    def multiplied(self, variable):
        """`variable` times its weight multiplier, in the forward pass only (None stays None)."""
        if variable is None:
            return None
        multiplier = self.weight_multiplier(variable.name)
        return variable if multiplier == 1.0 else scale_fwd(variable, multiplier)

    def save_own_variables(self, store):
        # Beside the values, the multipliers: a weights-only checkpoint then
        # restores a layer that computes and trains as the saved one did.
        super().save_own_variables(store)
        if self.built:
            for key, value in weights.saved_state(self._own_weights()).items():
                store[key] = value

    def load_own_variables(self, store):
        keys = list(store.keys())
        if all(key in keys for key in weights.SAVED_KEYS):
            weights.restore_state(self._own_weights(), {key: store[key] for key in weights.SAVED_KEYS})
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
