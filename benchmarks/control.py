"""Issue 17's targets — a ControlNet, DDIM inversion for editing, a few-step student — in one run, on the shipped
weights.

    python benchmarks/control.py [--weights DIR] [--images 256] [--threads 2] [--seed 1717] [--quick] [--out [NAME]]

Everything is measured on ``--images`` images per figure (≥ 256 for a measurement), each figure with its 95%
interval: a Wilson interval for a rate, mean ± 1.96 standard errors for a mean.

1. **ControlNet** (``load_pipeline(controlnet=True)``): one-object edge maps at random positions, anywhere the box
   fits (``sdlearn.control_recipes.control_batch`` of the train split's colour-shape pairs), each drawn from its
   caption (colour, shape and size; no position) at the pipeline's defaults (20 DPM-Solver++ steps, guidance 4).
   The IoU of the generated object's mask (coverage ≥ 0.5, ``sdlearn.control.object_coverage``) with the edge map's
   filled object (target mean ≥ 0.75), and the caption's colour right (the mean colour of the object's inside,
   nearest in the colour table; target ≥ 95%). For information: the same captions without the ControlNet, and the
   same edge maps with ``controlnet_conditioning_scale`` 0.
2. **Inversion** (``pipe.invert``): one-object train images inverted with their own captions at guidance 1 over 20
   DDIM steps, then regenerated from those latents with the same prompt (``pipe(prompt, latents=…)``, DDIM, guidance
   1): PSNR against the original (target ≥ 25 dB); the VAE's own reconstruction, the bound, beside it.
3. **Edits** (``pipe.edit`` at its defaults: invert with the source caption at guidance 1, one fixed-point
   iteration a step, regenerate with the target caption at guidance 2), ``--images`` each of colour, shape and size edits of one-object train images; the captions name all
   four attributes, the target changing one (never into a held-out colour-shape pair):
   - the changed attribute right (the scene reader; target ≥ 90%, all three kinds together);
   - PSNR of the pixels outside the object (brightest channel ≥ 0.1, dilated by one pixel; for shape and size edits
     the union of the source's and the edit's objects) against the source (target ≥ 25 dB). On Shapes the
     background is black, so a fresh sample of the target prompt, printed beside, scores high too: what
     distinguishes an edit is that the object stays (the next figure, and the distance the centre moved);
   - colour edits: IoU of the edited object's mask with the source's (target ≥ 0.8), a fresh sample's beside it.
4. **The distilled student** (``load_pipeline(denoiser="fast")``) at 4 and 2 steps on one-object full prompts
   (targets ≥ 95% and ≥ 90%), 1 step for information; the teacher (the shipped ε-DiT) at 4 DPM-Solver++ steps
   beside it, and at its default 20.
5. **Speed**: 16 images, the student at its default 4 steps against the teacher at its default 20 guided steps, the
   median of 3 timings each, in this process (target ≥ 4× faster).

``--quick``: 16 images per figure, a smoke test, not a measurement.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import statistics
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from sdlearn.checkpoint import CheckpointError
from sdlearn.control import object_coverage
from sdlearn.control_recipes import control_batch, generated_colors, mask_iou
from sdlearn.data import COLORS, HELDOUT_PAIRS, SHAPES, ShapesDataset, caption_for
from sdlearn.metrics import default_scene_reader, prompt_accuracy
from sdlearn.pretrained import load_pipeline
from sdlearn.stats import wilson_interval
from sdlearn.training import set_threads

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGETS = {
    "ControlNet: IoU with the edge map's object, random positions (mean)": ("≥", 0.75, "mean"),
    "ControlNet: the prompt's colour right": ("≥", 0.95, "rate"),
    "inversion then regeneration, same prompt, guidance 1: PSNR (dB)": ("≥", 25.0, "dB"),
    "edits: the changed attribute right": ("≥", 0.90, "rate"),
    "edits: PSNR outside the object against the source (dB)": ("≥", 25.0, "dB"),
    "colour edits: IoU of the object's mask with the source's (mean)": ("≥", 0.80, "mean"),
    "student, 4 steps, one-object full prompts": ("≥", 0.95, "rate"),
    "student, 2 steps, one-object full prompts": ("≥", 0.90, "rate"),
    "16 images: student (4 steps) speed-up over the teacher (20 steps)": ("≥", 4.0, "x"),
}
STEPS, EDIT_GUIDANCE = 20, 2.0


def _load_report_tools():
    """benchmarks/report.py, loaded from its file (sys.path untouched: the scripts here are named like sdlearn's
    modules)."""
    spec = importlib.util.spec_from_file_location("sdlearn_benchmark_report", Path(__file__).resolve().parent / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report_tools = _load_report_tools()
Report, percent, with_interval, peak_rss_mb = (report_tools.Report, report_tools.percent, report_tools.with_interval,
                                               report_tools.peak_rss_mb)


def mean_interval(values: torch.Tensor, digits: int = 3, unit: str = "") -> str:
    """"0.812 ± 0.011 (95%) of 256": the mean with 1.96 standard errors."""
    values = values.double()
    half = 1.96 * values.std().item() / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return f"{values.mean().item():.{digits}f}{unit} ± {half:.{digits}f} (95%) of {len(values)}"


def rate_interval(right: torch.Tensor) -> str:
    k, n = int(right.sum()), len(right)
    low, high = wilson_interval(k, n)
    return f"{percent(k / n)} [{percent(low)}, {percent(high)}] of {n}"


def psnr(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """PSNR per image (dB) of images in [-1, 1], read in [0, 1]; over the pixels where ``keep`` ``[B, 1, H, W]`` is 1."""
    error = (((a + 1) / 2 - (b + 1) / 2) ** 2)  # [B, 3, H, W]
    keep = torch.ones_like(error[:, :1]) if keep is None else keep
    keep = keep.expand_as(error)
    mse = (error * keep).flatten(1).sum(1) / keep.flatten(1).sum(1).clamp(min=1)
    return 10 * torch.log10(1 / mse.clamp(min=1e-10))


def brightness(images: torch.Tensor) -> torch.Tensor:
    return ((images + 1) / 2).amax(1, keepdim=True)  # [B, 1, H, W] in [0, 1]


def object_mask(images: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Pixels of the object or its rim: brightest channel ≥ ``threshold``, dilated by one pixel → float ``[B, 1, H, W]``."""
    return F.max_pool2d((brightness(images) >= threshold).float(), 3, 1, 1)


