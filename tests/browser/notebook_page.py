"""One notebook open in JupyterLab in Chromium: open it, run all its cells, read what it shows, wait for a change.

Reading goes through JupyterLab's own objects (``window.jupyterapp``, exposed by the test server): the notebook
model gives each cell's tags and outputs as nbformat JSON, the session gives the kernel's status.
"""

from __future__ import annotations

import io
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
RAISES_TAG = "raises-exception"
WAIT_S = 120  # a redraw or a Generate: about a second on an idle laptop, much longer on a busy CI machine
RUN_ALL_TIMEOUT_S = 900  # one notebook's Run All, on a busy 2-core machine

_OPEN_JS = """async (path) => {
  const app = window.jupyterapp;
  await app.started;
  await app.restored;
  for (let i = 0; i < 1200; i++) {
    const panel = app.shell.currentWidget;
    if (panel && panel.context && panel.context.path === path && panel.sessionContext) {
      await panel.context.ready;
      await panel.sessionContext.ready;
      window.__sdlearnPanel = panel;
      return true;
    }
    await new Promise(resolve => setTimeout(resolve, 100));
  }
  return false;
}"""

_RUN_ALL_JS = """async (timeoutMs) => {
  const run = window.jupyterapp.commands.execute('notebook:run-all-cells');
  const late = new Promise(resolve => setTimeout(() => resolve('timed out'), timeoutMs));
  return String(await Promise.race([run, late]));
}"""

# Done: no code cell queued or running, and the kernel idle. (Run All's own promise settles at the first error,
# even at an exercise cell tagged raises-exception, while the kernel goes on with the cells after it.)
_ALL_DONE_JS = """() => {
  const panel = window.__sdlearnPanel;
  const busy = panel.content.widgets.filter(cell => cell.model.type === 'code'
                                              && cell.model.executionState === 'running').length;
  return busy === 0 && panel.sessionContext.session.kernel.status === 'idle';
}"""

# Code cells with source that have not run (yet): Run All may still be about to send the next one.
_NOT_RUN_JS = """() => window.__sdlearnPanel.content.widgets.filter(cell => cell.model.type === 'code'
    && cell.model.sharedModel.getSource().trim() && cell.model.executionCount === null).length"""

_MODEL_JS = "() => window.__sdlearnPanel.content.model.toJSON()"

# What each code cell's output area shows, by cell index: the text and the images that have loaded.
_RENDERED_OUTPUTS_JS = """(indices) => indices.map(i => {
  const cell = window.__sdlearnPanel.content.widgets[i];
  const outputs = cell.node.querySelectorAll('.jp-OutputArea-output');
  const images = [...cell.node.querySelectorAll('.jp-OutputArea-output img')];
  return {rendered: outputs.length, text: [...outputs].map(o => o.textContent).join('\\n'),
          loaded_images: images.filter(img => img.complete && img.naturalWidth > 0).length};
})"""

# Errors the kernel reports after this point (a widget callback that raised), collected in the page.
_LISTEN_JS = """() => {
  window.__sdlearnKernelErrors = [];
  window.__sdlearnPanel.sessionContext.session.kernel.iopubMessage.connect((_, msg) => {
    if (msg.header.msg_type === 'error') {
      window.__sdlearnKernelErrors.push({error: msg.content.ename + ': ' + msg.content.evalue,
                                         traceback: msg.content.traceback.join('\\n')});
    }
  });
}"""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colours in IPython's tracebacks


class KernelError(AssertionError):
    """The kernel reported an error while the test waited for a widget to answer."""


# Where each front-end opens a notebook: JupyterLab, and Jupyter Notebook 7 (served by the same server).
UI_URLS = {"lab": "/lab/tree/{path}?reset&token={token}", "notebook7": "/notebooks/{path}?token={token}"}


