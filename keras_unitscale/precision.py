"""Scale-free FP8 matmuls: where they apply, and the casts they make.

Unit scaling keeps a matmul's inputs and its output gradient near unit
scale, which is the middle of FP8's range: a plain cast, with no per-tensor
scale and no amax history, keeps them. An FP8 matmul here casts its inputs
(activations and weights) to E4M3 and the gradient arriving at its output
to E5M2, and computes in the layer's dtype on those values. On a GPU with
FP8 (Hopper and later), XLA rewrites such a cast-then-dot into an FP8 GEMM,
forward and backward; elsewhere it simulates FP8's rounding exactly.

The matmul-bearing layers of `keras_unitscale.layers` (`Dense`, the
projections of `MultiHeadAttention`, `LSTM`'s and `GRU`'s kernels, and through them
`TransformerBlock`) take `fp8=None | True | False`. `None` follows the global
setting, `fp8()` as a context or `set_fp8()`. u-μP's two *critical* matmuls,
the attention output projection and the MLP's down projection, stay in the
layer's dtype under the global setting unless `critical=True`; a layer's own
`fp8=True` always applies.

The setting is read when a layer is traced, so compile (or first call) the
model under it: `compile` starts Keras's step functions afresh.

`simulate_fp8(model)` is the same casts on a model of plain Keras layers:
what a scale-free FP8 cast does to a model that is not unit-scaled.
"""

import contextlib

import keras
from keras import ops

from keras_unitscale import formats as F
from keras_unitscale import hub

__all__ = ["FORWARD_FORMAT", "BACKWARD_FORMAT", "fp8", "set_fp8", "fp8_setting", "uses_fp8", "cast_inputs",
           "cast_output_gradient", "simulate_fp8"]

# OCP FP8 as the hardware uses it: more mantissa forward, more range backward.
FORWARD_FORMAT = F.E4M3
BACKWARD_FORMAT = F.E5M2

_setting = {"enabled": False, "critical": False}


def set_fp8(enabled=True, critical=False):
    """Sets the global FP8 setting for layers with `fp8=None`.

    Args:
        enabled: run their matmuls in FP8.
        critical: also the critical ones (attention output and MLP down
            projections).

    Examples:
        >>> set_fp8(True); fp8_setting()
        {'enabled': True, 'critical': False}
        >>> set_fp8(False)
    """
    _setting.update(enabled=bool(enabled), critical=bool(critical))


def fp8_setting():
    """The global FP8 setting, {"enabled": bool, "critical": bool}."""
    return dict(_setting)


@contextlib.contextmanager
def fp8(enabled=True, critical=False):
    """Within this context, layers with `fp8=None` run their matmuls in FP8 (see `set_fp8`).

    Examples:
        >>> with fp8():
        ...     fp8_setting()
        {'enabled': True, 'critical': False}
        >>> fp8_setting()
        {'enabled': False, 'critical': False}
    """
    previous = fp8_setting()
    set_fp8(enabled, critical)
    try:
        yield
    finally:
        set_fp8(**previous)


def uses_fp8(layer_fp8, critical=False):
    """Whether a matmul runs in FP8, given its layer's `fp8` (None, True or False) and whether it is critical.

    Examples:
        >>> with fp8():
        ...     uses_fp8(None), uses_fp8(None, critical=True), uses_fp8(False)
        (True, False, False)
    """
    if layer_fp8 is not None:
        return bool(layer_fp8)
    return _setting["enabled"] and (_setting["critical"] or not critical)


def cast_inputs(*tensors):
    """The matmul's inputs rounded to E4M3 (saturating), with straight-through gradients.

    Examples:
        >>> x, w = cast_inputs(np.array([0.1, 1000.0], "float32"), np.array([3.3], "float32"))
        >>> keras.ops.convert_to_numpy(x).tolist(), keras.ops.convert_to_numpy(w).tolist()
        ([0.1015625, 448.0], [3.25])
    """
    return [F.quantize_fwd(t, FORWARD_FORMAT) for t in tensors]


