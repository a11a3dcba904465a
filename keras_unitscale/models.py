"""Reference models, in u-μP and in standard parametrization, for the demo, benchmarks and notebooks.

Each builder takes `parametrization="u-mup"` (built from
`keras_unitscale.layers`: unit-scaled ops, unit-variance weights, u-μP's
roles and residual weights; train with `keras_unitscale.optimizers` and a
unit-scaled loss) or `"standard"` (the same architecture from `keras.layers`
with Keras's defaults; train with Keras's optimizers). The layers of both
carry the same names, so their scale reports and coordinate checks line up.
Language models return logits.
"""

import keras

from keras_unitscale import checks
from keras_unitscale import layers as L

__all__ = ["PARAMETRIZATIONS", "mlp", "lstm_lm", "transformer_lm"]

PARAMETRIZATIONS = ("u-mup", "standard")


def _unit_scaled(parametrization):
    return checks.one_of("parametrization", parametrization, PARAMETRIZATIONS) == "u-mup"


def mlp(input_dim, width=128, depth=2, output_dim=1, activation="relu", output_activation="sigmoid",
        parametrization="u-mup", name="mlp"):
    """The Keras Sequential MLP (Dense 128 relu → 64 relu → 1), generalised: `depth` hidden `Dense(width, activation)` layers and a readout.

    Examples:
        >>> model = mlp(30, width=64)
        >>> [layer.name for layer in model.layers], model.layers[-1].role
        (['hidden0', 'hidden1', 'readout'], 'output')
    """
    checks.positive_int("input_dim", input_dim)
    checks.positive_int("depth", depth)
    if _unit_scaled(parametrization):
        readout = L.Dense(output_dim, activation=output_activation, role="output", name="readout")
        dense = L.Dense
    else:
        readout = keras.layers.Dense(output_dim, activation=output_activation, name="readout")
        dense = keras.layers.Dense
    hidden = [dense(width, activation=activation, name=f"hidden{i}") for i in range(depth)]
    return keras.Sequential([keras.Input((input_dim,)), *hidden, readout], name=name)


def lstm_lm(vocab_size, width=256, depth=1, embedding_dim=None, seq_len=None, residual=False,
            parametrization="u-mup", name="lstm_lm"):
    """A character-level LSTM language model (seeds 003/004): Embedding → `depth` LSTMs → readout logits.

    Args:
        vocab_size: tokens in and logits out.
        width: the LSTMs' units.
        depth: the number of LSTMs.
        embedding_dim: the embedding's size (default `width`). With
            `residual=True` it is the residual stream's size.
        seq_len: the sequence length (None for any).
        residual: stack pre-norm residual blocks (`layers.RecurrentBlock`:
            `x → x + projection(LSTM(norm(x)))`, u-μP's residual weights for
            `depth` blocks) with a norm after them, instead of plain LSTMs.
            Such a stack can grow deeper with its function kept
            (`keras_unitscale.grow(model, depth=2)`); a stack of plain LSTMs
            cannot. In "standard", the same blocks from `keras.layers` with
            plain residual adds.
        parametrization: "u-mup" or "standard" (see the module docstring).
        name: the model's name.

    Examples:
        >>> model = lstm_lm(vocab_size=50, width=32, seq_len=16)
        >>> tuple(model.outputs[0].shape)
        (None, 16, 50)
        >>> deep = lstm_lm(vocab_size=50, width=32, depth=2, seq_len=16, residual=True)
        >>> [layer.name for layer in deep.layers]
        ['embed', 'block0', 'block1', 'final_norm', 'readout']
    """
    checks.positive_int("vocab_size", vocab_size)
    checks.positive_int("depth", depth)
    unit_scaled = _unit_scaled(parametrization)
    lib = L if unit_scaled else keras.layers
    tokens = keras.Input((seq_len,), dtype="int32", name="tokens" if residual else None)
    embed = lib.Embedding(vocab_size, embedding_dim or width, name="embed")
    readout = (L.Dense(vocab_size, role="output", name="readout") if unit_scaled
               else keras.layers.Dense(vocab_size, name="readout"))
    if not residual:
        stack = [lib.LSTM(width, return_sequences=True, name=f"lstm{i}") for i in range(depth)]
        return keras.Sequential([tokens, embed, *stack, readout], name=name)
    if unit_scaled:
        blocks = [L.RecurrentBlock(width, index=i, depth=depth, name=f"block{i}") for i in range(depth)]
        return keras.Sequential([tokens, embed, *blocks, L.LayerNormalization(name="final_norm"), readout], name=name)
    h = embed(tokens)
    for i in range(depth):
        n = keras.layers.LayerNormalization(name=f"block{i}_pre_norm")(h)
        r = keras.layers.LSTM(width, return_sequences=True, name=f"block{i}_rnn")(n)
        h = keras.layers.Add(name=f"block{i}")([h, keras.layers.Dense(h.shape[-1], name=f"block{i}_projection")(r)])
    return keras.Model(tokens, readout(keras.layers.LayerNormalization(name="final_norm")(h)), name=name)


