"""The unit-scaled LSTM: its scale, Keras's behaviour, the fused path, saving, precision, errors."""

import json
import os
import subprocess
import sys

import keras
import keras.src.backend as keras_backend
import numpy as np
import pytest
from helpers import BACKEND
from helpers import rms
from helpers import unit_normal
from keras import ops

from keras_unitscale import functional as U
from keras_unitscale.autodiff import vjp
from keras_unitscale.layers.dense import Dense
from keras_unitscale.layers.lstm import LSTM
from keras_unitscale.layers.lstm import LSTMCell
from keras_unitscale.scale import scaling_disabled

UNIT = (0.5, 2.0)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """PyTorch's CPU thread pool slows a step-by-step loop ~30x on a busy 2-core machine."""
    if BACKEND != "torch":
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _weights(layer, seed=1):
    """Unit-normal kernel and recurrent kernel (fixed seeds) and the layer's own initial bias."""
    cell = layer.cell
    kernel = unit_normal(*cell.kernel.shape, seed=seed)
    recurrent = unit_normal(*cell.recurrent_kernel.shape, seed=seed + 1)
    return [kernel, recurrent, ops.convert_to_numpy(cell.bias)]


def _layer_vjp(layer, x, cotangent, weights=None, training=False):
    """Output and gradients of `x` and of [kernel, recurrent_kernel, bias], weights as primals."""
    if not layer.built:
        layer.build(x.shape)
    weights = _weights(layer) if weights is None else weights
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def fn(x, *weights):
        outputs = layer.stateless_call(list(weights), non_trainable, x, training=training)[0]
        return outputs[0] if isinstance(outputs, (list, tuple)) else outputs  # return_state

    return _vjp(fn, [x, *weights], cotangent)


def _vjp(fn, primals, cotangent):
    """`vjp`, with `fn` compiled once on JAX instead of run as many small eager ops."""
    if BACKEND == "jax":
        import jax

        fn = jax.jit(fn)
    return vjp(fn, primals, cotangent)


def _assert_in(name, value, bounds=UNIT):
    assert bounds[0] <= value <= bounds[1], f"{name}: RMS {value:.3f} outside {bounds}"


# --- unit scale at initialisation ----------------------------------------------

BATCH = {16: 16, 64: 8, 256: 4}  # batch × T = 256, 512, 1024: enough samples, bounded cost
NARROW, WIDE = (32, 64), (128, 256)  # (input_dim, units)
SCALE_CASES = [
    *[(steps, *size, True) for steps in (16, 64, 256) for size in (NARROW, WIDE)],
    # The last output only: the gradient enters at one step and fades within a few.
    (16, *WIDE, False),
    (64, *NARROW, False),
    (256, *WIDE, False),
    (256, *NARROW, False),
]


@pytest.mark.parametrize("steps, input_dim, units, return_sequences", SCALE_CASES)
def test_scale(steps, input_dim, units, return_sequences):
    """Output, input gradient (over all steps) and weight gradients all near unit RMS."""
    batch = BATCH[steps]
    layer = LSTM(units, return_sequences=return_sequences)
    x = unit_normal(batch, steps, input_dim)
    out_shape = (batch, steps, units) if return_sequences else (batch, units)
    out, grads = _layer_vjp(layer, x, unit_normal(*out_shape, seed=9))
    assert out.shape == out_shape
    for name, value in zip(["output", "input grad", "kernel grad", "recurrent grad", "bias grad"], [out, *grads]):
        _assert_in(name, rms(value))
        # The mean-field rule does better than the required range.
        _assert_in(name, rms(value), (2 / 3, 1.5))


def test_rule_constants():
    """The mean-field constants, checked against the JAX simulation quoted in functional.py."""
    rule = U.lstm_rule(1.0)
    assert 0.22 <= rule.hidden_rms <= 0.23 and abs(rule.output_scale * rule.hidden_rms - 1) < 1e-12
    assert 0.145 <= rule.preactivation_grad_rms / rule.output_scale <= 0.151
    assert 1.7 <= rule.bias_grad_correlation <= 2.3 and 1.25 <= rule.recurrent_grad_correlation <= 1.45
    plain = U.lstm_rule(0.0)
    assert 0.19 <= plain.hidden_rms <= 0.2 and plain.output_scale > rule.output_scale
    assert U.lstm_rule(1) is rule  # derived once per forget bias


