"""Growing and shrinking a model's width: the function kept, u-μP's factors of the new width, errors."""

import os

import keras
import numpy as np
import pytest
from helpers import rms

from keras_unitscale import layers as L
from keras_unitscale import models
from keras_unitscale import optimizers
from keras_unitscale import parametrization
from keras_unitscale import weights
from keras_unitscale.resize import GrowthError
from keras_unitscale import grow
from keras_unitscale import shrink

# The largest output difference allowed after a resize, relative to the outputs' RMS (float32).
FUNCTION_KEPT = 1e-5


def _mlp(width=16):
    return models.mlp(8, width=width, depth=3, output_dim=3, output_activation=None)


def _lstm(width=16):
    return models.lstm_lm(vocab_size=20, width=width, seq_len=8)


def _transformer(width=32, depth=2):
    return models.transformer_lm(vocab_size=32, width=width, depth=depth, head_dim=16, seq_len=8)


def _residual_lstm(width=16, depth=2):
    return models.lstm_lm(vocab_size=20, width=width, depth=depth, seq_len=8, residual=True)


def _gru(width=16):
    # A GRU language model with an RMS norm, of both of Keras's GRU conventions.
    return keras.Sequential([
        keras.Input((8,), dtype="int32"), L.Embedding(20, width, name="embed"),
        L.GRU(width, return_sequences=True, name="gru0"), L.GRU(width, return_sequences=True, reset_after=False,
                                                                 name="gru1"),
        L.RMSNormalization(name="norm"), L.Dense(20, role="output", name="readout"),
    ], name="gru_lm")


BUILDERS = {"mlp": _mlp, "lstm_lm": _lstm, "gru_lm": _gru, "transformer_lm": _transformer,
            "residual_lstm_lm": _residual_lstm}
# The models whose depth grows with the function kept: stacks of residual blocks (transformer or recurrent).
STACKS = ["transformer_lm", "residual_lstm_lm"]


def _inputs(name, seed=0):
    rng = np.random.default_rng(seed)
    if name == "mlp":
        return rng.normal(size=(16, 8)).astype("float32")
    vocab = 32 if name == "transformer_lm" else 20
    return rng.integers(0, vocab, size=(4, 8)).astype("int32")


def _outputs(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False)).astype("float64")


def _relative_change(new, old):
    return float(np.max(np.abs(new - old)) / rms(old))


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("factor", [2, 3])
def test_growing_the_width_keeps_the_function(name, factor):
    keras.utils.set_random_seed(0)
    model = BUILDERS[name]()
    x = _inputs(name)
    grown = grow(model, width=factor, seed=1)
    assert _relative_change(_outputs(grown, x), _outputs(model, x)) < FUNCTION_KEPT
    assert grown.count_params() > 1.5 * model.count_params()


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("split", ["zero_sum", "partition"])
def test_growth_stores_weights_at_the_scale_they_had(name, split):
    # Both splits keep each kernel's RMS: a grown model's weights are at unit scale where the original's were.
    keras.utils.set_random_seed(0)
    model = BUILDERS[name]()
    grown = grow(model, width=2, split=split, seed=1)
    old = {v.path: rms(keras.ops.convert_to_numpy(v)) for v in model.trainable_weights if len(v.shape) > 1}
    new = {v.path: rms(keras.ops.convert_to_numpy(v)) for v in grown.trainable_weights if len(v.shape) > 1}
    assert old.keys() == new.keys()
    for path, value in old.items():
        assert new[path] == pytest.approx(value, rel=0.15), path


