"""unit_scale inside custom Layer subclasses, subclassed models and wrappers: a deep copy, its sublayers converted."""

import warnings

import keras
import numpy as np
import pytest
from keras import layers
from keras import ops

from keras_unitscale import layers as L
from keras_unitscale import unit_scale
from keras_unitscale.convert import from_keras
from keras_unitscale.convert import match_epsilon


# The Keras examples' text classifier, as the example writes its two custom layers.
class TransformerBlock(layers.Layer):
    def __init__(self, embed_dim, num_heads, ff_dim, causal=False, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim, self.num_heads, self.ff_dim, self.causal = embed_dim, num_heads, ff_dim, causal
        self.att = layers.MultiHeadAttention(num_heads=num_heads, key_dim=embed_dim // num_heads)
        self.ffn = keras.Sequential([layers.Dense(ff_dim, activation="relu"), layers.Dense(embed_dim)])
        self.layernorm1 = layers.LayerNormalization(epsilon=1e-6)
        self.layernorm2 = layers.LayerNormalization(epsilon=1e-6)

    def call(self, inputs):
        attn_output = self.att(inputs, inputs, use_causal_mask=self.causal)
        out1 = self.layernorm1(inputs + attn_output)
        return self.layernorm2(out1 + self.ffn(out1))


class TokenAndPositionEmbedding(layers.Layer):
    def __init__(self, maxlen, vocab_size, embed_dim, **kwargs):
        super().__init__(**kwargs)
        self.maxlen, self.vocab_size, self.embed_dim = maxlen, vocab_size, embed_dim
        self.token_emb = layers.Embedding(input_dim=vocab_size, output_dim=embed_dim)
        self.pos_emb = layers.Embedding(input_dim=maxlen, output_dim=embed_dim)

    def call(self, x):
        positions = self.pos_emb(ops.arange(0, ops.shape(x)[-1]))
        return self.token_emb(x) + positions


class Scaled(layers.Layer):
    """A custom layer with a weight of its own and a layer Keras has no unit-scaled counterpart for."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.dense = layers.Dense(units, activation="tanh")  # a gelu or tanh output: nothing absorbs its constant
        self.proj = layers.Dense(units)
        self.gru = layers.GRU(units)

    def build(self, input_shape):
        self.gain = self.add_weight(shape=(self.units,), initializer="random_normal", name="gain")
        self.offset = self.add_weight(shape=(self.units,), initializer="random_normal", trainable=False, name="offset")

    def call(self, x):
        return self.gru(self.proj(self.dense(x))) * self.gain + self.offset


class LazyBlock(layers.Layer):
    """Creates its sublayer in `build`: its copy from a config has none to convert."""

    def build(self, input_shape):
        self.dense = layers.Dense(4)

    def call(self, x):
        return self.dense(x)


def _classifier(maxlen=12, vocab=50, width=16, causal=False):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((maxlen,), dtype="int32")
    x = TokenAndPositionEmbedding(maxlen, vocab, width)(inputs)
    x = TransformerBlock(width, 2, 32, causal=causal)(x)
    x = layers.GlobalAveragePooling1D()(x)
    x = layers.Dense(20, activation="relu")(x)
    return keras.Model(inputs, layers.Dense(2, activation="softmax")(x))


def _tokens(n=32, maxlen=12, vocab=50):
    x = np.random.default_rng(0).integers(0, vocab, (n, maxlen))
    return x, (x[:, 0] > vocab // 2).astype("int32")


def _converted(model, mode="equivalent"):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        twin = unit_scale(model, mode=mode)
    return twin, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def _sublayer_kinds(twin):
    """{sublayer path: 'ours' or 'keras'} for the Keras layers with weights inside the twin's custom layers."""
    kinds = {}
    for layer in twin.layers:
        for sub in layer._flatten_layers(include_self=False):
            if sub.weights and not sub._flatten_layers(include_self=False):
                kinds[f"{layer.name}/{sub.name}"] = type(sub).__module__.split(".")[0]
    return kinds


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "causal"])
def test_custom_layers_are_copied_and_their_sublayers_converted(causal):
    model = _classifier(causal=causal)
    x, _ = _tokens()
    before = [np.array(w) for w in model.get_weights()]
    twin, messages = _converted(model)
    # Every Dense, Embedding, attention projection and norm inside the custom layers is ours.
    kinds = _sublayer_kinds(twin)
    assert len(kinds) == 10 and set(kinds.values()) == {"keras_unitscale"}, kinds
    # A deep copy: no variable shared, the same paths, the original untouched.
    assert not {id(v) for v in model.weights} & {id(v) for v in twin.weights}
    assert sorted(v.path for v in twin.weights) == sorted(v.path for v in model.weights)
    assert sorted(twin.unit_scale_sources.values()) == sorted(v.path for v in model.weights)
    np.testing.assert_allclose(twin.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), before))
    # The Python between the sublayers is named once, with what it means and how to write it so it is seen.
    glue = [m for m in messages if "Python it cannot see" in m]
    assert len(glue) == 1 and "(TransformerBlock)" in glue[0] and "ResidualAdd" in glue[0]


