"""`ScaleReporter` and `scale_report`: one forward and backward pass, and the scale of every tensor in it.

The gradient arriving at each layer's output is measured by adding a zero
"probe" to the output as the model's graph runs (Keras's own graph runner,
`Functional._run_through_graph`): the probe's gradient is the output's. A
subclassed model has no graph to run through; its report holds its weights,
their gradients and its output.
"""

import inspect

import keras
import numpy as np
from keras import ops

from keras_unitscale import autodiff as A
from keras_unitscale import checks
from keras_unitscale import formats as F
from keras_unitscale import parametrization as P
from keras_unitscale.analysis.report import ACTIVATION
from keras_unitscale.analysis.report import GRADIENT
from keras_unitscale.analysis.report import WEIGHT
from keras_unitscale.analysis.report import WEIGHT_GRADIENT
from keras_unitscale.analysis.report import ScaleReport
from keras_unitscale.analysis.report import tensor_stats
from keras_unitscale.graph import functional_graph


def _with_training(operation, training):
    # Decided once per operation, not on every call.
    call = getattr(operation, "call", None)
    if call is None or "training" not in inspect.signature(call).parameters:
        return operation

    def with_training(*args, **kwargs):
        kwargs.setdefault("training", training)
        return operation(*args, **kwargs)

    return with_training


def _by_key(structure):
    """A model's outputs (or targets) by name: a dict as it is, a tensor or a list by position."""
    return structure if isinstance(structure, dict) else dict(enumerate(keras.tree.flatten(structure)))


def _is_float(tensor):
    return "float" in keras.backend.standardize_dtype(tensor.dtype)


def _run(graph, inputs, training, probes=None, record=None):
    """Runs `graph`; adds `probes[i]` to the i-th layer output, or records the outputs."""
    counter = iter(range(1 << 30))

    def operation_fn(operation):
        call = _with_training(operation, training)

        def probed(*args, **kwargs):
            output = call(*args, **kwargs)
            if not isinstance(operation, keras.layers.Layer) or not hasattr(output, "dtype") or not _is_float(output):
                return output
            index = next(counter)
            if record is not None:
                record.append((operation, ops.stop_gradient(output)))
            if probes is not None:
                output = output + ops.cast(probes[index], output.dtype)
            return output

        return probed

    return graph._run_through_graph(inputs, operation_fn=operation_fn)


