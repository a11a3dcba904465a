"""What Keras gives a layer keeps working on ours: LoRA, quantization, configs, sparse and ragged inputs.

Our layers subclass Keras's (issue 18); each test here checks a feature of
Keras's layer on the unit-scaled one, with the unit-scaling rule on top
where the feature changes the computation.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_unitscale import layers as L
from keras_unitscale import parametrization
from keras_unitscale import rules
from tests.helpers import BACKEND
from tests.helpers import rms
from tests.helpers import unit_normal

KERAS_TWINS = [
    (L.Dense, keras.layers.Dense, dict(units=8)),
    (L.Embedding, keras.layers.Embedding, dict(input_dim=20, output_dim=8)),
    (L.LayerNormalization, keras.layers.LayerNormalization, dict()),
    (L.RMSNormalization, keras.layers.RMSNormalization, dict()),
    (L.Dropout, keras.layers.Dropout, dict(rate=0.25)),
    (L.Add, keras.layers.Add, dict()),
    (L.Activation, keras.layers.Activation, dict(activation="elu")),
]


@pytest.mark.parametrize("ours, theirs, kwargs", KERAS_TWINS, ids=[t[1].__name__ for t in KERAS_TWINS])
def test_each_layer_is_the_keras_layer_and_reads_its_config(ours, theirs, kwargs):
    assert issubclass(ours, theirs)
    config = theirs(**kwargs).get_config()
    layer = ours.from_config(config)
    assert isinstance(layer, theirs)
    for key, value in config.items():
        if key not in ("kernel_initializer", "embeddings_initializer", "name"):
            assert layer.get_config()[key] == value, key


@pytest.mark.parametrize("rank", [2, 8, 32])
def test_lora_update_on_dense_is_unit_scale_whatever_the_rank(rank):
    """The stated rule: with unit-normal factors the low-rank path is two unit-scaled matmuls."""
    x = unit_normal(1024, 256)
    layer = L.Dense(128)
    base = ops.convert_to_numpy(layer(x))
    layer.enable_lora(rank)
    assert layer.lora_alpha == pytest.approx(rules.linear.lora_alpha(rank))
    np.testing.assert_allclose(ops.convert_to_numpy(layer(x)), base, atol=1e-6)  # B starts at zero
    assert rms(layer.lora_kernel_a) == pytest.approx(1.0, rel=0.1)  # unit-normal A
    layer.lora_kernel_b.assign(unit_normal(rank, 128, seed=1))
    assert rms(ops.convert_to_numpy(layer(x)) - base) == pytest.approx(1.0, rel=0.2)


def test_lora_factors_have_u_mup_roles():
    layer = L.Dense(64)
    layer.build((None, 256))
    layer.enable_lora(4)
    role_a = parametrization.role_of(layer.lora_kernel_a)
    role_b = parametrization.role_of(layer.lora_kernel_b)
    assert (role_a.role, role_a.fan_in) == ("hidden", 256)  # A reads the layer's input
    assert (role_b.role, role_b.fan_in) == ("hidden", 4)  # B reads the rank-4 code
    assert role_a.lr_multiplier("adam") == pytest.approx(256**-0.5)
    assert role_b.lr_multiplier("adam") == pytest.approx(4**-0.5)
    embedding = L.Embedding(50, 16)
    embedding.build()
    embedding.enable_lora(4)
    assert parametrization.role_of(embedding.lora_embeddings_a).role == "input"  # looked up, as the table
    assert not layer._kernel.trainable and not embedding._embeddings.trainable


def _lora_model():
    inputs = keras.Input((12,), dtype="int32")
    x = L.Embedding(40, 32, name="embed")(inputs)
    x = L.Dense(32, activation="relu", name="hidden")(x)
    outputs = L.Dense(40, role="output", name="readout")(x)
    return keras.Model(inputs, outputs)


def test_lora_fine_tuning_saves_and_reloads(tmp_path):
    keras.utils.set_random_seed(0)
    model = _lora_model()
    tokens = np.random.default_rng(0).integers(1, 40, size=(64, 12))
    targets = np.roll(tokens, 1, axis=1)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(tokens, targets, epochs=1, verbose=0)
    frozen = {v.path: ops.convert_to_numpy(v) for v in model.weights}
    for name in ("embed", "hidden", "readout"):
        model.get_layer(name).enable_lora(4)
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    losses = model.fit(tokens, targets, epochs=3, verbose=0).history["loss"]
    assert losses[-1] < losses[0]
    assert len(model.trainable_weights) == 6 + 2  # two factors per layer, and the two biases
    for variable in model.weights:
        if variable.path in frozen and not variable.trainable:
            np.testing.assert_array_equal(ops.convert_to_numpy(variable), frozen[variable.path])
    predictions = ops.convert_to_numpy(model.predict(tokens, verbose=0))
    path = str(tmp_path / "lora.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_allclose(ops.convert_to_numpy(reloaded.predict(tokens, verbose=0)), predictions,
                               rtol=1e-5, atol=1e-5)
    weights_path = str(tmp_path / "lora.weights.h5")
    model.save_weights(weights_path)
    fresh = _lora_model()
    for name in ("embed", "hidden", "readout"):
        fresh.get_layer(name).enable_lora(4)
    fresh.load_weights(weights_path)  # Keras saves the merged kernel: the function is the same
    np.testing.assert_allclose(ops.convert_to_numpy(fresh.predict(tokens, verbose=0)), predictions,
                               rtol=1e-5, atol=1e-5)


def _relative_error(approximate, exact):
    return rms(approximate - exact) / rms(exact)


def _plain_copy(layer, input_shape):
    """A Keras layer computing what `layer` computes at initialisation: the kernel carries the op's scale."""
    config = keras.layers.Dense(layer.units).get_config() if isinstance(layer, L.Dense) else None
    plain = keras.layers.Dense.from_config(config)
    plain.build(input_shape)
    fan_in = input_shape[-1]
    plain.kernel.assign(ops.convert_to_numpy(layer.kernel) * fan_in**-0.5)
    return plain


