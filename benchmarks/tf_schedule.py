"""TensorFlow's CPU step time and one more variable: what the graph's schedule costs, apart from the work.

A Keras training step on TensorFlow (CPU, `jit_compile` off, Keras's default
there) is one `tf.function`, run by TensorFlow's executor on its inter-op
threads. Which ops overlap is the executor's choice, made from the graph; on
the two-core machine our figures come from, a graph that captures one more
variable can lose the overlap of its recurrent loop's ops. Our optimizers read
their learning-rate and epsilon multipliers each step (a vector variable
each): more captured variables than Keras's. This separates that from their
work by timing a real script's model (`real_scripts.py`) in four forms:

- `script`: as written, with the script's Keras optimizer;
- `script + one variable`: the same, its optimizer a subclass that reads one
  more scalar variable each step (1.0) and multiplies the learning rate by it:
  the same numbers, one more variable captured, one more multiplication;
- `script, our optimizer`: the script's Keras layers, its optimizer made ours
  by `convert.from_keras(..., parametrization=None)`: every multiplier 1, the
  same numbers up to rounding, our multipliers read and applied;
- `callback`: `UnitScaleCallback()` in `fit`, as `real_scripts.py` runs it.

Each form trains `--steps` steps from the same weights on the same batches
(its final loss is reported: the first two forms' agree exactly); then all are
timed in interleaved rounds (`real_scripts.interleaved_step_times`, each round
in its own shuffled order). `--inter-op-threads 1` runs the same with one
inter-op thread: no schedule to lose, every form slower.

Usage:
    python benchmarks/tf_schedule.py [--models char_lstm] [--steps 40] [--rounds 15] [--inter-op-threads 0]
        [--quick] [--out benchmarks/results]
"""

import argparse
import json
import os
import time

import keras
from keras import ops

from keras_unitscale import convert

import real_scripts
import timing

FORMS = ("script", "script + one variable", "script, our optimizer", "callback")


def with_one_more_variable(optimizer):
    """A copy of Keras's `optimizer` whose every step reads one more scalar variable, 1.0, into its learning rate."""

    class OneMoreVariable(type(optimizer)):
        def build(self, variables):
            if self.built:
                return
            super().build(variables)
            self._one = self.add_variable(shape=(), initializer="ones", dtype="float32", name="one")

        def _backend_update_step(self, grads, trainable_variables, learning_rate):
            # Times 1.0: the update's numbers are the script's; the graph has one more captured variable.
            super()._backend_update_step(grads, trainable_variables, ops.multiply(learning_rate, self._one))

    OneMoreVariable.__name__ = f"{type(optimizer).__name__}OneMoreVariable"
    return OneMoreVariable.from_config(optimizer.get_config())


def trained_forms(name, quick, steps):
    """`{(form, "float32"): (model, False)}` in `interleaved_step_times`'s layout, each trained `steps` steps, and
    each form's final training loss (the mean of its last quarter of steps)."""
    spec = real_scripts.MODELS[name]
    load, build, make_optimizer, make_loss, batch = spec
    train, _, info = load(quick)
    x, y = real_scripts.training_batches(train, steps, batch)

    def compiled(optimizer):
        keras.utils.set_random_seed(0)
        model = build(info)
        model.compile(optimizer, make_loss(), auto_scale_loss=False)
        return model, []

    made = {
        "script": compiled(make_optimizer()),
        "script + one variable": compiled(with_one_more_variable(make_optimizer())),
        "script, our optimizer": compiled(convert.from_keras(make_optimizer(), parametrization=None)),
        "callback": real_scripts.prepare(spec, info, "callback", False, None, {"seed": 0}, "script"),
    }
    kept, final_losses = {}, {}
    for form, (model, callbacks) in made.items():
        recorder = real_scripts.StepRecorder()
        keras.utils.set_random_seed(0)
        model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=[recorder, *callbacks])
        losses = recorder.losses()
        final_losses[form] = float(losses[-max(1, len(losses) // 4):].mean())
        kept[form, "float32"] = (model, False)
    return kept, final_losses, ((x, y), None, info), batch


def measure(name, quick, steps, rounds):
    kept, final_losses, data, batch = trained_forms(name, quick, steps)
    timed = real_scripts.interleaved_step_times(kept, data, batch, rounds, min(steps, real_scripts.TIMING_STEPS))
    return {form: {"final_train_loss": final_losses[form], "step_ms": timed[form, "float32"][0],
                   "ratio_to_script": timed[form, "float32"][1]} for form in FORMS}


def table(results, args):
    threads = args.inter_op_threads or "TensorFlow's default"
    lines = [f"tf_schedule: TensorFlow {_tf_version()}, keras {keras.__version__}, {os.cpu_count()} cores, "
             f"inter-op threads: {threads}; {args.steps} training steps per form, then {args.rounds} interleaved "
             "rounds (`real_scripts.interleaved_step_times`): the median step time, and the median of the rounds' "
             "ratios to the script's", ""]
    for name, forms in results.items():
        lines += [f"### {name}", "", "| form | final train loss | step ms | step ratio vs script |", "|---|---|---|---|"]
        lines += [f"| {form} | {row['final_train_loss']:.6f} | {row['step_ms']:.2f} | {row['ratio_to_script']:.3f} |"
                  for form, row in forms.items()]
        lines.append("")
    return "\n".join(lines)


def _tf_version():
    import tensorflow as tf

    return tf.__version__


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["char_lstm"], choices=list(real_scripts.MODELS))
    parser.add_argument("--steps", type=int, default=40, help="training steps per form before the timing")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    parser.add_argument("--inter-op-threads", type=int, default=0,
                        help="TensorFlow's inter-op threads; 0: its default (one per core)")
    parser.add_argument("--quick", action="store_true", help="the models' quick data: a smoke run")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    if keras.backend.backend() != "tensorflow":
        parser.error("this benchmark is TensorFlow's: run it with KERAS_BACKEND=tensorflow. "
                     f"Received: KERAS_BACKEND={keras.backend.backend()}")
    if args.steps < 2 or args.rounds < 1 or args.inter_op_threads < 0:
        parser.error("--steps must be at least 2, --rounds at least 1 and --inter-op-threads at least 0. "
                     f"Received: --steps {args.steps} --rounds {args.rounds} "
                     f"--inter-op-threads {args.inter_op_threads}")
    if args.inter_op_threads:
        import tensorflow as tf

        tf.config.threading.set_inter_op_parallelism_threads(args.inter_op_threads)
    started = time.perf_counter()
    results = {name: measure(name, args.quick, args.steps, args.rounds) for name in args.models}
    text = table(results, args)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    suffix = f"_inter_op_{args.inter_op_threads}" if args.inter_op_threads else ""
    stem = os.path.join(args.out, f"tf_schedule{suffix}_tensorflow_cpu")
    with open(stem + ".txt", "w") as f:
        f.write(text)
    with open(stem + ".json", "w") as f:
        json.dump({**timing.environment(), "tensorflow": _tf_version(), "args": vars(args),
                   "seconds": time.perf_counter() - started, "results": results}, f, indent=1)
    print(f"wrote {stem}.txt and {stem}.json")


if __name__ == "__main__":
    main()
