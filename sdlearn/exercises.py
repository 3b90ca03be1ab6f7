"""Exercises: auto-checkers for the learner's code, and student copies of the notebooks.

Writing an exercise in a course notebook
----------------------------------------
1. The learner writes a *function*. Its body (or any part of a code cell) is the solution,
   between two marker lines::

       def my_add_noise(x0, noise, t, alphas_cumprod):
           # BEGIN SOLUTION
           a = alphas_cumprod[t].reshape(-1, 1, 1, 1)
           return a.sqrt() * x0 + (1 - a).sqrt() * noise
           # END SOLUTION

2. The same cell, or the next, checks it: ``check_add_noise(my_add_noise)``. A checker runs the
   function on several inputs built from a fixed seed, compares with sdlearn's reference, prints
   ``✓ Correct! ...`` or raises :class:`ExerciseFailed` explaining the first failing case in
   plain words (which inputs, what was expected, what came back, a hint).
3. Later cells must not depend on the learner's function: they use ``sdlearn``'s own, so a
   student who skips an exercise can still run the rest of the notebook.

Student copies
--------------
``python -m sdlearn exercises OUT_DIR`` (:func:`write_student_copies`) writes every ``NN_*.ipynb``
with each solution region replaced by ``# YOUR CODE HERE`` and
``raise NotImplementedError("Exercise: fill this in")`` at the marker's indentation, and with all
outputs and execution counts cleared. Cells holding a stub, and cells calling a checker, get the
cell tag ``raises-exception``: JupyterLab's "Run All" and nbclient then carry on past an
unfinished exercise instead of stopping there. A checker given an unfinished function raises
:class:`ExerciseNotDone`, which is both an :class:`ExerciseFailed` and a ``NotImplementedError``.
If a notebook has no "How to check your answer" markdown cell, one is inserted before its first
exercise.

Adding a checker
----------------
Write a reference function (usually sdlearn's own code), a function that builds the test cases
from a seeded generator, and one or more plausible :class:`Mistake` s, then ``register`` a
:class:`Checker`; see ``check_snr`` below for a complete example in a dozen lines. Every registered
checker is tested to pass its reference and to fail each of its mistakes.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdlearn.schedules import make_betas, rescale_zero_terminal_snr

BEGIN_MARKER = "# BEGIN SOLUTION"
END_MARKER = "# END SOLUTION"
STUB_COMMENT = "# YOUR CODE HERE"
STUB = 'raise NotImplementedError("Exercise: fill this in")'
RAISES_TAG = "raises-exception"
GUIDANCE_TITLE = "How to check your answer"
GUIDANCE = (
    f"**{GUIDANCE_TITLE}.** In each exercise cell, replace `raise NotImplementedError(...)` with your code and "
    "run the cell. The `check_...(...)` call that follows runs your function on several inputs and compares it "
    "with `sdlearn`'s reference: it prints **✓ Correct!** or tells you which case failed, what it expected and "
    "what it got. Stuck? The rest of the notebook does not depend on your answer, so you can move on and come back."
)

_BEGIN_RE = re.compile(r"^(?P<indent>[ \t]*)#\s*BEGIN SOLUTION\s*$")
_END_RE = re.compile(r"^[ \t]*#\s*END SOLUTION\s*$")
_CHECK_CALL_RE = re.compile(r"(?<!def )\bcheck_\w+\s*\(")  # a call to a checker, not its definition
_NOTEBOOK_NAME_RE = re.compile(r"^\d\d_.*\.ipynb$")


# =================================================================================================
# Solution regions and student copies
# =================================================================================================
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
    and execution counts cleared, exercise cells tagged ``raises-exception``, guidance added if missing."""
    import nbformat

    nb = copy.deepcopy(nb)
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
        if is_exercise or _CHECK_CALL_RE.search(stripped):
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


def make_student_copy(src_nb_path: str | Path, dst_path: str | Path) -> Path:
    """Write the student copy of the notebook ``src_nb_path`` to ``dst_path`` (see :func:`student_notebook`)."""
    import nbformat

    src, dst = Path(src_nb_path), Path(dst_path)
    if src.resolve() == dst.resolve():
        raise ValueError(f"refusing to overwrite the course notebook {src} with its student copy; choose another path")
    nb = nbformat.read(src, as_version=4)
    nbformat.write(student_notebook(nb, src.name), dst)
    return dst


def default_notebooks_dir() -> Path:
    """The course's ``notebooks/`` folder, next to the ``sdlearn`` package in a source checkout."""
    return Path(__file__).resolve().parent.parent / "notebooks"


def write_student_copies(out_dir: str | Path, notebooks_dir: str | Path | None = None, force: bool = False) -> list[Path]:
    """Write a student copy of every ``NN_*.ipynb`` in ``notebooks_dir`` (default: the course's) into ``out_dir``.

    Only the notebooks are written. ``out_dir`` is created if needed; an existing non-empty folder
    is refused (``FileExistsError``) unless ``force``, which overwrites same-named notebooks and leaves
    every other file alone. ``out_dir`` may never be the notebooks folder or lie inside it
    (``ValueError``). Every notebook is converted before anything is written, so a malformed
    solution region leaves ``out_dir`` untouched. Returns the written paths, in course order.
    """
    import nbformat

    source = Path(notebooks_dir) if notebooks_dir is not None else default_notebooks_dir()
    if not source.is_dir():
        raise FileNotFoundError(f"no notebooks folder at {source}; pass the folder holding the NN_*.ipynb notebooks")
    out = Path(out_dir)
    source_resolved, out_resolved = source.resolve(), out.resolve()
    if out_resolved == source_resolved or source_resolved in out_resolved.parents:
        raise ValueError(f"refusing to write student copies into the course's own notebooks folder ({source}); choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty; choose an empty folder or pass --force (force=True) to overwrite its notebooks")
    paths = sorted(p for p in source.iterdir() if _NOTEBOOK_NAME_RE.match(p.name) and p.is_file())
    if not paths:
        raise FileNotFoundError(f"no NN_*.ipynb notebooks in {source}")
    copies = [(out / p.name, student_notebook(nbformat.read(p, as_version=4), p.name)) for p in paths]
    out.mkdir(parents=True, exist_ok=True)
    for dst, nb in copies:
        nbformat.write(nb, dst)
    return [dst for dst, _ in copies]


# =================================================================================================
# The checker framework
# =================================================================================================
class ExerciseFailed(AssertionError):
    """The learner's function gave a wrong answer (or crashed) on one of the checker's cases."""


class ExerciseNotDone(ExerciseFailed, NotImplementedError):
    """The learner's function still raises ``NotImplementedError``: the exercise is not filled in yet."""


@dataclass
class Case:
    """One test input: positional ``args`` for the function, and a plain-words ``description`` of them."""

    description: str
    args: tuple
    kwargs: dict = field(default_factory=dict)


@dataclass
class Mistake:
    """A plausible wrong answer, and what it looks like in words (shown when the learner's output matches it)."""

    fn: Callable
    explanation: str


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _shape(x: torch.Tensor) -> str:
    return f"[{', '.join(map(str, x.shape))}]"


def _index(flat_index: int, shape: torch.Size) -> str:
    coords = []
    for size in reversed(shape):
        flat_index, r = divmod(flat_index, size)
        coords.append(r)
    return f"index ({', '.join(map(str, reversed(coords)))})" if coords else "the value"


def _difference(expected: Any, got: Any, atol: float, rtol: float, what: str = "your result") -> str | None:
    """Why ``got`` is not ``expected``, in words; None when they agree within ``atol + rtol·|expected|``."""
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return f"expected {len(expected)} values (a {type(expected).__name__}), got {type(got).__name__}"
        for k, (e, g) in enumerate(zip(expected, got)):
            problem = _difference(e, g, atol, rtol, what=f"value {k} of your result")
            if problem:
                return problem
        return None
    if got is None:
        return f"{what} is None: did you forget to `return` it?"
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if not isinstance(got, (int, float)):
            return f"expected a number, {what} is a {type(got).__name__}"
        if math.isnan(got) and not math.isnan(expected):
            return f"{what} is NaN, expected {expected:.6g}"
        if not math.isclose(got, expected, rel_tol=rtol, abs_tol=atol):
            return f"expected {expected:.6g}, {what} is {got:.6g}"
        return None
    if not isinstance(expected, torch.Tensor):
        return None if got == expected else f"expected {expected!r}, {what} is {got!r}"

    if not isinstance(got, torch.Tensor):
        return f"expected a torch.Tensor, {what} is a {type(got).__name__}"
    if got.shape != expected.shape:
        return f"expected shape {_shape(expected)}, {what} has shape {_shape(got)}"
    if expected.is_floating_point() != got.is_floating_point() or (expected.dtype == torch.bool) != (got.dtype == torch.bool):
        return f"expected dtype {expected.dtype}, {what} has dtype {got.dtype}"
    e, g = expected.detach().cpu().double(), got.detach().cpu().double()
    for bad, word in ((torch.isnan, "NaN"), (torch.isinf, "infinite")):
        unexpected = bad(g) & ~bad(e)
        if unexpected.any():
            first = int(unexpected.flatten().nonzero()[0])
            return (f"{what} contains {int(unexpected.sum())} {word} value(s) where the answer has none "
                    f"(the first at {_index(first, g.shape)}, where {float(e.flatten()[first]):.6g} was expected)")
    same_special = (e == g) | (torch.isnan(e) & torch.isnan(g))  # ±inf and NaN must match exactly
    error = torch.where(same_special, torch.zeros_like(e), (g - e).abs())
    allowed = atol + rtol * e.abs().nan_to_num(posinf=0.0)
    wrong = error > allowed
    if wrong.any():
        worst = int(torch.where(wrong, error, torch.zeros_like(error)).flatten().argmax())
        return (f"{int(wrong.sum())} of {e.numel()} values differ; the largest difference is "
                f"{float(error.flatten()[worst]):.3g} at {_index(worst, e.shape)}: expected "
                f"{float(e.flatten()[worst]):.6g}, got {float(g.flatten()[worst]):.6g}")
    return None


def check(
    fn: Callable,
    reference: Callable,
    cases: Sequence[Case],
    name: str,
    hint: str = "",
    mistakes: Sequence[Mistake] = (),
    atol: float = 1e-5,
    rtol: float = 1e-4,
    compare: Callable[[Any, Any], str | None] | None = None,
) -> None:
    """Run ``fn`` and ``reference`` on every case; print ``✓ Correct!`` if all agree.

    It returns None, so that a checker call as the last line of a notebook cell shows only the
    printed line (a returned True would be displayed too, and a trailing ``;`` does not hide it
    under nbval).

    On the first disagreement raise :class:`ExerciseFailed` saying which case (its description),
    what went wrong (an exception and its message, a missing ``return``, a shape or dtype, NaNs, the
    largest difference and where), what it looks like when the output matches a known ``Mistake``,
    and the ``hint``. ``compare(expected, got)`` may replace the default comparison, which allows
    ``atol + rtol·|expected|``; it returns a message when they differ and None when they agree.
    """
    __tracebackhide__ = True  # IPython and pytest show the learner's frames, not the checker's
    if not callable(fn):
        raise ExerciseFailed(f"{name}: expected your function, got a {type(fn).__name__} ({repr(fn)[:60]}). "
                             f"Pass the function itself, without calling it: {name}(my_function)")
    compare = compare or (lambda expected, got: _difference(expected, got, atol, rtol))

    def fail(k: int, case: Case, problem: str, extra: str = "", error_type=ExerciseFailed):
        lines = [f"{name}: case {k + 1} of {len(cases)} failed.", f"  Inputs: {case.description}", f"  Problem: {problem}"]
        if extra:
            lines.append(f"  {extra}")
        if hint:
            lines.append(f"  Hint: {hint}")
        return error_type("\n".join(lines))

    for k, case in enumerate(cases):
        expected = reference(*_clone(case.args), **_clone(case.kwargs))
        args, kwargs = _clone(case.args), _clone(case.kwargs)
        try:
            got = fn(*args, **kwargs)
        except NotImplementedError as error:
            raise fail(k, case, f"your function raised NotImplementedError({error}).",
                       "Replace the `raise NotImplementedError(...)` line with your code, run that cell, then run this check again.",
                       ExerciseNotDone) from None
        except Exception as error:
            raise fail(k, case, f"your function raised {type(error).__name__}: {error}") from error
        for position, (before, after) in enumerate(zip(case.args, args)):
            if isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and not torch.equal(before, after):
                raise fail(k, case, f"your function changed its input number {position + 1} in place (an in-place "
                                    "operation such as `+=`, `.mul_()` or `x[...] = ...`). Work on a copy, e.g. `x = x.clone()`.") from None
        problem = compare(expected, got)
        if problem is None:
            continue
        extra = ""
        for mistake in mistakes:
            try:
                if compare(mistake.fn(*_clone(case.args), **_clone(case.kwargs)), got) is None:
                    extra = f"It looks like {mistake.explanation}."
                    break
            except Exception:  # a mistake that cannot run on this case simply does not match
                continue
        raise fail(k, case, problem, extra) from None
    print(f"✓ Correct! {name} passed {len(cases)} cases.")
    return None


