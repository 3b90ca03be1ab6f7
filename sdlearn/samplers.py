"""Samplers: turning a denoiser into images, one model evaluation at a time.

A trained denoiser predicts the noise ε (or v, or x₀) in x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε. A *sampler*
starts from pure noise and walks down a short list of timesteps, calling the model once per
entry and moving x towards the data. They differ in how they take each step:

- ``DDPMSampler``: draw x_{t'} from the Gaussian posterior q(x_{t'} | x_t, x̂₀) (Ho et al. 2020, eqs. 6–7).
- ``DDIMSampler``: the deterministic (η = 0) or partly stochastic non-Markovian step (Song et al. 2021, eq. 12).
- ``EulerSampler``: Euler's method on the probability-flow ODE written in σ (Karras et al. 2022, eq. 3).
- ``HeunSampler``: Heun's second-order method on the same ODE (Karras et al. 2022, Algorithm 1).
- ``DPMSolverSampler``: DPM-Solver++(2M), an exponential-integrator multistep solver (Lu et al. 2022).

Every sampler has the interface of its diffusers counterpart, so what a learner writes here carries
over: ``set_timesteps``, ``timesteps``, ``init_noise_sigma``, ``scale_model_input``, and ``step`` called
once per model evaluation. For the same configuration and model outputs each is numerically equal
to the diffusers scheduler (``DDPMScheduler``, ``DDIMScheduler``, ``EulerDiscreteScheduler``,
``HeunDiscreteScheduler``, ``DPMSolverMultistepScheduler``; tests/test_samplers.py checks whole
trajectories). The loop, for every sampler::

    sampler.set_timesteps(20)
    x = torch.randn(shape, generator=g) * sampler.init_noise_sigma
    for t in sampler.timesteps:
        out = model(sampler.scale_model_input(x, t), t)
        x = sampler.step(out, t, x, generator=g)

which is what :func:`sample` runs.

Two views of the same state. DDPM, DDIM and DPM-Solver++ carry x_t itself (the "variance preserving"
x_t, std ≈ 1). Euler and Heun carry x = x_t / √ᾱ_t = x₀ + σ ε with σ = √((1 − ᾱ)/ᾱ) (Karras's
"variance exploding" view, std up to σ_max ≈ 14.6 for Stable Diffusion's schedule); for them
``init_noise_sigma`` is σ_max and ``scale_model_input`` divides by √(σ² + 1) to hand the model the
x_t it was trained on.

Where diffusers does something surprising we do the same, for parity, and say so in the docstring:
DDIM's step lands on t − T/N whatever the spacing; Euler/Heun use √(σ_max² + 1) as the initial
noise scale for ``"leading"`` spacing; DDPM adds noise at the final step when it is not t = 0.
Schedules with zero terminal SNR (ᾱ_{T−1} = 0) work: the σ-space samplers cap σ_max at 4096
(ᾱ = 2⁻²⁴) as diffusers does, and DDPM/DDIM handle ᾱ = 0 exactly for v- and x₀-prediction.

Conventions:

- Constructors take the schedule positionally and every option by keyword, ``prediction_type`` first:
  ``XSampler(schedule, *, prediction_type="epsilon", <the sampler's own options>)``; ``get_sampler(name,
  schedule, **options)`` builds one by name.
- ``step(model_output, t, x, generator=None)``: the model's output first, then its timestep, then the state, as
  in diffusers (and in :meth:`sdlearn.schedules.NoiseSchedule.to_x0`). ``t`` must be one of ``timesteps``, taken
  in their order: a timestep not in the list, a fractional one for DDPM/DDIM, going back, or a step after the
  last one raises ``ValueError`` (diffusers computes something for each of these). DDPM and DDIM, whose steps
  need no history, may skip entries (to try one step alone); the others walk every entry.
- Every sampler reads the model's output as (x̂₀, ε̂) with :func:`sdlearn.schedules.convert_prediction` (the
  variance-preserving x_t) or :func:`sdlearn.schedules.convert_prediction_alpha_sigma` (Euler and Heun's
  x = x₀ + σ ε, DPM-Solver++'s α_t and σ_t), the one place where ε, x₀ and v are converted.
- dtype: a step is computed in float32 (in float64 when x is float64, never below float32) and returns x's
  dtype; ``last_x0`` has x's dtype too. Noise is drawn from the generator in that computing dtype and then
  cast, so that a seed gives the same noise in float16, bfloat16 and float32 (rounded), and float32
  results do not depend on the dtype a caller might later choose.
- ``generator`` is always a ``torch.Generator`` (or a list of them, one per sample), never a numpy one.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .schedules import (
    NoiseSchedule,
    check_prediction_type,
    convert_prediction,
    convert_prediction_alpha_sigma,
)

SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_large")
SAMPLER_NAMES = ("ddpm", "ddim", "euler", "heun", "dpm++")

# Zero-terminal-SNR schedules have ᾱ_{T−1} = 0, i.e. σ = ∞ there. Samplers that work in σ replace that
# ᾱ by 2⁻²⁴ (σ ≈ 4096), as diffusers does with rescale_betas_zero_snr=True.
_ZERO_SNR_ALPHA_BAR = 2.0**-24


# ---------------------------------------------------------------------------------------------------
# Timesteps and noise levels (built once per set_timesteps with numpy, exactly as diffusers builds them)
# ---------------------------------------------------------------------------------------------------
def spaced_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str = "leading", steps_offset: int = 0) -> np.ndarray:
    """The N sampling timesteps, descending, as float64 (Lin et al. 2023, Table 2).

    - ``"leading"``: 0, k, 2k, … with k = T // N, plus ``steps_offset`` (DDIM, Stable Diffusion v1).
    - ``"trailing"``: T − 1, T − 1 − T/N, … rounded: always starts at the last, noisiest step.
    - ``"linspace"``: N evenly spaced points from T − 1 to 0 (not rounded here; the integer samplers round).

    For ``"trailing"``, ``np.arange`` sometimes yields one entry too many (diffusers keeps it, e.g. 62
    timesteps for N = 61, the last being −1); we keep exactly N.
    """
    T, N = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        return np.linspace(0, T - 1, N)[::-1].copy()
    if spacing == "leading":
        return (np.arange(N) * (T // N))[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / N))[:N] - 1
    raise ValueError(f"unknown spacing {spacing!r}; expected one of {', '.join(SPACINGS)}")


def sigma_table(schedule: NoiseSchedule) -> np.ndarray:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t) for every training timestep, float32 [T] (ᾱ = 0 replaced by 2⁻²⁴)."""
    alphas_cumprod = schedule.alphas_cumprod.clone()
    alphas_cumprod[alphas_cumprod == 0] = _ZERO_SNR_ALPHA_BAR
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """σ_i = (σ_max^{1/ρ} + i/(n−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i = 0…n−1 (Karras et al. 2022, eq. 5)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_timestep(sigmas: np.ndarray, table: np.ndarray) -> np.ndarray:
    """The fractional timestep of each σ, interpolating log σ between training steps (as diffusers)."""
    log_table = np.log(table)  # [T], increasing
    log_sigma = np.log(np.maximum(sigmas, 1e-10))  # [n]
    low = np.cumsum(log_sigma - log_table[:, None] >= 0, axis=0).argmax(axis=0).clip(max=len(table) - 2)
    w = np.clip((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _check_timesteps_request(num_inference_steps, spacing, steps_offset, num_train_timesteps) -> None:
    T = num_train_timesteps
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise ValueError(f"num_inference_steps must be a whole number from 1 to {T}, got {num_inference_steps!r}")
    if not 1 <= num_inference_steps <= T:
        raise ValueError(f"num_inference_steps must lie between 1 and the {T} training steps, got {num_inference_steps}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {', '.join(SPACINGS)}")
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, (int, np.integer)) or steps_offset < 0:
        raise ValueError(f"steps_offset must be a whole number ≥ 0, got {steps_offset!r}")


def _check_spaced(timesteps: np.ndarray, T: int, num_inference_steps: int, spacing: str) -> None:
    if timesteps.max() > T - 1:
        raise ValueError(f"steps_offset pushes the first timestep to {timesteps.max():g}, past the last training step {T - 1}")
    if (np.diff(timesteps) >= 0).any():
        raise ValueError(
            f"{num_inference_steps} steps with {spacing!r} spacing repeat a timestep; use fewer steps or another spacing"
        )


def _timestep_value(t) -> float:
    """A timestep given as a number or a one-element tensor, as a Python number."""
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise ValueError(f"step takes one timestep (a number or one-element tensor), got a tensor of shape {tuple(t.shape)}")
        return t.item()
    if isinstance(t, (int, float, np.integer, np.floating)) and not isinstance(t, bool):
        return t
    raise ValueError(f"a timestep must be a number or a one-element tensor, got {t!r}")


def _randn(shape, generator, device, dtype) -> torch.Tensor:
    """Standard normal noise drawn exactly as diffusers' ``randn_tensor``: on the generator's device
    (then moved), and one draw per sample when ``generator`` is a list of per-sample generators."""
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    gen_device = (generator[0] if isinstance(generator, (list, tuple)) else generator).device if generator is not None else None
    draw_device = gen_device if gen_device is not None and gen_device.type == "cpu" else device
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        noise = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=draw_device, dtype=dtype) for g in generator])
    else:
        noise = torch.randn(shape, generator=generator, device=draw_device, dtype=dtype)
    return noise.to(device)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a step computes in: float32, or float64 for float64 input (never below float32)."""
    return torch.promote_types(dtype, torch.float32)


