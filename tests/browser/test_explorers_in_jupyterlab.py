"""Every notebook with an explorer, run in JupyterLab in Chromium as a learner runs it, and every control driven.

For each such notebook, in the course and in its student copy (solutions stubbed): open it, Run All, wait for
the kernel to go idle; no error output except at exercise cells (tagged ``raises-exception``), no "Error
displaying widget", nothing on the browser console at error level. Then, in each explorer: type and press
Generate, move sliders with the keyboard and with the mouse, switch dropdowns, tick boxes, and check each time
that the picture on screen changed and that the readout says what the controls say.

The notebook is run once per (copy, notebook) by a module-scoped fixture; the tests here share it.
"""

from __future__ import annotations

import pytest
from explorer_drivers import drive_every_explorer
from notebook_page import RAISES_TAG, WIDGET_VIEW, NotebookOpener, notebooks_with_explorers

from sdlearn.exercises import default_notebooks_dir

NAMES = notebooks_with_explorers(default_notebooks_dir())
NOT_DONE = {"NotImplementedError", "ExerciseNotDone"}  # what a student copy's unfinished exercise raises


@pytest.fixture(scope="module", params=[(copy, name) for copy in ("course", "student") for name in NAMES],
                ids=lambda param: f"{param[0]}-{param[1].removesuffix('.ipynb')}")
def notebook(request, lab, browser):
    """The notebook, opened and Run All (once for the tests here); ``.seconds`` is how long Run All took."""
    copy, name = request.param
    opener = NotebookOpener(lab, browser)
    page = opener.open(f"{copy}/{name}")
    page.copy, page.name = copy, name
    page.seconds = page.run_all()
    print(f"Run All of {copy}/{name}: {page.seconds:.1f} s")
    yield page
    opener.close()


def test_run_all_shows_no_errors_but_the_exercises(notebook):
    model = notebook.model()
    errors = {}
    for index, cell in enumerate(model["cells"]):
        for output in cell.get("outputs", []):
            if output["output_type"] == "error":
                errors[index] = (output["ename"], RAISES_TAG in cell.get("metadata", {}).get("tags", []))
    unexpected = {i: ename for i, (ename, tagged) in errors.items() if not tagged}
    assert unexpected == {}, f"errors outside the exercise cells: {unexpected}"
    if notebook.copy == "student":
        assert {ename for ename, _ in errors.values()} <= NOT_DONE, errors
    unrun = [i for i, cell in enumerate(model["cells"]) if cell["cell_type"] == "code" and cell["source"].strip()
             and cell.get("execution_count") is None]
    assert unrun == [], f"cells Run All did not run (a cell stopped it?): {unrun}"

    cells = notebook.widget_cells()
    assert cells, "no explorer was displayed"
    views = sum(1 for i in cells for o in model["cells"][i]["outputs"] if WIDGET_VIEW in o.get("data", {}))
    explorers = notebook.page.locator(".sdlearn-explorer")
    notebook.wait_until(lambda: explorers.count() >= views, f"{views} explorers to render")
    assert notebook.page.get_by_text("Error displaying widget").count() == 0
    assert notebook.console_errors == []


def test_every_control_changes_the_picture_and_the_readout(notebook):
    drive_every_explorer(notebook)
