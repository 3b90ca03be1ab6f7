"""The transformer denoiser: a Diffusion Transformer (DiT) with adaLN-Zero and cross-attention.

Stable Diffusion's denoiser ε_θ(x_t, t, text) is a U-Net; at course scale a small transformer does the
same job, as in DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers") and the
text-conditioned transformers that followed it (PixArt-α, SD3). Read top to bottom:

1. **Patchify** the latent ``[B, C, S, S]`` into ``N = (S/p)²`` tokens of ``C·p²`` numbers and embed each
   with one Linear (ViT, Dosovitskiy et al. 2021). Add a *fixed* 2D sin-cos positional embedding
   (MAE, He et al. 2022; DiT §3.1) so that attention knows where each token sits.
2. **Timestep**: the sinusoidal embedding of Vaswani et al. (2017, §3.5), as DDPM uses it for t, then an MLP.
   When text is given, a projection of the pooled text is added: c = MLP(emb(t)) + W·pool(text)
   (``pooled_text=False`` leaves it out: then, as in Stable Diffusion's U-Net, cross-attention alone reads the text).
3. **Blocks**, each: self-attention over the latent tokens → cross-attention from the latent tokens to the
   text tokens (Stable Diffusion's way of reading the prompt; Rombach et al. 2022 §3.3) → an MLP. Every
   sub-layer is pre-normalised by a LayerNorm *without* learned affine whose shift and scale are
   regressed from c, and its output is multiplied by a gate also regressed from c (adaLN-Zero, DiT §3.2):

       h = x + gate · F(LN(x) · (1 + scale) + shift),      (shift, scale, gate) = Linear(SiLU(c)).

   The Linear that makes (shift, scale, gate) starts at zero, so every block starts as the identity.
4. **Final layer**: adaLN (shift, scale) and a Linear back to ``C·p²`` numbers per token, also zero-initialised —
   the untrained model outputs exactly 0, i.e. "no noise" / "no change" — then **unpatchify**.

Attention goes through ``torch.nn.functional.scaled_dot_product_attention``. Inside ``capture_attention``
it is computed explicitly as softmax(QKᵀ/√d)·V instead, so that the attention maps can be looked at.

Text conditioning: ``text_tokens`` ``[B, L, text_dim]`` and a bool ``text_mask`` ``[B, L]``,
True where a token is real. Padded tokens are removed from the cross-attention keys and from the pooled
text, so they change nothing. ``text_tokens=None`` means *unconditional*: cross-attention is skipped and
c is the timestep embedding alone. (For classifier-free guidance the "unconditional" prompt is the empty
prompt, which still has its ``<bos>``/``<eos>`` tokens, so a text-conditioned model always sees tokens.)
A sample whose mask is all False is treated exactly like ``text_tokens=None`` for that sample.

Default configuration, and why (``python benchmarks/denoiser.py`` measures the speeds; its saved outputs are in
``benchmarks/results/``):

- ``patch_size=2`` → 16 tokens for the 8×8×4 latent. Patch 1 (64 tokens) costs 4× the matmul FLOPs per
  image for the same training budget and sampling time. Shapes' objects are 9 or 15 px wide in a 32 px image,
  2–4 latent pixels: a 2×2 patch (8×8 image pixels) still resolves them.
- ``width=192, depth=6, heads=4`` (head size 48).
- ``mlp_ratio=1``: the MLP is a *lightweight* feed-forward (hidden width = width), not DiT's ×4, and
  ``cross_attn_ratio=0.5``: cross-attention reads the text in half the token width (4 heads of 24). Shapes is
  a small world (320 attribute combinations), and a lean block buys more training steps per minute, which
  is what decides quality on a laptop budget. Against diffusers' ``DiTTransformer2DModel`` of the same
  width, depth, heads and patch size (MLP ×4, no cross-attention) one training step costs fewer FLOPs; both
  implementations run near the matmul peak, so speed can only come from doing less work.
- That gives 3.9M parameters (at most 6M by design). Over half of them are the adaLN modulation Linears
  (9·width² per block), as in DiT; they cost almost nothing in compute because they act once per image,
  not once per token.
- ``text_dim=128``: the width of the tiny text encoder's tokens; set it to whatever that encoder emits.

Speed comes from doing the least work in the fewest kernels: one fused Linear for Q, K, V; one Linear per
block for all nine adaLN vectors, read from SiLU(c) computed once; LayerNorm without affine parameters;
``addcmul`` for x·(1 + scale) + shift and for x + gate·y; no dropout layers; attention through SDPA.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sdlearn.checkpoint import MAX_CONFIG_DEPTH, ConfigMixin, count_parameters  # noqa: F401 (count_parameters: re-exported for notebooks 04, 05)
from sdlearn.checks import check_mask
from sdlearn.schedules import FLOW, check_model_prediction_type, flow_interpolate, flow_target

# ----------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class DenoiserConfig(ConfigMixin):
    """Hyper-parameters of the :class:`Denoiser` (JSON-serialisable with :meth:`to_dict`)."""

    latent_channels: int = 4  # C of the VAE latent
    latent_size: int = 8  # S: the latent is S × S
    patch_size: int = 2  # p: tokens are p × p latent pixels, N = (S/p)² of them
    width: int = 192  # D: token width
    depth: int = 6  # number of transformer blocks
    heads: int = 4  # attention heads (head size D / heads)
    mlp_ratio: float = 1.0  # MLP hidden width = mlp_ratio · D (DiT uses 4)
    text_dim: int = 128  # width of the text encoder's tokens
    cross_attn_ratio: float = 0.5  # cross-attention's queries, keys and values have cross_attn_ratio · D channels
    num_train_timesteps: int = 1000  # T: timesteps are in [0, T)
    prediction_type: str = "epsilon"  # what the network predicts: ε, v, or x₀; or "flow", the velocity ε − x₀
    frequency_dim: int = 256  # size of the sinusoidal timestep embedding (DiT uses 256)
    pooled_text: bool = True  # add W·pool(text) to c; False: the text reaches the blocks by cross-attention alone
    mlp_conv: bool = False  # Mix-FFN: a depthwise 3 × 3 convolution over the token grid inside each block's MLP
    joint_attention: bool = False  # the text tokens join the self-attention (and are updated) instead of cross-attention

    size_limits = {"depth": MAX_CONFIG_DEPTH, "num_train_timesteps": 100_000}

    def __post_init__(self) -> None:
        check_model_prediction_type(self.prediction_type)
        self.check_positive_ints("latent_channels", "latent_size", "patch_size", "width", "depth", "heads", "text_dim",
                                 "num_train_timesteps", "frequency_dim")
        for ratio in ("mlp_ratio", "cross_attn_ratio"):
            self.check_ratio(ratio)
        for flag in ("pooled_text", "mlp_conv", "joint_attention"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.mlp_conv and self.joint_attention:
            raise ValueError("mlp_conv and joint_attention cannot be combined: the convolution needs a sequence of "
                             "image tokens alone")
        if self.latent_size % self.patch_size:
            raise ValueError(
                f"latent_size ({self.latent_size}) must be divisible by patch_size ({self.patch_size})"
            )
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if self.width % 4:
            raise ValueError(f"width must be a multiple of 4 for the 2D sin-cos embedding; got {self.width}")
        if isinstance(self.cross_attn_ratio, bool) or not isinstance(self.cross_attn_ratio, (int, float)) \
                or self.cross_width < 1 or self.cross_width % self.heads:
            raise ValueError(
                f"cross_attn_ratio · width must be a positive multiple of heads ({self.heads}); "
                f"got cross_attn_ratio={self.cross_attn_ratio!r}, width={self.width}"
            )
        if self.frequency_dim % 2:
            raise ValueError(f"frequency_dim must be even; got {self.frequency_dim}")
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float)) \
                or not int(self.mlp_ratio * self.width) >= 1:
            raise ValueError(f"mlp_ratio must be a positive number; got {self.mlp_ratio!r}")

    @property
    def cross_width(self) -> int:
        """The inner width of cross-attention, ``int(cross_attn_ratio · width)``."""
        return int(self.cross_attn_ratio * self.width)

    @property
    def num_tokens(self) -> int:
        return (self.latent_size // self.patch_size) ** 2

    @classmethod
    def upgrade_dict(cls, d: dict) -> dict:
        if "cross_attn_ratio" not in d:  # written before the field existed: cross-attention was full width
            d = {**d, "cross_attn_ratio": 1.0}
        return d


# ----------------------------------------------------------------------------------------------------------
# Helpers: patches, embeddings, modulation


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Cut ``[B, C, H, W]`` into non-overlapping p × p patches: ``[B, (H/p)·(W/p), C·p·p]``.

    Patches are numbered row by row; each patch vector is ordered (channel, row in patch, column in patch),
    the same order as a ``Conv2d(C, D, p, stride=p)`` weight flattened to ``[D, C·p·p]``, so a Linear on
    these vectors is that convolution.
    """
    B, C, H, W = x.shape
    if H % p or W % p:
        raise ValueError(f"patch size {p} must divide the height and width; got {H}×{W}")
    x = x.reshape(B, C, H // p, p, W // p, p)  # [B, C, h, p, w, p]
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)  # [B, N, C·p·p]


