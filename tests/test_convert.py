"""unit_scale(model): equivalent conversion keeps predictions and the Adam trajectory; reinit is unit-scaled."""

import warnings

import keras
import numpy as np
import pytest

from keras_unitscale import analysis
from keras_unitscale import layers as L
from keras_unitscale import optimizers
from keras_unitscale import unit_scale
from keras_unitscale.convert import from_keras
from keras_unitscale.convert import match_epsilon


def _seed_000_model():
    return keras.Sequential([
        keras.Input((30,)), keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1, activation="sigmoid"),
    ], name="seed_000")


def _lstm_text_model():
    return keras.Sequential([
        keras.Input((12,), dtype="int32"), keras.layers.Embedding(50, 32),
        keras.layers.LSTM(48, return_sequences=True), keras.layers.LSTM(40), keras.layers.Dense(50),
    ], name="lstm_text")


def _transformer(blocks=2, width=32, seq=16, vocab=40):
    tokens = keras.Input((seq,), dtype="int32")
    h = keras.layers.Embedding(vocab, width)(tokens)
    for _ in range(blocks):
        a = keras.layers.LayerNormalization()(h)
        a = keras.layers.MultiHeadAttention(4, width // 4)(a, a, use_causal_mask=True)
        h = keras.layers.Add()([h, a])
        m = keras.layers.LayerNormalization()(h)
        m = keras.layers.Dense(4 * width, activation="gelu")(m)
        m = keras.layers.Dropout(0.0)(keras.layers.Dense(width)(m))
        h = keras.layers.Add()([h, m])
    h = keras.layers.LayerNormalization()(h)
    return keras.Model(tokens, keras.layers.Dense(vocab)(h), name="transformer")


def _sparse_loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


CASES = {
    "seed_000": (_seed_000_model, lambda rng: rng.normal(size=(64, 30)).astype("float32"),
                 lambda x: (x[:, :1] + x[:, 1:2] > 0).astype("float32"), lambda: "binary_crossentropy"),
    "lstm_text": (_lstm_text_model, lambda rng: rng.integers(0, 50, (64, 12)), lambda x: x[:, -1], _sparse_loss),
    "transformer": (_transformer, lambda rng: rng.integers(0, 40, (32, 16)), lambda x: np.roll(x, -1, 1),
                    _sparse_loss),
}


@pytest.fixture(params=sorted(CASES))
def case(request):
    build, inputs, targets, loss = CASES[request.param]
    keras.utils.set_random_seed(0)
    model = build()
    x = inputs(np.random.default_rng(0))
    return model, x, targets(x), loss


def test_equivalent_conversion_predicts_and_trains_as_the_original(case):
    model, x, y, loss = case
    original_weights = [np.array(w) for w in model.get_weights()]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # everything in these models converts exactly
        twin = unit_scale(model)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), original_weights))  # untouched
    assert twin.unit_scale_notes == []
    assert all(type(layer).__module__.startswith("keras_unitscale") or isinstance(layer, keras.layers.Dropout)
               for layer in twin.layers if not isinstance(layer, keras.layers.InputLayer)), twin.layers
    for variable in twin.trainable_variables:
        rms = float(np.sqrt(np.mean(keras.ops.convert_to_numpy(variable) ** 2)))
        assert rms == pytest.approx(1.0, rel=1e-4) or rms == 0.0, variable.path  # zero biases stay zero
    np.testing.assert_allclose(twin.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5, rtol=1e-5)

    if keras.backend.backend() == "jax":
        return  # CI time: JAX's XLA compiles cost a minute here; TensorFlow and PyTorch check the trajectories
    # The learning-rate factors it fixes, and epsilon scaled per weight by
    # the ratio of the two models' gradients, make our Adam follow Keras's
    # (both at Keras's default epsilon).
    model.compile(keras.optimizers.Adam(1e-3), loss())
    twin.compile(optimizers.Adam(1e-3), loss())
    ratios = match_epsilon(twin, model, x, y)
    assert set(ratios) == {v.path for v in twin.trainable_variables if v.path in ratios}
    assert len(ratios) >= len(twin.trainable_variables) - 2, ratios  # zero-gradient weights keep factor 1
    original = np.array([model.train_on_batch(x, y) for _ in range(20)])
    converted = np.array([twin.train_on_batch(x, y) for _ in range(20)])
    np.testing.assert_allclose(converted, original, rtol=1e-4)
    assert original[-1] < original[0]


