"""The recipes: how each model of the course is trained, on one skeleton; ``python -m sdlearn train NAME``.

Every recipe ``train_NAME(out_dir=None, minutes=None, steps=None, device="auto", *, seed=0, ..., precision="fp32",
progress=True, resume=True) -> (model, TrainResult)`` does the same four things (``precision="bf16"``: bfloat16
autocast over float32 weights, for CUDA; see :func:`sdlearn.training.train`):

1. **budget and device**: ``minutes`` and/or ``steps`` (neither: the shipped recipe's budget), and
   :func:`sdlearn.training.resolve_device`;
2. **data**: a ``batch_fn(step)`` whose randomness comes from :func:`sdlearn.training.step_generator`
   ``(seed, step)``, so that a resumed run repeats an uninterrupted one exactly;
3. **training**: :func:`fit` (the generic loop :func:`sdlearn.training.train` with checkpoints in
   ``out_dir/NAME_checkpoint.*``), then an evaluation, then :func:`finish`: the ``"training"`` record
   (:func:`training_record`), the weights saved by ``sdlearn.pretrained.save_NAME`` into ``out_dir``, and
   a one-line summary.

- :func:`train_vae` (notebook 03), :func:`train_clip` (07), :func:`train_classifier` (the judge of prompt
  accuracy), :func:`train_scene_reader` (its successor for scenes of two objects), :func:`train_denoiser` (05; the DiT,
  or with ``denoiser="unet"`` the course U-Net: :func:`train_unet`, 10) and :func:`train_all`, the whole system from scratch into one folder,
  which returns ``(pipeline, TrainResult)`` like the others (its ``record`` attribute holds the summary).
  :mod:`sdlearn.own_data` trains the same system on a folder of your own captioned images.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sdlearn.checkpoint import CheckpointError, atomic_write_bytes
from sdlearn.checks import check_positive_int, check_probability
from sdlearn.data import (
    IMAGE_SIZE,
    ImageFolderDataset,
    ShapesDataset,
    sample_batch,
)
from sdlearn.denoiser import Denoiser, DenoiserConfig, denoiser_loss
from sdlearn.denoiser_data import (  # latent_batch_fn is also imported from here by notebooks 05, 10 and 11
    DENOISER_DATA_SEED,
    LATENT_REFRESH,
    LATENT_WINDOW,
    latent_batch_fn,
)
from sdlearn.metrics import (
    AUGMENT_NOISE_STD,
    CLASSIFIER_EVAL_SEED,
    SCENE_EVAL_SEED,
    AttributeClassifier,
    ClassifierConfig,
    SceneReader,
    SceneReaderConfig,
    attribute_accuracy,
    augment,
    classifier_loss,
    prompt_accuracy,
    scene_accuracy,
    scene_reader_loss,
    scene_targets,
)
from sdlearn.pipeline import LatentDiffusionPipeline, check_compatible
from sdlearn.pretrained import (
    DENOISERS,
    load_pipeline,
    load_scene_reader,
    resolve_text_encoder,
    resolve_vae,
    save_classifier,
    save_clip,
    save_denoiser,
    save_flow,
    save_scene_reader,
    save_unet,
    save_vae,
)
from sdlearn.schedules import (
    FLOW,
    TIMESTEP_SAMPLINGS,
    NoiseSchedule,
    check_model_prediction_type,
)
from sdlearn.text import (
    CLIP_EVAL_SEED,
    TinyCLIP,
    TinyCLIPConfig,
    Tokenizer,
    caption_retrieval_accuracy,
    clip_batch,
    clip_loss,
    zero_shot_accuracy,
)
from sdlearn.training import (
    TrainResult,
    barrier,
    init_distributed,
    is_main_process,
    resolve_device,
    set_threads,
    step_generator,
    train,
    write_or_rescue,
)
from sdlearn.unet import UNet, UNetConfig
from sdlearn.vae import VAE, VAEConfig, compute_scaling_factor, psnr, vae_loss

# ------------------------------------------------------------------------------------------------
# The skeleton every recipe shares

# The schedule the VAE, TinyCLIP and the attribute classifier share (the denoiser warms up for 200 steps and adds
# gradient clipping and an EMA): keyword arguments of :func:`sdlearn.training.train`.
SHORT_RECIPE = {"warmup_steps": 100, "lr_schedule": "cosine", "checkpoint_every": 500}


def command_line() -> str:
    """How this process was started, for the weights' JSON: ``python -m sdlearn train vae ...`` (with the
    thread-count environment variables, which change how fast a time budget goes)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name == "__main__.py" and Path(argv[0]).parent.name == "sdlearn":
        argv = ["-m", "sdlearn", *argv[1:]]
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ]
    return " ".join([*env, "python", *(shlex.quote(a) for a in argv)])


def default_budget(minutes: float | None, steps: int | None, default_minutes: float | None = None,
                   default_steps: int | None = None) -> tuple[float | None, int | None]:
    """``(minutes, steps)``, or the recipe's defaults when neither budget is given."""
    if minutes is None and steps is None:
        return default_minutes, default_steps
    return minutes, steps


def fit(name: str, model, loss_fn: Callable, batch_fn: Callable, run_config: Mapping[str, Any], *, out_dir: Path | None,
        minutes: float | None, steps: int | None, seed: int, resume: bool, progress: bool, precision: str = "fp32",
        **options) -> TrainResult:
    """:func:`sdlearn.training.train` with what every recipe passes: the budget, the checkpoint
    ``out_dir/NAME_checkpoint.*`` (resumed from when present), the seed, ``run_config`` (what a resumed run
    must share) and the ``precision`` ("fp32", or "bf16": autocast over float32 weights; the run's precision may
    change on resuming). ``options``: the learning rate, schedule, EMA, ... of this recipe."""
    return train(model, loss_fn, batch_fn, max_steps=steps, max_minutes=minutes, checkpoint_dir=out_dir,
                 checkpoint_name=f"{name}_checkpoint", resume=resume, seed=seed, config=dict(run_config),
                 progress=progress, desc=f"train {name}", precision=precision, **options)


def training_record(result: TrainResult, run_config: Mapping[str, Any], keys: Sequence[str], device, steps, minutes,
                    **details) -> dict:
    """The ``"training"`` block of a model's JSON: the command, the run's length and how it ended, ``details``
    (evaluations, data), the machine, the ``keys`` of ``run_config`` (the recipe) and the budget asked for."""
    return {
        "command": command_line(),
        "steps": result.step,
        "minutes": round(result.seconds / 60, 3),
        "stopped_reason": result.stopped_reason,
        "final_loss": result.final_loss if result.losses else None,
        **details,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **{k: run_config[k] for k in keys},
        "max_steps": steps,
        "max_minutes": minutes,
    }


