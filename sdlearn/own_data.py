"""Your own captioned images, end to end: ``python -m sdlearn train all --data FOLDER`` (the README's "Command line" section).

A folder of images with ``captions.jsonl`` (read by :class:`sdlearn.images.ImageFolderDataset`: one JSON line
``{"file": "a.png", "caption": "a green stripe"}`` per image, ``file`` relative to the folder) is trained into the
whole text-to-image system, the same models as on Shapes, in one folder that ``python -m sdlearn generate
--weights OUT`` reads:

1. the VAE (:func:`sdlearn.recipes.train_vae` with ``data=FOLDER``) → ``vae.*``;
2. the text tower: a :class:`~sdlearn.text.TinyCLIP` whose tokenizer knows the words of the captions
   (:func:`caption_vocabulary`), trained with CLIP's contrastive loss over the folder's (image, caption) pairs
   (:func:`train_clip_on_folder`) → ``clip.*``; ``clip.json`` keeps the vocabulary (``"tokenizer"``), so that
   loading restores it;
3. the denoiser, on latents of *this* VAE, conditioned by *this* text tower (:func:`train_denoiser_on_folder`)
   → ``denoiser.*``.

What only makes sense for Shapes is skipped, and the run says so in one line (:data:`SKIPPED_FOR_A_FOLDER`): the
scene reader and the attribute classifier read Shapes scenes (five places, eight colours, four shapes), so they
cannot judge your images, and the prompt-accuracy evaluation needs such a judge. A folder has no held-out
images either: what is recorded (the VAE's PSNR, the caption retrieval of the text tower) is measured on the
training images, so it says how well the folder was fitted, not how well that generalises.

Decisions, written down:

- **Images** are read at the course's 32×32 (centre-cropped and resized), so every model keeps the
  architecture it has on Shapes.
- **The tokenizer** is word-level, as for Shapes (:func:`sdlearn.data.split_words`: lower case, the letters a–z;
  everything else separates words). Its vocabulary is every word of the captions, sorted; its ``max_length``
  is the longest caption's words + 2 (``<bos>`` and ``<eos>``), at most :data:`MAX_TOKENS` = 77, CLIP's
  context length. A caption without a word, or with more words than fit, is refused, naming its image.
- **Contrastive batches** hold distinct images of the folder. A folder often repeats a caption, so captions of
  the same words all count as true of each of their images (:func:`sdlearn.text.soft_contrastive_loss`), not as
  negatives.
- **The denoiser's latents**: every image is encoded once (posterior mean and standard deviation, ``[N, 4, 8,
  8]`` each: 2 KB an image), and each step draws z ~ q(z | x) from them, times the scaling factor, as
  :func:`sdlearn.denoiser_data.latent_batch_fn` does for Shapes; the caption is replaced by the empty prompt with
  probability ``caption_dropout`` (classifier-free guidance, Ho & Salimans 2022).
- **Budget**: ``train_all_on_folder``'s ``minutes`` (default 30) is split by :data:`FOLDER_SPLIT`, VAE 10%,
  text tower 10%, denoiser 80%; ``steps`` caps each stage. Each stage resumes from its checkpoint in ``out_dir``.
  Under ``torchrun`` every stage trains with DistributedDataParallel (:func:`sdlearn.training.train`), each rank
  drawing its own batches, rank 0 writing the files.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from sdlearn.checkpoint import atomic_write_bytes, file_sha256
from sdlearn.checks import check_positive_int
from sdlearn.data import split_words
from sdlearn.denoiser import Denoiser, DenoiserConfig, denoiser_loss
from sdlearn.images import ImageFolderDataset
from sdlearn.pipeline import check_compatible
from sdlearn.pretrained import load_pipeline, resolve_text_encoder, resolve_vae, save_clip, save_denoiser
from sdlearn.recipes import (
    SHORT_RECIPE,
    command_line,
    default_budget,
    finish,
    fit,
    train_vae,
    training_record,
)
from sdlearn.schedules import NoiseSchedule, check_prediction_type
from sdlearn.text import TextEncoderConfig, TinyCLIP, TinyCLIPConfig, Tokenizer, clip_loss
from sdlearn.training import TrainResult, init_distributed, is_main_process, resolve_device, step_generator

CAPTIONS_FILE = "captions.jsonl"
FOLDER_IMAGE_SIZE = 32  # the course's scale: every model keeps its Shapes architecture
MAX_TOKENS = 77  # CLIP's context length (Radford et al. 2021): a caption holds at most 75 words
FOLDER_SPLIT = {"vae": 0.10, "clip": 0.10, "denoiser": 0.80}  # train_all_on_folder's split of the time budget
SKIPPED_FOR_A_FOLDER = ("skipped for a folder of your own: the scene reader, the attribute classifier and the "
                        "prompt-accuracy evaluation (they read Shapes scenes only)")

# ------------------------------------------------------------------------------------------------
# The folder, its captions and their vocabulary


def read_captioned_folder(folder: str | os.PathLike | ImageFolderDataset) -> ImageFolderDataset:
    """The folder's images (32×32) and captions (``FOLDER/captions.jsonl``), checked for text-to-image training: a
    missing folder or captions file, no images, an image without a caption (all :class:`ImageFolderDataset`'s
    checks), an empty caption, a caption longer than :data:`MAX_TOKENS` tokens, or fewer than two images (a
    contrastive batch needs a negative) raise one ``ValueError``/``FileNotFoundError`` that names the problem.
    A dataset already read is checked and returned."""
    dataset = folder if isinstance(folder, ImageFolderDataset) else ImageFolderDataset(
        folder, size=FOLDER_IMAGE_SIZE, captions=CAPTIONS_FILE)
    if dataset.size != FOLDER_IMAGE_SIZE:
        raise ValueError(f"the folder's images must be read at {FOLDER_IMAGE_SIZE}×{FOLDER_IMAGE_SIZE}, "
                         f"got size={dataset.size}")
    where = str(dataset.root / CAPTIONS_FILE)
    room = MAX_TOKENS - 2
    for name in dataset.files:
        caption = dataset.captions[name]
        words = split_words(caption)
        if not words:
            what = "empty" if not caption.strip() else f"{caption!r}, which has no word (letters a-z)"
            raise ValueError(f"{where!r}: the caption of {name!r} is {what}; every image needs a caption of words")
        if len(words) > room:
            raise ValueError(f"{where!r}: the caption of {name!r} has {len(words)} words, more than the {room} that "
                             f"fit in the text tower's {MAX_TOKENS} tokens (with <bos> and <eos>); shorten it")
    if len(dataset) < 2:
        raise ValueError(f"{str(dataset.root)!r} holds 1 image; the text tower learns by telling captions apart, "
                         "so it needs at least 2 (a few dozen or more to learn anything)")
    return dataset


def folder_captions(dataset: ImageFolderDataset) -> list[str]:
    """The captions in the order of ``dataset.files`` (caption i is image i's)."""
    return [dataset.captions[name] for name in dataset.files]


def caption_vocabulary(captions: Sequence[str]) -> list[str]:
    """Every word of ``captions`` (:func:`sdlearn.data.split_words`), sorted: the folder tokenizer's vocabulary."""
    return sorted({word for caption in captions for word in split_words(caption)})


def folder_tokenizer(dataset: ImageFolderDataset) -> Tokenizer:
    """The word-level :class:`Tokenizer` of the folder's captions: :func:`caption_vocabulary`, and room for the
    longest caption with ``<bos>`` and ``<eos>``."""
    captions = folder_captions(dataset)
    longest = max(len(split_words(caption)) for caption in captions)
    return Tokenizer(caption_vocabulary(captions), max_length=longest + 2)


def folder_pixels(dataset: ImageFolderDataset) -> torch.Tensor:
    """Every image of the folder, read once → uint8 ``[N, 3, 32, 32]`` (3 KB an image; exact: the images are
    8-bit, read as x / 127.5 − 1). :func:`to_unit_range` turns a batch back into floats in [-1, 1]."""
    images = [dataset[i]["image"] for i in range(len(dataset))]  # each [3, 32, 32] in [-1, 1]
    return ((torch.stack(images) + 1) * 127.5).round().to(torch.uint8)  # [N, 3, 32, 32]


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels ``[B, 3, H, W]`` → float32 in [-1, 1]."""
    return pixels.float() / 127.5 - 1


def caption_groups(captions: Sequence[str]) -> torch.Tensor:
    """One label per caption ``[N]``: equal for captions of the same words ("A cat." and "a cat")."""
    labels: dict[tuple[str, ...], int] = {}
    return torch.tensor([labels.setdefault(tuple(split_words(c)), len(labels)) for c in captions])


def _captions_sha256(dataset: ImageFolderDataset) -> str:
    return file_sha256(dataset.root / CAPTIONS_FILE)


# ------------------------------------------------------------------------------------------------
# The text tower: TinyCLIP on the folder's (image, caption) pairs


def folder_clip_batch_fn(pixels: torch.Tensor, captions: Sequence[str], tokenizer: Tokenizer, batch_size: int,
                         seed: int) -> Callable[[int], dict[str, torch.Tensor]]:
    """``batch_fn(step)`` for :func:`sdlearn.text.clip_loss`: ``batch_size`` distinct images of the folder, their
    captions as ``ids``/``mask`` ``[B, L]``, and ``positives`` ``[B, B]``, caption j true of image i when the two
    captions have the same words. A pure function of ``(seed, step)``."""
    groups = caption_groups(captions)  # [N]

    def batch_fn(step: int) -> dict[str, torch.Tensor]:
        generator = step_generator(seed, step)
        picks = torch.randperm(len(pixels), generator=generator)[:batch_size]  # [B] distinct images
        ids, mask = tokenizer([captions[i] for i in picks.tolist()])  # [B, L] each
        labels = groups[picks]
        return {"images": to_unit_range(pixels[picks]), "ids": ids, "mask": mask,
                "positives": labels[:, None] == labels[None, :]}  # [B, B]

    return batch_fn


@torch.no_grad()
def folder_retrieval_accuracy(clip: TinyCLIP, pixels: torch.Tensor, captions: Sequence[str],
                              tokenizer: Tokenizer) -> float:
    """The fraction of the folder's images whose most similar caption, among the folder's distinct captions, is
    their own (or one of the same words): zero-shot classification of the training images into their captions."""
    groups = caption_groups(captions)  # [N]
    first = {}
    for i, label in enumerate(groups.tolist()):
        first.setdefault(label, i)
    distinct = [captions[first[label]] for label in range(len(first))]  # caption of label k at k
    device = clip.logit_scale.device
    text_emb = torch.cat([clip.embed_prompts(distinct[i:i + 512], tokenizer) for i in range(0, len(distinct), 512)])
    image_emb = torch.cat([clip.encode_image(to_unit_range(chunk).to(device)) for chunk in pixels.split(512)])
    best = (image_emb @ text_emb.T).argmax(dim=1).cpu()  # [N] label of the most similar caption
    return (best == groups).float().mean().item()


def train_clip_on_folder(
    data: str | os.PathLike | ImageFolderDataset,
    out_dir: str | os.PathLike | None = None,
    minutes: float | None = None,
    steps: int | None = None,
    device: str | torch.device = "auto",
    *,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    precision: str = "fp32",
    progress: bool = True,
    resume: bool = True,
):
    """Train a :class:`TinyCLIP` on the folder ``data`` → ``(clip, result)``; ``python -m sdlearn train clip --data
    FOLDER``. Its tokenizer's vocabulary is the words of the captions (:func:`folder_tokenizer`), and the text
    tower's size is TinyCLIP's default, with as many tokens and positions as that tokenizer has.

    Data: ``batch_size`` distinct images per step (fewer when the folder is smaller), each with its caption
    (:func:`folder_clip_batch_fn`). Loss: :func:`sdlearn.text.clip_loss` (the symmetric contrastive loss, a
    caption true of every image it was written for). AdamW (weight decay 0.01 on matrices), 100 warm-up steps,
    cosine decay; neither ``minutes`` nor ``steps``: 600 steps, as on Shapes. At the end,
    :func:`folder_retrieval_accuracy` on the folder. With ``out_dir``: the checkpoint ``clip_checkpoint.*`` and
    the weights ``clip.safetensors`` + ``clip.json`` (the vocabulary under ``"tokenizer"``), loadable by
    :func:`sdlearn.pretrained.load_clip` and :func:`sdlearn.pretrained.load_tokenizer`."""
    minutes, steps = default_budget(minutes, steps, default_steps=600)
    check_positive_int(batch_size, "batch_size")
    dataset = read_captioned_folder(data)
    device = resolve_device(device)
    tokenizer = folder_tokenizer(dataset)
    captions, pixels = folder_captions(dataset), folder_pixels(dataset)
    batch_size = min(batch_size, len(dataset))
    config = TinyCLIPConfig(text=TextEncoderConfig(vocab_size=tokenizer.vocab_size, max_length=tokenizer.max_length),
                            image_size=FOLDER_IMAGE_SIZE)
    out_dir = Path(out_dir) if out_dir is not None else None

    torch.manual_seed(seed)
    clip = TinyCLIP(config).to(device)
    decay = [p for p in clip.parameters() if p.dim() >= 2]  # no weight decay on gains, biases, the scale
    no_decay = [p for p in clip.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr)
    run_config = {"model": "clip", "clip_config": config.to_dict(), "data": str(dataset.root),
                  "captions_sha256": _captions_sha256(dataset), "batch_size": batch_size, "lr": lr, "seed": seed}
    result = fit("clip", clip, lambda model, batch, step: clip_loss(model, batch),
                 folder_clip_batch_fn(pixels, captions, tokenizer, batch_size, seed), run_config, out_dir=out_dir,
                 minutes=minutes, steps=steps, seed=seed, resume=resume, progress=progress, optimizer=optimizer,
                 precision=precision, **SHORT_RECIPE)
    clip.eval()
    retrieval = folder_retrieval_accuracy(clip, pixels, captions, tokenizer)
    training = training_record(
        result, run_config, ("data", "captions_sha256", "batch_size", "lr", "seed"), device, steps, minutes,
        precision=precision, logit_scale=round(clip.scale().item(), 3), vocabulary_size=len(tokenizer.vocabulary),
        caption_retrieval_accuracy=round(retrieval, 4),
        eval_images=f"the folder's {len(dataset)} training images, each against its {int(caption_groups(captions).max()) + 1} "
                    "distinct captions (no held-out images)",
    )
    summary = (f"loss {result.final_loss:.3g}; {len(tokenizer.vocabulary)} words; its own caption is the nearest "
               f"for {retrieval:.1%} of the {len(dataset)} images")
    return finish("clip", clip, result, training, out_dir,
                  lambda model, path, training: save_clip(model, path, training=training, tokenizer=tokenizer),
                  summary, progress)


# ------------------------------------------------------------------------------------------------
# The denoiser on the folder's latents, conditioned by the folder's text tower


def folder_latent_batch_fn(vae, pixels: torch.Tensor, captions: Sequence[str], schedule: NoiseSchedule, batch_size: int,
                           seed: int, *, text_encoder, tokenizer: Tokenizer, caption_dropout: float = 0.1):
    """``batch_fn(step)`` for :func:`sdlearn.denoiser.denoiser_loss` on the folder: ``x0`` ``[B, 4, 8, 8]`` (a
    sample of q(z | x) of a random image, times the VAE's scaling factor), ``noise``, timesteps ``t`` ``[B]``
    uniform in [0, T), and the frozen text tower's ``tokens`` ``[B, L, D]`` and ``mask`` ``[B, L]`` of the image's
    caption, or of the empty prompt with probability ``caption_dropout``; ``captions`` lists the prompts used.
    Every image is encoded once, here. A pure function of ``(seed, step)``."""
    device = next(vae.parameters()).device
    with torch.no_grad():
        posteriors = [vae.encode(to_unit_range(chunk).to(device)) for chunk in pixels.split(256)]
    mean = torch.cat([p.mean for p in posteriors])  # [N, 4, 8, 8]
    std = torch.cat([p.std for p in posteriors])  # [N, 4, 8, 8]
    scale, T = vae.scaling_factor, schedule.num_train_timesteps

    def batch_fn(step: int) -> dict[str, Any]:
        generator = step_generator(seed, step)
        picks = torch.randint(len(mean), (batch_size,), generator=generator)  # [B]
        eps = torch.randn((batch_size, *mean.shape[1:]), generator=generator).to(device)
        x0 = (mean[picks.to(device)] + std[picks.to(device)] * eps) * scale  # [B, 4, 8, 8]
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = torch.randint(T, (batch_size,), generator=generator)  # [B]
        dropped = (torch.rand(batch_size, generator=generator) < caption_dropout).tolist()
        prompts = ["" if drop else captions[i] for i, drop in zip(picks.tolist(), dropped)]
        ids, mask = tokenizer(prompts)  # [B, max_length] each
        length = int(mask.sum(1).max())  # the padding beyond the longest prompt changes nothing: drop it
        with torch.no_grad():
            encoding = text_encoder(ids[:, :length].to(device), mask[:, :length].to(device))
        return {"x0": x0, "noise": noise, "t": t, "tokens": encoding.tokens, "mask": encoding.mask,
                "captions": prompts}

    return batch_fn


def train_denoiser_on_folder(
    data: str | os.PathLike | ImageFolderDataset,
    out_dir: str | os.PathLike | None = None,
    minutes: float | None = None,
    steps: int | None = None,
    device: str | torch.device = "auto",
    *,
    text_encoder: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
    prediction_type: str = "epsilon",
    schedule: str = "scaled_linear",
    batch_size: int = 128,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    caption_dropout: float = 0.1,
    seed: int = 0,
    checkpoint_every: int = 250,
    precision: str = "fp32",
    progress: bool = True,
    resume: bool = True,
):
    """Train the text-conditioned :class:`~sdlearn.denoiser.Denoiser` on the folder ``data`` → ``(denoiser,
    result)``, holding the EMA weights (eval mode). ``text_encoder`` and ``vae``: folders (or files) of a text
    tower trained on these captions (:func:`train_clip_on_folder`) and of a VAE; None means ``out_dir``, where
    :func:`train_all_on_folder` has just written them. A text tower that does not know some word of the
    captions is refused, naming the words.

    The recipe is :func:`sdlearn.recipes.train_denoiser`'s (ε-prediction by default, scaled-linear schedule,
    AdamW at ``lr`` with 200 warm-up steps and cosine decay, gradient clipping at 1, EMA ``ema_decay``, 10%
    caption dropout; neither ``minutes`` nor ``steps``: 45 minutes) on :func:`folder_latent_batch_fn`'s batches.
    With ``out_dir``: the checkpoint ``denoiser_checkpoint.*`` and the weights ``denoiser.*``
    (:func:`sdlearn.pretrained.load_denoiser`), which name the text tower they were trained with."""
    minutes, steps = default_budget(minutes, steps, default_minutes=45.0)
    check_positive_int(batch_size, "batch_size")
    check_prediction_type(prediction_type)
    if isinstance(caption_dropout, bool) or not isinstance(caption_dropout, (int, float)) or not 0 <= caption_dropout <= 1:
        raise ValueError(f"caption_dropout must be a probability in [0, 1], got {caption_dropout!r}")
    if (text_encoder is None or vae is None) and out_dir is None:
        raise ValueError("give out_dir, or both text_encoder and vae (folders of weights trained on this folder)")
    dataset = read_captioned_folder(data)
    device = resolve_device(device)
    noise_schedule = NoiseSchedule.from_name(schedule)
    text_encoder, tokenizer, text_record = resolve_text_encoder(out_dir if text_encoder is None else text_encoder, device)
    vae, vae_record = resolve_vae(out_dir if vae is None else vae, device)
    captions = folder_captions(dataset)
    unknown = sorted(set(caption_vocabulary(captions)) - set(tokenizer.vocabulary))
    if unknown:
        shown = ", ".join(repr(w) for w in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
        raise ValueError(f"the text tower of {text_record['source']!r} does not know {len(unknown)} word(s) of the "
                         f"captions ({shown}); train it on this folder first (python -m sdlearn train all --data FOLDER)")
    config = DenoiserConfig(prediction_type=prediction_type, text_dim=text_encoder.width)
    check_compatible(vae, text_encoder, tokenizer, config, noise_schedule)
    out_dir = Path(out_dir) if out_dir is not None else None

    batch_fn = folder_latent_batch_fn(vae, folder_pixels(dataset), captions, noise_schedule, batch_size, seed,
                                      text_encoder=text_encoder, tokenizer=tokenizer, caption_dropout=caption_dropout)
    torch.manual_seed(seed)
    denoiser = Denoiser(config).to(device)
    run_config = {
        "model": "denoiser", "denoiser_config": config.to_dict(), "schedule": schedule, "data": str(dataset.root),
        "captions_sha256": _captions_sha256(dataset), "text_encoder": text_record.get("sha256", text_record["source"]),
        "vae": vae_record.get("sha256", vae_record["source"]), "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay,
        "caption_dropout": caption_dropout, "seed": seed,
    }
    result = fit("denoiser", denoiser, lambda model, batch, step: denoiser_loss(model, batch, noise_schedule), batch_fn,
                 run_config, out_dir=out_dir, minutes=minutes, steps=steps, seed=seed, resume=resume,
                 progress=progress, lr=lr, warmup_steps=200, lr_schedule="cosine", grad_clip=1.0, ema_decay=ema_decay,
                 checkpoint_every=checkpoint_every, precision=precision)
    denoiser.raw_state_dict = {k: v.detach().clone() for k, v in denoiser.state_dict().items()}
    result.ema.copy_to(denoiser)
    denoiser.eval()
    training = training_record(
        result, run_config, ("data", "captions_sha256", "batch_size", "lr", "ema_decay", "caption_dropout", "seed"),
        device, steps, minutes, precision=precision, images_seen=result.step * batch_size,
        losses=[float(f"{loss:.4g}") for loss in result.losses], weights=f"EMA (decay {ema_decay}), stored as float16",
        vae=vae_record,
    )
    denoiser.schedule_name = schedule
    denoiser.text_encoder_info = text_record
    return finish("denoiser", denoiser, result, training, out_dir,
                  lambda model, path, training: save_denoiser(model, path, training=training, schedule=schedule,
                                                              text_encoder=text_record),
                  f"loss {result.final_loss:.4g}", progress)


# ------------------------------------------------------------------------------------------------
# python -m sdlearn train all --data FOLDER


def train_all_on_folder(
    data: str | os.PathLike,
    out_dir: str | os.PathLike = "runs/all",
    minutes: float | None = None,
    steps: int | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    progress: bool = True,
    *,
    prediction_type: str | None = None,
    precision: str = "fp32",
):
    """Train the text-to-image system on the folder ``data`` from scratch → ``(pipeline, result)``; the recipe behind
    ``python -m sdlearn train all --data FOLDER``. Three stages, all writing into ``out_dir``: the VAE
    (:func:`sdlearn.recipes.train_vae` on the folder's images), the text tower (:func:`train_clip_on_folder`) and
    the denoiser (:func:`train_denoiser_on_folder`). The Shapes-only stages are skipped, as one printed line says
    (:data:`SKIPPED_FOR_A_FOLDER`).

    The folder is read and checked first (:func:`read_captioned_folder`), so a bad folder fails before any
    training. Budget: ``minutes`` (default 30 when neither budget is given) split by :data:`FOLDER_SPLIT`;
    ``steps`` caps every stage. At the end ``out_dir`` is loaded with :func:`sdlearn.pretrained.load_pipeline`
    (so it is known to load), and ``train_all.json`` records the stages; so does ``result.record``."""
    minutes, steps = default_budget(minutes, steps, default_minutes=30.0)
    if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, (int, float))
                                or not (minutes > 0 and math.isfinite(minutes))):
        raise ValueError(f"minutes must be a positive number, got {minutes!r}")
    check_positive_int(steps, "steps", allow_none=True)
    dataset = read_captioned_folder(data)
    tokenizer = folder_tokenizer(dataset)
    device = resolve_device(device)
    init_distributed(device)  # under torchrun: now, so that rank 0 alone prints from the start
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    denoiser_options = {} if prediction_type is None else {"prediction_type": prediction_type}
    common = {"seed": seed, "progress": progress, "precision": precision}
    stages = {
        "vae": lambda budget: train_vae(out_dir, budget, steps, device, data=dataset.root.absolute(), **common),
        "clip": lambda budget: train_clip_on_folder(dataset, out_dir, budget, steps, device, **common),
        "denoiser": lambda budget: train_denoiser_on_folder(dataset, out_dir, budget, steps, device, **common,
                                                            **denoiser_options),
    }
    if progress and is_main_process():
        print(f"train all --data {dataset.root}: {len(dataset)} images, {len(tokenizer.vocabulary)} words; "
              f"{SKIPPED_FOR_A_FOLDER}", flush=True)
    started = time.perf_counter()
    record: dict[str, Any] = {"command": command_line(), "data": str(dataset.root), "images": len(dataset),
                              "vocabulary_size": len(tokenizer.vocabulary), "out_dir": str(out_dir),
                              "max_minutes": minutes, "max_steps": steps, "precision": precision,
                              "split": FOLDER_SPLIT, "skipped": SKIPPED_FOR_A_FOLDER, "stages": {}}
    for number, (name, run) in enumerate(stages.items(), start=1):
        budget = None if minutes is None else minutes * FOLDER_SPLIT[name]
        if progress and is_main_process():
            limits = [f"{budget:.1f} min" if budget is not None else "", f"{steps} steps" if steps else ""]
            print(f"train all [{number}/{len(stages)}] {name}: {' / '.join(x for x in limits if x)}", flush=True)
        _, result = run(budget)
        record["stages"][name] = {"steps": result.step, "minutes": round(result.seconds / 60, 3),
                                  "stopped_reason": result.stopped_reason}
    train_seconds = time.perf_counter() - started

    pipe = load_pipeline(out_dir, device)
    record.update(train_minutes=round(train_seconds / 60, 3), device=str(device), torch_threads=torch.get_num_threads(),
                  torch_version=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    if is_main_process():  # under torchrun rank 0 writes
        atomic_write_bytes(out_dir / "train_all.json", (json.dumps(record, indent=1) + "\n").encode("utf-8"))
        if progress:
            example = folder_captions(dataset)[0]
            print(f"train all: {train_seconds / 60:.1f} min of training; wrote {out_dir}; try: python -m sdlearn "
                  f"generate {shlex.quote(example)} --weights {shlex.quote(str(out_dir))} --out sample.png")
    result = TrainResult(step=sum(stage["steps"] for stage in record["stages"].values()), seconds=train_seconds,
                         stopped_reason="all stages done", record=record)
    return pipe, result
