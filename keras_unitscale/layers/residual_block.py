"""What the blocks of a residual stack share: their place in it, their norms, dropout, multipliers and FP8 switch.

`TransformerBlock` and `RecurrentBlock` are `ResidualBlock`s: each is block
`index` of a stack of `depth`, takes its branches' `tau` from u-μP's depth
rule (`branch_taus`), opens each branch with a gain-only norm and closes it
with a linear projection, and gives its variables u-μP's `depth^-1/2`
learning-rate factor.
"""

import keras

from keras_unitscale import checks
from keras_unitscale import parametrization
from keras_unitscale import weights
from keras_unitscale.layers.common import check_fp8
from keras_unitscale.layers.normalization import LayerNormalization
from keras_unitscale.layers.normalization import RMSNormalization

NORMS = {"layer": LayerNormalization, "rms": RMSNormalization}


def gain_only_norm(kind, name, weight_multipliers, epsilon):
    """A gain-only norm: a layer norm without its bias, or an RMS norm (which has none)."""
    options = {"center": False} if kind == "layer" else {}
    if epsilon is not None:
        options["epsilon"] = epsilon
    return NORMS[kind](name=name, weight_multipliers=weight_multipliers, **options)


class ResidualBlock(keras.layers.Layer):
    """A block of a residual stack (see the module docstring); a subclass builds its layers.

    A subclass defines `branch_taus(index, depth)` (its branches' `tau`, in
    order) and `multiplier_holders()` ([(name, layer)] for the layers whose
    weight multipliers the block's `weight_multipliers` gathers), builds its
    layers with `sublayer_multipliers(name)` and calls `declare_depth()`
    when built.

    Args:
        index: this block's position in the stack, 0-based.
        depth: the number of blocks in the stack.
        dropout: dropout on each branch's output, in [0, 1).
        norm: "layer" (LayerNormalization without a bias) or "rms"
            (RMSNormalization).
        residual_mult: a hyperparameter of the depth rule.
        use_bias: biases on the projections (off, as in u-μP).
        weight_multipliers: fixed forward multipliers on the weights of the
            block's layers, by path within the block (see
            `common.WeightMultipliers`).
        fp8: the block's matmuls in scale-free FP8: None follows
            `keras_unitscale.precision`'s setting, True or False decide for all.
        **kwargs: base layer arguments.
    """

    def __init__(self, index=0, depth=1, dropout=0.0, norm="layer", residual_mult=1.0, use_bias=False,
                 weight_multipliers=None, fp8=None, **kwargs):
        super().__init__(**kwargs)
        self._initial_weight_multipliers = weights.check_multipliers("weight_multipliers", weight_multipliers)
        self.fp8 = check_fp8(fp8)
        self.depth = checks.positive_int("depth", depth)
        self.index = checks.index("index", index, depth, "depth")
        self.dropout = checks.rate("dropout", dropout)
        self.norm = checks.one_of("norm", norm, tuple(NORMS))
        self.residual_mult = residual_mult
        self.use_bias = bool(use_bias)
        self.supports_masking = True

    def branch_taus(self, index, depth):
        """The `tau` of each of this block's branches at `index` in a stack of `depth` (u-μP's depth rule)."""
        raise NotImplementedError(f"{type(self).__name__} must define `branch_taus(index, depth)`.")

    def multiplier_holders(self):
        """[(name, layer)]: the built block's layers with weight multipliers, under their names in its keys."""
        raise NotImplementedError(f"{type(self).__name__} must define `multiplier_holders()`.")

    def check_input_shape(self, input_shape):
        """The stream's width, checked: inputs are (batch, seq, width) with a known width."""
        if len(input_shape) != 3 or input_shape[-1] is None:
            raise ValueError(
                f"`{type(self).__name__}` takes inputs (batch, seq, width) with a known width. "
                f"Received: input_shape={tuple(input_shape)}"
            )
        return input_shape[-1]

    def sublayer_multipliers(self, layer_name):
        """The constructor's multipliers of one of the block's layers, from its "layer/variable" keys."""
        prefix = layer_name + "/"
        return {key[len(prefix):]: value for key, value in self._initial_weight_multipliers.items()
                if key.startswith(prefix)}

    def declare_depth(self):
        """Marks the block's variables as of a residual stack of `depth` (u-μP's learning-rate factor)."""
        parametrization.set_depth(self.trainable_variables, self.depth)

    @property
    def weight_multipliers(self):
        """{"layer/variable": multiplier} over the block's layers, for the multipliers that are not 1."""
        if not self.built:
            return dict(self._initial_weight_multipliers)
        return {f"{name}/{variable}": value for name, layer in self.multiplier_holders()
                for variable, value in layer.weight_multipliers.items()}

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "index": self.index,
            "depth": self.depth,
            "dropout": self.dropout,
            "norm": self.norm,
            "residual_mult": self.residual_mult,
            "use_bias": self.use_bias,
            "weight_multipliers": self.weight_multipliers,
            "fp8": self.fp8,
        }
