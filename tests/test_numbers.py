"""No silently wrong number: integer inputs, empty batches, a replica with an empty share of the batch.

Issue 18, item 7. Each case once gave a wrong number without an error:
`Add` on int32 returned zeros, `Dense` on int inputs returned int zeros, an
empty batch gave NaN weight gradients (eagerly, a ZeroDivisionError), which
under `MirroredStrategy` turned every weight into NaN.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from keras import ops

from keras_unitscale import functional as U
from keras_unitscale import layers as L
from keras_unitscale import losses
from keras_unitscale import scaled
from keras_unitscale.autodiff import layer_vjp

INTS = np.array([[1, -2, 3, 0], [2, 5, -1, 4]], "int32")


@pytest.mark.parametrize(
    "make",
    [lambda: L.Dense(3), lambda: L.Activation("relu"), lambda: L.Activation("tanh"), lambda: L.LayerNormalization()],
    ids=["dense", "relu", "tanh", "layer_norm"],
)
def test_integer_inputs_give_the_float_computation(make):
    keras.utils.set_random_seed(0)
    layer = make()
    as_ints = ops.convert_to_numpy(layer(INTS))
    assert "float" in str(as_ints.dtype)
    np.testing.assert_allclose(as_ints, ops.convert_to_numpy(layer(INTS.astype("float32"))), rtol=1e-6)


def test_add_of_integers_is_the_scaled_float_sum():
    total = ops.convert_to_numpy(L.Add()([INTS, INTS]))
    np.testing.assert_allclose(total, 2 * INTS * 2**-0.5, rtol=1e-6)
    mixed = U.add(INTS, INTS.astype("float16"))
    assert keras.backend.standardize_dtype(mixed.dtype) == "float16"


def test_the_primitive_refuses_to_scale_integers():
    with pytest.raises(ValueError, match="x.dtype=int32"):
        scaled(INTS, fwd=0.5)
    assert ops.convert_to_numpy(scaled(INTS, fwd=1.0)).tolist() == INTS.tolist()  # nothing to scale


@pytest.mark.parametrize(
    "make, shape, dtype",
    [
        (lambda: L.Dense(3), (0, 4), "float32"),
        (lambda: L.Dense(3, role="output"), (0, 4), "float32"),
        (lambda: L.Embedding(10, 4), (0, 5), "int32"),
        (lambda: L.LayerNormalization(), (0, 4), "float32"),
        (lambda: L.RMSNormalization(), (0, 4), "float32"),
        (lambda: L.TransformerBlock(num_heads=2, index=0, depth=1), (0, 3, 8), "float32"),
        (lambda: L.EinsumDense("abc,cd->abd", (3, 5)), (0, 3, 4), "float32"),
        # (Keras's own LSTM cannot run an empty batch on TensorFlow, where a sum of two empty tensors is taken for
        # a BiasAdd and refused; ours adds them so that it can.)
        (lambda: L.LSTM(6, return_sequences=True), (0, 3, 4), "float32"),
    ],
    ids=["dense", "readout", "embedding", "layer_norm", "rms_norm", "transformer", "einsum_dense", "lstm"],
)
def test_an_empty_batch_has_zero_gradients(make, shape, dtype):
    layer = make()
    layer.build((None,) + shape[1:])
    x = np.zeros(shape, dtype)
    output, _, grads = layer_vjp(layer, x, np.zeros(tuple(layer.compute_output_shape((0,) + shape[1:])), "float32"))
    assert output.shape[0] == 0
    for path, grad in grads.items():
        assert np.all(grad == 0), path


def test_losses_of_an_empty_batch_are_zero_and_finite():
    logits = np.zeros((0, 5), "float32")
    assert float(U.cross_entropy(logits, np.zeros((0,), "int32"))) == 0.0
    assert float(U.mse(logits, logits)) == 0.0
    labels = np.zeros((0,), "int32")
    ours = losses.SparseCategoricalCrossentropy(from_logits=True)(labels, logits)
    keras_own = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, logits)
    np.testing.assert_array_equal(ops.convert_to_numpy(ours), ops.convert_to_numpy(keras_own))  # as Keras: empty


MIRRORED = """
import json, warnings
warnings.simplefilter("ignore")
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from keras_unitscale import layers as L, losses, optimizers

keras.utils.set_random_seed(0)
x = np.random.default_rng(0).normal(size=(17, 8)).astype("float32")
y = np.random.default_rng(1).integers(0, 3, size=(17,))
with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
    model = keras.Sequential([keras.Input((8,)), L.Dense(16, activation="relu"), L.LayerNormalization(),
                              L.Dense(3, role="output")])
    model.compile(optimizers.Adam(0.01), losses.SparseCategoricalCrossentropy(from_logits=True))
# 17 examples in batches of 16: the last batch has one, so one replica gets none.
history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
print(json.dumps({"losses": history.history["loss"],
                  "finite": all(bool(np.all(np.isfinite(w))) for w in model.get_weights())}))
"""


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="MirroredStrategy is TensorFlow's")
def test_mirrored_strategy_with_an_empty_replica_stays_finite():
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(MIRRORED)], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["finite"] and all(np.isfinite(measured["losses"])), measured
