"""Stable Diffusion end to end: text → image, image → image (SDEdit), and inpainting.

Every piece of the course meets here (Rombach et al. 2022, Fig. 3). A prompt is read by the frozen text
tower; noise x_T in the VAE's latent space is denoised step by step by the denoiser (the DiT of
:mod:`sdlearn.denoiser`, or the U-Net of :mod:`sdlearn.unet`: the pipeline needs only their shared call and
``config.prediction_type``) under classifier-free guidance; the VAE decodes the result. A different seed gives
a different x_T, so a different image::

    >>> from sdlearn.pretrained import load_pipeline
    >>> pipe = load_pipeline()
    >>> images = pipe("a large red circle in the top left", seed=0)        # [1, 3, 32, 32] in [-1, 1]
    >>> pipe.to_pil(images)[0].resize((128, 128), 0).show()

What one call does, with N images of P prompts (N = P · ``num_images_per_prompt``):

1. **Text**: the unconditional prompts (the empty prompt "", or ``negative_prompt``) and the prompts are
   tokenized together and the text encoder runs *once* → tokens ``[2P, L, D]`` and mask ``[2P, L]``
   (padding beyond the longest prompt is dropped, as in training: masked tokens change nothing).
2. **Noise**: x_T = ``sampler.init_noise_sigma`` · N(0, I), ``[N, 4, 8, 8]``, drawn from ``generator`` (or
   ``torch.Generator().manual_seed(seed)``) on the CPU, so a seed gives the same image on every device.
3. **Denoising**: for each of ``num_inference_steps`` timesteps the denoiser sees the unconditional and the
   conditional batch as *one* batch of 2N (``torch.cat([x, x])``), and the two predictions are combined by
   classifier-free guidance, ε̃ = ε_u + w (ε_c − ε_u) (Ho & Salimans 2022, eq. 6). With w = 1 ε̃ = ε_c,
   so the unconditional half is skipped (half the work).
4. **Decoding**: images = VAE.decode(z₀ / scaling_factor), clamped to [-1, 1] (the latents were scaled by
   the scaling factor for diffusion, as Stable Diffusion's 0.18215).

Image-to-image (:meth:`LatentDiffusionPipeline.img2img`, SDEdit, Meng et al. 2022): the image is encoded
(posterior mode), noised to the timestep ``strength`` of the way up the sampler's schedule, and denoised from
there: ``strength`` 0 returns the VAE's reconstruction of the input, 1 nearly ignores it.

Inpainting (:meth:`LatentDiffusionPipeline.inpaint`): the mask (1 = repaint, 0 = keep, diffusers'
convention) is max-pooled to the latent grid, so a latent cell is repainted when *any* of its 4×4 pixels is.
After every step the kept cells of x are replaced by the encoded image noised to the noise level x has
just reached (with the same noise as x_T, as diffusers' SD inpainting does); after the last step they are the
encoded image itself. This "blend" is the simplest form of RePaint (Lugmayr et al. 2022, without its
resampling). Finally the kept *pixels* are pasted back from the input (``paste_unmasked=True``), because the
decoder's reconstruction of them is close but not exact, and a cell freed by the max-pool may hold pixels that
were to be kept.

Inversion and editing (:meth:`LatentDiffusionPipeline.invert`, :meth:`LatentDiffusionPipeline.edit`): DDIM with
η = 0 is a discretised ODE, so it can be run backwards, from the encoded image up to the x_T from which the same
DDIM steps come back down to it (Song et al. 2021, §4.3). ``pipe(prompt, latents=x_T,
sampler="ddim")`` then reconstructs the image; regenerating with a target prompt that changes one attribute edits
it while the layout, which x_T encodes, stays.

Control (:attr:`LatentDiffusionPipeline.controlnet`, ``control_image=``): a ControlNet (Zhang et al. 2023,
:mod:`sdlearn.control`) reads the latents, the text and an edge map, and its residuals are added to the
denoiser's first blocks at every step.

The pipeline runs the modules it is given as they are (it does not switch them to eval mode);
:func:`sdlearn.pretrained.load_pipeline` gives them in eval mode. All work runs under ``torch.no_grad()``.

Conventions shared with the rest of the package: images in and out are batches ``[B, 3, 32, 32]`` in [-1, 1]
(a single image ``[3, 32, 32]`` is refused with a hint to write ``image[None]``; only the display helpers
:func:`to_numpy` and :func:`to_pil` also take one image); outputs live on the device of the model that made
them (``pipe.device``), as a torch module's do; ``seed``/``generator`` are torch's, ``rng`` never appears here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from sdlearn.checks import check_batch
from sdlearn.control import check_control_image
from sdlearn.flow import FLOW_SAMPLERS, FlowMatchSampler, check_sampler_fits, get_flow_sampler
from sdlearn.samplers import SAMPLER_NAMES, Sampler, classifier_free_guidance, get_sampler, sample
from sdlearn.schedules import NoiseSchedule, convert_prediction
from sdlearn.unet import UNetConfig

# ----------------------------------------------------------------------------------------------------------
# Images out: numpy and PIL


def _as_batch(images) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() not in (3, 4) or images.shape[-3] != 3:
        got = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images as a tensor [N, 3, H, W] (or [3, H, W]) in [-1, 1], got {got}")
    return images[None] if images.dim() == 3 else images


def to_numpy(images: torch.Tensor) -> np.ndarray:
    """Images ``[N, 3, H, W]`` (or ``[3, H, W]``) in [-1, 1] → uint8 array ``[N, H, W, 3]`` (values clamped,
    x ↦ round((x + 1) · 127.5))."""
    images = _as_batch(images).detach().to("cpu", torch.float32).clamp(-1, 1)
    return ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [N, H, W, 3]


def to_pil(images: torch.Tensor) -> list:
    """Images ``[N, 3, H, W]`` (or ``[3, H, W]``) in [-1, 1] → a list of N RGB ``PIL.Image``s."""
    return [Image.fromarray(array) for array in to_numpy(images)]


# ----------------------------------------------------------------------------------------------------------
# Checking the arguments


def _check_steps(num_inference_steps) -> int:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a whole number ≥ 1 (20 is a good choice), got {num_inference_steps!r}")
    return int(num_inference_steps)


GUIDANCE_INTERVAL_END = 0.6  # the default guidance interval is t ∈ [0, 0.6 T]


def _check_interval(interval, num_train_timesteps: int) -> tuple[float, float]:
    """``(t_low, t_high)`` with 0 ≤ t_low ≤ t_high: the timesteps at which guidance applies."""
    ok = isinstance(interval, (tuple, list)) and len(interval) == 2 and all(
        isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v) for v in interval)
    if not ok or not 0 <= interval[0] <= interval[1]:
        raise ValueError(f"guidance_interval must be (t_low, t_high) with 0 ≤ t_low ≤ t_high (timesteps; "
                         f"(0, {num_train_timesteps}) guides at every step), got {interval!r}")
    return float(interval[0]), float(interval[1])


def _check_guidance(guidance_scale) -> float:
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, np.integer, np.floating)) \
            or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a number ≥ 0 (1 = no guidance, 0 = unconditional, "
                         f"4 the course's default), got {guidance_scale!r}")
    return float(guidance_scale)


def _check_strength(strength) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.integer, np.floating)) \
            or not 0 <= strength <= 1:
        raise ValueError(f"strength must be a number in [0, 1] (0 keeps the image, 1 repaints it all), got {strength!r}")
    return float(strength)


def _prompt_list(prompt, name: str = "prompt") -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}")
    return list(prompts)


def _negative_list(negative_prompt, n: int) -> list[str]:
    if negative_prompt is None:
        return [""] * n
    negatives = _prompt_list(negative_prompt, "negative_prompt")
    if isinstance(negative_prompt, str):
        return negatives * n
    if len(negatives) != n:
        raise ValueError(f"got {len(negatives)} negative prompts for {n} prompts; give one negative prompt "
                         f"(a string) for all, or a list of {n}")
    return negatives


SEED_LOW, SEED_HIGH = -(2**63), 2**64 - 1  # the seeds torch.Generator.manual_seed accepts


def check_seed(seed) -> int:
    """``seed`` as an int, or a ValueError that names it: a whole number in [-2**63, 2**64 - 1], the range torch's
    generators take (a negative seed is used as its two's complement)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be a whole number, got {seed!r}")
    if not SEED_LOW <= int(seed) <= SEED_HIGH:
        raise ValueError(f"seed {int(seed)} is out of range: a seed must lie between 0 and 2**64 - 1 = {SEED_HIGH} "
                         "(torch's generators hold 64 bits)")
    return int(seed)


def _make_generator(generator, seed):
    if seed is not None:
        if generator is not None:
            raise ValueError("give either seed or generator, not both")
        return torch.Generator().manual_seed(check_seed(seed))
    if generator is not None and not isinstance(generator, torch.Generator) and not (
            isinstance(generator, (list, tuple)) and all(isinstance(g, torch.Generator) for g in generator)):
        raise ValueError(f"generator must be a torch.Generator or a list of them (one per image), got {type(generator).__name__}")
    return generator


def _draw_noise(shape: tuple[int, ...], generator, device: torch.device) -> torch.Tensor:
    """N(0, I) of ``shape``, drawn on the generator's device (the CPU for a seed) and moved to ``device``.
    A list of generators draws one image each: image i depends on generator i only."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for {shape[0]} images; give one per image")
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device) for g in generator]).to(device)
    draw_device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=draw_device).to(device)


# ----------------------------------------------------------------------------------------------------------
# The pipeline


def check_compatible(vae, text_encoder, tokenizer, denoiser_config, schedule: NoiseSchedule) -> None:
    """Raise a ValueError saying what does not fit, unless these parts can make one pipeline: the VAE's latents are
    what the denoiser (of ``denoiser_config``) reads, the schedule has its T, and the text encoder (with its
    tokenizer, or neither of them) emits tokens as wide as its ``text_dim``.

    ``denoiser_config`` is a :class:`~sdlearn.denoiser.DenoiserConfig` (the DiT: ``latent_channels``,
    ``latent_size``, ``text_dim``) or a :class:`~sdlearn.unet.UNetConfig` (diffusers' names: ``in_channels`` =
    ``out_channels``, any latent size divisible by 2^(levels − 1), ``cross_attention_dim``)."""
    cfg = denoiser_config
    if isinstance(cfg, UNetConfig):
        C, H, W = vae.latent_shape
        factor = 2 ** (cfg.num_levels - 1)  # the U-Net halves the latent (levels − 1) times
        if cfg.in_channels != C or cfg.out_channels != C or H % factor or W % factor:
            raise ValueError(f"the VAE makes latents {list(vae.latent_shape)} but the U-Net reads {cfg.in_channels} "
                             f"channels (and predicts {cfg.out_channels}) of a size divisible by {factor}")
        text_dim, text_field = cfg.cross_attention_dim, "cross_attention_dim"
    else:
        latent = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        if tuple(vae.latent_shape) != latent:
            raise ValueError(f"the VAE makes latents {list(vae.latent_shape)} but the denoiser expects {list(latent)}")
        text_dim, text_field = cfg.text_dim, "text_dim"
    if cfg.num_train_timesteps != schedule.num_train_timesteps:
        raise ValueError(f"the denoiser was built for T = {cfg.num_train_timesteps} timesteps, the schedule has "
                         f"{schedule.num_train_timesteps}")
    if (text_encoder is None) != (tokenizer is None):
        raise ValueError("give both a text encoder and its tokenizer, or neither (an unconditional denoiser)")
    if text_encoder is not None:
        if text_encoder.config.width != text_dim:
            raise ValueError(f"the text encoder's tokens are {text_encoder.config.width} wide, but the denoiser "
                             f"reads {text_field} = {text_dim}")
        if tokenizer.vocab_size != text_encoder.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the text encoder "
                             f"{text_encoder.config.vocab_size}: use the tokenizer it was trained with")


class LatentDiffusionPipeline:
    """Text-to-image with a VAE, a text encoder (+ its tokenizer), a denoiser and a noise schedule.

    ``schedule``: the :class:`~sdlearn.schedules.NoiseSchedule` the denoiser was trained with (or its name,
    e.g. "scaled_linear"). ``text_encoder`` and ``tokenizer`` may both be None for an *unconditional*
    denoiser; its prompts must then be "" (they only count the images).

    Call it (``pipe(prompt, ...)``), or :meth:`img2img` / :meth:`inpaint`; all three take the same keyword
    arguments and return images ``[N, 3, 32, 32]`` in [-1, 1], on ``pipe.device``.
    """

    def __init__(self, vae, text_encoder, tokenizer, denoiser, schedule: NoiseSchedule | str = "scaled_linear"):
        if isinstance(schedule, str):
            schedule = NoiseSchedule.from_name(schedule)
        if not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"schedule must be a NoiseSchedule or a schedule name, got {type(schedule).__name__}")
        check_compatible(vae, text_encoder, tokenizer, denoiser.config, schedule)
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.denoiser, self.schedule = denoiser, schedule
        # Guidance only where t ≤ 0.6 T (Kynkäänniemi et al. 2024): at the highest noise levels the layout is chosen,
        # and guiding there collapses what a prompt leaves open; benchmarks/quality.py measures the choice.
        self.guidance_interval: tuple[float, float] = (0, GUIDANCE_INTERVAL_END * schedule.num_train_timesteps)
        # A flow denoiser's samplers space σ with SD3's resolution shift (1: none; Esser et al. 2024, §5.3.2).
        self.flow_shift = 1.0
        # A ControlNet (sdlearn.control.ControlNet) attached here steers every call given a control_image.
        self.controlnet = None

    to_numpy = staticmethod(to_numpy)
    to_pil = staticmethod(to_pil)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.vae.image_shape)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.vae.latent_shape)

    def to(self, device: str | torch.device) -> LatentDiffusionPipeline:
        """Move every module to ``device``; returns the pipeline."""
        for module in (self.vae, self.text_encoder, self.denoiser, self.controlnet):
            if module is not None:
                module.to(device)
        return self

    def __repr__(self) -> str:
        def count(m):
            return "none" if m is None else f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M"

        return (f"LatentDiffusionPipeline(vae {count(self.vae)}, text encoder {count(self.text_encoder)}, "
                f"denoiser {count(self.denoiser)} ({self.denoiser.config.prediction_type}), "
                f"images {list(self.image_shape)} ↔ latents {list(self.latent_shape)}, device {self.device})")

    # -- the pieces, public so that notebook 08 can assemble them by hand ------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts (B strings) → the frozen text tower's ``tokens [B, L, D]`` and ``mask [B, L]``, padding
        beyond the longest prompt dropped (what the denoiser was trained on)."""
        ids, mask = self.tokenizer(list(prompts))  # [B, max_length] each
        length = int(mask.sum(1).max())
        encoding = self.text_encoder(ids[:, :length].to(self.device), mask[:, :length].to(self.device))
        return encoding.tokens, encoding.mask  # [B, L, D], [B, L]

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, 32, 32]`` in [-1, 1] → latents ``[B, 4, 8, 8]`` for diffusion: the posterior's mode
        times the scaling factor."""
        return self.vae.encode(images.to(self.device)).mode() * self.vae.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents ``[B, 4, 8, 8]`` → images ``[B, 3, 32, 32]`` in [-1, 1] (clamped), on ``pipe.device``."""
        return self.vae.decode(latents.to(self.device) / self.vae.scaling_factor).clamp(-1, 1)

    @property
    def is_flow(self) -> bool:
        """Whether the denoiser was trained with rectified flow (``prediction_type`` "flow") rather than diffusion."""
        return self.denoiser.config.prediction_type == "flow"

    @property
    def default_sampler(self) -> str:
        """The sampler used when none is named: ``"dpm++"`` for a diffusion denoiser, ``"euler"``
        (:class:`~sdlearn.flow.FlowMatchEulerSampler`) for a flow denoiser."""
        return "euler" if self.is_flow else "dpm++"

    def get_sampler(self, sampler: str | Sampler | None = None) -> Sampler:
        """A sampler for this denoiser by name, or a :class:`~sdlearn.samplers.Sampler` built by hand (e.g.
        ``DDIMSampler(schedule, eta=1.0)``), checked; None picks :attr:`default_sampler`. A diffusion denoiser takes
        ``"ddpm"``, ``"ddim"``, ``"euler"``, ``"heun"`` or ``"dpm++"``; a flow denoiser ``"euler"`` or ``"heun"``, the
        flow samplers (:mod:`sdlearn.flow`, with ``shift`` = :attr:`flow_shift`). A sampler of the other kind raises
        ``ValueError`` naming the objective the denoiser was trained with."""
        prediction_type = self.denoiser.config.prediction_type
        if sampler is None:
            sampler = self.default_sampler
        if isinstance(sampler, Sampler):
            check_sampler_fits(sampler, prediction_type)
            if isinstance(sampler, FlowMatchSampler):
                if sampler.num_train_timesteps != self.schedule.num_train_timesteps:
                    raise ValueError(f"the sampler has T = {sampler.num_train_timesteps}, the denoiser "
                                     f"{self.schedule.num_train_timesteps}")
                return sampler
            if sampler.prediction_type != prediction_type:
                raise ValueError(f"the sampler reads {sampler.prediction_type!r} predictions but the denoiser makes "
                                 f"{prediction_type!r} ones")
            if not torch.equal(sampler.schedule.alphas_cumprod, self.schedule.alphas_cumprod):
                raise ValueError("the sampler's noise schedule differs from the pipeline's (the denoiser's)")
            return sampler
        names = tuple(FLOW_SAMPLERS) if self.is_flow else SAMPLER_NAMES
        if not isinstance(sampler, str):
            raise ValueError(f"sampler must be one of {', '.join(names)} or a Sampler, got {sampler!r}")
        if self.is_flow:
            return get_flow_sampler(sampler, self.schedule.num_train_timesteps, shift=self.flow_shift)
        return get_sampler(sampler, self.schedule, prediction_type=prediction_type)

    # -- the shared loop --------------------------------------------------------------------------------

    def _prepare(self, prompt, negative_prompt, num_inference_steps, guidance_scale, sampler, generator, seed,
                 num_images_per_prompt):
        """Check every common argument before any work → (prompts, negatives, steps, w, sampler, generator, k)."""
        steps = _check_steps(num_inference_steps)
        guidance_scale = _check_guidance(guidance_scale)
        prompts = _prompt_list(prompt)
        negatives = _negative_list(negative_prompt, len(prompts))
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, (int, np.integer)) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a whole number ≥ 1, got {num_images_per_prompt!r}")
        if self.text_encoder is None and (any(prompts) or negative_prompt is not None):
            raise ValueError("this pipeline has no text encoder (an unconditional denoiser): use prompt '' and "
                             "num_images_per_prompt to choose the number of images, and no negative_prompt")
        solver = self.get_sampler(sampler)
        generator = _make_generator(generator, seed)
        return prompts, negatives, steps, guidance_scale, solver, generator, int(num_images_per_prompt)

    def _model_fn(self, prompts: list[str], negatives: list[str], guidance_scale: float, k: int,
                  guidance_interval=None, control: torch.Tensor | None = None,
                  conditioning_scale: float = 1.0) -> Callable:
        """The text encoded once and repeated k times per prompt, and ``model_fn(x, t)`` giving the guided
        prediction for the N = P·k latents x ``[N, 4, 8, 8]``; guided only at timesteps inside
        ``guidance_interval`` (None: the pipeline's ``guidance_interval``), the conditional prediction elsewhere.

        ``control`` ``[N, 1, 32, 32]`` (checked): the attached ControlNet reads it (both halves of a guided batch
        get the same control image, as in diffusers) and its residuals are added to the denoiser's blocks."""
        low, high = _check_interval(self.guidance_interval if guidance_interval is None else guidance_interval,
                                    self.schedule.num_train_timesteps)
        denoiser, controlnet = self.denoiser, self.controlnet

        def denoise(x, t, tokens=None, mask=None):
            if control is None:
                return denoiser(x, t) if tokens is None else denoiser(x, t, tokens, mask)
            repeat = x.shape[0] // control.shape[0]  # 2 in a guided batch [uncond; cond], else 1
            residuals = controlnet(x, t, tokens, mask, control.repeat(repeat, 1, 1, 1), conditioning_scale)
            return denoiser(x, t, tokens, mask, block_residuals=residuals)

        if self.text_encoder is None:
            return lambda x, t: denoise(x, t)
        guided = guidance_scale != 1.0
        tokens, mask = self.encode_prompt(negatives + prompts if guided else prompts)  # [2P or P, L, D]
        tokens, mask = tokens.repeat_interleave(k, dim=0), mask.repeat_interleave(k, dim=0)  # [2N or N, L, D]
        if not guided:  # ε̃ = ε_c: no unconditional pass
            return lambda x, t: denoise(x, t, tokens, mask)

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            inside = torch.as_tensor(t).expand(x.shape[0]).cpu()  # [N] timesteps
            inside = (inside >= low) & (inside <= high)  # [N]: guided here (Kynkäänniemi et al. 2024)
            if not inside.any():  # outside the interval: the conditional prediction, one pass
                n = x.shape[0]
                return denoise(x, t, tokens[n:], mask[n:])
            both = denoise(torch.cat([x, x]), t, tokens, mask)  # [2N, 4, 8, 8]: one batched call
            uncond, cond = both.chunk(2)
            guided = classifier_free_guidance(uncond, cond, guidance_scale)
            return guided if inside.all() else torch.where(inside.to(x.device)[:, None, None, None], guided, cond)

        return model_fn

    @torch.no_grad()
    def _denoise(self, model_fn, solver, steps, generator, n, progress, callback, x0=None, strength=1.0,
                 latents=None):
        noise = _draw_noise((n, *self.latent_shape), generator, self.device) if latents is None else latents
        return sample(model_fn, solver, noise.shape, steps, generator=generator, progress=progress,
                      callback=callback, noise=noise, x0=x0, strength=strength)

    def _check_latents(self, latents, n: int) -> torch.Tensor:
        """``latents`` as float32 ``[N, 4, 8, 8]`` on the pipeline's device, or a ValueError naming that shape."""
        expected = [n, *self.latent_shape]
        if not isinstance(latents, torch.Tensor) or list(latents.shape) != expected or not latents.is_floating_point():
            got = f"shape {list(latents.shape)}" if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must be a float tensor of shape {expected} (prompts × num_images_per_prompt, "
                             f"then the latent shape), got {got}")
        if not torch.isfinite(latents).all():
            raise ValueError(f"latents of shape {expected} contain NaN or infinite values")
        return latents.to(self.device, torch.float32)

    def _check_control(self, control_image, n: int, conditioning_scale) -> torch.Tensor | None:
        """The control image for N images, ``[N, 1, 32, 32]`` on the device (one image is repeated), or None."""
        if control_image is None:
            return None
        if self.controlnet is None:
            raise ValueError("control_image needs a ControlNet, and this pipeline has none: load one with "
                             "load_pipeline(controlnet=True), or attach one as pipe.controlnet")
        if isinstance(conditioning_scale, bool) or not isinstance(conditioning_scale, (int, float, np.integer, np.floating)) \
                or not math.isfinite(conditioning_scale):
            raise ValueError(f"controlnet_conditioning_scale must be a finite number (1 = full control, 0 = none), "
                             f"got {conditioning_scale!r}")
        self.controlnet.config.check_fits(self.denoiser)
        if isinstance(control_image, torch.Tensor) and control_image.dim() == 3:
            control_image = control_image[None]  # one control image [1, 32, 32] for every image
        return check_control_image(control_image, n).to(self.device, torch.float32)  # [N, 1, 32, 32]

    # -- text → image -----------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 4.0,
        sampler: str | Sampler | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | None = None,
        num_images_per_prompt: int = 1,
        progress: bool = True,
        callback: Callable | None = None,
        guidance_interval: tuple[float, float] | None = None,
        latents: torch.Tensor | None = None,
        control_image: torch.Tensor | None = None,
        controlnet_conditioning_scale: float = 1.0,
    ) -> torch.Tensor:
        """Images for ``prompt`` → ``[N, 3, 32, 32]`` in [-1, 1] on ``pipe.device``, N = len(prompts) · num_images_per_prompt,
        grouped by prompt (the k images of prompt 0 first).

        - ``negative_prompt``: what guidance pushes away from, in place of the empty prompt: one string for all
          prompts or a list as long as ``prompt``. (Ignored at ``guidance_scale`` 1, where there is no
          unconditional pass.)
        - ``num_inference_steps`` ≥ 1; ``guidance_scale`` w ≥ 0 (ε̃ = ε_u + w (ε_c − ε_u)); ``sampler``: a name
          among ``"ddpm"``, ``"ddim"``, ``"euler"``, ``"heun"``, ``"dpm++"`` or a Sampler; None (default) is
          ``"dpm++"``, or for a flow denoiser ``"euler"`` (:meth:`get_sampler`).
        - ``seed`` or ``generator`` (one, or a list with one per image; image i then depends on generator i only):
          the same seed gives the same images. With neither, the noise comes from torch's global random state.
        - ``callback(i, t, latents, x0_pred)`` after each step, as in :func:`sdlearn.samplers.sample` (a tensor
          it returns replaces the latents).
        - ``guidance_interval`` ``(t_low, t_high)``: guide only at timesteps in that range, and use the conditional
          prediction elsewhere (Kynkäänniemi et al. 2024: guidance at the highest noise levels collapses the
          variety of what a prompt leaves open, and at the lowest it does little). None: the pipeline's
          ``guidance_interval`` attribute; ``(0, T)`` guides at every step.
        - ``latents`` ``[N, 4, 8, 8]``: the starting x_T in place of drawn noise. As in diffusers, they are
          multiplied by ``sampler.init_noise_sigma`` exactly as drawn noise is (1 for DDIM, DDPM, DPM++ and the flow
          samplers), so ``pipe(prompt, latents=pipe.invert(image, prompt), sampler="ddim")`` with the same steps
          regenerates the image. Then ``seed``/``generator`` matter only to a stochastic sampler (DDPM).
        - ``control_image`` ``[N, 1, 32, 32]`` or one ``[1, 32, 32]`` for all, in [0, 1] (an edge map,
          :func:`sdlearn.control.edge_map`): steers the layout through the attached :attr:`controlnet` (Zhang et al.
          2023), whose residuals, times ``controlnet_conditioning_scale``, are added to the denoiser's blocks.
        """
        prompts, negatives, steps, w, solver, generator, k = self._prepare(
            prompt, negative_prompt, num_inference_steps, guidance_scale, sampler, generator, seed, num_images_per_prompt)
        n = len(prompts) * k
        if latents is not None:
            latents = self._check_latents(latents, n)
        control = self._check_control(control_image, n, controlnet_conditioning_scale)
        model_fn = self._model_fn(prompts, negatives, w, k, guidance_interval, control,
                                  float(controlnet_conditioning_scale))
        latents = self._denoise(model_fn, solver, steps, generator, n, progress, callback, latents=latents)
        return self.decode_latents(latents)

    # -- image → image and inpainting --------------------------------------------------------------------

    def _check_image(self, image) -> torch.Tensor:
        if isinstance(image, torch.Tensor) and not image.is_floating_point():
            raise ValueError(f"image must be a floating-point tensor in [-1, 1], got dtype {image.dtype} "
                             "(for uint8 pixels use x / 127.5 - 1)")
        check_batch(image, self.image_shape, "image", "image", finite=True)
        if image.min() < -1.001 or image.max() > 1.001:
            raise ValueError(f"image values must lie in [-1, 1], got {image.min().item():.3g}..{image.max().item():.3g}"
                             " (for images in [0, 1] use 2 * x - 1)")
        return image.to(torch.float32)

    @staticmethod
    def _pair(prompts: list[str], negatives: list[str], images: torch.Tensor):
        """Match P prompts with B images: one of them may be 1 and is repeated; otherwise P must equal B."""
        P, B = len(prompts), images.shape[0]
        if P == B:
            return prompts, negatives, images
        if P == 1:
            return prompts * B, negatives * B, images
        if B == 1:
            return prompts, negatives, images.expand(P, *images.shape[1:])
        raise ValueError(f"got {P} prompts for {B} images; give one prompt, one image, or as many prompts as images")

    @torch.no_grad()
    def img2img(self, prompt: str | list[str], image: torch.Tensor, strength: float = 0.6, **kwargs) -> torch.Tensor:
        """SDEdit (Meng et al. 2022): ``image`` ``[B, 3, 32, 32]`` in [-1, 1] → images ``[N, 3, 32, 32]``.

        The image is encoded (posterior mode, times the scaling factor), noised with the sampler's own
        ``add_noise`` to the timestep ``strength`` of the way up its schedule, and denoised from there, so only
        ⌊``num_inference_steps`` · strength⌋ steps run. ``strength`` ∈ [0, 1]: 0 returns the VAE's reconstruction
        of the image, 1 starts from (almost) pure noise. Prompts and images pair up (one may be a single one);
        the keyword arguments are those of ``pipe(...)``."""
        strength = _check_strength(strength)
        image = self._check_image(image)
        prompts, negatives, steps, w, solver, generator, k = self._prepare(prompt, **self._common(kwargs))
        prompts, negatives, image = self._pair(prompts, negatives, image)
        latents = self.encode_image(image).repeat_interleave(k, dim=0)  # [N, 4, 8, 8]
        model_fn = self._model_fn(prompts, negatives, w, k, kwargs.get("guidance_interval"))
        latents = self._denoise(model_fn, solver, steps, generator, len(latents), kwargs.get("progress", True),
                                kwargs.get("callback"), x0=latents, strength=strength)
        return self.decode_latents(latents)

    # -- inversion and editing ----------------------------------------------------------------------------

    def _inversion_sampler(self, steps: int) -> Sampler:
        """The deterministic sampler that inversion runs backwards, with its timesteps set for ``steps``: DDIM
        (η = 0) for a diffusion denoiser, flow Euler for a flow denoiser."""
        solver = self.get_sampler("euler" if self.is_flow else "ddim")
        solver.set_timesteps(steps)
        return solver

    def _step_up(self, solver: Sampler, i: int, model_output: torch.Tensor, x_at: torch.Tensor,
                 x_low: torch.Tensor) -> torch.Tensor:
        """The latents at entry ``i`` of ``solver.timesteps`` from ``x_low``, those one sampling step below it,
        given the model's output at ``x_at`` (≈ the unknown latents) and timestep ``timesteps[i]``.

        DDIM: the step x_t → x_s (Song et al. 2021, eq. 12, η = 0) read from s up to t: with ε̂ taken as known,
        x̂₀ = (x_s − √(1 − ᾱ_s) ε̂) / √ᾱ_s and x_t = √ᾱ_t x̂₀ + √(1 − ᾱ_t) ε̂. Flow Euler: x_{σ_i} = x_{σ_{i+1}} +
        (σ_i − σ_{i+1}) v̂."""
        if self.is_flow:
            return x_low + (solver.sigmas[i] - solver.sigmas[i + 1]).to(x_low) * model_output
        t = int(solver.timesteps[i])
        s = t - solver.num_train_timesteps // solver.num_inference_steps  # as DDIMSampler.step's t_prev
        alpha_t = solver.alphas_cumprod[t]
        alpha_s = solver.alphas_cumprod[s] if s >= 0 else solver.final_alpha_cumprod
        _, eps = convert_prediction(model_output, alpha_t, x_at, solver.prediction_type)
        x0 = (x_low - (1 - alpha_s).sqrt() * eps) / alpha_s.sqrt()
        return alpha_t.sqrt() * x0 + (1 - alpha_t).sqrt() * eps

    def _invert_latents(self, latents: torch.Tensor, model_fn: Callable, solver: Sampler, stop: int,
                        fixed_point_iterations: int, progress: bool) -> torch.Tensor:
        """Clean latents → the latents at entry ``stop`` of ``solver.timesteps`` (0: x_T), walking the sampler's
        grid backwards. The model is read at the step's upper timestep with the latents below it, ε(x_t, t) ≈
        ε(x_s, t), as diffusers' DDIMInverseScheduler does; each of ``fixed_point_iterations`` re-reads it at the
        latest estimate of x_t (Pan et al. 2023, "Effective real image editing with accelerated iterative
        diffusion inversion"), which converges to the x_t that the sampling step maps back to x_s exactly."""
        indices = range(len(solver.timesteps) - 1, stop - 1, -1)
        for i in tqdm(indices, desc=f"{solver.name} inversion", disable=not progress, leave=False):
            t, x = solver.timesteps[i], latents
            for _ in range(1 + fixed_point_iterations):
                x = self._step_up(solver, i, model_fn(x, t), x, latents)
            latents = x
        return latents

    def _regenerate(self, latents: torch.Tensor, model_fn: Callable, solver: Sampler, start: int,
                    progress: bool) -> torch.Tensor:
        """Sample from ``latents`` at entry ``start`` of ``solver.timesteps`` (its timesteps already set) down to
        the clean latents."""
        for t in tqdm(solver.timesteps[start:], desc=solver.name, disable=not progress, leave=False):
            latents = solver.step(model_fn(latents, t), t, latents)
        return latents

    @staticmethod
    def _check_iterations(fixed_point_iterations) -> int:
        if isinstance(fixed_point_iterations, bool) or not isinstance(fixed_point_iterations, (int, np.integer)) \
                or fixed_point_iterations < 0:
            raise ValueError(f"fixed_point_iterations must be a whole number ≥ 0 (0 = plain DDIM inversion), "
                             f"got {fixed_point_iterations!r}")
        return int(fixed_point_iterations)

    @torch.no_grad()
    def invert(self, image: torch.Tensor, prompt: str | list[str], num_inference_steps: int = 20,
               guidance_scale: float = 1.0, negative_prompt: str | list[str] | None = None, progress: bool = True,
               guidance_interval: tuple[float, float] | None = None, fixed_point_iterations: int = 0) -> torch.Tensor:
        """DDIM inversion: ``image`` ``[B, 3, 32, 32]`` in [-1, 1] → the latents x_T ``[N, 4, 8, 8]`` from which
        ``pipe(prompt, latents=x_T, sampler="ddim", num_inference_steps=..., guidance_scale=...)`` (same steps,
        prompt and guidance) regenerates it. N = max(B, number of prompts); they pair up as in :meth:`img2img`.

        The image is encoded (the posterior's mean, deterministic) and DDIM with η = 0, an ODE solver, is run
        backwards over the timesteps the DDIM sampler walks for ``num_inference_steps`` (Song et al. 2021, §4.3 and
        eq. 12 read from t to t + Δ). A flow denoiser runs its Euler sampler backwards instead; regenerate with
        ``sampler="euler"``. The inversion is exact only where ε changes little over one step; at
        ``guidance_scale`` > 1 the guided ε amplifies that error step after step, so the image drifts (Mokady et al.
        2023, "Null-text inversion", §3): invert and regenerate at guidance 1 to reconstruct.
        ``fixed_point_iterations`` > 0 refines each step (see :meth:`_invert_latents`) at that many extra model
        calls a step."""
        steps = _check_steps(num_inference_steps)
        iterations = self._check_iterations(fixed_point_iterations)
        image = self._check_image(image)
        prompts, negatives, _, w, _, _, _ = self._prepare(prompt, negative_prompt, steps, guidance_scale, None,
                                                          None, None, 1)
        prompts, negatives, image = self._pair(prompts, negatives, image)
        solver = self._inversion_sampler(steps)
        model_fn = self._model_fn(prompts, negatives, w, 1, guidance_interval)
        return self._invert_latents(self.encode_image(image), model_fn, solver, 0, iterations, progress)

    @torch.no_grad()
    def edit(self, image: torch.Tensor, source_prompt: str | list[str], target_prompt: str | list[str],
             num_inference_steps: int = 20, guidance_scale: float = 2.0, strength: float = 1.0,
             negative_prompt: str | list[str] | None = None, progress: bool = True,
             guidance_interval: tuple[float, float] | None = None, fixed_point_iterations: int = 1) -> torch.Tensor:
        """Change what ``target_prompt`` changes in ``image`` ``[B, 3, 32, 32]``, keep the rest → images ``[N, 3, 32, 32]``.

        DDIM-inversion editing: the image is inverted with ``source_prompt`` (the caption it has) at guidance 1, the
        one setting at which inversion is (near) exact, and the latents are denoised by DDIM with ``target_prompt``
        (the caption with one attribute changed) at ``guidance_scale``. Starting from the image's own x_T keeps
        its layout and background; the target's guided prediction changes the attribute. Guidance 1 may leave the
        source's attribute (the inverted x_T still encodes it); a large guidance drifts away from the inverted
        path (Mokady et al. 2023, §3) and changes what should stay, so the default is a modest 2.

        ``strength`` ∈ (0, 1]: invert only ⌊steps · strength⌋ steps, to t ≈ strength·T, and regenerate from there
        (SDEdit, Meng et al. 2022, started from the inverted latents instead of fresh noise): smaller keeps more,
        and may not change the attribute; 0 returns the VAE's reconstruction. ``negative_prompt``: the
        unconditional prompt of the regeneration's guidance ("" by default; the source prompt gives
        Miyake et al.'s 2023 "negative-prompt inversion" direction, ε_src + w (ε_tgt − ε_src)).
        Prompts pair up with images as in :meth:`img2img`; source and target prompts as lists must be as long.
        ``fixed_point_iterations`` as in :meth:`invert`, but 1 by default here: plain DDIM inversion's small error
        per step is harmless for a reconstruction, yet the x_T it ends at can hold the source's layout so firmly
        that a target naming another size still regenerates the old one; one extra model call per inversion step
        (Pan et al. 2023) takes most of that error away. 0 is plain DDIM inversion."""
        steps = _check_steps(num_inference_steps)
        strength = _check_strength(strength)
        iterations = self._check_iterations(fixed_point_iterations)
        image = self._check_image(image)
        sources, targets = _prompt_list(source_prompt, "source_prompt"), _prompt_list(target_prompt, "target_prompt")
        if len(sources) != len(targets):
            if len(sources) != 1 and len(targets) != 1:
                raise ValueError(f"got {len(sources)} source prompts and {len(targets)} target prompts; give as "
                                 "many of each, or one of either")
            sources, targets = (sources * len(targets), targets) if len(sources) == 1 else (sources, targets * len(sources))
        targets, negatives, _, w, _, _, _ = self._prepare(targets, negative_prompt, steps, guidance_scale, None,
                                                          None, None, 1)
        sources, _, _ = self._pair(sources, sources, image)
        targets, negatives, image = self._pair(targets, negatives, image)
        latents = self.encode_image(image)  # [N, 4, 8, 8]
        steps_run = int(steps * strength)
        if steps_run == 0:
            return self.decode_latents(latents)
        start = steps - steps_run  # the entry of the sampler's timesteps that inversion stops at
        inversion = self._model_fn(sources, [""] * len(sources), 1.0, 1)
        latents = self._invert_latents(latents, inversion, self._inversion_sampler(steps), start, iterations, progress)
        model_fn = self._model_fn(targets, negatives, w, 1, guidance_interval)
        return self.decode_latents(self._regenerate(latents, model_fn, self._inversion_sampler(steps), start, progress))

    def _check_mask(self, mask, batch: int) -> torch.Tensor:
        _, H, W = self.image_shape
        expected = f"[B, 1, {H}, {W}] or [1, {H}, {W}] (the image's size), 1 where to repaint, 0 where to keep"
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"mask must be a tensor {expected}, got {type(mask).__name__}")
        mask = mask.to(torch.float32)
        if mask.dim() == 3:
            mask = mask[None]
        if mask.dim() != 4 or mask.shape[1] != 1:
            raise ValueError(f"mask must be {expected}; got shape {list(mask.shape)}")
        if tuple(mask.shape[2:]) != (H, W):
            raise ValueError(f"the mask is {mask.shape[2]}×{mask.shape[3]} but the image is {H}×{W}; mask must be {expected}")
        if mask.shape[0] not in (1, batch):
            raise ValueError(f"got {mask.shape[0]} masks for {batch} images; give one mask, or one per image")
        if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
            raise ValueError(f"mask values must lie in [0, 1] (1 = repaint, 0 = keep), got "
                             f"{mask.min().item():.3g}..{mask.max().item():.3g}")
        return mask.expand(batch, -1, -1, -1)

    @torch.no_grad()
    def inpaint(self, prompt: str | list[str], image: torch.Tensor, mask: torch.Tensor, paste_unmasked: bool = True,
                **kwargs) -> torch.Tensor:
        """Repaint the masked part of ``image`` ``[B, 3, 32, 32]`` → images ``[N, 3, 32, 32]``.

        ``mask`` ``[B, 1, 32, 32]`` or ``[1, 32, 32]``: 1 = repaint, 0 = keep (values in between blend). The mask
        is max-pooled to the latent grid; after each step the kept latent cells are reset to the encoded image
        noised to the current noise level, after the last step to the encoded image itself (see the module's
        docstring). With ``paste_unmasked`` the kept pixels are finally copied from ``image``:
        out = mask · generated + (1 − mask) · image. The keyword arguments are those of ``pipe(...)``."""
        image = self._check_image(image)
        prompts, negatives, steps, w, solver, generator, k = self._prepare(prompt, **self._common(kwargs))
        prompts, negatives, image = self._pair(prompts, negatives, image)
        mask = self._check_mask(mask, image.shape[0]).repeat_interleave(k, dim=0)  # [N, 1, 32, 32]
        image = image.repeat_interleave(k, dim=0)  # [N, 3, 32, 32]
        known = self.encode_image(image)  # [N, 4, 8, 8]
        factor = self.image_shape[1] // self.latent_shape[1]
        repaint = F.max_pool2d(mask, factor).to(self.device)  # [N, 1, 8, 8]: 1 where a cell is repainted
        model_fn = self._model_fn(prompts, negatives, w, k, kwargs.get("guidance_interval"))
        noise = _draw_noise(known.shape, generator, self.device)  # [N, 4, 8, 8], x_T and the re-noising
        user_callback = kwargs.get("callback")

        def blend(i, t, x, x0_pred):
            if i + 1 < len(solver.timesteps):  # x is now at the noise level of timesteps[i + 1]
                reference = solver.add_noise(known, noise, solver.timesteps[i + 1])
            else:  # the last step has landed on clean latents
                reference = known
            x = repaint * x + (1 - repaint) * reference
            if user_callback is not None:
                replaced = user_callback(i, t, x, x0_pred)
                x = x if replaced is None else replaced
            return x

        latents = sample(model_fn, solver, noise.shape, steps, generator=generator,
                         progress=kwargs.get("progress", True), callback=blend, noise=noise)
        images = self.decode_latents(latents)
        if paste_unmasked:
            mask = mask.to(images.device)
            images = mask * images + (1 - mask) * image.to(images.device)
        return images

    _COMMON = ("negative_prompt", "num_inference_steps", "guidance_scale", "sampler", "generator", "seed",
               "num_images_per_prompt")

    @classmethod
    def _common(cls, kwargs: dict) -> dict:
        unknown = set(kwargs) - set(cls._COMMON) - {"progress", "callback", "guidance_interval"}
        if unknown:
            raise ValueError(f"unknown keyword argument(s) {', '.join(sorted(unknown))}; expected some of "
                             f"{', '.join(cls._COMMON + ('progress', 'callback', 'guidance_interval'))}")
        defaults = {"negative_prompt": None, "num_inference_steps": 20, "guidance_scale": 4.0, "sampler": None,
                    "generator": None, "seed": None, "num_images_per_prompt": 1}
        return {name: kwargs.get(name, default) for name, default in defaults.items()}
