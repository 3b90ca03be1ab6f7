"""Checkers of notebook 10, the U-Net and the real Stable Diffusion: a ResBlock, the skips' channels, loss by timestep.

In the order the notebook uses them, one per tier: ``check_resblock`` (implement), ``check_skip_channels`` (derive),
``check_loss_by_timestep`` (experiment).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sdlearn.exercises.framework import (
    Case,
    Checker,
    Mistake,
    check,
    format_shape,
    register,
    sd_alphas_cumprod,
)
from sdlearn.unet import ResBlock, UNet, UNetConfig

RESBLOCK_EPS = 1e-5  # the GroupNorm ε of the U-Net's ResBlocks (UNetConfig.norm_eps, as Stable Diffusion's)


# ---- Exercise 1 (implement): a ResBlock --------------------------------------------------------------------


def _resblock_module(params, groups):
    c_out, c_in = params["conv1.weight"].shape[:2]
    block = ResBlock(c_in, c_out, params["time_proj.weight"].shape[1], groups, RESBLOCK_EPS)
    block.load_state_dict(params)
    return block


@torch.no_grad()
def _resblock_reference(x, emb, params, groups):
    return _resblock_module(params, groups)(x, emb)  # sdlearn.unet.ResBlock with these weights


def _resblock_parts(x, emb, params, groups):
    """The ResBlock's pieces, in plain torch: (skip(x), h after conv1, the embedding's projection, conv2's input)."""
    def norm(h, name):
        return F.group_norm(h, groups, params[f"{name}.weight"], params[f"{name}.bias"], eps=RESBLOCK_EPS)

    h = F.conv2d(F.silu(norm(x, "norm1")), params["conv1.weight"], params["conv1.bias"], padding=1)
    e = F.linear(emb, params["time_proj.weight"], params["time_proj.bias"])[:, :, None, None]  # [B, C_out, 1, 1]
    skip = F.conv2d(x, params["skip.weight"], params["skip.bias"]) if "skip.weight" in params else x
    return skip, h, e


def _conv2(h, params, groups, normalise=True):
    if normalise:
        h = F.silu(F.group_norm(h, groups, params["norm2.weight"], params["norm2.bias"], eps=RESBLOCK_EPS))
    return F.conv2d(h, params["conv2.weight"], params["conv2.bias"], padding=1)


def _resblock_no_skip(x, emb, params, groups):
    skip, h, e = _resblock_parts(x, emb, params, groups)
    return _conv2(h + e, params, groups)


def _resblock_time_at_the_end(x, emb, params, groups):
    skip, h, e = _resblock_parts(x, emb, params, groups)
    return skip + _conv2(h, params, groups) + e


def _resblock_silu_on_emb(x, emb, params, groups):
    return _resblock_reference(x, F.silu(emb), params, groups)


def _resblock_silu_before_norm(x, emb, params, groups):
    def layer(h, norm, conv):
        h = F.group_norm(F.silu(h), groups, params[f"{norm}.weight"], params[f"{norm}.bias"], eps=RESBLOCK_EPS)
        return F.conv2d(h, params[f"{conv}.weight"], params[f"{conv}.bias"], padding=1)

    skip, _, e = _resblock_parts(x, emb, params, groups)
    return skip + layer(layer(x, "norm1", "conv1") + e, "norm2", "conv2")


def _resblock_no_second_norm(x, emb, params, groups):
    skip, h, e = _resblock_parts(x, emb, params, groups)
    return skip + _conv2(h + e, params, groups, normalise=False)


def _resblock_scaled_by_time(x, emb, params, groups):
    skip, h, e = _resblock_parts(x, emb, params, groups)
    return skip + _conv2(h * e, params, groups)


def _random_resblock_params(g, c_in, c_out, time_dim, groups):
    """A ResBlock's state dict with random values everywhere (a fresh GroupNorm is the identity, 1 and 0, which
    would hide a missing norm's affine part)."""
    block = ResBlock(c_in, c_out, time_dim, groups, RESBLOCK_EPS)
    params = {}
    for name, tensor in block.state_dict().items():
        centre = 1.0 if name.startswith("norm") and name.endswith("weight") else 0.0  # GroupNorm scales near 1
        params[name] = centre + torch.randn(tensor.shape, generator=g) * (0.2 if tensor.ndim > 1 else 0.5)
    return params


