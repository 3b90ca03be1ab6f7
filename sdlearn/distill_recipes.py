"""The recipe of the few-step student: ``python -m sdlearn train distill`` (:func:`train_distill`).

Consistency distillation (:mod:`sdlearn.distill`) of the shipped ε-prediction DiT into a
:class:`~sdlearn.distill.ConsistencyStudent` that draws in 1, 2 or 4 steps, on the skeleton of every recipe
(:mod:`sdlearn.recipes`): a budget, a ``batch_fn(step)`` that is a pure function of ``(seed, step)``, the generic loop
:func:`sdlearn.training.train` with checkpoints and resume, an evaluation, and the weights written by
:func:`sdlearn.pretrained.save_student`.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from sdlearn.checkpoint import CheckpointError, file_sha256, weights_path
from sdlearn.checks import check_positive_int
from sdlearn.data import ShapesDataset
from sdlearn.denoiser_data import DENOISER_DATA_SEED, LATENT_REFRESH, LATENT_WINDOW, latent_batch_fn
from sdlearn.distill import (
    DISTILLED_STEPS,
    ConsistencySampler,
    ConsistencyStudent,
    consistency_distillation_loss,
    update_target,
)
from sdlearn.metrics import prompt_accuracy
from sdlearn.pipeline import GUIDANCE_INTERVAL_END, LatentDiffusionPipeline
from sdlearn.pretrained import (
    load_denoiser,
    load_scene_reader,
    resolve_text_encoder,
    resolve_vae,
    save_student,
)
from sdlearn.recipes import (
    DENOISER_EVAL_SEED,
    default_budget,
    finish,
    fit,
    generate_for_eval,
    training_record,
)
from sdlearn.schedules import NoiseSchedule
from sdlearn.training import is_main_process, resolve_device, set_threads

__all__ = ["DISTILL_MINUTES", "ConsistencyPair", "train_distill", "evaluate_student", "loss_curve"]

DISTILL_MINUTES = 55.0  # the shipped recipe's budget (the issue allows at most 60 minutes on 2 cores)
LOSS_POINTS = 500  # at most this many points of the loss curve are kept in the student's JSON


class ConsistencyPair(nn.Module):
    """What the training loop trains: the online ``student`` (its ``forward``) and the ``target`` θ⁻, a frozen slow copy
    of it (Song et al. 2023, Algorithm 2) kept in the same state dict, so that checkpoints hold it and a resumed run
    continues exactly."""

    def __init__(self, student: ConsistencyStudent):
        super().__init__()
        self.student = student
        self.target = copy.deepcopy(student).requires_grad_(False).eval()
        self.config = student.config

    def forward(self, *args, **kwargs):
        return self.student(*args, **kwargs)


def loss_curve(losses, points: int = LOSS_POINTS) -> dict:
    """The training record's loss curve: ``{"losses": [...], "losses_every": k}``, the mean loss of each run of k
    steps (k = 1 up to ``points`` steps), so that the JSON, and its copy inside the weights file, stay small
    whatever the run's length (the student file must stay under 8 MB)."""
    losses = [float(v) for v in losses]
    every = max(1, math.ceil(len(losses) / points))
    means = [sum(losses[i:i + every]) / len(losses[i:i + every]) for i in range(0, len(losses), every)]
    return {"losses": [float(f"{v:.4g}") for v in means], "losses_every": every}


def evaluate_student(pipe: LatentDiffusionPipeline, n: int, judge, steps=DISTILLED_STEPS, seed: int = DENOISER_EVAL_SEED):
    """Prompt accuracy (:func:`sdlearn.metrics.prompt_accuracy`) of a pipeline whose denoiser is a consistency
    student, at each of ``steps`` with the :class:`~sdlearn.distill.ConsistencySampler` (guidance distilled in, so
    guidance_scale 1), on the captions of ``ShapesDataset(n, "train", seed=seed)`` (one-object full prompts); image i's
    noise from seed i → ``({steps: PromptAccuracy}, record)``."""
    started = time.perf_counter()
    prompts = ShapesDataset(n, "train", seed=seed).batch(range(n)).captions
    config = pipe.denoiser.config
    scores = {}
    for count in steps:
        sampler = ConsistencySampler(pipe.schedule, grid_steps=config.grid_steps, distilled_steps=config.distilled_steps)
        images = generate_for_eval(pipe, prompts, steps=count, guidance_scale=1.0, sampler=sampler)
        scores[count] = prompt_accuracy(images, prompts, judge)
    return scores, {
        "prompt_accuracy": {f"{count} step{'s' * (count != 1)}": round(s.overall, 4) for count, s in scores.items()},
        "prompts": f"captions of ShapesDataset({n}, 'train', seed={seed}) (one object, every attribute named)",
        "sampling": "consistency sampler (sdlearn.distill.ConsistencySampler), guidance distilled in; image i's noise "
                    "from seed i",
        "seconds": round(time.perf_counter() - started, 1),
    }


