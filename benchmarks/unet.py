"""Training throughput of sdlearn's U-Net against diffusers' UNet2DConditionModel at the same configuration.

Target (issue 14): at the course configuration (``UNetConfig()``: the shipped VAE's 4 × 8 × 8 latents, the tiny
CLIP's 128-wide text tokens), sdlearn's images/s over diffusers' ≥ 1.0, with 1.2 to aim for; the two parameter
counts printed beside it, and equal. A training step is forward + backward + AdamW, float32, on the same batch
(random latents, timesteps, text tokens with a padding mask), with the same threads.

Both models start from the same weights (diffusers' random init, every zero-initialised tensor given random
values too, copied into sdlearn's through ``UNet.from_diffusers``), and the first step's outputs are checked to
agree, so both do the same work. They are timed in alternating rounds, one training step each, after a few
warm-up steps, so that a busy machine hurts them alike. Each figure is the median of the rounds, with the best
beside it and the process CPU time of a step (with one thread it does not count the time spent waiting for a core:
the steadier measure on a shared machine).

    python benchmarks/unet.py                     # 2 threads, batch 64, 15 rounds
    python benchmarks/unet.py --threads 1         # on a busy machine
    python benchmarks/unet.py --out               # also write benchmarks/results/unet-YYYYMMDD-HHMM.txt
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from sdlearn.unet import UNet, UNetConfig, count_parameters

RESULTS_DIR = Path(__file__).resolve().parent / "results"


class Report:
    """Prints lines and keeps them, for ``--out``."""

    def __init__(self):
        self.lines: list[str] = []

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15, help="alternating timing rounds of one step each")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each model first")
    parser.add_argument("--text-len", type=int, default=16, help="text tokens per caption (the tokenizer's max_length)")
    parser.add_argument("--out", nargs="?", const="", default=None, metavar="NAME",
                        help="also write the report to benchmarks/results/NAME (default unet-YYYYMMDD-HHMM.txt)")
    args = parser.parse_args()
    from diffusers import UNet2DConditionModel  # a test and benchmark dependency only

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = datetime.datetime.now()
    report = Report()

    cfg = UNetConfig()
    theirs = UNet2DConditionModel(**cfg.to_diffusers())
    with torch.no_grad():  # leave the zero init behind: random weights everywhere, as after some training
        for p in theirs.parameters():
            if not p.any():
                p.normal_(std=0.02)
    ours = UNet.from_diffusers(theirs)
    for model in (ours, theirs):
        model.train()

    B, L = args.batch, args.text_len
    S = cfg.sample_size
    x0 = torch.randn(B, cfg.in_channels, S, S)
    noise = torch.randn_like(x0)
    t = torch.randint(0, cfg.num_train_timesteps, (B,))
    tokens = torch.randn(B, L, cfg.cross_attention_dim)
    lengths = torch.randint(5, L + 1, (B,))  # captions of 3–14 words plus <bos>/<eos>, padded to L
    mask = torch.arange(L)[None] < lengths[:, None]  # [B, L], True = real token

    runs = {
        "sdlearn UNet": (ours, lambda m: m(x0, t, tokens, mask)),
        "diffusers UNet2DConditionModel": (theirs, lambda m: m(x0, t, tokens, encoder_attention_mask=mask).sample),
    }
    with torch.no_grad():
        gap = (runs["sdlearn UNet"][1](ours) - runs["diffusers UNet2DConditionModel"][1](theirs)).abs().max().item()
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, (model, _) in runs.items()}

    def train_step(name):
        model, call = runs[name]
        loss = F.mse_loss(call(model), noise)
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    flops = {}
    for name, (model, call) in runs.items():  # FLOPs of one forward + backward, counted by torch
        with FlopCounterMode(display=False) as counter:
            F.mse_loss(call(model), noise).backward()
        model.zero_grad(set_to_none=True)
        flops[name] = counter.get_total_flops() / B

    for name in runs:
        for _ in range(args.warmup):
            train_step(name)
    walls: dict[str, list[float]] = {name: [] for name in runs}
    cpus: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name in runs:
            start, start_cpu = time.perf_counter(), time.process_time()
            train_step(name)
            walls[name].append(time.perf_counter() - start)
            cpus[name].append(time.process_time() - start_cpu)

    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    report.say(f"sdlearn U-Net vs diffusers UNet2DConditionModel, {started:%Y-%m-%d %H:%M}")
    report.say(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, load average {load}; "
               f"float32, batch {B}, text length {L}")
    report.say(f"config: {cfg.to_dict()}")
    n_ours, n_theirs = count_parameters(ours), count_parameters(theirs)
    report.say(f"parameters: sdlearn {n_ours:,}   diffusers {n_theirs:,}   "
               f"({'equal' if n_ours == n_theirs else 'NOT EQUAL'}; {2 * n_ours / 1e6:.2f} MB in float16, "
               f"{4 * n_ours / 1e6:.2f} MB in float32)")
    report.say(f"outputs on the timing batch: max |sdlearn − diffusers| = {gap:.2e}")
    report.say("training FLOPs per image (forward + backward, torch's counter): "
               + ", ".join(f"{name} {f / 1e6:.0f} MFLOP" for name, f in flops.items()))
    report.say()
    report.say(f"{'training step (fwd+bwd+AdamW)':34s} {'median ms':>10s} {'images/s':>9s} {'best ms':>8s}"
               f" {'CPU ms':>8s}")
    ips, ips_cpu = {}, {}
    for name in runs:
        median = statistics.median(walls[name])
        cpu = statistics.median(cpus[name])
        ips[name], ips_cpu[name] = B / median, B / cpu
        report.say(f"{name:34s} {median * 1e3:10.1f} {ips[name]:9.0f} {min(walls[name]) * 1e3:8.1f} {cpu * 1e3:8.1f}")
    ratio = ips["sdlearn UNet"] / ips["diffusers UNet2DConditionModel"]
    ratio_cpu = ips_cpu["sdlearn UNet"] / ips_cpu["diffusers UNet2DConditionModel"]
    report.say()
    report.say(f"throughput ratio sdlearn / diffusers: {ratio:.2f}x wall clock, {ratio_cpu:.2f}x process CPU time"
               f"   (target >= 1.0x, aim 1.2x: {'MET' if ratio >= 1.0 else 'MISSED'})")
    report.say(f"peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if args.out is not None:
        RESULTS_DIR.mkdir(exist_ok=True)
        path = RESULTS_DIR / (args.out or f"unet-{started:%Y%m%d-%H%M}.txt")
        path.write_text("\n".join(report.lines) + "\n")
        print(f"report written to {path}")


if __name__ == "__main__":
    main()
