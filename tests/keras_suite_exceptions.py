"""The tests of Keras's own layer test files that our layers are expected to fail, and why.

`tests/test_keras_layers.py` runs Keras's test files with only the class under
test swapped for ours (see `tests/keras_suite.py`). Every test passes except
those listed here, each a strict xfail: if it starts passing, the suite fails
and the entry must go.

Keys are the test ids under `tests/test_keras_layers.py` (generated class
`Keras<Keras's test class>`, then the test method); values are
`(category, reason)`. Categories, each with a twin that must pass:

- `PLAIN_NUMBERS`: the test's expected numbers are the plain Keras layer's;
  ours computes the same thing with the documented unit-scaling factors. The
  twin `<test>__scaling_disabled` runs the same body under
  `keras_unitscale.scale.scaling_disabled()` (every scale op removed), where
  our layer must give Keras's numbers to the test's own tolerance. An entry
  goes here only after its twin was seen to pass and the failure was seen to
  be the scale (e.g. a ratio of `1/sqrt(fan_in)`).
- `KERAS_INITIALISERS`: an absolute bound calibrated to the magnitude of
  Keras's default weights (our layers default to unit-normal weights, Keras's
  to small uniform or Glorot ones). The twin `<test>__keras_initialisers` runs
  the same body, our layer and its scales unchanged, with Keras's default
  initialisers (`keras_suite.keras_initialisers`).

No test here relies on Keras's default initialiser for its expected numbers
otherwise: the numeric tests set their weights (`set_weights`, `Constant`,
`"ones"`) or compare with a reference computed from the layer's own weights,
so the "plain numbers" twins keep our initialisers.

- `KERAS_TEMPERATURE`: attention's expected numbers are Keras's, whose
  softmax temperature is `1/sqrt(key_dim)`; u-μP's is `mult/head_dim`, part
  of the computation rather than a scale op. The twin
  `<test>__keras_temperature` runs the same body with every scale op removed
  and `mult = sqrt(key_dim)` (`keras_suite.keras_temperature`), where our
  layer must give Keras's numbers.

Any other category would be a Keras behaviour we deliberately do not have,
with the reason spelled out; there is none.

To find candidates after a change: `KERAS_SUITE_TWINS=all python -m pytest
tests/test_keras_layers.py` gives every other test a `__scaling_disabled` twin.
"""

import itertools

from tests.keras_suite import KERAS_INITIALISERS
from tests.keras_suite import KERAS_TEMPERATURE
from tests.keras_suite import PLAIN_NUMBERS

_DENSE = "the output is Keras's times 1/sqrt(fan_in) (the unit-scaled matmul)"
_LSTM = (
    "each gate's pre-activation is the unit-scaled matmuls of input and state, "
    "1/sqrt(fan_in) each, and their unit-scaled sum"
)
_GRU = (
    "the gates' pre-activations are the unit-scaled matmuls of input and state, 1/sqrt(fan_in) each, "
    "and the state is carried at unit RMS (× the rule's output scale)"
)
_ADD = "the sum of two inputs is scaled by 1/sqrt(2) (unit-scaled sum)"
_ACTIVATION_LAYER = "the output is Keras's times the rule's output scale (√2 for the plain ReLU, 1/RMS(f(z)) otherwise)"
_SOFTMAX = "the probabilities are times the softmax rule's output scale, a power of the size normalised over"
_ATTENTION = (
    "u-μP's attention logits are mult·q·k/head_dim, Keras's q·k/sqrt(key_dim) (the softmax's temperature), "
    "and the projections and output carry the unit-scaled ops' factors"
)
_EMBEDDING_INT4 = (
    "the absolute int4 quantization error bound (MSE < 1e-3) holds for Keras's "
    "uniform(-0.05, 0.05) embeddings; unit-normal embeddings are 35x larger, "
    "and so is the error"
)

_CONV = "the output is Keras's times 1/sqrt(taps) (`rules.conv`: kernel volume × input channels per group)"
_CONV_TRANSPOSE = (
    "the output is Keras's times 1/sqrt(taps) (`rules.conv`: kernel volume × input channels / stride volume); "
    "exactly Keras's where that is 1"
)
_SEPARABLE = "the depthwise and the pointwise op each scale by 1/sqrt(their taps) (`rules.conv`)"


def _every_case(test_id, count, reason):
    """All `count` parameterized cases `test_id0` ... of one test, as plain-numbers exceptions."""
    return {f"{test_id}{index}": (PLAIN_NUMBERS, reason) for index in range(count)}


def _conv1d_transpose_consistency():
    """The cases of Keras's `test_conv1d_transpose_consistency` whose scale is not 1.

    The test's grid (kernel_size 1-4 × strides 1-4 × padding × output_padding
    None or 1-4, in that order; output_padding >= strides skipped) on one
    input channel: taps = kernel_size / strides, 1 where they are equal.
    """
    grid = itertools.product(range(1, 5), range(1, 5), ("same", "valid"), (None, 1, 2, 3, 4))
    return {
        f"KerasConvTransposeCorrectnessTest_Conv1DTranspose::test_conv1d_transpose_consistency{index}": (
            PLAIN_NUMBERS, _CONV_TRANSPOSE)
        for index, (kernel_size, strides, _, output_padding) in enumerate(grid)
        if not (output_padding is not None and output_padding >= strides) and kernel_size != strides
    }


