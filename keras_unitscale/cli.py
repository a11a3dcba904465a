"""`keras-unitscale`: the command line.

    keras-unitscale demo [--out DIR] [--quick] [--steps N] [--seed N] [--backend NAME]
    keras-unitscale analyze MODEL.keras [--data FILE.npz] [--batch N] [--out DIR] [--backend NAME]
"""

import argparse
import os
import sys

BACKENDS = ("tensorflow", "jax", "torch")


def _parser():
    parser = argparse.ArgumentParser(
        prog="keras-unitscale", description="Unit Scaling and u-μP for Keras 3."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="a small MLP (Dense 128-64-1) on breast-cancer data and a character transformer LM, "
             "plain Keras beside unit-scaled, "
             "in float32, FP16 and FP8 (about 3 minutes on 2 CPU cores; --quick: under a minute)",
    )
    demo.add_argument("--out", default="unitscale-demo", help="output directory (default: %(default)s)")
    demo.add_argument("--quick", action="store_true", help="smaller models and fewer steps: a check, not a result")
    demo.add_argument("--steps", type=_positive_int, help="the transformer LM's training steps "
                                                          "(default: 200; 40 with --quick)")
    demo.add_argument("--seed", type=int, default=0, help="the data split's and batches' seed (default: %(default)s)")
    demo.add_argument("--backend", choices=BACKENDS, help="Keras backend (default: KERAS_BACKEND or tensorflow)")
    analyze = commands.add_parser(
        "analyze",
        help="a saved model's scales: every layer's output and gradient RMS, and what FP16/FP8 would lose",
    )
    analyze.add_argument("model", help="a model saved as .keras")
    analyze.add_argument("--data", help=".npz with `x` (and optionally `y`, differentiated through the "
                                        "model's compiled loss); default: unit-normal inputs from the model's input spec")
    analyze.add_argument("--batch", type=_positive_int, default=32, help="batch size of generated inputs (default: %(default)s)")
    analyze.add_argument("--out", default="unitscale-analysis", help="output directory (default: %(default)s)")
    analyze.add_argument("--backend", choices=BACKENDS, help="Keras backend (default: KERAS_BACKEND or tensorflow)")
    return parser


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer. Received: {text!r}")
    return value


def _check_writable(directory):
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, ".keras-unitscale-write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        raise SystemExit(f"keras-unitscale: cannot write to --out {directory!r}: {error.strerror}")


def _inputs_from_spec(model, batch, seed=0):
    """Unit-normal float inputs (and valid token ids for integer inputs) shaped as the model's inputs."""
    import keras
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = min(
        [layer.input_dim for layer in model._flatten_layers(recursive=True) if hasattr(layer, "input_dim")
         and isinstance(getattr(layer, "input_dim"), int)] or [2]
    )
    arrays = []
    for tensor in model.inputs:
        shape = tuple(batch if i == 0 else (size or 16) for i, size in enumerate(tensor.shape))
        if "int" in keras.backend.standardize_dtype(tensor.dtype):
            arrays.append(rng.integers(0, vocab, size=shape).astype(tensor.dtype))
        else:
            arrays.append(rng.normal(size=shape).astype("float32"))
    return arrays if len(arrays) > 1 else arrays[0]


def _load_model(model_path):
    import keras

    try:
        return keras.saving.load_model(model_path)
    except Exception as error:  # Keras raises many kinds for a file that is not a model
        raise SystemExit(
            f"keras-unitscale analyze: {model_path!r} is not a Keras model that loads "
            f"({type(error).__name__}: {error})"
        ) from None


def _load_data(data):
    """`x` and `y` (None where absent) from an .npz file."""
    import numpy as np

    with np.load(data) as arrays:
        if "x" not in arrays:
            raise SystemExit(f"keras-unitscale analyze: {data!r} has no array named 'x'. Received: {list(arrays)}")
        return arrays["x"], (arrays["y"] if "y" in arrays else None)


def _analyze(model_path, data=None, batch=32, out_dir="unitscale-analysis"):
    """`keras-unitscale analyze`: a saved model's scale report, printed and written as PNG and JSON.

    Raises:
        SystemExit: with a message naming the file, if it is not a Keras model
            or `data` has no `x`.
    """
    from keras_unitscale import analysis

    model = _load_model(model_path)
    if data is None:
        x, y = _inputs_from_spec(model, batch), None
    else:
        x, y = _load_data(data)
    report = analysis.scale_report(model, x, y)
    print(report)
    os.makedirs(out_dir, exist_ok=True)
    json_path, png_path = os.path.join(out_dir, "scale_report.json"), os.path.join(out_dir, "scales.png")
    report.to_json(json_path)
    analysis.plot_scales(report, png_path)
    print(f"Wrote {json_path} and {png_path}")
    return report


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    if args.backend and os.environ.get("KERAS_BACKEND", "tensorflow") != args.backend:
        # Keras fixes its backend when first imported, which this package has
        # done already: start again with the backend chosen.
        env = dict(os.environ, KERAS_BACKEND=args.backend)
        os.execve(sys.executable, [sys.executable, "-m", "keras_unitscale", *argv], env)

    if args.command == "demo":
        _check_writable(args.out)
        from keras_unitscale import demo

        settings = demo.QUICK if args.quick else demo.DEFAULT
        if args.steps is not None:
            settings = settings.with_steps(args.steps)
        demo.run(out_dir=args.out, settings=settings, seed=args.seed)
    elif args.command == "analyze":
        _check_writable(args.out)
        _analyze(args.model, data=args.data, batch=args.batch, out_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
