"""The teacher's copy (issue 18): the answer key, its banner, the index of the exercises and their three tiers.

Unit tests on small notebooks first; then the teacher's copies of the real course: each keeps every cell and
output of the course (so nbval's run of the course notebooks covers their code), every rubric, and a banner
that lists every exercise; one of them (09, a fast one) is executed from the folder it was written to.
"""

from __future__ import annotations

import nbformat
import pytest

from sdlearn.__main__ import main
from sdlearn.exercises import (
    CHECKERS,
    RUBRIC_OPENING,
    TEACHER_TITLE,
    Exercise,
    default_notebooks_dir,
    exercise_index,
    student_copies,
    student_notebook,
    teacher_notebook,
    write_student_copies,
    write_teacher_copies,
)
from sdlearn.exercises.student_copies import CHECK_CALL_RE

RUBRIC = f"{RUBRIC_OPENING} Reports the IoU at every scale; 2 points for the hypothesis."


def cell(kind, source, tags=()):
    made = (nbformat.v4.new_code_cell(source, execution_count=1,
                                      outputs=[nbformat.v4.new_output("stream", text=f"output of {source[:12]}\n")])
            if kind == "code" else nbformat.v4.new_markdown_cell(source))
    if tags:
        made.metadata["tags"] = list(tags)
    return made


def notebook(cells, minor=5):
    nb = nbformat.v4.new_notebook()
    nb.nbformat_minor = minor
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [c if isinstance(c, nbformat.NotebookNode) else cell(*c) for c in cells]
    if minor < 5:
        for c in nb.cells:
            c.pop("id", None)
    return nb


THREE_TIERS = [
    ("markdown", "# 07 · A demo\nThe title."),
    ("code", "import torch"),
    ("markdown", "## Exercises\n\n### Exercise 1 (implement): double it\nWrite `double`."),
    ("code", "def double(x):\n    # BEGIN SOLUTION\n    return 2 * x\n    # END SOLUTION\n\n\ncheck_double(double)"),
    ("markdown", "#### Exercise 2 (derive) — the slope\n```python\n# Exercise in a fenced block: not a heading\n```"),
    ("code", "def slope(a):\n    # BEGIN SOLUTION\n    return a\n    # END SOLUTION\n\n\nexercises.check_slope(slope)"),
    ("markdown", "### Exercise 3 (Experiment): how strong should it be?\nHypothesis: it levels off."),
    ("code", "def check_mine(x):\n    return x\n\n\nsweep = check_sweep(my_sweep)\ncheck_sweep(my_sweep)"),
    ("markdown", RUBRIC, ["rubric"]),
    ("markdown", "## Recap\n- doubling"),
    ("code", "check_after_the_recap(double)"),
]


# -- the index of the exercises ----------------------------------------------------------------------
def test_exercise_index_reads_number_tier_title_checkers_and_rubric():
    assert exercise_index(notebook(THREE_TIERS), "07_demo.ipynb") == [
        Exercise(1, "implement", "double it", 2, ("check_double",), None),
        Exercise(2, "derive", "the slope", 4, ("check_slope",), None),
        Exercise(3, "experiment", "how strong should it be?", 6, ("check_sweep",), 8),
    ]
    assert [e.auto_checked for e in exercise_index(notebook(THREE_TIERS))] == [True, True, False]
    assert exercise_index(notebook(THREE_TIERS[:2])) == []  # no exercise: an empty index


@pytest.mark.parametrize("heading, words", [
    ("### Exercise 2 (guess): x", "unknown exercise tier 'guess'"),
    ("### Exercise 2: the old style, no tier", "malformed exercise heading"),
    ("### Exercise 2 (derive) the slope", "malformed exercise heading"),
    ("##### Exercise 2 (derive): too deep", "level 2-4"),
    ("# Exercise 2 (derive): too high", "level 2-4"),
    ("### Exercise 3 (derive): skipped one", "Exercise 3 where Exercise 2 was expected"),
    ("### Exercise 1 (derive): again", "Exercise 1 where Exercise 2 was expected"),
    ("### Exercise 2 (derive): a\n### Exercise 3 (implement): b", "two exercise headings in one cell"),
])
def test_a_malformed_heading_is_one_line_naming_the_notebook_and_cell(heading, words):
    nb = notebook(THREE_TIERS[:4] + [("markdown", heading)])
    with pytest.raises(ValueError, match="^07_demo.ipynb, cell 5: ") as raised:
        exercise_index(nb, "07_demo.ipynb")
    assert words in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("cells, at, words", [
    (THREE_TIERS[:4] + [("markdown", RUBRIC, ["rubric"])], 5, "in Exercise 1 (implement); only experiments have a rubric"),
    (THREE_TIERS[:8] + [("markdown", "Grade it kindly.", ["rubric"])], 9, "must begin with"),
    (THREE_TIERS[:8] + [("code", "print('grading')", ["rubric"])], 9, "a code cell tagged 'rubric'"),
    (THREE_TIERS[:9] + [("markdown", RUBRIC, ["rubric"])], 10, "a second rubric cell for Exercise 3"),
    (THREE_TIERS + [("markdown", RUBRIC, ["rubric"])], 12, "outside every exercise"),
    ([("markdown", RUBRIC, ["rubric"])] + THREE_TIERS, 1, "outside every exercise"),
])
def test_a_misplaced_or_malformed_rubric_is_refused(cells, at, words):
    with pytest.raises(ValueError, match=f"^07_demo.ipynb, cell {at}: ") as raised:
        exercise_index(notebook(cells), "07_demo.ipynb")
    assert words in str(raised.value)


