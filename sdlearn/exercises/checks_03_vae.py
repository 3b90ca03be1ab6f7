"""Checkers of notebook 03, the VAE: PSNR, the reparameterisation trick, the KL of two Gaussians, the scaling factor.

In the order the notebook uses them: ``check_psnr`` (implement), ``check_reparameterize`` (implement),
``check_kl_diagonal_gaussians`` (derive), ``check_factor_by_group`` (the experiment's measurement).
``check_gaussian_kl`` (the KL to N(0, I), which the notebook now builds in the open before the derive exercise
generalises it) is no longer an exercise of the notebook; it stays registered for teachers who want a warm-up.
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


# ---- Exercise 3 (derive): the KL between two diagonal Gaussians ----------------------------------------------


def _kl_two_gaussians_reference(mean_q, logvar_q, mean_p, logvar_p):
    """torch.distributions' own KL of two normals, dimension by dimension, summed over all but the batch dimension."""
    q = torch.distributions.Normal(mean_q, torch.exp(0.5 * logvar_q))
    p = torch.distributions.Normal(mean_p, torch.exp(0.5 * logvar_p))
    return torch.distributions.kl_divergence(q, p).flatten(1).sum(dim=1)


def _kl_two_terms(mean_q, logvar_q, mean_p, logvar_p, log_sign=1.0, half=0.5, divide_mean=True, divide_var=True):
    var_p = logvar_p.exp()
    mean_term = (mean_q - mean_p).pow(2) / (var_p if divide_mean else 1.0)
    var_term = logvar_q.exp() / (var_p if divide_var else 1.0)
    return (half * (log_sign * (logvar_p - logvar_q) + var_term + mean_term - 1)).flatten(1).sum(dim=1)


def _two_gaussian_cases(g):
    cases = []
    for shape, what in (((4, 4, 8, 8), "a batch of VAE latents"), ((3, 16), "flat vectors")):
        mean_q, mean_p = torch.randn(shape, generator=g) * 1.5, torch.randn(shape, generator=g)
        logvar_q = torch.rand(shape, generator=g) * 6 - 4  # log σ² in [-4, 2]
        logvar_p = torch.rand(shape, generator=g) * 4 - 2  # log σ_p² in [-2, 2]
        cases.append(Case(f"{what}: q and p with random means and log-variances, all four of shape {format_shape(mean_q)}",
                          (mean_q, logvar_q, mean_p, logvar_p)))
    mean_q, logvar_q = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 4, 8, 8, generator=g) * 4 - 3
    cases.append(Case("p = N(0, I) (mean_p = 0, logvar_p = 0): the VAE's KL of section 2.3, shape [2, 4, 8, 8]",
                      (mean_q, logvar_q, torch.zeros_like(mean_q), torch.zeros_like(logvar_q))))
    cases.append(Case("q = p (the same mean and log-variance): the KL is 0; shape [2, 4, 2, 2]",
                      (mean_q[:, :, :2, :2], logvar_q[:, :, :2, :2], mean_q[:, :, :2, :2].clone(), logvar_q[:, :, :2, :2].clone())))
    return cases