def test_no_forget_bias_is_unit_scaled_too():
    layer = LSTM(64, return_sequences=True, unit_forget_bias=False)
    out, grads = _layer_vjp(layer, unit_normal(16, 32, 32), unit_normal(16, 32, 64, seed=9))
    for name, value in zip(["output", "input grad", "kernel grad", "recurrent grad", "bias grad"], [out, *grads]):
        _assert_in(name, rms(value))


def test_dropout_keeps_unit_scale():
    layer = LSTM(64, return_sequences=True, dropout=0.5, recurrent_dropout=0.3, seed=3)
    out, grads = _layer_vjp(layer, unit_normal(16, 32, 32), unit_normal(16, 32, 64, seed=9), training=True)
    for name, value in zip(["output", "input grad", "kernel grad", "recurrent grad", "bias grad"], [out, *grads]):
        _assert_in(name, rms(value))


# --- Keras behaviour -------------------------------------------------------------

CONFIGS = [
    dict(),
    dict(return_sequences=True),
    dict(return_state=True),
    dict(return_sequences=True, return_state=True),
    dict(return_sequences=True, go_backwards=True),
    dict(go_backwards=True, return_state=True),
    dict(stateful=True, return_state=True),
    dict(return_sequences=True, unroll=True),
]


def _shapes(outputs):
    return [tuple(o.shape) for o in outputs] if isinstance(outputs, (list, tuple)) else tuple(outputs.shape)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(c) or "default")
def test_shapes_match_keras(config):
    theirs = keras.layers.LSTM(4, **config)(keras.Input(batch_shape=(3, 7, 5)))
    assert _shapes(LSTM(4, **config)(keras.Input(batch_shape=(3, 7, 5)))) == _shapes(theirs)
    assert _shapes(LSTM(4, **config)(unit_normal(3, 7, 5))) == _shapes(theirs)


def test_return_state_is_the_last_output():
    output, h, c = LSTM(6, return_state=True)(unit_normal(2, 9, 3))
    np.testing.assert_allclose(ops.convert_to_numpy(output), ops.convert_to_numpy(h), rtol=1e-6)
    assert tuple(c.shape) == (2, 6)


def test_go_backwards_reads_the_sequence_reversed():
    x = unit_normal(2, 6, 3)
    forward = LSTM(4, return_sequences=True)
    forward.build(x.shape)
    backward = LSTM(4, return_sequences=True, go_backwards=True)
    backward.build(x.shape)
    backward.set_weights(forward.get_weights())
    np.testing.assert_allclose(
        ops.convert_to_numpy(backward(x)), ops.convert_to_numpy(forward(x[:, ::-1])), rtol=1e-5, atol=1e-5
    )


def test_stateful_carries_the_state_between_batches():
    x = unit_normal(2, 8, 3)
    whole = LSTM(5, return_sequences=True)
    full = ops.convert_to_numpy(whole(x))
    stateful = LSTM(5, return_sequences=True, stateful=True)
    stateful.build((2, 4, 3))
    stateful.set_weights(whole.get_weights())
    first = ops.convert_to_numpy(stateful(x[:, :4]))
    second = ops.convert_to_numpy(stateful(x[:, 4:]))
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), full, rtol=1e-5, atol=1e-5)
    stateful.reset_state()
    np.testing.assert_allclose(ops.convert_to_numpy(stateful(x[:, :4])), first, rtol=1e-5, atol=1e-5)


def test_initial_state_is_in_unit_scale():
    """A state handed on (encoder → decoder) is the unit-scaled h, as the layer returns it."""
    x = unit_normal(2, 8, 3)
    whole = LSTM(5, return_sequences=True)
    full = ops.convert_to_numpy(whole(x))
    encoder = LSTM(5, return_state=True)
    encoder.build((2, 4, 3))
    encoder.set_weights(whole.get_weights())
    _, h, c = encoder(x[:, :4])
    decoder = LSTM(5, return_sequences=True)
    decoder.build((2, 4, 3))
    decoder.set_weights(whole.get_weights())
    np.testing.assert_allclose(
        ops.convert_to_numpy(decoder(x[:, 4:], initial_state=[h, c])), full[:, 4:], rtol=1e-5, atol=1e-5
    )


