"""KerasHub models through `unit_scale` (issue 20): skipped where `keras_hub` is not installed.

Tiny random configurations, nothing downloaded.
"""

import os
import warnings

import keras
import numpy as np
import pytest
from helpers import rms
from keras import ops

from keras_unitscale import layers as L
from keras_unitscale import losses
from keras_unitscale import rules
from keras_unitscale import unit_scale
from keras_unitscale.autodiff import layer_vjp
from keras_unitscale.autodiff import vjp

keras_hub = pytest.importorskip("keras_hub")

from keras_unitscale.hub import layers as hub_layers  # noqa: E402 (needs keras_hub)
from keras_unitscale.hub import modeling as hub_modeling  # noqa: E402
from keras_unitscale.hub import models as hub_models  # noqa: E402

VOCABULARY = 128


def _gpt2():
    return keras_hub.models.GPT2Backbone(vocabulary_size=VOCABULARY, num_layers=2, num_heads=4, hidden_dim=64,
                                         intermediate_dim=128, max_sequence_length=32)


def _llama(tie_word_embeddings=False, num_layers=2):
    return keras_hub.models.LlamaBackbone(vocabulary_size=VOCABULARY, num_layers=num_layers, num_query_heads=4,
                                          num_key_value_heads=2, hidden_dim=64, intermediate_dim=128,
                                          tie_word_embeddings=tie_word_embeddings)


def _mistral():
    # A window shorter than the sequences, so that it masks.
    return keras_hub.models.MistralBackbone(vocabulary_size=VOCABULARY, num_layers=2, num_query_heads=4,
                                            num_key_value_heads=2, hidden_dim=64, intermediate_dim=128,
                                            sliding_window=6)


def _gemma(version=1):
    # Gemma 2's settings small enough to act at this size: soft caps the logits reach, a window shorter than the
    # sequences, and query_head_dim_normalize=False (which KerasHub's blocks do not pass on to their attention).
    gemma2 = dict(query_head_dim_normalize=False, use_post_ffw_norm=True, use_post_attention_norm=True,
                  attention_logit_soft_cap=2.0, final_logit_soft_cap=3.0, use_sliding_window_attention=True,
                  sliding_window_size=6)
    backbone = keras_hub.models.GemmaBackbone(vocabulary_size=VOCABULARY, num_layers=2, num_query_heads=4,
                                              num_key_value_heads=2, hidden_dim=64, intermediate_dim=128, head_dim=8,
                                              **(gemma2 if version == 2 else {}))
    # Gemma's norms compute (1 + scale)·x̂ from zeros: trained ones are not zero.
    rng = np.random.default_rng(2)
    for variable in backbone.weights:
        if variable.path.endswith("/scale"):
            variable.assign(0.3 * rng.normal(size=variable.shape).astype("float32"))
    return backbone


BACKBONES = {"gpt2": _gpt2, "llama": _llama, "llama_tied": lambda: _llama(tie_word_embeddings=True),
             "mistral": _mistral, "gemma": _gemma, "gemma2": lambda: _gemma(version=2)}
TASKS = {keras_hub.models.GPT2Backbone: keras_hub.models.GPT2CausalLM,
         keras_hub.models.LlamaBackbone: keras_hub.models.LlamaCausalLM,
         keras_hub.models.MistralBackbone: keras_hub.models.MistralCausalLM,
         keras_hub.models.GemmaBackbone: keras_hub.models.GemmaCausalLM}


def _backbone(family):
    keras.utils.set_random_seed(0)
    return BACKBONES[family]()


def _causal_lm(family):
    backbone = _backbone(family)
    return TASKS[type(backbone)](backbone=backbone, preprocessor=None)


