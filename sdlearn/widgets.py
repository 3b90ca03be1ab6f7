"""Interactive explorers for the notebooks (ipywidgets + matplotlib).

Each explorer is an ``ipywidgets.VBox``: put it last in a cell to display it. Its figure is drawn
off-screen with matplotlib's Agg renderer and shown as a PNG in an ``ipywidgets.Image``, so it
works with any matplotlib backend and needs no ``%matplotlib widget``. Moving a control calls
``.update()``, which redraws; tests (and curious learners) can set a control's ``.value`` or call
``.update()`` themselves and read the result from attributes such as ``.x_t`` or ``.schedule``.

**A picture before running.** An explorer's display bundle holds, beside the live widget view, a PNG of
the picture it shows when displayed (its first frame) and one line of plain text. Where the widget cannot
run — a notebook not yet trusted or run in JupyterLab or Notebook 7, ``nbconvert --to html``, a notebook
viewer or a code host — front-ends fall back on the PNG: JupyterLab renders only "safe" types (the PNG) in an
untrusted notebook, and nbconvert skips a widget view whose state the notebook does not store (``make
notebooks`` stores none). Where a kernel runs the cell, the live widget wins (its renderer ranks first). One
case is left to JupyterLab: a notebook that has been *trusted* but not run shows "Error displaying widget:
model not found" until its cell runs (a trusted widget view is rendered even without its model); a fresh
clone is not trusted, so it shows the pictures. (Storing widget state would fix that case but leave an empty
box wherever JavaScript does not run, as in nbconvert's HTML viewed offline.)

Under nbval, a cell that displays an explorer needs no ignore marker: nbval skips the widget view (whose
model id changes on every run) and the PNG, and the plain-text line is the same on every run.

Every explorer's element carries the CSS classes ``sdlearn-explorer`` and ``sdlearn-<kind>`` (e.g.
``sdlearn-forward-noising-explorer``), and each control, its readout and its picture ``sdlearn-<attribute>``
(``sdlearn-t_slider``, ``sdlearn-readout``, ``sdlearn-picture``), so that a browser test can find them.
"""

from __future__ import annotations

import base64
import html
import io
import textwrap
import time
import warnings

import ipywidgets as widgets
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sdlearn.checks import warn_deprecated
from sdlearn.data import load_photo
from sdlearn.plotting import to_image
from sdlearn.pretrained import load_pipeline
from sdlearn.samplers import SAMPLER_NAMES, alpha_bar_at, get_sampler, sample
from sdlearn.schedules import (
    DEFAULT_BETA_RANGE,
    SCHEDULE_NAMES,
    NoiseSchedule,
    make_betas,
    rescale_zero_terminal_snr,
)

_PHOTO_SIZE = 96  # the default picture: the bundled photograph, resized to 96×96


def _default_image() -> torch.Tensor:
    return load_photo(_PHOTO_SIZE)


def _check_image(image) -> torch.Tensor:
    image = _default_image() if image is None else torch.as_tensor(image)
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected one image of shape [3, H, W] in [-1, 1], got shape {list(image.shape)}")
    return image.detach().to("cpu", torch.float32)


def _png(fig: Figure) -> bytes:
    """Render a figure to PNG bytes with the Agg renderer (no pyplot, no display, nothing to close)."""
    buffer = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()


class _Explorer(widgets.VBox):
    """What every explorer shares: CSS classes a browser test can find, and a display bundle that carries a
    PNG of the picture on show and one line of text beside the widget view (see the module docstring)."""

    SUMMARY = "an interactive explorer"  # the plain-text line says what it is; each explorer says more

    def _tag(self, kind: str, **parts: widgets.DOMWidget) -> None:
        self.add_class("sdlearn-explorer")
        self.add_class(f"sdlearn-{kind}")
        for name, part in parts.items():
            part.add_class(f"sdlearn-{name}")

    def _repr_mimebundle_(self, **kwargs):
        bundle = super()._repr_mimebundle_(**kwargs)
        if bundle is None:  # (ipywidgets returns nothing for a widget without a view)
            return None
        bundle["text/plain"] = f"{type(self).__name__}: {self.SUMMARY} (run the notebook to use its controls)"
        png = bytes(self.picture.value)
        if png:
            bundle["image/png"] = base64.b64encode(png).decode("ascii")
        return bundle


