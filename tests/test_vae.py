"""The VAE: shapes, the diagonal Gaussian (sample, mode, KL), input checks, learning, shipped weights."""

import math

import pytest
import torch

from sdlearn.checkpoint import count_parameters
from sdlearn.data import ShapesDataset
from sdlearn.training import train
from sdlearn.vae import VAE, DiagonalGaussian, VAEConfig, compute_scaling_factor, psnr, vae_loss

TINY = VAEConfig(base_channels=8, channel_multipliers=(1, 2, 2), num_res_blocks=1, norm_groups=4)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return VAE(VAEConfig()).eval()


def test_default_shapes_round_trip(vae):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    posterior = vae.encode(x)
    assert isinstance(posterior, DiagonalGaussian)
    assert posterior.mean.shape == posterior.logvar.shape == (2, 4, 8, 8)
    assert vae.latent_shape == (4, 8, 8)
    assert vae.decode(posterior.sample()).shape == (2, 3, 32, 32)
    recon, post = vae(x)
    assert recon.shape == x.shape and post.mean.shape == (2, 4, 8, 8)


def test_other_configurations_change_the_latent_shape():
    cfg = VAEConfig(image_size=16, latent_channels=2, base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1, norm_groups=4)
    vae = VAE(cfg)
    assert vae.latent_shape == (2, 8, 8)  # f = 2
    assert vae.decode(vae.encode(torch.zeros(3, 3, 16, 16)).mode()).shape == (3, 3, 16, 16)


def test_default_model_fits_the_weights_budget(vae):
    # The design asks for ≈ 1–3M parameters (the order of magnitude); the weights file must stay ≤ 8 MB (float32).
    assert count_parameters(vae) * 4 <= 8e6


def test_kl_closed_form():
    zeros = torch.zeros(2, 4, 8, 8)
    assert torch.equal(DiagonalGaussian(zeros, zeros).kl(), torch.zeros(2))  # q = N(0, I) → KL = 0
    # One dimension with μ = 1, σ² = 2: ½(1 + 2 − 1 − ln 2), summed over the 3 dims of each sample.
    mean = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 3.0]])
    logvar = torch.tensor([[math.log(2)] * 3, [0.0, 0.0, 0.0]])
    expected = torch.tensor([3 * 0.5 * (2 - math.log(2)), 0.5 * 9])
    assert torch.allclose(DiagonalGaussian(mean, logvar).kl(), expected, atol=1e-6)
    # And against torch.distributions for random values.
    mean, logvar = torch.randn(5, 4, 2, 2), torch.randn(5, 4, 2, 2)
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, torch.exp(0.5 * logvar)), torch.distributions.Normal(0.0, 1.0)
    )
    assert torch.allclose(DiagonalGaussian(mean, logvar).kl(), reference.flatten(1).sum(1), atol=1e-5)


def test_sample_is_mode_plus_scaled_noise_and_follows_the_generator():
    mean = torch.full((4000, 4, 1, 1), 0.5)
    logvar = torch.full((4000, 4, 1, 1), math.log(0.25))  # σ = 0.5
    q = DiagonalGaussian(mean, logvar)
    assert torch.equal(q.mode(), mean)
    assert torch.allclose(q.std, torch.full_like(mean, 0.5))
    z = q.sample(torch.Generator().manual_seed(0))
    assert abs(z.mean().item() - 0.5) < 0.02 and abs(z.std().item() - 0.5) < 0.02
    again = q.sample(torch.Generator().manual_seed(0))
    other = q.sample(torch.Generator().manual_seed(1))
    assert torch.equal(z, again) and not torch.equal(z, other)
    # The reparameterisation: z = μ + σ ε with ε from the same generator.
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(z, mean + 0.5 * eps)


def test_sample_is_differentiable_in_mean_and_logvar():
    mean = torch.zeros(2, 4, 8, 8, requires_grad=True)
    logvar = torch.zeros(2, 4, 8, 8, requires_grad=True)
    DiagonalGaussian(mean, logvar).sample().pow(2).sum().backward()
    assert mean.grad.abs().sum() > 0 and logvar.grad.abs().sum() > 0


