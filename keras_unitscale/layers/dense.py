"""The unit-scaled `Dense` layer, and what it shares with `EinsumDense`."""

import keras

from keras_unitscale import checks
from keras_unitscale import precision
from keras_unitscale import rules
from keras_unitscale.layers import activation as activations
from keras_unitscale.layers.common import FoldedQuantization
from keras_unitscale.layers.common import LowRankAdapters
from keras_unitscale.layers.common import WeightMultipliers
from keras_unitscale.layers.common import check_fp8
from keras_unitscale.layers.common import unit_normal
from keras_unitscale.layers.common import without_activation
from keras_unitscale.ops import linear
from keras_unitscale.ops.common import LOW_PRECISION

# The roles of a kernel (biases and gains have their own).
ROLES = ("input", "hidden", "output")


class Projection:
    """The unit-scaling options of a projection (`Dense`, `EinsumDense`, the convolutions) and its activation."""

    def _init_projection(self, role, constraint, mult):
        if role is None:
            role = "output" if self._gives_probabilities() else "hidden"
        self.role = checks.one_of("role", role, ROLES)
        if constraint == "default":
            constraint = None if self.role == "output" else "to_output_scale"
        self.constraint = activations.check_constraint(constraint)
        self.mult = float(checks.positive("mult", mult))

    def _gives_probabilities(self):
        """Whether the activation makes this a prediction head (sigmoid, softmax): the readout's role by default."""
        return activations.resolve(self.activation) in activations.PROBABILITIES

    @property
    def _scale_power(self):
        return rules.linear.READOUT_POWERS if self.role == "output" else rules.linear.DENSE_POWERS

    def _activate(self, x):
        if self.role == "output":
            # A readout's activation gives the prediction (a probability, say),
            # whose values mean something: it stays Keras's plain function.
            if self.activation is None:
                return x
            if self._probabilities_in_float32():
                x = keras.ops.cast(x, "float32")
            return self.activation(x)
        return activations.apply(x, self.activation, self.mult, self.constraint)

    def _op_activation(self):
        """The arguments for an op that applies the activation itself: a hidden layer's (the unit-scaled one).

        A readout's stays Keras's plain function, which `_after_op` applies.
        """
        return {"activation": None if self.role == "output" else self.activation, "mult": self.mult}

    def _after_op(self, x):
        """`_activate`'s part that an op given `_op_activation()` leaves: a readout's activation."""
        return self._activate(x) if self.role == "output" else x

    def _probabilities_in_float32(self):
        """Whether this readout gives its probabilities in float32: a softmax or sigmoid head under float16/bfloat16.

        A loss on probabilities differentiates `-1/p`, which overflows float16
        once the true class's probability falls to about 1e-4; the losses
        read the logits a Keras softmax attaches to its output instead, but a
        JAX array traced in a training step cannot carry them. So the head
        does what Keras's mixed-precision guide advises for a model's output
        (`dtype="float32"` on its last layer): its logits are computed in the
        policy's dtype, its probabilities in float32, and the gradient that
        comes back through them to the logits, `p - target` times the loss's
        scale, is bounded.
        """
        return (self.role == "output" and self._gives_probabilities()
                and keras.backend.standardize_dtype(self.compute_dtype) in LOW_PRECISION)

    def compute_output_spec(self, *args, **kwargs):
        spec = super().compute_output_spec(*args, **kwargs)
        if not self._probabilities_in_float32():
            return spec
        return keras.tree.map_structure(lambda t: keras.KerasTensor(t.shape, "float32", sparse=t.sparse), spec)

    def projection_config(self):
        """The config entries of the unit-scaling options and the multipliers, for `get_config`."""
        return {"role": self.role, "constraint": self.constraint, "mult": self.mult, **self.multiplier_config()}


class MatmulProjection(Projection):
    """A projection whose product is a matmul (`Dense`, `EinsumDense`) or a convolution (a matmul over taps), which may run in scale-free FP8."""

    def _init_projection(self, role, constraint, mult, fp8=None, fp8_critical=False):
        self.fp8 = check_fp8(fp8)
        self.fp8_critical = bool(fp8_critical)
        super()._init_projection(role, constraint, mult)

    def _uses_fp8(self):
        return precision.uses_fp8(self.fp8, self.fp8_critical)

    def projection_config(self):
        return {**super().projection_config(), "fp8": self.fp8, "fp8_critical": self.fp8_critical}


