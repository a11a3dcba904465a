"""Five Keras example scripts as written, and their unit-scaled versions: training loss, held-out loss, step time.

The models are written as the official Keras examples write them, custom
layers included, and trained on data that ships with installed packages:

- `convnet`: "Simple MNIST convnet" on scikit-learn's 8x8 digits (Adam);
- `char_lstm`: "Character-level text generation with LSTM" (an Embedding in
  place of the one-hot input) on the help topics of `pydoc_data` (RMSprop 0.01);
- `text_classifier`: "Text classification with Transformer", its
  `TokenAndPositionEmbedding` and `TransformerBlock` layers, on 32-word chunks
  of the pydoc topics labelled by which half of the (sorted) topics they come
  from (Adam);
- `timeseries`: "Timeseries classification from scratch" on the digits read
  as length-64 signals (Adam);
- `mini_gpt`: "Text generation with a miniature GPT", a causal
  `TransformerBlock`, on 64-character windows of the pydoc topics (Adam).

Each model is trained in four variants from the same initial weights on the
same batches (`shuffle=False`): `script` (compiled as the example compiles
it), `callback` (the same, with `UnitScaleCallback()` in `fit`),
`equivalent` (`unit_scale(model)` compiled with `convert.from_keras` of the
script's optimizer, and the script's loss (`--twin-loss ours`: made ours by
`convert.from_keras` too), after `convert.match_epsilon`; it should follow
the script's trajectory) and `reinit` (`unit_scale(model, mode="reinit")`, u-μP's
initialisation and learning rates: not expected to match). Each in float32,
in `mixed_float16` without loss scaling (`auto_scale_loss=False`), and in
simulated scale-free FP8: `precision.simulate_fp8` for the plain script
(every Keras matmul cast, inside custom layers too), `precision.fp8()` for
the unit-scaled twins and for the callback's run (the script's model, whose
layers the callback turns into ours: those it keeps as Keras's stay in
float32, and the census says how many).

Per run: the final training loss (mean of the last 10% of per-step losses),
the loss on held-out data, whether anything was NaN/inf, the step time with
its ratio to the script's float32 run of the same model (that run is always
made), and the leaf layers with weights that are `keras_unitscale` classes
against those left as Keras's. A run that fails keeps its error text in its
row. The step times are taken after training, the trained models timed in
turn over `--timing-repeats` rounds of `TIMING_STEPS` steps each, each
round in a shuffled order (`interleaved_step_times`), so that a shared
machine's drift hits all alike; the median step time while training is kept
in the JSON (and reported with `--timing-repeats 0`).

With `--seeds N` every run is made from N seeds (initial weights and dropout
masks; the batches stay the same). These small models' training is chaotic:
a rounding difference at the first step (FP16, FP8, or a conversion's
multiplier) leads to a different late trajectory, and the final loss of one
seed moves by several percent (the text classifier's float32 script alone
ranges over 0.311 to 0.350 across seeds 0 to 4). The table then gives each
Δ as the mean and standard deviation of the seeds' Δ, each against the
script's float32 run of the same seed.

Usage:
    python benchmarks/real_scripts.py [--models convnet char_lstm text_classifier timeseries mini_gpt]
        [--precisions float32 fp16 fp8] [--variants script callback equivalent reinit]
        [--steps 200] [--seeds 1] [--timing-repeats 5] [--twin-loss script] [--quick] [--out benchmarks/results]
"""

import argparse
import collections
import json
import math
import os
import platform
import random
import re
import statistics
import time
import warnings

import keras
import numpy as np
from keras import layers
from keras import ops

import keras_unitscale
from keras_unitscale import convert
from keras_unitscale import experiments
from keras_unitscale import precision
from keras_unitscale.callbacks import UnitScaleCallback

import timing

# The data's shuffle, the same for every run; `--seeds` vary the initial weights and the dropout masks.
DATA_SEED = 0
VARIANTS = ("script", "callback", "equivalent", "reinit")
PRECISIONS = ("float32", "fp16", "fp8")
REFERENCE = ("script", "float32")
FULL_STEPS, QUICK_STEPS = 200, 12
# Steps left out of the step time: the first ones trace and compile.
WARMUP_STEPS = 5
# Steps per model in each round of `interleaved_step_times`.
TIMING_STEPS = 20


# ---------------------------------------------------------------- the examples' custom layers, as they write them


