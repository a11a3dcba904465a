"""Our layers against Keras's: training-step time of the same three models, side by side.

The models of the layers issue, each built once from `keras_unitscale.layers`
and once from `keras.layers` (Keras's defaults), compiled with
`jit_compile=True` (XLA on TensorFlow and JAX, `torch.compile` on PyTorch;
`--jit-compile auto` gives Keras's default, which on PyTorch is eager) and
trained on the same data:

- seed 000's MLP: Dense(128, relu) → Dense(64, relu) → Dense(1, sigmoid), input 100;
- a character LSTM model: Embedding(256, 64) → LSTM(256) → Dense(256);
- a small transformer language model: Embedding → 2 pre-norm blocks (width 128,
  4 heads, MLP ×4) → Dense readout.

Both models train with Keras's Adam, or (`--optimizer ours`) ours with ours;
ours with our loss, or (`--loss keras`) with Keras's, which tells the
layers' cost from the loss's.
`--what optimizer` times our Adam against Keras's instead, both training the
models from `keras.layers`.

Usage:
    python benchmarks/layers.py [--repeats 7] [--steps 32] [--jit-compile true|auto] [--optimizer keras|ours]
        [--what layers|optimizer] [--models mlp,lstm,transformer] [--loss ours|keras]
"""

import argparse
import os

import keras
import numpy as np

import timing
from keras_unitscale import layers
from keras_unitscale import losses
from keras_unitscale import optimizers
from keras_unitscale.layers.lstm import LSTM

VOCAB, SEQ = 256, 64


def mlp(lib):
    return keras.Sequential(
        [keras.Input((100,)), lib.Dense(128, activation="relu"), lib.Dense(64, activation="relu"),
         lib.Dense(1, activation="sigmoid")]
    )


def lstm_model(lib):
    lstm = LSTM if lib is layers else keras.layers.LSTM
    readout = layers.Dense(VOCAB, role="output") if lib is layers else keras.layers.Dense(VOCAB)
    return keras.Sequential(
        [keras.Input((SEQ,), dtype="int32"), lib.Embedding(VOCAB, 64), lstm(256, return_sequences=True), readout]
    )


class KerasBlock(keras.layers.Layer):
    """The same pre-norm block from `keras.layers`, with Keras's defaults."""

    def __init__(self, width, heads, **kwargs):
        super().__init__(**kwargs)
        self.attention_norm = keras.layers.LayerNormalization()
        self.attention = keras.layers.MultiHeadAttention(heads, width // heads)
        self.mlp_norm = keras.layers.LayerNormalization()
        self.mlp_up = keras.layers.Dense(4 * width, activation="gelu", use_bias=False)
        self.mlp_down = keras.layers.Dense(width, use_bias=False)

    def call(self, x):
        h = self.attention_norm(x)
        x = x + self.attention(h, h, use_causal_mask=True)
        return x + self.mlp_down(self.mlp_up(self.mlp_norm(x)))


def transformer(lib, width=128, depth=2, heads=4):
    model = keras.Sequential([keras.Input((SEQ,), dtype="int32"), lib.Embedding(VOCAB, width)])
    for index in range(depth):
        if lib is layers:
            model.add(layers.TransformerBlock(heads, index=index, depth=depth))
        else:
            model.add(KerasBlock(width, heads))
    model.add(layers.Dense(VOCAB, role="output") if lib is layers else keras.layers.Dense(VOCAB))
    return model


def _data(kind, n, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "mlp":
        x = rng.normal(size=(n, 100)).astype("float32")
        return x, (x[:, :5].sum(1) > 0).astype("float32")
    ids = rng.integers(0, VOCAB, size=(n, SEQ + 1))
    return ids[:, :-1], ids[:, 1:]


CASES = [  # (name, build, data kind, batch, Keras's loss, ours); `--models` picks by build
    ("seed 000 MLP (batch 256)", mlp, "mlp", 256, keras.losses.BinaryCrossentropy(), losses.BinaryCrossentropy()),
    (f"LSTM text model (256 units, seq {SEQ}, batch 32)", lstm_model, "text", 32,
     keras.losses.SparseCategoricalCrossentropy(from_logits=True), losses.SparseCategoricalCrossentropy(from_logits=True)),
    (f"transformer LM (width 128, depth 2, seq {SEQ}, batch 32)", transformer, "text", 32,
     keras.losses.SparseCategoricalCrossentropy(from_logits=True), losses.SparseCategoricalCrossentropy(from_logits=True)),
]


MODELS = {mlp: "mlp", lstm_model: "lstm", transformer: "transformer"}


def _compiled(build, lib, loss, x, y, batch, jit_compile, optimizer="adam"):
    model = build(lib)
    model.compile(optimizer=optimizer, loss=loss, jit_compile=jit_compile)
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0)  # trace and compile
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=32, help="training steps per timing")
    parser.add_argument("--jit-compile", choices=("true", "auto"), default="true")
    parser.add_argument("--optimizer", choices=("keras", "ours"), default="keras",
                        help="Keras's Adam for both models, or ours (`keras_unitscale.optimizers.Adam`, u-μP's "
                             "per-weight rates) for our layers, as a user of them compiles (default: %(default)s)")
    parser.add_argument("--loss", choices=("ours", "keras"), default="ours",
                        help="our layers' loss: ours (`keras_unitscale.losses`, as a user of them compiles), or "
                             "Keras's, the one Keras's layers train with (default: %(default)s)")
    parser.add_argument("--what", choices=("layers", "optimizer"), default="layers",
                        help="our layers against Keras's, or our Adam against Keras's on Keras's layers")
    parser.add_argument("--models", default="mlp,lstm,transformer",
                        help="which of mlp, lstm, transformer to time (default: all)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    jit_compile = True if args.jit_compile == "true" else "auto"
    rows = []
    chosen = args.models.split(",")
    if set(chosen) - set(MODELS.values()):
        parser.error(f"--models takes {', '.join(MODELS.values())}. Received: {args.models}")
    for name, build, kind, batch, keras_loss, our_loss in CASES:
        if MODELS[build] not in chosen:
            continue
        x, y = _data(kind, batch * 8)
        timing.fresh_compiler_cache()
        if args.what == "optimizer":
            ours = _compiled(build, keras.layers, keras_loss, x, y, batch, jit_compile, optimizers.Adam())
        else:
            ours = _compiled(build, layers, our_loss if args.loss == "ours" else keras_loss, x, y, batch, jit_compile,
                             optimizers.Adam() if args.optimizer == "ours" else "adam")
        theirs = _compiled(build, keras.layers, keras_loss, x, y, batch, jit_compile)
        rows.append(timing.compare(name, ours, theirs, x, y, batch, args.repeats, args.steps))
    jit = "" if jit_compile is True else "_auto_jit"
    if args.what == "optimizer":
        stem, labels = f"optimizer{jit}", ("our Adam", "Keras's Adam")
    else:
        stem = (f"layers{jit}{'_our_adam' if args.optimizer == 'ours' else ''}"
                f"{'_keras_loss' if args.loss == 'keras' else ''}")
        labels = ("keras_unitscale", "keras.layers")
    timing.report(rows, *labels, stem, args.out,
                  {"jit_compile": jit_compile, "repeats": args.repeats, "steps_per_timing": args.steps,
                   "optimizer": args.optimizer, "loss": args.loss, "what": args.what})


if __name__ == "__main__":
    main()
