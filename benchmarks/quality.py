"""Quality of the shipped models against issue 13's targets, side by side in one run; prints met/missed, asserts nothing.

    python benchmarks/quality.py [--seed 4242] [--threads 2] [--quick] [--out [NAME]] [--weights DIR] [--reader PATH]

Every figure comes from the shipped pipeline (``sdlearn.pretrained.load_pipeline()``, or ``--weights DIR``) called
with its defaults (sampler, guidance, guidance interval) and 20 steps, judged by the shipped scene reader
(``--reader PATH`` for another; :func:`sdlearn.metrics.prompt_accuracy`). Each accuracy is over ≥ 256 images
(``--quick``: a few, for a smoke test only) and printed with its 95% Wilson interval; "met" compares the
point estimate with the target.

1. one-object full prompts, train split (≥ 95% all four attributes right): captions of ``ShapesDataset(n, "train", seed)``;
2. one-object full prompts, the held-out pairs (≥ 85%): ``ShapesDataset(n, "heldout", seed + 1)``;
3. partial one-object prompts, named attributes right (≥ 95%): a random caption of each of
   ``ShapesDataset(n, "train", seed + 2)``'s items naming one to three of its four attributes;
4. partial prompts, what is left open (per open attribute, TV to the data's distribution ≤ 0.08 above a perfect
   sampler's figure, both printed): 256 images per prompt, averaged over the prompts of ``TV_PROMPTS`` (10) that
   leave the attribute open (:func:`sdlearn.metrics.open_attribute_tv`);
5. two-object full prompts, train pairs (≥ 80% both objects fully right): scenes of
   ``ShapesDataset(n, "train", seed + 3, num_objects=2)``, full captions;
6. two-object colour + shape prompts (≥ 75% right with correct binding; binding errors printed apart): the same
   kind of scenes (``seed + 4``), each object's colour and shape only ("a red circle and a blue square");
7. speed: 16 images × 20 steps with the default guidance, median of several calls (≤ 3 s on 2 cores; ``--threads``).

Not measured here: issue 13's last target (``python -m sdlearn train all --minutes 30`` from scratch reaches ≥ 90%
on one-object full prompts), which needs a 30-minute training run of its own.

``TV_PROMPTS`` leave open shape (with a colour none of whose pairs is held out), size and position, never colour:
the train split leaves out one colour per shape (``HELDOUT_PAIRS``), so the colour a model trained on it gives an
open prompt is rightly not uniform over eight, while :func:`open_attribute_tv` compares with the uniform.
"""

from __future__ import annotations

import argparse
import inspect
import resource
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from sdlearn.checkpoint import CheckpointError
from sdlearn.data import (
    ATTRIBUTES,
    HELDOUT_PAIRS,
    ShapesDataset,
    caption_for,
    object_phrase,
    parse_caption,
    random_caption,
)
from sdlearn.metrics import (
    SceneReader,
    default_classifier,
    default_scene_reader,
    open_attribute_tv,
    prompt_accuracy,
)
from sdlearn.pretrained import load_pipeline, load_scene_reader

RESULTS_DIR = Path(__file__).resolve().parent / "results"
STEPS = 20
CHUNK = 128  # prompts per pipeline call
TV_PROMPTS = (
    "a red shape", "a blue shape in the top left", "a large green shape", "a small yellow object in the center",
    "a red circle", "a large blue square", "a green triangle in the bottom right", "a small yellow diamond",
    "a red object in the bottom left", "a blue circle in the center",
)
TARGETS = {  # name → (kind, target)
    "one-object full prompts, train split": ("≥", 0.95),
    "one-object full prompts, held-out pairs": ("≥", 0.85),
    "partial prompts: named attributes right": ("≥", 0.95),
    "partial prompts: TV of what is left open, above a perfect sampler": ("≤", 0.08),
    "two-object full prompts, train pairs": ("≥", 0.80),
    "two-object colour + shape prompts, correct binding": ("≥", 0.75),
    "16 images × 20 steps with guidance": ("≤", 3.0),
}


