"""What UnitScaleCallback keeps and what it buys: trajectories, and seed 000 in float16 without loss scaling.

1. Same trajectory. A model of keras_unitscale layers with Keras's
   Glorot-initialised weights (far from unit scale), trained 30 steps in
   float32 with and without `UnitScaleCallback(mode="unit")`, for Adam, SGD
   with momentum, and AdamW with a warm-up cosine schedule (our optimizers):
   the largest relative difference between the two runs' per-step losses and
   between their effective weights (stored weight × multiplier) at the end.
2. Seed 000's plain Keras model (Dense 128 relu → Dense 64 relu → Dense 1
   sigmoid, "adam") on scikit-learn's breast-cancer data, 20 epochs, test
   accuracy and loss in float32 and under `mixed_float16` with
   `auto_scale_loss=False` (no loss scaling): without the callback, with it,
   and with the design we rejected for plain layers (every kernel at unit
   RMS, the learning rate × the geometric mean of the factors), over seeds.

Usage:
    python benchmarks/callback.py [--seeds 3] [--out benchmarks/results]
"""

import argparse
import json
import math
import os
import warnings

import keras
import numpy as np
from keras import ops

from keras_unitscale import experiments
from keras_unitscale import layers as L
from keras_unitscale import optimizers as O
from keras_unitscale.callbacks import UnitScaleCallback
from keras_unitscale.demo import load_breast_cancer

STEPS, BATCH = 30, 16


def _trajectory(make_optimizer, with_callback):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS * BATCH, 16)).astype("float32")
    y = np.tanh(x[:, :1] * x[:, 1:2] + x[:, 2:3]).astype("float32")
    keras.utils.set_random_seed(3)
    model = keras.Sequential([
        keras.Input((16,)),
        L.Dense(64, activation="relu", kernel_initializer="glorot_uniform", role="input"),
        L.LayerNormalization(),
        L.Dense(32, activation="gelu", kernel_initializer="glorot_uniform"),
        L.Dense(1, role="output", kernel_initializer="glorot_uniform"),
    ])
    model.compile(make_optimizer(), "mse")
    recorder = experiments.StepLosses()
    callbacks = [recorder] + ([UnitScaleCallback(verbose=0)] if with_callback else [])
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    weights = [
        ops.convert_to_numpy(v).astype("float64") * layer.weight_multiplier(v.name)
        for layer in model.layers for v in layer.trainable_variables
    ]
    return recorder.losses(), weights


OPTIMIZERS = {
    "Adam(0.1)": lambda: O.Adam(0.1),
    "SGD(0.3, momentum=0.9)": lambda: O.SGD(0.3, momentum=0.9),
    "AdamW(cosine 0.03→0.1→0, weight_decay=1e-3)": lambda: O.AdamW(
        keras.optimizers.schedules.CosineDecay(0.03, STEPS, warmup_steps=5, warmup_target=0.1), weight_decay=1e-3
    ),
}


def same_trajectory():
    results = {}
    for name, make in OPTIMIZERS.items():
        plain_losses, plain_weights = _trajectory(make, False)
        losses, weights = _trajectory(make, True)
        results[name] = {
            "max_rel_loss_diff": float(np.max(np.abs(losses - plain_losses) / np.abs(plain_losses))),
            "max_rel_weight_diff": float(max(np.max(np.abs(w - p)) / np.max(np.abs(p)) for w, p in zip(weights, plain_weights))),
            "first_loss": float(plain_losses[0]),
            "last_loss": float(plain_losses[-1]),
        }
    return results


class _UnitRmsKernels(keras.callbacks.Callback):
    """The rejected design: every plain kernel at unit RMS, learning rate × geometric mean of the factors."""

    def on_train_begin(self, logs=None):
        factors = []
        for variable in self.model.trainable_variables:
            if variable.path.endswith("kernel"):
                value = ops.convert_to_numpy(variable)
                factor = 1.0 / float(np.sqrt(np.mean(value.astype("float64") ** 2)))
                variable.assign(value * factor)
                factors.append(factor)
        lr = float(ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.model.optimizer.learning_rate = lr * math.exp(np.mean(np.log(factors)))


VARIANTS = {
    "no callback": lambda: [],
    "UnitScaleCallback()": lambda: [UnitScaleCallback(verbose=0)],
    "unit-RMS plain kernels (rejected)": lambda: [_UnitRmsKernels()],
}


def seed_000(seeds):
    x, y = load_breast_cancer()
    results = {}
    for variant, callbacks in VARIANTS.items():
        for policy in ("float32", "mixed_float16"):
            runs = []
            for seed in range(seeds):
                order = np.random.default_rng(seed).permutation(len(x))
                train, test = order[:455], order[455:]
                keras.config.set_dtype_policy(policy)
                keras.utils.set_random_seed(seed)
                model = keras.Sequential([
                    keras.Input((30,)),
                    keras.layers.Dense(128, activation="relu"),
                    keras.layers.Dense(64, activation="relu"),
                    keras.layers.Dense(1, activation="sigmoid"),
                ])
                model.compile("adam", "binary_crossentropy", metrics=["accuracy"], auto_scale_loss=False)
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        model.fit(x[train], y[train], epochs=20, batch_size=32, verbose=0, callbacks=callbacks())
                    loss, accuracy = model.evaluate(x[test], y[test], verbose=0)
                    runs.append({"seed": seed, "loss": float(loss), "accuracy": float(accuracy)})
                except (RuntimeError, ValueError) as error:  # PyTorch refuses NaN probabilities
                    runs.append({"seed": seed, "loss": math.nan, "accuracy": math.nan, "error": str(error)})
                finally:
                    keras.config.set_dtype_policy("float32")
            results[f"{variant} / {policy}"] = runs
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    backend = keras.backend.backend()
    record = {"backend": backend, "same_trajectory": same_trajectory(), "seed_000": seed_000(args.seeds)}
    lines = [f"UnitScaleCallback checks, {backend} backend", "", "1. Same trajectory, 30 steps, float32",
             f"{'optimizer':<46}{'loss rel. diff':>16}{'weight rel. diff':>18}{'loss first→last':>20}"]
    for name, r in record["same_trajectory"].items():
        lines.append(f"{name:<46}{r['max_rel_loss_diff']:>16.2e}{r['max_rel_weight_diff']:>18.2e}"
                     f"{r['first_loss']:>11.3f} → {r['last_loss']:.3f}")
    lines += ["", f"2. Seed 000 on breast cancer, 20 epochs, test set (114), {args.seeds} seeds",
              f"{'run':<52}{'accuracy per seed':>26}{'mean loss':>11}"]
    for name, runs in record["seed_000"].items():
        accuracies = " ".join("failed" if "error" in r else f"{r['accuracy']:.4f}" for r in runs)
        lines.append(f"{name:<52}{accuracies:>26}{np.mean([r['loss'] for r in runs]):>11.4f}")
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"callback_{backend}")
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1)
    with open(stem + ".txt", "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
