"""Checkers of notebook 02, noise schedules: the cosine schedule, the log-SNR, zero terminal SNR.

In the order the notebook uses them: ``check_cosine_betas``, ``check_log_snr``, ``check_zero_terminal_snr``.
"""

from __future__ import annotations

import math

import torch

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
