"""Scale reports: what FP8 would lose of a plain model's gradients and not of ours; table, JSON, plot, CLI."""

import json
import math
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

from keras_unitscale import analysis
from keras_unitscale import layers as L
from keras_unitscale import losses
from keras_unitscale.cli import main
from tests.helpers import unit_normal


def _mlp(dense, scale=1.0, **head):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((30,)), dense(128, activation="relu", name="a"), dense(64, activation="relu", name="b"),
         dense(1, activation="sigmoid", name="c", **head)],
        name="mlp",
    )
    for variable in model.trainable_variables:
        variable.assign(keras.ops.convert_to_numpy(variable) * scale)
    return model


def _data():
    x = unit_normal(64, 30)
    return x, (x[:, :1] + x[:, 1:2] > 0).astype("float32")


def test_plain_tiny_weights_underflow_fp8_gradients_and_ours_do_not():
    x, y = _data()
    plain = analysis.scale_report(_mlp(keras.layers.Dense, scale=1e-3), x, y, loss="binary_crossentropy")
    for fmt in ("E4M3", "E5M2"):
        assert plain.underflow(fmt, kind=analysis.GRADIENT) > 0.5
        assert plain.underflow(fmt, kind=analysis.WEIGHT_GRADIENT) > 0.5
    assert "(100%)" in str(plain).splitlines()[-1]

    ours = analysis.scale_report(_mlp(L.Dense), x, y, loss=losses.BinaryCrossentropy())
    for kind in (analysis.GRADIENT, analysis.WEIGHT_GRADIENT, analysis.ACTIVATION):
        assert ours.underflow("E4M3", kind=kind) < 0.05
        assert ours.underflow("E5M2", kind=kind) < 0.01
    for row in ours.rows:
        if row["kind"] in (analysis.GRADIENT, analysis.WEIGHT_GRADIENT, analysis.ACTIVATION) and row["rms"] > 0:
            assert 2**-3 < row["rms"] < 2**3, row


def test_rows_cover_every_layer_output_gradient_and_weight():
    inputs = keras.Input((8,), dtype="int32")
    x = L.Embedding(20, 16, name="embed")(inputs)
    x = L.TransformerBlock(num_heads=2, index=0, depth=2, name="block0")(x)
    x = L.TransformerBlock(num_heads=2, index=1, depth=2, name="block1")(x)
    model = keras.Model(inputs, L.Dense(20, role="output", name="readout")(x))
    report = analysis.scale_report(model, np.random.default_rng(0).integers(0, 20, (4, 8)))
    tensors = {(row["layer"], row["tensor"]) for row in report.rows}
    for name in ("embed", "block0", "block1", "readout"):
        assert {(name, "output"), (name, "output gradient")} <= tensors
    assert ("readout", "kernel gradient") in tensors
    # Each block's sublayers, told apart by their variables' paths.
    weights = [row for row in report.rows if row["kind"] == analysis.WEIGHT]
    assert len(weights) == len(model.trainable_variables)
    for block in ("block0", "block1"):
        assert any(row["layer"] == f"{block}/attention/query" and row["tensor"] == "kernel" for row in weights)
    # Without targets a unit-normal gradient comes back from the output.
    (readout_grad,) = [r for r in report.rows if r["layer"] == "readout" and r["tensor"] == "output gradient"]
    assert readout_grad["rms"] == pytest.approx(1.0, rel=0.1)


def test_a_compiled_reporter_agrees_with_the_eager_report_and_follows_the_weights():
    x, y = _data()
    model = _mlp(L.Dense)
    reporter = analysis.ScaleReporter(model, loss=losses.BinaryCrossentropy(), jit_compile=True)

    def rms(report):
        return np.array([row["rms"] for row in report.rows])

    eager = analysis.scale_report(model, x, y, loss=losses.BinaryCrossentropy())
    np.testing.assert_allclose(rms(reporter(x, y)), rms(eager), rtol=1e-4)
    for variable in model.trainable_variables:
        variable.assign(keras.ops.convert_to_numpy(variable) * 2.0)
    changed = analysis.scale_report(model, x, y, loss=losses.BinaryCrossentropy())
    assert not np.allclose(rms(changed), rms(eager), rtol=1e-2)
    np.testing.assert_allclose(rms(reporter(x, y)), rms(changed), rtol=1e-4)
    # Without targets: the unit-normal gradient, as `scale_report` sends it.
    np.testing.assert_allclose(rms(reporter(x)), rms(analysis.scale_report(model, x)), rtol=1e-4)


