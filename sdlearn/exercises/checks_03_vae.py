"""Checkers of notebook 03, the VAE: PSNR, the reparameterisation trick, the Gaussian KL.

In the order the notebook uses them: ``check_psnr``, ``check_reparameterize``, ``check_gaussian_kl``.
"""

from __future__ import annotations

import torch

from sdlearn.exercises.framework import Case, Checker, Mistake, format_shape, random_images, register
from sdlearn.vae import DiagonalGaussian, psnr


def _psnr_cases(g):
    cases = []
    for shape, noise in (((4, 3, 32, 32), 0.01), ((2, 3, 32, 32), 0.2), ((3, 3, 8, 8), 0.05)):
        x = random_images(g, *shape)
        y = (x + noise * torch.randn(shape, generator=g)).clamp(-1, 1)
        cases.append(Case(f"x: {shape[0]} images of shape {format_shape(x[0])} in [-1, 1]; y: the same images with noise of "
                          f"std {noise} added, clamped to [-1, 1]", (x, y)))
    x = random_images(g, 2, 3, 16, 16)
    y = torch.cat([x[:1] + 0.5, x[1:] - 0.001])
    cases.append(Case("two images of shape [3, 16, 16]: one off by 0.5 everywhere, one off by 0.001", (x, y)))
    return cases


check_psnr = register(Checker(
    name="check_psnr",
    signature="fn(x, y) -> psnr_db",
    doc="the peak signal-to-noise ratio of each image pair, PSNR = 10·log10(range² / MSE) in decibels, with the "
        "MSE averaged over each image's pixels and channels, for images in [-1, 1] (range 2). ``x`` and ``y`` are "
        "[B, C, H, W]; the result is [B].",
    reference=psnr,
    make_cases=_psnr_cases,
    hint="mse = ((x − y)²) averaged over every dimension but the batch one (shape [B]); then 10 · log10(2² / mse). "
         "Images in [-1, 1] span a range of 2, not 1.",
    mistakes=(
        Mistake(lambda x, y: 10 * torch.log10(1 / (x - y).pow(2).flatten(1).mean(1)),
                "you used a range of 1 (images in [0, 1]); these images are in [-1, 1], a range of 2 (you are 6.02 dB low)"),
        Mistake(lambda x, y: 20 * torch.log10(4 / (x - y).pow(2).flatten(1).mean(1)),
                "you wrote 20·log10 of a ratio of powers: it is 10·log10(range² / MSE), or 20·log10(range / RMSE)"),
        Mistake(lambda x, y: 10 * torch.log10(4 / (x - y).abs().flatten(1).mean(1)),
                "you averaged the absolute error; PSNR uses the mean squared error"),
        Mistake(lambda x, y: 10 * torch.log(4 / (x - y).pow(2).flatten(1).mean(1)),
                "you used the natural logarithm; decibels use log10"),
    ),
    atol=1e-3,
    rtol=1e-5,
))


def _reparameterize_reference(mean, logvar, noise):
    return mean + torch.exp(0.5 * logvar) * noise  # z = μ + σ·ε, σ = exp(½·log σ²)


def _posterior_cases(g, with_noise: bool):
    cases = []
    for shape, what in (((4, 4, 8, 8), "a batch of VAE latents"), ((2, 4, 2, 2), "a small batch"), ((3, 16), "flat vectors")):
        mean = torch.randn(shape, generator=g) * 1.5
        logvar = torch.rand(shape, generator=g) * 10 - 8  # log σ² in [-8, 2]: σ from 0.02 to 2.7
        args = (mean, logvar, torch.randn(shape, generator=g)) if with_noise else (mean, logvar)
        cases.append(Case(f"{what}: mean and logvar of shape {format_shape(mean)}{', noise of the same shape' if with_noise else ''}, "
                          "logvar between -8 and 2", args))
    mean = torch.zeros(2, 4, 8, 8)
    args = (mean, torch.zeros_like(mean), torch.randn(mean.shape, generator=g)) if with_noise else (mean, torch.zeros_like(mean))
    cases.append(Case("mean = 0 and logvar = 0 (the prior N(0, I) itself), shape [2, 4, 8, 8]", args))
    return cases


