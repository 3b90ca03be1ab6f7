"""The course as a whole: every notebook is there, executed, and has self-checking exercises."""

import re

import nbformat
import pytest

from sdlearn.exercises import CHECKERS, TIERS, default_notebooks_dir, exercise_index, find_solution_regions

NOTEBOOKS = default_notebooks_dir()
COURSE = [
    "00_tour", "01_forward_noising", "02_noise_schedules", "03_vae", "04_transformer_denoiser",
    "05_training", "06_samplers", "07_text_and_guidance", "08_stable_diffusion", "09_code_review",
    "10_unet_and_real_sd", "11_flow_matching", "12_personalization", "13_control_and_speed",
]
CHECK_CALL = re.compile(r"\b(check_\w+)\s*\(")


def _code_cells(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def test_every_course_notebook_is_present():
    missing = [name for name in COURSE if not (NOTEBOOKS / f"{name}.ipynb").exists()]
    assert not missing, f"notebooks missing from {NOTEBOOKS}: {missing}"


@pytest.mark.parametrize("name", COURSE)
def test_notebook_is_committed_executed_in_order(name):
    cells = [cell for cell in _code_cells(name) if cell.source.strip()]
    counts = [cell.execution_count for cell in cells]
    assert None not in counts, f"{name}: some code cells were never executed; run it top to bottom and commit it"
    assert counts == sorted(counts), f"{name}: cells were executed out of order; re-run it top to bottom"


@pytest.mark.parametrize("name", COURSE[1:])
def test_notebook_has_at_least_two_checked_exercises(name):
    cells = _code_cells(name)
    solutions = sum(len(find_solution_regions(cell.source, f"{name}, cell {i}")) for i, cell in enumerate(cells))
    called = {match for cell in cells for match in CHECK_CALL.findall(cell.source) if not cell.source.lstrip().startswith("def " + match)}
    checkers = called & set(CHECKERS)
    assert solutions >= 2, f"{name}: {solutions} solution region(s); each notebook from 01 on needs at least 2 exercises"
    assert len(checkers) >= 2, f"{name}: calls {sorted(checkers)} from sdlearn.exercises; needs at least 2 checkers"
    unknown = {c for c in called if c.startswith("check_") and c not in CHECKERS and c != "check_"}
    assert not unknown, f"{name}: calls checkers that sdlearn.exercises does not register: {sorted(unknown)}"


@pytest.mark.parametrize("name", COURSE)
def test_notebook_has_all_three_tiers(name):
    """Issue 18: each notebook's exercises come in three tiers (sdlearn.exercises.teacher_copies): at least one
    exercise to implement and one to derive, each graded by a registered checker, and one experiment with its rubric."""
    index = exercise_index(nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4), f"{name}.ipynb")
    by_tier = {tier: [e.number for e in index if e.tier == tier] for tier in TIERS}
    assert all(by_tier.values()), f"{name}: exercises by tier {by_tier}; needs at least one of each of {', '.join(TIERS)}"
    no_rubric = [e.number for e in index if e.tier == "experiment" and e.rubric_cell is None]
    assert not no_rubric, (f"{name}: experiment(s) {no_rubric} have no rubric cell (a markdown cell tagged 'rubric' "
                           "after the exercise's code, opening with **Rubric (teacher's copy only).**)")
    unchecked = {e.number: list(e.checkers) for e in index
                 if e.auto_checked and not any(checker in CHECKERS for checker in e.checkers)}
    assert not unchecked, f"{name}: implement/derive exercise(s) {unchecked} call no registered checker"


@pytest.mark.parametrize("name", COURSE)
def test_top_cell_states_prerequisites_and_links_the_notation_card(name):
    """Issue 18: the first cell says what the notebook assumes, with pointers, and links the course's notation."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    top = nb.cells[0].source
    assert nb.cells[0].cell_type == "markdown" and "**Before this notebook:**" in top, (
        f"{name}: the first cell should say what the notebook assumes, in a '**Before this notebook:**' paragraph")
    assert "](notation.md)" in top, f"{name}: the first cell should link the notation card, [...](notation.md)"
    assert (NOTEBOOKS / "notation.md").is_file()
