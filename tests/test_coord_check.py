"""Coordinate check: a u-μP transformer keeps its layers' sizes across width as it trains; a standard one does not."""

import math

import keras
import numpy as np
import pytest

import keras_unitscale
from keras_unitscale import layers as L
from keras_unitscale import models
from keras_unitscale.analysis import CoordCheck
from keras_unitscale.analysis import coord_check
from keras_unitscale.analysis import plot_coord_check

# Widths large against the batch's 64 tokens, as in `mup`'s own check
# (widths 1000 and 4000, batches of 32): after the first update, the readout's
# logits are a part aligned with the batch's features, Θ(1) at every width,
# plus a width^-1/2 remainder that at widths 32 and 128 still shows (ratio 0.7).
VOCAB, SEQ, BATCH, DEPTH = 64, 16, 4, 2
NARROW, WIDE = 128, 512
STEPS = 3
# The band for the ratio of a layer's mean |output| at widths 4× apart.
BAND = (1 / 1.2, 1.2)
# u-μP's base learning rate (the per-variable factors do the rest) and the
# standard model's: both sensible for Adam on this small model.
UMUP_LR = 2.0**-1
STANDARD_LR = 1e-2


def _data():
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(BATCH, SEQ + 1)).astype("int32")
    return tokens[:, :-1], tokens[:, 1:]


def _umup_transformer(width, readout_zero_init=True):
    # As in `mup`'s own coordinate check: the readout starts at zero.
    return models.transformer_lm(VOCAB, width, DEPTH, head_dim=16, seq_len=SEQ, parametrization="u-mup",
                                 readout_zero_init=readout_zero_init)


def _standard_transformer(width):
    return models.transformer_lm(VOCAB, width, DEPTH, head_dim=16, seq_len=SEQ, parametrization="standard")


# These train transformers of width 512, which JAX compiles anew each time.
_SKIP_ON_JAX = "CI time: the coordinate checks run on TensorFlow and PyTorch"


