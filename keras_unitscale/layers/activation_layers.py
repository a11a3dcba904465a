"""Keras's activation layers, unit-scaled: `ReLU`, `LeakyReLU`, `ELU`, `PReLU` and `Softmax`.

Each is its Keras class with the unit-scaling rule of its function around
Keras's own `call` (`ops.common.elementwise`): output × the rule's output
scale, input gradient × its gradient scale. The rule is the derived one
where there is one (a plain ReLU: √2; softmax: the reference's, over the
size of the axes it normalises), else the general one computed from the
function (`ops.activations.rule`: `1/RMS(f(z))`, `1/RMS(f'(z))` for
z ~ N(0, 1)), tied by `constraint`. Arguments, masking, configs and
weights (PReLU's `alpha`) are Keras's.
"""

import functools
import math

import keras

from keras_unitscale import rules
from keras_unitscale.layers.activation import check_constraint
from keras_unitscale.ops import activations as ops_activations
from keras_unitscale.ops.common import elementwise
from keras_unitscale.ops.common import to_float


@functools.lru_cache(maxsize=None)
def _keras_function(name, **arguments):
    """Keras's activation `name` with `arguments`: one object per set, so that its rule is computed once."""
    return functools.partial(getattr(keras.activations, name), **arguments)


class UnitScaledActivation:
    """Keras's `call` with its function's unit-scaling rule around it (a mixin placed before the Keras class)."""

    def _init_rule(self, constraint):
        self.constraint = check_constraint(constraint)

    def rule_function(self):
        """The activation whose rule this layer applies: a name or a function."""
        raise NotImplementedError

    def homogeneous(self):
        """Whether `f(c·x) = c·f(x)` for c > 0: a scale on the input passes through (`unit_scale` uses it)."""
        return False

    def scales(self, input_shape=None):
        """The rule, `rules.activations.ElementwiseScales(output, grad)`."""
        return ops_activations.rule(self.rule_function(), constraint=self.constraint)

    def call(self, inputs, **kwargs):
        keras_call = super().call
        inputs = to_float(inputs, "inputs")
        return elementwise(lambda x: keras_call(x, **kwargs), inputs, self.scales(tuple(inputs.shape)))

    def get_config(self):
        return {**super().get_config(), "constraint": self.constraint}


_ARGS = """
    Args:
        constraint: how the op's forward and backward scales are tied (see
            `keras_unitscale.constraints`).
        The rest: as for `keras.layers.{name}`.
"""


@keras.saving.register_keras_serializable(package="keras_unitscale")
class ReLU(UnitScaledActivation, keras.layers.ReLU):
    __doc__ = """A unit-scaled ReLU layer: `keras.layers.ReLU` with its rule (√2 for the plain ReLU).
""" + _ARGS.replace("{name}", "ReLU") + """
    Examples:
        >>> keras.ops.convert_to_numpy(ReLU()(np.array([-1.0, 2.0], "float32"))).astype("float64").round(3).tolist()
        [0.0, 2.828]
    """

    def __init__(self, max_value=None, negative_slope=0.0, threshold=0.0, constraint="to_output_scale", **kwargs):
        super().__init__(max_value=max_value, negative_slope=negative_slope, threshold=threshold, **kwargs)
        self._init_rule(constraint)

    def rule_function(self):
        if self.max_value is None and self.negative_slope == 0 and self.threshold == 0:
            return "relu"
        return _keras_function("relu", negative_slope=float(self.negative_slope), threshold=float(self.threshold),
                               max_value=None if self.max_value is None else float(self.max_value))

    def homogeneous(self):
        return self.max_value is None and self.threshold == 0


@keras.saving.register_keras_serializable(package="keras_unitscale")
class LeakyReLU(UnitScaledActivation, keras.layers.LeakyReLU):
    __doc__ = """A unit-scaled leaky ReLU layer: `keras.layers.LeakyReLU` with the general rule of its function.
""" + _ARGS.replace("{name}", "LeakyReLU") + """
    Examples:
        >>> round(LeakyReLU(negative_slope=0.3).scales().output, 3)
        1.355
    """

    def __init__(self, negative_slope=0.3, constraint="to_output_scale", **kwargs):
        super().__init__(negative_slope=negative_slope, **kwargs)
        self._init_rule(constraint)

    def rule_function(self):
        return _keras_function("leaky_relu", negative_slope=float(self.negative_slope))

    def homogeneous(self):
        return True


