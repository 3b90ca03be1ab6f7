"""Issue 16's targets for the star adapter, in one run.

    python benchmarks/adapt.py [--adapter star|FILE] [--judge FILE] [--weights DIR] [--images 256] [--threads 2]
                               [--seed 1616] [--quick] [--out [NAME]]

The adapted pipeline is ``sdlearn.pretrained.load_pipeline(DIR, adapter=...)`` (the shipped ``star_adapter.*`` by
default, or an adapter file that ``python -m sdlearn train adapter --out DIR`` wrote); the base pipeline is the same
weights without it. Every image is judged by the star-aware scene reader (``sdlearn.pretrained.load_star_reader``: the
shipped ``scene_reader_star.*``, or ``--judge FILE``), which the generator never saw. Images are drawn with the
pipeline's defaults (20 DPM-Solver++ steps, guidance 4), image i's noise from seed + i.

1. **Star prompts, colours seen in the examples** (red, yellow, blue, white: ``STAR_EXAMPLE_COLORS``): "a small red
   star in the top left" over those 4 colours × 2 sizes × 5 positions, in turn, ``--images`` of them; right when the
   judge reads exactly one object with all four attributes as asked (target ≥ 90%).
2. **Star prompts, colours never seen with a star** (the other 4): the same (target ≥ 80%).
3. **What it forgot**: ``--images`` one-object full prompts of the original shapes (captions of
   ``ShapesDataset(n, "all", seed)``), drawn from the same noise with and without the adapter (target: no more than
   3 points below the base model). McNemar's exact test on the images right for one of them only says whether the
   difference is more than chance.
4. **The adapter's files** (``.safetensors`` + ``.json``): at most 1 MB (10⁶ bytes).

Each accuracy carries its 95% Wilson interval (``sdlearn.stats.wilson_interval``). ``--quick``: 16 images per figure,
a smoke test, not a measurement.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import torch

from sdlearn.adapt import adapter_file_bytes
from sdlearn.checkpoint import CheckpointError, checkpoint_paths
from sdlearn.data import COLORS, POSITIONS, SIZES, STAR_EXAMPLE_COLORS, ShapesDataset, caption_for
from sdlearn.metrics import prompt_accuracy
from sdlearn.pretrained import ADAPTERS, WEIGHTS_DIR, load_pipeline, load_star_reader, weights_path
from sdlearn.recipes import generate_for_eval
from sdlearn.training import set_threads

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGETS = {
    "star prompts, colours seen in the examples (all four attributes)": ("≥", 0.90),
    "star prompts, colours never seen with a star": ("≥", 0.80),
    "one-object full prompts, adapted vs base (points)": ("≥", -0.03),
    "adapter files (bytes)": ("≤", 1_000_000),
}
SEEN_COLORS = tuple(STAR_EXAMPLE_COLORS)
UNSEEN_COLORS = tuple(c for c in COLORS if c not in SEEN_COLORS)


def _load_report_tools():
    """benchmarks/report.py, loaded from its file (sys.path untouched: the scripts here are named like sdlearn's
    modules)."""
    spec = importlib.util.spec_from_file_location("sdlearn_benchmark_report", Path(__file__).resolve().parent / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report_tools = _load_report_tools()
Report, percent, with_interval = report_tools.Report, report_tools.percent, report_tools.with_interval
sign_test_p, shown = report_tools.sign_test_p, report_tools.shown




def star_prompts(colors: Sequence[str], n: int) -> list[str]:
    """``n`` prompts "a {size} {color} star in the {position}", cycling over colours × sizes × positions."""
    grid = [caption_for({"color": c, "shape": "star", "size": z, "position": p})
            for c in colors for z in SIZES for p in POSITIONS]
    return [grid[i % len(grid)] for i in range(n)]


def adapter_file(adapter: str, weights: str | None) -> Path:
    """The ``.safetensors`` file ``load_pipeline(weights, adapter=adapter)`` applies."""
    if adapter in ADAPTERS:
        own = weights_path(ADAPTERS[adapter], weights) if weights is not None else None
        return own if own is not None and own.is_file() else weights_path(ADAPTERS[adapter])
    return Path(adapter)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default="star", help="'star' (the shipped adapter, default) or an adapter file")
    parser.add_argument("--judge", default=None, help="a star-aware scene reader's file (default: the shipped one)")
    parser.add_argument("--weights", default=None, help="a weights folder with vae.*, clip.*, denoiser.* "
                                                        "(default: the shipped weights)")
    parser.add_argument("--images", type=int, default=256, help="images per figure (default 256)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--seed", type=int, default=1616, help="evaluation seed (default 1616, one no training uses)")
    parser.add_argument("--quick", action="store_true", help="16 images per figure: a smoke test, not a measurement")
    parser.add_argument("--out", nargs="?", const="", default=None, metavar="NAME",
                        help="also write the report to benchmarks/results/NAME (default adapt-DATE.txt)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images = 16
    if args.images < 1:
        parser.error(f"--images must be ≥ 1, got {args.images}")
    return parser, args


def main(argv: Sequence[str] | None = None, results_dir: Path = RESULTS_DIR) -> Path | None:
    parser, args = parse_args(argv)
    args.threads = set_threads(args.threads)
    started, clock = datetime.now(), time.perf_counter()
    try:
        adapted = load_pipeline(args.weights, adapter=args.adapter)
        base = load_pipeline(args.weights)
        judge = load_star_reader(args.judge)
    except (CheckpointError, ValueError) as e:
        parser.error(str(e))
    file = adapter_file(args.adapter, args.weights)
    n, chunk = args.images, min(128, args.images)
    record = adapted.adapter_info.get("training", {})
    report = Report()
    report.say(f"the star adapter (issue 16): {shown(file)}, on {args.weights or 'the shipped weights'}; {n} images per figure, "
               f"seed {args.seed}, {args.threads} thread(s), {os.cpu_count()} CPUs, load average "
               f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; torch {torch.__version__}, {started:%Y-%m-%d %H:%M}"
               f"{' (QUICK: a smoke test, not a measurement)' if args.quick else ''}")
    report.say(f"adapter: method {record.get('method', '?')}, rank {record.get('rank', '-')}, {record.get('steps', '?')} "
               f"steps in {record.get('minutes', '?')} min; judged by the star-aware scene reader "
               f"({shown(args.judge or WEIGHTS_DIR / 'scene_reader_star.safetensors')}); 20 DPM-Solver++ steps, guidance 4")

    results = {}
    for k, (name, colors) in enumerate(zip(list(TARGETS)[:2], (SEEN_COLORS, UNSEEN_COLORS))):
        prompts = star_prompts(colors, n)
        start = time.perf_counter()
        images = generate_for_eval(adapted, prompts, seed=args.seed + k * n, batch_size=chunk)
        results[name] = result = prompt_accuracy(images, prompts, judge)
        report.say(f"\n[{k + 1}] {name}: {', '.join(colors)} × 2 sizes × 5 positions, e.g. {prompts[0]!r}")
        report.say(f"    {with_interval(result)}; per attribute "
                   + ", ".join(f"{a} {percent(v)}" for a, v in result.per_attribute.items())
                   + f", object count {percent(result.object_count)}  [{time.perf_counter() - start:.0f} s]")
        report.verdict(name, with_interval(result), result.overall >= TARGETS[name][1])

    name = list(TARGETS)[2]
    prompts = ShapesDataset(n, "all", seed=args.seed).batch(range(n)).captions
    report.say(f"\n[3] {name}: {n} captions of ShapesDataset(n, 'all', seed={args.seed}), e.g. {prompts[0]!r}; "
               f"the same noise with and without the adapter")
    old = {}
    for label, pipe in (("base", base), ("adapted", adapted)):
        start = time.perf_counter()
        old[label] = prompt_accuracy(generate_for_eval(pipe, prompts, seed=args.seed + 2 * n, batch_size=chunk),
                                     prompts, judge)
        report.say(f"    {label:7}: {with_interval(old[label])}  [{time.perf_counter() - start:.0f} s]")
    a, b = old["adapted"].correct.bool(), old["base"].correct.bool()
    only_adapted, only_base = int((a & ~b).sum()), int((~a & b).sum())
    drop = old["adapted"].overall - old["base"].overall
    report.say(f"    difference {100 * drop:+.1f} points; right with the adapter only: {only_adapted}, without it only: "
               f"{only_base}; McNemar's exact p = {sign_test_p(only_adapted, only_base):.2g}")
    report.verdict(name, f"{100 * drop:+.1f} points", drop >= TARGETS[name][1])

    name = list(TARGETS)[3]
    size = adapter_file_bytes(file)
    report.say(f"\n[4] {name}: {', '.join(p.name for p in checkpoint_paths(file))}: {size:,} bytes "
               f"({size / 1000:.1f} kB)")
    report.verdict(name, f"{size:,} bytes", size <= TARGETS[name][1])

    report.say(f"\nsummary (seed {args.seed}, {args.threads} threads{', QUICK' if args.quick else ''}):")
    for target, (kind, value) in TARGETS.items():
        figure, met = report.verdicts.get(target, ("not measured", None))
        goal = f"{kind} {100 * value:+.0f} points" if value < 0 else f"{kind} {percent(value)}" if value < 1 \
            else f"{kind} {value:,} bytes"
        report.say(f"    {target:66} {figure:30} target {goal:18} "
                   f"{'not measured' if met is None else 'met' if met else 'MISSED'}")
    report.say(f"    one-object full prompts: base {with_interval(old['base'])}, adapted {with_interval(old['adapted'])}")
    report.say(f"\ntotal {time.perf_counter() - clock:.0f} s")
    if args.out is None:
        return None
    return report.write(results_dir / (args.out or f"adapt-{started:%Y%m%d-%H%M}{'-quick' if args.quick else ''}.txt"))


if __name__ == "__main__":
    main()