def test_masked_steps_carry_the_state_forward():
    x = unit_normal(2, 6, 3)
    mask = np.array([[True, True, False, True, False, True]] * 2)
    layer = LSTM(4, return_sequences=True)
    masked = ops.convert_to_numpy(layer(x, mask=mask))
    # The output of a masked step repeats the previous one ...
    np.testing.assert_allclose(masked[:, 2], masked[:, 1], rtol=1e-6)
    np.testing.assert_allclose(masked[:, 4], masked[:, 3], rtol=1e-6)
    # ... and the steps after it see the sequence without the masked steps.
    kept = ops.convert_to_numpy(layer(x[:, mask[0]]))
    np.testing.assert_allclose(masked[:, mask[0]], kept, rtol=1e-5, atol=1e-5)


def test_embedding_mask_reaches_the_lstm():
    ids = np.array([[3, 5, 0, 0], [7, 0, 0, 0]])
    embedding = keras.layers.Embedding(10, 6, mask_zero=True)
    layer = LSTM(4, return_sequences=True)
    out = ops.convert_to_numpy(layer(embedding(ids)))
    np.testing.assert_allclose(out[0, 3], out[0, 1], rtol=1e-6)
    np.testing.assert_allclose(out[1, 3], out[1, 0], rtol=1e-6)


def test_standalone_cell_in_keras_rnn():
    cell = LSTMCell(64)
    out = keras.layers.RNN(cell, return_sequences=True)(unit_normal(8, 16, 32))
    _assert_in("output", rms(ops.convert_to_numpy(out)))


def test_bidirectional_runs_each_direction_through_this_layer(monkeypatch):
    """Keras's fused bidirectional kernel would read the raw weights: it must not be used."""

    def refuse(*args, **kwargs):
        raise AssertionError("bidirectional_lstm was called with unscaled weights")

    monkeypatch.setattr(keras_backend, "bidirectional_lstm", refuse)
    layer = keras.layers.Bidirectional(LSTM(8, return_sequences=True))
    out = ops.convert_to_numpy(layer(unit_normal(4, 10, 6)))
    assert out.shape == (4, 10, 16)
    _assert_in("output", rms(out))


def test_bidirectional_copies_keep_this_layers_fused_kernel_choice():
    """`Bidirectional` copies `use_cudnn` (None here) into its copies; each keeps the choice from its config."""
    for choice in ("auto", True, False):
        layer = keras.layers.Bidirectional(LSTM(3, use_cudnn=choice))
        for direction in (layer.forward_layer, layer.backward_layer):
            assert type(direction) is LSTM and direction.fused_kernel is choice and direction.use_cudnn is None
        layer.build((None, 4, 2))
        assert not layer._can_attempt_fused_lstm(mask=None)
    layer = LSTM(3)
    layer.use_cudnn = False  # setting it sets the choice
    assert layer.fused_kernel is False and layer.get_config()["use_cudnn"] is False
    with pytest.raises(ValueError, match="Received: use_cudnn='no'"):
        layer.use_cudnn = "no"


# --- Keras's LSTM, with the rule on top ---------------------------------------------

OURS_ONLY = ("fp8", "weight_multipliers", "lr_multipliers")


def test_is_keras_lstm_with_keras_variable_paths():
    layer, theirs = LSTM(4, name="lstm"), keras.layers.LSTM(4, name="lstm")
    assert isinstance(layer, keras.layers.LSTM) and isinstance(layer.cell, keras.layers.LSTMCell)
    for each in (layer, theirs):
        each.build((2, 3, 5))
    assert [v.path for v in layer.weights] == [v.path for v in theirs.weights]
    assert [v.path for v in layer.weights][:3] == ["lstm/lstm_cell/kernel", "lstm/lstm_cell/recurrent_kernel",
                                                   "lstm/lstm_cell/bias"]


def _keras_twin(layer, input_shape, scaled):
    """Keras's own LSTM made from `layer`'s config, with its weights (× the rule's forward scales if `scaled`)."""
    config = {key: value for key, value in layer.get_config().items() if key not in OURS_ONLY}
    twin = keras.layers.LSTM.from_config(config)
    weights = layer.get_weights()
    if scaled:
        input_dim = weights[0].shape[0]
        weights = [weights[0] * input_dim**-0.5, weights[1] * layer.units**-0.5, *weights[2:]]
    twin.build(input_shape)
    twin.set_weights(weights)
    return twin