# -- the teacher's copy of one notebook ----------------------------------------------------------------
@pytest.mark.parametrize("minor", [4, 5])
def test_teacher_notebook_keeps_every_cell_and_output_and_adds_the_banner_after_the_title(minor):
    course = notebook(THREE_TIERS, minor)
    before = nbformat.writes(course)
    teacher = teacher_notebook(course, "07_demo.ipynb")
    nbformat.validate(teacher)
    assert nbformat.writes(course) == before  # the course's notebook is not modified
    assert teacher.cells[:1] + teacher.cells[2:] == course.cells  # outputs and rubric included
    banner = teacher.cells[1]
    assert banner.cell_type == "markdown" and banner.source.startswith(f"## {TEACHER_TITLE}")
    assert ("id" in banner) == (minor >= 5)
    lines = [line for line in banner.source.splitlines() if line.startswith("- Exercise")]
    assert lines == [
        "- Exercise 1 (implement): double it — auto-checked by `check_double`",
        "- Exercise 2 (derive): the slope — auto-checked by `check_slope`",
        "- Exercise 3 (experiment): how strong should it be? — graded by its rubric (the cell tagged `rubric` after "
        "its code); its measurement is auto-checked by `check_sweep`",
    ]


def test_the_banner_says_what_is_missing_and_when_there_are_no_exercises():
    missing = notebook(THREE_TIERS[:3] + [("code", "def double(x):\n    return 2 * x"),
                                          ("markdown", "### Exercise 2 (experiment): a sweep"), ("code", "print(1)")])
    lines = [line for line in teacher_notebook(missing).cells[1].source.splitlines() if line.startswith("- ")]
    assert "calls no checker" in lines[0] and "which is missing" in lines[1]
    untitled = notebook([("code", "x = 1")])
    teacher = teacher_notebook(untitled)
    assert teacher.cells[0].source.startswith(f"## {TEACHER_TITLE}")  # no title cell: the banner comes first
    assert "no exercises" in teacher.cells[0].source and teacher.cells[1:] == untitled.cells


def test_a_student_copy_of_the_same_notebook_drops_the_rubric_the_teachers_keeps_it():
    course = notebook(THREE_TIERS)
    student, teacher = student_notebook(course, "07.ipynb"), teacher_notebook(course, "07.ipynb")
    assert sum(RUBRIC in c.source for c in teacher.cells) == 1
    assert not any(RUBRIC in c.source for c in student.cells)
    assert not any("return 2 * x" in c.source for c in student.cells)
    assert any("return 2 * x" in c.source for c in teacher.cells)