@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_grown_model_has_the_new_widths_multipliers_and_learning_rates(name):
    # The same base learning rate is right for the grown model: its u-μP factors are those of a model built at
    # the new width (the layers declare their roles at their own sizes).
    keras.utils.set_random_seed(0)
    grown = grow(BUILDERS[name](), width=2)
    fresh = BUILDERS[name](width=32 if name != "transformer_lm" else 64)
    grown_roles = {v.path: parametrization.role_of(v) for v in grown.trainable_weights}
    fresh_roles = {v.path: parametrization.role_of(v) for v in fresh.trainable_weights}
    assert grown_roles == fresh_roles
    assert parametrization.lr_multipliers(grown) == parametrization.lr_multipliers(fresh)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_shrinking_a_grown_model_gives_back_the_original(name):
    keras.utils.set_random_seed(0)
    model = BUILDERS[name]()
    back = shrink(grow(model, width=2, split="zero_sum", seed=3), width=2)
    assert [v.path for v in back.weights] == [v.path for v in model.weights]
    for old, new in zip(model.weights, back.weights):
        assert tuple(new.shape) == tuple(old.shape)
        # Zero-sum noise larger than an entry's share leaves no copy fine enough to take the fold's last ulp.
        np.testing.assert_allclose(keras.ops.convert_to_numpy(new), keras.ops.convert_to_numpy(old), atol=1e-6)


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("factor", [2, 3])
@pytest.mark.parametrize("split", ["partition", "even"])
def test_shrinking_a_grown_model_gives_back_the_original_bit_for_bit(name, factor, split):
    keras.utils.set_random_seed(0)
    model = BUILDERS[name]()
    x = _inputs(name)
    grown = grow(model, width=factor, split=split, seed=3)
    assert _relative_change(_outputs(grown, x), _outputs(model, x)) < FUNCTION_KEPT
    back = shrink(grown, width=factor)
    for old, new in zip(model.weights, back.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(new), keras.ops.convert_to_numpy(old), err_msg=old.path)
    np.testing.assert_array_equal(_outputs(back, x), _outputs(model, x))


def test_a_fractional_factor_grows_a_model_without_norms():
    keras.utils.set_random_seed(0)
    model = _mlp(width=16)
    x = _inputs("mlp")
    grown = grow(model, width=1.5, seed=0)
    assert grown.get_layer("hidden0").units == 24
    assert _relative_change(_outputs(grown, x), _outputs(model, x)) < FUNCTION_KEPT
    back = shrink(grown, width=1.5)
    assert _relative_change(_outputs(back, x), _outputs(model, x)) < FUNCTION_KEPT


def _copies_gap(model, layer_name, old_units):
    """The largest difference between a hidden layer's units and their copies' incoming weights."""
    kernel = keras.ops.convert_to_numpy(model.get_layer(layer_name).kernel)
    return float(np.max(np.abs(kernel[:, old_units:] - kernel[:, :old_units])))


@pytest.mark.parametrize("split", ["zero_sum", "partition", "even"])
def test_the_zero_sum_and_partition_splits_let_copies_part_and_the_even_split_keeps_them_tied(split):
    keras.utils.set_random_seed(0)
    model = _mlp(width=16)
    grown = grow(model, width=2, split=split, seed=0)
    x, y = _inputs("mlp"), np.random.default_rng(1).normal(size=(16, 3)).astype("float32")
    grown.compile(optimizers.Adam(0.05), "mse")
    grown.fit(x, y, epochs=3, batch_size=16, verbose=0)
    gap = _copies_gap(grown, "hidden1", 16)
    if split != "even":
        assert gap > 1e-3
    else:
        assert gap < 1e-6


@pytest.mark.parametrize("noise", [1e-3, 1e-1])
def test_noise_moves_the_outputs_by_about_its_size(noise):
    # The docstring's statement: the outputs' RMS change, relative to their RMS, is about `noise`
    # (0.8 to 1.9 times it measured over 3 seeds on TensorFlow and PyTorch).
    keras.utils.set_random_seed(0)
    model = _mlp()
    x = np.random.default_rng(0).normal(size=(256, 8)).astype("float32")
    before = _outputs(model, x)
    change = rms(_outputs(grow(model, width=2, noise=noise, seed=0), x) - before) / rms(before)
    assert noise / 4 < change < 4 * noise


@pytest.mark.parametrize("name, sizes", [("lstm_lm", {"width": 2}), ("transformer_lm", {"width": 2, "depth": 2}),
                                         ("residual_lstm_lm", {"width": 2, "depth": 2})])
def test_a_grown_model_trains_on_from_the_loss_it_had_and_saves(name, sizes, tmp_path):
    keras.utils.set_random_seed(0)
    model = BUILDERS[name]()
    x = _inputs(name)
    y = np.roll(x, -1, axis=1)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizers.Adam(0.01), loss)
    model.fit(x, y, epochs=3, batch_size=4, verbose=0)
    before = model.evaluate(x, y, verbose=0)
    grown = grow(model, seed=0, **sizes)
    grown.compile(optimizers.Adam(0.01), loss)  # the same learning rate
    assert grown.evaluate(x, y, verbose=0) == pytest.approx(before, rel=1e-5)
    grown.fit(x, y, epochs=3, batch_size=4, verbose=0)
    assert grown.evaluate(x, y, verbose=0) < before
    # Saved and reloaded (multipliers and norms' epsilons in the configs): the same model.
    path = os.path.join(tmp_path, "grown.keras")
    grown.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(_outputs(reloaded, x), _outputs(grown, x), rtol=1e-5, atol=1e-5)


