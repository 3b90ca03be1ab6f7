"""Noise schedules and the forward (noising) process.

The forward process of DDPM (Ho et al. 2020, eq. 2) adds a little Gaussian noise at every step,

    q(x_t | x_{t-1}) = N(√α_t x_{t-1}, β_t I),          α_t = 1 − β_t,

and because a sum of Gaussians is Gaussian, any step can be reached in one jump (eq. 4):

    q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I),            ᾱ_t = ∏_{s≤t} α_s,
    x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε,   ε ~ N(0, I).

A *schedule* is the choice of β_1..β_T. Everything here is numerically equal to diffusers'
``DDPMScheduler`` (``betas``, ``alphas_cumprod``) for the same configuration, so that what a
learner builds here carries over. Timesteps are 0-based indices ``t ∈ [0, T)`` as in diffusers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

SCHEDULE_NAMES = ("linear", "scaled_linear", "cosine", "sigmoid")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# Defaults per schedule: DDPM's linear 1e-4 → 0.02, Stable Diffusion's scaled-linear 0.00085 → 0.012.
_DEFAULT_RANGE = {
    "linear": (1e-4, 0.02),
    "scaled_linear": (0.00085, 0.012),
    "sigmoid": (1e-4, 0.02),
    "cosine": (None, None),
}
_ALIASES = {"squaredcos_cap_v2": "cosine"}


def make_betas(
    name: str = "scaled_linear",
    num_train_timesteps: int = 1000,
    beta_start: float | None = None,
    beta_end: float | None = None,
    max_beta: float = 0.999,
) -> torch.Tensor:
    """Return the float32 tensor β_1..β_T of a named schedule.

    - ``"linear"``: β evenly spaced from ``beta_start`` to ``beta_end`` (Ho et al. 2020).
    - ``"scaled_linear"``: √β evenly spaced, then squared (Stable Diffusion; Rombach et al. 2022).
    - ``"cosine"``: ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2) with s = 0.008, β_t = 1 − ᾱ(t+1)/ᾱ(t)
      capped at ``max_beta`` (Nichol & Dhariwal 2021, eq. 17); diffusers calls it ``"squaredcos_cap_v2"``.
    - ``"sigmoid"``: β = sigmoid(linspace(−6, 6)) rescaled to [beta_start, beta_end] (as in GeoDiff / diffusers).

    ``beta_start``/``beta_end`` default to 1e-4/0.02, except scaled-linear which defaults to
    Stable Diffusion's 0.00085/0.012. The cosine schedule ignores them.
    """
    name = _ALIASES.get(name, name)
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"unknown schedule {name!r}; expected one of {', '.join(SCHEDULE_NAMES)}")
    if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps!r}")
    T = num_train_timesteps
    default_start, default_end = _DEFAULT_RANGE[name]
    start = default_start if beta_start is None else float(beta_start)
    end = default_end if beta_end is None else float(beta_end)
    if name != "cosine" and not (0.0 < start <= 1.0 and 0.0 < end <= 1.0):
        raise ValueError(f"beta_start and beta_end must lie in (0, 1], got {start} and {end}")

    if name == "linear":
        return torch.linspace(start, end, T, dtype=torch.float32)
    if name == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, T, dtype=torch.float32) ** 2
    if name == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, T)) * (end - start) + start

    def alpha_bar(u: float) -> float:  # u ∈ [0, 1]
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale a schedule so that the last step is pure noise: ᾱ_T = 0, SNR(T) = 0.

    Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1:
    shift √ᾱ so its last value is 0, scale it so its first value is unchanged, and recover β.
    Without this, training never sees pure noise but sampling starts from it.
    """
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


