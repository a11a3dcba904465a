"""Unit Scaling and u-μP for Keras 3.

Scaled ops keep weights, activations and gradients near unit scale, so that
models train in FP16 and FP8 without loss scaling.
"""

from keras_unitscale import analysis
from keras_unitscale import callbacks
from keras_unitscale import constraints
from keras_unitscale import convert
from keras_unitscale import formats
from keras_unitscale import functional
from keras_unitscale import hub
from keras_unitscale import layers
from keras_unitscale import losses
from keras_unitscale import models
from keras_unitscale import optimizers
from keras_unitscale import parametrization
from keras_unitscale import precision
from keras_unitscale import resize
from keras_unitscale.callbacks import UnitScaleCallback
from keras_unitscale.convert import unit_scale
from keras_unitscale.resize import grow
from keras_unitscale.resize import shrink
from keras_unitscale.scale import scale_bwd
from keras_unitscale.scale import scale_fwd
from keras_unitscale.scale import scaled
from keras_unitscale.scale import scaling_disabled
from keras_unitscale.version import __version__

__all__ = [
    "__version__",
    "UnitScaleCallback",
    "analysis",
    "callbacks",
    "constraints",
    "convert",
    "formats",
    "functional",
    "grow",
    "hub",
    "layers",
    "losses",
    "models",
    "optimizers",
    "parametrization",
    "precision",
    "resize",
    "scaled",
    "scale_fwd",
    "scale_bwd",
    "scaling_disabled",
    "shrink",
    "unit_scale",
]