def _resblock_cases(g):
    cases = []
    for B, c_in, c_out, T, groups, (H, W), words in (
        (2, 32, 32, 64, 8, (8, 8), "the same width in and out (the skip is the identity)"),
        (3, 16, 32, 48, 4, (4, 4), "the width doubles, 16 → 32 (the skip is a 1×1 conv, params['skip.weight'])"),
        (1, 24, 12, 32, 3, (6, 10), "the width halves, 24 → 12, on a non-square 6×10 map"),
        (2, 8, 8, 16, 1, (5, 5), "one GroupNorm group (every channel normalised together)"),
    ):
        x = torch.randn(B, c_in, H, W, generator=g)
        emb = torch.randn(B, T, generator=g)
        params = _random_resblock_params(g, c_in, c_out, T, groups)
        cases.append(Case(f"{words}: x {format_shape(x)}, emb {format_shape(emb)}, groups = {groups}, params with "
                          f"{', '.join(sorted(params))}", (x, emb, params, groups)))
    return cases


check_resblock = register(Checker(
    name="check_resblock",
    signature="fn(x, emb, params, groups) -> out",
    doc="Stable Diffusion's residual block (Ho et al. 2020, appendix B; diffusers' ResnetBlock2D), as "
        ":class:`sdlearn.unet.ResBlock` computes it, from its weights ``params`` (its state dict: ``norm1``, "
        "``conv1``, ``time_proj``, ``norm2``, ``conv2``, each ``.weight`` and ``.bias``, and ``skip`` when the width "
        "changes): h = conv1(SiLU(GroupNorm1(x))); h = h + time_proj(emb) on every pixel; "
        "h = conv2(SiLU(GroupNorm2(h))); out = skip(x) + h, where skip is the 1×1 conv ``skip`` if present, else the "
        "identity. ``x`` [B, C_in, H, W], ``emb`` [B, E] (already SiLU of the timestep embedding, as the U-Net passes "
        "it), ``groups`` GroupNorm groups with ε = 1e-5; the 3×3 convs keep the size (padding 1). → [B, C_out, H, W].",
    reference=_resblock_reference,
    make_cases=_resblock_cases,
    hint="F.group_norm(x, groups, params['norm1.weight'], params['norm1.bias'], eps=1e-5), F.silu, "
         "F.conv2d(h, params['conv1.weight'], params['conv1.bias'], padding=1); the embedding: "
         "F.linear(emb, params['time_proj.weight'], params['time_proj.bias'])[:, :, None, None] (one number per "
         "channel, the same on every pixel); the skip: F.conv2d(x, params['skip.weight'], params['skip.bias']) when "
         "'skip.weight' in params, else x itself.",
    mistakes=(
        Mistake(_resblock_no_skip, "you left out the skip connection: the block returns skip(x) + h, so that it starts "
                                   "close to the identity and gradients reach the layers below through the sum"),
        Mistake(_resblock_time_at_the_end, "you added the timestep's projection to the block's output; it goes in the "
                                           "middle, onto h after conv1, so that conv2 works on features that know the noise level"),
        Mistake(_resblock_silu_on_emb, "you applied SiLU to emb: the U-Net applies it once to the timestep embedding "
                                       "before every ResBlock, and time_proj reads emb as given"),
        Mistake(_resblock_silu_before_norm, "you applied SiLU before GroupNorm; the order is GroupNorm, then SiLU, "
                                            "then the conv (a pre-activation residual block)"),
        Mistake(_resblock_no_second_norm, "you left out GroupNorm2 and the SiLU before conv2"),
        Mistake(_resblock_scaled_by_time, "you multiplied h by the timestep's projection; the ResBlock adds it (a "
                                          "per-channel shift; SD v1's resnet_time_scale_shift='default')"),
    ),
))


# ---- Exercise 2 (derive): the channels every up-path ResBlock reads ------------------------------------------


def _skip_channels_reference(block_out_channels, layers_per_block):
    channels = tuple(block_out_channels)
    levels = len(channels)
    config = UNetConfig(sample_size=None, block_out_channels=channels, layers_per_block=layers_per_block,
                        down_block_types=("DownBlock2D",) * levels, up_block_types=("UpBlock2D",) * levels,
                        norm_num_groups=math.gcd(*channels), attention_head_dim=1, cross_attention_dim=8)
    with torch.device("meta"):  # shapes only: SD-sized configurations cost no memory
        unet = UNet(config)
    return [int(res.norm1.num_channels) for level in unet.up for res in level.res]  # what each up ResBlock reads


def _simulated_skip_channels(channels, layers, conv_in=True, downsample=True, lifo=True, reads_per_level=None,
                             add_h=True):
    """The skip bookkeeping, with switches that reproduce the usual slips."""
    stack = [channels[0]] if conv_in else []
    for i, c in enumerate(channels):
        stack += [c] * layers
        if downsample and i < len(channels) - 1:
            stack.append(c)
    reads, c = [], channels[-1]
    for level in reversed(range(len(channels))):
        for _ in range(layers + 1 if reads_per_level is None else reads_per_level):
            skip = (stack.pop() if lifo else stack.pop(0)) if stack else 0
            reads.append(c + skip if add_h else skip)
            c = channels[level]
    return reads


