"""The denoiser's training data: VAE latents of an endless stream of Shapes scenes, each with a fresh random
caption at every use (:func:`latent_batch_fn`, the ``batch_fn`` of :func:`sdlearn.recipes.train_denoiser`, of
the U-Net's and the flow model's recipes and of the few-step student's).

- :class:`LatentWindow`: the latents of a sliding window over the stream, a pure function of the step;
- :func:`random_captions`: a caption true of each scene (:func:`sdlearn.captions.random_caption`);
- :func:`latent_batch_fn`: a batch of clean latents, noise, timesteps and the frozen text tower's reading of
  the captions, a pure function of ``(seed, step)`` (:func:`sdlearn.training.step_generator`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sdlearn.data import ATTRIBUTE_VALUES, ATTRIBUTES, MAX_OBJECTS, ShapesDataset, random_caption
from sdlearn.schedules import check_timestep_sampling, training_timesteps
from sdlearn.training import step_generator

DENOISER_DATA_SEED = 40_000  # the endless stream of training images: ShapesDataset(2**40, "train", seed=40_000 + seed)
LATENT_WINDOW = 16_384  # images whose latents are held in memory at a time
LATENT_REFRESH = 16  # of them, replaced by fresh images at every step


class LatentWindow:
    """VAE latents of a sliding window over an endless, deterministic stream of Shapes images.

    Image number ``i`` of the stream is item ``i`` of ``ShapesDataset(2**40, split, seed)``. At step ``s`` the
    window holds images ``[s·r, s·r + size)`` — image ``i`` in slot ``i % size`` — so each step encodes only
    the ``r`` images that enter (``refresh``), each image stays for ``size / r`` steps, and the window at any
    step is a pure function of that step: a resumed run rebuilds exactly the window it left.

    Per image the window keeps the posterior's mean and standard deviation ``[size, 4, 8, 8]`` (the VAE's
    posterior is narrow: σ ≈ 0.005 against a latent std of ≈ 0.83) and each object's four attribute indices
    ``[size, 2, 4]`` (-1 where there is no second object), from which a fresh caption is drawn at every use.
    ``refresh=size`` re-encodes the whole window at every step. ``num_objects`` as in
    :class:`~sdlearn.data.ShapesDataset`.
    """

    def __init__(self, vae, size: int, refresh: int, split: str, seed: int, num_objects=(1, 2)):
        if not 1 <= refresh <= size:
            raise ValueError(f"the latent window must refresh between 1 and {size} images per step, got {refresh}")
        self.vae, self.size, self.refresh = vae, size, refresh
        self.stream = ShapesDataset(2**40, split, seed=seed, num_objects=num_objects)
        device = next(vae.parameters()).device
        shape = (size, *vae.latent_shape)
        self.mean = torch.zeros(shape, device=device)  # [W, 4, 8, 8]
        self.std = torch.zeros(shape, device=device)
        self.objects = torch.full((size, MAX_OBJECTS, len(ATTRIBUTES)), -1, dtype=torch.long)  # [W, 2, 4] indices
        self.step: int | None = None  # the step whose window is held

    @torch.no_grad()
    def _encode(self, first: int, count: int, chunk: int = 256) -> None:
        """Render, encode and store stream images ``first … first + count − 1`` in their slots."""
        device = self.mean.device
        for start in range(first, first + count, chunk):
            ids = torch.arange(start, min(start + chunk, first + count))
            batch = self.stream.batch(ids)
            posterior = self.vae.encode(batch.images.to(device))
            slots = ids % self.size
            self.mean[slots.to(device)] = posterior.mean
            self.std[slots.to(device)] = posterior.std
            self.objects[slots] = torch.stack([batch.objects[k] for k in ATTRIBUTES], dim=2)  # [b, 2, 4]

    def at(self, step: int) -> LatentWindow:
        """Bring the window to ``step``: slide it by one step's images, or rebuild it (first call, resume)."""
        if self.step == step:
            return self
        if self.step is not None and step == self.step + 1:
            self._encode(self.size + self.step * self.refresh, self.refresh)
        else:
            self._encode(step * self.refresh, self.size)
        self.step = step
        return self


