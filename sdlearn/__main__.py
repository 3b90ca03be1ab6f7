"""The command line: ``python -m sdlearn {generate,train,exercises} ...``.

Every failure a user can cause (a bad argument, a missing folder, a damaged weights file) ends
with a one-line message on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# python -m sdlearn train NAME → (module, function); each function takes out_dir, minutes, steps, device, seed.
TRAINERS = {
    "vae": ("sdlearn.training", "train_vae"),
    "clip": ("sdlearn.text", "train_clip"),
    "classifier": ("sdlearn.metrics", "train_classifier"),
    "denoiser": ("sdlearn.training", "train_denoiser"),
    "all": ("sdlearn.training", "train_all"),
}
SAMPLERS = ("ddpm", "ddim", "euler", "heun", "dpm++")  # sdlearn.samplers.SAMPLER_NAMES, literal so --help needs no torch


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
    generate.add_argument("--sampler", choices=SAMPLERS, default="dpm++", help="sampler (default dpm++)")
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


def _run(args: argparse.Namespace) -> int:
    if args.command == "exercises":
        from sdlearn.exercises import write_student_copies

        written = write_student_copies(args.out_dir, force=args.force)
        for path in written:
            print(path)
        print(f"wrote {len(written)} student notebooks to {args.out_dir}")
        return 0

    if args.command == "generate":
        from sdlearn.pipeline import generate_to_files

        written = generate_to_files(
            args.prompt, args.out, out_dir=args.out_dir, negative_prompt=args.negative, num_inference_steps=args.steps,
            guidance_scale=args.guidance, sampler=args.sampler, seed=args.seed, num_images=args.n,
            weights=args.weights, device=args.device,
        )
        for path in written:
            print(path)
        return 0

    if args.command == "train":
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        module_name, function_name = TRAINERS[args.model]
        train_fn = getattr(importlib.import_module(module_name), function_name)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError) as error:
        print(f"python -m sdlearn {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