def test_what_cannot_be_grown_is_named():
    with pytest.raises(GrowthError, match=r"20\.8, not a whole number.*Received: widths × 1\.3"):
        grow(_mlp(width=16), width=1.3)
    with pytest.raises(GrowthError, match=r"'\w*norm' \(LayerNormalization\) normalises over a width grown by 1\.5"):
        grow(_transformer(width=32), width=1.5)
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="plain_dense"), L.Dense(1, role="output")])
    with pytest.raises(GrowthError, match=r"'plain_dense' \(Dense\) has weights but no rule"):
        grow(plain, width=2)
    with pytest.raises(GrowthError, match=r"16 times 0\.333333 is 5\.33333, not a whole number"):
        shrink(_mlp(width=16), width=3)
    with pytest.raises(GrowthError, match="`width` must be a number > 0. Received: width=0"):
        grow(_mlp(), width=0)
    with pytest.raises(GrowthError, match="`split` must be one of"):
        grow(_mlp(), width=2, split="random")

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = L.Dense(4)

        def call(self, x):
            return self.dense(x)

    subclassed = Subclassed()
    subclassed(np.zeros((1, 3), "float32"))
    with pytest.raises(GrowthError, match="Sequential or functional.*Received: Subclassed"):
        grow(subclassed, width=2)
    headless = keras.Sequential([keras.Input((4,)), L.Dense(8), L.Dense(2)])
    with pytest.raises(GrowthError, match="outputs have other shapes.*role='output'"):
        grow(headless, width=2)
    lora = _mlp()
    lora.get_layer("hidden1").enable_lora(2)
    with pytest.raises(GrowthError, match="'hidden1' has LoRA enabled"):
        grow(lora, width=2)


# ---------------------------------------------------------------- depth


def _blocks(model):
    return [layer for layer in model.layers if isinstance(layer, (L.TransformerBlock, L.RecurrentBlock))]


@pytest.mark.parametrize("name", STACKS)
@pytest.mark.parametrize("depth, insert", [(2, "interleave"), (2, "end"), (3, "interleave"), (1.5, [1]), (2, [0, 3])])
def test_growing_the_depth_keeps_the_function(name, depth, insert):
    keras.utils.set_random_seed(0)
    model = BUILDERS[name]()
    x = _inputs(name)
    grown = grow(model, depth=depth, insert=insert)
    blocks = _blocks(grown)
    assert len(blocks) == int(2 * depth)
    assert [block.index for block in blocks] == list(range(len(blocks)))
    assert {block.depth for block in blocks} == {len(blocks)}
    assert _relative_change(_outputs(grown, x), _outputs(model, x)) < FUNCTION_KEPT


@pytest.mark.parametrize("depth, insert", [(2, "interleave"), (2, "end"), (3, [1, 2, 4, 5, 7, 8])])
def test_deepening_a_relu_mlp_inserts_identity_layers_and_keeps_the_function(depth, insert):
    keras.utils.set_random_seed(0)
    model = _mlp()
    x = _inputs("mlp")
    grown = grow(model, width=2, depth=depth, insert=insert)
    hidden = [layer for layer in grown.layers if layer.role != "output"]
    assert len(hidden) == 3 * depth
    assert _relative_change(_outputs(grown, x), _outputs(model, x)) < FUNCTION_KEPT
    back = shrink(grown, width=2, depth=depth, data=x)
    assert [layer.name for layer in back.layers] == [layer.name for layer in model.layers]
    assert back.resize_record["output_change"] < FUNCTION_KEPT


def test_an_inserted_layer_takes_no_fixed_learning_rate_factor_of_the_layer_it_follows():
    # A fixed factor is set where `unit_scale` moved a weight to unit scale: it belongs to that weight.
    model = _mlp()
    weights.set_lr_multiplier(model.get_layer("hidden0").kernel, 0.5)
    grown = grow(model, depth=2)
    assert weights.lr_multiplier(grown.get_layer("hidden0").kernel) == 0.5
    assert weights.lr_multiplier(grown.get_layer("hidden0_grown1").kernel) is None


