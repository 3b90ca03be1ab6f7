"""Issue 15's targets for rectified flow, side by side in one run.

    python benchmarks/flow.py [--weights DIR] [--images 256] [--threads 2] [--seed 4343] [--quick] [--out [NAME]]

The flow DiT (``flow.*``) and the ε-DiT (``denoiser.*``) come from one weights folder (the shipped
``sdlearn/weights/``, or ``--weights DIR``) through ``sdlearn.pretrained.load_pipeline(DIR, denoiser="flow"|"dit")``,
so they share the VAE, the text tower, the guidance scale (the pipeline's default, 4) and the guidance interval.

1. **Sampler parity**: :class:`sdlearn.flow.FlowMatchEulerSampler` against diffusers'
   ``FlowMatchEulerDiscreteScheduler`` over whole trajectories (every intermediate state, from the same start, with
   the same velocity function), for shift 1 and 3 and 1 to 50 steps: the largest absolute difference (target
   ≤ 1e-5). Not measured without diffusers.
2. **Prompt accuracy of the flow model at 8 Euler steps** on ``--images`` one-object full prompts of the train split
   (captions of ``ShapesDataset(n, "train", seed)``), judged by the shipped scene reader, with a 95% Wilson interval
   (target ≥ 95%); the held-out pairs beside it, for information.
3. **Four steps**: the flow model at 4 Euler steps (and 4 Heun steps, 7 model calls) against the ε-model at 4 steps of
   each of its samplers (DDIM, DPM-Solver++, Euler, Heun), on the same prompts and noise, with intervals; the ε-model's
   best is compared with the flow model by McNemar's exact test on the images right for one of them only. To explain
   the result, each model's 4-step latents are compared with its own 50-step solution from the same noise (the RMS
   distance, relative to the 50-step latents' RMS): the discretisation error of few steps, which is small where the
   ODE's trajectories are straight.
4. **Training time**: the minutes and steps in each file's ``"training"`` record; met when the flow model's minutes
   are within the ε-model's.

``--quick``: a few images, a smoke test, not a measurement.
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

from sdlearn.checkpoint import CheckpointError
from sdlearn.data import ShapesDataset
from sdlearn.flow import FlowMatchEulerSampler
from sdlearn.metrics import default_scene_reader, prompt_accuracy
from sdlearn.pretrained import load_pipeline
from sdlearn.recipes import generate_for_eval
from sdlearn.training import set_threads

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGETS = {
    "FlowMatchEulerSampler vs diffusers, max |difference| over trajectories": ("≤", 1e-5),
    "flow model, 8 Euler steps, one-object full prompts": ("≥", 0.95),
    "training minutes, flow within the ε-model's": ("≤", None),
}
EPSILON_SAMPLERS = ("ddim", "dpm++", "euler", "heun")
PARITY_SHIFTS, PARITY_STEPS = (1.0, 3.0), (1, 2, 4, 8, 20, 50)


def _load_report_tools():
    """benchmarks/report.py, loaded from its file (sys.path untouched: the scripts here are named like sdlearn's
    modules)."""
    spec = importlib.util.spec_from_file_location("sdlearn_benchmark_report", Path(__file__).resolve().parent / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report_tools = _load_report_tools()
Report, percent, with_interval = report_tools.Report, report_tools.percent, report_tools.with_interval
peak_rss_mb, sign_test_p = report_tools.peak_rss_mb, report_tools.sign_test_p




# -- 1. parity -----------------------------------------------------------------------------------------------
def fake_velocity(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic velocity that depends on the state and the timestep: a fixed channel mix, scaled with t."""
    mix = torch.linspace(-0.6, 0.6, 16).reshape(4, 4)
    return torch.einsum("ij,bjhw->bihw", mix, x) * (0.5 + float(t) / 1000) + 0.1


def parity(report: Report) -> None:
    name = next(iter(TARGETS))
    report.say(f"\n[1] {name}")
    try:
        from diffusers import FlowMatchEulerDiscreteScheduler
    except ImportError:
        report.say("    diffusers is not installed (pip install diffusers)")
        report.verdict(name, "not measured", None)
        return
    worst = 0.0
    for shift in PARITY_SHIFTS:
        cells = []
        for steps in PARITY_STEPS:
            ours, theirs = FlowMatchEulerSampler(shift=shift), FlowMatchEulerDiscreteScheduler(shift=shift)
            ours.set_timesteps(steps)
            theirs.set_timesteps(steps)
            x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
            y, largest = x.clone(), (ours.timesteps - theirs.timesteps).abs().max().item() / 1000  # σ difference
            for t_ours, t_theirs in zip(ours.timesteps, theirs.timesteps):
                x = ours.step(fake_velocity(x, t_ours), t_ours, x)
                y = theirs.step(fake_velocity(y, t_theirs), t_theirs, y).prev_sample
                largest = max(largest, (x - y).abs().max().item())
            cells.append(f"{steps} steps {largest:.1e}")
            worst = max(worst, largest)
        report.say(f"    shift {shift:g}: " + ", ".join(cells))
    figure = f"{worst:.1e}"
    report.say(f"    largest difference in any state or σ: {figure}")
    report.verdict(name, figure, worst <= TARGETS[name][1])