def _inputs(batch=2, length=16, padded=True):
    tokens = np.random.default_rng(0).integers(1, VOCABULARY, (batch, length)).astype("int32")
    padding = np.ones((batch, length), "int32")
    if padded:
        padding[-1, length * 3 // 4:] = 0
    return {"token_ids": tokens, "padding_mask": padding}


def _quietly(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what could not be made exact is checked where it matters
        return function(*args, **kwargs)


def _relative_error(got, expected):
    got, expected = ops.convert_to_numpy(got), ops.convert_to_numpy(expected)
    return float(np.max(np.abs(got - expected)) / np.sqrt(np.mean(expected**2)))


def _variable_ids(model):
    return {id(v) for v in model.weights}


@pytest.mark.parametrize("family", sorted(BACKBONES))
def test_a_backbones_equivalent_twin_is_its_class_of_our_layers_and_computes_what_it_does(family):
    backbone = _backbone(family)
    twin = _quietly(unit_scale, backbone)
    assert isinstance(twin, type(backbone)) and type(twin) is hub_models.TWINS[type(backbone)]
    # At two lengths: the attention's output scale is fixed, so one set of multipliers holds at every length.
    for length in (8, 16):
        x = _inputs(length=length)
        assert _relative_error(twin(x), backbone(x)) <= 1e-5
    assert not _variable_ids(twin) & _variable_ids(backbone)
    # KerasHub's paths, so its layout maps and checkpoints' names line up.
    assert sorted(v.path for v in twin.weights if v.trainable) == sorted(v.path for v in backbone.weights)
    assert twin.unit_scale_sources == {path: path for path in twin.unit_scale_sources}


@pytest.mark.parametrize("family", sorted(BACKBONES))
def test_every_layer_of_the_twin_that_computes_with_weights_is_unit_scaled(family):
    twin = _quietly(unit_scale, _backbone(family), mode="reinit")
    for layer in twin._flatten_layers(include_self=False):
        if layer._trainable_variables:
            assert type(layer).__module__.startswith("keras_unitscale"), f"{layer.name} ({type(layer)}) is kept"
    blocks = twin.transformer_layers
    assert all(type(block).__module__.startswith("keras_unitscale.hub.") for block in blocks)


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "gemma2"])
def test_a_causal_lms_twin_predicts_and_generates_as_the_original(family):
    lm = _causal_lm(family)
    twin = _quietly(unit_scale, lm)
    assert type(twin) is type(lm) and type(twin.backbone) is hub_models.TWINS[type(lm.backbone)]
    x = _inputs()
    assert _relative_error(twin(x), lm(x)) <= 1e-5
    assert not _variable_ids(twin) & _variable_ids(lm)
    # Greedy generation from a 5-token prompt, through the key/value cache.
    prompt = _inputs(padded=False)
    prompt["padding_mask"][:, 5:] = 0
    prompt["token_ids"][:, 5:] = 0
    for model in (lm, twin):
        _quietly(model.compile, sampler="greedy")
    expected = lm.generate(prompt, max_length=16, stop_token_ids=None)["token_ids"]
    got = twin.generate(prompt, max_length=16, stop_token_ids=None)["token_ids"]
    np.testing.assert_array_equal(got, expected)
    assert np.any(expected[:, 5:] != 0)  # it generated something


def test_an_untied_llamas_equivalent_twin_trains_as_the_original_under_its_own_optimizer():
    """Compiled with the script's Adam made ours (`convert.from_keras`) and `match_epsilon`, as for any twin.

    Grouped-query attention included: in equivalent mode its shared heads' gradients are not rescaled
    (`shared_heads_rule=False`), the one backward-only scale that would turn the gradient.
    """
    from keras_unitscale import convert

    lm = _causal_lm("llama")
    twin = _quietly(unit_scale, lm)
    assert not any(note for _, note in twin.unit_scale_notes)  # nothing that would make it train differently
    tokens = np.random.default_rng(1).integers(1, VOCABULARY, (64, 16)).astype("int32")
    x, y = {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}, np.roll(tokens, -1, axis=1)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    _quietly(lm.compile, optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    _quietly(twin.compile, optimizer=convert.from_keras(keras.optimizers.Adam(1e-3)), loss=loss)
    convert.match_epsilon(twin, lm, x, y)
    expected = lm.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history["loss"]
    got = twin.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history["loss"]
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    probe = {name: value[:8] for name, value in x.items()}
    assert _relative_error(twin(probe), lm(probe)) <= 0.02  # after 8 steps (measured: 0.005)


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "gemma2"])
def test_a_reinit_causal_lm_is_unit_scaled_at_initialisation(family):
    """As `test_layers`' models: every weight gradient within [0.25, 4] for the unit-scaled loss's gradient.

    The exceptions are the rule's, as for our own attention: queries and keys
    pass through a nearly flat softmax (about 1/sqrt(head_dim) of the rest),
    a key bias shifts each query's logits by a constant, which the softmax
    ignores (gradient exactly 0), and the other biases sum gradients that
    point alike at initialisation over every position (finite, not unit).
    """
    keras.utils.set_random_seed(0)
    backbone_class = type(BACKBONES[family]())
    lm = TASKS[backbone_class](backbone=_quietly(unit_scale, _backbone(family), mode="reinit"), preprocessor=None)
    x = _inputs(batch=8, length=32, padded=False)
    logits = lm(x)
    targets = np.roll(x["token_ids"], -1, axis=1)
    loss = losses.SparseCategoricalCrossentropy(from_logits=True)
    _, (upstream,) = vjp(lambda z: loss(targets, z), [ops.convert_to_numpy(logits)], np.float32(1.0))
    hidden = ops.convert_to_numpy(lm.backbone(x))
    assert 0.5 <= rms(hidden) <= 2.0
    _, _, grads = layer_vjp(lm, x, upstream)
    head_dim = getattr(lm.backbone, "head_dim", None) or lm.backbone.hidden_dim // 4
    for name, value in grads.items():
        if name.endswith("/bias") or name.endswith("/beta"):
            assert np.all(np.isfinite(value)) and (rms(value) < 1e-6) == ("key/bias" in name), name
            continue
        bounds = (0.25 / head_dim**0.5, 4) if "query" in name or "key/" in name else (0.25, 4)
        assert bounds[0] <= rms(value) <= bounds[1], f"{name}: RMS {rms(value):.3f} outside {bounds}"


