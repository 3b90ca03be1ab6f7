"""How much do the samplers cost, next to the model they drive? And next to diffusers' schedulers?

What it measures, and the targets it checks:
- (a) a sampler's own work per model evaluation (``scale_model_input`` + ``step``) against one forward pass of
  the default denoiser (``Denoiser(DenoiserConfig())``) at batch 64; both are printed, for every sampler, with
  the target that the sampler's share stays under 5%;
- (b) the same 20-step sampling loop driving the same model, with sdlearn's sampler and with the diffusers
  scheduler configured identically (DDIMScheduler, DPMSolverMultistepScheduler), with the target that sdlearn is
  no slower, i.e. diffusers_time / sdlearn_time ≥ 1. Each round times both loops back to back (who goes first
  alternates), so that a busy machine slows both alike; the median times and the median of the per-round
  ratios are printed. Their outputs are compared too, so that both do the same work. The model dominates both
  loops, so the ratio mostly shows the machine's noise; (c) isolates the schedulers.
- (c), for information: the same loops with the model replaced by a fixed tensor, i.e. the schedulers alone,
  and the ratio of (b) that they imply, (20 forward passes + diffusers' scheduler) / (20 forward passes + ours),
  which a busy machine cannot blur.

Everything runs under ``torch.inference_mode`` in float32 on the CPU. The model gets random weights (its
zero-initialised output layer would otherwise predict 0 everywhere) and text tokens ``[B, 16, text_dim]``.
Peak resident memory is printed at the end.

    python benchmarks/samplers.py                  # batch 64, 20 steps, 7 rounds
    python benchmarks/samplers.py --batch 16 --rounds 3
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
import warnings

import torch

from sdlearn.denoiser import Denoiser, DenoiserConfig
from sdlearn.samplers import SAMPLER_NAMES, get_sampler, sample
from sdlearn.schedules import NoiseSchedule

SD_CONFIG = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                 timestep_spacing="leading", steps_offset=0, prediction_type="epsilon")


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sampler_work_per_evaluation(name: str, schedule: NoiseSchedule, x: torch.Tensor, output: torch.Tensor,
                                steps: int, repeats: int, warmup: int = 2) -> float:
    """Seconds per model evaluation of set_timesteps + scale_model_input + step, with a fixed model output."""
    sampler = get_sampler(name, schedule)
    generator = torch.Generator().manual_seed(0)

    def loop():
        sampler.set_timesteps(steps)
        state = x * sampler.init_noise_sigma
        for t in sampler.timesteps:
            sampler.scale_model_input(state, t)
            state = sampler.step(output, t, state, generator=generator)

    sampler.set_timesteps(steps)
    evaluations = len(sampler.timesteps)
    return median_time(loop, repeats, warmup) / evaluations


def diffusers_loop(scheduler, model_fn, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """diffusers' sampling loop, as in its pipelines."""
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(model_fn(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x


def compare_loops(name, scheduler, schedule, model_fn, noise, steps, rounds):
    """Median seconds of the sdlearn loop and of the diffusers loop, the median of the per-round ratios
    diffusers / sdlearn (each round times both, back to back, so a busy machine slows both alike), and the
    largest difference between their outputs."""
    def ours():
        return sample(model_fn, get_sampler(name, schedule), noise.shape, steps, noise=noise, progress=False)

    def theirs():
        return diffusers_loop(scheduler, model_fn, noise, steps)

    difference = (ours() - theirs()).abs().max().item()  # also the warm-up
    times = {"sdlearn": [], "diffusers": []}
    for r in range(rounds):
        order = (("sdlearn", ours), ("diffusers", theirs))
        for label, fn in order if r % 2 == 0 else order[::-1]:  # alternate who goes first
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    ratios = [d / s for s, d in zip(times["sdlearn"], times["diffusers"])]  # per round: neighbours in time
    return statistics.median(times["sdlearn"]), statistics.median(times["diffusers"]), statistics.median(ratios), difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7, help="timed repeats of each measurement (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = DenoiserConfig()
    model = Denoiser(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)  # random weights: the zero-initialised output layer would predict 0 everywhere
    schedule = NoiseSchedule.from_name("scaled_linear")
    shape = (args.batch, config.latent_channels, config.latent_size, config.latent_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    text = torch.randn(args.batch, 16, config.text_dim, generator=torch.Generator().manual_seed(2))

    def model_fn(x, t):
        return model(x, t, text)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, batch {args.batch}, "
          f"latents {list(shape[1:])}, {args.steps} steps, median of {args.rounds}")

    with torch.inference_mode():
        # (a) the sampler's own work per model evaluation, against one forward pass; measured in alternating
        # rounds, so that a busy machine inflates neither side alone
        output = torch.randn(shape, generator=torch.Generator().manual_seed(3))
        measurements = {"forward": lambda: median_time(lambda: model_fn(noise, torch.tensor(500)), 1, warmup=0),
                        "forward without text": lambda: median_time(lambda: model(noise, torch.tensor(500)), 1, warmup=0)}
        for name in SAMPLER_NAMES:
            measurements[name] = (lambda name=name: sampler_work_per_evaluation(name, schedule, noise, output,
                                                                                 args.steps, repeats=1, warmup=1))
        samples = {key: [] for key in measurements}
        for measure in measurements.values():
            measure()  # warm-up
        for _ in range(args.rounds):
            for key, measure in measurements.items():
                samples[key].append(measure())
        median = {key: statistics.median(values) for key, values in samples.items()}
        forward, forward_no_text = median["forward"], median["forward without text"]
        print(f"\n(a) one denoiser forward pass: {forward * 1e3:.2f} ms with text tokens, {forward_no_text * 1e3:.2f} ms "
              f"without; percentages below are of the faster of the two, round by round (target < 5%)")
        fastest = [min(a, b) for a, b in zip(samples["forward"], samples["forward without text"])]
        for name in SAMPLER_NAMES:
            share = statistics.median(w / f for w, f in zip(samples[name], fastest))
            print(f"    {name:6s} sampler work per model evaluation {median[name] * 1e3:7.3f} ms = {share:6.2%} "
                  f"of a forward pass  {'ok' if share < 0.05 else 'ABOVE TARGET'}")

        try:
            import diffusers
        except ImportError:
            print("\n(b), (c): diffusers is not installed; skipped")
            return
        diffusers.utils.logging.set_verbosity_error()
        warnings.filterwarnings("ignore", message=".*__array__ implementation.*")
        twins = {"ddim": lambda: diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **SD_CONFIG),
                 "dpm++": lambda: diffusers.DPMSolverMultistepScheduler(**SD_CONFIG)}

        # (b) whole loops with the model
        print(f"\n(b) {args.steps}-step sampling loop with the model (target: diffusers / sdlearn ≥ 1.0)")
        for name, make in twins.items():
            scheduler = make()
            ours, theirs, ratio, difference = compare_loops(name, scheduler, schedule, model_fn, noise, args.steps,
                                                            args.rounds)
            print(f"    {name:6s} sdlearn {ours * 1e3:8.1f} ms   diffusers {type(scheduler).__name__} {theirs * 1e3:8.1f} ms"
                  f"   ratio {ratio:5.3f}   max |difference| {difference:.1e}")

        # (c) the schedulers alone: cheap, so many more rounds
        rounds = max(50, 10 * args.rounds)
        print(f"\n(c) the same {args.steps}-step loops with the model replaced by a fixed tensor (the schedulers alone, "
              f"median of {rounds}), and the ratio of (b) they imply with the model's {args.steps} forward passes "
              f"({args.steps} × {forward * 1e3:.1f} ms)")
        for name, make in twins.items():
            scheduler = make()
            ours, theirs, ratio, _ = compare_loops(name, scheduler, schedule, lambda x, t: output, noise, args.steps,
                                                   rounds)
            model_time = args.steps * forward
            print(f"    {name:6s} sdlearn {ours * 1e3:8.2f} ms   diffusers {type(scheduler).__name__} {theirs * 1e3:8.2f} ms"
                  f"   ratio {ratio:5.2f}   implied loop ratio {(model_time + theirs) / (model_time + ours):6.4f}")

    print(f"\ntotal time {time.perf_counter() - started:.0f} s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
    print(f"\npeak resident memory: {peak:.0f} MB")


if __name__ == "__main__":
    main()