def test_a_subclassed_model_reports_its_weights():
    class Tiny(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(4, name="inner")

        def call(self, x):
            return self.dense(x)

    model = Tiny()
    model(np.ones((2, 3), "float32"))
    report = analysis.scale_report(model, np.ones((2, 3), "float32"))
    assert ("inner", "kernel gradient") in {(r["layer"], r["tensor"]) for r in report.rows}


def _two_headed():
    inputs = keras.Input((6,), name="x")
    hidden = L.Dense(8, activation="relu", name="hidden")(inputs)
    return keras.Model(inputs, {"value": L.Dense(1, role="output", name="value")(hidden),
                                "label": L.Dense(3, role="output", name="label")(hidden)})


def _grad_of(report, layer, tensor="kernel gradient"):
    return next(r["rms"] for r in report.rows if r["layer"] == layer and r["tensor"] == tensor)


def test_a_model_with_two_outputs_sums_their_losses():
    model = _two_headed()
    x = unit_normal(16, 6)
    y = {"value": unit_normal(16, 1, seed=1), "label": np.arange(16) % 3}
    loss = {"value": losses.MeanSquaredError(), "label": losses.SparseCategoricalCrossentropy(from_logits=True)}
    report = analysis.scale_report(model, x, y, loss=loss)
    assert {"hidden", "value", "label"} <= {r["layer"] for r in report.rows}
    # The gradient is the sum of the two losses': each head's own, the shared layer's the sum of both.
    def gradients(submodel, targets, submodel_loss):
        grads = analysis.ScaleReporter(submodel, loss=submodel_loss, jit_compile=False).weight_gradients(x, targets)
        return {v.path: g for v, g in zip(submodel.trainable_variables, grads)}

    together = gradients(model, y, loss)
    alone = [gradients(keras.Model(model.input, model.output[key]), y[key], loss[key]) for key in ("value", "label")]
    for path, grad in together.items():
        np.testing.assert_allclose(grad, sum(one.get(path, 0.0) for one in alone), rtol=1e-5, atol=1e-6)
    both = _grad_of(report, "hidden")
    # Compiled with one loss per output, as a list: the same report.
    model.compile(loss=loss)
    np.testing.assert_allclose(_grad_of(analysis.scale_report(model, x, y), "hidden"), both, rtol=1e-5)
    with pytest.raises(ValueError, match="structure of the model's outputs"):
        analysis.scale_report(model, x, {"value": y["value"]})


def test_inputs_are_cast_to_their_input_dtype():
    seen = []

    def record(ids):
        seen.append(keras.backend.standardize_dtype(ids.dtype))
        return ops.cast(ids, "float32")

    inputs = keras.Input((5,), dtype="int32")
    model = keras.Model(inputs, L.Dense(2, role="output")(keras.layers.Lambda(record)(inputs)))
    ids = np.arange(20).reshape(4, 5) % 10
    for given in (ids.astype("int64"), ids.astype("float64")):
        seen.clear()
        analysis.scale_report(model, given)
        assert seen and set(seen) == {"int32"}, seen


def test_table_json_dataframe_and_plot(tmp_path):
    x, y = _data()
    report = analysis.scale_report(_mlp(keras.layers.Dense), x, y, loss="binary_crossentropy")
    text = str(report)
    header = text.splitlines()[1]
    assert "E4M3 uf%" in header and "FP16 sat%" in header
    assert len({len(line) for line in text.splitlines()[3:-1]}) <= 2  # aligned rows
    report.to_json(tmp_path / "report.json")
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["rows"] == report.to_dicts() and len(saved["rows"]) == 3 * 6
    assert report.offenders(2)[0]["kind"] in analysis.KINDS
    figure = analysis.plot_scales(report, tmp_path / "scales.png")
    width, height = (figure.get_size_inches() * figure.dpi).round().astype(int)
    png = (tmp_path / "scales.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (800, 550)
    assert (width, height) == (800, 550)


def test_a_thirty_layer_plot_keeps_its_labels_apart_and_inside(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((16,))]
        + [keras.layers.Dense(16, activation="relu", name=f"hidden_dense_layer_{i}") for i in range(29)]
        + [keras.layers.Dense(1, name="readout")]
    )
    figure = analysis.plot_scales(analysis.scale_report(model, unit_normal(8, 16)), tmp_path / "deep.png")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(figure).get_renderer()
    (axes,) = figure.axes
    labels = [label for label in axes.get_xticklabels() if label.get_text()]
    assert len(labels) == 30
    figure_box = figure.bbox
    for label in labels:
        box = label.get_window_extent(renderer)
        assert figure_box.x0 <= box.x0 and box.x1 <= figure_box.x1 and figure_box.y0 <= box.y0, label
    # Rotated by 60°, neighbouring labels are apart by spacing·sin 60° across their baselines.
    ticks = axes.transData.transform([(i, 0) for i in range(30)])[:, 0]
    text_height = labels[0].get_fontsize() * figure.dpi / 72
    assert np.min(np.diff(ticks)) * math.sin(math.radians(60)) > text_height


def test_dataframe():
    pytest.importorskip("pandas")
    x, y = _data()
    report = analysis.scale_report(_mlp(keras.layers.Dense), x, y, loss="binary_crossentropy")
    assert len(report.to_dataframe()) == len(report.rows)


def test_analyze_cli_end_to_end(tmp_path, capsys):
    model = _mlp(keras.layers.Dense, scale=1e-3)
    model.compile("adam", "binary_crossentropy")
    model.save(tmp_path / "plain.keras")
    x, y = _data()
    np.savez(tmp_path / "data.npz", x=x, y=y)
    assert main(["analyze", str(tmp_path / "plain.keras"), "--data", str(tmp_path / "data.npz"),
                 "--out", str(tmp_path / "out")]) == 0
    assert "E5M2 uf%" in capsys.readouterr().out
    rows = json.loads((tmp_path / "out" / "scale_report.json").read_text())["rows"]
    assert max(r["e5m2_underflow"] for r in rows if r["kind"] == "weight gradient") > 0.5
    assert (tmp_path / "out" / "scales.png").stat().st_size > 1000

    ours = _mlp(L.Dense)
    ours.save(tmp_path / "ours.keras")
    assert main(["analyze", str(tmp_path / "ours.keras"), "--batch", "8", "--out", str(tmp_path / "ours")]) == 0


def test_analyze_cli_refuses_a_file_that_is_not_a_model(tmp_path):
    bogus = tmp_path / "notes.keras"
    bogus.write_text("not a model")
    result = subprocess.run(
        [sys.executable, "-m", "keras_unitscale", "analyze", str(bogus), "--out", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert "is not a Keras model" in result.stderr and "notes.keras" in result.stderr


def test_scale_tracker_logs_to_history_and_tensorboard(tmp_path):
    from keras_unitscale.callbacks import ScaleTracker

    x, y = _data()
    model = _mlp(L.Dense)
    model.compile("adam", losses.BinaryCrossentropy())
    tracker = ScaleTracker(every=2, log_dir=tmp_path / "logs", x=x[:16], y=y[:16])
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[tracker])
    assert [step for step, _ in tracker.reports] == [1, 2, 4, 6, 8]
    for key in ("scale_min_log2_rms", "scale_max_log2_rms", "scale_e4m3_underflow", "scale_fp16_underflow"):
        assert len(history.history[key]) == 2
    assert -3 < history.history["scale_min_log2_rms"][-1] <= history.history["scale_max_log2_rms"][-1] < 3
    events = list((tmp_path / "logs").glob("events.out.tfevents*"))
    assert events and events[0].stat().st_size > 1000
    assert tracker.first_non_finite is None


def test_scale_tracker_names_the_first_non_finite_tensor():
    from keras_unitscale.callbacks import ScaleTracker

    x, y = _data()
    model = _mlp(keras.layers.Dense)
    model.compile("adam", "binary_crossentropy")
    poisoned = x[:8].copy()
    poisoned[0, 0] = np.inf
    tracker = ScaleTracker(every=1, x=poisoned, stop_on_non_finite=True)
    with pytest.warns(UserWarning, match="first non-finite tensor is a output"):
        history = model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[tracker])
    assert tracker.first_non_finite == {"step": 1, "layer": "a", "tensor": "output"}
    assert len(history.history["loss"]) == 1


@pytest.mark.parametrize("cause", ["data", "learning rate"])
def test_scale_tracker_names_where_a_bad_batch_or_learning_rate_first_breaks_our_layers(cause):
    from keras_unitscale import optimizers
    from keras_unitscale.callbacks import ScaleTracker

    x, y = _data()
    model = _mlp(L.Dense)
    x_train = x.copy()
    if cause == "data":
        x_train[20, 3] = np.nan  # in the second batch of 16
        optimizer = optimizers.Adam(1e-2)
    else:
        optimizer = optimizers.SGD(1e30)
    # MSE: PyTorch's binary cross-entropy raises on a NaN probability instead of returning NaN.
    model.compile(optimizer, losses.MeanSquaredError())
    tracker = ScaleTracker(every=100, x=x[:8], y=y[:8], stop_on_non_finite=True)
    with pytest.warns(UserWarning, match="non-finite"):
        model.fit(x_train, y, batch_size=16, epochs=5, shuffle=False, verbose=0, callbacks=[tracker])
    found = tracker.first_non_finite
    assert found is not None and found["layer"] == "a", found
    if cause == "data":
        assert found["step"] == 2
    assert tracker._step < 20  # stopped, not 5 epochs of NaN


def test_scale_tracker_without_data_tracks_the_weights():
    from keras_unitscale.callbacks import ScaleTracker

    x, y = _data()
    model = _mlp(L.Dense)
    model.compile("adam", losses.BinaryCrossentropy())
    tracker = ScaleTracker(every=100)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[tracker])
    ((step, report),) = tracker.reports
    assert step == 1 and {row["kind"] for row in report.rows} == {analysis.WEIGHT}
    with pytest.raises(ValueError, match="every=0"):
        ScaleTracker(every=0)
