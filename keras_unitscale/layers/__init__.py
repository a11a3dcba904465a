"""Unit-scaled Keras layers: the drop-ins for `keras.layers`."""

from keras_unitscale.layers.activation import Activation
from keras_unitscale.layers.activation_layers import ELU
from keras_unitscale.layers.activation_layers import LeakyReLU
from keras_unitscale.layers.activation_layers import PReLU
from keras_unitscale.layers.activation_layers import ReLU
from keras_unitscale.layers.activation_layers import Softmax
from keras_unitscale.layers.attention import MultiHeadAttention
from keras_unitscale.layers.conv import Conv1D
from keras_unitscale.layers.conv import Conv2D
from keras_unitscale.layers.conv import Conv3D
from keras_unitscale.layers.conv import Conv1DTranspose
from keras_unitscale.layers.conv import Conv2DTranspose
from keras_unitscale.layers.conv import Conv3DTranspose
from keras_unitscale.layers.conv import DepthwiseConv1D
from keras_unitscale.layers.conv import DepthwiseConv2D
from keras_unitscale.layers.conv import SeparableConv1D
from keras_unitscale.layers.conv import SeparableConv2D
from keras_unitscale.layers.dense import Dense
from keras_unitscale.layers.dropout import Dropout
from keras_unitscale.layers.einsum_dense import EinsumDense
from keras_unitscale.layers.embedding import Embedding
from keras_unitscale.layers.gru import GRU
from keras_unitscale.layers.gru import GRUCell
from keras_unitscale.layers.lstm import LSTM
from keras_unitscale.layers.lstm import LSTMCell
from keras_unitscale.layers.merging import Add
from keras_unitscale.layers.normalization import BatchNormalization
from keras_unitscale.layers.normalization import GroupNormalization
from keras_unitscale.layers.normalization import LayerNormalization
from keras_unitscale.layers.normalization import RMSNormalization
from keras_unitscale.layers.recurrent_block import RecurrentBlock
from keras_unitscale.layers.residual import Residual
from keras_unitscale.layers.residual import ResidualAdd
from keras_unitscale.layers.residual import ResidualSplit
from keras_unitscale.layers.transformer import TransformerBlock

__all__ = [
    "Activation",
    "Add",
    "BatchNormalization",
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "Conv1DTranspose",
    "Conv2DTranspose",
    "Conv3DTranspose",
    "DepthwiseConv1D",
    "DepthwiseConv2D",
    "SeparableConv1D",
    "SeparableConv2D",
    "Dense",
    "Dropout",
    "ELU",
    "EinsumDense",
    "Embedding",
    "GroupNormalization",
    "GRU",
    "GRUCell",
    "LayerNormalization",
    "LeakyReLU",
    "LSTM",
    "LSTMCell",
    "MultiHeadAttention",
    "PReLU",
    "ReLU",
    "RecurrentBlock",
    "RMSNormalization",
    "Residual",
    "ResidualAdd",
    "ResidualSplit",
    "Softmax",
    "TransformerBlock",
]
