"""Every notebook under notebooks/ executes top to bottom."""
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
# papermill-style: a cell with these assignments runs right after the notebook's cell tagged
# "parameters" (every cell still runs; only its sizes shrink)
PARAMETERS = {"flow_matching.ipynb": "steps = 200  # of 8000: a rougher flow, the same code"}


def with_parameters(nb, source):
    """nb with a code cell of `source` inserted after its (one) cell tagged "parameters"."""
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "one cell tagged 'parameters'"
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source))
    return nb


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    if path.name in PARAMETERS:
        nb = with_parameters(nb, PARAMETERS[path.name])
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert (tmp_path / "quickstart_nfe.png").exists() or path.name != "quickstart.ipynb"


def test_there_is_a_quickstart():
    assert any(p.name == "quickstart.ipynb" for p in NOTEBOOKS)