def finish(name: str, model, result: TrainResult, training: dict, out_dir: Path | None, save: Callable,
           summary: str, progress: bool):
    """The end of every recipe: ``save(model, out_dir / name, training=training)`` when there is an ``out_dir``,
    the one-line summary ``"NAME: N steps in M min, SUMMARY; wrote ..."``, and ``model.training_info``.
    Returns ``(model, result)``."""
    try:  # under torchrun rank 0 writes; the others wait for it
        if out_dir is not None and is_main_process():  # a full disk now would lose the run: write_or_rescue saves
            write_or_rescue(lambda path: save(model, path, training=training), out_dir / f"{name}.safetensors",
                            f"the {name} weights")  # it elsewhere and says where
    finally:
        barrier()
    if progress and is_main_process():
        where = f"; wrote {out_dir / f'{name}.safetensors'}" if out_dir is not None else ""
        print(f"{name}: {result.step} steps in {result.seconds / 60:.1f} min, {summary}{where}")
    model.training_info = training
    return model, result


# ------------------------------------------------------------------------------------------------
# The VAE: `python -m sdlearn train vae`

VAE_EVAL_SEED = 10_000  # fresh evaluation images: ShapesDataset(1024, split, seed=10_000), never trained on
SCALING_SEED = 20_000  # images the scaling factor is measured on


def _shapes_batch_fn(batch_size: int, seed: int) -> Callable[[int], torch.Tensor]:
    """Fresh Shapes scenes of one or two objects (split "all") for each step, a pure function of (seed, step)."""
    def batch_fn(step: int) -> torch.Tensor:
        generator = step_generator(seed, step)
        return sample_batch(batch_size, "all", generator, num_objects=(1, 2)).images  # [B, 3, 32, 32]

    return batch_fn


def _folder_batch_fn(dataset, batch_size: int, seed: int) -> Callable[[int], torch.Tensor]:
    """Random images from a folder of the user's own (captions are not needed for the VAE)."""

    def batch_fn(step: int) -> torch.Tensor:
        generator = step_generator(seed, step)
        picks = torch.randint(len(dataset), (batch_size,), generator=generator).tolist()
        return torch.stack([dataset[i]["image"] for i in picks])  # [B, 3, S, S]

    return batch_fn


def train_vae(
    out_dir: str | os.PathLike | None = None,
    minutes: float | None = None,
    steps: int | None = None,
    device: str | torch.device = "auto",
    *,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    config=None,
    data: str | os.PathLike = "shapes",
    precision: str = "fp32",
    progress: bool = True,
    resume: bool = True,
):
    """Train the course's VAE → ``(vae, result)``; the recipe behind ``python -m sdlearn train vae``.

    Data: fresh Shapes scenes of one or two objects every step from ``split="all"`` — the VAE never sees captions, so there is
    nothing to hold out from it, and the denoiser will need it to encode the held-out pairs too; or, with
    ``data=PATH``, random images from a folder of your own (:class:`sdlearn.data.ImageFolderDataset`).
    Loss: :func:`sdlearn.vae.vae_loss`. Optimiser: AdamW, 100 warm-up steps then cosine decay over the
    budget. Budget: ``minutes`` and/or ``steps``; neither means the shipped recipe's 10 minutes.

    At the end the scaling factor is measured as 1 / std of the latents of 4,096 fresh training images,
    and the reconstruction PSNR on 1,024 fresh evaluation images is computed. With ``out_dir``, the
    checkpoint (``out_dir/vae_checkpoint.*``, resumed from when present) and the weights
    (``out_dir/vae.safetensors`` + ``vae.json``, loadable by :func:`sdlearn.pretrained.load_vae`) are
    written there.
    """
    minutes, steps = default_budget(minutes, steps, default_minutes=10.0)
    check_positive_int(batch_size, "batch_size")
    device = resolve_device(device)
    config = VAEConfig.resolve(config)
    if str(data) == "shapes":
        if config.image_size != 32 or config.in_channels != 3:
            raise ValueError("Shapes images are 3×32×32: use image_size=32 and in_channels=3, or data=PATH")
        batch_fn = _shapes_batch_fn(batch_size, seed)
    else:
        folder = ImageFolderDataset(data, size=config.image_size, captions=None)
        batch_fn = _folder_batch_fn(folder, batch_size, seed)
    out_dir = Path(out_dir) if out_dir is not None else None

    torch.manual_seed(seed)
    vae = VAE(config).to(device)
    # What a resumed run must share with the checkpoint (budgets may grow; the scaling factor is measured after).
    vae_config = {k: v for k, v in config.to_dict().items() if k != "scaling_factor"}
    run_config = {"model": "vae", "vae_config": vae_config, "data": str(data), "batch_size": batch_size, "lr": lr, "seed": seed}
    result = fit("vae", vae, lambda model, images, step: vae_loss(model, images), batch_fn, run_config, out_dir=out_dir,
                 minutes=minutes, steps=steps, seed=seed, resume=resume, progress=progress, lr=lr, precision=precision,
                 **SHORT_RECIPE)
    vae.eval()
    with torch.inference_mode():
        if str(data) == "shapes":
            scale_images = ShapesDataset(4096, "all", seed=SCALING_SEED, num_objects=(1, 2)).batch(range(4096)).images
            eval_images = ShapesDataset(1024, "all", seed=VAE_EVAL_SEED, num_objects=(1, 2)).batch(range(1024)).images
        else:  # a folder has no fresh images: measure on (up to 4,096 of) the training images themselves
            scale_images = torch.stack([folder[i]["image"] for i in range(min(len(folder), 4096))])
            eval_images = scale_images[:1024]
        vae.scaling_factor = compute_scaling_factor(vae, scale_images.to(device))
        eval_images = eval_images.to(device)
        recon = torch.cat([vae.decode(vae.encode(eval_images[i : i + 256]).mode()) for i in range(0, len(eval_images), 256)])
        recon_mse = (recon.clamp(-1, 1) - eval_images).pow(2).mean().item()
    psnr_db = 10 * math.log10(4.0 / recon_mse)
    mean_psnr = psnr(recon.clamp(-1, 1), eval_images).mean().item()

    training = training_record(
        result, run_config, ("data", "batch_size", "lr", "seed"), device, steps, minutes, precision=precision,
        eval_psnr_db=round(psnr_db, 3),
        eval_mean_psnr_db=round(mean_psnr, 3),
        eval_images="ShapesDataset(1024, 'all', seed=10000, num_objects=(1, 2))" if str(data) == "shapes"
        else f"{len(eval_images)} training images of {data}",
    )
    which = "fresh images" if str(data) == "shapes" else "training images"
    summary = (f"loss {result.final_loss:.3g}, PSNR {psnr_db:.2f} dB on {len(eval_images):,} {which}, "
               f"scaling_factor {vae.scaling_factor:.4f}")
    return finish("vae", vae, result, training, out_dir, save_vae, summary, progress)