# ---------------------------------------------------------------------------------------------------
# Deprecated argument forms, accepted for one release
# ---------------------------------------------------------------------------------------------------
def _positional_options_deprecated(*former_order: str):
    """Decorate a function whose options became keyword-only so that it still takes them positionally, in
    ``former_order``, with a DeprecationWarning that shows the call in the new form."""
    def decorate(function):
        parameters = inspect.signature(function).parameters.values()
        n_positional = sum(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in parameters)
        shown = function.__qualname__.removesuffix(".__init__")

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            if len(args) > n_positional:
                extra = args[n_positional:]
                if len(extra) > len(former_order):
                    raise TypeError(f"{shown}() takes at most {n_positional + len(former_order)} positional arguments "
                                    f"(its options by keyword), got {len(args)}")
                names = former_order[: len(extra)]
                for name in names:
                    if name in kwargs:
                        raise TypeError(f"{shown}() got multiple values for argument {name!r}")
                kwargs.update(zip(names, extra))
                args = args[:n_positional]
                new_form = ", ".join(f"{name}={value!r}" for name, value in zip(names, extra))
                warnings.warn(f"passing {', '.join(names)} to {shown}() by position is deprecated and will stop working "
                              f"in the next release; pass {'it' if len(names) == 1 else 'them'} by keyword: "
                              f"{shown}(..., {new_form})", DeprecationWarning, stacklevel=2)
            return function(*args, **kwargs)

        return wrapper

    return decorate


def _keywords_renamed(**renamed: str):
    """Decorate a function whose keyword arguments were renamed (old=new) so that it still takes the old
    names, with a DeprecationWarning."""
    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            used = [old for old in renamed if old in kwargs]
            if used:
                for old in used:
                    if renamed[old] in kwargs:
                        raise TypeError(f"{function.__name__}() got both {old!r} (deprecated) and {renamed[old]!r}")
                    kwargs[renamed[old]] = kwargs.pop(old)
                warnings.warn(f"{function.__name__}({'=, '.join(used)}=) is deprecated and will stop working in the next "
                              f"release; use {function.__name__}({'=, '.join(renamed[old] for old in used)}=)",
                              DeprecationWarning, stacklevel=2)
            return function(*args, **kwargs)

        return wrapper

    return decorate


