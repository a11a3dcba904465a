"""A KerasHub Llama in low precision without loss scaling: KerasHub's model against its u-μP twin.

A small `keras_hub.models.LlamaCausalLM` (random weights, built from a
configuration: nothing downloaded) learns the English text of Python's
`pydoc_data.topics`, character by character (`experiments.char_lm_data`: the
first 90% trains, the rest validates), as KerasHub builds it and as its twin
`unit_scale(causal_lm, mode="reinit")`. Every run trains the same batches for
a fixed number of steps and reports its validation loss (nats per character).

Runs: {KerasHub, twin} × {float32, mixed_float16 without loss scaling
(`compile(auto_scale_loss=False)`)}, the twin in simulated scale-free FP8
(`precision.fp8`, the critical matmuls included) and KerasHub's model in
the same casts (`precision.simulate_fp8`), and KerasHub with Keras's loss
scaling (`auto_scale_loss=True`), the usual FP16 remedy. KerasHub's model
trains with Keras's Adam at 1e-3 and Keras's loss; the twin with our Adam at
u-μP's learning rate and our loss.

The goal (issue 20): the twin's FP16 and FP8 runs within 2% of its float32
validation loss.

Usage:
    python benchmarks/hub_low_precision.py [--steps 300] [--batch 32] [--seq 64] [--width 128] [--layers 4]
        [--out benchmarks/results]
"""

import argparse
import json
import os
import time
import warnings

import keras
import keras_hub
import numpy as np

import keras_unitscale
from keras_unitscale import experiments
from keras_unitscale import precision

# (label, model, precision)
RUNS = (
    ("twin float32", "twin", "float32"),
    ("twin FP16, no loss scaling", "twin", "fp16"),
    ("twin FP8", "twin", "fp8"),
    ("KerasHub float32", "kerashub", "float32"),
    ("KerasHub FP16, no loss scaling", "kerashub", "fp16"),
    ("KerasHub FP16 + loss scaling", "kerashub", "fp16+ls"),
    ("KerasHub FP8", "kerashub", "fp8"),
)
TWIN_LEARNING_RATE = 2.0**-3  # u-μP's transformer optimum (benchmarks/lr_transfer.py)
KERASHUB_LEARNING_RATE = 1e-3  # Adam's usual rate


def build(kind, mode, vocabulary_size, args):
    """The causal LM of one run, in its dtype policy (the twin from the KerasHub model of the same seed)."""
    keras.config.set_dtype_policy("mixed_float16" if mode.startswith("fp16") else "float32")
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=vocabulary_size, num_layers=args.layers, num_query_heads=args.heads,
        num_key_value_heads=max(1, args.heads // 2), hidden_dim=args.width, intermediate_dim=2 * args.width,
    )
    if kind == "twin":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the reinit twin is exact by construction
            backbone = keras_unitscale.unit_scale(backbone, mode="reinit")
    return keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)


def _as_inputs(tokens):
    return {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}


def run(label, kind, mode, data, vocabulary_size, args):
    (x, y), (xv, yv) = data
    lm = build(kind, mode, vocabulary_size, args)
    if kind == "kerashub" and mode == "fp8":
        lm = precision.simulate_fp8(lm)
    if kind == "twin":
        optimizer = keras_unitscale.optimizers.Adam(TWIN_LEARNING_RATE)
        loss = keras_unitscale.losses.SparseCategoricalCrossentropy(from_logits=True)
    else:
        optimizer = keras.optimizers.Adam(KERASHUB_LEARNING_RATE)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    started = time.time()
    with precision.fp8(enabled=kind == "twin" and mode == "fp8", critical=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm.compile(optimizer=optimizer, loss=loss, auto_scale_loss=mode == "fp16+ls")
        history = lm.fit(_as_inputs(x), y, batch_size=args.batch, epochs=1, shuffle=False, verbose=0)
        validation = lm.evaluate(_as_inputs(xv), yv, batch_size=args.batch, verbose=0)
    keras.config.set_dtype_policy("float32")
    validation = float(validation[0] if isinstance(validation, list) else validation)
    row = {"label": label, "model": kind, "precision": mode, "train_loss": float(history.history["loss"][-1]),
           "validation_loss": validation, "seconds": round(time.time() - started, 1)}
    print(f"{label:34s} validation {validation:.4f}  ({row['seconds']} s)", flush=True)
    return row


def table(rows, args):
    """A markdown table: each run's validation loss and its change from its model's float32 run."""
    float32 = {row["model"]: row["validation_loss"] for row in rows if row["precision"] == "float32"}
    lines = [
        f"KerasHub Llama, width {args.width}, {args.layers} blocks, {args.steps} steps of {args.batch}×{args.seq} "
        f"characters ({keras.backend.backend()}, CPU)",
        "",
        "| run | validation loss | vs its float32 |",
        "|---|---|---|",
    ]
    for row in rows:
        value = row["validation_loss"]
        change = value / float32[row["model"]] - 1 if np.isfinite(value) else float("nan")
        shown = f"{value:.4f}" if np.isfinite(value) else "nan"
        lines.append(f"| {row['label']} | {shown} | {change:+.2%} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--validation", type=int, default=256, help="validation windows")
    parser.add_argument("--runs", nargs="+", default=[label for label, _, _ in RUNS])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    train, validation, vocabulary = experiments.char_lm_data(args.seq, args.steps * args.batch, args.validation)
    rows = [run(label, kind, mode, (train, validation), len(vocabulary), args)
            for label, kind, mode in RUNS if label in args.runs]
    text = table(rows, args)
    print("\n" + text)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"hub_low_precision_{keras.backend.backend()}_cpu")
    with open(stem + ".json", "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    with open(stem + ".txt", "w") as f:
        f.write(text + "\n")
    return rows


if __name__ == "__main__":
    main()
