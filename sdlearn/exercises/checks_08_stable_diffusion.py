"""Checkers of notebook 08, Stable Diffusion end to end: where img2img starts and how much of its input survives the
noising, SDEdit's trade-off measured over strengths, the latent mask, the inpainting blend.

In the order the notebook uses them: ``check_sdedit_start`` and ``check_sdedit_kept`` (derive),
``check_strength_sweep`` (experiment), ``check_latent_mask`` and ``check_inpaint_blend`` (implement).
"""

from __future__ import annotations

import math

import torch

from sdlearn.exercises.framework import Case, Checker, Mistake, PerSettingChecker, register
from sdlearn.schedules import make_betas


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


# ---- Exercise 1 (derive): how much of the input survives SDEdit's noising ------------------------------------


def _sdedit_kept_with(stride=lambda T, N: T // (N + 1), steps_run=lambda N, s: int(N * s), power=0.5,
                      noise_amplitude=False, start_clean=True, timestep=None):
    """The kept amplitude with one slip: another ``stride`` or rounding of ``steps_run``, ᾱ to another ``power``, the
    noise's amplitude instead, no special case when nothing runs, or a ``timestep(N, s, T)`` of another derivation."""
    def kept(num_inference_steps, strength, alphas_cumprod):
        T, N = len(alphas_cumprod), num_inference_steps
        run = min(steps_run(N, strength), N)
        if run == 0 and start_clean:
            return 1.0  # no step runs: the pipeline returns the input's latents, un-noised
        t = timestep(N, strength, T) if timestep is not None else run * stride(T, N)
        alpha_bar = float(alphas_cumprod[min(max(int(t), 0), T - 1)])
        return (1 - alpha_bar) ** 0.5 if noise_amplitude else alpha_bar**power
    return kept


_sdedit_kept_reference = _sdedit_kept_with()


def _sdedit_kept_cases(g):
    schedules = {"Stable Diffusion's (scaled_linear, T = 1000)": make_betas("scaled_linear", 1000),
                 "a linear one (β from 1e-4 to 0.02, T = 1000)": make_betas("linear", 1000, 1e-4, 0.02),
                 "Stable Diffusion's with T = 500": make_betas("scaled_linear", 500)}
    cases = []
    for (words, betas), n, s in zip(
        [*schedules.items()] * 3,
        (20, 20, 20, 7, 50, 10, 12, 20, 10),
        (0.62, 0.5, 0.22, 0.4, 0.75, 1.0, 0.33, 0.0, 0.05),
    ):
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        cases.append(Case(f"num_inference_steps = {n}, strength = {s}, alphas_cumprod of {words}",
                          (n, s, alphas_cumprod)))
    return cases


