"""Checkers of notebook 06, samplers: the DDPM posterior mean, a DDIM step, a Heun step.

In the order the notebook uses them: ``check_ddpm_posterior_mean`` (derive: the mean of q(x_{t'} | x_t, x0), by
completing the square), ``check_ddim_step`` and ``check_heun_step`` (implement).
"""

from __future__ import annotations

import torch

from sdlearn.exercises.framework import (
    Case,
    Checker,
    Mistake,
    format_shape,
    random_images,
    register,
    sd_alphas_cumprod,
)


def _posterior_mean_reference(x0, x_t, alpha_bar_t, alpha_bar_prev):
    alpha_t = alpha_bar_t / alpha_bar_prev  # α over the stride from t' to t
    beta_t = 1 - alpha_t
    return (alpha_bar_prev.sqrt() * beta_t / (1 - alpha_bar_t) * x0
            + alpha_t.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar_t) * x_t)


def _posterior_mean_cases(g):
    ac = sd_alphas_cumprod()
    cases = []
    for shape, t, t_prev in (((4, 3, 8, 8), 500, 499), ((2, 4, 8, 8), 999, 949), ((3, 3, 4, 4), 1, 0), ((2, 3, 4, 4), 20, None)):
        a_prev = ac[t_prev] if t_prev is not None else torch.tensor(1.0)
        what = f"alpha_bar_prev = ᾱ_{t_prev}" if t_prev is not None else "alpha_bar_prev = 1 (the last step, to clean data)"
        x0 = random_images(g, *shape)
        cases.append(Case(f"x0 and x_t of shape {format_shape(x0)}, alpha_bar_t = ᾱ_{t} = {ac[t].item():.4g}, {what} "
                          "(Stable Diffusion's schedule)",
                          (x0, torch.randn(shape, generator=g), ac[t], a_prev)))
    return cases


def _posterior_mean_without_stride(x0, x_t, alpha_bar_t, alpha_bar_prev):
    alpha_t = alpha_bar_t  # ᾱ_t used where α_t = ᾱ_t / ᾱ_{t'} belongs
    return (alpha_bar_prev.sqrt() * (1 - alpha_t) / (1 - alpha_bar_t) * x0
            + alpha_t.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar_t) * x_t)


check_ddpm_posterior_mean = register(Checker(
    name="check_ddpm_posterior_mean",
    signature="fn(x0, x_t, alpha_bar_t, alpha_bar_prev) -> mean",
    doc="the mean of the DDPM posterior q(x_{t'} | x_t, x0) (Ho et al. 2020, eq. 7): with α_t = ᾱ_t / ᾱ_{t'} and "
        "β_t = 1 − α_t, μ̃ = √ᾱ_{t'} β_t / (1 − ᾱ_t) · x0 + √α_t (1 − ᾱ_{t'}) / (1 − ᾱ_t) · x_t. ``x0`` and ``x_t`` "
        "have the same shape; ``alpha_bar_t`` and ``alpha_bar_prev`` (ᾱ_{t'}, the next, less noisy timestep) are 0-d tensors.",
    reference=_posterior_mean_reference,
    make_cases=_posterior_mean_cases,
    hint="first compute α_t = alpha_bar_t / alpha_bar_prev and β_t = 1 − α_t (the stride may be more than one step); "
         "x0's weight has √ᾱ_{t'} and β_t, x_t's has √α_t and 1 − ᾱ_{t'}; both are divided by 1 − ᾱ_t.",
    mistakes=(
        Mistake(_posterior_mean_without_stride, "you used ᾱ_t where α_t = ᾱ_t / ᾱ_{t'} belongs"),
        Mistake(lambda x0, x_t, a, a_prev: _posterior_mean_reference(x_t, x0, a, a_prev),
                "you swapped x0 and x_t: x0 is weighted by √ᾱ_{t'} β_t / (1 − ᾱ_t)"),
        Mistake(lambda x0, x_t, a, a_prev: (a_prev * (1 - a / a_prev) / (1 - a) * x0 + (a / a_prev) * (1 - a_prev) / (1 - a) * x_t),
                "you forgot the square roots on ᾱ_{t'} and α_t"),
        Mistake(lambda x0, x_t, a, a_prev: (a.sqrt() * (1 - a / a_prev) / (1 - a) * x0
                                            + (a / a_prev).sqrt() * (1 - a_prev) / (1 - a) * x_t),
                "you weighted x0 by √ᾱ_t instead of √ᾱ_{t'} (the timestep you are stepping to)"),
        Mistake(lambda x0, x_t, a, a_prev: (a_prev.sqrt() * (1 - a / a_prev) / (1 - a) * x0
                                            + (1 - a_prev) / (1 - a) * x_t),
                "x_t's weight lacks √α_t: q(x_t | x_{t'}) has mean √α_t x_{t'}, so the term of the exponent linear in "
                "x_{t'} is √α_t x_t / β_t, not x_t / β_t"),
        Mistake(lambda x0, x_t, a, a_prev: (a_prev.sqrt() * (1 - a / a_prev) / (1 - a_prev) * x0
                                            + (a / a_prev).sqrt() * (1 - a_prev) / (1 - a_prev) * x_t),
                "you divided by 1 − ᾱ_{t'}: the mean is the variance β̃_t = (1 − ᾱ_{t'}) β_t / (1 − ᾱ_t) times the sum of "
                "the linear terms, so both weights are divided by 1 − ᾱ_t"),
    ),
    atol=1e-5,
))


