"""What every unit-scaled layer shares."""

import math

import keras

from keras_unitscale import parametrization
from keras_unitscale.scale import scale_fwd


def unit_normal(seed=None):
    """The unit-variance normal initialiser that unit scaling starts weights from."""
    return keras.initializers.RandomNormal(mean=0.0, stddev=1.0, seed=seed)


def check_fp8(fp8):
    """A layer's `fp8` switch: None (follow `keras_unitscale.precision`'s setting), True or False."""
    if fp8 is None or fp8 is True or fp8 is False:
        return fp8
    raise ValueError(f"`fp8` must be None (follow the global setting), True or False. Received: fp8={fp8!r}")


def check_weight_multipliers(weight_multipliers, argument="weight_multipliers"):
    """A dict {variable name: positive finite float}, or a `ValueError` naming the value."""
    if weight_multipliers is None:
        return {}
    if not isinstance(weight_multipliers, dict) or not all(
        isinstance(name, str)
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and value > 0
        and math.isfinite(value)
        for name, value in weight_multipliers.items()
    ):
        raise ValueError(
            f"`{argument}` must be a dict mapping variable names to finite "
            f"numbers > 0. Received: {argument}={weight_multipliers!r}"
        )
    return {name: float(value) for name, value in weight_multipliers.items()}


class WeightMultipliers:
    """Fixed forward multipliers on a layer's own weights.

    A multiplier `m` on a weight `w` makes the layer compute with `m·w` in
    the forward pass while `w`'s gradient stays what the backward rule makes
    it (`scale_fwd`). This is where `UnitScaleCallback` moves a weight's
    scale when it brings the stored weight to unit scale: the function is
    unchanged, and since `keras_unitscale.optimizers` give the weight a
    learning rate × `1/m`, so is the training trajectory. Multipliers are
    part of the layer's config, so they are saved with the model.

    A weight may also carry a fixed learning-rate factor (`lr_multipliers`):
    `unit_scale` sets one where it moves a weight to unit scale, so that
    `keras_unitscale.optimizers` step the converted model along the original
    model's trajectory. It replaces the parametrization's factor (and is not
    divided by `m`); an optimizer's own `lr_multipliers` patterns still win.
    """

    def _init_weight_multipliers(self, weight_multipliers, lr_multipliers=None):
        # Plain dicts, kept out of Keras's attribute tracking.
        object.__setattr__(self, "_weight_multipliers", check_weight_multipliers(weight_multipliers))
        object.__setattr__(
            self, "_lr_multipliers", check_weight_multipliers(lr_multipliers, "lr_multipliers")
        )

    def multiplier_config(self):
        """The config entries of the multipliers, for `get_config`."""
        return {"weight_multipliers": self.weight_multipliers, "lr_multipliers": self.lr_multipliers}

    @property
    def lr_multipliers(self):
        """{variable name: fixed learning-rate factor}, for the weights that have one."""
        return dict(self._lr_multipliers)

    def lr_multiplier(self, name):
        """The fixed learning-rate factor of the weight called `name`, or None."""
        return self._lr_multipliers.get(name)

    def set_lr_multiplier(self, name, value):
        """Fixes the learning-rate factor of the weight called `name` (None removes it)."""
        self._check_weight_name(name)
        if value is None:
            self._lr_multipliers.pop(name, None)
        else:
            self._lr_multipliers[name] = check_weight_multipliers({name: value}, "lr_multipliers")[name]

    @property
    def weight_multipliers(self):
        """{variable name: multiplier} for the weights whose multiplier is not 1."""
        return dict(self._weight_multipliers)

    def weight_multiplier(self, name):
        return self._weight_multipliers.get(name, 1.0)

    def set_weight_multiplier(self, name, value):
        """Sets the multiplier of the weight called `name` (functions traced before keep the old one)."""
        self._check_weight_name(name)
        value = check_weight_multipliers({name: value})[name]
        if value == 1.0:
            self._weight_multipliers.pop(name, None)
        else:
            self._weight_multipliers[name] = value

    def _check_weight_name(self, name):
        names = [v.name for v in self._trainable_variables + self._non_trainable_variables]
        if self.built and name not in names:
            raise ValueError(
                f"Layer '{self.name}' has no weight called '{name}'. Its weights are {names}. "
                f"Received: name={name!r}"
            )

    def multiplied(self, variable):
        """`variable` times its multiplier, in the forward pass only (None stays None)."""
        if variable is None:
            return None
        multiplier = self.weight_multiplier(variable.name)
        return variable if multiplier == 1.0 else scale_fwd(variable, multiplier)

    def declare_role(self, variable, role, **sizes):
        """Tags `variable` with its u-μP role, and this layer as where its multiplier lives."""
        parametrization.tag(variable, role, owner=self, **sizes)
