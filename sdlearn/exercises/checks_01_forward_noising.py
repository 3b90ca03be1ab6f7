"""Checkers of notebook 01, the forward process: ᾱ_t, the closed-form noising, and undoing it.

In the order the notebook uses them: ``check_alphas_cumprod`` (implement), ``check_jump`` (derive: q(x_t | x_t'),
the jump between two noisy steps), ``check_x0_from_noise`` (implement). ``check_add_noise`` (the one jump for a batch with
one t per image) is no longer an exercise of the notebook, which builds that jump above its exercises; it stays for the
framework's own examples and tests.
"""

from __future__ import annotations

import torch

from sdlearn.exercises.framework import (
    Case,
    Checker,
    Mistake,
    format_shape,
    per_sample,
    random_images,
    register,
)
from sdlearn.schedules import make_betas


def _alphas_cumprod_cases(g):
    return [
        Case("betas of the linear schedule, T = 1000 (1e-4 → 0.02)", (make_betas("linear", 1000),)),
        Case("betas of the cosine schedule, T = 50", (make_betas("cosine", 50),)),
        Case("10 random betas between 0 and 0.5", (torch.rand(10, generator=g) * 0.5,)),
        Case("a single beta, 0.3 (T = 1)", (torch.tensor([0.3]),)),
    ]


check_alphas_cumprod = register(Checker(
    name="check_alphas_cumprod",
    signature="fn(betas) -> alphas_cumprod",
    doc="ᾱ_t = ∏_{i≤t} (1 − β_i) for every t, a tensor of the same shape [T] as ``betas`` (DDPM, eq. 4).",
    reference=lambda betas: torch.cumprod(1 - betas, dim=0),
    make_cases=_alphas_cumprod_cases,
    hint="α_t = 1 − β_t, and ᾱ_t is the running product α_0·α_1·…·α_t: see torch.cumprod.",
    mistakes=(
        Mistake(lambda betas: torch.cumprod(betas, dim=0), "you multiplied the betas instead of the alphas α_t = 1 − β_t"),
        Mistake(lambda betas: 1 - torch.cumprod(betas, dim=0), "you computed 1 − ∏β instead of ∏(1 − β)"),
        Mistake(lambda betas: torch.cat([torch.ones(1), torch.cumprod(1 - betas, dim=0)[:-1]]),
                "your product stops one step early: ᾱ_t includes α_t itself, so ᾱ_0 = α_0 = 1 − β_0"),
        Mistake(lambda betas: 1 - torch.cumsum(betas, dim=0), "you subtracted the sum of the betas instead of multiplying the alphas"),
    ),
))


def _add_noise_cases(g):
    ac = make_betas("scaled_linear", 1000)
    ac = torch.cumprod(1 - ac, dim=0)
    cases = []
    for shape, t in (((4, 3, 8, 8), [0, 10, 500, 999]), ((1, 3, 16, 16), [999]), ((3, 4, 8, 8), [250, 250, 750]),
                     ((2, 3, 4, 4), [1, 998])):
        x0 = random_images(g, *shape)
        cases.append(Case(f"x0 of shape {format_shape(x0)}, noise of the same shape, t = {t}, "
                          "alphas_cumprod of Stable Diffusion's schedule (T = 1000)",
                          (x0, torch.randn(shape, generator=g), torch.tensor(t), ac)))
    return cases


def _add_noise_reference(x0, noise, t, alphas_cumprod):
    a = per_sample(alphas_cumprod[t], x0)  # [B, 1, 1, 1]
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