def random_captions(objects: torch.Tensor, generator: torch.Generator, open_fraction: float,
                     shared_open: float = 0.0, binding_fraction: float = 0.0) -> list[str]:
    """A random caption (:func:`sdlearn.data.random_caption`) for each scene of object indices ``[B, 2, 4]``."""
    scenes = [[{k: ATTRIBUTE_VALUES[k][i] for k, i in zip(ATTRIBUTES, obj)} for obj in row if obj[0] >= 0]
              for row in objects.tolist()]
    return [random_caption(scene, generator, open_fraction, shared_open=shared_open,
                           binding_fraction=binding_fraction)[0] for scene in scenes]


def latent_batch_fn(
    vae,
    schedule,
    batch_size: int,
    seed: int,
    *,
    text_encoder=None,
    tokenizer=None,
    caption_dropout: float = 0.1,
    open_fraction: float = 0.5,
    window: int = LATENT_WINDOW,
    refresh: int = LATENT_REFRESH,
    split: str = "train",
    num_objects=(1, 2),
    timesteps: str = "uniform",
    shared_open: float = 0.0,
    binding_fraction: float = 0.0,
) -> Callable[[int], dict[str, torch.Tensor]]:
    """``batch_fn(step)`` for the denoiser: a dict of the clean latent ``x0`` ``[B, 4, 8, 8]`` (a posterior sample,
    times the VAE's scaling factor), the ``noise`` ``[B, 4, 8, 8]`` and timesteps ``t`` ``[B]`` (uniform in
    [0, T)) to noise it with, and — with a ``text_encoder`` — the frozen tower's ``tokens`` ``[B, L, D]`` and
    ``mask`` ``[B, L]`` of a fresh random caption per image (:func:`sdlearn.data.random_caption`: a fraction
    ``open_fraction`` leave attributes open, so an image teaches every partial prompt true of it), replaced
    by the empty prompt "" (``<bos> <eos>``, the unconditional prompt of classifier-free guidance) with
    probability ``caption_dropout``. Images are scenes of ``num_objects`` (default: one or two, half each).
    ``timesteps``: "logit_normal" for a flow model, "flow_matched" (adds a loss ``weight`` ``[B]``), see
    :func:`sdlearn.schedules.training_timesteps`. ``shared_open``, ``binding_fraction``: as :func:`sdlearn.data.random_caption`'s. ``captions`` lists the prompts used (the empty ones included). A pure
    function of ``(seed, step)``."""
    check_timestep_sampling(timesteps)
    latents = LatentWindow(vae, window, refresh, split, DENOISER_DATA_SEED + seed, num_objects)
    scale = vae.scaling_factor

    def batch_fn(step: int) -> dict[str, torch.Tensor]:
        generator = step_generator(seed, step)
        cache = latents.at(step)
        picks = torch.randint(cache.size, (batch_size,), generator=generator)  # [B]
        device = cache.mean.device
        eps = torch.randn((batch_size, *cache.mean.shape[1:]), generator=generator).to(device)
        # z ~ q(z | x), as Stable Diffusion samples it, then scaled to unit variance (Rombach et al. 2022, §4.3.2)
        x0 = (cache.mean[picks.to(device)] + cache.std[picks.to(device)] * eps) * scale  # [B, 4, 8, 8]
        batch = {"x0": x0, "noise": torch.randn(x0.shape, generator=generator).to(device)}
        batch["t"], weight = training_timesteps(timesteps, schedule, batch_size, generator)  # [B]: t, or σT for a flow
        if weight is not None:
            batch["weight"] = weight  # [B]
        if text_encoder is not None:
            captions = random_captions(cache.objects[picks], generator, open_fraction, shared_open, binding_fraction)
            dropped = (torch.rand(batch_size, generator=generator) < caption_dropout).tolist()
            captions = ["" if drop else caption for caption, drop in zip(captions, dropped)]
            ids, mask = tokenizer(captions)  # [B, 21] each
            length = int(mask.sum(1).max())  # the padding beyond the longest caption changes nothing: drop it
            with torch.no_grad():
                encoding = text_encoder(ids[:, :length].to(device), mask[:, :length].to(device))
            batch.update(tokens=encoding.tokens, mask=encoding.mask, captions=captions)
        return batch

    batch_fn.window = latents
    return batch_fn
