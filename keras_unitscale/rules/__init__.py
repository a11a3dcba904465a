"""The scale rules, one home each: pure Python from static sizes.

A rule takes the sizes an op sees (fan-in, batch, sequence length, ...) and
its hyperparameters, and returns the scales the op applies: the forward scale
of its output and the backward scale of each input's gradient, tied by the
op's constraint (`keras_unitscale.constraints`) where the edge needs it. The
ops (`keras_unitscale.ops`) apply them to tensors; conversion, the
parametrization and the optimizers read the same rules, so no scale is
written twice. Rules compute on Python numbers; where a size is known only at
run time (a traced batch), the same arithmetic runs on a float32 scalar.

Modules: `linear` (matmul, dense, readout, add, embedding), `conv`, `activations`,
`norms`, `attention`, `losses`, `residual` (the depth rule), `lstm`, `gru`, `mup`
(u-μP's role table).
"""

from keras_unitscale.rules import activations
from keras_unitscale.rules import attention
from keras_unitscale.rules import conv
from keras_unitscale.rules import gru
from keras_unitscale.rules import linear
from keras_unitscale.rules import losses
from keras_unitscale.rules import lstm
from keras_unitscale.rules import mup
from keras_unitscale.rules import norms
from keras_unitscale.rules import residual
from keras_unitscale.rules.common import gaussian_rms
from keras_unitscale.rules.common import logarithmic_interpolation
from keras_unitscale.rules.common import tie

__all__ = [
    "activations", "attention", "conv", "gru", "linear", "losses", "lstm", "mup", "norms", "residual",
    "gaussian_rms", "logarithmic_interpolation", "tie",
]
