"""Student copies of the course notebooks: solutions stubbed, outputs cleared, exercise cells tagged.

``python -m sdlearn exercises OUT_DIR`` (:func:`write_student_copies`) writes every ``NN_*.ipynb``
with each solution region replaced by ``# YOUR CODE HERE`` and
``raise NotImplementedError("Exercise: fill this in")`` at the marker's indentation, and with all
outputs and execution counts cleared. Cells holding a stub, and cells calling a checker, get the
cell tag ``raises-exception``: JupyterLab's "Run All" and nbclient then carry on past an
unfinished exercise instead of stopping there. A checker given an unfinished function raises
:class:`~sdlearn.exercises.framework.ExerciseNotDone`, which is both an
:class:`~sdlearn.exercises.framework.ExerciseFailed` and a ``NotImplementedError``.
If a notebook has no "How to check your answer" markdown cell, one is inserted before its first
exercise. Every cell tagged ``rubric`` (an experiment's grading notes, for the teacher's copy only:
:mod:`sdlearn.exercises.teacher_copies`) is dropped.

A solution region is the lines between two marker lines, ``# BEGIN SOLUTION`` and ``# END SOLUTION``
(:mod:`sdlearn.exercises.framework` explains how an exercise is written).

Writing is safe: every notebook is converted before anything is written, then written to a temporary file
beside its target and renamed over it (:func:`sdlearn.checkpoint.atomic_write_files`), so a symbolic link
in the target folder is replaced, never written through (a link to the course's own notebook leaves that
notebook alone), and a full disk or a read-only folder leaves no partial file: it raises one ``ValueError``
saying what went wrong, and the old files are untouched.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

from sdlearn.checkpoint import atomic_write_files

BEGIN_MARKER = "# BEGIN SOLUTION"
END_MARKER = "# END SOLUTION"
STUB_COMMENT = "# YOUR CODE HERE"
STUB = 'raise NotImplementedError("Exercise: fill this in")'
RAISES_TAG = "raises-exception"
RUBRIC_TAG = "rubric"  # a markdown cell of grading notes: kept in the teacher's copy, dropped from the student's
GUIDANCE_TITLE = "How to check your answer"
GUIDANCE = (
    f"**{GUIDANCE_TITLE}.** In each exercise cell, replace `raise NotImplementedError(...)` with your code and "
    "run the cell. The `check_...(...)` call that follows runs your function on several inputs and compares it "
    "with `sdlearn`'s reference: it prints **✓ Correct!** or tells you which case failed, what it expected and "
    "what it got. Stuck? The rest of the notebook does not depend on your answer, so you can move on and come back."
)

COMPANION_FILES = ("notation.md",)  # files the notebooks link to, copied beside them so that the links work
_BEGIN_RE = re.compile(r"^(?P<indent>[ \t]*)#\s*BEGIN SOLUTION\s*$")
_END_RE = re.compile(r"^[ \t]*#\s*END SOLUTION\s*$")
CHECK_CALL_RE = re.compile(r"(?<!def )\b(check_\w+)\s*\(")  # a call to a checker (group 1: its name), not its definition
NOTEBOOK_NAME_RE = re.compile(r"^\d\d_.*\.ipynb$")  # a course notebook: NN_name.ipynb


def find_solution_regions(source: str, where: str = "this cell") -> list[tuple[int, int]]:
    """Line indices ``(begin, end)`` (0-based, of the two marker lines) of each solution region in ``source``.

    Raises ``ValueError`` naming ``where`` (e.g. ``"01_forward_noising.ipynb, cell 12"``) and the line
    for an END without a BEGIN, a BEGIN inside a region, or a BEGIN never closed.
    """
    regions, begin = [], None
    for i, line in enumerate(source.splitlines()):
        if _BEGIN_RE.match(line):
            if begin is not None:
                raise ValueError(f"{where}, line {i + 1}: '{BEGIN_MARKER}' inside the solution region opened at line {begin + 1}; regions cannot nest")
            begin = i
        elif _END_RE.match(line):
            if begin is None:
                raise ValueError(f"{where}, line {i + 1}: '{END_MARKER}' without a '{BEGIN_MARKER}' before it")
            regions.append((begin, i))
            begin = None
        elif BEGIN_MARKER in line or END_MARKER in line:
            raise ValueError(f"{where}, line {i + 1}: a solution marker must be alone on its line, got {line.strip()!r}")
    if begin is not None:
        raise ValueError(f"{where}, line {begin + 1}: '{BEGIN_MARKER}' is never closed by '{END_MARKER}'")
    return regions


def strip_solutions(source: str, where: str = "this cell") -> str:
    """Replace every solution region (markers included) by a stub at the BEGIN marker's indentation::

        # YOUR CODE HERE
        raise NotImplementedError("Exercise: fill this in")

    Lines outside the regions are kept exactly. Unbalanced or nested markers raise ``ValueError``
    naming ``where``.
    """
    regions = find_solution_regions(source, where)
    if not regions:
        return source
    lines = source.splitlines()
    out, start = [], 0
    for begin, end in regions:
        indent = _BEGIN_RE.match(lines[begin])["indent"]
        out += lines[start:begin] + [indent + STUB_COMMENT, indent + STUB]
        start = end + 1
    out += lines[start:]
    return "\n".join(out) + ("\n" if source.endswith("\n") else "")


def student_notebook(nb, name: str = "notebook"):
    """A student copy of an nbformat v4 notebook (the input is not modified): solutions stubbed, outputs
    and execution counts cleared, exercise cells tagged ``raises-exception``, guidance added if missing,
    rubric cells (tagged ``rubric``) dropped."""
    import nbformat

    nb = copy.deepcopy(nb)
    nb.cells = [cell for cell in nb.cells if not is_rubric_cell(cell)]
    nb.metadata.pop("widgets", None)  # saved widget state belongs to the cleared outputs
    has_guidance = any(
        cell.cell_type == "markdown" and GUIDANCE_TITLE.lower() in cell.source.lower() for cell in nb.cells
    )
    first_exercise = None
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)
        stripped = strip_solutions(cell.source, where=f"{name}, cell {index + 1}")
        is_exercise = stripped != cell.source
        if is_exercise and first_exercise is None:
            first_exercise = index
        if is_exercise or CHECK_CALL_RE.search(stripped):
            tags = list(cell.metadata.get("tags", []))
            if RAISES_TAG not in tags:
                cell.metadata["tags"] = tags + [RAISES_TAG]
        cell.source = stripped
    if first_exercise is not None and not has_guidance:
        guidance = nbformat.v4.new_markdown_cell(GUIDANCE)
        if (nb.nbformat, nb.nbformat_minor) < (4, 5):
            del guidance["id"]  # cell ids exist from nbformat 4.5 on
        nb.cells.insert(first_exercise, guidance)
    return nb


def is_rubric_cell(cell) -> bool:
    """Whether ``cell`` is tagged ``rubric``: the teacher's grading notes of an experiment, never in a student copy."""
    return RUBRIC_TAG in cell.get("metadata", {}).get("tags", [])