class ForwardNoisingExplorer(_Explorer):
    """A t slider over x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε: the noised image, its pixel histogram against
    N(0, 1), and where t sits on the √ᾱ_t / √(1−ᾱ_t) curves. "New noise" draws another ε.

    Attributes: ``t_slider``, ``new_noise_button``, ``readout`` (an HTML line with ᾱ_t, the signal
    and noise scales and the SNR), ``picture`` (the ``ipywidgets.Image`` showing ``figure``),
    ``schedule``, ``x0``, ``noise`` and ``x_t`` (the tensors behind the current picture).
    """

    SUMMARY = "a t slider over the forward process x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε"

    def __init__(self, image=None, schedule: NoiseSchedule | str | None = None, seed: int = 0, t: int | None = None):
        if schedule is None or isinstance(schedule, str):
            schedule = NoiseSchedule.from_name(schedule or "scaled_linear")
        if not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"schedule must be a NoiseSchedule or a schedule name, got {type(schedule).__name__}")
        self.schedule = schedule
        self.x0 = _check_image(image)  # [3, H, W]
        self.seed = seed
        self.noise = torch.randn(self.x0.shape, generator=torch.Generator().manual_seed(seed))
        T = len(schedule)
        self.t_slider = widgets.IntSlider(value=T // 2 if t is None else t, min=0, max=T - 1, description="t",
                                          continuous_update=True, layout=widgets.Layout(width="60%"))
        self.new_noise_button = widgets.Button(description="New noise ε", tooltip="draw a different ε")
        self.readout = widgets.HTML()
        self.picture = widgets.Image(format="png")
        super().__init__([widgets.HBox([self.t_slider, self.new_noise_button]), self.readout, self.picture])
        self._tag("forward-noising-explorer", t_slider=self.t_slider, new_noise_button=self.new_noise_button,
                  readout=self.readout, picture=self.picture)

        self._build_figure()
        self.t_slider.observe(lambda change: self.update(), names="value")
        self.new_noise_button.on_click(lambda _: self.resample_noise())
        self.update()

    _BINS = np.linspace(-4, 4, 81)

    def _build_figure(self) -> None:
        """Lay the figure out once; :meth:`update` then only changes the image, the bars and the marker."""
        self.figure = fig = Figure(figsize=(11, 3.2))
        ax_img, ax_hist, ax_curve = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1.3, 1.3]})
        self._image = ax_img.imshow(to_image(self.x0), interpolation="nearest")
        self._image_title = ax_img.set_title("x_t", fontsize=9)
        ax_img.axis("off")

        bins = self._BINS
        ax_hist.hist(self.x0.flatten().numpy(), bins=bins, density=True, alpha=0.35, color="gray", label="x₀ pixels")
        self._bars = ax_hist.bar(bins[:-1], np.zeros(len(bins) - 1), width=np.diff(bins), align="edge",
                                 alpha=0.6, color="C0", label="x_t pixels")
        z = np.linspace(-4, 4, 200)
        ax_hist.plot(z, np.exp(-z**2 / 2) / np.sqrt(2 * np.pi), color="C3", label="N(0, 1)")
        ax_hist.set_title("pixel values: x_t drifts to N(0, 1)", fontsize=9)
        ax_hist.legend(fontsize=7, loc="upper right")
        self._hist_axes = ax_hist

        steps = np.arange(len(self.schedule))
        abar = self.schedule.alphas_cumprod.double().numpy()
        ax_curve.plot(steps, np.sqrt(abar), label="√ᾱ_t (signal)")
        ax_curve.plot(steps, np.sqrt(1 - abar), label="√(1−ᾱ_t) (noise)")
        self._marker = ax_curve.axvline(0, color="k", linewidth=1)
        ax_curve.set_xlabel("t")
        ax_curve.set_title("how much signal and noise x_t holds", fontsize=9)
        ax_curve.legend(fontsize=7)
        fig.tight_layout()

    def resample_noise(self) -> None:
        """Draw a new ε (the next seed) and redraw."""
        self.seed += 1
        self.noise = torch.randn(self.x0.shape, generator=torch.Generator().manual_seed(self.seed))
        self.update()

    def update(self) -> None:
        """Recompute x_t for the slider's t and redraw the picture and the readout."""
        t = self.t_slider.value
        a = self.schedule.alphas_cumprod[t].item()
        self.x_t = self.schedule.add_noise(self.x0, self.noise, t)  # [3, H, W]
        snr = a / (1 - a) if a < 1 else float("inf")
        self.readout.value = (
            f"t = {t} &nbsp;·&nbsp; ᾱ<sub>t</sub> = {a:.4f} &nbsp;·&nbsp; signal √ᾱ<sub>t</sub> = {a**0.5:.3f}"
            f" &nbsp;·&nbsp; noise √(1−ᾱ<sub>t</sub>) = {(1 - a) ** 0.5:.3f} &nbsp;·&nbsp; SNR = {snr:.3g}"
        )
        self._image.set_data(to_image(self.x_t))
        self._image_title.set_text(f"x_t at t = {t} (clipped to [-1, 1])")
        density, _ = np.histogram(self.x_t.flatten().numpy(), bins=self._BINS, density=True)
        for bar, height in zip(self._bars, density):
            bar.set_height(height)
        self._hist_axes.set_ylim(0, 1.15 * max(0.45, density.max()))
        self._marker.set_xdata([t, t])
        self.picture.value = _png(self.figure)


