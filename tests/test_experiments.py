"""The reference models build in both parametrizations; the learning-rate sweep runs and reports."""

import csv
import json
import math

import keras
import numpy as np
import pytest

from keras_unitscale import experiments
from keras_unitscale import layers as L
from keras_unitscale import models


@pytest.mark.parametrize("parametrization", models.PARAMETRIZATIONS)
def test_the_models_build_and_run_in_both_parametrizations(parametrization):
    ours = parametrization == "u-mup"
    tokens = np.random.default_rng(0).integers(0, 40, (2, 8))
    built = {
        "mlp": (models.mlp(12, width=16, parametrization=parametrization), np.ones((2, 12), "float32"), (2, 1)),
        "lstm_lm": (models.lstm_lm(40, width=16, depth=2, seq_len=8, parametrization=parametrization), tokens,
                    (2, 8, 40)),
        "transformer_lm": (models.transformer_lm(40, 32, 2, head_dim=16, seq_len=8, parametrization=parametrization),
                           tokens, (2, 8, 40)),
    }
    for name, (model, x, shape) in built.items():
        out = keras.ops.convert_to_numpy(model(x))
        assert out.shape == shape and np.isfinite(out).all(), name
        readout = model.get_layer("readout")
        assert isinstance(readout, L.Dense) == ours, name
        if ours:
            assert readout.role == "output"
        assert all(type(layer).__module__.startswith("keras_unitscale") == ours
                   for layer in model.layers if layer.weights), name
    blocks = [layer.name for layer in built["transformer_lm"][0].layers if layer.name.startswith("block")]
    assert {"block0", "block1"} <= set(blocks)


def test_model_arguments_are_checked():
    with pytest.raises(ValueError, match="parametrization.*Received: .*'mup'"):
        models.mlp(4, parametrization="mup")
    with pytest.raises(ValueError, match="not both"):
        models.transformer_lm(10, 32, 1, num_heads=2, head_dim=16)
    with pytest.raises(ValueError, match="multiple of `head_dim`.*width=40, head_dim=16"):
        models.transformer_lm(10, 40, 1, head_dim=16)


def test_char_lm_data_splits_the_text_and_shifts_the_targets():
    (x, y), (xv, yv), vocabulary = experiments.char_lm_data(24, 10, 5, seed=1)
    assert x.shape == y.shape == (10, 24) and xv.shape == yv.shape == (5, 24)
    assert (x[:, 1:] == y[:, :-1]).all() and (xv[:, 1:] == yv[:, :-1]).all()
    assert x.max() < len(vocabulary) and "".join(vocabulary).strip()
    text = "".join(vocabulary[i] for i in xv[0])
    assert text in experiments.pydoc_text()[int(0.9 * len(experiments.pydoc_text())) - 1:]


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="backend-independent Keras code; CI's time is spent on the models above")
def test_a_sweep_returns_a_well_formed_table_and_plot(tmp_path):
    (x, y), validation, vocabulary = experiments.char_lm_data(16, 64, 16)

    def sweep(width):
        return experiments.lr_sweep(
            lambda: models.transformer_lm(len(vocabulary), width, 1, head_dim=8, seq_len=16),
            [2.0**-3, 2.0**-1, 2.0**8], (x, y), validation, steps=3, batch_size=16, label=f"width {width}",
            verbose=0,
        )

    result = sweep(16) + sweep(32)
    assert result.labels == ["width 16", "width 32"] and len(result.rows) == 6
    assert {"label", "learning_rate", "log2_learning_rate", "validation_loss", "train_loss", "parameters"} <= set(
        result.rows[0]
    )
    # Same seed and batches: the learning rate is the only difference between runs of one width.
    losses = [r["validation_loss"] for r in result.rows if r["label"] == "width 16"]
    assert len(set(losses)) == 3
    optima = result.optima()
    assert set(optima) == {"width 16", "width 32"} and all(lr in (2.0**-3, 2.0**-1, 2.0**8) for lr in optima.values())
    for label, lr in optima.items():
        assert result.best(label)["validation_loss"] == min(
            r["validation_loss"] for r in result.rows if r["label"] == label and math.isfinite(r["validation_loss"])
        )
    table = str(result).splitlines()
    assert table[0].split() == ["log2", "lr", "width", "16", "width", "32"] and len(table) == 4 and sum(line.count("*") for line in table) == 2
    result.to_csv(tmp_path / "sweep.csv")
    result.to_json(tmp_path / "sweep.json")
    with open(tmp_path / "sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
    assert json.loads((tmp_path / "sweep.json").read_text())["optima"] == {k: v for k, v in optima.items()}
    result.plot(tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_arguments_are_checked():
    data = (np.zeros((4, 8), "int32"), np.zeros((4, 8), "int32"))
    with pytest.raises(ValueError, match="at least one learning rate"):
        experiments.lr_sweep(lambda: None, [], data, data)
    with pytest.raises(ValueError, match="learning_rates"):
        experiments.lr_sweep(lambda: None, [-1.0], data, data)
    with pytest.raises(ValueError, match="No runs labelled 'x'"):
        experiments.SweepResult([]).curve("x")