def test_logvar_is_clamped():
    q = DiagonalGaussian(torch.zeros(1, 4), torch.tensor([[-1000.0, -30.5, 19.0, 1000.0]]))
    assert q.logvar.tolist() == [[-30.0, -30.0, 19.0, 20.0]]
    assert torch.isfinite(q.std).all() and (q.std > 0).all()
    assert torch.isfinite(q.kl()).all()


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (torch.zeros(2, 1, 32, 32), "[B, 3, 32, 32]"),  # wrong channels
        (torch.zeros(2, 3, 28, 28), "[B, 3, 32, 32]"),  # wrong size
        (torch.zeros(3, 32, 32), "got one image [3, 32, 32]: add the batch dimension with x[None]"),  # unbatched
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "floating-point"),  # integer pixels
        ([[0.0]], "torch.Tensor"),
    ],
)
def test_bad_images_raise_value_error_naming_the_shape(vae, bad, fragment):
    with pytest.raises(ValueError, match="3, 32, 32") as error:
        vae.encode(bad)
    assert fragment in str(error.value)


@pytest.mark.parametrize("bad", [torch.zeros(2, 4, 16, 16), torch.zeros(2, 3, 8, 8), torch.zeros(4, 8, 8), torch.zeros(2, 4, 8, 8, dtype=torch.long)])
def test_bad_latents_raise_value_error_naming_the_shape(vae, bad):
    with pytest.raises(ValueError, match=r"\[B, 4, 8, 8\]"):
        vae.decode(bad)
    if tuple(bad.shape) == (4, 8, 8):
        with pytest.raises(ValueError, match=r"add the batch dimension with x\[None\]"):
            vae.decode(bad)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"channel_multipliers": ()},
        {"num_res_blocks": (1, 1)},  # three levels need three entries
        {"base_channels": 12, "norm_groups": 8},  # widths must divide into groups
        {"image_size": 30},  # not divisible by f = 4
        {"scaling_factor": 0.0},
        {"kl_weight": -1.0},
    ],
)
def test_bad_configs_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        VAEConfig(**kwargs)


def test_config_round_trips_through_a_dict():
    cfg = VAEConfig(num_res_blocks=(0, 1, 2), scaling_factor=0.5)
    assert VAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown VAEConfig fields \['colour'\]; known fields: \["):
        VAEConfig.from_dict({**cfg.to_dict(), "colour": 1})


@pytest.mark.parametrize("name", ["in_channels", "image_size", "latent_channels", "base_channels", "norm_groups"])
def test_config_refuses_true_where_an_int_is_due(name):
    with pytest.raises(ValueError, match=rf"VAEConfig\.{name} must be a positive integer, got True"):
        VAEConfig(**{name: True})


def test_psnr_of_a_known_error():
    x = torch.zeros(2, 3, 4, 4)
    assert torch.allclose(psnr(x, x + 0.1), torch.full((2,), 10 * math.log10(4 / 0.01)))


def test_overfits_one_batch():
    torch.manual_seed(0)
    vae = VAE(TINY)
    images = ShapesDataset(8, "all", seed=3).batch(range(8)).images
    result = train(vae, lambda m, x, step: vae_loss(m, x), lambda step: images, lr=3e-3, max_steps=100, progress=False)
    first, last = result.losses[0], sum(result.losses[-5:]) / 5
    assert last < first / 10, (first, last)


def test_scaling_factor_makes_latents_unit_variance():
    torch.manual_seed(0)
    vae = VAE(TINY).eval()
    images = ShapesDataset(256, "all", seed=1).batch(range(256)).images
    with torch.no_grad():
        vae.scaling_factor = compute_scaling_factor(vae, images)
        z = vae.encode(images).sample() * vae.scaling_factor
    assert abs(z.std().item() - 1) < 0.05
    assert vae.config.scaling_factor == vae.scaling_factor
    with pytest.raises(ValueError):
        vae.scaling_factor = -1.0


def test_shipped_weights_reconstruct_shapes():
    from sdlearn.pretrained import load_vae, weights_path

    if not weights_path("vae").exists():
        pytest.skip("shipped VAE weights not present")
    vae = load_vae()
    assert not vae.training
    images = ShapesDataset(256, "all", seed=12345).batch(range(256)).images
    with torch.inference_mode():
        posterior = vae.encode(images)
        recon = vae.decode(posterior.mode()).clamp(-1, 1)
        z = posterior.sample(torch.Generator().manual_seed(0)) * vae.scaling_factor
    mse = (recon - images).pow(2).mean().item()
    assert 10 * math.log10(4 / mse) > 28  # benchmarks/vae.py measures ≥ 30 dB on 1,024 images
    assert 0.8 < z.std().item() < 1.2


def test_num_parameters_is_deprecated_for_count_parameters(vae):
    with pytest.warns(DeprecationWarning, match="count_parameters"):
        assert vae.num_parameters() == count_parameters(vae)
