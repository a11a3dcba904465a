"""Where eager PyTorch's step time goes: our layers against Keras's, with and without their scale ops.

On PyTorch without `torch.compile`, every op is a Python call, and each of
our ops that scales a gradient is a custom autograd node (`ops/torch_fused.py`,
`scale.scaled`): its backward runs Python where Keras's own ops run PyTorch's
C++ nodes. This times training steps (`train_on_batch`), in interleaved rounds,
of one model in up to five forms:

- `keras`: built from `keras.layers` (a real script's model, as written);
- `ours`: the same model unit-scaled (the layers benchmark's MLP from
  `keras_unitscale.layers`; the real script's converted in place by
  `UnitScaleCallback`, as `real_scripts.py` runs it);
- `ours, scaling off`: that model stepped inside `scaling_disabled()`: every
  scale op removed, so no custom autograd node; the ops then run composed
  from Keras's (the fused functions exist to apply scales), so this is our
  layers' Python around Keras's ops, not `ours` minus its nodes;
- `keras + pass-through layers` (MLP only): Keras's model with a layer after
  each `Dense` that returns a view of its input (a native op);
- `keras + identity nodes` (MLP only): the same, the view taken inside an
  autograd function of its own whose backward returns its gradient: against
  the pass-through layers, what a custom autograd node costs inside a Keras
  step, whatever it computes.

Each round times every form for `--steps` steps; reported are the median
step time over rounds and its ratio to Keras's median. One thread
(`--threads 1`, the default) keeps the two-core machine's scheduling out of
the ratios.

Usage:
    KERAS_BACKEND=torch python benchmarks/eager_torch.py [--models mlp text_classifier] [--rounds 25]
        [--steps 30] [--threads 1]
"""

import argparse
import contextlib
import json
import os
import statistics
import time

import keras

from keras_unitscale import layers
from keras_unitscale.scale import scaling_disabled

import layers as layers_benchmark
import real_scripts
import timing


def _identity_function():
    import torch

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, upstream):
            return upstream

    return Identity


class PassThrough(keras.layers.Layer):
    """Returns a view of its input: natively, or (`custom_node=True`) through an autograd function of its own."""

    def __init__(self, custom_node, **kwargs):
        super().__init__(**kwargs)
        self._function = _identity_function() if custom_node else None

    def call(self, x):
        return x.view_as(x) if self._function is None else self._function.apply(x)


def mlp_forms():
    """The layers benchmark's MLP (seed 000's), its data, batch and losses, in each form, eager."""
    _, build, kind, batch, keras_loss, our_loss = next(
        case for case in layers_benchmark.CASES if case[1] is layers_benchmark.mlp)
    x, y = layers_benchmark._data(kind, batch * 8)

    def compiled(build, lib, loss):
        return layers_benchmark._compiled(build, lib, loss, x, y, batch, jit_compile="auto")

    def with_pass_through(custom_node):
        def build_with(lib):
            plain = build(lib)
            model = keras.Sequential([keras.Input(plain.input_shape[1:])])
            for layer in plain.layers:
                model.add(layer)
                model.add(PassThrough(custom_node))
            return model

        return compiled(build_with, keras.layers, keras_loss)

    ours = compiled(build, layers, our_loss)
    return (x[:batch], y[:batch]), {
        "keras": (compiled(build, keras.layers, keras_loss), False),
        "ours": (ours, False),
        "ours, scaling off": (ours, True),
        "keras + pass-through layers": (with_pass_through(custom_node=False), False),
        "keras + identity nodes": (with_pass_through(custom_node=True), False),
    }


def real_script_forms(name):
    """A real script's model as written and as `UnitScaleCallback` makes it (as `real_scripts.py` prepares each),
    trained a few steps on its own data."""
    spec = real_scripts.MODELS[name]
    batch = spec[-1]
    (x, y), _, info = spec[0](True)

    def trained(variant):
        model, callbacks = real_scripts.prepare(spec, info, variant, False, None, {"seed": 0}, "script")
        model.fit(x[: 4 * batch], y[: 4 * batch], batch_size=batch, epochs=1, verbose=0, callbacks=callbacks)
        return model

    ours = trained("callback")
    return (x[:batch], y[:batch]), {"keras": (trained("script"), False), "ours": (ours, False),
                                    "ours, scaling off": (ours, True)}


def _steps_time(model, scaling_off, x, y, steps):
    start = time.perf_counter()
    with scaling_disabled() if scaling_off else contextlib.nullcontext():
        for _ in range(steps):
            model.train_on_batch(x, y)
    return (time.perf_counter() - start) / steps


def time_forms(batch, forms, rounds, steps):
    (x, y), times = batch, {form: [] for form in forms}
    for form, (model, scaling_off) in forms.items():  # a first round each, untimed: lazy builds and caches
        _steps_time(model, scaling_off, x, y, 2)
    progress = keras.utils.Progbar(rounds, unit_name="round")
    for _ in range(rounds):
        for form, (model, scaling_off) in forms.items():
            times[form].append(_steps_time(model, scaling_off, x, y, steps))
        progress.add(1)
    keras_median = statistics.median(times["keras"])
    return {form: {"step_us": 1e6 * statistics.median(values),
                   "ratio_of_medians": statistics.median(values) / keras_median} for form, values in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "text_classifier"],
                        choices=["mlp", *real_scripts.MODELS])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--steps", type=int, default=30, help="training steps per form in each round")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch's intra-op threads")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    if keras.backend.backend() != "torch":
        parser.error(f"this benchmark is PyTorch's: run it with KERAS_BACKEND=torch. "
                     f"Received: KERAS_BACKEND={keras.backend.backend()}")
    import torch

    torch.set_num_threads(args.threads)
    results = {}
    for name in args.models:
        batch, forms = mlp_forms() if name == "mlp" else real_script_forms(name)
        results[name] = time_forms(batch, forms, args.rounds, args.steps)
    lines = [f"eager PyTorch {torch.__version__}, keras {keras.__version__}, {args.threads} thread(s), "
             f"{args.rounds} rounds of {args.steps} steps; median step time and its ratio to Keras's", ""]
    for name, forms in results.items():
        lines.append(f"{name:<30} {'step µs':>9} {'× keras':>8}")
        lines += [f"  {form:<28} {row['step_us']:>9.0f} {row['ratio_of_medians']:>8.3f}" for form, row in forms.items()]
        lines.append("")
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "eager_torch_cpu")
    with open(path + ".txt", "w") as f:
        f.write(text)
    with open(path + ".json", "w") as f:
        json.dump({**timing.environment(), "torch": torch.__version__, "threads": args.threads,
                   "rounds": args.rounds, "steps": args.steps, "results": results}, f, indent=2)
    print(f"wrote {path}.txt and {path}.json")


if __name__ == "__main__":
    main()
