"""Rules of residual connections: the branch weights of one join, and u-μP's depth rule."""

from keras_unitscale import checks

__all__ = ["branch_weights", "join_ratios", "transformer_residual_scaling_rule", "residual_taus"]


def branch_weights(tau):
    """`(residual, skip)` weights of a residual join: `tau / sqrt(1 + tau²)` and `1 / sqrt(1 + tau²)`.

    A join applies them forward (`residual_add`), its split backward
    (`residual_split`), so that unit scale in gives unit scale out both ways.

    Examples:
        >>> branch_weights(0.75)
        (0.6, 0.8)
    """
    checks.non_negative("tau", tau)
    denominator = (1.0 + tau**2) ** 0.5
    return tau / denominator, 1.0 / denominator


def join_ratios(tau, skip_ratio):
    """Where a model's plain `skip + branch` becomes `residual_add(branch, skip, tau)`: the ratios (the converted
    tensor over the original's) that keep the function.

    Returns `(branch_ratio, stream_ratio)`: the ratio the branch must arrive
    at for the join to weigh it as the original adds it, given the skip at
    `skip_ratio`, and the joined stream's ratio, `skip_weight × skip_ratio`.

    Examples:
        >>> join_ratios(0.75, 1.0)
        (1.3333333333333335, 0.8)
    """
    branch_weight, skip_weight = branch_weights(tau)
    return skip_weight * skip_ratio / branch_weight, skip_weight * skip_ratio


def transformer_residual_scaling_rule(residual_mult=1.0, residual_attn_ratio=1.0):
    """u-μP's depth rule: the `tau` of each residual branch of a pre-norm transformer.

    For a stack that starts with an embedding and alternates attention and
    MLP branches (branch `index` 0, 2, 4, … attention; 1, 3, 5, … MLP; `layers`
    branches, two per block), it makes every attention branch contribute the
    same variance, every MLP branch the same, their totals relative to the
    embedding `residual_mult`, and attention relative to MLP
    `residual_attn_ratio`. With `α_mlp = residual_mult·sqrt(2 / (1 + ratio²))`,
    `α_attn = ratio·α_mlp` and `n_attn`, `n_mlp` the branches before `index`:
    `tau = α / sqrt(layers/2 + n_attn·α_attn² + n_mlp·α_mlp²)`.

    Args:
        residual_mult: contribution of the residual branches relative to the
            embedding, > 0.
        residual_attn_ratio: contribution of attention relative to MLP, > 0.

    Returns:
        `tau(index, layers)`, for `0 <= index < layers`.

    Examples:
        >>> rule = transformer_residual_scaling_rule()
        >>> [round(rule(i, 8), 3) for i in range(3)]
        [0.5, 0.447, 0.408]
    """
    checks.positive("residual_mult", residual_mult)
    checks.positive("residual_attn_ratio", residual_attn_ratio)
    alpha_mlp = residual_mult * (2.0 / (1.0 + residual_attn_ratio**2)) ** 0.5
    alpha_attn = residual_attn_ratio * alpha_mlp

    def tau(index, layers):
        checks.positive_int("layers", layers)
        checks.index("index", index, layers, "layers")
        n_attn = (index + 1) // 2
        n_mlp = index // 2
        alpha = alpha_attn if index % 2 == 0 else alpha_mlp
        return alpha / (layers / 2 + n_attn * alpha_attn**2 + n_mlp * alpha_mlp**2) ** 0.5

    return tau


def residual_taus(residual_rule, count):
    """The `tau` of each of `count` residual branches in stream order: "depth" for u-μP's depth rule, or one number.

    This is how `unit_scale` and KerasHub's unit-scaled backbones read a
    `residual_rule`: "depth" is `transformer_residual_scaling_rule()` over
    `count` branches; a number is every branch's `tau`.

    Examples:
        >>> [round(tau, 3) for tau in residual_taus("depth", 4)], residual_taus(0.5, 2)
        ([0.707, 0.577, 0.5, 0.447], [0.5, 0.5])
    """
    if residual_rule == "depth":
        rule = transformer_residual_scaling_rule()
        return [rule(index, count) for index in range(count)]
    return [float(checks.non_negative("residual_rule", residual_rule))] * count
