"""Checkers of notebook 09, code review: a schedule's sanity test, the DDPM reverse step, the false-alarm rate of a
statistical test, batched guidance.

In the order the notebook uses them: ``check_schedule_sanity``, ``check_ddpm_reverse_step``, ``check_false_alarm_rate``,
``check_cfg_batched``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from sdlearn.exercises.framework import (
    Case,
    Checker,
    Mistake,
    check,
    difference,
    format_shape,
    register,
    sd_alphas_cumprod,
)
from sdlearn.schedules import make_betas, rescale_zero_terminal_snr


def _schedule_usable_reference(betas):
    alphas_cumprod = torch.cumprod(1 - betas.double(), dim=0)
    return bool(((betas > 0) & (betas <= 1)).all() and (betas[1:] >= betas[:-1]).all()
                 and alphas_cumprod[0] > 0.9 and alphas_cumprod[-1] < 0.05)


def _schedule_usable_cases(g):
    sd = make_betas("scaled_linear", 1000)
    return [
        Case("Stable Diffusion's scaled-linear schedule, T = 1000", (sd,)),
        Case("a constant schedule, β = 0.01 at every one of T = 1000 steps (ᾱ ends at 4e-5)", (torch.full((1000,), 0.01),)),
        Case("Stable Diffusion's schedule played backwards: β from 0.012 down to 0.00085, T = 1000", (sd.flip(0),)),
        Case("the scaled-linear schedule with only T = 50 steps (ᾱ at the end is 0.76)", (make_betas("scaled_linear", 50),)),
        Case("β evenly spaced from 1 down to 0.0001, T = 1000", (torch.linspace(1.0, 1e-4, 1000),)),
        Case("Stable Diffusion's schedule rescaled to zero terminal SNR (its last β is exactly 1)",
             (rescale_zero_terminal_snr(sd),)),
        Case("β evenly spaced from 0.2 to 0.3, T = 100", (make_betas("linear", 100, 0.2, 0.3),)),
        Case("the cosine schedule, T = 1000", (make_betas("cosine", 1000),)),
        Case("β evenly spaced from 0.0001 to 1.5, T = 1000 (some β above 1)", (torch.linspace(1e-4, 1.5, 1000),)),
    ]


def _usable_without(betas, skip):
    a = torch.cumprod(1 - betas.double(), dim=0)
    checks = {"range": bool(((betas > 0) & (betas <= 1)).all()), "monotone": bool((betas[1:] >= betas[:-1]).all()),
              "start": bool(a[0] > 0.9), "end": bool(a[-1] < 0.05)}
    return all(ok for name, ok in checks.items() if name not in skip)


check_schedule_sanity = register(Checker(
    name="check_schedule_sanity",
    signature="fn(betas) -> bool",
    doc="a test, written as a function: True when the schedule β_1..β_T (a float tensor [T]) can train a diffusion "
        "model, False when it cannot. Usable means all four of: every β lies in (0, 1]; β never decreases; "
        "ᾱ_0 = 1 − β_1 > 0.9 (the least noisy input still shows the image); ᾱ_{T−1} < 0.05 (the last step is close "
        "to pure noise, where sampling starts).",
    reference=_schedule_usable_reference,
    make_cases=_schedule_usable_cases,
    hint="compute alphas_cumprod = torch.cumprod(1 - betas, dim=0), then check the four conditions: "
         "((betas > 0) & (betas <= 1)).all(), (betas[1:] >= betas[:-1]).all(), alphas_cumprod[0] > 0.9 and "
         "alphas_cumprod[-1] < 0.05; return True only when all four hold (as a bool).",
    mistakes=(
        Mistake(lambda betas: _usable_without(betas, {"range"}),
                "you did not check that every β lies in (0, 1]: a β above 1 makes 1 − β negative, and ᾱ meaningless"),
        Mistake(lambda betas: _usable_without(betas, {"start", "end"}),
                "you only checked that β lies in (0, 1] and never decreases: a schedule can grow the right way and "
                "still end far from pure noise (too few steps), or destroy the image at its first step"),
        Mistake(lambda betas: _usable_without(betas, {"monotone"}),
                "you checked only the ends of ᾱ: a schedule played backwards has the same ᾱ at both ends, "
                "but β must never decrease"),
        Mistake(lambda betas: _usable_without(betas, set()) and bool((betas[1:] > betas[:-1]).all()),
                "you required β to grow strictly: a constant β is fine, it only must never decrease (use >=)"),
        Mistake(lambda betas: _usable_without(betas, set()) and bool((betas < 1).all()),
                "you required every β < 1: β = 1 at the last step is allowed (zero terminal SNR schedules end "
                "in pure noise that way)"),
    ),
))


def _ddpm_reverse_step_reference(x_t, eps, alpha_bar_t, alpha_bar_prev, noise, variance="posterior", keep_noise=True,
                                 alpha_bar_in_mean=False):
    alpha_t = alpha_bar_t / alpha_bar_prev  # α over the stride from t' to t
    beta_t = 1 - alpha_t
    a = alpha_bar_t if alpha_bar_in_mean else alpha_t  # the mistake below puts ᾱ_t where α_t belongs
    mean = (x_t - (1 - a) / (1 - alpha_bar_t).sqrt() * eps) / a.sqrt()  # Ho et al. 2020, eq. 11
    var = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t if variance == "posterior" else beta_t  # β̃ (eq. 7) or β
    return mean + var.sqrt() * noise if keep_noise else mean


def _ddpm_reverse_step_cases(g):
    ac = sd_alphas_cumprod()
    cases = []
    for shape, t, t_prev in (((4, 4, 8, 8), 500, 450), ((2, 4, 8, 8), 950, 900), ((3, 1, 16), 999, 998),
                             ((2, 4, 8, 8), 50, 0), ((3, 4, 4, 4), 20, None)):
        a_prev = ac[t_prev] if t_prev is not None else torch.tensor(1.0)
        what = f"alpha_bar_prev = ᾱ_{t_prev}" if t_prev is not None else "alpha_bar_prev = 1 (the last step, to clean data)"
        x_t = torch.randn(shape, generator=g)
        cases.append(Case(f"x_t, eps and noise of shape {format_shape(x_t)}, alpha_bar_t = ᾱ_{t} = {ac[t].item():.4g}, {what} "
                          "(Stable Diffusion's schedule)",
                          (x_t, torch.randn(shape, generator=g), ac[t], a_prev, torch.randn(shape, generator=g))))
    return cases


check_ddpm_reverse_step = register(Checker(
    name="check_ddpm_reverse_step",
    signature="fn(x_t, eps, alpha_bar_t, alpha_bar_prev, noise) -> x_prev",
    doc="one DDPM reverse step from t to t' written with the predicted noise ε (Ho et al. 2020, eq. 11 and Algorithm 2): "
        "with α_t = ᾱ_t / ᾱ_{t'} and β_t = 1 − α_t, x_{t'} = (x_t − β_t / √(1 − ᾱ_t) · ε) / √α_t + σ·noise, where "
        "σ² = β̃ = (1 − ᾱ_{t'}) / (1 − ᾱ_t) · β_t is the posterior variance (zero at the last step, where ᾱ_{t'} = 1). "
        "``alpha_bar_t`` and ``alpha_bar_prev`` are 0-d tensors; ``eps`` and ``noise`` have the shape of ``x_t``.",
    reference=_ddpm_reverse_step_reference,
    make_cases=_ddpm_reverse_step_cases,
    hint="compute α_t = alpha_bar_t / alpha_bar_prev first (the stride may be longer than one step); the mean "
         "divides by √α_t, not √ᾱ_t; then add √β̃ · noise with β̃ = (1 − alpha_bar_prev) / (1 − alpha_bar_t) · β_t.",
    mistakes=(
        Mistake(lambda x_t, eps, a, a_prev, noise: (x_t - (1 - a).sqrt() * eps) / a.sqrt(),
                "you returned the predicted clean image x̂₀ = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t: that is where the step "
                "aims, not where it lands; the step moves only part of the way, to t'"),
        Mistake(lambda x_t, eps, a, a_prev, noise: _ddpm_reverse_step_reference(x_t, eps, a, a_prev, noise, alpha_bar_in_mean=True),
                "you used ᾱ_t where α_t = ᾱ_t / ᾱ_{t'} belongs (the two agree only for the very last step)"),
        Mistake(lambda x_t, eps, a, a_prev, noise: _ddpm_reverse_step_reference(x_t, eps, a, a_prev, noise, keep_noise=False),
                "you left out the fresh noise σ·noise: without it every sample drifts to the same few images"),
        Mistake(lambda x_t, eps, a, a_prev, noise: _ddpm_reverse_step_reference(x_t, eps, a, a_prev, noise, variance="beta"),
                "you used β_t as the variance (DDPM's 'fixed_large' choice); this step uses the posterior variance "
                "β̃ = (1 − ᾱ_{t'}) / (1 − ᾱ_t) · β_t"),
        Mistake(lambda x_t, eps, a, a_prev, noise: (_ddpm_reverse_step_reference(x_t, eps, a, a_prev, noise, keep_noise=False)
                                                   + (1 - a_prev) / (1 - a) * (1 - a / a_prev) * noise),
                "you scaled the noise by the variance β̃ instead of the standard deviation √β̃"),
    ),
    atol=1e-4,
    rtol=1e-4,  # at ᾱ_999 ≈ 0.005, float32 rounding in 1/√(1 − ᾱ_t) and β_t reaches 1e-5
))


def _false_alarm_reference(tolerance, std, n):
    # the mean of n independent draws of std `std` has standard error std/√n and is close to normal (central limit
    # theorem): P(|mean − μ| > tolerance) = 2·(1 − Φ(z)) with z = tolerance·√n/std, and 2·(1 − Φ(z)) = erfc(z/√2)
    return math.erfc(tolerance * math.sqrt(n) / (std * math.sqrt(2)))


def _false_alarm_cases(g):
    return [
        Case(f"tolerance = {tol}, std = {std}, n = {n:,} ({what})", (tol, std, n))
        for tol, std, n, what in ((0.01, 1.0, 100_000, "the first assertion of test_reverse_step, roughly"),
                                  (0.01, 0.5, 10_000, "z = 2"),
                                  (0.05, 2.0, 400, "a loose test: z = 0.5"),
                                  (0.001, 0.3, 1_000_000, "a tight test of a narrow distribution"),
                                  (0.02, 0.9, 4_000, "an in-between case"))
    ]


check_false_alarm_rate = register(Checker(
    name="check_false_alarm_rate",
    signature="fn(tolerance, std, n) -> probability",
    doc="the probability that the mean of ``n`` independent samples of a distribution with standard deviation ``std`` "
        "lands farther than ``tolerance`` from the true mean, in the normal approximation (central limit theorem): "
        "2·(1 − Φ(tolerance·√n / std)) = erfc(tolerance·√n / (std·√2)), a float. It is how often an assertion "
        "``abs(mean - expected) < tolerance`` fails a correct implementation.",
    reference=_false_alarm_reference,
    make_cases=_false_alarm_cases,
    hint="the standard error of a mean of n samples is std/√n; z = tolerance / (std/√n) says how many standard errors "
         "the tolerance is; a normal variable lies outside ±z with probability 2·(1 − Φ(z)), and math.erfc(z / √2) "
         "computes that without the rounding of 1 − Φ.",
    mistakes=(
        Mistake(lambda tol, std, n: math.erfc(tol * math.sqrt(n) / (std * math.sqrt(2))) / 2,
                "you computed one tail, 1 − Φ(z): the assertion fails when the mean is too high OR too low, 2·(1 − Φ(z))"),
        Mistake(lambda tol, std, n: math.erfc(tol * n / (std * math.sqrt(2))),
                "you used std/n as the standard error of the mean: variances add, so the mean of n samples has "
                "variance std²/n and standard error std/√n"),
        Mistake(lambda tol, std, n: math.erfc(tol * math.sqrt(n) / (std**2 * math.sqrt(2))),
                "you divided by the variance std² where the standard deviation std belongs"),
        Mistake(lambda tol, std, n: math.erfc(tol * math.sqrt(n) / std),
                "you wrote 2·(1 − Φ(z)) as erfc(z): Φ(z) = (1 + erf(z/√2))/2, so 2·(1 − Φ(z)) = erfc(z/√2)"),
    ),
    atol=1e-12,
    rtol=1e-3,  # 1 − Φ(z) in float32 loses ~1e-7 absolute to rounding: 1e-4 relative at a probability of 1e-3
))


class _CountingChecker(Checker):
    """A checker whose first argument is a model: it also compares the batch sizes of the calls made to it."""

    def __call__(self, fn: Callable) -> None:
        __tracebackhide__ = True
        counted = _count_model_calls(fn) if callable(fn) else fn
        mistakes = tuple(Mistake(_count_model_calls(m.fn), m.explanation) for m in self.mistakes)
        return check(counted, _count_model_calls(self.reference), self.cases(), name=self.name, hint=self.hint,
                     mistakes=mistakes, compare=lambda expected, got: _compare_guided(expected, got, self.atol, self.rtol),
                     timeout=self.timeout)


def _count_model_calls(fn: Callable) -> Callable:
    """Wrap ``fn(model_fn, *rest)`` so that it returns ``(result, batch sizes of each call to model_fn)``."""
    def counted(model_fn, *rest):
        calls = []

        def model(x, t, text):
            calls.append(int(x.shape[0]))
            return model_fn(x, t, text)

        return fn(model, *rest), calls

    return counted


def _compare_guided(expected, got, atol, rtol):
    (expected, expected_calls), (got, got_calls) = expected, got
    problem = difference(expected, got, atol, rtol)
    if problem:
        return problem
    if got_calls == expected_calls:
        return None
    if not got_calls:
        return "your function never called model_fn"
    sizes = " and ".join(map(str, got_calls))
    times = "once" if len(got_calls) == 1 else f"{len(got_calls)} times"
    return (f"the numbers are right, but your function called the model {times}, on batches of {sizes}; guidance "
            f"should call it once, on one batch of {expected_calls[0]} (the unconditional and conditional inputs "
            "concatenated)")


def _guidance_toy_model(x, t, text):
    """A deterministic stand-in for ε_θ(x_t, t, text): each sample's output depends on its own x and text only."""
    if text.shape[0] != x.shape[0]:
        raise ValueError(f"model_fn got x for {x.shape[0]} samples but text for {text.shape[0]}: they must match")
    text_signal = text.mean(dim=(1, 2)).reshape(-1, *([1] * (x.dim() - 1)))  # [B, 1, 1, 1]
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))  # a 0-d t, or one per sample
    return torch.tanh(x) * (1 + text_signal) + 0.5 * text_signal + 1e-3 * t


