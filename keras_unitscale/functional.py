"""Unit-scaled ops: each keeps its output and its gradients near unit scale.

The public namespace of the ops (`keras_unitscale.ops`) and of the rules
users call directly (`keras_unitscale.rules`). Every op applies a rule — the
forward scale of its output and the backward scale of each input's gradient,
tied by a constraint where the edge needs it — around the plain `keras.ops`
computation, with `scale_fwd` and `scale_bwd`. Each docstring states its
rule; `keras_unitscale.rules` is where each rule lives.

Tensors use Keras layouts: a dense kernel is `(fan_in, fan_out)`, attention
tensors are `(batch, seq, heads, head_dim)`, convolutions take Keras's
kernels and `data_format`.

Where the reference package `unit-scaling` 0.3.5 defines an op, the forward
values and gradients here are the same (the parity tests check it). The ops
it lacks (`relu`, `tanh`, `sigmoid`, the LSTM and the GRU) have rules derived for
unit-normal inputs; see their docstrings.
"""

from keras_unitscale.ops import MSE_GRAD_SCALE
from keras_unitscale.ops import add
from keras_unitscale.ops import conv
from keras_unitscale.ops import conv_transpose
from keras_unitscale.ops import cross_entropy
from keras_unitscale.ops import cross_entropy_grad_scale
from keras_unitscale.ops import dense
from keras_unitscale.ops import dense_readout
from keras_unitscale.ops import depthwise_conv
from keras_unitscale.ops import dot_product_attention
from keras_unitscale.ops import dropout
from keras_unitscale.ops import embedding
from keras_unitscale.ops import gelu
from keras_unitscale.ops import gelu_glu
from keras_unitscale.ops import gru_cell
from keras_unitscale.ops import gru_hidden_in
from keras_unitscale.ops import gru_hidden_out
from keras_unitscale.ops import gru_inputs
from keras_unitscale.ops import gru_weights
from keras_unitscale.ops import layer_norm
from keras_unitscale.ops import lstm_cell
from keras_unitscale.ops import lstm_dropout
from keras_unitscale.ops import lstm_hidden_in
from keras_unitscale.ops import lstm_hidden_out
from keras_unitscale.ops import lstm_inputs
from keras_unitscale.ops import lstm_weights
from keras_unitscale.ops import matmul
from keras_unitscale.ops import mse
from keras_unitscale.ops import relu
from keras_unitscale.ops import residual_add
from keras_unitscale.ops import residual_apply
from keras_unitscale.ops import residual_split
from keras_unitscale.ops import rms_norm
from keras_unitscale.ops import separable_conv
from keras_unitscale.ops import sigmoid
from keras_unitscale.ops import silu
from keras_unitscale.ops import silu_glu
from keras_unitscale.ops import softmax
from keras_unitscale.ops import tanh
from keras_unitscale.rules.common import logarithmic_interpolation
from keras_unitscale.rules.gru import GRURule
from keras_unitscale.rules.gru import gru_rule
from keras_unitscale.rules.lstm import LSTMRule
from keras_unitscale.rules.lstm import lstm_rule
from keras_unitscale.rules.residual import transformer_residual_scaling_rule

__all__ = [
    "matmul",
    "dense",
    "dense_readout",
    "add",
    "conv",
    "conv_transpose",
    "depthwise_conv",
    "separable_conv",
    "dropout",
    "relu",
    "gelu",
    "silu",
    "silu_glu",
    "gelu_glu",
    "tanh",
    "sigmoid",
    "softmax",
    "embedding",
    "layer_norm",
    "rms_norm",
    "dot_product_attention",
    "cross_entropy",
    "cross_entropy_grad_scale",
    "mse",
    "MSE_GRAD_SCALE",
    "residual_split",
    "residual_add",
    "residual_apply",
    "transformer_residual_scaling_rule",
    "logarithmic_interpolation",
    # recurrent
    "LSTMRule",
    "lstm_rule",
    "lstm_weights",
    "lstm_inputs",
    "lstm_hidden_in",
    "lstm_hidden_out",
    "lstm_dropout",
    "lstm_cell",
    "GRURule",
    "gru_rule",
    "gru_weights",
    "gru_inputs",
    "gru_hidden_in",
    "gru_hidden_out",
    "gru_cell",
]