def transformer_lm(vocab_size, width, depth, num_heads=None, head_dim=None, seq_len=128, mlp_ratio=4,
                   parametrization="u-mup", readout_zero_init=False, name="transformer_lm"):
    """A pre-norm causal transformer language model: Embedding → `depth` blocks → LayerNorm → readout logits.

    Args:
        vocab_size: tokens in and logits out.
        width: the residual stream's size.
        depth: the number of blocks (each an attention and an MLP branch).
        num_heads: the number of heads. Give `num_heads` or `head_dim`
            (the other follows from `width`); with neither, heads of 16.
        head_dim: the size of each head. Fixing `head_dim` keeps a width
            sweep to the one axis μP scales.
        seq_len: the sequence length (None for any).
        mlp_ratio: the MLP's hidden size over `width`.
        parametrization: "u-mup" (`layers.TransformerBlock`: u-μP's
            residual weights for `depth` blocks, no biases) or "standard"
            (`keras.layers`, Keras's defaults: biases, plain residual adds).
        readout_zero_init: start the readout's kernel at zero, as μP
            suggests (and `mup`'s coordinate check does): the logits start
            at zero at every width instead of at μP's `fan_in^-1/2`, and the
            first update gives them their width-independent size.

    Examples:
        >>> model = transformer_lm(vocab_size=64, width=32, depth=2, head_dim=16, seq_len=8)
        >>> [layer.name for layer in model.layers[1:]]
        ['embed', 'block0', 'block1', 'final_norm', 'readout']
    """
    checks.positive_int("vocab_size", vocab_size)
    checks.positive_int("width", width)
    checks.positive_int("depth", depth)
    checks.positive_int("mlp_ratio", mlp_ratio)
    num_heads, head_dim = _heads(width, num_heads, head_dim)
    tokens = keras.Input((seq_len,), dtype="int32", name="tokens")
    readout_initializer = "zeros" if readout_zero_init else None
    if _unit_scaled(parametrization):
        h = L.Embedding(vocab_size, width, name="embed")(tokens)
        for i in range(depth):
            h = L.TransformerBlock(num_heads=num_heads, key_dim=head_dim, mlp_ratio=mlp_ratio, index=i, depth=depth,
                                   name=f"block{i}")(h)
        h = L.LayerNormalization(name="final_norm")(h)
        logits = L.Dense(vocab_size, role="output", kernel_initializer=readout_initializer, name="readout")(h)
    else:
        h = keras.layers.Embedding(vocab_size, width, name="embed")(tokens)
        for i in range(depth):
            h = _standard_block(h, width, num_heads, head_dim, mlp_ratio, f"block{i}")
        h = keras.layers.LayerNormalization(name="final_norm")(h)
        logits = keras.layers.Dense(vocab_size, kernel_initializer=readout_initializer or "glorot_uniform",
                                    name="readout")(h)
    return keras.Model(tokens, logits, name=name)


def _heads(width, num_heads, head_dim):
    if num_heads is not None and head_dim is not None:
        raise ValueError(
            f"Give `num_heads` or `head_dim`, not both. Received: num_heads={num_heads}, head_dim={head_dim}"
        )
    if num_heads is None:
        head_dim = 16 if head_dim is None else checks.positive_int("head_dim", head_dim)
        if width % head_dim:
            raise ValueError(f"`width` must be a multiple of `head_dim`. Received: width={width}, head_dim={head_dim}")
        return width // head_dim, head_dim
    num_heads = checks.positive_int("num_heads", num_heads)
    if width % num_heads:
        raise ValueError(f"`width` must be a multiple of `num_heads`. Received: width={width}, num_heads={num_heads}")
    return num_heads, width // num_heads


def _standard_block(h, width, num_heads, head_dim, mlp_ratio, name):
    """The pre-norm block from `keras.layers`; its output layer is named as the u-μP block is."""
    n = keras.layers.LayerNormalization(name=f"{name}_attention_norm")(h)
    a = keras.layers.MultiHeadAttention(num_heads=num_heads, key_dim=head_dim, name=f"{name}_attention")(
        n, n, use_causal_mask=True
    )
    h = keras.layers.Add(name=f"{name}_attention_add")([h, a])
    n = keras.layers.LayerNormalization(name=f"{name}_mlp_norm")(h)
    m = keras.layers.Dense(mlp_ratio * width, activation="gelu", name=f"{name}_mlp_up")(n)
    m = keras.layers.Dense(width, name=f"{name}_mlp_down")(m)
    return keras.layers.Add(name=name)([h, m])