def test_the_twin_of_a_custom_layer_model_trains_as_the_script():
    model = _classifier()
    x, y = _tokens()
    twin, _ = _converted(model)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    twin.compile(from_keras(keras.optimizers.Adam(1e-3)), "sparse_categorical_crossentropy")
    match_epsilon(twin, model, x, y)
    original = np.array([model.train_on_batch(x, y) for _ in range(8)])
    converted = np.array([twin.train_on_batch(x, y) for _ in range(8)])
    np.testing.assert_allclose(converted, original, rtol=1e-4)
    assert original[-1] < original[0]
    # Training the twin moved its weights, not the original's.
    model_weights = [np.array(w) for w in model.get_weights()]
    twin.train_on_batch(x, y)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), model_weights))


def test_reinit_converts_and_reinitialises_every_weight():
    model = _classifier()
    twin, _ = _converted(model, mode="reinit")
    assert set(_sublayer_kinds(twin).values()) == {"keras_unitscale"}
    for variable in twin.trainable_variables:
        values = ops.convert_to_numpy(variable)
        if variable.path.endswith(("kernel", "embeddings")):
            assert 0.8 < float(np.std(values)) < 1.2, variable.path  # unit-normal, fresh
    originals = {v.path: ops.convert_to_numpy(v) for v in model.weights}
    assert not any(np.array_equal(ops.convert_to_numpy(v), originals[v.path])
                   for v in twin.weights if v.path.endswith(("kernel", "embeddings")))