# Each block's output projections: {multiplier key: the layer's attribute path}.
OUTPUT_PROJECTIONS = {
    "transformer_lm": {"mlp_down/kernel": "mlp_down", "attention/attention_output/kernel": "attention._output_dense"},
    "residual_lstm_lm": {"projection/kernel": "projection"},
}


def _sublayer(layer, path):
    for attribute in path.split("."):
        layer = getattr(layer, attribute)
    return layer


@pytest.mark.parametrize("name", STACKS)
def test_inserted_blocks_add_nothing_and_kept_ones_carry_the_depth_rule(name):
    keras.utils.set_random_seed(0)
    model = BUILDERS[name]()
    grown = grow(model, depth=2)
    from keras_unitscale.resize.depth import block_contributions

    chain = [layer for layer in grown.layers if not isinstance(layer, keras.layers.InputLayer)]
    positions = [i for i, layer in enumerate(chain) if layer in _blocks(grown)]
    shares = block_contributions(chain, positions, _inputs(name))
    names = [chain[i].name for i in positions]
    assert names == ["block0", "block0_grown1", "block1", "block1_grown3"]
    assert shares[1] < 1e-6 and shares[3] < 1e-6  # zero, but for the float32 rounding of (Π b)·x
    assert min(shares[0], shares[2]) > 0.1
    # Interleaved ×2: each kept branch's output × √2 (its tau fell by about √2), in its weight multiplier; the
    # stored weights are the original's.
    kept = grown.get_layer("block1")
    for key, path in OUTPUT_PROJECTIONS[name].items():
        assert kept.weight_multipliers[key] == pytest.approx(2**0.5, rel=1e-6)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(_sublayer(kept, path).kernel),
                                      keras.ops.convert_to_numpy(_sublayer(model.get_layer("block1"), path).kernel))


@pytest.mark.parametrize("name", STACKS)
def test_a_deeper_model_has_the_new_depths_learning_rates(name):
    keras.utils.set_random_seed(0)
    grown = grow(BUILDERS[name](), depth=2)
    fresh = BUILDERS[name](depth=4)
    assert sorted(parametrization.lr_multipliers(grown).values()) == pytest.approx(
        sorted(parametrization.lr_multipliers(fresh).values()))
    assert {parametrization.role_of(v).depth for block in _blocks(grown) for v in block.trainable_weights} == {4}


@pytest.mark.parametrize("name", STACKS)
def test_shrinking_a_deepened_model_removes_the_inserted_blocks(name):
    keras.utils.set_random_seed(0)
    model = BUILDERS[name]()
    x = _inputs(name)
    back = shrink(grow(model, width=2, depth=2, split="partition"), width=2, depth=2, data=x)
    assert back.resize_record["removed"] == ["block0_grown1", "block1_grown3"]
    assert back.resize_record["output_change"] < FUNCTION_KEPT
    assert [v.path for v in back.weights] == [v.path for v in model.weights]
    for old, new in zip(model.weights, back.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(new), keras.ops.convert_to_numpy(old), err_msg=old.path)
    for block in _blocks(back):
        assert all(value == pytest.approx(1.0, rel=1e-9) for value in block.weight_multipliers.values())
        assert block.depth == 2
    # Bit for bit: the configs (multipliers, the norms' epsilons, the inputs' name) and the outputs are the original's.
    assert [layer.get_config() for layer in back.layers] == [layer.get_config() for layer in model.layers]
    np.testing.assert_array_equal(_outputs(back, x), _outputs(model, x))


@pytest.mark.parametrize("name", STACKS)
def test_shrinking_a_trained_stack_removes_the_blocks_that_add_least_and_says_how_far_the_outputs_moved(name):
    keras.utils.set_random_seed(0)
    model = BUILDERS[name](depth=4)
    x = _inputs(name)
    shrunk = shrink(model, depth=2, data=x)
    record = shrunk.resize_record
    assert len(_blocks(shrunk)) == 2
    contributions = record["contributions"]
    kept = [name for name in contributions if name not in record["removed"]]
    assert min(contributions[name] for name in kept) >= max(contributions[name] for name in record["removed"])
    assert record["output_change"] == pytest.approx(
        rms(_outputs(shrunk, x) - _outputs(model, x)) / rms(_outputs(model, x)), rel=1e-4)
    assert 0 < record["output_change"] < 10


