"""The checker framework: :class:`Checker`, :func:`check`, and what they report.

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

The student copies (:mod:`sdlearn.exercises.student_copies`) replace each solution region by a stub.

What a learner sees when a check fails
--------------------------------------
Only their own code: in Jupyter and IPython an :class:`ExerciseFailed` shows the learner's frames (the
cell that called the checker and, when their function raised, the frames of their function), then the
message with the case, the problem and the hint; the checker's own frames are left out
(``ExerciseFailed._render_traceback_``, which IPython calls; pytest honours ``__tracebackhide__``).

A learner's function that never returns (an endless loop) is stopped after ``timeout`` seconds (30 by
default) and reported as :class:`ExerciseTimedOut`. On the main thread of a POSIX system (a Jupyter
kernel's cells run there) a ``SIGALRM`` timer interrupts the function itself, which then really stops.
Elsewhere (Windows, a check run on another thread, or another alarm already armed) the function runs in a
daemon thread that the checker stops waiting for: Python cannot kill a thread, so the message says that
it may still be running and that restarting the kernel stops it.

Adding a checker
----------------
Write a reference function (usually sdlearn's own code), a function that builds the test cases
from a seeded generator, and one or more plausible :class:`Mistake` s, then ``register`` a
:class:`Checker` in the checkers module of its notebook (``checks_NN_*.py``), and import it in
``sdlearn/exercises/__init__.py``; see ``check_alphas_cumprod`` in
:mod:`sdlearn.exercises.checks_01_forward_noising` for a short complete example. Every registered
checker is tested to pass its reference and to fail each of its mistakes.
"""

from __future__ import annotations

import math
import signal
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdlearn.schedules import make_betas

CHECK_TIMEOUT_S = 30.0
"""Seconds a learner's function may take on one case before the checker stops it (a correct answer takes
milliseconds on the checkers' small inputs)."""

_EXERCISES_DIR = Path(__file__).resolve().parent


def _is_checker_frame(frame) -> bool:
    """A frame of the checker machinery (this package), of IPython or ipykernel running the cell, or one marked
    ``__tracebackhide__``."""
    if frame.f_locals.get("__tracebackhide__"):
        return True
    if str(frame.f_globals.get("__name__", "")).startswith(("IPython.", "ipykernel.")):
        return True
    try:
        return Path(frame.f_code.co_filename).resolve().parent == _EXERCISES_DIR
    except (OSError, ValueError):  # "<stdin>", "<ipython-input-...>" and the like
        return False


def learner_frames(tb) -> traceback.StackSummary:
    """The frames of the traceback ``tb`` that are the learner's code, not the checker's."""
    kept = []
    while tb is not None:
        if not _is_checker_frame(tb.tb_frame):
            kept.append((tb.tb_frame, tb.tb_lineno))
        tb = tb.tb_next
    return traceback.StackSummary.extract(kept)


def _without_leading_checker_frames(tb):
    """``tb`` from the learner's first frame on: the frames of the checker that called the learner's function
    come first in the traceback of an exception it raised."""
    while tb is not None and _is_checker_frame(tb.tb_frame):
        tb = tb.tb_next
    return tb


class ExerciseFailed(AssertionError):
    """The learner's function gave a wrong answer (or crashed) on one of the checker's cases."""

    def _render_traceback_(self) -> list[str]:
        """What IPython and Jupyter show instead of the full traceback: the learner's frames (and those of the
        exception their function raised, if any), then the message with its hint; no frame of the checker."""
        lines: list[str] = []
        cause = self.__cause__
        if cause is not None:
            lines.append("Traceback of your function (most recent call last):")
            lines += "".join(learner_frames(cause.__traceback__).format()).rstrip("\n").splitlines()
            lines += "".join(traceback.format_exception_only(type(cause), cause)).rstrip("\n").splitlines()
            lines += ["", "The above exception was the direct cause of the following exception:", ""]
        frames = learner_frames(self.__traceback__)
        if frames:
            lines.append("Traceback (most recent call last):")
            lines += "".join(frames.format()).rstrip("\n").splitlines()
        lines += f"{type(self).__name__}: {self}".splitlines()
        return lines


class ExerciseNotDone(ExerciseFailed, NotImplementedError):
    """The learner's function still raises ``NotImplementedError``: the exercise is not filled in yet."""


class ExerciseTimedOut(ExerciseFailed, TimeoutError):
    """The learner's function did not return within the checker's ``timeout`` (an endless loop?)."""


class _OutOfTime(BaseException):
    """Raised inside the learner's function when its time is up: a ``BaseException``, so that an ``except
    Exception`` in their code does not swallow it. ``stopped`` says whether the function was really stopped."""

    def __init__(self, stopped: bool):
        super().__init__("out of time")
        self.stopped = stopped


