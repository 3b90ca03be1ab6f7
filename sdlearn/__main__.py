"""The command line: ``python -m sdlearn {generate,train,exercises} ...``.

Every failure a user can cause (a bad argument, a missing folder, a damaged weights file) ends
with a one-line message on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch

from sdlearn import recipes
from sdlearn.exercises import write_student_copies
from sdlearn.pipeline import to_pil
from sdlearn.plotting import save_image_grid
from sdlearn.pretrained import load_pipeline
from sdlearn.samplers import SAMPLER_NAMES
from sdlearn.training import resolve_device

# python -m sdlearn train NAME → the recipe; each takes out_dir, minutes, steps, device, seed.
TRAINERS = {
    "vae": recipes.train_vae,
    "clip": recipes.train_clip,
    "classifier": recipes.train_classifier,
    "scene_reader": recipes.train_scene_reader,
    "denoiser": recipes.train_denoiser,
    "all": recipes.train_all,
}


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line and exit with status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number ≥ 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m sdlearn", description="sdlearn: learn Stable Diffusion by building it.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    generate = commands.add_parser("generate", help="draw images for a prompt with the shipped (or your own) weights")
    generate.add_argument("prompt", help='what to draw, e.g. "a small red circle in the top left"')
    generate.add_argument("--negative", default=None, help="negative prompt (replaces the empty prompt in guidance)")
    generate.add_argument("--steps", type=_positive_int, default=20, help="sampling steps (default 20)")
    generate.add_argument("--guidance", type=_non_negative_float, default=4.0, help="guidance scale (default 4)")
    generate.add_argument("--sampler", choices=SAMPLER_NAMES, default="dpm++", help="sampler (default dpm++)")
    generate.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    generate.add_argument("--n", type=_positive_int, default=1, help="number of images (default 1)")
    generate.add_argument("--out", default=None, help="PNG file for a grid of the images")
    generate.add_argument("--out-dir", default=None, help="folder for one 32×32 PNG per image")
    generate.add_argument("--weights", default=None, help="folder written by 'train all' (default: the shipped weights)")
    generate.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")

    train = commands.add_parser("train", help="train a model of the course from scratch")
    train.add_argument("model", choices=sorted(TRAINERS), help="which model to train")
    train.add_argument("--minutes", type=_positive_float, default=None, help="stop after this many minutes")
    train.add_argument("--steps", type=_positive_int, default=None, help="stop after this many optimiser steps")
    train.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    train.add_argument("--out", default=None, help="folder for the checkpoint and weights (default: runs/MODEL)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    train.add_argument("--data", default="shapes", help="'shapes' (default) or a folder of your own images (vae only)")
    train.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch (default: torch's choice)")
    train.add_argument(
        "--prediction-type", choices=["epsilon", "v_prediction", "sample"], default=None,
        help="what the denoiser predicts (denoiser only; default epsilon)",
    )

    exercises = commands.add_parser("exercises", help="write student copies of the notebooks, solutions removed")
    exercises.add_argument("out_dir", help="folder to write the student notebooks into")
    exercises.add_argument("--force", action="store_true", help="write into a folder that is not empty")
    return parser


def generate_to_files(
    prompt: str,
    out: str | os.PathLike | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    negative_prompt: str | None = None,
    num_inference_steps: int = 20,
    guidance_scale: float = 4.0,
    sampler: str = "dpm++",
    seed: int | None = 0,
    num_images_per_prompt: int = 1,
    weights: str | os.PathLike | None = None,
    device: str = "cpu",
    nrow: int = 8,
    progress: bool = True,
) -> list[Path]:
    """What ``python -m sdlearn generate`` does: load the pipeline (the shipped weights, or the folder ``weights``
    that ``python -m sdlearn train all`` wrote), generate ``num_images_per_prompt`` images of ``prompt``, and write them as
    one grid PNG to ``out`` and/or one PNG per image (``out_dir/NNN.png``, 32×32). Returns the paths written.
    Folders are created as needed. Bad arguments raise ``ValueError`` before any image is drawn."""
    if out is None and out_dir is None:
        raise ValueError("nothing to write: give --out FILE.png and/or --out-dir DIR")
    if sampler not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLER_NAMES)}")
    if out is not None and Path(out).suffix.lower() not in (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"):
        raise ValueError(f"--out must name an image file such as out.png, got {str(out)!r}")
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValueError(f"--out-dir {str(out_dir)!r} exists and is not a folder")
    pipe = load_pipeline(weights, device=resolve_device(device))
    images = pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                  guidance_scale=guidance_scale, sampler=sampler, seed=seed, num_images_per_prompt=num_images_per_prompt,
                  progress=progress)
    written = []
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        written.append(save_image_grid(images, out, nrow=nrow))
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        for i, picture in enumerate(to_pil(images)):
            path = Path(out_dir) / f"{i:03d}.png"
            picture.save(path)
            written.append(path)
    return written


def _run(args: argparse.Namespace) -> int:
    if args.command == "exercises":
        written = write_student_copies(args.out_dir, force=args.force)
        for path in written:
            print(path)
        print(f"wrote {len(written)} student notebooks to {args.out_dir}")
        return 0

    if args.command == "generate":
        written = generate_to_files(
            args.prompt, args.out, out_dir=args.out_dir, negative_prompt=args.negative, num_inference_steps=args.steps,
            guidance_scale=args.guidance, sampler=args.sampler, seed=args.seed, num_images_per_prompt=args.n,
            weights=args.weights, device=args.device,
        )
        for path in written:
            print(path)
        return 0

    if args.command == "train":
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        train_fn = TRAINERS[args.model]
        kwargs = dict(out_dir=args.out or f"runs/{args.model}", minutes=args.minutes, steps=args.steps, device=args.device, seed=args.seed)
        if args.data != "shapes":
            if args.model != "vae":
                raise ValueError(f"--data PATH is supported by 'train vae' only, not by 'train {args.model}'")
            kwargs["data"] = args.data
        if args.prediction_type is not None:
            if args.model not in ("denoiser", "all"):
                raise ValueError(f"--prediction-type is for 'train denoiser' only, not 'train {args.model}'")
            kwargs["prediction_type"] = args.prediction_type
        train_fn(**kwargs)
        return 0
    raise AssertionError(args.command)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (an unknown word, a third object, a prompt too long) as one line, without the source line."""
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    shown, warnings.showwarning = warnings.showwarning, _one_line_warning
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError) as error:
        print(f"python -m sdlearn {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
