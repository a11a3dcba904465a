"""The unit-scaled `Embedding` layer."""

import keras
from keras import ops

from keras_unitscale.layers.common import FoldedQuantization
from keras_unitscale.layers.common import LowRankAdapters
from keras_unitscale.layers.common import WeightMultipliers
from keras_unitscale.layers.common import unit_normal
from keras_unitscale.ops import linear
from keras_unitscale.ops.common import cast_to


@keras.saving.register_keras_serializable(package="keras_unitscale")
class Embedding(FoldedQuantization, LowRankAdapters, WeightMultipliers, keras.layers.Embedding):
    """A unit-scaled embedding: `keras.layers.Embedding` with the unit-scaled lookup.

    Rows start at unit variance and are returned as they are; the table's
    gradient is scaled by `sqrt(input_dim / tokens)` (`ops.linear.embedding`).
    In u-μP this is the model's input weight. Everything else is Keras's:
    masking, ragged ids, `weights=`, LoRA (`common.LowRankAdapters`: `A` is
    looked up like the table, an input weight), quantization (a quantized
    lookup is Keras's: the forward scale is 1 and the table no longer
    trains), configs.

    Args:
        input_dim: as for `keras.layers.Embedding`.
        output_dim: as for `keras.layers.Embedding`.
        embeddings_regularizer: as for `keras.layers.Embedding`.
        embeddings_constraint: as for `keras.layers.Embedding`.
        mask_zero: as for `keras.layers.Embedding`.
        weights: as for `keras.layers.Embedding`.
        lora_rank: as for `keras.layers.Embedding`.
        quantization_config: as for `keras.layers.Embedding`.
        embeddings_initializer: defaults to unit-variance normal.
        lora_alpha: as for Keras; defaults to `rank^1/2`.
        weight_multipliers: fixed forward multipliers on the weights, by
            variable name (see `common.WeightMultipliers`).
        lr_multipliers: fixed learning-rate factors, by variable name (set
            by `unit_scale`; see `common.WeightMultipliers`).
        **kwargs: base layer arguments.

    Examples:
        >>> layer = Embedding(10, 4, mask_zero=True)
        >>> tuple(layer(np.array([[1, 2, 0]])).shape)
        (1, 3, 4)
        >>> keras.ops.convert_to_numpy(layer.compute_mask(np.array([[1, 2, 0]]))).tolist()
        [[True, True, False]]
    """

    def __init__(
        self,
        input_dim,
        output_dim,
        embeddings_initializer=None,
        embeddings_regularizer=None,
        embeddings_constraint=None,
        mask_zero=False,
        weights=None,
        lora_rank=None,
        lora_alpha=None,
        quantization_config=None,
        weight_multipliers=None,
        lr_multipliers=None,
        **kwargs,
    ):
        # Before Keras's constructor, which builds the layer when given `weights`.
        self._init_weight_multipliers(weight_multipliers, lr_multipliers)
        super().__init__(
            input_dim,
            output_dim,
            embeddings_initializer=embeddings_initializer or unit_normal(),
            embeddings_regularizer=embeddings_regularizer,
            embeddings_constraint=embeddings_constraint,
            mask_zero=mask_zero,
            weights=weights,
            lora_rank=lora_rank,
            lora_alpha=self._default_lora_alpha(lora_rank, lora_alpha),
            quantization_config=quantization_config,
            **kwargs,
        )

    def build(self, input_shape=None):
        if self.built:
            return
        super().build(input_shape)
        self.declare_roles()

    def declare_roles(self):
        """Declares the table's u-μP role (after building, and again after quantizing)."""
        # A lookup reads one row: its fan-in is 1.
        self.declare_role(self._embeddings, "input", fan_in=1, fan_out=self.output_dim)

    def _lora_variables(self):
        return self._embeddings, self.lora_embeddings_a, self.lora_embeddings_b

    def call(self, inputs):
        if hasattr(inputs, "flat_values"):  # a ragged batch: the lookup is the same on its values
            return inputs.with_flat_values(self.call(inputs.flat_values))
        if "int" not in keras.backend.standardize_dtype(inputs.dtype):
            inputs = ops.cast(inputs, "int32")
        # Keras's `embeddings` is the effective table, LoRA's low-rank update included.
        (multiplier,) = self.forward_multipliers(self._embeddings)
        return cast_to(linear.embedding(inputs, self.embeddings, multiplier), self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), **self.multiplier_config()}
