"""The documentation site's shape, checked without building it (CI builds it with `mkdocs build --strict`).

The README is a front page of at most 300 lines; every page is in the site's
navigation; every committed figure and every benchmark's command is on a page;
every public module has an API reference page.
"""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MKDOCS = (ROOT / "mkdocs.yml").read_text()
PAGES = sorted(DOCS.rglob("*.md"))
TEXT = "\n".join(page.read_text() for page in PAGES)


def _all(module_path):
    tree = ast.parse(module_path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{module_path} has no __all__")


def test_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(DOCS)))
def test_each_page_is_in_the_navigation(page):
    assert f": {page.relative_to(DOCS).as_posix()}\n" in MKDOCS or f"- {page.relative_to(DOCS).as_posix()}\n" in MKDOCS


@pytest.mark.parametrize("notebook", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda path: path.name)
def test_each_notebook_is_a_page(notebook):
    assert f"notebooks/{notebook.name}\n" in MKDOCS


@pytest.mark.parametrize("figure", sorted((ROOT / "benchmarks" / "results").rglob("*.png")),
                         ids=lambda path: path.name)
def test_each_committed_figure_is_on_a_page(figure):
    assert figure.relative_to(ROOT).as_posix() + ")" in TEXT


@pytest.mark.parametrize("script", sorted((ROOT / "benchmarks").glob("*.py")), ids=lambda path: path.name)
def test_each_benchmark_has_its_command_on_the_benchmarks_page(script):
    if script.name == "timing.py":  # shared timing helpers, not a benchmark
        return
    assert re.search(rf"python benchmarks/{script.name}\b", (DOCS / "benchmarks.md").read_text())


@pytest.mark.parametrize("module", [name for name in _all(ROOT / "keras_unitscale" / "__init__.py")
                                    if (ROOT / "keras_unitscale" / f"{name}.py").exists()
                                    or (ROOT / "keras_unitscale" / name / "__init__.py").exists()])
def test_each_public_module_has_an_api_page(module):
    assert f"::: keras_unitscale.{module}\n" in (DOCS / "api" / f"{module}.md").read_text()
    assert f"api/{module}.md" in MKDOCS
