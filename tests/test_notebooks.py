"""The notebooks run top to bottom, with small sizes, and are committed with their outputs."""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
# Set after each notebook's cell tagged "parameters", as papermill would.
SMALL = {
    "01_quickstart": "EPOCHS = 2",
    "02_lstm_text": "STEPS = 6\nWIDTH = 32\nSEQ_LEN = 16",
    "03_transformer_fp8": "STEPS = 6\nWIDTH = 32\nDEPTH = 1\nSEQ_LEN = 16",
    "04_u_mup_transfer": "WIDTHS = (16, 32)\nLOG2_LRS = {'u-mup': (-3, -1), 'standard': (-10, -8)}\n"
                         "STEPS = 3\nDEPTH = 1\nSEQ_LEN = 16",
    "05_scale_analysis": "STEPS = 6\nWIDTH = 32\nDEPTH = 1\nSEQ_LEN = 16",
    "06_kerashub_llama": "STEPS = 6\nWIDTH = 32\nLAYERS = 1\nSEQ_LEN = 32",
    "07_grow_shrink": "STEPS_BEFORE = 4\nSTEPS_AFTER = 4\nWIDTH = 32\nGROWN_WIDTH = 64\nSEQ_LEN = 16",
}

# Notebooks of an optional extra: skipped where it is not installed.
NEEDS_KERAS_HUB = {"06_kerashub_llama"}


def _read(name):
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def _errors(notebook):
    return [output for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.get("outputs", []) if output.output_type == "error"]


def test_every_notebook_is_tested_and_committed_with_its_outputs():
    assert {path.stem for path in NOTEBOOKS.glob("*.ipynb")} == set(SMALL)
    for name in SMALL:
        notebook = _read(name)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert all(cell.execution_count is not None for cell in code), f"{name} has cells never run"
        assert not _errors(notebook), f"{name} was saved with an error"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebook_runs_with_small_settings(name):
    if name in NEEDS_KERAS_HUB:
        pytest.importorskip("keras_hub")  # CI installs it after the README command, and runs this notebook then
    notebook = _read(name)
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(SMALL[name]))
    # Runs where a user opens it: the notebooks read ../benchmarks/results.
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    assert not _errors(notebook)
