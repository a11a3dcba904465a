"""KerasHub's backbones built of unit-scaled layers: each one is KerasHub's backbone class, subclassed.

A twin backbone runs KerasHub's own constructor with the layer classes it
names (`ReversibleEmbedding`, the decoder block, the norms, `keras.layers.Add`)
bound to ours (`rebinding.with_names`), so it is a `LlamaBackbone` or a
`GPT2Backbone` in every way KerasHub's code relies on: its attributes
(`token_embedding`, `transformer_layers`, `layer_norm`), its variable paths
(so `get_layout_map` applies), its task models (`LlamaCausalLM(backbone=twin)`
and its `generate()`). Its config adds what unit scaling sets, so a saved
twin reloads as the twin.

The blocks' residual branches get their `tau` from `residual_rule`, as
`unit_scale` gives them (`rules.residual.residual_taus`): u-μP's depth rule
by default.
"""

import inspect

import keras
import keras_hub

from keras_unitscale import layers as L
from keras_unitscale import precision
from keras_unitscale import rules
from keras_unitscale.hub import layers as hub_layers
from keras_unitscale.hub import modeling
from keras_unitscale.rebinding import with_names

__all__ = ["LlamaBackbone", "MistralBackbone", "GPT2Backbone", "GemmaBackbone", "TWINS", "complete_config",
           "simulate_fp8"]


def complete_config(backbone, config):
    """`config`, `backbone`'s `get_config()`, with what KerasHub's leaves out but its constructor takes (Llama's
    `tie_word_embeddings`, in KerasHub 0.32), so that the backbone rebuilt from it is the same."""
    keras_hub_class = getattr(type(backbone), "_base", None) or type(backbone)
    if "tie_word_embeddings" in inspect.signature(keras_hub_class.__init__).parameters:
        config["tie_word_embeddings"] = backbone.token_embedding.tie_weights
    return config


# Grouped-query attention in equivalent mode: without the shared heads' gradient rule, the twin's gradients
# follow the original's (see `hub.layers.LlamaAttention`).
_GROUPED_QUERY_EQUIVALENT = {"shared_heads_rule": False}


class _UnitScaledBackbone:
    """What our backbones share: blocks with their `tau`s, the settings `unit_scale` gives, the norms' epsilons.

    Args (beyond KerasHub's):
        residual_rule: "depth" (u-μP's depth rule) or a number, each
            branch's `tau` (`rules.residual.residual_taus`).
        attention_options: keyword arguments of every block's attention
            layer: u-μP's logit multiplier `mult`, `rule_key_length` (the key
            length the output scale is computed for; None: each call's) and,
            for grouped-query attention, `shared_heads_rule`
            (`hub.layers.LlamaAttention`).
        readout_mult: a fixed multiplier on the tied readout's logits.
        norm_epsilons: each norm's epsilon along the residual stream (the
            blocks' norms in order, then the final one); None: KerasHub's.
            `unit_scale` sets them in equivalent mode: a norm that meets the
            stream at `r` times the original's normalises as before with `r²·ε`.
    """

    _base = None  # KerasHub's backbone class
    _block = None  # our block class
    # What `unit_scale`'s equivalent mode adds to the blocks' attention options.
    EQUIVALENT_ATTENTION_OPTIONS = {}

    def __init__(self, *args, residual_rule="depth", attention_options=None, readout_mult=1.0, norm_epsilons=None,
                 **kwargs):
        arguments = inspect.signature(self._base.__init__).bind(None, *args, **kwargs).arguments
        depth = arguments["num_layers"]
        taus = rules.residual.residual_taus(residual_rule, 2 * depth)
        blocks = iter(range(depth))

        def block(*block_args, **block_kwargs):
            index = next(blocks)
            return hub_layers.unit_initialised(
                self._block, attention_tau=taus[2 * index], mlp_tau=taus[2 * index + 1], depth=depth,
                attention_options=attention_options,
            )(*block_args, **block_kwargs)

        embedding = hub_layers.unit_initialised(hub_layers.ReversibleEmbedding, readout_mult=readout_mult,
                                                **self._embedding_settings(arguments))
        with_names(self._base.__init__, **self._layer_names(block, embedding))(self, *args, **kwargs)
        self.residual_rule, self.readout_mult = residual_rule, readout_mult
        self.attention_options = dict(attention_options or {})
        self.norm_epsilons = None if norm_epsilons is None else [float(eps) for eps in norm_epsilons]
        if self.norm_epsilons is not None:
            norms = self.stream_norms()
            if len(norms) != len(self.norm_epsilons):
                raise ValueError(
                    f"`norm_epsilons` gives one epsilon per norm along the residual stream: {len(norms)} here. "
                    f"Received: {len(self.norm_epsilons)} values"
                )
            for norm, epsilon in zip(norms, self.norm_epsilons):
                norm.epsilon = epsilon

    @classmethod
    def embedding_output_scale(cls, config):
        """The embedding's output over the original's, for weights carried at ratio 1 (the stream's first ratio)."""
        return 1.0

    @classmethod
    def _embedding_settings(cls, arguments):
        """What the token embedding is constructed with beyond KerasHub's `arguments`."""
        return {}

    def stream_norms(self):
        """The norms that read the residual stream, in its order: each block's two, then the final one."""
        return [norm for block in self.transformer_layers for norm in block.branch_norms()] + [self.layer_norm]

    def get_config(self):
        return {
            **complete_config(self, super().get_config()),
            "residual_rule": self.residual_rule,
            "attention_options": self.attention_options,
            "readout_mult": self.readout_mult,
            "norm_epsilons": self.norm_epsilons,
        }