class TransformerBlock(layers.Layer):
    """From "Text classification with Transformer"."""

    def __init__(self, embed_dim, num_heads, ff_dim, rate=0.1):
        super().__init__()
        self.att = layers.MultiHeadAttention(num_heads=num_heads, key_dim=embed_dim)
        self.ffn = keras.Sequential([layers.Dense(ff_dim, activation="relu"), layers.Dense(embed_dim)])
        self.layernorm1 = layers.LayerNormalization(epsilon=1e-6)
        self.layernorm2 = layers.LayerNormalization(epsilon=1e-6)
        self.dropout1 = layers.Dropout(rate)
        self.dropout2 = layers.Dropout(rate)

    def call(self, inputs):
        attn_output = self.att(inputs, inputs)
        attn_output = self.dropout1(attn_output)
        out1 = self.layernorm1(inputs + attn_output)
        ffn_output = self.ffn(out1)
        ffn_output = self.dropout2(ffn_output)
        return self.layernorm2(out1 + ffn_output)


class CausalTransformerBlock(layers.Layer):
    """The `TransformerBlock` of "Text generation with a miniature GPT"."""

    def __init__(self, embed_dim, num_heads, ff_dim, rate=0.1):
        super().__init__()
        self.att = layers.MultiHeadAttention(num_heads, embed_dim)
        self.ffn = keras.Sequential([layers.Dense(ff_dim, activation="relu"), layers.Dense(embed_dim)])
        self.layernorm1 = layers.LayerNormalization(epsilon=1e-6)
        self.layernorm2 = layers.LayerNormalization(epsilon=1e-6)
        self.dropout1 = layers.Dropout(rate)
        self.dropout2 = layers.Dropout(rate)

    def call(self, inputs):
        attention_output = self.att(inputs, inputs, use_causal_mask=True)
        attention_output = self.dropout1(attention_output)
        out1 = self.layernorm1(inputs + attention_output)
        ffn_output = self.ffn(out1)
        ffn_output = self.dropout2(ffn_output)
        return self.layernorm2(out1 + ffn_output)


class TokenAndPositionEmbedding(layers.Layer):
    """The same in both transformer examples."""

    def __init__(self, maxlen, vocab_size, embed_dim):
        super().__init__()
        self.token_emb = layers.Embedding(input_dim=vocab_size, output_dim=embed_dim)
        self.pos_emb = layers.Embedding(input_dim=maxlen, output_dim=embed_dim)

    def call(self, x):
        maxlen = ops.shape(x)[-1]
        positions = ops.arange(start=0, stop=maxlen, step=1)
        positions = self.pos_emb(positions)
        x = self.token_emb(x)
        return x + positions


# ---------------------------------------------------------------- the models


def build_convnet(info):
    return keras.Sequential([
        keras.Input(shape=(8, 8, 1)),
        layers.Conv2D(32, kernel_size=(3, 3), activation="relu", padding="same"),  # "same": 8x8 images
        layers.MaxPooling2D(pool_size=(2, 2)),
        layers.Conv2D(64, kernel_size=(3, 3), activation="relu", padding="same"),
        layers.MaxPooling2D(pool_size=(2, 2)),
        layers.Flatten(),
        layers.Dropout(0.5),
        layers.Dense(info["classes"], activation="softmax"),
    ])


def build_char_lstm(info):
    return keras.Sequential([
        keras.Input(shape=(info["maxlen"],), dtype="int32"),
        layers.Embedding(info["vocab_size"], 32),
        layers.LSTM(128),
        layers.Dense(info["vocab_size"], activation="softmax"),
    ])


def build_text_classifier(info):
    embed_dim, num_heads, ff_dim = 32, 2, 32  # the example's sizes
    inputs = layers.Input(shape=(info["maxlen"],))
    x = TokenAndPositionEmbedding(info["maxlen"], info["vocab_size"], embed_dim)(inputs)
    x = TransformerBlock(embed_dim, num_heads, ff_dim)(x)
    x = layers.GlobalAveragePooling1D()(x)
    x = layers.Dropout(0.1)(x)
    x = layers.Dense(20, activation="relu")(x)
    x = layers.Dropout(0.1)(x)
    outputs = layers.Dense(2, activation="softmax")(x)
    return keras.Model(inputs=inputs, outputs=outputs)