# -- 2 and 3. prompt accuracy ----------------------------------------------------------------------------------
def draw(pipe, prompts, seed, steps, sampler, chunk) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    images = generate_for_eval(pipe, prompts, steps=steps, sampler=sampler, seed=seed, batch_size=chunk)
    return images, time.perf_counter() - start


def final_latents(pipe, prompts, seed, steps, sampler) -> torch.Tensor:
    """The latents ``[N, 4, 8, 8]`` the pipeline's loop ends with (before decoding), image i's noise from seed + i."""
    kept = {}
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    pipe(prompts, num_inference_steps=steps, sampler=sampler, generator=generators, progress=False,
         callback=lambda i, t, latents, x0: kept.__setitem__("x", latents.clone()))
    return kept["x"]


def relative_error(pipe, prompts, seed, steps, sampler, reference_steps: int = 50) -> float:
    """RMS(latents after ``steps`` − latents after ``reference_steps``) / RMS(reference), the same noise."""
    coarse = final_latents(pipe, prompts, seed, steps, sampler)
    fine = final_latents(pipe, prompts, seed, reference_steps, sampler)
    return ((coarse - fine).pow(2).mean().sqrt() / fine.pow(2).mean().sqrt()).item()


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None, help="a weights folder with vae.*, clip.*, denoiser.*, flow.* "
                                                        "(default: the shipped weights)")
    parser.add_argument("--images", type=int, default=256, help="prompts per accuracy (default 256)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--seed", type=int, default=4343, help="evaluation seed (default 4343, one no training uses)")
    parser.add_argument("--quick", action="store_true", help="16 images: a smoke test, not a measurement")
    parser.add_argument("--out", nargs="?", const="", default=None, metavar="NAME",
                        help="also write the report to benchmarks/results/NAME (default flow-DATE.txt)")
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
        flow, eps = load_pipeline(args.weights, denoiser="flow"), load_pipeline(args.weights)
        judge = default_scene_reader()
    except CheckpointError as e:
        parser.error(str(e))
    n, chunk = args.images, min(128, args.images)
    report = Report()
    report.say(f"rectified flow (issue 15): {args.weights or 'shipped weights'}, {n} prompts per figure, seed {args.seed}, "
               f"{args.threads} thread(s), {os.cpu_count()} CPUs, load average "
               f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; torch {torch.__version__}, {started:%Y-%m-%d %H:%M}"
               f"{' (QUICK: a smoke test, not a measurement)' if args.quick else ''}")
    report.say(f"guidance {4.0:g} (the pipeline's default), guidance interval {flow.guidance_interval}, flow shift "
               f"{flow.flow_shift:g}; judged by the shipped scene reader")
    parity(report)

    name = list(TARGETS)[1]
    train = ShapesDataset(n, "train", seed=args.seed).batch(range(n)).captions
    heldout = ShapesDataset(n, "heldout", seed=args.seed + 1).batch(range(n)).captions
    report.say(f"\n[2] {name}: {n} prompts, e.g. {train[0]!r}")
    images, seconds = draw(flow, train, args.seed, 8, "euler", chunk)
    result = prompt_accuracy(images, train, judge)
    report.say(f"    train split: {with_interval(result)}; per attribute "
               + ", ".join(f"{k} {percent(v)}" for k, v in result.per_attribute.items()) + f"  [{seconds:.0f} s]")
    held = prompt_accuracy(draw(flow, heldout, args.seed + 1, 8, "euler", chunk)[0], heldout, judge)
    report.say(f"    held-out pairs (information): {with_interval(held)}")
    report.verdict(name, with_interval(result), result.overall >= TARGETS[name][1])

    report.say(f"\n[3] four steps: the flow model against the ε-model's samplers, {n} one-object train prompts "
               f"(seed {args.seed + 2}), the same noise")
    prompts = ShapesDataset(n, "train", seed=args.seed + 2).batch(range(n)).captions
    runs = {("flow", "euler"): (flow, 4), ("flow", "heun"): (flow, 7)}
    runs.update({("ε", s): (eps, {"heun": 7}.get(s, 4)) for s in EPSILON_SAMPLERS})
    results = {}
    for (model, sampler), (pipe, calls) in runs.items():
        images, seconds = draw(pipe, prompts, args.seed + 2, 4, sampler, chunk)
        results[model, sampler] = prompt_accuracy(images, prompts, judge)
        report.say(f"    {model}-model, 4 {sampler} steps ({calls} model calls): "
                   f"{with_interval(results[model, sampler])}  [{seconds:.0f} s]")
    best = max(EPSILON_SAMPLERS, key=lambda s: results["ε", s].overall)
    a, b = results["flow", "euler"].correct.bool(), results["ε", best].correct.bool()
    only_flow, only_eps = int((a & ~b).sum()), int((~a & b).sum())
    p = sign_test_p(only_flow, only_eps)
    report.say(f"    the ε-model's best at 4 steps: {best}. Right for the flow model only: {only_flow}, for the ε-model "
               f"only: {only_eps}; McNemar's exact p = {p:.2g}")
    k = min(n, 64)
    errors = {("flow", "euler"): relative_error(flow, prompts[:k], args.seed + 2, 4, "euler"),
              ("ε", best): relative_error(eps, prompts[:k], args.seed + 2, 4, best)}
    report.say(f"    4-step latents against each model's own 50-step solution (same noise, {k} prompts), relative "
               f"RMS error: flow Euler {errors['flow', 'euler']:.3f}, ε {best} {errors['ε', best]:.3f}")
    leader = "flow" if results["flow", "euler"].overall > results["ε", best].overall else "ε"
    trained = [(getattr(pipe.denoiser, "training_info", None) or {}).get("steps") for pipe in (flow, eps)]
    steps_ratio = trained[0] / trained[1] if all(trained) else None
    apart = p < 0.05
    report.say("    reading: " + (
        f"the {leader} model is ahead at 4 steps ({'a significant' if apart else 'not a significant'} difference, "
        f"p = {p:.2g}). "
        + ("The flow model's 4 Euler steps land closer to its own converged solution than the ε-model's 4 steps do "
           "to its: the straight-path objective leaves an ODE whose trajectories bend less, so few steps lose less."
           if errors["flow", "euler"] < errors["ε", best] else
           "The ε-model's 4-step solution is closer to its converged one than the flow model's: here straighter "
           "training paths did not give straighter sampling trajectories, since the marginal velocity averages the "
           "lines through each point and bends where they cross.")
        + " Accuracy at 4 steps also depends on how well each model learned the prompts, not only on the ODE"
        + (f": in the same minutes the flow model took {steps_ratio:.2g}× the ε-model's training steps, which a "
           "comparison of the objectives alone would equalise." if steps_ratio and abs(steps_ratio - 1) > 0.1 else ".")))

    name = list(TARGETS)[2]
    report.say(f"\n[4] {name}")
    minutes = {}
    for label, pipe in (("flow", flow), ("ε", eps)):
        record = getattr(pipe.denoiser, "training_info", None) or {}
        minutes[label] = record.get("minutes")
        report.say(f"    {label}-model: {record.get('minutes', '?')} min, {record.get('steps', '?')} steps, "
                   f"final loss {record.get('final_loss', '?')}")
    if None in minutes.values():
        report.verdict(name, "not recorded", None)
    else:
        report.verdict(name, f"{minutes['flow']} vs {minutes['ε']} min", minutes["flow"] <= minutes["ε"] * 1.01)

    report.say(f"\nsummary (seed {args.seed}, {args.threads} threads{', QUICK' if args.quick else ''}):")
    for target, (kind, value) in TARGETS.items():
        figure, met = report.verdicts.get(target, ("not measured", None))
        goal = f"{kind} {value:g}" if isinstance(value, float) and value < 1e-3 else f"{kind} {percent(value)}" \
            if value is not None else "within"
        report.say(f"    {target:72} {figure:32} target {goal:10} "
                   f"{'not measured' if met is None else 'met' if met else 'MISSED'}")
    report.say(f"    flow 4 Euler steps {percent(results['flow', 'euler'].overall)} vs ε 4 {best} steps "
               f"{percent(results['ε', best].overall)} (reported, no target)")
    report.say(f"\ntotal {time.perf_counter() - clock:.0f} s, peak memory {peak_rss_mb():.0f} MB RSS")
    if args.out is None:
        return None
    return report.write(results_dir / (args.out or f"flow-{started:%Y%m%d-%H%M}{'-quick' if args.quick else ''}.txt"))


if __name__ == "__main__":
    main()