@keras.saving.register_keras_serializable(package="keras_unitscale")
class LlamaBackbone(_UnitScaledBackbone, keras_hub.models.LlamaBackbone):
    """KerasHub's `LlamaBackbone` of unit-scaled layers: our `ReversibleEmbedding` (untied by default, as
    Llama's), `hub.layers.LlamaTransformerDecoder` blocks and `RMSNormalization`.

    Args: KerasHub's, and those of `_UnitScaledBackbone`.

    Examples:
        >>> backbone = LlamaBackbone(vocabulary_size=64, num_layers=2, num_query_heads=4, num_key_value_heads=2,
        ...                          hidden_dim=32, intermediate_dim=64)
        >>> [round(block.attention_tau, 3) for block in backbone.transformer_layers]
        [0.707, 0.5]
    """

    _base = keras_hub.models.LlamaBackbone
    _block = hub_layers.LlamaTransformerDecoder
    EQUIVALENT_ATTENTION_OPTIONS = _GROUPED_QUERY_EQUIVALENT

    @staticmethod
    def _layer_names(block, embedding):
        return dict(LlamaTransformerDecoder=block, ReversibleEmbedding=embedding, LlamaLayerNorm=L.RMSNormalization)


@keras.saving.register_keras_serializable(package="keras_unitscale")
class GPT2Backbone(_UnitScaledBackbone, keras_hub.models.GPT2Backbone):
    """KerasHub's `GPT2Backbone` of unit-scaled layers: our tied `ReversibleEmbedding`, `hub.layers.PositionEmbedding`,
    unit-scaled `Add` of the two, `hub.modeling.TransformerDecoder` blocks and `LayerNormalization`.

    Args: KerasHub's, and those of `_UnitScaledBackbone`.
    """

    _base = keras_hub.models.GPT2Backbone
    _block = modeling.TransformerDecoder

    @classmethod
    def embedding_output_scale(cls, config):
        """The token and position embeddings meet in our `Add`, which scales their sum by its rule."""
        return rules.linear.add_output((None, None, None), (None, None, None))

    @staticmethod
    def _layer_names(block, embedding):
        return dict(
            TransformerDecoder=block, ReversibleEmbedding=embedding, PositionEmbedding=hub_layers.PositionEmbedding,
            keras=hub_layers.keras_with_ours(Add=L.Add, Dropout=L.Dropout, LayerNormalization=L.LayerNormalization),
        )


