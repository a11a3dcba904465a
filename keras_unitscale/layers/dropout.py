"""The unit-scaled `Dropout` layer."""

import keras

from keras_unitscale.ops import activations


@keras.saving.register_keras_serializable(package="keras_unitscale")
class Dropout(keras.layers.Dropout):
    """Unit-scaled dropout: `keras.layers.Dropout` whose kept values keep the output at unit scale.

    The rule (`ops.activations.dropout`): `sqrt(1 - rate)` after Keras's
    inverted dropout, so the output keeps unit RMS rather than unit mean.
    Arguments, masks (`noise_shape`, `seed`) and config are Keras's.

    Examples:
        >>> layer = Dropout(0.5, seed=1)
        >>> x = np.ones((2, 3), "float32")
        >>> keras.ops.convert_to_numpy(layer(x, training=False)).tolist()
        [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """

    def call(self, inputs, training=False):
        if not training or self.rate == 0:
            return inputs
        return activations.dropout(inputs, self.rate, training=True, seed=self.seed_generator,
                                   noise_shape=self.noise_shape)