# ---------------------------------------------------------------------------------------------------
# The samplers
# ---------------------------------------------------------------------------------------------------
class Sampler:
    """What all samplers share: the schedule, the prediction type, and the list of timesteps.

    Subclasses fill in ``step`` and, unless the rounded spaced timesteps of DDPM and DDIM will do,
    ``_make_timesteps``. ``order`` is the number of model evaluations per step (2 for Heun, whose
    ``timesteps`` lists each inner timestep twice).
    """

    name = "sampler"
    order = 1
    clip_sample = False

    @_positional_options_deprecated("prediction_type")
    def __init__(self, schedule: NoiseSchedule, *, prediction_type: str = "epsilon"):
        if not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"schedule must be a sdlearn.schedules.NoiseSchedule, got {type(schedule).__name__}")
        check_prediction_type(prediction_type)
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.num_train_timesteps = schedule.num_train_timesteps
        self.alphas_cumprod = schedule.alphas_cumprod  # [T] float32, on the CPU
        self.timesteps: torch.Tensor | None = None
        self.num_inference_steps: int | None = None
        self.spacing: str | None = None
        self.last_x0: torch.Tensor | None = None  # the x₀ predicted at the latest step, for callbacks

    def set_timesteps(self, num_inference_steps: int, spacing: str = "leading", steps_offset: int = 0) -> None:
        """Choose the ``num_inference_steps`` timesteps to walk (see :func:`spaced_timesteps`) and reset."""
        _check_timesteps_request(num_inference_steps, spacing, steps_offset, self.num_train_timesteps)
        self.num_inference_steps = int(num_inference_steps)
        self.spacing, self.steps_offset = spacing, int(steps_offset)
        self._make_timesteps(self.num_inference_steps, spacing, self.steps_offset)
        self._step_index = None
        self.last_x0 = None

    def _make_timesteps(self, n: int, spacing: str, steps_offset: int) -> None:
        """Integer timesteps: the spaced ones, rounded (DDPM, DDIM)."""
        timesteps = np.round(spaced_timesteps(self.num_train_timesteps, n, spacing, steps_offset))
        _check_spaced(timesteps, self.num_train_timesteps, n, spacing)
        self.timesteps = torch.from_numpy(timesteps.astype(np.int64))

    def _require_timesteps(self) -> None:
        if self.timesteps is None:
            raise ValueError(f"call {type(self).__name__}.set_timesteps(num_inference_steps) before sampling")

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the starting noise x_T."""
        return 1.0

    def scale_model_input(self, x: torch.Tensor, t) -> torch.Tensor:
        """The model's input at timestep ``t`` (x itself here; Euler and Heun rescale it)."""
        self._require_timesteps()
        return x

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """Noise clean samples to timestep ``t`` in this sampler's own variable (for image-to-image)."""
        return self.schedule.add_noise(x0, noise, torch.as_tensor(_timestep_value(t)).long())

    def step(self, model_output: torch.Tensor, t, x: torch.Tensor, generator=None) -> torch.Tensor:
        raise NotImplementedError

    def _check_step(self, model_output: torch.Tensor, x: torch.Tensor):
        """Check a step's inputs → (model_output, x) in the computing dtype, and the dtype to return (x's)."""
        self._require_timesteps()
        if model_output.shape != x.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)} but x has shape {tuple(x.shape)}; they must match")
        dtype = _compute_dtype(x.dtype)
        return model_output.to(dtype), x.to(dtype), x.dtype

    def _matches(self, t) -> torch.Tensor:
        """The entries of ``timesteps`` equal to ``t`` (one, or two for Heun's inner timesteps); never empty."""
        self._require_timesteps()
        value = _timestep_value(t)
        matches = (self.timesteps == value).nonzero().flatten()
        if len(matches) == 0:
            raise ValueError(f"timestep {value} is not one of this sampler's timesteps {self.timesteps.tolist()}")
        return matches

    def _walk_to(self, t) -> int:
        """The entry of ``timesteps`` that a step from ``t`` starts at, for DDPM and DDIM, whose steps need no
        history: ``t`` must be one of the (integer) timesteps, and later than none already stepped from. So any
        single step may be tried, as in notebook 06, or steps skipped, but stepping from a timestep again, going
        back up the list, or stepping after the last one raises ``ValueError``. The step, once done, records
        ``self._step_index = i + 1``."""
        self._require_timesteps()
        value = _timestep_value(t)
        if not math.isfinite(value) or value != int(value):
            raise ValueError(f"timestep must be a whole number, one of this sampler's timesteps, got {value}")
        i = int(self._matches(int(value))[0])
        if self._step_index is not None and i < self._step_index:
            if self._step_index >= len(self.timesteps):
                raise ValueError("all timesteps have been stepped through; call set_timesteps again to sample anew")
            raise ValueError(f"timestep {int(value)} (entry {i} of timesteps) was already passed: this sampler has "
                             f"stepped from timestep {self.timesteps[self._step_index - 1].item()} (entry "
                             f"{self._step_index - 1}); step through sampler.timesteps in order, or call "
                             "set_timesteps to restart")
        return i

    def _eval_index(self, t) -> int:
        """Which entry of ``timesteps`` this model evaluation is. Like diffusers, the first call looks
        ``t`` up (taking the second match when it appears twice, as in Heun's list) and later calls
        count on, checking that ``t`` is the entry expected."""
        value = _timestep_value(t)
        if self._step_index is None:
            matches = self._matches(value)
            self._step_index = int(matches[1] if len(matches) > 1 else matches[0])
        i = self._step_index
        if i >= len(self.timesteps):
            raise ValueError("all timesteps have been stepped through; call set_timesteps again to sample anew")
        if value != self.timesteps[i].item():
            raise ValueError(f"expected timestep {self.timesteps[i].item()} (entry {i} of timesteps), got {value}: "
                             "step through sampler.timesteps in order, or call set_timesteps to restart")
        return i

    def _config(self) -> str:
        return f"prediction_type={self.prediction_type!r}"

    def __repr__(self) -> str:
        steps = f", {self.num_inference_steps} steps, spacing={self.spacing!r}" if self.timesteps is not None else ""
        return f"{type(self).__name__}({self._config()}{steps})"

    def _read_output(self, model_output, alpha_prod_t, x, dtype):
        """The model output at ᾱ_t read as (x̂₀, ε̂) in the variance-preserving x_t (DDPM, DDIM), x̂₀ clipped to
        [−1, 1] if ``clip_sample``; keeps x̂₀ in ``last_x0``, in ``dtype``."""
        if self.prediction_type == "epsilon" and alpha_prod_t == 0:
            raise ValueError("an ε-prediction says nothing about x₀ where ᾱ_t = 0 (zero terminal SNR); use a "
                             "v_prediction model (Lin et al. 2023) or spacing='leading', which skips t = T−1")
        x0, eps = convert_prediction(model_output, alpha_prod_t, x, self.prediction_type)
        if self.clip_sample:
            x0 = x0.clamp(-1, 1)
        self.last_x0 = x0.to(dtype)
        return x0, eps