check_sdedit_kept = register(Checker(
    name="check_sdedit_kept",
    signature="fn(num_inference_steps, strength, alphas_cumprod) -> kept",
    doc="how much of the input image's latents SDEdit keeps when it noises them (img2img with the pipeline's "
        "DPM-Solver++, whose N timesteps are t_i = (N − i)·⌊T/(N + 1)⌋, i = 0 … N − 1, T = len(alphas_cumprod)): the "
        "factor √ᾱ_t that multiplies the clean latents at the first timestep used, t = ⌊N·strength⌋·⌊T/(N + 1)⌋ "
        "(``alphas_cumprod[t]`` is its ᾱ). A float; 1.0 when no step runs (⌊N·strength⌋ = 0: the input is not "
        "noised at all).",
    reference=_sdedit_kept_reference,
    make_cases=_sdedit_kept_cases,
    hint="steps_run = int(N * strength); if it is 0 return 1.0; the first index used is k = N − steps_run, whose "
         "timestep is (N − k)·(T // (N + 1)) = steps_run·(T // (N + 1)); return alphas_cumprod[t].sqrt() as a float.",
    mistakes=(
        Mistake(_sdedit_kept_with(timestep=lambda N, s, T: int(s * T)),
                "you started at t = strength·T; the pipeline starts at one of its sampler's timesteps, "
                "⌊N·strength⌋·⌊T/(N + 1)⌋ (strength 0.5 of 20 steps is t = 470, not 500)"),
        Mistake(_sdedit_kept_with(stride=lambda T, N: T // N),
                "you spaced the timesteps by ⌊T/N⌋; DPM-Solver++ spaces N + 1 points by ⌊T/(N + 1)⌋ and drops t = 0 "
                "(for N = 20 the stride is 47: 940, 893, …, 47)"),
        Mistake(_sdedit_kept_with(timestep=lambda N, s, T: (N - int(N * s)) * (T // (N + 1))),
                "you took the timestep of the start index k as k·stride, reading the list from the wrong end: index 0 "
                "is the noisiest timestep, t_k = (N − k)·⌊T/(N + 1)⌋"),
        Mistake(_sdedit_kept_with(power=1.0),
                "you returned ᾱ_t; the clean latents are multiplied by its square root, x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε"),
        Mistake(_sdedit_kept_with(noise_amplitude=True),
                "you returned the noise's amplitude √(1−ᾱ_t); the input keeps √ᾱ_t"),
        Mistake(_sdedit_kept_with(steps_run=lambda N, s: round(N * s)),
                "you rounded N·strength to the nearest whole number; the number of steps run is rounded down"),
        Mistake(_sdedit_kept_with(start_clean=False),
                "when ⌊N·strength⌋ = 0 no step runs and the input comes back un-noised: the factor is 1, not √ᾱ_0"),
    ),
))


# ---- Exercise 2 (experiment): SDEdit's strength against faithfulness and edit success -------------------------


def _strength_sweep_reference(edit, strengths, source, is_edited, is_faithful):
    rows = []
    for strength in strengths:
        images = edit(strength)  # [K, 3, H, W]
        rows.append((is_edited(images).float().mean().item(), is_faithful(images).float().mean().item(),
                     (images - source).pow(2).mean().sqrt().item()))
    return rows


def _sweep_with(distance=None, rate=None):
    """The sweep with one slip: another ``distance(images, source)`` or ``rate(flags)``."""
    distance = distance or (lambda images, source: (images - source).pow(2).mean().sqrt().item())
    rate = rate or (lambda flags: flags.float().mean().item())

    def sweep(edit, strengths, source, is_edited, is_faithful):
        rows = []
        for strength in strengths:
            images = edit(strength)
            rows.append((rate(is_edited(images)), rate(is_faithful(images)), distance(images, source)))
        return rows
    return sweep


def _synthetic_edit(source, target, k, seed):
    """``edit(strength)``: k images that drift from ``source`` to ``target`` as the strength grows, each with its own
    threshold, so that the rates step through 0 … 1 (deterministic: the same strength gives the same images)."""
    thresholds = torch.rand(k, 1, 1, 1, generator=torch.Generator().manual_seed(seed))

    def edit(strength):
        weight = (strength + 0.3 * (torch.as_tensor(strength) - thresholds)).clamp(0, 1)  # [k, 1, 1, 1]
        return (1 - weight) * source + weight * target
    return edit


def _strength_sweep_cases(g):
    cases = []
    for k, size, strengths in ((8, 8, [0.0, 0.3, 0.6, 1.0]), (5, 4, [0.1, 0.5, 0.9]), (16, 8, [0.0, 0.25, 0.5, 0.75, 1.0])):
        source = torch.rand(1, 3, size, size, generator=g) * 2 - 1
        target = torch.rand(1, 3, size, size, generator=g) * 2 - 1
        edit = _synthetic_edit(source, target, k, int(torch.randint(0, 10_000, (), generator=g)))

        gap = 0.5 * (target - source).flatten(1).norm(dim=1)  # half the way from the source to the target

        def is_edited(images, target=target, gap=gap):  # within half the way of the target, per image: [K] bool
            return (images - target).flatten(1).norm(dim=1) < gap

        def is_faithful(images, source=source, gap=gap):  # within half the way of the source
            return (images - source).flatten(1).norm(dim=1) < gap

        cases.append(Case(f"a synthetic edit: {k} images [{k}, 3, {size}, {size}] per strength that move from the "
                          f"source to a target as the strength grows, strengths {strengths}; is_edited and is_faithful "
                          "return [K] bool tensors", (edit, strengths, source, is_edited, is_faithful)))
    return cases


check_strength_sweep = register(PerSettingChecker(
    name="check_strength_sweep",
    signature="fn(edit, strengths, source, is_edited, is_faithful) -> rows",
    doc="SDEdit's trade-off, measured: for each ``strength`` in ``strengths``, ``edit(strength)`` returns K edited "
        "images [K, 3, H, W]; ``is_edited(images)`` and ``is_faithful(images)`` return a bool tensor [K] (the edit "
        "succeeded; the source's layout is kept). Return a list with one tuple per strength, in order: (the fraction "
        "of images edited, the fraction faithful, the RMS pixel distance from ``source`` [1, 3, H, W] over all K "
        "images), three floats.",
    reference=_strength_sweep_reference,
    make_cases=_strength_sweep_cases,
    hint="rows = []; for each strength: images = edit(strength); rows.append((is_edited(images).float().mean().item(), "
         "is_faithful(images).float().mean().item(), (images - source).pow(2).mean().sqrt().item())); return rows.",
    mistakes=(
        Mistake(_sweep_with(rate=lambda flags: float(flags.sum())),
                "you returned counts of images; return fractions of the K images (the count divided by K)"),
        Mistake(_sweep_with(distance=lambda images, source: (images - source).pow(2).mean().item()),
                "you returned the mean squared distance; take its square root (the RMS distance)"),
        Mistake(_sweep_with(distance=lambda images, source: (images - source).abs().mean().item()),
                "you returned the mean absolute difference; the distance asked for is the root of the mean square"),
        Mistake(lambda edit, strengths, source, is_edited, is_faithful: [
                    (b, a, d) for a, b, d in _strength_sweep_reference(edit, strengths, source, is_edited, is_faithful)],
                "you swapped the two fractions: each tuple is (edited, faithful, distance)"),
    ),
    setting="strength",
    fields=("the fraction edited", "the fraction faithful", "the RMS distance"),
))