def test_the_blocks_take_the_residual_rule_of_the_conversion():
    depth = 3
    twin = _quietly(unit_scale, _llama(num_layers=depth), mode="reinit")
    rule = rules.residual.transformer_residual_scaling_rule()
    for index, block in enumerate(twin.transformer_layers):
        assert block.attention_tau == pytest.approx(rule(2 * index, 2 * depth))
        assert block.mlp_tau == pytest.approx(rule(2 * index + 1, 2 * depth))
        assert block.depth == depth
    fixed = _quietly(unit_scale, _llama(), mode="reinit", residual_rule=0.25)
    assert {block.attention_tau for block in fixed.transformer_layers} == {0.25}


@pytest.mark.parametrize("family", ["gpt2", "llama_tied"])
def test_a_saved_twin_reloads_as_the_twin(tmp_path, family):
    lm = _causal_lm(family)
    twin = _quietly(unit_scale, lm)
    x = _inputs()
    expected = ops.convert_to_numpy(twin(x))
    path = os.path.join(tmp_path, "twin.keras")
    twin.save(path)
    reloaded = _quietly(keras.saving.load_model, path)
    assert type(reloaded.backbone) is type(twin.backbone)
    np.testing.assert_allclose(ops.convert_to_numpy(reloaded(x)), expected, rtol=0, atol=1e-6)
    # Weights alone, into a fresh twin: the multipliers come with them.
    weights = os.path.join(tmp_path, "twin.weights.h5")
    twin.save_weights(weights)
    fresh = _quietly(unit_scale, lm)
    fresh.load_weights(weights)
    np.testing.assert_allclose(ops.convert_to_numpy(fresh(x)), expected, rtol=0, atol=1e-6)


@pytest.mark.skipif(keras.backend.backend() == "torch", reason="keras.distribution has no PyTorch backend")
def test_kerashubs_llama_layout_map_shards_the_twin_as_the_original():
    backbone = _llama()
    twin = _quietly(unit_scale, backbone)
    mesh = keras.distribution.DeviceMesh((1, 1), ["batch", "model"], keras.distribution.list_devices()[:1])
    layout_map = keras_hub.models.LlamaBackbone.get_layout_map(mesh)

    def axes(model):
        found = {}
        for variable in model.weights:
            layout = layout_map[variable.path]
            found[variable.path] = None if layout is None else tuple(layout.axes)
        return found

    original = axes(backbone)
    assert sum(layout is not None for layout in original.values()) >= 7 * 2  # the map applies at all
    assert {path: layout for path, layout in axes(twin).items() if path in original} == original


