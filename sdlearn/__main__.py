"""The command line: ``python -m sdlearn {generate,train,exercises} ...``.

Every failure a user can cause (a bad argument, a missing folder, a damaged weights file, a full disk, a
read-only place) ends with a one-line message on stderr and exit status 2, never a traceback, and leaves no
partial file: every file is written whole or not at all (a temporary file in the same folder, then a rename).

- ``generate`` draws the images in batches of :data:`GENERATE_BATCH` and writes each batch's files before the
  next is drawn, so memory stays flat whatever ``--n`` is; images that come out NaN or infinite (a guidance
  scale far too large) are refused, never written.
- ``train`` checks that ``--out`` can be written before the first step; Ctrl-C or SIGTERM saves a checkpoint,
  prints the command that resumes (one line) and exits with status 130; weights that cannot be written at the
  end are saved to a rescue folder, which the error names.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import io
import math
import os
import shlex
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from sdlearn import adapt_recipes, control_recipes, distill_recipes, own_data, recipes
from sdlearn.adapt import adapter_file_bytes, parse_method
from sdlearn.checkpoint import atomic_write_bytes
from sdlearn.control import edge_map
from sdlearn.exercises import write_student_copies, write_teacher_copies
from sdlearn.flow import FLOW_SAMPLERS
from sdlearn.pipeline import SEED_HIGH, check_seed, to_pil
from sdlearn.plotting import image_grid, to_image
from sdlearn.pretrained import DENOISERS, FAST_STEPS, load_pipeline
from sdlearn.samplers import SAMPLER_NAMES
from sdlearn.stable_diffusion import load_diffusers_pipeline
from sdlearn.training import TrainingInterrupted, check_writable_folder, resolve_device, set_threads

# python -m sdlearn train NAME → the recipe; each takes out_dir, minutes, steps, device, seed (and precision, data,
# prediction_type when they are given).
TRAINERS = {
    "vae": recipes.train_vae,
    "clip": recipes.train_clip,
    "classifier": recipes.train_classifier,
    "scene_reader": recipes.train_scene_reader,
    "denoiser": recipes.train_denoiser,
    "unet": recipes.train_unet,
    "flow": recipes.train_flow,
    "all": recipes.train_all,
    "distill": distill_recipes.train_distill,  # the few-step student of the shipped DiT (sdlearn.distill)
    "controlnet": control_recipes.train_controlnet,  # the ControlNet of the shipped DiT (sdlearn.control)
}
# python -m sdlearn train NAME --data FOLDER → the recipe for a folder of your own images (sdlearn.own_data); it also
# takes the folder, as ``data``. The classifier and the scene reader read Shapes scenes only.
FOLDER_TRAINERS = {
    "vae": recipes.train_vae,
    "clip": own_data.train_clip_on_folder,
    "all": own_data.train_all_on_folder,
}
ADAPTER_CONCEPTS = {"star": None}  # train adapter --concept NAME → its examples (None: sdlearn.data.star_examples)
ADAPTER_OPTIONS = ("concept", "method", "rank", "lr", "prior", "augment", "timesteps")  # the options of 'train adapter' alone
ADAPTER_AUGMENT = "move+mirror"  # train adapter's default: each example moved to every position and mirrored
ADAPTER_TIMESTEPS = "flow_matched"  # train adapter's default noise levels: the shipped DiT's (sdlearn.adapt.adapter_batch_fn)
ADAPTER_LR_SCHEDULE = "cosine"  # train adapter's learning rates decay to 0 over the steps
ADAPTER_PRIOR = {"num_prior": 256, "prior_batch_size": 8, "prior_caption_dropout": 0.1, "prior_target": "base"}
"""train adapter's prior term: 256 images drawn, 8 per step, a tenth of their captions empty, the base model's
answers as the target (sdlearn.adapt_recipes.train_adapter)."""
ADAPTER_PRIOR_WEIGHT = 0.5
"""train adapter's λ for the methods that change the denoiser (textual inversion alone keeps λ = 0): half of
DreamBooth's λ = 1, which on the shipped DiT held the star's colours back (the weights card's table)."""
PRECISION_HELP = ("fp32 (default), or bf16: bfloat16 autocast over float32 weights, optimizer state and EMA, meant "
                  "for CUDA GPUs; it also runs on the CPU (correct, rarely faster), not on mps")


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line and exit with status 2."""

    def error(self, message: str):
        # an argument holding a line break or another control character is quoted as Python would ("\\r"), so the
        # error stays one line
        message = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(text: str, expected: str, kind=float):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text, "a positive number")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = _number(text, "a positive integer", int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    value = _number(text, "a number ≥ 0")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number ≥ 0, got {text!r}")
    return value


TRAIN_SEED_HIGH = 2**32 - 1  # the recipes derive a generator per step from seed · 1,000,003 + step, which must fit 64 bits


def _seed_in(high: int):
    def seed(text: str) -> int:
        value = _number(text, f"a whole number from 0 to {high}", int)
        if not 0 <= value <= high:
            raise argparse.ArgumentTypeError(f"seed {value} is out of range: expected a whole number from 0 to {high}")
        return value

    seed.__name__ = "seed"
    return seed


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m sdlearn", description="sdlearn: learn Stable Diffusion by building it.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    generate = commands.add_parser("generate", help="draw images for a prompt with the shipped (or your own) weights")
    generate.add_argument("prompt", help='what to draw, e.g. "a small red circle in the top left"')
    generate.add_argument("--negative", default=None, help="negative prompt (replaces the empty prompt in guidance)")
    generate.add_argument("--steps", type=_positive_int, default=None,
                          help="sampling steps (default 20; with --denoiser fast 4; with --diffusers 50, as Stable "
                               "Diffusion)")
    generate.add_argument("--guidance", type=_non_negative_float, default=None,
                          help="guidance scale (default 4; with --diffusers 7.5; --denoiser fast has it distilled in: "
                               "leave it out)")
    generate.add_argument("--sampler", choices=SAMPLER_NAMES, default=None,
                          help="sampler (default dpm++; with --denoiser flow euler, its flow sampler (heun the other); "
                               "with --denoiser fast its consistency sampler; with --diffusers ddim)")
    generate.add_argument("--seed", type=_seed_in(SEED_HIGH), default=0, help="random seed, 0 to 2**64 - 1 (default 0)")
    generate.add_argument("--n", type=_positive_int, default=1, help="number of images (default 1)")
    generate.add_argument("--out", default=None, help=f"PNG file for a grid of the images (at most {MAX_GRID_IMAGES})")
    generate.add_argument("--out-dir", default=None, help="folder for one 32×32 PNG per image")
    generate.add_argument("--weights", default=None, help="folder written by 'train all' (default: the shipped weights)")
    generate.add_argument("--denoiser", choices=[*DENOISERS, "fast"], default="dit",
                          help="dit (default: the transformer, denoiser.*), unet (the course U-Net, unet.*, written "
                               "by 'train unet'), flow (the transformer trained with rectified flow, flow.*, written by "
                               "'train flow') or fast (the few-step student distilled from the transformer, student.*, "
                               "written by 'train distill'; 4 steps by default)")
    generate.add_argument("--diffusers", default=None, metavar="PATH",
                          help="a local Stable Diffusion v1/v2 folder in diffusers' format (model_index.json, unet/, "
                               "vae/, ...), run by sdlearn's own U-Net, samplers and guidance; nothing is downloaded")
    generate.add_argument("--control-image", default=None, metavar="PNG",
                          help="a 32×32 PNG, an outline or a filled silhouette (white on black): the shipped ControlNet "
                               "draws the object there (with the DiT only)")
    generate.add_argument("--storage-dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                          help="with --diffusers: the U-Net's Linear and conv weights kept in this dtype, computed in "
                               "float32 (default float16: SD v1.5's U-Net in 1.7 GB instead of 3.4 GB)")
    generate.add_argument("--height", type=_positive_int, default=None,
                          help="image height with --diffusers (default: the model's, 512 for SD v1.5)")
    generate.add_argument("--width", type=_positive_int, default=None,
                          help="image width with --diffusers (default: the model's, 512 for SD v1.5)")
    generate.add_argument("--adapter", default=None, metavar="star|FILE",
                          help="star: the shipped adapter that teaches the word 'star' (or an adapter file that "
                               "'train adapter' wrote); with the DiT only")
    generate.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")

    train = commands.add_parser("train", help="train a model of the course from scratch")
    train.add_argument("model", choices=sorted([*TRAINERS, "adapter"]), help="which model to train")
    train.add_argument("--minutes", type=_positive_float, default=None, help="stop after this many minutes")
    train.add_argument("--steps", type=_positive_int, default=None, help="stop after this many optimiser steps")
    train.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    train.add_argument("--out", default=None, help="folder for the checkpoint and weights (default: runs/MODEL)")
    train.add_argument("--seed", type=_seed_in(TRAIN_SEED_HIGH), default=0, help="random seed, 0 to 2**32 - 1 (default 0)")
    train.add_argument("--data", default="shapes",
                       help="'shapes' (default), or a folder of your own images with captions.jsonl (vae, clip, all: "
                            "'train all --data FOLDER' trains every model on it, the text tower on its captions' words)")
    train.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help=PRECISION_HELP)
    train.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch, at most the number of cores (default: torch's choice)")
    train.add_argument(
        "--prediction-type", choices=["epsilon", "v_prediction", "sample"], default=None,
        help="what the denoiser predicts (denoiser, unet and all; default epsilon)",
    )

    train.add_argument("--concept", choices=list(ADAPTER_CONCEPTS), default=None,
                       help="train adapter: the concept to teach (star, the only one; default star)")
    train.add_argument("--method", default=None,
                       help="train adapter: lora (default), ti, dreambooth or a combination such as ti+lora")
    train.add_argument("--rank", type=_positive_int, default=None, help="train adapter: LoRA's rank (default 4)")
    train.add_argument("--lr", type=_positive_float, default=None,
                       help="train adapter: one learning rate for every part (default: each part's own)")
    train.add_argument("--prior", choices=["shapes", "class"], default=None,
                       help="train adapter: the prior-preservation images, the model's own drawings of the old prompts "
                            "(shapes, default) or of the examples' class prompts (class, DreamBooth's)")
    train.add_argument("--augment", choices=["move+mirror", "move", "mirror", "none"], default=None,
                       help="train adapter: more images made from the examples, each moved to every position and/or "
                            "mirrored left-right (default move+mirror; none: the examples only)")
    train.add_argument("--timesteps", choices=["uniform", "flow_matched"], default=None,
                       help=f"train adapter: the noise levels it learns at, uniform t or the flow-matched ones the "
                            f"shipped DiT was trained with (default {ADAPTER_TIMESTEPS})")

    exercises = commands.add_parser("exercises", help="write student copies of the notebooks, solutions removed "
                                                      "(or, with --teacher, the teacher's copies: the answer key)")
    exercises.add_argument("out_dir", help="folder to write the notebooks into")
    exercises.add_argument("--force", action="store_true", help="write into a folder that is not empty")
    exercises.add_argument("--teacher", action="store_true",
                           help="write the teacher's copies instead: solutions, outputs and the experiments' rubrics "
                                "kept, and a list of each notebook's exercises and how each is graded")
    return parser


GENERATE_BATCH = 64  # images per call of the pipeline: memory stays flat whatever --n is
MAX_GRID_IMAGES = 1024  # --out: a grid of more images is too large to look at; use --out-dir
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_file_name(index: int, count: int) -> str:
    """The name of image ``index`` of ``count`` in ``--out-dir``: ``000.png``, ``001.png``, ... (more digits when
    ``count`` > 1000, so that the names sort in order)."""
    return f"{index:0{max(3, len(str(count - 1)))}d}.png"


def _reworded(error: Exception, message: str) -> Exception:
    """The same kind of error (a ``ValueError`` or an ``OSError``) with a message of one line that says more."""
    try:
        return type(error)(message)
    except TypeError:  # a subclass whose constructor takes other arguments
        return (OSError if isinstance(error, OSError) else ValueError)(message)


def _encode_image(picture: Image.Image, suffix: str) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=Image.registered_extensions()[suffix.lower()])
    return buffer.getvalue()


def _write_image(picture: Image.Image, path: Path) -> Path:
    """Encode ``picture`` in memory, then write it atomically: ``path`` is the whole image or untouched."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, _encode_image(picture, path.suffix))
    except OSError as error:
        raise _reworded(error, f"could not write {str(path)!r} ({error.strerror or error})") from None
    return path


def _grid_picture(images: torch.Tensor, nrow: int) -> Image.Image:
    """The grid PNG's picture, as :func:`sdlearn.plotting.save_image_grid` draws it."""
    return Image.fromarray((to_image(image_grid(images, nrow=nrow)) * 255).round().astype(np.uint8))


def _check_writable(option: str, folder: Path) -> None:
    try:
        check_writable_folder(folder, create=False)
    except OSError as error:
        raise _reworded(error, f"{option}: {error}") from None


def read_control_image(path: str | os.PathLike) -> torch.Tensor:
    """A 32 × 32 PNG (an outline or a filled silhouette, white on black) → its edge map ``[1, 1, 32, 32]`` in {0, 1}
    (:func:`sdlearn.control.edge_map` of its grayscale in [0, 1]: an outline stays itself, a silhouette becomes its
    outline); a file that is not a 32 × 32 image raises ValueError in one line."""
    try:
        with Image.open(path) as image:
            gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0  # [H, W] in [0, 1]
    except (OSError, ValueError) as e:
        raise ValueError(f"--control-image {str(path)!r}: not an image PIL can read ({e})") from None
    if gray.shape != (32, 32):
        raise ValueError(f"--control-image {str(path)!r} is {gray.shape[1]} × {gray.shape[0]} pixels; expected a "
                         f"32 × 32 outline or silhouette, white on black")
    return edge_map(torch.from_numpy(gray)[None, None])  # [1, 1, 32, 32]


def _check_outputs(out, out_dir, count: int) -> tuple[Path | None, Path | None]:
    """Refuse outputs that cannot be written, before any image is drawn."""
    out = Path(out) if out is not None else None
    out_dir = Path(out_dir) if out_dir is not None else None
    if out is None and out_dir is None:
        raise ValueError("nothing to write: give --out FILE.png and/or --out-dir DIR")
    if out is not None:
        if out.suffix.lower() not in IMAGE_SUFFIXES or out.suffix.lower() not in Image.registered_extensions():
            raise ValueError(f"--out must name an image file such as out.png, got {str(out)!r}")
        if out.is_dir():
            raise ValueError(f"--out {str(out)!r} is a folder; name the grid's file, e.g. {str(out / 'grid.png')!r}")
        if count > MAX_GRID_IMAGES:
            raise ValueError(f"--out draws all the images in one grid, at most {MAX_GRID_IMAGES}; for --n {count} "
                             "use --out-dir DIR (one file per image)")
        _check_writable("--out", out.parent)
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"--out-dir {str(out_dir)!r} exists and is not a folder")
        _check_writable("--out-dir", out_dir)
    if out is not None and out_dir is not None:
        same_folder = os.path.realpath(out.parent) == os.path.realpath(out_dir)
        stem = out.stem
        if same_folder and out.suffix.lower() == ".png" and stem.isascii() and stem.isdigit() and int(stem) < count \
                and out.name.lower() == image_file_name(int(stem), count):
            raise ValueError(f"--out {str(out)!r} is also where --out-dir puts image {int(stem)}, so one would "
                             f"overwrite the other; name the grid otherwise, e.g. {str(out.with_name('grid.png'))!r}")
    return out, out_dir


