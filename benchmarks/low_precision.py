"""Low precision without loss scaling: plain Keras layers against unit-scaled ones, in float32, FP16 and FP8.

Two character-level language models on the English text of Python's
`pydoc_data.topics` (the first 90% trains, the rest validates): a pre-norm
transformer (`models.transformer_lm`, 4 blocks) and an LSTM LM
(`models.lstm_lm`), each built from `keras.layers` with Keras's defaults
("plain") and from `keras_unitscale.layers` with u-μP ("ours"). Every run
trains the same batches for a fixed number of steps, then reports:

- the validation loss (nats per character);
- the fraction of activations (layer outputs) and of gradients (their
  gradients) that the run's format flushes to zero or saturates, averaged
  over the model's tensors, measured on a validation batch with the trained
  weights in float32 (so that nothing has been flushed yet): FP16 for the
  FP16 runs; E4M3 for activations and E5M2 for gradients for the FP8 runs.

Runs: {plain, ours} × {float32, mixed_float16 without loss scaling
(`compile(auto_scale_loss=False)`), simulated scale-free FP8
(`precision.fp8` for ours, `precision.simulate_fp8` for plain)}, plus plain
mixed_float16 with Keras's `LossScaleOptimizer` and plain with Keras's
`model.quantize("float8")` (delayed per-tensor scaling; it leaves the LSTM
alone, and its scaled casts make raw-value fractions meaningless, so none
are given). Ours in FP8 casts every matmul, the critical ones included,
unless `--keep-critical`.

The goal: our FP16 and FP8 runs within 2% of our float32 validation loss.

Usage:
    python benchmarks/low_precision.py [--steps 300] [--batch 32] [--seq 64]
        [--models transformer lstm] [--precisions float32 fp16 fp8 fp16+ls keras-float8]
        [--out benchmarks/results]
"""

import argparse
import json
import os
import time

import keras
import numpy as np

import keras_unitscale
from keras_unitscale import analysis
from keras_unitscale import experiments
from keras_unitscale import formats as F
from keras_unitscale import models
from keras_unitscale import precision

# (label, layers, precision)
RUNS = (
    ("ours float32", "ours", "float32"),
    ("ours FP16, no loss scaling", "ours", "fp16"),
    ("ours FP8", "ours", "fp8"),
    ("plain float32", "plain", "float32"),
    ("plain FP16, no loss scaling", "plain", "fp16"),
    ("plain FP8", "plain", "fp8"),
    ("plain FP16 + LossScaleOptimizer", "plain", "fp16+ls"),
    ("plain Keras quantize('float8')", "plain", "keras-float8"),
)
PRECISIONS = list(dict.fromkeys(mode for _, _, mode in RUNS))
# Learning rates: u-μP's transformer optimum of `benchmarks/lr_transfer.py`
# (2^-3), and Adam's usual 1e-3 for Keras's defaults (their sweep put the
# optimum near 2^-9 to 2^-10 at these widths).
LEARNING_RATES = {"ours": 2.0**-3, "plain": 1e-3}
# The formats a run's tensors must fit: (activations, gradients).
RUN_FORMATS = {"fp16": (F.FP16, F.FP16), "fp16+ls": (F.FP16, F.FP16), "fp8": (F.E4M3, F.E5M2)}


def _builders(vocabulary_size, seq_len):
    return {
        "transformer": lambda parametrization: models.transformer_lm(
            vocabulary_size, 128, 4, head_dim=32, seq_len=seq_len, parametrization=parametrization),
        "lstm": lambda parametrization: models.lstm_lm(
            vocabulary_size, 256, seq_len=seq_len, parametrization=parametrization),
    }


def _loss(layers):
    if layers == "ours":
        return keras_unitscale.losses.SparseCategoricalCrossentropy(from_logits=True)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _build(build, layers, mode):
    keras.config.set_dtype_policy("mixed_float16" if mode in ("fp16", "fp16+ls") else "float32")
    keras.utils.set_random_seed(0)
    model = build("u-mup" if layers == "ours" else "standard")
    if layers == "plain" and mode == "fp8":
        model = precision.simulate_fp8(model)
    if mode == "keras-float8":
        model.quantize("float8")
    return model


def _fractions(build, layers, mode, weights, x, y):
    """Mean fractions of activations and gradients the run's format flushes or saturates (float32 pass)."""
    if mode not in RUN_FORMATS:
        return {}
    keras.config.set_dtype_policy("float32")
    reference = build("u-mup" if layers == "ours" else "standard")
    reference.set_weights(weights)
    return analysis.scale_report(reference, x, y, loss=_loss(layers)).lost_fractions(*RUN_FORMATS[mode])


def run(name, build, layers, mode, data, args, fp8_critical):
    try:
        return _run(name, build, layers, mode, data, args, fp8_critical)
    except Exception as error:  # a backend that cannot run it (JAX's CPU: no float16 attention): the table says so
        return {"model": name, "layers": layers, "precision": mode, "error": experiments.describe_failure(error),
                "finite": False}
    finally:
        keras.config.set_dtype_policy("float32")


