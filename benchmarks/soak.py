"""Soak test of issue 20, kept out of ``make test``: the command line through a long generation and through
many interrupts of one training run.

1. **Generation streams.** ``python -m sdlearn generate PROMPT --n 10000 --out-dir DIR`` runs in a child process.
   Its resident memory (``VmRSS`` / ``VmHWM`` from ``/proc``) is sampled twice a second beside the number of
   images already on disk, and printed at every tenth of the run; memory is *flat* when the peak at the end is
   within ``max(64 MB, 15 %)`` of the peak after the first tenth (the first batches warm the allocator up).
2. **Interrupts lose nothing.** One training run of ``--steps K`` goes straight through; the same run in another
   folder is stopped 20 times, by SIGINT and SIGTERM in turn, each time soon after the child has trained a step
   past its last checkpoint, and restarted with the same command; then it runs to its end. Every stop must
   exit with status 130, print ``resume with: python -m sdlearn ...`` and leave a checkpoint further on than the
   last; the two runs' final checkpoints (weights, optimizer state, RNG, loss history) and weights files must be
   equal: the largest absolute difference is printed (0 means bit for bit). Each child's peak resident memory is
   printed, and must stay flat across the cycles too.

The training children run ``sdlearn.__main__.main(["train", "vae", ...])`` (the command line itself: its
signal handling, exit statuses and messages) with a small VAE (``SOAK_VAE``, batch 16) in place of the shipped
recipe's size, so that 20 cycles take minutes; ``--shipped-size`` runs ``python -m sdlearn train vae`` as it is.

    python benchmarks/soak.py --quick     # 1,000 images, 5 interrupts: a couple of minutes
    python benchmarks/soak.py             # 10,000 images, 20 interrupts

Exit status 0 when every check holds, 1 otherwise. Only Linux (``/proc``, ``os.wait4``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

SOAK_VAE = dict(base_channels=8, channel_multipliers=(1, 2, 2), num_res_blocks=(0, 1, 1), norm_groups=4)
MB = 1024 * 1024


def child_train(argv: list[str]) -> int:
    """In a child process: the command line, with ``train vae`` training the small VAE of this soak."""
    from sdlearn.__main__ import TRAINERS, main
    from sdlearn.recipes import train_vae
    from sdlearn.vae import VAEConfig

    TRAINERS["vae"] = functools.partial(train_vae, config=VAEConfig(**SOAK_VAE), batch_size=16)
    return main(argv)


# ------------------------------------------------------------------------------------------------
# Children: started, watched, reaped with their peak memory


class Child:
    """A child process whose stderr is collected by a thread and whose peak memory is read when it ends."""

    def __init__(self, command: list[str]):
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.pid = self.process.pid
        self.err = bytearray()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.returncode: int | None = None
        self.peak_rss = 0  # bytes, after it ended

    def _read(self) -> None:
        while chunk := os.read(self.process.stderr.fileno(), 65536):
            self.err += chunk

    @property
    def text(self) -> str:
        return self.err.decode("utf-8", "replace")

    def running(self) -> bool:
        """Whether the child is still running, without reaping it (so :meth:`wait` can still read its usage)."""
        return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None

    def memory(self) -> tuple[int, int]:
        """(resident, peak resident) in bytes, now; (0, 0) once it has ended."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return 0, 0
        values = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M))
        return int(values.get("VmRSS", 0)) * 1024, int(values.get("VmHWM", 0)) * 1024

    def wait(self) -> int:
        _, status, usage = os.wait4(self.pid, 0)
        self.process.returncode = self.returncode = os.waitstatus_to_exitcode(status)
        self.peak_rss = usage.ru_maxrss * 1024  # kB on Linux
        self.reader.join()
        return self.returncode


def flat(early_peak: int, late_peak: int) -> bool:
    return late_peak - early_peak <= max(64 * MB, 0.15 * early_peak)


# ------------------------------------------------------------------------------------------------
# 1. Generation


