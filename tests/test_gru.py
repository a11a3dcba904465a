"""The unit-scaled GRU: its scale, Keras's GRU with the rule on top, the fused path, conversion, saving, errors."""

import warnings

import keras
import keras.src.backend as keras_backend
import numpy as np
import pytest
from helpers import BACKEND
from helpers import rms
from helpers import unit_normal
from keras import ops
from test_lstm import _assert_in
from test_lstm import _layer_vjp  # weights: ours below, or the layer's own bias
from test_lstm import _one_torch_thread  # noqa: F401 (the module's autouse fixture)
from test_lstm import _vjp

from keras_unitscale import functional as U
from keras_unitscale.layers.dense import Dense
from keras_unitscale.layers.gru import GRU
from keras_unitscale.layers.gru import GRUCell
from keras_unitscale.scale import scaling_disabled

NAMES = ["output", "input grad", "kernel grad", "recurrent grad", "bias grad"]


def _weights(layer, seed=1):
    cell = layer.cell
    kernel = unit_normal(*cell.kernel.shape, seed=seed)
    recurrent = unit_normal(*cell.recurrent_kernel.shape, seed=seed + 1)
    return [kernel, recurrent] + ([unit_normal(*cell.bias.shape, seed=seed + 2) * 0.1] if cell.use_bias else [])


def _reference_gru(inputs, h, mask, kernel, recurrent_kernel, bias, activation, recurrent_activation,
                   return_sequences=False, go_backwards=False, unroll=False, reset_after=True):
    """A plain GRU with `backend.gru`'s signature, in keras.ops (Keras's GRUCell, written out)."""
    if mask is not None:
        raise NotImplementedError
    units = h.shape[-1]
    input_bias, recurrent_bias = (bias[0], bias[1]) if reset_after else (bias, ops.zeros_like(bias))
    steps = range(inputs.shape[1] - 1, -1, -1) if go_backwards else range(inputs.shape[1])
    outputs = []
    for t in steps:
        x_z, x_r, x_h = ops.split(ops.matmul(inputs[:, t], kernel) + input_bias, 3, axis=-1)
        inner = ops.matmul(h, recurrent_kernel) + recurrent_bias
        z = recurrent_activation(x_z + inner[:, :units])
        r = recurrent_activation(x_r + inner[:, units : 2 * units])
        if reset_after:
            candidate = activation(x_h + r * inner[:, 2 * units :])
        else:
            candidate = activation(x_h + ops.matmul(r * h, recurrent_kernel[:, 2 * units :]))
        h = z * h + (1.0 - z) * candidate
        outputs.append(h)
    sequence = ops.stack(outputs, axis=1) if return_sequences else ops.expand_dims(h, 1)
    return h, sequence, [h]


# --- unit scale at initialisation ----------------------------------------------

SCALE_CASES = [
    (16, 32, 64, True, True),
    (256, 32, 64, True, True),
    (64, 128, 256, True, False),
    (16, 128, 256, False, True),
    (256, 32, 64, False, False),
]


@pytest.mark.parametrize("steps, input_dim, units, return_sequences, reset_after", SCALE_CASES)
def test_scale(steps, input_dim, units, return_sequences, reset_after):
    """Output, input gradient (over all steps) and weight gradients all near unit RMS, in both reset conventions."""
    batch = {16: 16, 64: 8, 256: 4}[steps]
    layer = GRU(units, return_sequences=return_sequences, reset_after=reset_after)
    layer.build((batch, steps, input_dim))
    weights = _weights(layer)[:2] + [ops.convert_to_numpy(layer.cell.bias)]
    out_shape = (batch, steps, units) if return_sequences else (batch, units)
    out, grads = _layer_vjp(layer, unit_normal(batch, steps, input_dim), unit_normal(*out_shape, seed=9), weights)
    for name, value in zip(NAMES, [out, *grads]):
        # The mean-field rule does better than the required range (±25%).
        _assert_in(name, rms(value), (2 / 3, 1.5))


def test_rule_constants():
    rule = U.gru_rule()
    assert 0.40 <= rule.hidden_rms <= 0.43 and abs(rule.output_scale * rule.hidden_rms - 1) < 1e-12
    assert 0.6 <= rule.recurrent_grad_ratio < 1 and 1 <= rule.recurrent_grad_correlation <= 1.5
    before = U.gru_rule(False)
    # The two conventions differ only in the bias: one row, or an input and a recurrent row.
    assert before.hidden_rms == rule.hidden_rms and before.bias_grad_ratio == 1.0 > rule.bias_grad_ratio
    assert U.gru_rule(True) is rule