class DDPMSampler(Sampler):
    """Ancestral sampling from the DDPM posterior (Ho et al. 2020, eqs. 6–7).

    With t' the next timestep in the (possibly strided) list, α_t = ᾱ_t/ᾱ_{t'} and β_t = 1 − α_t,

        q(x_{t'} | x_t, x₀) = N(μ̃, β̃ I),
        μ̃ = √ᾱ_{t'} β_t / (1 − ᾱ_t) · x₀ + √α_t (1 − ᾱ_{t'}) / (1 − ᾱ_t) · x_t,
        β̃ = (1 − ᾱ_{t'}) / (1 − ᾱ_t) · β_t      (``"fixed_small"``, the true posterior variance)
        or β_t                                   (``"fixed_large"``, the upper bound of Ho et al. §3.2).

    x₀ is the model's prediction x̂₀, optionally clipped to [−1, 1]. Noise is added unless t = 0,
    so with ``"trailing"`` spacing (last t > 0) the final step adds noise too, as in diffusers.
    """

    name = "ddpm"

    @_positional_options_deprecated("variance_type", "prediction_type", "clip_sample")
    def __init__(self, schedule: NoiseSchedule, *, prediction_type: str = "epsilon", variance_type: str = "fixed_small",
                 clip_sample: bool = False):
        super().__init__(schedule, prediction_type=prediction_type)
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"unknown variance_type {variance_type!r}; expected one of {', '.join(VARIANCE_TYPES)}")
        self.variance_type = variance_type
        self.clip_sample = bool(clip_sample)
        self._one = torch.tensor(1.0)

    def step(self, model_output, t, x, generator=None):
        """x_t → x_{t'} ~ q(x_{t'} | x_t, x̂₀). Returns x_{t'}; keeps x̂₀ in ``last_x0``."""
        model_output, x, dtype = self._check_step(model_output, x)
        i = self._walk_to(t)
        t = int(self.timesteps[i])
        t_prev = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1

        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self._one
        beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
        alpha_t = alpha_prod_t / alpha_prod_t_prev  # α over the whole stride t' → t
        beta_t = 1 - alpha_t

        x0, _ = self._read_output(model_output, alpha_prod_t, x, dtype)

        # the posterior mean μ̃ (eq. 7)
        x0_coef = alpha_prod_t_prev**0.5 * beta_t / beta_prod_t
        xt_coef = alpha_t**0.5 * beta_prod_t_prev / beta_prod_t
        x_prev = x0_coef * x0 + xt_coef * x

        if t > 0:
            noise = _randn(x.shape, generator, x.device, x.dtype)
            if self.variance_type == "fixed_small":
                variance = torch.clamp(beta_prod_t_prev / beta_prod_t * beta_t, min=1e-20)  # β̃
            else:
                variance = beta_t
            x_prev = x_prev + variance**0.5 * noise
        self._step_index = i + 1
        return x_prev.to(dtype)

    def _config(self):
        return f"variance_type={self.variance_type!r}, {super()._config()}, clip_sample={self.clip_sample}"


class DDIMSampler(Sampler):
    """The DDIM step (Song et al. 2021, eq. 12), from x_t to x_{t'}:

        x_{t'} = √ᾱ_{t'} x̂₀ + √(1 − ᾱ_{t'} − σ_t²) ε̂ + σ_t z,       z ~ N(0, I),
        σ_t = η √((1 − ᾱ_{t'})/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t'})          (eq. 16).

    η = 0 is deterministic: it follows the probability-flow ODE, so a fixed x_T always gives the same
    image; η = 1 has DDPM's posterior variance. Beyond the last step ᾱ_{t'} is 1
    (``set_alpha_to_one=True``) or ᾱ_0. As in diffusers, t' = t − T // N whatever the spacing, which
    for ``"linspace"`` and ``"trailing"`` is not always the next entry of ``timesteps``; unlike diffusers,
    ``t`` itself must be one of ``timesteps``.
    """

    name = "ddim"

    @_positional_options_deprecated("eta", "prediction_type", "set_alpha_to_one", "clip_sample")
    def __init__(self, schedule: NoiseSchedule, *, prediction_type: str = "epsilon", eta: float = 0.0,
                 set_alpha_to_one: bool = True, clip_sample: bool = False):
        super().__init__(schedule, prediction_type=prediction_type)
        if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be a number ≥ 0 (0 deterministic DDIM, 1 DDPM-like), got {eta!r}")
        self.eta = float(eta)
        self.set_alpha_to_one = bool(set_alpha_to_one)
        self.clip_sample = bool(clip_sample)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]

    def step(self, model_output, t, x, generator=None):
        """x_t → x_{t'} by eq. 12. Returns x_{t'}; keeps x̂₀ in ``last_x0``."""
        model_output, x, dtype = self._check_step(model_output, x)
        i = self._walk_to(t)
        t = int(self.timesteps[i])
        t_prev = t - self.num_train_timesteps // self.num_inference_steps

        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod

        x0, eps = self._read_output(model_output, alpha_prod_t, x, dtype)

        variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
        std = self.eta * variance**0.5  # σ_t of eq. 16
        direction = (1 - alpha_prod_t_prev - std**2) ** 0.5 * eps  # "direction pointing to x_t"
        x_prev = alpha_prod_t_prev**0.5 * x0 + direction
        if self.eta > 0:
            x_prev = x_prev + std * _randn(x.shape, generator, x.device, x.dtype)
        self._step_index = i + 1
        return x_prev.to(dtype)

    def _config(self):
        return f"eta={self.eta}, {super()._config()}, set_alpha_to_one={self.set_alpha_to_one}, clip_sample={self.clip_sample}"