@keras.saving.register_keras_serializable(package="keras_unitscale")
class MistralBackbone(_UnitScaledBackbone, keras_hub.models.MistralBackbone):
    """KerasHub's `MistralBackbone` of unit-scaled layers: as our `LlamaBackbone`, with Mistral's sliding window.

    Args: KerasHub's, and those of `_UnitScaledBackbone`.
    """

    _base = keras_hub.models.MistralBackbone
    _block = hub_layers.MistralTransformerDecoder
    EQUIVALENT_ATTENTION_OPTIONS = _GROUPED_QUERY_EQUIVALENT

    @staticmethod
    def _layer_names(block, embedding):
        return dict(MistralTransformerDecoder=block, ReversibleEmbedding=embedding,
                    MistralLayerNormalization=L.RMSNormalization)


@keras.saving.register_keras_serializable(package="keras_unitscale")
class GemmaBackbone(_UnitScaledBackbone, keras_hub.models.GemmaBackbone):
    """KerasHub's `GemmaBackbone` (Gemma and Gemma 2) of unit-scaled layers: our tied `ReversibleEmbedding`,
    `hub.layers.GemmaDecoderBlock` blocks and `RMSNormalization`.

    KerasHub's constructor multiplies the looked-up rows by `sqrt(hidden_dim)`
    (and so does `GemmaCausalLM`'s cached call); our embedding's
    `lookup_mult = hidden_dim^-1/2` undoes it in both passes, so the stream
    starts at unit scale.

    Args: KerasHub's, and those of `_UnitScaledBackbone`.
    """

    _base = keras_hub.models.GemmaBackbone
    _block = hub_layers.GemmaDecoderBlock
    EQUIVALENT_ATTENTION_OPTIONS = _GROUPED_QUERY_EQUIVALENT

    @classmethod
    def embedding_output_scale(cls, config):
        """Our rows × `lookup_mult` over Gemma's: the stream starts at that ratio."""
        return cls._embedding_settings(config)["lookup_mult"]

    @classmethod
    def _embedding_settings(cls, arguments):
        return {"lookup_mult": arguments["hidden_dim"] ** -0.5}

    @staticmethod
    def _layer_names(block, embedding):
        return dict(GemmaDecoderBlock=block, ReversibleEmbedding=embedding, RMSNormalization=L.RMSNormalization)


# KerasHub's backbone classes and their twins.
TWINS = {keras_hub.models.LlamaBackbone: LlamaBackbone, keras_hub.models.MistralBackbone: MistralBackbone,
         keras_hub.models.GPT2Backbone: GPT2Backbone, keras_hub.models.GemmaBackbone: GemmaBackbone}


def simulate_fp8(model):
    """A copy of a KerasHub backbone or `CausalLM` whose matmuls cast as scale-free FP8 ones do, nothing else changed.

    `precision.simulate_fp8` for KerasHub's models, whose blocks make their
    `Dense` and `EinsumDense` sublayers in `build` (so a copy from config has
    none to swap until it is built): the copy is built from the original's
    config, given its weights, and then each of Keras's `Dense` and
    `EinsumDense` layers in it becomes the FP8-casting subclass, which
    differs from Keras's only in `call`. The baseline: what a scale-free FP8
    cast does to KerasHub's model as it is.
    """
    if isinstance(model, keras_hub.models.CausalLM):
        return type(model)(backbone=simulate_fp8(model.backbone), preprocessor=model.preprocessor, name=model.name)
    if not isinstance(model, keras_hub.models.Backbone):
        raise ValueError(f"`simulate_fp8` takes a KerasHub backbone or CausalLM here. Received: {type(model).__name__}")
    copy = type(model).from_config(complete_config(model, model.get_config()))
    copy.set_weights(model.get_weights())
    for layer in copy._flatten_layers(include_self=False):
        if type(layer) in (keras.layers.Dense, keras.layers.EinsumDense):
            layer.__class__ = precision._SIMULATED[type(layer)]  # the same layer, its `call` casting
    return copy
