"""Few-step generation by consistency distillation: a student that draws in 1, 2 or 4 steps what the teacher draws in 20.

A *consistency model* (Song et al. 2023, "Consistency Models") is a function f_θ(x_t, t) that maps every point of
one probability-flow ODE trajectory to the trajectory's origin x₀. Then one evaluation at the noisiest timestep is
a sample, and more evaluations can refine it (multistep consistency sampling, Song et al. 2023, Algorithm 1). The
*Latent Consistency Model* (Luo et al. 2023, "Latent Consistency Models") does this in a latent diffusion model's
latent space and distils classifier-free guidance into the student. This module builds its pieces:

- **The parameterisation** (Song et al. 2023, §3, eq. 5; LCM §4.2): f_θ(x_t, t) = c_skip(t) x_t + c_out(t) x̂₀(x_t, t),
  with x̂₀ read from a denoiser of the teacher's architecture (its ε-prediction turned into x₀ by
  x̂₀ = (x_t − √(1 − ᾱ_t) ε̂)/√ᾱ_t) and LCM's scalings with σ_data = 0.5 and timestep scaling s = 10:

      c_skip(t) = σ_data² / ((s t)² + σ_data²),        c_out(t) = s t / √((s t)² + σ_data²).

  At t = 0 c_skip = 1 and c_out = 0, so f_θ(x, 0) = x exactly: the *boundary condition* that keeps the
  consistency model from collapsing to a constant. From the grid's first timestep (19) on, c_skip < 10⁻⁵ and
  f_θ is x̂₀: the student is a network that predicts the end of the teacher's guided ODE trajectory.
  :class:`ConsistencyStudent` is that network: a :class:`~sdlearn.denoiser.Denoiser`, initialised from the
  teacher (:meth:`ConsistencyStudent.from_teacher`), wrapped so that it returns f_θ (``prediction_type``
  "sample").
- **The loss** (:func:`consistency_distillation_loss`; Song et al. 2023, Algorithm 2; LCM Algorithm 1): noise a data
  latent to a grid timestep t_{n+k}, take one guided DDIM step (Song et al. 2021, eq. 12) of the frozen teacher
  from t_{n+k} to t_n — the teacher's ODE solver, skipping k training timesteps (LCM §4.3: k = 20, i.e. one
  step of a 50-step DDIM grid) — and pull f_θ(x_{t_{n+k}}, t_{n+k}) towards the target f_θ⁻(x̂_{t_n}, t_n) of a slow
  copy θ⁻ (an exponential moving average of θ, no gradient). The distance is the pseudo-Huber loss
  √(d² + c²) − c (Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models", §3.3; LCM's code
  uses it with c = 0.001), robust to the large errors of early training.
- **Guidance** is distilled in: the teacher's step uses ε̃ = ε_u + w (ε_c − ε_u) with the shipped pipeline's
  w = 4 inside its guidance interval t ≤ 0.6 T, the conditional ε elsewhere (what the teacher's default sampling
  does). So the student needs no unconditional pass: one network call per step, half the teacher's. LCM instead
  samples w and feeds it through an embedding (LCM §4.2, eq. 9), so one file serves several w; at our budget a
  fixed w trains faster, and the course's pipeline has one default w.
- **Sampling** (:class:`ConsistencySampler`, the samplers' interface of :mod:`sdlearn.samplers`): at timesteps
  τ_1 > … > τ_N taken every ⌊50/N⌋-th entry of the 50-step grid from its last entry (LCM's scheduler: 4 steps are
  999, 759, 519, 279; 2 steps 999, 499; 1 step 999), x̂₀ = f_θ(x_τ, τ), then x_{τ'} = √ᾱ_{τ'} x̂₀ + √(1 − ᾱ_{τ'}) z
  with fresh noise z for the next τ' (Song et al. 2023, Algorithm 1); the last x̂₀ is the sample.

Why consistency distillation and not *progressive* distillation (Salimans & Ho 2022, "Progressive Distillation for
Fast Sampling of Diffusion Models"): progressive distillation trains a student to do two of its teacher's steps in
one, then makes that student the next teacher, halving the step count each round. Each round's student is good
only at its own step count, so serving 4, 2 and 1 steps takes three files (and three trainings in sequence). A
consistency model learns one map to x₀ from *every* timestep, so one file serves every step count; the step
counts the student was checked for are recorded in its config (``distilled_steps``), and the sampler warns for
others (it still samples).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sdlearn.checkpoint import ConfigMixin
from sdlearn.denoiser import Denoiser, DenoiserConfig
from sdlearn.samplers import Sampler
from sdlearn.schedules import NoiseSchedule, check_model_prediction_type, convert_prediction

__all__ = [
    "SIGMA_DATA", "TIMESTEP_SCALING", "GRID_STEPS", "DISTILLED_STEPS", "StudentConfig", "ConsistencyStudent",
    "consistency_scalings", "grid_timesteps", "consistency_timesteps", "ConsistencySampler",
    "consistency_distillation_loss", "pseudo_huber", "update_target",
]

SIGMA_DATA = 0.5  # σ_data of LCM's boundary scalings (Song et al. 2023 §3 use the data's std, 0.5 for images)
TIMESTEP_SCALING = 10.0  # s in c_skip(t) = σ_data² / ((s t)² + σ_data²) (LCM's scheduler, timestep_scaling=10)
GRID_STEPS = 50  # the teacher's DDIM grid: 50 timesteps 19, 39, …, 999 (LCM's original_inference_steps)
DISTILLED_STEPS = (1, 2, 4)  # the step counts the student is distilled and checked for
HUBER_C = 0.001  # the pseudo-Huber loss's c (LCM's training script, huber_c=0.001)


# ----------------------------------------------------------------------------------------------------------
# The parameterisation


def consistency_scalings(t, sigma_data: float = SIGMA_DATA, timestep_scaling: float = TIMESTEP_SCALING):
    """(c_skip(t), c_out(t)) of f(x, t) = c_skip x + c_out x̂₀ (LCM's scalings, Luo et al. 2023, §4.2):
    c_skip = σ_d² / ((s t)² + σ_d²), c_out = s t / √((s t)² + σ_d²); c_skip(0) = 1 and c_out(0) = 0 (the boundary
    condition f(x, 0) = x). ``t``: a number or a tensor of timesteps (float32 results)."""
    scaled = torch.as_tensor(t, dtype=torch.float32) * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim or [B] tensor shaped to broadcast against ``like`` [B, ...], on its device and dtype."""
    values = values.to(device=like.device, dtype=like.dtype)
    return values.reshape(values.shape + (1,) * (like.dim() - values.dim()))


@dataclass
class StudentConfig(ConfigMixin):
    """What a :class:`ConsistencyStudent` is: the teacher's architecture (``denoiser``, a
    :class:`~sdlearn.denoiser.DenoiserConfig`, whose ``prediction_type`` is what the inner network predicts), the
    noise ``schedule`` it reads ᾱ from, the boundary scalings, the grid, the guidance distilled in and the step
    counts it was distilled for.

    As a denoiser seen from the pipeline, the student predicts x₀: ``prediction_type`` is ``"sample"``, and
    ``latent_channels``, ``latent_size``, ``text_dim`` and ``num_train_timesteps`` are the inner network's."""

    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    schedule: str = "scaled_linear"
    sigma_data: float = SIGMA_DATA
    timestep_scaling: float = TIMESTEP_SCALING
    grid_steps: int = GRID_STEPS
    guidance_scale: float = 4.0
    guidance_interval: tuple[float, float] = (0.0, 600.0)
    distilled_steps: tuple[int, ...] = DISTILLED_STEPS

    def __post_init__(self) -> None:
        if isinstance(self.denoiser, dict):
            self.denoiser = DenoiserConfig.from_dict(self.denoiser)
        if not isinstance(self.denoiser, DenoiserConfig):
            raise ValueError(f"StudentConfig.denoiser must be a DenoiserConfig, got {type(self.denoiser).__name__}")
        if self.denoiser.prediction_type == "flow":
            raise ValueError("a consistency student distils a diffusion model (ε, v or x₀ prediction), not a flow model")
        NoiseSchedule.from_name(self.schedule)  # a known schedule name, or ValueError
        for name in ("sigma_data", "timestep_scaling", "guidance_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
                    or (value == 0 and name != "guidance_scale"):
                raise ValueError(f"StudentConfig.{name} must be a positive number, got {value!r}")
        self.check_positive_ints("grid_steps")
        if self.denoiser.num_train_timesteps % self.grid_steps:
            raise ValueError(f"StudentConfig.grid_steps ({self.grid_steps}) must divide the "
                             f"{self.denoiser.num_train_timesteps} training timesteps")
        interval = self.guidance_interval
        if not (isinstance(interval, (tuple, list)) and len(interval) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in interval)
                and 0 <= interval[0] <= interval[1]):
            raise ValueError(f"StudentConfig.guidance_interval must be (t_low, t_high), 0 ≤ t_low ≤ t_high, got {interval!r}")
        self.guidance_interval = (float(interval[0]), float(interval[1]))
        steps = self.distilled_steps
        if not isinstance(steps, (tuple, list)) or not steps:
            raise ValueError(f"StudentConfig.distilled_steps must be a non-empty list of step counts, got {steps!r}")
        self.check_sizes("distilled_steps", tuple(steps), maximum=self.grid_steps)
        self.distilled_steps = tuple(sorted(set(steps)))

    @property
    def prediction_type(self) -> str:
        return "sample"

    @property
    def latent_channels(self) -> int:
        return self.denoiser.latent_channels

    @property
    def latent_size(self) -> int:
        return self.denoiser.latent_size

    @property
    def text_dim(self) -> int:
        return self.denoiser.text_dim

    @property
    def num_train_timesteps(self) -> int:
        return self.denoiser.num_train_timesteps


class ConsistencyStudent(nn.Module):
    """f_θ(x_t, t) = c_skip(t) x_t + c_out(t) x̂₀(x_t, t), x̂₀ read from the inner :class:`Denoiser` ``self.denoiser``
    (same architecture as the teacher). Called like a denoiser — ``student(x_t, t, text_tokens, text_mask,
    **options)``, the options passed on to the inner network — it returns f_θ, an estimate of x₀
    (``config.prediction_type == "sample"``). ``t`` = 0 returns x_t itself (the boundary condition)."""

    def __init__(self, config: StudentConfig | None = None):
        super().__init__()
        self.config = StudentConfig.resolve(config)
        self.denoiser = Denoiser(self.config.denoiser)
        alphas_cumprod = NoiseSchedule.from_name(self.config.schedule).alphas_cumprod
        if len(alphas_cumprod) != self.config.num_train_timesteps:
            raise ValueError(f"schedule {self.config.schedule!r} has {len(alphas_cumprod)} timesteps, the denoiser "
                             f"{self.config.num_train_timesteps}")
        self.register_buffer("alphas_cumprod", alphas_cumprod.clone(), persistent=False)  # [T], from the name

    @classmethod
    def from_teacher(cls, teacher: Denoiser, schedule: str | None = None, **options) -> ConsistencyStudent:
        """A student whose inner network is a copy of ``teacher`` (its config and weights; on its device), so that
        at the start f_θ is the teacher's own x̂₀ (conditional, unguided). ``schedule``: the teacher's schedule name
        (default its ``schedule_name``, else "scaled_linear"); ``options``: the other :class:`StudentConfig` fields."""
        if not isinstance(teacher, Denoiser):
            raise ValueError(f"the teacher must be a sdlearn.denoiser.Denoiser, got {type(teacher).__name__}")
        schedule = schedule or getattr(teacher, "schedule_name", "scaled_linear")
        config = StudentConfig(denoiser=DenoiserConfig.from_dict(teacher.config.to_dict()), schedule=schedule, **options)
        student = cls(config)
        student.denoiser.load_state_dict(teacher.state_dict())
        return student.to(next(teacher.parameters()).device)

    def alpha_bar(self, t) -> torch.Tensor:
        """ᾱ_t for integer timesteps ``t`` (a number or a tensor), on the module's device."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device)
        if t.is_floating_point():
            if not torch.equal(t, t.round()):
                raise ValueError("a consistency student takes whole-number timesteps (indices into its schedule)")
            t = t.long()
        if t.numel() and (t.min() < 0 or t.max() >= len(self.alphas_cumprod)):
            raise ValueError(f"timesteps must lie in [0, {len(self.alphas_cumprod) - 1}]")
        return self.alphas_cumprod[t]

    def forward(self, x_t: torch.Tensor, t, text_tokens: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, **options) -> torch.Tensor:
        alpha_bar = self.alpha_bar(t)  # 0-dim or [B]
        output = self.denoiser(x_t, t, text_tokens, text_mask, **options)
        x0, _ = convert_prediction(output, _broadcast(alpha_bar, x_t), x_t, self.config.denoiser.prediction_type)
        c_skip, c_out = consistency_scalings(torch.as_tensor(t).detach().cpu(), self.config.sigma_data,
                                             self.config.timestep_scaling)
        return _broadcast(c_skip, x_t) * x_t + _broadcast(c_out, x_t) * x0


# ----------------------------------------------------------------------------------------------------------
# Timesteps and the sampler


def grid_timesteps(num_train_timesteps: int = 1000, grid_steps: int = GRID_STEPS) -> np.ndarray:
    """The teacher's DDIM grid, ascending: t_n = (n + 1)·k − 1 for n = 0 … N − 1, k = T / N (19, 39, …, 999 for
    T = 1000, N = 50; LCM's ``DDIMSolver``). Below t_0 lies the clean end, where the boundary condition holds."""
    k = num_train_timesteps // grid_steps
    return np.arange(1, grid_steps + 1) * k - 1


def consistency_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000,
                          grid_steps: int = GRID_STEPS) -> np.ndarray:
    """LCM's sampling timesteps (its ``LCMScheduler.set_timesteps``): from the grid's last (noisiest) entry down,
    every ⌊N / n⌋-th grid entry, n of them: 4 steps → 999, 759, 519, 279; 2 → 999, 499; 1 → 999."""
    grid = grid_timesteps(num_train_timesteps, grid_steps)[::-1]
    skip = grid_steps // num_inference_steps
    return grid[::skip][:num_inference_steps].copy()


