"""Unit-scaled Keras layers: the drop-ins for `keras.layers`."""

from keras_unitscale.layers.activation import Activation
from keras_unitscale.layers.attention import MultiHeadAttention
from keras_unitscale.layers.dense import Dense
from keras_unitscale.layers.dropout import Dropout
from keras_unitscale.layers.einsum_dense import EinsumDense
from keras_unitscale.layers.embedding import Embedding
from keras_unitscale.layers.lstm import LSTM
from keras_unitscale.layers.lstm import LSTMCell
from keras_unitscale.layers.merging import Add
from keras_unitscale.layers.normalization import LayerNormalization
from keras_unitscale.layers.normalization import RMSNormalization
from keras_unitscale.layers.residual import Residual
from keras_unitscale.layers.residual import ResidualAdd
from keras_unitscale.layers.residual import ResidualSplit
from keras_unitscale.layers.transformer import TransformerBlock

__all__ = [
    "Activation",
    "Add",
    "Dense",
    "Dropout",
    "EinsumDense",
    "Embedding",
    "LayerNormalization",
    "LSTM",
    "LSTMCell",
    "MultiHeadAttention",
    "RMSNormalization",
    "Residual",
    "ResidualAdd",
    "ResidualSplit",
    "TransformerBlock",
]
