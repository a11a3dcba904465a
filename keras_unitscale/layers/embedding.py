"""The unit-scaled `Embedding` layer."""

import keras
from keras import ops

from keras_unitscale import functional as U
from keras_unitscale import checks
from keras_unitscale.layers.common import WeightMultipliers
from keras_unitscale.layers.common import unit_normal


@keras.saving.register_keras_serializable(package="keras_unitscale")
class Embedding(WeightMultipliers, keras.layers.Layer):
    """A unit-scaled embedding: the drop-in for `keras.layers.Embedding`.

    Rows start at unit variance and are returned as they are; the table's
    gradient is scaled by `sqrt(input_dim / tokens)` (see
    `functional.embedding`). In u-μP this is the model's input weight.

    Args:
        input_dim: vocabulary size, a positive integer.
        output_dim: embedding size, a positive integer.
        mask_zero: whether id 0 is padding, to be masked downstream (as in
            Keras; `input_dim` then counts it).
        embeddings_initializer: defaults to unit-variance normal.
        embeddings_regularizer, embeddings_constraint: as for Keras.
        weight_multipliers: fixed forward multipliers on the weights, by
            variable name (see `common.WeightMultipliers`).
        lr_multipliers: fixed learning-rate factors, by variable name (set
            by `unit_scale`; see `common.WeightMultipliers`).
        **kwargs: base layer arguments.

    Example:

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
        mask_zero=False,
        embeddings_initializer=None,
        embeddings_regularizer=None,
        embeddings_constraint=None,
        weight_multipliers=None,
        lr_multipliers=None,
        **kwargs,
    ):
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self._init_weight_multipliers(weight_multipliers, lr_multipliers)
        self.input_dim = checks.positive_int("input_dim", input_dim)
        self.output_dim = checks.positive_int("output_dim", output_dim)
        self.mask_zero = bool(mask_zero)
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer or unit_normal())
        self.embeddings_regularizer = keras.regularizers.get(embeddings_regularizer)
        self.embeddings_constraint = keras.constraints.get(embeddings_constraint)
        self.supports_masking = self.mask_zero

    def build(self, input_shape=None):
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=(self.input_dim, self.output_dim),
            initializer=self.embeddings_initializer,
            regularizer=self.embeddings_regularizer,
            constraint=self.embeddings_constraint,
        )
        # A lookup reads one row: its fan-in is 1.
        self.declare_role(self.embeddings, "input", fan_in=1, fan_out=self.output_dim)

    def call(self, inputs):
        if "int" not in keras.backend.standardize_dtype(inputs.dtype):
            inputs = ops.cast(inputs, "int32")
        return ops.cast(U.embedding(inputs, self.multiplied(self.embeddings)), self.compute_dtype)

    def compute_mask(self, inputs, mask=None):
        if not self.mask_zero:
            return None
        return ops.not_equal(inputs, 0)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape) + (self.output_dim,)

    def get_config(self):
        return {
            **super().get_config(),
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "mask_zero": self.mask_zero,
            "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
            "embeddings_regularizer": keras.regularizers.serialize(self.embeddings_regularizer),
            "embeddings_constraint": keras.constraints.serialize(self.embeddings_constraint),
            **self.multiplier_config(),
        }
