"""Nothing lost: every layer, loss, optimizer and callback of ours survives `.keras` files and `get_config`."""

import io
import zipfile

import h5py
import keras
import numpy as np
import pytest

from keras_unitscale import callbacks
from keras_unitscale import layers as L
from keras_unitscale import losses
from keras_unitscale import optimizers

SEQ, VOCAB, WIDTH = 6, 20, 16


def _every_layer_model():
    tokens = keras.Input((SEQ,), dtype="int32")
    h = L.Embedding(VOCAB, WIDTH, weight_multipliers={"embeddings": 0.5}, name="embed")(tokens)
    h = L.TransformerBlock(num_heads=2, index=0, depth=2, norm="rms", name="block")(h)
    a = L.MultiHeadAttention(2, 8, lr_multipliers={"query/kernel": 0.25}, name="attention")(h, h)
    residual, skip = L.ResidualSplit(tau=0.5, name="split")(h)
    h = L.ResidualAdd(tau=0.5, name="join")([L.Dropout(0.0, name="drop")(residual + a), skip])
    h = L.Residual(L.Dense(WIDTH, activation="gelu", name="inner"), tau=0.4, name="wrapped")(h)
    h = L.EinsumDense("btd,de->bte", (SEQ, WIDTH), bias_axes="e", weight_multipliers={"kernel": 0.5}, name="einsum")(h)
    h = L.LayerNormalization(name="norm")(h)
    h = L.RMSNormalization(name="rms")(h)
    h = L.GroupNormalization(groups=4, name="group_norm")(L.BatchNormalization(name="batch_norm")(h))
    h = _every_convolution(h)
    h = L.LSTM(WIDTH, return_sequences=True, weight_multipliers={"kernel": 2.0}, name="lstm")(h)
    h = L.GRU(WIDTH, return_sequences=True, reset_after=False, lr_multipliers={"recurrent_kernel": 0.5}, name="gru")(h)
    h = L.RecurrentBlock(WIDTH, cell="gru", index=1, depth=2, weight_multipliers={"projection/kernel": 2.0},
                         name="recurrent_block")(h)
    h = L.Add(name="sum")([h, L.Activation("silu", name="act")(h)])
    h = L.LeakyReLU(0.2, name="leaky")(L.ReLU(max_value=6.0, name="relu")(h))
    h = L.Softmax(name="softmax")(L.PReLU(shared_axes=[1], name="prelu")(L.ELU(0.5, name="elu")(h)))
    logits = L.Dense(VOCAB, role="output", name="readout")(h)
    return keras.Model(tokens, logits)


def _every_convolution(h):
    """The ten convolutions on the `(SEQ, WIDTH)` sequence, seen as 1-, 2- and 3-D: the shape comes back."""
    h = L.Conv1D(WIDTH, 3, padding="causal", weight_multipliers={"kernel": 0.5}, name="conv1d")(h)
    h = L.Conv1DTranspose(WIDTH, 3, padding="same", name="conv1d_t")(h)
    h = L.DepthwiseConv1D(3, padding="same", name="depthwise1d")(h)
    h = L.SeparableConv1D(WIDTH, 3, padding="same", name="separable1d")(h)
    g = keras.layers.Reshape((SEQ, WIDTH, 1))(h)
    g = L.Conv2D(2, 3, padding="same", name="conv2d")(g)
    g = L.Conv2DTranspose(2, 3, padding="same", name="conv2d_t")(g)
    g = L.DepthwiseConv2D(3, padding="same", name="depthwise2d")(g)
    g = L.SeparableConv2D(1, 3, padding="same", name="separable2d")(g)
    v = keras.layers.Reshape((SEQ, WIDTH, 1, 1))(g)
    v = L.Conv3D(2, 3, padding="same", name="conv3d")(v)
    v = L.Conv3DTranspose(1, 3, padding="same", lr_multipliers={"kernel": 0.25}, name="conv3d_t")(v)
    return keras.layers.Reshape((SEQ, WIDTH))(v)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = _every_layer_model()
    schedule = keras.optimizers.schedules.CosineDecay(0.0, 10, warmup_target=0.05, warmup_steps=2)
    model.compile(optimizers.AdamW(schedule, weight_decay=1e-3), losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, VOCAB, (8, SEQ)), rng.integers(0, VOCAB, (8, SEQ))
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    path = tmp_path_factory.mktemp("saved") / "every_layer.keras"
    model.save(path)
    return model, path, x, y