def train_distill(
    out_dir: str | os.PathLike | None = None,
    minutes: float | None = None,
    steps: int | None = None,
    device: str | torch.device = "auto",
    *,
    teacher: str | os.PathLike | None = None,
    text_encoder="shipped",
    vae=None,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 2e-4,
    target_decay: float = 0.95,
    ema_decay: float = 0.995,
    guidance_scale: float = 4.0,
    open_fraction: float = 0.5,
    threads: int | None = None,
    eval_images: int = 64,
    latent_window: int = LATENT_WINDOW,
    latent_refresh: int = LATENT_REFRESH,
    checkpoint_every: int = 250,
    precision: str = "fp32",
    progress: bool = True,
    resume: bool = True,
):
    """Distil the DiT ``teacher`` (None: the shipped ``denoiser.*``; or a folder / file of :func:`save_denoiser`, then
    with its own ``text_encoder`` and ``vae``: a path, as in :func:`sdlearn.recipes.train_denoiser`) into a
    consistency student → ``(student, result)``; the recipe behind ``python -m sdlearn train distill``. The returned
    student holds the EMA weights (eval mode).

    - **Data**: exactly the teacher's (:func:`sdlearn.denoiser_data.latent_batch_fn`): fresh Shapes scenes of one or two
      objects from ``split="train"``, encoded by the frozen VAE (a posterior sample times the scaling factor, through
      the same latent window), a fresh random caption per image (``open_fraction`` leave attributes open) read by the
      frozen text tower; no caption dropout (the student never draws unconditionally: guidance is distilled in).
    - **Student**: :meth:`ConsistencyStudent.from_teacher`, with the teacher's guidance ``guidance_scale`` (4, the
      pipeline's default) inside the pipeline's guidance interval t ≤ 0.6 T; the loss
      :func:`sdlearn.distill.consistency_distillation_loss` at a grid entry read from the batch's uniform t
      (n = ⌊t / k⌋); the target θ⁻ moves towards θ with ``target_decay`` (LCM's 0.95) before every step.
    - **Optimiser**: AdamW on the student alone, ``lr`` with 100 warm-up steps then cosine decay over the budget,
      gradient clipping at 1; an EMA of the weights with ``ema_decay`` is what is saved. Budget: ``minutes`` and/or
      ``steps``; neither means :data:`DISTILL_MINUTES` (55). ``threads`` sets ``torch.set_num_threads``; ``precision``
      as in every recipe ("fp32", or "bf16" autocast).
    - **Evaluation** (``eval_images`` > 0 and the shipped scene reader exists): :func:`evaluate_student` at 1, 2 and 4
      steps on ``eval_images`` one-object full prompts.

    With ``out_dir``: the checkpoint ``out_dir/student_checkpoint.*`` (student, target, EMA, optimiser, RNG; every
    ``checkpoint_every`` steps and at the end; resumed from when present) and the weights ``out_dir/student.*``
    (:func:`sdlearn.pretrained.save_student`, loadable by :func:`sdlearn.pretrained.load_student`)."""
    minutes, steps = default_budget(minutes, steps, default_minutes=DISTILL_MINUTES)
    check_positive_int(batch_size, "batch_size")
    for name, value, low, high in (("lr", lr, 0, math.inf), ("target_decay", target_decay, 0, 1),
                                   ("ema_decay", ema_decay, 0, 1), ("open_fraction", open_fraction, -1e-12, 1 + 1e-12)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < high:
            raise ValueError(f"{name} must be a number in ({low:g}, {high:g}), got {value!r}")
    if isinstance(eval_images, bool) or not isinstance(eval_images, int) or eval_images < 0:
        raise ValueError(f"eval_images must be a non-negative integer, got {eval_images!r}")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        set_threads(threads)
    device = resolve_device(device)
    teacher_file = weights_path("denoiser", teacher)
    teacher_model = load_denoiser(teacher, device).requires_grad_(False)
    if teacher_model.text_encoder_info is None:
        raise ValueError(f"{str(teacher_file)!r} holds an unconditional denoiser; distillation needs a text-conditioned one")
    schedule = NoiseSchedule.from_name(teacher_model.schedule_name)
    text_encoder, tokenizer, text_record = resolve_text_encoder(text_encoder, device)
    if text_encoder is None:
        raise ValueError("train_distill needs the text tower the teacher reads (text_encoder='shipped' or a path)")
    recorded = teacher_model.text_encoder_info.get("sha256")
    if recorded is not None and text_record.get("sha256") not in (None, recorded):
        warnings.warn(f"the teacher {str(teacher_file)!r} was trained with another text tower than "
                      f"{text_record['source']!r} (sha256 differs); pass its own as text_encoder", stacklevel=2)
    vae, vae_record = resolve_vae(vae, device)
    T = schedule.num_train_timesteps
    torch.manual_seed(seed)
    student = ConsistencyStudent.from_teacher(teacher_model, teacher_model.schedule_name, guidance_scale=guidance_scale,
                                              guidance_interval=(0.0, GUIDANCE_INTERVAL_END * T))
    pair = ConsistencyPair(student).to(device)
    k = T // student.config.grid_steps
    with torch.no_grad():
        ids, mask = tokenizer([""])
        empty = text_encoder(ids[:, :int(mask.sum())].to(device), mask[:, :int(mask.sum())].to(device))
    uncond_tokens, uncond_mask = empty.tokens, empty.mask  # [1, 2, D], [1, 2]: the empty prompt
    batch_fn = latent_batch_fn(vae, schedule, batch_size, seed, text_encoder=text_encoder, tokenizer=tokenizer,
                               caption_dropout=0.0, open_fraction=open_fraction, window=latent_window,
                               refresh=latent_refresh)

    def loss_fn(model, batch, step):
        update_target(model.target, model.student, target_decay)  # θ⁻ ← μ θ⁻ + (1 − μ) θ, after the last step
        return consistency_distillation_loss(model, model.target, teacher_model, batch["x0"], batch["tokens"],
                                             batch["mask"], uncond_tokens=uncond_tokens, uncond_mask=uncond_mask,
                                             noise=batch["noise"], index=batch["t"] // k)

    teacher_record = {"source": "shipped: sdlearn/weights/denoiser.safetensors" if teacher is None else str(teacher_file),
                      "sha256": file_sha256(teacher_file)}
    out_dir = Path(out_dir) if out_dir is not None else None
    run_config = {
        "model": "student", "student_config": student.config.to_dict(), "teacher": teacher_record["sha256"],
        "text_encoder": text_record.get("sha256", text_record["source"]),
        "vae": vae_record.get("sha256", vae_record["source"]), "batch_size": batch_size, "lr": lr,
        "target_decay": target_decay, "ema_decay": ema_decay, "open_fraction": open_fraction, "seed": seed,
        "latent_window": [latent_window, latent_refresh],
    }
    optimizer = torch.optim.AdamW(pair.student.parameters(), lr=lr, weight_decay=0.0)
    result = fit("student", pair, loss_fn, batch_fn, run_config, out_dir=out_dir, minutes=minutes, steps=steps, seed=seed,
                 resume=resume, progress=progress, optimizer=optimizer, warmup_steps=100, lr_schedule="cosine",
                 grad_clip=1.0, ema_decay=ema_decay, checkpoint_every=checkpoint_every, precision=precision)
    result.ema.copy_to(pair)
    student = pair.student.eval()

    training = training_record(
        result, run_config, ("batch_size", "lr", "target_decay", "ema_decay", "open_fraction", "seed"), device, steps,
        minutes, precision=precision, images_seen=result.step * batch_size,
        **loss_curve(result.losses),
        method="consistency distillation (Song et al. 2023, Algorithm 2) with LCM's guided DDIM solver, skipping step "
               f"k = {k}, boundary scalings σ_data = {student.config.sigma_data}, s = {student.config.timestep_scaling} "
               "(Luo et al. 2023); pseudo-Huber loss",
        weights=f"EMA (decay {ema_decay}), stored as float16",
        data=f"fresh Shapes scenes, split 'train': ShapesDataset(2**40, 'train', seed={DENOISER_DATA_SEED + seed}, "
             f"num_objects=(1, 2)), latents of a {latent_window}-image window, {latent_refresh} fresh images per step",
        vae=vae_record, teacher=teacher_record,
    )
    if eval_images > 0 and is_main_process():
        try:
            judge = load_scene_reader()
        except CheckpointError as e:
            training["evaluation"] = {"skipped": f"no scene reader to judge with ({e})"}
        else:
            pipe = LatentDiffusionPipeline(vae, text_encoder, tokenizer, student, schedule)
            training["evaluation"] = evaluate_student(pipe, eval_images, judge, student.config.distilled_steps)[1]
    scores = training.get("evaluation", {}).get("prompt_accuracy")
    summary = f"loss {result.final_loss:.4g}" + (f", prompt accuracy {scores}" if scores else "")
    student.schedule_name = teacher_model.schedule_name
    student.text_encoder_info = text_record
    return finish("student", student, result, training, out_dir,
                  lambda model, path, training: save_student(model, path, training=training, text_encoder=text_record,
                                                             teacher=teacher_record),
                  summary, progress)