def _noise_like(x: torch.Tensor, generator) -> torch.Tensor:
    """N(0, I) of x's shape, drawn on the generator's device (the CPU by default) in float32 then moved; a list of
    generators draws one sample each."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
        noise = torch.cat([torch.randn((1, *x.shape[1:]), generator=g, device=g.device) for g in generator])
    else:
        device = generator.device if generator is not None else "cpu"
        noise = torch.randn(x.shape, generator=generator, device=device)
    return noise.to(device=x.device, dtype=x.dtype)


class ConsistencySampler(Sampler):
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1; LCM's ``LCMScheduler``), with the interface of
    :mod:`sdlearn.samplers`: ``set_timesteps(n)`` picks :func:`consistency_timesteps`, and ``step(output, t, x)``
    reads the model's output as x̂₀ (``prediction_type`` "sample": a :class:`ConsistencyStudent`'s f_θ) and returns
    x̂₀ after the last timestep, else x̂₀ noised afresh to the next timestep, √ᾱ_{t'} x̂₀ + √(1 − ᾱ_{t'}) z.

    ``distilled_steps``: the step counts the student was distilled for; ``set_timesteps`` with another count warns
    (one line) and still samples. The only spacing is ``"trailing"`` (LCM's: the first step at the last timestep)."""

    name = "lcm"

    def __init__(self, schedule: NoiseSchedule, *, prediction_type: str = "sample", grid_steps: int = GRID_STEPS,
                 distilled_steps: Sequence[int] = DISTILLED_STEPS):
        super().__init__(schedule, prediction_type=prediction_type)
        if isinstance(grid_steps, bool) or not isinstance(grid_steps, int) or grid_steps < 1 \
                or self.num_train_timesteps % grid_steps:
            raise ValueError(f"grid_steps must be a whole number ≥ 1 dividing the {self.num_train_timesteps} training "
                             f"timesteps, got {grid_steps!r}")
        self.grid_steps = grid_steps
        self.distilled_steps = tuple(int(s) for s in distilled_steps)

    def set_timesteps(self, num_inference_steps: int, spacing: str = "trailing", steps_offset: int = 0) -> None:
        """Choose the ``num_inference_steps`` (1 … ``grid_steps``) timesteps of :func:`consistency_timesteps` and reset."""
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= self.grid_steps:
            raise ValueError(f"num_inference_steps must be a whole number from 1 to {self.grid_steps} (the grid the "
                             f"student was distilled on; 4 is its default), got {n!r}")
        if spacing != "trailing" or steps_offset != 0:
            raise ValueError(f"the consistency sampler takes spacing='trailing' and steps_offset=0 (LCM's timesteps), "
                             f"got spacing={spacing!r}, steps_offset={steps_offset!r}")
        if self.distilled_steps and int(n) not in self.distilled_steps:
            warnings.warn(f"the student was distilled for {', '.join(map(str, self.distilled_steps))} steps, not {n}; "
                          f"sampling anyway", stacklevel=2)
        self.num_inference_steps, self.spacing, self.steps_offset = int(n), spacing, 0
        timesteps = consistency_timesteps(int(n), self.num_train_timesteps, self.grid_steps)
        self.timesteps = torch.from_numpy(timesteps.astype(np.int64))
        self._step_index = None
        self.last_x0 = None

    def step(self, model_output, t, x, generator=None):
        """x̂₀ = the model's output read as x₀; then x̂₀ itself after the last timestep, else x̂₀ noised to the next."""
        model_output, x, dtype = self._check_step(model_output, x)
        i = self._walk_to(t)
        alpha_bar = self.alphas_cumprod[int(self.timesteps[i])]
        x0, _ = convert_prediction(model_output, alpha_bar, x, self.prediction_type)
        self.last_x0 = x0.to(dtype)
        self._step_index = i + 1
        if i + 1 == len(self.timesteps):
            return x0.to(dtype)
        alpha_next = self.alphas_cumprod[int(self.timesteps[i + 1])]
        noise = _noise_like(x0, generator)
        return (alpha_next.sqrt() * x0 + (1 - alpha_next).sqrt() * noise).to(dtype)

    def _config(self):
        return f"{super()._config()}, grid_steps={self.grid_steps}, distilled_steps={list(self.distilled_steps)}"