@dataclass
class Checker:
    """An exercise's checker: call it with the learner's function, ``check_add_noise(my_add_noise)``.

    ``make_cases(generator)`` builds the inputs from a generator seeded with ``seed``; ``reference``
    is a correct answer and ``mistakes`` plausible wrong ones (with an explanation each), used both
    to explain a failure and, in the tests, as functions the checker must reject.
    """

    name: str
    signature: str
    doc: str
    reference: Callable
    make_cases: Callable[[torch.Generator], list[Case]]
    hint: str
    mistakes: tuple[Mistake, ...]
    atol: float = 1e-5
    rtol: float = 1e-4
    seed: int = 0

    def __post_init__(self):
        self.__doc__ = f"Check your function ``{self.signature}``: {self.doc}\n\nHint when it fails: {self.hint}"

    def cases(self) -> list[Case]:
        return self.make_cases(torch.Generator().manual_seed(self.seed))

    @property
    def wrong_examples(self) -> list[Callable]:
        return [m.fn for m in self.mistakes]

    def __call__(self, fn: Callable) -> None:
        __tracebackhide__ = True
        return check(fn, self.reference, self.cases(), name=self.name, hint=self.hint,
                     mistakes=self.mistakes, atol=self.atol, rtol=self.rtol)

    def __repr__(self) -> str:
        return f"<exercise checker {self.name}: {self.signature}>"


CHECKERS: dict[str, Checker] = {}


def register(checker: Checker) -> Checker:
    """Add a checker to :data:`CHECKERS` (so the tests cover it) and return it."""
    if checker.name in CHECKERS:
        raise ValueError(f"a checker named {checker.name} is already registered")
    CHECKERS[checker.name] = checker
    return checker


# =================================================================================================
# Checkers. Inputs are built from a seeded generator, so every learner gets the same cases.
# =================================================================================================
def _images(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=g) * 2 - 1  # images in [-1, 1]


def _bcast(per_sample: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return per_sample.reshape(-1, *([1] * (like.dim() - 1)))  # [B] → [B, 1, 1, 1]


# ---- notebook 01: the forward process -----------------------------------------------------------
def _forward_step_cases(g):
    cases = []
    for shape, beta in (((3, 8, 8), 1e-4), ((4, 3, 8, 8), 0.02), ((2, 4, 8, 8), 0.5), ((5,), 0.999)):
        x = _images(g, *shape)
        cases.append(Case(f"x_prev of shape {_shape(x)}, noise of the same shape, beta_t = {beta}",
                          (x, torch.randn(shape, generator=g), torch.tensor(beta))))
    return cases


check_forward_step = register(Checker(
    name="check_forward_step",
    signature="fn(x_prev, noise, beta_t) -> x_t",
    doc="one step of the forward chain, x_t = √(1−β_t)·x_{t−1} + √β_t·ε (DDPM, eq. 2). "
        "``beta_t`` is a 0-d tensor (a single number), ``x_prev`` and ``noise`` have the same shape.",
    reference=lambda x, noise, beta: (1 - beta).sqrt() * x + beta.sqrt() * noise,
    make_cases=_forward_step_cases,
    hint="x_t = √(1 − β_t) · x_prev + √β_t · noise: both coefficients are square roots, so that the variance stays 1.",
    mistakes=(
        Mistake(lambda x, noise, beta: (1 - beta) * x + beta * noise, "you forgot the square roots: the coefficients are √(1−β_t) and √β_t"),
        Mistake(lambda x, noise, beta: x + beta.sqrt() * noise, "you added noise without shrinking x_prev by √(1−β_t), so the variance grows at every step"),
        Mistake(lambda x, noise, beta: beta.sqrt() * x + (1 - beta).sqrt() * noise, "you swapped the two coefficients"),
    ),
))


def _alphas_cumprod_cases(g):
    return [
        Case("betas of the linear schedule, T = 1000 (1e-4 → 0.02)", (make_betas("linear", 1000),)),
        Case("betas of the cosine schedule, T = 50", (make_betas("cosine", 50),)),
        Case("10 random betas between 0 and 0.5", (torch.rand(10, generator=g) * 0.5,)),
        Case("a single beta, 0.3 (T = 1)", (torch.tensor([0.3]),)),
    ]


check_alphas_cumprod = register(Checker(
    name="check_alphas_cumprod",
    signature="fn(betas) -> alphas_cumprod",
    doc="ᾱ_t = ∏_{s≤t} (1 − β_s) for every t, a tensor of the same shape [T] as ``betas`` (DDPM, eq. 4).",
    reference=lambda betas: torch.cumprod(1 - betas, dim=0),
    make_cases=_alphas_cumprod_cases,
    hint="α_t = 1 − β_t, and ᾱ_t is the running product α_0·α_1·…·α_t: see torch.cumprod.",
    mistakes=(
        Mistake(lambda betas: torch.cumprod(betas, dim=0), "you multiplied the betas instead of the alphas α_t = 1 − β_t"),
        Mistake(lambda betas: 1 - torch.cumprod(betas, dim=0), "you computed 1 − ∏β instead of ∏(1 − β)"),
        Mistake(lambda betas: torch.cat([torch.ones(1), torch.cumprod(1 - betas, dim=0)[:-1]]),
                "your product stops one step early: ᾱ_t includes α_t itself, so ᾱ_0 = α_0 = 1 − β_0"),
        Mistake(lambda betas: 1 - torch.cumsum(betas, dim=0), "you subtracted the sum of the betas instead of multiplying the alphas"),
    ),
))


def _add_noise_cases(g):
    ac = make_betas("scaled_linear", 1000)
    ac = torch.cumprod(1 - ac, dim=0)
    cases = []
    for shape, t in (((4, 3, 8, 8), [0, 10, 500, 999]), ((1, 3, 16, 16), [999]), ((3, 4, 8, 8), [250, 250, 750]),
                     ((2, 3, 4, 4), [1, 998])):
        x0 = _images(g, *shape)
        cases.append(Case(f"x0 of shape {_shape(x0)}, noise of the same shape, t = {t}, "
                          "alphas_cumprod of Stable Diffusion's schedule (T = 1000)",
                          (x0, torch.randn(shape, generator=g), torch.tensor(t), ac)))
    return cases


def _add_noise_reference(x0, noise, t, alphas_cumprod):
    a = _bcast(alphas_cumprod[t], x0)  # [B, 1, 1, 1]
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


check_add_noise = register(Checker(
    name="check_add_noise",
    signature="fn(x0, noise, t, alphas_cumprod) -> x_t",
    doc="the closed form x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (DDPM, eq. 4) for a batch: ``x0`` and ``noise`` are "
        "[B, C, H, W], ``t`` a long tensor [B] of timesteps (one per image), ``alphas_cumprod`` the tensor [T].",
    reference=_add_noise_reference,
    make_cases=_add_noise_cases,
    hint="index alphas_cumprod with t to get one ᾱ_t per image (shape [B]), reshape it to [B, 1, 1, 1] so that "
         "it multiplies whole images, and remember that both coefficients are square roots.",
    mistakes=(
        Mistake(lambda x0, noise, t, ac: _bcast(ac[t], x0) * x0 + (1 - _bcast(ac[t], x0)) * noise,
                "you used ᾱ_t and 1 − ᾱ_t where their square roots belong"),
        Mistake(lambda x0, noise, t, ac: (1 - _bcast(ac[t], x0)).sqrt() * x0 + _bcast(ac[t], x0).sqrt() * noise,
                "you swapped the coefficients: x0 gets √ᾱ_t (large at small t), the noise gets √(1 − ᾱ_t)"),
        Mistake(lambda x0, noise, t, ac: _add_noise_reference(x0, noise, t - 1, ac),
                "you looked up alphas_cumprod[t − 1]: timesteps are 0-based indices, use alphas_cumprod[t]"),
        Mistake(lambda x0, noise, t, ac: _add_noise_reference(x0, noise, t[:1].expand_as(t), ac),
                "you used the first image's timestep for the whole batch: each image has its own t"),
    ),
))


def _x0_from_noise_cases(g):
    ac = torch.cumprod(1 - make_betas("scaled_linear", 1000), dim=0)
    cases = []
    for shape, t in (((4, 3, 8, 8), [0, 10, 500, 900]), ((2, 4, 8, 8), [300, 300]), ((1, 3, 16, 16), [999])):
        x_t = torch.randn(shape, generator=g)
        cases.append(Case(f"x_t of shape {_shape(x_t)}, noise of the same shape, t = {t}, "
                          "alphas_cumprod of Stable Diffusion's schedule (T = 1000)",
                          (x_t, torch.randn(shape, generator=g), torch.tensor(t), ac)))
    return cases


def _x0_from_noise_reference(x_t, noise, t, alphas_cumprod):
    a = _bcast(alphas_cumprod[t], x_t)  # [B, 1, 1, 1]
    return (x_t - (1 - a).sqrt() * noise) / a.sqrt()


check_x0_from_noise = register(Checker(
    name="check_x0_from_noise",
    signature="fn(x_t, noise, t, alphas_cumprod) -> x0",
    doc="undo the closed form: knowing the noise ε that was added, x0 = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t. "
        "Shapes as in ``check_add_noise``. This is how a model that predicts ε gives a guess of the clean image.",
    reference=_x0_from_noise_reference,
    make_cases=_x0_from_noise_cases,
    hint="solve x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε for x0, with ᾱ_t = alphas_cumprod[t] reshaped to [B, 1, 1, 1].",
    mistakes=(
        Mistake(lambda x_t, noise, t, ac: x_t - noise, "you subtracted the noise without its coefficient √(1−ᾱ_t) and without dividing by √ᾱ_t"),
        Mistake(lambda x_t, noise, t, ac: (x_t - (1 - _bcast(ac[t], x_t)).sqrt() * noise) * _bcast(ac[t], x_t).sqrt(),
                "you multiplied by √ᾱ_t where you should divide by it"),
        Mistake(lambda x_t, noise, t, ac: (x_t - (1 - _bcast(ac[t], x_t)) * noise) / _bcast(ac[t], x_t),
                "you used ᾱ_t and 1 − ᾱ_t where their square roots belong"),
    ),
    rtol=1e-4,
    atol=1e-4,  # at t = 999, dividing by √ᾱ_t ≈ 0.07 magnifies float32 rounding
))


# ---- notebook 02: noise schedules ------------------------------------------------------------
def _beta_range_cases(g):
    return [Case(f"beta_start = {a}, beta_end = {b}, T = {T}", (a, b, T))
            for a, b, T in ((1e-4, 0.02, 1000), (0.00085, 0.012, 1000), (0.001, 0.2, 10), (0.1, 0.3, 2))]


check_linear_betas = register(Checker(
    name="check_linear_betas",
    signature="fn(beta_start, beta_end, T) -> betas",
    doc="DDPM's linear schedule: T values of β evenly spaced from ``beta_start`` to ``beta_end``, both "
        "included, as a float32 tensor [T] (Ho et al. 2020, §4).",
    reference=lambda a, b, T: make_betas("linear", T, beta_start=a, beta_end=b),
    make_cases=_beta_range_cases,
    hint="you need T evenly spaced values that include both ends: look at torch.linspace.",
    mistakes=(
        Mistake(lambda a, b, T: torch.linspace(b, a, T), "your schedule runs backwards: β must grow from beta_start to beta_end"),
        Mistake(lambda a, b, T: torch.linspace(a, b, T + 1)[1:], "your values are spaced for T + 1 points and the first one is dropped"),
        Mistake(lambda a, b, T: torch.linspace(a**0.5, b**0.5, T) ** 2, "you built the scaled-linear schedule (squares of evenly spaced √β)"),
    ),
    atol=1e-7,
))

check_scaled_linear_betas = register(Checker(
    name="check_scaled_linear_betas",
    signature="fn(beta_start, beta_end, T) -> betas",
    doc="Stable Diffusion's scaled-linear schedule: √β evenly spaced from √beta_start to √beta_end, then "
        "squared, as a float32 tensor [T].",
    reference=lambda a, b, T: make_betas("scaled_linear", T, beta_start=a, beta_end=b),
    make_cases=_beta_range_cases,
    hint="space the square roots evenly from √beta_start to √beta_end (T values, both ends included), then square them.",
    mistakes=(
        Mistake(lambda a, b, T: torch.linspace(a, b, T), "you built the linear schedule: here it is √β that is evenly spaced"),
        Mistake(lambda a, b, T: torch.linspace(a, b, T).sqrt(), "you took the square root of evenly spaced betas instead of squaring evenly spaced square roots"),
        Mistake(lambda a, b, T: torch.linspace(a**2, b**2, T) ** 0.5, "you spaced β² evenly instead of √β"),
    ),
    atol=1e-7,
))


def _cosine_reference_f32(T: int, s: float = 0.008, max_beta: float = 0.999, squared: bool = True) -> torch.Tensor:
    """A torch float32 version used to build the mistakes below (the reference is make_betas("cosine"))."""
    u = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((u + s) / (1 + s) * math.pi / 2)
    f = f**2 if squared else f
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta).float()