class _SigmaSampler(Sampler):
    """Shared by Euler and Heun: the state is x = x₀ + σ ε (x_t / √ᾱ_t), and ``sigmas`` holds σ at
    each step followed by a final 0. Timesteps are float32 and, for ``"linspace"`` spacing or Karras
    σ, fractional: the model is called at the t whose σ it is (σ interpolated linearly in t)."""

    use_karras_sigmas = False

    def _make_timesteps(self, n, spacing, steps_offset):
        T = self.num_train_timesteps
        timesteps = spaced_timesteps(T, n, spacing, steps_offset).astype(np.float32)
        _check_spaced(timesteps, T, n, spacing)
        table = sigma_table(self.schedule)  # [T] float32
        sigmas = np.interp(timesteps, np.arange(T), table)  # [n] float64
        if self.use_karras_sigmas:
            sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), n)
            timesteps = sigma_to_timestep(sigmas, table)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))  # [n + 1]
        self._set_sigma_timesteps(torch.from_numpy(timesteps.astype(np.float32)))

    def _set_sigma_timesteps(self, timesteps):
        self.timesteps = timesteps

    @property
    def init_noise_sigma(self) -> float:
        """σ_max; for ``"leading"`` spacing diffusers uses √(σ_max² + 1), and so do we."""
        self._require_timesteps()
        sigma_max = self.sigmas.max()
        return (sigma_max if self.spacing in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5).item()

    def _sigma_of_eval(self, i: int) -> torch.Tensor:
        return self.sigmas[i]

    def scale_model_input(self, x, t):
        """x / √(σ² + 1) = x_t, the variance-preserving input the model was trained on."""
        self._require_timesteps()
        sigma = self._sigma_of_eval(self._eval_index(t))
        return x / ((sigma**2 + 1) ** 0.5)

    def add_noise(self, x0, noise, t):
        """x₀ + σ(t) ε, for a ``t`` in ``timesteps``."""
        return x0 + noise * self._sigma_of_eval(int(self._matches(t)[0])).to(x0.dtype)

    def _slope(self, model_output, x, sigma):
        """x̂₀ = D(x; σ) read from the model output in σ-space (x = x₀ + σ ε, i.e. α = 1), and the slope
        dx/dσ = (x − x̂₀) / σ of the probability-flow ODE (Karras et al. 2022, eq. 3)."""
        x0, _ = convert_prediction_alpha_sigma(model_output, 1, sigma, x, self.prediction_type, variance_preserving=False)
        return x0, (x - x0) / sigma


class EulerSampler(_SigmaSampler):
    """Euler's method on the probability-flow ODE in σ (Karras et al. 2022, eq. 3 with σ(t) = t):

        dx/dσ = (x − D(x; σ)) / σ,          x_{i+1} = x_i + (σ_{i+1} − σ_i) · (x_i − x̂₀) / σ_i,

    with D(x; σ) = x̂₀ the model's denoised estimate. ``use_karras_sigmas`` spaces the σ_i by
    Karras et al.'s eq. 5 (ρ = 7) between the σ_min and σ_max of the chosen spacing.
    """

    name = "euler"

    @_positional_options_deprecated("use_karras_sigmas", "prediction_type")
    def __init__(self, schedule: NoiseSchedule, *, prediction_type: str = "epsilon", use_karras_sigmas: bool = False):
        super().__init__(schedule, prediction_type=prediction_type)
        self.use_karras_sigmas = bool(use_karras_sigmas)

    def step(self, model_output, t, x, generator=None):
        """One Euler step from σ_i to σ_{i+1}. ``generator`` is unused (the step is deterministic)."""
        model_output, x, dtype = self._check_step(model_output, x)
        i = self._eval_index(t)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x0, derivative = self._slope(model_output, x, sigma)
        self.last_x0 = x0.to(dtype)
        x_next = x + derivative * (sigma_next - sigma)
        self._step_index = i + 1
        return x_next.to(dtype)

    def _config(self):
        return f"use_karras_sigmas={self.use_karras_sigmas}, {super()._config()}"


