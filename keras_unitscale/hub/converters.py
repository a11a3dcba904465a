"""Converters for KerasHub's models: a backbone's twin is our subclass of its class, a `CausalLM`'s the same task on it.

`unit_scale(backbone)` builds `hub.models.TWINS[type(backbone)]` from the
backbone's config, with the residual rule of the conversion; `unit_scale(lm)`
puts the same task class (`LlamaCausalLM`, `GPT2CausalLM`) on the twin
backbone with the original's preprocessor, so that `generate()` runs as it
did.

Equivalent mode carries every weight at unit RMS, its scale in its weight
multiplier, as `convert.converters` does for Keras's layers, and sets what
the twin's constructor takes so that it computes what the original did:
- the attention-logit multiplier `sqrt(head_dim)` (Keras's logits are
  `q·k/sqrt(head_dim)`, ours `q·k·mult/head_dim`) and a fixed key length for
  the attention's output scale (the backbone's `max_sequence_length`, else
  `convert.converters.EQUIVALENT_KEY_LENGTH`): one multiplier then holds at every length;
- the residual stream: the twin's is `r` times the original's, `r` the
  product of the skip weights of the joins so far (u-μP's `residual_add`
  weighs the skip by `1/sqrt(1 + tau²)`) and of the embeddings' sum. Each
  branch's output projection takes the factor that brings its branch to
  the same ratio, and each norm, which meets the stream at `r`, normalises
  as before with its epsilon × `r²`;
- a tied readout's logits multiplier.
"""

from typing import NamedTuple

import keras
from keras import ops
from keras_hub.src.layers.modeling import token_and_position_embedding as token_and_position_embedding_module
from keras_hub.src.layers.modeling import transformer_decoder
from keras_hub.src.layers.modeling import transformer_encoder
from keras_hub.src.models.gemma import rms_normalization as gemma_rms

from keras_unitscale import rules
from keras_unitscale import weights
from keras_unitscale.convert.converters import EQUIVALENT_KEY_LENGTH
from keras_unitscale.convert.walk import TensorRatio
from keras_unitscale.convert.walk import own_weights
from keras_unitscale.hub import modeling
from keras_unitscale.hub import models
from keras_unitscale.ops import any_activation

__all__ = ["twin_of", "backbone", "causal_lm", "transformer_block", "token_and_position_embedding", "register",
           "BLOCK_TWINS"]


def _head_dim(config):
    return config.get("head_dim") or config["hidden_dim"] // config.get("num_query_heads", config.get("num_heads"))


