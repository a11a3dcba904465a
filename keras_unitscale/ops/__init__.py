"""Unit-scaled ops on tensors: each applies its rule (`keras_unitscale.rules`) with `scale_fwd` / `scale_bwd`.

Every op follows one pattern: ask its rule for the forward scale of its
output and the backward scale(s) of its inputs, tied by a constraint where
the edge needs it (`keras_unitscale.constraints`), then wrap the plain
`keras.ops` computation in `scale_bwd` on its inputs and `scale_fwd` on its
output. `keras_unitscale.functional` is the public namespace of these ops.

In eager PyTorch, where each op is a Python call and a pass over memory, the
busiest ops (dense, einsum dense, relu/gelu/silu, the residual split and add)
run the same arithmetic as one autograd function each (`ops.torch_fused`),
with the scales their rules give.
"""

from keras_unitscale.ops.activations import apply as apply_activation
from keras_unitscale.ops.activations import dropout
from keras_unitscale.ops.activations import gelu
from keras_unitscale.ops.activations import relu
from keras_unitscale.ops.activations import sigmoid
from keras_unitscale.ops.activations import silu
from keras_unitscale.ops.activations import gelu_glu
from keras_unitscale.ops.activations import silu_glu
from keras_unitscale.ops.activations import softmax
from keras_unitscale.ops.activations import tanh
from keras_unitscale.ops.attention import dot_product_attention
from keras_unitscale.ops.convolution import conv
from keras_unitscale.ops.convolution import conv_transpose
from keras_unitscale.ops.convolution import depthwise_conv
from keras_unitscale.ops.convolution import separable_conv
from keras_unitscale.ops.gru import gru_cell
from keras_unitscale.ops.gru import gru_hidden_in
from keras_unitscale.ops.gru import gru_hidden_out
from keras_unitscale.ops.gru import gru_inputs
from keras_unitscale.ops.gru import gru_weights
from keras_unitscale.ops.linear import add
from keras_unitscale.ops.linear import dense
from keras_unitscale.ops.linear import dense_readout
from keras_unitscale.ops.linear import embedding
from keras_unitscale.ops.linear import matmul
from keras_unitscale.ops.losses import MSE_GRAD_SCALE
from keras_unitscale.ops.losses import cross_entropy
from keras_unitscale.ops.losses import cross_entropy_grad_scale
from keras_unitscale.ops.losses import mse
from keras_unitscale.ops.lstm import lstm_cell
from keras_unitscale.ops.lstm import lstm_dropout
from keras_unitscale.ops.lstm import lstm_hidden_in
from keras_unitscale.ops.lstm import lstm_hidden_out
from keras_unitscale.ops.lstm import lstm_inputs
from keras_unitscale.ops.lstm import lstm_weights
from keras_unitscale.ops.norms import layer_norm
from keras_unitscale.ops.norms import rms_norm
from keras_unitscale.ops.residual import residual_add
from keras_unitscale.ops.residual import residual_apply
from keras_unitscale.ops.residual import residual_split

__all__ = [
    "matmul", "dense", "dense_readout", "add", "embedding",
    "conv", "conv_transpose", "depthwise_conv", "separable_conv",
    "dropout", "relu", "gelu", "silu", "silu_glu", "gelu_glu", "tanh", "sigmoid", "softmax", "apply_activation",
    "layer_norm", "rms_norm", "dot_product_attention",
    "cross_entropy", "cross_entropy_grad_scale", "mse", "MSE_GRAD_SCALE",
    "residual_split", "residual_add", "residual_apply",
    "lstm_weights", "lstm_inputs", "lstm_hidden_in", "lstm_hidden_out", "lstm_dropout", "lstm_cell",
    "gru_weights", "gru_inputs", "gru_hidden_in", "gru_hidden_out", "gru_cell",
]
