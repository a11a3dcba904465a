import keras
import numpy as np
import pytest

import keras_unitscale


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace["keras"] = keras
    doctest_namespace["np"] = np
    doctest_namespace["keras_unitscale"] = keras_unitscale