class Report:
    """Prints lines and keeps them, for ``--out``; and the met/missed verdict of each target."""

    def __init__(self):
        self.lines: list[str] = []
        self.verdicts: dict[str, tuple[str, bool | None]] = {}

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def verdict(self, name: str, figure: str, value: float | None) -> None:
        """Record ``name``'s measured ``figure`` (text) and whether ``value`` meets its target (None: not measured)."""
        kind, target = TARGETS[name]
        met = None if value is None or value != value else (value >= target if kind == "≥" else value <= target)
        self.verdicts[name] = (figure, met)
        self.say(f"    → {'MET' if met else 'not measured' if met is None else 'MISSED'} (target {kind} {fmt_target(name)})")


def fmt_target(name: str) -> str:
    kind, target = TARGETS[name]
    return f"{target:g} s" if name.startswith("16 images") else f"{target:.2f}" if "TV" in name else f"{100 * target:.0f}%"


def percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def generate(pipe, prompts: list[str], seed: int, **options) -> torch.Tensor:
    """Images ``[N, 3, 32, 32]`` for ``prompts``, ``CHUNK`` at a time, ``STEPS`` steps and the pipeline's defaults
    (``options``, e.g. ``guidance_scale``, override them)."""
    return torch.cat([pipe(prompts[i : i + CHUNK], num_inference_steps=STEPS, seed=seed + i, progress=False,
                           **options).cpu() for i in range(0, len(prompts), CHUNK)])


def accuracy_line(result) -> str:
    low, high = result.interval
    per = ", ".join(f"{name} {percent(v)}" for name, v in result.per_attribute.items())
    return (f"{percent(result.overall)} (95% CI {percent(low)}–{percent(high)}) of {result.count}; "
            f"per attribute {per}; object count right {percent(result.object_count)}")


def accuracy_target(report: Report, name: str, pipe, judge, prompts: list[str], seed: int, note: str = ""):
    report.say(f"\n[{list(TARGETS).index(name) + 1}] {name}: {len(prompts)} prompts (seed {seed}){note}")
    report.say(f"    e.g. {prompts[0]!r}")
    if not isinstance(judge, SceneReader) and name.startswith("two-object"):
        report.say("    not measured: two-object prompts need a scene reader (none shipped yet; pass --reader PATH)")
        report.verdict(name, "not measured", None)
        return None
    start = time.perf_counter()
    images = generate(pipe, prompts, seed)
    seconds = time.perf_counter() - start
    try:
        result = prompt_accuracy(images, prompts, judge)
    except ValueError as e:
        report.say(f"    cannot judge: {e}")
        report.verdict(name, "not measured", None)
        return None
    report.say(f"    {accuracy_line(result)}  [{len(prompts)} images in {seconds:.0f} s]")
    if result.two_object_count:
        b = result.binding_errors
        report.say(f"    binding errors (right attributes, wrong objects): {b} of {result.two_object_count} "
                   f"({percent(b / result.two_object_count)})")
    figure = f"{percent(result.overall)} [{percent(result.interval[0])}, {percent(result.interval[1])}]"
    if result.two_object_count:
        figure += f", binding errors {percent(result.binding_errors / result.two_object_count)}"
    report.verdict(name, figure, result.overall)
    return result


def partial_prompts(n: int, seed: int) -> list[str]:
    """One random caption per item of ``ShapesDataset(n, "train", seed)`` naming one to three of its attributes."""
    batch = ShapesDataset(n, "train", seed=seed).batch(range(n))
    rng = torch.Generator().manual_seed(seed)
    prompts = []
    for j in range(n):
        while True:
            caption, named = random_caption(batch.item_objects(j), rng, open_fraction=1.0)
            if 1 <= len(named[0]) < len(ATTRIBUTES):
                break
        prompts.append(caption)
    return prompts