def test_dropout_keeps_unit_scale():
    layer = GRU(64, return_sequences=True, dropout=0.5, recurrent_dropout=0.3, seed=3)
    out, grads = _layer_vjp(layer, unit_normal(16, 32, 32), unit_normal(16, 32, 64, seed=9), training=True)
    for name, value in zip(NAMES, [out, *grads]):
        _assert_in(name, rms(value))


def test_standalone_cell_in_keras_rnn():
    out = keras.layers.RNN(GRUCell(64), return_sequences=True)(unit_normal(8, 16, 32))
    _assert_in("output", rms(ops.convert_to_numpy(out)))


# --- Keras's GRU, with the rule on top ---------------------------------------------

OURS_ONLY = ("fp8", "weight_multipliers", "lr_multipliers")
MASK = np.array([[True, True, False, True, True, False], [True, False, True, True, False, False]])
KERAS_CASES = {
    "sequences-mask": (dict(return_sequences=True), dict(mask=MASK)),
    "reset-before": (dict(return_sequences=True, reset_after=False), dict(mask=MASK)),
    "backwards-state-initial": (dict(go_backwards=True, return_state=True), dict(initial_state=True)),
    "unroll-zero-output": (dict(return_sequences=True, unroll=True, zero_output_for_mask=True), dict(mask=MASK)),
    "no-bias": (dict(use_bias=False, return_state=True), {}),
    "stateful": (dict(stateful=True, return_sequences=True), dict(calls=2)),
}


@pytest.mark.parametrize("config, call", KERAS_CASES.values(), ids=KERAS_CASES.keys())
def test_keras_gru_behaviour_with_the_rule_on_top(config, call):
    """Keras's own GRU, built from our config: without the scale ops the same numbers; with them,
    s · Keras's GRU with the rule's weights, from the initial state / s."""
    x = unit_normal(2, 6, 3)
    kwargs = {"mask": call["mask"]} if "mask" in call else {}
    layer = GRU(5, **config)
    layer.build(x.shape)
    layer.set_weights([unit_normal(*w.shape, seed=i) for i, w in enumerate(layer.get_weights())])
    initial = [unit_normal(2, 5, seed=7)] if "initial_state" in call else None
    rule = U.gru_rule(layer.cell.reset_after)

    def twin(scaled):
        theirs = keras.layers.GRU.from_config(
            {key: value for key, value in layer.get_config().items() if key not in OURS_ONLY})
        weights = layer.get_weights()
        if scaled:
            weights = [weights[0] * weights[0].shape[0] ** -0.5, weights[1] * layer.units**-0.5, *weights[2:]]
        theirs.build(x.shape)
        theirs.set_weights(weights)
        return theirs

    def run(model, initial_state=None):
        if model.stateful:
            model.reset_state()
        extra = {"initial_state": initial_state} if initial_state is not None else {}
        outs = [model(x, **kwargs, **extra) for _ in range(call.get("calls", 1))]
        return [ops.convert_to_numpy(o) for o in keras.tree.flatten(outs)]

    def compare(ours, theirs, scale):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            np.testing.assert_allclose(a, b * scale, rtol=1e-5, atol=1e-5)

    with scaling_disabled():
        compare(run(layer, initial), run(twin(scaled=False), initial), 1.0)
    twin_initial = [initial[0] * rule.hidden_rms] if initial else None
    compare(run(layer, initial), run(twin(scaled=True), twin_initial), rule.output_scale)


def test_is_keras_gru_with_keras_variable_paths_and_configs():
    layer, theirs = GRU(4, name="gru"), keras.layers.GRU(4, name="gru")
    assert isinstance(layer, keras.layers.GRU) and isinstance(layer.cell, keras.layers.GRUCell)
    for each in (layer, theirs):
        each.build((2, 3, 5))
    assert [v.path for v in layer.weights] == [v.path for v in theirs.weights]
    assert [tuple(v.shape) for v in layer.weights] == [tuple(v.shape) for v in theirs.weights]
    # from_config takes the config Keras's GRU writes, and Keras's GRU takes ours back.
    theirs = keras.layers.GRU(6, return_sequences=True, go_backwards=True, reset_after=False, dropout=0.25,
                              recurrent_dropout=0.5, seed=3, kernel_regularizer="l2", name="from_keras")
    config = theirs.get_config()
    ours = GRU.from_config(config).get_config()
    assert {key: ours[key] for key in config} == config
    assert (ours["use_cudnn"], ours["fp8"], ours["weight_multipliers"], ours["lr_multipliers"]) == (
        "auto", None, {}, {})
    back = keras.layers.GRU.from_config({key: value for key, value in ours.items() if key not in OURS_ONLY})
    assert back.get_config() == config
    rnn = keras.layers.RNN(GRUCell(4, weight_multipliers={"kernel": 2.0}), return_sequences=True)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(rnn))
    assert type(clone.cell) is GRUCell and clone.cell.weight_multipliers == {"kernel": 2.0}


