"""Metrics that compare distributions: KID, FID with its interval, open-attribute TV, nearest training images."""

import re
import warnings

import pytest
import torch

from sdlearn.data import render_batch
from sdlearn.metrics import (
    AttributeClassifier,
    ClassifierConfig,
    DistributionDistance,
    default_classifier,
    features,
    fid,
    fid_with_interval,
    kid,
    memorisation_check,
    nearest_training_images,
    open_attribute_tv,
    perfect_sampler_tv,
    real_images,
)
from sdlearn.pretrained import weights_path

needs_shipped = pytest.mark.skipif(not weights_path("classifier").is_file(), reason="shipped classifier weights not present")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return AttributeClassifier(ClassifierConfig(widths=(8, 8), feature_dim=16)).eval()


@pytest.fixture(scope="module")
def shipped():
    return default_classifier()


@pytest.fixture(scope="module")
def two_real_sets():
    return real_images(256, seed=1), real_images(256, seed=2)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# KID


def slow_kid(x, y):
    """MMD²_u with k(a, b) = (aᵀb / d + 1)³, as a plain double loop over Python floats."""
    d = len(x[0])
    k = lambda a, b: (sum(p * q for p, q in zip(a, b)) / d + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(a, b) for a in x for b in y) / (m * n)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_estimate_of_a_double_loop(tiny):
    real, fake = real_images(7, seed=3), torch.rand(5, 3, 32, 32, generator=seeded(0)) * 2 - 1
    expected = slow_kid(features(real, tiny).tolist(), features(fake, tiny).tolist())
    result = kid(real, fake, tiny, bootstrap=20)
    assert result.value == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert isinstance(result, DistributionDistance) and float(result) == result.value
    assert (result.num_real, result.num_fake, result.bootstrap) == (7, 5, 20)
    assert result.low <= result.high


def test_kid_is_symmetric_and_deterministic(tiny):
    a, b = real_images(20, seed=4), real_images(30, seed=5)
    first, again = kid(a, b, tiny, bootstrap=50), kid(a, b, tiny, bootstrap=50)
    assert first == again  # the default generator is seeded
    assert kid(a, b, tiny, bootstrap=50, generator=seeded(7)) == kid(a, b, tiny, bootstrap=50, generator=seeded(7))
    assert kid(a, b, tiny, bootstrap=50, generator=seeded(7)).low != first.low
    swapped = kid(b, a, tiny, bootstrap=50)
    assert swapped.value == pytest.approx(first.value, rel=1e-9, abs=1e-12)  # MMD² is symmetric; resamples differ
    assert (swapped.num_real, swapped.num_fake) == (30, 20)


@needs_shipped
def test_kid_real_vs_real_near_zero_real_vs_other_clearly_not(shipped, two_real_sets):
    a, b = two_real_sets
    same = kid(a, b, shipped)
    assert same.low < 0 < same.high
    blank = kid(a, torch.full_like(a, -1.0), shipped)  # black images: right background, no object
    noise = kid(a, torch.randn(a.shape, generator=seeded(0)).clamp(-1, 1), shipped)
    for different in (blank, noise):
        assert different.low > 0 and different.value > 10 * abs(same.value) and different.low > same.high


def test_distribution_distance_prints_estimate_interval_and_counts(tiny):
    assert str(DistributionDistance("KID", 0.0123, 0.0101, 0.0147, 256, 256, 1000)) == "KID 0.0123 (95% CI 0.0101–0.0147, n = 256 vs 256)"
    assert str(DistributionDistance("FID", 1686.2, 595.4, 3232.0, 300, 300, 200)) == "FID 1,690 (95% CI 600–3,230, n = 300 vs 300)"
    text = str(kid(real_images(6, seed=1), real_images(8, seed=2), tiny, bootstrap=10))
    assert re.fullmatch(r"KID -?[\d,.]+ \(95% CI -?[\d,.]+–-?[\d,.]+, n = 6 vs 8\)", text), text


# ------------------------------------------------------------------------------------------------
# FID with its interval


