"""The README's examples run, and its test command is the one CI runs."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_examples_run(index, capsys):
    exec(compile(PYTHON_BLOCKS[index], f"README.md python block {index}", "exec"), {})


def test_quickstart_has_two_commands_and_ci_runs_the_test_one():
    commands = re.findall(r"```bash\n(.*?)\n```", README.split("## Quickstart")[1].split("\n## ")[0], flags=re.S)
    assert commands == ['pip install -e ".[demo]" && keras-unitscale demo', 'pip install -e ".[test]" && python -m pytest -n auto']
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()