def test_match_epsilon_needs_a_compiled_twin_with_our_optimizer():
    keras.utils.set_random_seed(0)
    model = _seed_000_model()
    x = np.ones((4, 30), "float32")
    y = np.ones((4, 1), "float32")
    twin = unit_scale(model)
    with pytest.raises(ValueError, match="no `unit_scale_sources`"):
        match_epsilon(model, model, x, y)
    with pytest.warns(UserWarning, match="from_keras"):
        twin.compile(keras.optimizers.Adam(), "binary_crossentropy")
    with pytest.raises(ValueError, match="optimizer=Adam"):
        match_epsilon(twin, model, x, y)
    twin.compile(optimizers.Adam(), "binary_crossentropy")
    with pytest.raises(ValueError, match="compile `original`"):
        match_epsilon(twin, model, x, y)


KERAS_OPTIMIZERS = {
    "adam": lambda: keras.optimizers.Adam(1e-3),
    "adamw": lambda: keras.optimizers.AdamW(1e-3, weight_decay=0.5),
    "sgd": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "rmsprop": lambda: keras.optimizers.RMSprop(1e-3, centered=True),
    "lion": lambda: keras.optimizers.Lion(1e-4),
}


@pytest.mark.parametrize("name", sorted(KERAS_OPTIMIZERS))
def test_a_twin_compiled_as_the_script_compiles_follows_it(name):
    keras.utils.set_random_seed(0)
    model = _seed_000_model()
    x = np.random.default_rng(0).normal(size=(64, 30)).astype("float32")
    y = (x[:, :1] + x[:, 1:2] > 0).astype("float32")
    twin = unit_scale(model)
    # The script's own optimizer, as it is written: one warning, with the fix.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        twin.compile(KERAS_OPTIMIZERS[name](), "binary_crossentropy")
        twin.compile(KERAS_OPTIMIZERS[name](), "binary_crossentropy")
    assert sum("from_keras" in str(w.message) for w in caught) == 1
    # With the fix it steps along the script's trajectory.
    model.compile(KERAS_OPTIMIZERS[name](), "binary_crossentropy")
    twin.compile(from_keras(KERAS_OPTIMIZERS[name]()), "binary_crossentropy")
    match_epsilon(twin, model, x, y)
    original = np.array([model.train_on_batch(x, y) for _ in range(20)])
    converted = np.array([twin.train_on_batch(x, y) for _ in range(20)])
    np.testing.assert_allclose(converted, original, rtol=1e-4)
    assert original[-1] < original[0]


def test_from_keras_makes_the_scripts_loss_ours():
    from keras_unitscale import losses

    cases = {
        keras.losses.SparseCategoricalCrossentropy(from_logits=True, name="sce"): losses.SparseCategoricalCrossentropy,
        keras.losses.CategoricalCrossentropy(label_smoothing=0.1): losses.CategoricalCrossentropy,
        keras.losses.BinaryCrossentropy(from_logits=True): losses.BinaryCrossentropy,
        keras.losses.MeanSquaredError(): losses.MeanSquaredError,
        "sparse_categorical_crossentropy": losses.SparseCategoricalCrossentropy,
        "mse": losses.MeanSquaredError,
        keras.losses.binary_crossentropy: losses.BinaryCrossentropy,
    }
    for loss, ours in cases.items():
        converted = from_keras(loss)
        assert type(converted) is ours, loss
        if isinstance(loss, keras.losses.Loss):
            assert converted.get_config() == loss.get_config()
    mine = losses.MeanSquaredError()
    assert from_keras(mine) is mine
    with pytest.raises(ValueError, match="Received: loss=Huber"):
        from_keras(keras.losses.Huber())
    with pytest.raises(ValueError, match="Received: loss=hinge"):
        from_keras(keras.losses.hinge)
    with pytest.raises(ValueError, match="reduction='sum'"):
        from_keras(keras.losses.MeanSquaredError(reduction="sum"))


