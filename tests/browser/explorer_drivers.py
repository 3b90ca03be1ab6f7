"""How to drive each explorer in a browser: its controls by keyboard, mouse and typing, and what to check after each.

``DRIVERS`` maps an explorer's CSS class (``sdlearn-<kind>``, set by :mod:`sdlearn.widgets`) to a function
``drive(explorer, notebook_name)``; a new explorer needs one here, or the browser tests fail on it.
"""

from __future__ import annotations

import math
import re

from notebook_page import picture_pixels, same_picture

from sdlearn.schedules import NoiseSchedule


class Explorer:
    """One explorer on the page: its parts by name (``part("t_slider")``), its readout, its picture."""

    def __init__(self, notebook, locator):
        self.notebook, self.page, self.locator = notebook, notebook.page, locator
        self.picture = locator.locator(".sdlearn-picture")
        self.last_src = self.picture.get_attribute("src")
        self.last_pixels = picture_pixels(self.picture)

    def part(self, name: str):
        return self.locator.locator(f".sdlearn-{name}")

    def readout(self) -> str:
        return " ".join(self.part("readout").text_content().split())

    def slider_readout(self, name: str) -> str:
        return self.part(name).locator(".widget-readout").text_content().strip()

    def wait_for_readout(self, pattern: str, what: str) -> re.Match:
        return self.notebook.wait_until(lambda: re.search(pattern, self.readout()), f"{what} (readout /{pattern}/)")

    def assert_picture_changed(self, what: str) -> None:
        """Wait for a new picture (a new image source) and check that what is on screen differs from before."""
        self.notebook.wait_until(lambda: self.picture.get_attribute("src") != self.last_src,
                                 f"a new picture after {what}")
        self.page.wait_for_timeout(200)  # let it load
        pixels = picture_pixels(self.picture)
        assert not same_picture(pixels, self.last_pixels), f"the picture did not change after {what}"
        self.last_src, self.last_pixels = self.picture.get_attribute("src"), pixels

    def keys(self, slider: str, *keys: str) -> None:
        """Focus a slider's handle and press keys (ArrowLeft/Right: one step, PageUp/Down, Home, End)."""
        handle = self.part(slider).locator(".noUi-handle")
        handle.focus()
        for key in keys:
            handle.press(key)
        self.settle()

    def drag(self, slider: str, fraction: float) -> None:
        """Drag a slider's handle with the mouse to ``fraction`` of its track."""
        track = self.part(slider).locator(".noUi-base").bounding_box()
        handle = self.part(slider).locator(".noUi-handle")
        handle.scroll_into_view_if_needed()
        box = handle.bounding_box()
        self.page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        self.page.mouse.down()
        target_y = track["y"] + track["height"] / 2
        self.page.mouse.move(track["x"] + fraction * track["width"], target_y, steps=8)
        self.page.mouse.up()
        self.settle()

    def settle(self) -> None:
        """Wait until the kernel is idle. A slider sends its value while the kernel is busy only once the kernel
        goes idle (ipywidgets buffers it), while a button's click goes at once, so a click right after a drag can
        reach the kernel before the drag's last value."""
        self.notebook.wait_until_idle("the kernel to go idle after moving a slider")

    def enter(self, part: str, text: str) -> None:
        """Type into a text box and press Enter (a number box sends its value on Enter)."""
        box = self.part(part).locator("input")
        box.fill(text)
        box.press("Enter")


def numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:e[+-]?\d+)?|inf", text)]


# The schedule each notebook's forward-noising explorer shows, where the test knows it (else: consistency only).
FORWARD_NOISING_SCHEDULES = {"01_forward_noising.ipynb": NoiseSchedule.from_name("scaled_linear")}


def drive_forward_noising(e: Explorer, notebook_name: str) -> None:
    schedule = FORWARD_NOISING_SCHEDULES.get(notebook_name)

    def check_readout(t: int) -> None:
        m = e.wait_for_readout(rf"^t = {t} ", f"the readout of t = {t}")
        assert e.slider_readout("t_slider") == str(t)
        a, signal, noise, snr = _forward_values(m.string)
        assert math.isclose(signal, math.sqrt(a), abs_tol=2e-3) and math.isclose(noise, math.sqrt(1 - a), abs_tol=2e-3)
        assert math.isclose(snr, a / (1 - a), rel_tol=2e-2, abs_tol=1e-3), m.string
        if schedule is not None:
            assert math.isclose(a, schedule.alphas_cumprod[t].item(), abs_tol=1e-4), (t, a)

    start = int(e.slider_readout("t_slider"))
    check_readout(start)
    e.keys("t_slider", "End")  # keyboard: to the last step
    check_readout(int(e.part("t_slider").locator(".noUi-handle").get_attribute("aria-valuemax").split(".")[0]))
    e.assert_picture_changed("End on the t slider")
    last = int(e.slider_readout("t_slider"))
    # keyboard: two single steps back. (Notebook 7 binds ← and → to moving between headings before a slider sees
    # them; there PageDown, five steps, is the key that works.)
    keys, back = (("ArrowLeft", "ArrowLeft"), 2) if e.notebook.ui == "lab" else (("PageDown",), 5)
    e.keys("t_slider", *keys)
    check_readout(last - back)
    e.assert_picture_changed(f"{'+'.join(keys)} on the t slider")
    e.drag("t_slider", 0.25)  # mouse: to about a quarter
    t = int(e.notebook.wait_until(lambda: e.slider_readout("t_slider") != str(last - back)
                                  and e.slider_readout("t_slider"), "the t slider to move"))
    assert 0.1 * last < t < 0.4 * last, t
    check_readout(t)
    e.assert_picture_changed("dragging the t slider")
    e.part("new_noise_button").click()  # another ε: same t, another picture
    e.assert_picture_changed("New noise ε")
    check_readout(t)