def two_object_prompts(n: int, seed: int, colour_and_shape: bool) -> list[str]:
    """Prompts for ``n`` two-object train-split scenes: full captions, or each object's colour and shape only."""
    batch = ShapesDataset(n, "train", seed=seed, num_objects=2).batch(range(n))
    rng = torch.Generator().manual_seed(seed)
    prompts = []
    for j in range(n):
        objects = batch.item_objects(j)
        if colour_and_shape:
            prompts.append(" and ".join(object_phrase({"color": o["color"], "shape": o["shape"]}, rng) for o in objects))
        else:
            prompts.append(caption_for({"objects": objects}, rng))
    return prompts


def tv_target(report: Report, pipe, judge, per_prompt: int, seed: int) -> None:
    name = "partial prompts: TV of what is left open, above a perfect sampler"
    report.say(f"\n[4] {name}: {len(TV_PROMPTS)} prompts × {per_prompt} images (seed {seed} + 1000·k for prompt k)")
    per_attribute: dict[str, list[tuple[float, float]]] = {}
    for k, prompt in enumerate(TV_PROMPTS):
        images = generate(pipe, [prompt] * per_prompt, seed + 1000 * k)
        result = open_attribute_tv(images, prompt, judge)
        report.say(f"    {result}")
        for attribute in result.tv:
            per_attribute.setdefault(attribute, []).append((result.tv[attribute], result.perfect_sampler[attribute]))
    worst = -1.0
    for attribute, pairs in per_attribute.items():
        tv = statistics.fmean(p[0] for p in pairs)
        perfect = statistics.fmean(p[1] for p in pairs)
        worst = max(worst, tv - perfect)
        report.say(f"    {attribute:9} left open by {len(pairs):2} prompts: mean TV {tv:.3f}, a perfect sampler's {perfect:.3f}, "
                   f"excess {tv - perfect:+.3f}")
    report.verdict(name, f"worst excess {worst:+.3f}", worst)


def speed_target(report: Report, pipe, repeats: int, threads: int) -> None:
    name = "16 images × 20 steps with guidance"
    guidance = inspect.signature(pipe.__call__).parameters["guidance_scale"].default
    report.say(f"\n[7] {name}: pipe(16 prompts, num_inference_steps={STEPS}), defaults (guidance {guidance}, "
               f"guidance interval {getattr(pipe, 'guidance_interval', None)}), {threads} threads, median of {repeats} "
               "after one warm-up call")
    prompts = ShapesDataset(16, "train", seed=7).batch(range(16)).captions
    pipe(prompts, num_inference_steps=STEPS, seed=0, progress=False)  # warm-up
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        pipe(prompts, num_inference_steps=STEPS, seed=r, progress=False)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    report.say(f"    median {median:.2f} s (min {min(times):.2f}, max {max(times):.2f})")
    report.verdict(name, f"{median:.2f} s", median)


