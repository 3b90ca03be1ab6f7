"""The two denoisers the course ships, the DiT and the course U-Net, side by side in one run (issue 14, item 2).

    python benchmarks/compare_denoisers.py [--weights DIR] [--images 256] [--threads 1] [--seed 4242] [--quick]
                                           [--out [NAME]]

Both come from one weights folder (the shipped ``sdlearn/weights/``, or ``--weights DIR`` holding ``vae.*``,
``clip.*``, ``denoiser.*`` and ``unet.*``) through ``sdlearn.pretrained.load_pipeline(DIR, denoiser="dit"|"unet")``,
so they share the VAE, the text tower and the sampling defaults. One table, a DiT column and a U-Net column:

- **size**: parameters (:func:`sdlearn.checkpoint.count_parameters`) and the weights file's bytes;
- **training cost**: the FLOPs of one training step's forward + backward pass of the denoiser (torch's
  ``FlopCounterMode``: matrix products, convolutions and attention) on one real recipe batch (``--batch``, default the
  recipe's 128: VAE latents of Shapes scenes, fresh captions through the frozen text tower, as
  :func:`sdlearn.denoiser_data.latent_batch_fn` draws them, the same batch for both), divided by the batch size; times
  the images each model saw in training, the compute its training spent; and training steps/s here (forward,
  backward, gradient clipping and AdamW on that batch, median of a few steps after a warm-up; the text tower and
  the VAE, frozen and shared, are left out);
- **the training record** of each file's JSON ``"training"`` block: steps reached, minutes, why it stopped, final loss;
- **speed**: images/s of the generation calls below (``sdlearn.recipes.generate_for_eval``: 20 DPM-Solver++ steps
  at guidance 4, 128 prompts per call as in training's evaluation, the pipeline's guidance interval, ``--threads``
  threads), after one untimed warm-up call of each; the two models take turns, so a busy machine slows both alike;
- **prompt accuracy** (:func:`sdlearn.metrics.prompt_accuracy`, judged by the shipped scene reader) on ``--images``
  prompts of each kind benchmarks/quality.py measures, with its 95% Wilson interval
  (:func:`sdlearn.stats.wilson_interval`), broken down by what the reader judges (colour, shape, size, position,
  the object count, binding errors): one-object full prompts of the train split and of the held-out pairs, partial
  one-object prompts, two-object full prompts and two-object colour + shape prompts (quality.py's
  ``partial_prompts`` and ``two_object_prompts``). Both models get the same prompts and the same noise (image i of
  a kind from seed ``--seed + k + i``), so beside each accuracy the images right for one model only are counted;
- **KID** (:func:`sdlearn.metrics.kid`, the shipped classifier's features, 95% bootstrap interval) of the images
  of the one-object train-split prompts and of the two-object full prompts, each against as many real train-split
  scenes of as many objects (``ShapesDataset(n, "train", seed=BASELINE_SEED, num_objects=1 or 2)``), with the
  real-vs-real figure (``seed=BASELINE_SEED + 1``) beside it, as notebook 08 measures it.

A verdict per row says which model is ahead and whether the two 95% intervals are apart ("clearly") or overlap
("level within the noise": overlap is the cautious reading). Since the images are paired, each kind's overall
accuracy also gets McNemar's exact test on the images right for one model only (:func:`sign_test_p`), which sees
differences that overlapping intervals hide. The closing paragraph, "what each does well", is assembled from those
verdicts and figures. ``--quick``: a few images per kind and a small batch, a smoke test, not a measurement.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from sdlearn.checkpoint import CheckpointError, atomic_write_bytes, count_parameters, weights_path
from sdlearn.data import ATTRIBUTES, ShapesDataset
from sdlearn.denoiser import denoiser_loss
from sdlearn.metrics import BASELINE_SEED, default_scene_reader, kid, prompt_accuracy
from sdlearn.pretrained import DENOISERS, load_pipeline
from sdlearn.recipes import generate_for_eval, latent_batch_fn
from sdlearn.stats import wilson_interval
from sdlearn.training import set_threads

BENCHMARKS_DIR = Path(__file__).resolve().parent


def _load_quality():
    """benchmarks/quality.py, the script beside this one, loaded from its file (sys.path untouched: the scripts here
    are named like sdlearn's modules, and a test process imports this file too)."""
    spec = importlib.util.spec_from_file_location("sdlearn_benchmark_quality", BENCHMARKS_DIR / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


quality = _load_quality()  # the prompt kinds quality.py measures: partial_prompts, two_object_prompts
partial_prompts, two_object_prompts = quality.partial_prompts, quality.two_object_prompts

RESULTS_DIR = BENCHMARKS_DIR / "results"
MODELS = {"DiT": "dit", "U-Net": "unet"}  # column → load_pipeline(denoiser=...)
EVAL_CHUNK = 128  # prompts per generation call: generate_for_eval's batch, as training's evaluation draws them
RECIPE_BATCH = 128  # train_denoiser's batch_size
PROMPT_KINDS = {  # name → (seed offset, prompts(n, seed)); the offsets are benchmarks/quality.py's
    "one-object full, train split": (0, lambda n, seed: ShapesDataset(n, "train", seed=seed).batch(range(n)).captions),
    "one-object full, held-out pairs": (1, lambda n, seed: ShapesDataset(n, "heldout", seed=seed).batch(range(n)).captions),
    "partial one-object": (2, partial_prompts),
    "two-object full": (3, lambda n, seed: two_object_prompts(n, seed, colour_and_shape=False)),
    "two-object colour + shape": (4, lambda n, seed: two_object_prompts(n, seed, colour_and_shape=True)),
}
KID_KINDS = {"one-object full, train split": 1, "two-object full": 2}  # kind → objects per real image
LABEL, COLUMN = 44, 30  # widths of the table's label and of each model's column


class Report(quality.Report):
    """quality.py's report (prints lines and keeps them, for ``--out``), with a side-by-side row."""

    def row(self, label: str, cells: Sequence[str], note: str = "") -> None:
        self.say(f"{label:<{LABEL - 1}} " + "".join(f"{c:<{COLUMN - 1}} " for c in cells) + note)


def percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def with_interval(value: float, low: float, high: float) -> str:
    return f"{percent(value)} [{percent(low)}, {percent(high)}]"


def kid_unit(distances) -> int:
    """The power of ten, a multiple of 3, that KID figures are printed in: that of the largest figure (KID is on the
    classifier features' own scale: only ratios and overlaps mean anything)."""
    largest = max(max(abs(d.value), abs(d.low), abs(d.high)) for d in distances)
    return 3 * math.floor(math.log10(largest) / 3) if largest > 0 else 0


def kid_cell(distance, unit: int) -> str:
    """A KID and its interval in units of 10**unit, three significant digits."""
    return f"{distance.value / 10**unit:.3g} [{distance.low / 10**unit:.3g}, {distance.high / 10**unit:.3g}]"


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


class Comparison:
    """One measured figure of both models with intervals → a verdict, kept for the closing paragraph. ``kind``: the
    prompt kind (or "KID"); ``aspect``: "overall" or the attribute judged; ``values``: model → (value, low, high)."""

    def __init__(self, kind: str, aspect: str, values: dict[str, tuple[float, float, float]],
                 higher_is_better: bool = True):
        self.kind, self.aspect, self.values, self.higher_is_better = kind, aspect, values, higher_is_better
        (a, (va, la, ha)), (b, (vb, lb, hb)) = values.items()
        better = (va > vb) == higher_is_better
        self.leader = None if va == vb else a if better else b
        self.apart = la > hb or lb > ha  # the two 95% intervals do not overlap
        self.gap = abs(va - vb)
        self.paired_p: float | None = None  # the exact sign test's p-value, where the images are paired

    def verdict(self, unit=percent) -> str:
        if self.leader is None:
            return "  equal"
        if self.apart:
            return f"  {self.leader} clearly better (intervals apart)"
        return f"  level within the noise ({self.leader} ahead by {unit(self.gap)}, intervals overlap)"


def sign_test_p(only_a: int, only_b: int) -> float:
    """Two-sided exact sign test (McNemar's exact test) of paired right/wrong outcomes: of the d = a + b images right
    for one model only, a were the first model's; under "equally good" a ~ Binomial(d, 1/2), so
    p = min(1, 2 · Σ_{k ≤ min(a, b)} C(d, k) / 2^d) (McNemar 1947). The images both get right or both wrong say
    nothing about the difference, which is why the paired test sees differences that overlapping intervals hide."""
    d = only_a + only_b
    return 1.0 if d == 0 else min(1.0, 2 * sum(math.comb(d, k) for k in range(min(only_a, only_b) + 1)) / 2**d)


def judge_kind(name, images, prompts, judge, report, comparisons):
    """Prompt accuracy of each model's images of one kind: the overall row, per attribute, object count, binding."""
    results = {model: prompt_accuracy(images[model], prompts, judge) for model in MODELS}
    overall = Comparison(name, "overall", {m: (r.overall, *r.interval) for m, r in results.items()})
    comparisons.append(overall)
    report.row(f"{name} ({len(prompts)})", [with_interval(r.overall, *r.interval) for r in results.values()],
               overall.verdict())
    (a, ra), (b, rb) = results.items()
    only_a = int((ra.correct & ~rb.correct).sum())
    only_b = int((rb.correct & ~ra.correct).sum())
    overall.paired_p = sign_test_p(only_a, only_b)
    report.row("    right for one model only", [f"{k} image{'s' * (k != 1)}" for k in (only_a, only_b)],
               f"  (same prompts and noise: exact sign test p = {overall.paired_p:.2g})")
    for attribute in ATTRIBUTES:
        if not all(r.counts.get(attribute) for r in results.values()):
            continue
        cells, values = [], {}
        for model, r in results.items():
            k, n = round(r.per_attribute[attribute] * r.counts[attribute]), r.counts[attribute]
            values[model] = (k / n, *wilson_interval(k, n))
            cells.append(with_interval(*values[model]))
        comparison = Comparison(name, attribute, values)
        comparisons.append(comparison)
        report.row(f"    {attribute} ({results[a].counts[attribute]})", cells, comparison.verdict())
    report.row("    object count right", [percent(r.object_count) for r in results.values()])
    if ra.two_object_count:
        report.row("    binding errors", [f"{r.binding_errors} of {r.two_object_count}" for r in results.values()],
                   "  (right attributes on the wrong objects)")
    return results


def training_flops_and_speed(pipes, batch_size: int, timed_steps: int) -> tuple[dict, dict]:
    """Per model: FLOPs per image of one training step's forward + backward (torch's counter), and the median
    seconds of a training step (forward, backward, clipping, AdamW) on the same recipe batch, after a warm-up step."""
    first = next(iter(pipes.values()))
    schedule = first.schedule
    batch_fn = latent_batch_fn(first.vae, schedule, batch_size, seed=0, text_encoder=first.text_encoder,
                               tokenizer=first.tokenizer, window=batch_size, refresh=1)
    batch = batch_fn(0)  # one recipe batch: latents, noise, t, the text tower's tokens and mask of fresh captions
    flops, seconds = {}, {model: [] for model in pipes}
    models = {}
    for model, pipe in pipes.items():
        net = copy.deepcopy(pipe.denoiser).train().requires_grad_(True)  # the pipeline's copy stays as loaded
        with FlopCounterMode(display=False) as counter:
            denoiser_loss(net, batch, schedule)[0].backward()
        flops[model] = counter.get_total_flops() / batch_size
        net.zero_grad(set_to_none=True)
        models[model] = (net, torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0))

    def step(net, optimizer):
        loss = denoiser_loss(net, batch, schedule)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for net, optimizer in models.values():
        step(net, optimizer)  # warm-up
    for _ in range(timed_steps):  # alternating, so that a busy machine slows both alike
        for model, (net, optimizer) in models.items():
            start = time.perf_counter()
            step(net, optimizer)
            seconds[model].append(time.perf_counter() - start)
    return flops, {model: statistics.median(s) for model, s in seconds.items()}


def generate_timed(pipe, prompts: list[str], seed: int, chunk: int) -> tuple[torch.Tensor, float]:
    """``generate_for_eval`` one chunk at a time (image i from seed + i, as one call would draw it) → (images,
    seconds spent generating)."""
    images, seconds = [], 0.0
    for start in range(0, len(prompts), chunk):
        begin = time.perf_counter()
        images.append(generate_for_eval(pipe, prompts[start : start + chunk], seed=seed + start, batch_size=chunk))
        seconds += time.perf_counter() - begin
    return torch.cat(images), seconds


def record_cells(pipes, key: str, fmt) -> list[str]:
    cells = []
    for pipe in pipes.values():
        value = (getattr(pipe.denoiser, "training_info", None) or {}).get(key)
        cells.append("not recorded" if value is None else fmt(value))
    return cells


def grouped(comparisons: list[Comparison]) -> str:
    """"kind (overall, color, shape); other kind (size)": the comparisons' kinds, each with its aspects."""
    kinds: dict[str, list[str]] = {}
    for c in comparisons:
        kinds.setdefault(c.kind, []).append(c.aspect)
    return "; ".join(kind if aspects == ["overall"] else f"{kind} ({', '.join(aspects)})"
                     for kind, aspects in kinds.items()) or "none of the figures above"


def what_each_does_well(comparisons: list[Comparison], figures: dict[str, dict[str, float]]) -> list[str]:
    """The closing paragraph, assembled from the verdicts and figures measured in this run: one line per model of
    where it is clearly ahead (95% intervals apart), one of where the two are level (intervals overlap) and who is
    ahead there on the point estimate, then the costs as ratios U-Net / DiT."""
    a, b = MODELS
    lines = [f"{model} clearly better (95% intervals apart) on: "
             f"{grouped([c for c in comparisons if c.leader == model and c.apart])}." for model in MODELS]
    paired = [c for c in comparisons if c.paired_p is not None and c.paired_p < 0.05 and c.leader is not None]
    if paired:
        lines.append("Paired (same prompts and noise), the exact sign test finds a difference (p < 0.05) on: " + "; ".join(
            f"{c.kind} ({c.leader} ahead, p = {c.paired_p:.2g}{'' if c.apart else ', though the intervals overlap'})"
            for c in paired) + ".")
    level = [c for c in comparisons if not c.apart]
    if level:
        parts = [f"{model} ahead on the point estimate on {grouped([c for c in level if c.leader == model])}"
                 for model in MODELS if any(c.leader == model for c in level)]
        if any(c.leader is None for c in level):
            parts.append(f"equal on {grouped([c for c in level if c.leader is None])}")
        lines.append(f"Level within the noise (intervals overlap) on {len(level)} of {len(comparisons)} figures: "
                     + "; ".join(parts) + ".")

    def ratio(key):
        return figures[key][b] / figures[key][a] if figures[key][a] else math.nan

    speed = ratio("images_per_s")
    lines.append(
        f"Cost: the {b} has {ratio('parameters'):.2f}x the {a}'s parameters and needs {ratio('flops'):.2f}x its "
        f"training FLOPs per image; here it trains at {ratio('train_steps_per_s'):.2f}x the {a}'s steps/s and "
        f"generates at {speed:.2f}x its images/s ({'faster' if speed > 1 else 'slower' if speed < 1 else 'as fast'}).")
    steps = figures["record_steps"]
    if not any(math.isnan(steps[m]) for m in MODELS):
        lines.append(f"Training records: the {a} reached {steps[a]:,.0f} steps and the {b} {steps[b]:,.0f} "
                     f"({ratio('record_steps'):.2f}x) in {figures['record_minutes'][a]:.1f} and "
                     f"{figures['record_minutes'][b]:.1f} minutes.")
    return lines


def wrap(text: str, width: int = 110, indent: str = "    ") -> list[str]:
    lines, line = [], indent
    for word in text.split():
        if len(line) + len(word) + 1 > width and line.strip():
            lines.append(line.rstrip())
            line = indent
        line += word + " "
    return lines + [line.rstrip()]


def parse_args(argv: Sequence[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None, metavar="DIR",
                        help="a folder with vae.*, clip.*, denoiser.* and unet.* (default: the shipped weights)")
    parser.add_argument("--images", type=int, default=None, help="prompts per kind (default 256; --quick: 8)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1, as the shipped models were trained: these small networks gain "
                             "little from a second thread, and two threads lose much to each other on a busy machine)")
    parser.add_argument("--seed", type=int, default=4242, help="evaluation seed (default 4242, quality.py's)")
    parser.add_argument("--batch", type=int, default=None,
                        help=f"training batch for the FLOP count and step timing (default the recipe's {RECIPE_BATCH}; --quick: 8)")
    parser.add_argument("--quick", action="store_true", help="a few images and a small batch: a smoke test, not a measurement")
    parser.add_argument("--out", nargs="?", const="", default=None, metavar="NAME",
                        help="also write the report to benchmarks/results/NAME (default compare_denoisers-YYYYMMDD-HHMM.txt)")
    args = parser.parse_args(argv)
    args.images = args.images if args.images is not None else 8 if args.quick else 256
    args.batch = args.batch if args.batch is not None else 8 if args.quick else RECIPE_BATCH
    for name, least in (("images", 2), ("threads", 1), ("batch", 1)):  # KID needs two images per set
        if getattr(args, name) < least:
            parser.error(f"--{name} must be an integer ≥ {least}, got {getattr(args, name)}")
    if args.out and ("/" in args.out or os.sep in args.out or args.out in (".", "..")):
        parser.error(f"--out takes a file name inside benchmarks/results/, got {args.out!r}")
    return parser, args


def main(argv: Sequence[str] | None = None, results_dir: Path = RESULTS_DIR) -> Path | None:
    """Run the comparison; returns the results file written (``--out``), else None."""
    parser, args = parse_args(argv)
    args.threads = set_threads(args.threads)  # capped at the cores, with a warning
    started, clock = datetime.now(), time.perf_counter()
    try:
        pipes = {model: load_pipeline(args.weights, denoiser=name) for model, name in MODELS.items()}
        judge = default_scene_reader()
    except CheckpointError as e:
        parser.error(str(e))
    n, chunk = args.images, min(EVAL_CHUNK, args.images)
    report = Report()
    report.say(f"DiT vs course U-Net (issue 14): {args.weights or 'shipped weights'}, {n} prompts per kind, seed "
               f"{args.seed}, {args.threads} thread(s), {os.cpu_count()} CPUs, load average "
               f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; torch {torch.__version__}, {started:%Y-%m-%d %H:%M}"
               f"{' (QUICK: a smoke test, not a measurement)' if args.quick else ''}")
    pipe = next(iter(pipes.values()))
    report.say(f"sampling: 20 DPM-Solver++ steps, guidance 4, guidance interval {pipe.guidance_interval}, "
               f"{chunk} prompts per call; judged by the shipped scene reader")
    report.say()
    report.row("", list(MODELS))
    figures: dict[str, dict[str, float]] = {}

    report.say("size and training cost")
    figures["parameters"] = {m: count_parameters(p.denoiser) for m, p in pipes.items()}
    report.row("  parameters", [f"{figures['parameters'][m]:,}" for m in MODELS])
    report.row("  weights file (.safetensors)",
               [f"{weights_path(DENOISERS[name], args.weights).stat().st_size / 1e6:.2f} MB" for name in MODELS.values()])
    timed_steps = 2 if args.quick else 5
    flops, step_seconds = training_flops_and_speed(pipes, args.batch, timed_steps)
    figures["flops"] = flops
    figures["train_steps_per_s"] = {m: 1 / s for m, s in step_seconds.items()}
    report.row("  training FLOPs per image (fwd + bwd)", [f"{flops[m] / 1e6:,.0f} MFLOP" for m in MODELS],
               f"  (batch {args.batch})")
    seen = record_cells(pipes, "images_seen", lambda v: f"{v:,}")
    report.row("  images seen in training", seen)
    report.row("  training compute (FLOPs x images)",
               [f"{flops[m] * p.denoiser.training_info['images_seen'] / 1e12:,.1f} TFLOP"
                if (getattr(p.denoiser, "training_info", None) or {}).get("images_seen") else "not recorded"
                for m, p in pipes.items()])
    report.row("  training step here (batch, fwd+bwd+AdamW)",
               [f"{figures['train_steps_per_s'][m]:.2f} steps/s ({args.batch / step_seconds[m]:.0f} img/s)" for m in MODELS],
               f"  (median of {timed_steps}, {args.threads} thread(s))")

    report.say("training record (the weights' JSON)")
    report.row("  steps reached", record_cells(pipes, "steps", lambda v: f"{v:,}"))
    report.row("  minutes", record_cells(pipes, "minutes", lambda v: f"{v:.1f}"))
    report.row("  stopped by", record_cells(pipes, "stopped_reason", str))
    report.row("  final loss", record_cells(pipes, "final_loss", lambda v: f"{v:.4f}"))
    report.row("  threads, batch", [f"{(getattr(p.denoiser, 'training_info', None) or {}).get('torch_threads', '?')}, "
                                    f"{(getattr(p.denoiser, 'training_info', None) or {}).get('batch_size', '?')}"
                                    for p in pipes.values()])
    report.row("  its own evaluation (train/heldout/two)",
               record_cells(pipes, "evaluation", lambda v: "/".join(percent(x) for x in v["prompt_accuracy"].values())
                            if "prompt_accuracy" in v else "skipped"))
    for key in ("steps", "minutes"):
        figures[f"record_{key}"] = {m: float((getattr(p.denoiser, "training_info", None) or {}).get(key, math.nan) or math.nan)
                                    for m, p in pipes.items()}
    report.row("  steps/s in that run", [f"{figures['record_steps'][m] / (60 * figures['record_minutes'][m]):.2f}"
                                         if figures["record_minutes"][m] > 0 else "not recorded" for m in MODELS],
               "  (data, text tower and EMA included)")

    for pipe in pipes.values():  # warm-up, untimed
        generate_for_eval(pipe, ShapesDataset(min(16, n), "train", seed=7).batch(range(min(16, n))).captions, seed=0)
    comparisons: list[Comparison] = []
    gen_seconds = {m: 0.0 for m in MODELS}
    kid_images: dict[str, dict[str, torch.Tensor]] = {}
    report.say(f"prompt accuracy, 95% Wilson intervals ({n} prompts per kind; per attribute: over the prompts naming it)")
    for k, (kind, (offset, make_prompts)) in enumerate(PROMPT_KINDS.items()):
        prompts = make_prompts(n, args.seed + offset)
        images = {}
        order = list(MODELS) if k % 2 == 0 else list(reversed(MODELS))  # take turns at going first
        for model in order:
            images[model], seconds = generate_timed(pipes[model], prompts, args.seed + offset, chunk)
            gen_seconds[model] += seconds
        judge_kind(kind, {m: images[m] for m in MODELS}, prompts, judge, report, comparisons)
        if kind in KID_KINDS:
            kid_images[kind] = images
    total = n * len(PROMPT_KINDS)
    figures["images_per_s"] = {m: total / gen_seconds[m] for m in MODELS}
    report.say("speed")
    report.row("  images/s generating", [f"{figures['images_per_s'][m]:.1f}" for m in MODELS],
               f"  ({total} images each, 20 steps, guidance 4, {args.threads} thread(s))")

    bootstrap = 100 if args.quick else 1000
    kids, baselines = {}, {}
    for kind, objects in KID_KINDS.items():  # generated vs real scenes of as many objects, and real vs real
        real = ShapesDataset(n, "train", seed=BASELINE_SEED, num_objects=objects).batch(range(n)).images
        again = ShapesDataset(n, "train", seed=BASELINE_SEED + 1, num_objects=objects).batch(range(n)).images
        kids[kind] = {m: kid(real, kid_images[kind][m], bootstrap=bootstrap) for m in MODELS}
        baselines[kind] = kid(real, again, bootstrap=bootstrap)
    unit = kid_unit([d for row in kids.values() for d in row.values()] + list(baselines.values()))
    report.say(f"distribution: KID in units of 1e{unit} against {n} real train-split scenes of as many objects, 95% "
               f"bootstrap interval (lower is better)")
    for kind, row in kids.items():
        comparison = Comparison(f"KID of {kind}", "overall", {m: (d.value, d.low, d.high) for m, d in row.items()},
                                higher_is_better=False)
        comparisons.append(comparison)
        report.row(f"  KID, {kind}", [kid_cell(d, unit) for d in row.values()],
                   comparison.verdict(lambda x: f"{x / 10**unit:.3g}"))
        report.row("    real vs real (the floor)", [kid_cell(baselines[kind], unit)] * 2)

    report.say()
    report.say("what each does well (from the figures above):")
    for line in what_each_does_well(comparisons, figures):
        for wrapped in wrap(line):
            report.say(wrapped)
    report.say()
    report.say(f"total {time.perf_counter() - clock:.0f} s, peak memory {peak_rss_mb():.0f} MB RSS")
    if args.out is None:
        return None
    path = Path(results_dir) / (args.out or f"compare_denoisers-{started:%Y%m%d-%H%M}{'-quick' if args.quick else ''}.txt")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, ("\n".join(report.lines) + "\n").encode())
    print(f"report written to {path}")
    return path


if __name__ == "__main__":
    main()
