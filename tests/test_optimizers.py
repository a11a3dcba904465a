"""u-μP optimizers: per-variable learning rates, independent weight decay, and Keras's machinery."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_unitscale import layers as L
from keras_unitscale import optimizers as O
from tests.helpers import BACKEND
from tests.helpers import unit_normal

# torch.compile takes tens of seconds a model on CPU; XLA is what jit means elsewhere.
JIT = BACKEND != "torch"


def _model(width=32):
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((16,)),
            L.Dense(width, activation="relu", role="input", name="input"),
            L.Dense(width, activation="relu", name="hidden"),
            L.LayerNormalization(name="norm"),
            L.Dense(1, role="output", name="readout"),
        ],
        name="mlp",
    )


def _multipliers(optimizer, model):
    return {v.path.removeprefix("mlp/"): optimizer.lr_multiplier(v) for v in model.trainable_variables}


def _data(n=64):
    x = unit_normal(n, 16)
    return x, (x[:, :1] * x[:, 1:2]).astype("float32")


def test_default_factors_are_u_mup():
    model = _model()
    optimizer = O.Adam(0.01)
    optimizer.build(model.trainable_variables)
    assert _multipliers(optimizer, model) == pytest.approx(
        {"input/kernel": 32**-0.5, "input/bias": 1.0, "hidden/kernel": 32**-0.5, "hidden/bias": 1.0,
         "norm/gamma": 1.0, "norm/beta": 1.0, "readout/kernel": 1.0, "readout/bias": 1.0}
    )
    sgd = O.SGD(0.1, readout_constraint="to_output_scale")
    sgd.build(model.trainable_variables)
    assert sgd.lr_multiplier(model.get_layer("hidden").kernel) == pytest.approx(32**0.5)
    assert sgd.lr_multiplier(model.get_layer("norm").gamma) == pytest.approx(32.0)


def test_overrides_and_no_parametrization():
    model = _model()
    optimizer = O.Adam(0.01, lr_multipliers={"hidden/kernel": 3.0, "bias": 0.5})
    optimizer.build(model.trainable_variables)
    factors = _multipliers(optimizer, model)
    assert factors["hidden/kernel"] == 3.0 and factors["input/bias"] == 0.5
    assert factors["input/kernel"] == pytest.approx(32**-0.5)
    plain = O.Adam(0.01, parametrization=None)
    plain.build(model.trainable_variables)
    assert set(_multipliers(plain, model).values()) == {1.0}


@pytest.mark.parametrize(
    "ours, keras_optimizer",
    [
        (lambda: O.Adam(0.01, beta_1=0.8), lambda lr: keras.optimizers.Adam(lr, beta_1=0.8)),
        (lambda: O.AdamW(0.01, weight_decay=0.0), lambda lr: keras.optimizers.Adam(lr)),
        (lambda: O.SGD(0.1, momentum=0.9, nesterov=True), lambda lr: keras.optimizers.SGD(lr, momentum=0.9, nesterov=True)),
        (lambda: O.RMSprop(0.01, momentum=0.5, centered=True),
         lambda lr: keras.optimizers.RMSprop(lr, momentum=0.5, centered=True)),
        (lambda: O.Lion(1e-3, beta_1=0.8), lambda lr: keras.optimizers.Lion(lr, beta_1=0.8)),
    ],
    ids=["adam", "adamw", "sgd-nesterov", "rmsprop", "lion"],
)
def test_each_variable_steps_as_keras_does_with_its_learning_rate(ours, keras_optimizer):
    model = _model()
    optimizer = ours()
    optimizer.build(model.trainable_variables)
    grads = [ops.convert_to_tensor(unit_normal(*v.shape, seed=i)) for i, v in enumerate(model.trainable_variables)]
    before = [ops.convert_to_numpy(v) for v in model.trainable_variables]
    for _ in range(3):
        optimizer.apply(grads, model.trainable_variables)
    for variable, start, grad in zip(model.trainable_variables, before, grads):
        reference = keras.Variable(start)
        plain = keras_optimizer(float(ops.convert_to_numpy(optimizer.learning_rate)) * optimizer.lr_multiplier(variable))
        for _ in range(3):
            plain.apply([grad], [reference])
        np.testing.assert_allclose(ops.convert_to_numpy(variable), ops.convert_to_numpy(reference), rtol=1e-5, atol=1e-6)


def test_a_weight_multiplier_divides_the_learning_rate():
    model = _model()
    hidden = model.get_layer("hidden")
    hidden.set_weight_multiplier("kernel", 4.0)
    optimizer = O.Adam(0.01, lr_multipliers={"hidden/bias": 2.0})
    optimizer.build(model.trainable_variables)
    assert optimizer.lr_multiplier(hidden.kernel) == pytest.approx(32**-0.5 / 4)
    assert optimizer.lr_multiplier(hidden.bias) == 2.0


def test_adamw_default_decay_is_keras_at_its_defaults():
    # Keras: 0.004 × learning rate 0.001 a step; ours is independent of the learning rate.
    assert O.AdamW().weight_decay == pytest.approx(0.004 * 0.001)


def test_independent_weight_decay_ignores_the_learning_rate():
    model = _model()
    zero_grads = [np.zeros(v.shape, "float32") for v in model.trainable_variables]
    kernel = model.get_layer("hidden").kernel
    start = ops.convert_to_numpy(kernel)
    for lr in (0.1, 0.001):
        kernel.assign(start)
        optimizer = O.AdamW(lr, weight_decay=0.01)
        optimizer.build(model.trainable_variables)
        optimizer.apply(zero_grads, model.trainable_variables)
        # A zero gradient leaves only the decay: 1 - weight_decay, whatever the learning rate.
        np.testing.assert_allclose(ops.convert_to_numpy(kernel), start * 0.99, rtol=1e-6)
    kernel.assign(start)
    coupled = O.AdamW(0.1, weight_decay=0.01, independent_weight_decay=False)
    coupled.build(model.trainable_variables)
    coupled.apply(zero_grads, model.trainable_variables)
    np.testing.assert_allclose(ops.convert_to_numpy(kernel), start * (1 - 0.01 * 0.1 * 32**-0.5), rtol=1e-6)


def test_independent_weight_decay_follows_the_schedule():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    optimizer = O.AdamW(schedule, weight_decay=0.01)
    assert optimizer.peak_learning_rate == 0.1
    variable = keras.Variable(np.ones((2, 2), "float32"))
    optimizer.build([variable])
    for _ in range(2):
        optimizer.apply([np.zeros((2, 2), "float32")], [variable])
    # Steps at η/η_peak = 1 then 1/2.
    np.testing.assert_allclose(ops.convert_to_numpy(variable), np.full((2, 2), 0.99 * 0.995), rtol=1e-6)


def test_a_schedule_without_a_peak_needs_one_for_independent_decay():
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([10], [0.1, 0.01])
    with pytest.raises(ValueError, match="peak_learning_rate"):
        O.AdamW(schedule, weight_decay=0.01)
    assert O.AdamW(schedule, weight_decay=0.01, peak_learning_rate=0.1).peak_learning_rate == 0.1


@pytest.mark.parametrize("make", [lambda: O.Adam(0.01), lambda: O.SGD(0.05, momentum=0.9)], ids=["adam", "sgd"])
def test_fit_with_jit_a_schedule_and_loss_scaling(make):
    x, y = _data()
    model = _model()
    model.compile(keras.optimizers.LossScaleOptimizer(make()), "mse", jit_compile=JIT)
    history = model.fit(x, y, epochs=4, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    schedule = keras.optimizers.schedules.CosineDecay(0.01, decay_steps=16, warmup_steps=4, warmup_target=0.02)
    model = _model()
    model.compile(O.Adam(schedule), "mse", jit_compile=JIT)
    history = model.fit(x, y, epochs=4, batch_size=16, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_keras_does_not_swap_our_optimizers_for_fused_ones():
    # On PyTorch, Keras replaces exact Adam/SGD instances by fused versions
    # that bypass `update_step`.
    assert type(O.Adam()) is O.Adam and type(O.SGD()) is O.SGD and type(O.AdamW()) is O.AdamW
    assert type(O.RMSprop()) is O.RMSprop and type(O.Lion()) is O.Lion


def test_config_round_trip():
    optimizer = O.SGD(0.05, momentum=0.9, lr_multipliers={"kernel": 2.0}, weight_decay=0.1,
                      readout_constraint="to_output_scale")
    clone = O.SGD.from_config(optimizer.get_config())
    for key in ("lr_multipliers", "readout_constraint", "weight_decay", "peak_learning_rate",
                "independent_weight_decay", "parametrization", "momentum"):
        assert getattr(clone, key) == getattr(optimizer, key)
    for ours in (O.Adam(0.01), O.RMSprop(0.01, rho=0.8), O.Lion(1e-4, beta_2=0.95)):
        restored = keras.optimizers.deserialize(keras.optimizers.serialize(ours))
        assert type(restored) is type(ours) and restored.get_config() == ours.get_config()


@pytest.mark.parametrize(
    "make, keras_optimizer, power",
    [(O.Adam, keras.optimizers.Adam, 1), (O.AdamW, keras.optimizers.Adam, 1), (O.RMSprop, keras.optimizers.RMSprop, 2)],
    ids=["adam", "adamw", "rmsprop"],
)
def test_an_epsilon_multiplier_is_keras_with_that_epsilon(make, keras_optimizer, power):
    # Gradients of 1e-7, Keras's default epsilon: the one place epsilon shows.
    variables = [keras.Variable(np.zeros(3, "float32"), name="a"), keras.Variable(np.zeros(3, "float32"), name="b")]
    optimizer = make(0.01, parametrization=None, weight_decay=0.0)
    optimizer.build(variables)
    assert optimizer.epsilon_multiplier(variables[0]) == 1.0
    optimizer.set_epsilon_multiplier(variables[1], 10.0)
    grads = [ops.convert_to_tensor(np.full(3, 1e-7, "float32"))] * 2
    for _ in range(2):
        optimizer.apply(grads, variables)
    # RMSprop adds epsilon to the squared gradient: a ratio r of gradients needs r² there.
    for variable, epsilon in zip(variables, (1e-7, 1e-7 * 10.0**power)):
        reference = keras.Variable(np.zeros(3, "float32"))
        plain = keras_optimizer(0.01, epsilon=epsilon)
        for _ in range(2):
            plain.apply([grads[0]], [reference])
        np.testing.assert_allclose(ops.convert_to_numpy(variable), ops.convert_to_numpy(reference), rtol=1e-5)
    assert optimizer.epsilon == 1e-7  # the per-variable value is lent for the update only
    with pytest.raises(ValueError, match="value=0"):
        optimizer.set_epsilon_multiplier(variables[0], 0)
    for without_epsilon in (O.SGD(0.1), O.Lion(1e-4)):
        without_epsilon.build(variables)
        with pytest.raises(ValueError, match="no `epsilon`"):
            without_epsilon.epsilon_multiplier(variables[0])


def test_factors_are_saved_with_the_model(tmp_path):
    x, y = _data()
    model = _model()
    optimizer = O.Adam(0.01)
    model.compile(optimizer, "mse")
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    hidden = model.get_layer("hidden").kernel
    optimizer.set_lr_multiplier(hidden, 0.3)
    optimizer.set_epsilon_multiplier(hidden, 5.0)
    model.save(tmp_path / "model.keras")
    reloaded = keras.saving.load_model(tmp_path / "model.keras")
    assert type(reloaded.optimizer) is O.Adam
    assert reloaded.optimizer.lr_multiplier(reloaded.get_layer("hidden").kernel) == pytest.approx(0.3)
    assert reloaded.optimizer.epsilon_multiplier(reloaded.get_layer("hidden").kernel) == pytest.approx(5.0)
    # Training goes on from the same state in both.
    np.testing.assert_allclose(
        model.train_on_batch(x[:16], y[:16]), reloaded.train_on_batch(x[:16], y[:16]), rtol=1e-5
    )


def test_errors_name_the_value():
    with pytest.raises(ValueError, match="lr_multipliers"):
        O.Adam(lr_multipliers=[("kernel", 2.0)])
    with pytest.raises(ValueError, match=r"lr_multipliers\['kernel'\]"):
        O.Adam(lr_multipliers={"kernel": -1.0})
    with pytest.raises(ValueError, match="regular expression"):
        O.Adam(lr_multipliers={"(": 1.0})
    with pytest.raises(ValueError, match="parametrization='mup'"):
        O.Adam(parametrization="mup")
    with pytest.raises(ValueError, match="readout_constraint='to_output_scale'"):
        O.RMSprop(readout_constraint="to_output_scale")
    with pytest.raises(ValueError, match="not built"):
        O.Adam().lr_multiplier(keras.Variable(1.0))
    optimizer = O.Adam()
    optimizer.build([keras.Variable(1.0)])
    with pytest.raises(ValueError, match="does not train this variable"):
        optimizer.lr_multiplier(keras.Variable(2.0, name="stranger"))


def test_scaled_schedule():
    schedule = O.ScaledSchedule(keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5), 3.0)
    assert float(schedule(10)) == pytest.approx(0.15)
    clone = O.ScaledSchedule.from_config(schedule.get_config())
    assert float(clone(20)) == pytest.approx(0.075)
    with pytest.raises(ValueError, match="factor"):
        O.ScaledSchedule(keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5), 0.0)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the distribution-aware update path is TensorFlow's")
def test_trains_in_a_tf_distribution_strategy_scope():
    # One replica: the distribution-aware update path runs; many replicas are
    # the distributed-training tests' concern.
    import tensorflow as tf

    x, y = _data()
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        model = _model()
        model.compile(O.AdamW(0.01, weight_decay=0.01), "mse")
    history = model.fit(x, y, epochs=3, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


@pytest.mark.parametrize("width, depth", [(32, 2), (64, 2), (32, 4)])
def test_every_transformer_variable_gets_the_table_value(width, depth):
    inputs = keras.Input((8,), dtype="int32")
    x = L.Embedding(40, width, name="embed")(inputs)
    for i in range(depth):
        x = L.TransformerBlock(num_heads=4, index=i, depth=depth, name=f"block{i}")(x)
    x = L.LayerNormalization(name="final_norm")(x)
    model = keras.Model(inputs, L.Dense(40, role="output", name="readout")(x))
    optimizer = O.Adam(0.01)
    optimizer.build(model.trainable_variables)
    stack = depth**-0.5
    expected_by_name = {
        "embed/embeddings": width**-0.5,
        "attention/query/kernel": width**-0.5 * stack,
        "attention/key/kernel": width**-0.5 * stack,
        "attention/value/kernel": width**-0.5 * stack,
        "attention/attention_output/kernel": width**-0.5 * stack,  # fan-in: heads × key_dim = width
        "attention_norm/gamma": stack,
        "mlp_norm/gamma": stack,
        "mlp_up/kernel": width**-0.5 * stack,
        "mlp_down/kernel": (4 * width) ** -0.5 * stack,
        "final_norm/gamma": 1.0,
        "final_norm/beta": 1.0,
        "readout/kernel": 1.0,
        "readout/bias": 1.0,
    }
    for variable in model.trainable_variables:
        (expected,) = [value for name, value in expected_by_name.items() if variable.path.endswith(name)]
        assert optimizer.lr_multiplier(variable) == pytest.approx(expected), variable.path


def _trained_weights(optimizer):
    from keras_unitscale import models

    keras.utils.set_random_seed(0)
    model = models.mlp(8, width=16, depth=2, output_dim=3, output_activation=None)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 8)).astype("float32"), rng.normal(size=(64, 3)).astype("float32")
    model.compile(optimizer, "mse")
    optimizer.build(model.trainable_variables)
    for i, variable in enumerate(model.trainable_variables):  # epsilons that differ, as a callback's matched ones do
        optimizer.set_epsilon_multiplier(variable, 10.0 ** (i % 3 - 1))
    model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    return [ops.convert_to_numpy(v) for v in model.weights]


@pytest.mark.parametrize("make", [lambda: O.Adam(0.01, epsilon=1e-3), lambda: O.AdamW(0.01, weight_decay=0.1),
                                  lambda: O.AdamW(0.01, weight_decay=0.01, independent_weight_decay=False),
                                  lambda: O.Adam(0.01, amsgrad=True), lambda: O.RMSprop(0.01, epsilon=1e-3),
                                  lambda: O.RMSprop(0.01, momentum=0.9, centered=True, weight_decay=0.1, epsilon=1e-3)],
                         ids=["adam", "adamw", "adamw_dependent", "amsgrad", "rmsprop", "rmsprop_centered_momentum"])
def test_on_pytorch_adam_and_rmsprop_update_every_variable_at_once_as_they_would_one_by_one(make, monkeypatch):
    # Keras's torch Adam and RMSprop update all variables with `torch._foreach_*` calls; ours do too
    # (`parallel_updates`), with their per-variable learning rates, epsilons and decay: the same weights after 12
    # steps as the per-variable path.
    from keras_unitscale import parallel_updates

    taken = []
    update = parallel_updates.update
    monkeypatch.setattr(parallel_updates, "update", lambda *args: taken.append(1) or update(*args))
    together = _trained_weights(make())
    assert bool(taken) == (BACKEND == "torch")
    monkeypatch.setattr(parallel_updates, "applies", lambda *args: False)
    one_by_one = _trained_weights(make())
    for a, b in zip(together, one_by_one):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="counts the ops of TensorFlow's graph, which runs them one by one "
                    "on a CPU (XLA is off there): elsewhere XLA fuses them or PyTorch updates every variable at once")
@pytest.mark.parametrize("ours, theirs, extra_per_variable", [(O.Adam, keras.optimizers.Adam, 2),
                                                              (O.RMSprop, keras.optimizers.RMSprop, 3)])
def test_the_update_adds_only_its_multipliers_to_kerass_graph(ours, theirs, extra_per_variable):
    """Per step, ours reads its two multiplier vectors once and splits each into its entries (four ops); per
    variable it applies them (a cast each, no-ops in float32, a product each), and RMSprop's epsilon takes its
    square. Adam's power of 1 and a batch factor of 1 add no op."""
    import collections

    import tensorflow as tf

    model = _model()
    variables = model.trainable_variables
    grads = [ops.ones_like(v) for v in variables]

    def graph_ops(optimizer):
        optimizer.build(variables)
        graph = tf.function(lambda: optimizer.apply(grads, variables)).get_concrete_function().graph
        # Not counted: constants, identities, and the placeholders that capture the variables' handles.
        return collections.Counter(op.type for op in graph.get_operations()
                                   if op.type not in ("Const", "Identity", "Placeholder"))

    added = graph_ops(ours(0.01)) - graph_ops(theirs(0.01))
    assert sum(added.values()) <= extra_per_variable * len(variables) + 4, added
    assert added["ReadVariableOp"] == 2, added
    assert "Pow" not in added or ours is O.RMSprop, added


