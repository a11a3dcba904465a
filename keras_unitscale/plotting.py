"""Figures for the library's plots, made without pyplot so the user's matplotlib backend is left alone."""


def new_figure(feature, figsize, **subplots):
    """A matplotlib `Figure` and its axes (`Figure.subplots(**subplots)`).

    Args:
        feature: the function asking, named in the error when matplotlib is missing.
        figsize: (width, height) in inches.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(f"`{feature}` needs matplotlib: pip install 'keras-unitscale[plot]'") from error
    figure = Figure(figsize=figsize)
    return figure, figure.subplots(**subplots)