def unpatchify(tokens: torch.Tensor, p: int, channels: int, size: int) -> torch.Tensor:
    """The inverse of :func:`patchify` for a square ``size × size`` image: ``[B, N, C·p·p] → [B, C, size, size]``."""
    B, N, P = tokens.shape
    g = size // p
    if g * p != size or N != g * g or P != channels * p * p:
        raise ValueError(
            f"expected tokens [B, {(size // p) ** 2}, {channels * p * p}] for a {channels}×{size}×{size} image "
            f"with patch size {p}; got {list(tokens.shape)}"
        )
    x = tokens.reshape(B, g, g, channels, p, p)  # [B, h, w, C, p, p]
    return x.permute(0, 3, 1, 4, 2, 5).reshape(B, channels, size, size)  # [B, C, H, W]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps ``t`` ``[B]`` → ``[B, dim]``.

    Vaswani et al. 2017 §3.5 with the DDPM/DiT layout: frequencies ω_i = max_period^(−i/half),
    i = 0..half−1, and the embedding is [cos(t·ω), sin(t·ω)] (cosines first, then sines).
    """
    if dim % 2:
        raise ValueError(f"timestep embedding dim must be even; got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, dim]


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[sin(pos·ω), cos(pos·ω)] with ω_i = 10000^(−i/(dim/2)) (MAE's 1D embedding) → ``[len(pos), dim]``."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    args = positions.double()[:, None] * omega[None]  # [M, dim/2]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def sincos_2d_pos_embed(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2D sin-cos positional embedding for a ``grid_size × grid_size`` grid → ``[grid_size², dim]``.

    Half of the channels encode the token's row, half its column, each with the 1D sin-cos embedding
    (MAE, He et al. 2022; used by DiT). Token n is at row n // grid_size, column n % grid_size, matching
    :func:`patchify`'s order.
    """
    if dim % 4:
        raise ValueError(f"the 2D sin-cos embedding needs dim divisible by 4; got {dim}")
    coords = torch.arange(grid_size)
    rows = coords.repeat_interleave(grid_size)  # [N]: 0,0,..,1,1,..
    cols = coords.repeat(grid_size)  # [N]: 0,1,..,0,1,..
    emb = torch.cat([_sincos_1d(dim // 2, rows), _sincos_1d(dim // 2, cols)], dim=1)  # [N, dim]
    return emb.float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN's affine step x·(1 + scale) + shift (DiT §3.2); ``shift``/``scale`` ``[B, 1, D]`` broadcast over tokens."""
    return torch.addcmul(shift, x, 1 + scale)  # one fused kernel for x * (1 + scale) + shift


def _norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without learned affine parameters (adaLN supplies them), eps 1e-6 as in DiT."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Attention


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(QKᵀ/√d) over the keys: ``q`` ``[..., N, d]``, ``k`` ``[..., M, d]`` → ``[..., N, M]``.

    ``mask`` (bool, broadcastable to ``[..., N, M]``) is True where a key may be attended to; the rest get
    weight 0. This is what ``scaled_dot_product_attention`` computes before multiplying by V.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # [..., N, M]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1)


def _attend(module: nn.Module, q, k, v, mask=None) -> torch.Tensor:
    """SDPA on ``[B, H, N, d]`` heads, or the explicit softmax(QKᵀ/√d)·V while attention is being captured."""
    if module.captured is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    weights = attention_weights(q, k, mask)  # [B, H, N, M]
    module.captured.append(weights.detach())
    return weights @ v


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused Linear for Q, K and V (over the latent tokens here, and over the
    prompt's tokens in :class:`sdlearn.text.TextEncoder`)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.captured: list[torch.Tensor] | None = None  # attention maps, while inside capture_attention

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``[B, N, D]``; ``mask`` bool ``[B, 1, 1, N]``, True where a key may be attended to, or None (all)."""
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 × [B, H, N, d]
        y = _attend(self, q, k, v, mask)  # [B, H, N, d]
        return self.out(y.transpose(1, 2).reshape(B, N, D))  # [B, N, D]


class CrossAttention(nn.Module):
    """Multi-head attention from the latent tokens (queries) to the text tokens (keys and values).

    Queries, keys and values live in ``inner`` channels (``heads`` heads of ``inner / heads``); ``out`` maps
    the result back to the token width. ``inner`` may be narrower than ``width`` to save work.
    """

    def __init__(self, width: int, text_dim: int, heads: int, inner: int | None = None):
        super().__init__()
        self.heads = heads
        self.inner = inner = width if inner is None else inner
        self.q = nn.Linear(width, inner)
        self.kv = nn.Linear(text_dim, 2 * inner)
        self.out = nn.Linear(inner, width)
        self.captured: list[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x`` ``[B, N, D]``, ``text`` ``[B, L, text_dim]``, ``mask`` bool ``[B, 1, 1, L]`` (True = real) or None."""
        B, N, _ = x.shape
        L, E, H = text.shape[1], self.inner, self.heads
        q = self.q(x).view(B, N, H, E // H).transpose(1, 2)  # [B, H, N, d], d = inner / heads
        k, v = self.kv(text).view(B, L, 2, H, E // H).permute(2, 0, 3, 1, 4)  # 2 × [B, H, L, d]
        y = _attend(self, q, k, v, mask)  # [B, H, N, d]
        return self.out(y.transpose(1, 2).reshape(B, N, E))  # [B, N, inner] → [B, N, D]


# ----------------------------------------------------------------------------------------------------------
# The network


class MLP(nn.Sequential):
    """Token-wise feed-forward Linear → GELU (tanh approximation, as DiT) → Linear."""

    def __init__(self, width: int, hidden: int):
        super().__init__(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))


class ConvMLP(nn.Module):
    """Mix-FFN (SegFormer, Xie et al. 2021): Linear → depthwise 3 × 3 convolution over the ``grid × grid`` tokens →
    GELU → Linear. The convolution lets each token's MLP see its neighbours, the locality a U-Net's ResBlocks have."""

    def __init__(self, width: int, hidden: int, grid: int):
        super().__init__()
        self.grid = grid
        self.fc1 = nn.Linear(width, hidden)
        self.conv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        h = self.fc1(x).transpose(1, 2).reshape(B, -1, self.grid, self.grid)  # [B, hidden, g, g]
        h = self.conv(h).flatten(2).transpose(1, 2)  # [B, N, hidden]
        return self.fc2(F.gelu(h, approximate="tanh"))  # [B, N, D]


class DiTBlock(nn.Module):
    """Self-attention → cross-attention → MLP, each pre-normed by adaLN and gated (adaLN-Zero, DiT §3.2).

    ``grid`` (the token grid's side) makes the MLP a :class:`ConvMLP`; ``cross_width=0`` leaves cross-attention
    out (a joint-attention block: the text tokens are in ``x``, and ``self_attn`` reads them)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, text_dim: int, cross_width: int | None = None,
                 grid: int | None = None):
        super().__init__()
        self.self_attn = SelfAttention(width, heads)
        self.cross_attn = None if cross_width == 0 else CrossAttention(width, text_dim, heads, cross_width)
        hidden = int(width * mlp_ratio)
        self.mlp = MLP(width, hidden) if grid is None else ConvMLP(width, hidden, grid)
        # One Linear regresses all nine (shift, scale, gate) vectors from SiLU(c) (six without cross-attention);
        # zero-initialised.
        self.modulation = nn.Linear(width, (6 if self.cross_attn is None else 9) * width)

    @classmethod
    def for_config(cls, config: DenoiserConfig) -> DiTBlock:
        """A block as ``config`` describes it (the DiT's and the ControlNet's copy)."""
        grid = config.latent_size // config.patch_size if config.mlp_conv else None
        cross_width = 0 if config.joint_attention else config.cross_width
        return cls(config.width, config.heads, config.mlp_ratio, config.text_dim, cross_width, grid)

    def forward(self, x, c, text=None, text_mask=None, text_present=None):
        """``x`` ``[B, N, D]``; ``c`` = SiLU(conditioning) ``[B, D]``; ``text`` ``[B, L, text_dim]`` or None.

        ``text_mask`` bool ``[B, 1, 1, L]`` or None; ``text_present`` ``[B, 1, 1]`` (0 for samples without
        any real text token, whose cross-attention is switched off) or None. A block without cross-attention
        reads ``text_mask`` as the self-attention's key mask ``[B, 1, 1, N]`` and ignores ``text``.
        """
        if self.cross_attn is None:
            shift_sa, scale_sa, gate_sa, shift_mlp, scale_mlp, gate_mlp = \
                self.modulation(c).unsqueeze(1).chunk(6, dim=-1)  # 6 × [B, 1, D]
            x = torch.addcmul(x, gate_sa, self.self_attn(modulate(_norm(x), shift_sa, scale_sa), text_mask))
            return torch.addcmul(x, gate_mlp, self.mlp(modulate(_norm(x), shift_mlp, scale_mlp)))
        (shift_sa, scale_sa, gate_sa, shift_ca, scale_ca, gate_ca,
         shift_mlp, scale_mlp, gate_mlp) = self.modulation(c).unsqueeze(1).chunk(9, dim=-1)  # 9 × [B, 1, D]
        x = torch.addcmul(x, gate_sa, self.self_attn(modulate(_norm(x), shift_sa, scale_sa)))  # x + gate·F(...)
        if text is not None:
            if text_present is not None:
                gate_ca = gate_ca * text_present
            x = torch.addcmul(x, gate_ca, self.cross_attn(modulate(_norm(x), shift_ca, scale_ca), text, text_mask))
        x = torch.addcmul(x, gate_mlp, self.mlp(modulate(_norm(x), shift_mlp, scale_mlp)))
        return x  # [B, N, D]


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a Linear from width to the C·p² numbers of a patch; both zero-initialised."""

    def __init__(self, width: int, patch_dim: int):
        super().__init__()
        self.modulation = nn.Linear(width, 2 * width)
        self.linear = nn.Linear(width, patch_dim)

    def forward(self, x, c):
        shift, scale = self.modulation(c).unsqueeze(1).chunk(2, dim=-1)  # 2 × [B, 1, D]
        return self.linear(modulate(_norm(x), shift, scale))  # [B, N, C·p·p]


def text_conditioning(c: torch.Tensor, text_pool: nn.Module | None, text_tokens: torch.Tensor | None,
                      text_mask: torch.Tensor | None, pooled_text: torch.Tensor | None, dtype: torch.dtype):
    """How the text reaches a DiT's blocks → ``(c, attn_mask, text_present)``, shared by :class:`Denoiser` and
    the ControlNet's copy. ``c`` ``[B, D]`` gains W·pool(text) where the model has a ``text_pool`` (the masked
    mean of ``text_tokens`` unless ``pooled_text`` is given; zero for a row without a real token).
    ``attn_mask`` ``[B, 1, 1, L]`` (None: every key is real) is cross-attention's key mask, and ``text_present``
    ``[B, 1, 1]`` (None: every row has text) gates to zero the cross-attention of rows without text, which
    attend to every key (softmax needs one)."""
    if text_tokens is None:
        return c, None, None
    if text_mask is None:
        text_mask = torch.ones(text_tokens.shape[:2], dtype=torch.bool, device=text_tokens.device)
    text_mask = text_mask.bool()
    has_text = text_mask.any(dim=1)  # [B]; False: no real token, this sample is unconditional
    all_text = bool(has_text.all())
    if text_pool is not None:  # c = MLP(emb(t)) + W·pool(text)
        if pooled_text is None:
            weights = text_mask.to(text_tokens.dtype)[..., None]  # [B, L, 1]
            pooled_text = (text_tokens * weights).sum(1) / weights.sum(1).clamp(min=1)  # [B, text_dim]
        pooled = text_pool(pooled_text)  # [B, D]
        c = c + (pooled if all_text else pooled * has_text[:, None])
    text_present = None
    if not all_text:
        text_mask = text_mask | ~has_text[:, None]
        text_present = has_text.to(dtype)[:, None, None]  # [B, 1, 1]
    attn_mask = None if bool(text_mask.all()) else text_mask[:, None, None, :]  # [B, 1, 1, L], over heads and queries
    return c, attn_mask, text_present


class Denoiser(nn.Module):
    """DiT-style denoiser: ``denoiser(x_t, t, text_tokens=None, text_mask=None) -> prediction`` shaped like x_t.

    What the prediction is (ε, v or x₀) is ``config.prediction_type``; the network does not care, the
    training loss and the sampler do.
    """

    def __init__(self, config: DenoiserConfig | None = None):
        super().__init__()
        self.config = config = DenoiserConfig.resolve(config)
        D, p, C = config.width, config.patch_size, config.latent_channels
        patch_dim = C * p * p
        self.patch_embed = nn.Linear(patch_dim, D)
        self.register_buffer(
            "pos_embed", sincos_2d_pos_embed(D, config.latent_size // p)[None], persistent=False
        )  # [1, N, D], fixed
        self.timestep_embed = nn.Sequential(nn.Linear(config.frequency_dim, D), nn.SiLU(), nn.Linear(D, D))
        # pooled text → added to the timestep embedding (None: cross-attention alone reads the text)
        self.text_pool = nn.Linear(config.text_dim, D) if config.pooled_text else None
        # joint attention: the text tokens, projected to the token width, run through the blocks beside the image's
        self.text_embed = nn.Linear(config.text_dim, D) if config.joint_attention else None
        self.blocks = nn.ModuleList(DiTBlock.for_config(config) for _ in range(config.depth))
        self.final_layer = FinalLayer(D, patch_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT's initialisation: Xavier-uniform Linears, N(0, 0.02) timestep MLP, and zeros where adaLN-Zero says."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for layer in (self.timestep_embed[0], self.timestep_embed[2]):
            nn.init.normal_(layer.weight, std=0.02)
        zero = [block.modulation for block in self.blocks]
        zero += [self.final_layer.modulation, self.final_layer.linear]
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # -- input checking ----------------------------------------------------------------------------------

    def _check_inputs(self, x_t, t, text_tokens, text_mask, pooled_text):
        cfg = self.config
        expected = f"[B, {cfg.latent_channels}, {cfg.latent_size}, {cfg.latent_size}]"
        if not isinstance(x_t, torch.Tensor) or x_t.ndim != 4:
            got = list(x_t.shape) if isinstance(x_t, torch.Tensor) else type(x_t).__name__
            raise ValueError(f"x_t must be a latent tensor {expected}; got {got}")
        if tuple(x_t.shape[1:]) != (cfg.latent_channels, cfg.latent_size, cfg.latent_size):
            raise ValueError(f"x_t must be a latent tensor {expected}; got {list(x_t.shape)}")
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
        # A diffusion model's timesteps are indices t ∈ [0, T); a flow model's are σ·T, σ ∈ [0, 1] (σ = 1 included).
        flow = cfg.prediction_type == FLOW
        if not bool(((t >= 0) & ((t <= cfg.num_train_timesteps) if flow else (t < cfg.num_train_timesteps))).all()):
            raise ValueError(
                f"timesteps must lie in [0, {cfg.num_train_timesteps}{']' if flow else ')'}; got min {t.min().item()}, "
                f"max {t.max().item()}"
            )

        if text_tokens is None:
            if text_mask is not None or pooled_text is not None:
                raise ValueError("text_mask and pooled_text need text_tokens; got text_tokens=None")
            return t
        if not isinstance(text_tokens, torch.Tensor) or text_tokens.ndim != 3 or text_tokens.shape[0] != B \
                or text_tokens.shape[2] != cfg.text_dim:
            got = list(text_tokens.shape) if isinstance(text_tokens, torch.Tensor) else type(text_tokens).__name__
            raise ValueError(f"text_tokens must be [B={B}, L, text_dim={cfg.text_dim}]; got {got}")
        L = text_tokens.shape[1]
        if L == 0:
            raise ValueError("text_tokens must hold at least one token (L ≥ 1); for no text pass text_tokens=None")
        if text_mask is not None:
            check_mask(text_mask, (B, L), "text_mask")
        if pooled_text is not None and not cfg.pooled_text:
            raise ValueError("this denoiser reads the text by cross-attention alone (config pooled_text=False); "
                             "leave out pooled_text")
        if pooled_text is not None and (
            not isinstance(pooled_text, torch.Tensor) or tuple(pooled_text.shape) != (B, cfg.text_dim)
        ):
            got = list(pooled_text.shape) if isinstance(pooled_text, torch.Tensor) else type(pooled_text).__name__
            raise ValueError(f"pooled_text must be [B={B}, text_dim={cfg.text_dim}]; got {got}")
        return t

    def _check_residuals(self, block_residuals, batch: int) -> None:
        """``block_residuals``: None, or a list of at most ``depth`` floating-point tensors ``[B, N, D]``; else ValueError."""
        if block_residuals is None:
            return
        cfg = self.config
        expected = (batch, cfg.num_tokens, cfg.width)
        if not isinstance(block_residuals, (list, tuple)) or len(block_residuals) > cfg.depth:
            got = f"{len(block_residuals)} of them" if isinstance(block_residuals, (list, tuple)) \
                else type(block_residuals).__name__
            raise ValueError(f"block_residuals must be None or a list of at most {cfg.depth} (depth) tensors "
                             f"{list(expected)}; got {got}")
        for i, r in enumerate(block_residuals):
            if not isinstance(r, torch.Tensor) or tuple(r.shape) != expected or not r.is_floating_point():
                got = f"{list(r.shape)} {r.dtype}" if isinstance(r, torch.Tensor) else type(r).__name__
                raise ValueError(f"block_residuals[{i}] must be a floating-point tensor {list(expected)} "
                                 f"([B, N tokens, width]); got {got}")

    # -- forward -----------------------------------------------------------------------------------------

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | int | float,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        *,
        pooled_text: torch.Tensor | None = None,
        block_residuals: list[torch.Tensor] | tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        """Predict ε (or v, or x₀) for the noisy latent ``x_t`` ``[B, C, S, S]`` at timesteps ``t``.

        ``t``: a number or 0-d tensor (the same for the whole batch) or ``[B]``, in [0, T), may be fractional.
        ``text_tokens`` ``[B, L, text_dim]``, ``text_mask`` bool ``[B, L]`` (True = real token; None = all real).
        ``pooled_text`` ``[B, text_dim]`` replaces the default pooled text, the masked mean of ``text_tokens``.
        ``block_residuals``: None, or a list of K ≤ depth tensors ``[B, N, D]``; residual i is added to the tokens
        right after block i (i = 0..K−1): how a ControlNet (:class:`sdlearn.control.ControlNet`; Zhang et al. 2023)
        steers the frozen model. None leaves the computation exactly as without it.
        """
        t = self._check_inputs(x_t, t, text_tokens, text_mask, pooled_text)
        self._check_residuals(block_residuals, x_t.shape[0])
        cfg = self.config

        x = self.patch_embed(patchify(x_t, cfg.patch_size)) + self.pos_embed  # [B, N, D]
        c = self.timestep_embed(timestep_embedding(t, cfg.frequency_dim).to(x.dtype))  # [B, D]

        c, attn_mask, text_present = text_conditioning(c, self.text_pool, text_tokens, text_mask, pooled_text, x.dtype)
        c = F.silu(c)  # every adaLN Linear reads SiLU(c)
        N = x.shape[1]
        if self.text_embed is not None and text_tokens is not None:  # joint attention over [image; text] tokens
            x = torch.cat([x, self.text_embed(text_tokens.to(x.dtype))], dim=1)  # [B, N + L, D]
            text_keys = torch.ones(text_tokens.shape[:2], dtype=torch.bool, device=x.device) if text_mask is None \
                else text_mask.bool()  # a row without text attends to the image tokens alone
            attn_mask = F.pad(text_keys, (N, 0), value=True)[:, None, None, :]  # [B, 1, 1, N + L]
            text_tokens = None
        residuals = () if block_residuals is None else block_residuals
        for i, block in enumerate(self.blocks):
            x = block(x, c, text_tokens, attn_mask, text_present)
            if i < len(residuals):  # the ControlNet's say after block i, on the image tokens
                r = residuals[i].to(x.dtype)  # [B, N, D]
                x = x + (r if x.shape[1] == N else F.pad(r, (0, 0, 0, x.shape[1] - N)))  # [B, N (+ L), D]
        x = self.final_layer(x[:, :N], c)  # [B, N, C·p·p]
        return unpatchify(x, cfg.patch_size, cfg.latent_channels, cfg.latent_size)  # [B, C, S, S]


# ----------------------------------------------------------------------------------------------------------
# Looking inside


@contextmanager
def capture_attention(model: Denoiser) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record the attention maps softmax(QKᵀ/√d) of every attention layer during the forward passes inside.

    Yields a dict filled as the model runs: ``maps["blocks.3.cross_attn"]`` is a list with one
    ``[B, heads, N, L]`` tensor per forward pass (``[B, heads, N, N]`` for ``self_attn``). Inside the block,
    attention is computed explicitly (equal to SDPA's result up to rounding), so it is slower.

        with capture_attention(model) as maps:
            model(x_t, t, tokens, mask)
        maps["blocks.5.cross_attn"][0]  # [B, heads, N, L]
    """
    maps: dict[str, list[torch.Tensor]] = {}
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (SelfAttention, CrossAttention))]
    if not layers:
        raise ValueError(f"capture_attention records the DiT's attention layers (sdlearn.denoiser), and this "
                         f"{type(model).__name__} has none; the course U-Net's are not recorded yet")
    for name, module in layers:
        maps[name] = module.captured = []
    try:
        yield maps
    finally:
        for _, module in layers:
            module.captured = None


def parameter_table(model: Denoiser) -> dict[str, int]:
    """Parameters per part, summed over the blocks; the values add up to ``count_parameters(model)``.

    Keys: ``patch_embed``, ``timestep_embed``, ``text_pool``, ``blocks.self_attn``, ``blocks.cross_attn``,
    ``blocks.mlp``, ``blocks.modulation`` (adaLN), ``final_layer``, and ``text_embed`` with joint attention.
    """
    table: dict[str, int] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        key = f"blocks.{parts[2]}" if parts[0] == "blocks" else parts[0]
        table[key] = table.get(key, 0) + p.numel()
    return table


# ----------------------------------------------------------------------------------------------------------
# The loss


def denoiser_loss(model: Denoiser, batch: Mapping[str, Any], schedule) -> tuple[torch.Tensor, dict[str, float]]:
    """The diffusion objective L = E ‖target − f_θ(x_t, t, text)‖², x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε
    (Ho et al. 2020, eq. 14, "L_simple"), where the target is ε, v = √ᾱ_t ε − √(1 − ᾱ_t) x₀ (Salimans & Ho
    2022) or x₀, as ``model.config.prediction_type`` says → ``(loss, logs)`` like every ``*_loss`` of the
    package (the logs are empty: the loss is all there is to report). ``batch``: ``x0``, ``noise`` and ``t``,
    and optionally the text's ``tokens`` and ``mask`` (:func:`sdlearn.denoiser_data.latent_batch_fn` makes it).

    A flow model (``prediction_type`` "flow") learns rectified flow instead (Liu et al. 2023; Esser et al. 2024):
    L = E ‖(ε − x₀) − v_θ(x_σ, σT, text)‖², x_σ = (1 − σ) x₀ + σ ε, with ``batch["t"]`` = σT (float timesteps,
    σ ∈ [0, 1], logit-normal in training): the conditional flow-matching regression to the velocity of each
    sample's straight path, whose minimiser is the marginal velocity field (Lipman et al. 2023, Thm. 2).

    ``batch["weight"]`` ``[B]``, when given, weights each sample's squared error (e.g. the flow-matched weights
    of :func:`sdlearn.schedules.flow_matched_timesteps`)."""
    x0, noise, t = batch["x0"], batch["noise"], batch["t"]
    if model.config.prediction_type == FLOW:
        sigma = t.to(x0.device, torch.float32) / model.config.num_train_timesteps  # [B] in [0, 1]
        prediction = model(flow_interpolate(x0, noise, sigma), t.to(x0.device), batch.get("tokens"), batch.get("mask"))
        return F.mse_loss(prediction, flow_target(x0, noise)), {}
    x_t = schedule.add_noise(x0, noise, t)
    prediction = model(x_t, t.to(x0.device), batch.get("tokens"), batch.get("mask"))
    target = schedule.target(x0, noise, t, model.config.prediction_type)
    if batch.get("weight") is None:
        return F.mse_loss(prediction, target), {}
    per_sample = (prediction - target).pow(2).flatten(1).mean(1)  # [B]
    return (batch["weight"].to(per_sample) * per_sample).mean(), {}
