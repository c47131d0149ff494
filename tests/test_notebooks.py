"""Every notebook executes end to end (on the tiny random model, fast settings)."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 3


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: clear outputs before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, monkeypatch):
    # The kernel inherits this environment; "python3" is ipykernel's own kernel, which jupyter_client
    # starts with the interpreter running the tests (sys.executable), so no kernelspec install is needed.
    monkeypatch.setenv("WORKBENCH_NOTEBOOK_MODEL", os.environ.get("WORKBENCH_NOTEBOOK_MODEL", "tiny-random"))
    monkeypatch.setenv("WORKBENCH_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert any(o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})
               for c in nb.cells if c.cell_type == "code" for o in c.outputs), "each notebook shows a figure"
    if path.stem == "01_quickstart":  # the search result shows itself as HTML
        html = [o["data"]["text/html"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
                if o.output_type == "execute_result" and "text/html" in o.get("data", {})]
        assert any(h.startswith("<div") and "SelfControl on angry2peaceful" in h and "trajectory" in h for h in html)
