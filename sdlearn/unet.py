"""The U-Net of Stable Diffusion, written from scratch: ``UNet(config)(x_t, t, text_tokens=None, text_mask=None)``.

A U-Net (Ronneberger et al. 2015, "U-Net: Convolutional Networks for Biomedical Image Segmentation") is an
encoder–decoder of convolutions whose decoder also reads, through *skip connections*, every feature map the
encoder made at the same resolution: the down path sees the whole picture at ever coarser scales, the up path
puts the details back. DDPM (Ho et al. 2020, appendix B) made it the denoiser of diffusion models by adding the
timestep to every residual block; latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models", §3.3 and appendix E) runs it on VAE latents and lets it read the prompt by
*cross-attention* in transformer blocks placed between the convolutions. That is Stable Diffusion's U-Net, and
this module builds it, piece by piece, with the same configuration fields as diffusers' ``UNet2DConditionModel``
so that the two can be read side by side, and :meth:`UNet.from_diffusers` loads its weights. Read top to bottom:

1. **Timestep.** The sinusoidal embedding of t (Vaswani et al. 2017 §3.5, as DDPM uses it), ``block_out_channels[0]``
   numbers, then an MLP to ``4 · block_out_channels[0]``: ``emb = Linear(SiLU(Linear(sin-cos(t))))``.
2. **ResBlock** (Ho et al. 2020; He et al. 2016): ``h = Conv(SiLU(GroupNorm(x)))``, plus a Linear of
   SiLU(emb) added to every pixel (that is how the network knows the noise level), then
   ``Conv(SiLU(GroupNorm(h)))``; the input comes back through the skip (a 1×1 conv when the width changes).
3. **SpatialTransformer** (diffusers' ``Transformer2DModel``): GroupNorm, a projection in, the feature map read
   as ``H·W`` tokens through ``transformer_layers_per_block`` transformer blocks, a projection out, added to
   its input. Each **TransformerBlock** (diffusers' ``BasicTransformerBlock``) is pre-norm: self-attention over
   the pixels, cross-attention from the pixels to the text tokens, and a GEGLU feed-forward
   (Shazeer 2020, "GLU Variants Improve Transformer": ``(xW) ⊙ GELU(xV)``, 4× wide), each added back.
4. **Down path**: at each level, ``layers_per_block`` ResBlocks, each followed by a SpatialTransformer if the
   level is a ``"CrossAttnDownBlock2D"`` (none for ``"DownBlock2D"``), then a stride-2 3×3 conv that halves the
   size (not after the last level). Every output on the way down is pushed on a stack of skips.
5. **Middle**: ResBlock, SpatialTransformer, ResBlock at the coarsest size.
6. **Up path**: at each level (coarsest first), ``layers_per_block + 1`` ResBlocks, each reading the
   concatenation ``[h, skip]`` of the running features and a skip popped from the stack, each followed by a
   SpatialTransformer for a ``"CrossAttnUpBlock2D"`` level; then nearest-neighbour ×2 and a 3×3 conv.
7. **Out**: GroupNorm, SiLU, a 3×3 conv to ``out_channels``.

**Initialisation.** PyTorch's default everywhere, except that, as in the original Stable Diffusion code
(CompVis' ``ldm/modules/diffusionmodules/openaimodel.py``, ``zero_module``), the last conv of every ResBlock,
the output projection of every SpatialTransformer and the final conv start at zero: every block starts as the
identity and the untrained network predicts 0 (diffusers leaves them at the default, since it loads weights).

**Text.** ``text_tokens`` ``[B, L, cross_attention_dim]`` and a bool ``text_mask`` ``[B, L]``, True where a
token is real, exactly as :class:`sdlearn.denoiser.Denoiser` takes them: masked tokens are removed from the
cross-attention keys. ``text_tokens=None`` means *unconditional*: cross-attention is skipped (the transformer
blocks run self-attention and the feed-forward only), as in the DiT; a sample whose mask is all False is treated
the same way. (Stable Diffusion itself always passes text: its "unconditional" prompt is the empty prompt.)

**Sizes.** The U-Net takes latents of any height and width divisible by ``2^(levels − 1)``; ``sample_size``
only records the size it is meant for.

**Naming.** The fields of :class:`UNetConfig` are diffusers' names. One of them misleads: diffusers'
``attention_head_dim`` holds the *number of heads* (each of ``channels / heads`` numbers), an old naming slip that
diffusers keeps for compatibility (SD v1: 8 heads at every level; SD v2: 5, 10, 20, 20 heads of 64). sdlearn keeps
the name and the meaning, so that a diffusers config reads the same here.

**diffusers ↔ sdlearn.** Call ``unet(sample, timestep, encoder_hidden_states, encoder_attention_mask=mask)``
(diffusers) ↔ ``unet(x_t, t, text_tokens, text_mask)`` (sdlearn). Module names ↔ :data:`DIFFUSERS_TO_SDLEARN`.

Speed: SiLU(emb) computed once for all ResBlocks; one fused Linear for Q, K, V of self-attention and one for K, V
of cross-attention; attention through ``scaled_dot_product_attention``; the projections in and out of a
SpatialTransformer are Linears on the tokens (a 1×1 conv and a Linear are the same map; see
``use_linear_projection``), so the feature map is transposed to tokens and back once per SpatialTransformer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sdlearn.checkpoint import MAX_CONFIG_DEPTH, ConfigMixin, count_parameters  # noqa: F401 (count_parameters: re-exported)
from sdlearn.checks import check_mask
from sdlearn.schedules import FLOW, check_model_prediction_type

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)

# ----------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class UNetConfig(ConfigMixin):
    """Hyper-parameters of the :class:`UNet`, named as in diffusers' ``UNet2DConditionModel``.

    ``layers_per_block``, ``transformer_layers_per_block`` and ``attention_head_dim`` take one number for every
    level or one per level (down-path order).

    The defaults are the course's U-Net, for the shipped VAE's 4 × 8 × 8 latents and the tiny CLIP's 128-wide text
    tokens: two levels, 64 channels at 8 × 8 and 128 at 4 × 4, one ResBlock per level on the way down (two on the
    way up), heads of 32 channels, and cross-attention everywhere except in the down path's 4 × 4 level, which the
    middle block's transformer follows at once (Stable Diffusion too leaves its coarsest down level without
    attention). That is 3,919,876 parameters, the DiT's size (7.8 MB in float16).
    Stable Diffusion v1 is ``block_out_channels=(320, 640, 1280, 1280)``, ``down_block_types`` three
    ``"CrossAttnDownBlock2D"`` then a ``"DownBlock2D"`` (and the mirror image up), ``layers_per_block=2``,
    ``cross_attention_dim=768``, ``attention_head_dim=8``, ``sample_size=64``.
    """

    sample_size: int | None = 8  # the latent size the U-Net is meant for (any multiple of 2^(levels−1) works)
    in_channels: int = 4  # channels of the latent
    out_channels: int = 4  # channels of the prediction
    flip_sin_to_cos: bool = True  # timestep embedding as [cos, sin] (True, SD) or [sin, cos]
    freq_shift: float = 0  # frequencies ω_i = 10000^(−i / (half − freq_shift)), i < half
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    block_out_channels: tuple[int, ...] = (64, 128)  # channels at each level, finest first
    layers_per_block: int | tuple[int, ...] = 1  # ResBlocks per down level (the up level has one more)
    transformer_layers_per_block: int | tuple[int, ...] = 1  # transformer blocks in each SpatialTransformer
    norm_num_groups: int = 32  # GroupNorm groups (must divide every level's channels)
    norm_eps: float = 1e-5  # GroupNorm ε of the ResBlocks and the output
    cross_attention_dim: int = 128  # width of the text tokens
    attention_head_dim: int | tuple[int, ...] = (2, 4)  # the NUMBER of heads (diffusers' name; module docstring)
    use_linear_projection: bool = False  # diffusers' proj_in/proj_out: Linear (True, SD v2) or 1×1 conv (SD v1)
    upcast_attention: bool = False  # compute attention in float32 when the model runs in float16 (SD v2.1)
    num_train_timesteps: int = 1000  # sdlearn: T, timesteps lie in [0, T)
    prediction_type: str = "epsilon"  # sdlearn: what the network predicts (ε, v, x₀ or the flow's velocity); read by denoiser_loss

    size_limits = {"num_train_timesteps": 100_000}

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field in ("down_block_types", "up_block_types", "block_out_channels"):
            value = getattr(self, field)
            if isinstance(value, str) or not isinstance(value, Sequence) or len(value) == 0:
                raise ValueError(f"{name}.{field} must be a non-empty list, one entry per level, got {value!r}")
            setattr(self, field, tuple(value))
        for field in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
            value = getattr(self, field)
            if isinstance(value, Sequence) and not isinstance(value, str):
                setattr(self, field, tuple(value))
        levels = len(self.block_out_channels)
        self.check_sizes("block_out_channels", self.block_out_channels)
        self.check_positive_ints("in_channels", "out_channels", "cross_attention_dim", "norm_num_groups",
                                 "num_train_timesteps")
        if self.sample_size is not None:
            self.check_positive_ints("sample_size")
        for field, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            value = getattr(self, field)
            if len(value) != levels:
                raise ValueError(f"{name}.{field} must have one entry per level ({levels}, as block_out_channels), "
                                 f"got {len(value)}")
            for i, kind in enumerate(value):
                if kind not in allowed:
                    raise ValueError(f"{name}.{field}[{i}] must be one of {', '.join(allowed)}; got {kind!r}")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(f"{name}.mid_block_type must be one of {', '.join(MID_BLOCK_TYPES)}; "
                             f"got {self.mid_block_type!r}")
        for field, maximum in (("layers_per_block", MAX_CONFIG_DEPTH), ("transformer_layers_per_block", MAX_CONFIG_DEPTH),
                               ("attention_head_dim", 16384)):
            self.check_sizes(field, self.per_level(field), maximum=maximum)
        for field in ("flip_sin_to_cos", "use_linear_projection", "upcast_attention"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"{name}.{field} must be True or False, got {getattr(self, field)!r}")
        c0 = self.block_out_channels[0]
        if c0 % 2:
            raise ValueError(f"{name}.block_out_channels[0] must be even (it is the timestep embedding's size), got {c0}")
        if isinstance(self.freq_shift, bool) or not isinstance(self.freq_shift, (int, float)) \
                or not 0 <= self.freq_shift < c0 // 2:
            raise ValueError(f"{name}.freq_shift must be a number in [0, block_out_channels[0] / 2 = {c0 // 2}), "
                             f"got {self.freq_shift!r}")
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) or not 0 < self.norm_eps < 1:
            raise ValueError(f"{name}.norm_eps must be a number in (0, 1), got {self.norm_eps!r}")
        for i, channels in enumerate(self.block_out_channels):
            if channels % self.norm_num_groups:
                raise ValueError(f"{name}.norm_num_groups ({self.norm_num_groups}) must divide every entry of "
                                 f"block_out_channels; block_out_channels[{i}] = {channels}")
            heads = self.per_level("attention_head_dim")[i]
            if channels % heads:
                raise ValueError(f"{name}.attention_head_dim[{i}] = {heads} heads (diffusers' name for the number of "
                                 f"heads) must divide block_out_channels[{i}] = {channels}")
        check_model_prediction_type(self.prediction_type)

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    def per_level(self, field: str) -> tuple[int, ...]:
        """``layers_per_block``, ``transformer_layers_per_block`` or ``attention_head_dim`` as one entry per level."""
        value = getattr(self, field)
        if isinstance(value, tuple):
            if len(value) != self.num_levels:
                raise ValueError(f"{type(self).__name__}.{field} must be one number or one per level "
                                 f"({self.num_levels}), got {value!r}")
            return value
        return (value,) * self.num_levels

    @property
    def time_embed_dim(self) -> int:
        """Width of the timestep embedding after its MLP: ``4 · block_out_channels[0]`` (DDPM's choice, SD's too)."""
        return 4 * self.block_out_channels[0]

    # -- to and from diffusers' UNet2DConditionModel config ---------------------------------------------------

    def to_diffusers(self) -> dict[str, Any]:
        """The keyword arguments of diffusers' ``UNet2DConditionModel`` for the same network:
        ``UNet2DConditionModel(**config.to_diffusers())`` has the same parameters, named as in diffusers."""
        out = {f.name: _jsonable_tuple(getattr(self, f.name)) for f in fields(self) if f.name not in SDLEARN_ONLY}
        return out

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], **sdlearn_fields) -> UNetConfig:
        """The :class:`UNetConfig` of a diffusers ``UNet2DConditionModel`` config (its ``.config``, or the dict of
        its ``config.json``); ``sdlearn_fields`` sets ``num_train_timesteps``/``prediction_type``.

        A field sdlearn does not implement (class or addition embeddings as in SDXL, ``time_cond_proj_dim``, a
        non-default ``resnet_time_scale_shift``, ``only_cross_attention``, ...) raises ``ValueError`` naming it,
        unless it holds the value that Stable Diffusion v1.x/v2.x use (:data:`DIFFUSERS_FIXED`)."""
        if not isinstance(config, Mapping):
            raise ValueError(f"expected a diffusers UNet2DConditionModel config (a mapping), got {type(config).__name__}")
        if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
            raise ValueError(f"expected a UNet2DConditionModel config, got _class_name={config['_class_name']!r}")
        ours = {f.name for f in fields(cls)} - SDLEARN_ONLY
        values: dict[str, Any] = {}
        for key, value in config.items():
            if key.startswith("_") or key in DIFFUSERS_IGNORED:
                continue
            if key in DIFFUSERS_FIXED:
                accepted = DIFFUSERS_FIXED[key]
                items = value if isinstance(value, (list, tuple)) else [value]
                if not items or not all(any(item == a and isinstance(item, bool) == isinstance(a, bool) for a in accepted)
                                        for item in items):
                    raise ValueError(f"UNet.from_diffusers: the diffusers config field {key}={value!r} is not supported "
                                     f"(sdlearn's U-Net builds SD v1.x/v2.x, which use {key}={accepted[0]!r})")
            elif key in ours:
                values[key] = value
            else:
                raise ValueError(f"UNet.from_diffusers: unknown diffusers config field {key!r}={value!r} "
                                 "(a newer diffusers, or not a UNet2DConditionModel?)")
        size = values.get("sample_size")
        if isinstance(size, (list, tuple)):
            if len(size) != 2 or size[0] != size[1]:
                raise ValueError(f"UNet.from_diffusers: sample_size={size!r} is not supported (a square size only)")
            values["sample_size"] = size[0]
        cross = values.get("cross_attention_dim")
        if isinstance(cross, (list, tuple)):
            if len(set(cross)) != 1:
                raise ValueError(f"UNet.from_diffusers: cross_attention_dim={cross!r} is not supported "
                                 "(one text width for every level only)")
            values["cross_attention_dim"] = cross[0]
        if values.get("norm_num_groups", 1) is None:
            raise ValueError("UNet.from_diffusers: norm_num_groups=None is not supported (SD uses GroupNorm, 32 groups)")
        return cls(**values, **sdlearn_fields)


SDLEARN_ONLY = frozenset({"num_train_timesteps", "prediction_type"})
"""Fields of :class:`UNetConfig` that diffusers keeps elsewhere (in the scheduler's config)."""

DIFFUSERS_FIXED: dict[str, tuple] = {
    "center_input_sample": (False,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": (False,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "dropout": (0,),
    "act_fn": ("silu", "swish"),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "projection_class_embeddings_input_dim": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
}
"""diffusers ``UNet2DConditionModel`` fields that sdlearn's U-Net does not implement, with the values it accepts
(those of Stable Diffusion v1.x/v2.x: the first one listed is diffusers' default)."""

DIFFUSERS_IGNORED = frozenset({"addition_embed_type_num_heads"})
"""diffusers fields that mean nothing without another one sdlearn refuses (here: ``addition_embed_type``)."""


def _jsonable_tuple(value):
    return tuple(value) if isinstance(value, list) else value


# ----------------------------------------------------------------------------------------------------------
# Pieces


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps ``t`` ``[B]`` (may be fractional) → ``[B, dim]`` (Vaswani et al. 2017
    §3.5, as DDPM embeds t): frequencies ω_i = max_period^(−i / (dim/2 − freq_shift)), i = 0 … dim/2 − 1;
    [cos(tω), sin(tω)] when ``flip_sin_to_cos`` (Stable Diffusion), else [sin(tω), cos(tω)]."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t.float()[:, None] * torch.exp(exponent)[None]  # [B, half]
    parts = [torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)]
    return torch.cat(parts, dim=-1)  # [B, dim]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           upcast: bool = False) -> torch.Tensor:
    """softmax(QKᵀ/√d)·V on heads ``[B, H, N, d]`` through ``scaled_dot_product_attention``; ``mask`` bool
    ``[B, 1, 1, M]``, True where a key may be attended to. ``upcast`` computes a half-precision attention in
    float32 (SD v2.1's ``upcast_attention``: its attention overflows float16)."""
    if upcast and q.dtype in (torch.float16, torch.bfloat16):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → 3×3 conv, + the timestep embedding, → GroupNorm → SiLU → 3×3 conv, + the input
    (Ho et al. 2020, appendix B; diffusers' ``ResnetBlock2D``). ``skip`` is a 1×1 conv when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)  # zero-initialised by UNet
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, C_in, H, W]``, ``emb`` = SiLU(timestep embedding) ``[B, time_dim]`` → ``[B, C_out, H, W]``."""
        h = self.conv1(F.silu(self.norm1(x)))  # [B, C_out, H, W]
        h = h + self.time_proj(emb)[:, :, None, None]  # the noise level, added to every pixel
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels; one fused Linear for Q, K, V (no bias, as SD), one out."""

    def __init__(self, dim: int, heads: int, upcast: bool = False):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3 × [B, H, N, d]
        y = attend(q, k, v, None, self.upcast)  # [B, H, N, d]
        return self.out(y.transpose(1, 2).reshape(B, N, C))  # [B, N, C]


class CrossAttention(nn.Module):
    """Multi-head attention from the pixels (queries) to the text tokens (keys, values): how SD reads the prompt
    (Rombach et al. 2022 §3.3). K and V share one fused Linear from the text width."""

    def __init__(self, dim: int, text_dim: int, heads: int, upcast: bool = False):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(text_dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x`` ``[B, N, C]``, ``text`` ``[B, L, text_dim]``, ``mask`` bool ``[B, 1, 1, L]`` (True = real) or None."""
        B, N, C = x.shape
        H, L = self.heads, text.shape[1]
        q = self.q(x).view(B, N, H, C // H).transpose(1, 2)  # [B, H, N, d]
        k, v = self.kv(text).view(B, L, 2, H, C // H).permute(2, 0, 3, 1, 4)  # 2 × [B, H, L, d]
        y = attend(q, k, v, mask, self.upcast)  # [B, H, N, d]
        return self.out(y.transpose(1, 2).reshape(B, N, C))  # [B, N, C]


class GEGLU(nn.Module):
    """Feed-forward with a GELU-gated linear unit (Shazeer 2020): ``out((xW + b) ⊙ GELU(xV + c))``; W and V are
    the two halves of one Linear ``proj`` to ``2 · 4·dim``."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)  # 2 × [B, N, 4·dim]
        return self.out(h * F.gelu(gate))  # [B, N, dim]


class TransformerBlock(nn.Module):
    """Pre-norm self-attention → cross-attention to the text → GEGLU feed-forward, each added back
    (diffusers' ``BasicTransformerBlock``; LayerNorms with ε = 1e-5, as there)."""

    def __init__(self, dim: int, heads: int, text_dim: int, upcast: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = SelfAttention(dim, heads, upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, text_dim, heads, upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLU(dim)

    def forward(self, x, text=None, mask=None, present=None):
        """``x`` ``[B, N, C]``; ``text`` ``[B, L, text_dim]`` or None (no cross-attention); ``mask`` bool
        ``[B, 1, 1, L]`` or None; ``present`` ``[B, 1, 1]`` (0 for a sample without any real token) or None."""
        x = x + self.self_attn(self.norm1(x))
        if text is not None:
            y = self.cross_attn(self.norm2(x), text, mask)
            x = x + (y if present is None else y * present)
        return x + self.ff(self.norm3(x))  # [B, N, C]


class SpatialTransformer(nn.Module):
    """A feature map read as tokens by transformer blocks, added back (diffusers' ``Transformer2DModel``):
    GroupNorm (ε = 1e-6) → ``proj_in`` → blocks → ``proj_out`` (zero-initialised by UNet) → + input."""

    def __init__(self, channels: int, heads: int, depth: int, text_dim: int, groups: int, upcast: bool = False):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(TransformerBlock(channels, heads, text_dim, upcast) for _ in range(depth))
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x, text=None, mask=None, present=None):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # [B, H·W, C]: one token per pixel
        for block in self.blocks:
            h = block(h, text, mask, present)
        h = self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)  # [B, C, H, W]
        return x + h


class Level(nn.Module):
    """One level of the down or up path: ResBlocks (``res``), each followed by a SpatialTransformer (``attn``, empty
    at a level without attention), then ``resample``: the stride-2 conv going down, the conv after the ×2 nearest
    upsampling going up, or None at the level that does not change size."""

    def __init__(self, res: list[ResBlock], attn: list[SpatialTransformer], resample: nn.Conv2d | None):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)
        self.resample = resample


class MidBlock(nn.Module):
    """ResBlock → SpatialTransformer → ResBlock at the coarsest size (diffusers' ``UNetMidBlock2DCrossAttn``)."""

    def __init__(self, channels: int, time_dim: int, heads: int, depth: int, text_dim: int, groups: int, eps: float,
                 upcast: bool):
        super().__init__()
        self.res1 = ResBlock(channels, channels, time_dim, groups, eps)
        self.attn = SpatialTransformer(channels, heads, depth, text_dim, groups, upcast)
        self.res2 = ResBlock(channels, channels, time_dim, groups, eps)

    def forward(self, h, emb, text=None, mask=None, present=None):
        return self.res2(self.attn(self.res1(h, emb), text, mask, present), emb)


# ----------------------------------------------------------------------------------------------------------
# The network


class UNet(nn.Module):
    """Stable Diffusion's U-Net: ``unet(x_t, t, text_tokens=None, text_mask=None) -> prediction`` shaped like x_t
    (with ``out_channels`` channels). See the module docstring for the architecture and the text convention."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = cfg = UNetConfig.resolve(config)
        channels = cfg.block_out_channels
        layers, depths, heads = (cfg.per_level(f) for f in ("layers_per_block", "transformer_layers_per_block",
                                                             "attention_head_dim"))
        T, G, eps, up = cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps, cfg.upcast_attention
        text_dim, n = cfg.cross_attention_dim, cfg.num_levels

        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], 3, padding=1)
        self.time_mlp = nn.Sequential(nn.Linear(channels[0], T), nn.SiLU(), nn.Linear(T, T))

        skips = [channels[0]]  # the channels of every feature map the down path leaves for the up path
        self.down = nn.ModuleList()
        c = channels[0]
        for i in range(n):
            res, attn = [], []
            for _ in range(layers[i]):
                res.append(ResBlock(c, channels[i], T, G, eps))
                c = channels[i]
                if cfg.down_block_types[i] == "CrossAttnDownBlock2D":
                    attn.append(SpatialTransformer(c, heads[i], depths[i], text_dim, G, up))
                skips.append(c)
            downsample = nn.Conv2d(c, c, 3, stride=2, padding=1) if i < n - 1 else None
            if downsample is not None:
                skips.append(c)
            self.down.append(Level(res, attn, downsample))

        self.mid = MidBlock(c, T, heads[-1], depths[-1], text_dim, G, eps, up)

        self.up = nn.ModuleList()
        for i, level in enumerate(reversed(range(n))):  # up level i works at the size of down level n − 1 − i
            res, attn = [], []
            for _ in range(layers[level] + 1):
                res.append(ResBlock(c + skips.pop(), channels[level], T, G, eps))  # reads [h, skip]
                c = channels[level]
                if cfg.up_block_types[i] == "CrossAttnUpBlock2D":
                    attn.append(SpatialTransformer(c, heads[level], depths[level], text_dim, G, up))
            upsample = nn.Conv2d(c, c, 3, padding=1) if i < n - 1 else None
            self.up.append(Level(res, attn, upsample))

        self.norm_out = nn.GroupNorm(G, c, eps=eps)
        self.conv_out = nn.Conv2d(c, cfg.out_channels, 3, padding=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default initialisation, then zeros where Stable Diffusion's original code has them: the last conv
        of every ResBlock, the output projection of every SpatialTransformer, and the final conv."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        zero = [m.conv2 for m in self.modules() if isinstance(m, ResBlock)]
        zero += [m.proj_out for m in self.modules() if isinstance(m, SpatialTransformer)]
        for layer in [*zero, self.conv_out]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # -- input checking ----------------------------------------------------------------------------------

    def _check_inputs(self, x_t, t, text_tokens, text_mask) -> torch.Tensor:
        cfg = self.config
        factor = 2 ** (cfg.num_levels - 1)
        expected = f"[B, {cfg.in_channels}, H, W] with H and W multiples of {factor}"
        if not isinstance(x_t, torch.Tensor) or x_t.ndim != 4 or x_t.shape[1] != cfg.in_channels \
                or x_t.shape[2] % factor or x_t.shape[3] % factor or 0 in x_t.shape[2:]:
            got = list(x_t.shape) if isinstance(x_t, torch.Tensor) else type(x_t).__name__
            raise ValueError(f"x_t must be a latent tensor {expected}; got {got}")
        if not x_t.is_floating_point():
            raise ValueError(f"x_t must be a floating-point tensor; got {x_t.dtype}")
        B = x_t.shape[0]

        if isinstance(t, bool) or not isinstance(t, (int, float, torch.Tensor)):
            raise ValueError(f"t must be a number, a 0-d tensor or a tensor of shape [{B}]; got {type(t).__name__}")
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"t must be a number, a 0-d tensor or a tensor of shape [{B}]; got shape {list(t.shape)}")
        if t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"t must hold real timesteps; got dtype {t.dtype}")
        flow = cfg.prediction_type == FLOW  # a flow model's timesteps are σ·T, σ ∈ [0, 1]
        if not bool(((t >= 0) & ((t <= cfg.num_train_timesteps) if flow else (t < cfg.num_train_timesteps))).all()):
            raise ValueError(f"timesteps must lie in [0, {cfg.num_train_timesteps}{']' if flow else ')'}; "
                             f"got min {t.min().item()}, max {t.max().item()}")

        if text_tokens is None:
            if text_mask is not None:
                raise ValueError("text_mask needs text_tokens; got text_tokens=None")
            return t
        D = cfg.cross_attention_dim
        if not isinstance(text_tokens, torch.Tensor) or text_tokens.ndim != 3 or text_tokens.shape[0] != B \
                or text_tokens.shape[2] != D:
            got = list(text_tokens.shape) if isinstance(text_tokens, torch.Tensor) else type(text_tokens).__name__
            raise ValueError(f"text_tokens must be [B={B}, L, cross_attention_dim={D}]; got {got}")
        if text_tokens.shape[1] == 0:
            raise ValueError("text_tokens must hold at least one token (L ≥ 1); for no text pass text_tokens=None")
        if text_mask is not None:
            check_mask(text_mask, text_tokens.shape[:2], "text_mask")
        return t

    # -- forward -----------------------------------------------------------------------------------------

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | int | float, text_tokens: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predict ε (or v, or x₀: ``config.prediction_type``) for the noisy latent ``x_t`` ``[B, C, H, W]``.

        ``t``: a number or 0-d tensor (the whole batch) or ``[B]``, in [0, T), may be fractional.
        ``text_tokens`` ``[B, L, cross_attention_dim]`` or None (unconditional: no cross-attention);
        ``text_mask`` bool ``[B, L]``, True where a token is real (None: all real).
        """
        t = self._check_inputs(x_t, t, text_tokens, text_mask)
        cfg = self.config

        emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)  # [B, C0]
        emb = F.silu(self.time_mlp(emb.to(x_t.dtype)))  # [B, 4·C0]: every ResBlock reads SiLU(emb)

        mask = present = None
        if text_tokens is not None and text_mask is not None and not bool(text_mask.all()):
            has_text = text_mask.any(dim=1)  # [B]; False: no real token, this sample is unconditional
            if not bool(has_text.all()):  # let all-padding rows attend to every key (softmax needs one), gated to 0
                text_mask = text_mask | ~has_text[:, None]
                present = has_text.to(x_t.dtype)[:, None, None]  # [B, 1, 1]
            mask = text_mask[:, None, None, :]  # [B, 1, 1, L], broadcast over heads and queries
        text = (text_tokens, mask, present)

        h = self.conv_in(x_t)  # [B, C0, H, W]
        skips = [h]
        for level in self.down:
            for j, res in enumerate(level.res):
                h = res(h, emb)
                if len(level.attn):
                    h = level.attn[j](h, *text)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)  # [B, C, H/2, W/2]
                skips.append(h)

        h = self.mid(h, emb, *text)

        for level in self.up:
            for j, res in enumerate(level.res):
                h = res(torch.cat([h, skips.pop()], dim=1), emb)  # [B, C + C_skip, H, W] → [B, C', H, W]
                if len(level.attn):
                    h = level.attn[j](h, *text)
            if level.resample is not None:
                h = level.resample(F.interpolate(h, scale_factor=2.0, mode="nearest"))  # [B, C', 2H, 2W]

        return self.conv_out(F.silu(self.norm_out(h)))  # [B, out_channels, H, W]

    # -- diffusers -----------------------------------------------------------------------------------------

    @classmethod
    def from_diffusers(cls, model, **sdlearn_fields) -> UNet:
        """A :class:`UNet` with the configuration and weights of a diffusers ``UNet2DConditionModel``.

        Reads ``model.config`` and ``model.state_dict()`` only (diffusers is not imported). ``sdlearn_fields``
        sets ``num_train_timesteps``/``prediction_type``, which diffusers keeps in the scheduler's config. The
        weights are copied (into float32) through :data:`DIFFUSERS_TO_SDLEARN`, so the two models compute the
        same function: diffusers' ``model(sample, timestep, encoder_hidden_states,
        encoder_attention_mask=mask).sample`` equals ``unet(sample, timestep, encoder_hidden_states, mask)``
        (with a bool mask, True on real tokens; a sample with no real token differs: diffusers then attends to
        every padding token alike, sdlearn skips that sample's cross-attention). An unsupported configuration
        raises ``ValueError`` naming the field (:meth:`UNetConfig.from_diffusers`).
        """
        if not hasattr(model, "config") or not callable(getattr(model, "state_dict", None)):
            raise ValueError(f"expected a diffusers UNet2DConditionModel (with .config and .state_dict()), "
                             f"got {type(model).__name__}")
        unet = cls(UNetConfig.from_diffusers(dict(model.config), **sdlearn_fields))
        unet.load_state_dict(convert_diffusers_state_dict(model.state_dict(), unet.state_dict()))
        return unet


