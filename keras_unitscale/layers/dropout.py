"""The unit-scaled `Dropout` layer."""

import keras

from keras_unitscale import functional as U
from keras_unitscale import checks


@keras.saving.register_keras_serializable(package="keras_unitscale")
class Dropout(keras.layers.Layer):
    """Unit-scaled dropout: kept values are scaled so the output keeps unit scale.

    The drop-in for `keras.layers.Dropout`; see `functional.dropout` for the
    rule (`sqrt(1 - rate)` after inverted dropout).

    Args:
        rate: the fraction dropped, in [0, 1).
        noise_shape: as for Keras.
        seed: an int, for reproducible masks.
        **kwargs: base layer arguments.

    Example:

    >>> layer = Dropout(0.5, seed=1)
    >>> x = np.ones((2, 3), "float32")
    >>> keras.ops.convert_to_numpy(layer(x, training=False)).tolist()
    [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """

    def __init__(self, rate, noise_shape=None, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rate = checks.rate("rate", rate)
        self.noise_shape = noise_shape
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed) if self.rate > 0 else None
        self.supports_masking = True
        self.built = True

    def call(self, inputs, training=False):
        if not training or self.rate == 0:
            return inputs
        return U.dropout(inputs, self.rate, training=True, seed=self.seed_generator, noise_shape=self.noise_shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "noise_shape": self.noise_shape, "seed": self.seed}