check_cosine_betas = register(Checker(
    name="check_cosine_betas",
    signature="fn(T) -> betas",
    doc="the cosine schedule of Nichol & Dhariwal 2021 (eq. 17): ᾱ(u) = cos²((u + s)/(1 + s) · π/2) with "
        "s = 0.008 and u = t/T, and β_t = min(1 − ᾱ((t+1)/T) / ᾱ(t/T), 0.999) for t = 0 … T−1, a float32 tensor [T].",
    reference=lambda T: make_betas("cosine", T),
    make_cases=lambda g: [Case(f"T = {T}", (T,)) for T in (1000, 50, 4)],
    hint="compute f = cos²((u + 0.008) / 1.008 · π/2) at u = 0, 1/T, …, 1 (T + 1 points), then β = 1 − f[1:] / f[:-1], "
         "capped at 0.999 with .clamp(max=0.999).",
    mistakes=(
        Mistake(lambda T: _cosine_reference_f32(T, max_beta=1.0), "you did not cap β at 0.999: the last step would then be β = 1, which destroys everything"),
        Mistake(lambda T: _cosine_reference_f32(T, s=0.0), "you left out the small offset s = 0.008, which keeps β tiny near t = 0"),
        Mistake(lambda T: _cosine_reference_f32(T, squared=False), "you used cos instead of cos²"),
    ),
    atol=3e-4,  # float32 cosines near π/2 are only this precise; forgetting the cap is off by 1e-3
    rtol=1e-4,
))


def _alphas_cumprod_inputs(g):
    return [
        Case("alphas_cumprod of Stable Diffusion's schedule (T = 1000)", (torch.cumprod(1 - make_betas("scaled_linear", 1000), 0),)),
        Case("alphas_cumprod of the cosine schedule (T = 50)", (torch.cumprod(1 - make_betas("cosine", 50), 0),)),
        Case("8 random values of ᾱ between 0.01 and 0.99", (torch.rand(8, generator=g) * 0.98 + 0.01,)),
    ]


check_snr = register(Checker(
    name="check_snr",
    signature="fn(alphas_cumprod) -> snr",
    doc="the signal-to-noise ratio SNR_t = ᾱ_t / (1 − ᾱ_t) at every t (Kingma et al. 2021), a tensor [T].",
    reference=lambda ac: ac / (1 - ac),
    make_cases=_alphas_cumprod_inputs,
    hint="x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε: the signal's power is ᾱ_t and the noise's is 1 − ᾱ_t; SNR is their ratio.",
    mistakes=(
        Mistake(lambda ac: (1 - ac) / ac, "you computed noise / signal: SNR is signal / noise, ᾱ_t / (1 − ᾱ_t)"),
        Mistake(lambda ac: ac.sqrt() / (1 - ac).sqrt(), "you divided the amplitudes √ᾱ_t / √(1 − ᾱ_t): SNR is a ratio of powers (variances), without square roots"),
        Mistake(lambda ac: ac, "you returned ᾱ_t itself"),
    ),
))

check_log_snr = register(Checker(
    name="check_log_snr",
    signature="fn(alphas_cumprod) -> log_snr",
    doc="log-SNR_t = log(ᾱ_t / (1 − ᾱ_t)), natural logarithm, a tensor [T]; it may be −inf where ᾱ_t = 0.",
    reference=lambda ac: torch.log(ac) - torch.log1p(-ac),
    make_cases=lambda g: _alphas_cumprod_inputs(g) + [
        Case("alphas_cumprod of Stable Diffusion's schedule rescaled to zero terminal SNR (the last value is 0)",
             (torch.cumprod(1 - rescale_zero_terminal_snr(make_betas("scaled_linear", 1000)), 0),)),
    ],
    hint="torch.log(ac / (1 - ac)), or more precisely torch.log(ac) - torch.log1p(-ac). At ᾱ_t = 0 the answer is −inf.",
    mistakes=(
        Mistake(lambda ac: torch.log10(ac / (1 - ac)), "you used log base 10: the log-SNR uses the natural logarithm, torch.log"),
        Mistake(lambda ac: torch.log(ac.sqrt() / (1 - ac).sqrt()), "you took the log of the amplitude ratio √ᾱ/√(1−ᾱ), which is half the log-SNR"),
        Mistake(lambda ac: torch.log(ac) / torch.log(1 - ac), "you divided the logarithms: log(a / b) is log a − log b"),
    ),
    atol=1e-4,
))


def _zero_snr_cases(g):
    return [
        Case("betas of Stable Diffusion's scaled-linear schedule, T = 1000", (make_betas("scaled_linear", 1000),)),
        Case("betas of the linear schedule, T = 1000", (make_betas("linear", 1000),)),
        Case("betas of the linear schedule, T = 20", (make_betas("linear", 20),)),
    ]


def _rescale_alpha_bar_not_sqrt(betas):
    a = torch.cumprod(1 - betas, 0)
    a = (a - a[-1]) * a[0] / (a[0] - a[-1])
    return 1 - torch.cat([a[:1], a[1:] / a[:-1]])


def _shift_without_scale(betas):
    s = torch.cumprod(1 - betas, 0).sqrt()
    a = (s - s[-1]) ** 2
    return 1 - torch.cat([a[:1], a[1:] / a[:-1]])


def _last_beta_to_one(betas):
    betas = betas.clone()
    betas[-1] = 1.0
    return betas


check_zero_terminal_snr = register(Checker(
    name="check_zero_terminal_snr",
    signature="fn(betas) -> rescaled_betas",
    doc="Lin et al. 2023, Algorithm 1: shift √ᾱ_t so that its last value is 0, scale it so that its first value "
        "is unchanged, square it back to ᾱ_t and recover β_t = 1 − ᾱ_t / ᾱ_{t−1} (β_0 = 1 − ᾱ_0). A tensor [T].",
    reference=rescale_zero_terminal_snr,
    make_cases=_zero_snr_cases,
    hint="s = cumprod(1 − betas).sqrt(); s = (s − s[-1]) · s[0] / (s[0] − s[-1]); ᾱ = s²; α = ᾱ_t / ᾱ_{t−1} "
         "(α_0 = ᾱ_0); return 1 − α.",
    mistakes=(
        Mistake(_last_beta_to_one, "you only set the last β to 1: ᾱ_T becomes 0, but SNR jumps there instead of the whole curve being rescaled"),
        Mistake(_rescale_alpha_bar_not_sqrt, "you shifted and scaled ᾱ_t itself: the algorithm works on √ᾱ_t"),
        Mistake(_shift_without_scale, "you shifted √ᾱ_t without scaling it back, so the first steps no longer keep their signal"),
    ),
    atol=1e-4,
))


# ---- notebook 06: samplers ----------------------------------------------------------------------
def _sd_alphas_cumprod() -> torch.Tensor:
    return torch.cumprod(1 - make_betas("scaled_linear", 1000), dim=0)  # [1000], Stable Diffusion's ᾱ_t


def _posterior_mean_reference(x0, x_t, alpha_bar_t, alpha_bar_prev):
    alpha_t = alpha_bar_t / alpha_bar_prev  # α over the stride from t' to t
    beta_t = 1 - alpha_t
    return (alpha_bar_prev.sqrt() * beta_t / (1 - alpha_bar_t) * x0
            + alpha_t.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar_t) * x_t)


def _posterior_mean_cases(g):
    ac = _sd_alphas_cumprod()
    cases = []
    for shape, t, t_prev in (((4, 3, 8, 8), 500, 499), ((2, 4, 8, 8), 999, 949), ((3, 3, 4, 4), 1, 0), ((2, 3, 4, 4), 20, None)):
        a_prev = ac[t_prev] if t_prev is not None else torch.tensor(1.0)
        what = f"alpha_bar_prev = ᾱ_{t_prev}" if t_prev is not None else "alpha_bar_prev = 1 (the last step, to clean data)"
        x0 = _images(g, *shape)
        cases.append(Case(f"x0 and x_t of shape {_shape(x0)}, alpha_bar_t = ᾱ_{t} = {ac[t].item():.4g}, {what} "
                          "(Stable Diffusion's schedule)",
                          (x0, torch.randn(shape, generator=g), ac[t], a_prev)))
    return cases


def _posterior_mean_without_stride(x0, x_t, alpha_bar_t, alpha_bar_prev):
    alpha_t = alpha_bar_t  # ᾱ_t used where α_t = ᾱ_t / ᾱ_{t'} belongs
    return (alpha_bar_prev.sqrt() * (1 - alpha_t) / (1 - alpha_bar_t) * x0
            + alpha_t.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar_t) * x_t)


check_ddpm_posterior_mean = register(Checker(
    name="check_ddpm_posterior_mean",
    signature="fn(x0, x_t, alpha_bar_t, alpha_bar_prev) -> mean",
    doc="the mean of the DDPM posterior q(x_{t'} | x_t, x0) (Ho et al. 2020, eq. 7): with α_t = ᾱ_t / ᾱ_{t'} and "
        "β_t = 1 − α_t, μ̃ = √ᾱ_{t'} β_t / (1 − ᾱ_t) · x0 + √α_t (1 − ᾱ_{t'}) / (1 − ᾱ_t) · x_t. ``x0`` and ``x_t`` "
        "have the same shape; ``alpha_bar_t`` and ``alpha_bar_prev`` (ᾱ_{t'}, the next, less noisy timestep) are 0-d tensors.",
    reference=_posterior_mean_reference,
    make_cases=_posterior_mean_cases,
    hint="first compute α_t = alpha_bar_t / alpha_bar_prev and β_t = 1 − α_t (the stride may be more than one step); "
         "x0's weight has √ᾱ_{t'} and β_t, x_t's has √α_t and 1 − ᾱ_{t'}; both are divided by 1 − ᾱ_t.",
    mistakes=(
        Mistake(_posterior_mean_without_stride, "you used ᾱ_t where α_t = ᾱ_t / ᾱ_{t'} belongs"),
        Mistake(lambda x0, x_t, a, a_prev: _posterior_mean_reference(x_t, x0, a, a_prev),
                "you swapped x0 and x_t: x0 is weighted by √ᾱ_{t'} β_t / (1 − ᾱ_t)"),
        Mistake(lambda x0, x_t, a, a_prev: (a_prev * (1 - a / a_prev) / (1 - a) * x0 + (a / a_prev) * (1 - a_prev) / (1 - a) * x_t),
                "you forgot the square roots on ᾱ_{t'} and α_t"),
        Mistake(lambda x0, x_t, a, a_prev: (a.sqrt() * (1 - a / a_prev) / (1 - a) * x0
                                            + (a / a_prev).sqrt() * (1 - a_prev) / (1 - a) * x_t),
                "you weighted x0 by √ᾱ_t instead of √ᾱ_{t'} (the timestep you are stepping to)"),
    ),
    atol=1e-5,
))


def _ddim_reference(x_t, eps, alpha_bar_t, alpha_bar_prev, eta, noise, forget_sigma_in_direction=False):
    x0 = (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()  # predicted x₀
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)).sqrt()  # eq. 16
    direction = (1 - alpha_bar_prev - (0 if forget_sigma_in_direction else sigma**2)).sqrt() * eps
    return alpha_bar_prev.sqrt() * x0 + direction + sigma * noise


def _ddim_cases(g):
    ac = _sd_alphas_cumprod()
    cases = []
    for shape, t, t_prev, eta in (((4, 3, 8, 8), 600, 550, 0.0), ((2, 4, 8, 8), 999, 899, 0.5), ((3, 3, 4, 4), 300, 250, 1.0),
                                  ((2, 3, 4, 4), 40, None, 1.0)):
        a_prev = ac[t_prev] if t_prev is not None else torch.tensor(1.0)
        what = f"alpha_bar_prev = ᾱ_{t_prev}" if t_prev is not None else "alpha_bar_prev = 1 (the last step)"
        x_t = torch.randn(shape, generator=g)
        cases.append(Case(f"x_t, eps and noise of shape {_shape(x_t)}, alpha_bar_t = ᾱ_{t}, {what}, eta = {eta} "
                          "(Stable Diffusion's schedule)",
                          (x_t, torch.randn(shape, generator=g), ac[t], a_prev, eta, torch.randn(shape, generator=g))))
    return cases


check_ddim_step = register(Checker(
    name="check_ddim_step",
    signature="fn(x_t, eps, alpha_bar_t, alpha_bar_prev, eta, noise) -> x_prev",
    doc="one DDIM step (Song et al. 2021, eqs. 12 and 16): x̂0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t, "
        "σ = η √((1−ᾱ_{t'})/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t'}), and x_{t'} = √ᾱ_{t'} x̂0 + √(1 − ᾱ_{t'} − σ²) ε + σ·noise. "
        "``alpha_bar_t`` and ``alpha_bar_prev`` are 0-d tensors, ``eta`` a float ≥ 0, ``noise`` has the shape of ``x_t``.",
    reference=_ddim_reference,
    make_cases=_ddim_cases,
    hint="three terms: the predicted x̂0 noised to t' (√ᾱ_{t'} x̂0), the 'direction pointing to x_t' "
         "(√(1 − ᾱ_{t'} − σ²) ε), and fresh noise σ·noise. With eta = 0, σ = 0.",
    mistakes=(
        Mistake(lambda x_t, eps, a, a_prev, eta, noise: _ddim_reference(x_t, eps, a, a, eta, noise),
                "you used ᾱ_t where ᾱ_{t'} (alpha_bar_prev, the timestep you step to) belongs"),
        Mistake(lambda x_t, eps, a, a_prev, eta, noise: a_prev.sqrt() * x_t + (1 - a_prev).sqrt() * eps,
                "you noised x_t itself: the first term is √ᾱ_{t'} times the predicted clean image x̂0"),
        Mistake(lambda x_t, eps, a, a_prev, eta, noise: _ddim_reference(x_t, eps, a, a_prev, eta, noise, forget_sigma_in_direction=True),
                "you forgot to subtract σ² inside the direction term: the noise σ·noise takes its share of the variance"),
        Mistake(lambda x_t, eps, a, a_prev, eta, noise: _ddim_reference(x_t, eps, a, a_prev, eta, torch.zeros_like(noise)),
                "you left out the fresh noise σ·noise"),
    ),
    atol=1e-5,
))