def _broadcast(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample coefficient [B] to [B, 1, 1, ...] so it multiplies a batch like ``like``."""
    coef = coef.to(device=like.device, dtype=like.dtype)
    return coef.reshape(coef.shape + (1,) * (like.dim() - coef.dim()))


class NoiseSchedule:
    """β_t, α_t, ᾱ_t and everything derived from them, for t = 0 … T−1.

    >>> schedule = NoiseSchedule.from_name("scaled_linear")
    >>> x_t = schedule.add_noise(x0, torch.randn_like(x0), t)
    """

    def __init__(self, betas: torch.Tensor | Sequence[float]):
        betas = torch.as_tensor(betas, dtype=torch.float32).detach().cpu()
        if betas.dim() != 1 or betas.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
        if not torch.isfinite(betas).all() or (betas < 0).any() or (betas > 1).any():
            raise ValueError("every beta must be a finite number in [0, 1]")
        self.betas = betas  # [T]
        self.alphas = 1.0 - betas  # [T]
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # [T]

    @classmethod
    def from_name(cls, name: str = "scaled_linear", zero_terminal_snr: bool = False, **kwargs) -> NoiseSchedule:
        """Build from :func:`make_betas` arguments, optionally with :func:`rescale_zero_terminal_snr`."""
        betas = make_betas(name, **kwargs)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas)

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.numel()

    def __len__(self) -> int:
        return self.num_train_timesteps

    def __repr__(self) -> str:
        b = self.betas
        return f"NoiseSchedule(T={len(b)}, beta {b[0].item():.5g} → {b[-1].item():.5g}, ᾱ_T={self.alphas_cumprod[-1].item():.3g})"

    # -- indexing -------------------------------------------------------------------------------
    def _index(self, t) -> torch.Tensor:
        """Validate timesteps and return them as a long tensor on the CPU."""
        t = torch.as_tensor(t)
        if t.is_floating_point():
            if not torch.equal(t, t.round()):
                raise ValueError("timesteps must be whole numbers (indices into the schedule)")
            t = t.long()
        t = t.detach().cpu().long()
        if t.numel() and (t.min() < 0 or t.max() >= self.num_train_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps}), got values from {t.min().item()} to {t.max().item()}")
        return t

    def alpha_bar(self, t) -> torch.Tensor:
        """ᾱ_t for integer timesteps (any shape)."""
        return self.alphas_cumprod[self._index(t)]

    def snr(self, t=None) -> torch.Tensor:
        """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) (Kingma et al. 2021); all timesteps when ``t`` is None."""
        a = self.alphas_cumprod if t is None else self.alpha_bar(t)
        return a / (1.0 - a)

    def log_snr(self, t=None) -> torch.Tensor:
        """log SNR = log ᾱ_t − log(1 − ᾱ_t); −inf where the schedule reaches pure noise."""
        a = self.alphas_cumprod if t is None else self.alpha_bar(t)
        return torch.log(a) - torch.log1p(-a)

    def _coefs(self, t, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alpha_bar(t)
        return _broadcast(a.sqrt(), like), _broadcast((1.0 - a).sqrt(), like)

    # -- the forward process ---------------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε  (Ho et al. 2020, eq. 4). ``t`` is an int or a [B] tensor."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
        signal, sigma = self._coefs(t, x0)
        return signal * x0 + sigma * noise

    def forward_step(self, x_prev: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """One step of the forward chain: x_t = √α_t x_{t−1} + √β_t ε  (Ho et al. 2020, eq. 2)."""
        beta = _broadcast(self.betas[self._index(t)], x_prev)
        return (1.0 - beta).sqrt() * x_prev + beta.sqrt() * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """v = √ᾱ_t ε − √(1 − ᾱ_t) x_0, the v-prediction target (Salimans & Ho 2022, §4)."""
        signal, sigma = self._coefs(t, x0)
        return signal * noise - sigma * x0

    # -- conversions between ε, x₀ and v, given x_t --------------------------------------------
    def x0_from_eps(self, x_t: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """x_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t."""
        signal, sigma = self._coefs(t, x_t)
        return (x_t - sigma * eps) / signal

    def eps_from_x0(self, x_t: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
        """ε = (x_t − √ᾱ_t x_0) / √(1 − ᾱ_t)."""
        signal, sigma = self._coefs(t, x_t)
        return (x_t - signal * x0) / sigma

    def x0_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
        """x_0 = √ᾱ_t x_t − √(1 − ᾱ_t) v."""
        signal, sigma = self._coefs(t, x_t)
        return signal * x_t - sigma * v

    def eps_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
        """ε = √(1 − ᾱ_t) x_t + √ᾱ_t v."""
        signal, sigma = self._coefs(t, x_t)
        return sigma * x_t + signal * v

    def v_from_eps(self, x_t: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """v from ε, through x_0."""
        return self.velocity(self.x0_from_eps(x_t, eps, t), eps, t)

    def to_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, t, prediction_type: str = "epsilon") -> torch.Tensor:
        """Read a model's output as a prediction of x_0, whatever it was trained to predict."""
        if prediction_type == "epsilon":
            return self.x0_from_eps(x_t, model_output, t)
        if prediction_type == "v_prediction":
            return self.x0_from_v(x_t, model_output, t)
        if prediction_type == "sample":
            return model_output
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")

    def to_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, t, prediction_type: str = "epsilon") -> torch.Tensor:
        """Read a model's output as a prediction of ε, whatever it was trained to predict."""
        if prediction_type == "epsilon":
            return model_output
        if prediction_type == "v_prediction":
            return self.eps_from_v(x_t, model_output, t)
        if prediction_type == "sample":
            return self.eps_from_x0(x_t, model_output, t)
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t, prediction_type: str = "epsilon") -> torch.Tensor:
        """The training target for a prediction type: ε, v or x_0."""
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return self.velocity(x0, noise, t)
        if prediction_type == "sample":
            return x0
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")

    # -- diagnosis, for the "broken schedule" lessons ------------------------------------------
    def problems(self) -> list[str]:
        """Plain-words list of what is wrong with this schedule for training a diffusion model (empty if fine)."""
        found = []
        b, a = self.betas, self.alphas_cumprod
        if (b[1:] < b[:-1] - 1e-12).any():
            found.append("β decreases somewhere: noise should be added faster as t grows, not slower")
        if b[0] > 0.05:
            found.append(f"β_1 = {b[0].item():.3g} is large: the first step already destroys the image")
        if a[0] < 0.9:
            found.append(f"ᾱ at t=0 is {a[0].item():.3g}: even the least noisy training input has lost most of its signal")
        if a[-1] > 0.05:
            found.append(f"ᾱ at t=T−1 is {a[-1].item():.3g}: the last step is not close to pure noise, so sampling from N(0, I) starts off-distribution")
        return found