MASK = np.array([[True, True, False, True, True, False], [True, False, True, True, False, False]])
KERAS_CASES = {
    "sequences-mask": (dict(return_sequences=True), dict(mask=MASK)),
    "zero-output-for-mask": (dict(return_sequences=True, zero_output_for_mask=True), dict(mask=MASK)),
    "backwards-mask": (dict(go_backwards=True, return_sequences=True), dict(mask=MASK[:, ::-1])),
    "state-initial-state": (dict(return_state=True), dict(initial_state=True)),
    "everything": (dict(return_sequences=True, return_state=True, go_backwards=True),
                   dict(mask=MASK, initial_state=True)),
    "unroll-mask": (dict(return_sequences=True, unroll=True), dict(mask=MASK)),
    "no-forget-bias": (dict(return_sequences=True, unit_forget_bias=False), {}),
    "no-bias": (dict(use_bias=False, return_state=True), {}),
    "stateful": (dict(stateful=True, return_sequences=True), dict(calls=2)),
}


@pytest.mark.parametrize("config, call", KERAS_CASES.values(), ids=KERAS_CASES.keys())
def test_keras_lstm_behaviour_with_the_rule_on_top(config, call):
    """Keras's own LSTM, built from our config, computes what ours does: without the scale ops the
    same numbers; with them, the rule's weights and hidden scale around Keras's recurrence
    (masks, `zero_output_for_mask`, `go_backwards`, initial states, `stateful`, `unroll`)."""
    x = unit_normal(2, 6, 3)
    kwargs = {"mask": call["mask"]} if "mask" in call else {}
    layer = LSTM(5, **config)
    layer.build(x.shape)
    layer.set_weights([unit_normal(*w.shape, seed=i) for i, w in enumerate(layer.get_weights())])
    initial = [unit_normal(2, 5, seed=7), unit_normal(2, 5, seed=8)] if "initial_state" in call else None
    rule = U.lstm_rule(layer.cell.forget_bias)

    def run(model, **extra):
        if model.stateful:
            model.reset_state()
        outs = [model(x, **kwargs, **extra) for _ in range(call.get("calls", 1))]
        return [ops.convert_to_numpy(o) for o in keras.tree.flatten(outs)]

    def compare(ours, theirs, scale):
        assert len(ours) == len(theirs)
        n_outputs = len(ours) // call.get("calls", 1)
        for i, (a, b) in enumerate(zip(ours, theirs)):
            # The last state of `return_state` is the cell state c, which the rule does not scale.
            is_c = config.get("return_state") and i % n_outputs == n_outputs - 1
            np.testing.assert_allclose(a, b * (1.0 if is_c else scale), rtol=1e-5, atol=1e-5)

    # Without the scale ops: Keras's numbers.
    with scaling_disabled():
        theirs = run(_keras_twin(layer, x.shape, scaled=False), **({"initial_state": initial} if initial else {}))
        ours = run(layer, **({"initial_state": initial} if initial else {}))
    compare(ours, theirs, 1.0)
    # With them: s · Keras's LSTM with the scaled weights, from h0 / s (ours carries h = s·h̃).
    twin_initial = {"initial_state": [initial[0] * rule.hidden_rms, initial[1]]} if initial else {}
    theirs = run(_keras_twin(layer, x.shape, scaled=True), **twin_initial)
    ours = run(layer, **({"initial_state": initial} if initial else {}))
    compare(ours, theirs, rule.output_scale)


def test_from_config_takes_the_config_keras_writes():
    theirs = keras.layers.LSTM(
        6, return_sequences=True, go_backwards=True, zero_output_for_mask=True, dropout=0.25,
        recurrent_dropout=0.5, seed=3, unit_forget_bias=False, kernel_regularizer="l2", name="from_keras",
    )
    config = theirs.get_config()
    layer = LSTM.from_config(config)
    ours = layer.get_config()
    assert {key: ours[key] for key in config} == config
    extras = (ours["use_cudnn"], ours["fp8"], ours["weight_multipliers"], ours["lr_multipliers"])
    assert extras == ("auto", None, {}, {})
    # And back: Keras's LSTM takes ours, less what only we have.
    back = keras.layers.LSTM.from_config({key: value for key, value in ours.items() if key not in OURS_ONLY})
    assert back.get_config() == config
    # The cell, alone and in Keras's RNN (deserialised through its registered name).
    cell_config = keras.layers.LSTMCell(4, dropout=0.5, use_bias=False).get_config()
    cell = LSTMCell.from_config(cell_config)
    assert {key: cell.get_config()[key] for key in cell_config} == cell_config
    rnn = keras.layers.RNN(LSTMCell(4, weight_multipliers={"kernel": 2.0}), return_sequences=True)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(rnn))
    assert type(clone.cell) is LSTMCell and clone.get_config() == rnn.get_config()
    assert clone.cell.weight_multipliers == {"kernel": 2.0}