class ScaleReporter:
    """Scale reports of one model, taken again and again: `reporter(x, y)` is a `ScaleReport`.

    The forward and backward pass is a pure function of the inputs, the
    targets and the variables' current values; with `jit_compile=True` it is
    traced once (`tf.function`, `jax.jit`; PyTorch runs eagerly), so a report
    during training costs about one training step. `ScaleTracker` keeps one.
    Python-level settings of the layers (such as the weight multipliers
    `UnitScaleCallback` sets) are read when it is traced: after changing
    them, make a new reporter.

    Args:
        model: a built Keras model (Sequential, functional or subclassed),
            with one output or several (a list or a dict).
        loss: the loss to differentiate when targets are given; by default
            the model's compiled loss.
        training: passed to the layers (dropout, ...).
        jit_compile: trace the pass once and reuse it.

    Examples:
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d")])
        >>> reporter = ScaleReporter(model, loss="mse")
        >>> x, y = np.ones((8, 4), "float32"), np.zeros((8, 2), "float32")
        >>> [len(reporter(x, y).rows) for _ in range(2)]
        [6, 6]
    """

    def __init__(self, model, loss=None, training=False, jit_compile=True):
        checks.built(model, "scale_report")
        self.model, self.loss, self.training = model, loss, training
        self.graph = functional_graph(model)
        self.trainable, self.non_trainable = model.trainable_variables, model.non_trainable_variables
        # The probed layers, in the order of the pass's outputs; set as it is traced.
        self.layers = []
        self._loss_fn = None
        self._pass = A.compiled(self._forward_backward) if jit_compile else self._forward_backward

    def __call__(self, x, y=None, formats=F.FORMATS):
        """The `ScaleReport` of one pass on `x` (and `y`); see `scale_report`."""
        outputs, output, output_grads, weight_grads = self._run(x, y)
        numpy = ops.convert_to_numpy
        return self._rows_to_report(
            [(layer, numpy(out), numpy(grad)) for layer, out, grad in zip(self.layers, outputs, output_grads)],
            keras.tree.map_structure(numpy, output),
            {id(v): numpy(grad) for v, grad in zip(self.trainable, weight_grads)},
            formats,
        )

    def weight_gradients(self, x, y=None):
        """The gradients of the model's trainable variables (NumPy arrays, in their order) from one pass."""
        return [ops.convert_to_numpy(grad) for grad in self._run(x, y)[3]]

    def _run(self, x, y):
        if y is not None and self._loss_fn is None:
            self._loss_fn = self._loss_function()
        inputs = self._inputs(x)
        return self._pass(
            inputs if isinstance(inputs, dict) or len(inputs) > 1 else inputs[0],
            None if y is None else keras.tree.map_structure(ops.convert_to_tensor, y),
            [v.value for v in self.trainable],
            [v.value for v in self.non_trainable],
        )

    def _inputs(self, x):
        """`x` as tensors, each in its `Input`'s dtype (token ids given as int64 or float become int32, say).

        A dict (a KerasHub backbone's token ids and padding mask) stays a dict, matched to the inputs by name.
        """
        if isinstance(x, dict):
            declared = getattr(self.model, "input", None)
            declared = declared if isinstance(declared, dict) else {}
            return {key: ops.convert_to_tensor(value, dtype=declared[key].dtype if key in declared else None)
                    for key, value in x.items()}
        arrays = list(x) if isinstance(x, (list, tuple)) else [x]
        declared = getattr(self.model, "inputs", None) or []
        dtypes = [i.dtype for i in declared] if len(declared) == len(arrays) else [None] * len(arrays)
        return [ops.convert_to_tensor(v, dtype=dtype) for v, dtype in zip(arrays, dtypes)]

    def _loss_function(self):
        loss = self.loss if self.loss is not None else getattr(self.model, "loss", None)
        if loss is None:
            raise ValueError(
                "`scale_report` needs a loss to differentiate when `y` is given: pass `loss=` or "
                "compile the model. Received: loss=None, model.loss=None"
            )
        # One loss for every output, or one per output by key (a list's by position).
        if isinstance(loss, (dict, list, tuple)):
            return {key: keras.losses.get(one) for key, one in _by_key(loss).items()}
        return keras.losses.get(loss)

    def _upstream(self, output, target):
        """The scalar to differentiate: the sum of each output's loss, or of each output against a unit-normal gradient.

        A model with several outputs (a list or a dict of them) takes targets
        of the same structure, and one loss for all or one per output, as
        `model.compile` does.
        """
        outputs = _by_key(output)
        if target is None:
            return sum(
                ops.sum(ops.cast(out, "float32") * keras.random.normal(ops.shape(out), seed=index))
                for index, out in enumerate(outputs.values())
            )
        targets = _by_key(target)
        if set(targets) != set(outputs):
            raise ValueError(
                "`y` must have the structure of the model's outputs. "
                f"Received: outputs {sorted(outputs, key=str)}, targets {sorted(targets, key=str)}"
            )
        losses = self._loss_fn if isinstance(self._loss_fn, dict) else {key: self._loss_fn for key in outputs}
        if set(losses) != set(outputs):
            raise ValueError(
                "Give one loss, or one per output with the outputs' structure. "
                f"Received: losses for {sorted(losses, key=str)}, outputs {sorted(outputs, key=str)}"
            )
        # No cast here: a softmax output carries its logits, which a cast would drop.
        return sum(ops.mean(losses[key](targets[key], out)) for key, out in outputs.items())

    def _forward(self, inputs, trainable_values, non_trainable_values, probes=None, record=None):
        mapping = list(zip(self.trainable, trainable_values)) + list(zip(self.non_trainable, non_trainable_values))
        with keras.StatelessScope(state_mapping=mapping):
            if self.graph is not None:
                return _run(self.graph, inputs, self.training, probes=probes, record=record)
            return self.model(inputs, training=self.training)

    def _forward_backward(self, inputs, target, trainable_values, non_trainable_values):
        recorded = []
        output = self._forward(inputs, trainable_values, non_trainable_values, record=recorded)
        self.layers = [layer for layer, _ in recorded]
        outputs = [out for _, out in recorded]
        probe_zeros = [ops.zeros(ops.shape(out), "float32") for out in outputs]

        def differentiated(*args):
            probes, weights = args[: len(probe_zeros)], args[len(probe_zeros):]
            out = self._forward(inputs, weights, non_trainable_values, probes=probes)
            return self._upstream(out, target)

        _, grads = A.vjp_tensors(differentiated, probe_zeros + list(trainable_values), np.float32(1.0))
        return outputs, output, list(grads[: len(probe_zeros)]), list(grads[len(probe_zeros):])

    def _rows_to_report(self, probed, output, weight_grads, formats):
        model, rows = self.model, []

        def add(layer, tensor, kind, values):
            rows.append({"layer": layer, "tensor": tensor, "kind": kind, **tensor_stats(values, formats)})

        reported = set()
        for layer, out, grad in probed:
            add(layer.name, "output", ACTIVATION, out)
            add(layer.name, "output gradient", GRADIENT, grad)
            if id(layer) not in reported:
                reported.add(id(layer))
                _add_weights(add, layer.name, P.owned_variables(layer), weight_grads)
        for layer in P.weighted_layers(model):
            if id(layer) not in reported:
                _add_weights(add, _weights_label(model, layer), P.owned_variables(layer), weight_grads)
        if self.graph is None:
            named = _by_key(output)
            for key, values in named.items():
                add(model.name, "output" if len(named) == 1 else f"output {key}", ACTIVATION, values)
        return ScaleReport(rows, formats=[fmt.name for fmt in formats], model_name=model.name)


