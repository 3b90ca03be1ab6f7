"""Metrics: the attribute classifier, prompt accuracy, the Fréchet distance and FID."""

import math

import pytest
import torch

from sdlearn.data import ATTRIBUTES, ShapesDataset, render_shape
from sdlearn.metrics import (
    AttributeClassifier,
    ClassifierConfig,
    attribute_accuracy,
    augment,
    feature_statistics,
    fid,
    fid_baseline,
    frechet_distance,
    prompt_accuracy,
    real_images,
)
from sdlearn.pretrained import load_classifier, weights_path
from sdlearn.recipes import train_classifier

SHIPPED = weights_path("classifier").is_file()
needs_shipped = pytest.mark.skipif(not SHIPPED, reason="shipped classifier weights not present")


@pytest.fixture(scope="module")
def untrained():
    torch.manual_seed(0)
    return AttributeClassifier(ClassifierConfig()).eval()


@pytest.fixture(scope="module")
def shipped():
    return load_classifier()


@pytest.fixture(scope="module")
def real():
    return ShapesDataset(512, "all", seed=123).batch(range(512))


# ------------------------------------------------------------------------------------------------
# The classifier


def test_classifier_shapes(untrained):
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    logits = untrained(x)
    assert {k: tuple(v.shape) for k, v in logits.items()} == {"color": (5, 8), "shape": (5, 4), "size": (5, 2), "position": (5, 5)}
    assert untrained.features(x).shape == (5, 128)
    predicted = untrained.predict(x)
    assert set(predicted) == set(ATTRIBUTES)
    for name, n in (("color", 8), ("shape", 4), ("size", 2), ("position", 5)):
        assert predicted[name].dtype == torch.long and predicted[name].shape == (5,)
        assert predicted[name].min() >= 0 and predicted[name].max() < n


def test_classifier_is_small_and_config_round_trips():
    model = AttributeClassifier()
    assert sum(p.numel() for p in model.parameters()) * 4 <= 2e6  # ≤ 2 MB of float32
    config = ClassifierConfig(widths=(8, 16), feature_dim=32)
    assert ClassifierConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown ClassifierConfig fields"):
        ClassifierConfig.from_dict({"depth": 3})
    with pytest.raises(ValueError, match="divisible"):
        ClassifierConfig(widths=(8, 8, 8, 8, 8, 8))


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(3, 32, 32), r"got one image \[3, 32, 32\]: add the batch dimension with x\[None\]"),
        (torch.zeros(2, 1, 32, 32), r"\[B, 3, 32, 32\]"),
        (torch.zeros(2, 3, 16, 16), r"\[B, 3, 32, 32\]"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.long), "floating-point"),
        (torch.full((2, 3, 32, 32), math.nan), "NaN"),
        ([[0.0]], "must be a torch.Tensor"),
    ],
)
def test_bad_images_raise(untrained, bad, match):
    with pytest.raises(ValueError, match=match):
        untrained(bad)
    with pytest.raises(ValueError, match=match):
        untrained.predict(bad)
    with pytest.raises(ValueError, match=match):
        prompt_accuracy(bad, "a red circle", reader=untrained)


def test_augment_keeps_range_and_is_seeded():
    x = real_images(16, seed=1)
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    assert 0 < (a - x).abs().mean() < 0.1  # mild: the image is still the same image


def test_train_classifier_writes_loadable_weights(tmp_path):
    model, result = train_classifier(tmp_path, steps=3, device="cpu", batch_size=16, progress=False,
                                     config=ClassifierConfig(widths=(4, 8), feature_dim=16))
    assert result.step == 3 and (tmp_path / "classifier.safetensors").is_file()
    loaded = load_classifier(tmp_path)
    assert loaded.training_info["steps"] == 3
    assert set(loaded.training_info["eval_accuracy"]) == {"train", "heldout"}
    x = real_images(4, seed=2)
    assert torch.equal(loaded(x)["shape"], model(x)["shape"])
    with pytest.raises(ValueError, match="batch_size"):
        train_classifier(steps=1, batch_size=0, progress=False)


@needs_shipped
def test_shipped_classifier_reads_real_images(shipped):
    for split in ("train", "heldout"):
        accuracy = attribute_accuracy(shipped, 1024, split, seed=777)
        assert min(accuracy[name] for name in ATTRIBUTES) >= 0.99, (split, accuracy)


# ------------------------------------------------------------------------------------------------
# Prompt accuracy


@needs_shipped
def test_prompt_accuracy_own_captions_near_one_shuffled_low(shipped, real):
    own = prompt_accuracy(real.images, real.captions, shipped)
    assert own.count == 512 and own.overall >= 0.99
    assert set(own.per_attribute) == set(ATTRIBUTES) and min(own.per_attribute.values()) >= 0.99
    shuffled = prompt_accuracy(real.images, real.captions[1:] + real.captions[:1], shipped)
    assert shuffled.overall < 0.1  # all four attributes right by chance: ≈ 1/320
    assert shuffled.per_attribute["color"] < 0.4  # ≈ 1/8 by chance