# ----------------------------------------------------------------------------------------------------------
# The loss


def pseudo_huber(prediction: torch.Tensor, target: torch.Tensor, c: float = HUBER_C) -> torch.Tensor:
    """The mean over elements of √((prediction − target)² + c²) − c (Song & Dhariwal 2023, §3.3; elementwise as in
    LCM's training script): quadratic for |d| ≪ c, linear (so robust to outliers) for |d| ≫ c."""
    return ((prediction - target).pow(2) + c * c).sqrt().mean() - c


@torch.no_grad()
def update_target(target: nn.Module, online: nn.Module, decay: float) -> None:
    """θ⁻ ← decay · θ⁻ + (1 − decay) · θ over the floating-point weights (the target network of Song et al. 2023,
    Algorithm 2; LCM uses decay 0.95)."""
    online_state = online.state_dict()
    for name, value in target.state_dict().items():
        if value.is_floating_point():
            value.lerp_(online_state[name].detach(), 1.0 - decay)


def _pad_tokens(tokens: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[B, L, D]`` and mask ``[B, L]`` padded with masked zeros to ``length`` ≥ L (masked tokens change
    nothing in the denoiser)."""
    extra = length - tokens.shape[1]
    if extra <= 0:
        return tokens, mask.bool()
    return F.pad(tokens, (0, 0, 0, extra)), F.pad(mask.bool(), (0, extra), value=False)


def consistency_distillation_loss(
    student: ConsistencyStudent,
    target_student: ConsistencyStudent,
    teacher: Denoiser,
    x0: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    *,
    uncond_tokens: torch.Tensor,
    uncond_mask: torch.Tensor,
    noise: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    huber_c: float = HUBER_C,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The consistency distillation loss (Song et al. 2023, Algorithm 2, with LCM's guided solver, Luo et al. 2023,
    Algorithm 1) for clean latents ``x0`` ``[B, C, S, S]`` and their captions' ``tokens`` ``[B, L, D]``, ``mask``
    ``[B, L]`` → ``(loss, logs)``.

    1. A grid entry n uniform in {0 … N − 1} per sample (``index``, or drawn from ``generator``), t = t_n of
       :func:`grid_timesteps`, t' = t − k (k = T/N; t' < 0 is the clean end); x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε (``noise``).
    2. The teacher's guided DDIM step (Song et al. 2021, eq. 12, η = 0) from t to t', no gradient: ε̃ = ε_u +
       w (ε_c − ε_u) at w = ``student.config.guidance_scale`` where t is inside its ``guidance_interval``, ε_c
       elsewhere; x̂₀ = (x_t − √(1 − ᾱ_t) ε̃)/√ᾱ_t, x̂_{t'} = √ᾱ_{t'} x̂₀ + √(1 − ᾱ_{t'}) ε̃ (ᾱ = 1 at the clean end).
       The unconditional prompt is ``uncond_tokens``/``uncond_mask`` (``[1, L', D]``/``[1, L']``: the empty prompt).
    3. The target f_θ⁻(x̂_{t'}, max(t', 0)) of ``target_student`` (no gradient; at the clean end it is x̂_{t'} itself,
       the boundary condition), the prediction f_θ(x_t, t) of ``student``, and their pseudo-Huber distance
       (:func:`pseudo_huber` with ``huber_c``).

    ``logs``: the loss, and the mean squared distance between prediction and target."""
    config = student.config
    if tokens.shape[0] != x0.shape[0] or mask.shape[:2] != tokens.shape[:2]:
        raise ValueError(f"tokens {list(tokens.shape)} and mask {list(mask.shape)} must hold one caption per latent "
                         f"({x0.shape[0]})")
    check_model_prediction_type(teacher.config.prediction_type)
    B, device = x0.shape[0], x0.device
    T, N = config.num_train_timesteps, config.grid_steps
    k = T // N
    if index is None:
        index = torch.randint(N, (B,), generator=generator)
    index = torch.as_tensor(index).long().cpu()
    if index.shape != (B,) or index.min() < 0 or index.max() >= N:
        raise ValueError(f"index must be {B} grid entries in [0, {N}), got {index.tolist()}")
    t = torch.from_numpy(grid_timesteps(T, N))[index]  # [B] long
    t_prev = t - k  # [B]; < 0: the clean end
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator).to(device)
    alphas = NoiseSchedule.from_name(config.schedule).alphas_cumprod.to(device)  # [T]
    alpha_t = _broadcast(alphas[t.to(device)], x0)  # [B, 1, 1, 1]
    alpha_prev = _broadcast(torch.where(t_prev >= 0, alphas.cpu()[t_prev.clamp(min=0)], torch.ones(())), x0)
    x_t = alpha_t.sqrt() * x0 + (1 - alpha_t).sqrt() * noise

    with torch.no_grad():
        length = max(tokens.shape[1], uncond_tokens.shape[1])
        cond, cond_mask = _pad_tokens(tokens, mask, length)
        uncond, uncond_m = _pad_tokens(uncond_tokens, uncond_mask, length)
        both = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]).to(device),
                       torch.cat([uncond.expand(B, -1, -1), cond]), torch.cat([uncond_m.expand(B, -1), cond_mask]))
        out_u, out_c = both.chunk(2)
        _, eps_u = convert_prediction(out_u, alpha_t, x_t, teacher.config.prediction_type)
        _, eps_c = convert_prediction(out_c, alpha_t, x_t, teacher.config.prediction_type)
        low, high = config.guidance_interval
        guided = _broadcast(((t >= low) & (t <= high)).float(), x0)  # [B, 1, 1, 1]: 1 inside the interval
        w = 1 + guided * (config.guidance_scale - 1)
        eps = eps_u + w * (eps_c - eps_u)
        x0_teacher = (x_t - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()
        x_prev = alpha_prev.sqrt() * x0_teacher + (1 - alpha_prev).sqrt() * eps
        target = target_student(x_prev, t_prev.clamp(min=0).to(device), tokens, mask)

    prediction = student(x_t, t.to(device), tokens, mask)
    loss = pseudo_huber(prediction.float(), target.float(), huber_c)
    return loss, {"loss": loss.item(), "mse": (prediction.detach() - target).pow(2).mean().item()}