def soak_generate(folder: Path, n: int, steps: int) -> bool:
    out_dir = folder / "images"
    command = [sys.executable, "-m", "sdlearn", "generate", "a small red circle and a blue square", "--n", str(n),
               "--steps", str(steps), "--guidance", "4", "--seed", "0", "--out-dir", str(out_dir)]
    from sdlearn.__main__ import GENERATE_BATCH

    print(f"generate: {n:,} images, {steps} steps, guidance 4, in batches of {GENERATE_BATCH} (the command line's); "
          "resident memory of the child:")
    started = time.perf_counter()
    child = Child(command)
    marks = [round(n * k / 10) for k in range(1, 11)]
    peaks: dict[int, int] = {}
    while child.running():
        rss, peak = child.memory()
        done = sum(1 for _ in os.scandir(out_dir)) if out_dir.is_dir() else 0
        while marks and done >= marks[0]:
            peaks[marks[0]] = peak
            print(f"  {marks[0]:>6,} images on disk  {time.perf_counter() - started:6.0f} s   RSS {rss / MB:6.0f} MB   "
                  f"peak so far {peak / MB:6.0f} MB", flush=True)
            marks.pop(0)
        time.sleep(0.5)
    code = child.wait()
    seconds = time.perf_counter() - started
    written = sum(1 for _ in os.scandir(out_dir)) if out_dir.is_dir() else 0
    if code != 0:
        print(f"  FAILED: exit status {code}: {child.text.strip().splitlines()[-1:]}")
        return False
    early = peaks.get(round(n / 10), child.peak_rss)
    ok = written == n and flat(early, child.peak_rss)
    print(f"  {written:,} files in {seconds:.0f} s ({written / seconds:.1f} images/s); peak RSS {child.peak_rss / MB:.0f} MB "
          f"at the end vs {early / MB:.0f} MB after the first tenth: {'flat' if ok else 'NOT FLAT'}")
    return ok


# ------------------------------------------------------------------------------------------------
# 2. Training through interrupts


def train_command(out: Path, steps: int, shipped_size: bool) -> list[str]:
    args = ["train", "vae", "--steps", str(steps), "--out", str(out), "--device", "cpu", "--threads", "1"]
    if shipped_size:
        return [sys.executable, "-m", "sdlearn", *args]
    return [sys.executable, str(Path(__file__).resolve()), "--child-train", *args]


def checkpoint_step(out: Path) -> int:
    path = out / "vae_checkpoint.json"
    return json.loads(path.read_text())["step"] if path.is_file() else 0


def progress_step(text: str) -> int:
    """The last step count the child's progress bar showed (-1 before the bar appears)."""
    found = re.findall(r"train vae:.*?(\d+)/\d+ \[", text.replace("\r", "\n"))
    return int(found[-1]) if found else -1


def run_to_end(out: Path, steps: int, shipped_size: bool, label: str) -> Child | None:
    child = Child(train_command(out, steps, shipped_size))
    if child.wait() != 0:
        print(f"  {label}: FAILED, exit status {child.returncode}: {child.text.strip().splitlines()[-1:]}")
        return None
    print(f"  {label}: {steps} steps, exit 0, child peak RSS {child.peak_rss / MB:.0f} MB")
    return child