def _logit_mult(original, config):
    """u-μP's logit multiplier that computes Keras's `q·k/sqrt(n)`: ours are `q·k·mult/head_dim`.

    `n` is the head size, or `hidden_dim / num_query_heads` for a Gemma
    attention whose own `query_head_dim_normalize` is False (KerasHub's
    Gemma blocks set it True, whatever the backbone's config says).
    """
    head_dim = _head_dim(config)
    attention = getattr(original.transformer_layers[0], "attention", None)
    if getattr(attention, "query_head_dim_normalize", True):
        return head_dim**0.5
    return head_dim / (config["hidden_dim"] // config["num_query_heads"]) ** 0.5


def _readout_scale(config):
    return rules.linear.readout(config["hidden_dim"], config["vocabulary_size"]).output


class _Branch(NamedTuple):
    """A residual branch's ratios (the twin's tensor over the original's)."""

    norm: float  # where its norm meets its input (pre-norm: the stream; post-norm: the join's output)
    into: float  # its input
    out: float  # its output, for its join to give the stream `skip_weight ×` the stream's ratio


def _branches(taus, ratio, pre_norm=True):
    """Each branch's ratios along a stream that starts at `ratio`, and the stream's ratio after the last join.

    Each join is `rules.residual.join_ratios`'s. A post-norm join's norm
    brings the stream back to ratio 1 (its epsilon × the ratio²).
    """
    branches = []
    for tau in taus:
        out, joined = rules.residual.join_ratios(tau, ratio)
        if pre_norm:
            branches.append(_Branch(ratio, 1.0, out))
            ratio = joined
        else:
            branches.append(_Branch(joined, ratio, out))
            ratio = 1.0
    return branches, ratio


def twin_of(conversion, original):
    """The unit-scaled twin of a KerasHub backbone (in equivalent mode computing what it computes)."""
    twin_class = models.TWINS[type(original)]
    config = models.complete_config(original, original.get_config())
    tied = original.token_embedding.tie_weights
    settings = {"residual_rule": conversion.residual_rule}
    if conversion.equivalent:
        taus = rules.residual.residual_taus(conversion.residual_rule, 2 * config["num_layers"])
        branches, final_ratio = _branches(taus, twin_class.embedding_output_scale(config))
        branch_norms = [getattr(block, name) for block in original.transformer_layers
                        for name in twin_class._block._BRANCH_NORMS]
        settings.update(
            attention_options={
                "mult": _logit_mult(original, config),
                "rule_key_length": config.get("max_sequence_length") or EQUIVALENT_KEY_LENGTH,
                **twin_class.EQUIVALENT_ATTENTION_OPTIONS,
            },
            readout_mult=1.0 / _readout_scale(config) if tied else 1.0,
            norm_epsilons=[norm.epsilon * branch.norm**2 for norm, branch in zip(branch_norms, branches)]
            + [original.layer_norm.epsilon * final_ratio**2],
        )
    twin = twin_class.from_config({**config, **settings})
    if conversion.equivalent:
        _carry(conversion, original, twin, config, branches)
    return twin


def _carry_projection(conversion, twin, source, input_ratio=1.0, output_ratio=1.0):
    """`source`'s kernel (and bias) into `twin`, whose input is `input_ratio` × `source`'s, its output `output_ratio` ×."""
    op_scale = rules.linear.dense(weights.role(twin._kernel).fan_in, 1).output
    values = [source.kernel] + ([source.bias] if source.bias is not None else [])
    op_scales = [op_scale * input_ratio / output_ratio] + [op_scale / output_ratio] * (len(values) - 1)
    conversion.carry(twin, values, op_scales)


def _copy_norm(conversion, norm, source, ratio=1.0):
    """`source`'s gain (and offset) into our `norm`, its output × `ratio` (in the weight multipliers).

    Gemma's norm computes `(1 + scale)·x̂`: our gain is `1 + scale`, stepping
    as `scale` did.
    """
    if isinstance(source, gemma_rms.RMSNormalization):
        norm.scale.assign(1.0 + ops.convert_to_numpy(source.scale))
        norm.set_lr_multiplier(norm.scale.name, 1.0)
        conversion.add_sources([norm.scale], [source.scale])
    else:
        conversion.copy_as_is(norm, source)
    if ratio != 1.0:
        conversion.rescaler(norm, [variable.name for variable in own_weights(norm)])(ratio)


def _copy_branch_norms(conversion, block, source):
    """The norms of `source`'s two branches into `block`'s (`_copy_norm`)."""
    for norm, source_norm in zip(block.branch_norms(), (getattr(source, name) for name in block._BRANCH_NORMS)):
        _copy_norm(conversion, norm, source_norm)


def _carry_branch_output(conversion, projection, source, input_ratio, branch_ratio, post_norm=None,
                         source_post_norm=None):
    """A branch's last projection, its output at `branch_ratio`; or, where a post-norm follows, the norm's."""
    if post_norm is None:
        _carry_projection(conversion, projection, source, input_ratio, branch_ratio)
        return
    _carry_projection(conversion, projection, source, input_ratio)
    _copy_norm(conversion, post_norm, source_post_norm, branch_ratio)


def _carry_embeddings(conversion, original, twin, config):
    embedding, source = twin.token_embedding, original.token_embedding
    if embedding.tie_weights:
        conversion.carry(embedding, [source.embeddings], [1.0])
    else:
        conversion.carry(embedding, [source.embeddings, source.reverse_embeddings], [1.0, _readout_scale(config)])
    if hasattr(twin, "position_embedding"):
        conversion.carry(twin.position_embedding, [original.position_embedding.position_embeddings], [1.0])


def _carry(conversion, original, twin, config, branches):
    """The original's weights into the twin, each branch's ratio in its output projection's multipliers."""
    _carry_embeddings(conversion, original, twin, config)
    for index, (block, source) in enumerate(zip(twin.transformer_layers, original.transformer_layers)):
        _copy_branch_norms(conversion, block, source)
        _CARRY_BLOCK[type(block)](conversion, block, source, branches[2 * index].out, branches[2 * index + 1].out)
    _copy_norm(conversion, twin.layer_norm, original.layer_norm)
    if config.get("dropout"):
        conversion.note(original.name, f"its dropout ({config['dropout']}) rescales differently in training and "
                                       "draws its own masks (predictions are equal)")
    if twin.token_embedding.tie_weights:
        conversion.note(original.name, "its token embedding is tied to its readout, whose two uses' gradients "
                                       "u-μP scales apart, so its training steps are not the original's (its "
                                       "predictions are)")


def _scores_ratio(attention, head_dim, causal=True):
    """Our attention's output over Keras's for the same projections: the rule's output scale, at its fixed length."""
    return rules.attention.attention(head_dim, attention.rule_key_length, attention.mult, causal).output


def _carry_swiglu_block(conversion, block, source, attention_ratio, mlp_ratio):
    attention, source_attention = block._self_attention_layer, source._self_attention_layer
    for name in ("_query_dense", "_key_dense", "_value_dense"):
        _carry_projection(conversion, getattr(attention, name), getattr(source_attention, name))
    head_dim = int(attention._query_dense.kernel.shape[-1])
    _carry_projection(conversion, attention._output_dense, source_attention._output_dense,
                      _scores_ratio(attention, head_dim), attention_ratio)
    for name in ("_feedforward_gate_dense", "_feedforward_intermediate_dense"):
        _carry_projection(conversion, getattr(block, name), getattr(source, name))
    _carry_projection(conversion, block._feedforward_output_dense, source._feedforward_output_dense,
                      rules.activations.silu_glu(), mlp_ratio)


def _carry_gpt2_block(conversion, block, source, attention_ratio, mlp_ratio, attention_input=1.0, mlp_input=1.0):
    """KerasHub's `TransformerDecoder` or `TransformerEncoder`: its branches' inputs and outputs at these ratios."""
    attention, source_attention = block._self_attention_layer, source._self_attention_layer
    for name in ("query_dense", "key_dense", "value_dense"):
        _carry_projection(conversion, getattr(attention, name), getattr(source_attention, name), attention_input)
    _carry_projection(conversion, attention.output_dense, source_attention.output_dense,
                      _scores_ratio(attention, attention.key_dim, bool(attention.rule_causal)), attention_ratio)
    up = block._feedforward_intermediate_dense
    _carry_projection(conversion, up, source._feedforward_intermediate_dense, mlp_input)
    activation = any_activation.rule(up.activation, up.mult, up.constraint).output
    _carry_projection(conversion, block._feedforward_output_dense, source._feedforward_output_dense,
                      activation, mlp_ratio)


def _post_norms(block, source, name):
    """The post-norm of `block` and of `source` called `name`, or Nones where the block has none (Gemma 1)."""
    return (getattr(block, name), getattr(source, name)) if hasattr(source, name) else (None, None)


def _carry_gemma_block(conversion, block, source, attention_ratio, mlp_ratio):
    attention, source_attention = block.attention, source.attention
    for name in ("query_dense", "key_dense", "value_dense"):
        _carry_projection(conversion, getattr(attention, name), getattr(source_attention, name))
    _carry_branch_output(conversion, attention.output_dense, source_attention.output_dense,
                         _scores_ratio(attention, attention.head_dim), attention_ratio,
                         *_post_norms(block, source, "post_attention_norm"))
    for name in ("gating_ffw", "gating_ffw_2"):
        _carry_projection(conversion, getattr(block, name), getattr(source, name))
    # `gelu_glu` is Keras's `x·gelu(gate)` × the unit-scaled GELU's output scale.
    _carry_branch_output(conversion, block.ffw_linear, source.ffw_linear, rules.activations.gelu().output,
                         mlp_ratio, *_post_norms(block, source, "post_ffw_norm"))


_CARRY_BLOCK = {models.LlamaBackbone._block: _carry_swiglu_block, models.MistralBackbone._block: _carry_swiglu_block,
                models.GPT2Backbone._block: _carry_gpt2_block, models.GemmaBackbone._block: _carry_gemma_block}


def backbone(conversion, layer, call):
    """A KerasHub backbone: its twin, called on the converted inputs."""
    twin = twin_of(conversion, layer)
    return _called(conversion, layer, twin, call)


def causal_lm(conversion, layer, call):
    """A KerasHub `CausalLM`: the same task class on its backbone's twin, with its preprocessor."""
    twin = type(layer)(backbone=twin_of(conversion, layer.backbone), preprocessor=layer.preprocessor,
                       name=layer.name)
    return _called(conversion, layer, twin, call)


def _called(conversion, layer, twin, call):
    call = conversion.inputs_at(call, [1.0] * len(call.inputs), layer.name)
    out = twin(*call.args, **call.kwargs)
    conversion.record(layer, twin, call.inputs)
    return out, [TensorRatio() for _ in keras.tree.flatten(out)]


# KerasHub's generic blocks, as a user's own graph uses them, and their twins.
BLOCK_TWINS = {transformer_encoder.TransformerEncoder: modeling.TransformerEncoder,
               transformer_decoder.TransformerDecoder: modeling.TransformerDecoder}


def _stream_branches(layer):
    """A pre-norm block holds two branches of its graph's residual stream; a post-norm one none (its norms reset it)."""
    return 2 if layer.normalize_first else 0


def _key_length(call):
    """The static key length of a block's call, else `EQUIVALENT_KEY_LENGTH`: the one its equivalent twin's rule uses."""
    inputs = next(t for t in keras.tree.flatten((call.args, call.kwargs)) if isinstance(t, keras.KerasTensor))
    return inputs.shape[1] or EQUIVALENT_KEY_LENGTH


def transformer_block(conversion, layer, call):
    """A KerasHub `TransformerEncoder` or decoder-only `TransformerDecoder` in a graph: our twin, on the graph's stream.

    Pre-norm, its two branches take the graph's `tau`s (`call.taus`, u-μP's
    depth rule over every branch of the stream) and its variables the
    stack's depth (the stream's branches / 2); post-norm, `tau = 1` and depth
    1 (`hub.modeling._KerasTransformerBlock`). Equivalent mode carries its
    weights as a backbone's blocks are carried (`_branches`).
    """
    if call.kwargs.get("use_causal_mask") is False:
        conversion.note(layer.name, "it is called with use_causal_mask=False, which our decoder does not convert")
        return conversion.keep(layer, call, known=False)
    pre_norm = layer.normalize_first
    # Outside a graph's walk (inside a custom layer's `call`) a pre-norm block is a stream of its own.
    taus = (call.taus or conversion.taus(2)) if pre_norm else (1.0, 1.0)
    settings = dict(attention_tau=taus[0], mlp_tau=taus[1], depth=max(1, call.stream_branches // 2) if pre_norm else 1)
    if conversion.equivalent:
        key_dim = layer._self_attention_layer.get_config()["key_dim"]
        branches, out_ratio = _branches(taus, call.inputs[0].value, pre_norm)
        settings.update(attention_options={"mult": key_dim**0.5, "rule_key_length": _key_length(call)},
                        norm_epsilons=[layer.layer_norm_epsilon * branch.norm**2 for branch in branches])
    twin = BLOCK_TWINS[type(layer)].from_config({**layer.get_config(), **settings})
    out = twin(*call.args, **call.kwargs)
    conversion.record(layer, twin, call.inputs)
    if not conversion.equivalent:
        return out, [TensorRatio() for _ in keras.tree.flatten(out)]
    _copy_branch_norms(conversion, twin, layer)
    attention, mlp = branches
    _carry_gpt2_block(conversion, twin, layer, attention.out, mlp.out, attention.into, mlp.into)
    if layer.dropout:
        conversion.note(layer.name, f"its dropout ({layer.dropout}) rescales differently in training and draws its "
                                    "own masks (predictions are equal)")
    ratios = [TensorRatio(out_ratio, None, call.inputs[0].grad_ratio)]
    return out, ratios + [TensorRatio() for _ in keras.tree.flatten(out)[1:]]


def token_and_position_embedding(conversion, layer, call):
    """KerasHub's `TokenAndPositionEmbedding`: our twin; equivalent, its tables carried and its sum at the add's ratio."""
    twin = modeling.TokenAndPositionEmbedding.from_config(layer.get_config())
    out = twin(*call.args, **call.kwargs)
    conversion.record(layer, twin, call.inputs)
    if not conversion.equivalent:
        return out, [TensorRatio()]
    _carry_embeddings(conversion, layer, twin, {"hidden_dim": layer.embedding_dim,
                                                "vocabulary_size": layer.vocabulary_size})
    shape = tuple(out.shape)
    lookups = [conversion.rescaler(embedding, [variable.name for variable in own_weights(embedding)])
               for embedding in (twin.token_embedding, twin.position_embedding)]

    def rescale(ratio):
        for lookup in lookups:
            lookup(ratio)

    return out, [TensorRatio(rules.linear.add_output(shape, shape), rescale)]


def register():
    """Registers the converters of KerasHub's models that have a twin in `hub.models.TWINS`, and of its layers."""
    import keras_hub

    from keras_unitscale.convert.registry import register_converter

    def has_twin(backbone):
        return type(backbone) in models.TWINS

    register_converter(keras_hub.models.Backbone, backbone, subclasses=True, accepts=has_twin)
    register_converter(keras_hub.models.CausalLM, causal_lm, subclasses=True, accepts=lambda lm: has_twin(lm.backbone))
    register_converter(transformer_encoder.TransformerEncoder, transformer_block, residual_branches=_stream_branches)
    # A decoder with cross-attention (built with an encoder sequence) is kept.
    register_converter(transformer_decoder.TransformerDecoder, transformer_block, residual_branches=_stream_branches,
                       accepts=lambda layer: getattr(layer, "_cross_attention_layer", None) is None)
    register_converter(token_and_position_embedding_module.TokenAndPositionEmbedding, token_and_position_embedding)