class HeunSampler(_SigmaSampler):
    """Heun's second-order method on the same ODE (Karras et al. 2022, Algorithm 1, no churn).

    Each step σ_i → σ_{i+1} takes an Euler step to a proposal x̃, evaluates the slope again there,
    and moves with the average of the two slopes:

        d_i = (x_i − x̂₀(x_i, σ_i)) / σ_i,   x̃ = x_i + (σ_{i+1} − σ_i) d_i,
        d'  = (x̃ − x̂₀(x̃, σ_{i+1})) / σ_{i+1},   x_{i+1} = x_i + (σ_{i+1} − σ_i) (d_i + d') / 2.

    The last step, to σ = 0, is a plain Euler step. That is 2N − 1 model evaluations, so ``timesteps``
    lists every inner timestep twice, as diffusers does, and ``step`` is called once per evaluation:
    the first call of a pair returns the proposal x̃, the second the corrected x_{i+1}.
    """

    name = "heun"
    order = 2

    @_positional_options_deprecated("prediction_type")
    def __init__(self, schedule: NoiseSchedule, *, prediction_type: str = "epsilon"):
        super().__init__(schedule, prediction_type=prediction_type)
        self._first_half = None

    def _set_sigma_timesteps(self, timesteps):
        self.timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])  # [2n − 1]
        self._first_half = None

    def _sigma_of_eval(self, k: int) -> torch.Tensor:
        # evaluations: k = 0 at σ_0; then k = 2i − 1 (correction) and k = 2i (next Euler step), both at σ_i
        return self.sigmas[(k + 1) // 2]

    def step(self, model_output, t, x, generator=None):
        """Half of a Heun step (see the class docstring). ``generator`` is unused."""
        model_output, x, dtype = self._check_step(model_output, x)
        k = self._eval_index(t)
        if k % 2 == 0:  # an Euler step from σ_i, i = k / 2
            i = k // 2
            sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
            x0, derivative = self._slope(model_output, x, sigma)
            dt = sigma_next - sigma
            self._first_half = (x, derivative, dt)
            x_next = x + derivative * dt
        else:  # the correction, with the slope at the proposal x̃ = x (at σ_{i+1})
            if self._first_half is None:
                raise ValueError("Heun's correction step was called without its Euler step; step through sampler.timesteps in order")
            x_start, first_derivative, dt = self._first_half
            x0, derivative = self._slope(model_output, x, self.sigmas[(k + 1) // 2])
            x_next = x_start + (first_derivative + derivative) / 2 * dt
            self._first_half = None
        self.last_x0 = x0.to(dtype)
        self._step_index = k + 1
        return x_next.to(dtype)


class DPMSolverSampler(Sampler):
    """DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++", Algorithm 2: 2M), data-prediction form.

    In the variance-preserving x_t = α_t x₀ + σ_t ε, with λ = log(α/σ) (half the log-SNR) and
    h = λ_{i+1} − λ_i, the ODE is solved exactly for its linear part and the x̂₀ term is extrapolated:

        first order (= DDIM):  x_{i+1} = (σ_{i+1}/σ_i) x_i − α_{i+1} (e^{−h} − 1) x̂₀_i
        2M:                    the same with x̂₀_i replaced by D = x̂₀_i + (x̂₀_i − x̂₀_{i−1}) / (2r),
                               r = (λ_i − λ_{i−1}) / h.

    As diffusers' DPMSolverMultistepScheduler with its defaults (algorithm_type="dpmsolver++",
    solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero"): the first step is
    first order (no history yet), and so is the last, which lands on σ = 0, i.e. x = x̂₀.

    ``use_lu_lambdas=True`` spaces the steps uniformly in λ (Lu et al. 2022, "DPM-Solver", §3.3: the step size h
    is then the same at every step, which is what the solver's error bound assumes) between the training
    table's ends, as diffusers' ``use_lu_lambdas``: σ_i exact, the model called at the rounded timestep of each.
    """

    name = "dpm++"

    @_positional_options_deprecated("prediction_type", "solver_order")
    def __init__(self, schedule: NoiseSchedule, *, prediction_type: str = "epsilon", solver_order: int = 2,
                 use_lu_lambdas: bool = False):
        super().__init__(schedule, prediction_type=prediction_type)
        if solver_order not in (1, 2):
            raise ValueError(f"solver_order must be 1 or 2, got {solver_order!r}")
        self.solver_order, self.use_lu_lambdas = solver_order, bool(use_lu_lambdas)
        self._previous_x0 = None

    def _make_timesteps(self, n, spacing, steps_offset):
        T = self.num_train_timesteps
        if self.use_lu_lambdas:  # λ = −log σ (σ-space) evenly spaced from the noisiest training step to the cleanest
            table = sigma_table(self.schedule)  # [T]
            sigmas = np.exp(np.linspace(np.log(table[-1]), np.log(table[0]), n))  # [n] float64
            self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))  # [n + 1]
            self.timesteps = torch.from_numpy(np.round(sigma_to_timestep(sigmas, table)).astype(np.int64))
            self._previous_x0 = None
            return
        if spacing == "trailing":
            timesteps = spaced_timesteps(T, n, spacing, steps_offset)
        else:  # diffusers spaces N + 1 points and drops the last (t = 0 or the offset)
            timesteps = np.round(spaced_timesteps(T, n + 1, spacing, steps_offset))[:-1]
        _check_spaced(timesteps, T, n, spacing)
        table = sigma_table(self.schedule)
        sigmas = np.interp(timesteps, np.arange(T), table)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))  # [n + 1], σ = √((1−ᾱ)/ᾱ)
        self.timesteps = torch.from_numpy(timesteps.astype(np.int64))
        self._previous_x0 = None

    @staticmethod
    def _alpha_sigma(sigma):
        """(α_t, σ_t) = (1/√(1 + σ²), σ/√(1 + σ²)) from the σ-space noise level σ."""
        alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
        return alpha_t, sigma * alpha_t

    def _levels(self, i: int):
        """(α, σ, λ = log α − log σ) at entry i of ``sigmas``; λ = +∞ at the final σ = 0."""
        alpha, sigma = self._alpha_sigma(self.sigmas[i])
        return alpha, sigma, torch.log(alpha) - torch.log(sigma)

    def add_noise(self, x0, noise, t):
        """α_t x₀ + σ_t ε, for a ``t`` in ``timesteps`` (uses the capped ᾱ on zero-terminal-SNR schedules)."""
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[int(self._matches(t)[0])])
        return alpha_t.to(x0.dtype) * x0 + sigma_t.to(x0.dtype) * noise

    def step(self, model_output, t, x, generator=None):
        """One DPM-Solver++ step from t_i to t_{i+1}. ``generator`` is unused (the solver is deterministic)."""
        model_output, x, dtype = self._check_step(model_output, x)
        i = self._eval_index(t)
        alpha_s, sigma_s, lambda_s = self._levels(i)
        x0, _ = convert_prediction_alpha_sigma(model_output, alpha_s, sigma_s, x, self.prediction_type)
        self.last_x0 = x0.to(dtype)

        alpha_t, sigma_t, lambda_t = self._levels(i + 1)
        h = lambda_t - lambda_s
        x0_coef = alpha_t * (torch.exp(-h) - 1.0)
        x_next = (sigma_t / sigma_s) * x - x0_coef * x0  # first order
        is_last = i == len(self.timesteps) - 1
        if self.solver_order == 2 and self._previous_x0 is not None and not is_last:
            lambda_r = self._levels(i - 1)[2]
            r = (lambda_s - lambda_r) / h
            d1 = (1.0 / r) * (x0 - self._previous_x0)
            x_next = x_next - 0.5 * x0_coef * d1  # 2M: x̂₀ extrapolated in λ
        self._previous_x0 = x0
        self._step_index = i + 1
        return x_next.to(dtype)

    def _config(self):
        return f"{super()._config()}, solver_order={self.solver_order}" + (", use_lu_lambdas=True" if self.use_lu_lambdas else "")