def call_with_timeout(fn: Callable, args: tuple, kwargs: dict, seconds: float | None):
    """``fn(*args, **kwargs)``, or :class:`_OutOfTime` after ``seconds`` (None: no limit).

    On the main thread, where ``signal.setitimer`` exists and no other timer is armed, a ``SIGALRM`` raises
    inside ``fn`` and so stops it. Otherwise ``fn`` runs in a daemon thread that is waited for ``seconds``:
    a thread cannot be killed, so an endless ``fn`` keeps running there (``stopped`` False)."""
    __tracebackhide__ = True
    if seconds is None:
        return fn(*args, **kwargs)
    on_main_thread = threading.current_thread() is threading.main_thread()
    if on_main_thread and hasattr(signal, "setitimer") and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0):
        running = [True]

        def on_alarm(signum, frame):
            if running[0]:
                raise _OutOfTime(stopped=True)

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            result = fn(*args, **kwargs)
            running[0] = False
            return result
        finally:
            running[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)
    outcome: dict[str, Any] = {}

    def run():
        try:
            outcome["result"] = fn(*args, **kwargs)
        except BaseException as error:  # handed to the checker's thread below
            outcome["error"] = error

    worker = threading.Thread(target=run, name="sdlearn exercise check", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise _OutOfTime(stopped=False)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


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


def format_shape(x: torch.Tensor) -> str:
    """``x``'s shape as the learner reads it in a message, e.g. ``[4, 3, 8, 8]``."""
    return f"[{', '.join(map(str, x.shape))}]"


def _index(flat_index: int, shape: torch.Size) -> str:
    coords = []
    for size in reversed(shape):
        flat_index, r = divmod(flat_index, size)
        coords.append(r)
    return f"index ({', '.join(map(str, reversed(coords)))})" if coords else "the value"


def difference(expected: Any, got: Any, atol: float, rtol: float, what: str = "your result") -> str | None:
    """Why ``got`` is not ``expected``, in words; None when they agree within ``atol + rtol·|expected|``."""
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return f"expected {len(expected)} values (a {type(expected).__name__}), got {type(got).__name__}"
        for k, (e, g) in enumerate(zip(expected, got)):
            problem = difference(e, g, atol, rtol, what=f"value {k} of your result")
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
        return f"expected shape {format_shape(expected)}, {what} has shape {format_shape(got)}"
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
    timeout: float | None = CHECK_TIMEOUT_S,
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

    A call of ``fn`` that takes more than ``timeout`` seconds (None: no limit) is stopped and reported as
    :class:`ExerciseTimedOut` (see the module's docstring for how).
    """
    __tracebackhide__ = True  # IPython and pytest show the learner's frames, not the checker's
    if not callable(fn):
        raise ExerciseFailed(f"{name}: expected your function, got a {type(fn).__name__} ({repr(fn)[:60]}). "
                             f"Pass the function itself, without calling it: {name}(my_function)")
    compare = compare or (lambda expected, got: difference(expected, got, atol, rtol))

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
            got = call_with_timeout(fn, args, kwargs, timeout)
        except _OutOfTime as out:
            where = learner_frames(out.__traceback__)
            then = ("It may still be running in the background: restart the kernel to stop it." if not out.stopped else
                    f"It was stopped in {where[-1].name}, line {where[-1].lineno}"
                    f"{f': `{where[-1].line}`' if where[-1].line else ''}." if where else "It was stopped.")
            raise fail(k, case, f"your function did not return within {timeout:g} s: an endless loop, or a `while` "
                                f"whose condition never changes?", then, ExerciseTimedOut) from None
        except NotImplementedError as error:
            raise fail(k, case, f"your function raised NotImplementedError({error}).",
                       "Replace the `raise NotImplementedError(...)` line with your code, run that cell, then run this check again.",
                       ExerciseNotDone) from None
        except Exception as error:
            error.__traceback__ = _without_leading_checker_frames(error.__traceback__)  # the learner's frames only
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
    timeout: float | None = CHECK_TIMEOUT_S

    def __post_init__(self):
        self.__doc__ = f"Check your function ``{self.signature}``: {self.doc}\n\nHint when it fails: {self.hint}"

    def cases(self) -> list[Case]:
        return self.make_cases(torch.Generator().manual_seed(self.seed))

    def __call__(self, fn: Callable) -> None:
        __tracebackhide__ = True
        return check(fn, self.reference, self.cases(), name=self.name, hint=self.hint,
                     mistakes=self.mistakes, atol=self.atol, rtol=self.rtol, timeout=self.timeout)

    def __repr__(self) -> str:
        return f"<exercise checker {self.name}: {self.signature}>"


@dataclass
class PerSettingChecker(Checker):
    """A checker whose answer is a list with one entry per setting of an experiment (a guidance scale, an SDEdit
    strength): each entry one finite number, or, when ``fields`` names them, a row of numbers (a tuple, a list, a
    tensor). Its messages say which ``setting``'s entry is off, and which of the row's numbers. A tensor or an array
    of single numbers is accepted where a list is."""

    setting: str = "setting"                  # the word for one setting in the messages
    fields: tuple[str, ...] = ()              # the names of a row's numbers; () when each entry is one number
    quantity: str = "the measurement at that setting"  # what one number is, for a message on a non-number

    def __call__(self, fn: Callable) -> None:
        __tracebackhide__ = True
        return check(fn, self.reference, self.cases(), name=self.name, hint=self.hint, mistakes=self.mistakes,
                     compare=self._compare, timeout=self.timeout)

    def _compare(self, expected: list, got) -> str | None:
        if got is None:
            return "your result is None: did you forget to `return` it?"
        if not self.fields and hasattr(got, "tolist"):  # a tensor or a numpy array of the numbers
            got = got.tolist()
        if not isinstance(got, (list, tuple)) or len(got) != len(expected):
            entries = "rows" if self.fields else "numbers"
            return (f"expected a list of {len(expected)} {entries} (one per {self.setting}), your result is "
                    + (f"a {type(got).__name__} of {len(got)}" if isinstance(got, (list, tuple)) else
                       f"a {type(got).__name__}"))
        for k, (e, g) in enumerate(zip(expected, got)):
            problem = self._compare_row(k, e, g) if self.fields else self._compare_number(k, e, g)
            if problem:
                return problem
        return None

    def _compare_number(self, k: int, expected: float, got) -> str | None:
        if not _finite_number(got):
            return f"number {k + 1} of your list is {got!r}; expected a finite number, {self.quantity}"
        problem = difference(expected, got, self.atol, self.rtol, what=f"your number {k + 1}")
        return f"at {self.setting} number {k + 1}: {problem}" if problem else None

    def _compare_row(self, k: int, expected: Sequence[float], got) -> str | None:
        if hasattr(got, "tolist"):  # a tensor or an array of the row's numbers
            got = got.tolist()
        if not isinstance(got, (list, tuple)) or len(got) != len(self.fields):
            count = _COUNT_WORDS[len(self.fields)] if len(self.fields) < len(_COUNT_WORDS) else str(len(self.fields))
            return (f"row {k + 1} of your list is {got!r}; expected a tuple of {count} numbers "
                    f"({', '.join(self.fields)})")
        for e, g, name in zip(expected, got, self.fields):
            if not _finite_number(g):
                return f"at {self.setting} number {k + 1}, {name} is {g!r}; expected a finite number"
            problem = difference(e, g, self.atol, self.rtol, what=f"yours ({name})")
            if problem:
                return f"at {self.setting} number {k + 1}, {name}: {problem}"
        return None


_COUNT_WORDS = ("no", "one", "two", "three", "four", "five", "six")


def _finite_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


CHECKERS: dict[str, Checker] = {}


def register(checker: Checker) -> Checker:
    """Add a checker to :data:`CHECKERS` (so the tests cover it) and return it."""
    if checker.name in CHECKERS:
        raise ValueError(f"a checker named {checker.name} is already registered")
    CHECKERS[checker.name] = checker
    return checker


# ---- a checker whose answer is a dict --------------------------------------------------------------
class DictChecker(Checker):
    """A checker whose answer is a dict of tensors (a state dict): each entry is compared by name."""

    def __call__(self, fn: Callable) -> None:
        __tracebackhide__ = True
        return check(fn, self.reference, self.cases(), name=self.name, hint=self.hint, mistakes=self.mistakes,
                     compare=lambda expected, got: _compare_dicts(expected, got, self.atol, self.rtol),
                     timeout=self.timeout)


def _compare_dicts(expected: dict, got, atol: float, rtol: float) -> str | None:
    if got is None:
        return "your result is None: did you forget to `return` it?"
    if not isinstance(got, dict):
        return f"expected a dict (name → tensor), your result is a {type(got).__name__}"
    if set(got) != set(expected):
        return f"expected the keys {sorted(expected)}, your dict has {sorted(got)}"
    for name in expected:
        problem = difference(expected[name], got[name], atol, rtol, what=f"your entry {name!r}")
        if problem:
            return f"entry {name!r}: {problem}"
    return None


# ---- helpers shared by the checkers' cases ---------------------------------------------------------
def random_images(g: torch.Generator, *shape: int) -> torch.Tensor:
    """Uniform random "images" of the given shape, with values in [-1, 1] as the VAE and the pipeline use them."""
    return torch.rand(shape, generator=g) * 2 - 1  # images in [-1, 1]


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One value per sample, ``[B]``, reshaped to broadcast over the samples of ``like``: ``[B, 1, 1, 1]`` for images."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))  # [B] → [B, 1, 1, 1]


def sd_alphas_cumprod() -> torch.Tensor:
    """ᾱ_t of Stable Diffusion's scaled-linear schedule, T = 1000, a float32 tensor [1000]."""
    return torch.cumprod(1 - make_betas("scaled_linear", 1000), dim=0)  # [1000], Stable Diffusion's ᾱ_t
