"""The ControlNet recipe: :func:`train_controlnet` teaches a :class:`sdlearn.control.ControlNet` to put the shipped
pipeline's object where an edge map says, and :func:`control_accuracy` measures how well it does.

It puts the pieces of :mod:`sdlearn.control` on the generic loop, as every recipe of :mod:`sdlearn.recipes` does:

- **Data** (:func:`control_batch`): one object per image, of any colour, shape and size of the ``"train"`` split,
  whose box sits at *any* position where it fits in the 32×32 image (its centre uniform in [h, 32 − h] along x and
  y, h half the box's side), not only at the five named places: that is what control is for. It is drawn by
  :func:`sdlearn.data.render_batch` at the centre place moved by an explicit ``xy_offset``, with the usual colour
  jitter. The condition is :func:`sdlearn.control.edge_map` of the image (its coverage, brightest channel over
  peak). The caption names colour, shape and size, never the position (the edge map says where), in a random
  template (:func:`sdlearn.data.object_phrase`); with probability ``caption_dropout`` (5%) it is the empty prompt, so
  that classifier-free guidance still has an unconditional prediction to push away from.
- **Model**: the shipped pipeline (:func:`sdlearn.pretrained.load_pipeline`), its DiT, VAE and text encoder frozen;
  the ControlNet is :meth:`ControlNet.from_denoiser` of that DiT (its first half copied, new layers at zero).
- **Loss**: the denoiser's own, L = E ‖ε − ε_θ(x_t, t, text; residuals)‖² (Ho et al. 2020, eq. 14), where the
  residuals are the ControlNet's, added after the locked DiT's first blocks (Zhang et al. 2023, eq. 5: the locked
  model's loss with the control's features added). Only the ControlNet's parameters are trained.
- **Optimiser**: AdamW, ``lr`` with 100 warm-up steps then cosine decay, gradient clipping at 1, EMA of the weights
  (``ema_decay``); the checkpoint ``out_dir/controlnet_checkpoint.*`` is resumed from when present.

:func:`sdlearn.pretrained.save_controlnet` / :func:`~sdlearn.pretrained.load_controlnet` write and read the file
(safetensors + JSON, atomically, with the weights' SHA-256 and the SHA-256 of the denoiser it was trained on).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sdlearn.checkpoint import file_sha256, weights_path
from sdlearn.checks import check_positive_int
from sdlearn.control import COVERAGE_THRESHOLD, ControlNet, edge_map, object_coverage
from sdlearn.data import (
    COLOR_JITTER,
    COLORS,
    HELDOUT_PAIRS,
    IMAGE_SIZE,
    POSITION_CENTERS,
    SHAPES,
    SIZE_PIXELS,
    SIZES,
    object_phrase,
    render_batch,
)
from sdlearn.pipeline import LatentDiffusionPipeline
from sdlearn.pretrained import load_controlnet, load_pipeline, save_controlnet  # noqa: F401 (re-exported)
from sdlearn.recipes import default_budget, finish, fit, training_record
from sdlearn.training import TrainResult, resolve_device, step_generator

CONTROL_EVAL_SEED = 60_000  # the evaluation's objects and noise: control_batch(n, Generator().manual_seed(60_000))
CONTROL_DATA_SEED = 70_000  # added to the seed of the training stream, so it never draws the evaluation's objects
CAPTION_DROPOUT = 0.05
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
_COLOR_TABLE = torch.tensor(list(COLORS.values()), dtype=torch.float32)  # [8, 3] in 0..255


# ------------------------------------------------------------------------------------------------
# The data: one object anywhere its box fits, its edge map, a caption without the position


class ControlBatch(NamedTuple):
    """A batch of :func:`control_batch`: images ``[B, 3, 32, 32]`` in [-1, 1], their edge maps ``[B, 1, 32, 32]``,
    captions (colour, shape and size; no position), and ``objects``: index tensors ``[B]`` ``"color"``, ``"shape"``,
    ``"size"`` (into :data:`sdlearn.data.COLORS`, ``SHAPES``, ``SIZES``) and ``"center"`` ``[B, 2]`` (x, y) in px."""

    images: torch.Tensor
    edges: torch.Tensor
    captions: list[str]
    objects: dict[str, torch.Tensor]


def split_pairs(split: str = "train") -> list[tuple[int, int]]:
    """The (colour index, shape index) pairs of a split: ``"train"`` leaves out :data:`sdlearn.data.HELDOUT_PAIRS`,
    ``"heldout"`` is them, ``"all"`` is every pair."""
    heldout = {(COLOR_NAMES.index(c), SHAPES.index(s)) for c, s in HELDOUT_PAIRS}
    every = [(c, s) for c in range(len(COLOR_NAMES)) for s in range(len(SHAPES))]
    if split == "train":
        return [p for p in every if p not in heldout]
    if split == "heldout":
        return sorted(heldout)
    if split == "all":
        return every
    raise ValueError(f"unknown split {split!r}; expected 'train', 'heldout' or 'all'")


def control_batch(batch_size: int, generator: torch.Generator | None = None, split: str = "train") -> ControlBatch:
    """``batch_size`` one-object images at random positions, drawn from ``generator``: a (colour, shape) pair of
    ``split`` and a size, uniformly; the box's centre uniform in [h, 32 − h] along x and y (h = half the box's side,
    so the box fits in the image); the colour jittered as the Shapes data is (±10 per channel); the edge map of each
    image (:func:`sdlearn.control.edge_map`); a caption naming colour, shape and size in a random template."""
    check_positive_int(batch_size, "batch_size")
    pairs = torch.tensor(split_pairs(split))  # [P, 2]
    picks = pairs[torch.randint(len(pairs), (batch_size,), generator=generator)]  # [B, 2]
    colors, shapes = picks[:, 0], picks[:, 1]
    sizes = torch.randint(len(SIZES), (batch_size,), generator=generator)  # [B]
    half = torch.tensor([SIZE_PIXELS[SIZES[z]] / 2 for z in sizes.tolist()])  # [B]
    centers = half[:, None] + torch.rand(batch_size, 2, generator=generator) * (IMAGE_SIZE - 2 * half[:, None])
    rgb_offset = (2 * torch.rand(batch_size, 3, generator=generator) - 1) * COLOR_JITTER  # [B, 3]
    middle = torch.tensor(POSITION_CENTERS["center"])  # the renderer places "center" objects here, then moves them
    images = render_batch(colors, shapes, sizes, ["center"] * batch_size, rgb_offset=rgb_offset,
                          xy_offset=centers - middle)  # [B, 3, 32, 32]
    captions = [object_phrase({"size": SIZES[z], "color": COLOR_NAMES[c], "shape": SHAPES[s]}, rng=generator)
                for c, s, z in zip(colors.tolist(), shapes.tolist(), sizes.tolist())]
    objects = {"color": colors, "shape": shapes, "size": sizes, "center": centers}
    return ControlBatch(images, edge_map(images), captions, objects)


def control_batch_fn(pipe: LatentDiffusionPipeline, batch_size: int, seed: int, caption_dropout: float = CAPTION_DROPOUT):
    """``batch_fn(step)`` for the ControlNet, a pure function of ``(seed, step)``: :func:`control_batch` images
    encoded by the frozen VAE (a posterior sample times the scaling factor, as the denoiser was trained on) → a dict
    of ``x0`` ``[B, 4, 8, 8]``, ``noise``, ``t`` ``[B]`` uniform in [0, T), ``edges`` ``[B, 1, 32, 32]``, and the
    frozen text tower's ``tokens`` / ``mask`` of the captions, each replaced by "" with probability
    ``caption_dropout``."""
    device = pipe.device
    T = pipe.schedule.num_train_timesteps

    def batch_fn(step: int) -> dict[str, Any]:
        generator = step_generator(CONTROL_DATA_SEED + seed, step)
        batch = control_batch(batch_size, generator)
        dropped = (torch.rand(batch_size, generator=generator) < caption_dropout).tolist()
        captions = ["" if drop else caption for caption, drop in zip(batch.captions, dropped)]
        with torch.no_grad():
            posterior = pipe.vae.encode(batch.images.to(device))
            eps = torch.randn(posterior.mean.shape, generator=generator).to(device)
            x0 = (posterior.mean + posterior.std * eps) * pipe.vae.scaling_factor  # [B, 4, 8, 8]
            tokens, mask = pipe.encode_prompt(captions)  # [B, L, D], [B, L]
        return {"x0": x0, "noise": torch.randn(x0.shape, generator=generator).to(device),
                "t": torch.randint(T, (batch_size,), generator=generator).to(device), "edges": batch.edges.to(device),
                "tokens": tokens, "mask": mask, "captions": captions}

    return batch_fn


def controlnet_loss(controlnet: ControlNet, denoiser: nn.Module, batch: Mapping[str, Any], schedule) \
        -> tuple[torch.Tensor, dict[str, float]]:
    """‖target − f_θ(x_t, t, text; ControlNet residuals)‖² with the locked ``denoiser`` (its prediction type's
    target: ε for the shipped DiT) → ``(loss, logs)``. ``batch`` as :func:`control_batch_fn` makes it."""
    x0, noise, t = batch["x0"], batch["noise"], batch["t"]
    x_t = schedule.add_noise(x0, noise, t)
    residuals = controlnet(x_t, t, batch["tokens"], batch["mask"], batch["edges"])  # num_blocks × [B, N, D]
    prediction = denoiser(x_t, t, batch["tokens"], batch["mask"], block_residuals=residuals)
    target = schedule.target(x0, noise, t, denoiser.config.prediction_type)
    return F.mse_loss(prediction, target), {}


# ------------------------------------------------------------------------------------------------
# How well it controls: the object's mask against the edge map's, and the colour


def generated_colors(images: torch.Tensor) -> torch.Tensor:
    """The colour of each image's object → indices ``[B]`` into :data:`sdlearn.data.COLORS`: the mean RGB of the
    pixels whose coverage (:func:`sdlearn.control.object_coverage`) is ≥ 0.75 — the object's inside, not its
    anti-aliased rim, which is darker — nearest (Euclidean, in 0..255) to a colour of the table."""
    coverage = object_coverage(images)  # [B, 1, H, W]
    inside = (coverage >= 0.75).float()  # [B, 1, H, W]
    rgb = ((images.clamp(-1, 1) + 1) * 127.5 * inside).sum((2, 3)) / inside.sum((2, 3)).clamp(min=1)  # [B, 3]
    return torch.cdist(rgb, _COLOR_TABLE.to(rgb)).argmin(1)  # [B]


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection over union of two bool masks ``[B, ...]`` per item → ``[B]`` (1 when both are empty)."""
    a, b = a.flatten(1), b.flatten(1)
    union = (a | b).sum(1)
    return torch.where(union > 0, (a & b).sum(1) / union.clamp(min=1), torch.ones_like(union, dtype=torch.float32))