def make_student_copy(src_nb_path: str | Path, dst_path: str | Path) -> Path:
    """Write the student copy of the notebook ``src_nb_path`` to ``dst_path`` (see :func:`student_notebook`),
    atomically (a link at ``dst_path`` is replaced, not followed). Problems raise ``ValueError``."""
    import nbformat

    src, dst = Path(src_nb_path), Path(dst_path)
    if not str(dst_path).strip():
        raise ValueError("the student copy's path is empty; name a file, e.g. my_copy.ipynb")
    if src.resolve() == dst.resolve():
        raise ValueError(f"refusing to overwrite the course notebook {src} with its student copy; choose another path")
    check_target(dst)
    nb = nbformat.read(src, as_version=4)
    write_notebooks([(dst, student_notebook(nb, src.name))], dst.parent)
    return dst


def check_target(dst: Path, kind: str = "student") -> None:
    """A notebook may replace a file or a link at ``dst``, never a folder (or anything else); ``kind`` names
    the copy in the message (``"student"``, ``"teacher's"``)."""
    if dst.is_symlink() or not os.path.lexists(dst):
        return
    if dst.is_dir():
        raise ValueError(f"{dst} is a folder, where the {kind} copy {dst.name} would go; move or rename it, "
                         "or choose another output folder")
    if not dst.is_file():
        raise ValueError(f"{dst} exists and is not a regular file; move it, or choose another output folder")


