"""Speed and size of the text-to-image pipeline, against the targets of issue 7:

- a batch of 16 images, 20 steps, guidance on (4.0), DPM-Solver++, 2 CPU threads: at most 3 s;
- the pipeline loads (``sdlearn.pretrained.load_pipeline()``) in under 2 s;
- all shipped weights together (``sdlearn/weights/``) at most 25 MB;
- peak resident memory, printed beside (every notebook and command must stay under 4 GB).

Where a shipped model is missing (``vae``, ``clip`` or ``denoiser`` in ``sdlearn/weights/``), a randomly
initialised model of the default configuration stands in for it, saved in the shipped format (float16 for
the denoiser) to a temporary folder that is then loaded like the shipped one: the time and the bytes are those
of the real thing, the pictures are not. The output says which models stood in.

    python benchmarks/pipeline.py               # 2 threads, 7 timed runs
    python benchmarks/pipeline.py --threads 1   # on a busy machine, one thread's CPU time is the steadier figure

Each timed figure is the median of the runs, with the best beside it; the process CPU time of a run is
printed too (on a shared machine the wall clock also measures the other processes).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sdlearn.pretrained import WEIGHTS_DIR, load_pipeline

PARTS = ("vae", "clip", "denoiser")


def stand_in(name: str, folder: Path) -> None:
    """Save a random-init default-size model ``name`` into ``folder`` as its shipped files would be."""
    torch.manual_seed(0)
    if name == "vae":
        from sdlearn.pretrained import save_vae
        from sdlearn.vae import VAE

        save_vae(VAE(), folder / "vae", training={"note": "random init (benchmark stand-in)"})
    elif name == "clip":
        from sdlearn.pretrained import save_clip
        from sdlearn.text import TinyCLIP

        save_clip(TinyCLIP(), folder / "clip", training={"note": "random init (benchmark stand-in)"})
    else:
        from sdlearn.denoiser import Denoiser
        from sdlearn.pretrained import save_denoiser

        save_denoiser(Denoiser(), folder / "denoiser", training={"note": "random init (benchmark stand-in)"})


def timed(fn, runs: int) -> tuple[list[float], list[float]]:
    walls, cpus = [], []
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return walls, cpus


def show(label: str, walls: list[float], cpus: list[float] | None = None, target: str = "") -> None:
    line = f"{label:<44} median {statistics.median(walls):7.3f} s   best {min(walls):7.3f} s"
    if cpus is not None:
        line += f"   CPU {statistics.median(cpus):7.3f} s"
    print(line + (f"   (target {target})" if target else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--sampler", default="dpm++")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")

    missing = [name for name in PARTS if not (WEIGHTS_DIR / f"{name}.safetensors").is_file()]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in PARTS:
            if name in missing:
                stand_in(name, folder)
            else:
                for suffix in (".safetensors", ".json"):
                    shutil.copy(WEIGHTS_DIR / f"{name}{suffix}", folder / f"{name}{suffix}")
        if missing:
            print(f"NOTE: no shipped {', '.join(missing)} yet: random-init default-size stand-in(s) used; "
                  "timings and sizes are real, images are noise")
        else:
            print("shipped weights: sdlearn/weights/{vae,clip,denoiser}")

        # -- sizes ---------------------------------------------------------------------------------------
        shipped = sorted(p for p in WEIGHTS_DIR.iterdir() if p.suffix in (".safetensors", ".json"))
        shipped_bytes = sum(p.stat().st_size for p in shipped)
        print(f"\nshipped weights now: {shipped_bytes / 1e6:.2f} MB in {len(shipped)} files "
              f"({', '.join(f'{p.name} {p.stat().st_size / 1e6:.2f}' for p in shipped if p.suffix == '.safetensors')})")
        if missing:
            extra = sum(p.stat().st_size for name in missing for p in folder.glob(f"{name}.*"))
            print(f"with the stand-in(s) for {', '.join(missing)}: {(shipped_bytes + extra) / 1e6:.2f} MB (target ≤ 25 MB)")
        else:
            print("(target ≤ 25 MB)")

        # -- loading -------------------------------------------------------------------------------------
        print()
        code = ("import time; t = time.perf_counter(); import torch; t1 = time.perf_counter(); "
                "from sdlearn.pretrained import load_pipeline; t2 = time.perf_counter(); "
                f"load_pipeline({str(folder)!r}); t3 = time.perf_counter(); "
                "print(t1 - t, t2 - t1, t3 - t2)")
        fresh = []
        for _ in range(3):
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            fresh.append([float(x) for x in out.stdout.split()])
        fresh.sort(key=lambda r: sum(r))
        median = fresh[1]
        print(f"{'fresh process: import torch / sdlearn / load':<44} {median[0]:.3f} s / {median[1]:.3f} s / "
              f"{median[2]:.3f} s (median of 3 by total)")
        load_pipeline(folder)  # first load in this process: imports sdlearn.text, .denoiser, .pipeline
        walls, cpus = timed(lambda: load_pipeline(folder), args.runs)
        show("load_pipeline() (modules imported)", walls, cpus, "< 2 s")

        # -- generating ----------------------------------------------------------------------------------
        pipe = load_pipeline(folder)
        prompts = ["a large red circle in the top left"] * args.batch
        kwargs = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler, progress=False)
        pipe(prompts, seed=0, **kwargs)  # warm-up
        seeds = iter(range(1, 10_000))
        walls, cpus = timed(lambda: pipe(prompts, seed=next(seeds), **kwargs), args.runs)
        print()
        show(f"{args.batch} images, {args.steps} steps, guidance {args.guidance:g}, {args.sampler}", walls, cpus, "≤ 3 s")

        # where the time goes
        guided = args.guidance != 1.0
        n = args.batch * (2 if guided else 1)
        text_walls, _ = timed(lambda: pipe.encode_prompt([""] * args.batch + prompts), args.runs)
        tokens, mask = pipe.encode_prompt([""] * args.batch + prompts if guided else prompts)
        x = torch.randn(n, *pipe.latent_shape)
        t = torch.tensor(500)
        with torch.no_grad():
            step_walls, _ = timed(lambda: pipe.denoiser(x, t, tokens, mask), args.runs * 3)
            decode_walls, _ = timed(lambda: pipe.decode_latents(x[: args.batch]), args.runs)
        print(f"  text encoder, {len(tokens)} prompts once: {1000 * statistics.median(text_walls):.1f} ms; "
              f"denoiser, batch {n}: {1000 * statistics.median(step_walls):.1f} ms per step "
              f"(× {args.steps} = {args.steps * statistics.median(step_walls):.2f} s); "
              f"VAE decode of {args.batch}: {1000 * statistics.median(decode_walls):.1f} ms")

    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"\npeak resident memory: {peak_kb / 1024:.0f} MB")


if __name__ == "__main__":
    main()
