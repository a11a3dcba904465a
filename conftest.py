import keras
import numpy as np
import pytest

import keras_unitscale


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace["keras"] = keras
    doctest_namespace["np"] = np
    doctest_namespace["keras_unitscale"] = keras_unitscale


def _importable(name):
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


# The KerasHub twins import `keras_hub`, an optional extra (`[hub]`): their doctests need it installed.
# Every module of `keras_unitscale.hub` but its `__init__` imports `keras_hub`.
collect_ignore_glob = [] if _importable("keras_hub") else ["keras_unitscale/hub/[!_]*.py"]