# ----------------------------------------------------------------------------------------------------------
# Weights stored in half precision, computed in float32


class _ComputeInFloat32(nn.Module):
    """A parametrization: the stored (half-precision) tensor is read as a float32 copy."""

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.float()


STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""The dtypes :func:`store_weights` keeps weights in, by name."""


def check_storage_dtype(dtype) -> torch.dtype:
    """``dtype`` (a torch dtype or its name among :data:`STORAGE_DTYPES`) as a torch dtype, or ``ValueError``."""
    found = STORAGE_DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if found not in STORAGE_DTYPES.values():
        raise ValueError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)} (or the torch dtype), got {dtype!r}")
    return found


def store_weights(model: nn.Module, dtype: torch.dtype | str = torch.float16) -> nn.Module:
    """Keep the weight and bias of every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` in ``dtype`` and compute in
    float32: half the memory of those tensors for float16 or bfloat16, with float32 arithmetic.

    Each parameter becomes a parametrization (``torch.nn.utils.parametrize``): ``layer.weight`` is the stored
    tensor read as a float32 copy, made when the layer runs and freed right after, so at any moment one layer's
    weights exist in float32 besides the stored ones. The normalisation layers stay in float32. This is what
    diffusers calls *layerwise casting* (``enable_layerwise_casting(storage_dtype=torch.float16,
    compute_dtype=torch.float32)``, which casts the same layers), so the two store the same numbers and compute
    the same function. The outputs differ from the float32 model's only by the rounding of the weights
    (float16 keeps 11 significant bits). For inference: the stored tensors do not train. float32 is a no-op.
    Returns ``model``, changed in place."""
    from torch.nn.utils import parametrize

    dtype = check_storage_dtype(dtype)
    if dtype == torch.float32:
        return model
    for layer in model.modules():
        if not isinstance(layer, (nn.Linear, nn.Conv2d)) or parametrize.is_parametrized(layer):
            continue
        for name in ("weight", "bias"):
            tensor = getattr(layer, name)
            if tensor is None:
                continue
            setattr(layer, name, nn.Parameter(tensor.detach().to(dtype), requires_grad=False))
            parametrize.register_parametrization(layer, name, _ComputeInFloat32(), unsafe=True)
    return model


# ----------------------------------------------------------------------------------------------------------
# diffusers' parameter names → sdlearn's

# Each row: (diffusers module, sdlearn module, the table for what is inside, or None for a leaf: weight, bias).
# "{}" stands for a block number and is carried over in order. A tuple of diffusers modules is concatenated along
# the output channels into one sdlearn Linear (Q, K, V → qkv).
BASIC_TRANSFORMER_BLOCK = [  # diffusers' BasicTransformerBlock → TransformerBlock
    ("norm1", "norm1", None),
    (("attn1.to_q", "attn1.to_k", "attn1.to_v"), "self_attn.qkv", None),
    ("attn1.to_out.0", "self_attn.out", None),
    ("norm2", "norm2", None),
    ("attn2.to_q", "cross_attn.q", None),
    (("attn2.to_k", "attn2.to_v"), "cross_attn.kv", None),
    ("attn2.to_out.0", "cross_attn.out", None),
    ("norm3", "norm3", None),
    ("ff.net.0.proj", "ff.proj", None),  # GEGLU's Linear: [value half; gate half], the same order in both
    ("ff.net.2", "ff.out", None),
]
TRANSFORMER_2D = [  # diffusers' Transformer2DModel → SpatialTransformer
    ("norm", "norm", None),
    ("proj_in", "proj_in", None),  # a 1×1 conv [C, C, 1, 1] in SD v1 (use_linear_projection=False) → Linear [C, C]
    ("transformer_blocks.{}", "blocks.{}", BASIC_TRANSFORMER_BLOCK),
    ("proj_out", "proj_out", None),
]
RESNET_BLOCK_2D = [  # diffusers' ResnetBlock2D → ResBlock
    ("norm1", "norm1", None),
    ("conv1", "conv1", None),
    ("time_emb_proj", "time_proj", None),
    ("norm2", "norm2", None),
    ("conv2", "conv2", None),
    ("conv_shortcut", "skip", None),
]
DIFFUSERS_TO_SDLEARN = [  # diffusers' UNet2DConditionModel → UNet
    ("conv_in", "conv_in", None),
    ("time_embedding.linear_1", "time_mlp.0", None),
    ("time_embedding.linear_2", "time_mlp.2", None),
    ("down_blocks.{}.resnets.{}", "down.{}.res.{}", RESNET_BLOCK_2D),
    ("down_blocks.{}.attentions.{}", "down.{}.attn.{}", TRANSFORMER_2D),
    ("down_blocks.{}.downsamplers.0.conv", "down.{}.resample", None),
    ("mid_block.resnets.0", "mid.res1", RESNET_BLOCK_2D),
    ("mid_block.attentions.0", "mid.attn", TRANSFORMER_2D),
    ("mid_block.resnets.1", "mid.res2", RESNET_BLOCK_2D),
    ("up_blocks.{}.resnets.{}", "up.{}.res.{}", RESNET_BLOCK_2D),
    ("up_blocks.{}.attentions.{}", "up.{}.attn.{}", TRANSFORMER_2D),
    ("up_blocks.{}.upsamplers.0.conv", "up.{}.resample", None),
    ("conv_norm_out", "norm_out", None),
    ("conv_out", "conv_out", None),
]
"""How diffusers' ``UNet2DConditionModel`` parameters are named in :class:`UNet`, block by block."""


def _pattern(module: str) -> re.Pattern:
    """``"down_blocks.{}.resnets.{}"`` → a regex matching ``down_blocks.1.resnets.0.<rest>``."""
    return re.compile(re.escape(module).replace(r"\{\}", r"(\d+)") + r"\.(.+)")


def sdlearn_name(diffusers_name: str, table: list = DIFFUSERS_TO_SDLEARN) -> tuple[str, int, int]:
    """The sdlearn parameter a diffusers parameter goes to, as ``(name, part, parts)``: the tensor is part ``part``
    of ``parts`` concatenated along dimension 0 (``parts`` is 1 unless the row fuses several Linears), e.g.
    ``"mid_block.attentions.0.transformer_blocks.0.attn1.to_k.weight"`` → ``("mid.attn.blocks.0.self_attn.qkv.weight",
    1, 3)``. Raises ``KeyError`` for a name that no row of the table matches."""
    for sources, target, inner in table:
        sources = sources if isinstance(sources, tuple) else (sources,)
        for part, source in enumerate(sources):
            found = _pattern(source).fullmatch(diffusers_name)
            if found is None:
                continue
            *numbers, rest = found.groups()
            prefix = target.format(*numbers)
            if inner is None:
                return f"{prefix}.{rest}", part, len(sources)
            name, part, parts = sdlearn_name(rest, inner)
            return f"{prefix}.{name}", part, parts
    raise KeyError(f"no row of the diffusers → sdlearn table matches {diffusers_name!r}")


def convert_diffusers_state_dict(diffusers_state: Mapping[str, torch.Tensor],
                                 sdlearn_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' ``UNet2DConditionModel.state_dict()`` → the state dict of the :class:`UNet` whose own state dict
    is ``sdlearn_state`` (used for the names and shapes), through :data:`DIFFUSERS_TO_SDLEARN`. A diffusers 1×1 conv
    weight ``[C, C, 1, 1]`` becomes the Linear weight ``[C, C]`` it equals. Every tensor of either side must be
    used exactly once, or a ``ValueError`` names what is left over or missing."""
    parts: dict[str, list] = {}
    for name, tensor in diffusers_state.items():
        try:
            target, part, count = sdlearn_name(name)
        except KeyError as error:
            raise ValueError(f"UNet.from_diffusers: {error.args[0]}") from None
        slots = parts.setdefault(target, [None] * count)
        slots[part] = tensor
    converted = {}
    for target, slots in parts.items():
        if target not in sdlearn_state:
            raise ValueError(f"UNet.from_diffusers: diffusers' weights have {target!r} (after renaming), "
                             "which this UNet does not")
        if any(s is None for s in slots):
            raise ValueError(f"UNet.from_diffusers: {target!r} is fused from {len(slots)} diffusers tensors, "
                             "some of which are missing")
        tensor = torch.cat(slots, dim=0) if len(slots) > 1 else slots[0]
        shape = sdlearn_state[target].shape
        if tensor.ndim == 4 and tensor.shape[2:] == (1, 1) and len(shape) == 2:
            tensor = tensor.flatten(1)  # a 1×1 conv [out, in, 1, 1] is the Linear [out, in]
        if tensor.shape != shape:
            raise ValueError(f"UNet.from_diffusers: {target!r} has shape {list(shape)} here but "
                             f"{list(tensor.shape)} in diffusers' weights")
        converted[target] = tensor.detach()
    missing = sorted(set(sdlearn_state) - set(converted))
    if missing:
        raise ValueError(f"UNet.from_diffusers: diffusers' weights have nothing for {missing}")
    return converted