def centre(images: torch.Tensor) -> torch.Tensor:
    """The centre (x, y) in px of each image's object (coverage ≥ 0.5, coverage-weighted) → ``[B, 2]``."""
    weight = object_coverage(images)[:, 0]
    weight = weight * (weight >= 0.5)
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    total = weight.flatten(1).sum(1).clamp(min=1e-6)
    return torch.stack([(weight * xs).flatten(1).sum(1) / total, (weight * ys).flatten(1).sum(1) / total], 1)


def edit_prompts(n: int, kind: str, seed: int):
    """``n`` one-object train images with their full captions, target captions changing ``kind``, and the target
    attributes."""
    batch = ShapesDataset(n, split="train", seed=seed).batch(range(n))
    rng = random.Random(seed)
    sources, targets, wanted = [], [], []
    for i in range(n):
        source = batch.item_attributes(i)
        target = dict(source)
        if kind == "color":
            target["color"] = rng.choice([c for c in COLORS if c != source["color"]
                                          and (c, source["shape"]) not in HELDOUT_PAIRS])
        elif kind == "shape":
            target["shape"] = rng.choice([s for s in SHAPES if s != source["shape"]
                                          and (source["color"], s) not in HELDOUT_PAIRS])
        else:
            target["size"] = "small" if source["size"] == "large" else "large"
        sources.append(caption_for(source))
        targets.append(caption_for(target))
        wanted.append(target)
    return batch.images, sources, targets, wanted