check_add_noise = register(Checker(
    name="check_add_noise",
    signature="fn(x0, noise, t, alphas_cumprod) -> x_t",
    doc="the closed form x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (DDPM, eq. 4) for a batch: ``x0`` and ``noise`` are "
        "[B, C, H, W], ``t`` a long tensor [B] of timesteps (one per image), ``alphas_cumprod`` the tensor [T].",
    reference=_add_noise_reference,
    make_cases=_add_noise_cases,
    hint="index alphas_cumprod with t to get one ᾱ_t per image (shape [B]), reshape it to [B, 1, 1, 1] so that "
         "it multiplies whole images, and remember that both coefficients are square roots.",
    mistakes=(
        Mistake(lambda x0, noise, t, ac: per_sample(ac[t], x0) * x0 + (1 - per_sample(ac[t], x0)) * noise,
                "you used ᾱ_t and 1 − ᾱ_t where their square roots belong"),
        Mistake(lambda x0, noise, t, ac: (1 - per_sample(ac[t], x0)).sqrt() * x0 + per_sample(ac[t], x0).sqrt() * noise,
                "you swapped the coefficients: x0 gets √ᾱ_t (large at small t), the noise gets √(1 − ᾱ_t)"),
        Mistake(lambda x0, noise, t, ac: _add_noise_reference(x0, noise, t - 1, ac),
                "you looked up alphas_cumprod[t − 1]: timesteps are 0-based indices, use alphas_cumprod[t]"),
        Mistake(lambda x0, noise, t, ac: _add_noise_reference(x0, noise, t[:1].expand_as(t), ac),
                "you used the first image's timestep for the whole batch: each image has its own t"),
    ),
))


def _jump_ratio(alphas_cumprod, t_prev, t, like):
    """ᾱ_t / ᾱ_t' per sample, reshaped to broadcast over ``like``: the product α_{t'+1} ⋯ α_t of the steps after t'."""
    return per_sample(alphas_cumprod[t] / alphas_cumprod[t_prev], like)


def _jump_reference(x_prev, noise, t_prev, t, alphas_cumprod):
    a = _jump_ratio(alphas_cumprod, t_prev, t, x_prev)  # [B, 1, 1, 1]
    return a.sqrt() * x_prev + (1 - a).sqrt() * noise


def _jump_cases(g):
    ac = torch.cumprod(1 - make_betas("scaled_linear", 1000), dim=0)
    linear = torch.cumprod(1 - make_betas("linear", 1000), dim=0)
    cases = []
    for shape, t_prev, t, table, name in (
        ((4, 3, 8, 8), [0, 10, 300, 500], [999, 20, 600, 900], ac, "Stable Diffusion's schedule"),
        ((3, 3, 4, 4), [0, 499, 998], [1, 500, 999], ac, "Stable Diffusion's schedule (one step each: t = t' + 1)"),
        ((2, 4, 8, 8), [100, 700], [900, 700], linear, "the linear schedule (the second image: t = t')"),
    ):
        x_prev = torch.randn(shape, generator=g)
        cases.append(Case(f"x_prev of shape {format_shape(x_prev)}, noise of the same shape, t_prev = {t_prev}, "
                          f"t = {t}, alphas_cumprod of {name}, T = 1000",
                          (x_prev, torch.randn(shape, generator=g), torch.tensor(t_prev), torch.tensor(t), table)))
    return cases


def _jump_from_step_t_prev_on(x_prev, noise, t_prev, t, ac):
    before = torch.cat([torch.ones(1, dtype=ac.dtype), ac])[t_prev]  # ᾱ_{t'−1}, with ᾱ before the first step = 1
    a = per_sample(ac[t] / before, x_prev)
    return a.sqrt() * x_prev + (1 - a).sqrt() * noise