def test_a_backbone_inside_a_functional_model_is_converted_whole():
    backbone = _backbone("llama")
    inputs = {name: keras.Input((None,), dtype="int32", name=name) for name in ("token_ids", "padding_mask")}
    outputs = keras.layers.Dense(3, name="head")(backbone(inputs))
    model = keras.Model(inputs, outputs)
    twin = _quietly(unit_scale, model)
    assert any(isinstance(layer, hub_models.LlamaBackbone) for layer in twin.layers)
    x = _inputs()
    assert _relative_error(twin(x), model(x)) <= 1e-5


def test_grouped_query_attention_brings_the_shared_heads_gradient_back_to_unit_scale():
    assert rules.attention.shared_key_value(4) == 0.5
    # With 4 query heads per key head, the key and value projections' gradients are as large as without sharing.
    shared, separate = (_quietly(unit_scale, keras_hub.models.LlamaBackbone(
        vocabulary_size=VOCABULARY, num_layers=1, num_query_heads=4, num_key_value_heads=heads, hidden_dim=64,
        intermediate_dim=128), mode="reinit") for heads in (1, 4))
    x = _inputs(batch=8, length=32, padded=False)
    value_grads = []
    for model in (shared, separate):
        upstream = np.random.default_rng(1).normal(size=(8, 32, 64)).astype("float32")
        _, _, grads = layer_vjp(model, x, upstream)
        value_grads.append(rms(grads["transformer_layer_0/self_attention/value/kernel"]))
    assert 0.7 <= value_grads[0] / value_grads[1] <= 1.4


def test_the_blocks_refuse_what_the_unit_scaled_rule_does_not_cover():
    decoder = hub_modeling.TransformerDecoder(intermediate_dim=8, num_heads=2)
    with pytest.raises(ValueError, match="decoder-only.*encoder_sequence_shape"):
        decoder.build((None, 4, 8), (None, 4, 8))
    with pytest.raises(ValueError, match="SwiGLU.*activation='gelu'"):
        hub_layers.LlamaTransformerDecoder(intermediate_dim=8, num_query_heads=2, num_key_value_heads=1,
                                           activation="gelu")


def test_a_fixed_rule_key_length_makes_causal_attention_the_same_at_every_length():
    layer = L.MultiHeadAttention(2, 8, rule_key_length=64, rule_causal=True)
    x = np.random.default_rng(0).normal(size=(2, 16, 16)).astype("float32")
    long = ops.convert_to_numpy(layer(x, x, use_causal_mask=True))
    short = ops.convert_to_numpy(layer(x[:, :8], x[:, :8], use_causal_mask=True))
    np.testing.assert_allclose(short, long[:, :8], rtol=1e-5, atol=1e-6)
    # Without it, the scale follows each call's key length.
    plain = L.MultiHeadAttention(2, 8)
    plain(x, x)
    plain.set_weights(layer.get_weights())
    long = ops.convert_to_numpy(plain(x, x, use_causal_mask=True))
    short = ops.convert_to_numpy(plain(x[:, :8], x[:, :8], use_causal_mask=True))
    assert not np.allclose(short, long[:, :8], rtol=1e-3)