def in_chunks(draw, n: int, chunk: int) -> torch.Tensor:
    return torch.cat([draw(slice(i, min(i + chunk, n))) for i in range(0, n, chunk)])


def timed(fn, repeats: int = 3) -> float:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def measure_edits(report, pipe, judge, kind: str, n: int, chunk: int, seed: int):
    """``n`` edits of ``kind``, and fresh samples of the target prompts for comparison → (changed attribute right
    ``[n]``, outside PSNR ``[n]``, mask IoU with the source ``[n]`` for colour edits else None); prints a line."""
    images, sources, targets, wanted = edit_prompts(n, kind, seed)
    tick = time.perf_counter()
    edited = in_chunks(lambda rows: pipe.edit(images[rows], sources[rows], targets[rows], num_inference_steps=STEPS,
                                              guidance_scale=EDIT_GUIDANCE, progress=False), n, chunk)
    fresh = in_chunks(lambda rows: pipe(targets[rows], num_inference_steps=STEPS, sampler="ddim",
                                        guidance_scale=EDIT_GUIDANCE, progress=False,
                                        generator=[torch.Generator().manual_seed(seed + j)
                                                   for j in range(rows.start, rows.stop)]), n, chunk)
    result = prompt_accuracy(edited, targets, judge)
    right = torch.tensor([len(read) == 1 and read[0].get(kind) == wanted[j][kind]  # one object, the new value
                          for j, read in enumerate(result.read)])

    def region(x):  # what the edit may change: the source's object (colour), or both objects (shape, size)
        return object_mask(images) if kind == "color" else torch.maximum(object_mask(images), object_mask(x))

    outside, fresh_outside = psnr(edited, images, 1 - region(edited)), psnr(fresh, images, 1 - region(fresh))
    moved = (centre(edited) - centre(images)).norm(dim=1)
    moved_fresh = (centre(fresh) - centre(images)).norm(dim=1)
    line = (f"    {kind:5}: changed attribute right {rate_interval(right)}; all attributes {with_interval(result)}; "
            f"outside PSNR {mean_interval(outside, 2, ' dB')} (a fresh sample: {fresh_outside.mean().item():.2f} dB); "
            f"centre moved {moved.mean().item():.2f} px (a fresh sample: {moved_fresh.mean().item():.2f} px)")
    iou = None
    if kind == "color":
        iou = mask_iou(object_coverage(edited) >= 0.5, object_coverage(images) >= 0.5)
        fresh_iou = mask_iou(object_coverage(fresh) >= 0.5, object_coverage(images) >= 0.5)
        line += f"; mask IoU with the source {mean_interval(iou)} (a fresh sample: {fresh_iou.mean().item():.3f})"
    report.say(line + f"  [{time.perf_counter() - tick:.0f} s]")
    return right, outside, iou


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None, help="a weights folder (default: the shipped weights)")
    parser.add_argument("--images", type=int, default=256, help="images per figure (default 256)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--seed", type=int, default=1717, help="evaluation seed (default 1717, one no training uses)")
    parser.add_argument("--quick", action="store_true", help="16 images: a smoke test, not a measurement")
    parser.add_argument("--out", nargs="?", const="", default=None, metavar="NAME",
                        help="also write the report to benchmarks/results/NAME (default control-DATE.txt)")
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
        pipe = load_pipeline(args.weights, controlnet=True)
        fast = load_pipeline(args.weights, denoiser="fast")
        judge = default_scene_reader()
    except (CheckpointError, FileNotFoundError) as e:
        parser.error(str(e))
    n, chunk, seed = args.images, min(128, args.images), args.seed
    report = Report()
    report.say(f"control, editing and speed (issue 17): {args.weights or 'shipped weights'}, {n} images per figure, "
               f"seed {seed}, {args.threads} thread(s), {os.cpu_count()} CPUs, load average "
               f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; torch {torch.__version__}, {started:%Y-%m-%d %H:%M}"
               f"{' (QUICK: a smoke test, not a measurement)' if args.quick else ''}")
    names = list(TARGETS)

    # 1. ControlNet
    batch = control_batch(n, torch.Generator().manual_seed(seed))
    wanted = object_coverage(batch.images) >= 0.5
    report.say(f"\n[1] ControlNet: {n} edge maps at random positions, e.g. {batch.captions[0]!r} centred at "
               f"({batch.objects['center'][0, 0]:.1f}, {batch.objects['center'][0, 1]:.1f}) px; "
               f"{STEPS} steps, guidance 4")

    def controlled(scale):
        def draw(rows):
            return pipe(batch.captions[rows], control_image=batch.edges[rows], controlnet_conditioning_scale=scale,
                        generator=[torch.Generator().manual_seed(seed + i) for i in range(rows.start, rows.stop)],
                        num_inference_steps=STEPS, progress=False)
        return draw

    tick = time.perf_counter()
    images = in_chunks(controlled(1.0), n, chunk)
    iou = mask_iou(object_coverage(images) >= 0.5, wanted)
    colour_right = generated_colors(images) == batch.objects["color"]
    report.say(f"    IoU: {mean_interval(iou)}; share ≥ 0.5: {percent((iou >= 0.5).float().mean().item())}  "
               f"[{time.perf_counter() - tick:.0f} s]")
    report.verdict(names[0], mean_interval(iou), iou.mean().item() >= TARGETS[names[0]][1])
    report.say(f"    colour right: {rate_interval(colour_right)}")
    report.verdict(names[1], rate_interval(colour_right), colour_right.float().mean().item() >= TARGETS[names[1]][1])
    k = min(n, 64)
    unscaled = controlled(0.0)(slice(0, k))
    report.say(f"    for comparison, the same {k} captions and noise with conditioning scale 0 (the base model; the "
               f"caption names no position): IoU {mean_interval(mask_iou(object_coverage(unscaled) >= 0.5, wanted[:k]))}")

    # 2. inversion
    data = ShapesDataset(n, split="train", seed=seed + 1).batch(range(n))
    report.say(f"\n[2] inversion: {n} one-object train images, their own captions, {STEPS} DDIM steps, guidance 1")
    tick = time.perf_counter()

    def reconstruct(rows):
        latents = pipe.invert(data.images[rows], data.captions[rows], num_inference_steps=STEPS, progress=False)
        return pipe(data.captions[rows], latents=latents, guidance_scale=1.0, sampler="ddim",
                    num_inference_steps=STEPS, progress=False)

    rebuilt = in_chunks(reconstruct, n, chunk)
    vae_only = pipe.decode_latents(pipe.encode_image(data.images))
    scores = psnr(rebuilt, data.images)
    report.say(f"    PSNR against the original: {mean_interval(scores, 2, ' dB')} (5th percentile "
               f"{scores.quantile(0.05).item():.1f} dB)  [{time.perf_counter() - tick:.0f} s]")
    report.say(f"    the VAE's own reconstruction (the bound): {mean_interval(psnr(vae_only, data.images), 2, ' dB')}; "
               f"inversion's against it: {mean_interval(psnr(rebuilt, vae_only), 2, ' dB')}")
    report.verdict(names[2], mean_interval(scores, 2, " dB"), scores.mean().item() >= TARGETS[names[2]][1])

    # 3. edits
    report.say(f"\n[3] edits: pipe.edit (invert with the source caption at guidance 1, one fixed-point iteration a "
               f"step, regenerate with the target at "
               f"guidance {EDIT_GUIDANCE:g}), {STEPS} steps, {n} edits of each kind")
    rights, outside, colour_iou = [], [], None
    for i, kind in enumerate(("color", "shape", "size")):
        right, kept, iou = measure_edits(report, pipe, judge, kind, n, chunk, seed + 10 + i)
        rights.append(right)
        outside.append(kept)
        colour_iou = iou if kind == "color" else colour_iou
    right, outside = torch.cat(rights), torch.cat(outside)
    report.say(f"    the changed attribute right, all {len(right)} edits: {rate_interval(right)}")
    report.verdict(names[3], rate_interval(right), right.float().mean().item() >= TARGETS[names[3]][1])
    report.say(f"    PSNR outside the object, all {len(outside)} edits: {mean_interval(outside, 2, ' dB')}; 5th "
               f"percentile {outside.quantile(0.05).item():.1f} dB")
    report.verdict(names[4], mean_interval(outside, 2, " dB"), outside.mean().item() >= TARGETS[names[4]][1])
    report.say(f"    colour edits, the object's mask against the source's: IoU {mean_interval(colour_iou)}; share ≥ 0.8 "
               f"{percent((colour_iou >= 0.8).float().mean().item())}")
    report.verdict(names[5], mean_interval(colour_iou), colour_iou.mean().item() >= TARGETS[names[5]][1])

    # 4. the student
    prompts = ShapesDataset(n, split="train", seed=seed + 20).batch(range(n)).captions
    report.say(f"\n[4] the student ({fast.denoiser.config.distilled_steps} steps distilled, guidance "
               f"{fast.denoiser.config.guidance_scale:g} distilled in) against its teacher, {n} one-object full "
               f"prompts, e.g. {prompts[0]!r}")
    record = getattr(fast.denoiser, "training_info", None) or {}
    report.say(f"    trained {record.get('minutes', '?')} min, {record.get('steps', '?')} steps")
    teacher = load_pipeline(args.weights)

    def accuracy(p, steps, **kwargs):
        tick = time.perf_counter()
        images = in_chunks(lambda rows: p(prompts[rows], num_inference_steps=steps, progress=False,
                                          generator=[torch.Generator().manual_seed(seed + 20 + j)
                                                     for j in range(rows.start, rows.stop)], **kwargs), n, chunk)
        return prompt_accuracy(images, prompts, judge), time.perf_counter() - tick

    for steps, name in ((4, names[6]), (2, names[7]), (1, None)):
        result, seconds = accuracy(fast, steps)
        report.say(f"    student, {steps} step(s): {with_interval(result)}  [{seconds:.0f} s]")
        if name:
            report.verdict(name, with_interval(result), result.overall >= TARGETS[name][1])
    for steps in (4, 20):
        result, seconds = accuracy(teacher, steps)
        report.say(f"    teacher, {steps} DPM-Solver++ steps, guidance 4: {with_interval(result)}  [{seconds:.0f} s]")

    # 5. speed
    sixteen = prompts[:16]
    student_s = timed(lambda: fast(sixteen, seed=0, progress=False))
    teacher_s = timed(lambda: teacher(sixteen, seed=0, progress=False))
    report.say(f"\n[5] 16 images, median of 3: the student at 4 steps {student_s:.2f} s, the teacher at 20 guided "
               f"steps {teacher_s:.2f} s")
    report.verdict(names[8], f"{teacher_s / student_s:.1f}×", teacher_s / student_s >= TARGETS[names[8]][1])

    report.say(f"\nsummary (seed {seed}, {args.threads} threads{', QUICK' if args.quick else ''}):")
    for target, (kind, value, unit) in TARGETS.items():
        figure, met = report.verdicts.get(target, ("not measured", None))
        goal = f"{kind} {percent(value)}" if unit == "rate" else f"{kind} {value:g}{'×' if unit == 'x' else ''}"
        report.say(f"    {target:68} {figure:40} target {goal:8} {'not measured' if met is None else 'met' if met else 'MISSED'}")
    report.say(f"\ntotal {time.perf_counter() - clock:.0f} s, peak memory {peak_rss_mb():.0f} MB RSS")
    if args.out is None:
        return None
    return report.write(results_dir / (args.out or f"control-{started:%Y%m%d-%H%M}{'-quick' if args.quick else ''}.txt"))


if __name__ == "__main__":
    main()
