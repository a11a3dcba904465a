"""KerasHub models, unit-scaled (issue 20): twins of KerasHub's layers and converters for its models.

`unit_scale` loads this package when `keras_hub` has been imported (a user
with a KerasHub model has imported it), and registers its converters then;
`pip install -e ".[hub]"` installs KerasHub. Converted: the Llama, Mistral,
GPT-2 and Gemma backbones and their `CausalLM`s (`hub.models.TWINS`; see the
KerasHub guide), and KerasHub's `TokenAndPositionEmbedding`,
`TransformerEncoder` and `TransformerDecoder` in a user's own model.
`hub.layers` holds the twins of the models' own layers, `hub.modeling` those
of KerasHub's generic layers, `hub.models` the twin backbones,
`hub.converters` what `unit_scale` calls.
"""

import sys

__all__ = ["register_if_imported", "is_kerashub_model", "simulate_fp8"]

_registered = False


def register_if_imported():
    """Registers the KerasHub converters once, if `keras_hub` has been imported; True where they are registered."""
    global _registered
    if not _registered and "keras_hub" in sys.modules:
        from keras_unitscale.hub import converters

        converters.register()
        _registered = True
    return _registered


def is_kerashub_model(model):
    """Whether `model` is a KerasHub backbone or task model (False where `keras_hub` has not been imported)."""
    if "keras_hub" not in sys.modules:
        return False
    keras_hub = sys.modules["keras_hub"]
    return isinstance(model, (keras_hub.models.Backbone, keras_hub.models.Task))


def simulate_fp8(model):
    """`hub.models.simulate_fp8`: a KerasHub model's copy whose matmuls cast as scale-free FP8 ones do."""
    from keras_unitscale.hub import models  # imports keras_hub

    return models.simulate_fp8(model)