def test_a_file_saved_by_this_version_loads_bit_identical(trained):
    model, path, x, y = trained
    loaded = keras.saving.load_model(path)
    assert len(loaded.weights) == len(model.weights)
    for ours, theirs in zip(loaded.weights, model.weights):
        # Keras builds a reloaded wrapper's inner layer before the wrapper: "wrapped/inner/kernel" comes back
        # as "inner/kernel" (see docs/limitations.md).
        assert theirs.path.endswith(ours.path), (ours.path, theirs.path)
        assert np.array_equal(keras.ops.convert_to_numpy(ours), keras.ops.convert_to_numpy(theirs)), ours.path
    assert np.array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    # Multipliers and learning-rate factors are in the configs, the optimizer's state in the file.
    assert loaded.get_layer("embed").weight_multipliers == {"embeddings": 0.5}
    assert loaded.get_layer("attention").lr_multipliers == {"query/kernel": 0.25}
    assert loaded.get_layer("einsum").weight_multipliers == {"kernel": 0.5}
    assert loaded.get_layer("lstm").cell.weight_multipliers == {"kernel": 2.0}
    assert loaded.get_layer("recurrent_block").weight_multipliers == {"projection/kernel": 2.0}
    assert loaded.get_layer("conv1d").weight_multipliers == {"kernel": 0.5}
    assert loaded.get_layer("conv3d_t").lr_multipliers == {"kernel": 0.25}
    assert loaded.get_layer("split").tau == 0.5 and loaded.get_layer("wrapped").tau == 0.4
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations) == 2
    for ours, theirs in zip(loaded.optimizer.variables, model.optimizer.variables):
        assert np.array_equal(keras.ops.convert_to_numpy(ours), keras.ops.convert_to_numpy(theirs)), ours.path
    # Training goes on identically from either.
    assert loaded.train_on_batch(x, y) == pytest.approx(model.train_on_batch(x, y), rel=1e-6)


def test_every_layer_round_trips_through_get_config(trained):
    model, _, _, _ = trained
    ours = [layer for layer in model.layers if type(layer).__module__.startswith("keras_unitscale")]
    assert {type(layer).__name__ for layer in ours} >= set(L.__all__) - {"LSTMCell", "GRUCell"}  # inside their layers
    for layer in ours:
        config = layer.get_config()
        rebuilt = type(layer).from_config(config)
        assert rebuilt.get_config() == config, layer.name
        assert keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer)).get_config() == config


@pytest.mark.parametrize("loss", [
    losses.SparseCategoricalCrossentropy(from_logits=True), losses.CategoricalCrossentropy(from_logits=True),
    losses.BinaryCrossentropy(), losses.MeanSquaredError(),
], ids=lambda loss: type(loss).__name__)
def test_losses_round_trip(loss):
    config = loss.get_config()
    assert type(loss).from_config(config).get_config() == config
    assert type(keras.losses.deserialize(keras.losses.serialize(loss))) is type(loss)


@pytest.mark.parametrize("optimizer", [
    optimizers.Adam(1e-3, lr_multipliers={"readout": 0.5}),
    optimizers.AdamW(optimizers.ScaledSchedule(keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5), 2.0),
                     peak_learning_rate=0.2),
    optimizers.SGD(0.1, momentum=0.9, readout_constraint="to_output_scale", parametrization=None),
], ids=lambda optimizer: type(optimizer).__name__)
def test_optimizers_round_trip(optimizer):
    config = optimizer.get_config()
    rebuilt = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(rebuilt) is type(optimizer) and rebuilt.get_config() == config


def test_callbacks_round_trip():
    unit = callbacks.UnitScaleCallback(mode="factor", weight_scale=0.5, lr_scale=2.0, include="dense", verbose=0)
    assert callbacks.UnitScaleCallback.from_config(unit.get_config()).get_config() == unit.get_config()
    tracker = callbacks.ScaleTracker(every=7, x=np.ones((2, 3), "float32"), stop_on_non_finite=True)
    rebuilt = callbacks.ScaleTracker.from_config(tracker.get_config())
    assert rebuilt.every == 7 and rebuilt.stop_on_non_finite and np.array_equal(rebuilt.x, tracker.x)


def _rewrite(path, out, edit_weights):
    with zipfile.ZipFile(path) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    files["model.weights.h5"] = edit_weights(files["model.weights.h5"])
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return out


@pytest.mark.parametrize("where, error", [("layers/", "could not be loaded"), ("optimizer/", "does not match it")])
def test_a_missing_weight_is_a_clear_error_not_a_half_loaded_model(trained, tmp_path, where, error):
    _, path, _, _ = trained

    def drop_a_variable(data):
        buffer = io.BytesIO(data)
        with h5py.File(buffer, "a") as weights:
            names = []
            weights.visit(names.append)
            del weights[[name for name in names if name.startswith(where) and "/vars/" in name][-1]]
        return buffer.getvalue()

    with pytest.raises(ValueError, match=error):
        keras.saving.load_model(_rewrite(path, tmp_path / "missing.keras", drop_a_variable))


def test_a_truncated_weights_file_is_a_clear_error(trained, tmp_path):
    _, path, _, _ = trained
    with pytest.raises(OSError, match="truncated"):
        keras.saving.load_model(_rewrite(path, tmp_path / "truncated.keras", lambda data: data[: len(data) // 2]))


def test_a_checkpoint_compiled_without_loss_scaling_says_how_to_load_it(tmp_path):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8,)), L.Dense(16, activation="relu"), L.Dense(1, role="output")])
        model.compile(optimizers.Adam(1e-3), "mse", auto_scale_loss=False)
        x = np.random.default_rng(0).normal(size=(16, 8)).astype("float32")
        model.fit(x, x[:, :1], epochs=1, verbose=0)
        model.save(tmp_path / "fp16.keras")
        # Keras's compile config drops `auto_scale_loss`: loading wraps the optimizer, whose state then has
        # nowhere to go. The message says so, and how to load it.
        with pytest.raises(ValueError, match="auto_scale_loss=False.*compile=False"):
            keras.saving.load_model(tmp_path / "fp16.keras")
        loaded = keras.saving.load_model(tmp_path / "fp16.keras", compile=False)
        np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-3)
    finally:
        keras.mixed_precision.set_global_policy("float32")
