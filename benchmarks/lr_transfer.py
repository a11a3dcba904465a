"""u-μP hyperparameter transfer: does the best learning rate stay put as the model grows?

A character-level transformer LM (`keras_unitscale.models.transformer_lm`,
heads of 16, MLP ×4) on the English text of Python's `pydoc_data.topics`,
trained `--steps` steps of `--batch` windows of `--seq` characters, once per
learning rate (powers of 2) and model size, in two parametrizations:

- u-μP: our layers, `keras_unitscale.optimizers.Adam` and our unit-scaled
  cross-entropy;
- standard: the same architecture from `keras.layers` with Keras's
  defaults, `keras.optimizers.Adam` and Keras's cross-entropy.

Widths `--widths` at depth `--depth-for-widths`, and depths `--depths` at
width `--width-for-depths`. Written to `--out`: `lr_transfer_<backend>.csv`
and `.json` (every run), `.txt` (the tables, each label's optimum, the
drift of the optimum in grid steps, and whether validation loss falls with
width at the u-μP optimum) and four plots, `lr_transfer_{width,depth}_{u-mup,standard}.png`.

Usage:
    python benchmarks/lr_transfer.py [--widths 64 128 256 512] [--depths 2 4 8] [--steps 200]
"""

import argparse
import json
import math
import os
import time

import keras

import timing
from keras_unitscale import experiments
from keras_unitscale import losses
from keras_unitscale import models
from keras_unitscale import optimizers

# Powers of 2 around each parametrization's optimum on this task.
GRIDS = {"u-mup": [2.0**e for e in range(-5, 3)], "standard": [2.0**e for e in range(-12, -4)]}
TRAINING = {
    "u-mup": (optimizers.Adam, lambda: losses.SparseCategoricalCrossentropy(from_logits=True)),
    "standard": (keras.optimizers.Adam, lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True)),
}


def _sweep(parametrization, width, depth, label, data, vocabulary, args):
    (train, validation) = data
    optimizer, loss = TRAINING[parametrization]
    print(f"{parametrization}, {label}:")
    return experiments.lr_sweep(
        lambda: models.transformer_lm(len(vocabulary), width, depth, head_dim=16, seq_len=args.seq,
                                      parametrization=parametrization),
        GRIDS[parametrization], train, validation, steps=args.steps, batch_size=args.batch,
        optimizer=optimizer, loss=loss(), label=label,
    )


def _plot(result, parametrization, stem):
    for axis in ("width", "depth"):
        rows = [r for r in result.rows if r["label"].startswith(axis)]
        experiments.SweepResult(rows).plot(
            f"{stem}_{axis}_{parametrization}.png",
            title=f"{parametrization}: validation loss by learning rate and {axis}",
        )


def _drift(result, labels):
    """How far the optimum moves across `labels`, in grid steps (factors of 2)."""
    log2 = [math.log2(result.best(label)["learning_rate"]) for label in labels]
    return max(log2) - min(log2)


def sweep_widths_and_depths(sweep, args):
    """{parametrization: SweepResult} over `args.widths` at `args.depth_for_widths` and `args.depths` at
    `args.width_for_depths`; `sweep(parametrization, width, depth, label)` runs one learning-rate sweep."""
    results = {}
    for parametrization in args.parametrizations:
        sweeps = {}
        for width in args.widths:
            sweeps[f"width {width}"] = sweep(parametrization, width, args.depth_for_widths, f"width {width}")
        for depth in args.depths:
            label, same = f"depth {depth}", f"width {args.width_for_depths}"
            if depth == args.depth_for_widths and same in sweeps:
                sweeps[label] = experiments.SweepResult([{**r, "label": label} for r in sweeps[same].rows])
            else:
                sweeps[label] = sweep(parametrization, args.width_for_depths, depth, label)
        results[parametrization] = sum(sweeps.values(), experiments.SweepResult([]))
    return results