@dataclass
class NotebookPage:
    """``path`` (relative to the server's root) open in a fresh page of ``browser``, in JupyterLab (``ui="lab"``)
    or in Jupyter Notebook 7 (``ui="notebook7"``)."""

    lab: object
    browser: object
    path: str
    ui: str = "lab"
    console_errors: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.context = self.browser.new_context(viewport={"width": 1500, "height": 1100})
        self.page = self.context.new_page()
        self.page.set_default_timeout(WAIT_S * 1000)
        self.page.on("console", self._on_console)
        self.page.on("pageerror", self._on_page_error)
        self._log_seen = len(self.lab.log_path.read_bytes())
        self.page.goto(self.lab.url + UI_URLS[self.ui].format(path=self.path, token=self.lab.token))
        self.page.wait_for_function("window.jupyterapp !== undefined")
        assert self.page.evaluate(_OPEN_JS, self.path), f"JupyterLab did not open {self.path}"

    def _on_page_error(self, error) -> None:
        self.console.append(f"uncaught: {error}")
        self.console_errors.append(f"uncaught: {error}")

    def _on_console(self, message) -> None:
        self.console.append(f"{message.type}: {message.text}")
        if message.type == "error":
            self.console_errors.append(message.text)

    # -- the notebook ------------------------------------------------------------------------------------
    def model(self) -> dict:
        """The notebook as JupyterLab holds it now (nbformat JSON, outputs included)."""
        return self.page.evaluate(_MODEL_JS)

    def widget_cells(self) -> list[int]:
        """Indices of the cells whose outputs hold a widget view."""
        return [i for i, cell in enumerate(self.model()["cells"])
                if any(WIDGET_VIEW in output.get("data", {}) for output in cell.get("outputs", []))]

    def rendered_outputs(self, indices: list[int]) -> list[dict]:
        return self.page.evaluate(_RENDERED_OUTPUTS_JS, indices)

    def run_all(self, timeout_s: float = RUN_ALL_TIMEOUT_S) -> float:
        """Run All, as a learner would; wait until no cell is left queued or running and the kernel is idle
        (twice in a row, 0.5 s apart; for 5 s while a code cell has not run, since on a busy machine the page
        can take a moment to send the next cell). Returns the seconds it took."""
        start = time.monotonic()
        result = self.page.evaluate(_RUN_ALL_JS, int(timeout_s * 1000))
        assert result != "timed out", f"Run All of {self.path} did not finish within {timeout_s:.0f} s"
        left = timeout_s - (time.monotonic() - start)
        idle_s = 0.0
        while True:
            self.wait_until(lambda: self.page.evaluate(_ALL_DONE_JS), "every cell to finish", timeout_s=max(left, 1))
            self.page.wait_for_timeout(500)
            idle_s = idle_s + 0.5 if self.page.evaluate(_ALL_DONE_JS) else 0.0
            if idle_s >= (5.0 if self.page.evaluate(_NOT_RUN_JS) else 0.5):
                break
        self.page.evaluate(_LISTEN_JS)
        return time.monotonic() - start

    # -- waiting for the kernel to answer -----------------------------------------------------------------
    def raise_kernel_errors(self) -> None:
        """Fail at once if the kernel reported an error (iopub) or wrote a traceback to its log (an exception
        in a widget's observer is logged by the kernel, not sent to the page)."""
        errors = [f"{e['error']}\n{_ANSI.sub('', e['traceback'])[-2000:]}"
                  for e in self.page.evaluate("() => window.__sdlearnKernelErrors || []")]
        log = self.lab.log_path.read_bytes()
        new_log, self._log_seen = log[self._log_seen:].decode(errors="replace"), len(log)
        if "Traceback (most recent call last)" in new_log:
            errors.append(new_log[new_log.index("Traceback (most recent call last)"):][-2000:])
        if errors:
            raise KernelError("the kernel reported an error:\n" + "\n\n".join(errors))

    def wait_until_idle(self, what: str, gap_ms: int = 300) -> None:
        """Wait until no cell runs and the kernel is idle at two looks ``gap_ms`` apart."""
        def idle_twice() -> bool:
            if not self.page.evaluate(_ALL_DONE_JS):
                return False
            self.page.wait_for_timeout(gap_ms)
            return self.page.evaluate(_ALL_DONE_JS)

        self.wait_until(idle_twice, what)

    def wait_until(self, condition, what: str, timeout_s: float = WAIT_S):
        """Poll ``condition()`` until it returns something truthy (returned), failing fast on a kernel error."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = condition()
            if value:
                return value
            self.raise_kernel_errors()
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            self.page.wait_for_timeout(100)

    # -- failures -----------------------------------------------------------------------------------------
    def save_artifacts(self, stem: Path) -> None:
        Path(f"{stem}.console.txt").write_text("\n".join(self.console))
        self.page.screenshot(path=f"{stem}.png", full_page=True)
        try:
            Path(f"{stem}.notebook.json").write_text(json.dumps(self.model(), indent=1)[:5_000_000])
        except Exception:  # the page may be gone; the screenshot and console are what matter most
            pass

    def close(self) -> None:
        self.context.close()


class NotebookOpener:
    """``open(path)`` opens a notebook of the server in a new page; every page is closed, and every kernel shut
    down, when the test ends (after a failed test has saved its artefacts)."""

    def __init__(self, lab, browser):
        self.lab, self.browser, self.pages = lab, browser, []

    def open(self, path: str, ui: str = "lab"):
        page = NotebookPage(self.lab, self.browser, path, ui)
        self.pages.append(page)
        return page

    def save_artifacts(self, stem: Path) -> None:
        for page in self.pages:
            page.save_artifacts(stem)

    def close(self) -> None:
        for page in self.pages:
            page.close()
        self.pages.clear()
        self.lab.shut_down_kernels()


def picture_pixels(locator) -> np.ndarray:
    """What an element shows on screen, as an ``[H, W, 3]`` uint8 array (from a screenshot of it)."""
    return np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("RGB"))


def same_picture(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a, b)


def explorer_names() -> list[str]:
    """The public classes and functions of ``sdlearn.widgets``: the explorers and the functions that make them."""
    import sdlearn.widgets

    return sorted(name for name, obj in vars(sdlearn.widgets).items()
                  if not name.startswith("_") and callable(obj) and getattr(obj, "__module__", "") == "sdlearn.widgets")


def notebooks_with_explorers(folder: Path) -> list[str]:
    """The names of the notebooks in ``folder`` whose code calls one of the explorers (a text search)."""
    import re

    import nbformat

    pattern = re.compile(r"\b(" + "|".join(map(re.escape, explorer_names())) + r")\s*\(")
    return sorted(path.name for path in folder.glob("[0-9][0-9]_*.ipynb")
                  if any(cell.cell_type == "code" and pattern.search(cell.source)
                         for cell in nbformat.read(path, as_version=4).cells))