def write_notebooks(copies, out: Path, kind: str = "student", companions=()) -> None:
    """Write every (path, notebook), and every (path, bytes) of ``companions``, all or nothing; an ``OSError`` (a full
    disk, a read-only folder) becomes one ``ValueError`` naming the folder (and ``kind``, the copies') and the cause,
    and leaves no partial file."""
    import nbformat

    texts = [(dst, nbformat.writes(nb)) for dst, nb in copies]
    files = [(dst, (text if text.endswith("\n") else text + "\n").encode("utf-8")) for dst, text in texts]  # as nbformat.write
    files += list(companions)
    try:
        atomic_write_files(files)
    except OSError as error:
        reason = error.strerror or str(error)
        raise ValueError(f"cannot write the {kind} notebooks into {out}: {reason}"
                         f"{f' ({error.filename})' if error.filename else ''}; nothing was written") from error


def default_notebooks_dir() -> Path:
    """The course's ``notebooks/`` folder, next to the ``sdlearn`` package in a source checkout."""
    return Path(__file__).resolve().parent.parent.parent / "notebooks"


def write_student_copies(out_dir: str | Path, notebooks_dir: str | Path | None = None, force: bool = False) -> list[Path]:
    """Write a student copy of every ``NN_*.ipynb`` in ``notebooks_dir`` (default: the course's) into ``out_dir``.

    Only the notebooks are written. ``out_dir`` is created if needed; an existing non-empty folder
    is refused (``FileExistsError``) unless ``force``, which replaces same-named notebooks (a link among
    them is replaced, not written through) and leaves every other file alone. ``out_dir`` may never be
    empty (``""`` is not "here"), be the notebooks folder or lie inside it, and a folder may not stand
    where a notebook goes (``ValueError``). Every notebook is converted before anything is written, so a
    malformed solution region leaves ``out_dir`` untouched, and the files are written all or nothing: a
    full disk or a read-only place raises one ``ValueError`` and leaves no partial notebook. Returns the
    written paths, in course order.
    """
    return write_copies(out_dir, student_notebook, notebooks_dir, force, kind="student")


def write_copies(out_dir: str | Path, convert, notebooks_dir: str | Path | None = None, force: bool = False,
                 kind: str = "student") -> list[Path]:
    """Write ``convert(notebook, name)`` of every ``NN_*.ipynb`` in ``notebooks_dir`` into ``out_dir``, safely:
    the rules of :func:`write_student_copies`, for copies of any ``kind`` (named in the messages)."""
    import nbformat

    if isinstance(out_dir, str) and not out_dir.strip():
        raise ValueError("the output folder is an empty name; name a folder, e.g. "
                         "python -m sdlearn exercises my_exercises (or . for the current folder)")
    source = Path(notebooks_dir) if notebooks_dir is not None else default_notebooks_dir()
    if not source.is_dir():
        raise FileNotFoundError(f"no notebooks folder at {source}; pass the folder holding the NN_*.ipynb notebooks")
    out = Path(out_dir)
    source_resolved, out_resolved = source.resolve(), out.resolve()
    if out_resolved == source_resolved or source_resolved in out_resolved.parents:
        raise ValueError(f"refusing to write {kind} copies into the course's own notebooks folder ({source}); choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty; choose an empty folder or pass --force (force=True) to overwrite its notebooks")
    paths = sorted(p for p in source.iterdir() if NOTEBOOK_NAME_RE.match(p.name) and p.is_file())
    if not paths:
        raise FileNotFoundError(f"no NN_*.ipynb notebooks in {source}")
    companions = [(out / name, (source / name).read_bytes()) for name in COMPANION_FILES if (source / name).is_file()]
    for p in paths:
        check_target(out / p.name, kind)
    for dst, _ in companions:
        check_target(dst, kind)
    copies = [(out / p.name, convert(nbformat.read(p, as_version=4), p.name)) for p in paths]
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create the folder {out}: {error.strerror or error}") from error
    try:
        write_notebooks(copies, out, kind, companions)
    except ValueError:
        if created:
            try:
                out.rmdir()  # leave no trace of a write that failed (the folder is empty: nothing was written)
            except OSError:
                pass
        raise
    return [dst for dst, _ in copies]