def test_default_initialisers_are_unit_variance():
    layer = GRU(128)
    layer.build((2, 3, 256))
    kernel, recurrent, bias = (ops.convert_to_numpy(v) for v in layer.trainable_variables)
    assert 0.95 < kernel.std() < 1.05 and 0.95 < recurrent.std() < 1.05
    assert bias.shape == (2, 384)
    np.testing.assert_array_equal(bias, 0.0)


# --- gradients and the fused path --------------------------------------------------


@pytest.mark.parametrize("return_sequences, reset_after", [(True, True), (False, False)])
def test_gradients_are_true_gradients_scaled_on_cut_edges_only(return_sequences, reset_after):
    """The layer computes a plain GRU (weights × D^-1/2 and H^-1/2, output × s); each gradient is
    the true gradient of that function times one constant, per weight and for the input."""
    batch, steps, input_dim, units = 3, 5, 4, 6
    layer = GRU(units, return_sequences=return_sequences, reset_after=reset_after, use_cudnn=False)
    layer.build((batch, steps, input_dim))
    x = unit_normal(batch, steps, input_dim)
    cotangent = unit_normal(*((batch, steps, units) if return_sequences else (batch, units)), seed=5)
    weights = _weights(layer)
    out, grads = _layer_vjp(layer, x, cotangent, weights)

    rule = U.gru_rule(reset_after)
    alpha, beta = input_dim**-0.5, units**-0.5

    def plain(x, kernel, recurrent, bias):
        last, sequence, _ = _reference_gru(
            x, ops.zeros((batch, units)), None, kernel * alpha, recurrent * beta, bias, ops.tanh, ops.sigmoid,
            return_sequences=return_sequences, reset_after=reset_after,
        )
        return (sequence if return_sequences else last) * rule.output_scale

    true_out, true_grads = _vjp(plain, [x, *weights], cotangent)
    np.testing.assert_allclose(out, true_out, rtol=1e-5, atol=1e-6)
    m = steps if return_sequences else 1
    base = (batch * m) ** -0.5 / rule.preactivation_grad_rms
    factors = [
        (input_dim / (3 * units) * steps / m) ** 0.5 / rule.preactivation_grad_rms,  # x: cut edge
        base / alpha,
        base / (rule.hidden_rms * rule.recurrent_grad_ratio * rule.recurrent_grad_correlation) / beta,
        base / (rule.bias_grad_ratio * rule.bias_grad_correlation),
    ]
    for name, grad, true_grad, factor in zip(["x", "kernel", "recurrent", "bias"], grads, true_grads, factors):
        np.testing.assert_allclose(grad, true_grad * factor, rtol=1e-4, atol=1e-6, err_msg=name)


def test_fused_path_gets_the_scaled_weights_and_matches_the_cell_path(monkeypatch):
    """With a fused kernel the layer hands it the scaled weights and the plain state: same function, same gradients."""
    calls = []

    def fused(*args, **kwargs):
        calls.append(kwargs)
        return _reference_gru(*args, **kwargs)

    x = unit_normal(3, 4, 8)
    cotangent = unit_normal(3, 4, 10, seed=5)
    cell_only = GRU(10, return_sequences=True, go_backwards=True, use_cudnn=False)
    cell_only.build(x.shape)
    weights = _weights(cell_only)
    expected_out, expected_grads = _layer_vjp(cell_only, x, cotangent, weights)
    monkeypatch.setattr(keras_backend, "gru", fused)
    layer = GRU(10, return_sequences=True, go_backwards=True, use_cudnn=True)
    layer.build(x.shape)
    out, grads = _layer_vjp(layer, x, cotangent, weights)
    assert calls and calls[0]["reset_after"] is True
    np.testing.assert_allclose(out, expected_out, rtol=1e-4, atol=1e-5)
    for name, grad, expected in zip(["x", "kernel", "recurrent", "bias"], grads, expected_grads):
        np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5, err_msg=name)
    # Eagerly: the kernels arrive × D^-1/2 and H^-1/2.
    calls.clear()
    layer.set_weights(weights)
    layer(x)
    np.testing.assert_allclose(ops.convert_to_numpy(calls[0]["kernel"]), weights[0] * 8**-0.5, rtol=1e-6)
    np.testing.assert_allclose(ops.convert_to_numpy(calls[0]["recurrent_kernel"]), weights[1] * 10**-0.5, rtol=1e-6)