def _forward_values(readout: str) -> tuple[float, float, float, float]:
    """ᾱ_t, √ᾱ_t, √(1−ᾱ_t) and SNR from "t = … · ᾱt = a · signal √ᾱt = s · noise √(1−ᾱt) = n · SNR = r"."""
    values = [numbers(part.rsplit("=", 1)[1])[0] for part in readout.split("·")[1:5]]
    return tuple(values)


def drive_schedule_explorer(e: Explorer, notebook_name: str) -> None:
    def schedule_in_readout() -> tuple[int, float, float]:
        m = e.wait_for_readout(r"NoiseSchedule\(T=(\d+), beta ([\d.e-]+) → ([\d.e-]+)", "a schedule")
        return int(m[1]), float(m[2]), float(m[3])

    T, start, end = schedule_in_readout()
    assert T == int(e.part("num_steps").locator("input").input_value())
    assert math.isclose(start, float(e.slider_readout("beta_start")), rel_tol=0.05)

    e.part("name").locator("select").select_option("linear")  # dropdown: the β range resets to linear's
    e.wait_for_readout(r"beta 0\.0001\d* → 0\.02\b", "the linear schedule")
    assert (float(e.slider_readout("beta_start")), float(e.slider_readout("beta_end"))) == (1e-4, 0.02)
    assert "No problems found" in e.readout()
    e.assert_picture_changed("choosing the linear schedule")

    e.keys("beta_end", "End")  # keyboard: β end to 1, ᾱ ≈ 0 long before T/2
    e.wait_for_readout(r"→ 1\b.*falls below 0\.0001 already at t=\d+, before T/2", "the warning that ᾱ ≈ 0 early")
    assert float(e.slider_readout("beta_end")) == 1
    e.assert_picture_changed("End on β end")

    e.part("zero_terminal_snr").locator("input").click()  # zero-terminal SNR cannot rescale it: said, plots greyed
    e.wait_for_readout(r"Cannot build this schedule: zero terminal SNR cannot rescale this schedule", "the refusal")
    assert "0 (0/0)" in e.readout() and "NoiseSchedule(" not in e.readout()
    e.assert_picture_changed("ticking zero terminal SNR")
    grey = (abs(e.last_pixels.astype(int) - 217) <= 2).all(axis=-1).mean()  # the five images greyed (0.85 × 255)
    assert grey > 0.05, f"the picture beside the error is not greyed out ({grey:.3f} of it grey)"

    e.drag("beta_end", 0.55)  # mouse: β end back down to about 10^-2.25, where the rescaling works
    m = e.wait_for_readout(r"NoiseSchedule\(T=\d+, beta [\d.e-]+ → 1, ᾱ_T=0\)", "a zero-terminal-SNR schedule")
    assert "Cannot build" not in m.string
    e.assert_picture_changed("dragging β end")

    e.enter("num_steps", "100")  # a number box
    e.wait_for_readout(r"NoiseSchedule\(T=100,", "T = 100")
    e.assert_picture_changed("T = 100")

    e.part("name").locator("select").select_option("cosine")  # cosine has no β range: the sliders grey out
    e.wait_for_readout(r"NoiseSchedule\(T=100,", "the cosine schedule")
    e.notebook.wait_until(lambda: e.part("beta_start").locator(".noUi-target").get_attribute("disabled") is not None,
                          "the β sliders to be disabled")
    e.assert_picture_changed("choosing the cosine schedule")


