"""Binding errors as the denoiser trains: prompt accuracy of two-object colour + shape prompts at checkpoints.

    python benchmarks/binding_by_step.py CHECKPOINT.safetensors [...] [--n 256] [--guidance 4] [--weights DIR]

Each file is a training checkpoint of ``python -m sdlearn train denoiser`` (its ``ema/…`` tensors are the weights
evaluated), read with the shipped VAE and text tower (or those of ``--weights DIR``, e.g. the folder of
``python -m sdlearn train all``, whose denoiser was trained on its own) and judged by the shipped scene reader. Prompts: colour + shape captions of
``ShapesDataset(n, "train", seed=4246, num_objects=2)`` ("a red circle and a blue square"), 20 DPM-Solver++ steps,
image i's noise from seed i. Prints, per checkpoint, the step, the accuracy with its 95% interval and the binding
errors (images that would be right if the named attributes could attach to either object).
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from sdlearn.data import ShapesDataset, caption_for
from sdlearn.denoiser import Denoiser, DenoiserConfig
from sdlearn.metrics import prompt_accuracy
from sdlearn.pipeline import LatentDiffusionPipeline
from sdlearn.pretrained import load_scene_reader, load_text_encoder, load_tokenizer, load_vae
from sdlearn.recipes import generate_for_eval


def two_object_prompts(n: int, seed: int = 4246) -> list[str]:
    batch = ShapesDataset(n, "train", seed=seed, num_objects=2).batch(range(n))
    return [caption_for({"objects": [{k: o[k] for k in ("color", "shape")} for o in batch.item_objects(j)]})
            for j in range(n)]


def evaluate(path: Path, n: int, guidance: float, parts) -> dict:
    vae, text_encoder, tokenizer, reader = parts
    meta = json.loads(path.with_suffix(".json").read_text())
    config = DenoiserConfig.from_dict(meta["config"]["denoiser_config"])
    tensors = load_file(str(path))
    state = {k.removeprefix("ema/"): v.float() for k, v in tensors.items() if k.startswith("ema/")}
    denoiser = Denoiser(config)
    denoiser.load_state_dict(state)
    pipe = LatentDiffusionPipeline(vae, text_encoder, tokenizer, denoiser.eval(), meta["config"].get("schedule", "scaled_linear"))
    prompts = two_object_prompts(n)
    score = prompt_accuracy(generate_for_eval(pipe, prompts, guidance_scale=guidance), prompts, reader)
    return {"step": meta["step"], "accuracy": round(score.overall, 4),
            "interval": [round(x, 4) for x in score.interval], "binding_errors": score.binding_errors, "n": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--weights", type=Path, default=None, help="a folder with vae.* and clip.* (default: shipped)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    parts = (load_vae(args.weights), load_text_encoder(args.weights), load_tokenizer(args.weights), load_scene_reader())
    for path in args.checkpoints:
        print(json.dumps(evaluate(path, args.n, args.guidance, parts)), flush=True)


if __name__ == "__main__":
    main()