def _per_token_model(vocab=48, width=32, length=16):
    """A per-token language model head, as the mini GPT's: the loss averages over batch × length rows."""
    tokens = keras.Input((length,), dtype="int32")
    h = keras.layers.Embedding(vocab, width)(tokens)
    h = keras.layers.Dense(width, activation="relu")(h)
    return keras.Model(tokens, keras.layers.Dense(vocab)(h))


def _token_data(vocab=48, length=16, rows=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, vocab, size=(rows, length))
    return x, (x * 7 + 3) % vocab  # a learnable map, per token


def test_a_twin_with_the_scripts_loss_made_ours_follows_the_script():
    """The unit-scaled loss changes the gradient's scale only: with `match_epsilon`, the same trajectory."""
    keras.utils.set_random_seed(0)
    model = _per_token_model()
    x, y = _token_data()
    twin = unit_scale(model)
    script_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.Adam(1e-2), script_loss)
    twin.compile(from_keras(keras.optimizers.Adam(1e-2)), from_keras(script_loss))
    match_epsilon(twin, model, x, y)
    original = np.array([model.train_on_batch(x, y) for _ in range(15)])
    converted = np.array([twin.train_on_batch(x, y) for _ in range(15)])
    np.testing.assert_allclose(converted, original, rtol=1e-4)
    assert original[-1] < original[0]