@pytest.mark.parametrize("mode", ["int8", "int4", "float8"])
def test_quantized_dense_is_within_keras_own_quantization_error(mode):
    keras.utils.set_random_seed(0)
    x = unit_normal(256, 128)
    ours = L.Dense(64)
    ours.build((None, 128))
    plain = _plain_copy(ours, (None, 128))
    exact = ops.convert_to_numpy(ours(x))
    np.testing.assert_allclose(ops.convert_to_numpy(plain(x)), exact, rtol=1e-5, atol=1e-5)
    ours.quantize(mode)
    plain.quantize(mode)
    assert ours.quantization_mode == mode
    ours_error = _relative_error(ops.convert_to_numpy(ours(x)), exact)
    keras_error = _relative_error(ops.convert_to_numpy(plain(x)), exact)
    assert ours_error <= keras_error * 1.05 + 1e-6, (ours_error, keras_error)


def test_quantized_dtype_policy_loads_a_quantized_unit_scaled_dense():
    x = unit_normal(256, 128)
    quantized = L.Dense(64)
    exact = ops.convert_to_numpy(quantized(x))
    quantized.quantize("int8")
    layer = L.Dense(64, dtype="int8_from_float32")  # what a saved quantized model is rebuilt with
    layer.build((None, 128))
    assert layer.quantization_mode == "int8" and layer._kernel.dtype == "int8"
    layer.set_weights(quantized.get_weights())
    y = ops.convert_to_numpy(layer(x))
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, ops.convert_to_numpy(quantized(x)))
    assert _relative_error(y, exact) < 0.02


