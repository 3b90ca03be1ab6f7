"""Checkers of notebook 08, Stable Diffusion end to end: img2img's start step, the latent mask, the inpainting blend.

In the order the notebook uses them: ``check_sdedit_start``, ``check_latent_mask``, ``check_inpaint_blend``.
"""

from __future__ import annotations

import math

import torch

from sdlearn.exercises.framework import Case, Checker, Mistake, register


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


def _box_mask(batch, size, top, left, height, width):
    mask = torch.zeros(batch, 1, size, size)
    mask[:, :, top : top + height, left : left + width] = 1
    return mask


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


def _inpaint_blend_reference(x, known, noise, mask, alpha_bar):
    reference = alpha_bar.sqrt() * known + (1 - alpha_bar).sqrt() * noise  # the known latents at x's noise level
    return mask * x + (1 - mask) * reference


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
