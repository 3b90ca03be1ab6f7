"""Benchmark the VAE against issue 3's targets; prints figures, asserts nothing.

    python benchmarks/vae.py [--weights PATH] [--threads 2] [--repeats 10]

Targets: reconstruction PSNR ≥ 30 dB on 1,024 fresh Shapes images (both splits); latents × scaling_factor
with a standard deviation in [0.9, 1.1]; encode + decode ≥ 2,000 images/s at batch 256 on 2 CPU cores;
weights ≤ 8 MB. Evaluation images are ``ShapesDataset(1024, split, seed=4242)``, a seed training never uses
(training draws fresh batches with its own generators; ``train_vae`` reports PSNR on seed 10000).
PSNR is 10·log10(2² / MSE) on [-1, 1] images (= the usual PSNR on [0, 1] images), from the mean squared
error over all images ("pooled"); the mean of per-image PSNRs is printed beside it.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import sys
import time

import torch

from sdlearn.checkpoint import count_parameters
from sdlearn.data import ShapesDataset
from sdlearn.pretrained import load_vae, weights_path
from sdlearn.vae import psnr

EVAL_SEED = 4242


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


@torch.inference_mode()
def reconstruction(vae, split: str, n: int = 1024) -> dict:
    images = ShapesDataset(n, split, seed=EVAL_SEED).batch(range(n)).images
    posterior = vae.encode(images)
    recon = vae.decode(posterior.mode()).clamp(-1, 1)
    sampled = vae.decode(posterior.sample(torch.Generator().manual_seed(0))).clamp(-1, 1)
    z = posterior.sample(torch.Generator().manual_seed(1)) * vae.scaling_factor
    pooled = lambda r: 10 * math.log10(4.0 / (r - images).pow(2).mean().item())
    return {
        "psnr": pooled(recon),
        "psnr_mean": psnr(recon, images).mean().item(),
        "psnr_worst": psnr(recon, images).min().item(),
        "psnr_sampled": pooled(sampled),
        "z_std": z.std().item(),
        "z_mean": z.mean().item(),
        "z_channel_std": z.transpose(0, 1).flatten(1).std(dim=1).tolist(),
    }


@torch.inference_mode()
def throughput(vae, batch_size: int, repeats: int) -> tuple[float, float]:
    x = ShapesDataset(batch_size, "all", seed=EVAL_SEED).batch(range(batch_size)).images
    for _ in range(2):  # warm-up
        vae.decode(vae.encode(x).mode())
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        vae.decode(vae.encode(x).mode())
        seconds.append(time.perf_counter() - start)
    return batch_size / statistics.median(seconds), batch_size / min(seconds)


@torch.inference_mode()
def cpu_time_throughput(vae, batch_size: int, repeats: int) -> float:
    """Images per CPU-second on ONE thread, timed by the thread's own CPU clock: far less sensitive than
    wall-clock figures to other processes sharing the cores (they still compete for caches and memory)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    x = ShapesDataset(batch_size, "all", seed=EVAL_SEED).batch(range(batch_size)).images
    vae.decode(vae.encode(x).mode())
    seconds = []
    for _ in range(repeats):
        start = time.thread_time()
        vae.decode(vae.encode(x).mode())
        seconds.append(time.thread_time() - start)
    torch.set_num_threads(before)
    return batch_size / min(seconds)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None, help="a folder or vae.safetensors (default: the shipped weights)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    path = weights_path("vae", args.weights)
    vae = load_vae(args.weights)
    print(f"weights: {path} ({path.stat().st_size / 1e6:.2f} MB; target ≤ 8 MB)")
    print(f"parameters: {count_parameters(vae):,}   config: {vae.config}")
    info = getattr(vae, "training_info", None)
    if info:
        print(f"trained: {info}")

    for split in ("all", "train", "heldout"):
        r = reconstruction(vae, split)
        print(
            f"PSNR split={split:8s} {r['psnr']:.2f} dB pooled (target ≥ 30), {r['psnr_mean']:.2f} dB mean per image, "
            f"worst image {r['psnr_worst']:.2f} dB; decoding a posterior sample: {r['psnr_sampled']:.2f} dB"
        )
        if split == "all":
            channels = ", ".join(f"{s:.3f}" for s in r["z_channel_std"])
            print(
                f"latents × scaling_factor ({vae.scaling_factor:.5f}): std {r['z_std']:.4f} (target 0.9–1.1), "
                f"mean {r['z_mean']:+.4f}, per-channel std [{channels}]"
            )

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    median, best = throughput(vae, args.batch_size, args.repeats)
    print(
        f"encode+decode, batch {args.batch_size}, {torch.get_num_threads()} threads, inference_mode: "
        f"{median:,.0f} images/s median, {best:,.0f} best of {args.repeats} (target ≥ 2,000); "
        f"load average before timing {load:.2f} on {os.cpu_count()} CPUs"
    )
    per_cpu_second = cpu_time_throughput(vae, args.batch_size, max(3, args.repeats // 4))
    print(
        f"encode+decode on one thread, by its CPU clock: {per_cpu_second:,.0f} images per CPU-second "
        f"(less load-sensitive; two idle cores give at most twice this)"
    )
    print(f"peak RSS: {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