@torch.no_grad()
def control_accuracy(pipe: LatentDiffusionPipeline, controlnet: ControlNet, n: int = 64, seed: int = CONTROL_EVAL_SEED,
                     num_inference_steps: int = 20, guidance_scale: float = 4.0, conditioning_scale: float = 1.0,
                     batch_size: int = 64) -> dict[str, Any]:
    """Draw ``n`` objects at random positions (:func:`control_batch` from ``seed``, split "train") from their captions
    and edge maps, and measure → ``{"iou_mean", "iou": [n], "color_accuracy", "n"}``:

    - IoU of the generated object's mask (coverage ≥ 0.5, :func:`sdlearn.control.object_coverage`) with the edge
      map's filled object (the true image's coverage ≥ 0.5: the pixels the outline encloses, outline included);
    - whether the object's colour (:func:`generated_colors`) is the caption's.

    Sampling: the pipeline's default sampler, ``num_inference_steps`` steps, guidance ``guidance_scale``, the noise
    of image i from ``seed + i``; the ControlNet reads the edge map in both halves of a guided batch."""
    check_positive_int(n, "n")
    batch = control_batch(n, torch.Generator().manual_seed(seed))
    attached = pipe.controlnet
    ious, right = [], []
    try:
        pipe.controlnet = controlnet  # the pipeline's own control path (pipe(..., control_image=...))
        for start in range(0, n, batch_size):
            rows = slice(start, min(start + batch_size, n))
            generators = [torch.Generator(pipe.device).manual_seed(seed + i) for i in range(rows.start, rows.stop)]
            images = pipe(batch.captions[rows], num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          generator=generators, progress=False, control_image=batch.edges[rows].to(pipe.device),
                          controlnet_conditioning_scale=conditioning_scale).cpu()
            made = object_coverage(images) >= COVERAGE_THRESHOLD
            wanted = object_coverage(batch.images[rows]) >= COVERAGE_THRESHOLD
            ious.append(mask_iou(made, wanted))
            right.append(generated_colors(images) == batch.objects["color"][rows])
    finally:
        pipe.controlnet = attached
    iou, right = torch.cat(ious), torch.cat(right)
    return {"n": n, "iou_mean": round(iou.mean().item(), 4), "iou": [round(x, 4) for x in iou.tolist()],
            "color_accuracy": round(right.float().mean().item(), 4)}


