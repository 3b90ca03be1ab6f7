"""The variational autoencoder: images ↔ latents.

Stable Diffusion does not denoise pixels; it denoises the latents of a KL-regularised autoencoder
(Rombach et al. 2022, §3). Here a 32×32×3 image becomes an 8×8×4 latent (downsampling factor
f = 4), so the denoiser works on 256 numbers instead of 3,072.

The encoder outputs, for every latent element, the mean and log-variance of a Gaussian
q(z | x) = N(μ(x), diag σ²(x)) (Kingma & Welling 2014). Training maximises the evidence lower bound

    log p(x) ≥ E_q[log p(x | z)] − KL(q(z | x) ‖ N(0, I)),

whose first term becomes a reconstruction loss on decode(z), z = μ + σ·ε (the reparameterisation
trick), and whose second term has a closed form for diagonal Gaussians (Kingma & Welling 2014,
Appendix B):

    KL = ½ Σ_j (μ_j² + σ_j² − 1 − log σ_j²).

As in Stable Diffusion the KL weight is tiny (β = 1e-6 against a summed reconstruction loss): the KL
only keeps the latents near unit scale instead of drifting anywhere, and the posterior stays nearly
deterministic (in the shipped VAE, σ ≈ 0.004 against a spread of μ of ≈ 0.8), so reconstructions are
sharp. The latents' scale is then fixed after training by ``scaling_factor``, 1 / std of training
latents (how Stable Diffusion's 0.18215 was chosen), so that the diffusion model sees latents with unit
variance. (Like SD v1's, the latents are not shifted: their mean is not zero.)

Architecture: a small version of the LDM/SD autoencoder, without attention (8×8 latents of single
objects do not need it): conv → per level [residual blocks, stride-2 conv] → mid residual block →
GroupNorm, SiLU, conv; the decoder mirrors it with nearest-neighbour upsampling + conv. The default
widths are 16, 32, 64 channels at 32×32, 16×16, 8×8, with residual blocks only at 16×16 and 8×8:
0.39M parameters (SD's VAE has 84M) and ≈ 41M multiply-adds per image for encode + decode, small
enough to encode every training batch of the denoiser on a laptop CPU (``python benchmarks/vae.py`` measures
its speed). Residual blocks at 32×32 (``num_res_blocks=1``) reconstruct better for the same number of steps
but run slower.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdlearn.checkpoint import MAX_CONFIG_DEPTH, ConfigMixin, count_parameters
from sdlearn.checks import check_batch, warn_deprecated

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclass
class VAEConfig(ConfigMixin):
    """Hyperparameters of :class:`VAE`. ``len(channel_multipliers) - 1`` levels downsample by 2,
    so the default (1, 2, 4) gives f = 4: 32×32×3 → 8×8×4."""

    in_channels: int = 3
    image_size: int = 32
    latent_channels: int = 4
    base_channels: int = 16
    channel_multipliers: tuple[int, ...] = (1, 2, 4)  # widths 16, 32, 64 at 32×32, 16×16, 8×8
    num_res_blocks: int | tuple[int, ...] = (0, 1, 1)  # per level (highest resolution first), or one int for all
    norm_groups: int = 8
    kl_weight: float = 1e-6  # β, relative to the reconstruction error summed over pixels (as in LDM)
    scaling_factor: float = 1.0  # 1 / std of training latents; set after training

    def __post_init__(self):
        self.channel_multipliers = tuple(int(m) for m in self.channel_multipliers)
        self.check_positive_ints("in_channels", "image_size", "latent_channels", "base_channels", "norm_groups")
        if not self.channel_multipliers or min(self.channel_multipliers) < 1:
            raise ValueError(f"VAEConfig.channel_multipliers must be positive integers, got {self.channel_multipliers}")
        self.check_sizes("channel_multipliers", self.channel_multipliers)
        self.check_sizes("base_channels × channel_multipliers", self.widths)  # no width beyond MAX_CONFIG_SIZE
        if not isinstance(self.num_res_blocks, int):
            self.num_res_blocks = tuple(int(n) for n in self.num_res_blocks)
        per_level = self.res_blocks_per_level
        if len(per_level) != len(self.channel_multipliers) or min(per_level) < 0:
            raise ValueError(
                f"VAEConfig.num_res_blocks must be an integer ≥ 0 or one per level "
                f"({len(self.channel_multipliers)} levels), got {self.num_res_blocks!r}"
            )
        self.check_sizes("num_res_blocks", per_level, maximum=MAX_CONFIG_DEPTH, minimum=0)
        for width in self.widths:
            if width % self.norm_groups:
                raise ValueError(f"every width {self.widths} must be divisible by norm_groups={self.norm_groups}")
        if self.image_size % self.downsample_factor:
            raise ValueError(
                f"image_size={self.image_size} must be divisible by the downsampling factor {self.downsample_factor}"
            )
        if not (self.scaling_factor > 0 and math.isfinite(self.scaling_factor)):
            raise ValueError(f"VAEConfig.scaling_factor must be a positive number, got {self.scaling_factor!r}")
        if self.kl_weight < 0:
            raise ValueError(f"VAEConfig.kl_weight must be ≥ 0, got {self.kl_weight!r}")

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_multipliers)

    @property
    def res_blocks_per_level(self) -> tuple[int, ...]:
        n = self.num_res_blocks
        return (n,) * len(self.channel_multipliers) if isinstance(n, int) else tuple(n)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)



class DiagonalGaussian:
    """q(z | x) = N(mean, diag exp(logvar)), the encoder's output.

    ``mean`` and ``logvar`` have the latent's shape ``[B, C, h, w]``; logvar is clamped to
    [−30, 20] as in LDM so that exp() neither underflows to an exactly-zero σ nor overflows.
    """

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        if mean.shape != logvar.shape:
            raise ValueError(f"mean and logvar must have the same shape, got {tuple(mean.shape)} and {tuple(logvar.shape)}")
        self.mean = mean
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> DiagonalGaussian:
        """Split a ``[B, 2C, h, w]`` encoder output into mean (first C channels) and logvar."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    @property
    def shape(self) -> torch.Size:
        return self.mean.shape

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = μ + σ ⊙ ε, ε ~ N(0, I): the reparameterisation trick (Kingma & Welling 2014, §2.4),
        differentiable in μ and σ."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """The most likely latent, μ (deterministic encoding)."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q ‖ N(0, I)) per sample, summed over the latent dimensions → ``[B]``.

        ½ Σ (μ² + σ² − 1 − log σ²)   (Kingma & Welling 2014, Appendix B)."""
        per_dim = 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar)
        return per_dim.flatten(1).sum(dim=1)

    def __repr__(self) -> str:
        return f"DiagonalGaussian(shape={tuple(self.mean.shape)})"


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv3×3 → GroupNorm → SiLU → conv3×3, plus a (1×1 if widths differ) skip."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3×3 convolution (and change the width)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour, then a 3×3 convolution (no checkerboard artefacts)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """[B, 3, H, W] → moments [B, 2·latent_channels, H/f, W/f] (mean and logvar stacked).

    conv_in → per level: residual blocks, then (except at the last level) a stride-2 convolution
    into the next level's width → a "mid" residual block → GroupNorm, SiLU, conv_out."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths, g = cfg.widths, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for level, width in enumerate(widths):
            blocks += [ResBlock(width, width, g) for _ in range(cfg.res_blocks_per_level[level])]
            if level < len(widths) - 1:
                blocks.append(Downsample(width, widths[level + 1]))
        blocks.append(ResBlock(widths[-1], widths[-1], g))  # "mid" block at the latent resolution
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(g, widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # [B, w0, H, W]
        h = self.blocks(h)  # [B, w_last, H/f, W/f]
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, 2C, H/f, W/f]


