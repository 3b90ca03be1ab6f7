"""The teacher's copy of the course (the answer key) and the index of each notebook's exercises.

Each exercise starts with a markdown cell holding a heading, level 2 to 4::

    ### Exercise 2 (derive): the consistency scalings

numbered 1, 2, 3, … in each notebook, with one of three tiers (:data:`TIERS`):

- ``implement``: write a function; a checker (``check_...(...)``, :mod:`sdlearn.exercises.framework`) grades it;
- ``derive``: a short derivation on paper whose final formula is written as a function and checked the same way;
- ``experiment``: an open task with a stated hypothesis and a measured result. Its grading notes are a
  markdown cell tagged ``rubric``, after the exercise's code, whose text begins
  ``**Rubric (teacher's copy only).**``: what a good answer measures and reports, and how to grade it.

An exercise runs from its heading cell to the next exercise's heading, or to the next heading of a higher
level (``## Recap``), whichever comes first. :func:`exercise_index` reads them (a malformed heading raises
one ``ValueError`` naming the notebook and the cell).

``python -m sdlearn exercises OUT --teacher`` (:func:`write_teacher_copies`) writes every ``NN_*.ipynb``
as it is in the course — solutions, outputs and rubric cells kept, so its code cells are the course's and
the course's own tests cover them — with one markdown cell added after the title, "Teacher's copy", listing
the notebook's exercises and how each is graded. Student copies
(:func:`~sdlearn.exercises.student_copies.student_notebook`) drop the rubric cells. Writing is as safe as
for the student copies (:func:`~sdlearn.exercises.student_copies.write_copies`).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

from sdlearn.exercises.student_copies import CHECK_CALL_RE, RUBRIC_TAG, is_rubric_cell, write_copies

TIERS = ("implement", "derive", "experiment")
RUBRIC_OPENING = "**Rubric (teacher's copy only).**"
TEACHER_TITLE = "Teacher's copy"
BANNER_ID = "teachers-copy"  # the banner cell's id (nbformat ≥ 4.5), fixed so that two runs write the same file
HEADING_FORMAT = "### Exercise N (implement|derive|experiment): title"

_HEADING_RE = re.compile(r"^(?P<hashes>#{1,6})\s+(?P<text>.*?)\s*#*\s*$")
_EXERCISE_WORD_RE = re.compile(r"^Exercise\b", re.IGNORECASE)  # "Exercise 1 …", not "Exercises"
_EXERCISE_RE = re.compile(r"^Exercise\s+(?P<number>\d+)\s*\((?P<tier>[^()]*)\)\s*[:—]\s*(?P<title>\S.*)$", re.IGNORECASE)
_FENCE_RE = re.compile(r"^\s*(```|~~~)")


@dataclass(frozen=True)
class Exercise:
    """One exercise of a notebook: its ``number`` (1, 2, …), ``tier`` (one of :data:`TIERS`), ``title``, the index
    of its heading ``cell`` in ``nb.cells`` (0-based), the ``checkers`` its code cells call (in order), and the
    index of its ``rubric_cell`` (None if it has none)."""

    number: int
    tier: str
    title: str
    cell: int
    checkers: tuple[str, ...] = ()
    rubric_cell: int | None = None

    @property
    def auto_checked(self) -> bool:
        """Whether a checker grades it: ``implement`` and ``derive`` exercises; an experiment is graded by its rubric."""
        return self.tier != "experiment"


def _headings(source: str) -> list[tuple[int, str]]:
    """(level, text) of each markdown heading in ``source``, skipping fenced code blocks."""
    found, fenced = [], False
    for line in source.splitlines():
        if _FENCE_RE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else _HEADING_RE.match(line)
        if match:
            found.append((len(match["hashes"]), match["text"]))
    return found


def exercise_index(nb, name: str = "notebook") -> list[Exercise]:
    """The exercises of an nbformat v4 notebook, in order (see the module's docstring for the conventions).

    Raises ``ValueError`` naming ``name`` and the cell (1-based, as the other messages of
    :mod:`sdlearn.exercises`) for an exercise heading that is not ``### Exercise N (TIER): title`` at level 2–4,
    an unknown tier, numbers other than 1, 2, 3, … in order, two exercises in one cell, and a rubric cell that
    is not markdown, does not open with :data:`RUBRIC_OPENING`, lies outside an experiment, or is its second.
    """
    starts: list[tuple[int, int, int, str, str]] = []  # (cell, level, number, tier, title)
    ends: dict[int, int] = {}  # exercise position -> the cell index where it stops
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue
        where = f"{name}, cell {index + 1}"
        found_here = 0
        for level, text in _headings(cell.source):
            if starts and len(starts) - 1 not in ends and level < starts[-1][1] and not found_here:
                ends[len(starts) - 1] = index  # a higher heading (## Recap) closes the exercise
            if not _EXERCISE_WORD_RE.match(text):
                continue
            match = _EXERCISE_RE.match(text)
            if not match or not 2 <= level <= 4:
                raise ValueError(f"{where}: malformed exercise heading {'#' * level + ' ' + text!r}; "
                                 f"expected {HEADING_FORMAT!r} (a level 2-4 heading, ':' or '—' after the tier)")
            tier = match["tier"].strip().lower()
            if tier not in TIERS:
                raise ValueError(f"{where}: unknown exercise tier {match['tier']!r} in {text!r}; "
                                 f"expected one of {', '.join(TIERS)}")
            number = int(match["number"])
            if number != len(starts) + 1:
                raise ValueError(f"{where}: Exercise {number} where Exercise {len(starts) + 1} was expected; "
                                 "number the exercises 1, 2, 3, … in order")
            if found_here:
                raise ValueError(f"{where}: two exercise headings in one cell; start each exercise in its own markdown cell")
            found_here += 1
            if starts and len(starts) - 1 not in ends:
                ends[len(starts) - 1] = index
            starts.append((index, level, number, tier, match["title"].strip()))
    exercises = []
    for position, (start, _, number, tier, title) in enumerate(starts):
        stop = ends.get(position, len(nb.cells))
        cells = nb.cells[start + 1:stop]
        calls = [checker for cell in cells if cell.cell_type == "code" for checker in CHECK_CALL_RE.findall(cell.source)]
        checkers = tuple(dict.fromkeys(calls))  # in order, each once
        rubrics = [start + 1 + offset for offset, cell in enumerate(cells) if is_rubric_cell(cell)]
        for rubric in rubrics:
            _check_rubric(nb.cells[rubric], f"{name}, cell {rubric + 1}", tier, number)
        if len(rubrics) > 1:
            raise ValueError(f"{name}, cell {rubrics[1] + 1}: a second rubric cell for Exercise {number}; "
                             "give each experiment one rubric cell")
        exercises.append(Exercise(number, tier, title, start, checkers, rubrics[0] if rubrics else None))
    inside = {e.rubric_cell for e in exercises}
    for index, cell in enumerate(nb.cells):
        if is_rubric_cell(cell) and index not in inside:
            raise ValueError(f"{name}, cell {index + 1}: a cell tagged {RUBRIC_TAG!r} outside every exercise; "
                             "put it after the code of its experiment, before the next exercise")
    return exercises


def _check_rubric(cell, where: str, tier: str, number: int) -> None:
    if tier != "experiment":
        raise ValueError(f"{where}: a cell tagged {RUBRIC_TAG!r} in Exercise {number} ({tier}); "
                         "only experiments have a rubric (a checker grades the others)")
    if cell.cell_type != "markdown":
        raise ValueError(f"{where}: a {cell.cell_type} cell tagged {RUBRIC_TAG!r}; a rubric is a markdown cell")
    if not cell.source.lstrip().replace("’", "'").startswith(RUBRIC_OPENING):
        raise ValueError(f"{where}: a rubric cell must begin with {RUBRIC_OPENING!r}")


def _grading(exercise: Exercise) -> str:
    checkers = ", ".join(f"`{name}`" for name in exercise.checkers)
    if exercise.auto_checked:
        return f"auto-checked by {checkers}" if checkers else "auto-checked, but it calls no checker (check_...())!"
    if exercise.rubric_cell is None:
        return "graded by its rubric, which is missing (add a markdown cell tagged `rubric` after its code)!"
    measured = f"; its measurement is auto-checked by {checkers}" if checkers else ""
    return f"graded by its rubric (the cell tagged `rubric` after its code){measured}"


def teacher_banner(exercises: list[Exercise], name: str = "notebook") -> str:
    """The markdown of the "Teacher's copy" cell: what the copy keeps, then one line per exercise (number, tier,
    title, and the checker that grades it or its rubric)."""
    lines = [
        f"## {TEACHER_TITLE}",
        "",
        f"The answer key of `{name}`: the solutions, the outputs of a full run and each experiment's rubric (the "
        f"cells tagged `{RUBRIC_TAG}`) are kept. Do not hand it out: `python -m sdlearn exercises OUT` writes the "
        "student copies, without them.",
        "",
    ]
    if not exercises:
        return "\n".join(lines + ["This notebook has no exercises."])
    lines.append(f"Its {len(exercises)} exercise{'s' if len(exercises) != 1 else ''}:")
    lines.append("")
    lines += [f"- Exercise {e.number} ({e.tier}): {e.title} — {_grading(e)}" for e in exercises]
    return "\n".join(lines)


def teacher_notebook(nb, name: str = "notebook"):
    """The teacher's copy of an nbformat v4 notebook (the input is not modified): every cell and output as in
    ``nb``, and a markdown cell "Teacher's copy" (:func:`teacher_banner`) after the title cell (the first cell, if
    it is markdown), or first. Raises ``ValueError`` as :func:`exercise_index` does."""
    import nbformat

    banner = nbformat.v4.new_markdown_cell(teacher_banner(exercise_index(nb, name), name))
    nb = copy.deepcopy(nb)
    if (nb.nbformat, nb.nbformat_minor) < (4, 5):
        del banner["id"]  # cell ids exist from nbformat 4.5 on
    else:
        ids, banner["id"], k = {cell.get("id") for cell in nb.cells}, BANNER_ID, 1
        while banner["id"] in ids:  # ids are unique in a notebook
            banner["id"], k = f"{BANNER_ID}-{k}", k + 1
    at = 1 if nb.cells and nb.cells[0].cell_type == "markdown" else 0
    nb.cells.insert(at, banner)
    return nb


def write_teacher_copies(out_dir: str | Path, notebooks_dir: str | Path | None = None, force: bool = False) -> list[Path]:
    """Write the teacher's copy (:func:`teacher_notebook`) of every ``NN_*.ipynb`` in ``notebooks_dir`` (default:
    the course's) into ``out_dir``, with the safety of
    :func:`~sdlearn.exercises.student_copies.write_student_copies`: a non-empty folder refused unless ``force``,
    never into the course's folder, every notebook converted before anything is written, all or nothing.
    Returns the written paths, in course order."""
    return write_copies(out_dir, teacher_notebook, notebooks_dir, force, kind="teacher's")