@keras.saving.register_keras_serializable(package="keras_unitscale")
class ELU(UnitScaledActivation, keras.layers.ELU):
    __doc__ = """A unit-scaled ELU layer: `keras.layers.ELU` with the general rule of its function.
""" + _ARGS.replace("{name}", "ELU") + """
    Examples:
        >>> [round(s, 3) for s in ELU(constraint=None).scales()]
        [1.245, 1.223]
    """

    def __init__(self, alpha=1.0, constraint="to_output_scale", **kwargs):
        super().__init__(alpha=alpha, **kwargs)
        self._init_rule(constraint)

    def rule_function(self):
        return _keras_function("elu", alpha=float(self.alpha))

    def get_config(self):
        # Keras's ELU has its config made from its constructor's arguments, which a subclass does not inherit.
        return {**super().get_config(), "alpha": self.alpha}


@keras.saving.register_keras_serializable(package="keras_unitscale")
class PReLU(UnitScaledActivation, keras.layers.PReLU):
    __doc__ = """A unit-scaled PReLU layer: `keras.layers.PReLU` with the rule of its function as it starts.

    Its negative slope `alpha` is learned; the scales are the leaky ReLU's
    at the slope `alpha_initializer` gives (a constant, Keras's default 0:
    the plain ReLU's √2; any other initialiser: the ReLU's too), fixed as
    the layer is built, as every rule is fixed at initialisation.
""" + _ARGS.replace("{name}", "PReLU") + """
    Examples:
        >>> round(PReLU(alpha_initializer=keras.initializers.Constant(0.3)).scales().output, 3)
        1.355
    """

    def __init__(self, alpha_initializer="Zeros", alpha_regularizer=None, alpha_constraint=None, shared_axes=None,
                 constraint="to_output_scale", **kwargs):
        super().__init__(alpha_initializer=alpha_initializer, alpha_regularizer=alpha_regularizer,
                         alpha_constraint=alpha_constraint, shared_axes=shared_axes, **kwargs)
        self._init_rule(constraint)

    def rule_function(self):
        initial_slope = 0.0
        if isinstance(self.alpha_initializer, keras.initializers.Constant):
            initial_slope = float(self.alpha_initializer.get_config()["value"])
        return "relu" if initial_slope == 0 else _keras_function("leaky_relu", negative_slope=initial_slope)

    def homogeneous(self):
        return True


@keras.saving.register_keras_serializable(package="keras_unitscale")
class Softmax(UnitScaledActivation, keras.layers.Softmax):
    __doc__ = """A unit-scaled softmax layer: `keras.layers.Softmax` with the reference's softmax rule.

    The rule's size is the number of entries normalised together (the
    product of the sizes of `axis`), which must be known when it is called.
    Its output is not a probability (it sums to that size's power, not 1):
    `unit_scale` keeps Keras's `Softmax` where it makes predictions; use
    this one on hidden features, as `Activation("softmax")`.
""" + _ARGS.replace("{name}", "Softmax") + """
    Examples:
        >>> keras.ops.convert_to_numpy(Softmax()(np.zeros((1, 4), "float32"))).astype("float64").round(3).tolist()  # 1/4 each, × 4^0.9
        [[0.871, 0.871, 0.871, 0.871]]
    """

    def __init__(self, axis=-1, constraint="to_output_scale", **kwargs):
        super().__init__(axis=axis, **kwargs)
        self._init_rule(constraint)

    # Keras passes a mask it carries (from `Embedding(mask_zero=True)`, say) to a `call` that names it.
    def call(self, inputs, mask=None):
        return super().call(inputs, mask=mask)

    def scales(self, input_shape=None):
        if input_shape is None:
            raise ValueError("The softmax rule depends on the size normalised over: pass `input_shape`.")
        axes = self.axis if isinstance(self.axis, (tuple, list)) else (self.axis,)
        sizes = [input_shape[axis] for axis in axes]
        if any(size is None for size in sizes):
            raise ValueError(
                f"The unit-scaled softmax's rule depends on the size of the axes it normalises over, which must "
                f"be known. Received: input shape {tuple(input_shape)}, axis={self.axis!r}"
            )
        return rules.activations.softmax(math.prod(sizes), 1.0, self.constraint)
