"""The command line: ``python -m sdlearn {train,exercises} ...``.

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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m sdlearn", description="sdlearn: learn Stable Diffusion by building it.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

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
            if args.model != "denoiser":
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