# -- writing the teacher's copies, and the command line ------------------------------------------------
@pytest.fixture
def course(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    nbformat.write(notebook(THREE_TIERS), folder / "01_first.ipynb")
    nbformat.write(notebook(THREE_TIERS[:2]), folder / "02_second.ipynb")
    nbformat.write(notebook(THREE_TIERS), folder / "scratch.ipynb")  # not a course notebook
    return folder


def test_write_teacher_copies_is_as_safe_as_the_student_copies(tmp_path, course):
    out = tmp_path / "key"
    written = write_teacher_copies(out, notebooks_dir=course)
    assert [p.name for p in written] == ["01_first.ipynb", "02_second.ipynb"]
    assert sorted(p.name for p in out.iterdir()) == ["01_first.ipynb", "02_second.ipynb"]
    first = nbformat.read(out / "01_first.ipynb", as_version=4)
    assert TEACHER_TITLE in first.cells[1].source and any(RUBRIC in c.source for c in first.cells)
    with pytest.raises(FileExistsError, match="not empty.*--force"):
        write_teacher_copies(out, notebooks_dir=course)
    assert len(write_teacher_copies(out, notebooks_dir=course, force=True)) == 2
    with pytest.raises(ValueError, match="refusing to write teacher's copies into the course's own notebooks folder"):
        write_teacher_copies(course / "key", notebooks_dir=course, force=True)
    assert not (course / "key").exists()
    bad = notebook(THREE_TIERS[:2] + [("markdown", "### Exercise 1: no tier")])
    nbformat.write(bad, course / "03_third.ipynb")
    with pytest.raises(ValueError, match=r"^03_third\.ipynb, cell 3: malformed exercise heading"):
        write_teacher_copies(tmp_path / "none", notebooks_dir=course)
    assert not (tmp_path / "none").exists()  # converted before anything is written


def test_cli_teacher_writes_the_answer_key(tmp_path, course, monkeypatch, capsys):
    monkeypatch.setattr(student_copies, "default_notebooks_dir", lambda: course)
    assert main(["exercises", str(tmp_path / "key"), "--teacher"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote 2 teacher notebooks to {tmp_path / 'key'}"
    teacher = nbformat.read(tmp_path / "key" / "01_first.ipynb", as_version=4)
    assert teacher.cells[1].source.startswith(f"## {TEACHER_TITLE}")
    assert teacher.cells[:1] + teacher.cells[2:] == nbformat.read(course / "01_first.ipynb", as_version=4).cells
    assert main(["exercises", str(tmp_path / "class")]) == 0  # without --teacher: the student copies
    student = (tmp_path / "class" / "01_first.ipynb").read_text()
    assert TEACHER_TITLE not in student and RUBRIC_OPENING not in student and "return 2 * x" not in student


@pytest.mark.parametrize("where, words", [
    ("course", "course's own notebooks folder"),
    ("a_file", "exists and is not a folder"),
    ("full", "not empty; choose an empty folder or pass --force"),
    ("", "the output folder is an empty name"),
])
def test_cli_teacher_bad_path_is_one_line_and_exit_2(tmp_path, course, monkeypatch, capsys, where, words):
    monkeypatch.setattr(student_copies, "default_notebooks_dir", lambda: course)
    (tmp_path / "a_file").write_text("mine")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "homework.txt").write_text("mine")
    out = {"course": str(course), "": ""}.get(where, str(tmp_path / where))
    assert main(["exercises", out, "--teacher"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m sdlearn exercises: error: ") and words in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (tmp_path / "full" / "homework.txt").read_text() == "mine" and (tmp_path / "a_file").read_text() == "mine"
    assert sorted(p.name for p in course.iterdir()) == ["01_first.ipynb", "02_second.ipynb", "scratch.ipynb"]


# -- the teacher's copies of the real course ------------------------------------------------------------
COURSE = default_notebooks_dir()
NAMES = sorted(p.name for p in COURSE.glob("[0-9][0-9]_*.ipynb"))


@pytest.fixture(scope="module")
def answer_key(tmp_path_factory):
    out = tmp_path_factory.mktemp("answer_key")
    write_teacher_copies(out)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_the_teachers_copy_is_the_course_notebook_with_its_banner(name, answer_key):
    course = nbformat.read(COURSE / name, as_version=4)
    teacher = nbformat.read(answer_key / name, as_version=4)
    at = 1 if course.cells[0].cell_type == "markdown" else 0
    banner = teacher.cells[at]
    assert banner.source.startswith(f"## {TEACHER_TITLE}")
    # every cell as in the course, outputs and execution counts included: nbval's run of the course covers its code
    assert teacher.cells[:at] + teacher.cells[at + 1:] == course.cells
    assert [c for c in teacher.cells if c.cell_type == "code"] == [c for c in course.cells if c.cell_type == "code"]
    index = exercise_index(course, name)
    for exercise in index:
        assert f"- Exercise {exercise.number} ({exercise.tier}): {exercise.title} — " in banner.source
        if exercise.rubric_cell is not None:
            assert teacher.cells[exercise.rubric_cell + 1].source.startswith(RUBRIC_OPENING)
    assert sum(line.startswith("- Exercise ") for line in banner.source.splitlines()) == len(index)
    rubrics = [c.source for c in course.cells if "rubric" in c.metadata.get("tags", [])]
    assert [c.source for c in teacher.cells if "rubric" in c.metadata.get("tags", [])] == rubrics


def test_the_student_copies_of_the_course_have_no_rubric(tmp_path):
    written = write_student_copies(tmp_path / "class")
    assert not any(RUBRIC_OPENING in path.read_text(encoding="utf-8") for path in written)
    assert any(RUBRIC_OPENING in (COURSE / path.name).read_text(encoding="utf-8") for path in written)


@pytest.mark.slow  # a Jupyter kernel running a whole notebook
def test_a_teachers_copy_runs_from_the_folder_it_was_written_to(answer_key):
    from nbclient import NotebookClient

    name = "09_code_review.ipynb"
    teacher = nbformat.read(answer_key / name, as_version=4)
    # every cell must run without an error, tagged raises-exception or not: the solutions are all there
    NotebookClient(teacher, timeout=600, kernel_name="python3", force_raise_errors=True,
                   resources={"metadata": {"path": str(answer_key)}}).execute()
    checker_cells = [c for c in teacher.cells if c.cell_type == "code" and set(CHECK_CALL_RE.findall(c.source)) & set(CHECKERS)]
    assert checker_cells, f"{name} calls no checker"
    for c in checker_cells:
        printed = "".join(o.get("text", "") for o in c.outputs)
        assert "✓ Correct" in printed, f"a checker cell of the teacher's copy did not pass: {c.source[:80]!r}"