@pytest.mark.parametrize("ours, theirs, added", [
    (O.Adam, keras.optimizers.Adam, 4), (O.RMSprop, keras.optimizers.RMSprop, 4), (O.SGD, keras.optimizers.SGD, 1),
    (O.Lion, keras.optimizers.Lion, 1)])
@pytest.mark.parametrize("width", [8, 32])
def test_the_state_adds_a_few_arrays_whatever_the_number_of_variables(ours, theirs, added, width):
    # JAX's training step takes the optimizer's state in and out array by array: one scalar per variable and
    # kind cost a KerasHub-sized model's step several percent there. Ours keep a vector per kind (learning rate;
    # epsilon, its batch powers and their reference rows).
    for depth in (1, 3):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((16,)), *[L.Dense(width, name=f"d{i}") for i in range(depth)]])
        variables = model.trainable_variables
        optimizer, keras_optimizer = ours(0.01), theirs(0.01)
        optimizer.build(variables)
        keras_optimizer.build(variables)
        assert len(optimizer.variables) == len(keras_optimizer.variables) + added
        # Each variable keeps its own entry.
        before = [optimizer.lr_multiplier(v) for v in variables]
        optimizer.set_lr_multiplier(variables[-1], 0.5)
        assert [optimizer.lr_multiplier(v) for v in variables] == [*before[:-1], 0.5]
        optimizer.reset_lr_multipliers([variables[-1]])  # its default back, the others untouched
        assert [optimizer.lr_multiplier(v) for v in variables] == before