def test_use_cudnn_true_without_a_fused_kernel_raises(monkeypatch):
    def unavailable(*args, **kwargs):
        raise NotImplementedError

    monkeypatch.setattr(keras_backend, "gru", unavailable)
    with pytest.raises(ValueError, match="fused .cuDNN. GRU.*use_cudnn=True"):
        GRU(4, use_cudnn=True)(unit_normal(2, 3, 5))


def test_bidirectional_runs_each_direction_through_this_layer():
    layer = keras.layers.Bidirectional(GRU(8, return_sequences=True))
    for direction in (layer.forward_layer, layer.backward_layer):
        assert type(direction) is GRU and direction.use_cudnn is None
    out = ops.convert_to_numpy(layer(unit_normal(4, 10, 6)))
    assert out.shape == (4, 10, 16)
    _assert_in("output", rms(out))


# --- inputs, conversion, training, precision, errors -----------------------------------


@pytest.mark.parametrize("dtype", ["bool", "int32"])
def test_bool_and_int_inputs_compute_in_the_compute_dtype(dtype):
    x = unit_normal(2, 5, 3) > 0 if dtype == "bool" else np.round(unit_normal(2, 5, 3) * 2)
    x = x.astype(dtype)
    layer = GRU(4, return_sequences=True)
    expected = ops.convert_to_numpy(layer(x.astype("float32")))
    out = layer(x)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    np.testing.assert_allclose(ops.convert_to_numpy(out), expected, rtol=1e-6)


@pytest.mark.parametrize("return_sequences", [True, False], ids=["sequences", "last"])
def test_empty_batch_gives_empty_outputs_and_zero_gradients(return_sequences):
    layer = GRU(4, return_sequences=return_sequences, return_state=True)
    x = np.zeros((0, 5, 3), "float32")
    output, h = layer(x)
    assert tuple(output.shape) == ((0, 5, 4) if return_sequences else (0, 4)) and tuple(h.shape) == (0, 4)
    out, grads = _layer_vjp(layer, x, np.zeros((0, 5, 4) if return_sequences else (0, 4), "float32"))
    assert out.shape[0] == 0 and grads[0].shape == (0, 5, 3)
    for name, grad in zip(["kernel", "recurrent", "bias"], grads[1:]):
        np.testing.assert_array_equal(np.asarray(grad), 0.0, err_msg=name)


