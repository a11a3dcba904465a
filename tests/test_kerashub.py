"""KerasHub models through `unit_scale` (issue 20, begun): skipped where `keras_hub` is not installed."""

import warnings

import keras
import numpy as np
import pytest

from keras_unitscale import unit_scale

keras_hub = pytest.importorskip("keras_hub")


def _inputs(vocabulary=128, batch=2, length=16):
    tokens = np.random.default_rng(0).integers(0, vocabulary, (batch, length)).astype("int32")
    return {"token_ids": tokens, "padding_mask": np.ones((batch, length), "int32")}


def test_a_gpt2_backbones_equivalent_twin_computes_what_it_does_and_shares_no_variable():
    # Before: converting a GPT-2 backbone stopped with Keras's "cannot add new elements of state" (its attention
    # layers are built by their block's `build`, and swapping one of their sublayers met Keras's lock).
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(vocabulary_size=128, num_layers=2, num_heads=4, hidden_dim=64,
                                             intermediate_dim=128, max_sequence_length=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what is kept is noted; here only the numbers are checked
        twin = unit_scale(backbone)
    x = _inputs()
    expected = keras.ops.convert_to_numpy(backbone(x))
    got = keras.ops.convert_to_numpy(twin(x))
    assert np.max(np.abs(got - expected)) <= 1e-5 * np.sqrt(np.mean(expected**2))
    assert not {id(v) for v in twin.weights} & {id(v) for v in backbone.weights}
    converted = {type(layer).__name__ for layer in twin._flatten_layers(include_self=False)
                 if type(layer).__module__.startswith("keras_unitscale")}
    assert {"Dense", "LayerNormalization", "ResidualAdd"} <= converted