def test_quantizing_folds_the_weight_multipliers():
    x = unit_normal(64, 32)
    layer = L.Dense(16, weight_multipliers={"kernel": 0.5, "bias": 2.0}, bias_initializer="ones")
    exact = ops.convert_to_numpy(layer(x))
    layer.quantize("int8")
    assert layer.weight_multipliers == {}
    assert _relative_error(ops.convert_to_numpy(layer(x)), exact) < 0.02


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_embedding_is_within_keras_own_quantization_error(mode):
    ids = np.random.default_rng(0).integers(0, 100, size=(8, 16))
    ours = L.Embedding(100, 32)
    plain = keras.layers.Embedding(100, 32)
    ours.build()
    plain.build()
    plain.embeddings.assign(ops.convert_to_numpy(ours.embeddings))
    exact = ops.convert_to_numpy(ours(ids))
    ours.quantize(mode)
    plain.quantize(mode)
    ours_error = _relative_error(ops.convert_to_numpy(ours(ids)), exact)
    keras_error = _relative_error(ops.convert_to_numpy(plain(ids)), exact)
    assert ours_error <= keras_error * 1.05 + 1e-6, (ours_error, keras_error)


def test_embedding_takes_keras_weights_and_input_length():
    table = unit_normal(10, 4)
    with pytest.warns(UserWarning, match="input_length"):
        layer = L.Embedding(10, 4, weights=[table], input_length=3)
    np.testing.assert_array_equal(ops.convert_to_numpy(layer(np.array([[2, 5, 7]])))[0], table[[2, 5, 7]])


@pytest.mark.skipif(BACKEND != "tensorflow", reason="ragged tensors are TensorFlow's")
def test_embedding_looks_up_ragged_ids():
    import tensorflow as tf

    layer = L.Embedding(10, 4)
    ids = tf.ragged.constant([[1, 2, 3], [4]])
    out = layer(ids)
    assert isinstance(out, tf.RaggedTensor)
    np.testing.assert_array_equal(out.flat_values.numpy(), ops.convert_to_numpy(layer(np.array([1, 2, 3, 4]))))


@pytest.mark.skipif(BACKEND not in ("tensorflow", "jax"), reason="Keras's sparse tensors are TensorFlow's and JAX's")
def test_dense_and_add_take_sparse_inputs():
    dense_input = np.where(unit_normal(16, 8) > 0.5, unit_normal(16, 8), 0.0).astype("float32")
    if BACKEND == "tensorflow":
        import tensorflow as tf

        sparse_input = tf.sparse.from_dense(dense_input)
    else:
        from jax.experimental import sparse

        sparse_input = sparse.BCOO.fromdense(dense_input)
    layer = L.Dense(4)
    np.testing.assert_allclose(ops.convert_to_numpy(layer(sparse_input)), ops.convert_to_numpy(layer(dense_input)),
                               atol=1e-6)
    summed = L.Add()([sparse_input, sparse_input])
    np.testing.assert_allclose(ops.convert_to_numpy(ops.convert_to_tensor(summed, sparse=False))
                               if BACKEND == "tensorflow" else summed.todense(),
                               dense_input * 2**0.5, atol=1e-6)


@pytest.mark.parametrize("count", [2, 3, 5])
def test_add_of_n_unit_inputs_is_unit_scale(count):
    inputs = [unit_normal(512, 64, seed=i) for i in range(count)]
    assert rms(L.Add()(inputs)) == pytest.approx(1.0, rel=0.05)


def test_layer_norm_rms_scaling_and_float32_gain_under_mixed_precision():
    x = unit_normal(8, 16) + 3.0
    with pytest.warns(UserWarning, match="rms_scaling"):
        ours = L.LayerNormalization(rms_scaling=True)
        plain = keras.layers.LayerNormalization(rms_scaling=True)
    np.testing.assert_allclose(ops.convert_to_numpy(ours(x)), ops.convert_to_numpy(plain(x)), rtol=1e-5, atol=1e-5)
    layer = L.LayerNormalization(dtype="mixed_float16")
    y = layer(unit_normal(4, 16).astype("float16"))
    assert layer.gamma.dtype == "float32" and layer.beta.dtype == "float32"
    assert keras.backend.standardize_dtype(y.dtype) == "float16"
