"""Checkers of notebook 02, noise schedules: the cosine schedule, its log-SNR, zero terminal SNR, the leak into x_T.

In the order the notebook uses them: ``check_cosine_betas`` (implement), ``check_cosine_log_snr`` (derive),
``check_zero_terminal_snr`` (implement), ``check_leak_by_block`` (the experiment's measurement).
``check_log_snr`` (the log-SNR from ᾱ, a one-line transcription of its definition) is no longer an exercise of the
notebook; it stays registered for teachers who want a warm-up.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sdlearn.exercises.framework import Case, Checker, Mistake, register
from sdlearn.schedules import make_betas, rescale_zero_terminal_snr


def _cosine_reference_f32(T: int, s: float = 0.008, max_beta: float = 0.999, squared: bool = True) -> torch.Tensor:
    """A torch float32 version used to build the mistakes below (the reference is make_betas("cosine"))."""
    u = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((u + s) / (1 + s) * math.pi / 2)
    f = f**2 if squared else f
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta).float()


check_cosine_betas = register(Checker(
    name="check_cosine_betas",
    signature="fn(T) -> betas",
    doc="the cosine schedule of Nichol & Dhariwal 2021 (eq. 17): ᾱ(u) = cos²((u + s)/(1 + s) · π/2) with "
        "s = 0.008 and u = t/T, and β_t = min(1 − ᾱ((t+1)/T) / ᾱ(t/T), 0.999) for t = 0 … T−1, a float32 tensor [T].",
    reference=lambda T: make_betas("cosine", T),
    make_cases=lambda g: [Case(f"T = {T}", (T,)) for T in (1000, 50, 4)],
    hint="compute f = cos²((u + 0.008) / 1.008 · π/2) at u = 0, 1/T, …, 1 (T + 1 points), then β = 1 − f[1:] / f[:-1], "
         "capped at 0.999 with .clamp(max=0.999).",
    mistakes=(
        Mistake(lambda T: _cosine_reference_f32(T, max_beta=1.0), "you did not cap β at 0.999: the last step would then be β = 1, which destroys everything"),
        Mistake(lambda T: _cosine_reference_f32(T, s=0.0), "you left out the small offset s = 0.008, which keeps β tiny near t = 0"),
        Mistake(lambda T: _cosine_reference_f32(T, squared=False), "you used cos instead of cos²"),
    ),
    atol=3e-4,  # float32 cosines near π/2 are only this precise; forgetting the cap is off by 1e-3
    rtol=1e-4,
))


def _alphas_cumprod_inputs(g):
    return [
        Case("alphas_cumprod of Stable Diffusion's schedule (T = 1000)", (torch.cumprod(1 - make_betas("scaled_linear", 1000), 0),)),
        Case("alphas_cumprod of the cosine schedule (T = 50)", (torch.cumprod(1 - make_betas("cosine", 50), 0),)),
        Case("8 random values of ᾱ between 0.01 and 0.99", (torch.rand(8, generator=g) * 0.98 + 0.01,)),
    ]


check_log_snr = register(Checker(
    name="check_log_snr",
    signature="fn(alphas_cumprod) -> log_snr",
    doc="log-SNR_t = log(ᾱ_t / (1 − ᾱ_t)), natural logarithm, a tensor [T]; it may be −inf where ᾱ_t = 0.",
    reference=lambda ac: torch.log(ac) - torch.log1p(-ac),
    make_cases=lambda g: _alphas_cumprod_inputs(g) + [
        Case("alphas_cumprod of Stable Diffusion's schedule rescaled to zero terminal SNR (the last value is 0)",
             (torch.cumprod(1 - rescale_zero_terminal_snr(make_betas("scaled_linear", 1000)), 0),)),
    ],
    hint="torch.log(ac / (1 - ac)), or more precisely torch.log(ac) - torch.log1p(-ac). At ᾱ_t = 0 the answer is −inf.",
    mistakes=(
        Mistake(lambda ac: torch.log10(ac / (1 - ac)), "you used log base 10: the log-SNR uses the natural logarithm, torch.log"),
        Mistake(lambda ac: torch.log(ac.sqrt() / (1 - ac).sqrt()), "you took the log of the amplitude ratio √ᾱ/√(1−ᾱ), which is half the log-SNR"),
        Mistake(lambda ac: torch.log(ac) / torch.log(1 - ac), "you divided the logarithms: log(a / b) is log a − log b"),
    ),
    atol=1e-4,
))


def _zero_snr_cases(g):
    return [
        Case("betas of Stable Diffusion's scaled-linear schedule, T = 1000", (make_betas("scaled_linear", 1000),)),
        Case("betas of the linear schedule, T = 1000", (make_betas("linear", 1000),)),
        Case("betas of the linear schedule, T = 20", (make_betas("linear", 20),)),
    ]


def _rescale_alpha_bar_not_sqrt(betas):
    a = torch.cumprod(1 - betas, 0)
    a = (a - a[-1]) * a[0] / (a[0] - a[-1])
    return 1 - torch.cat([a[:1], a[1:] / a[:-1]])


def _shift_without_scale(betas):
    s = torch.cumprod(1 - betas, 0).sqrt()
    a = (s - s[-1]) ** 2
    return 1 - torch.cat([a[:1], a[1:] / a[:-1]])


def _last_beta_to_one(betas):
    betas = betas.clone()
    betas[-1] = 1.0
    return betas


check_zero_terminal_snr = register(Checker(
    name="check_zero_terminal_snr",
    signature="fn(betas) -> rescaled_betas",
    doc="Lin et al. 2023, Algorithm 1: shift √ᾱ_t so that its last value is 0, scale it so that its first value "
        "is unchanged, square it back to ᾱ_t and recover β_t = 1 − ᾱ_t / ᾱ_{t−1} (β_0 = 1 − ᾱ_0). A tensor [T].",
    reference=rescale_zero_terminal_snr,
    make_cases=_zero_snr_cases,
    hint="s = cumprod(1 − betas).sqrt(); s = (s − s[-1]) · s[0] / (s[0] − s[-1]); ᾱ = s²; α = ᾱ_t / ᾱ_{t−1} "
         "(α_0 = ᾱ_0); return 1 − α.",
    mistakes=(
        Mistake(_last_beta_to_one, "you only set the last β to 1: ᾱ_T becomes 0, but SNR jumps there instead of the whole curve being rescaled"),
        Mistake(_rescale_alpha_bar_not_sqrt, "you shifted and scaled ᾱ_t itself: the algorithm works on √ᾱ_t"),
        Mistake(_shift_without_scale, "you shifted √ᾱ_t without scaling it back, so the first steps no longer keep their signal"),
    ),
    atol=1e-4,
))


# ---- Exercise 2 (derive): the log-SNR of the cosine schedule in closed form ----------------------------------


def _cosine_angle(u: torch.Tensor, s: float) -> torch.Tensor:
    return (u + s) / (1 + s) * math.pi / 2  # the angle inside g(u) = cos²(…)


def _cosine_log_snr_reference(t, T, s):
    """λ at code index t (t + 1 steps taken) of the uncapped cosine schedule, ᾱ = g((t+1)/T) / g(0), from the
    definition λ = log ᾱ − log(1 − ᾱ), in float64."""
    u = torch.as_tensor(t, dtype=torch.float64)
    g_t = torch.cos(_cosine_angle((u + 1) / T, s)) ** 2
    g_0 = math.cos(_cosine_angle(torch.tensor(0.0, dtype=torch.float64), s)) ** 2
    return torch.log(g_t) - torch.log(g_0 - g_t)


def _log_snr_at_index(t, T, s):
    """The mistake of reading code index t as t steps: ᾱ = g(t/T) / g(0)."""
    return _cosine_log_snr_reference(torch.as_tensor(t, dtype=torch.float64) - 1, T, s)


def _without_g0(t, T, s):
    """λ as if ᾱ were g itself: −2 log tan of the angle (the normalisation by g(0) forgotten)."""
    return -2 * torch.log(torch.tan(_cosine_angle((torch.as_tensor(t, dtype=torch.float64) + 1) / T, s)))


def _cosine_log_snr_cases(g):
    return [
        Case("t = 0, 1, …, 998 (float64), T = 1000, s = 0.008: the course's cosine schedule, but its capped last step",
             (torch.arange(999, dtype=torch.float64), 1000, 0.008)),
        Case("t = 0, 1, …, 48 (float64), T = 50, s = 0.008", (torch.arange(49, dtype=torch.float64), 50, 0.008)),
        Case("t = 0, 1, …, 98 (float64), T = 100, s = 0 (no offset)", (torch.arange(99, dtype=torch.float64), 100, 0.0)),
        Case("12 random code indices below 199 (float64), T = 200, s = 0.02",
             (torch.randint(199, (12,), generator=g).double(), 200, 0.02)),
    ]


check_cosine_log_snr = register(Checker(
    name="check_cosine_log_snr",
    signature="fn(t, T, s) -> log_snr",
    doc="the log-SNR λ = log(ᾱ / (1 − ᾱ)) of the uncapped cosine schedule (Nichol & Dhariwal 2021, eq. 17) in "
        "closed form: ᾱ = g(u) / g(0) with g(u) = cos²((u + s)/(1 + s) · π/2), at the code indices ``t`` (a float64 "
        "tensor [K]; index t holds the schedule after t + 1 steps, so u = (t + 1)/T), for ``T`` steps and the "
        "offset ``s``. → a float64 tensor [K].",
    reference=_cosine_log_snr_reference,
    make_cases=_cosine_log_snr_cases,
    hint="with θ = ((t + 1)/T + s)/(1 + s) · π/2 and θ₀ = s/(1 + s) · π/2: 1 − ᾱ = (cos²θ₀ − cos²θ)/cos²θ₀, so "
         "λ = log cos²θ − log(cos²θ₀ − cos²θ), which is also 2 log cos θ − log(sin(θ − θ₀) sin(θ + θ₀)).",
    mistakes=(
        Mistake(_log_snr_at_index, "you took u = t/T: code index t holds the schedule after t + 1 steps "
                "(alphas_cumprod[0] is ᾱ_1 of the maths), so u = (t + 1)/T"),
        Mistake(_without_g0, "you used ᾱ = g(u), forgetting that ᾱ = g(u)/g(0): with s > 0, g(0) < 1, and "
                "1 − ᾱ = (g(0) − g(u))/g(0), not sin²θ; the difference is large at the first steps"),
        Mistake(lambda t, T, s: _cosine_log_snr_reference(t, T, 0.0),
                "you left out the offset s: the angle is ((t + 1)/T + s)/(1 + s) · π/2"),
        Mistake(lambda t, T, s: 0.5 * _cosine_log_snr_reference(t, T, s),
                "your result is half of λ: the log-SNR is the log of the power ratio ᾱ/(1 − ᾱ), not of the amplitude "
                "ratio √ᾱ/√(1 − ᾱ)"),
        Mistake(lambda t, T, s: -_cosine_log_snr_reference(t, T, s),
                "your sign is flipped: λ = log ᾱ − log(1 − ᾱ) is large and positive at the first, least noisy steps"),
    ),
    atol=1e-6,
    rtol=1e-6,
))


# ---- Exercise 4 (experiment): which scales of the image leak into x_T ----------------------------------------


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def _leak_with(pool=F.avg_pool2d, correlation=_pearson, merge_channels=False):
    def leak(x0, x_T, sizes):
        if merge_channels:
            x0, x_T = x0.mean(dim=1, keepdim=True), x_T.mean(dim=1, keepdim=True)
        return torch.tensor([correlation(pool(x0, k), pool(x_T, k)) for k in sizes])
    return leak


def _cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float((a * b).sum() / (a.norm() * b.norm()))


def _leak_cases(g):
    def smooth_images(n, size):
        coarse = torch.rand(n, 3, size // 4, size // 4, generator=g) * 1.2 - 0.9  # mean −0.3, like a dark background
        return F.interpolate(coarse, scale_factor=4, mode="nearest")             # [n, 3, size, size]

    cases = []
    x0 = smooth_images(64, 16)
    noise = torch.randn(x0.shape, generator=g)
    a = 0.05
    cases.append(Case("x0: 64 images [3, 16, 16] made of 4×4 blocks, mean about −0.3; x_T = √0.05 · x0 + √0.95 · noise; "
                      "sizes = [1, 2, 4, 8, 16]", (x0, math.sqrt(a) * x0 + math.sqrt(1 - a) * noise, [1, 2, 4, 8, 16])))
    x0 = smooth_images(32, 8)
    cases.append(Case("x0: 32 images [3, 8, 8]; x_T = x0 (no noise at all: every correlation is 1); sizes = [1, 8]",
                      (x0, x0.clone(), [1, 8])))
    x0 = smooth_images(48, 32)
    cases.append(Case("x0: 48 images [3, 32, 32]; x_T = √0.3 · x0 + √0.7 · noise; sizes = [4, 1, 32] (in that order)",
                      (x0, math.sqrt(0.3) * x0 + math.sqrt(0.7) * torch.randn(x0.shape, generator=g), [4, 1, 32])))
    return cases


check_leak_by_block = register(Checker(
    name="check_leak_by_block",
    signature="fn(x0, x_T, sizes) -> correlations",
    doc="how much of each scale of the images survives in x_T: for each block size k in ``sizes``, average ``x0`` and "
        "``x_T`` (each [N, 3, H, W]) over k × k blocks of each channel (F.avg_pool2d(x, k)), and take the Pearson "
        "correlation of the two pooled tensors' values (all images, channels and blocks together). → a tensor "
        "[len(sizes)], the correlations in the order of ``sizes``.",
    reference=_leak_with(),
    make_cases=_leak_cases,
    hint="for k in sizes: a = F.avg_pool2d(x0, k).flatten(); b = F.avg_pool2d(x_T, k).flatten(); subtract each "
         "one's mean; r = (a · b) / (‖a‖ ‖b‖) (or torch.corrcoef(torch.stack([a, b]))[0, 1]); return "
         "torch.tensor([...]).",
    mistakes=(
        Mistake(_leak_with(correlation=_cosine_similarity),
                "you did not subtract the means: that is the cosine similarity, which a dark background (a mean far "
                "from 0) pushes towards 1 whatever the noise; the Pearson correlation centres both first"),
        Mistake(_leak_with(pool=F.max_pool2d), "you took the maximum of each block; average it (F.avg_pool2d): "
                "averaging is what shrinks the noise while keeping the coarse image"),
        Mistake(_leak_with(merge_channels=True), "you averaged the three channels together first; pool each channel "
                "on its own (F.avg_pool2d does so) and correlate all of the pooled values"),
    ),
    atol=1e-4,
    rtol=1e-4,
))