# ------------------------------------------------------------------------------------------------
# TinyCLIP: `python -m sdlearn train clip`

def train_clip(
    out_dir=None,
    minutes: float | None = None,
    steps: int | None = None,
    device: str | torch.device = "auto",
    *,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    config: TinyCLIPConfig | None = None,
    partial_fraction: float = 0.5,
    eval_images: int = 1000,
    precision: str = "fp32",
    progress: bool = True,
    resume: bool = True,
):
    """Train :class:`TinyCLIP` → ``(clip, result)``; the recipe behind ``python -m sdlearn train clip``.

    Data: fresh Shapes images every step from ``split="train"`` (the held-out colour–shape pairs are never
    seen, by either tower), captioned from every template, half of them partial (:func:`clip_batch`).
    Loss: :func:`soft_contrastive_loss`. AdamW (weight decay 0.01 on matrices), 100 warm-up steps, then
    cosine decay over the budget. Budget: ``minutes`` and/or ``steps``; neither means the shipped
    recipe's 600 steps (``sdlearn/weights/README.md`` gives the shipped run's time).

    At the end the zero-shot accuracy per attribute is measured on ``eval_images`` (1,000) fresh
    images of each split.
    With ``out_dir``, the checkpoint (``out_dir/clip_checkpoint.*``, resumed from when present) and the
    weights (``out_dir/clip.safetensors`` + ``clip.json``, loadable by :func:`sdlearn.pretrained.load_clip`)
    are written there.
    """
    minutes, steps = default_budget(minutes, steps, default_steps=600)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an integer ≥ 2 (a contrastive batch needs negatives), got {batch_size!r}")
    if not 0.0 <= partial_fraction <= 1.0:
        raise ValueError(f"partial_fraction must lie in [0, 1], got {partial_fraction!r}")
    config = TinyCLIPConfig.resolve(config)
    device = resolve_device(device)
    tokenizer = Tokenizer(max_length=config.text.max_length)
    if tokenizer.vocab_size != config.text.vocab_size:
        raise ValueError(f"config.text.vocab_size must be {tokenizer.vocab_size} for the Shapes vocabulary")
    out_dir = Path(out_dir) if out_dir is not None else None

    def batch_fn(step: int) -> dict[str, torch.Tensor]:
        return clip_batch(batch_size, step_generator(seed, step), tokenizer, partial_fraction)

    torch.manual_seed(seed)
    clip = TinyCLIP(config).to(device)
    decay = [p for n, p in clip.named_parameters() if p.dim() >= 2]  # no weight decay on gains, biases, the scale
    no_decay = [p for n, p in clip.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    run_config = {"model": "clip", "clip_config": config.to_dict(), "batch_size": batch_size, "lr": lr,
                  "seed": seed, "partial_fraction": partial_fraction}
    result = fit("clip", clip, lambda model, batch, step: clip_loss(model, batch), batch_fn, run_config, out_dir=out_dir,
                 minutes=minutes, steps=steps, seed=seed, resume=resume, progress=progress, optimizer=optimizer,
                 precision=precision, **SHORT_RECIPE)
    clip.eval()
    started = time.perf_counter()
    accuracy = {split: zero_shot_accuracy(clip, eval_images, CLIP_EVAL_SEED, split, tokenizer) for split in ("train", "heldout")}
    retrieval = {split: caption_retrieval_accuracy(clip, eval_images, CLIP_EVAL_SEED, split, tokenizer)
                 for split in ("train", "heldout")}
    training = training_record(
        result, run_config, ("batch_size", "lr", "seed", "partial_fraction"), device, steps, minutes, precision=precision,
        logit_scale=round(clip.scale().item(), 3),
        zero_shot_accuracy={s: {k: round(v, 4) for k, v in acc.items()} for s, acc in accuracy.items()},
        caption_retrieval_accuracy={s: round(v, 4) for s, v in retrieval.items()},
        eval_images=f"ShapesDataset({eval_images}, split, seed={CLIP_EVAL_SEED}) for split in ('train', 'heldout')",
        eval_seconds=round(time.perf_counter() - started, 1),
    )
    shown = "; ".join(f"{s}: " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()) for s, acc in accuracy.items())
    summary = (f"loss {result.final_loss:.3g}; zero-shot accuracy {shown}; caption retrieval (1 of 320) train "
               f"{retrieval['train']:.1%}, heldout {retrieval['heldout']:.1%}")
    return finish("clip", clip, result, training, out_dir,
                  lambda model, path, training: save_clip(model, path, training=training, tokenizer=tokenizer),
                  summary, progress)


# ------------------------------------------------------------------------------------------------
# The judges: the attribute classifier (`python -m sdlearn train classifier`) and the scene reader

AUGMENTATION_NOTE = f"blur mix a~U(0,1) on half, Gaussian noise sigma~U(0,{AUGMENT_NOISE_STD}) on half"