def _heun_reference(x, sigma, sigma_next, denoise):
    d = (x - denoise(x, sigma)) / sigma  # dx/dσ at the start
    x_euler = x + (sigma_next - sigma) * d
    if sigma_next == 0:
        return x_euler  # the last step, to σ = 0, is a plain Euler step
    d_next = (x_euler - denoise(x_euler, sigma_next)) / sigma_next  # dx/dσ at the Euler proposal
    return x + (sigma_next - sigma) * (d + d_next) / 2


def _toy_denoiser(x, sigma):
    """A smooth non-linear stand-in for D(x; σ): shrinks large noise, bends values towards ±0.7."""
    return 0.7 * torch.tanh(2 * x / (1 + sigma**2))


def _gaussian_denoiser(x, sigma):
    """The exact D(x; σ) for data N(0.5, 0.3²): 0.5 + 0.09 / (0.09 + σ²) · (x − 0.5)."""
    return 0.5 + 0.09 / (0.09 + sigma**2) * (x - 0.5)


def _heun_cases(g):
    cases = []
    for shape, sigma, sigma_next, denoise, what in (
            ((4, 3, 8, 8), 14.6, 7.0, _toy_denoiser, "a toy denoiser"),
            ((2, 4, 8, 8), 1.2, 0.6, _gaussian_denoiser, "the exact denoiser for data N(0.5, 0.3²)"),
            ((3, 1, 4, 4), 0.4, 0.1, _toy_denoiser, "a toy denoiser"),
            ((2, 3, 4, 4), 0.03, 0.0, _gaussian_denoiser, "the exact denoiser for data N(0.5, 0.3²)")):
        x = torch.randn(shape, generator=g) * (sigma**2 + 1) ** 0.5
        cases.append(Case(f"x of shape {_shape(x)}, sigma = {sigma}, sigma_next = {sigma_next}, denoise = {what}",
                          (x, sigma, sigma_next, denoise)))
    return cases


def _euler_only(x, sigma, sigma_next, denoise):
    return x + (sigma_next - sigma) * (x - denoise(x, sigma)) / sigma


def _heun_slope_at_wrong_sigma(x, sigma, sigma_next, denoise):
    d = (x - denoise(x, sigma)) / sigma
    x_euler = x + (sigma_next - sigma) * d
    if sigma_next == 0:
        return x_euler
    d_next = (x_euler - denoise(x_euler, sigma)) / sigma
    return x + (sigma_next - sigma) * (d + d_next) / 2


def _heun_second_slope_only(x, sigma, sigma_next, denoise):
    d = (x - denoise(x, sigma)) / sigma
    x_euler = x + (sigma_next - sigma) * d
    if sigma_next == 0:
        return x_euler
    return x + (sigma_next - sigma) * (x_euler - denoise(x_euler, sigma_next)) / sigma_next


check_heun_step = register(Checker(
    name="check_heun_step",
    signature="fn(x, sigma, sigma_next, denoise) -> x_next",
    doc="one step of Heun's method on the probability-flow ODE dx/dσ = (x − D(x; σ)) / σ (Karras et al. 2022, "
        "Algorithm 1): the slope d at (x, σ), an Euler proposal x̃ = x + (σ_next − σ) d, the slope d' at (x̃, σ_next), "
        "then x + (σ_next − σ)(d + d')/2; when ``sigma_next`` is 0 the step is the Euler proposal alone. ``x`` is the "
        "σ-space state x₀ + σε, ``sigma`` and ``sigma_next`` are floats, ``denoise(x, sigma)`` returns x̂₀.",
    reference=_heun_reference,
    make_cases=_heun_cases,
    hint="call denoise twice: at (x, sigma) and at the Euler proposal (x̃, sigma_next); average the two slopes "
         "(x − x̂₀)/σ. At sigma_next = 0 the second slope would divide by zero: return the Euler proposal.",
    mistakes=(
        Mistake(_euler_only, "you took a plain Euler step: Heun corrects it with the slope at the proposal"),
        Mistake(_heun_slope_at_wrong_sigma, "you evaluated the second slope at sigma: the proposal lives at sigma_next"),
        Mistake(_heun_second_slope_only, "you used only the second slope: Heun averages the slopes at both ends"),
    ),
    atol=1e-5,
    rtol=1e-4,
))


# ---- notebook 03: the VAE -----------------------------------------------------------------------
def _reparameterize_reference(mean, logvar, noise):
    return mean + torch.exp(0.5 * logvar) * noise  # z = μ + σ·ε, σ = exp(½·log σ²)


def _posterior_cases(g, with_noise: bool):
    cases = []
    for shape, what in (((4, 4, 8, 8), "a batch of VAE latents"), ((2, 4, 2, 2), "a small batch"), ((3, 16), "flat vectors")):
        mean = torch.randn(shape, generator=g) * 1.5
        logvar = torch.rand(shape, generator=g) * 10 - 8  # log σ² in [-8, 2]: σ from 0.02 to 2.7
        args = (mean, logvar, torch.randn(shape, generator=g)) if with_noise else (mean, logvar)
        cases.append(Case(f"{what}: mean and logvar of shape {_shape(mean)}{', noise of the same shape' if with_noise else ''}, "
                          "logvar between -8 and 2", args))
    mean = torch.zeros(2, 4, 8, 8)
    args = (mean, torch.zeros_like(mean), torch.randn(mean.shape, generator=g)) if with_noise else (mean, torch.zeros_like(mean))
    cases.append(Case("mean = 0 and logvar = 0 (the prior N(0, I) itself), shape [2, 4, 8, 8]", args))
    return cases


check_reparameterize = register(Checker(
    name="check_reparameterize",
    signature="fn(mean, logvar, noise) -> z",
    doc="the reparameterisation trick (Kingma & Welling 2014, §2.4): a sample z = μ + σ·ε of N(μ, diag σ²), written "
        "as a differentiable function of ``mean`` (μ) and ``logvar`` (log σ²), with the standard normal ``noise`` "
        "ε given. All three have the same shape, and so does z.",
    reference=_reparameterize_reference,
    make_cases=lambda g: _posterior_cases(g, with_noise=True),
    hint="the encoder gives the log-variance log σ², not σ: σ = exp(½·logvar). Use the noise you are given "
         "(do not draw new noise), and return mean + σ · noise.",
    mistakes=(
        Mistake(lambda mean, logvar, noise: mean + torch.exp(logvar) * noise,
                "you scaled the noise by the variance σ² = exp(logvar); the standard deviation is σ = exp(½·logvar)"),
        Mistake(lambda mean, logvar, noise: mean + logvar * noise,
                "you used logvar itself as the standard deviation; σ = exp(½·logvar)"),
        Mistake(lambda mean, logvar, noise: mean + noise, "you added the noise without scaling it by σ"),
        Mistake(lambda mean, logvar, noise: (mean + noise) * torch.exp(0.5 * logvar),
                "you scaled the mean by σ too: only the noise is scaled, z = μ + σ·ε"),
    ),
))


def _gaussian_kl_reference(mean, logvar):
    from sdlearn.vae import DiagonalGaussian

    return DiagonalGaussian(mean, logvar).kl()


def _kl_terms(mean, logvar, half=0.5, minus_one=1.0, var=None):
    var = logvar.exp() if var is None else var
    return (half * (mean.pow(2) + var - minus_one - logvar)).flatten(1)  # [B, D]


check_gaussian_kl = register(Checker(
    name="check_gaussian_kl",
    signature="fn(mean, logvar) -> kl",
    doc="KL(N(μ, diag σ²) ‖ N(0, I)) = ½ Σ_j (μ_j² + σ_j² − 1 − log σ_j²) for each sample of a batch (Kingma & "
        "Welling 2014, Appendix B): ``mean`` and ``logvar`` (log σ²) are [B, ...]; the result is [B], summed over "
        "every dimension but the first.",
    reference=_gaussian_kl_reference,
    make_cases=lambda g: _posterior_cases(g, with_noise=False),
    hint="per dimension ½ (mean² + exp(logvar) − 1 − logvar); then sum over all dimensions except the batch one, "
         "e.g. with .flatten(1).sum(dim=1).",
    mistakes=(
        Mistake(lambda mean, logvar: _kl_terms(mean, logvar, half=1.0).sum(1), "you forgot the factor ½"),
        Mistake(lambda mean, logvar: _kl_terms(mean, logvar).mean(1),
                "you averaged over the latent dimensions: the KL of a diagonal Gaussian is the sum of the per-dimension KLs"),
        Mistake(lambda mean, logvar: _kl_terms(mean, logvar, minus_one=0.0).sum(1),
                "you left out the −1: without it the KL of N(0, I) to itself would not be 0"),
        Mistake(lambda mean, logvar: _kl_terms(mean, logvar, var=torch.exp(0.5 * logvar)).sum(1),
                "you used the standard deviation σ where the variance σ² = exp(logvar) belongs"),
        Mistake(lambda mean, logvar: (0.5 * (mean.pow(2) + logvar.exp() - 1 + logvar)).flatten(1).sum(1),
                "the log-variance enters with a minus sign: ½ (μ² + σ² − 1 − log σ²)"),
    ),
    atol=1e-4,
    rtol=1e-5,
))


def _psnr_reference(x, y):
    from sdlearn.vae import psnr

    return psnr(x, y)


def _psnr_cases(g):
    cases = []
    for shape, noise in (((4, 3, 32, 32), 0.01), ((2, 3, 32, 32), 0.2), ((3, 3, 8, 8), 0.05)):
        x = _images(g, *shape)
        y = (x + noise * torch.randn(shape, generator=g)).clamp(-1, 1)
        cases.append(Case(f"x: {shape[0]} images of shape {_shape(x[0])} in [-1, 1]; y: the same images with noise of "
                          f"std {noise} added, clamped to [-1, 1]", (x, y)))
    x = _images(g, 2, 3, 16, 16)
    y = torch.cat([x[:1] + 0.5, x[1:] - 0.001])
    cases.append(Case("two images of shape [3, 16, 16]: one off by 0.5 everywhere, one off by 0.001", (x, y)))
    return cases


check_psnr = register(Checker(
    name="check_psnr",
    signature="fn(x, y) -> psnr_db",
    doc="the peak signal-to-noise ratio of each image pair, PSNR = 10·log10(range² / MSE) in decibels, with the "
        "MSE averaged over each image's pixels and channels, for images in [-1, 1] (range 2). ``x`` and ``y`` are "
        "[B, C, H, W]; the result is [B].",
    reference=_psnr_reference,
    make_cases=_psnr_cases,
    hint="mse = ((x − y)²) averaged over every dimension but the batch one (shape [B]); then 10 · log10(2² / mse). "
         "Images in [-1, 1] span a range of 2, not 1.",
    mistakes=(
        Mistake(lambda x, y: 10 * torch.log10(1 / (x - y).pow(2).flatten(1).mean(1)),
                "you used a range of 1 (images in [0, 1]); these images are in [-1, 1], a range of 2 (you are 6.02 dB low)"),
        Mistake(lambda x, y: 20 * torch.log10(4 / (x - y).pow(2).flatten(1).mean(1)),
                "you wrote 20·log10 of a ratio of powers: it is 10·log10(range² / MSE), or 20·log10(range / RMSE)"),
        Mistake(lambda x, y: 10 * torch.log10(4 / (x - y).abs().flatten(1).mean(1)),
                "you averaged the absolute error; PSNR uses the mean squared error"),
        Mistake(lambda x, y: 10 * torch.log(4 / (x - y).pow(2).flatten(1).mean(1)),
                "you used the natural logarithm; decibels use log10"),
    ),
    atol=1e-3,
    rtol=1e-5,
))


# ---- notebook 04: the transformer denoiser ------------------------------------------------------
def _patchify_reference(x, p):
    from sdlearn.denoiser import patchify

    return patchify(x, p)


def _patchify_cases(g):
    cases = []
    for shape, p, what in (((2, 4, 8, 8), 2, "a batch of two 4×8×8 latents"), ((3, 4, 8, 8), 4, "three 4×8×8 latents"),
                           ((1, 3, 6, 6), 3, "one 3-channel 6×6 image"), ((2, 2, 4, 6), 2, "two 2×4×6 (non-square) tensors"),
                           ((2, 4, 8, 8), 1, "two 4×8×8 latents")):
        cases.append(Case(f"{what}, x of shape {_shape(torch.empty(shape))}, p = {p}", (torch.randn(shape, generator=g), p)))
    return cases