def write_results(results, args, stem, title):
    """Each parametrization's tables, optima, drift of the optimum and loss at it: `stem`.csv, .json, .txt and plots."""
    width_labels = [f"width {w}" for w in args.widths]
    depth_labels = [f"depth {d}" for d in args.depths]
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    lines = [title]
    summary = {"settings": {k: v for k, v in vars(args).items() if k != "replot"}, "parametrizations": {}}
    for parametrization, result in results.items():
        width_result = experiments.SweepResult([r for r in result.rows if r["label"] in width_labels])
        depth_result = experiments.SweepResult([r for r in result.rows if r["label"] in depth_labels])
        at_optimum = [result.best(label)["validation_loss"] for label in width_labels]
        facts = {
            "optima": result.optima(),
            "width_drift_grid_steps": _drift(result, width_labels),
            "depth_drift_grid_steps": _drift(result, depth_labels),
            "loss_at_optimum_by_width": at_optimum,
            "wider_is_better": all(b < a for a, b in zip(at_optimum, at_optimum[1:])),
        }
        summary["parametrizations"][parametrization] = facts
        lines += [
            "", f"== {parametrization} ==", str(width_result), "", str(depth_result), "",
            "optimum (log2 lr): " + ", ".join(f"{k} {math.log2(v):g}" for k, v in facts["optima"].items()),
            f"drift of the optimum across widths: {facts['width_drift_grid_steps']:g} grid steps; "
            f"across depths: {facts['depth_drift_grid_steps']:g}",
            "validation loss at each width's optimum: " + ", ".join(f"{v:.4f}" for v in at_optimum)
            + (" (falls with width)" if facts["wider_is_better"] else " (does not fall monotonically)"),
        ]
        _plot(result, parametrization, stem)
    rows = [{**r, "parametrization": p} for p, result in results.items() for r in result.rows]
    experiments.SweepResult(rows).to_csv(stem + ".csv")
    with open(stem + ".json", "w") as f:
        json.dump({**summary, "rows": rows}, f, indent=1)
    text = "\n".join(lines)
    print(text)
    with open(stem + ".txt", "w") as f:
        f.write(text + "\n")


def replot(stem):
    """Redraws the plots from `stem`.json."""
    with open(stem + ".json") as f:
        rows = json.load(f)["rows"]
    for parametrization in dict.fromkeys(r["parametrization"] for r in rows):
        _plot(experiments.SweepResult([r for r in rows if r["parametrization"] == parametrization]), parametrization,
              stem)


def arguments(description, parametrizations, steps=200):
    """The command line both transfer benchmarks take."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--depth-for-widths", type=int, default=2)
    parser.add_argument("--width-for-depths", type=int, default=128)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--parametrizations", nargs="+", default=list(parametrizations))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--replot", action="store_true", help="redraw the plots from the saved JSON, run nothing")
    return parser


def main():
    args = arguments(__doc__.splitlines()[0], models.PARAMETRIZATIONS).parse_args()
    stem = os.path.join(args.out, f"lr_transfer_{keras.backend.backend()}_{timing.device_name()}")
    if args.replot:
        replot(stem)
        return
    train, validation, vocabulary = experiments.char_lm_data(args.seq, args.steps * args.batch, 256)
    start = time.perf_counter()
    results = sweep_widths_and_depths(
        lambda parametrization, width, depth, label: _sweep(parametrization, width, depth, label,
                                                            (train, validation), vocabulary, args), args)
    write_results(results, args, stem, (
        f"u-μP learning-rate transfer: character transformer LM on pydoc_data.topics, {keras.backend.backend()} "
        f"{timing.device_name()}, {args.steps} steps × {args.batch} × {args.seq} characters, heads of 16; "
        f"widths {args.widths} at depth {args.depth_for_widths}, depths {args.depths} at width "
        f"{args.width_for_depths}; {time.perf_counter() - start:.0f} s in all"
    ))


if __name__ == "__main__":
    main()
