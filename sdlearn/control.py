"""ControlNet for the course DiT: telling a trained text-to-image model *where* and *what shape*, with an edge map.

ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models") leaves the
trained denoiser *locked* and trains a copy of its first half beside it. The copy reads the condition (here an edge
map) and its outputs are added to the locked model's hidden states through layers that start at zero ("zero
convolutions", §3.1), so that at the first step the locked model's output is unchanged, bit for bit, and training
moves away from a model that already draws well instead of from noise. For a U-Net the copy is the encoder and its
outputs go into the decoder's skip connections; for a transformer the copy is the first blocks and block i's output
is added after the locked model's block i (PixArt-δ, Chen et al. 2024, §3, does this for PixArt-α's DiT).

Read top to bottom:

1. :func:`edge_map`: the condition, a ``[B, 1, 32, 32]`` map that is 1 on an object's outline and 0 elsewhere.
2. :class:`ControlNetConfig`: which denoiser configuration the ControlNet fits, how many blocks it copies, the widths
   of its hint encoder.
3. :class:`ControlNet`: the hint encoder (convolutions from the 32×32 edge map down to the DiT's token grid, last
   layer zero), the copied embeddings and blocks, and one zero-initialised Linear per copied block.
   ``ControlNet.from_denoiser(denoiser)`` builds it from a trained DiT, copying its weights. Its output, a list of
   ``depth // 2`` tensors ``[B, N, D]``, is what ``Denoiser.forward(..., block_residuals=...)`` takes.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sdlearn.checkpoint import ConfigMixin
from sdlearn.checks import check_mask
from sdlearn.data import IMAGE_SIZE
from sdlearn.denoiser import (
    Denoiser,
    DenoiserConfig,
    DiTBlock,
    patchify,
    sincos_2d_pos_embed,
    text_conditioning,
    timestep_embedding,
)

COVERAGE_THRESHOLD = 0.5
"""A pixel belongs to the object when its coverage is at least this (the issue's definition)."""
ROUNDING = 1e-6
"""Slack for float rounding in the threshold: coverage 8/16 computed from an image may come out as 0.4999999."""
IMAGE_TOLERANCE = 1e-3
"""How far outside [-1, 1] an image may go (a decoder's rounding) before it is refused; it is clamped first."""


# ----------------------------------------------------------------------------------------------------------
# The condition: an edge map


def _shape_of(x) -> str:
    return str(list(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def object_coverage(x: torch.Tensor) -> torch.Tensor:
    """The coverage map ``[B, 1, 32, 32]`` in [0, 1] of ``x``, as :func:`edge_map` reads it (see there).

    ``x`` is a coverage map ``[B, 1, 32, 32]`` in [0, 1] (returned as it is), or an image ``[B, 3, 32, 32]`` in
    [-1, 1]: each pixel is mapped to [0, 1] by (x + 1) / 2, its brightest channel taken, and that divided by the
    image's peak, the largest brightest-channel value in the image. For a Shapes image (α · colour over black) this
    gives back the renderer's coverage α exactly, whatever the colour. An all-black image has no object: coverage 0.
    Anything else raises ``ValueError`` with one line."""
    size = IMAGE_SIZE
    expected = f"a coverage map [B, 1, {size}, {size}] in [0, 1] or an image [B, 3, {size}, {size}] in [-1, 1]"
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] not in (1, 3) or tuple(x.shape[2:]) != (size, size) \
            or len(x) == 0:
        raise ValueError(f"edge_map expects {expected}; got {_shape_of(x)}")
    if not x.is_floating_point():
        raise ValueError(f"edge_map expects a floating-point tensor ({expected}); got dtype {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("edge_map's input contains NaN or infinite values")
    if x.shape[1] == 1:
        if x.min() < 0 or x.max() > 1:
            raise ValueError(f"a coverage map must lie in [0, 1]; got {x.min().item():.3g}..{x.max().item():.3g} "
                             "(for an image, pass its 3 channels in [-1, 1])")
        return x
    if x.min() < -1 - IMAGE_TOLERANCE or x.max() > 1 + IMAGE_TOLERANCE:
        raise ValueError(f"an image must lie in [-1, 1]; got {x.min().item():.3g}..{x.max().item():.3g}")
    brightest = ((x.clamp(-1, 1) + 1) / 2).amax(dim=1, keepdim=True)  # [B, 1, H, W] in [0, 1]
    peak = brightest.amax(dim=(2, 3), keepdim=True)  # [B, 1, 1, 1]: the image's brightest value
    return torch.where(peak > 0, brightest / peak.clamp(min=torch.finfo(x.dtype).tiny), torch.zeros_like(brightest))


def edge_map(x: torch.Tensor) -> torch.Tensor:
    """The outline of the object in ``x`` → float ``[B, 1, 32, 32]``, 1 on the outline and 0 elsewhere.

    A pixel is *in* the object when its coverage is ≥ 0.5 (up to float rounding, :data:`ROUNDING`), and on the
    outline when it is in the object and one of its four neighbours (up, down, left, right) is not, or it lies on
    the image's border (the world outside the image counts as empty). ``x``: a coverage map ``[B, 1, 32, 32]`` in
    [0, 1], or an image ``[B, 3, 32, 32]`` in [-1, 1] whose coverage is its brightest channel divided by the image's
    peak, both after mapping the image to [0, 1] (:func:`object_coverage`). Bad input raises ``ValueError``."""
    coverage = object_coverage(x)
    inside = coverage >= COVERAGE_THRESHOLD - ROUNDING  # [B, 1, H, W] bool
    padded = F.pad(inside, (1, 1, 1, 1), value=False)  # [B, 1, H + 2, W + 2]: outside the image is empty
    all_neighbours_in = padded[..., :-2, 1:-1] & padded[..., 2:, 1:-1] & padded[..., 1:-1, :-2] & padded[..., 1:-1, 2:]
    return (inside & ~all_neighbours_in).to(coverage.dtype if coverage.is_floating_point() else torch.float32)


def check_control_image(image, batch: int | None = None) -> torch.Tensor:
    """``image`` as a control image for a batch of ``batch`` latents: a floating-point ``[B, 1, 32, 32]`` in [0, 1]
    with B = ``batch``, or B = 1 (repeated over the batch; returned expanded); ``batch=None`` takes any B.
    Anything else (wrong shape, values outside [0, 1], NaN or infinities) raises ``ValueError`` with one line."""
    size = IMAGE_SIZE
    want = f"[{'B' if batch is None else batch}, 1, {size}, {size}]"
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or tuple(image.shape[1:]) != (1, size, size) \
            or len(image) == 0 or (batch is not None and len(image) not in (1, batch)):
        hint = " (an edge map: sdlearn.control.edge_map)" if isinstance(image, torch.Tensor) else ""
        raise ValueError(f"control_image must be a tensor {want} in [0, 1]{hint}; got {_shape_of(image)}")
    if not image.is_floating_point():
        raise ValueError(f"control_image must be a floating-point tensor {want} in [0, 1]; got dtype {image.dtype}")
    if not bool(torch.isfinite(image).all()):
        raise ValueError("control_image contains NaN or infinite values")
    if image.min() < 0 or image.max() > 1:
        raise ValueError(f"control_image values must lie in [0, 1]; got {image.min().item():.3g}..{image.max().item():.3g}")
    if batch is not None and len(image) != batch:
        image = image.expand(batch, -1, -1, -1)
    return image


# ----------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ControlNetConfig(ConfigMixin):
    """Hyper-parameters of a :class:`ControlNet` (JSON-serialisable with :meth:`to_dict`).

    ``denoiser``: the config of the DiT it was made from and steers (its blocks' sizes are copied from it).
    ``num_blocks``: how many of the first blocks are copied (None: half of them, ``depth // 2``, as ControlNet
    copies the U-Net's encoder half). ``image_size``: the edge map's side. ``hint_channels``: the hint encoder's
    widths at ``image_size``, ``image_size / 2``, ... down to the token grid (None: 16, 32, 64, ... up to 128, one per
    halving)."""

    denoiser: DenoiserConfig | dict | None = None
    num_blocks: int | None = None
    image_size: int = IMAGE_SIZE
    hint_channels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.denoiser is None:
            self.denoiser = DenoiserConfig()
        elif isinstance(self.denoiser, dict):
            self.denoiser = DenoiserConfig.from_dict(self.denoiser)
        if not isinstance(self.denoiser, DenoiserConfig):
            raise ValueError(f"ControlNetConfig.denoiser must be a DenoiserConfig, got {type(self.denoiser).__name__}")
        if self.denoiser.joint_attention:
            raise ValueError("the ControlNet copies a DiT with cross-attention; this one has joint_attention=True")
        if self.num_blocks is None:
            self.num_blocks = max(1, self.denoiser.depth // 2)
        self.check_positive_ints("num_blocks", "image_size")
        if self.num_blocks > self.denoiser.depth:
            raise ValueError(f"ControlNetConfig.num_blocks ({self.num_blocks}) cannot exceed the denoiser's depth "
                             f"({self.denoiser.depth})")
        grid = self.grid_size
        halvings = math.log2(self.image_size / grid) if self.image_size >= grid else -1.0
        if halvings < 0 or halvings != int(halvings):
            raise ValueError(f"the edge map's side ({self.image_size}) must be the token grid's ({grid}) times a "
                             "power of 2")
        if self.hint_channels is None:
            self.hint_channels = tuple(min(16 * 2**i, 128) for i in range(int(halvings) + 1))
        self.hint_channels = tuple(self.hint_channels)
        self.check_sizes("hint_channels", self.hint_channels)
        if len(self.hint_channels) != int(halvings) + 1:
            raise ValueError(f"ControlNetConfig.hint_channels needs {int(halvings) + 1} widths (at {self.image_size} px "
                             f"and each halving down to the {grid}×{grid} token grid), got {self.hint_channels}")

    @property
    def grid_size(self) -> int:
        """The side of the DiT's token grid, ``latent_size / patch_size``."""
        return self.denoiser.latent_size // self.denoiser.patch_size

    def check_fits(self, denoiser: Denoiser) -> None:
        """Raise ``ValueError`` (one line) unless ``denoiser`` has the config this ControlNet was made for."""
        config = getattr(denoiser, "config", None)
        if not isinstance(config, DenoiserConfig):
            raise ValueError(f"a ControlNet steers the DiT (sdlearn.denoiser.Denoiser); got {type(denoiser).__name__}")
        if config.to_dict() != self.denoiser.to_dict():
            differ = sorted(k for k, v in config.to_dict().items() if self.denoiser.to_dict()[k] != v)
            raise ValueError(f"this ControlNet was made for another denoiser configuration (differs in: "
                             f"{', '.join(differ)})")


# ----------------------------------------------------------------------------------------------------------
# The network


def _zero(module: nn.Module) -> nn.Module:
    """Set a layer's weight and bias to zero: ControlNet's "zero convolution" (Zhang et al. 2023, §3.1)."""
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class HintEncoder(nn.Sequential):
    """Edge map ``[B, 1, S, S]`` → features on the token grid ``[B, D, g, g]``: a 3×3 convolution at full size, one
    stride-2 3×3 convolution per halving (SiLU after each), then a zero-initialised 1×1 convolution to the token
    width (ControlNet's tiny encoder of the condition image, §3.2, whose output layer starts at zero)."""

    def __init__(self, channels: tuple[int, ...], width: int):
        layers: list[nn.Module] = [nn.Conv2d(1, channels[0], 3, padding=1), nn.SiLU()]
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.SiLU()]  # halves the side
        layers.append(_zero(nn.Conv2d(channels[-1], width, 1)))
        super().__init__(*layers)


class ControlNet(nn.Module):
    """``controlnet(x_t, t, text_tokens, text_mask, control_image, conditioning_scale=1.0)`` → a list of
    ``num_blocks`` tensors ``[B, N, D]``, the residuals that ``denoiser(..., block_residuals=...)`` adds after its
    first blocks, already multiplied by ``conditioning_scale``; all zero at initialisation.

    The inputs are the denoiser's (same ``x_t``, ``t``, text) plus ``control_image`` ``[B, 1, 32, 32]`` in [0, 1]
    (:func:`edge_map`; B may be 1 for one map for the whole batch). ``pooled_text`` as in the denoiser."""

    def __init__(self, config: ControlNetConfig | None = None):
        super().__init__()
        self.config = config = ControlNetConfig.resolve(config)
        dc = config.denoiser
        D, p, C = dc.width, dc.patch_size, dc.latent_channels
        # The trainable copy: the embeddings and the first num_blocks blocks of the DiT (from_denoiser fills them in).
        self.patch_embed = nn.Linear(C * p * p, D)
        self.register_buffer("pos_embed", sincos_2d_pos_embed(D, config.grid_size)[None], persistent=False)  # [1, N, D]
        self.timestep_embed = nn.Sequential(nn.Linear(dc.frequency_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.text_pool = nn.Linear(dc.text_dim, D) if dc.pooled_text else None  # as the denoiser's config says
        self.blocks = nn.ModuleList(DiTBlock.for_config(dc) for _ in range(config.num_blocks))
        # What is new: the condition's encoder and the zero-initialised outputs, one per copied block.
        self.hint_encoder = HintEncoder(config.hint_channels, D)
        self.outputs = nn.ModuleList(_zero(nn.Linear(D, D)) for _ in range(config.num_blocks))

    @classmethod
    def from_denoiser(cls, denoiser: Denoiser, num_blocks: int | None = None,
                      hint_channels: tuple[int, ...] | None = None) -> ControlNet:
        """A ControlNet for ``denoiser``, its copy initialised from the denoiser's weights: patch, timestep and
        pooled-text embeddings (where the denoiser has them) and the first ``num_blocks`` blocks (None:
        ``depth // 2``). The denoiser is not changed (the copy shares no tensor with it); the new layers start
        at zero."""
        if not isinstance(denoiser, Denoiser):
            raise ValueError(f"from_denoiser needs the DiT (sdlearn.denoiser.Denoiser); got {type(denoiser).__name__}")
        config = ControlNetConfig(copy.deepcopy(denoiser.config), num_blocks, hint_channels=hint_channels)
        parameter = next(denoiser.parameters())
        controlnet = cls(config).to(device=parameter.device, dtype=parameter.dtype)
        for name in ("patch_embed", "timestep_embed", "text_pool"):
            if getattr(denoiser, name) is not None:  # text_pool is None where the DiT reads text by cross-attention alone
                getattr(controlnet, name).load_state_dict(getattr(denoiser, name).state_dict())
        for copied, block in zip(controlnet.blocks, denoiser.blocks):
            copied.load_state_dict(block.state_dict())
        return controlnet

    def _conditioning(self, t, text_tokens, text_mask, pooled_text, dtype):
        """SiLU(c) ``[B, D]`` as the DiT computes it (timestep MLP plus pooled text), and the cross-attention's
        ``(attn_mask, text_present)`` (see :meth:`sdlearn.denoiser.Denoiser.forward`)."""
        c = self.timestep_embed(timestep_embedding(t, self.config.denoiser.frequency_dim).to(dtype))  # [B, D]
        c, attn_mask, text_present = text_conditioning(c, self.text_pool, text_tokens, text_mask, pooled_text, dtype)
        return F.silu(c), attn_mask, text_present

    def _check_inputs(self, x_t, t, text_tokens, text_mask, pooled_text, conditioning_scale):
        dc = self.config.denoiser
        expected = (dc.latent_channels, dc.latent_size, dc.latent_size)
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 4 or tuple(x_t.shape[1:]) != expected \
                or not x_t.is_floating_point():
            raise ValueError(f"x_t must be a floating-point latent tensor [B, {', '.join(map(str, expected))}]; "
                             f"got {_shape_of(x_t)}")
        B = len(x_t)
        if isinstance(t, bool) or not isinstance(t, (int, float, torch.Tensor)):
            raise ValueError(f"t must be a number, a 0-d tensor or a tensor of shape [{B}]; got {type(t).__name__}")
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(B) if t.dim() == 0 else t
        if tuple(t.shape) != (B,) or t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"t must be a number, a 0-d tensor or a tensor of shape [{B}]; got {list(t.shape)} {t.dtype}")
        if text_tokens is None:
            if text_mask is not None or pooled_text is not None:
                raise ValueError("text_mask and pooled_text need text_tokens; got text_tokens=None")
        else:
            if not isinstance(text_tokens, torch.Tensor) or text_tokens.dim() != 3 or text_tokens.shape[0] != B \
                    or text_tokens.shape[2] != dc.text_dim or text_tokens.shape[1] == 0:
                raise ValueError(f"text_tokens must be [B={B}, L ≥ 1, text_dim={dc.text_dim}]; got {_shape_of(text_tokens)}")
            if text_mask is not None:
                check_mask(text_mask, text_tokens.shape[:2])
            if pooled_text is not None and not dc.pooled_text:
                raise ValueError("this ControlNet's denoiser reads the text by cross-attention alone (config "
                                 "pooled_text=False); leave out pooled_text")
            if pooled_text is not None and (not isinstance(pooled_text, torch.Tensor)
                                            or tuple(pooled_text.shape) != (B, dc.text_dim)):
                raise ValueError(f"pooled_text must be [B={B}, text_dim={dc.text_dim}]; got {_shape_of(pooled_text)}")
        if isinstance(conditioning_scale, bool) or not isinstance(conditioning_scale, (int, float)) \
                or not math.isfinite(conditioning_scale):
            raise ValueError(f"conditioning_scale must be a finite number (1 = as trained, 0 = no control); "
                             f"got {conditioning_scale!r}")
        return t

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | int | float,
        text_tokens: torch.Tensor | None,
        text_mask: torch.Tensor | None,
        control_image: torch.Tensor,
        conditioning_scale: float = 1.0,
        *,
        pooled_text: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        t = self._check_inputs(x_t, t, text_tokens, text_mask, pooled_text, conditioning_scale)
        B = len(x_t)
        hint = check_control_image(control_image, B).to(x_t)  # [B, 1, 32, 32]
        hint = self.hint_encoder(hint).flatten(2).transpose(1, 2)  # [B, D, g, g] → [B, N, D], row by row as patchify
        x = self.patch_embed(patchify(x_t, self.config.denoiser.patch_size)) + self.pos_embed + hint  # [B, N, D]
        c, attn_mask, text_present = self._conditioning(t, text_tokens, text_mask, pooled_text, x.dtype)
        residuals = []
        for block, output in zip(self.blocks, self.outputs):
            x = block(x, c, text_tokens, attn_mask, text_present)  # [B, N, D]
            residuals.append(output(x) * conditioning_scale)  # [B, N, D], zero at initialisation
        return residuals
