"""Repository-wide pytest set-up: what each course notebook costs the test run (issue 19, item 7).

After the tests, ``pytest`` prints one line per notebook: the seconds nbval spent on it (set-up, every cell and
teardown, summed over its items) and the seconds of its student-copy test (tests/test_student_copies.py),
with totals, and flags every notebook over ``SLOW_NOTEBOOK_S`` in either. It says nothing when no notebook ran
(``make test-fast``).

This lives at the root, not in tests/conftest.py: a conftest's per-test hooks (``pytest_runtest_logreport``)
see only the tests in its own folder, and nbval's items are under notebooks/. The times come from pytest's
own reports; no test times itself.
"""

from __future__ import annotations

import re
from collections import defaultdict

SLOW_NOTEBOOK_S = 90.0
NBVAL, STUDENT_COPY = "nbval", "student copy"
STUDENT_COPY_TEST = re.compile(r"(^|/)test_student_copies\.py::\w+\[(?P<notebook>[^\]/]+\.ipynb)\]$")


class NotebookTimes:
    """Sums the durations of pytest's reports per notebook and prints them at the end of the run."""

    def __init__(self) -> None:
        self.seconds: dict[str, dict[str, float]] = {NBVAL: defaultdict(float), STUDENT_COPY: defaultdict(float)}
        self.other_seconds = 0.0

    def pytest_runtest_logreport(self, report) -> None:
        path = report.nodeid.split("::")[0]
        student_copy = STUDENT_COPY_TEST.search(report.nodeid)
        if path.endswith(".ipynb"):
            self.seconds[NBVAL][path.rsplit("/", 1)[-1]] += report.duration
        elif student_copy:
            self.seconds[STUDENT_COPY][student_copy["notebook"]] += report.duration
        else:
            self.other_seconds += report.duration

    def pytest_terminal_summary(self, terminalreporter) -> None:
        nbval, student = self.seconds[NBVAL], self.seconds[STUDENT_COPY]
        notebooks = sorted(set(nbval) | set(student))
        if not notebooks:
            return
        write = terminalreporter.write_line
        width = max(len("total"), *map(len, notebooks))
        terminalreporter.write_sep("=", f"seconds per notebook (each should take about {SLOW_NOTEBOOK_S:g} s or less)")
        write(f"{'notebook':<{width}}  {NBVAL:>9}  {STUDENT_COPY:>12}")

        def cell(times: dict[str, float], name: str) -> str:
            return f"{times[name]:9.1f}" if name in times else f"{'-':>9}"

        for name in notebooks:
            slow = [kind for kind, times in self.seconds.items() if times.get(name, 0.0) > SLOW_NOTEBOOK_S]
            flag = f"  <- over {SLOW_NOTEBOOK_S:g} s ({' and '.join(slow)})" if slow else ""
            write(f"{name:<{width}}  {cell(nbval, name)}  {cell(student, name):>12}{flag}")
        write(f"{'total':<{width}}  {sum(nbval.values()):9.1f}  {sum(student.values()):12.1f}")
        write(f"{'all other tests':<{width}}  {self.other_seconds:9.1f}")


class WorkerLines:
    """Under pytest-xdist: the lines a worker's conftest had for the end of the run (tests/browser: "not run,
    because …"), printed once by the controller. Registered only with xdist, whose hook this is."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def pytest_testnodedown(self, node, error) -> None:
        for line in getattr(node, "workeroutput", {}).get("sdlearn_not_run", []):
            if line not in self.lines:
                self.lines.append(line)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        for line in self.lines:
            terminalreporter.write_line(line, yellow=True, bold=True)


def pytest_configure(config) -> None:
    # Registered as a plugin rather than written as conftest hooks, so that it sees every test's report.
    config.pluginmanager.register(NotebookTimes(), "sdlearn-notebook-times")
    if config.pluginmanager.hasplugin("xdist") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(WorkerLines(), "sdlearn-worker-lines")