def test_under_fp8_a_keras_loss_is_warned_about_and_ours_keeps_the_readout_gradient():
    """Keras's loss divides the logits' gradient by batch × length: E5M2 drops the small entries (the unlikely
    classes); the unit-scaled loss keeps them, and the readout's kernel gradient with it."""
    from keras_unitscale import precision
    from keras_unitscale.autodiff import vjp

    keras.utils.set_random_seed(0)
    model = _per_token_model()
    x, y = _token_data(rows=64)
    twin = unit_scale(model)
    readout = twin.layers[-1]

    def kernel_gradient(loss, fp8):
        def fn(kernel):
            with precision.fp8(enabled=fp8):
                logits = twin.stateless_call(
                    [kernel if v is readout.kernel else v.value for v in twin.trainable_variables],
                    [v.value for v in twin.non_trainable_variables], x)[0]
            return loss(y, logits)

        return np.asarray(vjp(fn, [readout.kernel.value], np.float32(1.0))[1][0], "float64")

    def error(loss):
        exact, cast = kernel_gradient(loss, False), kernel_gradient(loss, True)
        return np.sqrt(np.mean((cast - exact) ** 2) / np.mean(exact**2))

    keras_error = error(keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ours_error = error(from_keras(keras.losses.SparseCategoricalCrossentropy(from_logits=True)))
    # Measured (TensorFlow): Keras's loss 0.197, ours 0.069.
    assert ours_error < 0.1 < keras_error, (ours_error, keras_error)
    # Compiled in FP8 with Keras's loss: one warning, with the fix; with ours, none.
    with precision.fp8(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        twin.compile(from_keras("adam"), "sparse_categorical_crossentropy")
        twin.compile(from_keras("adam"), "sparse_categorical_crossentropy")
        twin.compile(from_keras("adam"), from_keras("sparse_categorical_crossentropy"))
    assert sum("from_keras(loss)" in str(w.message) for w in caught) == 1
    fresh = unit_scale(model)
    with warnings.catch_warnings(record=True) as caught:  # float32: the averaged gradient is harmless
        warnings.simplefilter("always")
        fresh.compile(from_keras("adam"), "sparse_categorical_crossentropy")
    assert not any("from_keras(loss)" in str(w.message) for w in caught)


def test_reinit_conversion_starts_at_unit_scale(case):
    model, x, _, _ = case
    twin = unit_scale(model, mode="reinit")
    report = analysis.scale_report(twin, x)
    readout = twin.layers[-1]
    assert readout.role == "output"
    # A unit gradient sent back through a probability head (seed 000's
    # sigmoid) shrinks by sigmoid' <= 1/4 before any layer of ours sees it:
    # there only the activations are checked.
    kinds = (analysis.ACTIVATION,) if keras.activations.serialize(readout.activation) == "sigmoid" else (analysis.ACTIVATION, analysis.GRADIENT)
    checked = 0
    for row in report.rows:
        if row["kind"] not in kinds:
            continue
        if row["layer"] == readout.name and row["kind"] == analysis.ACTIVATION:
            # u-μP's readout multiplies by 1/fan_in: its logits start at fan_in^-1/2 by design.
            continue
        assert 0.25 <= row["rms"] <= 4.0, row
        checked += 1
    assert checked >= len(twin.layers) - 1


def test_the_converted_model_saves_and_loads(tmp_path):
    keras.utils.set_random_seed(0)
    model = _transformer(blocks=1)
    x = np.random.default_rng(0).integers(0, 40, (4, 16))
    twin = unit_scale(model)
    twin.save(tmp_path / "twin.keras")
    loaded = keras.saving.load_model(tmp_path / "twin.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), twin.predict(x, verbose=0), atol=1e-6)
    dense = [layer for layer in loaded.layers if isinstance(layer, L.Dense)]
    assert dense and all(layer.lr_multipliers for layer in dense)
    optimizer = optimizers.Adam(1e-3)
    loaded.compile(optimizer, _sparse_loss())
    optimizer.build(loaded.trainable_variables)
    kernel = dense[0].kernel
    assert optimizer.lr_multiplier(kernel) == pytest.approx(dense[0].lr_multiplier("kernel"))


class Doubler(keras.layers.Layer):
    def call(self, x):
        return 2.0 * x


def test_an_unknown_layer_is_kept_and_named_in_one_warning():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), Doubler(name="doubler"),
                              keras.layers.Dense(4)])
    x = np.random.default_rng(0).normal(size=(5, 8)).astype("float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        twin = unit_scale(model)
    messages = [str(w.message) for w in caught if w.category is UserWarning]
    assert len(messages) == 1 and "'doubler' (Doubler)" in messages[0], messages
    assert isinstance(twin.layers[1], Doubler) and twin.layers[1] is not model.layers[1]
    assert isinstance(twin.layers[0], L.Dense) and isinstance(twin.layers[2], L.Dense)
    np.testing.assert_allclose(twin.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


def test_a_factor_nothing_can_absorb_gets_a_rescaling_layer():
    # Our tanh is 1.59·tanh, and nothing between it and a layer kept as it is
    # can take the factor back: a constant Rescaling does, exactly.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh", name="squash"),
                              Doubler(name="doubler"), keras.layers.Dense(4)])
    x = np.random.default_rng(0).normal(size=(5, 8)).astype("float32")
    with pytest.warns(UserWarning, match="'doubler' \\(Doubler\\)"):
        twin = unit_scale(model)
    assert [type(layer).__name__ for layer in twin.layers] == ["Dense", "Rescaling", "Doubler", "Dense"]
    assert twin.unit_scale_notes == []
    np.testing.assert_allclose(twin.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


def test_what_cannot_be_made_equivalent_is_reported():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,), dtype="int32"), keras.layers.Embedding(20, 8),
                              keras.layers.LSTM(8, dropout=0.1, name="noisy"), keras.layers.Dense(2)])
    with pytest.warns(UserWarning, match="could not make these exactly equivalent: 'noisy': its dropout"):
        twin = unit_scale(model)
    assert [name for name, _ in twin.unit_scale_notes] == ["noisy"]
    x = np.random.default_rng(0).integers(0, 20, (3, 6))
    np.testing.assert_allclose(twin.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


def test_shared_layers_and_several_inputs_and_outputs():
    keras.utils.set_random_seed(0)
    left, right = keras.Input((6,), name="left"), keras.Input((6,), name="right")
    shared = keras.layers.Dense(12, activation="relu", name="shared")
    merged = keras.layers.Add(name="merge")([shared(left), shared(right)])
    hidden = keras.layers.Dense(12, activation="tanh", name="hidden")(merged)
    inner = keras.Sequential([keras.Input((12,)), keras.layers.Dense(8, activation="relu")], name="inner")
    outputs = [keras.layers.Dense(1, activation="sigmoid", name="yes_no")(inner(hidden)),
               keras.layers.Dense(3, name="scores")(hidden)]
    model = keras.Model([left, right], outputs)
    rng = np.random.default_rng(0)
    x = [rng.normal(size=(7, 6)).astype("float32") for _ in range(2)]
    twin = unit_scale(model)
    assert twin.unit_scale_notes == []
    assert isinstance(twin.get_layer("shared"), L.Dense) and isinstance(twin.get_layer("merge"), L.Add)
    assert isinstance(twin.get_layer("inner").layers[0], L.Dense)
    for ours, theirs in zip(twin.predict(x, verbose=0), model.predict(x, verbose=0)):
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)


