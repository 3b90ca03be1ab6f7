"""A fresh clone, opened in JupyterLab and not run: every explorer's cell shows a picture, not a line of Python.

A notebook from a fresh clone is not trusted, so JupyterLab renders only "safe" output types: the explorer's
widget view is skipped and its PNG (the widget's first frame, which the explorers put in their display bundle)
is shown instead. Before issue 19 these cells showed ``ForwardNoisingExplorer(children=(HBox(...`` instead.
These read the committed notebooks: after a change to an explorer, re-execute them (``make notebooks``).
"""

from __future__ import annotations

import pytest
from notebook_page import notebooks_with_explorers

from sdlearn.exercises import default_notebooks_dir

NAMES = notebooks_with_explorers(default_notebooks_dir())


@pytest.mark.parametrize("name", NAMES)
def test_untrusted_notebook_shows_a_picture_in_every_explorer_cell(name, notebooks):
    notebook = notebooks.open(f"course/{name}")
    cells = notebook.widget_cells()
    assert cells, f"{name} calls an explorer but stores no widget output: re-execute it (make notebooks)"

    def all_rendered():
        outputs = notebook.rendered_outputs(cells)
        return outputs if all(o["rendered"] for o in outputs) else None

    shown = notebook.wait_until(all_rendered, f"the outputs of the cells {cells}", timeout_s=60)
    notebook.page.wait_for_timeout(500)  # let the images load
    shown = notebook.rendered_outputs(cells)
    without_picture = {i: o["text"][:120] for i, o in zip(cells, shown) if not o["loaded_images"]}
    assert without_picture == {}, f"explorer cells that show no picture before running: {without_picture}"
    assert not any("(children=" in o["text"] for o in shown), "a cell shows the widget's repr"
    assert notebook.console_errors == []