def forward_noising_explorer(image=None, schedule: NoiseSchedule | str | None = None, seed: int = 0) -> ForwardNoisingExplorer:
    """A t slider over the forward process of ``image`` (default: the bundled photo) under ``schedule``
    (a :class:`NoiseSchedule` or a name; default Stable Diffusion's scaled-linear), with ε drawn from ``seed``."""
    return ForwardNoisingExplorer(image, schedule, seed)


def _check_rescalable(betas: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the cause if zero-terminal SNR (Lin et al. 2023, Algorithm 1) cannot rescale
    ``betas``: the rescaling recovers α_t = ᾱ_t / ᾱ_{t−1}, which is 0/0 once ᾱ is 0 before the last step,
    because a β is 1 or because the product ∏(1 − β) underflows float32 (below about 1e-45)."""
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # [T], in betas' dtype, as the rescaling computes it
    zero = (alphas_cumprod[:-1] == 0).nonzero()
    if not len(zero):
        return
    k, T = int(zero[0]), len(betas)
    if (betas[: k + 1] >= 1).any():
        j = int((betas[: k + 1] >= 1).nonzero()[0])
        cause = f"β = 1 at t = {j} wipes the image out, so ᾱ is 0 from t = {j} on"
    else:
        cause = (f"ᾱ underflows to 0 in {str(betas.dtype).removeprefix('torch.')} at t = {k} (it falls below the "
                 f"smallest number a {str(betas.dtype).removeprefix('torch.')} holds)")
    raise ValueError(f"zero terminal SNR cannot rescale this schedule: {cause}, before the last step t = {T - 1}, and "
                     "the rescaling divides ᾱ_t by ᾱ_(t−1) = 0 (0/0). Lower β end or T, or untick zero terminal SNR.")


class ScheduleExplorer(_Explorer):
    """Choose a schedule (name, T, β range, zero-terminal SNR) and see ᾱ_t, log-SNR and the same image
    noised at t = 0, T/4, T/2, 3T/4 and T−1, with Stable Diffusion's schedule dashed for comparison.

    Controls: ``name``, ``num_steps``, ``beta_start``, ``beta_end``, ``zero_terminal_snr``; choosing a
    name resets the β range to that schedule's defaults (cosine has none: its sliders are greyed). The current
    :class:`NoiseSchedule` is ``.schedule``; ``.problems`` lists what is wrong with it in plain words
    (see :meth:`NoiseSchedule.problems`), also shown under the controls. Settings that cannot make a
    schedule at all (zero-terminal SNR of a schedule whose ᾱ is already 0 before its last step: the rescaling
    divides 0 by 0) leave ``.schedule`` (and ``.x_t``) None, say why in ``.readout`` and ``.problems`` instead
    of raising, and grey the picture out, so that no plot of an earlier schedule stays on show beside the error.
    """

    FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
    SUMMARY = "choose a noise schedule and see ᾱ_t, log-SNR and an image noised at five timesteps"

    def __init__(self, image=None, seed: int = 0):
        self.x0 = _check_image(image)  # [3, H, W]
        self.noise = torch.randn(self.x0.shape, generator=torch.Generator().manual_seed(seed))
        style = {"description_width": "90px"}
        self.name = widgets.Dropdown(options=list(SCHEDULE_NAMES), value="scaled_linear", description="schedule", style=style)
        self.num_steps = widgets.BoundedIntText(value=1000, min=2, max=5000, description="T", style=style)
        self.beta_start = widgets.FloatLogSlider(value=0.00085, base=10, min=-5, max=0, step=0.05, readout_format=".2g",
                                                 description="β start", continuous_update=False, style=style)
        self.beta_end = widgets.FloatLogSlider(value=0.012, base=10, min=-5, max=0, step=0.05, readout_format=".2g",
                                               description="β end", continuous_update=False, style=style)
        self.zero_terminal_snr = widgets.Checkbox(value=False, description="zero terminal SNR (Lin et al. 2023)")
        self.readout = widgets.HTML()
        self.picture = widgets.Image(format="png")
        controls = widgets.HBox([
            widgets.VBox([self.name, self.num_steps]),
            widgets.VBox([self.beta_start, self.beta_end]),
            self.zero_terminal_snr,
        ])
        super().__init__([controls, self.readout, self.picture])
        self._tag("schedule-explorer", name=self.name, num_steps=self.num_steps, beta_start=self.beta_start,
                  beta_end=self.beta_end, zero_terminal_snr=self.zero_terminal_snr, readout=self.readout,
                  picture=self.picture)
        self.schedule: NoiseSchedule | None = None
        self.problems: list[str] = []
        self.figure: Figure | None = None
        self._quiet = False  # True while the β sliders are reset, so that they trigger no redraw
        self.name.observe(self._on_name, names="value")
        for control in (self.num_steps, self.beta_start, self.beta_end, self.zero_terminal_snr):
            control.observe(lambda change: self._quiet or self.update(), names="value")
        self.update()

    def _on_name(self, change) -> None:
        """A new schedule name resets the β sliders to that schedule's defaults, then redraws once."""
        start, end = DEFAULT_BETA_RANGE[change["new"]]
        if start is not None:
            self._quiet = True
            try:
                self.beta_start.value, self.beta_end.value = start, end
            finally:
                self._quiet = False
        self.update()

    def _make_schedule(self) -> NoiseSchedule:
        name, T = self.name.value, int(self.num_steps.value)
        betas = make_betas(name, T, beta_start=self.beta_start.value, beta_end=self.beta_end.value)
        if self.zero_terminal_snr.value:
            _check_rescalable(betas)
            betas = rescale_zero_terminal_snr(betas)
        return NoiseSchedule(betas)

    def update(self) -> None:
        """Rebuild the schedule from the controls and redraw."""
        cosine = self.name.value == "cosine"
        self.beta_start.disabled = self.beta_end.disabled = cosine  # the cosine schedule has no β range
        try:
            schedule = self._make_schedule()
        except ValueError as error:  # e.g. zero-terminal SNR of a schedule whose ᾱ is 0 before its last step (0/0)
            self.schedule, self.problems, self.x_t, self.timesteps = None, [str(error)], None, None
            self.readout.value = f"<b style='color:#b00'>Cannot build this schedule:</b> {html.escape(str(error))}"
            self._grey_out()
            return
        self.schedule = schedule
        self.problems = schedule.problems()
        T = len(schedule)
        summary = f"{schedule!r}"
        if self.problems:
            items = "".join(f"<li>{p}</li>" for p in self.problems)
            self.readout.value = f"{summary}<br><b style='color:#b00'>Problems:</b><ul>{items}</ul>"
        else:
            self.readout.value = f"{summary}<br><span style='color:#070'>No problems found.</span>"

        if self.figure is None:
            self._build_figure()
        self._no_schedule.set_visible(False)
        steps = np.arange(T)
        reference = NoiseSchedule.from_name("scaled_linear", num_train_timesteps=T)
        for k, s in enumerate((reference, schedule)):  # line 0: the reference, line 1: this schedule
            a = s.alphas_cumprod.double()
            self._abar_axes.lines[k].set_data(steps, a.numpy())
            self._snr_axes.lines[k].set_data(steps, (a.log() - (-a).log1p()).numpy())  # −inf at ᾱ = 0 is not drawn
        for ax in (self._abar_axes, self._snr_axes):
            ax.relim()
            ax.autoscale_view()

        t = torch.tensor([round(f * (T - 1)) for f in self.FRACTIONS])  # [5]
        x_t = schedule.add_noise(self.x0.expand(len(t), -1, -1, -1), self.noise.expand(len(t), -1, -1, -1), t)
        for artist, tk, image in zip(self._images, t.tolist(), x_t):
            artist.set_data(to_image(image))
            artist.axes.set_title(f"t={tk}, ᾱ={schedule.alphas_cumprod[tk].item():.3g}", fontsize=8)
        self.x_t = x_t  # [5, 3, H, W]
        self.timesteps = t
        self.picture.value = _png(self.figure)

    def _build_figure(self) -> None:
        """Lay the figure out once; :meth:`update` then only changes the lines, images and titles."""
        self.figure = fig = Figure(figsize=(11, 5.2))
        n = len(self.FRACTIONS)
        grid = fig.add_gridspec(2, n, height_ratios=[1.25, 1])
        self._abar_axes = fig.add_subplot(grid[0, : n // 2])
        self._snr_axes = fig.add_subplot(grid[0, n // 2 :])
        for ax, title in ((self._abar_axes, "ᾱ_t"), (self._snr_axes, "log-SNR_t = log(ᾱ_t / (1−ᾱ_t))")):
            ax.plot([], [], color="gray", linestyle="--", label="SD scaled-linear")
            ax.plot([], [], color="C0", label="this schedule")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("t")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        self._images = []
        for k in range(n):
            ax = fig.add_subplot(grid[1, k])
            self._images.append(ax.imshow(to_image(self.x0), interpolation="nearest"))
            ax.set_title("t", fontsize=8)
            ax.axis("off")
        fig.tight_layout()
        self._no_schedule = fig.text(0.5, 0.25, "no schedule: see the message above the picture", ha="center",
                                     va="center", fontsize=14, color="#b00", visible=False,
                                     bbox={"facecolor": "white", "edgecolor": "#b00"})

    def _grey_out(self) -> None:
        """Show that there is no schedule: empty this schedule's curves, grey the five images, say so."""
        if self.figure is None:
            self._build_figure()
        for ax in (self._abar_axes, self._snr_axes):
            ax.lines[1].set_data([], [])  # line 1: this schedule (line 0, the reference, stays for orientation)
            ax.relim()
            ax.autoscale_view()
        grey = np.full(to_image(self.x0).shape, 0.85)
        for artist in self._images:
            artist.set_data(grey)
            artist.axes.set_title("—", fontsize=8)
        self._no_schedule.set_visible(True)
        self.picture.value = _png(self.figure)


def schedule_explorer(image=None, seed: int = 0) -> ScheduleExplorer:
    """Explore noise schedules: name, T, β range and zero-terminal SNR → ᾱ_t, log-SNR and ``image``
    (default: the bundled photo) noised at five timesteps."""
    return ScheduleExplorer(image, seed)


# ---------------------------------------------------------------------------------------------------
# The sampler-step scrubber (notebooks 06 and 08)
# ---------------------------------------------------------------------------------------------------
class SamplerScrubber(_Explorer):
    """Run a sampler once and scrub through its model evaluations with a slider: at each one, the
    model's input x_t and the clean image x̂₀ it predicts there, and where the step sits on the noise
    level curve √(1 − ᾱ_t). The last position shows the finished sample.

    ``model_fn(x_t, t)`` is any model function that :func:`sdlearn.samplers.sample` accepts (a trained
    denoiser, or an exact analytic one). All samplers start from the same noise (drawn from ``seed``,
    or ``noise`` if given), so switching the ``sampler`` dropdown compares them on the same x_T; a
    stochastic sampler's extra noise comes from a generator seeded with ``seed`` too. ``decode`` maps a
    batch of states to images ``[B, 3, H, W]`` in [-1, 1] (a VAE's decoder for latents); without it the
    states must be images themselves. At most ``max_images`` of the batch are shown.

    Controls: ``sampler`` (dropdown of :data:`sdlearn.samplers.SAMPLER_NAMES`), ``steps`` (number of
    inference steps; changing either re-runs the sampler), ``step`` (the evaluation shown). After a
    run, ``frames`` holds one dict per model evaluation ``{"t", "x_t", "x0"}`` (float timestep, model
    input, predicted x̂₀; all of the batch) plus a final one with ``t`` None and the sample as both
    ``x_t`` and ``x0``; ``sample`` is the sampler's output, and ``x_t``/``x0`` are the frame on show.
    """

    SUMMARY = "a slider through one sampling run: x_t and the predicted x̂₀ at every model evaluation"

    def __init__(self, model_fn, schedule: NoiseSchedule, shape=None, *, noise: torch.Tensor | None = None,
                 sampler: str = "ddim", num_inference_steps: int = 20, seed: int = 0, spacing: str = "leading",
                 decode=None, max_images: int = 4):
        if not callable(model_fn):
            raise ValueError(f"model_fn must be a function model_fn(x_t, t) -> prediction, got {type(model_fn).__name__}")
        if not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        if sampler not in SAMPLER_NAMES:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLER_NAMES)}")
        if noise is None:
            if shape is None:
                raise ValueError("give the shape of the batch to sample, e.g. shape=(4, 3, 32, 32), or the starting noise")
            noise = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))
        elif shape is not None and tuple(shape) != tuple(noise.shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)} but shape={tuple(shape)}; give one or make them agree")
        if not isinstance(max_images, int) or max_images < 1:
            raise ValueError(f"max_images must be a positive whole number, got {max_images!r}")
        self.model_fn, self.schedule, self.seed, self.spacing = model_fn, schedule, seed, spacing
        self.noise = noise.detach().to("cpu", torch.float32)  # [B, ...], the shared x_T
        self.decode = decode if decode is not None else (lambda x: x)
        self.max_images = max_images

        self.sampler = widgets.Dropdown(options=list(SAMPLER_NAMES), value=sampler, description="sampler")
        self.steps = widgets.BoundedIntText(value=num_inference_steps, min=1, max=schedule.num_train_timesteps,
                                            description="steps")
        self.step = widgets.IntSlider(value=0, min=0, max=1, description="evaluation", continuous_update=True,
                                      layout=widgets.Layout(width="60%"))
        self.readout = widgets.HTML()
        self.picture = widgets.Image(format="png")
        super().__init__([widgets.HBox([self.sampler, self.steps]), self.step, self.readout, self.picture])
        self._tag("sampler-scrubber", sampler=self.sampler, steps=self.steps, step=self.step, readout=self.readout,
                  picture=self.picture)
        self.figure: Figure | None = None
        self._quiet = False
        self.sampler.observe(lambda change: self.run(), names="value")
        self.steps.observe(lambda change: self.run(), names="value")
        self.step.observe(lambda change: self._quiet or self.update(), names="value")
        self.run()

    def run(self) -> None:
        """Sample anew with the chosen sampler and number of steps, recording every model evaluation."""
        sampler = get_sampler(self.sampler.value, self.schedule)
        frames: list[dict] = []

        def recording_model(x_t, t):
            frames.append({"t": float(t), "x_t": x_t.detach().clone()})
            return self.model_fn(x_t, t)

        def record_x0(i, t, x, x0):
            frames[-1]["x0"] = x0.detach().clone()

        with torch.no_grad():
            self.sample = sample(recording_model, sampler, self.noise.shape, int(self.steps.value),
                                   generator=torch.Generator().manual_seed(self.seed), progress=False,
                                   callback=record_x0, spacing=self.spacing, noise=self.noise)
        frames.append({"t": None, "x_t": self.sample, "x0": self.sample})
        self.frames = frames
        self._images = {}  # frame index → (x_t images, x̂₀ images), decoded once
        alpha_bars = alpha_bar_at(self.schedule, torch.tensor([f["t"] for f in frames[:-1]]))  # [n] float64
        self._noise_levels = np.append((1 - alpha_bars).sqrt().numpy(), 0.0)  # [n + 1]
        self._build_figure()
        at_end = self.step.value == self.step.max
        self._quiet = True  # the slider changes below redraw nothing: update() follows once
        try:
            self.step.max = len(frames) - 1  # also clamps the value
            if at_end:
                self.step.value = self.step.max
        finally:
            self._quiet = False
        self.update()

    def _decoded(self, k: int):
        if k not in self._images:
            frame = self.frames[k]
            with torch.no_grad():
                pair = tuple(self.decode(frame[key][: self.max_images]) for key in ("x_t", "x0"))
            for images in pair:
                if images.dim() != 4 or images.shape[1] not in (1, 3):
                    raise ValueError(f"expected images of shape [B, 3, H, W] to show, got {list(images.shape)}; "
                                     "pass decode= to turn states (e.g. latents) into images")
            self._images[k] = pair
        return self._images[k]

    def _build_figure(self) -> None:
        n = min(self.max_images, self.noise.shape[0])
        self.figure = fig = Figure(figsize=(1.6 * n + 3.6, 3.6))
        grid = fig.add_gridspec(2, n + 1, width_ratios=[1] * n + [2.2])
        self._x_t_artists, self._x0_artists = [], []
        for row, artists, label in ((0, self._x_t_artists, "x_t (model input)"), (1, self._x0_artists, "predicted x̂₀")):
            for j in range(n):
                ax = fig.add_subplot(grid[row, j])
                artists.append(ax.imshow(np.zeros((2, 2, 3)), interpolation="nearest"))
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel(label, fontsize=8)
        ax = fig.add_subplot(grid[:, n])
        ax.plot(np.arange(len(self._noise_levels)), self._noise_levels, marker=".", color="C0")
        self._marker = ax.axvline(0, color="C3")
        ax.set_xlabel("model evaluation", fontsize=8)
        ax.set_title("noise level √(1−ᾱ_t)", fontsize=9)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        fig.tight_layout()

    def update(self) -> None:
        """Show the frame the ``step`` slider points at."""
        k = min(self.step.value, len(self.frames) - 1)
        frame = self.frames[k]
        self.x_t, self.x0 = frame["x_t"], frame["x0"]
        x_t_images, x0_images = self._decoded(k)
        for artist, image in zip(self._x_t_artists, x_t_images):
            artist.set_data(to_image(image))
        for artist, image in zip(self._x0_artists, x0_images):
            artist.set_data(to_image(image))
        self._marker.set_xdata([k, k])
        n = len(self.frames) - 1
        if frame["t"] is None:
            self.readout.value = f"<b>{self.sampler.value}</b>, {self.steps.value} steps: the finished sample after {n} model evaluations"
        else:
            a = alpha_bar_at(self.schedule, frame["t"]).item()
            self.readout.value = (f"<b>{self.sampler.value}</b>, {self.steps.value} steps: model evaluation {k + 1} of {n}"
                                  f" &nbsp;·&nbsp; t = {frame['t']:.4g} &nbsp;·&nbsp; ᾱ<sub>t</sub> = {a:.4f}"
                                  f" &nbsp;·&nbsp; noise √(1−ᾱ<sub>t</sub>) = {(1 - a) ** 0.5:.3f}")
        self.picture.value = _png(self.figure)


