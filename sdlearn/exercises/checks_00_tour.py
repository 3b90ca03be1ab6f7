"""Checkers of notebook 00, the tour: how different the seeds' pictures are, and how many layouts to expect.

In the order the notebook uses them: ``check_mean_pairwise_rms`` (implement: a second measure of how much a
prompt's pictures vary from seed to seed) and ``check_expected_distinct`` (derive: how many distinct layouts k seeds
should show when a prompt leaves attributes open and the model samples them uniformly, as the data does).
"""

from __future__ import annotations

import math

import torch

from sdlearn.exercises.framework import Case, Checker, Mistake, format_shape, random_images, register


def _flat_pairs(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The images flattened to ``[N, P]`` (float64), and the indices (i, j), i < j, of every unordered pair."""
    flat = images.flatten(1).double()  # [N, P]
    i, j = torch.triu_indices(len(flat), len(flat), offset=1)
    return flat, i, j


def _mean_pairwise_rms(images: torch.Tensor) -> float:
    flat, i, j = _flat_pairs(images)
    return ((flat[i] - flat[j]) ** 2).mean(dim=1).sqrt().mean().item()  # RMS per pair, then the mean over pairs


def _pairwise_rms_cases(g: torch.Generator) -> list[Case]:
    two = random_images(g, 2, 3, 4, 4)
    spread = random_images(g, 6, 3, 8, 8) * torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 1.0]).reshape(6, 1, 1, 1)
    twin = random_images(g, 1, 3, 8, 8)
    with_twins = torch.cat([twin, twin, random_images(g, 1, 3, 8, 8)])
    eight = random_images(g, 8, 3, 32, 32)
    return [
        Case(f"2 random images {format_shape(two)} in [-1, 1]", (two,)),
        Case(f"6 random images {format_shape(spread)}, scaled by 0.05 … 1 (so the pairs differ by very different amounts)",
             (spread,)),
        Case(f"3 images {format_shape(with_twins)}, the first two identical", (with_twins,)),
        Case(f"8 random images {format_shape(eight)} in [-1, 1], like one row of §3's grid", (eight,)),
    ]


def _all_ordered_pairs(images):
    flat = images.flatten(1).double()
    return (torch.cdist(flat, flat) / flat.shape[1] ** 0.5).mean().item()


def _no_root(images):
    flat, i, j = _flat_pairs(images)
    return ((flat[i] - flat[j]) ** 2).mean(dim=1).mean().item()


def _root_after_mean(images):
    flat, i, j = _flat_pairs(images)
    return ((flat[i] - flat[j]) ** 2).mean(dim=1).mean().sqrt().item()


def _norm_not_rms(images):
    flat, i, j = _flat_pairs(images)
    return (flat[i] - flat[j]).norm(dim=1).mean().item()


def _mean_absolute(images):
    flat, i, j = _flat_pairs(images)
    return (flat[i] - flat[j]).abs().mean().item()


def _neighbours_only(images):
    flat = images.flatten(1).double()
    return ((flat[1:] - flat[:-1]) ** 2).mean(dim=1).sqrt().mean().item()


check_mean_pairwise_rms = register(Checker(
    name="check_mean_pairwise_rms",
    signature="fn(images) -> float",
    doc="how far apart a prompt's pictures are: for ``images`` ``[N, 3, H, W]`` (N ≥ 2, one per seed), the "
        "root-mean-square pixel difference √(mean over the pixels of (x_i − x_j)²) of each of the N(N−1)/2 pairs "
        "i < j, averaged over the pairs; a number (a Python float or a one-element tensor).",
    reference=_mean_pairwise_rms,
    make_cases=_pairwise_rms_cases,
    hint="flatten each image to one row ([N, 3·H·W]); for every pair i < j take the square root of the mean of the "
         "squared differences; then average these N(N−1)/2 numbers. torch.triu_indices(N, N, offset=1) lists the pairs.",
    mistakes=(
        Mistake(_all_ordered_pairs, "you averaged over all N² ordered pairs, each image with itself included (a "
                                    "distance of 0 that pulls the mean down): average over the pairs i < j"),
        Mistake(_no_root, "you averaged the mean squared differences: take the square root of each pair's mean "
                          "square before averaging over the pairs"),
        Mistake(_root_after_mean, "you took the square root after averaging over the pairs: take it for each pair, "
                                  "then average"),
        Mistake(_norm_not_rms, "you averaged the distances ‖x_i − x_j‖ without dividing by the number of pixel "
                               "values: the RMS is the root of the *mean* square, so it does not grow with the image size"),
        Mistake(_mean_absolute, "you averaged |x_i − x_j| (the mean absolute difference): square, average over the "
                                "pixels, then take the root"),
        Mistake(_neighbours_only, "you compared only neighbouring images (i, i+1): every pair i < j counts"),
    ),
))


def _expected_distinct(counts, k):
    n = math.prod(counts)  # the open attributes are independent and uniform: their combinations multiply
    return n * (1 - (1 - 1 / n) ** k)  # Σ over the n combinations of P(at least one of the k seeds picks it)


def _expected_distinct_cases(g: torch.Generator) -> list[Case]:
    return [
        Case("counts = (2, 5) (size and position left open, as by 'a red circle'), k = 8 seeds", ((2, 5), 8)),
        Case("counts = (2,) (only the size left open), k = 3 seeds", ((2,), 3)),
        Case("counts = (8, 4, 2, 5) (everything left open for one object), k = 8 seeds", ((8, 4, 2, 5), 8)),
        Case("counts = () (nothing left open: a full prompt), k = 5 seeds", ((), 5)),
        Case("counts = (5,) (only the position left open), k = 1 seed", ((5,), 1)),
        Case("counts = (4, 2), k = 40 seeds", ((4, 2), 40)),
    ]


check_expected_distinct = register(Checker(
    name="check_expected_distinct",
    signature="fn(counts, k) -> float",
    doc="the expected number of distinct combinations of the open attributes among ``k`` pictures (seeds), when "
        "each picture draws every open attribute uniformly and independently from its allowed values: ``counts`` "
        "holds the number of values of each open attribute (``(2, 5)`` for size and position), ``k`` ≥ 0. With "
        "n = ∏ counts combinations the answer is n·(1 − (1 − 1/n)^k) (linearity of expectation).",
    reference=_expected_distinct,
    make_cases=_expected_distinct_cases,
    hint="count the combinations first (n, a product); a given combination is missed by all k seeds with "
         "probability (1 − 1/n)^k; the expected number of combinations that appear is the sum over the n "
         "combinations of the probability that each appears.",
    mistakes=(
        Mistake(lambda counts, k: _expected_distinct((sum(counts),) if counts else (), k),
                "you added the numbers of values: the combinations of independent attributes multiply "
                "(2 sizes × 5 positions = 10 layouts)"),
        Mistake(lambda counts, k: float(min(k, math.prod(counts))),
                "you assumed each seed picks a new combination until all are used (min(k, n)): seeds repeat "
                "combinations by chance"),
        Mistake(lambda counts, k: 1 - (1 - 1 / math.prod(counts)) ** k,
                "you computed the probability that one given combination appears: sum it over the n combinations "
                "(multiply by n)"),
        Mistake(lambda counts, k: math.prod(counts) * (1 - (1 - 1 / math.prod(counts)) ** (k - 1)),
                "your exponent is off by one: all k seeds must miss a combination, with probability (1 − 1/n)^k"),
        Mistake(lambda counts, k: math.prod(counts) * (1 - math.exp(-k / math.prod(counts))),
                "you used the approximation n·(1 − e^(−k/n)): it is close when n is large, but (1 − 1/n)^k is exact"),
    ),
    atol=1e-6,
    rtol=1e-6,
))