class Decoder(nn.Module):
    """latent [B, latent_channels, H/f, W/f] → image [B, 3, H, W]; mirrors :class:`Encoder`, with
    nearest-neighbour upsampling + convolution into the next (narrower) width."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths, g = cfg.widths[::-1], cfg.norm_groups
        res_blocks = cfg.res_blocks_per_level[::-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)
        blocks: list[nn.Module] = [ResBlock(widths[0], widths[0], g)]  # "mid" block
        for level, width in enumerate(widths):
            blocks += [ResBlock(width, width, g) for _ in range(res_blocks[level])]
            if level < len(widths) - 1:
                blocks.append(Upsample(width, widths[level + 1]))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(g, widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)  # [B, w_last, h, w]
        h = self.blocks(h)  # [B, w0, H, W]
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, 3, H, W]


class VAE(nn.Module):
    """KL-regularised autoencoder (Kingma & Welling 2014; the LDM first stage, Rombach et al. 2022).

    >>> vae = VAE(VAEConfig())
    >>> posterior = vae.encode(images)          # images [B, 3, 32, 32] in [-1, 1]
    >>> z = posterior.sample() * vae.scaling_factor   # [B, 4, 8, 8], ≈ unit variance: what diffusion sees
    >>> images = vae.decode(z / vae.scaling_factor)
    """

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = dataclasses.replace(VAEConfig.resolve(config))  # a copy: we set scaling_factor
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c.in_channels, c.image_size, c.image_size)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent, e.g. (4, 8, 8)."""
        c = self.config
        side = c.image_size // c.downsample_factor
        return (c.latent_channels, side, side)

    @property
    def scaling_factor(self) -> float:
        """Multiply latents by this before diffusion, divide before decoding (1 / std of training latents)."""
        return self.config.scaling_factor

    @scaling_factor.setter
    def scaling_factor(self, value: float) -> None:
        value = float(value)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"scaling_factor must be a positive number, got {value!r}")
        self.config.scaling_factor = value

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images ``[B, 3, 32, 32]`` (float, in [-1, 1]) → the posterior q(z | x) over ``[B, 4, 8, 8]``."""
        check_batch(x, self.image_shape, "image")
        return DiagonalGaussian.from_moments(self.encoder(_fast_layout(x)).contiguous())  # [B, 2C, h, w] → q

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, 4, 8, 8]`` (unscaled: divide by ``scaling_factor`` first) → images ``[B, 3, 32, 32]``.

        The output is not squashed (no tanh, as in LDM); clamp to [-1, 1] to display it."""
        check_batch(z, self.latent_shape, "latent")
        return self.decoder(_fast_layout(z)).contiguous()

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None, sample_posterior: bool = True):
        """Encode, sample z (or take the mode), decode → ``(reconstruction, posterior)``."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def num_parameters(self) -> int:
        """Deprecated: use :func:`sdlearn.checkpoint.count_parameters` (``count_parameters(model)``)."""
        warn_deprecated(f"{type(self).__name__}.num_parameters()", "sdlearn.checkpoint.count_parameters(model)")
        return count_parameters(self)


def vae_loss(vae: VAE, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """The negative ELBO as LDM trains it, per pixel:

        L = ( Σ_pixels (x − x̂)² + β · KL(q(z|x) ‖ N(0, I)) ) / (number of pixels),

    averaged over the batch, with x̂ = decode(μ + σε) and β = ``config.kl_weight``. (A fixed-variance
    Gaussian decoder turns log p(x|z) into a squared error up to constants; LDM uses L1 + LPIPS, we use the
    squared error PSNR measures.) Returns the loss and a dict of floats for logging (mse, kl per sample).
    """
    recon, posterior = vae(x, generator=generator)
    mse = F.mse_loss(recon, x)  # mean over B·3·H·W
    kl = posterior.kl().mean()  # summed over latent dims, mean over batch
    num_pixels = x[0].numel()
    loss = mse + vae.config.kl_weight * kl / num_pixels
    return loss, {"mse": mse.item(), "kl": kl.item()}


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB, 10·log10(range² / MSE); images in [-1, 1] have range 2
    (the same number as PSNR on [0, 1] images with range 1). Returns ``[B]``."""
    mse = (x - y).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


@torch.no_grad()
def compute_scaling_factor(vae: VAE, images: torch.Tensor, batch_size: int = 256) -> float:
    """1 / std of the latents ``posterior.sample()`` over ``images`` (as SD's 0.18215 was measured)."""
    latents = []
    for start in range(0, len(images), batch_size):
        latents.append(vae.encode(images[start : start + batch_size]).sample())
    return float(1.0 / torch.cat(latents).std())


def _fast_layout(x: torch.Tensor) -> torch.Tensor:
    """On CPU, oneDNN's convolutions run faster on channels-last (NHWC) tensors; the values are
    the same, only the memory layout changes (outputs are made contiguous again)."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x
