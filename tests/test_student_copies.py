"""The student copies a teacher hands out really work (issue 8).

``python -m sdlearn exercises OUT`` writes every notebook with its solutions stubbed. Here each copy is
executed twice in a fresh kernel, from the folder the copies were written to, as a class would run them:

- **with the solutions put back** (what a student who solved every exercise has): every cell runs and every
  checker prints ✓ Correct;
- **as given** (a student who did nothing): the notebook still runs to the end, and the only errors are
  ``NotImplementedError`` (or the checkers' ``ExerciseNotDone``, a subclass) in the exercise cells.

These execute all ten notebooks twice, so they are the slowest tests of the suite (a few minutes).
"""

from __future__ import annotations

import re

import nbformat
import pytest
from nbclient import NotebookClient

from sdlearn.exercises import RAISES_TAG, STUB, default_notebooks_dir, strip_solutions, write_student_copies

COURSE = default_notebooks_dir()
NAMES = sorted(p.name for p in COURSE.glob("[0-9][0-9]_*.ipynb"))
NOT_DONE = {"NotImplementedError", "ExerciseNotDone"}
CHECK_CALL = re.compile(r"(?<!def )\bcheck_\w+\s*\(")


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("class")
    write_student_copies(out)
    return out


def execute(nb, folder):
    """Run every cell in a fresh kernel (the current environment's) with ``folder`` as working directory.

    Cells tagged ``raises-exception`` may fail without stopping the run, as in JupyterLab's Run All; any
    other failing cell raises ``CellExecutionError``.
    """
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    return nb


def failures(nb) -> dict[int, str]:
    """Code cells that raised, as {cell index: exception name}."""
    return {
        index: output.ename
        for index, cell in enumerate(nb.cells) if cell.cell_type == "code"
        for output in cell.outputs if output.output_type == "error"
    }


def text_of(cell) -> str:
    return "".join(o.get("text", "") + "".join(o.get("data", {}).get("text/plain", ""))
                   for o in cell.outputs)


def put_solutions_back(student, course) -> None:
    """Fill every stub of the student copy with the course's solution, cell by cell (in place)."""
    student_code = [c for c in student.cells if c.cell_type == "code"]
    course_code = [c for c in course.cells if c.cell_type == "code"]
    assert len(student_code) == len(course_code), "the student copy must keep every code cell"
    for mine, theirs in zip(student_code, course_code):
        assert mine.source == strip_solutions(theirs.source), "a student cell differs from its course cell"
        mine.source = theirs.source


@pytest.mark.parametrize("name", NAMES)
def test_student_copy_with_the_solutions_put_back_passes(name, class_folder):
    nb = nbformat.read(class_folder / name, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "outputs not cleared"
    put_solutions_back(nb, nbformat.read(COURSE / name, as_version=4))
    execute(nb, class_folder)

    assert failures(nb) == {}
    checked = [cell for cell in nb.cells if cell.cell_type == "code" and CHECK_CALL.search(cell.source)]
    for cell in checked:
        assert "Correct" in text_of(cell), f"a checker did not report success:\n{cell.source}\n{text_of(cell)}"


@pytest.mark.parametrize("name", NAMES)
def test_student_copy_as_given_fails_only_at_the_exercises(name, class_folder):
    nb = execute(nbformat.read(class_folder / name, as_version=4), class_folder)

    failed = failures(nb)
    for index, ename in failed.items():
        cell = nb.cells[index]
        assert RAISES_TAG in cell.metadata.get("tags", []), f"cell {index + 1} failed but is no exercise cell"
        assert ename in NOT_DONE, f"cell {index + 1} raised {ename}, not NotImplementedError:\n{cell.source}"
    # Every exercise is reported as not done: each cell holding a stub or a checker call raised, unless its
    # stub sits inside a function that the cell only defines (the checker cell then raises instead).
    checker_cells = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and CHECK_CALL.search(c.source)]
    stub_cells = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and STUB in c.source]
    if not stub_cells:  # 00, the tour, has no exercises: it runs clean
        assert failed == {} and not checker_cells
        return
    assert set(checker_cells) <= set(failed), "a checker passed on a stub, or was never reached"
    assert len(failed) >= len(checker_cells) > 0
