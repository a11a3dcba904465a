"""The package's shape: small modules, short functions, rules in one home, no call back up the layers.

The limits are issue 17's: no module over 600 lines, no function over 60
lines except those docs/architecture.md names with the reason.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "keras_unitscale"
MODULE_LINES = 600
FUNCTION_LINES = 60
# Functions allowed past the limit, each with the reason docs/architecture.md gives.
LONG_FUNCTIONS = {
    # List Keras's own LSTM and GRU arguments one per line and hand them to the cell, as Keras's layers do.
    "keras_unitscale.layers.lstm.__init__",
    "keras_unitscale.layers.gru.__init__",
}
# Which part of the package may import which: data flows one way (rules and
# ops below layers; layers below models, conversion, analysis and the rest).
LOW_LEVELS = {
    "rules": {"rules", "checks", "constraints", "sizes"},
    # `autodiff` imports nothing of the package: the general activation rule differentiates with it.
    "ops": {"ops", "rules", "checks", "constraints", "sizes", "scale", "precision", "formats", "autodiff"},
    "weights": {"checks", "rules"},
}


def _modules():
    return sorted(path for path in PACKAGE.rglob("*.py"))


def _name(path):
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_modules_are_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MODULE_LINES, f"{_name(path)} has {lines} lines"


def test_functions_are_short():
    long = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                name = f"{_name(path)}.{node.name}"
                if length > FUNCTION_LINES and name not in LONG_FUNCTIONS:
                    long[name] = length
    assert not long, f"functions over {FUNCTION_LINES} lines: {long}"


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("keras_unitscale"):
            parts = node.module.split(".")
            if len(parts) == 1:
                yield from (alias.name for alias in node.names)
            else:
                yield parts[1]
        elif isinstance(node, ast.Import):
            yield from (a.name.split(".")[1] for a in node.names if a.name.startswith("keras_unitscale."))


@pytest.mark.parametrize("part", sorted(LOW_LEVELS))
def test_low_modules_import_nothing_above_them(part):
    paths = [PACKAGE / f"{part}.py"] if (PACKAGE / f"{part}.py").exists() else sorted((PACKAGE / part).glob("*.py"))
    assert paths
    above = {f"{_name(p)}: {name}" for p in paths for name in _imports(p) if name not in LOW_LEVELS[part]}
    assert not above, f"{part} imports from above it: {sorted(above)}"