@pytest.mark.parametrize("reset_after", [True, False])
def test_unit_scale_converts_keras_gru_keeping_its_function(reset_after):
    """`unit_scale` makes our GRU from Keras's, with its settings and the same predictions (float32, 1e-5)."""
    from keras_unitscale import unit_scale

    keras.utils.set_random_seed(0)
    inputs = keras.Input((7,), dtype="int32")
    x = keras.layers.Embedding(12, 6, mask_zero=True)(inputs)
    x = keras.layers.GRU(8, return_sequences=True, reset_after=reset_after, go_backwards=True, seed=5,
                         name="gru")(x)
    x = keras.layers.Bidirectional(keras.layers.GRU(5, reset_after=reset_after), name="both")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the mask's op, the wrapper and both GRUs: nothing kept, nothing noted
        twin = unit_scale(model)
    converted = twin.get_layer("gru")
    assert type(converted) is GRU and converted.go_backwards and converted.cell.reset_after is reset_after
    assert converted.cell.seed == 5
    assert {type(layer) for layer in (twin.get_layer("both").forward_layer, twin.get_layer("both").backward_layer)} == {
        GRU}
    ids = np.random.default_rng(0).integers(0, 12, size=(4, 7))
    expected = model.predict(ids, verbose=0)
    np.testing.assert_allclose(twin.predict(ids, verbose=0), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert not {id(v) for v in twin.weights} & {id(v) for v in model.weights}


@pytest.mark.parametrize("merge_mode", ["concat", "sum", "ave", "mul", None])
@pytest.mark.parametrize("recurrent", ["LSTM", "GRU"])
def test_bidirectional_converts_in_every_merge_mode(recurrent, merge_mode):
    """Both directions become ours; the merge commutes with their common output scale (squared for "mul")."""
    from keras_unitscale import unit_scale

    keras.utils.set_random_seed(1)
    inputs = keras.Input((6, 4))
    wrapper = keras.layers.Bidirectional(getattr(keras.layers, recurrent)(5, return_sequences=True),
                                         merge_mode=merge_mode, name="both")
    merged = wrapper(inputs)
    merged = keras.layers.Concatenate()(merged) if merge_mode is None else merged
    model = keras.Model(inputs, keras.layers.Dense(2)(merged))
    twin = unit_scale(model)
    both = twin.get_layer("both")
    assert type(both.forward_layer).__module__.startswith("keras_unitscale")
    assert type(both.backward_layer) is type(both.forward_layer) and both.backward_layer.go_backwards
    x = unit_normal(3, 6, 4)
    expected = model.predict(x, verbose=0)
    np.testing.assert_allclose(twin.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_text_model_trains_saves_and_reloads(tmp_path):
    """Embedding(mask_zero=True) → GRU → Dense: fit (XLA-compiled on TensorFlow and JAX), save, reload."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 20, size=(64, 12))
    ids[np.arange(12)[None, :] >= rng.integers(3, 13, size=64)[:, None]] = 0
    labels = (ids == 1).any(axis=1).astype("int32")
    model = keras.Sequential([keras.Input((None,), dtype="int32"), keras.layers.Embedding(20, 16, mask_zero=True),
                              GRU(16), Dense(2, role="output")])
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=BACKEND != "torch")
    losses = model.fit(ids, labels, batch_size=16, epochs=4, verbose=0).history["loss"]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    path = str(tmp_path / "gru.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert isinstance(reloaded.layers[1], GRU)
    np.testing.assert_allclose(reloaded.predict(ids, verbose=0), model.predict(ids, verbose=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    keras.config.set_dtype_policy(policy)
    compute = policy.split("_")[1]
    layer = GRU(32, return_sequences=True)
    out, grads = _layer_vjp(layer, unit_normal(8, 16, 16), unit_normal(8, 16, 32, seed=9))
    assert keras.backend.standardize_dtype(out.dtype) == compute
    assert [g.dtype for g in grads[1:]] == ["float32"] * 3
    for name, value in zip(NAMES, [out, *grads]):
        value = np.asarray(value, "float32")
        assert np.all(np.isfinite(value)), name
        _assert_in(name, rms(value))


@pytest.mark.parametrize("reset_after", [True, False])
def test_fp8_step_is_close_to_float32_and_unit_scaled(reset_after):
    layer = GRU(32, return_sequences=True, reset_after=reset_after, fp8=True)
    x, cotangent = unit_normal(8, 16, 16), unit_normal(8, 16, 32, seed=9)
    out, grads = _layer_vjp(layer, x, cotangent)
    exact_out, exact_grads = _layer_vjp(GRU(32, return_sequences=True, reset_after=reset_after, fp8=False), x,
                                        cotangent)
    assert 0 < rms(np.asarray(out) - exact_out) / rms(exact_out) < 0.1
    for name, grad, exact in zip(NAMES[1:], grads, exact_grads):
        assert rms(np.asarray(grad) - exact) / rms(exact) < 0.1, name
        _assert_in(name, rms(grad))


@pytest.mark.parametrize(
    "make, received",
    [
        (lambda: GRU(0), "units=0"),
        (lambda: GRU(4, dropout=1.0), "dropout=1.0"),
        (lambda: GRU(4, activation="relu"), "activation='relu'"),
        (lambda: GRU(4, recurrent_activation="tanh"), "recurrent_activation='tanh'"),
        (lambda: GRU(4, reset_after="yes"), "reset_after='yes'"),
        (lambda: GRU(4, use_cudnn="yes"), "use_cudnn='yes'"),
        (lambda: GRU(4)(unit_normal(2, 5)), "sequences.shape=(2, 5)"),
        (lambda: U.gru_weights(unit_normal(4, 9), unit_normal(3, 9), unit_normal(9), unit_normal(2, 5, 4)),
         "bias.shape=(9,)"),
        (lambda: U.gru_weights(unit_normal(4, 8), unit_normal(3, 9), None, unit_normal(2, 5, 4)),
         "kernel.shape=(4, 8)"),
    ],
)
def test_bad_arguments_raise_value_error_with_the_value(make, received):
    with pytest.raises(ValueError, match=f"Received: .*{received.replace('(', '[(]').replace(')', '[)]')}"):
        make()
