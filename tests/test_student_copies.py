"""The student copies a teacher hands out really work (issue 8), each executed once (issue 19, item 7).

``python -m sdlearn exercises OUT`` writes every notebook with its solutions stubbed. Here each copy is
executed ONCE, in one fresh kernel (the current environment's), from the folder the copies were written to,
as a class would run them, going through the code cells in order:

- each cell runs as the student gets it. A cell that raises must be an exercise cell (tagged
  ``raises-exception``) and raise ``NotImplementedError`` (or the checkers' ``ExerciseNotDone``, a subclass);
  any other cell must never fail.
- a cell calling a checker (``check_...(...)``) must raise while a stub is unsolved (its own or an earlier
  cell's): no checker passes on a stub.
- once a cell has raised, the solutions of the stubbed cells not yet solved are run (the course's versions,
  in order), then the course's version of this cell. Each must succeed, and each one calling a checker must
  print ✓ Correct. So a stub inside a function that its cell only defines (the cell does not raise) is solved
  just after the next checker cell has failed on it.
- at the end every stub has been solved, and a notebook with stubs has at least one checker (00, the tour,
  included: it ends with three short exercises).

Before running, the copy must have every output cleared and every code cell of the course, each equal to the
course's cell with its solutions stubbed; and no cell that is not an exercise (not tagged) may use a name
that an earlier exercise cell binds (a function or variable of the learner's), read statically from the code.

What this no longer checks, compared with the two runs per copy it replaces (2 × 10 executions, now 10):

- the cells after an exercise run with the solution in place, never with the stub: a later cell that
  needs the learner's answer in a way the static name check cannot see (through an object that an exercise
  cell changes, say) would fail for a student who skipped the exercise, and nothing here would notice;
- an exercise cell runs twice, stub then solution, in one kernel, where a student who solved everything runs
  it once: whatever the stub's partial run left behind (a consumed random number, say) is still there;
- a checker cell run when no stub is left unsolved (a second check of an exercise already solved, or a
  checker of a stub solved when an earlier checker failed) is only required to print ✓ Correct; the old
  as-given run required every checker cell to fail.

The outputs themselves are not compared with the committed notebooks: nbval does that for the course's own
notebooks. After nbval these are the slowest tests of the suite: 10 to 90 s a notebook, about 6 minutes for all
ten on 2 shared cores (2026-12-03; the two runs they replace took 18).
"""

from __future__ import annotations

import ast
import re

import nbformat
import pytest
from IPython.core.inputtransformer2 import TransformerManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from sdlearn.exercises import RAISES_TAG, default_notebooks_dir, strip_solutions, write_student_copies

COURSE = default_notebooks_dir()
NAMES = sorted(p.name for p in COURSE.glob("[0-9][0-9]_*.ipynb"))
NOT_DONE = {"NotImplementedError", "ExerciseNotDone"}
CHECK_CALL = re.compile(r"(?<!def )\bcheck_\w+\s*\(")


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("class")
    write_student_copies(out)
    return out


def code_cells_paired(student, course) -> list[tuple[int, nbformat.NotebookNode, str]]:
    """(index in the student copy, student cell, the course's source of that cell) for every code cell, after
    checking that the copy keeps every code cell and differs from the course only by its stubs."""
    student_code = [(i, c) for i, c in enumerate(student.cells) if c.cell_type == "code"]
    course_code = [c.source for c in course.cells if c.cell_type == "code"]
    assert len(student_code) == len(course_code), (
        f"the student copy has {len(student_code)} code cells, the course {len(course_code)}")
    for (index, cell), solution in zip(student_code, course_code):
        assert cell.source == strip_solutions(solution), f"cell {index + 1} differs from its course cell beyond the stubs"
    return [(index, cell, solution) for (index, cell), solution in zip(student_code, course_code)]


def python_of(source: str) -> ast.Module:
    """A cell's code as Python (IPython's ``%magics`` and ``!commands`` turned into calls), parsed."""
    return ast.parse(TransformerManager().transform_cell(source))


def top_level_names(tree: ast.Module) -> set[str]:
    """The names a cell binds in the notebook's namespace: its functions, classes, imports and assignments."""
    names = set()
    for statement in tree.body:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(statement.name)
            continue
        for node in ast.walk(statement):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.alias):
                names.add((node.asname or node.name).split(".")[0])
    return names