# ------------------------------------------------------------------------------------------------
# The file: safetensors + JSON, with the hash of the denoiser it steers


# ------------------------------------------------------------------------------------------------
# The recipe: `python -m sdlearn train controlnet`

CONTROLNET_MINUTES = 35.0  # the shipped recipe's budget


def train_controlnet(
    out_dir: str | os.PathLike | None = None,
    minutes: float | None = None,
    steps: int | None = None,
    device: str | torch.device = "auto",
    *,
    pipe: LatentDiffusionPipeline | None = None,
    batch_size: int = 64,
    lr: float = 1e-3,
    ema_decay: float | None = 0.995,
    caption_dropout: float = CAPTION_DROPOUT,
    num_blocks: int | None = None,
    seed: int = 0,
    eval_images: int = 64,
    eval_steps: int = 20,
    progress: bool = True,
    resume: bool = True,
) -> tuple[ControlNet, TrainResult]:
    """Train a ControlNet for the shipped pipeline (or ``pipe``, whose DiT it steers) → ``(controlnet, result)``; the
    recipe behind ``python -m sdlearn train controlnet`` (see the module's docstring for data, loss and optimiser).

    ``minutes`` / ``steps``: the budget (neither: :data:`CONTROLNET_MINUTES`). ``num_blocks``: blocks copied (None:
    half the DiT's). The returned ControlNet holds the EMA weights (``ema_decay`` None: the raw ones), in eval mode.
    At the end, with ``eval_images`` > 0, :func:`control_accuracy` on that many objects at random positions, drawn
    with ``eval_steps`` sampling steps, is recorded. With ``out_dir``: the checkpoint
    ``out_dir/controlnet_checkpoint.*`` (resumed from when present) and
    ``out_dir/controlnet.safetensors`` + ``.json`` (:func:`save_controlnet`, float16)."""
    minutes, steps = default_budget(minutes, steps, default_minutes=CONTROLNET_MINUTES)
    check_positive_int(batch_size, "batch_size")
    check_positive_int(eval_steps, "eval_steps")
    if isinstance(caption_dropout, bool) or not isinstance(caption_dropout, (int, float)) or not 0 <= caption_dropout <= 1:
        raise ValueError(f"caption_dropout must be a probability in [0, 1], got {caption_dropout!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if isinstance(eval_images, bool) or not isinstance(eval_images, int) or eval_images < 0:
        raise ValueError(f"eval_images must be a non-negative integer, got {eval_images!r}")
    device = resolve_device(device)
    denoiser_sha256 = None
    if pipe is None:
        pipe = load_pipeline(device=device)
        denoiser_sha256 = file_sha256(weights_path("denoiser"))
    pipe.to(device)
    for module in (pipe.vae, pipe.text_encoder, pipe.denoiser):  # locked: only the ControlNet learns
        module.eval().requires_grad_(False)
    out_dir = Path(out_dir) if out_dir is not None else None

    torch.manual_seed(seed)
    controlnet = ControlNet.from_denoiser(pipe.denoiser, num_blocks).to(device)
    batch_fn = control_batch_fn(pipe, batch_size, seed, caption_dropout)
    run_config = {"model": "controlnet", "controlnet_config": controlnet.config.to_dict(),
                  "denoiser": denoiser_sha256, "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay,
                  "caption_dropout": caption_dropout, "seed": seed}
    result = fit("controlnet", controlnet,
                 lambda model, batch, step: controlnet_loss(model, pipe.denoiser, batch, pipe.schedule), batch_fn,
                 run_config, out_dir=out_dir, minutes=minutes, steps=steps, seed=seed, resume=resume, progress=progress,
                 lr=lr, warmup_steps=100, lr_schedule="cosine", grad_clip=1.0, ema_decay=ema_decay, checkpoint_every=250)
    if result.ema is not None:
        result.ema.copy_to(controlnet)
    controlnet.eval()

    details: dict[str, Any] = {}
    summary = f"loss {result.final_loss:.4g}" if result.losses else "no step run"
    if eval_images > 0:
        accuracy = control_accuracy(pipe, controlnet, eval_images, num_inference_steps=eval_steps)
        details["evaluation"] = {k: v for k, v in accuracy.items() if k != "iou"}
        details["evaluation"]["images"] = (f"control_batch({eval_images}, seed {CONTROL_EVAL_SEED}), split 'train', "
                                           f"{eval_steps} steps of the default sampler, guidance 4")
        summary += f", IoU {accuracy['iou_mean']:.3f}, colour right {100 * accuracy['color_accuracy']:.1f}%"
    training = training_record(
        result, run_config, ("batch_size", "lr", "ema_decay", "caption_dropout", "seed"), device, steps, minutes,
        images_seen=result.step * batch_size,
        losses=[float(f"{loss:.4g}") for loss in result.losses[-200:]],
        weights=("raw" if ema_decay is None else f"EMA (decay {ema_decay})") + ", stored as float16",
        data=f"control_batch (one object of split 'train' anywhere its box fits; no position in the caption), "
             f"seed {CONTROL_DATA_SEED + seed}, caption dropout {caption_dropout}",
        **details)
    controlnet.denoiser_sha256 = denoiser_sha256
    return finish("controlnet", controlnet, result, training, out_dir,
                  lambda model, path, training: save_controlnet(model, path, training=training,
                                                                denoiser_sha256=denoiser_sha256),
                  summary, progress)