def _patchify_permuted(x, p, order):
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)  # [B, C, h, p, w, p]
    return x.permute(order).reshape(B, (H // p) * (W // p), C * p * p)


check_patchify = register(Checker(
    name="check_patchify",
    signature="fn(x, p) -> tokens",
    doc="cut ``x`` ``[B, C, H, W]`` into non-overlapping p × p patches, numbered row by row (left to right, top to "
        "bottom), each flattened in the order (channel, row in the patch, column in the patch): ``[B, (H/p)·(W/p), "
        "C·p·p]``, as :func:`sdlearn.denoiser.patchify` (ViT, Dosovitskiy et al. 2021; DiT §3.1).",
    reference=_patchify_reference,
    make_cases=_patchify_cases,
    hint="x.reshape(B, C, H/p, p, W/p, p) splits each spatial axis into (which patch, where in the patch); then "
         "permute to (B, patch row, patch column, C, row in patch, column in patch) and reshape to [B, N, C·p·p].",
    mistakes=(
        Mistake(lambda x, p: _patchify_permuted(x, p, (0, 2, 4, 3, 5, 1)),
                "your patch vectors list the numbers pixel by pixel with the channels last (row, column, channel); "
                "here each patch vector is channel by channel, (channel, row, column), as a Conv2d weight is flattened"),
        Mistake(lambda x, p: _patchify_permuted(x, p, (0, 4, 2, 1, 3, 5)),
                "you numbered the patches column by column; number them row by row (patch n is at row n // (W/p), "
                "column n % (W/p))"),
        Mistake(lambda x, p: x.reshape(x.shape[0], (x.shape[2] // p) * (x.shape[3] // p), -1),
                "you reshaped without permuting: each of your 'patches' is a run of numbers consecutive in memory "
                "(part of one channel's rows), not a p × p square"),
        Mistake(lambda x, p: _patchify_permuted(x, p, (0, 2, 4, 1, 5, 3)),
                "inside each patch you listed the pixels column by column; list them row by row"),
    ),
    atol=0.0,
    rtol=0.0,
))


def _timestep_embedding_reference(t, dim):
    from sdlearn.denoiser import timestep_embedding

    return timestep_embedding(t, dim)


def _timestep_embedding_cases(g):
    return [
        Case("t = [0, 1, 10, 999] (a long tensor), dim = 256 (the denoiser's)", (torch.tensor([0, 1, 10, 999]), 256)),
        Case("t = [0.5, 250.25, 731.0] (fractional timesteps, a float tensor), dim = 8", (torch.tensor([0.5, 250.25, 731.0]), 8)),
        Case("5 random timesteps in [0, 1000), dim = 64", (torch.randint(0, 1000, (5,), generator=g), 64)),
        Case("t = [3, 500], dim = 2 (one frequency, ω = 1)", (torch.tensor([3, 500]), 2)),
    ]


def _timestep_embedding_variant(t, dim, exponent_over=None, sines_first=False, interleave=False):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (exponent_over or half))
    args = t.float()[:, None] * freqs[None]  # [B, half]
    first, second = (torch.sin(args), torch.cos(args)) if sines_first else (torch.cos(args), torch.sin(args))
    if interleave:
        return torch.stack([first, second], dim=-1).flatten(1)  # cos, sin, cos, sin, ...
    return torch.cat([first, second], dim=-1)


check_timestep_embedding = register(Checker(
    name="check_timestep_embedding",
    signature="fn(t, dim) -> embedding",
    doc="the sinusoidal timestep embedding (Vaswani et al. 2017 §3.5, in DDPM's and DiT's layout): with half = dim/2 "
        "frequencies ω_i = 10000^(−i/half), i = 0..half−1, return [cos(t·ω_0), …, cos(t·ω_{half−1}), sin(t·ω_0), …, "
        "sin(t·ω_{half−1})] for each timestep: ``t`` is a tensor [B] (integers or floats), the result [B, dim].",
    reference=_timestep_embedding_reference,
    make_cases=_timestep_embedding_cases,
    hint="freqs = torch.exp(-math.log(10000) * torch.arange(half) / half) (shape [half]); args = t.float()[:, None] "
         "* freqs[None] (shape [B, half]); then torch.cat([args.cos(), args.sin()], dim=-1): all cosines, then all sines.",
    mistakes=(
        Mistake(lambda t, dim: _timestep_embedding_variant(t, dim, sines_first=True),
                "you put the sines first: this layout (DDPM's, DiT's) is all the cosines, then all the sines"),
        Mistake(lambda t, dim: _timestep_embedding_variant(t, dim, exponent_over=dim),
                "your exponents are −i/dim; they are −i/half with half = dim/2, so the slowest frequency is "
                "10000^(−(half−1)/half), close to 1/10000"),
        Mistake(lambda t, dim: _timestep_embedding_variant(t, dim, interleave=True),
                "you interleaved cos and sin (cos, sin, cos, sin, …); put all the cosines first, then all the sines"),
        Mistake(lambda t, dim: _timestep_embedding_variant(t.float() / 1000, dim),
                "you divided t by 1000 (T): here t enters as it is, an integer between 0 and 999"),
    ),
    atol=1e-3,  # sin and cos of arguments up to ~1000 in float32 differ by ~1e-4 between correct ways of writing it
    rtol=0.0,
))


def _attention_reference(q, k, v):
    from sdlearn.denoiser import attention_weights

    return attention_weights(q, k) @ v


def _attention_cases(g):
    cases = []
    for q_shape, kv_len, dv, what in (((2, 4, 16, 48), 16, 48, "self-attention: 2 images, 4 heads, 16 tokens, head size 48"),
                                      ((2, 4, 16, 48), 10, 48, "cross-attention: 16 image tokens attend to 10 text tokens"),
                                      ((3, 5, 8), 7, 6, "no head axis: 5 queries of size 8, 7 keys, values of size 6"),
                                      ((1, 2, 4, 16), 4, 16, "large scores: q and k scaled by 4")):
        *batch, _, d = q_shape
        q = torch.randn(q_shape, generator=g)
        k = torch.randn((*batch, kv_len, d), generator=g)
        v = torch.randn((*batch, kv_len, dv), generator=g)
        if what.startswith("large"):
            q, k = 4 * q, 4 * k
        cases.append(Case(f"{what}: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}", (q, k, v)))
    return cases


def _attention_variant(q, k, v, scale=None, dim=-1):
    scores = q @ k.transpose(-2, -1) * (scale if scale is not None else q.shape[-1] ** -0.5)
    return scores.softmax(dim=dim) @ v


check_attention = register(Checker(
    name="check_attention",
    signature="fn(q, k, v) -> out",
    doc="scaled dot-product attention, softmax(Q Kᵀ / √d) V (Vaswani et al. 2017, eq. 1), with the softmax over the "
        "keys: ``q`` [..., N, d], ``k`` [..., M, d], ``v`` [..., M, d_v] → [..., N, d_v]; the leading axes (batch, "
        "heads) are carried along. Equal to ``torch.nn.functional.scaled_dot_product_attention(q, k, v)``.",
    reference=_attention_reference,
    make_cases=_attention_cases,
    hint="scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) has shape [..., N, M]: one row per query, one "
         "column per key. Each query's weights sum to 1 over the keys: softmax(dim=-1). Then weights @ v.",
    mistakes=(
        Mistake(lambda q, k, v: _attention_variant(q, k, v, scale=1.0),
                "you forgot to divide the scores by √d: without it large head sizes make the softmax nearly one-hot"),
        Mistake(lambda q, k, v: _attention_variant(q, k, v, scale=1.0 / q.shape[-1]),
                "you divided the scores by d; divide by √d"),
        Mistake(lambda q, k, v: _attention_variant(q, k, v, dim=-2),
                "you took the softmax over the queries (dim=-2); each query's weights must sum to 1 over the keys (dim=-1)"),
        Mistake(lambda q, k, v: _attention_variant(q, k, v, scale=v.shape[-1] ** -0.5),
                "you scaled by the size of the values; d is the size of the queries and keys (q.shape[-1])"),
    ),
    atol=1e-5,
    rtol=1e-4,
))


def _modulate_reference(x, shift, scale):
    from sdlearn.denoiser import modulate

    return modulate(x, shift[:, None, :], scale[:, None, :])  # [B, D] → [B, 1, D]: one vector per image


def _modulate_cases(g):
    cases = []
    for (B, N, D), what in (((4, 4, 6), "4 images of 4 tokens (as many tokens as images) of width 6"),
                            ((2, 16, 8), "2 images of 16 tokens of width 8"),
                            ((3, 1, 5), "3 images of 1 token of width 5")):
        x = torch.randn(B, N, D, generator=g)
        cases.append(Case(f"{what}: x {_shape(x)}, shift and scale [{B}, {D}]",
                          (x, torch.randn(B, D, generator=g), torch.randn(B, D, generator=g))))
    x = torch.randn(2, 16, 8, generator=g)
    cases.append(Case("x [2, 16, 8], shift = 0 and scale = 0 (adaLN-Zero at initialisation: the result is x itself)",
                      (x, torch.zeros(2, 8), torch.zeros(2, 8))))
    return cases


check_modulate = register(Checker(
    name="check_modulate",
    signature="fn(x, shift, scale) -> y",
    doc="adaLN's modulation (DiT §3.2): y = x·(1 + scale) + shift, where ``x`` is [B, N, D] (N tokens per image) and "
        "``shift``, ``scale`` are [B, D], one vector per image as the conditioning Linear makes them, applied to every "
        "token of that image. (``sdlearn.denoiser.modulate`` takes them already unsqueezed to [B, 1, D].)",
    reference=_modulate_reference,
    make_cases=_modulate_cases,
    hint="give shift and scale a token axis, shift[:, None, :] (shape [B, 1, D]), so that they broadcast over the N "
         "tokens of each image; then x * (1 + scale) + shift. The 1 + makes scale = 0 mean 'leave x alone'.",
    mistakes=(
        Mistake(lambda x, shift, scale: x * scale[:, None] + shift[:, None],
                "you multiplied by scale instead of (1 + scale): with scale = 0 the modulation would erase x "
                "instead of leaving it unchanged"),
        Mistake(lambda x, shift, scale: x * (1 + shift[:, None]) + scale[:, None], "you swapped shift and scale"),
        Mistake(lambda x, shift, scale: (x + shift[:, None]) * (1 + scale[:, None]),
                "you shifted before scaling; scale first, then shift: x·(1 + scale) + shift"),
        Mistake(lambda x, shift, scale: x * (1 + scale) + shift,
                "you broadcast shift and scale [B, D] against x [B, N, D] directly: broadcasting lines them up with "
                "the N tokens, not the B images (it only runs at all when N = B); use shift[:, None, :]"),
    ),
))


# ---- notebook 09: code review -------------------------------------------------------------------
def _ddpm_reverse_step_reference(x_t, eps, alpha_bar_t, alpha_bar_prev, noise, variance="posterior", keep_noise=True,
                                 alpha_bar_in_mean=False):
    alpha_t = alpha_bar_t / alpha_bar_prev  # α over the stride from t' to t
    beta_t = 1 - alpha_t
    a = alpha_bar_t if alpha_bar_in_mean else alpha_t  # the mistake below puts ᾱ_t where α_t belongs
    mean = (x_t - (1 - a) / (1 - alpha_bar_t).sqrt() * eps) / a.sqrt()  # Ho et al. 2020, eq. 11
    var = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t if variance == "posterior" else beta_t  # β̃ (eq. 7) or β
    return mean + var.sqrt() * noise if keep_noise else mean


def _ddpm_reverse_step_cases(g):
    ac = _sd_alphas_cumprod()
    cases = []
    for shape, t, t_prev in (((4, 4, 8, 8), 500, 450), ((2, 4, 8, 8), 950, 900), ((3, 1, 16), 999, 998),
                             ((2, 4, 8, 8), 50, 0), ((3, 4, 4, 4), 20, None)):
        a_prev = ac[t_prev] if t_prev is not None else torch.tensor(1.0)
        what = f"alpha_bar_prev = ᾱ_{t_prev}" if t_prev is not None else "alpha_bar_prev = 1 (the last step, to clean data)"
        x_t = torch.randn(shape, generator=g)
        cases.append(Case(f"x_t, eps and noise of shape {_shape(x_t)}, alpha_bar_t = ᾱ_{t} = {ac[t].item():.4g}, {what} "
                          "(Stable Diffusion's schedule)",
                          (x_t, torch.randn(shape, generator=g), ac[t], a_prev, torch.randn(shape, generator=g))))
    return cases


check_ddpm_reverse_step = register(Checker(
    name="check_ddpm_reverse_step",
    signature="fn(x_t, eps, alpha_bar_t, alpha_bar_prev, noise) -> x_prev",
    doc="one DDPM reverse step from t to t' written with the predicted noise ε (Ho et al. 2020, eq. 11 and Algorithm 2): "
        "with α_t = ᾱ_t / ᾱ_{t'} and β_t = 1 − α_t, x_{t'} = (x_t − β_t / √(1 − ᾱ_t) · ε) / √α_t + σ·noise, where "
        "σ² = β̃ = (1 − ᾱ_{t'}) / (1 − ᾱ_t) · β_t is the posterior variance (zero at the last step, where ᾱ_{t'} = 1). "
        "``alpha_bar_t`` and ``alpha_bar_prev`` are 0-d tensors; ``eps`` and ``noise`` have the shape of ``x_t``.",
    reference=_ddpm_reverse_step_reference,
    make_cases=_ddpm_reverse_step_cases,
    hint="compute α_t = alpha_bar_t / alpha_bar_prev first (the stride may be longer than one step); the mean "
         "divides by √α_t, not √ᾱ_t; then add √β̃ · noise with β̃ = (1 − alpha_bar_prev) / (1 − alpha_bar_t) · β_t.",
    mistakes=(
        Mistake(lambda x_t, eps, a, a_prev, noise: (x_t - (1 - a).sqrt() * eps) / a.sqrt(),
                "you returned the predicted clean image x̂₀ = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t: that is where the step "
                "aims, not where it lands; the step moves only part of the way, to t'"),
        Mistake(lambda x_t, eps, a, a_prev, noise: _ddpm_reverse_step_reference(x_t, eps, a, a_prev, noise, alpha_bar_in_mean=True),
                "you used ᾱ_t where α_t = ᾱ_t / ᾱ_{t'} belongs (the two agree only for the very last step)"),
        Mistake(lambda x_t, eps, a, a_prev, noise: _ddpm_reverse_step_reference(x_t, eps, a, a_prev, noise, keep_noise=False),
                "you left out the fresh noise σ·noise: without it every sample drifts to the same few images"),
        Mistake(lambda x_t, eps, a, a_prev, noise: _ddpm_reverse_step_reference(x_t, eps, a, a_prev, noise, variance="beta"),
                "you used β_t as the variance (DDPM's 'fixed_large' choice); this step uses the posterior variance "
                "β̃ = (1 − ᾱ_{t'}) / (1 − ᾱ_t) · β_t"),
        Mistake(lambda x_t, eps, a, a_prev, noise: (_ddpm_reverse_step_reference(x_t, eps, a, a_prev, noise, keep_noise=False)
                                                   + (1 - a_prev) / (1 - a) * (1 - a / a_prev) * noise),
                "you scaled the noise by the variance β̃ instead of the standard deviation √β̃"),
    ),
    atol=1e-4,
    rtol=1e-4,  # at ᾱ_999 ≈ 0.005, float32 rounding in 1/√(1 − ᾱ_t) and β_t reaches 1e-5
))


def _schedule_usable_reference(betas):
    alphas_cumprod = torch.cumprod(1 - betas.double(), dim=0)
    return bool(((betas > 0) & (betas <= 1)).all() and (betas[1:] >= betas[:-1]).all()
                 and alphas_cumprod[0] > 0.9 and alphas_cumprod[-1] < 0.05)


def _schedule_usable_cases(g):
    sd = make_betas("scaled_linear", 1000)
    return [
        Case("Stable Diffusion's scaled-linear schedule, T = 1000", (sd,)),
        Case("a constant schedule, β = 0.01 at every one of T = 1000 steps (ᾱ ends at 4e-5)", (torch.full((1000,), 0.01),)),
        Case("Stable Diffusion's schedule played backwards: β from 0.012 down to 0.00085, T = 1000", (sd.flip(0),)),
        Case("the scaled-linear schedule with only T = 50 steps (ᾱ at the end is 0.76)", (make_betas("scaled_linear", 50),)),
        Case("β evenly spaced from 1 down to 0.0001, T = 1000", (torch.linspace(1.0, 1e-4, 1000),)),
        Case("Stable Diffusion's schedule rescaled to zero terminal SNR (its last β is exactly 1)",
             (rescale_zero_terminal_snr(sd),)),
        Case("β evenly spaced from 0.2 to 0.3, T = 100", (make_betas("linear", 100, beta_start=0.2, beta_end=0.3),)),
        Case("the cosine schedule, T = 1000", (make_betas("cosine", 1000),)),
        Case("β evenly spaced from 0.0001 to 1.5, T = 1000 (some β above 1)", (torch.linspace(1e-4, 1.5, 1000),)),
    ]


def _usable_without(betas, skip):
    a = torch.cumprod(1 - betas.double(), dim=0)
    checks = {"range": bool(((betas > 0) & (betas <= 1)).all()), "monotone": bool((betas[1:] >= betas[:-1]).all()),
              "start": bool(a[0] > 0.9), "end": bool(a[-1] < 0.05)}
    return all(ok for name, ok in checks.items() if name not in skip)


check_schedule_sanity = register(Checker(
    name="check_schedule_sanity",
    signature="fn(betas) -> bool",
    doc="a test, written as a function: True when the schedule β_1..β_T (a float tensor [T]) can train a diffusion "
        "model, False when it cannot. Usable means all four of: every β lies in (0, 1]; β never decreases; "
        "ᾱ_0 = 1 − β_1 > 0.9 (the least noisy input still shows the image); ᾱ_{T−1} < 0.05 (the last step is close "
        "to pure noise, where sampling starts).",
    reference=_schedule_usable_reference,
    make_cases=_schedule_usable_cases,
    hint="compute alphas_cumprod = torch.cumprod(1 - betas, dim=0), then check the four conditions: "
         "((betas > 0) & (betas <= 1)).all(), (betas[1:] >= betas[:-1]).all(), alphas_cumprod[0] > 0.9 and "
         "alphas_cumprod[-1] < 0.05; return True only when all four hold (as a bool).",
    mistakes=(
        Mistake(lambda betas: _usable_without(betas, {"range"}),
                "you did not check that every β lies in (0, 1]: a β above 1 makes 1 − β negative, and ᾱ meaningless"),
        Mistake(lambda betas: _usable_without(betas, {"start", "end"}),
                "you only checked that β lies in (0, 1] and never decreases: a schedule can grow the right way and "
                "still end far from pure noise (too few steps), or destroy the image at its first step"),
        Mistake(lambda betas: _usable_without(betas, {"monotone"}),
                "you checked only the ends of ᾱ: a schedule played backwards has the same ᾱ at both ends, "
                "but β must never decrease"),
        Mistake(lambda betas: _usable_without(betas, set()) and bool((betas[1:] > betas[:-1]).all()),
                "you required β to grow strictly: a constant β is fine, it only must never decrease (use >=)"),
        Mistake(lambda betas: _usable_without(betas, set()) and bool((betas < 1).all()),
                "you required every β < 1: β = 1 at the last step is allowed (zero terminal SNR schedules end "
                "in pure noise that way)"),
    ),
))


class _CountingChecker(Checker):
    """A checker whose first argument is a model: it also compares the batch sizes of the calls made to it."""

    def __call__(self, fn: Callable) -> None:
        __tracebackhide__ = True
        counted = _count_model_calls(fn) if callable(fn) else fn
        mistakes = tuple(Mistake(_count_model_calls(m.fn), m.explanation) for m in self.mistakes)
        return check(counted, _count_model_calls(self.reference), self.cases(), name=self.name, hint=self.hint,
                     mistakes=mistakes, compare=lambda expected, got: _compare_guided(expected, got, self.atol, self.rtol))


def _count_model_calls(fn: Callable) -> Callable:
    """Wrap ``fn(model_fn, *rest)`` so that it returns ``(result, batch sizes of each call to model_fn)``."""
    def counted(model_fn, *rest):
        calls = []

        def model(x, t, text):
            calls.append(int(x.shape[0]))
            return model_fn(x, t, text)

        return fn(model, *rest), calls

    return counted


def _compare_guided(expected, got, atol, rtol):
    (expected, expected_calls), (got, got_calls) = expected, got
    problem = _difference(expected, got, atol, rtol)
    if problem:
        return problem
    if got_calls == expected_calls:
        return None
    if not got_calls:
        return "your function never called model_fn"
    sizes = " and ".join(map(str, got_calls))
    times = "once" if len(got_calls) == 1 else f"{len(got_calls)} times"
    return (f"the numbers are right, but your function called the model {times}, on batches of {sizes}; guidance "
            f"should call it once, on one batch of {expected_calls[0]} (the unconditional and conditional inputs "
            "concatenated)")


def _guidance_toy_model(x, t, text):
    """A deterministic stand-in for ε_θ(x_t, t, text): each sample's output depends on its own x and text only."""
    if text.shape[0] != x.shape[0]:
        raise ValueError(f"model_fn got x for {x.shape[0]} samples but text for {text.shape[0]}: they must match")
    text_signal = text.mean(dim=(1, 2)).reshape(-1, *([1] * (x.dim() - 1)))  # [B, 1, 1, 1]
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))  # a 0-d t, or one per sample
    return torch.tanh(x) * (1 + text_signal) + 0.5 * text_signal + 1e-3 * t


def _cfg_batched_reference(model_fn, x, t, cond, uncond, scale):
    eps_uncond, eps_cond = model_fn(torch.cat([x, x]), t, torch.cat([uncond, cond])).chunk(2)  # one call, [2B, ...]
    return eps_uncond + scale * (eps_cond - eps_uncond)


def _cfg_two_passes(model_fn, x, t, cond, uncond, scale):
    eps_cond, eps_uncond = model_fn(x, t, cond), model_fn(x, t, uncond)
    return eps_uncond + scale * (eps_cond - eps_uncond)


def _cfg_cases(g):
    cases = []
    for B, L, D, t, scale in ((2, 16, 8, 500, 4.0), (3, 5, 4, 10, 7.5), (1, 16, 8, 999, 1.0), (4, 3, 2, 250, 0.0)):
        x = torch.randn(B, 4, 8, 8, generator=g)
        cond, uncond = torch.randn(B, L, D, generator=g), torch.randn(B, L, D, generator=g)
        cases.append(Case(f"x of shape [{B}, 4, 8, 8], t = {t} (a 0-d tensor), cond and uncond text of shape [{B}, {L}, {D}], "
                          f"scale = {scale}, model_fn = a toy text-conditioned model",
                          (_guidance_toy_model, x, torch.tensor(t), cond, uncond, scale)))
    return cases


check_cfg_batched = register(_CountingChecker(
    name="check_cfg_batched",
    signature="fn(model_fn, x, t, cond, uncond, scale) -> guided",
    doc="classifier-free guidance with ONE model call (Ho & Salimans 2022, eq. 6): run ``model_fn(x2, t, text2)`` once "
        "on the batch x2 = [x, x] (2B samples) with text2 = [uncond, cond], split its output into ε_uncond and ε_cond, "
        "and return ε_uncond + scale · (ε_cond − ε_uncond). ``x`` is [B, C, H, W], ``t`` a 0-d tensor, ``cond`` and "
        "``uncond`` are text embeddings [B, L, D], ``scale`` a float. The checker counts the calls.",
    reference=_cfg_batched_reference,
    make_cases=_cfg_cases,
    hint="torch.cat([x, x]) and torch.cat([uncond, cond]) make one batch of 2B; call model_fn once; "
         "out.chunk(2) gives the two halves back in the same order; then uncond + scale · (cond − uncond).",
    mistakes=(
        Mistake(_cfg_two_passes, "you ran two separate passes, one for cond and one for uncond: the right numbers at "
                                 "twice the calls (and, on a GPU or many cores, about twice the time)"),
        Mistake(lambda model_fn, x, t, cond, uncond, scale: (lambda u, c: u + scale * c)(
                    *model_fn(torch.cat([x, x]), t, torch.cat([uncond, cond])).chunk(2)),
                "you computed ε_uncond + scale · ε_cond: guidance scales the difference, ε_uncond + scale · (ε_cond − ε_uncond), "
                "so that scale 1 gives the conditional prediction"),
        Mistake(lambda model_fn, x, t, cond, uncond, scale: (lambda c, u: u + scale * (c - u))(
                    *model_fn(torch.cat([x, x]), t, torch.cat([uncond, cond])).chunk(2)),
                "you read the two halves in the wrong order: the first half of the output belongs to the first half "
                "of the batch (uncond, if you concatenated [uncond, cond])"),
        Mistake(lambda model_fn, x, t, cond, uncond, scale: (lambda u, c: c + scale * (c - u))(
                    *model_fn(torch.cat([x, x]), t, torch.cat([uncond, cond])).chunk(2)),
                "you started from ε_cond: the formula is ε_uncond + scale · (ε_cond − ε_uncond)"),
    ),
))


# ---- notebook 08: Stable Diffusion end to end (img2img and inpainting) -------------------------------
def _sdedit_start_reference(num_inference_steps, strength):
    steps_run = min(int(num_inference_steps * strength), num_inference_steps)  # ⌊N·s⌋ steps are run...
    return num_inference_steps - steps_run  # ...the last ones: the first is at index N − ⌊N·s⌋


def _sdedit_start_cases(g):
    return [  # 20 · 0.22 = 4.4 comes before 20 · 0.33 = 6.6, so rounding up and rounding to nearest are told apart
        Case(f"num_inference_steps = {n}, strength = {s}", (n, s))
        for n, s in ((20, 0.6), (20, 0.22), (20, 0.33), (7, 0.5), (50, 0.75), (10, 0.0), (10, 1.0), (1, 0.5))
    ]


check_sdedit_start = register(Checker(
    name="check_sdedit_start",
    signature="fn(num_inference_steps, strength) -> start",
    doc="SDEdit's schedule, as the pipeline's img2img runs it: of a sampler's ``num_inference_steps`` timesteps (N, "
        "from the noisiest), img2img runs only the last ⌊N · strength⌋ ones. Return ``start``, the index in "
        "``sampler.timesteps`` of the first timestep used (the noise level the image is noised to), a whole number; "
        "N − start steps (model calls) are then run.",
    reference=_sdedit_start_reference,
    make_cases=_sdedit_start_cases,
    hint="steps_run = int(num_inference_steps * strength) (rounded down, as diffusers does); the steps run are the last "
         "ones, so start = num_inference_steps − steps_run. Strength 1 starts at index 0 (pure noise); strength 0 "
         "starts at N, past the end: nothing runs.",
    mistakes=(
        Mistake(lambda n, s: n - round(n * s), "you rounded N · strength to the nearest whole number; the pipeline "
                "(like diffusers) rounds the number of steps run down, int(N · strength)"),
        Mistake(lambda n, s: n - math.ceil(n * s), "you rounded the number of steps run up (computing the start as "
                "int(N · (1 − strength)) does the same); the pipeline rounds N · strength down and starts at N minus that"),
        Mistake(lambda n, s: int(n * s), "you returned the number of steps run, int(N · strength); the start index is "
                "N minus that (strength 1 starts at index 0, the noisiest timestep)"),
    ),
))


def _inpaint_blend_reference(x, known, noise, mask, alpha_bar):
    reference = alpha_bar.sqrt() * known + (1 - alpha_bar).sqrt() * noise  # the known latents at x's noise level
    return mask * x + (1 - mask) * reference


def _box_mask(batch, size, top, left, height, width):
    mask = torch.zeros(batch, 1, size, size)
    mask[:, :, top : top + height, left : left + width] = 1
    return mask


def _inpaint_blend_cases(g):
    cases = []
    for B, mask, a, words in (
        (2, _box_mask(2, 8, 2, 3, 4, 5), 0.5, "a box of 1s (rows 2–5, columns 3–7), 0 elsewhere"),
        (3, torch.rand(3, 1, 8, 8, generator=g), 0.9, "soft values in [0, 1]"),
        (1, torch.zeros(1, 1, 8, 8), 0.02, "all 0 (keep everything)"),
        (1, torch.ones(1, 1, 8, 8), 0.3, "all 1 (repaint everything)"),
        (2, _box_mask(2, 8, 0, 0, 8, 4), 1.0, "the left half 1, the right half 0"),
    ):
        x, known, noise = (torch.randn(B, 4, 8, 8, generator=g) for _ in range(3))
        cases.append(Case(f"x, known and noise of shape [{B}, 4, 8, 8], mask [{B}, 1, 8, 8] {words}, alpha_bar = {a} "
                          "(a 0-d tensor)", (x, known, noise, mask, torch.tensor(a))))
    return cases


check_inpaint_blend = register(Checker(
    name="check_inpaint_blend",
    signature="fn(x, known, noise, mask, alpha_bar) -> blended",
    doc="one inpainting blend (RePaint without resampling; what the pipeline does after every step): the known "
        "latents ``known`` [B, 4, 8, 8] are noised to x's noise level, √ᾱ·known + √(1−ᾱ)·noise with ᾱ = ``alpha_bar`` "
        "(a 0-d tensor), and replace x where ``mask`` [B, 1, 8, 8] is 0 (keep); where it is 1 (repaint) x stays. "
        "Values in between blend linearly: mask·x + (1 − mask)·noised_known.",
    reference=_inpaint_blend_reference,
    make_cases=_inpaint_blend_cases,
    hint="noised = alpha_bar.sqrt() * known + (1 - alpha_bar).sqrt() * noise; then mask * x + (1 - mask) * noised "
         "(mask [B, 1, 8, 8] broadcasts over the 4 channels).",
    mistakes=(
        Mistake(lambda x, known, noise, mask, a: (1 - mask) * x + mask * _inpaint_blend_reference(x, known, noise, torch.zeros_like(mask), a),
                "you swapped the mask's roles: 1 means repaint (keep the generated x there), 0 means keep the known image"),
        Mistake(lambda x, known, noise, mask, a: mask * x + (1 - mask) * known,
                "you pasted the clean known latents: x is still noisy, so the known region must be noised to the same "
                "level, √ᾱ·known + √(1−ᾱ)·noise, or the two halves do not match until the last step"),
        Mistake(lambda x, known, noise, mask, a: mask * x + (1 - mask) * (a * known + (1 - a) * noise),
                "you used ᾱ and 1 − ᾱ where their square roots belong"),
        Mistake(lambda x, known, noise, mask, a: mask * x + (1 - mask) * a.sqrt() * known,
                "you scaled the known latents by √ᾱ but forgot the noise term √(1−ᾱ)·noise"),
    ),
))


def _latent_mask_reference(mask):
    return torch.nn.functional.max_pool2d(mask, 4)  # [B, 1, H/4, W/4]: 1 wherever any of a cell's 4×4 pixels is


def _latent_mask_cases(g):
    one_pixel = torch.zeros(1, 1, 32, 32)
    one_pixel[0, 0, 13, 22] = 1
    return [
        Case("a [2, 1, 32, 32] mask with a box of 1s at rows 5–17, columns 10–29 (edges not on the 4-pixel grid)",
             (_box_mask(2, 32, 5, 10, 13, 20),)),
        Case("a [1, 1, 32, 32] mask with a single 1, at row 13, column 22", (one_pixel,)),
        Case("a [3, 1, 32, 32] mask of soft values in [0, 1]", (torch.rand(3, 1, 32, 32, generator=g),)),
        Case("a [2, 1, 16, 16] mask of random 0s and 1s (→ [2, 1, 4, 4])",
             ((torch.rand(2, 1, 16, 16, generator=g) < 0.1).float(),)),
    ]


check_latent_mask = register(Checker(
    name="check_latent_mask",
    signature="fn(mask) -> latent_mask",
    doc="the pipeline's rule for turning a pixel mask ``[B, 1, H, W]`` (1 = repaint, 0 = keep) into a latent mask "
        "``[B, 1, H/4, W/4]``: each latent cell covers 4×4 pixels (the VAE's downsampling factor) and is repainted "
        "as much as the most-repainted of its pixels — a 4×4 max-pool.",
    reference=_latent_mask_reference,
    make_cases=_latent_mask_cases,
    hint="torch.nn.functional.max_pool2d(mask, kernel_size=4) (the stride defaults to the kernel size).",
    mistakes=(
        Mistake(lambda m: torch.nn.functional.avg_pool2d(m, 4),
                "you averaged each 4×4 block: a cell only partly covered by the mask would then be only partly "
                "repainted, and the kept region would leak into the hole; take the maximum"),
        Mistake(lambda m: m[:, :, ::4, ::4], "you kept one pixel of each 4×4 block (its top left): a mask edge or a "
                                             "small hole between those pixels is lost; take the maximum over the block"),
        Mistake(lambda m: -torch.nn.functional.max_pool2d(-m, 4),
                "you took the minimum of each block: a cell is then repainted only when all its 16 pixels are, so the "
                "edge of the hole is kept from the old image; take the maximum"),
        Mistake(lambda m: (torch.nn.functional.avg_pool2d(m, 4) >= 0.5).float(),
                "you thresholded the block average at 0.5: cells less than half covered are kept; take the maximum"),
    ),
))


# ---- notebook 05: training -----------------------------------------------------------------------
def _diffusion_toy_model(x_t, t):
    """A deterministic stand-in for ε_θ(x_t, t): any change in what it is fed changes its output."""
    t = torch.as_tensor(t, dtype=x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))  # [B, 1, 1, 1]
    return 0.9 * torch.tanh(x_t) + 1e-4 * t