check_jump = register(Checker(
    name="check_jump",
    signature="fn(x_prev, noise, t_prev, t, alphas_cumprod) -> x_t",
    doc="the jump from one noisy step to a later one, a sample of q(x_t | x_t') = N(√(ᾱ_t/ᾱ_t')·x_t', (1 − ᾱ_t/ᾱ_t') I) "
        "for t' ≤ t (DDPM's Markov chain, eq. 2, run from step t' + 1 to step t): ``x_prev`` (x_t') and ``noise`` are "
        "[B, C, H, W], ``t_prev`` (t') and ``t`` long tensors [B] of 0-based timesteps (one pair per image), "
        "``alphas_cumprod`` the tensor [T].",
    reference=_jump_reference,
    make_cases=_jump_cases,
    hint="the steps t'+1, …, t shrink x_t' by √(α_{t'+1}⋯α_t) = √(ᾱ_t/ᾱ_t'), and their noise merges into one Gaussian "
         "whose variance keeps the total variance preserving: 1 − ᾱ_t/ᾱ_t'. Index alphas_cumprod with t_prev and t "
         "and reshape the ratio to [B, 1, 1, 1].",
    mistakes=(
        Mistake(lambda x_prev, noise, t_prev, t, ac: (per_sample(ac[t], x_prev).sqrt() * x_prev
                                                      + (1 - per_sample(ac[t], x_prev)).sqrt() * noise),
                "you applied the jump from x_0 (√ᾱ_t) to x_t': from step t' only the steps t'+1 … t remain, whose "
                "product is ᾱ_t/ᾱ_t'"),
        Mistake(lambda x_prev, noise, t_prev, t, ac: (_jump_ratio(ac, t_prev, t, x_prev).sqrt() * x_prev
                                                      + per_sample(ac[t_prev] - ac[t], x_prev).clamp(min=0).sqrt() * noise),
                "you took the fresh noise's variance as (1 − ᾱ_t) − (1 − ᾱ_t') = ᾱ_t' − ᾱ_t: but the noise already in "
                "x_t' is shrunk by √(ᾱ_t/ᾱ_t') like the rest of x_t', so the fresh noise must bring the variance up "
                "to 1 − ᾱ_t/ᾱ_t'"),
        Mistake(_jump_from_step_t_prev_on,
                "your product starts at α_t': x_t' has already taken step t', so the remaining steps are t'+1 … t "
                "and their product is ᾱ_t/ᾱ_t'"),
        Mistake(lambda x_prev, noise, t_prev, t, ac: (_jump_ratio(ac, t_prev, t, x_prev) * x_prev
                                                      + (1 - _jump_ratio(ac, t_prev, t, x_prev)) * noise),
                "you used ᾱ_t/ᾱ_t' and 1 − ᾱ_t/ᾱ_t' where their square roots belong"),
        Mistake(lambda x_prev, noise, t_prev, t, ac: _jump_reference(x_prev, noise, t_prev[:1].expand_as(t_prev),
                                                                     t[:1].expand_as(t), ac),
                "you used the first image's t_prev and t for the whole batch: each image has its own pair"),
    ),
))


def _x0_from_noise_cases(g):
    ac = torch.cumprod(1 - make_betas("scaled_linear", 1000), dim=0)
    cases = []
    for shape, t in (((4, 3, 8, 8), [0, 10, 500, 900]), ((2, 4, 8, 8), [300, 300]), ((1, 3, 16, 16), [999])):
        x_t = torch.randn(shape, generator=g)
        cases.append(Case(f"x_t of shape {format_shape(x_t)}, noise of the same shape, t = {t}, "
                          "alphas_cumprod of Stable Diffusion's schedule (T = 1000)",
                          (x_t, torch.randn(shape, generator=g), torch.tensor(t), ac)))
    return cases


def _x0_from_noise_reference(x_t, noise, t, alphas_cumprod):
    a = per_sample(alphas_cumprod[t], x_t)  # [B, 1, 1, 1]
    return (x_t - (1 - a).sqrt() * noise) / a.sqrt()


check_x0_from_noise = register(Checker(
    name="check_x0_from_noise",
    signature="fn(x_t, noise, t, alphas_cumprod) -> x0",
    doc="undo the closed form: knowing the noise ε that was added, x0 = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t. "
        "Shapes as in ``check_add_noise``. This is how a model that predicts ε gives a guess of the clean image.",
    reference=_x0_from_noise_reference,
    make_cases=_x0_from_noise_cases,
    hint="solve x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε for x0, with ᾱ_t = alphas_cumprod[t] reshaped to [B, 1, 1, 1].",
    mistakes=(
        Mistake(lambda x_t, noise, t, ac: x_t - noise, "you subtracted the noise without its coefficient √(1−ᾱ_t) and without dividing by √ᾱ_t"),
        Mistake(lambda x_t, noise, t, ac: (x_t - (1 - per_sample(ac[t], x_t)).sqrt() * noise) * per_sample(ac[t], x_t).sqrt(),
                "you multiplied by √ᾱ_t where you should divide by it"),
        Mistake(lambda x_t, noise, t, ac: (x_t - (1 - per_sample(ac[t], x_t)) * noise) / per_sample(ac[t], x_t),
                "you used ᾱ_t and 1 − ᾱ_t where their square roots belong"),
    ),
    rtol=1e-4,
    atol=1e-4,  # at t = 999, dividing by √ᾱ_t ≈ 0.07 magnifies float32 rounding
))