def sampler_scrubber(model_fn, schedule: NoiseSchedule, shape=None, *, noise: torch.Tensor | None = None,
                     sampler: str = "ddim", num_inference_steps: int = 20, seed: int = 0, spacing: str = "leading",
                     decode=None, max_images: int = 4) -> SamplerScrubber:
    """A slider over one sampling run of ``model_fn``: x_t and the predicted x̂₀ at every model evaluation
    (see :class:`SamplerScrubber`). ``shape`` (e.g. ``(4, 3, 32, 32)``) or ``noise`` gives the batch."""
    return SamplerScrubber(model_fn, schedule, shape, noise=noise, sampler=sampler, num_inference_steps=num_inference_steps,
                           seed=seed, spacing=spacing, decode=decode, max_images=max_images)


# ---------------------------------------------------------------------------------------------------
# The prompt playground (notebooks 00 and 08)
# ---------------------------------------------------------------------------------------------------
class PromptPlayground(_Explorer):
    """Type a prompt, set the knobs, press **Generate**: a text-to-image pipeline answers with a grid of images.

    ``pipe`` is a :class:`sdlearn.pipeline.LatentDiffusionPipeline` (None: the shipped one, from
    :func:`sdlearn.pretrained.load_pipeline`). The controls are the pipeline's own arguments: ``prompt``,
    ``negative`` (the negative prompt; empty = the empty prompt), ``steps``, ``guidance`` (the scale w),
    ``seed``, ``num_images_per_prompt`` (images of the prompt, each from its own starting noise) and ``sampler``.
    Moving a control changes nothing until ``generate_button`` is pressed (or :meth:`generate` called), since
    a run costs a fraction of a second to a few seconds on a CPU.

    After a run, ``images`` holds the output ``[N, 3, 32, 32]`` in [-1, 1] (None after a refused run),
    ``picture`` shows them and ``readout`` says what was run and how long it took, with the tokenizer's
    warnings (unknown words, a prompt too long) and the pipeline's errors in words instead of a traceback. The
    readout quotes the prompt once; the warnings about it say "the prompt" instead of quoting it again.
    """

    SUMMARY = "type a prompt and press Generate: the pipeline answers with a grid of images"

    def __init__(self, pipe=None, prompt: str = "a large red circle in the top left", *, negative_prompt: str = "",
                 num_inference_steps: int = 20, guidance_scale: float = 4.0, seed: int = 0,
                 num_images_per_prompt: int = 4, sampler: str = "dpm++", generate: bool = True,
                 num_images: int | None = None):
        if num_images is not None:
            warn_deprecated("prompt_playground(num_images=...)", "num_images_per_prompt=...")
            num_images_per_prompt = num_images
        if pipe is None:
            pipe = load_pipeline()
        if not callable(pipe) or not hasattr(pipe, "denoiser"):
            raise ValueError(f"pipe must be a LatentDiffusionPipeline (or None for the shipped one), got {type(pipe).__name__}")
        if sampler not in SAMPLER_NAMES:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLER_NAMES)}")
        self.pipe = pipe
        wide = widgets.Layout(width="70%")
        self.prompt = widgets.Text(value=prompt, description="prompt", layout=wide)
        self.negative = widgets.Text(value=negative_prompt, description="negative", layout=wide,
                                     placeholder="(empty: guidance pushes away from the empty prompt)")
        self.steps = widgets.IntSlider(value=num_inference_steps, min=1, max=100, description="steps")
        self.guidance = widgets.FloatSlider(value=guidance_scale, min=0.0, max=12.0, step=0.5, description="guidance")
        self.seed = widgets.IntText(value=seed, description="seed", layout=widgets.Layout(width="180px"))
        self.num_images_per_prompt = widgets.IntSlider(value=num_images_per_prompt, min=1, max=16, description="images")
        self.sampler = widgets.Dropdown(options=list(SAMPLER_NAMES), value=sampler, description="sampler",
                                        layout=widgets.Layout(width="200px"))
        self.generate_button = widgets.Button(description="Generate", button_style="primary", icon="paint-brush")
        self.readout = widgets.HTML()
        self.picture = widgets.Image(format="png")
        super().__init__([
            self.prompt,
            self.negative,
            widgets.HBox([self.steps, self.guidance]),
            widgets.HBox([self.num_images_per_prompt, self.seed, self.sampler]),
            self.generate_button,
            self.readout,
            self.picture,
        ])
        self._tag("prompt-playground", prompt=self.prompt, negative=self.negative, steps=self.steps,
                  guidance=self.guidance, seed=self.seed, num_images_per_prompt=self.num_images_per_prompt,
                  sampler=self.sampler, generate_button=self.generate_button, readout=self.readout,
                  picture=self.picture)
        self.images: torch.Tensor | None = None
        self.seconds: float | None = None
        self.generate_button.on_click(lambda _: self.generate())
        if generate:
            self.generate()

    @property
    def num_images(self) -> widgets.IntSlider:
        """Deprecated: the slider is ``num_images_per_prompt``."""
        warn_deprecated("PromptPlayground.num_images", "PromptPlayground.num_images_per_prompt")
        return self.num_images_per_prompt

    def generate(self) -> None:
        """Run the pipeline with the controls' values; show the images, or say why it could not run."""
        prompt, negative = self.prompt.value, self.negative.value.strip()
        kwargs = dict(negative_prompt=negative or None, num_inference_steps=int(self.steps.value),
                      guidance_scale=float(self.guidance.value), sampler=self.sampler.value, seed=int(self.seed.value),
                      num_images_per_prompt=int(self.num_images_per_prompt.value), progress=False)
        self.generate_button.disabled = True
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                start = time.perf_counter()
                images = self.pipe(prompt, **kwargs)  # [N, 3, 32, 32]
                self.seconds = time.perf_counter() - start
        except ValueError as error:  # bad settings: say so in the readout (a callback's traceback is lost)
            self.images, self.seconds = None, None
            self.readout.value = f"<b style='color:#b00'>Cannot generate:</b> {html.escape(str(error))}"
            return
        finally:
            self.generate_button.disabled = False
        self.images = images

        n = len(images)
        ncols = min(n, 8)
        nrows = -(-n // ncols)
        fig = Figure(figsize=(1.45 * ncols, 1.45 * nrows + 0.45))
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for i, ax in enumerate(axes.flat):
            ax.axis("off")
            if i < n:
                ax.imshow(to_image(images[i]), interpolation="nearest")
                ax.set_title(f"#{i + 1}", fontsize=7)
        fig.suptitle(textwrap.shorten(prompt or "(empty prompt: unconditional)", 90), fontsize=9)
        fig.tight_layout()
        self.figure = fig
        self.picture.value = _png(fig)

        w = kwargs["guidance_scale"]
        guidance = "off (w = 1: the conditional model alone)" if w == 1 else f"w = {w:g}"
        messages = dict.fromkeys(_without_quotes_of(str(c.message), prompt, negative) for c in caught)  # once each
        notes = "".join(f"<br><span style='color:#a60'>⚠ {html.escape(m)}</span>" for m in messages)
        self.readout.value = (
            f"{n} image{'s' * (n != 1)} of <i>{html.escape(prompt) or '(empty prompt)'}</i>"
            + (f", negative <i>{html.escape(negative)}</i>" if negative else "")
            + f" &nbsp;·&nbsp; {kwargs['num_inference_steps']} steps of {kwargs['sampler']} &nbsp;·&nbsp; guidance {guidance}"
            f" &nbsp;·&nbsp; seed {kwargs['seed']} &nbsp;·&nbsp; {self.seconds:.2f} s{notes}"
        )

    update = generate  # the explorers' common name for "redraw from the controls"


def _without_quotes_of(message: str, prompt: str, negative: str) -> str:
    """A tokenizer warning with the prompt it quotes replaced by "the prompt" (the readout shows it already),
    e.g. "unknown word(s) 'zebra' in prompt 'a red zebra' became <unk>" → "... in the prompt became <unk>"."""
    for text, name in ((prompt, "the prompt"), (negative, "the negative prompt")):
        if text:
            message = message.replace(f"in prompt {text!r}", f"in {name}").replace(f"prompt {text!r}", name)
    return message


def prompt_playground(pipe=None, prompt: str = "a large red circle in the top left", **kwargs) -> PromptPlayground:
    """A prompt box, the pipeline's knobs (negative prompt, steps, guidance, seed, number of images, sampler) and a
    Generate button over ``pipe`` (None: the shipped pipeline); see :class:`PromptPlayground`."""
    return PromptPlayground(pipe, prompt, **kwargs)