def fp8_product(product, a, b):
    """`product(a, b)` (a matmul, an einsum, a convolution) as scale-free FP8 runs it: on E4M3 inputs, with an E5M2 output gradient.

    No scales: the unit-scaled ops keep their inputs and gradients near unit
    scale, where these formats are accurate.

    Examples:
        >>> y = fp8_product(keras.ops.multiply, np.array([1.05], "float32"), np.array([2.0], "float32"))
        >>> keras.ops.convert_to_numpy(y).tolist()  # E4M3 holds 1.0 and 1.125 on each side of 1.05
        [2.0]
    """
    a, b = cast_inputs(a, b)
    return cast_output_gradient(product(a, b))


def cast_output_gradient(y):
    """`y` unchanged, with the gradient that reaches it rounded to E5M2 (saturating).

    Examples:
        >>> from keras_unitscale.autodiff import vjp
        >>> y = np.array([1.0, 1.0], "float32")
        >>> _, (grad,) = vjp(lambda t: cast_output_gradient(t), [y], np.array([0.3, 1e-9], "float32"))
        >>> np.asarray(grad).tolist()  # 0.3 to E5M2's grid; 1e-9 below its smallest subnormal
        [0.3125, 0.0]
    """
    return F.quantize_bwd(y, BACKWARD_FORMAT)


# Keras's own layers with the casts around their matmuls: the maths is Keras's.


class _FP8Dense(keras.layers.Dense):
    def call(self, inputs, training=None):
        x, kernel = cast_inputs(inputs, self.kernel)
        y = cast_output_gradient(ops.matmul(x, kernel))
        if self.bias is not None:
            y = ops.add(y, self.bias)
        return y if self.activation is None else self.activation(y)


class _FP8EinsumDense(keras.layers.EinsumDense):
    def call(self, inputs, training=None):
        x, kernel = cast_inputs(inputs, self.kernel)
        y = cast_output_gradient(ops.einsum(self.equation, x, kernel))
        if self.bias is not None:
            y = ops.add(y, self.bias)
        return y if self.activation is None else self.activation(y)


class _FP8MultiHeadAttention(keras.layers.MultiHeadAttention):
    def build(self, query_shape, value_shape, key_shape=None):
        super().build(query_shape, value_shape, key_shape)
        # Keras builds its projections as `EinsumDense`s inside `build`; the
        # FP8 subclass differs only in `call`.
        for projection in (self._query_dense, self._key_dense, self._value_dense, self._output_dense):
            projection.__class__ = _FP8EinsumDense


def _fp8_recurrent(keras_layer, keras_cell, cell_step):
    """`keras_layer` (LSTM or GRU) stepping a cell whose step is our op's with its scales removed and FP8 casts on.

    Keras's step is our op's without its scales (`scaling_disabled`); with
    `fp8=True` the op casts its matmuls' inputs and output gradients, here on
    the raw weights, cast once per step. The op computes with tanh and
    sigmoid, so other activations are refused, as is dropout.
    """
    def call(self, inputs, states, training=False):
        from keras_unitscale.scale import scaling_disabled  # the ops import this module

        kernel, recurrent_kernel = cast_inputs(self.kernel, self.recurrent_kernel)
        with scaling_disabled():
            return cell_step(self, inputs, states, kernel, recurrent_kernel)

    cell_class = type(f"_FP8{keras_cell.__name__}", (keras_cell,), {"call": call, "__module__": __name__})

    def __init__(self, *args, **kwargs):
        super(layer_class, self).__init__(*args, **{**kwargs, "use_cudnn": False})  # the fused kernel has no casts
        cell = self.cell
        plain = cell.activation is keras.activations.tanh and cell.recurrent_activation is keras.activations.sigmoid
        if cell.dropout or cell.recurrent_dropout or not plain:
            raise ValueError(
                f"`simulate_fp8` runs a {keras_layer.__name__}'s cell step by step, with tanh and sigmoid and "
                f"without dropout. Received: activation={cell.activation.__name__}, recurrent_activation="
                f"{cell.recurrent_activation.__name__}, dropout={cell.dropout}, recurrent_dropout={cell.recurrent_dropout}"
            )
        cell.__class__ = cell_class

    layer_class = type(f"_FP8{keras_layer.__name__}", (keras_layer,), {"__init__": __init__, "__module__": __name__})
    return layer_class


