"""Benchmark the Shapes data: images per second on 1 and 2 CPU threads, and peak memory.

    python benchmarks/data.py [--batch-size 256] [--seconds 2]

Times three paths, each at the given batch size:
  render_batch   the vectorised renderer alone (the course asks ≥ 5,000 images/s of it, on one core)
  sample_batch   fresh random items with captions (what a training loop calls)
  dataset[i]     one item at a time through ShapesDataset.__getitem__ (the DataLoader path)

On a machine whose cores are busy with other processes, the 2-thread figures can collapse (OpenMP
threads spin-wait for a descheduled partner); OMP_WAIT_POLICY=PASSIVE avoids that.
"""

import argparse
import resource
import sys
import time

import torch

from sdlearn.data import COLORS, POSITIONS, SHAPES, SIZES, ShapesDataset, render_batch, sample_batch


def rate(fn, images_per_call: int, seconds: float) -> float:
    """Images per second of ``fn``, after a warm-up, over at least ``seconds``."""
    for _ in range(3):
        fn()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        calls += 1
    return calls * images_per_call / elapsed


def peak_rss_mib() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=2.0, help="timing duration per measurement")
    args = parser.parse_args()
    B = args.batch_size

    g = torch.Generator().manual_seed(0)
    attrs = [torch.randint(0, len(names), (B,), generator=g) for names in (COLORS, SHAPES, SIZES, POSITIONS)]
    dataset = ShapesDataset(10**6, split="train", seed=0)
    items = iter(range(10**6))

    print(f"Shapes data benchmark, batch size {B}, torch {torch.__version__}")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        r_render = rate(lambda: render_batch(*attrs, generator=g), B, args.seconds)
        r_sample = rate(lambda: sample_batch(B, generator=g), B, args.seconds)
        r_item = rate(lambda: dataset[next(items)], 1, args.seconds)
        print(f"  {threads} thread{'s' if threads > 1 else ' '}:  render_batch {r_render:>9,.0f} images/s   "
              f"sample_batch {r_sample:>9,.0f} images/s   dataset[i] {r_item:>7,.0f} images/s")
    print(f"peak resident memory: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
