"""Keras's own layer tests, run against `keras_unitscale.layers`.

The test files are taken from the installed `keras` package when this module
is collected, and executed unmodified with only the class under test swapped
for ours (`tests/keras_suite.py` says how and which files). Each of Keras's
test classes appears here as `Keras<its name>`, e.g.
`tests/test_keras_layers.py::KerasDenseTest::test_dense_basics`.

Every test must pass except those in `tests/keras_suite_exceptions.py`:
strict xfails, and for each whose only difference is the documented scale
("plain numbers") a twin `<test>__scaling_disabled` that runs the same body
without the scale ops and must pass.

TensorFlow only: CI runs the large suites on one backend, and some of Keras's
tests (export, sparse and ragged inputs) are TensorFlow's anyway.
"""

import collections
import pathlib
import traceback

import keras
import pytest

if keras.backend.backend() != "tensorflow":
    pytest.skip(
        "Keras's own layer test files run on the TensorFlow backend only (CI runs "
        f"the large suites on one backend); this is {keras.backend.backend()!r}.",
        allow_module_level=True,
    )

from tests import keras_suite  # noqa: E402
from tests.keras_suite_exceptions import EXCEPTIONS  # noqa: E402
from tests.keras_suite_exceptions import KERAS_INITIALISERS  # noqa: E402
from tests.keras_suite_exceptions import KERAS_TEMPERATURE  # noqa: E402
from tests.keras_suite_exceptions import PLAIN_NUMBERS  # noqa: E402

@pytest.fixture(autouse=True)
def _seeded():
    """Each test from the same seed, whichever tests ran before it in its worker.

    Keras's tests draw their data from NumPy's global generator, unseeded, so
    under `pytest -n` a test's numbers depended on its neighbours: on one
    draw in CI, `test_enable_lora_conv3d` saw a unit-scale LoRA factor's one
    SGD(0.01) update fall below float32's resolution.
    """
    keras.utils.set_random_seed(0)


# Generated class name -> what loading its file gave; exceptions' test ids that were collected.
_CLASSES = {}
_USED_EXCEPTIONS = set()


def _skipped(reason):
    def test():
        pytest.skip(reason)

    return test


def _failed_to_load(suite, error_text):
    def test():
        pytest.fail(
            f"Executing keras/{suite.file.split('/', 1)[1]} with `{suite.class_name}` swapped "
            f"failed before any test ran:\n{error_text}",
            pytrace=False,
        )

    return test


def _generate():
    """The module's generated tests, by name; fills `_CLASSES` and `_USED_EXCEPTIONS`.

    A function, so that no loop variable holding a test class is left in the
    module for pytest to collect a second time.
    """
    tests = {}
    for suite in keras_suite.SUITES:
        stem = suite.keras_module.rpartition(".")[2]
        try:
            loaded = keras_suite.load(suite)
        except Exception:  # reported as this suite's failing test, not a collection error
            tests[f"test_keras_{stem}"] = _failed_to_load(suite, traceback.format_exc())
            continue
        _CLASSES.update(dict.fromkeys(loaded.class_names, loaded))
        if loaded.skip_reason:
            tests[f"test_keras_{stem}"] = _skipped(loaded.skip_reason)
            continue
        for name, cls in loaded.classes.items():
            assert name not in tests and name not in globals(), (
                f"two Keras test classes would both be {name}"
            )
            tests[name], _, used = keras_suite.build_test_class(name, cls, loaded, EXCEPTIONS)
            _USED_EXCEPTIONS.update(used)
    return tests


globals().update(_generate())


def test_exceptions_name_collected_tests():
    """Every listed exception is a test that ran here, with a category and a reason.

    An entry whose test is gone (renamed in Keras, or dropped as no longer
    concerning the class) would otherwise hide nothing and rot. Entries for a
    file that is skipped (our class missing) cannot be checked until it runs.
    """
    stale = []
    for test_id, entry in EXCEPTIONS.items():
        assert isinstance(entry, tuple) and len(entry) == 2 and all(
            isinstance(part, str) and part.strip() for part in entry
        ), f"{test_id}: an exception is (category, reason), both non-empty. Received: {entry!r}"
        class_name = test_id.split("::")[0]
        if class_name not in _CLASSES:
            stale.append(f"{test_id} (no Keras test class {class_name})")
        elif _CLASSES[class_name].skip_reason is None and test_id not in _USED_EXCEPTIONS:
            stale.append(f"{test_id} (no such test)")
    assert not stale, "Exceptions that name no collected test: " + ", ".join(stale)


def test_the_readme_counts_the_exceptions_as_listed():
    """The README reports this suite's counts: those of the exceptions must follow the list when it changes."""
    readme = " ".join((pathlib.Path(__file__).parents[1] / "README.md").read_text().split())
    counts = collections.Counter(category for category, _ in EXCEPTIONS.values())
    for phrase in (f"and {len(EXCEPTIONS)} are listed", f"{counts[PLAIN_NUMBERS]} whose expected numbers are the plain",
                   f"{counts[KERAS_INITIALISERS]} int4 embedding tests", f"{counts[KERAS_TEMPERATURE]} attention tests",
                   f"Each of the {len(EXCEPTIONS)} is a strict expected failure", f"the {len(EXCEPTIONS)} twins"):
        assert phrase in readme, f"README.md should say {phrase!r} (tests/keras_suite_exceptions.py's count)"