def _ddim_reference(x_t, eps, alpha_bar_t, alpha_bar_prev, eta, noise, forget_sigma_in_direction=False):
    x0 = (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()  # predicted x₀
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)).sqrt()  # eq. 16
    direction = (1 - alpha_bar_prev - (0 if forget_sigma_in_direction else sigma**2)).sqrt() * eps
    return alpha_bar_prev.sqrt() * x0 + direction + sigma * noise


def _ddim_cases(g):
    ac = sd_alphas_cumprod()
    cases = []
    for shape, t, t_prev, eta in (((4, 3, 8, 8), 600, 550, 0.0), ((2, 4, 8, 8), 999, 899, 0.5), ((3, 3, 4, 4), 300, 250, 1.0),
                                  ((2, 3, 4, 4), 40, None, 1.0)):
        a_prev = ac[t_prev] if t_prev is not None else torch.tensor(1.0)
        what = f"alpha_bar_prev = ᾱ_{t_prev}" if t_prev is not None else "alpha_bar_prev = 1 (the last step)"
        x_t = torch.randn(shape, generator=g)
        cases.append(Case(f"x_t, eps and noise of shape {format_shape(x_t)}, alpha_bar_t = ᾱ_{t}, {what}, eta = {eta} "
                          "(Stable Diffusion's schedule)",
                          (x_t, torch.randn(shape, generator=g), ac[t], a_prev, eta, torch.randn(shape, generator=g))))
    return cases


check_ddim_step = register(Checker(
    name="check_ddim_step",
    signature="fn(x_t, eps, alpha_bar_t, alpha_bar_prev, eta, noise) -> x_prev",
    doc="one DDIM step (Song et al. 2021, eqs. 12 and 16): x̂0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t, "
        "σ = η √((1−ᾱ_{t'})/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t'}), and x_{t'} = √ᾱ_{t'} x̂0 + √(1 − ᾱ_{t'} − σ²) ε + σ·noise. "
        "``alpha_bar_t`` and ``alpha_bar_prev`` are 0-d tensors, ``eta`` a float ≥ 0, ``noise`` has the shape of ``x_t``.",
    reference=_ddim_reference,
    make_cases=_ddim_cases,
    hint="three terms: the predicted x̂0 noised to t' (√ᾱ_{t'} x̂0), the 'direction pointing to x_t' "
         "(√(1 − ᾱ_{t'} − σ²) ε), and fresh noise σ·noise. With eta = 0, σ = 0.",
    mistakes=(
        Mistake(lambda x_t, eps, a, a_prev, eta, noise: _ddim_reference(x_t, eps, a, a, eta, noise),
                "you used ᾱ_t where ᾱ_{t'} (alpha_bar_prev, the timestep you step to) belongs"),
        Mistake(lambda x_t, eps, a, a_prev, eta, noise: a_prev.sqrt() * x_t + (1 - a_prev).sqrt() * eps,
                "you noised x_t itself: the first term is √ᾱ_{t'} times the predicted clean image x̂0"),
        Mistake(lambda x_t, eps, a, a_prev, eta, noise: _ddim_reference(x_t, eps, a, a_prev, eta, noise, forget_sigma_in_direction=True),
                "you forgot to subtract σ² inside the direction term: the noise σ·noise takes its share of the variance"),
        Mistake(lambda x_t, eps, a, a_prev, eta, noise: _ddim_reference(x_t, eps, a, a_prev, eta, torch.zeros_like(noise)),
                "you left out the fresh noise σ·noise"),
    ),
    atol=1e-5,
))


