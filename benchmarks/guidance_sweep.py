"""Diagnostic for issue 13: do the sampler, the guidance scale or the guidance interval rescue partial and
two-object colour + shape prompts? Prints, per setting, the three figures that ``benchmarks/quality.py`` misses.

    python benchmarks/guidance_sweep.py [N] [SETTINGS] [--weights DIR] [--setting SAMPLER,W,LOW,HIGH ...]
                                        [--all-tv-prompts] [--cads TAU1,TAU2,S]

N images per figure (default 96: a diagnostic to compare settings, not a measurement of a target, which needs
≥ 256); SETTINGS: comma-separated indices into ``SETTINGS`` (default all), or ``--setting dpm++,4,0,600`` (any
number of them) for others. Prompts as ``quality.py``'s targets 3, 6 and 4 (the same seeds; four of its ten TV
prompts, or all ten with ``--all-tv-prompts``, then averaged per open attribute as ``quality.py`` does). "TV
excess" is the open attribute's TV to the data's distribution minus a perfect sampler's at the same count
(:func:`sdlearn.metrics.open_attribute_tv`). ``--weights DIR``: a folder with ``vae.*``, ``clip.*`` and
``denoiser.*`` (as ``python -m sdlearn train all`` writes) instead of the shipped weights. ``--cads TAU1,TAU2,S``
anneals the prompt's tokens with noise at high noise levels (CADS, Sadat et al. 2024), an experiment the package
does not ship: see :class:`ConditionAnnealing`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402

from sdlearn.metrics import default_scene_reader, open_attribute_tv, prompt_accuracy  # noqa: E402
from sdlearn.pretrained import load_pipeline  # noqa: E402

TV_PROMPTS = ("a red shape", "a large blue square", "a small yellow object in the center", "a blue circle in the center")
SETTINGS = (  # (sampler, guidance scale, guidance interval in timesteps)
    ("dpm++", 4.0, (0, 600)), ("dpm++", 4.0, (0, 1000)), ("dpm++", 1.0, (0, 1000)), ("dpm++", 2.0, (0, 1000)),
    ("ddpm", 4.0, (0, 600)), ("ddpm", 4.0, (0, 1000)), ("ddpm", 2.0, (0, 1000)), ("euler", 4.0, (0, 600)),
    ("dpm++", 7.0, (0, 1000)), ("ddpm", 7.0, (0, 1000)), ("dpm++", 4.0, (200, 800)), ("ddpm", 4.0, (200, 800)),
)


class ConditionAnnealing(torch.nn.Module):
    """CADS (Sadat et al. 2024, "CADS: Unleashing the diversity of diffusion models through condition-annealed
    sampling", eqs. 2-3) around a denoiser: the text tokens y of each conditional row become
    ŷ = √γ(t)·y + s·√(1 − γ(t))·n, n ~ N(0, I) drawn afresh at every call, rescaled to y's mean and standard
    deviation (ψ = 1), with γ(t) = 1 for t ≤ τ1·T, 0 for t ≥ τ2·T, linear between. Rows with as many real tokens as
    the empty prompt (the unconditional half of a guided batch) are left alone."""

    def __init__(self, denoiser, empty_length: int, tau1: float, tau2: float, noise_scale: float, seed: int = 0):
        super().__init__()
        self.denoiser, self.config, self.empty_length = denoiser, denoiser.config, empty_length
        self.tau1, self.tau2, self.noise_scale = tau1, tau2, noise_scale
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x, t, text_tokens=None, text_mask=None, **kwargs):
        if text_tokens is None:
            return self.denoiser(x, t, **kwargs)
        B = x.shape[0]
        tau = torch.as_tensor(t, dtype=torch.float32).expand(B) / self.config.num_train_timesteps  # [B] in [0, 1)
        gamma = ((self.tau2 - tau) / (self.tau2 - self.tau1)).clamp(0, 1)[:, None, None]  # [B, 1, 1]
        noise = torch.randn(text_tokens.shape, generator=self.generator).to(text_tokens)
        noisy = gamma.sqrt() * text_tokens + self.noise_scale * (1 - gamma).sqrt() * noise  # [B, L, D]
        dims = (1, 2)
        noisy = (noisy - noisy.mean(dims, keepdim=True)) / noisy.std(dims, keepdim=True) \
            * text_tokens.std(dims, keepdim=True) + text_tokens.mean(dims, keepdim=True)
        lengths = torch.full((B,), text_tokens.shape[1]) if text_mask is None else text_mask.sum(1).cpu()
        conditional = (lengths != self.empty_length).to(text_tokens.device)  # [B]
        text_tokens = torch.where(conditional[:, None, None], noisy, text_tokens)
        return self.denoiser(x, t, text_tokens, text_mask, **kwargs)


def parse_setting(text: str) -> tuple[str, float, tuple[float, float]]:
    try:
        sampler, scale, low, high = text.split(",")
        return sampler, float(scale), (float(low), float(high))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a setting is SAMPLER,SCALE,LOW,HIGH (e.g. dpm++,4,0,600), got {text!r}") from None


def parse_cads(text: str) -> tuple[float, float, float]:
    try:
        tau1, tau2, noise_scale = (float(v) for v in text.split(","))
        if 0 <= tau1 < tau2 <= 1 and noise_scale > 0:
            return tau1, tau2, noise_scale
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"CADS is TAU1,TAU2,S with 0 <= TAU1 < TAU2 <= 1 and S > 0 (e.g. 0.6,0.9,0.25); "
                                     f"got {text!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", nargs="?", type=int, default=96, help="images per figure (default 96)")
    parser.add_argument("settings", nargs="?", default=None, help="comma-separated indices into SETTINGS (default all)")
    parser.add_argument("--setting", type=parse_setting, action="append", default=[], metavar="SAMPLER,W,LOW,HIGH")
    parser.add_argument("--weights", default=None, help="a weights folder instead of the shipped weights")
    parser.add_argument("--all-tv-prompts", action="store_true", help="quality.py's ten TV prompts, not four")
    parser.add_argument("--cads", type=parse_cads, default=None, metavar="TAU1,TAU2,S",
                        help="condition annealing (CADS): noisy prompt tokens above TAU1*T, pure noise above TAU2*T")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = args.n
    chosen = args.setting or ([SETTINGS[int(i)] for i in args.settings.split(",")] if args.settings else list(SETTINGS))
    tv_prompts = quality.TV_PROMPTS if args.all_tv_prompts else TV_PROMPTS
    pipe, reader = load_pipeline(args.weights), default_scene_reader()
    if args.cads:
        empty_length = int(pipe.encode_prompt([""])[1].sum())
        pipe.denoiser = ConditionAnnealing(pipe.denoiser, empty_length, *args.cads)
    partial = quality.partial_prompts(n, 4244)
    two = quality.two_object_prompts(n, 4246, colour_and_shape=True)
    print(f"{args.weights or 'shipped weights'}: {n} images per figure, 20 steps, 1 thread; torch {torch.__version__}"
          + (f"; CADS tau1,tau2,s = {','.join(map(str, args.cads))}" if args.cads else ""))
    for sampler, scale, interval in chosen:
        start = time.time()

        def draw(prompts, seed, sampler=sampler, scale=scale, interval=interval):
            return torch.cat([pipe(prompts[i:i + 128], num_inference_steps=20, guidance_scale=scale, sampler=sampler,
                                   guidance_interval=interval, seed=seed + i, progress=False)
                              for i in range(0, len(prompts), 128)])

        a = prompt_accuracy(draw(partial, 4244), partial, reader)
        b = prompt_accuracy(draw(two, 4246), two, reader)
        excess, per_attribute = [], {}
        for k, prompt in enumerate(tv_prompts):
            r = open_attribute_tv(draw([prompt] * n, 4247 + 1000 * k), prompt, reader)
            excess.append(" ".join(f"{name}:{r.tv[name] - r.perfect_sampler[name]:+.2f}" for name in r.tv))
            for name in r.tv:
                per_attribute.setdefault(name, []).append(r.tv[name] - r.perfect_sampler[name])
        if args.all_tv_prompts:  # averaged per open attribute, as quality.py's target 4
            excess = [" ".join(f"{name}:{statistics.fmean(v):+.3f}" for name, v in per_attribute.items()) + " (mean)"]
        print(f"{sampler:6} w={scale} interval={interval}: partial {a.overall:.3f} (object count {a.object_count:.2f}) | "
              f"two c+s {b.overall:.3f} (object count {b.object_count:.2f}, swaps {b.binding_errors}) | "
              f"TV excess {' ; '.join(excess)} [{time.time() - start:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
