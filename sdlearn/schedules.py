"""Noise schedules and the forward (noising) process.

The forward process of DDPM (Ho et al. 2020, eq. 2) adds a little Gaussian noise at every step,

    q(x_t | x_{t-1}) = N(√α_t x_{t-1}, β_t I),          α_t = 1 − β_t,

and because a sum of Gaussians is Gaussian, any step can be reached in one jump (eq. 4):

    q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I),            ᾱ_t = ∏_{s≤t} α_s,
    x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε,   ε ~ N(0, I).

A *schedule* is the choice of β_1..β_T. Everything here is numerically equal to diffusers'
``DDPMScheduler`` (``betas``, ``alphas_cumprod``) for the same configuration, so that what a
learner builds here carries over. Timesteps are 0-based indices ``t ∈ [0, T)`` as in diffusers.

Conventions:

- ``t`` is a whole number or a ``[B]`` tensor of them, one per sample of the batch.
- Anything that interprets a model's output takes it first, then the noise level, then the noisy
  sample: ``(model_output, t, x_t, prediction_type)``, the order of diffusers' ``scheduler.step(model_output,
  t, x)`` — :meth:`NoiseSchedule.to_x0`, :meth:`NoiseSchedule.to_eps`, and :func:`convert_prediction` with ᾱ in
  place of ``t``. Closed-form formulas of the forward process take their tensors first and ``t`` last:
  ``add_noise(x0, noise, t)``, ``velocity(x0, noise, t)``, ``x0_from_eps(x_t, eps, t)``,
  ``target(x0, noise, t, prediction_type)``.
- ε, x₀ and v are converted into one another in one place, :func:`convert_prediction_alpha_sigma`;
  :func:`convert_prediction`, the methods of :class:`NoiseSchedule` and every sampler in
  :mod:`sdlearn.samplers` call it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

SCHEDULE_NAMES = ("linear", "scaled_linear", "cosine", "sigmoid")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# What a network may be trained to predict: one of the diffusion targets above, or the velocity of rectified flow
# ("flow": v = ε − x₀ on the straight path x_σ = (1 − σ) x₀ + σ ε; see flow_interpolate).
FLOW = "flow"
MODEL_PREDICTION_TYPES = (*PREDICTION_TYPES, FLOW)

# Default (beta_start, beta_end) per schedule: DDPM's linear 1e-4 → 0.02, Stable Diffusion's scaled-linear
# 0.00085 → 0.012; the cosine schedule takes none.
DEFAULT_BETA_RANGE = {
    "linear": (1e-4, 0.02),
    "scaled_linear": (0.00085, 0.012),
    "sigmoid": (1e-4, 0.02),
    "cosine": (None, None),
}
_ALIASES = {"squaredcos_cap_v2": "cosine"}

# ᾱ below this is "no signal left" for NoiseSchedule.problems(): √ᾱ = 0.01, the image a hundredth of the
# noise's scale. A schedule that gets there before T/2 spends more than half of its steps on pure noise.
ALMOST_NO_SIGNAL = 1e-4


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
    default_start, default_end = DEFAULT_BETA_RANGE[name]
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


def __getattr__(name: str):
    """Deprecated module attributes, kept for one release."""
    if name == "_DEFAULT_RANGE":
        warnings.warn("sdlearn.schedules._DEFAULT_RANGE is deprecated and will be removed in the next release; "
                      "use sdlearn.schedules.DEFAULT_BETA_RANGE", DeprecationWarning, stacklevel=2)
        return DEFAULT_BETA_RANGE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_prediction_type(prediction_type: str) -> None:
    """Raise ``ValueError`` unless ``prediction_type`` is one of :data:`PREDICTION_TYPES` (the diffusion targets);
    "flow", a rectified-flow velocity, gets its own message: the diffusion samplers cannot read it."""
    if prediction_type == FLOW:
        raise ValueError("this model was trained with the rectified-flow objective (prediction_type 'flow': it "
                         "predicts the velocity ε − x₀), not a diffusion target; sample it with "
                         "sdlearn.flow.FlowMatchEulerSampler or FlowMatchHeunSampler")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")


def check_model_prediction_type(prediction_type: str) -> None:
    """Raise ``ValueError`` unless a network may be trained to predict ``prediction_type``: one of
    :data:`MODEL_PREDICTION_TYPES` (the diffusion targets, or "flow")."""
    if prediction_type not in MODEL_PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {', '.join(MODEL_PREDICTION_TYPES)}")


# -- rectified flow: the straight path and its velocity (Liu et al. 2023; Esser et al. 2024, SD3) ------
def flow_interpolate(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """The rectified-flow path x_σ = (1 − σ) x₀ + σ ε, σ ∈ [0, 1] (σ = 0 the data, σ = 1 pure noise): a straight
    line from each image to its noise (Esser et al. 2024, eq. 3 with a_t = 1 − t, b_t = t). ``sigma``: a number or
    a ``[B]`` tensor. Unlike the VP path √ᾱ x₀ + √(1 − ᾱ) ε, its coefficients add to 1, not their squares."""
    sigma = _coefficient(sigma, x0)
    return (1 - sigma) * x0 + sigma * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The conditional velocity dx_σ/dσ = ε − x₀ along :func:`flow_interpolate`: the regression target of
    (conditional) flow matching (Lipman et al. 2023, eq. 23; Liu et al. 2023). It does not depend on σ."""
    return noise - x0


