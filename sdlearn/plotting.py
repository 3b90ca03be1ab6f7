"""Pictures for the course: image grids with captions, schedule plots, noising rows, trajectories.

Conventions, the same everywhere in sdlearn:

- images are float tensors in [-1, 1], one image ``[3, H, W]`` (or ``[1, H, W]`` for grey), a batch
  ``[B, 3, H, W]``, or a list of single images;
- every figure function *returns* its :class:`matplotlib.figure.Figure` and never calls
  ``plt.show()``: in a notebook the figure is shown at the end of the cell, in a script call
  ``fig.savefig(...)``. Figures are made with ``plt.figure`` so notebooks display them as usual.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from sdlearn.schedules import NoiseSchedule

# The quantities plot_schedules knows, with their panel titles.
SCHEDULE_QUANTITIES = {
    "betas": "β_t (noise added at step t)",
    "alphas_cumprod": "ᾱ_t (signal power left)",
    "signal_noise": "√ᾱ_t (solid) and √(1−ᾱ_t) (dashed)",
    "snr": "SNR_t = ᾱ_t / (1−ᾱ_t), log scale",
    "log_snr": "log-SNR_t = log ᾱ_t − log(1−ᾱ_t)",
}


# -- tensors → pixels ---------------------------------------------------------------------------
def to_image(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """One image in [-1, 1] (``[3, H, W]``, ``[1, H, W]``, ``[H, W]``, or a batch of one) → numpy ``[H, W, 3]`` in [0, 1].

    Values outside [-1, 1] (a noisy image, a sampler's overshoot) are clipped, as any viewer would.
    """
    x = torch.as_tensor(x).detach().to("cpu", torch.float32)
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() == 2:
        x = x[None]  # [1, H, W]
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected one image of shape [3, H, W] or [1, H, W], got shape {list(x.shape)}")
    x = x.expand(3, -1, -1)  # grey → RGB
    return ((x.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy()  # [H, W, 3]


def _as_list(images) -> list[torch.Tensor]:
    """A batch ``[B, C, H, W]``, a single image ``[C, H, W]`` or a sequence of images → list of ``[C, H, W]``."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        images = torch.as_tensor(images)
        if images.dim() == 3:
            return [images]
        if images.dim() == 4:
            return list(images)
        raise ValueError(f"expected images of shape [B, 3, H, W] or [3, H, W], got shape {list(images.shape)}")
    images = [torch.as_tensor(image) for image in images]
    if not images:
        raise ValueError("expected at least one image, got an empty list")
    return images


# -- grids ---------------------------------------------------------------------------------------
def show_images(
    images,
    captions: Sequence[str] | None = None,
    ncols: int = 8,
    title: str | None = None,
    scale: float = 1.0,
    wrap: int = 22,
    row_labels: Sequence[str] | None = None,
):
    """Show images in a grid, ``ncols`` per row, each with an optional caption above it.

    ``images`` is ``[B, 3, H, W]``, ``[3, H, W]`` or a list of ``[3, H, W]`` tensors in [-1, 1];
    ``captions`` one string per image (wrapped at ``wrap`` characters); ``scale`` enlarges
    every cell (1.0 ≈ 1.5 inches, 150 pixels at the notebook's 100 dpi, per image; pixels are
    drawn nearest-neighbour, never smoothed); ``row_labels`` one string per row, written left of
    the row (a prompt, a guidance scale). Returns the figure.
    """
    images = _as_list(images)
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions; give one caption per image")
    if ncols < 1:
        raise ValueError(f"ncols must be at least 1, got {ncols}")
    ncols = min(ncols, len(images))
    nrows = math.ceil(len(images) / ncols)
    if row_labels is not None and len(row_labels) != nrows:
        raise ValueError(f"got {len(row_labels)} row labels for {nrows} rows of {ncols} images; give one label per row")
    caption_lines = 0
    if captions is not None:
        captions = [textwrap.fill(str(c), wrap) for c in captions]
        caption_lines = max(c.count("\n") + 1 for c in captions)
    cell_w, cell_h = 1.5 * scale, 1.5 * scale + 0.16 * caption_lines
    fig = plt.figure(figsize=(cell_w * ncols, cell_h * nrows + (0.4 if title else 0)))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= len(images):
            continue
        ax.imshow(to_image(images[i]), interpolation="nearest")
        if captions is not None:
            ax.set_title(captions[i], fontsize=7)
    if row_labels is not None:
        for ax, label in zip(axes[:, 0], row_labels):
            ax.axis("on")  # the label is the y-axis label of the row's first image; ticks and frame stay hidden
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            lines = str(label).split("\n")  # a line break in a label is kept; each line wraps at ``wrap``
            ax.set_ylabel("\n".join(textwrap.fill(line, wrap) for line in lines), rotation=0, ha="right", va="center",
                          fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def image_grid(images, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Tile images into one image ``[3, H', W']`` in [-1, 1], ``nrow`` images per row, as torchvision's ``make_grid``.

    ``padding`` pixels of ``pad_value`` (1.0 = white, which separates the Shapes' black backgrounds) surround each image.
    """
    images = [image if image.dim() == 3 else image[None] for image in _as_list(images)]
    shapes = {tuple(image.shape[1:]) for image in images}
    if len(shapes) != 1:
        raise ValueError(f"all images must have the same height and width, got {sorted(shapes)}")
    if nrow < 1:
        raise ValueError(f"nrow must be at least 1, got {nrow}")
    (h, w), n = shapes.pop(), len(images)
    ncols, nrows = min(nrow, n), math.ceil(n / nrow)
    grid = torch.full((3, nrows * (h + padding) + padding, ncols * (w + padding) + padding), float(pad_value))
    for i, image in enumerate(images):
        r, c = divmod(i, ncols)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[:, top : top + h, left : left + w] = image.detach().to("cpu", torch.float32).expand(3, -1, -1)
    return grid  # [3, H', W']


def save_image_grid(images, path: str | Path, nrow: int = 8, padding: int = 2, upscale: int = 1) -> Path:
    """Write :func:`image_grid` of ``images`` to a PNG (or any format PIL knows from the suffix); returns the path.

    ``upscale`` repeats each pixel (nearest neighbour) so that 32×32 images are visible at a glance.
    """
    if upscale < 1:
        raise ValueError(f"upscale must be a positive integer, got {upscale}")
    pixels = (to_image(image_grid(images, nrow=nrow, padding=padding)) * 255).round().astype(np.uint8)  # [H, W, 3]
    pixels = pixels.repeat(upscale, axis=0).repeat(upscale, axis=1)
    path = Path(path)
    Image.fromarray(pixels).save(path)
    return path


# -- schedules -----------------------------------------------------------------------------------
def _as_schedules(schedules) -> dict[str, NoiseSchedule]:
    """Accept one schedule, a dict name → schedule, or a dict name → betas tensor."""
    if isinstance(schedules, NoiseSchedule):
        return {repr(schedules): schedules}
    if not isinstance(schedules, Mapping) or not schedules:
        raise ValueError("expected a NoiseSchedule or a non-empty dict {name: NoiseSchedule}")
    return {name: s if isinstance(s, NoiseSchedule) else NoiseSchedule(s) for name, s in schedules.items()}


def plot_schedules(
    schedules,
    what: Sequence[str] = ("betas", "alphas_cumprod", "signal_noise", "log_snr"),
    relative_time: bool = False,
    axes=None,
):
    """Plot schedules side by side, one panel per quantity, one line per schedule (legend by name).

    ``schedules`` is a dict ``{name: NoiseSchedule}`` (or a single schedule); ``what`` any of
    ``"betas"``, ``"alphas_cumprod"``, ``"signal_noise"`` (√ᾱ_t and √(1−ᾱ_t)), ``"snr"`` (log axis),
    ``"log_snr"``. ``relative_time=True`` puts t/T on the x axis, to compare schedules of different
    lengths. Pass ``axes`` (one per quantity) to draw into an existing figure. Returns the figure.
    """
    schedules = _as_schedules(schedules)
    what = [what] if isinstance(what, str) else list(what)
    unknown = [w for w in what if w not in SCHEDULE_QUANTITIES]
    if unknown or not what:
        raise ValueError(f"unknown quantity {unknown}; choose from {', '.join(SCHEDULE_QUANTITIES)}")
    if axes is None:
        fig = plt.figure(figsize=(3.6 * len(what), 3.0))
        axes = fig.subplots(1, len(what), squeeze=False)[0]
    else:
        axes = list(np.atleast_1d(axes))
        if len(axes) != len(what):
            raise ValueError(f"got {len(axes)} axes for {len(what)} quantities")
        fig = axes[0].figure
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, quantity in zip(axes, what):
        for k, (name, s) in enumerate(schedules.items()):
            T = len(s)
            t = np.arange(T) / (T if relative_time else 1)
            color = colors[k % len(colors)]
            a = s.alphas_cumprod.double()
            if quantity == "betas":
                ax.plot(t, s.betas.numpy(), color=color, label=name)
            elif quantity == "alphas_cumprod":
                ax.plot(t, a.numpy(), color=color, label=name)
            elif quantity == "signal_noise":
                ax.plot(t, a.sqrt().numpy(), color=color, label=name)
                ax.plot(t, (1 - a).sqrt().numpy(), color=color, linestyle="--")
            elif quantity == "snr":
                ax.semilogy(t, (a / (1 - a)).numpy(), color=color, label=name)
            else:  # log_snr; −inf where ᾱ = 0 (zero terminal SNR) is left out of the line
                ax.plot(t, (a.log() - (-a).log1p()).numpy(), color=color, label=name)
        ax.set_title(SCHEDULE_QUANTITIES[quantity], fontsize=9)
        ax.set_xlabel("t / T" if relative_time else "timestep t")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def show_noising(
    image: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: Sequence[int],
    generator: torch.Generator | None = None,
    title: str | None = None,
    scale: float = 1.0,
):
    """One image noised by the closed form x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε at several ``timesteps``, in a row.

    The same ε is used at every t, so the row shows one noise pattern drowning the image. Each
    picture is captioned ``t=…, ᾱ=…``. Returns the figure.
    """
    image = torch.as_tensor(image)
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3:
        raise ValueError(f"expected one image of shape [3, H, W], got shape {list(image.shape)}")
    t = torch.as_tensor(list(timesteps), dtype=torch.long)  # [N]
    noise = torch.randn(image.shape, generator=generator)  # [3, H, W], shared by all t
    x0 = image.expand(len(t), -1, -1, -1)  # [N, 3, H, W]
    x_t = schedule.add_noise(x0, noise.expand_as(x0), t)
    captions = [f"t={int(ti)}, ᾱ={schedule.alphas_cumprod[ti].item():.3g}" for ti in t]
    return show_images(x_t, captions, ncols=len(t), title=title, scale=scale)


def show_trajectory(
    xs: Sequence[torch.Tensor],
    labels: Sequence[str] | None = None,
    title: str | None = None,
    scale: float = 1.0,
):
    """Snapshots of a process (noising, or a sampler going from noise to image) left to right.

    ``xs`` is a list of snapshots, each one image ``[3, H, W]`` or a batch ``[B, 3, H, W]`` (one row
    per batch element); ``labels`` names each column (e.g. ``"t=999"``). Returns the figure.
    """
    if len(xs) == 0:
        raise ValueError("expected at least one snapshot in xs")
    columns = [_as_list(x) for x in xs]  # [len(xs)] lists of B images
    rows = {len(c) for c in columns}
    if len(rows) != 1:
        raise ValueError(f"every snapshot must hold the same number of images, got {sorted(rows)}")
    if labels is not None and len(labels) != len(xs):
        raise ValueError(f"got {len(xs)} snapshots but {len(labels)} labels")
    n_rows = rows.pop()
    images = [columns[c][r] for r in range(n_rows) for c in range(len(xs))]  # row-major
    captions = None
    if labels is not None:
        captions = [labels[c] if r == 0 else "" for r in range(n_rows) for c in range(len(xs))]
    return show_images(images, captions, ncols=len(xs), title=title, scale=scale)
