"""`unit_scale(model)` in equivalent mode: how close the twin's predictions and training stay to the original's.

Three standard-parametrization models of `keras_unitscale.models` (Keras
layers, Keras defaults): seed 000's MLP on 30 features, a character LSTM LM
and a two-block pre-norm transformer LM. Each is converted, compared on one
batch of inputs, then trained `--steps` steps beside the original with Adam
at 1e-3 (Keras's Adam on the original, ours on the twin): at Keras's default
epsilon, then with `convert.match_epsilon` scaling it per weight, then at
1e-12 (where epsilon no longer matters). Reported: the largest absolute
prediction difference and the largest relative difference between the two
loss curves.

Usage:
    python benchmarks/convert.py [--steps 20] [--out benchmarks/results]
"""

import argparse
import json
import os

import keras
import numpy as np

from keras_unitscale import models
from keras_unitscale import optimizers
from keras_unitscale import unit_scale
from keras_unitscale.convert import match_epsilon

# (column, epsilon, match_epsilon)
RUNS = (("ε=1e-7", 1e-7, False), ("ε=1e-7, matched", 1e-7, True), ("ε=1e-12", 1e-12, False))


def _cases(rng):
    features = rng.normal(size=(64, 30)).astype("float32")
    tokens = rng.integers(0, 40, (32, 16))
    sparse = lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True)  # noqa: E731
    return {
        "seed 000 MLP": (lambda: models.mlp(30, parametrization="standard"), features,
                         (features[:, :1] + features[:, 1:2] > 0).astype("float32"), lambda: "binary_crossentropy"),
        "LSTM LM": (lambda: models.lstm_lm(40, width=48, seq_len=16, parametrization="standard"), tokens,
                    np.roll(tokens, -1, 1), sparse),
        "transformer LM": (lambda: models.transformer_lm(40, 32, 2, head_dim=8, seq_len=16,
                                                         parametrization="standard"), tokens, np.roll(tokens, -1, 1),
                           sparse),
    }


def _losses(model, x, y, steps):
    return np.array([model.train_on_batch(x, y) for _ in range(steps)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    results = []
    for name, (build, x, y, loss) in _cases(np.random.default_rng(0)).items():
        row = {"model": name}
        for column, epsilon, matched in RUNS:
            keras.utils.set_random_seed(0)
            original = build()
            twin = unit_scale(original)
            predicted = original.predict(x, verbose=0)
            row["max_abs_prediction_diff"] = float(np.max(np.abs(twin.predict(x, verbose=0) - predicted)))
            row["max_abs_prediction"] = float(np.max(np.abs(predicted)))
            original.compile(keras.optimizers.Adam(1e-3, epsilon=epsilon), loss())
            twin.compile(optimizers.Adam(1e-3, epsilon=epsilon), loss())
            if matched:
                match_epsilon(twin, original, x, y)
            theirs, ours = _losses(original, x, y, args.steps), _losses(twin, x, y, args.steps)
            row[f"max_rel_loss_diff, {column}"] = float(np.max(np.abs(ours - theirs) / np.abs(theirs)))
        results.append(row)
    lines = [f"unit_scale(model) equivalent mode, {keras.backend.backend()}, {args.steps} Adam steps at 1e-3",
             f"{'model':<16}{'max |Δ prediction|':>20}" + "".join(f"{'loss rel Δ, ' + c:>30}" for c, _, _ in RUNS)]
    for row in results:
        lines.append(f"{row['model']:<16}{row['max_abs_prediction_diff']:>20.2g}"
                     + "".join(f"{row['max_rel_loss_diff, ' + c]:>30.2g}" for c, _, _ in RUNS))
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"convert_{keras.backend.backend()}")
    with open(stem + ".json", "w") as f:
        json.dump({"steps": args.steps, "rows": results}, f, indent=1)
    with open(stem + ".txt", "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
