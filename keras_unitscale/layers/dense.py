"""The unit-scaled `Dense` layer."""

import keras

from keras_unitscale import functional as U
from keras_unitscale import checks
from keras_unitscale import constraints
from keras_unitscale import precision
from keras_unitscale.layers import activation as activations
from keras_unitscale.layers.common import WeightMultipliers
from keras_unitscale.layers.common import check_fp8
from keras_unitscale.layers.common import unit_normal

# The roles of a kernel (biases and gains have their own).
ROLES = ("input", "hidden", "output")


@keras.saving.register_keras_serializable(package="keras_unitscale")
class Dense(WeightMultipliers, keras.layers.Layer):
    """A unit-scaled densely-connected layer: the drop-in for `keras.layers.Dense`.

    Computes `activation(dense(inputs, kernel, bias))` with the unit-scaled ops
    of `keras_unitscale.functional`: the kernel starts at unit variance and
    the op applies `1/sqrt(fan_in)` (or `1/fan_in` for the readout), so the
    output, the input gradient and the weight gradients all start near unit
    scale whatever the width.

    Args:
        units: positive integer, the output size.
        activation: None or one of "linear", "relu", "gelu", "silu",
            "swish", "tanh" (unit-scaled versions), "sigmoid" or "softmax".
            The last two produce probabilities, as in Keras (the unscaled
            functions: a final `Dense(1, activation="sigmoid")` still feeds
            `binary_crossentropy`); use `Activation("sigmoid")` for the
            unit-scaled op on a hidden feature.
        use_bias: whether to add a bias (zero-initialised).
        role: the weight's u-μP role: "hidden", "input" (the first layer of
            a model: same op, its own learning-rate rule) or "output" (the
            readout: `functional.dense_readout`, `1/fan_in`, unconstrained,
            with Keras's plain activation). By default "output" for a layer
            whose activation is sigmoid or softmax (a prediction head) and
            "hidden" otherwise; give "output" for a readout that returns
            logits.
        constraint: how the op's forward and backward scales are tied (see
            `keras_unitscale.constraints`); the readout defaults to `None`.
        mult: the u-μP multiplier of the activation (gelu, silu, softmax).
        kernel_initializer: defaults to unit-variance normal.
        bias_initializer: defaults to zeros.
        kernel_regularizer, bias_regularizer, activity_regularizer,
        kernel_constraint, bias_constraint: as for `keras.layers.Dense`.
        weight_multipliers: fixed forward multipliers on the weights,
            {"kernel": m, "bias": m} (see `common.WeightMultipliers`); set
            by `UnitScaleCallback` and `unit_scale`, rarely by hand.
        lr_multipliers: fixed learning-rate factors, by variable name (set
            by `unit_scale`; see `common.WeightMultipliers`).
        fp8: the matmul in scale-free FP8: None follows
            `keras_unitscale.precision`'s setting, True or False decide.
        fp8_critical: whether this is one of u-μP's critical matmuls (an
            MLP's down projection), which the global setting leaves in
            higher precision unless told otherwise.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Example:

    >>> layer = Dense(64, activation="relu")
    >>> y = layer(np.random.default_rng(0).normal(size=(512, 256)))
    >>> tuple(y.shape), bool(0.9 < float(keras.ops.sqrt(keras.ops.mean(y**2))) < 1.1)
    ((512, 64), True)
    """

    def __init__(
        self,
        units,
        activation=None,
        use_bias=True,
        role=None,
        constraint="default",
        mult=1.0,
        kernel_initializer=None,
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        weight_multipliers=None,
        lr_multipliers=None,
        fp8=None,
        fp8_critical=False,
        **kwargs,
    ):
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        self._init_weight_multipliers(weight_multipliers, lr_multipliers)
        self.units = checks.positive_int("units", units)
        self.fp8 = check_fp8(fp8)
        self.fp8_critical = bool(fp8_critical)
        self.activation = activations.check(activation)
        self.use_bias = bool(use_bias)
        if role is None:
            role = "output" if self.activation in activations.PROBABILITIES else "hidden"
        self.role = checks.one_of("role", role, ROLES)
        if constraint == "default":
            constraint = None if self.role == "output" else "to_output_scale"
        constraints.get(constraint)  # an unknown name fails here, not at the first call
        self.constraint = constraint
        self.mult = float(checks.positive("mult", mult))
        self.kernel_initializer = keras.initializers.get(kernel_initializer or unit_normal())
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.input_spec = keras.layers.InputSpec(min_ndim=2)
        self.supports_masking = True

    def build(self, input_shape):
        input_dim = input_shape[-1]
        if input_dim is None:
            raise ValueError(
                "The last dimension of the inputs to `Dense` must be known. "
                f"Received: input_shape={input_shape}"
            )
        self.kernel = self.add_weight(
            name="kernel",
            shape=(input_dim, self.units),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )
        self.declare_role(self.kernel, self.role, fan_in=input_dim, fan_out=self.units)
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.units,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
            self.declare_role(self.bias, "bias", fan_out=self.units)
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: input_dim})

    def call(self, inputs):
        op = U.dense_readout if self.role == "output" else U.dense
        x = op(inputs, self.multiplied(self.kernel), self.multiplied(self.bias), constraint=self.constraint,
               fp8=precision.uses_fp8(self.fp8, self.fp8_critical))
        if self.role == "output" or self.activation in activations.PROBABILITIES:
            # A readout's activation gives the prediction (a probability, say),
            # whose values mean something: it stays Keras's plain function.
            return keras.activations.get(self.activation)(x)
        return activations.apply(x, self.activation, self.mult, self.constraint)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "activation": self.activation,
            "use_bias": self.use_bias,
            "role": self.role,
            "constraint": self.constraint,
            "mult": self.mult,
            "fp8": self.fp8,
            "fp8_critical": self.fp8_critical,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
            "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
            "bias_constraint": keras.constraints.serialize(self.bias_constraint),
            **self.multiplier_config(),
        }
