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
        help="seed 000's MLP and a character transformer LM, plain Keras beside unit-scaled, "
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
        from keras_unitscale import analysis

        analysis.analyze_file(args.model, data=args.data, batch=args.batch, out_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
