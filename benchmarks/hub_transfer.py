"""Learning-rate transfer on a KerasHub architecture: Llama as KerasHub builds it, and its u-μP twin.

`keras_hub.models.LlamaCausalLM` (random weights from a configuration:
heads of 16, half as many key/value heads, an MLP of twice the width) on the
English text of Python's `pydoc_data.topics`, character by character,
trained `--steps` steps of `--batch` windows of `--seq` characters, once per
learning rate (powers of 2) and model size:

- "kerashub": the model as KerasHub builds it, Keras's Adam and Keras's
  cross-entropy;
- "u-mup": its twin, `unit_scale(causal_lm, mode="reinit")`, our Adam (u-μP's
  per-weight learning rates) and our unit-scaled cross-entropy.

Widths `--widths` at depth `--depth-for-widths`, and depths `--depths` at
width `--width-for-depths`, as `lr_transfer.py` does for our own transformer,
with its tables, optima, drift of the optimum in grid steps and plots:
`hub_transfer_<backend>_<device>.{csv,json,txt}` and
`hub_transfer_<backend>_<device>_{width,depth}_{kerashub,u-mup}.png`.

Usage:
    python benchmarks/hub_transfer.py [--widths 64 128 256 512] [--depths 2 4 8] [--steps 150] [--batch 16]
        [--seq 32]
"""

import os
import time
import warnings

import keras
import keras_hub
import numpy as np

import timing
from keras_unitscale import experiments
from keras_unitscale import losses
from keras_unitscale import optimizers
from keras_unitscale import unit_scale
from lr_transfer import arguments
from lr_transfer import replot
from lr_transfer import sweep_widths_and_depths
from lr_transfer import write_results

HEAD_SIZE = 16
# Powers of 2 around each one's optimum on this task (`lr_transfer.py`'s grids).
GRIDS = {"u-mup": [2.0**e for e in range(-5, 2)], "kerashub": [2.0**e for e in range(-12, -5)]}
TRAINING = {
    "u-mup": (optimizers.Adam, lambda: losses.SparseCategoricalCrossentropy(from_logits=True)),
    "kerashub": (keras.optimizers.Adam, lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True)),
}


def causal_lm(parametrization, vocabulary_size, width, depth):
    """KerasHub's Llama of this width and depth, or its u-μP twin."""
    heads = max(1, width // HEAD_SIZE)
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=vocabulary_size, num_layers=depth, num_query_heads=heads,
        num_key_value_heads=max(1, heads // 2), hidden_dim=width, intermediate_dim=2 * width,
    )
    if parametrization == "u-mup":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a reinit twin: nothing to make equivalent
            backbone = unit_scale(backbone, mode="reinit")
    return keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)


def _as_inputs(tokens):
    return {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}


def main():
    args = arguments(__doc__.splitlines()[0], GRIDS, steps=150)
    args.set_defaults(batch=16, seq=32)
    args = args.parse_args()
    stem = os.path.join(args.out, f"hub_transfer_{keras.backend.backend()}_{timing.device_name()}")
    if args.replot:
        replot(stem)
        return
    (x, y), (xv, yv), vocabulary = experiments.char_lm_data(args.seq, args.steps * args.batch, 256)
    train, validation = (_as_inputs(x), y), (_as_inputs(xv), yv)

    def sweep(parametrization, width, depth, label):
        optimizer, loss = TRAINING[parametrization]
        print(f"{parametrization}, {label}:", flush=True)
        return experiments.lr_sweep(
            lambda: causal_lm(parametrization, len(vocabulary), width, depth), GRIDS[parametrization], train,
            validation, steps=args.steps, batch_size=args.batch, optimizer=optimizer, loss=loss(), label=label,
        )

    start = time.perf_counter()
    results = sweep_widths_and_depths(sweep, args)
    write_results(results, args, stem, (
        f"Learning-rate transfer on KerasHub's Llama: character LM on pydoc_data.topics, {keras.backend.backend()} "
        f"{timing.device_name()}, {args.steps} steps × {args.batch} × {args.seq} characters, heads of {HEAD_SIZE}; "
        f"widths {args.widths} at depth {args.depth_for_widths}, depths {args.depths} at width "
        f"{args.width_for_depths}; {time.perf_counter() - start:.0f} s in all"
    ))


if __name__ == "__main__":
    main()