check_kl_diagonal_gaussians = register(Checker(
    name="check_kl_diagonal_gaussians",
    signature="fn(mean_q, logvar_q, mean_p, logvar_p) -> kl",
    doc="KL(q ‖ p) of two diagonal Gaussians q = N(μ_q, diag σ_q²) and p = N(μ_p, diag σ_p²), "
        "½ Σ_j (log(σ_p,j² / σ_q,j²) + (σ_q,j² + (μ_q,j − μ_p,j)²) / σ_p,j² − 1), for each sample of a batch: the four "
        "inputs (``logvar`` = log σ²) are [B, ...] of one shape; the result is [B], summed over every dimension but the "
        "first. With p = N(0, I) it is the VAE's KL (Kingma & Welling 2014, Appendix B).",
    reference=_kl_two_gaussians_reference,
    make_cases=_two_gaussian_cases,
    hint="per dimension ½ (logvar_p − logvar_q + (exp(logvar_q) + (mean_q − mean_p)²) / exp(logvar_p) − 1); then "
         "sum over every dimension but the batch one, e.g. .flatten(1).sum(dim=1).",
    mistakes=(
        Mistake(lambda mq, lq, mp, lp: _kl_two_gaussians_reference(mp, lp, mq, lq),
                "you computed KL(p ‖ q): the KL is not symmetric, and the expectation is under q, the first argument "
                "(E_q[log q(z) − log p(z)])"),
        Mistake(lambda mq, lq, mp, lp: _kl_two_terms(mq, lq, mp, lp, divide_mean=False),
                "you did not divide (μ_q − μ_p)² by σ_p²: E_q[(z − μ_p)²] = σ_q² + (μ_q − μ_p)², and all of it is "
                "divided by 2σ_p² in log p(z)"),
        Mistake(lambda mq, lq, mp, lp: _kl_two_terms(mq, lq, mp, lp, log_sign=-1.0),
                "the log term's sign is flipped: −E_q[log q] contributes −½ log σ_q², E_q[log p] contributes "
                "−½ log σ_p², so KL has +½ log(σ_p² / σ_q²)"),
        Mistake(lambda mq, lq, mp, lp: _kl_two_terms(mq, lq, mp, lp, half=1.0), "you forgot the factor ½"),
        Mistake(lambda mq, lq, mp, lp: _kl_two_terms(mq, lq, mp, lp, divide_var=False),
                "σ_q² must be divided by σ_p² too: E_q[(z − μ_p)²] / σ_p² = (σ_q² + (μ_q − μ_p)²) / σ_p²"),
    ),
    atol=1e-4,
    rtol=1e-5,
))


# ---- Exercise 4 (experiment): how precisely a few images measure the scaling factor ---------------------------


def _factor_by_group_reference(latents, group_size):
    return 1 / latents.reshape(len(latents) // group_size, -1).std(dim=1)


def _factor_cases(g):
    cases = []
    for n, shape, group_size in ((64, (4, 8, 8), 8), (48, (4, 8, 8), 16), (30, (4, 4, 4), 30)):
        scales = 0.5 + 1.5 * torch.rand(n, 1, 1, 1, generator=g)  # each image its own spread, 0.5 to 2
        channel_means = torch.tensor([0.9, 0.5, -0.2, 0.7]).reshape(4, 1, 1)  # like the VAE's: one mean per channel
        latents = torch.randn((n, *shape), generator=g) * scales + channel_means
        cases.append(Case(f"latents: {n} latents of shape {list(shape)}, channel means 0.9, 0.5, -0.2, 0.7, each latent "
                          f"with its own std between 0.5 and 2; group_size = {group_size}", (latents, group_size)))
    return cases


check_factor_by_group = register(Checker(
    name="check_factor_by_group",
    signature="fn(latents, group_size) -> factors",
    doc="the scaling factor measured on each group of ``group_size`` consecutive latents (latents[0:n], latents[n:2n], "
        "…; ``group_size`` divides their number N): 1 / std of all the numbers of the group's latents together "
        "(torch's std, as ``compute_scaling_factor``). ``latents`` [N, C, H, W]. → a tensor [N // group_size].",
    reference=_factor_by_group_reference,
    make_cases=_factor_cases,
    hint="latents.reshape(N // group_size, -1) puts each group's numbers on one row; then 1 / (that).std(dim=1).",
    mistakes=(
        Mistake(lambda latents, n: latents.reshape(len(latents) // n, -1).std(dim=1),
                "you returned the standard deviation; the scaling factor is its inverse, 1 / std"),
        Mistake(lambda latents, n: (1 / latents.flatten(1).std(dim=1)).reshape(-1, n).mean(dim=1),
                "you averaged the factors of single latents; pool all the numbers of the group's latents and take "
                "1 / std of them together, as compute_scaling_factor does on its images"),
        Mistake(lambda latents, n: 1 / latents.transpose(0, 1).reshape(latents.shape[1], len(latents) // n, -1)
                .std(dim=2).mean(dim=0),
                "you took the std of each channel and averaged them; the factor is 1 / std of all the numbers, "
                "channels together"),
    ),
    atol=1e-5,
    rtol=2e-3,  # unbiased or biased std: both fine (they differ by under 0.1% with 1,024 numbers or more)
))