EXCEPTIONS = {
    # Dense
    "KerasDenseTest::test_dense_correctness": (PLAIN_NUMBERS, _DENSE),
    "KerasDenseTest::test_dense_no_activation": (PLAIN_NUMBERS, _DENSE),
    "KerasDenseTest::test_dense_without_activation_set": (PLAIN_NUMBERS, _DENSE),
    "KerasDenseTest::test_dense_sparse": (
        PLAIN_NUMBERS,
        _DENSE + ", against a reference computed from the kernel without it",
    ),
    # Embedding
    "KerasEmbeddingTest::test_quantize_int_int4": (KERAS_INITIALISERS, _EMBEDDING_INT4),
    "KerasEmbeddingTest::test_int4_quantization_block_size_grouped_block_64": (
        KERAS_INITIALISERS,
        _EMBEDDING_INT4,
    ),
    "KerasEmbeddingTest::test_int4_quantization_block_size_grouped_block_128": (
        KERAS_INITIALISERS,
        _EMBEDDING_INT4,
    ),
    "KerasEmbeddingTest::test_int4_quantization_block_size_per_channel_neg1": (
        KERAS_INITIALISERS,
        _EMBEDDING_INT4,
    ),
    "KerasEmbeddingTest::test_int4_quantization_block_size_per_channel_none": (
        KERAS_INITIALISERS,
        _EMBEDDING_INT4,
    ),
    # LSTM and LSTMCell
    "KerasLSTMTest::test_correctness0": (PLAIN_NUMBERS, _LSTM),
    "KerasLSTMTest::test_correctness1": (PLAIN_NUMBERS, _LSTM),
    "KerasLSTMTest::test_masking": (PLAIN_NUMBERS, _LSTM),
    "KerasLSTMTest::test_pass_initial_state": (PLAIN_NUMBERS, _LSTM),
    "KerasLSTMTest::test_statefulness": (PLAIN_NUMBERS, _LSTM),
    "KerasStackedRNNTest_LSTMCell::test_stacked_lstm_cell_mask": (PLAIN_NUMBERS, _LSTM),
    # GRU
    **{f"KerasGRUTest::{test}": (PLAIN_NUMBERS, _GRU) for test in (
        "test_correctness0", "test_correctness1", "test_legacy_implementation_argument", "test_masking",
        "test_pass_initial_state", "test_pass_return_state", "test_statefulness")},
    # The activation layers
    **{f"KerasReLUTest::{test}": (PLAIN_NUMBERS, _ACTIVATION_LAYER) for test in (
        "test_default_relu_no_args", "test_leaky_relu_correctness", "test_normal_relu_correctness",
        "test_relu_multidimensional_input", "test_relu_none_max_value_is_unlimited",
        "test_threshold_relu_correctness")},
    "KerasLeakyReLUTest::test_leaky_relu_correctness": (PLAIN_NUMBERS, _ACTIVATION_LAYER),
    "KerasELUTest::test_correctness": (PLAIN_NUMBERS, _ACTIVATION_LAYER),
    "KerasPReLUTest::test_prelu_correctness": (PLAIN_NUMBERS, _ACTIVATION_LAYER),
    **{f"KerasSoftmaxTest::{test}": (PLAIN_NUMBERS, _SOFTMAX) for test in (
        "test_softmax_correctness", "test_softmax_correctness_with_axis", "test_softmax_correctness_with_mask",
        "test_softmax_masked_values_are_zero_including_fully_masked")},
    # Dropout
    "KerasDropoutTest::test_dropout_rescaling": (
        PLAIN_NUMBERS,
        "kept values are scaled by 1/sqrt(1 - rate), not 1/(1 - rate): unit RMS, not unit mean",
    ),
    # Add
    "KerasMergingLayersTest::test_add_with_mask": (PLAIN_NUMBERS, _ADD),
    "KerasMergingLayersTest::test_correctness_static_add": (PLAIN_NUMBERS, _ADD),
    "KerasMergingLayersTest::test_correctness_dynamic_add": (PLAIN_NUMBERS, _ADD),
    "KerasMergingLayersTest::test_sparse_add": (PLAIN_NUMBERS, _ADD),
    # MultiHeadAttention
    "KerasMultiHeadAttentionTest::test_correctness_disable_flash_attention": (KERAS_TEMPERATURE, _ATTENTION),
    "KerasMultiHeadAttentionTest::test_correctness_enable_flash_attention": (KERAS_TEMPERATURE, _ATTENTION),
    # The convolutions: each numeric test compares with NumPy's plain convolution.
    **_every_case("KerasConvCorrectnessTest_Conv1D::test_conv1d", 5, _CONV),
    **_every_case("KerasConvCorrectnessTest_Conv2D::test_conv2d", 6, _CONV),
    **_every_case("KerasConvCorrectnessTest_Conv3D::test_conv3d", 5, _CONV),
    **_every_case("KerasConvTransposeCorrectnessTest_Conv1DTranspose::test_conv1d_transpose", 3, _CONV_TRANSPOSE),
    **_every_case("KerasConvTransposeCorrectnessTest_Conv2DTranspose::test_conv2d_transpose", 4, _CONV_TRANSPOSE),
    **_every_case("KerasConvTransposeCorrectnessTest_Conv3DTranspose::test_conv3d_transpose", 3, _CONV_TRANSPOSE),
    **_conv1d_transpose_consistency(),
    **_every_case("KerasDepthwiseConvCorrectnessTest_DepthwiseConv1D::test_depthwise_conv1d", 4, _CONV),
    **_every_case("KerasDepthwiseConvCorrectnessTest_DepthwiseConv2D::test_depthwise_conv2d", 3, _CONV),
    **_every_case("KerasSeparableConvCorrectnessTest_SeparableConv1D::test_separable_conv1d", 3, _SEPARABLE),
    **_every_case("KerasSeparableConvCorrectnessTest_SeparableConv2D::test_separable_conv2d", 3, _SEPARABLE),
}