def _diffusion_loss_reference(model, x0, noise, t, alphas_cumprod, target="noise", noised="sqrt", reduce="mean"):
    a = _bcast(alphas_cumprod[t], x0)  # [B, 1, 1, 1]
    if noised == "sqrt":
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise  # Ho et al. 2020, eq. 4
    elif noised == "no sqrt":
        x_t = a * x0 + (1 - a) * noise
    else:  # the clean input itself
        x_t = x0
    error = (model(x_t, t) - (noise if target == "noise" else x0)) ** 2
    return error.mean() if reduce == "mean" else error.sum()


def _diffusion_loss_cases(g):
    ac = _sd_alphas_cumprod()
    cases = []
    for B, ts in ((4, (10, 250, 500, 999)), (2, (0, 0)), (3, (999, 998, 1)), (8, None)):
        x0 = torch.randn(B, 4, 8, 8, generator=g)
        t = torch.tensor(ts) if ts is not None else torch.randint(1000, (B,), generator=g)
        cases.append(Case(f"x0 and noise of shape [{B}, 4, 8, 8], t = {t.tolist()}, Stable Diffusion's alphas_cumprod [1000], "
                          "model = a toy ε-predictor", (_diffusion_toy_model, x0, torch.randn(B, 4, 8, 8, generator=g), t, ac)))
    return cases