def generate_files(
    prompt: str,
    out: str | os.PathLike | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    negative_prompt: str | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    sampler: str | None = None,
    seed: int | None = 0,
    num_images_per_prompt: int = 1,
    weights: str | os.PathLike | None = None,
    device: str = "cpu",
    nrow: int = 8,
    progress: bool = True,
    batch_size: int = GENERATE_BATCH,
    denoiser: str = "dit",
    diffusers: str | os.PathLike | None = None,
    height: int | None = None,
    width: int | None = None,
    adapter: str | os.PathLike | None = None,
    storage_dtype: str = "float16",
    control_image: str | os.PathLike | None = None,
) -> Iterator[Path]:
    """:func:`generate_to_files`, yielding each path as soon as its file is written (what the command line prints).

    The images are drawn ``batch_size`` at a time from one generator seeded with ``seed``, and each batch's files
    are written before the next batch is drawn, so memory does not grow with ``num_images_per_prompt``. For up to
    ``batch_size`` images this is exactly one call of the pipeline; beyond, a deterministic sampler (all but
    ``"ddpm"``) gives the same images as one call for all of them, since the batches draw their starting noise
    one after the other from the same generator. ``out`` (the grid) holds at most :data:`MAX_GRID_IMAGES`.

    ``diffusers``: a local Stable Diffusion folder in diffusers' format, run by
    :func:`sdlearn.stable_diffusion.load_diffusers_pipeline` (sdlearn's U-Net, samplers and guidance) instead of the
    course's weights, one network at a time and the U-Net's weights stored in ``storage_dtype`` (computed in float32);
    ``height``/``width``/``storage_dtype`` are for it only. Unset steps, guidance and sampler take the course's
    defaults (20, 4, dpm++) or, with ``diffusers``, Stable Diffusion's (50, 7.5, ddim). ``adapter``: as in
    :func:`sdlearn.pretrained.load_pipeline` ("star", or an adapter file). ``control_image``: a 32 × 32 PNG, an
    outline or a filled silhouette (white on black; read as grayscale in [0, 1]), whose edge map
    (:func:`sdlearn.control.edge_map`) steers the shipped ControlNet (``load_pipeline(controlnet=True)``)."""
    if diffusers is not None:
        if weights is not None or denoiser != "dit" or adapter is not None:
            raise ValueError("--diffusers runs that folder's own models: leave out --weights, --denoiser and --adapter")
        defaults = (50, 7.5, "ddim")
    else:
        if height is not None or width is not None:
            raise ValueError("--height and --width are for --diffusers: the course's models draw 32 × 32 images")
        if denoiser == "fast" and guidance_scale not in (None, 1):
            raise ValueError(f"--denoiser fast has guidance distilled in (one pass per step); leave out --guidance, "
                             f"got {guidance_scale:g}")
        defaults = (FAST_STEPS, 1.0, "lcm") if denoiser == "fast" else (20, 4.0, "euler" if denoiser == "flow" else "dpm++")
    num_inference_steps, guidance_scale, sampler = (
        default if value is None else value for value, default in zip((num_inference_steps, guidance_scale, sampler),
                                                                      defaults))
    if sampler not in SAMPLER_NAMES and not (sampler == "lcm" and denoiser == "fast"):
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLER_NAMES)}")
    if denoiser == "flow" and sampler not in FLOW_SAMPLERS:
        raise ValueError(f"--denoiser flow was trained with rectified flow: its samplers are "
                         f"{' and '.join(FLOW_SAMPLERS)}, not {sampler} (a diffusion sampler)")
    for name, value in (("num_images_per_prompt", num_images_per_prompt), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a whole number ≥ 1, got {value!r}")
    count, batch_size = int(num_images_per_prompt), int(batch_size)
    out, out_dir = _check_outputs(out, out_dir, count)
    if control_image is not None:
        if diffusers is not None or denoiser != "dit":
            raise ValueError("--control-image steers the course's DiT: leave out --diffusers and --denoiser")
        control = read_control_image(control_image)
    generator = torch.Generator().manual_seed(check_seed(seed)) if seed is not None else None
    if diffusers is not None:
        pipe = load_diffusers_pipeline(diffusers, device=resolve_device(device), low_memory=True,  # one network at a time
                                       storage_dtype=storage_dtype)
        size = pipe.image_size(height, width)
        draw = functools.partial(pipe, height=size[0], width=size[1])
    else:
        pipe = draw = load_pipeline(weights, device=resolve_device(device), denoiser=denoiser, adapter=adapter,
                                    controlnet=control_image is not None)
        if control_image is not None:
            draw = functools.partial(pipe, control_image=control.to(pipe.device))

    def refuse_non_finite(i, t, latents, x0_pred) -> None:
        if not torch.isfinite(latents).all():
            raise ValueError(f"the images became NaN or infinite at sampling step {i + 1} (guidance scale "
                             f"{guidance_scale:g}; useful values lie between about 1 and 10)")

    bar = None
    if progress and count > batch_size:
        bar = tqdm(total=count, desc="generate", unit="image", dynamic_ncols=True)
    grid, written = [], 0
    try:
        for start in range(0, count, batch_size):
            size = min(batch_size, count - start)
            images = draw(prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, sampler=sampler, generator=generator,
                          num_images_per_prompt=size, progress=progress and bar is None, callback=refuse_non_finite)
            images = images.to("cpu")  # [size, 3, 32, 32] (SD: [size, 3, height, width])
            if not torch.isfinite(images).all():
                raise ValueError(f"the decoded images hold NaN or infinite values (guidance scale {guidance_scale:g})")
            if out_dir is not None:
                for offset, picture in enumerate(to_pil(images)):
                    yield _write_image(picture, out_dir / image_file_name(start + offset, count))
                    written += 1
            if out is not None:
                grid.append(images)
            if bar is not None:
                bar.update(size)
        if out is not None:
            yield _write_image(_grid_picture(torch.cat(grid), nrow), out)
    except (ValueError, OSError) as error:
        if written:
            raise _reworded(error, f"{error}; the first {written} of {count} images were written to "
                                   f"{str(out_dir)!r}") from None
        raise _reworded(error, f"{error}; nothing was written") from None
    finally:
        if bar is not None:
            bar.close()


def generate_to_files(
    prompt: str,
    out: str | os.PathLike | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    negative_prompt: str | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    sampler: str | None = None,
    seed: int | None = 0,
    num_images_per_prompt: int = 1,
    weights: str | os.PathLike | None = None,
    device: str = "cpu",
    nrow: int = 8,
    progress: bool = True,
    batch_size: int = GENERATE_BATCH,
    denoiser: str = "dit",
) -> list[Path]:
    """What ``python -m sdlearn generate`` does: load the pipeline (the shipped weights, or the folder ``weights``
    that ``python -m sdlearn train all`` wrote; ``denoiser``: "dit", "unet", "flow" or "fast", as in
    :func:`sdlearn.pretrained.load_pipeline`; unset steps and guidance: 20 and 4, or for "fast" 4 steps and the
    guidance distilled into it), generate ``num_images_per_prompt`` images of ``prompt``, and write them as
    one grid PNG to ``out`` (at most :data:`MAX_GRID_IMAGES` images) and/or one PNG per image (``out_dir/NNN.png``,
    32×32). Returns the paths written. Folders are created as needed.

    Bad arguments, and outputs that cannot be written (a folder where a file is meant, a read-only place, the
    grid's name clashing with an image's), raise ``ValueError`` or ``OSError`` before any image is drawn. Every file
    is written atomically (whole, or not at all); images that come out NaN or infinite raise ``ValueError`` and are
    never written. Images are drawn ``batch_size`` at a time (see :func:`generate_files`). The grid, written last,
    comes first in the list."""
    written = list(generate_files(
        prompt, out, out_dir=out_dir, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, sampler=sampler, seed=seed, num_images_per_prompt=num_images_per_prompt,
        weights=weights, device=device, nrow=nrow, progress=progress, batch_size=batch_size, denoiser=denoiser))
    return written[-1:] + written[:-1] if out is not None else written


def _run(args: argparse.Namespace) -> int:
    if args.command == "exercises":
        write = write_teacher_copies if args.teacher else write_student_copies
        written = write(args.out_dir, force=args.force)
        for path in written:
            print(path)
        print(f"wrote {len(written)} {'teacher' if args.teacher else 'student'} notebooks to {args.out_dir}")
        return 0

    if args.command == "generate":
        for path in generate_files(
            args.prompt, args.out, out_dir=args.out_dir, negative_prompt=args.negative, num_inference_steps=args.steps,
            guidance_scale=args.guidance, sampler=args.sampler, seed=args.seed, num_images_per_prompt=args.n,
            weights=args.weights, device=args.device, denoiser=args.denoiser, diffusers=args.diffusers,
            height=args.height, width=args.width, adapter=args.adapter, storage_dtype=args.storage_dtype,
            control_image=args.control_image,
        ):
            print(path, flush=True)
        return 0

    if args.command == "train" and args.model == "adapter":
        return _train_adapter(args)
    if args.command == "train":
        given = [f"--{name}" for name in ADAPTER_OPTIONS if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for 'train adapter', not "
                             f"'train {args.model}'")
        train_fn = TRAINERS[args.model]
        kwargs = dict(out_dir=args.out or f"runs/{args.model}", minutes=args.minutes, steps=args.steps, device=args.device, seed=args.seed)
        if args.precision != "fp32":  # every recipe's default is fp32
            parameters = inspect.signature(train_fn).parameters
            if "precision" not in parameters and not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
                raise ValueError(f"--precision is not an option of 'train {args.model}' (it trains in fp32)")
            kwargs["precision"] = args.precision
        if args.data != "shapes":
            if args.model not in FOLDER_TRAINERS:
                why = ("it needs the folder's own VAE and text tower: use 'train all --data FOLDER'"
                       if args.model in ("denoiser", "unet") else "it reads Shapes scenes only")
                raise ValueError(f"--data FOLDER works with 'train vae', 'train clip' and 'train all', not "
                                 f"'train {args.model}': {why}")
            train_fn = FOLDER_TRAINERS[args.model]
            kwargs["data"] = args.data
        if args.prediction_type is not None:
            if args.model not in ("denoiser", "unet", "all"):  # train flow's objective is fixed
                raise ValueError(f"--prediction-type is for 'train denoiser', 'train unet' and 'train all', not "
                                 f"'train {args.model}'")
            kwargs["prediction_type"] = args.prediction_type
        _check_writable("--out", Path(kwargs["out_dir"]))  # before the first step, not after an hour of training
        if args.threads is not None:
            set_threads(args.threads)
        train_fn(**kwargs)
        return 0
    raise AssertionError(args.command)


def _train_adapter(args: argparse.Namespace) -> int:
    """``python -m sdlearn train adapter``: :func:`sdlearn.adapt_recipes.train_adapter` on the shipped pipeline,
    writing ``--out``/adapter.* (default runs/adapter)."""
    method = args.method or "lora"
    parts = parse_method(method)  # a bad method: one line, before anything loads
    for option, value in (("--data", args.data != "shapes"), ("--prediction-type", args.prediction_type is not None),
                          ("--precision", args.precision != "fp32")):
        if value:
            raise ValueError(f"{option} is not an option of 'train adapter' (it adapts the shipped DiT, in fp32)")
    if args.rank is not None and "lora" not in parts:
        raise ValueError(f"--rank is LoRA's rank; method {method!r} trains no LoRA")
    out_dir = Path(args.out or "runs/adapter")
    _check_writable("--out", out_dir)
    if args.threads is not None:
        set_threads(args.threads)
    options = {"rank": args.rank} if args.rank is not None else {}
    if parts != {"ti"}:  # textual inversion alone cannot change an old prompt's image: no prior
        options["prior_weight"] = ADAPTER_PRIOR_WEIGHT
    pipe, result = adapt_recipes.train_adapter(method, ADAPTER_CONCEPTS[args.concept or "star"], steps=args.steps,
                                               minutes=args.minutes, lr=args.lr, seed=args.seed, out_dir=out_dir,
                                               device=args.device, prior=args.prior or "shapes", **ADAPTER_PRIOR,
                                               augment=None if args.augment == "none" else args.augment or ADAPTER_AUGMENT,
                                               timesteps=args.timesteps or ADAPTER_TIMESTEPS,
                                               lr_schedule=ADAPTER_LR_SCHEDULE,
                                               **options)
    path = out_dir / "adapter.safetensors"
    print(f"adapter ({method}, concept {args.concept or 'star'}): {result.step} steps in {result.seconds / 60:.1f} min; "
          f"wrote {path} ({adapter_file_bytes(path):,} bytes with its .json)")
    return 0


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (an unknown word, a third object, a prompt too long) as one line, without the source line."""
    print(f"warning: {_one_line(message)}", file=sys.stderr if file is None else file)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())  # a message that spans lines (a config diff) becomes one


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    shown, warnings.showwarning = warnings.showwarning, _one_line_warning
    try:
        return _run(args)
    except (ValueError, OSError, ImportError) as error:  # OSError: a full disk, a read-only place, a folder where a
        # file is meant; ImportError: --diffusers without diffusers or transformers installed
        print(f"python -m sdlearn {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except TrainingInterrupted as error:
        print(f"python -m sdlearn {args.command}: {_one_line(error)}; resume with: python -m sdlearn "
              f"{shlex.join(argv)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