@pytest.mark.parametrize("dtype", ["bool", "int32"])
def test_bool_and_int_inputs_compute_in_the_compute_dtype(dtype):
    """As in Keras: non-float sequences give float outputs, here those of the same sequence as floats."""
    x = unit_normal(2, 5, 3) > 0 if dtype == "bool" else np.round(unit_normal(2, 5, 3) * 2)
    x = x.astype(dtype)
    layer = LSTM(4, return_sequences=True)
    expected = ops.convert_to_numpy(layer(x.astype("float32")))
    out = layer(x)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    np.testing.assert_allclose(ops.convert_to_numpy(out), expected, rtol=1e-6)
    # In a functional model taking that dtype, and in the standalone cell.
    model = keras.Sequential([keras.Input((5, 3), dtype=dtype), layer])
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)
    rnn = keras.layers.RNN(LSTMCell(4), return_sequences=True)
    rnn_out = rnn(x)
    assert keras.backend.standardize_dtype(rnn_out.dtype) == "float32"
    np.testing.assert_allclose(ops.convert_to_numpy(rnn_out), ops.convert_to_numpy(rnn(x.astype("float32"))),
                               rtol=1e-6)
    # Mixed precision: the compute dtype, as Keras's LSTM gives.
    half = LSTM(4, dtype="mixed_float16")
    assert keras.backend.standardize_dtype(half(x).dtype) == "float16"
    assert keras.backend.standardize_dtype(keras.layers.LSTM(4, dtype="mixed_float16")(x).dtype) == "float16"


@pytest.mark.parametrize("return_sequences", [True, False], ids=["sequences", "last"])
def test_empty_batch_gives_empty_outputs_and_zero_gradients(return_sequences):
    """A replica's empty share of a short last batch: no error, zero (finite) weight gradients."""
    layer = LSTM(4, return_sequences=return_sequences, return_state=True)
    x = np.zeros((0, 5, 3), "float32")
    output, h, c = layer(x)
    assert tuple(output.shape) == ((0, 5, 4) if return_sequences else (0, 4))
    assert tuple(h.shape) == tuple(c.shape) == (0, 4)
    out, grads = _layer_vjp(layer, x, np.zeros((0, 5, 4) if return_sequences else (0, 4), "float32"))
    assert out.shape[0] == 0 and grads[0].shape == (0, 5, 3)
    for name, grad in zip(["kernel", "recurrent", "bias"], grads[1:]):
        np.testing.assert_array_equal(np.asarray(grad), 0.0, err_msg=name)
    # The standalone cell too.
    assert tuple(keras.layers.RNN(LSTMCell(4))(x).shape) == (0, 4)


MIRRORED = """
import json, warnings
warnings.simplefilter("ignore")
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from keras_unitscale.layers import LSTM, Dense

keras.utils.set_random_seed(0)
x = np.random.default_rng(0).normal(size=(5, 6, 3)).astype("float32")
y = np.random.default_rng(1).normal(size=(5, 1)).astype("float32")
with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
    model = keras.Sequential([keras.Input((6, 3)), LSTM(8, return_sequences=True), LSTM(8), Dense(1, role="output")])
    model.compile(keras.optimizers.SGD(0.1), "mse")
# 5 examples in batches of 4: the last batch has one, so one replica gets none.
history = model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
print(json.dumps({"losses": history.history["loss"],
                  "finite": all(bool(np.all(np.isfinite(w))) for w in model.get_weights())}))
"""


@pytest.mark.skipif(BACKEND != "tensorflow", reason="MirroredStrategy is TensorFlow's")
def test_mirrored_strategy_with_an_empty_replica_stays_finite():
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", MIRRORED], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["finite"] and all(np.isfinite(measured["losses"])), measured