def _cfg_batched_reference(model_fn, x, t, cond, uncond, scale):
    eps_uncond, eps_cond = model_fn(torch.cat([x, x]), t, torch.cat([uncond, cond])).chunk(2)  # one call, [2B, ...]
    return eps_uncond + scale * (eps_cond - eps_uncond)


def _cfg_two_passes(model_fn, x, t, cond, uncond, scale):
    eps_cond, eps_uncond = model_fn(x, t, cond), model_fn(x, t, uncond)
    return eps_uncond + scale * (eps_cond - eps_uncond)


def _cfg_cases(g):
    cases = []
    for B, L, D, t, scale in ((2, 16, 8, 500, 4.0), (3, 5, 4, 10, 7.5), (1, 16, 8, 999, 1.0), (4, 3, 2, 250, 0.0)):
        x = torch.randn(B, 4, 8, 8, generator=g)
        cond, uncond = torch.randn(B, L, D, generator=g), torch.randn(B, L, D, generator=g)
        cases.append(Case(f"x of shape [{B}, 4, 8, 8], t = {t} (a 0-d tensor), cond and uncond text of shape [{B}, {L}, {D}], "
                          f"scale = {scale}, model_fn = a toy text-conditioned model",
                          (_guidance_toy_model, x, torch.tensor(t), cond, uncond, scale)))
    return cases