def load_judge(path: str | None, report: Report):
    """The scene reader (``path``, or the shipped one); while none is shipped, the shipped attribute classifier,
    which judges one-object prompts only (the two-object targets are then 'not measured')."""
    try:
        reader = load_scene_reader(path) if path else default_scene_reader()
    except CheckpointError as e:
        if path:
            raise
        report.say(f"scene reader: none shipped ({e}); judging one-object prompts with the shipped attribute "
                   "classifier, two-object targets not measured (pass --reader PATH)")
        return default_classifier()
    info = getattr(reader, "training_info", {}) or {}
    report.say(f"scene reader: {path or 'shipped'} ({sum(p.numel() for p in reader.parameters()):,} parameters, "
               f"trained {info.get('steps', '?')} steps)")
    return reader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=4242, help="evaluation seed (default 4242, one no training uses)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, the targets' setting)")
    parser.add_argument("--quick", action="store_true", help="a few images per target: a smoke test, not a measurement")
    parser.add_argument("--out", nargs="?", const="", default=None, metavar="NAME",
                        help="also write the report to benchmarks/results/NAME (default quality-DATE.txt)")
    parser.add_argument("--weights", default=None, help="a weights folder to load instead of the shipped ones")
    parser.add_argument("--denoiser", choices=["dit", "unet", "flow"], default="dit",
                        help="the DiT (default, denoiser.*), the course U-Net (unet.*) or the flow DiT (flow.*), with the "
                             "same VAE and text tower")
    parser.add_argument("--reader", default=None, help="a scene reader (folder or .safetensors) instead of the shipped one")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n, per_prompt, repeats = (16, 16, 2) if args.quick else (256, 256, 5)

    report = Report()
    started = datetime.now()
    report.say(f"quality benchmark (issue 13): seed {args.seed}, {args.threads} threads, {STEPS} steps, the pipeline's "
               f"defaults, {n} images per accuracy, {per_prompt} per TV prompt{' (QUICK: not a measurement)' if args.quick else ''}; "
               f"torch {torch.__version__}, {started:%Y-%m-%d %H:%M}")
    start = time.perf_counter()
    try:
        pipe = load_pipeline(args.weights, denoiser=args.denoiser)
    except CheckpointError as e:
        report.say(f"pipeline: cannot load ({e})")
        return
    report.say(f"pipeline: {args.weights or 'shipped weights'}, denoiser {args.denoiser!r} "
               f"(trained {(getattr(pipe.denoiser, 'training_info', {}) or {}).get('minutes', '?')} min)")
    judge = load_judge(args.reader, report)
    train = ShapesDataset(n, "train", seed=args.seed).batch(range(n)).captions
    accuracy_target(report, "one-object full prompts, train split", pipe, judge, train, args.seed)
    heldout = ShapesDataset(n, "heldout", seed=args.seed + 1).batch(range(n))
    result = accuracy_target(report, "one-object full prompts, held-out pairs", pipe, judge, heldout.captions,
                             args.seed + 1, f" ({', '.join(' '.join(p) for p in HELDOUT_PAIRS)})")
    if result is not None:
        pairs = [(parse_caption(c)["color"], parse_caption(c)["shape"]) for c in heldout.captions]
        report.say("    per pair: " + ", ".join(
            f"{' '.join(pair)} {percent(result.correct[torch.tensor([p == pair for p in pairs])].float().mean().item())}"
            for pair in HELDOUT_PAIRS if pair in pairs))
    accuracy_target(report, "partial prompts: named attributes right", pipe, judge,
                    partial_prompts(n, args.seed + 2), args.seed + 2, ", one to three of four attributes named")
    tv_target(report, pipe, judge, per_prompt, args.seed + 5)
    accuracy_target(report, "two-object full prompts, train pairs", pipe, judge,
                    two_object_prompts(n, args.seed + 3, colour_and_shape=False), args.seed + 3)
    accuracy_target(report, "two-object colour + shape prompts, correct binding", pipe, judge,
                    two_object_prompts(n, args.seed + 4, colour_and_shape=True), args.seed + 4)
    speed_target(report, pipe, repeats, args.threads)

    report.say(f"\nsummary (seed {args.seed}, {args.threads} threads{', QUICK' if args.quick else ''}):")
    for name, (kind, _) in TARGETS.items():
        figure, met = report.verdicts.get(name, ("not measured", None))
        status = "not measured" if met is None else "met" if met else "MISSED"
        report.say(f"    {name:66} {figure:40} target {kind} {fmt_target(name):8} {status}")
    report.say(f"\ntotal {time.perf_counter() - start:.0f} s, peak memory {peak_rss_mb():.0f} MB RSS")
    if args.out is not None:
        RESULTS_DIR.mkdir(exist_ok=True)
        path = RESULTS_DIR / (args.out or f"quality-{'' if args.denoiser == 'dit' else args.denoiser + '-'}{started:%Y%m%d-%H%M}{'-quick' if args.quick else ''}.txt")
        path.write_text("\n".join(report.lines) + "\n")
        print(f"report written to {path}")


if __name__ == "__main__":
    main()
