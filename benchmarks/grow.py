"""Growing a trained model: does training go on from where it was, at the same learning rate, and save steps?

A character-level transformer LM (`keras_unitscale.models.transformer_lm`,
heads of 16), or with `--model lstm` a residual LSTM LM
(`keras_unitscale.models.lstm_lm(residual=True)`, a stack of
`RecurrentBlock`s), on the English text of Python's `pydoc_data.topics`,
trained in u-μP (`keras_unitscale.optimizers.Adam` at `--lr`, the
transformer's optimum of `benchmarks/lr_transfer.py` on this task, our
unit-scaled cross-entropy):

- base: width `--width`, depth `--depth`, for `--steps-before` steps;
- for each target size (`--targets`, "W×D"), the base grown to it with
  `keras_unitscale.grow` and trained on for `--steps-after` steps, on the
  next batches of the same stream:
  - grown: with `keras_unitscale.optimizers.Adam` at the same `--lr`;
  - grown, Keras Adam: with `keras.optimizers.Adam` at the same `--lr`, one
    rate for every weight, as a standard-parametrization script would
    continue (no per-weight u-μP factors for the new sizes);
  - not grown: the base, trained on as it is (its optimizer restarted, as
    the grown model's is): what growing adds;
  - from scratch: the target size trained from its initialisation for the
    same total steps (`--steps-before + --steps-after`).

Reported per target: the validation loss of the base just before growth and
of the grown model just after (the same function: equal up to float
rounding), each run's final training loss (the mean of its last `--smooth`
steps) and validation loss, and the steps the grown model saves: the total
steps from scratch minus the steps (base's plus grown's) after which the
grown model's training loss, as a running mean of `--smooth` steps, first
reaches the from-scratch model's final one ("not reached" if it never does),
and the other way round, the step at which the from-scratch model's reaches
the grown model's final one.
Written to `--out`: `grow_<backend>_<device>.json`, `.txt` and `.png`
(`grow_lstm_<backend>_<device>` for the LSTM).

Usage:
    python benchmarks/grow.py [--model transformer|lstm] [--targets 128x2 256x2 64x4] [--steps-before 300]
        [--steps-after 300]
"""

import argparse
import json
import math
import os
import time

import keras
import numpy as np

import timing
import keras_unitscale
from keras_unitscale import experiments
from keras_unitscale import losses
from keras_unitscale import models
from keras_unitscale import optimizers


MODELS = {
    "transformer": lambda vocab_size, width, depth, seq: models.transformer_lm(vocab_size, width, depth, head_dim=16,
                                                                                 seq_len=seq),
    "lstm": lambda vocab_size, width, depth, seq: models.lstm_lm(vocab_size, width, depth, seq_len=seq, residual=True),
}
_TITLES = {"transformer": "character transformer LM", "lstm": "character residual LSTM LM (RecurrentBlocks)"}


def _train(model, optimizer, batches, validation, batch_size):
    """Trains `model` on `batches` (one pass, in order); returns its per-step losses and validation loss."""
    model.compile(optimizer=optimizer, loss=losses.SparseCategoricalCrossentropy(from_logits=True))
    return _train_on(model, batches, validation, batch_size)


def _train_on(model, batches, validation, batch_size):
    """`_train` with the model's optimizer as it is (its state kept)."""
    recorder = experiments.StepLosses()
    model.fit(*batches, batch_size=batch_size, epochs=1, shuffle=False, verbose=0, callbacks=[recorder])
    return recorder.losses().tolist(), _validation_loss(model, validation, batch_size)


def _validation_loss(model, validation, batch_size):
    if getattr(model, "optimizer", None) is None:  # a model just built, never compiled
        model.compile(loss=losses.SparseCategoricalCrossentropy(from_logits=True))
    value = float(model.evaluate(*validation, batch_size=batch_size, verbose=0))
    return value if math.isfinite(value) else math.nan


def _final(curve, window):
    """The training loss at the end: the mean of the last `window` steps (as `_smoothed` gives it there)."""
    return float(np.mean(curve[-window:]))


def _smoothed(curve, window):
    curve = np.asarray(curve, "float64")
    return np.array([np.mean(curve[max(0, i - window + 1): i + 1]) for i in range(len(curve))])