def _heun_reference(x, sigma, sigma_next, denoise):
    d = (x - denoise(x, sigma)) / sigma  # dx/dσ at the start
    x_euler = x + (sigma_next - sigma) * d
    if sigma_next == 0:
        return x_euler  # the last step, to σ = 0, is a plain Euler step
    d_next = (x_euler - denoise(x_euler, sigma_next)) / sigma_next  # dx/dσ at the Euler proposal
    return x + (sigma_next - sigma) * (d + d_next) / 2


def _toy_denoiser(x, sigma):
    """A smooth non-linear stand-in for D(x; σ): shrinks large noise, bends values towards ±0.7."""
    return 0.7 * torch.tanh(2 * x / (1 + sigma**2))


def _gaussian_denoiser(x, sigma):
    """The exact D(x; σ) for data N(0.5, 0.3²): 0.5 + 0.09 / (0.09 + σ²) · (x − 0.5)."""
    return 0.5 + 0.09 / (0.09 + sigma**2) * (x - 0.5)


def _heun_cases(g):
    cases = []
    for shape, sigma, sigma_next, denoise, what in (
            ((4, 3, 8, 8), 14.6, 7.0, _toy_denoiser, "a toy denoiser"),
            ((2, 4, 8, 8), 1.2, 0.6, _gaussian_denoiser, "the exact denoiser for data N(0.5, 0.3²)"),
            ((3, 1, 4, 4), 0.4, 0.1, _toy_denoiser, "a toy denoiser"),
            ((2, 3, 4, 4), 0.03, 0.0, _gaussian_denoiser, "the exact denoiser for data N(0.5, 0.3²)")):
        x = torch.randn(shape, generator=g) * (sigma**2 + 1) ** 0.5
        cases.append(Case(f"x of shape {format_shape(x)}, sigma = {sigma}, sigma_next = {sigma_next}, denoise = {what}",
                          (x, sigma, sigma_next, denoise)))
    return cases


def _euler_only(x, sigma, sigma_next, denoise):
    return x + (sigma_next - sigma) * (x - denoise(x, sigma)) / sigma


def _heun_slope_at_wrong_sigma(x, sigma, sigma_next, denoise):
    d = (x - denoise(x, sigma)) / sigma
    x_euler = x + (sigma_next - sigma) * d
    if sigma_next == 0:
        return x_euler
    d_next = (x_euler - denoise(x_euler, sigma)) / sigma
    return x + (sigma_next - sigma) * (d + d_next) / 2


def _heun_second_slope_only(x, sigma, sigma_next, denoise):
    d = (x - denoise(x, sigma)) / sigma
    x_euler = x + (sigma_next - sigma) * d
    if sigma_next == 0:
        return x_euler
    return x + (sigma_next - sigma) * (x_euler - denoise(x_euler, sigma_next)) / sigma_next


check_heun_step = register(Checker(
    name="check_heun_step",
    signature="fn(x, sigma, sigma_next, denoise) -> x_next",
    doc="one step of Heun's method on the probability-flow ODE dx/dσ = (x − D(x; σ)) / σ (Karras et al. 2022, "
        "Algorithm 1): the slope d at (x, σ), an Euler proposal x̃ = x + (σ_next − σ) d, the slope d' at (x̃, σ_next), "
        "then x + (σ_next − σ)(d + d')/2; when ``sigma_next`` is 0 the step is the Euler proposal alone. ``x`` is the "
        "σ-space state x₀ + σε, ``sigma`` and ``sigma_next`` are floats, ``denoise(x, sigma)`` returns x̂₀.",
    reference=_heun_reference,
    make_cases=_heun_cases,
    hint="call denoise twice: at (x, sigma) and at the Euler proposal (x̃, sigma_next); average the two slopes "
         "(x − x̂₀)/σ. At sigma_next = 0 the second slope would divide by zero: return the Euler proposal.",
    mistakes=(
        Mistake(_euler_only, "you took a plain Euler step: Heun corrects it with the slope at the proposal"),
        Mistake(_heun_slope_at_wrong_sigma, "you evaluated the second slope at sigma: the proposal lives at sigma_next"),
        Mistake(_heun_second_slope_only, "you used only the second slope: Heun averages the slopes at both ends"),
    ),
    atol=1e-5,
    rtol=1e-4,
))