@needs_shipped
def test_partial_prompts_judge_only_named_attributes(shipped):
    images = torch.stack([render_shape("red", "circle", size, pos) for size in ("small", "large") for pos in ("top left", "center", "bottom right")])
    result = prompt_accuracy(images, "a red circle")  # reader=None: the shipped judge
    assert result.overall == 1.0 and set(result.per_attribute) == {"color", "shape"}
    assert result.counts == {"color": 6, "shape": 6, "size": 0, "position": 0}
    wrong_colour = prompt_accuracy(images, ["a blue circle"] * 6, shipped)
    assert wrong_colour.overall == 0.0 and wrong_colour.per_attribute == {"color": 0.0, "shape": 1.0}
    sizes = prompt_accuracy(images, ["small"] * 3 + ["big"] * 3, shipped)
    assert sizes.overall == 1.0 and set(sizes.per_attribute) == {"size"}
    assert sizes.correct.tolist() == [True] * 6


def test_prompt_accuracy_bad_prompts(untrained):
    x = real_images(3, seed=5)
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        prompt_accuracy(x, ["a red circle", "a blue square"], untrained)
    with pytest.raises(ValueError, match="names no attribute"):
        prompt_accuracy(x, "", untrained)
    with pytest.raises(ValueError, match="'giraffe'"):
        prompt_accuracy(x, "a red giraffe", untrained)
    with pytest.raises(ValueError, match="list of strings"):
        prompt_accuracy(x, [1, 2, 3], untrained)
    with pytest.raises(ValueError, match="AttributeClassifier"):
        prompt_accuracy(x, "a red circle", reader="resnet")


# ------------------------------------------------------------------------------------------------
# The Fréchet distance and FID


def test_frechet_distance_diagonal_closed_form():
    # For diagonal covariances, Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) = Σ (σ1 − σ2)², so d² = ‖μ1 − μ2‖² + ‖σ1 − σ2‖².
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    s1, s2 = torch.rand(6, generator=g, dtype=torch.float64) + 0.1, torch.rand(6, generator=g, dtype=torch.float64) + 0.1
    expected = (mu1 - mu2).pow(2).sum() + (s1 - s2).pow(2).sum()
    assert frechet_distance(mu1, torch.diag(s1**2), mu2, torch.diag(s2**2)) == pytest.approx(float(expected), rel=1e-10)
    # 1-D: N(0, 1) vs N(3, 4) → 3² + (1 − 2)² = 10
    assert frechet_distance(torch.zeros(1), torch.ones(1, 1), torch.full((1,), 3.0), torch.full((1, 1), 4.0)) == pytest.approx(10.0)


def test_frechet_distance_general_covariances():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 5, generator=g, dtype=torch.float64), torch.randn(5, 5, generator=g, dtype=torch.float64)
    cov1, cov2 = a @ a.T + 0.1 * torch.eye(5, dtype=torch.float64), b @ b.T
    mu1, mu2 = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    # Independent route: the eigenvalues of the (non-symmetric) product Σ1Σ2, whose square roots sum to Tr (Σ1Σ2)^½.
    trace_sqrt = torch.linalg.eigvals(cov1 @ cov2).real.clamp(min=0).sqrt().sum()
    expected = (mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * trace_sqrt
    assert frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(float(expected), rel=1e-8)
    assert frechet_distance(mu1, cov1, mu2, cov1) == pytest.approx(float((mu1 - mu2).pow(2).sum()), rel=1e-8)
    assert frechet_distance(mu1, cov1, mu1, cov1) == pytest.approx(0.0, abs=1e-9)
    # symmetric in its two Gaussians
    assert frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(frechet_distance(mu2, cov2, mu1, cov1), rel=1e-8)


def test_frechet_distance_bad_input():
    with pytest.raises(ValueError, match="vectors"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))
    with pytest.raises(ValueError, match=r"\[F, F\]"):
        frechet_distance(torch.zeros(3), torch.eye(2), torch.zeros(3), torch.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(torch.zeros(2), torch.full((2, 2), math.nan), torch.zeros(2), torch.eye(2))


def test_fid_identical_sets_is_zero_and_checks_input(untrained, real):
    assert fid(real.images, real.images.clone(), untrained) == pytest.approx(0.0, abs=1e-6)
    mean, cov = feature_statistics(real.images, untrained)
    assert mean.shape == (128,) and cov.shape == (128, 128) and cov.dtype == torch.float64
    with pytest.raises(ValueError, match="at least 2"):
        fid(real.images[:1], real.images, untrained)
    with pytest.raises(ValueError, match="fake must have shape"):
        fid(real.images, real.images[:, :1], untrained)
    with pytest.warns(UserWarning, match="at least 128 images"):
        fid(real.images[:20], real.images[20:40], untrained)
    with pytest.raises(ValueError, match="n must be an integer"):
        fid_baseline(1)


@pytest.mark.slow  # five FIDs of 512-image sets
@needs_shipped
def test_fid_real_vs_real_small_real_vs_noise_large(shipped, real):
    other = ShapesDataset(512, "all", seed=124).batch(range(512)).images
    noise = torch.randn(512, 3, 32, 32, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    blank = torch.full((512, 3, 32, 32), -1.0)  # black images: right background, no object
    real_real = fid(real.images, other, shipped)
    assert real_real == pytest.approx(fid_baseline(512, seed=123, classifier=shipped))
    # (the real-vs-real FID of 512-image sets varies by about ±20% with the seed; these margins are ≥ 2× that)
    assert fid(real.images, noise, shipped) > 20 * real_real
    assert fid(real.images, blank, shipped) > 20 * real_real
    # Images of one (colour, shape) pair only: real, but a collapsed distribution, which FID must see.
    one_pair = torch.stack([render_shape("red", "circle", "large", "center", rng=i) for i in range(256)])
    assert fid(real.images, one_pair, shipped) > 20 * real_real
