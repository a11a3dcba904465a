"""The functional graph that runs a Keras model, where it has one."""

import keras


def functional_graph(model):
    """The functional graph that runs `model`, or None for a subclassed model.

    A Sequential model runs through the functional model it builds inside
    (`model._functional`, None until it knows its input); a functional model
    is its own graph; a subclassed model's `call` is Python, with no graph to
    walk or run node by node.

    Examples:
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> functional_graph(model) is model._functional
        True
        >>> class Subclassed(keras.Model):
        ...     def call(self, x):
        ...         return x
        >>> functional_graph(Subclassed()) is None
        True
    """
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    # Duck-typed: the graph runner and the node table are what the callers use.
    return model if hasattr(model, "_run_through_graph") and hasattr(model, "_nodes_by_depth") else None