def _run(name, build, layers, mode, data, args, fp8_critical):
    (x, y), (x_validation, y_validation) = data
    model = _build(build, layers, mode)
    optimizer = (keras_unitscale.optimizers.Adam if layers == "ours" else keras.optimizers.Adam)(
        LEARNING_RATES[layers])
    started = time.perf_counter()
    with precision.fp8(enabled=layers == "ours" and mode == "fp8", critical=fp8_critical):
        model.compile(optimizer, _loss(layers), auto_scale_loss=mode == "fp16+ls")
        history = model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0, shuffle=False)
        validation_loss = model.evaluate(x_validation, y_validation, batch_size=args.batch, verbose=0)
    seconds = time.perf_counter() - started
    losses = history.history["loss"]
    row = {
        "model": name, "layers": layers, "precision": mode,
        "optimizer": type(model.optimizer).__name__,
        "validation_loss": float(validation_loss), "final_train_loss": float(losses[-1]),
        "finite": bool(np.isfinite(validation_loss)), "seconds": seconds,
    }
    weights = None if mode == "keras-float8" else model.get_weights()
    if weights is not None:
        row.update(_fractions(build, layers, mode, weights, x_validation[: args.batch], y_validation[: args.batch]))
    return row


def _percent(value):
    return "" if value is None else ("0" if value == 0 else f"{100 * value:.2g}%")


def table(rows, steps):
    lines = []
    for name in dict.fromkeys(row["model"] for row in rows):
        group = [row for row in rows if row["model"] == name]
        ours = {r["precision"]: r.get("validation_loss") for r in group if r["layers"] == "ours"}
        base = ours.get("float32")  # None where ours in float32 did not run: nothing to measure the rest against
        lines += [f"== {name} LM, {steps} steps: validation loss (nats/char) and what the run's format loses ==",
                  f"{'run':<34}{'val loss':>9}{'vs ours f32':>12}{'act uf':>9}{'act sat':>9}{'grad uf':>9}"
                  f"{'grad sat':>9}{'s':>7}"]
        for (label, layers, mode) in RUNS:
            row = next((r for r in group if r["layers"] == layers and r["precision"] == mode), None)
            if row is None:
                continue
            if "error" in row:
                lines.append(f"{label:<34} not run: {row['error']}")
                continue
            change = "" if base is None else f"{100 * (row['validation_loss'] / base - 1):+.1f}%"
            lines.append(
                f"{label:<34}{row['validation_loss']:>9.4f}{change:>12}"
                f"{_percent(row.get('activation_underflow')):>9}{_percent(row.get('activation_saturation')):>9}"
                f"{_percent(row.get('gradient_underflow')):>9}{_percent(row.get('gradient_saturation')):>9}"
                f"{row['seconds']:>7.0f}")
        within = {mode: None if ours.get(mode) is None or base is None else abs(ours[mode] / base - 1) <= 0.02
                  for mode in ("fp16", "fp8")}
        lines.append("goal, ours within 2% of ours float32: " + ", ".join(
            f"{mode.upper()} {'not run' if ok is None else 'yes' if ok else 'NO'}" for mode, ok in within.items()))
        lines.append("")
    return "\n".join(lines)


def plot(rows, path):
    from keras_unitscale.plotting import new_figure

    names = list(dict.fromkeys(row["model"] for row in rows))
    figure, all_axes = new_figure("low_precision.plot", (11, 1.2 + 0.45 * len(RUNS) * len(names)),
                                  nrows=len(names), squeeze=False)
    for axes, name in zip(all_axes[:, 0], names):
        group = {(r["layers"], r["precision"]): r for r in rows if r["model"] == name and "error" not in r}
        labels = [label for label, layers, mode in RUNS if (layers, mode) in group]
        values = [group[(layers, mode)]["validation_loss"] for _, layers, mode in RUNS if (layers, mode) in group]
        colors = ["tab:blue" if label.startswith("ours") else "tab:gray" for label in labels]
        axes.barh(labels[::-1], values[::-1], color=colors[::-1])
        for y, value in enumerate(values[::-1]):
            axes.text(value, y, f" {value:.3f}", va="center", fontsize=8)
        axes.set_title(f"{name} LM: validation loss after training (lower is better)")
        axes.set_xlim(0, max(v for v in values if np.isfinite(v)) * 1.15)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--models", nargs="+", default=["transformer", "lstm"], choices=["transformer", "lstm"])
    parser.add_argument("--keep-critical", action="store_true",
                        help="leave u-μP's critical matmuls in higher precision in our FP8 runs")
    parser.add_argument("--precisions", nargs="+", default=PRECISIONS, choices=PRECISIONS,
                        help="the runs' precisions (float32 always runs: the others are measured against it); "
                             "PyTorch's CPU kernels take float16 matmuls 20-50x as long as float32's")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    args.precisions = ["float32", *(p for p in args.precisions if p != "float32")]
    runs = [entry for entry in RUNS if entry[2] in args.precisions]
    train, validation, vocabulary = experiments.char_lm_data(args.seq, args.steps * args.batch, 8 * args.batch)
    builders = _builders(len(vocabulary), args.seq)
    progress = keras.utils.Progbar(len(args.models) * len(runs), unit_name="run")
    rows = []
    for name in args.models:
        for label, layers, mode in runs:
            rows.append(run(name, builders[name], layers, mode, (train, validation), args, not args.keep_critical))
            progress.add(1)
    text = table(rows, args.steps)
    header = (f"keras_unitscale low-precision benchmark, {keras.backend.backend()}, {args.steps} steps of "
              f"{args.batch}×{args.seq} characters, validation {8 * args.batch} windows; "
              f"ours in FP8 {'keeps the critical matmuls in float32' if args.keep_critical else 'casts every matmul'}"
              f"{'' if len(runs) == len(RUNS) else '; precisions run: ' + ', '.join(args.precisions)}\n")
    print("\n" + header + text)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"low_precision_{keras.backend.backend()}_cpu")
    with open(stem + ".json", "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    with open(stem + ".txt", "w") as f:
        f.write(header + text)
    plot(rows, stem + ".png")


if __name__ == "__main__":
    main()