_SAMPLERS = {"ddpm": DDPMSampler, "ddim": DDIMSampler, "euler": EulerSampler, "heun": HeunSampler, "dpm++": DPMSolverSampler}


def get_sampler(name: str, schedule: NoiseSchedule, **kwargs) -> Sampler:
    """Build a sampler by name: ``"ddpm"``, ``"ddim"``, ``"euler"``, ``"heun"`` or ``"dpm++"``; keyword
    arguments go to its constructor (e.g. ``get_sampler("ddim", schedule, eta=0.5)``)."""
    key = name.lower() if isinstance(name, str) else name
    if key not in _SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLER_NAMES)}")
    return _SAMPLERS[key](schedule, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Guidance and the sampling loop
# ---------------------------------------------------------------------------------------------------
@_keywords_renamed(pred_uncond="eps_uncond", pred_cond="eps_cond")
def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6, written with w = scale):

        ε̃ = ε_uncond + w (ε_cond − ε_uncond)

    w = 1 is the conditional model, w = 0 the unconditional one, w > 1 pushes further along the
    direction the condition adds. ``rescale`` = φ ∈ [0, 1] is the guidance rescale of Lin et al. 2023
    (§3.4, eqs. 15–17): scale ε̃ to the standard deviation of ε_cond (per sample, over all other
    dimensions) and blend, ε = φ · ε̃ std(ε_cond)/std(ε̃) + (1 − φ) ε̃, which counters the
    over-exposure that large w causes with zero-terminal-SNR schedules. Same as diffusers'
    ``rescale_noise_cfg``. The two predictions may be v or x₀ predictions as well: guidance is linear.
    """
    if eps_uncond.shape != eps_cond.shape:
        raise ValueError(f"eps_uncond {tuple(eps_uncond.shape)} and eps_cond {tuple(eps_cond.shape)} must have the same shape")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0):
        raise ValueError(f"guidance scale must be a number ≥ 0 (1 = no guidance), got {scale!r}")
    if not (isinstance(rescale, (int, float)) and 0 <= rescale <= 1):
        raise ValueError(f"rescale must be a number in [0, 1], got {rescale!r}")
    guided = eps_uncond + scale * (eps_cond - eps_uncond)
    if rescale > 0:
        dims = list(range(1, guided.dim()))
        std_cond = eps_cond.std(dim=dims, keepdim=True)  # [B, 1, ...]
        std_guided = guided.std(dim=dims, keepdim=True)
        guided = rescale * (guided * (std_cond / std_guided)) + (1 - rescale) * guided
    return guided


ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    sampler: Sampler,
    shape: Sequence[int],
    num_inference_steps: int,
    generator: torch.Generator | list[torch.Generator] | None = None,
    progress: bool = True,
    callback: Callable | None = None,
    *,
    spacing: str | None = None,
    steps_offset: int = 0,
    noise: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
    strength: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Run ``sampler`` with ``model_fn`` from noise to a sample of shape ``shape``.

    ``model_fn(x_t, t)`` gets the scaled model input and the timestep ``t`` (a 0-dim tensor taken from
    ``sampler.timesteps``: integer for DDPM/DDIM/DPM++, float and possibly fractional for Euler/Heun)
    and returns the prediction (ε, v or x₀, as ``sampler.prediction_type`` says). The loop is
    diffusers'::

        sampler.set_timesteps(num_inference_steps, spacing, steps_offset)
        x = noise * sampler.init_noise_sigma                 # noise ~ N(0, I), drawn from generator
        for i, t in enumerate(sampler.timesteps):
            x = sampler.step(model_fn(sampler.scale_model_input(x, t), t), t, x, generator)

    ``callback(i, t, x, x0_pred)``, if given, is called after every step with the step's index ``i`` in
    ``sampler.timesteps``, its timestep ``t``, the new state ``x`` (the next x_t; for Euler and Heun the
    σ-space x = x₀ + σε, so divide by √(1 + σ²) for x_t) and the x₀ predicted at this step. If it
    returns a tensor, that replaces ``x`` (inpainting uses this to keep the known region).

    Image-to-image (SDEdit, Meng et al. 2022): pass clean ``x0`` and ``strength`` ∈ [0, 1]; the loop
    noises x0 to the timestep ``strength`` of the way up the schedule (``sampler.add_noise``) and
    runs only the steps from there, as diffusers' img2img pipelines do. ``strength`` 0 returns x0.

    ``dtype`` is the dtype of the state x and of the result. Noise not given is drawn from ``generator`` in
    float32 (float64 for float64) and then cast to ``dtype``, so one seed starts every dtype from the same noise;
    each step computes in at least float32 (see the module's conventions).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be a tuple of positive sizes such as (B, C, H, W), got {shape}")
    if not (isinstance(strength, (int, float)) and 0 <= strength <= 1):
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
    if noise is not None and tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
    if x0 is not None and tuple(x0.shape) != shape:
        raise ValueError(f"x0 must have shape {shape}, got {tuple(x0.shape)}")
    if device is None:
        device = noise.device if noise is not None else (x0.device if x0 is not None else "cpu")
    device = torch.device(device)

    objective = getattr(getattr(model_fn, "config", None), "prediction_type", None)  # a network knows its objective
    if objective is not None and (objective == "flow") != (sampler.prediction_type == "flow"):
        trained = "rectified flow" if objective == "flow" else f"diffusion (prediction_type {objective!r})"
        raise ValueError(f"the model was trained with {trained}, and {type(sampler).__name__} reads "
                         f"{'flow velocities' if sampler.prediction_type == 'flow' else 'diffusion predictions'}; "
                         "sample a flow model with sdlearn.flow's samplers and a diffusion model with these")
    # spacing None: the sampler's own default ("leading" for these, "linspace" for the flow samplers)
    sampler.set_timesteps(num_inference_steps, **({} if spacing is None else {"spacing": spacing}), steps_offset=steps_offset)
    if noise is None:
        noise = _randn(shape, generator, device, _compute_dtype(dtype))
    noise = noise.to(device=device, dtype=dtype)

    start = 0
    if x0 is None:
        x = noise * sampler.init_noise_sigma
    else:
        steps_run = min(int(num_inference_steps * strength), num_inference_steps)
        if steps_run == 0:
            return x0.to(device=device, dtype=dtype)
        start = (num_inference_steps - steps_run) * sampler.order
        x = sampler.add_noise(x0.to(device=device, dtype=dtype), noise, sampler.timesteps[start])

    timesteps = sampler.timesteps[start:]
    for j, t in enumerate(tqdm(timesteps, desc=sampler.name, disable=not progress, leave=False)):
        model_input = sampler.scale_model_input(x, t)
        model_output = model_fn(model_input, t)
        x = sampler.step(model_output, t, x, generator=generator)
        if callback is not None:
            replaced = callback(start + j, t, x, sampler.last_x0)
            if replaced is not None:
                x = replaced
    return x


# ---------------------------------------------------------------------------------------------------
# An exact model, to test and compare samplers before any network is trained
# ---------------------------------------------------------------------------------------------------
def alpha_bar_at(schedule: NoiseSchedule, t) -> torch.Tensor:
    """ᾱ at timesteps ``t`` (float64, shape of ``t``); fractional t interpolate σ linearly, as diffusers'
    Euler/Heun do when they place a step between training timesteps."""
    t = torch.as_tensor(t, dtype=torch.float64).cpu()
    T = schedule.num_train_timesteps
    if t.numel() and (t.min() < 0 or t.max() > T - 1):
        raise ValueError(f"timesteps must lie in [0, {T - 1}], got values from {t.min().item()} to {t.max().item()}")
    alphas_cumprod = schedule.alphas_cumprod.double()
    sigmas = torch.from_numpy(sigma_table(schedule)).double()
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=T - 1)
    w = t - lo
    sigma = sigmas[lo] + w * (sigmas[hi] - sigmas[lo])
    return torch.where(w == 0, alphas_cumprod[lo], 1 / (1 + sigma**2))


class GaussianDataModel:
    """The exact denoiser when the data are x₀ ~ N(μ, s² I): a model_fn with no training.

    Then x_t = √ᾱ x₀ + √(1−ᾱ) ε is Gaussian too, x_t ~ N(√ᾱ μ, (ᾱ s² + 1 − ᾱ) I), and the best
    predictions (posterior means) are, with r = x_t − √ᾱ μ and v_t = ᾱ s² + 1 − ᾱ,

        E[ε | x_t]  = √(1 − ᾱ) r / v_t,
        E[x₀ | x_t] = μ + √ᾱ s² r / v_t,
        E[v | x_t]  = √ᾱ E[ε | x_t] − √(1 − ᾱ) E[x₀ | x_t].

    A perfect sampler fed these turns N(0, I) noise into N(μ, s² I) samples, so the gap between the
    samples' mean/std and (μ, s) measures the sampler's own error. ``mean`` and ``std`` may be floats
    or tensors that broadcast against a sample (e.g. per channel, shape [C, 1, 1]).

    >>> model = GaussianDataModel(schedule, mean=0.5, std=0.3)
    >>> x = sample(model, EulerSampler(schedule), (4096, 1), 50, progress=False)   # ≈ N(0.5, 0.3²)
    """

    @_positional_options_deprecated("prediction_type")
    def __init__(self, schedule: NoiseSchedule, mean: float | torch.Tensor = 0.0, std: float | torch.Tensor = 1.0, *,
                 prediction_type: str = "epsilon"):
        check_prediction_type(prediction_type)
        self.schedule = schedule
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.std = torch.as_tensor(std, dtype=torch.float64)
        if (self.std <= 0).any():
            raise ValueError("std must be positive")
        self.prediction_type = prediction_type

    def _coefficients(self, x_t: torch.Tensor, t):
        a = alpha_bar_at(self.schedule, t)
        a = a.reshape(a.shape + (1,) * (x_t.dim() - a.dim())).to(x_t.device)  # [B, 1, ...] or [1, ..., 1]
        mean, std = self.mean.to(x_t.device), self.std.to(x_t.device)
        residual = x_t.double() - a.sqrt() * mean
        var_t = a * std**2 + 1 - a
        return a, residual, var_t, mean, std

    def eps(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """E[ε | x_t] = √(1 − ᾱ) (x_t − √ᾱ μ) / (ᾱ s² + 1 − ᾱ)."""
        a, residual, var_t, _, _ = self._coefficients(x_t, t)
        return ((1 - a).sqrt() * residual / var_t).to(x_t.dtype)

    def x0(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """E[x₀ | x_t] = μ + √ᾱ s² (x_t − √ᾱ μ) / (ᾱ s² + 1 − ᾱ)."""
        a, residual, var_t, mean, std = self._coefficients(x_t, t)
        return (mean + a.sqrt() * std**2 * residual / var_t).to(x_t.dtype)

    def prediction(self, x_t: torch.Tensor, t, prediction_type: str | None = None) -> torch.Tensor:
        """The exact ε, v or x₀ prediction (default: this model's ``prediction_type``)."""
        prediction_type = prediction_type or self.prediction_type
        check_prediction_type(prediction_type)
        if prediction_type == "epsilon":
            return self.eps(x_t, t)
        if prediction_type == "sample":
            return self.x0(x_t, t)
        a, residual, var_t, mean, std = self._coefficients(x_t, t)
        eps = (1 - a).sqrt() * residual / var_t
        x0 = mean + a.sqrt() * std**2 * residual / var_t
        return (a.sqrt() * eps - (1 - a).sqrt() * x0).to(x_t.dtype)

    def __call__(self, x_t: torch.Tensor, t) -> torch.Tensor:
        return self.prediction(x_t, t)

    def sample_data(self, shape: Sequence[int], generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw true data x₀ ~ N(μ, s² I) (float32), to compare samplers' outputs against."""
        z = torch.randn(tuple(shape), generator=generator, dtype=torch.float64)
        return (self.mean + self.std * z).float()

    def __repr__(self) -> str:
        return f"GaussianDataModel(mean={self.mean.tolist()}, std={self.std.tolist()}, prediction_type={self.prediction_type!r})"