def _encoder_classifier(normalize_first):
    """A text classifier as the Keras examples write it with KerasHub's layers: padded token ids to 3 classes."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16,), dtype="int32")
    x = keras_hub.layers.TokenAndPositionEmbedding(VOCABULARY, 16, 32, mask_zero=True, name="embedding")(inputs)
    for index in range(2):
        x = keras_hub.layers.TransformerEncoder(64, 4, normalize_first=normalize_first, name=f"encoder_{index}")(x)
    if normalize_first:
        x = keras.layers.LayerNormalization(name="final_norm")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))


def _padded_ids(batch=4, length=16):
    ids = np.random.default_rng(0).integers(1, VOCABULARY, (batch, length)).astype("int32")
    ids[:, length * 3 // 4:] = 0
    return ids


@pytest.mark.parametrize("normalize_first", [False, True], ids=["post-norm", "pre-norm"])
def test_kerashubs_encoder_and_token_and_position_embedding_in_a_users_model_convert(tmp_path, normalize_first):
    model = _encoder_classifier(normalize_first)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        twin = unit_scale(model)
    assert not [str(w.message) for w in caught if "kept these layers" in str(w.message)]
    assert type(twin.get_layer("embedding")) is hub_modeling.TokenAndPositionEmbedding
    encoders = [twin.get_layer(f"encoder_{index}") for index in range(2)]
    assert all(type(encoder) is hub_modeling.TransformerEncoder for encoder in encoders)
    # Padded ids: the mask of `mask_zero` reaches the attention and the pooling as in the original.
    ids = _padded_ids()
    assert _relative_error(twin(ids), model(ids)) <= 1e-5
    assert not _variable_ids(twin) & _variable_ids(model)
    if normalize_first:
        # The two blocks' four branches are one residual stream, weighted by u-μP's depth rule.
        rule = rules.residual.transformer_residual_scaling_rule()
        taus = [tau for encoder in encoders for tau in (encoder.attention_tau, encoder.mlp_tau)]
        np.testing.assert_allclose(taus, [rule(index, 4) for index in range(4)])
        assert {encoder.depth for encoder in encoders} == {2}
    else:
        # A post-norm block renormalises its stream at each join: equal weights.
        assert {(encoder.attention_tau, encoder.mlp_tau, encoder.depth) for encoder in encoders} == {(1.0, 1.0, 1)}
    path = os.path.join(tmp_path, "twin.keras")
    twin.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(ops.convert_to_numpy(reloaded(ids)), ops.convert_to_numpy(twin(ids)), atol=1e-6)


@pytest.mark.parametrize("normalize_first", [False, True], ids=["post-norm", "pre-norm"])
def test_a_reinit_twin_of_kerashubs_encoder_stack_is_unit_scaled(normalize_first):
    twin = _quietly(unit_scale, _encoder_classifier(normalize_first), mode="reinit")
    hidden = keras.Model(twin.input, twin.get_layer("encoder_1").output)
    assert 0.5 <= rms(hidden(_padded_ids(batch=16))) <= 2.0
    embedding = twin.get_layer("embedding")
    assert 0.8 <= rms(embedding(_padded_ids(batch=16))) <= 1.25
    # Its attention scores, as KerasHub's layer returns them: (batch, heads, T, T), each row a distribution.
    output, scores = twin.get_layer("encoder_0")(embedding(_padded_ids()), return_attention_scores=True)
    scores = ops.convert_to_numpy(scores)
    assert tuple(output.shape) == (4, 16, 32) and scores.shape == (4, 4, 16, 16)
    np.testing.assert_allclose(scores.sum(axis=-1), 1.0, rtol=1e-5)


def test_a_gpt_written_with_kerashubs_decoder_layers_converts_and_keeps_its_function():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16,), dtype="int32")
    x = keras_hub.layers.TokenAndPositionEmbedding(VOCABULARY, 16, 32, name="embedding")(inputs)
    for index in range(2):
        x = keras_hub.layers.TransformerDecoder(64, 4, name=f"decoder_{index}")(x)
    model = keras.Model(inputs, keras.layers.Dense(VOCABULARY, name="readout")(x))
    twin = _quietly(unit_scale, model)
    assert type(twin.get_layer("decoder_0")) is hub_modeling.TransformerDecoder
    ids = np.random.default_rng(0).integers(1, VOCABULARY, (4, 16)).astype("int32")
    assert _relative_error(twin(ids), model(ids)) <= 1e-5
    # Causal: a later token does not change an earlier position's logits.
    changed = ids.copy()
    changed[:, 10:] = 1
    np.testing.assert_allclose(ops.convert_to_numpy(twin(changed))[:, :10], ops.convert_to_numpy(twin(ids))[:, :10],
                               rtol=1e-5, atol=1e-5)


PARALLEL = """
import json, warnings
warnings.simplefilter("ignore")
import jax
import keras
import keras_hub
import numpy as np
from keras_unitscale import losses, optimizers, unit_scale

tokens = np.random.default_rng(1).integers(1, 64, (40, 16)).astype("int32")
x = {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}
y = np.roll(tokens, -1, axis=1)
mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"], jax.devices())
layout_map = keras_hub.models.LlamaBackbone.get_layout_map(mesh)