def steps_saved(base_curve, grown_curve, scratch_curve, window):
    """Total steps from scratch minus the steps after which the grown run first reaches scratch's final loss."""
    target = _final(scratch_curve, window)
    joined = _smoothed(list(base_curve) + list(grown_curve), window)
    reached = np.flatnonzero(joined[len(base_curve):] <= target)
    if len(reached) == 0:
        return None
    return len(scratch_curve) - (len(base_curve) + int(reached[0]) + 1)


def first_reached(curve, target, window):
    """The step (1-based) after which `curve`'s running mean of `window` steps is first at or below `target`."""
    reached = np.flatnonzero(_smoothed(curve, window) <= target)
    return None if len(reached) == 0 else int(reached[0]) + 1


def _target(text):
    width, depth = text.lower().split("x")
    return int(width), int(depth)


def run(args):
    total = args.steps_before + args.steps_after
    (x, y), validation, vocabulary = experiments.char_lm_data(args.seq, total * args.batch, args.validation)
    before = (x[: args.steps_before * args.batch], y[: args.steps_before * args.batch])
    after = (x[args.steps_before * args.batch:], y[args.steps_before * args.batch:])
    vocab = len(vocabulary)
    keras.utils.set_random_seed(args.seed)
    build = MODELS[args.model]
    base = build(vocab, args.width, args.depth, args.seq)
    base_curve, base_validation = _train(base, optimizers.Adam(args.lr), before, validation, args.batch)
    print(f"base {args.width}x{args.depth}: validation {base_validation:.4f}", flush=True)
    rows = []
    for text in args.targets:
        width, depth = _target(text)
        row = {"target": f"{width}x{depth}", "width": width, "depth": depth, "base_validation": base_validation}
        started = time.perf_counter()
        for variant, optimizer, sizes in (
            ("grown", optimizers.Adam, (width / args.width, depth / args.depth)),
            ("grown_keras_adam", keras.optimizers.Adam, (width / args.width, depth / args.depth)),
            ("not_grown", optimizers.Adam, (1, 1)),  # the base, trained on as it is (its optimizer restarted too)
        ):
            grown = keras_unitscale.grow(base, width=sizes[0], depth=sizes[1], split=args.split, seed=args.seed)
            if variant == "grown":
                row["validation_just_after"] = _validation_loss(grown, validation, args.batch)
            curve, val = _train(grown, optimizer(args.lr), after, validation, args.batch)
            row[variant] = {"curve": curve, "final_train": _final(curve, args.smooth), "validation": val,
                            "parameters": int(grown.count_params())}
        keras.utils.set_random_seed(args.seed)
        scratch = build(vocab, width, depth, args.seq)
        curve, val = _train(scratch, optimizers.Adam(args.lr), (x, y), validation, args.batch)
        row["scratch"] = {"curve": curve, "final_train": _final(curve, args.smooth), "validation": val}
        row["steps_saved"] = steps_saved(base_curve, row["grown"]["curve"], curve, args.smooth)
        row["scratch_reaches_grown_at"] = first_reached(curve, row["grown"]["final_train"], args.smooth)
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        print(f"{row['target']}: just after growth {row['validation_just_after']:.4f}, grown "
              f"{row['grown']['validation']:.4f}, Keras Adam {row['grown_keras_adam']['validation']:.4f}, not grown "
              f"{row['not_grown']['validation']:.4f}, scratch {val:.4f}, steps saved {row['steps_saved']} "
              f"({row['seconds']:.0f} s)", flush=True)
    # What restarting the optimizer costs: the base trained on with its Adam's moments and step count kept (last,
    # as it moves the base the rows grew from).
    kept_curve, kept_validation = _train_on(base, after, validation, args.batch)
    print(f"not grown, optimizer state kept: validation {kept_validation:.4f}", flush=True)
    return {"base": {"curve": base_curve, "validation": base_validation},
            "not_grown_state_kept": {"curve": kept_curve, "validation": kept_validation}, "rows": rows}


