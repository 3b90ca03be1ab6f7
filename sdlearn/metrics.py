"""Metrics: an attribute classifier, prompt accuracy, and FID on the classifier's features.

How do we know a text-to-image model draws what it is told? Stable Diffusion is judged with a CLIP
score (does CLIP think image and prompt match?) and FID (Heusel et al. 2017: do the generated images
look like real ones, as a whole?). At Shapes scale we can do better than a CLIP score: every prompt
names attributes exactly, so a small CNN that reads the four attributes off an image tells us whether
an image obeys its prompt.

- :class:`AttributeClassifier` — a small CNN, 32×32 image → four heads (colour 8, shape 4, size 2,
  position 5), trained on fresh Shapes images (``python -m sdlearn train classifier``) and shipped in
  ``sdlearn/weights/classifier.*``. Its penultimate layer (:meth:`AttributeClassifier.features`, 128
  numbers) plays the role of Inception-v3's pool features in FID.
- :func:`prompt_accuracy` — the fraction of images whose predicted attributes match *every* attribute
  their prompt names (the course's answer to a CLIP score), plus per-attribute accuracy.
- :func:`fid` — the Fréchet distance between Gaussians fitted to the features of two image sets,
  and :func:`fid_baseline`, the FID between two independent sets of real images of the same size:
  FID is biased upwards at small sample sizes, so it is only meaningful beside that baseline.

Decisions, written down:

- Images are clamped to [-1, 1] before they are judged (what a viewer of the saved PNG sees).
- The classifier trains with mild corruptions (Gaussian noise of σ ≤ 0.08 and a random amount of
  blur, on half the images each) so that a generated image that is slightly soft or grainy is judged
  on its attributes, not on its texture; on clean real images it is ≥ 99.5% right per attribute.
- A prompt must name at least one attribute: prompt accuracy of an empty (unconditional) prompt is
  meaningless, and a silent "all correct" would flatter the model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdlearn.checkpoint import ConfigMixin, load_module
from sdlearn.checks import check_batch
from sdlearn.data import ATTRIBUTE_VALUES, ATTRIBUTES, IMAGE_SIZE, ShapesDataset, parse_prompt

CLASS_NAMES: dict[str, tuple[str, ...]] = ATTRIBUTE_VALUES  # each head's classes, in index order
NUM_CLASSES: dict[str, int] = {name: len(values) for name, values in CLASS_NAMES.items()}

CLASSIFIER_EVAL_SEED = 30_000  # train_classifier's accuracy check: ShapesDataset(2048, split, seed=30_000)
BASELINE_SEED = 40_000  # fid_baseline's default: ShapesDataset(n, split, seed) vs seed + 1


# ------------------------------------------------------------------------------------------------
# The classifier


@dataclass
class ClassifierConfig(ConfigMixin):
    """Hyperparameters of :class:`AttributeClassifier`. Each of the ``len(widths)`` levels is two 3×3
    convolutions then a 2×2 average pool, so the default (16, 32, 64) takes 32×32 → 4×4."""

    in_channels: int = 3
    image_size: int = IMAGE_SIZE
    widths: tuple[int, ...] = (16, 32, 64)
    feature_dim: int = 128  # the penultimate features: what FID compares

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)
        self.check_positive_ints("in_channels", "image_size", "feature_dim")
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"ClassifierConfig.widths must be positive integers, got {self.widths}")
        if self.image_size % 2 ** len(self.widths):
            raise ValueError(f"image_size={self.image_size} must be divisible by 2**len(widths) = {2 ** len(self.widths)}")



def check_images(images, name: str = "images", image_size: int = IMAGE_SIZE, min_count: int = 1) -> torch.Tensor:
    """``images`` as a finite float batch ``[N, 3, S, S]`` with N ≥ ``min_count``, or a clear ValueError."""
    return check_batch(images, (3, image_size, image_size), "image", name, min_count, finite=True)


class AttributeClassifier(nn.Module):
    """A small CNN that reads a Shapes image's four attributes.

    image [B, 3, 32, 32] → (conv3×3, SiLU, conv3×3, SiLU, avg-pool 2×2) per level → [B, 64, 4, 4]
    → flatten → linear → SiLU → features [B, 128] → one linear head per attribute.

    The 4×4 map is flattened rather than globally pooled so that the features keep *where* the object
    is (position is one of the attributes). No normalisation layers: the colour of the object is an
    absolute quantity that a per-image normalisation would partly wash out, and the net is shallow
    enough to train without.
    """

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = config = ClassifierConfig.resolve(config)
        layers: list[nn.Module] = []
        channels = config.in_channels
        for width in config.widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2)]
            channels = width
        self.body = nn.Sequential(*layers)
        side = config.image_size // 2 ** len(config.widths)
        self.to_features = nn.Sequential(nn.Flatten(), nn.Linear(channels * side * side, config.feature_dim), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(config.feature_dim, n) for name, n in NUM_CLASSES.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The penultimate features ``[B, feature_dim]`` (what :func:`fid` compares)."""
        check_images(images, image_size=self.config.image_size)
        return self.to_features(self.body(images))  # [B, C, s, s] → [B, F]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute: {"color": [B, 8], "shape": [B, 4], "size": [B, 2], "position": [B, 5]}."""
        h = self.features(images)  # [B, F]
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> dict[str, torch.Tensor]:
        """The most likely class per attribute, long tensors ``[B]`` of indices into ``CLASS_NAMES[name]``.
        Images are clamped to [-1, 1] and moved to the classifier's device; the result is on the images' device."""
        check_images(images, image_size=self.config.image_size)
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            chunks = [self(images[i : i + batch_size].to(device).clamp(-1, 1)) for i in range(0, len(images), batch_size)]
        finally:
            self.train(was_training)
        return {name: torch.cat([c[name] for c in chunks]).argmax(dim=1).to(images.device) for name in NUM_CLASSES}