def soak_train(folder: Path, steps: int, cycles: int, shipped_size: bool, rng: random.Random) -> bool:
    from sdlearn.checkpoint import load_checkpoint

    size = "the shipped recipe's VAE" if shipped_size else f"a small VAE ({SOAK_VAE['base_channels']} base channels, batch 16)"
    print(f"\ntrain vae --steps {steps}, {size}: straight through, then with {cycles} interrupts")
    straight_dir, stopped_dir = folder / "straight", folder / "interrupted"
    started = time.perf_counter()
    if run_to_end(straight_dir, steps, shipped_size, "straight through") is None:
        return False
    ok, peaks = True, []
    for cycle in range(1, cycles + 1):
        signal_number = signal.SIGINT if cycle % 2 else signal.SIGTERM
        before = checkpoint_step(stopped_dir)
        child = Child(train_command(stopped_dir, steps, shipped_size))
        deadline = time.monotonic() + 600
        while child.running() and progress_step(child.text) <= before and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.3))  # somewhere inside a later step
        if child.running():
            child.process.send_signal(signal_number)
        code = child.wait()
        after = checkpoint_step(stopped_dir)
        last = child.text.strip().splitlines()[-1] if child.text.strip() else ""
        good = code == 130 and "resume with: python -m sdlearn train vae" in last and after > before
        ok &= good
        peaks.append(child.peak_rss)
        print(f"  cycle {cycle:>2}/{cycles}: {signal.Signals(signal_number).name:<7} → exit {code}, checkpoint at step "
              f"{before} → {after}, child peak RSS {child.peak_rss / MB:.0f} MB{'' if good else '   FAILED: ' + last}",
              flush=True)
        if after >= steps:
            print("  the run reached its end during the interrupts: use more --train-steps")
            break
    if run_to_end(stopped_dir, steps, shipped_size, "resumed to the end") is None:
        return False
    seconds = time.perf_counter() - started

    def tensors(path: Path) -> dict[str, torch.Tensor]:
        return load_checkpoint(path)[0]

    worst, count = 0.0, 0
    for name in ("vae_checkpoint", "vae"):
        a, b = tensors(straight_dir / name), tensors(stopped_dir / name)
        if set(a) != set(b):
            print(f"  FAILED: {name} holds other tensors: {sorted(set(a) ^ set(b))[:5]}")
            return False
        for key in a:
            if key.startswith("rng/") or a[key].dtype == torch.bool:
                equal = torch.equal(a[key], b[key])
                worst = max(worst, 0.0 if equal else float("inf"))
            else:
                worst = max(worst, (a[key].double() - b[key].double()).abs().max().item() if a[key].numel() else 0.0)
            count += 1
    scaling = [json.loads((d / "vae.json").read_text())["model_config"]["scaling_factor"] for d in (straight_dir, stopped_dir)]
    same = worst <= 1e-6 and abs(scaling[0] - scaling[1]) <= 1e-6
    flat_memory = flat(peaks[0], max(peaks)) if peaks else True
    print(f"  resumed vs straight: max |difference| {worst:.3g} over {count} tensors (checkpoint + weights), "
          f"scaling factor {scaling[1]:.6f} vs {scaling[0]:.6f}: {'EQUAL' if same else 'DIFFERENT'}"
          f"{' (bit for bit)' if worst == 0 and scaling[0] == scaling[1] else ''}")
    print(f"  children's peak RSS over the cycles: first {peaks[0] / MB:.0f} MB, largest {max(peaks) / MB:.0f} MB: "
          f"{'flat' if flat_memory else 'NOT FLAT'}" if peaks else "  no cycles")
    print(f"  {seconds:.0f} s in all")
    return ok and same and flat_memory


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-train":
        return child_train(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 images and 5 interrupts (default 10,000 and 20)")
    parser.add_argument("--images", type=int, default=None, help="images to generate")
    parser.add_argument("--gen-steps", type=int, default=2, help="sampling steps per image (default 2: memory, not "
                                                                   "quality, is measured)")
    parser.add_argument("--cycles", type=int, default=None, help="interrupt/resume cycles")
    parser.add_argument("--train-steps", type=int, default=None, help="the training run's length in steps")
    parser.add_argument("--shipped-size", action="store_true", help="train the shipped recipe's VAE (slow)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the moments of the interrupts")
    args = parser.parse_args()
    images = args.images or (1_000 if args.quick else 10_000)
    cycles = args.cycles or (5 if args.quick else 20)
    steps = args.train_steps or 40 * cycles
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"{os.cpu_count()} CPUs, load average {load}; {time.strftime('%Y-%m-%d %H:%M')}; "
          f"{'--quick' if args.quick else 'full'} run\n")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sdlearn-soak-") as folder:
        generated = soak_generate(Path(folder), images, args.gen_steps)
        trained = soak_train(Path(folder), steps, cycles, args.shipped_size, random.Random(args.seed))
    print(f"\nsoak: generation {'ok' if generated else 'FAILED'}, interrupts {'ok' if trained else 'FAILED'}; "
          f"{(time.perf_counter() - started) / 60:.1f} min")
    return 0 if generated and trained else 1


if __name__ == "__main__":
    sys.exit(main())