def test_what_cannot_be_deepened_is_named():
    with pytest.raises(GrowthError, match=r"needs a stack of residual blocks \(TransformerBlock, RecurrentBlock\) or "
                                          r"of hidden Dense layers\. An LSTM or GRU \(\['lstm0'\]\) cannot compute the "
                                          r"identity.*as `models.lstm_lm\(residual=True\)` does"):
        grow(_lstm(), depth=2)
    gelu = models.mlp(8, width=16, depth=2, activation="gelu")
    with pytest.raises(GrowthError, match="'hidden0' has the activation 'gelu': a layer after it cannot start as the identity"):
        grow(gelu, depth=2)
    with pytest.raises(GrowthError, match="position 0 of a plain stack is taken"):
        grow(_mlp(), depth=2, insert=[0, 1, 2])
    with pytest.raises(GrowthError, match=r"2 blocks times 1\.25 is 2\.5, not a whole number"):
        grow(_transformer(), depth=1.25)
    with pytest.raises(GrowthError, match="give it as `data=`"):
        shrink(_transformer(), depth=2)
    with pytest.raises(GrowthError, match=r"2 distinct positions in the new stack of 4 blocks. Received: insert=\[1, 1\]"):
        grow(_transformer(), depth=2, insert=[1, 1])
    with pytest.raises(GrowthError, match="`insert` must be one of"):
        grow(_transformer(), depth=2, insert="middle")
    tokens = keras.Input((8,), dtype="int32")
    h = L.TransformerBlock(num_heads=2, index=0, depth=1)(L.Embedding(32, 32)(tokens))
    unnormed = keras.Model(tokens, L.Dense(32, role="output")(h))
    with pytest.raises(GrowthError, match="A norm must follow the stack"):
        grow(unnormed, depth=2)
    h = L.Embedding(32, 32)(tokens)
    branched = keras.Model(tokens, L.LayerNormalization()(keras.layers.Add()([h, L.TransformerBlock(num_heads=2)(h)])))
    with pytest.raises(GrowthError, match="one chain"):
        grow(branched, depth=2)
    mixed = keras.Sequential([keras.Input((8,), dtype="int32"), L.Embedding(32, 32),
                              L.TransformerBlock(num_heads=2, index=0, depth=2), L.RecurrentBlock(32, index=1, depth=2),
                              L.LayerNormalization(), L.Dense(32, role="output")])
    with pytest.raises(GrowthError, match=r"blocks must be of one class. Received: \['RecurrentBlock', 'TransformerBlock'\]"):
        grow(mixed, depth=2)


def test_shrinking_by_importance_removes_units_that_add_nothing_and_keeps_the_function():
    # Half of each hidden width's units made dead (nothing reads them): shrinking by importance finds exactly the
    # live ones, and the smaller model (its kernels at the smaller width's multipliers) computes what the larger did.
    keras.utils.set_random_seed(0)
    model = models.mlp(8, width=16, depth=3, output_dim=3, activation="linear", output_activation=None)  # none dead
    rng = np.random.default_rng(0)
    live = {}
    for layer, reader in (("hidden0", "hidden1"), ("hidden1", "hidden2"), ("hidden2", "readout")):
        dead = rng.permutation(16)[:8]
        live[f"{layer}.units"] = sorted(set(range(16)) - set(dead.tolist()))
        kernel = keras.ops.convert_to_numpy(model.get_layer(reader).kernel).copy()
        kernel[dead] = 0
        model.get_layer(reader).kernel.assign(kernel)
    x = _inputs("mlp")
    weights_before = [keras.ops.convert_to_numpy(v) for v in model.weights]
    shrunk = shrink(model, width=2, data=x, units="important")
    for before, variable in zip(weights_before, model.weights):  # each unit zeroed in turn, then given back
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), before)
    record = shrunk.resize_record
    assert record["kept"] == live
    assert all(record["importance"][key][unit] == 0 for key in live for unit in set(range(16)) - set(live[key]))
    assert shrunk.get_layer("hidden0").units == 8
    assert _relative_change(_outputs(shrunk, x), _outputs(model, x)) < FUNCTION_KEPT
    assert record["output_change"] < FUNCTION_KEPT
    # The fold of copies pairs dead units with live ones: it cannot see which are which.
    assert shrink(model, width=2, data=x).resize_record["output_change"] > 0.1


