"""Diagnostic for issue 13: which partial prompts fail? ``benchmarks/quality.py``'s partial prompts (target 3:
the same prompts and seeds), grouped by the attributes each one names, with how each wrong image fails.

    python benchmarks/partial_patterns.py [--weights DIR] [--n N] [--guidance W] [--interval LOW,HIGH]

Per pattern ("color+shape": the prompt names colour and shape and leaves size and position open): the images,
the fraction right with its 95% Wilson interval, and the wrong ones split by cause: the scene reader found
another number of objects than one ("count"), or one object whose named attribute differs (per attribute; an
image can be wrong in several). ``--guidance``/``--interval`` replace the pipeline's guidance scale and interval
(in timesteps), to see a setting's effect per pattern. A diagnostic: the target itself is ``quality.py``'s.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402

from sdlearn.data import ATTRIBUTES  # noqa: E402
from sdlearn.metrics import default_scene_reader, prompt_accuracy, prompt_objects  # noqa: E402
from sdlearn.pretrained import load_pipeline  # noqa: E402
from sdlearn.stats import wilson_interval  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None, help="a weights folder instead of the shipped weights")
    parser.add_argument("--n", type=int, default=256, help="prompts (default 256, quality.py's)")
    parser.add_argument("--seed", type=int, default=4242, help="quality.py's seed (the partial prompts use seed + 2)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    parser.add_argument("--interval", default=None, metavar="LOW,HIGH",
                        help="guidance interval in timesteps (default: the pipeline's)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = {}
    if args.guidance is not None:
        options["guidance_scale"] = args.guidance
    if args.interval is not None:
        try:
            low, high = (float(v) for v in args.interval.split(","))
        except ValueError:
            parser.error(f"--interval takes LOW,HIGH in timesteps (e.g. 0,700), got {args.interval!r}")
        options["guidance_interval"] = (low, high)

    pipe, judge = load_pipeline(args.weights), default_scene_reader()
    seed = args.seed + 2
    prompts = quality.partial_prompts(args.n, seed)
    result = prompt_accuracy(quality.generate(pipe, prompts, seed, **options), prompts, judge)
    print(f"{args.weights or 'shipped weights'}, {options or 'the pipeline defaults'}: {result}")

    by_pattern: dict[str, list[int]] = defaultdict(list)
    named = [prompt_objects(p)[0] for p in prompts]
    for i, obj in enumerate(named):
        by_pattern["+".join(k for k in ATTRIBUTES if k in obj)].append(i)
    print(f"\n{'pattern (named)':28} {'n':>4} {'right':>7} {'95% CI':>15}   wrong: by cause")
    for pattern, ids in sorted(by_pattern.items(), key=lambda kv: result.correct[kv[1]].float().mean().item()):
        right = int(result.correct[ids].sum())
        low, high = wilson_interval(right, len(ids))
        causes: Counter = Counter()
        for i in ids:
            if result.correct[i]:
                continue
            read = result.read[i]
            if len(read) != 1:
                causes[f"count {len(read)}"] += 1
                continue
            for k, v in named[i].items():
                if read[0].get(k) != v:
                    causes[f"{k} {v}->{read[0].get(k)}" if k != "position" else k] += 1
        cause_text = ", ".join(f"{c} ×{m}" for c, m in causes.most_common(6))
        print(f"{pattern:28} {len(ids):4d} {100 * right / len(ids):6.1f}% [{100 * low:5.1f}, {100 * high:5.1f}]"
              f"   {cause_text}")


if __name__ == "__main__":
    main()