def build_timeseries(info):
    input_layer = keras.layers.Input((info["length"], 1))
    x = input_layer
    for _ in range(3):
        x = keras.layers.Conv1D(filters=64, kernel_size=3, padding="same")(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
    gap = keras.layers.GlobalAveragePooling1D()(x)
    output_layer = keras.layers.Dense(info["classes"], activation="softmax")(gap)
    return keras.models.Model(inputs=input_layer, outputs=output_layer)


def build_mini_gpt(info):
    embed_dim, num_heads, feed_forward_dim = 64, 2, 64
    inputs = layers.Input(shape=(info["maxlen"],), dtype="int32")
    x = TokenAndPositionEmbedding(info["maxlen"], info["vocab_size"], embed_dim)(inputs)
    x = CausalTransformerBlock(embed_dim, num_heads, feed_forward_dim)(x)
    outputs = layers.Dense(info["vocab_size"])(x)
    return keras.Model(inputs=inputs, outputs=outputs)


# ---------------------------------------------------------------- data that ships with installed packages


def _split(x, y, held_out):
    """A fixed shuffle (so that unshuffled batches mix classes), then the last `held_out` examples held out."""
    order = np.random.default_rng(DATA_SEED).permutation(len(x))
    x, y = x[order], y[order]
    return (x[:-held_out], y[:-held_out]), (x[-held_out:], y[-held_out:])


def _digits(quick):
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype("float32"), digits.target.astype("int32"), 64 if quick else 297


def digits_images(quick):
    images, labels, held_out = _digits(quick)
    return (*_split(images[..., None], labels, held_out), {"classes": 10})


def digits_signals(quick):
    images, labels, held_out = _digits(quick)
    return (*_split(images.reshape(len(images), 64, 1), labels, held_out), {"classes": 10, "length": 64})


def _pydoc_topics():
    from pydoc_data.topics import topics

    return [(key, topics[key].lower()) for key in sorted(topics)]


def _char_ids(quick):
    """The lowercased topics, at most 300 KB (60 KB in quick mode), as ids, and the vocabulary size."""
    text = "\n".join(value for _, value in _pydoc_topics())[: 60_000 if quick else 300_000]
    index = {char: i for i, char in enumerate(sorted(set(text)))}
    return np.array([index[char] for char in text], "int32"), len(index)


def char_next(quick, maxlen=40):
    """Windows of `maxlen` characters (every 3rd start, as the example) and the character after each."""
    ids, vocab_size = _char_ids(quick)
    starts = np.arange(0, len(ids) - maxlen, 3)
    x, y = ids[starts[:, None] + np.arange(maxlen)], ids[starts + maxlen]
    return (*_split(x, y, 64 if quick else 512), {"maxlen": maxlen, "vocab_size": vocab_size})


def char_sequences(quick, maxlen=64):
    """Windows of `maxlen` characters (every 16th start) and the same shifted by one."""
    ids, vocab_size = _char_ids(quick)
    starts = np.arange(0, len(ids) - maxlen - 1, 16)
    x = ids[starts[:, None] + np.arange(maxlen)]
    return (*_split(x, ids[starts[:, None] + np.arange(1, maxlen + 1)], 64 if quick else 512),
            {"maxlen": maxlen, "vocab_size": vocab_size})


def topic_chunks(quick, maxlen=32, vocab_size=2000):
    """Consecutive `maxlen`-word chunks of each topic; label 1 for the topics after the half-way chunk (sorted keys)."""
    topics = _pydoc_topics()
    words = [re.findall(r"[a-z]+", text) for _, text in topics]
    chunks = [(i, w[start:start + maxlen]) for i, w in enumerate(words) for start in range(0, len(w), maxlen)]
    half_way_topic = chunks[len(chunks) // 2][0]
    # Ids 0 and 1 are padding and out-of-vocabulary, as in Keras's datasets.
    common = collections.Counter(word for w in words for word in w).most_common(vocab_size - 2)
    index = {word: i + 2 for i, (word, _) in enumerate(common)}
    x = np.zeros((len(chunks), maxlen), "int32")
    for row, (_, chunk) in enumerate(chunks):
        x[row, : len(chunk)] = [index.get(word, 1) for word in chunk]
    y = np.array([topic >= half_way_topic for topic, _ in chunks], "int32")
    if quick:
        x, y = x[::4], y[::4]
    return (*_split(x, y, 64 if quick else 256), {"maxlen": maxlen, "vocab_size": vocab_size})


# name: (data, build, the script's optimizer, the script's loss, batch size)
MODELS = {
    "convnet": (digits_images, build_convnet, lambda: keras.optimizers.Adam(),
                lambda: "sparse_categorical_crossentropy", 32),
    "char_lstm": (char_next, build_char_lstm, lambda: keras.optimizers.RMSprop(learning_rate=0.01),
                  lambda: "sparse_categorical_crossentropy", 64),
    "text_classifier": (topic_chunks, build_text_classifier, lambda: keras.optimizers.Adam(),
                        lambda: "sparse_categorical_crossentropy", 32),
    # Batch 16, not the example's 32: TensorFlow's float16 convolutions on a CPU take ~100x float32's time,
    # and this model's FP16 runs would otherwise take most of the benchmark's time.
    "timeseries": (digits_signals, build_timeseries, lambda: keras.optimizers.Adam(),
                   lambda: "sparse_categorical_crossentropy", 16),
    "mini_gpt": (char_sequences, build_mini_gpt, lambda: keras.optimizers.Adam(),
                 lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True), 32),
}


def training_batches(train, steps, batch):
    """Exactly `steps` batches: the training examples in order, repeated as often as it takes."""
    x, y = train
    order = np.arange(steps * batch) % len(x)
    return x[order], y[order]


# ---------------------------------------------------------------- one run


class StepRecorder(experiments.StepLosses):
    """Each step's own loss (`experiments.StepLosses`) and its wall time."""

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.seconds = []

    def on_train_batch_begin(self, batch, logs=None):
        self._started = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        self.seconds.append(time.perf_counter() - self._started)


def layer_census(model):
    """Leaf layers with weights, walking into custom layers: unit-scaled, simulated-FP8 and Keras's own.

    `simulate_fp8`'s casting classes live in `keras_unitscale.precision` but
    are Keras's layers with casts, not unit-scaled ones: counted apart.
    """
    leaves = [layer for layer in model._flatten_layers(include_self=False)
              if layer.weights and not list(layer._flatten_layers(include_self=False))]
    modules = [type(layer).__module__ for layer in leaves]
    simulated = sum(module == precision.__name__ for module in modules)
    ours = sum(module.startswith("keras_unitscale") for module in modules) - simulated
    kept = [f"{layer.name} ({type(layer).__name__})" for layer, module in zip(leaves, modules)
            if module.split(".")[0] == "keras"]
    return {"ours": ours, "fp8_simulated": simulated, "keras": len(kept), "leaves": len(leaves),
            "keras_layers": kept, "classes": [f"{type(layer).__module__}.{type(layer).__name__}" for layer in leaves]}


def prepare(spec, info, variant, fp8, first_batch, row, twin_loss):
    """The run's compiled model and its extra callbacks, built from the row's seed (so every variant starts alike)."""
    _, build, make_optimizer, make_loss, _ = spec
    keras.utils.set_random_seed(row["seed"])
    script = build(info)
    if variant in ("script", "callback"):
        model = precision.simulate_fp8(script) if fp8 and variant == "script" else script
        model.compile(make_optimizer(), make_loss(), auto_scale_loss=False)
        return model, [UnitScaleCallback(verbose=0)] if variant == "callback" else []
    twin = keras_unitscale.unit_scale(script, mode="reinit" if variant == "reinit" else "equivalent")
    # The script's optimizer made ours; its loss as written, or (`--twin-loss ours`) made ours too: the same value,
    # its gradient unit-scaled (a Keras loss per token divides it by batch × length, below E5M2's range).
    loss = convert.from_keras(make_loss()) if twin_loss == "ours" else make_loss()
    twin.compile(convert.from_keras(make_optimizer()), loss, auto_scale_loss=False)
    if variant == "equivalent":
        # Inference mode: no dropout, so any difference is the conversion's (or FP16/FP8 rounding's).
        row["initial_output_max_diff"] = float(np.max(np.abs(
            ops.convert_to_numpy(twin(first_batch[0], training=False)).astype("float64")
            - ops.convert_to_numpy(script(first_batch[0], training=False)).astype("float64"))))
        script.compile(make_optimizer(), make_loss(), auto_scale_loss=False)
        ratios = convert.match_epsilon(twin, script, *first_batch)
        row["epsilon_ratio_range"] = [min(ratios.values()), max(ratios.values())] if ratios else None
    row["conversion_notes"] = [f"{layer}: {why}" for layer, why in getattr(twin, "unit_scale_notes", [])]
    return twin, []


def train_and_measure(spec, data, variant, precision_name, row, twin_loss):
    (x, y), held_out, info = data
    batch = spec[4]
    twin_fp8 = precision_name == "fp8" and variant != "script"
    with precision.fp8(enabled=twin_fp8):
        model, callbacks = prepare(spec, info, variant, precision_name == "fp8", (x[:batch], y[:batch]), row,
                                   twin_loss)
        recorder = StepRecorder()
        keras.utils.set_random_seed(row["seed"])  # the same dropout masks wherever the layers draw them alike
        model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=[recorder, *callbacks])
        held_out_loss = model.evaluate(*held_out, batch_size=batch, verbose=0)
    held_out_loss = float(held_out_loss[0] if isinstance(held_out_loss, list) else held_out_loss)
    losses = recorder.losses()
    warmup = min(WARMUP_STEPS, len(losses) // 4)
    row.update({
        "final_train_loss": float(np.mean(losses[-max(1, len(losses) // 10):])),
        "held_out_loss": held_out_loss,
        "nonfinite": bool(not np.all(np.isfinite(losses)) or not math.isfinite(held_out_loss)),
        "step_ms": 1e3 * statistics.median(recorder.seconds[warmup:]),
        "step_losses": losses.tolist(),
        "layers": layer_census(model),
    })
    return model, twin_fp8


def run(name, data, variant, precision_name, twin_loss="script", seed=0, kept=None):
    """One row; a failure keeps its error text (type and message) in the row. With `kept` (a dict), the trained
    model and whether it computes in FP8 are kept there under (variant, precision), for `interleaved_step_times`."""
    row = {"model": name, "variant": variant, "precision": precision_name, "seed": seed}
    keras.config.set_dtype_policy("mixed_float16" if precision_name == "fp16" else "float32")
    timing.fresh_compiler_cache()
    started = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trained = train_and_measure(MODELS[name], data, variant, precision_name, row, twin_loss)
            if kept is not None:
                kept[variant, precision_name] = trained
        row["warnings"] = list(dict.fromkeys(str(w.message) for w in caught))
    except Exception as error:  # the row must say what failed, and the benchmark go on
        row["error"] = f"{type(error).__name__}: {error}"
    finally:
        keras.config.set_dtype_policy("float32")
    row["seconds"] = time.perf_counter() - started
    return row


def interleaved_step_times(kept, data, batch, repeats, steps):
    """Step times of trained models, timed in rounds: each round times every model for `steps` steps, in turn, in
    an order of its own (shuffled from seed 0: no model always follows the same one).

    Each round's time of a model is the median of its steps' own times.
    A step time measured while a model trains comes from its own stretch of
    the run, and a shared machine's speed drifts between stretches by more
    than the differences measured here. Rounds spread each model over the
    whole phase, and each round's ratio compares times taken moments apart.

    Returns:
        {(variant, precision): (median step ms, median of the rounds' ratios to the script's float32 run)}.
    """
    (x, y), _, _ = data
    x, y = x[: steps * batch], y[: steps * batch]
    times, order, shuffler = collections.defaultdict(list), list(kept.items()), random.Random(0)
    for _ in range(repeats + 1):  # the first round traces what `fit` has not yet: left out
        shuffler.shuffle(order)
        for key, (model, fp8) in order:
            recorder = StepRecorder()
            with precision.fp8(enabled=fp8):
                model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=[recorder])
            # Each step's own time (not `fit`'s setup); the round's first step starts its data iterator.
            times[key].append(statistics.median(recorder.seconds[1:]))
    reference = times[REFERENCE][1:]
    return {key: (1e3 * statistics.median(values[1:]),
                  statistics.median(t / r for t, r in zip(values[1:], reference)))
            for key, values in times.items()}


# ---------------------------------------------------------------- report


def _cell(value, spec):
    return "—" if value is None else format(value, spec)


def _mean_and_spread(values, spec):
    """`mean`, or `mean ± standard deviation` over seeds; "—" for none."""
    if not values:
        return "—"
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.mean(values), spec)} ± {statistics.stdev(values):.2f}"


def _table_row(runs, references):
    """One (variant, precision) over its seeds; each seed compared with the script's float32 run of the same seed."""
    first = runs[0]
    if any("error" in row for row in runs):
        return f"| {first['variant']} | {first['precision']} | failed (below) | | | | | | |"
    deltas, ratios = [], []
    for row in runs:
        reference = references.get(row["seed"])
        if reference is not None:
            deltas.append(100 * (row["final_train_loss"] / reference["final_train_loss"] - 1))
            ratios.append(row["step_ms"] / reference["step_ms"])
    step_ms = statistics.median(r["step_ms"] for r in runs)
    if "interleaved_step_ms" in first:
        step_ms, ratios = first["interleaved_step_ms"], [first["interleaved_step_ratio"]]
    census = first["layers"]
    simulated = f" (+{census['fp8_simulated']} fp8-sim)" if census["fp8_simulated"] else ""
    return (f"| {first['variant']} | {first['precision']} "
            f"| {statistics.mean(r['final_train_loss'] for r in runs):.4f} "
            f"| {statistics.mean(r['held_out_loss'] for r in runs):.4f} | {_mean_and_spread(deltas, '+.2f')} "
            f"| {'yes' if any(r['nonfinite'] for r in runs) else 'no'} "
            f"| {step_ms:.1f} "
            f"| {_cell(statistics.median(ratios) if ratios else None, '.2f')} | {census['ours']}/{census['leaves']}{simulated} |")


def _block_notes(group):
    notes = []
    for row in group:
        label = f"{row['variant']} {row['precision']}" + (f" (seed {row['seed']})" if row["seed"] else "")
        if "error" in row:
            notes.append(f"- error, {label}: {row['error'].splitlines()[0][:400]}")
            continue
        if "initial_output_max_diff" in row:
            notes.append(f"- {label}: outputs before training differ from the script's by at most "
                         f"{row['initial_output_max_diff']:.2e} (inference mode)")
        if row["variant"] in ("equivalent", "reinit") and row["layers"]["keras_layers"]:
            notes.append(f"- Keras layers with weights left in {label}: {', '.join(row['layers']['keras_layers'])}")
    return notes


def table(rows, steps_by_model):
    seeds = sorted({row["seed"] for row in rows})
    lines = ["layers converted: leaf layers with weights (custom layers walked into) that are unit-scaled "
             "keras_unitscale classes / all of them; fp8-sim: simulate_fp8's casting Keras layers"]
    if len(seeds) > 1:
        lines.append(f"over seeds {seeds} (initial weights and dropout masks; the same batches): losses are means; "
                     "Δ is the mean ± standard deviation of each seed's Δ against the script's float32 run of that "
                     "seed; step times are medians")
    if any("interleaved_step_ms" in row for row in rows):
        lines.append("step ms and ratio: timed after training in interleaved rounds (`interleaved_step_times`, seed 0), "
                     "each ratio the median of the rounds' ratios to the script's float32 run; the step times "
                     "measured while training are in the JSON")
    lines.append("")
    for name in dict.fromkeys(row["model"] for row in rows):
        group = [row for row in rows if row["model"] == name]
        references = {r["seed"]: r for r in group if (r["variant"], r["precision"]) == REFERENCE and "error" not in r}
        cells = collections.defaultdict(list)
        for row in group:
            cells[row["variant"], row["precision"]].append(row)
        lines += [f"### {name} ({steps_by_model[name]} steps, batch {MODELS[name][4]})", "",
                  "| variant | precision | final train loss | held-out loss | Δ vs script float32 (%) | NaN? "
                  "| step ms | step ratio vs script float32 | layers converted |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [_table_row(runs, references) for runs in cells.values()]
        if len(references) > 1:
            finals = [r["final_train_loss"] for r in references.values()]
            lines += ["", f"- the script's float32 final loss from seed to seed: {min(finals):.4f} to {max(finals):.4f} "
                          f"(standard deviation {100 * statistics.stdev(finals) / statistics.mean(finals):.2f}% of "
                          "its mean): how far the seeds alone move it"]
        lines += [""] + _block_notes(group) + [""]
    return "\n".join(lines)


def plot(rows, path):
    try:
        from keras_unitscale.plotting import new_figure

        figure, all_axes = new_figure("real_scripts.plot", (5.5 * 3, 3.6 * 2), nrows=2, ncols=3, squeeze=False)
    except ImportError as error:
        print(f"no plot: {error}")
        return
    names = list(dict.fromkeys(row["model"] for row in rows))
    colors = dict(zip(VARIANTS, ("tab:gray", "tab:orange", "tab:blue", "tab:green")))
    for axes, name in zip(all_axes.flat, names):
        for row in rows:
            if (row["model"] == name and row["precision"] in ("float32", "fp16") and "error" not in row
                    and row["seed"] == rows[0]["seed"]):
                # The script's curve drawn wider: a twin that follows it lies on top of it.
                axes.plot(row["step_losses"], color=colors[row["variant"]],
                          linewidth=3 if row["variant"] == "script" else 1,
                          linestyle="-" if row["precision"] == "float32" else "--",
                          label=f"{row['variant']} {row['precision']}")
        axes.set_title(f"{name}: training loss per step")
        axes.set_xlabel("step")
        axes.legend(fontsize=7)
    for axes in list(all_axes.flat)[len(names):]:
        axes.set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


def write(rows, args, seconds, text):
    backend = keras.backend.backend()
    os.makedirs(args.out, exist_ok=True)
    loss = "" if args.twin_loss == "script" else "_twin_loss_ours"
    stem = os.path.join(args.out, f"real_scripts{loss}_{backend}_{timing.device_name().replace(' ', '_').lower()}")
    record = {
        "backend": backend, "device": timing.device_name(), "keras": keras.__version__,
        "keras_unitscale": keras_unitscale.__version__,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "cpu_count": os.cpu_count()},
        "args": vars(args), "seconds": seconds, "rows": rows,
    }
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1)
    with open(stem + ".txt", "w") as f:
        f.write(text + "\n")
    print(f"wrote {stem}.json and {stem}.txt")
    plot(rows, stem + ".png")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps per run (default {FULL_STEPS}, {QUICK_STEPS} with --quick)")
    parser.add_argument("--quick", action="store_true", help="a few steps on tiny data: a smoke run")
    parser.add_argument("--twin-loss", choices=("script", "ours"), default="script",
                        help="the converted twins' loss: the script's, or made ours by convert.from_keras")
    parser.add_argument("--timing-repeats", type=int, default=5,
                        help="rounds of interleaved step timing after training (seed 0); 0: none, the step times "
                             "measured while training are reported")
    parser.add_argument("--seeds", type=int, default=1,
                        help="runs of every combination, from seeds 0, 1, ...: the table gives means and spreads")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    if args.steps is None:
        args.steps = QUICK_STEPS if args.quick else FULL_STEPS
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1. Received: {args.seeds}")
    if args.steps < 2:
        parser.error(f"--steps must be at least 2 (one to warm up, one to time). Received: {args.steps}")
    # The script's float32 run is the reference of the Δ and ratio columns, so it is always made.
    combinations = list(dict.fromkeys(
        [REFERENCE] + [(v, p) for v in args.variants for p in args.precisions]))
    started, rows = time.perf_counter(), []
    for name in args.models:
        load, *_, batch = MODELS[name]
        train, held_out, info = load(args.quick)
        data = (training_batches(train, args.steps, batch), held_out, info)
        for seed in range(args.seeds):
            kept = {} if seed == 0 and args.timing_repeats else None
            for variant, precision_name in combinations:
                rows.append(run(name, data, variant, precision_name, args.twin_loss, seed, kept))
                outcome = rows[-1].get("error") or f"final loss {rows[-1]['final_train_loss']:.4f}"
                print(f"{name} seed {seed} {variant} {precision_name}: {outcome.splitlines()[0][:200]} "
                      f"({rows[-1]['seconds']:.1f} s)", flush=True)
            if kept and REFERENCE in kept:
                timed = interleaved_step_times(kept, data, batch, args.timing_repeats, TIMING_STEPS)
                for row in rows:
                    if row["model"] == name and row["seed"] == seed and (row["variant"], row["precision"]) in timed:
                        row["interleaved_step_ms"], row["interleaved_step_ratio"] = timed[row["variant"], row["precision"]]
                print(f"{name}: interleaved step times taken ({args.timing_repeats} rounds)", flush=True)
            kept = None
    seconds = time.perf_counter() - started
    text = (f"real_scripts, {keras.backend.backend()} backend, keras {keras.__version__}, "
            f"keras_unitscale {keras_unitscale.__version__}, {os.cpu_count()} cores, {seconds:.0f} s, "
            f"twins compiled with the script's loss{'' if args.twin_loss == 'script' else ', made ours'}\n\n"
            + table(rows, {name: args.steps for name in args.models}))
    print("\n" + text)
    write(rows, args, seconds, text)


if __name__ == "__main__":
    main()
