"""Checkers of notebook 11, flow matching: a training example of rectified flow, EDM's preconditioning, the slope of
a sampler's error against its model evaluations.

In the order the notebook uses them, one per tier: ``check_flow_training_example`` (implement),
``check_edm_preconditioning`` (derive), ``check_error_slope`` (experiment).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sdlearn.exercises.framework import (
    Case,
    Checker,
    Mistake,
    check,
    difference,
    format_shape,
    register,
)
from sdlearn.flow import FlowMatchEulerSampler, GaussianMixtureModel, edm_preconditioning
from sdlearn.samplers import sample
from sdlearn.schedules import flow_interpolate, flow_target, shift_sigmas


@dataclass
class NamedValuesChecker(Checker):
    """A checker whose answer is a tuple of named values (``value_names``), compared one by one: a message names
    the value that is wrong ("c_out: 12 of 12 values differ ...")."""

    value_names: tuple[str, ...] = ()  # the name of each value of the answer, for the messages

    def __call__(self, fn) -> None:
        __tracebackhide__ = True
        return check(fn, self.reference, self.cases(), name=self.name, hint=self.hint, mistakes=self.mistakes,
                     compare=self._compare, timeout=self.timeout)

    def _compare(self, expected: tuple, got) -> str | None:
        names = self.value_names
        if got is None:
            return "your result is None: did you forget to `return` it?"
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return f"expected a tuple of {len(expected)} values ({', '.join(names)}), your result is " + (
                f"a {type(got).__name__} of {len(got)}" if isinstance(got, (tuple, list)) else f"a {type(got).__name__}")
        for name, e, g in zip(names, expected, got):
            problem = difference(e, g, self.atol, self.rtol, what=f"your {name}")
            if problem:
                return f"{name}: {problem}"
        return None


# ---- Exercise 1 (implement): one training example of rectified flow -------------------------------------------


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.dim() - 1)))  # [B] → [B, 1, …] to broadcast over one sample


def _flow_example_reference(x0, noise, u, shift):
    sigma = shift_sigmas(torch.sigmoid(u), shift)  # logit-normal flow time t (Esser et al. 2024, §3.1), then the shift (§5.3.2)
    return sigma, flow_interpolate(x0, noise, sigma), flow_target(x0, noise)


def _flow_example_with(sigma_of=None, path=None, target=None):
    """The reference with one piece replaced: ``sigma_of(u, shift)``, ``path(x0, noise, sigma)``, ``target(x0, noise)``."""
    def example(x0, noise, u, shift):
        sigma = sigma_of(u, shift) if sigma_of else shift_sigmas(torch.sigmoid(u), shift)
        s = _per_sample(sigma, x0)
        x_sigma = path(x0, noise, s) if path else (1 - s) * x0 + s * noise
        return sigma, x_sigma, target(x0, noise) if target else noise - x0
    return example


def _flow_example_cases(g):
    cases = []
    for shape, shift, spread, words in (
        ((4, 4, 8, 8), 1.0, 1.0, "latents, shift = 1 (no shift)"),
        ((3, 4, 8, 8), 3.0, 1.0, "latents, shift = 3 (SD3's value for 1024 × 1024 images)"),
        ((5, 2), 0.5, 2.0, "2-D points, shift = 0.5 (towards less noise), u spread wide"),
        ((2, 3, 4, 4), 6.0, 3.0, "small images, shift = 6, u at both extremes"),
    ):
        x0 = torch.randn(shape, generator=g)
        noise = torch.randn(shape, generator=g)
        u = torch.randn(shape[0], generator=g) * spread  # [B]: the normal draws of the logit-normal
        cases.append(Case(f"{words}: x0 and noise {format_shape(x0)}, u {format_shape(u)} = "
                          f"{[round(v, 2) for v in u.tolist()]}, shift = {shift}", (x0, noise, u, shift)))
    return cases


check_flow_training_example = register(NamedValuesChecker(
    name="check_flow_training_example",
    signature="fn(x0, noise, u, shift) -> (sigma, x_sigma, target)",
    doc="one training example of rectified flow as Stable Diffusion 3 draws it (Esser et al. 2024): the flow time (the code's ``sigma``) "
        "t = shift · sigmoid(u) / (1 + (shift − 1) · sigmoid(u)) for each sample (SD3's logit-normal t, u ~ N(0, 1) "
        "given as ``u`` [B], then the resolution shift), the point x_t = (1 − t) · x0 + t · noise on each sample's "
        "straight path, and the regression target, the path's velocity dx_t/dt = noise − x0. ``x0`` and ``noise`` "
        "[B, …] (latents or points), ``shift`` > 0 (1: no shift). → ``(sigma [B], x_sigma, target)``, the last two "
        "with the shape of ``x0``.",
    reference=_flow_example_reference,
    make_cases=_flow_example_cases,
    hint="sigma = torch.sigmoid(u), then sigma = shift * sigma / (1 + (shift - 1) * sigma); reshape it to broadcast "
         "over a sample, s = sigma.reshape(-1, *[1] * (x0.dim() - 1)); x_sigma = (1 - s) * x0 + s * noise; "
         "target = noise - x0. Return sigma with shape [B].",
    mistakes=(
        Mistake(_flow_example_with(target=lambda x0, noise: x0 - noise),
                "your target is x0 − noise; the velocity points from the data to the noise, d/dt [(1 − t) x0 + t ε] = "
                "ε − x0 (sampling then walks it backwards, from t = 1 to 0)"),
        Mistake(_flow_example_with(path=lambda x0, noise, s: s * x0 + (1 - s) * noise),
                "you swapped the ends of the path: t is the flow's time, so x_t = (1 − t) x0 + t noise is the data at "
                "t = 0 and pure noise at t = 1"),
        Mistake(_flow_example_with(path=lambda x0, noise, s: (1 - s).sqrt() * x0 + s.sqrt() * noise),
                "you used the VP path's square roots (√(1 − t) x0 + √t noise, notebook 01's form); rectified flow's "
                "weights add to 1 themselves, not their squares: a straight line"),
        Mistake(_flow_example_with(sigma_of=lambda u, shift: shift_sigmas(u, shift)),
                "you used u itself as t; the logit-normal t is sigmoid(u), which maps every real u into (0, 1)"),
        Mistake(_flow_example_with(sigma_of=lambda u, shift: torch.sigmoid(u)),
                "you left out the shift: t_k = shift · t / (1 + (shift − 1) · t)"),
        Mistake(_flow_example_with(sigma_of=lambda u, shift: shift * torch.sigmoid(u) / (1 + shift * torch.sigmoid(u))),
                "your shift's denominator is 1 + shift · t; it is 1 + (shift − 1) · t, so that t = 1 stays 1 (pure noise)"),
        Mistake(_flow_example_with(sigma_of=lambda u, shift: shift_sigmas(torch.sigmoid(u), 1 / shift)),
                "you shifted the wrong way (by 1/shift): shift > 1 must move t up, towards more noise"),
    ),
    value_names=("sigma", "x_sigma", "target"),
))


# ---- Exercise 2 (derive): EDM's preconditioning --------------------------------------------------------------


def _edm_reference(sigma, sigma_data):
    c_skip, c_out, c_in, _ = edm_preconditioning(sigma, sigma_data)  # Karras et al. 2022, Table 1
    return c_skip, c_out, c_in


def _edm_with(c_skip=None, c_out=None, c_in=None):
    def coefficients(sigma, sigma_data):
        reference = _edm_reference(sigma, sigma_data)
        return tuple(own(sigma, sigma_data) if own else ref for own, ref in zip((c_skip, c_out, c_in), reference))
    return coefficients


def _edm_cases(g):
    sigma = torch.logspace(-3, 2, 12, dtype=torch.float64)  # 0.001 … 100: from almost clean to almost pure noise
    return [Case(f"sigma = torch.logspace(-3, 2, 12, dtype=torch.float64) (0.001 … 100), sigma_data = {sigma_data}"
                 f"{words}", (sigma.clone(), sigma_data))
            for sigma_data, words in ((0.5, " (EDM's value for images in [-1, 1])"), (1.0, " (unit-variance latents)"),
                                      (0.2, ""), (2.0, ""))]


check_edm_preconditioning = register(NamedValuesChecker(
    name="check_edm_preconditioning",
    signature="fn(sigma, sigma_data) -> (c_skip, c_out, c_in)",
    doc="EDM's preconditioning (Karras et al. 2022, §5 and Table 1), derived: D(x; σ) = c_skip x + c_out F(c_in x) "
        "for x = x0 + σ ε with Var(x0) = σ_data² per number. c_in makes the network's input have unit variance, "
        "c_skip and c_out make its target F* = (x0 − c_skip x) / c_out have unit variance, and c_skip is the value that "
        "makes c_out smallest (so the network's errors are amplified least). ``sigma``: a float64 tensor [K] of noise "
        "levels; ``sigma_data`` a number. → ``(c_skip, c_out, c_in)``, each a tensor [K].",
    reference=_edm_reference,
    make_cases=_edm_cases,
    hint="x0 and ε are independent, so Var(x) = σ_data² + σ² and Var(c_in x) = c_in² (σ_data² + σ²) = 1 gives c_in. "
         "For the target, x0 − c_skip x = (1 − c_skip) x0 − c_skip σ ε, so Var(F*) = 1 says c_out² = (1 − c_skip)² "
         "σ_data² + c_skip² σ²: a parabola in c_skip; its minimum (derivative 0) is c_skip, and c_out is the square "
         "root of the parabola there. Check your formulas at the ends: σ → 0 must give c_skip → 1, c_out → 0.",
    mistakes=(
        Mistake(_edm_with(c_skip=lambda s, d: s**2 / (s**2 + d**2)),
                "you swapped σ and σ_data in c_skip: at low noise (σ → 0) the skip must pass x through (c_skip → 1), "
                "at high noise it must fade (c_skip → 0)"),
        Mistake(_edm_with(c_out=lambda s, d: s * d / (s**2 + d**2)),
                "c_out lacks its square root: c_out² = σ² σ_data² / (σ² + σ_data²), so c_out = σ σ_data / √(σ² + σ_data²)"),
        Mistake(_edm_with(c_in=lambda s, d: 1 / (s**2 + d**2)),
                "c_in lacks its square root: Var(x) = σ_data² + σ², and c_in divides by the standard deviation"),
        Mistake(_edm_with(c_in=lambda s, d: 1 / (s**2 + 1).sqrt()),
                "your c_in is 1/√(σ² + 1), which is right only when σ_data = 1; the data's variance is σ_data²"),
        Mistake(lambda s, d: (torch.ones_like(s), -s, 1 / (s**2 + 1).sqrt()),
                "you wrote the coefficients that read a trained ε-network (c_skip = 1, c_out = −σ): they make a valid "
                "denoiser, but its target ε, scaled by c_out = −σ, is amplified without bound at high noise; the "
                "exercise asks for the unit-variance choice"),
        Mistake(_edm_with(c_out=lambda s, d: s**2 * d**2 / (s**2 + d**2)),
                "you returned c_out² instead of c_out"),
    ),
    atol=1e-8,
    rtol=1e-6,
    value_names=("c_skip", "c_out", "c_in"),
))


# ---- Exercise 3 (experiment): the slope of a sampler's error against its model evaluations ----------------------


def _rms(x, reference):
    return float((x.double() - reference.double()).pow(2).mean().sqrt())  # over every number


def _error_slope_reference(run, reference, steps):
    points = [run(n) for n in steps]  # (x, NFE) for each number of steps
    errors = np.array([_rms(x, reference) for x, _ in points])
    nfe = np.array([float(calls) for _, calls in points])
    return float(np.polyfit(np.log(nfe), np.log(errors), 1)[0])  # least-squares slope of log error on log NFE


def _slope_of(points, x_of, y_of):
    x, y = np.array([x_of(p) for p in points]), np.array([y_of(p) for p in points])
    return float(np.polyfit(x, y, 1)[0])


def _slope_with(x_of=None, y_of=None, two_points=False, sign=1.0):
    """The reference with one slip: ``x_of(n, nfe)`` and ``y_of(error)`` the fitted coordinates, ``two_points`` a
    slope between the first and the last point, ``sign`` −1 for the order instead of the slope."""
    def slope(run, reference, steps):
        rows = [(n, *run(n)) for n in steps]
        points = [(n, float(calls), _rms(x, reference)) for n, x, calls in rows]
        if two_points:
            points = [points[0], points[-1]]
        fx = x_of or (lambda n, nfe: math.log(nfe))
        fy = y_of or math.log
        return sign * _slope_of(points, lambda p: fx(p[0], p[1]), lambda p: fy(p[2]))
    return slope


def _synthetic_run(reference, direction, size, nfe_of):
    def run(n):
        return reference + size(n) * direction, nfe_of(n)
    return run


def _gaussian_flow_euler_case(g):
    """Flow Euler on 1-D Gaussian data N(μ, s²): its exact ODE carries the noise ε to μ + s ε (the flow map of a
    Gaussian is affine), so the error is known exactly."""
    mean, std = 0.5, 0.4
    data = GaussianMixtureModel([[mean]], [std])
    noise = torch.randn(64, 1, generator=g, dtype=torch.float64)

    def run(n):
        sampler = FlowMatchEulerSampler()
        x = sample(lambda x, t: data.velocity(x, t / sampler.num_train_timesteps), sampler, noise.shape, n,
                   noise=noise, progress=False, dtype=torch.float64)
        return x, len(sampler.timesteps)

    return run, mean + std * noise


def _error_slope_cases(g):
    reference = torch.randn(32, 2, generator=g, dtype=torch.float64)
    direction = torch.randn(32, 2, generator=g, dtype=torch.float64)
    flow_run, flow_reference = _gaussian_flow_euler_case(g)
    return [
        Case("run(n) = a first-order method: error ∝ (1 + 1.5/n)/n, NFE = n; steps = [4, 8, 16, 32]",
             (_synthetic_run(reference, direction, lambda n: 0.8 * (1 + 1.5 / n) / n, lambda n: n), reference,
              [4, 8, 16, 32])),
        Case("run(n) = a second-order method with two model evaluations a step, like Heun: error ∝ (1 + 0.5/n)/n², "
             "NFE = 2n − 1; steps = [2, 4, 8, 16]",
             (_synthetic_run(reference, direction, lambda n: 3 * (1 + 0.5 / n) / n**2, lambda n: 2 * n - 1), reference,
              [2, 4, 8, 16])),
        Case("run(n) = FlowMatchEulerSampler with the exact velocity of 1-D Gaussian data N(0.5, 0.4²), 64 samples "
             "(reference: the exact ODE's answer 0.5 + 0.4 ε); steps = [4, 8, 16, 32]",
             (flow_run, flow_reference, [4, 8, 16, 32])),
        Case("run(n) = a second-order method whose error stops falling at a floor: ∝ 2/n² + 0.005, NFE = n; "
             "steps = [2, 4, 8, 16, 32]",
             (_synthetic_run(reference, direction, lambda n: 2 / n**2 + 0.005, lambda n: n), reference,
              [2, 4, 8, 16, 32])),
    ]


check_error_slope = register(Checker(
    name="check_error_slope",
    signature="fn(run, reference, steps) -> slope",
    doc="how fast a sampler's error falls with its cost: for each n in ``steps``, ``run(n)`` returns ``(x, nfe)``, the "
        "samples after n steps and the number of model evaluations (NFE) they took; the error is the RMS difference "
        "from ``reference`` (the square root of the mean, over every number, of (x − reference)²). Fit a straight "
        "line to log(error) against log(NFE) by least squares (e.g. ``np.polyfit``) and return its slope, a float "
        "(about −1 for a first-order method, −2 for a second-order one).",
    reference=_error_slope_reference,
    make_cases=_error_slope_cases,
    hint="errors, nfes = [], []; for n in steps: x, nfe = run(n); errors.append(((x - reference) ** 2).mean().sqrt()"
         ".item()); nfes.append(nfe); then return float(np.polyfit(np.log(nfes), np.log(errors), 1)[0]).",
    mistakes=(
        Mistake(_slope_with(x_of=lambda n, nfe: math.log(n)),
                "you fitted against the number of steps; the cost is the number of model evaluations (NFE), which "
                "for Heun is 2n − 1, not n"),
        Mistake(_slope_with(y_of=lambda e: math.log(e**2)),
                "you fitted the mean squared error; its slope is twice the RMS error's: take the square root"),
        Mistake(_slope_with(sign=-1.0),
                "you returned the order (a positive number); the slope of a falling error is negative"),
        Mistake(_slope_with(two_points=True),
                "you took the slope between the first and the last point only; fit all the points by least squares"),
        Mistake(_slope_with(x_of=lambda n, nfe: nfe),
                "you fitted log(error) against NFE itself; the axes are both logarithmic (a power law, error ∝ NFE^slope, "
                "is a straight line only on log-log axes)"),
        Mistake(_slope_with(y_of=math.log10),
                "you mixed logarithms: log10 of the error against the natural log of NFE; use the same base on both axes"),
    ),
    atol=0.01,
    rtol=0.0,
))
