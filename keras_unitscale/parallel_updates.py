"""Our Adam's and RMSprop's update of every variable at once on PyTorch, as Keras's own torch optimizers do it.

Keras runs an optimizer's `update_step` once per variable, a dozen
`keras.ops` calls each. On PyTorch every eager op costs Python time, so
Keras's Adam and RMSprop there update all the variables together with
`torch._foreach_*` calls (`keras/src/backend/torch/optimizers/torch_adam.py`,
`torch_rmsprop.py`). Ours are Keras's with a learning-rate multiplier and an
epsilon per variable and their own weight decay (`optimizers.UnitScaledOptimizer`);
`update` is that update in the same form, the per-variable factors as
lists of scalars, with the arithmetic of Keras's `update_step`.
"""

import keras

__all__ = ["applies", "update"]


def applies(optimizer, grads, variables):
    """Whether `update` can take this step: PyTorch, an Adam or RMSprop, dense gradients, one floating dtype."""
    if keras.backend.backend() != "torch" or not isinstance(optimizer, (keras.optimizers.Adam, keras.optimizers.RMSprop)):
        return False
    if optimizer.epsilon_power is None or not variables:
        return False
    dtypes = {variable.value.dtype for variable in variables} | {grad.dtype for grad in grads}
    return len(dtypes) == 1 and next(iter(dtypes)).is_floating_point and not any(grad.is_sparse for grad in grads)


def update(optimizer, grads, variables, learning_rate):
    """The optimizer's step for `variables` with each one's learning-rate multiplier, epsilon and weight decay."""
    import torch

    with torch.no_grad():
        values = [variable.value for variable in variables]
        dtype = values[0].dtype
        indices = [optimizer._get_variable_index(variable) for variable in variables]
        learning_rate = torch.as_tensor(keras.ops.convert_to_tensor(learning_rate), dtype=dtype)
        # These variables' entries of the per-variable vectors: a handful of ops per step, not a handful per variable.
        lr_multipliers = _entries(optimizer._lr_multipliers, indices, dtype)
        _decay(optimizer, variables, values, learning_rate, lr_multipliers)
        step = _adam if isinstance(optimizer, keras.optimizers.Adam) else _rmsprop
        step(optimizer, grads, variables, values, indices, learning_rate, lr_multipliers)


def _adam(optimizer, grads, variables, values, indices, learning_rate, lr_multipliers):
    """`keras.optimizers.Adam.update_step`'s arithmetic, every variable at once."""
    import torch

    dtype = values[0].dtype
    step = torch.as_tensor(keras.ops.convert_to_tensor(optimizer.iterations + 1), dtype=dtype)
    beta_1_power = torch.pow(torch.as_tensor(optimizer.beta_1, dtype=dtype), step)
    beta_2_power = torch.pow(torch.as_tensor(optimizer.beta_2, dtype=dtype), step)
    alpha = learning_rate * torch.sqrt(1 - beta_2_power) / (1 - beta_1_power)
    alphas = list(torch.unbind(alpha * lr_multipliers))

    momentums = [optimizer._momentums[i].value for i in indices]
    velocities = [optimizer._velocities[i].value for i in indices]
    # m += (g - m)(1 - β₁) and v += (g² - v)(1 - β₂), as Keras's update_step
    # writes them: each one in-place `lerp` (which computes `m + w·(g - m)`
    # for weights below 1/2).
    torch._foreach_lerp_(momentums, grads, 1 - optimizer.beta_1)
    torch._foreach_lerp_(velocities, torch._foreach_mul(grads, grads), 1 - optimizer.beta_2)
    if optimizer.amsgrad:
        maxima = [optimizer._velocity_hats[i].value for i in indices]
        torch._foreach_maximum_(maxima, velocities)
        velocities = maxima
    epsilons = _epsilons(optimizer, variables, indices, dtype)
    steps = torch._foreach_div(torch._foreach_mul(momentums, alphas),
                               torch._foreach_add(torch._foreach_sqrt(velocities), epsilons))
    torch._foreach_sub_(values, steps)


def _rmsprop(optimizer, grads, variables, values, indices, learning_rate, lr_multipliers):
    """`keras.optimizers.RMSprop.update_step`'s arithmetic, every variable at once (epsilon under the root)."""
    import torch

    rho, dtype = optimizer.rho, values[0].dtype
    velocities = [optimizer._velocities[i].value for i in indices]
    torch._foreach_mul_(velocities, rho)
    torch._foreach_add_(velocities, torch._foreach_mul(grads, grads), alpha=1 - rho)
    denominators = torch._foreach_add(velocities, _epsilons(optimizer, variables, indices, dtype))
    if optimizer.centered:
        averages = [optimizer._average_gradients[i].value for i in indices]
        torch._foreach_mul_(averages, rho)
        torch._foreach_add_(averages, grads, alpha=1 - rho)
        torch._foreach_sub_(denominators, torch._foreach_mul(averages, averages))
    torch._foreach_sqrt_(denominators)
    rates = list(torch.unbind(learning_rate * lr_multipliers))
    increments = torch._foreach_div(torch._foreach_mul(grads, rates), denominators)
    if optimizer.momentum > 0:
        momentums = [optimizer._momentums[i].value for i in indices]
        torch._foreach_mul_(momentums, optimizer.momentum)
        torch._foreach_add_(momentums, increments)
        increments = momentums
    torch._foreach_sub_(values, increments)


def _entries(vector, indices, dtype):
    """The entries `indices` of one of the optimizer's per-variable vectors."""
    import torch

    return vector.value[torch.as_tensor(indices, device=vector.value.device)].to(dtype)


def _epsilons(optimizer, variables, indices, dtype):
    """Each variable's epsilon (`UnitScaledOptimizer.scaled_epsilon` of its multiplier times its batch factor)."""
    import torch

    multipliers = _entries(optimizer._epsilon_multipliers, indices, dtype)
    factors = [optimizer.epsilon_batch_factor(variable) for variable in variables]
    if all(isinstance(factor, float) for factor in factors):
        if any(factor != 1.0 for factor in factors):  # 1 but under InPlaceEpsilon
            multipliers = multipliers * torch.tensor(factors, dtype=dtype, device=multipliers.device)
    else:
        multipliers = multipliers * torch.stack(
            [torch.as_tensor(keras.ops.convert_to_tensor(factor), dtype=dtype) for factor in factors])
    return list(torch.unbind(optimizer.scaled_epsilon(multipliers)))


def _decay(optimizer, variables, values, learning_rate, lr_multipliers):
    """The optimizer's decoupled weight decay (`UnitScaledOptimizer.decay_fraction`), for all variables at once."""
    import torch

    if not optimizer.weight_decay:
        return
    decayed, factors = [], []
    for variable, value, lr_multiplier in zip(variables, values, torch.unbind(lr_multipliers)):
        if optimizer._use_weight_decay(variable):
            decayed.append(value)
            factors.append(optimizer.decay_fraction(learning_rate, lr_multiplier))
    if decayed:
        torch._foreach_sub_(decayed, torch._foreach_mul(decayed, factors))
