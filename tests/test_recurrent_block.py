"""The residual `RecurrentBlock` and the residual LSTM language model: scale, depth rule, masking, saving, errors."""

import keras
import numpy as np
import pytest
from helpers import rms
from helpers import unit_normal
from keras import ops

from keras_unitscale import layers
from keras_unitscale import losses
from keras_unitscale import models
from keras_unitscale import optimizers
from keras_unitscale import parametrization
from keras_unitscale import rules
from keras_unitscale.autodiff import layer_vjp

UNIT = (0.5, 2.0)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("width, units, index, depth", [(64, 64, 0, 2), (128, 256, 3, 4)])
def test_a_recurrent_block_is_unit_scaled_at_initialisation(cell, width, units, index, depth):
    block = layers.RecurrentBlock(units, cell=cell, index=index, depth=depth)
    x = unit_normal(8, 32, width)
    output = ops.convert_to_numpy(block(x))
    out, grad_x, weight_grads = layer_vjp(block, x, unit_normal(*output.shape, seed=7))
    scales = {"output": rms(out), "input grad": rms(grad_x), **{k: rms(v) for k, v in weight_grads.items()}}
    assert len(weight_grads) == len(block.trainable_weights)
    for name, value in scales.items():
        assert UNIT[0] <= value <= UNIT[1], f"{name}: RMS {value:.3f} outside {UNIT}"


def test_its_tau_is_u_mups_depth_rule_over_single_branch_blocks():
    # One branch per block: the rule over `depth` branches, attention and MLP alike, so the stack's branches add
    # as much in total as a transformer's.
    rule = rules.residual.transformer_residual_scaling_rule(residual_mult=2.0)
    taus = [layers.RecurrentBlock(8, index=i, depth=4, residual_mult=2.0).tau for i in range(4)]
    assert taus == [rule(i, 4) for i in range(4)]
    assert taus[0] == pytest.approx(2.0 / (4 / 2) ** 0.5)
    # The stream's variance after the stack, relative to the embedding's, is 1 + 2·residual_mult², at any depth.
    for depth in (2, 8):
        variance = 1.0
        for i in range(depth):
            a, b = rules.residual.branch_weights(layers.RecurrentBlock(8, index=i, depth=depth).tau)
            variance = variance * (1 + (a / b) ** 2)
        assert variance == pytest.approx(3.0)


def test_its_variables_take_the_stacks_depth_in_their_learning_rates():
    keras.utils.set_random_seed(0)
    shallow = models.lstm_lm(vocab_size=20, width=16, depth=2, seq_len=8, residual=True)
    deep = models.lstm_lm(vocab_size=20, width=16, depth=8, seq_len=8, residual=True)
    for model, depth in ((shallow, 2), (deep, 8)):
        block = model.get_layer("block0")
        assert {parametrization.role_of(v).depth for v in block.trainable_weights} == {depth}
    factors = [parametrization.lr_multipliers(model)[model.get_layer("block0").projection.kernel.path]
               for model in (shallow, deep)]
    assert factors[1] / factors[0] == pytest.approx((8 / 2) ** -0.5)


def test_left_padding_leaves_the_outputs_at_the_real_tokens_as_they_were():
    keras.utils.set_random_seed(0)
    tokens = keras.Input((None,), dtype="int32")
    h = layers.Embedding(20, 16, mask_zero=True)(tokens)
    h = layers.RecurrentBlock(16, index=0, depth=2)(h)
    model = keras.Model(tokens, layers.RecurrentBlock(16, cell="gru", index=1, depth=2)(h))
    real = np.array([[3, 5, 7, 9]], "int32")
    padded = np.array([[0, 0, 3, 5, 7, 9]], "int32")
    np.testing.assert_allclose(ops.convert_to_numpy(model(padded))[:, 2:], ops.convert_to_numpy(model(real)),
                               rtol=1e-5, atol=1e-5)


def test_the_residual_lstm_lm_trains_saves_and_reloads(tmp_path):
    keras.utils.set_random_seed(0)
    text = np.tile(np.arange(20), 40)
    x = np.stack([text[i:i + 16] for i in range(0, 760, 4)]).astype("int32")
    y = np.stack([text[i + 1:i + 17] for i in range(0, 760, 4)]).astype("int32")
    model = models.lstm_lm(vocab_size=20, width=32, depth=2, seq_len=16, residual=True)
    model.compile(optimizers.Adam(5e-2), losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, epochs=4, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < 0.1 * history.history["loss"][0]
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert isinstance(reloaded.get_layer("block1"), layers.RecurrentBlock)
    np.testing.assert_allclose(reloaded.predict(x[:4], verbose=0), model.predict(x[:4], verbose=0), rtol=1e-5,
                               atol=1e-6)


def test_the_standard_residual_lstm_lm_names_its_blocks_as_the_unit_scaled_one():
    ours = models.lstm_lm(vocab_size=20, width=16, depth=2, seq_len=8, residual=True)
    standard = models.lstm_lm(vocab_size=20, width=16, depth=2, seq_len=8, residual=True, parametrization="standard")
    names = {layer.name for layer in standard.layers}
    assert {layer.name for layer in ours.layers} <= names
    assert isinstance(standard.get_layer("block1"), keras.layers.Add)


def test_config_round_trip_keeps_multipliers_and_epsilon():
    block = layers.RecurrentBlock(8, cell="gru", index=1, depth=3, norm="rms", norm_epsilon=1e-4, residual_mult=2.0,
                                  use_bias=True, weight_multipliers={"projection/kernel": 2.0, "rnn/kernel": 0.5})
    block(unit_normal(2, 4, 6))
    config = block.get_config()
    assert config["weight_multipliers"] == {"projection/kernel": 2.0, "rnn/kernel": 0.5}
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(block))
    assert type(restored) is layers.RecurrentBlock
    assert restored.get_config() == config
    restored(unit_normal(2, 4, 6))
    assert restored.projection.weight_multipliers == {"kernel": 2.0}
    assert restored.rnn.cell.weight_multipliers == {"kernel": 0.5}
    assert restored.pre_norm.epsilon == 1e-4


@pytest.mark.parametrize("make, received", [
    (lambda: layers.RecurrentBlock(0), "units=0"),
    (lambda: layers.RecurrentBlock(8, cell="rnn"), "cell='rnn'"),
    (lambda: layers.RecurrentBlock(8, index=2, depth=2), "index=2"),
    (lambda: layers.RecurrentBlock(8, norm="batch"), "norm='batch'"),
    (lambda: layers.RecurrentBlock(8, dropout=1.0), "dropout=1.0"),
    (lambda: layers.RecurrentBlock(8)(np.ones((2, 8), "float32")), r"input_shape=\(2, 8\)"),
], ids=["units", "cell", "index", "norm", "dropout", "rank"])
def test_bad_arguments_are_named(make, received):
    with pytest.raises(ValueError, match=received):
        make()