check_cfg_batched = register(_CountingChecker(
    name="check_cfg_batched",
    signature="fn(model_fn, x, t, cond, uncond, scale) -> guided",
    doc="classifier-free guidance with ONE model call (Ho & Salimans 2022, eq. 6): run ``model_fn(x2, t, text2)`` once "
        "on the batch x2 = [x, x] (2B samples) with text2 = [uncond, cond], split its output into ε_uncond and ε_cond, "
        "and return ε_uncond + scale · (ε_cond − ε_uncond). ``x`` is [B, C, H, W], ``t`` a 0-d tensor, ``cond`` and "
        "``uncond`` are text embeddings [B, L, D], ``scale`` a float. The checker counts the calls.",
    reference=_cfg_batched_reference,
    make_cases=_cfg_cases,
    hint="torch.cat([x, x]) and torch.cat([uncond, cond]) make one batch of 2B; call model_fn once; "
         "out.chunk(2) gives the two halves back in the same order; then uncond + scale · (cond − uncond).",
    mistakes=(
        Mistake(_cfg_two_passes, "you ran two separate passes, one for cond and one for uncond: the right numbers at "
                                 "twice the calls (and, on a GPU or many cores, about twice the time)"),
        Mistake(lambda model_fn, x, t, cond, uncond, scale: (lambda u, c: u + scale * c)(
                    *model_fn(torch.cat([x, x]), t, torch.cat([uncond, cond])).chunk(2)),
                "you computed ε_uncond + scale · ε_cond: guidance scales the difference, ε_uncond + scale · (ε_cond − ε_uncond), "
                "so that scale 1 gives the conditional prediction"),
        Mistake(lambda model_fn, x, t, cond, uncond, scale: (lambda c, u: u + scale * (c - u))(
                    *model_fn(torch.cat([x, x]), t, torch.cat([uncond, cond])).chunk(2)),
                "you read the two halves in the wrong order: the first half of the output belongs to the first half "
                "of the batch (uncond, if you concatenated [uncond, cond])"),
        Mistake(lambda model_fn, x, t, cond, uncond, scale: (lambda u, c: c + scale * (c - u))(
                    *model_fn(torch.cat([x, x]), t, torch.cat([uncond, cond])).chunk(2)),
                "you started from ε_cond: the formula is ε_uncond + scale · (ε_cond − ε_uncond)"),
    ),
))
