"""The notebooks as learners meet them: JupyterLab in headless Chromium, driven by playwright (issue 19).

One JupyterLab server per test session, on a free port with a token and its own data, config, runtime and
IPython directories (so nothing of the user's Jupyter set-up is read or written), serving a temporary folder
that holds copies of the course's notebooks (``course/``) and the student copies that ``python -m sdlearn
exercises`` writes (``student/``). Notebooks are opened in Chromium, run and driven there; nothing is saved.

The browser is Debian's Chromium (``apt-get install chromium``), launched through playwright's
``executable_path``; playwright's own browser download is never used. Without Chromium or the playwright
package the tests here are left out, and one line at the end of the run says why, unless
``SDLEARN_REQUIRE_BROWSER=1`` (set by ``.ci/run`` and ``make test-browser``): then each fails, saying why.
``SDLEARN_CHROMIUM`` names another Chromium binary.

A failed test leaves, in ``test-artifacts/`` at the repository root (git-ignored): a screenshot of the page,
the browser console, and the end of the JupyterLab server's log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

# Helper modules of these tests: their asserts explain themselves as a test's do.
pytest.register_assert_rewrite("explorer_drivers", "notebook_page")

REPO = Path(__file__).resolve().parents[2]
COURSE = REPO / "notebooks"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = os.environ.get("SDLEARN_CHROMIUM", "/usr/bin/chromium")
REQUIRED = os.environ.get("SDLEARN_REQUIRE_BROWSER", "") == "1"
SERVER_START_TIMEOUT_S = 120


def missing_browser() -> str | None:
    """Why the browser tests cannot run here, or None if they can."""
    if not Path(CHROMIUM).is_file():
        return f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set SDLEARN_CHROMIUM)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install playwright; no browser download is needed)"
    return None


HERE = Path(__file__).resolve().parent
_not_run: list[str] = []  # the one line that says why the browser tests did not run


def pytest_collection_modifyitems(config, items):
    """Without Chromium (or playwright), leave the browser tests out and say so once, at the end of the run;
    with ``SDLEARN_REQUIRE_BROWSER=1`` keep them, and ``browser_available`` fails each one."""
    reason = missing_browser()
    if reason is None or REQUIRED:
        return
    ours = [item for item in items if HERE in Path(str(item.fspath)).resolve().parents]
    if ours:
        items[:] = [item for item in items if item not in ours]
        config.hook.pytest_deselected(items=ours)
        _not_run.append(f"{len(ours)} browser tests (tests/browser) not run: {reason}")


def pytest_terminal_summary(terminalreporter):
    for line in _not_run:
        terminalreporter.write_line(line, yellow=True, bold=True)


def pytest_sessionfinish(session):
    # Under pytest-xdist this runs in each worker, whose summary nobody sees: hand the line to the controller,
    # which prints it (the root conftest.py, pytest_testnodedown).
    output = getattr(session.config, "workeroutput", None)
    if output is not None and _not_run:
        output["sdlearn_not_run"] = list(_not_run)


@pytest.fixture(scope="session", autouse=True)
def browser_available():
    reason = missing_browser()
    if reason is not None:  # (only reached with SDLEARN_REQUIRE_BROWSER=1: otherwise these are left out)
        pytest.fail(f"browser tests (tests/browser) cannot run: {reason}; SDLEARN_REQUIRE_BROWSER=1 requires them",
                    pytrace=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterLabServer:
    """A JupyterLab server of its own, serving ``root``; ``api(...)`` calls its REST API with the token."""

    def __init__(self, root: Path, home: Path):
        self.root, self.port, self.token = root, free_port(), os.urandom(12).hex()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        for name, folder in (("JUPYTER_DATA_DIR", "data"), ("JUPYTER_CONFIG_DIR", "config"),
                             ("JUPYTER_RUNTIME_DIR", "runtime"), ("IPYTHONDIR", "ipython")):
            env[name] = str(home / folder)
            (home / folder).mkdir(parents=True, exist_ok=True)
        # No "get notified about Jupyter news?" toast over the notebook (its news feed is turned off below too).
        (home / "config" / "labconfig").mkdir(exist_ok=True)
        (home / "config" / "labconfig" / "page_config.json").write_text(
            json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
        env.setdefault("OMP_NUM_THREADS", "1")  # the kernels: tiny models, a busy machine
        env.pop("JUPYTER_PATH", None)
        args = [
            sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
            f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={root}",
            # window.jupyterapp, in JupyterLab and in Notebook 7: run commands, read the notebook model
            "--LabApp.expose_app_in_browser=True", "--JupyterNotebookApp.expose_app_in_browser=True",
            "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly",  # no network: no news, no update check, no extension index
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.append("--allow-root")  # containers often run as root
        self.log_path = home / "jupyterlab.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(args, cwd=root, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with status {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.api("GET", "/api/status")
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"JupyterLab did not answer within {SERVER_START_TIMEOUT_S} s:\n"
                                       f"{self.log_tail()}") from None
                time.sleep(0.5)

    def api(self, method: str, path: str):
        request = urllib.request.Request(self.url + path, method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None

    def shut_down_kernels(self) -> None:
        """End every session (and its kernel), so that one notebook's kernel does not slow the next."""
        for session in self.api("GET", "/api/sessions"):
            self.api("DELETE", f"/api/sessions/{session['id']}")

    def log_tail(self, lines: int = 80) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture(scope="session")
def lab(tmp_path_factory, browser_available):
    """The server, over ``course/`` (copies of the course's notebooks) and ``student/`` (student copies)."""
    home = tmp_path_factory.mktemp("jupyterlab")
    root = home / "root"
    (root / "course").mkdir(parents=True)
    for path in sorted(COURSE.glob("[0-9][0-9]_*.ipynb")):
        shutil.copy2(path, root / "course" / path.name)
    subprocess.run([sys.executable, "-m", "sdlearn", "exercises", str(root / "student")], check=True,
                   capture_output=True, text=True)
    server = JupyterLabServer(root, home)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def browser(browser_available):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


@pytest.fixture
def notebooks(lab, browser):
    """Opens notebooks of the server (``notebooks.open(path)``); closes them and their kernels afterwards."""
    from notebook_page import NotebookOpener

    opener = NotebookOpener(lab, browser)
    yield opener
    opener.close()


# -- failures leave a screenshot, the console and the server log ------------------------------------------
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    name = re.sub(r"[^\w-]+", "_", item.nodeid.split("::", 1)[-1]).strip("_")
    ARTIFACTS.mkdir(exist_ok=True)
    for value in item.funcargs.values():
        save = getattr(value, "save_artifacts", None)
        if save is not None:
            try:
                save(ARTIFACTS / name)
            except Exception as error:  # a dead page must not hide the test's own failure
                report.sections.append(("artefacts", f"could not save the page: {error}"))
    server = item.funcargs.get("lab")
    if server is not None:
        (ARTIFACTS / f"{name}.jupyterlab.log").write_text(server.log_tail(400))
    report.sections.append(("artefacts", f"screenshot, console and server log in {ARTIFACTS}/{name}.*"))