class WholeNumbersChecker(Checker):
    """A checker whose answer is a list of whole numbers: a list, a tuple or a 1-d tensor of them is accepted."""

    def __call__(self, fn) -> None:
        __tracebackhide__ = True
        return check(fn, self.reference, self.cases(), name=self.name, hint=self.hint, mistakes=self.mistakes,
                     compare=_compare_whole_numbers, timeout=self.timeout)


def _compare_whole_numbers(expected: list[int], got) -> str | None:
    if got is None:
        return "your result is None: did you forget to `return` it?"
    if isinstance(got, torch.Tensor) and got.ndim == 1:
        got = got.tolist()
    if not isinstance(got, (list, tuple)):
        return f"expected a list of {len(expected)} whole numbers, your result is a {type(got).__name__}"
    if len(got) != len(expected):
        return f"expected {len(expected)} numbers (one per up-path ResBlock), your list has {len(got)}: {list(got)}"
    for k, (e, v) in enumerate(zip(expected, got)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != e:
            return f"number {k} (up ResBlock {k}, counting from the coarsest) should be {e}, yours is {v!r}"
    return None


def _skip_channels_cases(g):
    return [
        Case(f"block_out_channels = {channels}, layers_per_block = {layers}{words}", (channels, layers))
        for channels, layers, words in (
            ((320, 640, 1280, 1280), 2, " (Stable Diffusion v1)"),  # first: it tells every mistake below apart
            ((64, 128), 1, " (the course U-Net)"),
            ((32, 64, 96), 3, ""),
            ((64,), 2, " (one level: no down- or upsampling)"),
            ((32, 32, 64, 64), 1, ""),
        )
    ]


check_skip_channels = register(WholeNumbersChecker(
    name="check_skip_channels",
    signature="fn(block_out_channels, layers_per_block) -> in_channels",
    doc="the U-Net's skip bookkeeping, as :class:`sdlearn.unet.UNet` (and diffusers' UNet2DConditionModel) wires it. "
        "The down path pushes on a stack the output of conv_in (block_out_channels[0] channels), of every ResBlock "
        "(``layers_per_block`` per level, each with its level's channels) and of every stride-2 downsampling conv "
        "(all levels but the last; it keeps the channels). The middle block keeps the last level's channels. The up "
        "path goes through the levels coarsest first, ``layers_per_block + 1`` ResBlocks per level; each reads the "
        "concatenation [h, skip] of the running features h and the skip popped from the stack, and outputs its "
        "level's channels (upsampling keeps them). Return the list of the input channels of every up-path ResBlock, "
        "in the order they run (a list of whole numbers).",
    reference=_skip_channels_reference,
    make_cases=_skip_channels_cases,
    hint="simulate it: skips = [block_out_channels[0]]; for each level i: layers_per_block times skips.append(c_i), "
         "then skips.append(c_i) if i is not the last level. Then c = block_out_channels[-1]; for each level from the "
         "last to the first: layers_per_block + 1 times: in_channels.append(c + skips.pop()); c = c_level.",
    mistakes=(
        Mistake(lambda ch, n: _simulated_skip_channels(ch, n, conv_in=False),
                "you left out conv_in's output: it is the first skip pushed, and the last up ResBlock reads it"),
        Mistake(lambda ch, n: _simulated_skip_channels(ch, n, downsample=False),
                "you left out the downsampling convs' outputs: each is pushed too (that is why every up level has "
                "layers_per_block + 1 ResBlocks)"),
        Mistake(lambda ch, n: _simulated_skip_channels(ch, n, lifo=False),
                "you took the skips first in, first out; the up path pops them from the top of the stack (last in, "
                "first out): the coarsest features meet the coarsest skips"),
        Mistake(lambda ch, n: _simulated_skip_channels(ch, n, reads_per_level=n),
                "you gave each up level layers_per_block ResBlocks; it has one more, to take the extra skip each down "
                "level left (its downsampling conv's, or conv_in's for the first level)"),
        Mistake(lambda ch, n: _simulated_skip_channels(ch, n, add_h=False),
                "you returned the skips' channels alone; each up ResBlock reads the concatenation [h, skip], so its "
                "input has the running features' channels plus the skip's"),
    ),
))


# ---- Exercise 3 (experiment): the denoising loss at each timestep --------------------------------------------


def _loss_by_timestep_reference(model_fn, x0, noise, timesteps, alphas_cumprod):
    losses = []
    for t in timesteps.tolist():
        a = alphas_cumprod[t]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise  # Ho et al. 2020, eq. 4
        t_batch = torch.full((len(x0),), t, dtype=torch.long)
        losses.append((model_fn(x_t, t_batch) - noise).pow(2).mean())  # the ε-prediction MSE at this t
    return torch.stack(losses)  # [K]


def _alpha_bar_of(alphas_cumprod, t, like):
    return alphas_cumprod[torch.as_tensor(t, dtype=torch.long)].reshape(-1, *([1] * (like.dim() - 1)))


def _zero_model(x_t, t):
    return torch.zeros_like(x_t)


def _identity_model(x_t, t):
    return x_t.clone()


def _make_blank_image_model(alphas_cumprod):
    def model(x_t, t):  # the ε a model would predict if it believed x0 = 0: x_t / √(1 − ᾱ_t)
        return x_t / (1 - _alpha_bar_of(alphas_cumprod, t, x_t)).sqrt()
    return model


def _make_halfway_model(alphas_cumprod):
    def model(x_t, t):  # √(1 − ᾱ_t) · x_t: right at high noise, far off at low noise
        return (1 - _alpha_bar_of(alphas_cumprod, t, x_t)).sqrt() * x_t
    return model


def _loss_by_timestep_cases(g):
    alphas_cumprod = sd_alphas_cumprod()
    cases = []
    for model, words, B, timesteps in (
        (_identity_model, "model_fn returns x_t itself", 4, [0, 250, 500, 999]),
        (_make_blank_image_model(alphas_cumprod), "model_fn returns x_t / √(1 − ᾱ_t) (the ε if x0 were 0)", 3,
         [10, 100, 700]),
        (_make_halfway_model(alphas_cumprod), "model_fn returns √(1 − ᾱ_t) · x_t", 2, [1, 50, 300, 600, 900]),
        (_zero_model, "model_fn predicts 0 everywhere", 5, [999, 0]),
    ):
        x0, noise = torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 4, 8, 8, generator=g)
        cases.append(Case(f"{words}; x0 and noise {format_shape(x0)}, timesteps = torch.tensor({timesteps}), "
                          "alphas_cumprod = Stable Diffusion's ᾱ_t [1000]",
                          (model, x0, noise, torch.tensor(timesteps), alphas_cumprod)))
    return cases