def shift_sigmas(sigma, shift: float = 1.0):
    """SD3's resolution shift of the noise level: σ' = s σ / (1 + (s − 1) σ) (Esser et al. 2024, §5.3.2), which keeps
    SNR(σ') = SNR(σ) / s² — with s > 1 more of the steps (or training samples) sit at high noise, where a large image
    still has structure left to decide. s = 1 changes nothing. Tensors, arrays or numbers."""
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a number > 0 (1 = no shift), got {shift!r}")
    return shift * sigma / (1 + (shift - 1) * sigma)


def logit_normal_sigmas(n: int, generator: torch.Generator | None = None, mean: float = 0.0, std: float = 1.0,
                        shift: float = 1.0) -> torch.Tensor:
    """``n`` training noise levels σ = sigmoid(u), u ~ N(mean, std²): SD3's logit-normal sampling (Esser et al. 2024,
    §3.1, "lognorm(0, 1)"), which puts most samples in the middle of [0, 1] where the velocity is hardest to predict
    and few at the ends, where it is nearly x-independent; then :func:`shift_sigmas`. → float32 ``[n]`` in (0, 1)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not (isinstance(std, (int, float)) and std > 0):
        raise ValueError(f"std must be a number > 0, got {std!r}")
    u = torch.randn(n, generator=generator) * std + mean  # [n]
    return shift_sigmas(torch.sigmoid(u), shift)


def flow_matched_timesteps(schedule, n: int, generator: torch.Generator | None = None,
                           std: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's rectified-flow training read as an ε-objective → ``(t, weight)``, long ``[n]`` and float32 ``[n]``.

    The flow's x_σ = (1 − σ) x₀ + σ ε is the schedule's x_t scaled by 1 / (√ᾱ + √(1 − ᾱ)), with the same ε and
    SNR = ((1 − σ)/σ)². So σ = sigmoid(u), u ~ N(0, std²) (:func:`logit_normal_sigmas`) is log SNR = −2u ~
    N(0, (2·std)²): ``t`` is the schedule's level nearest to such a log SNR. The flow's loss ‖v − v̂‖² is the
    ε-loss times 1 / (1 − σ)² = (1 + SNR^(−1/2))², since v − v̂ = (ε − ε̂) / (1 − σ): ``weight`` is that, divided by
    its mean under the Gaussian, 1 + 2e^(s²/8) + e^(s²/2) with s = 2·std, so weights average about 1. Uniform t
    and unit weights (Ho et al. 2020's L_simple) put little of the loss where layout is decided (SNR ≲ 1);
    these put as much there as a flow model does, and the network still predicts ε."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not (isinstance(std, (int, float)) and std > 0):
        raise ValueError(f"std must be a number > 0, got {std!r}")
    levels = schedule.log_snr().double()  # [T], decreasing in t
    log_snr = torch.randn(n, generator=generator, dtype=torch.float64) * (2 * std)  # [n]
    t = torch.searchsorted(-levels, -log_snr).clamp(0, len(levels) - 1)  # the first level at or below it
    s = 2 * std
    weight = (1 + torch.exp(-levels[t] / 2)) ** 2 / (1 + 2 * math.exp(s * s / 8) + math.exp(s * s / 2))
    return t, weight.float()


TIMESTEP_SAMPLINGS = ("uniform", "flow_matched", "logit_normal")


def check_timestep_sampling(kind: str) -> None:
    """One line for a name that is not one of :data:`TIMESTEP_SAMPLINGS`."""
    if kind not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"timesteps must be 'uniform' or 'flow_matched' (diffusion) or 'logit_normal' (flow), got {kind!r}")


def training_timesteps(kind: str, schedule, n: int, generator: torch.Generator | None = None):
    """Training timesteps of ``kind`` → ``(t, weight)``, ``[n]`` each, weight None for unit weights: "uniform" integer t
    in [0, T) (Ho et al. 2020), "flow_matched" (:func:`flow_matched_timesteps`), or "logit_normal" float σT for a
    flow model (:func:`logit_normal_sigmas`)."""
    check_timestep_sampling(kind)
    T = schedule.num_train_timesteps
    if kind == "uniform":
        return torch.randint(T, (n,), generator=generator), None
    return flow_matched_timesteps(schedule, n, generator) if kind == "flow_matched" \
        else (logit_normal_sigmas(n, generator) * T, None)


# -- reading a model's output: ε, x₀ and v ------------------------------------------------------------
def _coefficient(coef, like: torch.Tensor):
    """A noise-level coefficient ready to multiply ``like``. A number or a 0-dim tensor is a scalar and is used
    as it is (PyTorch treats a 0-dim CPU tensor as a scalar on every device and in every dtype, as diffusers'
    schedulers rely on); any other tensor is cast to ``like``'s dtype and moved to its device, and a [B]
    tensor is reshaped to [B, 1, …]."""
    if not isinstance(coef, torch.Tensor) or coef.dim() == 0:
        return coef
    if coef.dim() == 1 and like.dim() > 1:
        coef = coef.reshape(coef.shape + (1,) * (like.dim() - 1))
    return coef.to(device=like.device, dtype=like.dtype)


def convert_prediction_alpha_sigma(model_output: torch.Tensor, alpha, sigma, x: torch.Tensor,
                                   prediction_type: str = "epsilon", *, variance_preserving: bool = True):
    """Read a model's output as the pair (x̂₀, ε̂), for a noisy sample x = α x₀ + σ ε.

    This is the one place where ε, x₀ and v are converted into one another. ``alpha`` and ``sigma`` are
    numbers or tensors (0-dim, [B], or shaped to broadcast against ``x``):

    - ``"epsilon"``: ε̂ = output, x̂₀ = (x − σ ε̂) / α;
    - ``"sample"``: x̂₀ = output, ε̂ = (x − α x̂₀) / σ;
    - ``"v_prediction"``: v = α ε − σ x₀ (Salimans & Ho 2022, §4) for the variance-preserving x_t, where
      α² + σ² = 1; then x̂₀ = α x − σ v and ε̂ = σ x + α v.

    The variance-preserving view (``variance_preserving=True``) is x_t with (α, σ) = (√ᾱ_t, √(1 − ᾱ_t)), as in
    DDPM, DDIM and DPM-Solver++. Karras et al.'s (2022) view is x = x_t / √ᾱ_t = x₀ + σ ε, i.e. α = 1 and
    σ = √((1 − ᾱ)/ᾱ), as in Euler and Heun; there v still refers to x_t = x / r with r = √(α² + σ²), so pass
    ``variance_preserving=False`` and x̂₀ = α x / r² − (σ / r) v, ε̂ = σ x / r² + (α / r) v. (Feeding Euler's
    x / r and ᾱ = 1/r² to the variance-preserving formulas instead would give the same values up to float32
    rounding, which grows with σ.) Each formula keeps the order of operations of the diffusers schedulers
    that use it (``DDPMScheduler``, ``EulerDiscreteScheduler``, ``DPMSolverMultistepScheduler``, …): keep it
    so, or float32 results move by rounding.
    """
    check_prediction_type(prediction_type)
    alpha, sigma = _coefficient(alpha, x), _coefficient(sigma, x)
    if prediction_type == "epsilon":
        return (x - sigma * model_output) / alpha, model_output
    if prediction_type == "sample":
        return model_output, (x - alpha * model_output) / sigma
    if variance_preserving:
        return alpha * x - sigma * model_output, alpha * model_output + sigma * x
    norm_sq = alpha**2 + sigma**2
    norm = norm_sq**0.5
    return model_output * (-sigma / norm) + (alpha * x / norm_sq), model_output * (alpha / norm) + sigma * x / norm_sq


def convert_prediction(model_output: torch.Tensor, alpha_bar, x_t: torch.Tensor,
                       prediction_type: str = "epsilon") -> tuple[torch.Tensor, torch.Tensor]:
    """Read a model's output at noise level ᾱ as (x̂₀, ε̂), given x_t = √ᾱ x₀ + √(1 − ᾱ) ε (Ho et al. 2020, eq. 4).

    ``alpha_bar`` is a number, a 0-dim tensor, a [B] tensor (one per sample) or a tensor that broadcasts
    against ``x_t``. √ᾱ and √(1 − ᾱ) are computed in ``alpha_bar``'s dtype; the results have ``x_t``'s. At
    ᾱ = 0 (zero terminal SNR) an ε-prediction gives x̂₀ = 0/0 = NaN: ε says nothing about x₀ there.
    See :func:`convert_prediction_alpha_sigma` for the formulas.

    >>> x0_hat, eps_hat = convert_prediction(model(x_t, t), schedule.alpha_bar(t), x_t, "v_prediction")
    """
    alpha_bar = torch.as_tensor(alpha_bar)
    if not alpha_bar.is_floating_point():
        alpha_bar = alpha_bar.to(torch.get_default_dtype())
    return convert_prediction_alpha_sigma(model_output, alpha_bar.sqrt(), (1 - alpha_bar).sqrt(), x_t, prediction_type)


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

    # -- conversions between ε, x₀ and v, given x_t (all through convert_prediction_alpha_sigma) --------------
    def _convert(self, model_output: torch.Tensor, t, x_t: torch.Tensor, prediction_type: str):
        signal, sigma = self._coefs(t, x_t)
        return convert_prediction_alpha_sigma(model_output, signal, sigma, x_t, prediction_type)

    def x0_from_eps(self, x_t: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """x_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t."""
        return self._convert(eps, t, x_t, "epsilon")[0]

    def eps_from_x0(self, x_t: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
        """ε = (x_t − √ᾱ_t x_0) / √(1 − ᾱ_t)."""
        return self._convert(x0, t, x_t, "sample")[1]

    def x0_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
        """x_0 = √ᾱ_t x_t − √(1 − ᾱ_t) v."""
        return self._convert(v, t, x_t, "v_prediction")[0]

    def eps_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
        """ε = √(1 − ᾱ_t) x_t + √ᾱ_t v."""
        return self._convert(v, t, x_t, "v_prediction")[1]

    def v_from_eps(self, x_t: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """v from ε, through x_0."""
        return self.velocity(self.x0_from_eps(x_t, eps, t), eps, t)

    @staticmethod
    def _legacy_order(method: str, model_output: torch.Tensor, t, x_t):
        """(t, x_t), accepting for one release the former order (model_output, x_t, t): t is a number or a [B]
        tensor, so a second argument shaped like model_output (with ≥ 2 dimensions) can only be x_t."""
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape == model_output.shape:
            warnings.warn(f"NoiseSchedule.{method}(model_output, x_t, t, prediction_type) is deprecated and will stop "
                          f"working in the next release; call NoiseSchedule.{method}(model_output, t, x_t, "
                          "prediction_type), the order of sampler.step(model_output, t, x)",
                          DeprecationWarning, stacklevel=3)
            return x_t, t
        return t, x_t

    def to_x0(self, model_output: torch.Tensor, t, x_t: torch.Tensor, prediction_type: str = "epsilon") -> torch.Tensor:
        """Read a model's output at timestep ``t`` as a prediction of x_0, whatever it was trained to predict
        (see :func:`convert_prediction_alpha_sigma`). The argument order is ``step``'s: output, t, x_t."""
        t, x_t = self._legacy_order("to_x0", model_output, t, x_t)
        check_prediction_type(prediction_type)
        return self._convert(model_output, t, x_t, prediction_type)[0]

    def to_eps(self, model_output: torch.Tensor, t, x_t: torch.Tensor, prediction_type: str = "epsilon") -> torch.Tensor:
        """Read a model's output at timestep ``t`` as a prediction of ε, whatever it was trained to predict
        (see :func:`convert_prediction_alpha_sigma`). The argument order is ``step``'s: output, t, x_t."""
        t, x_t = self._legacy_order("to_eps", model_output, t, x_t)
        check_prediction_type(prediction_type)
        return self._convert(model_output, t, x_t, prediction_type)[1]

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t, prediction_type: str = "epsilon") -> torch.Tensor:
        """The training target for a prediction type: ε, v or x_0."""
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return self.velocity(x0, noise, t)
        check_prediction_type(prediction_type)
        return x0

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
        half = len(a) // 2
        gone = (a[:half] < ALMOST_NO_SIGNAL).nonzero()
        if a[0] >= 0.9 and len(gone):  # (a schedule that is noise from t = 0 is reported above already)
            k = int(gone[0])
            found.append(f"ᾱ falls below {ALMOST_NO_SIGNAL:g} already at t={k}, before T/2 = {half}: x_t is pure noise "
                         f"from there on, so {len(a) - k} of the {len(a)} steps show the model no image at all "
                         "(lower β end, or raise T)")
        return found
