"""The unit-scaled `Add` layer."""

import keras

from keras_unitscale import constraints
from keras_unitscale import functional as U


@keras.saving.register_keras_serializable(package="keras_unitscale")
class Add(keras.layers.Layer):
    """The unit-scaled sum of two tensors: the drop-in for `keras.layers.Add`.

    `functional.add`: `(a + b) / sqrt(2)`, so two unit-scaled inputs give a
    unit-scaled output; with the default constraint the gradient is the true
    gradient of that function. Used as a residual join (`x + branch(x)`) it
    is an equal-weight residual (tau = 1); for u-μP's depth-dependent weights
    use `ResidualSplit`/`ResidualAdd` or `Residual`.

    Args:
        constraint: how the op's forward and backward scales are tied (see
            `keras_unitscale.constraints`).
        **kwargs: base layer arguments.

    Example:

    >>> x = np.ones((1, 2), "float32")
    >>> keras.ops.convert_to_numpy(Add()([x, x])).astype("float64").round(4).tolist()
    [[1.4142, 1.4142]]
    """

    def __init__(self, constraint="to_output_scale", **kwargs):
        super().__init__(**kwargs)
        constraints.get(constraint)  # an unknown name fails here, not at the first call
        self.constraint = constraint
        self.supports_masking = True
        self.built = True

    def call(self, inputs):
        if not isinstance(inputs, (list, tuple)) or len(inputs) != 2:
            raise ValueError(
                "The unit-scaled `Add` sums exactly two tensors. Received: "
                + (f"{len(inputs)} inputs" if isinstance(inputs, (list, tuple)) else f"a {type(inputs).__name__}")
            )
        return U.add(inputs[0], inputs[1], constraint=self.constraint)

    def compute_output_shape(self, input_shape):
        a, b = (tuple(shape) for shape in input_shape)
        rank = max(len(a), len(b))
        a, b = (1,) * (rank - len(a)) + a, (1,) * (rank - len(b)) + b
        return tuple(y if x == 1 else x for x, y in zip(a, b))

    def compute_mask(self, inputs, mask=None):
        if mask is None or all(m is None for m in mask):
            return None
        masks = [m for m in mask if m is not None]
        return masks[0] if len(masks) == 1 else keras.ops.logical_and(masks[0], masks[1])

    def get_config(self):
        return {**super().get_config(), "constraint": self.constraint}