def test_output_mask_is_keras_s():
    mask = np.array([[True, True, False]])
    assert LSTM(2).compute_mask(None, mask) is None
    np.testing.assert_array_equal(ops.convert_to_numpy(LSTM(2, return_sequences=True).compute_mask(None, mask)), mask)
    model = keras.Sequential([keras.Input((None,), dtype="int32"), keras.layers.Embedding(5, 3, mask_zero=True),
                              LSTM(2, return_sequences=True)])
    assert model.layers[-1].supports_masking and model.outputs[0]._keras_mask is not None


def test_unit_scale_converts_keras_lstm_keeping_its_settings():
    """`unit_scale` makes our LSTM from Keras's, with its loop settings, and the same predictions."""
    from keras_unitscale import unit_scale

    keras.utils.set_random_seed(0)
    original = keras.layers.LSTM(6, return_sequences=True, go_backwards=True, zero_output_for_mask=True,
                                 use_cudnn=False, seed=5, name="lstm")
    model = keras.Sequential([keras.Input((5, 3)), original, keras.layers.LSTM(4, name="last")])
    twin = unit_scale(model)
    converted = twin.get_layer("lstm")
    assert type(converted) is LSTM
    assert (converted.go_backwards, converted.zero_output_for_mask, converted.fused_kernel, converted.cell.seed) == (
        True, True, False, 5)
    x = unit_normal(3, 5, 3)
    np.testing.assert_allclose(twin.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


# --- the fused path ----------------------------------------------------------------


def _reference_lstm(inputs, h, c, mask, kernel, recurrent_kernel, bias, activation,
                    recurrent_activation, return_sequences=False, go_backwards=False, unroll=False):
    """A plain LSTM with `backend.lstm`'s signature, in keras.ops (differentiable everywhere)."""
    if mask is not None:
        raise NotImplementedError
    steps = range(inputs.shape[1] - 1, -1, -1) if go_backwards else range(inputs.shape[1])
    outputs = []
    for t in steps:
        z = ops.matmul(inputs[:, t], kernel) + ops.matmul(h, recurrent_kernel) + bias
        z_i, z_f, z_g, z_o = ops.split(z, 4, axis=-1)
        c = recurrent_activation(z_f) * c + recurrent_activation(z_i) * activation(z_g)
        h = recurrent_activation(z_o) * activation(c)
        outputs.append(h)
    sequence = ops.stack(outputs, axis=1) if return_sequences else ops.expand_dims(h, 1)
    return h, sequence, [h, c]


@pytest.mark.parametrize("return_sequences", [True, False], ids=["sequences", "last"])
def test_gradients_are_true_gradients_scaled_on_cut_edges_only(return_sequences):
    """The layer computes a plain LSTM (weights × D^-1/2 and H^-1/2, output × s); each
    gradient is the true gradient of that function times one constant, per weight
    (leaves) and for the input (a cut edge): nothing inside the recurrence is rescaled."""
    batch, steps, input_dim, units = 3, 5, 4, 6
    layer = LSTM(units, return_sequences=return_sequences, use_cudnn=False)
    x = unit_normal(batch, steps, input_dim)
    cotangent = unit_normal(*((batch, steps, units) if return_sequences else (batch, units)), seed=5)
    out, grads = _layer_vjp(layer, x, cotangent)

    rule = U.lstm_rule(1.0)
    alpha, beta = input_dim**-0.5, units**-0.5

    def plain(x, kernel, recurrent, bias):
        zeros = ops.zeros((batch, units))
        last, sequence, _ = _reference_lstm(
            x, zeros, zeros, None, kernel * alpha, recurrent * beta, bias,
            ops.tanh, ops.sigmoid, return_sequences=return_sequences,
        )
        return (sequence if return_sequences else last) * rule.output_scale

    true_out, true_grads = _vjp(plain, [x, *_weights(layer)], cotangent)
    np.testing.assert_allclose(out, true_out, rtol=1e-5, atol=1e-6)
    m = steps if return_sequences else 1
    base = (batch * m) ** -0.5 / rule.preactivation_grad_rms
    factors = [
        (input_dim / (4 * units) * steps / m) ** 0.5 / rule.preactivation_grad_rms,  # x: cut edge
        base / alpha,  # kernel (leaf)
        base / (rule.hidden_rms * rule.recurrent_grad_correlation) / beta,  # recurrent kernel (leaf)
        base / rule.bias_grad_correlation,  # bias (leaf)
    ]
    for name, grad, true_grad, factor in zip(["x", "kernel", "recurrent", "bias"], grads, true_grads, factors):
        np.testing.assert_allclose(grad, true_grad * factor, rtol=1e-4, atol=1e-6, err_msg=name)


def test_fused_call_receives_the_scaled_weights(monkeypatch):
    calls = []

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        raise NotImplementedError  # as on a machine without cuDNN: the cell runs

    monkeypatch.setattr(keras_backend, "lstm", record)
    input_dim, units = 12, 16
    layer = LSTM(units, return_sequences=True)
    x = unit_normal(3, 5, input_dim)
    out = layer(x)
    assert len(calls) == 1
    args, kwargs = calls[0]
    cell = layer.cell
    rule = U.lstm_rule(1.0)
    kernel, recurrent, bias = (ops.convert_to_numpy(v) for v in (cell.kernel, cell.recurrent_kernel, cell.bias))
    np.testing.assert_allclose(ops.convert_to_numpy(kwargs["kernel"]), kernel * input_dim**-0.5, rtol=1e-6)
    np.testing.assert_allclose(ops.convert_to_numpy(kwargs["recurrent_kernel"]), recurrent * units**-0.5, rtol=1e-6)
    np.testing.assert_allclose(ops.convert_to_numpy(kwargs["bias"]), bias, rtol=1e-6)
    assert kwargs["activation"] is keras.activations.tanh
    assert kwargs["recurrent_activation"] is keras.activations.sigmoid
    np.testing.assert_allclose(ops.convert_to_numpy(args[0]), x, rtol=1e-6)  # inputs unchanged forward
    # The fallback computed the same thing as a cell-only layer.
    cell_only = LSTM(units, return_sequences=True, use_cudnn=False)
    cell_only.build(x.shape)
    cell_only.set_weights(layer.get_weights())
    np.testing.assert_allclose(ops.convert_to_numpy(out), ops.convert_to_numpy(cell_only(x)), rtol=1e-5)
    assert rule.output_scale > 1


def test_fused_path_matches_the_cell_path_with_gradients(monkeypatch, return_sequences=True, go_backwards=True):
    """With a working fused kernel the layer computes the cell's function and the same gradients."""
    calls = []

    def fused(*args, **kwargs):
        calls.append(1)
        return _reference_lstm(*args, **kwargs)

    x = unit_normal(3, 4, 8)
    config = dict(return_sequences=return_sequences, go_backwards=go_backwards)
    cotangent = unit_normal(*((3, 4, 10) if return_sequences else (3, 10)), seed=5)
    cell_only = LSTM(10, use_cudnn=False, **config)
    cell_only.build(x.shape)
    expected_out, expected_grads = _layer_vjp(cell_only, x, cotangent)
    monkeypatch.setattr(keras_backend, "lstm", fused)
    layer = LSTM(10, use_cudnn=True, **config)
    out, grads = _layer_vjp(layer, x, cotangent)
    assert calls
    np.testing.assert_allclose(out, expected_out, rtol=1e-4, atol=1e-5)
    for name, grad, expected in zip(["x", "kernel", "recurrent", "bias"], grads, expected_grads):
        np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5, err_msg=name)