def test_fid_with_interval_agrees_with_fid_and_refuses_a_singular_covariance(tiny):
    a, b = real_images(40, seed=1), real_images(24, seed=2)  # feature_dim 16: at least 17 images per set
    result = fid_with_interval(a, b, tiny, bootstrap=30)
    assert result.value == pytest.approx(fid(a, b, tiny), rel=1e-12)
    assert result.name == "FID" and (result.num_real, result.num_fake, result.bootstrap) == (40, 24, 30)
    assert result.low <= result.value <= result.high
    assert result == fid_with_interval(a, b, tiny, bootstrap=30)
    with pytest.raises(ValueError, match=r"at least 17 images per set .*got 40 real and 16 fake; use kid"):
        fid_with_interval(a, b[:16], tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fid(a, b[:16], tiny)  # 16 images for 16 features: fid does not warn (its existing threshold, N < F)
    with pytest.warns(UserWarning, match=r"rank < 16 \(at most 9: 10 images span at most 9 directions"):
        fid(a, b[:10], tiny)


# ------------------------------------------------------------------------------------------------
# Diversity: TV distance of what a prompt leaves open


def test_perfect_sampler_tv_exact_small_cases_and_decreasing():
    assert perfect_sampler_tv(2, 1) == pytest.approx(0.5)
    assert perfect_sampler_tv(2, 2) == pytest.approx(0.25)  # counts (1, 1) w.p. ½ → 0; (2, 0) or (0, 2) → ½
    assert perfect_sampler_tv(5, 1) == pytest.approx(0.8)  # one draw: TV = 1 − 1/k
    assert perfect_sampler_tv(1, 10) == 0.0
    figures = [perfect_sampler_tv(5, n) for n in (1, 4, 16, 64, 256, 1024)]
    assert all(a > b for a, b in zip(figures, figures[1:]))
    assert perfect_sampler_tv(5, 4096) == pytest.approx((4 / (2 * torch.pi * 4096)) ** 0.5, rel=0.01)  # √((k−1)/(2πn))


@pytest.mark.parametrize("k, n", [(5, 50), (2, 7), (8, 256)])
def test_perfect_sampler_tv_matches_a_simulation(k, n):
    trials = 20_000
    draws = torch.randint(k, (trials, n), generator=seeded(k * n))
    counts = torch.zeros(trials, k).scatter_add_(1, draws, torch.ones(trials, n))  # [trials, k]
    tv = 0.5 * (counts / n - 1 / k).abs().sum(1)  # [trials]
    assert perfect_sampler_tv(k, n) == pytest.approx(tv.mean().item(), abs=4 * tv.std().item() / trials**0.5)


def red_circles(n, positions=None, seed=0):
    g = seeded(seed)
    sizes = torch.randint(2, (n,), generator=g)
    positions = torch.randint(5, (n,), generator=g) if positions is None else positions
    return render_batch(["red"] * n, ["circle"] * n, sizes, positions, g)


@needs_shipped
def test_open_attribute_tv_of_the_data_is_a_perfect_samplers(shipped):
    result = open_attribute_tv(red_circles(256), "a red circle", shipped)
    assert set(result.tv) == {"size", "position"} and result.count == 256
    for name in result.tv:
        assert result.perfect_sampler[name] == perfect_sampler_tv(len(result.histogram[name]), 256)
        assert abs(result.excess[name]) < 0.05, result
    assert int(result.histogram["position"].sum()) == 256
    assert "a perfect sampler" in str(result)
    g = seeded(1)  # colour and shape left open too, as Shapes draws them ("all" split: every pair)
    images = render_batch(torch.randint(8, (256,), generator=g), torch.randint(4, (256,), generator=g), ["large"] * 256, ["top left"] * 256, g)
    result = open_attribute_tv(images, "large, top left", shipped)
    assert set(result.tv) == {"color", "shape"} and max(abs(e) for e in result.excess.values()) < 0.05, result


@needs_shipped
def test_open_attribute_tv_sees_a_collapsed_attribute(shipped):
    images = red_circles(128, positions=torch.full((128,), 4))  # every circle in the centre
    result = open_attribute_tv(images, "a red circle", shipped, attributes=["position"])
    assert set(result.tv) == {"position"}
    assert result.tv["position"] == pytest.approx(1 - 1 / 5, abs=0.02)


def test_open_attribute_tv_refuses_what_it_cannot_measure(tiny):
    x = real_images(4, seed=1)
    with pytest.raises(ValueError, match="'giraffe'"):
        open_attribute_tv(x, "a red giraffe", tiny)
    with pytest.raises(ValueError, match="nothing is left open"):
        open_attribute_tv(x, "a large red circle in the top left", tiny)
    with pytest.raises(ValueError, match=r"'color' is named by the prompt .*leaves open: size, position"):
        open_attribute_tv(x, "a red circle", tiny, attributes=["color"])
    with pytest.raises(ValueError, match="'colour' is not an attribute"):
        open_attribute_tv(x, "a circle", tiny, attributes=["colour"])
    with pytest.raises(ValueError, match="attributes must be a non-empty list"):
        open_attribute_tv(x, "a circle", tiny, attributes="color")


# ------------------------------------------------------------------------------------------------
# Memorisation


def test_nearest_training_images_finds_copies_exactly():
    reference = real_images(40, seed=3)
    images = torch.cat([reference[[17, 5]], real_images(3, seed=4)])
    nearest = nearest_training_images(images, reference, k=3)
    assert nearest.distances.shape == (5, 3) and nearest.indices.shape == (5, 3)
    assert nearest.distances[:2, 0].tolist() == [0.0, 0.0] and nearest.indices[:2, 0].tolist() == [17, 5]
    assert (nearest.distances[:, 1:] >= nearest.distances[:, :-1]).all()
    brute = torch.cdist(images.flatten(1).double(), reference.flatten(1).double(), compute_mode="donot_use_mm_for_euclid_dist")
    expected = brute.topk(3, largest=False)
    assert torch.equal(nearest.indices, expected.indices)
    torch.testing.assert_close(nearest.distances, expected.values, rtol=1e-9, atol=1e-9)


def test_nearest_training_images_chunking_changes_nothing(tiny):
    reference, images = real_images(50, seed=5), real_images(13, seed=6)
    for metric in ("pixel", "features"):
        whole = nearest_training_images(images, reference, 4, metric, tiny)
        chunked = nearest_training_images(images, reference, 4, metric, tiny, chunk_size=3)
        assert torch.equal(whole.indices, chunked.indices), metric
        torch.testing.assert_close(whole.distances, chunked.distances, rtol=1e-12, atol=1e-12)
    copies = nearest_training_images(reference[[9]], reference, 1, "features", tiny)
    assert copies.indices.item() == 9 and copies.distances.item() == pytest.approx(0, abs=1e-6)


def test_memorisation_check_against_fresh_real_images():
    training, fresh = real_images(64, seed=7), real_images(32, seed=8)
    generated = torch.cat([training[:4], real_images(28, seed=9)])  # four copies of training images
    check = memorisation_check(generated, training, fresh)
    assert check.distances.shape == (32,) and check.baseline.shape == (32,)
    assert check.distances[:4].tolist() == [0.0] * 4 and check.indices[:4].tolist() == [0, 1, 2, 3]
    assert check.closer_than_fresh >= 4 and check.baseline.min() > 0
    assert f"{check.closer_than_fresh} of 32 generated images" in str(check)


# ------------------------------------------------------------------------------------------------
# Bad input: one clear line


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda c, x: kid(x[:1], x, c), "real must hold at least 2 image"),
        (lambda c, x: kid(x, x[:, :1], c), r"fake must have shape \[B, 3, 32, 32\]"),
        (lambda c, x: kid(x[0], x, c), "add the batch dimension"),
        (lambda c, x: kid(x, x, c, bootstrap=0), "bootstrap must be a positive integer"),
        (lambda c, x: kid(x, x, c, generator=3), "generator must be a torch.Generator"),
        (lambda c, x: kid(x, x, "inception"), "classifier must be an AttributeClassifier"),
        (lambda c, x: fid_with_interval(x, x, c), "at least 17 images per set"),
        (lambda c, x: open_attribute_tv(x[:, :, :16], "a red circle", c), r"\[B, 3, 32, 32\]"),
        (lambda c, x: open_attribute_tv(x, 3, c), "prompt must be a string"),
        (lambda c, x: perfect_sampler_tv(0, 5), "num_values must be a positive integer"),
        (lambda c, x: perfect_sampler_tv(5, 2.0), "n must be a positive integer"),
        (lambda c, x: nearest_training_images(x, x, 0), "k must be a positive integer"),
        (lambda c, x: nearest_training_images(x, x, 9), "k must be at most 8"),
        (lambda c, x: nearest_training_images(x, x, metric="cosine"), "metric must be one of 'pixel', 'features'"),
        (lambda c, x: nearest_training_images(x, x.long(), 1), "reference must be a floating-point tensor"),
        (lambda c, x: nearest_training_images(x, x[:, :2], 1), r"reference must have shape \[B, 3, 32, 32\]"),
        (lambda c, x: memorisation_check(x, x, x[:, :, :, :8]), r"\[B, 3, 32, 32\]"),
    ],
)
def test_bad_input_raises_one_line(tiny, call, match):
    x = real_images(8, seed=1)
    with pytest.raises(ValueError, match=match) as raised:
        call(tiny, x)
    assert "\n" not in str(raised.value)
