"""Statistics on counts and features: intervals, the Fréchet distance, MMD, total variation.

Pure tensor arithmetic, no models: :mod:`sdlearn.metrics` turns images into features or read attributes and
calls these. Everything is computed in float64 on the CPU.

- :func:`wilson_interval` — the Wilson score interval of a proportion (Wilson 1927), what every accuracy
  in the course is reported with.
- :func:`perfect_sampler_tv` — the expected total-variation distance of n uniform draws to the uniform
  distribution: the floor a diversity figure is compared with.
- :func:`frechet_distance` — the Fréchet distance between two Gaussians (FID's formula).
- :func:`mmd2_unbiased`, :func:`resample_counts`, :func:`percentile_interval` and
  :class:`DistributionDistance` — KID's unbiased MMD² estimate, bootstrap resampling, and the result type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sdlearn.checks import check_positive_int


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval (Wilson 1927) of a proportion: ``successes`` right out of ``n`` → ``(low, high)``.

    With p̂ = k/n and z the standard normal quantile at 1 − (1 − confidence)/2 (1.96 for 95%), the interval is
    the set of p for which |p̂ − p| ≤ z √(p(1 − p)/n), i.e.

        (p̂ + z²/2n ± z √(p̂(1 − p̂)/n + z²/4n²)) / (1 + z²/n).

    Unlike the normal ("Wald") interval p̂ ± z √(p̂(1 − p̂)/n) it stays inside [0, 1] and does not shrink to a
    point at p̂ = 0 or 1 (Brown, Cai & DasGupta 2001 recommend it): 256 of 256 right gives (0.985, 1.0), not
    (1.0, 1.0). Raises ``ValueError`` unless 0 ≤ successes ≤ n, n ≥ 1 and 0 < confidence < 1.
    """
    check_positive_int(n, "n")
    if isinstance(successes, bool) or not isinstance(successes, int) or not 0 <= successes <= n:
        raise ValueError(f"successes must be an integer in 0..n = 0..{n}, got {successes!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    z = float(torch.special.ndtri(torch.tensor(1 - (1 - confidence) / 2, dtype=torch.float64)))
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if successes == 0 else low), (1.0 if successes == n else high)  # exact at the ends


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """Fréchet (2-Wasserstein) distance² between N(μ1, Σ1) and N(μ2, Σ2) (Dowson & Landau 1982; FID,
    Heusel et al. 2017):

        d² = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2}).

    Tr (Σ1 Σ2)^{1/2} is computed without a general matrix square root: Σ1 Σ2 is similar to the symmetric
    PSD matrix M = Σ1^{1/2} Σ2 Σ1^{1/2} (conjugate by Σ1^{1/2}), so its eigenvalues are M's, and the trace
    is Σ sqrt(λ_i(M)). Both square roots come from ``torch.linalg.eigh`` in float64, with the tiny negative
    eigenvalues that rounding leaves clamped to 0. The result is clamped at 0 for the same reason.
    """
    mu1, mu2, cov1, cov2 = (torch.as_tensor(x).to(torch.float64).cpu() for x in (mu1, mu2, cov1, cov2))
    if mu1.dim() != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be vectors of one length [F], got {list(mu1.shape)} and {list(mu2.shape)}")
    f = len(mu1)
    if cov1.shape != (f, f) or cov2.shape != (f, f):
        raise ValueError(f"covariances must be [F, F] = [{f}, {f}] matrices, got {list(cov1.shape)} and {list(cov2.shape)}")
    for name, t in (("mu1", mu1), ("cov1", cov1), ("mu2", mu2), ("cov2", cov2)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    cov1, cov2 = (cov1 + cov1.T) / 2, (cov2 + cov2.T) / 2  # exactly symmetric
    lam1, vec1 = torch.linalg.eigh(cov1)
    sqrt1 = (vec1 * lam1.clamp(min=0).sqrt()) @ vec1.T  # Σ1^{1/2}
    m = sqrt1 @ cov2 @ sqrt1
    trace_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    d2 = (mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * trace_sqrt
    return max(float(d2), 0.0)


CONFIDENCE = 0.95  # the bootstrap intervals' level
BOOTSTRAP_SEED = 0  # the resampling generator's seed when none is given: every call is deterministic
_KERNEL_BLOCK = 1024  # kernel matrices are built [1024, 1024] at a time (8 MB of float64)
REPLICATE_CHUNK = 128  # bootstrap resamples handled together: count matrices [128, N]


@dataclass(frozen=True)
class DistributionDistance:
    """A distance between two image distributions, with its bootstrap interval (from :func:`kid` and
    :func:`fid_with_interval`).

    ``name``: "KID" or "FID". ``value``: the estimate on all the images. ``low``, ``high``: the 95% bootstrap
    percentile interval. ``num_real``, ``num_fake``: images per set. ``bootstrap``: resamples drawn.
    ``float(d)`` is ``d.value``."""

    name: str
    value: float
    low: float
    high: float
    num_real: int
    num_fake: int
    bootstrap: int

    def __float__(self) -> float:
        return self.value

    def __str__(self) -> str:
        # three significant digits of the largest figure, the others to the same place: the fourth would be
        # float round-off from one machine's arithmetic to another's, not a property of the images
        place = math.floor(math.log10(max(abs(self.value), abs(self.low), abs(self.high), 1e-12))) - 2
        decimals = min(max(-place, 0), 8)
        low, value, high = (f"{round(x, -place) if place > 0 else x:,.{decimals}f}" for x in (self.low, self.value, self.high))
        return f"{self.name} {value} ({100 * CONFIDENCE:.0f}% CI {low}–{high}, n = {self.num_real} vs {self.num_fake})"


def percentile_interval(name: str, value: float, replicates: torch.Tensor, num_real: int, num_fake: int) -> DistributionDistance:
    """The percentile interval of the bootstrap ``replicates`` ``[B]`` (resamples where the statistic is undefined,
    NaN, are left out)."""
    finite = replicates[torch.isfinite(replicates)]
    tail = (1 - CONFIDENCE) / 2
    low, high = torch.quantile(finite, torch.tensor([tail, 1 - tail], dtype=finite.dtype)).tolist()
    return DistributionDistance(name, float(value), low, high, num_real, num_fake, len(replicates))


def resample_counts(n: int, rows: int, generator: torch.Generator) -> torch.Tensor:
    """``rows`` bootstrap resamples of ``n`` images (drawn with replacement) as counts: float64 ``[rows, n]``,
    how many times each image was drawn; each row sums to ``n``."""
    drawn = torch.randint(n, (rows, n), generator=generator)  # [rows, n] image indices
    return torch.zeros(rows, n, dtype=torch.float64).scatter_add_(1, drawn, torch.ones(rows, n, dtype=torch.float64))


def _polynomial_kernel_sums(a: torch.Tensor, b: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Σ_ij wa[r, i] wb[r, j] k(a_i, b_j) for every row r of the weights, with KID's kernel
    k(x, y) = (xᵀy / d + 1)³. ``a`` ``[m, d]``, ``b`` ``[n, d]``, ``wa`` ``[R, m]``, ``wb`` ``[R, n]`` → ``[R]``.
    The kernel matrix is built one block at a time, so memory stays bounded whatever m and n."""
    d = a.shape[1]
    total = torch.zeros(len(wa), dtype=torch.float64)
    for i in range(0, len(a), _KERNEL_BLOCK):
        for j in range(0, len(b), _KERNEL_BLOCK):
            k = (a[i : i + _KERNEL_BLOCK] @ b[j : j + _KERNEL_BLOCK].T / d + 1) ** 3  # [m_i, n_j]
            total += ((wa[:, i : i + _KERNEL_BLOCK] @ k) * wb[:, j : j + _KERNEL_BLOCK]).sum(1)  # [R]
    return total


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """MMD²_u of features ``x`` ``[m, d]`` and ``y`` ``[n, d]`` for each row of counts ``cx`` ``[R, m]``,
    ``cy`` ``[R, n]`` (all ones: the images as given; else a bootstrap resample). The sums over i ≠ j run over
    pairs of *distinct* images: with counts c, Σ_{a≠b} c_a c_b k(x_a, x_b) over Σ_{a≠b} c_a c_b such pairs."""
    def within(z, c):
        self_similarity = ((z * z).sum(1) / z.shape[1] + 1) ** 3  # k(z_a, z_a), [N]
        pairs = c.sum(1) ** 2 - (c * c).sum(1)  # ordered pairs of distinct images, [R]
        return (_polynomial_kernel_sums(z, z, c, c) - (c * c) @ self_similarity) / pairs

    between = _polynomial_kernel_sums(x, y, cx, cy) / (cx.sum(1) * cy.sum(1))
    return within(x, cx) + within(y, cy) - 2 * between  # [R]


def perfect_sampler_tv(num_values: int, n: int) -> float:
    """The expected total-variation distance between the empirical distribution of ``n`` independent uniform
    draws from ``num_values`` values and the uniform distribution itself: what a perfect sampler scores.

    TV(p, q) = ½ Σ_i |p_i − q_i|. A histogram of n samples is never exactly uniform, so TV is biased upwards
    and a measured TV is only meaningful beside this figure at the same n. Exact, by linearity of expectation:
    each count N_i is Binomial(n, 1/k) (k = ``num_values``), so

        E TV = ½ Σ_i E |N_i / n − 1/k| = (k / 2) Σ_{j=0}^{n} C(n, j) k^{−j} (1 − 1/k)^{n−j} |j / n − 1/k|,

    summed in float64 with log-binomial coefficients (O(n) work; no multinomial enumeration is needed). For large
    n the normal approximation E|N_i/n − 1/k| ≈ √(2/π) · √((1/k)(1 − 1/k)/n) gives E TV ≈ √((k − 1) / (2πn)).
    """
    check_positive_int(num_values, "num_values")
    check_positive_int(n, "n")
    if num_values == 1:
        return 0.0
    p = 1.0 / num_values
    j = torch.arange(n + 1, dtype=torch.float64)  # [n + 1] the possible counts of one value
    log_pmf = math.lgamma(n + 1) - torch.lgamma(j + 1) - torch.lgamma(n - j + 1) + j * math.log(p) + (n - j) * math.log1p(-p)
    return float(num_values / 2 * (log_pmf.exp() * (j / n - p).abs()).sum())


__all__ = [
    "BOOTSTRAP_SEED",
    "CONFIDENCE",
    "DistributionDistance",
    "REPLICATE_CHUNK",
    "frechet_distance",
    "mmd2_unbiased",
    "percentile_interval",
    "perfect_sampler_tv",
    "resample_counts",
    "wilson_interval",
]