def table(result, args):
    lines = [
        f"growing a trained model: {_TITLES[args.model]} on pydoc_data.topics, {keras.backend.backend()} "
        f"{timing.device_name()}; base {args.width}x{args.depth} (width x depth) trained {args.steps_before} steps, "
        f"then {args.steps_after} more (split {args.split!r}); batch {args.batch} x {args.seq} characters; learning rate {args.lr:g} "
        f"throughout; validation on {args.validation} windows; steps saved on a running mean of {args.smooth} steps",
        "",
        "validation loss of each run at the end; final train loss: the mean of the last steps; steps saved: the "
        "total minus the step at which the grown run's training loss reaches scratch's final one; scratch reaches "
        "grown: the step at which scratch's training loss reaches the grown run's final one",
        "",
        "| target | validation before growth | just after | grown | grown, Keras Adam | not grown | from scratch "
        "| final train loss: grown / scratch | steps saved (of total) | scratch reaches grown at step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    total = args.steps_before + args.steps_after
    for row in result["rows"]:
        saved = "not reached" if row["steps_saved"] is None else f"{row['steps_saved']} of {total}"
        reached = row["scratch_reaches_grown_at"]
        lines.append(
            f"| {row['target']} | {row['base_validation']:.4f} | {row['validation_just_after']:.4f} "
            f"| {row['grown']['validation']:.4f} | {row['grown_keras_adam']['validation']:.4f} "
            f"| {row['not_grown']['validation']:.4f} | {row['scratch']['validation']:.4f} "
            f"| {row['grown']['final_train']:.4f} / {row['scratch']['final_train']:.4f} | {saved} "
            f"| {'not reached' if reached is None else reached} |"
        )
    kept = result["not_grown_state_kept"]
    restarted = result["rows"][0]["not_grown"] if result["rows"] else None
    if restarted is not None:
        window = slice(0, args.smooth)
        lines += ["", f"what restarting the optimizer costs, on the base trained on (not grown): validation "
                  f"{restarted['validation']:.4f} restarted, {kept['validation']:.4f} with its state kept; training "
                  f"loss over the first {args.smooth} steps after the cut {np.mean(restarted['curve'][window]):.4f} "
                  f"restarted, {np.mean(kept['curve'][window]):.4f} kept (the last {args.smooth} before it: "
                  f"{np.mean(result['base']['curve'][-args.smooth:]):.4f})"]
    return "\n".join(lines)


def plot(result, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    figure, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 4), sharey=True, squeeze=False)
    base = _smoothed(result["base"]["curve"], args.smooth)
    for axis, row in zip(axes[0], rows):
        after = np.arange(args.steps_before, args.steps_before + args.steps_after)
        axis.plot(np.arange(args.steps_before), base, color="black", label=f"base {args.width}x{args.depth}")
        axis.plot(after, _smoothed(row["grown"]["curve"], args.smooth), label="grown, our Adam")
        axis.plot(after, _smoothed(row["grown_keras_adam"]["curve"], args.smooth), label="grown, Keras Adam")
        axis.plot(after, _smoothed(row["not_grown"]["curve"], args.smooth), label="not grown", color="grey")
        axis.plot(_smoothed(row["scratch"]["curve"], args.smooth), label="from scratch", linestyle="--")
        axis.axvline(args.steps_before, color="grey", linewidth=0.5)
        axis.set_title(f"grown to {row['target']}")
        axis.set_xlabel("step")
        axis.set_ylim(1.0, 4.0)
    axes[0][0].set_ylabel(f"training loss (running mean of {args.smooth})")
    axes[0][-1].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="transformer", choices=sorted(MODELS))
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--targets", nargs="+", default=["128x2", "256x2", "64x4"])
    parser.add_argument("--steps-before", type=int, default=300)
    parser.add_argument("--steps-after", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2.0**-3)
    parser.add_argument("--validation", type=int, default=256)
    parser.add_argument("--smooth", type=int, default=20)
    parser.add_argument("--split", default="partition", choices=keras_unitscale.resize.SPLITS,
                        help="how the grown models' copies share their weights (`keras_unitscale.grow`)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    started = time.perf_counter()
    result = run(args)
    text = table(result, args) + f"\n\n{time.perf_counter() - started:.0f} s in all\n"
    print("\n" + text)
    os.makedirs(args.out, exist_ok=True)
    prefix = "grow_" if args.model == "transformer" else f"grow_{args.model}_"
    stem = os.path.join(args.out, f"{prefix}{keras.backend.backend()}_{timing.device_name().replace(' ', '_').lower()}")
    with open(stem + ".json", "w") as f:
        json.dump({"settings": vars(args), **result}, f)
    with open(stem + ".txt", "w") as f:
        f.write(text)
    plot(result, args, stem + ".png")
    print(f"wrote {stem}.json, .txt and .png")


if __name__ == "__main__":
    main()