# Each check trains two transformers: run once, shared by the tests below.
@pytest.fixture(scope="module")
def umup_check():
    if keras.backend.backend() == "jax":
        pytest.skip(_SKIP_ON_JAX)
    keras.config.set_dtype_policy("float32")
    x, y = _data()
    return coord_check(
        _umup_transformer, [NARROW, WIDE], x, y, steps=STEPS,
        optimizer_fn=lambda: keras_unitscale.optimizers.Adam(UMUP_LR),
        loss=keras_unitscale.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


@pytest.fixture(scope="module")
def standard_check():
    if keras.backend.backend() == "jax":
        pytest.skip(_SKIP_ON_JAX)
    keras.config.set_dtype_policy("float32")
    x, y = _data()
    return coord_check(
        _standard_transformer, [NARROW, WIDE], x, y, steps=STEPS,
        optimizer_fn=lambda: keras.optimizers.Adam(STANDARD_LR),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def _outside_band(ratios):
    return {
        layer: [round(r, 3) for r in values]
        for layer, values in ratios.items()
        if not all(BAND[0] <= r <= BAND[1] for r in values)
    }


def test_umup_transformer_stays_in_band_for_three_steps(umup_check):
    ratios = umup_check.ratios(NARROW, WIDE)
    assert list(ratios) == ["embed", "block0", "block1", "final_norm", "readout"]
    assert all(len(values) == STEPS + 1 for values in ratios.values())
    # The zero readout gives zero logits at both widths before the first
    # step (ratio 1 by definition, as `mup`'s test asserts both are 0).
    assert umup_check.table["readout"][NARROW][0] == umup_check.table["readout"][WIDE][0] == 0.0
    assert _outside_band(ratios) == {}, ratios


def test_umup_readout_without_zero_init_starts_at_mup_logit_scale():
    # u-μP's table alone (a unit-variance kernel times 1/fan_in) starts the
    # logits at fan_in^-1/2: widths 4x apart give a ratio of 1/2 at step 0.
    if keras.backend.backend() == "jax":
        pytest.skip(_SKIP_ON_JAX)
    keras.config.set_dtype_policy("float32")
    x, y = _data()
    check = coord_check(
        lambda width: _umup_transformer(width, readout_zero_init=False), [NARROW, WIDE], x, y, steps=0,
        optimizer_fn=lambda: keras_unitscale.optimizers.Adam(UMUP_LR),
        loss=keras_unitscale.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    ratios = check.ratios(NARROW, WIDE)
    assert ratios["readout"][0] == pytest.approx(math.sqrt(NARROW / WIDE), rel=0.1), ratios
    assert _outside_band({k: v for k, v in ratios.items() if k != "readout"}) == {}, ratios


def test_standard_transformer_leaves_band_within_three_steps(standard_check):
    ratios = standard_check.ratios(NARROW, WIDE)
    assert {"embed", "block0", "block1", "final_norm", "readout"} <= set(ratios)
    assert _outside_band(ratios) != {}, ratios
    # And by training, not only by its initialisation: hidden activations
    # inside the band at step 0 have left it by step 3.
    drifted = [layer for layer, r in ratios.items() if BAND[0] <= r[0] <= BAND[1] and not BAND[0] <= r[-1] <= BAND[1]]
    assert drifted, ratios


def test_table_and_rows(umup_check):
    assert umup_check.widths == [NARROW, WIDE] and umup_check.steps == STEPS
    rows = umup_check.to_dicts()
    assert len(rows) == len(umup_check.table) * 2 * (STEPS + 1)
    assert set(rows[0]) == {"layer", "width", "step", "mean_abs"}
    assert all(row["mean_abs"] > 0 and math.isfinite(row["mean_abs"]) for row in rows
               if (row["layer"], row["step"]) != ("readout", 0))
    row = rows[-1]
    assert umup_check.table[row["layer"]][row["width"]][row["step"]] == row["mean_abs"]
    assert "CoordCheck" in repr(umup_check)


def test_plot_writes_png(umup_check, tmp_path):
    path = tmp_path / "coord_check.png"
    figure = plot_coord_check(umup_check, path=str(path))
    assert len(figure.axes) == STEPS + 1
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def _tiny(width):
    return keras.Sequential([keras.Input((4,)), L.Dense(width, name="hidden")])


@pytest.mark.parametrize("widths", [[8], [8, 0], [8, 8], [8, 16.0], [True, 8], None, 8])
def test_bad_widths(widths):
    x = np.zeros((2, 4), "float32")
    with pytest.raises(ValueError, match=r"widths=") as info:
        coord_check(_tiny, widths, x, x, optimizer_fn=keras.optimizers.Adam, loss="mse")
    assert "at least 2 distinct positive integers" in str(info.value)


@pytest.mark.parametrize("steps", [-1, 1.5, True])
def test_bad_steps(steps):
    x = np.zeros((2, 4), "float32")
    with pytest.raises(ValueError, match=rf"steps={steps!r}"):
        coord_check(_tiny, [4, 8], x, x, steps=steps, optimizer_fn=keras.optimizers.Adam, loss="mse")


def test_uncompiled_model_without_optimizer():
    x = np.zeros((2, 4), "float32")
    with pytest.raises(ValueError, match=r"optimizer_fn=None.*width=4"):
        coord_check(_tiny, [4, 8], x, x)


def test_ratios_of_a_width_not_checked_and_plot_of_a_non_result():
    result = CoordCheck([8, 32], 0, {"d": {8: [1.0], 32: [1.0]}})
    assert result.ratios(8, 32) == {"d": [1.0]}
    zeros = CoordCheck([8, 32], 1, {"d": {8: [0.0, 1.0], 32: [0.0, 0.0]}, "e": {8: [0.0], 32: [2.0]}})
    assert zeros.ratios(8, 32) == {"d": [1.0, 0.0], "e": [math.inf]}
    with pytest.raises(ValueError, match=r"width_b=64"):
        result.ratios(8, 64)
    with pytest.raises(ValueError, match=r"result=\{"):
        plot_coord_check({"d": {}})


def test_model_without_input():
    class Subclassed(keras.Model):
        def call(self, x):
            return x

    x = np.zeros((2, 4), "float32")
    with pytest.raises(ValueError, match=r"keras.Input.*width=4"):
        coord_check(lambda width: Subclassed(), [4, 8], x, x, optimizer_fn=keras.optimizers.Adam, loss="mse")
