"""The README's and the documentation's examples run, and the README's test command is the one CI runs."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))


def _python_blocks(page):
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def _distinct_python_blocks():
    """Each page's python blocks, a block the README shares with a page run once, under the README's name."""
    seen = set()
    for page in PAGES:
        for index, block in enumerate(_python_blocks(page)):
            if block not in seen:
                seen.add(block)
                yield pytest.param(block, f"{page.relative_to(ROOT)} python block {index}",
                                   id=f"{page.relative_to(ROOT)}-{index}")


PYTHON_BLOCKS = list(_distinct_python_blocks())


def _quickstart_commands(text):
    return re.findall(r"```bash\n(.*?)\n```", text.split("## Quickstart")[1].split("\n## ")[0], flags=re.S)


@pytest.mark.parametrize("block, name", PYTHON_BLOCKS)
def test_python_examples_run(block, name, capsys):
    if "import keras_hub" in block:
        pytest.importorskip("keras_hub")  # the `[hub]` extra: CI installs it after the README's command
    exec(compile(block, name, "exec"), {})


def test_each_readme_example_is_also_on_a_page_of_the_documentation():
    readme_blocks = _python_blocks(ROOT / "README.md")
    page_blocks = [block for page in PAGES[1:] for block in _python_blocks(page)]
    assert readme_blocks and all(block in page_blocks for block in readme_blocks)


def test_quickstart_has_two_commands_and_ci_runs_the_test_one():
    commands = _quickstart_commands(README)
    assert commands == ['pip install -e ".[demo]" && keras-unitscale demo', 'pip install -e ".[test]" && python -m pytest -n auto']
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()
    assert _quickstart_commands((ROOT / "docs" / "getting-started.md").read_text()) == commands