def test_use_cudnn_true_without_a_fused_kernel_raises(monkeypatch):
    def unavailable(*args, **kwargs):
        raise NotImplementedError

    monkeypatch.setattr(keras_backend, "lstm", unavailable)
    with pytest.raises(ValueError, match="use_cudnn=True"):
        LSTM(4, use_cudnn=True)(unit_normal(2, 3, 5))


# --- models: training, saving, precision, XLA ----------------------------------------


def _text_data(vocab=20, length=12, count=64, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(count, length))
    lengths = rng.integers(3, length + 1, size=count)
    ids[np.arange(length)[None, :] >= lengths[:, None]] = 0  # right padding
    labels = (ids == 1).any(axis=1).astype("int32")
    return ids, labels


def _text_model(vocab=20):
    return keras.Sequential(
        [
            keras.Input(shape=(None,), dtype="int32"),
            keras.layers.Embedding(vocab, 16, mask_zero=True),
            LSTM(16),
            Dense(2, role="output"),
        ]
    )


def test_text_model_trains_saves_and_reloads(tmp_path):
    """Embedding(mask_zero=True) → LSTM → Dense: fit (XLA-compiled on TensorFlow and JAX), save, reload."""
    ids, labels = _text_data()
    model = _text_model()
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=BACKEND != "torch",
    )
    assert model.jit_compile == (BACKEND != "torch")
    history = model.fit(ids, labels, batch_size=16, epochs=4, verbose=0)
    losses = history.history["loss"]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert model.jit_compile == (BACKEND != "torch")  # the layer kept XLA on
    path = str(tmp_path / "lstm.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert isinstance(reloaded.layers[1], LSTM)
    np.testing.assert_allclose(
        reloaded.predict(ids, verbose=0), model.predict(ids, verbose=0), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    """float32 variables, low-precision compute, unit-scaled outputs and gradients."""
    keras.config.set_dtype_policy(policy)
    compute = policy.split("_")[1]
    layer = LSTM(32, return_sequences=True, return_state=True)
    for tensor in layer(keras.Input(batch_shape=(8, 16, 16))):
        assert keras.backend.standardize_dtype(tensor.dtype) == compute
    assert all(v.dtype == "float32" for v in layer.weights)
    # Run: gradients reach the float32 weights, finite and unit-scaled.
    out, grads = _layer_vjp(layer, unit_normal(8, 16, 16), unit_normal(8, 16, 32, seed=9))
    assert keras.backend.standardize_dtype(out.dtype) == compute
    assert [g.dtype for g in grads[1:]] == ["float32"] * 3
    for name, value in zip(["output", "input grad", "kernel grad", "recurrent grad", "bias grad"], [out, *grads]):
        value = np.asarray(value, "float32")
        assert np.all(np.isfinite(value)), name
        _assert_in(name, rms(value))


# --- configuration and errors --------------------------------------------------------


def test_config_round_trip():
    layer = LSTM(
        7,
        return_sequences=True,
        go_backwards=True,
        unit_forget_bias=False,
        dropout=0.25,
        recurrent_dropout=0.125,
        use_cudnn=False,
        kernel_regularizer="l2",
        seed=4,
    )
    config = layer.get_config()
    clone = LSTM.from_config(config)
    assert clone.get_config() == config
    assert (clone.units, clone.fused_kernel, clone.dropout, clone.unit_forget_bias) == (7, False, 0.25, False)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is LSTM and restored.get_config() == config
    cell = LSTMCell(5, recurrent_dropout=0.5)
    assert LSTMCell.from_config(cell.get_config()).get_config() == cell.get_config()


def test_default_initialisers_are_unit_variance():
    layer = LSTM(128)
    layer.build((2, 3, 256))
    kernel, recurrent, bias = (ops.convert_to_numpy(v) for v in layer.trainable_variables)
    assert 0.95 < kernel.std() < 1.05 and 0.95 < recurrent.std() < 1.05
    np.testing.assert_array_equal(bias[128:256], 1.0)  # unit forget bias
    np.testing.assert_array_equal(np.delete(bias, np.s_[128:256]), 0.0)


@pytest.mark.parametrize(
    "make, received",
    [
        (lambda: LSTM(0), "units=0"),
        (lambda: LSTM(-3), "units=-3"),
        (lambda: LSTM(2.5), "units=2.5"),
        (lambda: LSTM(4, dropout=1.0), "dropout=1.0"),
        (lambda: LSTM(4, dropout=-0.1), "dropout=-0.1"),
        (lambda: LSTM(4, recurrent_dropout=1.5), "recurrent_dropout=1.5"),
        (lambda: LSTMCell(4, dropout=2), "dropout=2"),
        (lambda: LSTM(4, activation="relu"), "activation='relu'"),
        (lambda: LSTM(4, recurrent_activation="tanh"), "recurrent_activation='tanh'"),
        (lambda: LSTM(4, use_cudnn="yes"), "use_cudnn='yes'"),
        (lambda: LSTM(4)(unit_normal(2, 5)), "sequences.shape=(2, 5)"),
        (lambda: LSTM(4)(unit_normal(2, 3, 4, 5)), "sequences.shape=(2, 3, 4, 5)"),
        (lambda: U.lstm_rule(float("nan")), "forget_bias=nan"),
        (lambda: U.lstm_inputs(unit_normal(2, 3, 4), units=0), "units=0"),
    ],
)
def test_bad_arguments_raise_value_error_with_the_value(make, received):
    with pytest.raises(ValueError, match=f"Received: .*{received.replace('(', '[(]').replace(')', '[)]')}"):
        make()