def _lstm_step(cell, inputs, states, kernel, recurrent_kernel):
    from keras_unitscale.ops.lstm import lstm_cell

    h, c = lstm_cell(inputs, states[0], states[1], kernel, recurrent_kernel, cell.bias, fp8=True)
    return h, [h, c]


def _gru_step(cell, inputs, states, kernel, recurrent_kernel):
    from keras_unitscale.ops.gru import gru_cell

    nested = keras.tree.is_nested(states)
    h = gru_cell(inputs, states[0] if nested else states, kernel, recurrent_kernel, cell.bias,
                 reset_after=cell.reset_after, fp8=True)
    return h, ([h] if nested else h)


def _fp8_convolution(keras_class):
    """`keras_class` (Conv1D/2D/3D) with its convolution as `fp8_product` runs it; LoRA's kernel included."""
    def convolution_op(self, inputs, kernel):
        return fp8_product(super(cls, self).convolution_op, inputs, kernel)

    cls = type(f"_FP8{keras_class.__name__}", (keras_class,), {"convolution_op": convolution_op, "__module__": __name__})
    return cls


_SIMULATED = {keras.layers.Dense: _FP8Dense, keras.layers.EinsumDense: _FP8EinsumDense,
              keras.layers.MultiHeadAttention: _FP8MultiHeadAttention, keras.layers.LSTM: _fp8_recurrent(keras.layers.LSTM, keras.layers.LSTMCell, _lstm_step),
              keras.layers.GRU: _fp8_recurrent(keras.layers.GRU, keras.layers.GRUCell, _gru_step),
              **{keras_class: _fp8_convolution(keras_class)
                 for keras_class in (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)}}


def simulate_fp8(model):
    """A copy of a plain Keras model whose matmuls cast as scale-free FP8 ones do, and nothing else changed.

    Every `keras.layers.Dense`, `EinsumDense`, `MultiHeadAttention` projection,
    `LSTM` and `GRU` kernel and `Conv1D`/`2D`/`3D` convolution casts its matmul's
    inputs to E4M3 and the gradient of its output to E5M2 (`fp8_product`), with no
    per-tensor scales: the baseline that shows what unit scaling adds. Those
    inside custom layers and nested models are cast too (the layer is copied,
    `convert.inside.copy_layer`, and its matmul sublayers swapped), and a
    KerasHub backbone or `CausalLM` is copied as `hub.models.simulate_fp8`
    does. The copy has `model`'s weights; other layers are copied as they are.

    Args:
        model: a built Sequential or functional Keras model.

    Returns:
        The new model (not compiled).

    Examples:
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> twin = simulate_fp8(model)
        >>> x = np.full((1, 4), 1.05, "float32")  # E4M3 holds 1.0, not 1.05
        >>> expected = F.quantize(x, "E4M3") @ F.quantize(model.layers[0].kernel, "E4M3")
        >>> bool(np.allclose(keras.ops.convert_to_numpy(twin(x)), keras.ops.convert_to_numpy(expected)))
        True
    """
    from keras_unitscale.convert import inside  # convert imports this module

    if hub.is_kerashub_model(model):  # its blocks make their sublayers in `build`: copied otherwise
        return hub.simulate_fp8(model)

    def simulated(layer):
        return _SIMULATED[type(layer)].from_config(layer.get_config())

    def cast_sublayers(layer):
        for child in inside.children(layer):
            if type(child) in _SIMULATED:
                inside.substitute(layer, child, simulated(child))
            else:
                cast_sublayers(child)

    def clone(layer):
        if type(layer) in _SIMULATED:
            return simulated(layer)
        if not isinstance(layer, keras.layers.Layer) or not inside.children(layer):  # an op (`x + y`) or a leaf
            return type(layer).from_config(layer.get_config())
        # A custom layer (or a nested model): a copy, its matmuls cast wherever they sit.
        copy = inside.copy_layer(layer)
        if copy is None:
            raise ValueError(
                f"`simulate_fp8` copies each layer from its config, and '{layer.name}' "
                f"({type(layer).__name__}) has none that rebuilds it: give it a `get_config`."
            )
        cast_sublayers(copy)
        return copy

    twin = keras.models.clone_model(model, clone_function=clone, recursive=True)  # into nested models
    twin.set_weights(model.get_weights())
    return twin
