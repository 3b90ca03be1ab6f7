"""Does TinyCLIP bind attributes to objects? Zero-shot accuracy, and true-vs-swapped two-object captions.

    python benchmarks/clip_binding.py [WEIGHTS]      (WEIGHTS: a folder with clip.*; default the shipped one)

For each two-object scene of ``ShapesDataset(512, split, seed=777, num_objects=2)`` and each attribute the two
objects differ in, the image embedding's similarity to the true caption is compared with its similarity to the same
caption with that attribute swapped between the objects (NegCLIP's hard negative, Yuksekgonul et al. 2023), for
full captions and for colour + shape captions ("a red circle and a blue square"). 50% is a bag of words.
"""

import sys

import torch

from sdlearn.data import ATTRIBUTES, ShapesDataset, caption_for
from sdlearn.pretrained import load_clip, load_tokenizer
from sdlearn.text import zero_shot_accuracy


def main(path=None) -> None:
    torch.set_num_threads(1)
    clip, tokenizer = load_clip(path).eval(), load_tokenizer(path)
    print("zero-shot accuracy, ShapesDataset(1000, 'all', seed=30000):",
          {k: f"{100 * v:.1f}%" for k, v in zero_shot_accuracy(clip, 1000, split="all", tokenizer=tokenizer).items()})
    for split in ("train", "heldout"):
        batch = ShapesDataset(512, split, seed=777, num_objects=2).batch(range(512))
        wins = {(kind, k): [] for kind in ("colour + shape", "full") for k in ATTRIBUTES}
        with torch.no_grad():
            image_emb = clip.encode_image(batch.images)  # [512, E]
            for j in range(512):
                objects = batch.item_objects(j)
                for k in ATTRIBUTES:
                    if objects[0][k] == objects[1][k]:
                        continue
                    swapped = [{**objects[0], k: objects[1][k]}, {**objects[1], k: objects[0][k]}]
                    for kind, keys in (("colour + shape", ("color", "shape")), ("full", ATTRIBUTES)):
                        if k not in keys:
                            continue
                        true = [{a: o[a] for a in keys} for o in objects]
                        false = [{a: o[a] for a in keys} for o in swapped]
                        text_emb = clip.embed_prompts([caption_for({"objects": true}), caption_for({"objects": false})],
                                                      tokenizer)  # [2, E]
                        scores = image_emb[j] @ text_emb.T
                        wins[kind, k].append(float(scores[0] > scores[1]))
        for kind in ("colour + shape", "full"):
            print(f"{split} scenes, {kind} captions, true caption above the swapped one:",
                  ", ".join(f"{k} {100 * sum(v) / len(v):.1f}% of {len(v)}" for (c, k), v in wins.items() if c == kind and v))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