@pytest.mark.parametrize("name", ["lstm_lm", "gru_lm", *STACKS])
def test_shrinking_a_trained_model_by_importance_keeps_its_most_important_units_and_reports_the_loss(name):
    keras.utils.set_random_seed(0)
    model = BUILDERS[name]()
    x = _inputs(name)
    y = np.roll(x, -1, axis=1)
    model.compile(optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    # Trained until it has learnt something (loss 2.4-2.9 from 3.0-3.5): at 5 steps the losses are chance's, and
    # which units are kept makes no difference to them.
    model.fit(x, y, epochs=30, batch_size=4, verbose=0)
    shrunk = shrink(model, width=2, data=(x, y), units="important")
    record = shrunk.resize_record
    for key, scores in record["importance"].items():
        kept = record["kept"][key]
        assert len(kept) == len(scores) // 2 and kept == sorted(kept)
        assert min(scores[unit] for unit in kept) >= max(scores[u] for u in range(len(scores)) if u not in kept), key
    assert {"embed.output_dim"} <= record["kept"].keys()
    before, after = record["loss"]
    assert before == pytest.approx(model.evaluate(x, y, verbose=0), rel=1e-4)
    shrunk.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert after == pytest.approx(shrunk.evaluate(x, y, verbose=0), rel=1e-4)
    folded = shrink(model, width=2, data=(x, y))
    assert after < folded.resize_record["loss"][1]
    assert record["output_change"] < folded.resize_record["output_change"]


def test_what_cannot_be_shrunk_by_importance_is_named():
    with pytest.raises(GrowthError, match=r"call shrink\(width=2\)\. Received: width=0\.5"):
        grow(_mlp(), width=0.5)
    with pytest.raises(GrowthError, match=r"call grow\(depth=2\)\. Received: depth=0\.5"):
        shrink(_transformer(), depth=0.5)
    with pytest.raises(GrowthError, match="measures each unit's on a batch: give it as `data=`"):
        shrink(_mlp(), width=2, units="important")
    with pytest.raises(GrowthError, match=r"`units` must be one of \('copies', 'important'\)\. Received: units='best'"):
        shrink(_mlp(), width=2, units="best")
    x = _inputs("mlp")
    with pytest.raises(GrowthError, match=r"width 'hidden0\.units' of 16 units times 0\.333333 is 5\.33333, not a whole "
                                          r"number.*Received: width=3"):
        shrink(_mlp(), width=3, data=x, units="important")
    with pytest.raises(GrowthError, match="compile 'mlp' first"):
        shrink(_mlp(), width=2, data=(x, x[:, :3]), units="important")


@pytest.mark.parametrize("name", ["mlp", *STACKS])
def test_the_callbacks_factor_mode_and_our_optimizer_treat_a_grown_model_as_one_built_at_its_size(name):
    # u-μP's per-weight factors of the grown model, then the callback's rescaling on top: the same, weight by
    # weight, as for a model built at the grown size, and the grown model's function kept through the callback.
    # Compared as the step of the weight each layer computes with (`m·w`): the optimizer's factor times the weight
    # multiplier `m`. (A deepened model's kept blocks carry γ in their output projections' `m`, and our optimizer
    # divides their factor by it, so `m·w` moves as a fresh model's `w`.)
    from keras_unitscale.callbacks import UnitScaleCallback

    keras.utils.set_random_seed(0)
    grown = grow(BUILDERS[name](), width=2, depth=2 if name in STACKS else 1, seed=0)
    fresh = (models.mlp(8, width=32, depth=3, output_dim=3, output_activation=None) if name == "mlp"
             else BUILDERS[name](width=64 if name == "transformer_lm" else 32, depth=4))
    x = _inputs(name)
    before = _outputs(grown, x)
    factors = {}
    for label, model in (("grown", grown), ("fresh", fresh)):
        model.compile(optimizers.Adam(1e-9), "mse")  # a step too small to move the outputs
        callback = UnitScaleCallback(mode="factor", weight_scale=0.5, verbose=0)
        model.fit(x, model.predict(x, verbose=0), epochs=1, batch_size=len(x), verbose=0, callbacks=[callback])
        optimizer = optimizers.unwrap(model.optimizer)
        factors[label] = sorted(float(keras.ops.convert_to_numpy(optimizer.lr_multiplier(v))) * weights.multiplier(v)
                                for v in model.trainable_weights)
    assert factors["grown"] == pytest.approx(factors["fresh"], rel=1e-6)
    assert _relative_change(_outputs(grown, x), before) < 1e-4