def exercise_names_used_elsewhere(cells) -> dict[int, set[str]]:
    """{cell index: names} for each cell that is no exercise (not tagged ``raises-exception``) but uses a name
    last bound by an exercise cell, which a student who skipped that exercise has as a stub or not at all."""
    from_exercises, offenders = set(), {}
    for index, cell, _ in cells:
        tree = python_of(cell.source)
        if RAISES_TAG in cell.metadata.get("tags", []):
            from_exercises |= top_level_names(tree)
            continue
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        if used & from_exercises:
            offenders[index] = used & from_exercises
        from_exercises -= top_level_names(tree)
    return offenders


def text_of(cell) -> str:
    return "".join(o.get("text", "") + "".join(o.get("data", {}).get("text/plain", "")) for o in cell.outputs)


def one_line(text: str, limit: int = 400) -> str:
    """``text`` on one line (a checker's message spans several), cut at ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


class OneKernel:
    """Runs sources one at a time in one kernel; ``run`` returns the executed cell and the error, or None."""

    def __init__(self, nb, folder):
        # force_raise_errors: a raising cell raises CellExecutionError here even when tagged raises-exception,
        # so the test decides which errors are allowed.
        self.client = NotebookClient(nb, timeout=600, kernel_name="python3", force_raise_errors=True,
                                     resources={"metadata": {"path": str(folder)}})
        self.count = 0

    def run(self, source: str, index: int) -> tuple[nbformat.NotebookNode, CellExecutionError | None]:
        cell = nbformat.v4.new_code_cell(source)
        self.count += 1
        try:
            self.client.execute_cell(cell, index, execution_count=self.count)
        except CellExecutionError as error:
            return cell, error
        return cell, None


def solve(kernel: OneKernel, index: int, solution: str) -> None:
    """Run the course's version of cell ``index``: it must succeed, and its checker must print ✓ Correct."""
    cell, error = kernel.run(solution, index)
    assert error is None, f"cell {index + 1}, solution: raised {error.ename}: {one_line(error.evalue)}"
    printed = text_of(cell)
    if CHECK_CALL.search(solution):
        assert "Correct" in printed, f"cell {index + 1}, solution: the checker did not print ✓ Correct: {one_line(printed)!r}"


@pytest.mark.parametrize("name", NAMES)
def test_student_copy_fails_only_at_the_exercises_and_passes_with_the_solutions(name, class_folder):
    student = nbformat.read(class_folder / name, as_version=4)
    assert all(not cell.get("outputs") for cell in student.cells if cell.cell_type == "code"), "outputs not cleared"
    cells = code_cells_paired(student, nbformat.read(COURSE / name, as_version=4))
    used = exercise_names_used_elsewhere(cells)
    assert not used, "cells that are no exercise use the learner's names: " + "; ".join(
        f"cell {i + 1}: {', '.join(sorted(names))}" for i, names in used.items())
    has_stubs = any(cell.source != solution for _, cell, solution in cells)
    has_checkers = any(CHECK_CALL.search(cell.source) for _, cell, _ in cells)
    assert has_checkers or not has_stubs, "the notebook has exercise stubs but no checker call"

    kernel = OneKernel(student, class_folder)
    unsolved: list[tuple[int, str]] = []  # stubbed cells run as given, their solutions not yet run
    with kernel.client.setup_kernel():
        for index, cell, solution in cells:
            is_stubbed = cell.source != solution
            if is_stubbed:
                unsolved.append((index, solution))
            executed, error = kernel.run(cell.source, index)
            if error is None:
                if CHECK_CALL.search(cell.source):
                    printed = text_of(executed)
                    assert not unsolved, (f"cell {index + 1}: the checker passed while cell(s) "
                                          f"{', '.join(str(i + 1) for i, _ in unsolved)} still hold a stub")
                    assert "Correct" in printed, (
                        f"cell {index + 1}: the checker did not print ✓ Correct: {one_line(printed)!r}")
                continue  # a stub that this cell only defines is solved once a checker has failed on it
            assert RAISES_TAG in cell.metadata.get("tags", []), (
                f"cell {index + 1} is no exercise cell but raised {error.ename}: {one_line(error.evalue)}")
            assert error.ename in NOT_DONE, (
                f"cell {index + 1} raised {error.ename}, not NotImplementedError: {one_line(error.evalue)}")
            assert unsolved, f"cell {index + 1} raised {error.ename} although no stub is left unsolved"
            if not is_stubbed:  # a checker that failed on an earlier cell's stub runs again once that is solved
                unsolved.append((index, solution))
            for stubbed_index, stubbed_solution in unsolved:
                solve(kernel, stubbed_index, stubbed_solution)
            unsolved = []
    assert not unsolved, (f"the stubs of cell(s) {', '.join(str(i + 1) for i, _ in unsolved)} were never checked: "
                          "no checker cell failed on them")