check_diffusion_loss = register(Checker(
    name="check_diffusion_loss",
    signature="fn(model, x0, noise, t, alphas_cumprod) -> loss",
    doc="the training loss of one batch (Ho et al. 2020, eq. 14, \"L_simple\"): noise the clean latents, "
        "x_t = √ᾱ_t x0 + √(1 − ᾱ_t) noise with ᾱ_t = alphas_cumprod[t] per sample, call ``model(x_t, t)`` once, and return "
        "the mean squared error between its prediction and ``noise`` as a 0-d tensor (so that ``loss.backward()`` works). "
        "``x0`` and ``noise`` are [B, C, H, W], ``t`` a long tensor [B], ``alphas_cumprod`` [T].",
    reference=_diffusion_loss_reference,
    make_cases=_diffusion_loss_cases,
    hint="a = alphas_cumprod[t].reshape(-1, 1, 1, 1); x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise; then "
         "((model(x_t, t) - noise) ** 2).mean() (or torch.nn.functional.mse_loss).",
    mistakes=(
        Mistake(lambda m, x0, n, t, ac: _diffusion_loss_reference(m, x0, n, t, ac, target="x0"),
                "you compared the prediction with x0: this objective's target is the noise ε that was added"),
        Mistake(lambda m, x0, n, t, ac: _diffusion_loss_reference(m, x0, n, t, ac, noised="clean"),
                "you fed the model the clean x0: it must see the noisy x_t, or it has nothing to find the noise in"),
        Mistake(lambda m, x0, n, t, ac: _diffusion_loss_reference(m, x0, n, t, ac, noised="no sqrt"),
                "you noised with ᾱ_t x0 + (1 − ᾱ_t) noise: the coefficients are the square roots, √ᾱ_t and √(1 − ᾱ_t), "
                "so that x_t keeps unit variance"),
        Mistake(lambda m, x0, n, t, ac: _diffusion_loss_reference(m, x0, n, t, ac, reduce="sum"),
                "you summed the squared errors: take their mean, so the loss (and the learning rate that suits it) "
                "does not depend on the batch size or the latent's size"),
    ),
))


class _DictChecker(Checker):
    """A checker whose answer is a dict of tensors (a state dict): each entry is compared by name."""

    def __call__(self, fn: Callable) -> None:
        __tracebackhide__ = True
        return check(fn, self.reference, self.cases(), name=self.name, hint=self.hint, mistakes=self.mistakes,
                     compare=lambda expected, got: _compare_dicts(expected, got, self.atol, self.rtol))


def _compare_dicts(expected: dict, got, atol: float, rtol: float) -> str | None:
    if got is None:
        return "your result is None: did you forget to `return` it?"
    if not isinstance(got, dict):
        return f"expected a dict (name → tensor), your result is a {type(got).__name__}"
    if set(got) != set(expected):
        return f"expected the keys {sorted(expected)}, your dict has {sorted(got)}"
    for name in expected:
        problem = _difference(expected[name], got[name], atol, rtol, what=f"your entry {name!r}")
        if problem:
            return f"entry {name!r}: {problem}"
    return None


def _ema_update_reference(ema_params, params, decay):
    return {name: decay * ema_params[name] + (1 - decay) * params[name] for name in ema_params}


def _ema_update_cases(g):
    cases = []
    for decay, shapes in ((0.9, {"weight": (3, 4), "bias": (4,)}), (0.999, {"linear.weight": (8, 8)}),
                          (0.99, {"a": (2, 3, 4), "b": (5,), "c": ()}), (0.0, {"weight": (2, 2)})):
        ema = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        params = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        listed = ", ".join(f"{k!r}: [{', '.join(map(str, s))}]" for k, s in shapes.items())
        cases.append(Case(f"ema_params and params with entries {{{listed}}}, decay = {decay}", (ema, params, decay)))
    return cases


