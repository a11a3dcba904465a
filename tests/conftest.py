import keras
import pytest


@pytest.fixture(autouse=True)
def _float32_policy():
    """Every test starts and ends in float32, whatever the test before it set."""
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")
