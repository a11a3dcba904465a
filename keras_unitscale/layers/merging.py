"""The unit-scaled `Add` layer."""

import keras

from keras_unitscale.layers.activation import check_constraint
from keras_unitscale.ops import linear


@keras.saving.register_keras_serializable(package="keras_unitscale")
class Add(keras.layers.Add):
    """The unit-scaled sum of tensors: `keras.layers.Add` with `ops.linear.sum_of`.

    `n` unit-scaled inputs give a unit-scaled output (`(a + b) / sqrt(2)`
    for two); with the default constraint the gradient is the true gradient
    of that function. Masks, broadcasting and config are Keras's. Used as a
    residual join (`x + branch(x)`) it is an equal-weight residual (tau =
    1); for u-μP's depth-dependent weights use `ResidualSplit`/`ResidualAdd`
    or `Residual`.

    Args:
        constraint: how the op's forward and backward scales are tied (see
            `keras_unitscale.constraints`).
        **kwargs: base layer arguments.

    Examples:
        >>> x = np.ones((1, 2), "float32")
        >>> keras.ops.convert_to_numpy(Add()([x, x])).astype("float64").round(4).tolist()
        [[1.4142, 1.4142]]
    """

    def __init__(self, constraint="to_output_scale", **kwargs):
        super().__init__(**kwargs)
        self.constraint = check_constraint(constraint)

    def _merge_function(self, inputs):
        return linear.sum_of(list(inputs), self.constraint)

    def get_config(self):
        return {**super().get_config(), "constraint": self.constraint}
