"""What `ScaleTracker` costs: training steps with it against without, at its default interval.

The transformer LM of `benchmarks/layers.py` (keras_unitscale layers, width
128, depth 2, batch 32, `jit_compile=True`), trained `--steps` steps per
timing with `callbacks=[]` and with `ScaleTracker(every=100, x=..., y=...)`
on a batch of 8, alternately, `--repeats` times. Reported: median step time
of each, the extra time per step, and the time of one report (a forward and
backward pass traced once per `fit`, outside the training step) and of the
first, which traces it.

Usage:
    python benchmarks/scale_tracker.py [--steps 300] [--repeats 5] [--out benchmarks/results]
"""

import argparse
import json
import os
import statistics
import time

import keras

import layers as models
import timing
from keras_unitscale import layers
from keras_unitscale import losses
from keras_unitscale.callbacks import ScaleTracker


def _fit_time(model, x, y, batch, steps, callbacks):
    epochs = max(1, steps // (len(x) // batch))
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0, callbacks=callbacks)
    return (time.perf_counter() - start) / (epochs * (len(x) // batch))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    batch = 32
    x, y = models._data("text", batch * 10)
    model = models.transformer(layers)
    model.compile(optimizer="adam", loss=losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0)  # trace and compile

    def tracker():
        return ScaleTracker(every=args.every, x=x[:8], y=y[:8])

    probe = tracker()
    probe.set_model(model)
    report_seconds = []
    for _ in range(3):  # the first traces the pass
        start = time.perf_counter()
        probe._measure()
        report_seconds.append(time.perf_counter() - start)
    first_report_seconds, report_seconds = report_seconds[0], statistics.median(report_seconds[1:])

    plain, tracked = [], []
    progress = keras.utils.Progbar(args.repeats, unit_name="repeat")
    for _ in range(args.repeats):
        plain.append(_fit_time(model, x, y, batch, args.steps, []))
        tracked.append(_fit_time(model, x, y, batch, args.steps, [tracker()]))
        progress.add(1)
    result = {
        "backend": keras.backend.backend(),
        "device": timing.device_name(),
        "steps_per_timing": args.steps,
        "every": args.every,
        "plain_ms": 1e3 * statistics.median(plain),
        "tracked_ms": 1e3 * statistics.median(tracked),
        "extra_per_step": statistics.median(tracked) / statistics.median(plain) - 1,
        "first_report_ms": 1e3 * first_report_seconds,
        "report_ms": 1e3 * report_seconds,
        "report_share_at_interval": report_seconds / (args.every * statistics.median(plain)),
    }
    text = (
        f"ScaleTracker(every={args.every}) on the transformer LM, {result['backend']} {result['device']}, "
        f"{args.steps} steps a timing, {args.repeats} repeats\n"
        f"step without: {result['plain_ms']:.1f} ms, with: {result['tracked_ms']:.1f} ms "
        f"(+{100 * result['extra_per_step']:.1f}%, including the report at step 1)\n"
        f"one report: {result['report_ms']:.0f} ms = {100 * result['report_share_at_interval']:.1f}% "
        f"of {args.every} steps; the first of each fit (tracing the pass): {result['first_report_ms']:.0f} ms"
    )
    print(text)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"scale_tracker_{result['backend']}_{result['device']}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".txt", "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