def drive_sampler_scrubber(e: Explorer, notebook_name: str) -> None:
    def check_evaluation(k: int | None) -> int:
        """The readout at evaluation k (1-based; None: the finished sample); returns the number of evaluations."""
        sampler, steps = e.part("sampler").locator("select").input_value(), e.part("steps").locator("input").input_value()
        if k is None:
            m = e.wait_for_readout(rf"^{re.escape(sampler)}, {steps} steps: the finished sample after (\d+) model evaluations",
                                   "the finished sample")
            return int(m[1])
        m = e.wait_for_readout(rf"^{re.escape(sampler)}, {steps} steps: model evaluation {k} of (\d+) · t = ", f"evaluation {k}")
        assert e.slider_readout("step") == str(k - 1)
        a, noise = (numbers(part.rsplit("=", 1)[1])[0] for part in m.string.split("·")[2:4])
        assert 0 <= a <= 1 and math.isclose(noise, math.sqrt(1 - a), abs_tol=2e-3), m.string
        return int(m[1])

    n = check_evaluation(1)
    e.keys("step", "End")  # keyboard: to the finished sample
    assert check_evaluation(None) == n
    e.assert_picture_changed("End on the evaluation slider")
    e.keys("step", "ArrowLeft")
    check_evaluation(n)
    e.assert_picture_changed("ArrowLeft on the evaluation slider")
    e.drag("step", 0.5)  # mouse: to the middle of the run
    k = int(e.notebook.wait_until(lambda: e.slider_readout("step") != str(n - 1) and e.slider_readout("step"),
                                  "the evaluation slider to move")) + 1
    assert 0.2 * n < k < 0.8 * n, (k, n)
    check_evaluation(k)
    e.assert_picture_changed("dragging the evaluation slider")

    e.keys("step", "End")
    check_evaluation(None)
    e.assert_picture_changed("End again")
    other = "ddim" if e.part("sampler").locator("select").input_value() != "ddim" else "euler"
    e.part("sampler").locator("select").select_option(other)  # dropdown: another sampler from the same noise
    check_evaluation(None)
    e.assert_picture_changed(f"switching the sampler to {other}")
    e.enter("steps", "4")  # a number box: a 4-step run
    m = check_evaluation(None)
    assert m < n
    e.assert_picture_changed("4 steps")


def drive_prompt_playground(e: Explorer, notebook_name: str) -> None:
    def generate(what: str) -> str:
        before = e.readout()
        e.part("generate_button").click()
        e.notebook.wait_until(lambda: e.readout() != before and "image" in e.readout(), f"Generate after {what}")
        e.assert_picture_changed(f"Generate after {what}")
        return e.readout()

    e.wait_for_readout(r"^\d+ images? of ", "the first images")
    prompt = "a small green square in the bottom right"
    e.part("prompt").locator("input").fill(prompt)  # type a prompt; nothing runs until Generate
    readout = generate("typing a prompt")
    assert readout.startswith(f"{e.slider_readout('num_images_per_prompt')} images of {prompt} ·"), readout

    e.keys("num_images_per_prompt", "Home", "ArrowRight")  # keyboard: 2 images
    e.keys("steps", "Home")  # keyboard: 1 step
    e.drag("guidance", 0.0)  # mouse: guidance to 0
    assert float(e.slider_readout("guidance")) == 0
    readout = generate("moving three sliders")
    assert readout.startswith(f"2 images of {prompt} · 1 steps of "), readout
    assert "guidance w = 0 ·" in readout, readout

    e.keys("steps", "End", *["ArrowLeft"] * 90)  # 10 steps
    e.drag("guidance", 0.35)  # mouse: about 4
    w = float(e.slider_readout("guidance"))
    assert 2.5 <= w <= 5.5, w
    e.part("sampler").locator("select").select_option("ddim")  # dropdown
    e.enter("seed", "7")
    readout = generate("a new sampler, seed and guidance")
    assert f" · 10 steps of ddim · guidance w = {w:g} · seed 7 · " in readout, readout

    long_prompt = " and ".join(["a large red circle in the top left", "a small blue square in the bottom right"] * 3)
    e.part("prompt").locator("input").fill(long_prompt)
    readout = generate("a long prompt")
    assert readout.count(long_prompt) == 1, f"the long prompt is printed {readout.count(long_prompt)} times: {readout}"
    assert "⚠" in readout  # its warnings (too many objects, too long) are still said


DRIVERS = {
    "sdlearn-forward-noising-explorer": drive_forward_noising,
    "sdlearn-schedule-explorer": drive_schedule_explorer,
    "sdlearn-sampler-scrubber": drive_sampler_scrubber,
    "sdlearn-prompt-playground": drive_prompt_playground,
}


def drive_every_explorer(notebook) -> int:
    """Drive every explorer on the page; then no kernel error, no widget error, no console error. Returns
    how many explorers were driven."""
    explorers = notebook.page.locator(".sdlearn-explorer")
    notebook.wait_until(lambda: explorers.count() > 0, "an explorer to render")
    for k in range(explorers.count()):
        explorer = explorers.nth(k)
        kinds = [c for c in (explorer.get_attribute("class") or "").split() if c in DRIVERS]
        assert kinds, f"no browser test drives this explorer: {explorer.get_attribute('class')}; add one to DRIVERS"
        DRIVERS[kinds[0]](Explorer(notebook, explorer), notebook.name)
    notebook.raise_kernel_errors()
    assert notebook.page.get_by_text("Error displaying widget").count() == 0
    assert notebook.console_errors == []
    return explorers.count()