def test_what_a_custom_layer_keeps_is_copied_and_named():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5, 8))
    model = keras.Model(inputs, Scaled(6, name="scaled")(inputs))
    x = np.random.default_rng(0).normal(size=(4, 5, 8)).astype("float32")
    twin, messages = _converted(model)
    scaled = twin.get_layer("scaled")
    # The tanh Dense keeps Keras's class (its output constant has nowhere to go), and says so; the
    # linear projection after it converts; the GRU and the custom weight are copies.
    assert type(scaled.dense) is layers.Dense and type(scaled.proj).__module__.startswith("keras_unitscale")
    assert type(scaled.gru) is layers.GRU
    assert any("'dense" in m and "nothing around it can absorb" in m for m in messages)
    assert not {id(v) for v in model.weights} & {id(v) for v in twin.weights}
    np.testing.assert_allclose(twin.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    # Reinit: the kept GRU and the custom weight are re-initialised too.
    fresh, _ = _converted(model, mode="reinit")
    originals = {v.path: ops.convert_to_numpy(v) for v in model.weights}
    assert not any(np.array_equal(ops.convert_to_numpy(v), originals[v.path])
                   for v in fresh.get_layer("scaled").weights if "bias" not in v.path)


def test_wrappers():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 8))
    h = layers.TimeDistributed(layers.Dense(16, activation="relu"), name="per_step")(inputs)
    h = layers.Bidirectional(layers.LSTM(8), name="bi")(h)
    model = keras.Model(inputs, layers.Dense(3, activation="softmax")(h))
    x = np.random.default_rng(0).normal(size=(4, 6, 8)).astype("float32")
    twin, messages = _converted(model)
    assert type(twin.get_layer("per_step").layer).__module__.startswith("keras_unitscale")
    # An LSTM's unit-scaled output is a constant times Keras's, the same in both directions: the merge
    # commutes with it, and the Dense after it takes it.
    bi = twin.get_layer("bi")
    assert type(bi.forward_layer) is type(bi.backward_layer) is L.LSTM and bi.backward_layer.go_backwards
    assert not any("forward_lstm" in m or "'bi'" in m for m in messages), messages
    np.testing.assert_allclose(twin.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    fresh, _ = _converted(model, mode="reinit")
    bi = fresh.get_layer("bi")
    assert type(bi.forward_layer).__module__.startswith("keras_unitscale")
    assert type(bi.backward_layer).__module__.startswith("keras_unitscale") and bi.backward_layer.go_backwards


class ResidualModel(keras.Model):
    def __init__(self, units=16, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.hidden = layers.Dense(units, activation="relu")
        self.norm = layers.LayerNormalization()
        self.readout = layers.Dense(1)

    def call(self, x):
        h = self.hidden(x)
        return self.readout(self.norm(h) + h)


def test_a_subclassed_model():
    keras.utils.set_random_seed(0)
    model = ResidualModel()
    with pytest.raises(ValueError, match="not built|call it once"):
        unit_scale(model)
    x = np.random.default_rng(0).normal(size=(8, 5)).astype("float32")
    model(x)
    twin, messages = _converted(model)
    assert type(twin) is ResidualModel and twin is not model
    assert all(type(layer).__module__.startswith("keras_unitscale") for layer in (twin.hidden, twin.norm, twin.readout))
    np.testing.assert_allclose(twin.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    assert any("'residual_model' (ResidualModel)" in m for m in messages)
    # The dense layer that makes the model's output is its readout, as in a functional model.
    assert twin.readout.role == "output" and twin.hidden.role != "output"
    reinit, _ = _converted(model, mode="reinit")
    assert reinit.readout.role == "output" and reinit.hidden.role != "output"


class SoftmaxHeadModel(keras.Model):
    """The readout's output passes through Python (`ops.softmax`) before it is the model's: the last dense called is the readout."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = layers.Dense(8, activation="relu")
        self.head = layers.Dense(3)
        self.unused_probe = layers.Dense(2)  # made, never called

    def call(self, x):
        return ops.softmax(self.head(self.hidden(x)))


def test_a_subclassed_models_readout_is_the_last_dense_called():
    keras.utils.set_random_seed(0)
    model = SoftmaxHeadModel()
    x = np.random.default_rng(0).normal(size=(4, 5)).astype("float32")
    model(x)
    twin, _ = _converted(model, mode="reinit")
    assert twin.head.role == "output" and twin.hidden.role != "output"


def test_a_layer_that_makes_its_sublayers_in_build_is_kept_as_a_copy():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, LazyBlock(name="lazy")(inputs))
    twin, messages = _converted(model)
    assert any("'lazy'" in m and "build" in m for m in messages)
    x = np.ones((2, 3), "float32")
    np.testing.assert_allclose(twin.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_the_twin_of_a_custom_layer_model_saves_its_weights(tmp_path):
    model = _classifier()
    x, _ = _tokens()
    twin, _ = _converted(model)
    # Its custom layers' configs would rebuild Keras's sublayers: saving the whole model says so.
    with pytest.raises(ValueError, match="save_weights"):
        twin.save(tmp_path / "twin.keras")
    # The weights, multipliers included, restore into a new twin of the same script's model.
    block = next(layer for layer in twin.layers if isinstance(layer, TransformerBlock))
    block.layernorm1.gamma.assign(np.full(16, 2.0, "float32"))
    twin.save_weights(tmp_path / "twin.weights.h5")
    restored, _ = _converted(_classifier())
    restored.load_weights(tmp_path / "twin.weights.h5")
    np.testing.assert_allclose(restored.predict(x, verbose=0), twin.predict(x, verbose=0), atol=1e-6)


class SharedBlock(layers.Layer):
    def __init__(self, shared, **kwargs):
        super().__init__(**kwargs)
        self.shared = shared
        self.after = layers.Dense(8)

    def call(self, x):
        return self.after(self.shared(x)) + x


class TiedModel(keras.Model):
    """A layer two parents hold: the model and its block (weight tying)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.shared = layers.Dense(8, activation="relu")
        self.block = SharedBlock(self.shared)

    def call(self, x):
        return self.shared(self.block(x))


def test_a_layer_two_parents_hold_converts_once():
    keras.utils.set_random_seed(0)
    model = TiedModel()
    x = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")
    model(x)
    twin, _ = _converted(model)
    assert twin.shared is twin.block.shared and type(twin.shared).__module__.startswith("keras_unitscale")
    np.testing.assert_allclose(twin.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


def test_a_layer_the_graph_and_a_custom_layer_share():
    # The graph's use gives the Dense an output ratio its two consumers cannot take back; inside the
    # custom layer its output must be the original's: the converted twin is reused only where it fits.
    keras.utils.set_random_seed(0)
    shared = layers.Dense(8, activation="relu")
    inputs = keras.Input((8,))
    h = shared(inputs)
    model = keras.Model(inputs, [layers.Dense(2)(h), layers.Dense(3)(h), SharedBlock(shared)(inputs)])
    x = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")
    twin, _ = _converted(model)
    for ours, theirs in zip(twin.predict(x, verbose=0), model.predict(x, verbose=0)):
        np.testing.assert_allclose(ours, theirs, atol=1e-5)


class NoKwargsEmbedding(layers.Layer):
    """As the Keras examples write a layer: a constructor without `**kwargs`."""

    def __init__(self, maxlen, vocab_size, embed_dim):
        super().__init__()
        self.token_emb = layers.Embedding(input_dim=vocab_size, output_dim=embed_dim)
        self.pos_emb = layers.Embedding(input_dim=maxlen, output_dim=embed_dim)

    def call(self, x):
        return self.token_emb(x) + self.pos_emb(ops.arange(0, ops.shape(x)[-1]))


def test_a_constructor_without_kwargs_is_copied_with_its_own_arguments():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((10,), dtype="int32")
    model = keras.Model(inputs, layers.Dense(3)(NoKwargsEmbedding(10, 20, 8)(inputs)))
    x = np.random.default_rng(0).integers(0, 20, (4, 10))
    twin, messages = _converted(model)
    embedding = twin.layers[1]
    assert embedding.name == model.layers[1].name and type(embedding.token_emb).__module__.startswith("keras_unitscale")
    assert not any("no usable config" in m for m in messages)
    np.testing.assert_allclose(twin.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


class DroppingBlock(layers.Layer):
    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.dense = layers.Dense(units, activation="relu")
        self.dropout = layers.Dropout(0.2)

    def call(self, x, training=False):
        return self.dropout(self.dense(x), training=training) + x


@pytest.mark.skipif(keras.backend.backend() == "torch",
                    reason="Keras's PyTorch dropout without a seed draws from torch's global generator")
def test_dropout_drops_what_the_original_drops():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    h = layers.Dropout(0.3)(DroppingBlock(8)(inputs))
    model = keras.Model(inputs, layers.Dense(2)(h))
    twin, _ = _converted(model)
    x = np.random.default_rng(0).normal(size=(16, 8)).astype("float32")
    for _ in range(2):  # the generators' states move alike
        np.testing.assert_allclose(ops.convert_to_numpy(twin(x, training=True)),
                                   ops.convert_to_numpy(model(x, training=True)), atol=1e-5)


def test_a_sublayer_of_a_built_layer_is_swapped_for_its_twin():
    # KerasHub's blocks build their attention in `build`: by the time its sublayers are swapped, Keras has locked
    # the attention's tracker against new state. The swap adds none of the layer's own, and the lock stays.
    from keras_unitscale.convert.inside import substitute

    attention = layers.MultiHeadAttention(2, 4)
    attention.build((1, 3, 8), (1, 3, 8))
    old, new = attention._softmax, L.Softmax()
    assert attention._tracker.locked
    substitute(attention, old, new)
    assert attention._softmax is new
    assert new in attention._layers and old not in attention._layers
    assert attention._tracker.locked
    with pytest.raises(ValueError, match="already built"):
        attention.extra = layers.Dense(2)  # still locked for what is new