def scale_report(model, x, y=None, loss=None, training=False, formats=F.FORMATS):
    """One forward and backward pass of `model` on `x`, and the scale of every tensor in it.

    Args:
        model: a built Keras model (Sequential, functional or subclassed).
        x: a batch of inputs (an array, or a list for several inputs).
        y: targets; with them the gradient is the loss's (`loss`, or the
            model's compiled loss), averaged over the batch as in training.
            Without them, a unit-normal gradient is sent back from the
            output (what a unit-scaled loss delivers).
        loss: a loss (name, function or `keras.losses.Loss`).
        training: passed to the layers (dropout, ...).
        formats: the `keras_unitscale.formats.FPFormat`s to count against.

    Returns:
        A `ScaleReport`.

    Examples:
        >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8, name="d")])
        >>> report = scale_report(model, np.ones((4, 16), "float32"))
        >>> [(row["layer"], row["tensor"]) for row in report.rows]
        [('d', 'output'), ('d', 'output gradient'), ('d', 'kernel'), ('d', 'kernel gradient'), ('d', 'bias'), ('d', 'bias gradient')]
    """
    return ScaleReporter(model, loss=loss, training=training, jit_compile=False)(x, y, formats)


def _weights_label(model, layer):
    """A layer's name as its variables' path gives it: it tells two blocks' sublayers apart."""
    return P.owned_variables(layer)[0].path.rsplit("/", 1)[0].removeprefix(model.name + "/")


def weight_report(model, formats=F.FORMATS):
    """The scales of `model`'s trainable weights alone: no data, no gradients.

    Examples:
        >>> model = keras.Sequential([keras.Input((16,)), keras_unitscale.layers.Dense(8, use_bias=False, name="d")])
        >>> [(row["layer"], row["tensor"], 0.8 < row["rms"] < 1.25) for row in weight_report(model).rows]
        [('d', 'kernel', True)]
    """
    rows = [
        {"layer": _weights_label(model, layer), "tensor": variable.name, "kind": WEIGHT,
         **tensor_stats(ops.convert_to_numpy(variable), formats)}
        for layer in P.weighted_layers(model)
        for variable in P.owned_variables(layer)
    ]
    return ScaleReport(rows, formats=[fmt.name for fmt in formats], model_name=model.name)


def _add_weights(add, layer_name, variables, weight_grads):
    for variable in variables:
        if id(variable) not in weight_grads:
            continue
        add(layer_name, variable.name, WEIGHT, ops.convert_to_numpy(variable))
        add(layer_name, f"{variable.name} gradient", WEIGHT_GRADIENT, weight_grads[id(variable)])
