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
  `EQUIVALENT_KEY_LENGTH`): one multiplier then holds at every length;
- the residual stream: the twin's is `r` times the original's, `r` the
  product of the skip weights of the joins so far (u-μP's `residual_add`
  weighs the skip by `1/sqrt(1 + tau²)`) and of the embeddings' sum. Each
  branch's output projection takes the factor that brings its branch to
  the same ratio, and each norm, which meets the stream at `r`, normalises
  as before with its epsilon × `r²`;
- a tied readout's logits multiplier.
"""

import keras

from keras_unitscale import rules
from keras_unitscale import weights
from keras_unitscale.convert.walk import TensorRatio
from keras_unitscale.hub import models
from keras_unitscale.ops import any_activation

__all__ = ["twin_of", "backbone", "causal_lm", "register", "EQUIVALENT_KEY_LENGTH"]

# The key length at which an equivalent twin's attention output is unit-scaled when the backbone fixes none
# (Llama's rotary embedding has no maximum): Llama 2's training context.
EQUIVALENT_KEY_LENGTH = 2048


def _head_dim(config):
    return config.get("head_dim") or config["hidden_dim"] // config.get("num_query_heads", config.get("num_heads"))


def _readout_scale(config):
    return rules.linear.readout(config["hidden_dim"], config["vocabulary_size"]).output


def _stream_ratios(first, taus):
    """The twin's stream over the original's at each norm: before each branch, then at the final norm."""
    ratios = [first]
    for tau in taus:
        ratios.append(ratios[-1] * rules.residual.branch_weights(tau)[1])
    return ratios


def _branch_ratio(tau, stream_ratio):
    """The ratio a branch's output must have for its join to give the stream `skip_weight × stream_ratio`."""
    branch_weight, skip_weight = rules.residual.branch_weights(tau)
    return skip_weight * stream_ratio / branch_weight


def twin_of(conversion, original):
    """The unit-scaled twin of a KerasHub backbone (in equivalent mode computing what it computes)."""
    twin_class = models.TWINS[type(original)]
    config = models.complete_config(original, original.get_config())
    tied = original.token_embedding.tie_weights
    settings = {"residual_rule": conversion.residual_rule}
    if conversion.equivalent:
        taus = rules.residual.residual_taus(conversion.residual_rule, 2 * config["num_layers"])
        ratios = _stream_ratios(twin_class.embedding_output_scale(), taus)
        branch_norms = [getattr(block, name) for block in original.transformer_layers
                        for name in twin_class._block._BRANCH_NORMS]
        settings.update(
            attention_options={
                "mult": _head_dim(config) ** 0.5,
                "rule_key_length": config.get("max_sequence_length") or EQUIVALENT_KEY_LENGTH,
                **twin_class.EQUIVALENT_ATTENTION_OPTIONS,
            },
            readout_mult=1.0 / _readout_scale(config) if tied else 1.0,
            norm_epsilons=[norm.epsilon * ratio**2
                           for norm, ratio in zip(branch_norms + [original.layer_norm], ratios)],
        )
    twin = twin_class.from_config({**config, **settings})
    if conversion.equivalent:
        _carry(conversion, original, twin, config, taus, ratios)
    return twin


def _carry_projection(conversion, twin, source, input_ratio=1.0, output_ratio=1.0):
    """`source`'s kernel (and bias) into `twin`, whose input is `input_ratio` × `source`'s, its output `output_ratio` ×."""
    op_scale = rules.linear.dense(weights.role(twin._kernel).fan_in, 1).output
    values = [source.kernel] + ([source.bias] if source.bias is not None else [])
    op_scales = [op_scale * input_ratio / output_ratio] + [op_scale / output_ratio] * (len(values) - 1)
    conversion.carry(twin, values, op_scales)


def _carry_embeddings(conversion, original, twin, config):
    embedding, source = twin.token_embedding, original.token_embedding
    if embedding.tie_weights:
        conversion.carry(embedding, [source.embeddings], [1.0])
    else:
        conversion.carry(embedding, [source.embeddings, source.reverse_embeddings], [1.0, _readout_scale(config)])
    if hasattr(twin, "position_embedding"):
        conversion.carry(twin.position_embedding, [original.position_embedding.position_embeddings], [1.0])


def _carry(conversion, original, twin, config, taus, ratios):
    """The original's weights into the twin, each branch's ratio in its output projection's multipliers."""
    _carry_embeddings(conversion, original, twin, config)
    for index, (block, source) in enumerate(zip(twin.transformer_layers, original.transformer_layers)):
        for norm, source_norm in zip(block.branch_norms(), (getattr(source, name) for name in block._BRANCH_NORMS)):
            conversion.copy_as_is(norm, source_norm)
        attention_ratio = _branch_ratio(taus[2 * index], ratios[2 * index])
        mlp_ratio = _branch_ratio(taus[2 * index + 1], ratios[2 * index + 1])
        _CARRY_BLOCK[type(block)](conversion, block, source, attention_ratio, mlp_ratio)
    conversion.copy_as_is(twin.layer_norm, original.layer_norm)
    if config.get("dropout"):
        conversion.note(original.name, f"its dropout ({config['dropout']}) rescales differently in training and "
                                       "draws its own masks (predictions are equal)")
    if twin.token_embedding.tie_weights:
        conversion.note(original.name, "its token embedding is tied to its readout, whose two uses' gradients "
                                       "u-μP scales apart, so its training steps are not the original's (its "
                                       "predictions are)")


def _scores_ratio(attention, head_dim):
    """Our attention's output over Keras's for the same projections: the rule's output scale, at its fixed length."""
    return rules.attention.attention(head_dim, attention.rule_key_length, attention.mult, True).output


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


def _carry_gpt2_block(conversion, block, source, attention_ratio, mlp_ratio):
    attention, source_attention = block._self_attention_layer, source._self_attention_layer
    for name in ("query_dense", "key_dense", "value_dense"):
        _carry_projection(conversion, getattr(attention, name), getattr(source_attention, name))
    _carry_projection(conversion, attention.output_dense, source_attention.output_dense,
                      _scores_ratio(attention, attention.key_dim), attention_ratio)
    up = block._feedforward_intermediate_dense
    _carry_projection(conversion, up, source._feedforward_intermediate_dense)
    activation = any_activation.rule(up.activation, up.mult, up.constraint).output
    _carry_projection(conversion, block._feedforward_output_dense, source._feedforward_output_dense,
                      activation, mlp_ratio)


_CARRY_BLOCK = {models.LlamaBackbone._block: _carry_swiglu_block, models.MistralBackbone._block: _carry_swiglu_block,
                models.GPT2Backbone._block: _carry_gpt2_block}


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


def register():
    """Registers the converters of the KerasHub models that have a twin in `hub.models.TWINS`."""
    import keras_hub

    from keras_unitscale.convert.registry import register_converter

    def has_twin(backbone):
        return type(backbone) in models.TWINS

    register_converter(keras_hub.models.Backbone, backbone, subclasses=True, accepts=has_twin)
    register_converter(keras_hub.models.CausalLM, causal_lm, subclasses=True, accepts=lambda lm: has_twin(lm.backbone))