@keras.saving.register_keras_serializable(package="keras_unitscale")
class Dense(MatmulProjection, FoldedQuantization, LowRankAdapters, WeightMultipliers, keras.layers.Dense):
    """A unit-scaled densely-connected layer: `keras.layers.Dense` with the unit-scaled op.

    Computes `activation(dense(inputs, kernel, bias))` with the unit-scaled
    ops of `keras_unitscale.ops`: the kernel starts at unit variance and the
    op applies `1/sqrt(fan_in)` (or `1/fan_in` for the readout), so the
    output, the input gradient and the weight gradients all start near unit
    scale whatever the width. Everything else is Keras's `Dense`: masking,
    configs, LoRA (`common.LowRankAdapters` states the unit-scaling rule on
    top of it), quantization (`quantize("int8")` and the quantized dtype
    policies: the dense rule's scales around Keras's quantized matmul, see
    `ops.linear.dense_around`), variable names and paths.

    Args:
        units: positive integer, the output size.
        activation: any activation Keras accepts, by name or as a function
            (the unit-scaled op, `ops.activations.apply`). "sigmoid" and
            "softmax" produce probabilities, as in Keras (the plain
            functions, and the readout's role by default: a final
            `Dense(1, activation="sigmoid")` still feeds
            `binary_crossentropy`); give `role="hidden"` (or use
            `Activation("sigmoid")`) for the unit-scaled op on a hidden
            feature.
        use_bias: whether to add a bias (zero-initialised).
        kernel_initializer: defaults to unit-variance normal.
        bias_initializer: as for `keras.layers.Dense`.
        kernel_regularizer: as for `keras.layers.Dense`.
        bias_regularizer: as for `keras.layers.Dense`.
        activity_regularizer: as for `keras.layers.Dense`.
        kernel_constraint: as for `keras.layers.Dense`.
        bias_constraint: as for `keras.layers.Dense`.
        lora_rank: as for `keras.layers.Dense`.
        quantization_config: as for `keras.layers.Dense`.
        lora_alpha: as for Keras; defaults to `rank^1/2` (see
            `common.LowRankAdapters`).
        role: the weight's u-μP role: "hidden", "input" (the first layer of
            a model: same op, its own learning-rate rule) or "output" (the
            readout: `ops.dense_readout`, `1/fan_in`, unconstrained, with
            Keras's plain activation). By default "output" for a layer whose
            activation is sigmoid or softmax (a prediction head) and
            "hidden" otherwise; give "output" for a readout that returns
            logits.
        constraint: how the op's forward and backward scales are tied (see
            `keras_unitscale.constraints`); the readout defaults to `None`.
        mult: the u-μP multiplier of the activation (gelu, silu, softmax).
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

    Examples:
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
        kernel_initializer=None,
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        lora_rank=None,
        lora_alpha=None,
        quantization_config=None,
        role=None,
        constraint="default",
        mult=1.0,
        weight_multipliers=None,
        lr_multipliers=None,
        fp8=None,
        fp8_critical=False,
        **kwargs,
    ):
        super().__init__(
            units,
            activation=activations.resolve(activation),
            use_bias=use_bias,
            kernel_initializer=kernel_initializer or unit_normal(),
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            lora_rank=lora_rank,
            lora_alpha=self._default_lora_alpha(lora_rank, lora_alpha),
            quantization_config=quantization_config,
            **kwargs,
        )
        self._init_weight_multipliers(weight_multipliers, lr_multipliers)
        self._init_projection(role, constraint, mult, fp8, fp8_critical)

    def build(self, input_shape):
        super().build(input_shape)
        self.declare_roles()

    def declare_roles(self):
        """Declares the weights' u-μP roles (after building, and again after quantizing)."""
        if hasattr(self, "_kernel"):  # GPTQ and AWQ keep a `quantized_kernel` only, which does not train
            fan_in = int(self.input_spec.axes[-1])  # the kernel may be packed (int4)
            self.declare_role(self._kernel, self.role, fan_in=fan_in, fan_out=self.units)
        if self.bias is not None:
            self.declare_role(self.bias, "bias", fan_out=self.units)

    def call(self, inputs, training=None):
        # Keras's `kernel` is the effective one, LoRA's low-rank update included.
        x = linear.dense(
            inputs, self.kernel, self.bias, constraint=self.constraint, scale_power=self._scale_power,
            fp8=self._uses_fp8(), weight_multipliers=self.forward_multipliers(self._kernel, self.bias),
            **self._op_activation(),
        )
        return self._after_op(x)

    def quantized_call(self, inputs, training=None):
        def product(x):
            with without_activation(self):
                return super(Dense, self).quantized_call(x, training=training)

        x = linear.dense_around(inputs, int(inputs.shape[-1]), self.units, product, self.constraint, self._scale_power)
        return self._activate(x)

    def get_config(self):
        return {**super().get_config(), **self.projection_config()}
