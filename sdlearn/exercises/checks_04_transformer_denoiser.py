"""Checkers of notebook 04, the transformer denoiser: patchify, the timestep embedding, attention, adaLN, and the
token count at which self-attention's work overtakes the linear layers'.

In the order the notebook uses them: ``check_patchify``, ``check_timestep_embedding``, ``check_attention``,
``check_modulate``, ``check_attention_crossover``.
"""

from __future__ import annotations

import math

import torch

from sdlearn.denoiser import attention_weights, modulate, patchify, timestep_embedding
from sdlearn.exercises.framework import Case, Checker, Mistake, format_shape, register


def _patchify_cases(g):
    cases = []
    for shape, p, what in (((2, 4, 8, 8), 2, "a batch of two 4×8×8 latents"), ((3, 4, 8, 8), 4, "three 4×8×8 latents"),
                           ((1, 3, 6, 6), 3, "one 3-channel 6×6 image"), ((2, 2, 4, 6), 2, "two 2×4×6 (non-square) tensors"),
                           ((2, 4, 8, 8), 1, "two 4×8×8 latents")):
        cases.append(Case(f"{what}, x of shape {format_shape(torch.empty(shape))}, p = {p}", (torch.randn(shape, generator=g), p)))
    return cases


def _patchify_permuted(x, p, order):
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)  # [B, C, h, p, w, p]
    return x.permute(order).reshape(B, (H // p) * (W // p), C * p * p)


check_patchify = register(Checker(
    name="check_patchify",
    signature="fn(x, p) -> tokens",
    doc="cut ``x`` ``[B, C, H, W]`` into non-overlapping p × p patches, numbered row by row (left to right, top to "
        "bottom), each flattened in the order (channel, row in the patch, column in the patch): ``[B, (H/p)·(W/p), "
        "C·p·p]``, as :func:`sdlearn.denoiser.patchify` (ViT, Dosovitskiy et al. 2021; DiT §3.1).",
    reference=patchify,
    make_cases=_patchify_cases,
    hint="x.reshape(B, C, H/p, p, W/p, p) splits each spatial axis into (which patch, where in the patch); then "
         "permute to (B, patch row, patch column, C, row in patch, column in patch) and reshape to [B, N, C·p·p].",
    mistakes=(
        Mistake(lambda x, p: _patchify_permuted(x, p, (0, 2, 4, 3, 5, 1)),
                "your patch vectors list the numbers pixel by pixel with the channels last (row, column, channel); "
                "here each patch vector is channel by channel, (channel, row, column), as a Conv2d weight is flattened"),
        Mistake(lambda x, p: _patchify_permuted(x, p, (0, 4, 2, 1, 3, 5)),
                "you numbered the patches column by column; number them row by row (patch n is at row n // (W/p), "
                "column n % (W/p))"),
        Mistake(lambda x, p: x.reshape(x.shape[0], (x.shape[2] // p) * (x.shape[3] // p), -1),
                "you reshaped without permuting: each of your 'patches' is a run of numbers consecutive in memory "
                "(part of one channel's rows), not a p × p square"),
        Mistake(lambda x, p: _patchify_permuted(x, p, (0, 2, 4, 1, 5, 3)),
                "inside each patch you listed the pixels column by column; list them row by row"),
    ),
    atol=0.0,
    rtol=0.0,
))


def _timestep_embedding_cases(g):
    return [
        Case("t = [0, 1, 10, 999] (a long tensor), dim = 256 (the denoiser's)", (torch.tensor([0, 1, 10, 999]), 256)),
        Case("t = [0.5, 250.25, 731.0] (fractional timesteps, a float tensor), dim = 8", (torch.tensor([0.5, 250.25, 731.0]), 8)),
        Case("5 random timesteps in [0, 1000), dim = 64", (torch.randint(0, 1000, (5,), generator=g), 64)),
        Case("t = [3, 500], dim = 2 (one frequency, ω = 1)", (torch.tensor([3, 500]), 2)),
    ]


def _timestep_embedding_variant(t, dim, exponent_over=None, sines_first=False, interleave=False):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (exponent_over or half))
    args = t.float()[:, None] * freqs[None]  # [B, half]
    first, second = (torch.sin(args), torch.cos(args)) if sines_first else (torch.cos(args), torch.sin(args))
    if interleave:
        return torch.stack([first, second], dim=-1).flatten(1)  # cos, sin, cos, sin, ...
    return torch.cat([first, second], dim=-1)


check_timestep_embedding = register(Checker(
    name="check_timestep_embedding",
    signature="fn(t, dim) -> embedding",
    doc="the sinusoidal timestep embedding (Vaswani et al. 2017 §3.5, in DDPM's and DiT's layout): with half = dim/2 "
        "frequencies ω_i = 10000^(−i/half), i = 0..half−1, return [cos(t·ω_0), …, cos(t·ω_{half−1}), sin(t·ω_0), …, "
        "sin(t·ω_{half−1})] for each timestep: ``t`` is a tensor [B] (integers or floats), the result [B, dim].",
    reference=timestep_embedding,
    make_cases=_timestep_embedding_cases,
    hint="freqs = torch.exp(-math.log(10000) * torch.arange(half) / half) (shape [half]); args = t.float()[:, None] "
         "* freqs[None] (shape [B, half]); then torch.cat([args.cos(), args.sin()], dim=-1): all cosines, then all sines.",
    mistakes=(
        Mistake(lambda t, dim: _timestep_embedding_variant(t, dim, sines_first=True),
                "you put the sines first: this layout (DDPM's, DiT's) is all the cosines, then all the sines"),
        Mistake(lambda t, dim: _timestep_embedding_variant(t, dim, exponent_over=dim),
                "your exponents are −i/dim; they are −i/half with half = dim/2, so the slowest frequency is "
                "10000^(−(half−1)/half), close to 1/10000"),
        Mistake(lambda t, dim: _timestep_embedding_variant(t, dim, interleave=True),
                "you interleaved cos and sin (cos, sin, cos, sin, …); put all the cosines first, then all the sines"),
        Mistake(lambda t, dim: _timestep_embedding_variant(t.float() / 1000, dim),
                "you divided t by 1000 (T): here t enters as it is, an integer between 0 and 999"),
    ),
    atol=1e-3,  # sin and cos of arguments up to ~1000 in float32 differ by ~1e-4 between correct ways of writing it
    rtol=0.0,
))


def _attention_reference(q, k, v):
    return attention_weights(q, k) @ v


def _attention_cases(g):
    cases = []
    for q_shape, kv_len, dv, what in (((2, 4, 16, 48), 16, 48, "self-attention: 2 images, 4 heads, 16 tokens, head size 48"),
                                      ((2, 4, 16, 48), 10, 48, "cross-attention: 16 image tokens attend to 10 text tokens"),
                                      ((3, 5, 8), 7, 6, "no head axis: 5 queries of size 8, 7 keys, values of size 6"),
                                      ((1, 2, 4, 16), 4, 16, "large scores: q and k scaled by 4")):
        *batch, _, d = q_shape
        q = torch.randn(q_shape, generator=g)
        k = torch.randn((*batch, kv_len, d), generator=g)
        v = torch.randn((*batch, kv_len, dv), generator=g)
        if what.startswith("large"):
            q, k = 4 * q, 4 * k
        cases.append(Case(f"{what}: q {format_shape(q)}, k {format_shape(k)}, v {format_shape(v)}", (q, k, v)))
    return cases


def _attention_variant(q, k, v, scale=None, dim=-1):
    scores = q @ k.transpose(-2, -1) * (scale if scale is not None else q.shape[-1] ** -0.5)
    return scores.softmax(dim=dim) @ v


check_attention = register(Checker(
    name="check_attention",
    signature="fn(q, k, v) -> out",
    doc="scaled dot-product attention, softmax(Q Kᵀ / √d) V (Vaswani et al. 2017, eq. 1), with the softmax over the "
        "keys: ``q`` [..., N, d], ``k`` [..., M, d], ``v`` [..., M, d_v] → [..., N, d_v]; the leading axes (batch, "
        "heads) are carried along. Equal to ``torch.nn.functional.scaled_dot_product_attention(q, k, v)``.",
    reference=_attention_reference,
    make_cases=_attention_cases,
    hint="scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) has shape [..., N, M]: one row per query, one "
         "column per key. Each query's weights sum to 1 over the keys: softmax(dim=-1). Then weights @ v.",
    mistakes=(
        Mistake(lambda q, k, v: _attention_variant(q, k, v, scale=1.0),
                "you forgot to divide the scores by √d: without it large head sizes make the softmax nearly one-hot"),
        Mistake(lambda q, k, v: _attention_variant(q, k, v, scale=1.0 / q.shape[-1]),
                "you divided the scores by d; divide by √d"),
        Mistake(lambda q, k, v: _attention_variant(q, k, v, dim=-2),
                "you took the softmax over the queries (dim=-2); each query's weights must sum to 1 over the keys (dim=-1)"),
        Mistake(lambda q, k, v: _attention_variant(q, k, v, scale=v.shape[-1] ** -0.5),
                "you scaled by the size of the values; d is the size of the queries and keys (q.shape[-1])"),
    ),
    atol=1e-5,
    rtol=1e-4,
))


def _modulate_reference(x, shift, scale):
    return modulate(x, shift[:, None, :], scale[:, None, :])  # [B, D] → [B, 1, D]: one vector per image


def _modulate_cases(g):
    cases = []
    for (B, N, D), what in (((4, 4, 6), "4 images of 4 tokens (as many tokens as images) of width 6"),
                            ((2, 16, 8), "2 images of 16 tokens of width 8"),
                            ((3, 1, 5), "3 images of 1 token of width 5")):
        x = torch.randn(B, N, D, generator=g)
        cases.append(Case(f"{what}: x {format_shape(x)}, shift and scale [{B}, {D}]",
                          (x, torch.randn(B, D, generator=g), torch.randn(B, D, generator=g))))
    x = torch.randn(2, 16, 8, generator=g)
    cases.append(Case("x [2, 16, 8], shift = 0 and scale = 0 (adaLN-Zero at initialisation: the result is x itself)",
                      (x, torch.zeros(2, 8), torch.zeros(2, 8))))
    return cases


check_modulate = register(Checker(
    name="check_modulate",
    signature="fn(x, shift, scale) -> y",
    doc="adaLN's modulation (DiT §3.2): y = x·(1 + scale) + shift, where ``x`` is [B, N, D] (N tokens per image) and "
        "``shift``, ``scale`` are [B, D], one vector per image as the conditioning Linear makes them, applied to every "
        "token of that image. (``sdlearn.denoiser.modulate`` takes them already unsqueezed to [B, 1, D].)",
    reference=_modulate_reference,
    make_cases=_modulate_cases,
    hint="give shift and scale a token axis, shift[:, None, :] (shape [B, 1, D]), so that they broadcast over the N "
         "tokens of each image; then x * (1 + scale) + shift. The 1 + makes scale = 0 mean 'leave x alone'.",
    mistakes=(
        Mistake(lambda x, shift, scale: x * scale[:, None] + shift[:, None],
                "you multiplied by scale instead of (1 + scale): with scale = 0 the modulation would erase x "
                "instead of leaving it unchanged"),
        Mistake(lambda x, shift, scale: x * (1 + shift[:, None]) + scale[:, None], "you swapped shift and scale"),
        Mistake(lambda x, shift, scale: (x + shift[:, None]) * (1 + scale[:, None]),
                "you shifted before scaling; scale first, then shift: x·(1 + scale) + shift"),
        Mistake(lambda x, shift, scale: x * (1 + scale) + shift,
                "you broadcast shift and scale [B, D] against x [B, N, D] directly: broadcasting lines them up with "
                "the N tokens, not the B images (it only runs at all when N = B); use shift[:, None, :]"),
    ),
))


def _attention_crossover_reference(width, mlp_ratio, cross_attn_ratio):
    # per token and block, the linear layers do (4 + 2r + 2ρ)·d² multiply-adds: QKV 3d², out d², the MLP 2r·d², the
    # cross-attention's query and output projections 2ρ·d²; self-attention's score matrix QKᵀ and weighted sum of V do
    # 2N²d per block. They are equal at N = d·(2 + r + ρ) (Vaswani et al. 2017, Table 1, for the N² d against N d² terms).
    return float(width * (2 + mlp_ratio + cross_attn_ratio))


def _attention_crossover_cases(g):
    return [
        Case(f"width = {d}, mlp_ratio = {r}, cross_attn_ratio = {rho} ({what})", (d, r, rho))
        for d, r, rho, what in ((384, 4.0, 0.25, "a wide MLP and narrow cross-attention"),
                                (192, 1.0, 0.5, "the course's Denoiser()"),
                                (192, 4.0, 1.0, "DiT's wide MLP and full-width cross-attention"),
                                (1152, 4.0, 0.0, "DiT-XL's width and MLP, no cross-attention"),
                                (96, 1.0, 0.5, "the small model of section 4"))
    ]


check_attention_crossover = register(Checker(
    name="check_attention_crossover",
    signature="fn(width, mlp_ratio, cross_attn_ratio) -> tokens",
    doc="the number of tokens N at which the multiply-adds of self-attention's two N × N matrix products (the scores "
        "QKᵀ and the weighted sum of V, d multiply-adds per entry each) equal those of the per-token linear layers of a "
        "block (QKV, the output projection, the MLP d → r·d → d, and the cross-attention's query and output projections "
        "d → ρ·d → d): N* = d·(2 + r + ρ), a float.",
    reference=_attention_crossover_reference,
    make_cases=_attention_crossover_cases,
    hint="per token and block, a Linear from a to b costs a·b multiply-adds: add QKV (d → 3d), the output (d → d), "
         "the MLP's two layers (d → r·d → d) and the cross-attention's q and out (d → ρ·d → d). Self-attention costs "
         "N·N·d for the scores and N·N·d for the weighted sum. Set N·(linear per token) = 2·N²·d and solve for N.",
    mistakes=(
        Mistake(lambda d, r, rho: float(d * (4 + 2 * r + 2 * rho)),
                "you counted only the scores QKᵀ (N²·d); the weighted sum of the values, weights @ V, costs another "
                "N²·d, so self-attention's matrices cost 2·N²·d"),
        Mistake(lambda d, r, rho: float(d * (4 + r + 2 * rho) / 2),
                "you counted the MLP as one layer (r·d²): it has two, d → r·d and r·d → d, so 2·r·d² per token"),
        Mistake(lambda d, r, rho: float(d * (2 + r)),
                "you left out the cross-attention's query and output projections (2·ρ·d² per token): they act on "
                "every image token too"),
        Mistake(lambda d, r, rho: float(d * (1 + r + rho)),
                "you counted the QKV projection as one d × d matrix: it makes three vectors per token, 3·d² "
                "multiply-adds"),
        Mistake(lambda d, r, rho: float(d * d * (2 + r + rho)),
                "your N grows with d²: the linear layers cost N·d² and attention N²·d, so one factor d cancels and "
                "N* is proportional to d"),
    ),
    atol=1e-6,
    rtol=1e-6,
))