def train_judge(name: str, model_cls, config, targets: Callable, loss_fn: Callable, evaluate: Callable, eval_images: str,
                summarize: Callable, save: Callable, *, num_objects, out_dir, minutes, steps, device, batch_size, lr, seed,
                progress, resume, precision="fp32"):
    """What :func:`train_classifier` and :func:`train_scene_reader` share → ``(model, result)``.

    Data: fresh Shapes items of ``num_objects`` from ``split="all"`` every step (a judge must read the held-out
    pairs too), corrupted by :func:`augment`; ``targets(batch)`` are the labels, ``loss_fn(model, images, labels)``
    the loss. AdamW, 100 warm-up steps then cosine decay (``SHORT_RECIPE``); neither ``minutes`` nor ``steps``: 5
    minutes. Then ``evaluate(model)`` → {split: {what: accuracy}}, recorded with ``eval_images`` (how they were
    drawn); ``summarize(result, accuracy)`` is the summary's text, and ``save`` writes ``out_dir/NAME.*``."""
    minutes, steps = default_budget(minutes, steps, default_minutes=5.0)
    check_positive_int(batch_size, "batch_size")
    device = resolve_device(device)
    if config.image_size != IMAGE_SIZE or config.in_channels != 3:
        raise ValueError(f"Shapes images are 3×{IMAGE_SIZE}×{IMAGE_SIZE}: use image_size={IMAGE_SIZE} and in_channels=3")
    out_dir = Path(out_dir) if out_dir is not None else None

    def batch_fn(step: int):
        generator = step_generator(seed, step)
        batch = sample_batch(batch_size, "all", generator, num_objects=num_objects)
        return augment(batch.images, generator), targets(batch)  # [B, 3, 32, 32], labels

    torch.manual_seed(seed)
    model = model_cls(config).to(device)
    run_config = {"model": name, "model_config": config.to_dict(), "batch_size": batch_size, "lr": lr, "seed": seed}
    result = fit(name, model, lambda model, batch, step: loss_fn(model, *batch), batch_fn, run_config, out_dir=out_dir,
                 minutes=minutes, steps=steps, seed=seed, resume=resume, progress=progress, lr=lr, precision=precision,
                 **SHORT_RECIPE)
    model.eval()
    accuracy = evaluate(model)
    training = training_record(
        result, run_config, ("batch_size", "lr", "seed"), device, steps, minutes, precision=precision,
        eval_accuracy={split: {k: round(v, 5) for k, v in acc.items()} for split, acc in accuracy.items()},
        eval_images=eval_images, augmentation=AUGMENTATION_NOTE,
    )
    return finish(name, model, result, training, out_dir, save, summarize(result, accuracy), progress)


def train_classifier(
    out_dir: str | os.PathLike | None = None,
    minutes: float | None = None,
    steps: int | None = None,
    device: str | torch.device = "auto",
    *,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    config: ClassifierConfig | None = None,
    precision: str = "fp32",
    progress: bool = True,
    resume: bool = True,
):
    """Train the :class:`AttributeClassifier` → ``(classifier, result)``; the recipe behind
    ``python -m sdlearn train classifier``.

    Data: fresh Shapes images every step from ``split="all"`` (the classifier must judge images of the
    held-out pairs too; colour and shape are separate heads, so it never needs to have "understood" a
    pair), corrupted by :func:`augment`. Loss: :func:`classifier_loss`. Optimiser: AdamW, 100 warm-up steps
    then cosine decay over the budget. Budget: ``minutes`` and/or ``steps``; neither means the shipped
    recipe's 5 minutes.

    At the end, the per-attribute accuracy on clean ``ShapesDataset(2048, split, seed=30000)`` images is
    measured for both splits. With ``out_dir``, the checkpoint (``out_dir/classifier_checkpoint.*``,
    resumed from when present) and the weights (``out_dir/classifier.safetensors`` + ``classifier.json``,
    loadable by :func:`sdlearn.pretrained.load_classifier`) are written there.
    """

    def summarize(result, accuracy):
        worst = min(v for acc in accuracy.values() for k, v in acc.items() if k != "all")
        return f"loss {result.final_loss:.3g}, worst per-attribute accuracy {100 * worst:.2f}% on 2×2,048 fresh images"

    return train_judge(
        "classifier", AttributeClassifier, ClassifierConfig.resolve(config), lambda batch: batch.attributes,
        classifier_loss, lambda model: {split: attribute_accuracy(model, 2048, split) for split in ("train", "heldout")},
        f"ShapesDataset(2048, split, seed={CLASSIFIER_EVAL_SEED}) for split in ('train', 'heldout'), clean",
        summarize, save_classifier, num_objects=1, out_dir=out_dir, minutes=minutes, steps=steps, device=device,
        batch_size=batch_size, lr=lr, seed=seed, progress=progress, resume=resume, precision=precision)


def train_scene_reader(
    out_dir: str | os.PathLike | None = None,
    minutes: float | None = None,
    steps: int | None = None,
    device: str | torch.device = "auto",
    *,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    config: SceneReaderConfig | None = None,
    precision: str = "fp32",
    progress: bool = True,
    resume: bool = True,
):
    """Train the :class:`SceneReader` → ``(reader, result)``: for each of the five places, empty or (colour,
    shape, size).

    Data: fresh scenes of one or two objects (half each) every step from ``split="all"``, corrupted by
    :func:`augment`, read into per-place targets by :func:`scene_targets`. Loss: :func:`scene_reader_loss`.
    Optimiser and budget as :func:`train_classifier`'s (neither ``minutes`` nor ``steps``: 5 minutes).

    At the end, :func:`scene_accuracy` on clean ``ShapesDataset(2048, split, seed=31000, num_objects=(1, 2))``
    images for both splits. With ``out_dir``, the checkpoint (``out_dir/scene_reader_checkpoint.*``, resumed from
    when present) and the weights (``out_dir/scene_reader.safetensors`` + ``scene_reader.json``, loadable by
    :func:`sdlearn.pretrained.load_scene_reader`) are written there.
    """

    def summarize(result, accuracy):
        worst = min(acc["all"] for acc in accuracy.values())
        return f"loss {result.final_loss:.3g}, {100 * worst:.2f}% of scenes read exactly (worse split, 2,048 images)"

    return train_judge(
        "scene_reader", SceneReader, SceneReaderConfig.resolve(config), scene_targets, scene_reader_loss,
        lambda model: {split: scene_accuracy(model, 2048, split) for split in ("train", "heldout")},
        f"ShapesDataset(2048, split, seed={SCENE_EVAL_SEED}, num_objects=(1, 2)) for split in ('train', 'heldout'), clean",
        summarize, save_scene_reader, num_objects=(1, 2), out_dir=out_dir, minutes=minutes, steps=steps, device=device,
        batch_size=batch_size, lr=lr, seed=seed, progress=progress, resume=resume, precision=precision)


# The denoiser's training recipe: `python -m sdlearn train denoiser`

DENOISER_EVAL_SEED = 50_000  # evaluation prompts: captions of ShapesDataset(n, split, seed=50_000)
DIT_CAPTIONS = {"open_fraction": 0.75, "shared_open": 1.0, "binding_fraction": 0.5}
"""What :func:`train_denoiser`'s caption options default to for the DiT: the shipped DiT's recipe (issue 13). Three
captions in four leave attributes open, two open objects always leave the same ones open, and half the two-object
captions name colour and shape alone, the prompts where only the words say which colour goes with which shape."""
EARLIER_CAPTIONS = {"open_fraction": 0.5, "shared_open": 0.0, "binding_fraction": 0.0}
"""Their defaults for the U-Net and the flow model: the recipe their shipped weights were trained by."""