check_reparameterize = register(Checker(
    name="check_reparameterize",
    signature="fn(mean, logvar, noise) -> z",
    doc="the reparameterisation trick (Kingma & Welling 2014, §2.4): a sample z = μ + σ·ε of N(μ, diag σ²), written "
        "as a differentiable function of ``mean`` (μ) and ``logvar`` (log σ²), with the standard normal ``noise`` "
        "ε given. All three have the same shape, and so does z.",
    reference=_reparameterize_reference,
    make_cases=lambda g: _posterior_cases(g, with_noise=True),
    hint="the encoder gives the log-variance log σ², not σ: σ = exp(½·logvar). Use the noise you are given "
         "(do not draw new noise), and return mean + σ · noise.",
    mistakes=(
        Mistake(lambda mean, logvar, noise: mean + torch.exp(logvar) * noise,
                "you scaled the noise by the variance σ² = exp(logvar); the standard deviation is σ = exp(½·logvar)"),
        Mistake(lambda mean, logvar, noise: mean + logvar * noise,
                "you used logvar itself as the standard deviation; σ = exp(½·logvar)"),
        Mistake(lambda mean, logvar, noise: mean + noise, "you added the noise without scaling it by σ"),
        Mistake(lambda mean, logvar, noise: (mean + noise) * torch.exp(0.5 * logvar),
                "you scaled the mean by σ too: only the noise is scaled, z = μ + σ·ε"),
    ),
))


def _gaussian_kl_reference(mean, logvar):
    return DiagonalGaussian(mean, logvar).kl()


def _kl_terms(mean, logvar, half=0.5, minus_one=1.0, var=None):
    var = logvar.exp() if var is None else var
    return (half * (mean.pow(2) + var - minus_one - logvar)).flatten(1)  # [B, D]


check_gaussian_kl = register(Checker(
    name="check_gaussian_kl",
    signature="fn(mean, logvar) -> kl",
    doc="KL(N(μ, diag σ²) ‖ N(0, I)) = ½ Σ_j (μ_j² + σ_j² − 1 − log σ_j²) for each sample of a batch (Kingma & "
        "Welling 2014, Appendix B): ``mean`` and ``logvar`` (log σ²) are [B, ...]; the result is [B], summed over "
        "every dimension but the first.",
    reference=_gaussian_kl_reference,
    make_cases=lambda g: _posterior_cases(g, with_noise=False),
    hint="per dimension ½ (mean² + exp(logvar) − 1 − logvar); then sum over all dimensions except the batch one, "
         "e.g. with .flatten(1).sum(dim=1).",
    mistakes=(
        Mistake(lambda mean, logvar: _kl_terms(mean, logvar, half=1.0).sum(1), "you forgot the factor ½"),
        Mistake(lambda mean, logvar: _kl_terms(mean, logvar).mean(1),
                "you averaged over the latent dimensions: the KL of a diagonal Gaussian is the sum of the per-dimension KLs"),
        Mistake(lambda mean, logvar: _kl_terms(mean, logvar, minus_one=0.0).sum(1),
                "you left out the −1: without it the KL of N(0, I) to itself would not be 0"),
        Mistake(lambda mean, logvar: _kl_terms(mean, logvar, var=torch.exp(0.5 * logvar)).sum(1),
                "you used the standard deviation σ where the variance σ² = exp(logvar) belongs"),
        Mistake(lambda mean, logvar: (0.5 * (mean.pow(2) + logvar.exp() - 1 + logvar)).flatten(1).sum(1),
                "the log-variance enters with a minus sign: ½ (μ² + σ² − 1 − log σ²)"),
    ),
    atol=1e-4,
    rtol=1e-5,
))