def test_residual_adds_take_the_depth_rule_or_a_given_tau():
    model = _transformer(blocks=2)
    adds = [layer for layer in unit_scale(model).layers if isinstance(layer, L.ResidualAdd)]
    # Four branches (two blocks): tau_i = 1/sqrt(4/2 + i).
    assert [round(layer.tau, 3) for layer in adds] == [0.707, 0.577, 0.5, 0.447]
    assert {layer.tau for layer in unit_scale(model, residual_rule=0.3).layers
            if isinstance(layer, L.ResidualAdd)} == {0.3}


def test_what_it_refuses():
    class Subclassed(keras.Model):
        def call(self, x):
            return x

    # Subclassed models convert (tests/test_convert_inside.py), once built, when they hold something to convert.
    subclassed = Subclassed()
    with pytest.raises(ValueError, match="needs a built model"):
        unit_scale(subclassed)
    subclassed(np.ones((2, 3), "float32"))
    with pytest.raises(ValueError, match="nothing to convert in the subclassed model 'subclassed"):
        unit_scale(subclassed)
    with pytest.raises(ValueError, match="mode.*Received: mode='exact'"):
        unit_scale(_seed_000_model(), mode="exact")
    with pytest.raises(ValueError, match="residual_rule.*Received: residual_rule=-1"):
        unit_scale(_seed_000_model(), residual_rule=-1)


def test_a_residual_on_the_model_input_around_attention_without_a_norm():
    keras.utils.set_random_seed(0)
    x_in = keras.Input((6, 16))
    attended = keras.layers.MultiHeadAttention(2, 8)(x_in, x_in)
    h = keras.layers.Add()([x_in, attended])
    model = keras.Model(x_in, keras.layers.Dense(3)(keras.layers.LayerNormalization()(h)))
    x = np.random.default_rng(0).normal(size=(4, 6, 16)).astype("float32")
    twin = unit_scale(model)
    assert any(isinstance(layer, L.ResidualSplit) for layer in twin.layers)
    np.testing.assert_allclose(twin.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_over_sequences_of_any_length_converts_exactly_at_every_length(causal):
    """A model that takes sequences of any length: the twin's attention scale is fixed at one key length."""
    keras.utils.set_random_seed(0)
    x_in = keras.Input((None, 16))
    attended = keras.layers.MultiHeadAttention(2, 8, name="attention")(x_in, x_in, use_causal_mask=causal)
    model = keras.Model(x_in, keras.layers.Dense(3)(attended))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        twin = unit_scale(model)
    assert not [str(w.message) for w in caught if "exactly equivalent" in str(w.message)]
    assert twin.get_layer("attention").rule_key_length is not None
    for length in (4, 11):
        x = np.random.default_rng(length).normal(size=(2, length, 16)).astype("float32")
        np.testing.assert_allclose(twin.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not hasattr(keras.layers, "RMSNormalization"), reason="Keras < 3.9 has no RMSNormalization")
def test_einsum_projections_and_rms_norms_convert():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5, 12))
    h = keras.layers.EinsumDense("abc,cd->abd", output_shape=(None, 20), bias_axes="d", activation="relu")(inputs)
    h = keras.layers.RMSNormalization()(h)
    model = keras.Model(inputs, keras.layers.EinsumDense("abc,cd->abd", output_shape=(None, 4))(h))
    x = np.random.default_rng(0).normal(size=(3, 5, 12)).astype("float32")
    twin = unit_scale(model)
    assert [type(layer).__name__ for layer in twin.layers[1:]] == ["Dense", "RMSNormalization", "Dense"]
    np.testing.assert_allclose(twin.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5, rtol=1e-5)