def run(distribution):
    keras.distribution.set_distribution(distribution)
    try:
        keras.utils.set_random_seed(0)
        backbone = keras_hub.models.LlamaBackbone(vocabulary_size=64, num_layers=2, num_query_heads=4,
                                                  num_key_value_heads=2, hidden_dim=64, intermediate_dim=128)
        lm = keras_hub.models.LlamaCausalLM(backbone=unit_scale(backbone, mode="reinit"), preprocessor=None)
        lm.compile(optimizer=optimizers.Adam(2.0**-6), loss=losses.SparseCategoricalCrossentropy(from_logits=True))
        seen = []
        record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: seen.append(float(logs["loss"])))
        lm.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[record])
        shardings = {v.path: [str(axis) for axis in getattr(v.value.sharding, "spec", ())]
                     for v in lm.backbone.weights}
    finally:
        keras.distribution.set_distribution(None)
    return seen, shardings


one_device, _ = run(None)
model_parallel, shardings = run(keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch"))
data_parallel, _ = run(keras.distribution.DataParallel(devices=jax.devices()))
expected = {path: [str(axis) for axis in layout_map[path].axes] for path in shardings if layout_map[path] is not None}
print(json.dumps({"one_device": one_device, "model_parallel": model_parallel, "data_parallel": data_parallel,
                  "shardings": shardings, "expected": expected}))
"""


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="KerasHub's model parallelism is JAX's; runs once")
def test_the_llama_twin_trains_as_on_one_device_under_kerashubs_layout_map_and_data_parallel(tmp_path):
    import json
    import subprocess
    import sys

    script = tmp_path / "parallel.py"
    script.write_text(PARALLEL)
    environment = {**os.environ, "KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=environment, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    one_device = np.array(result["one_device"])
    assert len(one_device) == 5 and np.isfinite(one_device).all()
    np.testing.assert_allclose(result["model_parallel"], one_device, rtol=1e-5)
    np.testing.assert_allclose(result["data_parallel"], one_device, rtol=1e-5)
    # Sharded as KerasHub's map says, on the twin's variables (paths that are KerasHub's).
    assert len(result["expected"]) >= 7 * 2
    for path, axes in result["expected"].items():
        assert result["shardings"][path][: len(axes)] == axes, path


def test_scale_report_reads_a_kerashub_backbone_and_its_twins_blocks_are_at_unit_scale():
    from keras_unitscale import analysis

    twin = _quietly(unit_scale, _backbone("llama"), mode="reinit")
    rows = analysis.scale_report(twin, _inputs(batch=4, length=32, padded=False)).to_dicts()
    outputs = {row["layer"]: row["rms"] for row in rows if row["tensor"] == "output"}
    assert {"token_embedding", "transformer_layer_0", "transformer_layer_1"} <= set(outputs)
    for layer, value in outputs.items():
        assert 0.5 <= value <= 2.0, (layer, value)


@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="six training runs: once, on the default backend")
def test_the_llama_twin_trains_in_fp16_without_loss_scaling_and_in_fp8_within_2_percent_of_float32(tmp_path):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import hub_low_precision

    rows = hub_low_precision.main(["--steps", "20", "--width", "64", "--layers", "2", "--validation", "32",
                                   "--runs", "twin float32", "twin FP16, no loss scaling", "twin FP8",
                                   "--out", str(tmp_path)])
    losses_by_precision = {row["precision"]: row["validation_loss"] for row in rows}
    for mode in ("fp16", "fp8"):
        assert abs(losses_by_precision[mode] / losses_by_precision["float32"] - 1) <= 0.02, losses_by_precision
    assert keras.config.dtype_policy().name == "float32"  # the runs leave the global policy as they found it


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_simulate_fp8_casts_every_matmul_of_kerashubs_model_and_keeps_its_weights(family):
    from keras_unitscale import precision

    lm = _causal_lm(family)
    cast = precision.simulate_fp8(lm)
    assert type(cast) is type(lm) and not _variable_ids(cast) & _variable_ids(lm)
    dense = [layer for layer in cast._flatten_layers(include_self=False)
             if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))]
    assert dense and all(type(layer) in (precision._SIMULATED[keras.layers.Dense],
                                         precision._SIMULATED[keras.layers.EinsumDense]) for layer in dense)
    for got, expected in zip(cast.weights, lm.weights):
        np.testing.assert_array_equal(ops.convert_to_numpy(got), ops.convert_to_numpy(expected))
    # Its outputs are the original's with E4M3's rounding: close, not equal.
    x = _inputs()
    error = _relative_error(cast(x), lm(x))
    assert 0 < error < 0.5