def train_denoiser(
    out_dir: str | os.PathLike | None = None,
    minutes: float | None = None,
    steps: int | None = None,
    device: str | torch.device = "auto",
    *,
    denoiser: str = "dit",
    text_encoder="shipped",
    vae=None,
    prediction_type: str = "epsilon",
    schedule: str = "scaled_linear",
    batch_size: int = 128,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    caption_dropout: float = 0.1,
    open_fraction: float | None = None,
    shared_open: float | None = None,
    binding_fraction: float | None = None,
    timesteps: str | None = None,
    seed: int = 0,
    config=None,
    threads: int | None = None,
    eval_images: int = 256,
    latent_window: int = LATENT_WINDOW,
    latent_refresh: int = LATENT_REFRESH,
    checkpoint_every: int = 250,
    precision: str = "fp32",
    progress: bool = True,
    resume: bool = True,
):
    """Train the text-conditioned :class:`~sdlearn.denoiser.Denoiser` on VAE latents of Shapes → ``(denoiser, result)``;
    the recipe behind ``python -m sdlearn train denoiser``. The returned denoiser holds the EMA weights (eval
    mode); the raw weights are in ``denoiser.raw_state_dict`` (and in the checkpoint, ``model/…``).
    ``denoiser="unet"`` trains the course :class:`~sdlearn.unet.UNet` (``config``: a ``UNetConfig``) instead of the
    DiT (``"dit"``: a ``DenoiserConfig``) by this same recipe; its files are ``unet_checkpoint.*`` and ``unet.*``.
    ``denoiser="flow"`` (with ``prediction_type="flow"``: :func:`train_flow`) trains the DiT with rectified flow into
    ``flow_checkpoint.*`` and ``flow.*``.

    - **Data**: fresh Shapes scenes of one or two objects (half each) from ``split="train"`` (the four held-out
      colour–shape pairs are never seen, in any object),
      encoded by the frozen VAE (``vae``: None = the shipped one). Encoding is cached:
      :class:`~sdlearn.denoiser_data.LatentWindow` keeps the latents of ``latent_window`` = 16,384 images and swaps ``latent_refresh`` = 16 fresh ones in
      per step, so the data never runs out while only 1/8 of a batch is encoded per step. Encoding on the fly would cost a noticeable part of
      each step; the window costs about a hundredth of it, plus a start of a few seconds (encoding the first
      16,384 images). ``python benchmarks/data.py`` times rendering; the figures measured when the window was
      chosen are in ``benchmarks/results/docstring-figures-2026-11.md``.
      The latent is a *sample* of the posterior q(z | x), as Stable Diffusion's training takes it, times the
      scaling factor; the posterior is so narrow (σ ≈ 0.005) that this is the mean up to a small jitter.
    - **Text**: a fresh random caption per image and use (every template and synonym; a fraction
      ``open_fraction`` leave attributes open, :func:`sdlearn.data.random_caption`), read by the frozen text
      tower (``text_encoder``: "shipped", a path to TinyCLIP weights, a ``TextEncoder``, or None to train
      unconditionally) → token embeddings + mask for the cross-attention. With probability
      ``caption_dropout`` the caption is the empty prompt "" (``<bos> <eos>``): the unconditional prompt that
      classifier-free guidance uses at sampling time (Ho & Salimans 2022). ``shared_open``,
      ``binding_fraction``: see ``random_caption``. None for ``open_fraction``, ``shared_open`` and
      ``binding_fraction`` is :data:`DIT_CAPTIONS` for the DiT, :data:`EARLIER_CAPTIONS` for the U-Net and the
      flow model.
    - **Loss** (:func:`denoiser_loss`): MSE to ``schedule.target(x0, noise, t, prediction_type)`` at timesteps
      ``timesteps`` (:func:`sdlearn.schedules.training_timesteps`): "uniform" t in [0, T), Ho et al.'s
      L_simple, or "flow_matched", t and a weight that make it a rectified flow's loss (Esser et al. 2024),
      which puts more of it where layout is decided; None is "flow_matched" for the ε-predicting DiT and
      "uniform" for the rest (the flow model: "logit_normal"). ε-prediction by default, "v_prediction" or
      "sample" selectable. Noise schedule ``schedule`` (a :func:`sdlearn.schedules.make_betas` name;
      "scaled_linear" as SD).
    - **Model**: ``config`` (None: ``DenoiserConfig(mlp_conv=True)`` for the DiT, the Mix-FFN of Xie et al.
      2021; ``DenoiserConfig()`` for the flow model; ``UNetConfig()`` for the U-Net).
    - **Optimiser**: AdamW (no weight decay, as DiT), ``lr`` with 200 warm-up steps then cosine decay over the
      budget, gradient clipping at 1; EMA of the weights with ``ema_decay``. Budget: ``minutes`` and/or
      ``steps``; neither means the shipped recipe's: 55 minutes for the DiT, 45 for the U-Net and the flow
      model. ``lr`` 1e-3 (batch 128) was picked from 300-step
      runs with a random text tower (``benchmarks/results/docstring-figures-2026-11.md``).
      ``threads`` sets ``torch.set_num_threads``.
    - **Evaluation** (when ``text_encoder`` is given and ``eval_images`` > 0 and the shipped scene reader
      exists): ``eval_images`` prompts from each of the train and held-out splits
      (captions of ``ShapesDataset(n, split, seed=50_000)``) are drawn with 20 DPM-Solver++ steps at guidance 4,
      and their prompt accuracy (:func:`sdlearn.metrics.prompt_accuracy`) is recorded.

    With ``out_dir``: the checkpoint ``out_dir/denoiser_checkpoint.*`` (raw and EMA weights, optimizer, RNG;
    written every ``checkpoint_every`` steps and at the end; resumed from when present) and the weights ``out_dir/denoiser.safetensors`` + ``denoiser.json``
    (:func:`save_denoiser`, loadable by :func:`sdlearn.pretrained.load_denoiser`).
    """
    if not isinstance(denoiser, str) or denoiser not in DENOISERS:
        raise ValueError(f"denoiser must be one of {', '.join(map(repr, DENOISERS))}, got {denoiser!r}")
    minutes, steps = default_budget(minutes, steps, default_minutes=55.0 if denoiser == "dit" else 45.0)
    captions = DIT_CAPTIONS if denoiser == "dit" else EARLIER_CAPTIONS
    open_fraction, shared_open, binding_fraction = (captions[name] if value is None else value for name, value in (
        ("open_fraction", open_fraction), ("shared_open", shared_open), ("binding_fraction", binding_fraction)))
    stem, model_cls, config_cls = DENOISERS[denoiser], *((UNet, UNetConfig) if denoiser == "unet" else (Denoiser, DenoiserConfig))
    check_positive_int(batch_size, "batch_size")
    check_model_prediction_type(prediction_type)
    if (denoiser == "flow") != (prediction_type == FLOW) and denoiser != "unet":
        raise ValueError(f"denoiser='flow' is the DiT trained with prediction_type 'flow', and only it; got "
                         f"denoiser={denoiser!r} with prediction_type={prediction_type!r}")
    check_probability(caption_dropout, "caption_dropout")
    check_probability(open_fraction, "open_fraction")
    check_probability(shared_open, "shared_open")
    check_probability(binding_fraction, "binding_fraction")
    timesteps = timesteps or ("logit_normal" if prediction_type == FLOW else
                              "flow_matched" if denoiser == "dit" and prediction_type == "epsilon" else "uniform")
    if (timesteps == "logit_normal") != (prediction_type == FLOW) or timesteps not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"timesteps must be 'logit_normal' for a flow model and 'uniform' or 'flow_matched' "
                         f"otherwise; got timesteps={timesteps!r} with prediction_type={prediction_type!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        set_threads(threads)  # capped at the cores, with a warning
    if isinstance(eval_images, bool) or not isinstance(eval_images, int) or eval_images < 0:
        raise ValueError(f"eval_images must be a non-negative integer, got {eval_images!r}")
    noise_schedule = NoiseSchedule.from_name(schedule)
    device = resolve_device(device)
    text_encoder, tokenizer, text_record = resolve_text_encoder(text_encoder, device)
    vae, vae_record = resolve_vae(vae, device)

    if config is None:
        text_dim = text_encoder.width if text_encoder else 128
        config = UNetConfig(prediction_type=prediction_type, cross_attention_dim=text_dim) if denoiser == "unet" \
            else DenoiserConfig(prediction_type=prediction_type, text_dim=text_dim, mlp_conv=denoiser == "dit")
    if not isinstance(config, config_cls):
        raise ValueError(f"config must be a {config_cls.__name__} for denoiser={denoiser!r}, got {type(config).__name__}")
    if config.prediction_type != prediction_type:
        raise ValueError(f"config.prediction_type is {config.prediction_type!r} but prediction_type={prediction_type!r}; make them agree")
    check_compatible(vae, text_encoder, tokenizer, config, noise_schedule)
    out_dir = Path(out_dir) if out_dir is not None else None

    for name, value in (("latent_window", latent_window), ("latent_refresh", latent_refresh)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    batch_fn = latent_batch_fn(vae, noise_schedule, batch_size, seed, text_encoder=text_encoder, tokenizer=tokenizer,
                                caption_dropout=caption_dropout, open_fraction=open_fraction, window=latent_window,
                                refresh=latent_refresh, timesteps=timesteps, shared_open=shared_open,
                                binding_fraction=binding_fraction)
    torch.manual_seed(seed)
    model = model_cls(config).to(device)
    run_config = {
        "model": stem, f"{stem}_config": config.to_dict(), "schedule": schedule,
        "text_encoder": None if text_record is None else text_record.get("sha256", text_record["source"]),
        "vae": vae_record.get("sha256", vae_record["source"]), "batch_size": batch_size, "lr": lr,
        "ema_decay": ema_decay, "caption_dropout": caption_dropout, "open_fraction": open_fraction, "seed": seed,
        "latent_window": [latent_window, latent_refresh],
    }
    if shared_open or timesteps == "flow_matched":  # recorded only when used, so older runs still resume
        run_config.update(shared_open=shared_open, timesteps=timesteps)
    if binding_fraction:
        run_config.update(binding_fraction=binding_fraction)
    recorded_if_used = ("shared_open", "timesteps", "binding_fraction")
    result = fit(stem, model, lambda model, batch, step: denoiser_loss(model, batch, noise_schedule), batch_fn,
                 run_config, out_dir=out_dir, minutes=minutes, steps=steps, seed=seed, resume=resume,
                 progress=progress, lr=lr, warmup_steps=200, lr_schedule="cosine", grad_clip=1.0, ema_decay=ema_decay,
                 checkpoint_every=checkpoint_every, precision=precision)
    model.raw_state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result.ema.copy_to(model)
    model.eval()

    training = training_record(
        result, run_config, ("batch_size", "lr", "ema_decay", "caption_dropout", "open_fraction", "seed",
                             *(k for k in recorded_if_used if k in run_config)),
        device, steps, minutes, precision=precision,
        images_seen=result.step * batch_size,
        losses=[float(f"{loss:.4g}") for loss in result.losses],  # per step, for notebook 05's curve
        weights=f"EMA (decay {ema_decay}), stored as float16",
        data=f"fresh Shapes scenes, split 'train': ShapesDataset(2**40, 'train', seed={DENOISER_DATA_SEED + seed}, "
             f"num_objects=(1, 2)), "
             f"latents of a {latent_window}-image window, {latent_refresh} fresh images per step",
        vae=vae_record,
    )
    if text_encoder is not None and eval_images > 0 and is_main_process():  # rank 0 alone records it
        try:
            judge = load_scene_reader()
        except CheckpointError as e:
            training["evaluation"] = {"skipped": f"no scene reader to judge with ({e})"}
        else:
            pipe = LatentDiffusionPipeline(vae, text_encoder, tokenizer, model, noise_schedule)
            training["evaluation"] = evaluate_prompt_accuracy(pipe, eval_images, judge)[1]
    scores = training.get("evaluation", {}).get("prompt_accuracy")
    summary = f"loss {result.final_loss:.4g}" + (f", prompt accuracy {scores}" if scores else "")
    model.schedule_name = schedule
    model.text_encoder_info = text_record
    save = {"unet": save_unet, "flow": save_flow}.get(denoiser, save_denoiser)
    return finish(stem, model, result, training, out_dir,
                  lambda model, path, training: save(model, path, training=training, schedule=schedule,
                                                     text_encoder=text_record),
                  summary, progress)


def train_unet(out_dir: str | os.PathLike | None = None, minutes: float | None = None, steps: int | None = None,
               device: str | torch.device = "auto", **options):
    """Train the course U-Net (:class:`sdlearn.unet.UNet`, ``UNetConfig()``: 3.9M parameters, the DiT's size) →
    ``(unet, result)``; the recipe behind ``python -m sdlearn train unet``: :func:`train_denoiser` with
    ``denoiser="unet"``, so the same latents, text tower, optimiser, EMA and evaluation as the DiT, with the captions
    its shipped weights were trained on (:data:`EARLIER_CAPTIONS`), uniform t and 45 minutes, into ``out_dir/unet.*`` (:func:`sdlearn.pretrained.load_unet`). ``options``: those of
    :func:`train_denoiser`."""
    return train_denoiser(out_dir, minutes, steps, device, denoiser="unet", **options)


def train_flow(out_dir: str | os.PathLike | None = None, minutes: float | None = None, steps: int | None = None,
               device: str | torch.device = "auto", **options):
    """Train the DiT with rectified flow (``DenoiserConfig(prediction_type="flow")``) → ``(flow, result)``; the recipe
    of ``python -m sdlearn train flow``: :func:`train_denoiser` (``denoiser="flow"``: the ε-model's latents, text,
    optimiser and EMA, :data:`EARLIER_CAPTIONS`, 45 minutes; :func:`sdlearn.denoiser.denoiser_loss`'s flow loss, σ logit-normal as in Esser et al.
    2024, §3.1), evaluated at 8 Euler steps, into ``out_dir/flow.*`` (:func:`sdlearn.pretrained.load_flow`)."""
    return train_denoiser(out_dir, minutes, steps, device, denoiser="flow", prediction_type=FLOW, **options)


@torch.no_grad()
def generate_for_eval(pipe: LatentDiffusionPipeline, prompts: Sequence[str], negative_prompts=None, steps: int = 20,
                      guidance_scale: float = 4.0, sampler: str | None = None, seed: int = 0,
                      batch_size: int = 128) -> torch.Tensor:
    """Images ``[N, 3, 32, 32]`` for ``prompts`` drawn by ``pipe`` in chunks of ``batch_size``, image i's noise
    from ``seed + i`` (so a chunk's size never changes an image). A pipeline without a text encoder samples an
    unconditional denoiser: the prompts then only count the images."""
    prompts = list(prompts)
    if negative_prompts is not None and len(negative_prompts) != len(prompts):
        raise ValueError(f"got {len(negative_prompts)} negative prompts for {len(prompts)} prompts")
    if pipe.text_encoder is None:
        prompts, negative_prompts = [""] * len(prompts), None
    images = []
    for start in range(0, len(prompts), batch_size):
        stop = min(start + batch_size, len(prompts))
        images.append(pipe(
            prompts[start:stop], negative_prompt=None if negative_prompts is None else list(negative_prompts[start:stop]),
            num_inference_steps=steps, guidance_scale=guidance_scale, sampler=sampler, progress=False,
            generator=[torch.Generator().manual_seed(seed + i) for i in range(start, stop)],
        ))
    return torch.cat(images)


def evaluate_prompt_accuracy(pipe: LatentDiffusionPipeline, n: int, judge: SceneReader | AttributeClassifier):
    """Prompt accuracy at 20 DPM-Solver++ steps (a flow model: 8 Euler steps) and guidance 4 on ``n`` captions of each split →
    ``({split: PromptAccuracy}, record)``, ``record`` being what the weights' JSON keeps of it. With a
    :class:`SceneReader` as the ``judge``, also on ``n`` two-object captions of the train split ("two_objects")."""
    started = time.perf_counter()
    steps, sampling = (8, "8 flow Euler steps") if pipe.is_flow else (20, "20 DPM-Solver++ steps")
    scores = {}
    sets = {split: ShapesDataset(n, split, seed=DENOISER_EVAL_SEED) for split in ("train", "heldout")}
    if isinstance(judge, SceneReader):
        sets["two_objects"] = ShapesDataset(n, "train", seed=DENOISER_EVAL_SEED, num_objects=2)
    for name, dataset in sets.items():
        prompts = dataset.batch(range(n)).captions
        scores[name] = prompt_accuracy(generate_for_eval(pipe, prompts, steps=steps), prompts, judge)
    return scores, {
        "prompt_accuracy": {split: round(s.overall, 4) for split, s in scores.items()},
        "per_attribute": {split: {k: round(v, 4) for k, v in s.per_attribute.items()} for split, s in scores.items()},
        "prompts": f"captions of ShapesDataset({n}, split, seed={DENOISER_EVAL_SEED}) for split in ('train', 'heldout')"
                   + (f"; two_objects: ShapesDataset({n}, 'train', seed={DENOISER_EVAL_SEED}, num_objects=2)"
                      if "two_objects" in sets else ""),
        "sampling": f"{sampling}, guidance 4, image i's noise from seed i",
        "seconds": round(time.perf_counter() - started, 1),
    }


# ------------------------------------------------------------------------------------------------
# python -m sdlearn train all: the whole text-to-image system from scratch, into one folder

# The time budget's split. The denoiser is what takes long to learn; the VAE passes 30 dB in ≈ 2 minutes (see
# sdlearn/weights/README.md), TinyCLIP's zero-shot accuracy and the classifier's saturate within a few.
TRAIN_ALL_SPLIT = {"vae": 0.10, "clip": 0.10, "scene_reader": 0.05, "denoiser": 0.75}
TRAIN_ALL_DENOISER = {**EARLIER_CAPTIONS, "timesteps": "uniform"}
"""The recipe of :func:`train_all`'s denoiser, unless ``options["denoiser"]`` says otherwise: half the captions full,
uniform t, and the plain DiT (``DenoiserConfig()``) as its config. The shipped DiT's recipe (:data:`DIT_CAPTIONS`, flow-matched t, the Mix-FFN) spends its
training on partial and colour-and-shape prompts, which need the full 55 minutes; in train_all's share of a short
budget it leaves the full prompts less well learnt than this one does."""


def _train_all_denoiser(out_dir: Path, device, options: Mapping[str, Any]) -> dict[str, Any]:
    """``train_denoiser``'s keyword arguments in :func:`train_all`: :data:`TRAIN_ALL_DENOISER` under ``options``."""
    recipe = dict(TRAIN_ALL_DENOISER)
    if "config" not in options:  # the plain DiT, reading the text tower trained in stage 2
        width = resolve_text_encoder(out_dir, device)[0].width
        recipe["config"] = DenoiserConfig(prediction_type=options.get("prediction_type", "epsilon"), text_dim=width)
    return {**recipe, **options}


def train_all(
    out_dir: str | os.PathLike = "runs/all",
    minutes: float | None = None,
    steps: int | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    progress: bool = True,
    *,
    eval_prompts: int = 256,
    prediction_type: str | None = None,
    precision: str = "fp32",
    options: Mapping[str, Mapping[str, Any]] | None = None,
):
    """Train Stable Diffusion at course scale from scratch → ``(pipeline, result)``; the recipe behind
    ``python -m sdlearn train all``. Four stages, in order, all writing into ``out_dir``:

    1. the VAE (:func:`train_vae`) → ``vae.*``;
    2. TinyCLIP (:func:`train_clip`), whose frozen text tower reads the prompts → ``clip.*``;
    3. the scene reader (:func:`train_scene_reader`), the judge of prompt accuracy →
       ``scene_reader.*``;
    4. the denoiser (:func:`train_denoiser`) on latents of *this* VAE, conditioned by *this* text tower →
       ``denoiser.*``, by :data:`TRAIN_ALL_DENOISER`'s recipe.

    Budget: ``minutes`` (default 30 when neither budget is given) is split by :data:`TRAIN_ALL_SPLIT`
    (VAE 10%, CLIP 10%, scene reader 5%, denoiser 75%); ``steps``, if given, caps every stage at that many
    optimiser steps. The budgets count training loops only; each stage's own evaluation and the final one add
    about a minute in all on a 2-core CPU. Each stage resumes from its checkpoint in ``out_dir``, so an
    interrupted run, restarted with the same command, continues where it stopped.

    At the end the folder is loaded with :func:`sdlearn.pretrained.load_pipeline` (so it is known to load), and
    the prompt accuracy (:func:`sdlearn.metrics.prompt_accuracy`, judged by the scene reader trained in stage 3)
    is measured on ``eval_prompts`` captions of each split (``ShapesDataset(n, split, seed=50_000)``), drawn with
    20 DPM-Solver++ steps at guidance 4, image i's noise from seed i. ``train_all.json`` in ``out_dir`` records
    the stages and the scores; so does ``result.record``, where ``result`` (a :class:`~sdlearn.training.TrainResult`)
    counts the steps and training seconds of all four stages. ``prediction_type`` (None: the denoiser's default, ε) goes to the denoiser,
    ``precision`` to every stage;
    ``options`` maps a stage name to extra keyword arguments of its function (e.g. ``{"denoiser": {"batch_size": 64}}``).
    """
    minutes, steps = default_budget(minutes, steps, default_minutes=30.0)
    if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, (int, float))
                                or not (minutes > 0 and math.isfinite(minutes))):
        raise ValueError(f"minutes must be a positive number, got {minutes!r}")
    check_positive_int(steps, "steps", allow_none=True)
    if isinstance(eval_prompts, bool) or not isinstance(eval_prompts, int) or eval_prompts < 0:
        raise ValueError(f"eval_prompts must be a whole number ≥ 0, got {eval_prompts!r}")
    options = {name: dict(value) for name, value in (options or {}).items()}
    unknown = set(options) - set(TRAIN_ALL_SPLIT)
    if unknown:
        raise ValueError(f"options has unknown stage(s) {sorted(unknown)}; the stages are {', '.join(TRAIN_ALL_SPLIT)}")
    reserved = {"out_dir", "minutes", "steps", "device", "seed", "progress", "text_encoder", "vae", "precision", "denoiser"}
    for name, value in options.items():
        if reserved & set(value):
            raise ValueError(f"options[{name!r}] may not set {sorted(reserved & set(value))}: train_all chooses those")
    if prediction_type is not None:
        options["denoiser"] = {**options.get("denoiser", {}), "prediction_type": prediction_type}
    device = resolve_device(device)
    init_distributed(device)  # under torchrun: now, so that rank 0 alone prints from the start
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    stages = {
        "vae": lambda budget: train_vae(out_dir, budget, steps, device, seed=seed, progress=progress,
                                           precision=precision, **options.get("vae", {})),
        "clip": lambda budget: train_clip(out_dir, budget, steps, device, seed=seed, progress=progress,
                                           precision=precision, **options.get("clip", {})),
        "scene_reader": lambda budget: train_scene_reader(out_dir, budget, steps, device, seed=seed, progress=progress,
                                                          precision=precision, **options.get("scene_reader", {})),
        "denoiser": lambda budget: train_denoiser(out_dir, budget, steps, device, text_encoder=out_dir, vae=out_dir,
                                                  seed=seed, eval_images=0, progress=progress, precision=precision,
                                                  **_train_all_denoiser(out_dir, device, options.get("denoiser", {}))),
    }
    started = time.perf_counter()
    record: dict[str, Any] = {"command": command_line(), "out_dir": str(out_dir), "max_minutes": minutes,
                              "max_steps": steps, "precision": precision, "split": TRAIN_ALL_SPLIT, "stages": {}}
    models = {}
    for number, (name, run) in enumerate(stages.items(), start=1):
        budget = None if minutes is None else minutes * TRAIN_ALL_SPLIT[name]
        if progress and is_main_process():
            limits = [f"{budget:.1f} min" if budget is not None else "", f"{steps} steps" if steps else ""]
            print(f"train all [{number}/4] {name}: {' / '.join(x for x in limits if x)}", flush=True)
        models[name], result = run(budget)
        record["stages"][name] = {"steps": result.step, "minutes": round(result.seconds / 60, 3),
                                  "stopped_reason": result.stopped_reason}
    train_seconds = time.perf_counter() - started

    pipe = load_pipeline(out_dir, device)
    scores = {}
    if eval_prompts > 0:
        scores, record["evaluation"] = evaluate_prompt_accuracy(pipe, eval_prompts, models["scene_reader"])
        record["evaluation"]["judge"] = f"the scene reader trained in stage 3 ({out_dir / 'scene_reader.safetensors'})"
    record.update(train_minutes=round(train_seconds / 60, 3), total_minutes=round((time.perf_counter() - started) / 60, 3),
                  device=str(device), torch_threads=torch.get_num_threads(), torch_version=torch.__version__,
                  date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    if is_main_process():  # under torchrun rank 0 writes
        atomic_write_bytes(out_dir / "train_all.json", (json.dumps(record, indent=1) + "\n").encode("utf-8"))
    if progress and is_main_process():
        print(f"train all: {train_seconds / 60:.1f} min of training, {record['total_minutes']:.1f} min in all; "
              f"wrote {out_dir} (load it with sdlearn.pretrained.load_pipeline({str(out_dir)!r}))")
        for split, s in scores.items():
            what = "train-split prompts" if split == "train" else "held-out pairs (never seen in training)"
            print(f"  {split}: {s} — {eval_prompts} {what}")
    result = TrainResult(step=sum(stage["steps"] for stage in record["stages"].values()), seconds=train_seconds,
                         stopped_reason="all stages done", record=record)
    return pipe, result