def _losses_with_noising(noising, target="noise"):
    def losses(model_fn, x0, noise, timesteps, alphas_cumprod):
        out = []
        for t in timesteps.tolist():
            x_t = noising(alphas_cumprod[t], x0, noise)
            want = noise if target == "noise" else x0
            out.append((model_fn(x_t, torch.full((len(x0),), t)) - want).pow(2).mean())
        return torch.stack(out)
    return losses


check_loss_by_timestep = register(Checker(
    name="check_loss_by_timestep",
    signature="fn(model_fn, x0, noise, timesteps, alphas_cumprod) -> losses",
    doc="the ε-prediction loss of a denoiser at chosen timesteps (the terms of Ho et al. 2020's L_simple, one per t): "
        "for each t in ``timesteps`` (a long tensor [K]), noise the whole batch to t, x_t = √ᾱ_t · x0 + √(1 − ᾱ_t) · "
        "noise, ask ``model_fn(x_t, t_batch)`` (``t_batch`` a long tensor [B] filled with t) for its prediction "
        "ε̂ and take the mean over every number of (ε̂ − noise)². ``x0`` and ``noise`` [B, C, H, W], "
        "``alphas_cumprod`` ᾱ [T]. → a tensor [K], one mean squared error per timestep.",
    reference=_loss_by_timestep_reference,
    make_cases=_loss_by_timestep_cases,
    hint="for t in timesteps.tolist(): a = alphas_cumprod[t]; x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise; "
         "eps = model_fn(x_t, torch.full((len(x0),), t)); losses.append(((eps - noise) ** 2).mean()); "
         "then return torch.stack(losses).",
    mistakes=(
        Mistake(_losses_with_noising(lambda a, x0, n: a * x0 + (1 - a) * n),
                "you noised with ᾱ and 1 − ᾱ; their square roots belong there (x_t = √ᾱ·x0 + √(1 − ᾱ)·ε)"),
        Mistake(_losses_with_noising(lambda a, x0, n: (1 - a).sqrt() * x0 + a.sqrt() * n),
                "you swapped the weights of x0 and the noise: x0 gets √ᾱ_t (near 1 at small t), the noise √(1 − ᾱ_t)"),
        Mistake(_losses_with_noising(lambda a, x0, n: a.sqrt() * x0 + (1 - a).sqrt() * n, target="x0"),
                "you compared the prediction with x0; an ε-prediction model is scored against the noise"),
        Mistake(lambda *args: _loss_by_timestep_reference(*args) * args[1][0].numel(),
                "you summed the squared errors over each image instead of taking the mean over every number"),
    ),
))