check_ema_update = register(_DictChecker(
    name="check_ema_update",
    signature="fn(ema_params, params, decay) -> new_ema_params",
    doc="one update of an exponential moving average of the weights (Polyak & Juditsky 1992): for every name, "
        "θ̄ ← decay · θ̄ + (1 − decay) · θ. ``ema_params`` and ``params`` are dicts name → tensor with the same keys "
        "and shapes (like a state dict), ``decay`` a float in [0, 1); return the new dict.",
    reference=_ema_update_reference,
    make_cases=_ema_update_cases,
    hint="{name: decay * ema_params[name] + (1 - decay) * params[name] for name in ema_params}: the average keeps "
         "most of itself and takes a small step (1 − decay) towards the current weights.",
    mistakes=(
        Mistake(lambda ema, params, d: _ema_update_reference(params, ema, d),
                "you swapped the two: decay multiplies the old average θ̄, and only (1 − decay) goes to the new weights θ"),
        Mistake(lambda ema, params, d: {k: d * ema[k] + params[k] for k in ema},
                "you added the whole of θ: its weight is (1 − decay), so that the weights of the average sum to 1"),
        Mistake(lambda ema, params, d: {k: v.clone() for k, v in params.items()},
                "you returned the current weights θ: the average moves only a step (1 − decay) towards them"),
    ),
))


def _v_target_reference(x0, noise, alpha_bar_t):
    a = _bcast(alpha_bar_t, x0)  # [B, 1, 1, 1]
    return a.sqrt() * noise - (1 - a).sqrt() * x0  # Salimans & Ho 2022, §4


def _v_target_cases(g):
    cases = []
    for abar in ((0.5, 0.9, 0.01, 0.999), (1.0, 0.0), (0.3,), (0.0047, 0.25, 0.75)):
        B = len(abar)
        x0, noise = torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 4, 8, 8, generator=g)
        cases.append(Case(f"x0 and noise of shape [{B}, 4, 8, 8], alpha_bar_t = {list(abar)}",
                          (x0, noise, torch.tensor(abar))))
    return cases


check_v_target = register(Checker(
    name="check_v_target",
    signature="fn(x0, noise, alpha_bar_t) -> v",
    doc="the v-prediction target (Salimans & Ho 2022, §4): v = √ᾱ_t · ε − √(1 − ᾱ_t) · x0, per sample. ``x0`` and "
        "``noise`` (ε) are [B, C, H, W]; ``alpha_bar_t`` [B] holds each sample's ᾱ_t.",
    reference=_v_target_reference,
    make_cases=_v_target_cases,
    hint="a = alpha_bar_t.reshape(-1, 1, 1, 1); return a.sqrt() * noise - (1 - a).sqrt() * x0. Check the ends: "
         "at ᾱ = 1 (no noise) v is ε, at ᾱ = 0 (pure noise) v is −x0.",
    mistakes=(
        Mistake(lambda x0, n, a: -_v_target_reference(x0, n, a),
                "you returned −v = √(1 − ᾱ) x0 − √ᾱ ε: the signs are the other way round (v = √ᾱ ε − √(1 − ᾱ) x0)"),
        Mistake(lambda x0, n, a: _bcast((1 - a).sqrt(), x0) * n - _bcast(a.sqrt(), x0) * x0,
                "you swapped the coefficients: ε is multiplied by √ᾱ (the signal's coefficient) and x0 by √(1 − ᾱ)"),
        Mistake(lambda x0, n, a: _bcast(a, x0) * n - _bcast(1 - a, x0) * x0,
                "you left out the square roots: v = √ᾱ ε − √(1 − ᾱ) x0"),
        Mistake(lambda x0, n, a: _bcast(a.sqrt(), x0) * x0 + _bcast((1 - a).sqrt(), x0) * n,
                "you returned the noisy latent x_t = √ᾱ x0 + √(1 − ᾱ) ε: v is the velocity, √ᾱ ε − √(1 − ᾱ) x0"),
    ),
))


# ---- notebook 07: text and guidance --------------------------------------------------------------
def _tokenize_reference(prompt, vocabulary, max_length):
    import warnings

    from sdlearn.text import Tokenizer

    with warnings.catch_warnings():  # unknown words and truncation warn; the checker's cases do both on purpose
        warnings.simplefilter("ignore")
        ids, _ = Tokenizer(vocabulary, max_length).encode(prompt)
    return ids[0]  # [max_length]


def _tokenize_rows(prompt, vocabulary, max_length, words=None, offset=4, unknown="unk", specials=True, keep_eos=True):
    """The tokenizer written with one deliberate difference (the mistakes below)."""
    from sdlearn.data import split_words

    to_id = {w: i + offset for i, w in enumerate(vocabulary)}
    words = split_words(prompt) if words is None else words
    ids = [to_id.get(w, 3) for w in words if unknown == "unk" or w in to_id]
    if specials and keep_eos:
        row = [1, *ids[: max_length - 2], 2]
    elif specials:
        row = [1, *ids, 2][:max_length]
    else:
        row = ids[:max_length]
    return torch.tensor(row + [0] * (max_length - len(row)), dtype=torch.long)


def _tokenize_cases(g):
    from sdlearn.data import VOCABULARY

    pets = ["cat", "dog", "mat", "on", "sat", "the"]
    return [
        Case("prompt 'a large red circle in the top left', the Shapes vocabulary (37 words), max_length 16",
             ("a large red circle in the top left", list(VOCABULARY), 16)),
        Case("prompt 'Big RED disc, upper-left!' (capitals and punctuation), the Shapes vocabulary, max_length 16",
             ("Big RED disc, upper-left!", list(VOCABULARY), 16)),
        Case("prompt 'a crimson circle' ('crimson' is not in the vocabulary), the Shapes vocabulary, max_length 16",
             ("a crimson circle", list(VOCABULARY), 16)),
        Case("the empty prompt '', the Shapes vocabulary, max_length 16", ("", list(VOCABULARY), 16)),
        Case("prompt 'a small blue square in the bottom right corner' (9 words), the Shapes vocabulary, max_length 8: "
             "too long, it must be truncated", ("a small blue square in the bottom right corner", list(VOCABULARY), 8)),
        Case(f"prompt 'The cat sat on the mat.', vocabulary {pets}, max_length 10",
             ("The cat sat on the mat.", pets, 10)),
    ]


check_tokenize = register(Checker(
    name="check_tokenize",
    signature="fn(prompt, vocabulary, max_length) -> ids",
    doc="a word-level tokenizer, as sdlearn.text.Tokenizer: split the prompt with ``sdlearn.data.split_words`` (lower "
        "case, punctuation dropped); ids are <pad> = 0, <bos> = 1, <eos> = 2, <unk> = 3, then ``vocabulary[i]`` is "
        "id 4 + i; an unknown word is <unk>; the row is <bos> w₁ … wₙ <eos>, keeping at most max_length − 2 words "
        "(<eos> stays last), then padded with <pad> to ``max_length``. Return a LongTensor [max_length] (the mask is "
        "then ids != 0).",
    reference=_tokenize_reference,
    make_cases=_tokenize_cases,
    hint="words = split_words(prompt)[: max_length - 2]; ids = [1] + [4 + vocabulary.index(w) if w in vocabulary else 3 "
         "for w in words] + [2]; then append 0s up to max_length and return torch.tensor(ids).",
    mistakes=(
        Mistake(lambda p, v, n: _tokenize_rows(p, v, n, offset=0),
                "you numbered the words from 0: ids 0–3 are the special tokens, so vocabulary[i] is id 4 + i"),
        Mistake(lambda p, v, n: _tokenize_rows(p, v, n, specials=False),
                "you left out <bos> (1) at the start and <eos> (2) after the last word"),
        Mistake(lambda p, v, n: _tokenize_rows(p, v, n, keep_eos=False),
                "you cut the padded row at max_length after adding <eos>, which cut <eos> off: keep at most "
                "max_length − 2 words, then add <eos>"),
        Mistake(lambda p, v, n: _tokenize_rows(p, v, n, unknown="drop"),
                "you dropped the unknown words: each becomes <unk> (3), so the model knows a word was there"),
        Mistake(lambda p, v, n: _tokenize_rows(p, v, n, words=p.split()),
                "you split with str.split(): 'Big' and 'disc,' are not in the vocabulary; use split_words, which "
                "lower-cases and drops punctuation"),
    ),
))


def _contrastive_reference(image_emb, text_emb, logit_scale):
    from sdlearn.text import contrastive_loss

    return float(contrastive_loss(image_emb, text_emb, logit_scale))


def _contrastive_terms(image_emb, text_emb, logit_scale):
    logits = logit_scale * image_emb @ text_emb.T  # [B, B]
    labels = torch.arange(len(logits))
    return (torch.nn.functional.cross_entropy(logits, labels), torch.nn.functional.cross_entropy(logits.T, labels))


def _contrastive_cases(g):
    cases = []
    for B, E, scale, as_tensor in ((4, 8, 1 / 0.07, True), (6, 16, 20.6, False), (2, 4, 1.0, True), (8, 32, 100.0, True)):
        image = torch.nn.functional.normalize(torch.randn(B, E, generator=g), dim=1)
        text = torch.nn.functional.normalize(image + 0.8 * torch.randn(B, E, generator=g), dim=1)  # roughly matched
        shown = f"a 0-d tensor {scale:.4g}" if as_tensor else f"the float {scale}"
        cases.append(Case(f"{B} pairs of unit vectors of size {E} (image_emb and text_emb [{B}, {E}], row i of each "
                          f"a pair), logit_scale = {shown}",
                          (image, text, torch.tensor(scale) if as_tensor else scale)))
    return cases


check_contrastive_loss = register(Checker(
    name="check_contrastive_loss",
    signature="fn(image_emb, text_emb, logit_scale) -> loss",
    doc="CLIP's symmetric contrastive loss (Radford et al. 2021, Fig. 3), as sdlearn.text.contrastive_loss: "
        "``image_emb`` and ``text_emb`` are [B, E] unit vectors, row i of each a matching pair; ``logit_scale`` is "
        "the multiplier exp(t) = 1/τ (a number or 0-d tensor, NOT its log). logits = logit_scale · image_emb · "
        "text_embᵀ [B, B]; the loss is ½ (cross-entropy of each row against its diagonal entry + cross-entropy of "
        "each column against its diagonal entry), each averaged over the batch. Return a number (0-d tensor or float).",
    reference=_contrastive_reference,
    make_cases=_contrastive_cases,
    hint="logits = logit_scale * image_emb @ text_emb.T; labels = torch.arange(B); loss = (F.cross_entropy(logits, "
         "labels) + F.cross_entropy(logits.T, labels)) / 2.",
    mistakes=(
        Mistake(lambda i, t, s: _contrastive_terms(i, t, s)[0],
                "you only kept the image → text direction (rows); CLIP averages it with text → image (columns, logits.T)"),
        Mistake(lambda i, t, s: _contrastive_terms(i, t, s)[1],
                "you only kept the text → image direction (columns); CLIP averages it with image → text (rows)"),
        Mistake(lambda i, t, s: sum(_contrastive_terms(i, t, s)),
                "you added the two directions without halving: the loss is their mean"),
        Mistake(lambda i, t, s: 0.5 * sum(_contrastive_terms(i, t, math.exp(float(s)))),
                "you took exp(logit_scale): here logit_scale is already the multiplier exp(t) (TinyCLIP.scale() gives it)"),
        Mistake(lambda i, t, s: 0.5 * sum(_contrastive_terms(i, t, 1 / s)),
                "you divided the similarities by logit_scale: it is 1/τ, so multiply by it (dividing by τ)"),
        Mistake(lambda i, t, s: 0.5 * sum(_contrastive_terms(i, t, 1.0)),
                "you left out logit_scale: raw cosine similarities lie in [-1, 1], far too flat for a softmax"),
    ),
    atol=1e-5,
    rtol=1e-4,
))


def _cfg_combination_cases(g):
    cases = []
    for B, scale in ((2, 4.0), (3, 7.5), (1, 1.0), (2, 0.0), (4, 2)):
        u, c = torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 4, 8, 8, generator=g)
        cases.append(Case(f"eps_uncond and eps_cond of shape [{B}, 4, 8, 8], scale = {scale}", (u, c, scale)))
    return cases


check_cfg = register(Checker(
    name="check_cfg",
    signature="fn(eps_uncond, eps_cond, scale) -> guided",
    doc="the classifier-free guidance combination (Ho & Salimans 2022, eq. 6): ε̃ = ε_uncond + scale · (ε_cond − "
        "ε_uncond), for predictions of any shape (the same for both) and a number ``scale`` ≥ 0. Scale 1 gives "
        "ε_cond, scale 0 ε_uncond.",
    reference=lambda u, c, s: u + s * (c - u),
    make_cases=_cfg_combination_cases,
    hint="start from the unconditional prediction and move ``scale`` times the way the prompt moves it: "
         "eps_uncond + scale * (eps_cond - eps_uncond).",
    mistakes=(
        Mistake(lambda u, c, s: u + s * c, "you added scale · ε_cond: guidance scales the *difference* ε_cond − ε_uncond"),
        Mistake(lambda u, c, s: c + s * (c - u), "you started from ε_cond: the formula starts from ε_uncond, so that "
                                                   "scale 1 gives ε_cond"),
        Mistake(lambda u, c, s: c + s * (u - c), "you swapped ε_uncond and ε_cond: this pushes *away* from the prompt"),
        Mistake(lambda u, c, s: s * (c - u), "you returned only scale · (ε_cond − ε_uncond), the guidance direction: add it "
                                               "to ε_uncond"),
    ),
))