_DEFAULT: dict[str, AttributeClassifier] = {}


def default_classifier() -> AttributeClassifier:
    """The shipped classifier (``sdlearn/weights/classifier.*``) on the CPU, loaded once and cached."""
    if "shipped" not in _DEFAULT:
        _DEFAULT["shipped"] = load_module(AttributeClassifier, ClassifierConfig, "classifier")
    return _DEFAULT["shipped"]


def _resolve(classifier: AttributeClassifier | None) -> AttributeClassifier:
    if classifier is None:
        return default_classifier()
    if not isinstance(classifier, AttributeClassifier):
        raise ValueError(f"classifier must be an AttributeClassifier or None (the shipped one), got {type(classifier).__name__}")
    return classifier


# ------------------------------------------------------------------------------------------------
# Training pieces (the recipe is sdlearn.recipes.train_classifier: `python -m sdlearn train classifier`)

AUGMENT_NOISE_STD = 0.08  # largest σ of the added Gaussian noise, on [-1, 1] images
_BLUR_KERNEL = torch.tensor([0.25, 0.5, 0.25])  # ≈ a Gaussian of σ ≈ 0.7 px, separable


def augment(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mild corruptions so that the classifier judges slightly imperfect generated images fairly.

    Half the images are blurred by a random amount (a mix x ← (1 − a)·x + a·blur(x), a ~ U(0, 1), with
    a [1, 2, 1]/4 binomial blur), and half get Gaussian noise with σ ~ U(0, 0.08); then clamp to [-1, 1].
    Attributes are unchanged by either."""
    b = len(images)
    u = torch.rand(b, 4, generator=generator)  # [B, 4]: blur?, amount, noise?, σ
    k = _BLUR_KERNEL.to(images)
    kernel = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)  # depthwise [3, 1, 3, 3]
    blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    a = ((u[:, 0] < 0.5) * u[:, 1]).to(images).view(b, 1, 1, 1)
    sigma = ((u[:, 2] < 0.5) * u[:, 3] * AUGMENT_NOISE_STD).to(images).view(b, 1, 1, 1)
    noise = torch.randn(images.shape, generator=generator).to(images)
    return ((1 - a) * images + a * blurred + sigma * noise).clamp(-1, 1)


def classifier_loss(model: AttributeClassifier, images: torch.Tensor, labels: dict[str, torch.Tensor]):
    """Sum over the four heads of the cross-entropy → ``(loss, {"acc_color": ..., ...})`` (batch accuracy)."""
    logits = model(images)
    loss = sum(F.cross_entropy(logits[name], labels[name]) for name in NUM_CLASSES)
    logs = {f"acc_{name}": (logits[name].argmax(1) == labels[name]).float().mean().item() for name in NUM_CLASSES}
    return loss, logs


@torch.no_grad()
def attribute_accuracy(classifier: AttributeClassifier, n: int = 2048, split: str = "all", seed: int = CLASSIFIER_EVAL_SEED) -> dict[str, float]:
    """Per-attribute accuracy on ``ShapesDataset(n, split, seed)`` (clean real images) and ``"all"``, the
    fraction with all four right."""
    batch = ShapesDataset(n, split, seed=seed).batch(range(n))
    predicted = classifier.predict(batch.images)
    right = {name: predicted[name] == batch.attributes[name] for name in NUM_CLASSES}
    accuracy = {name: r.float().mean().item() for name, r in right.items()}
    accuracy["all"] = torch.stack(list(right.values())).all(0).float().mean().item()
    return accuracy


# ------------------------------------------------------------------------------------------------
# Prompt accuracy


@dataclass
class PromptAccuracy:
    """What :func:`prompt_accuracy` measured.

    ``overall``: fraction of images whose predicted attributes match every attribute their prompt names.
    ``per_attribute[name]``: accuracy on ``name`` over the images whose prompt names it (absent if none
    does); ``counts[name]``: how many prompts name it. ``count``: number of images. ``correct``: bool ``[N]``,
    per image. ``predicted``: the classifier's predictions, {name: LongTensor [N]}."""

    overall: float
    per_attribute: dict[str, float]
    count: int
    counts: dict[str, int] = field(default_factory=dict)
    correct: torch.Tensor | None = None
    predicted: dict[str, torch.Tensor] = field(default_factory=dict)

    def __str__(self) -> str:
        parts = ", ".join(f"{name} {100 * acc:.1f}%" for name, acc in self.per_attribute.items())
        return f"prompt accuracy {100 * self.overall:.1f}% over {self.count} images ({parts})"


def prompt_accuracy(images: torch.Tensor, prompts: str | list[str], classifier: AttributeClassifier | None = None) -> PromptAccuracy:
    """Does each image show what its prompt asks for? The classifier's predictions are compared with the
    attributes each prompt names (:func:`sdlearn.data.parse_prompt`): "a red circle" judges colour and
    shape only.

    ``images``: ``[N, 3, 32, 32]`` in [-1, 1]. ``prompts``: one string per image, or one string (or a
    one-element list) for all. ``classifier``: None for the shipped one. Raises ``ValueError`` for a
    prompt list of another length, a word outside the caption vocabulary, or a prompt that names no
    attribute.
    """
    classifier = _resolve(classifier)
    check_images(images)
    n = len(images)
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a string or a list of strings, one per image")
    if len(prompts) == 1:
        prompts = list(prompts) * n
    if len(prompts) != n:
        raise ValueError(f"got {len(prompts)} prompts for {n} images; give one prompt per image, or one for all")

    wanted = {name: torch.full((n,), -1, dtype=torch.long) for name in ATTRIBUTES}  # -1: not named
    parsed: dict[str, dict[str, str]] = {}
    for i, prompt in enumerate(prompts):
        if prompt not in parsed:
            try:
                parsed[prompt] = parse_prompt(prompt)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
            if not parsed[prompt]:
                raise ValueError(
                    f"prompt {i} ({prompt!r}) names no attribute; prompt accuracy needs at least one of "
                    f"{', '.join(ATTRIBUTES)} (an empty prompt is unconditional: there is nothing to check)"
                )
        for name, value in parsed[prompt].items():
            wanted[name][i] = CLASS_NAMES[name].index(value)

    predicted = {name: p.cpu() for name, p in classifier.predict(images).items()}
    named = {name: wanted[name] >= 0 for name in ATTRIBUTES}
    correct = torch.ones(n, dtype=torch.bool)
    per_attribute, counts = {}, {}
    for name in ATTRIBUTES:
        right = predicted[name] == wanted[name]
        correct &= right | ~named[name]
        counts[name] = int(named[name].sum())
        if counts[name]:
            per_attribute[name] = right[named[name]].float().mean().item()
    return PromptAccuracy(correct.float().mean().item(), per_attribute, n, counts, correct, predicted)


# ------------------------------------------------------------------------------------------------
# FID


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


@torch.no_grad()
def feature_statistics(images: torch.Tensor, classifier: AttributeClassifier | None = None, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[F]`` and covariance ``[F, F]`` (float64, unbiased) of the classifier's penultimate
    features of ``images`` ``[N, 3, 32, 32]`` (clamped to [-1, 1]). Compute a real set's statistics once
    and compare many generated sets with :func:`frechet_distance`."""
    classifier = _resolve(classifier)
    check_images(images, min_count=2)
    n, f = len(images), classifier.config.feature_dim
    if n < f:
        warnings.warn(
            f"FID from {n} images with {f} features: the covariance estimate has rank < {f} and the value is "
            f"strongly biased; use at least {f} images (several times more for a stable figure), and compare "
            f"with fid_baseline at the same n",
            stacklevel=3,
        )
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    try:
        feats = torch.cat([classifier.features(images[i : i + batch_size].to(device).clamp(-1, 1)) for i in range(0, n, batch_size)])
    finally:
        classifier.train(was_training)
    feats = feats.to("cpu", torch.float64)  # [N, F]
    return feats.mean(0), torch.cov(feats.T)


def fid(real: torch.Tensor, fake: torch.Tensor, classifier: AttributeClassifier | None = None) -> float:
    """FID (Heusel et al. 2017) on the classifier's penultimate features: the Fréchet distance between
    Gaussians fitted to the features of ``real`` and of ``fake`` (each ``[N, 3, 32, 32]`` in [-1, 1], N ≥ 2;
    the two sets may differ in size). 0 for identical sets; FID shrinks as N grows even for two real sets,
    so report it beside :func:`fid_baseline` at the same N. Warns when N < the feature dimension (128).

    The scale is the features' own (the shipped classifier's features are large and clustered by attribute,
    so real-vs-real FID is ≈ 2,500 at 256 images per set, ≈ 650 at 1,024, and pure noise ≈ 55,000): only a
    ratio to the baseline means anything, never a comparison with Inception-FID figures."""
    classifier = _resolve(classifier)
    check_images(real, "real", min_count=2)
    check_images(fake, "fake", min_count=2)
    return frechet_distance(*feature_statistics(real, classifier), *feature_statistics(fake, classifier))


def real_images(n: int, split: str = "all", seed: int = BASELINE_SEED) -> torch.Tensor:
    """``n`` real Shapes images ``[n, 3, 32, 32]``: ``ShapesDataset(n, split, seed)`` rendered at once."""
    return ShapesDataset(n, split, seed=seed).batch(range(n)).images


def fid_baseline(n: int, seed: int = BASELINE_SEED, split: str = "all", classifier: AttributeClassifier | None = None) -> float:
    """Real-vs-real FID: between ``ShapesDataset(n, split, seed)`` and the independent
    ``ShapesDataset(n, split, seed + 1)``. The floor a generator's FID at the same ``n`` is compared with."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an integer ≥ 2 (images per set), got {n!r}")
    return fid(real_images(n, split, seed), real_images(n, split, seed + 1), classifier)


__all__ = [
    "AttributeClassifier",
    "ClassifierConfig",
    "PromptAccuracy",
    "attribute_accuracy",
    "augment",
    "classifier_loss",
    "default_classifier",
    "feature_statistics",
    "fid",
    "fid_baseline",
    "frechet_distance",
    "prompt_accuracy",
    "real_images",
]
