"""Flow matching, and one view of every sampler: rectified flow (SD3), EDM's σ-parameterisation, and exact models.

**Rectified flow** (Liu et al. 2023; Lipman et al. 2023; Esser et al. 2024, the objective of Stable Diffusion 3 and
FLUX) joins each image x₀ to its noise ε by a straight line, x_σ = (1 − σ) x₀ + σ ε with σ ∈ [0, 1]
(:func:`sdlearn.schedules.flow_interpolate`), and trains a network v_θ(x_σ, σ) to predict the velocity ε − x₀ along
it. Sampling integrates dx/dσ = v_θ(x, σ) from σ = 1 (noise) down to σ = 0. A flow model is a DiT (or U-Net) whose
config says ``prediction_type="flow"``; its timestep input is σ·T.

- :class:`FlowMatchEulerSampler`: Euler on that ODE, x_{i+1} = x_i + (σ_{i+1} − σ_i) v; equal to diffusers'
  ``FlowMatchEulerDiscreteScheduler`` (the SD3 scheduler) for the same ``shift`` and steps.
- :class:`FlowMatchHeunSampler`: Heun's second-order method on the same ODE (diffusers'
  ``FlowMatchHeunDiscreteScheduler``).

Both have the interface of :mod:`sdlearn.samplers` (``set_timesteps``, ``timesteps``, ``init_noise_sigma``,
``scale_model_input``, ``step``), so :func:`sdlearn.samplers.sample` runs them, and both refuse to be mixed up with
a diffusion model: a flow sampler reads only velocities, a diffusion sampler never reads one.

**EDM** (Karras et al. 2022) writes every diffusion model as a denoiser D(x; σ) of x = x₀ + σ ε, σ ∈ [0, ∞), and
builds it from a raw network F by preconditioning, D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x; c_noise(σ))
(:func:`edm_preconditioning`; :func:`vp_preconditioning` gives the coefficients that turn a trained ε-network
into such a D, Table 1's "VP" column); :class:`EDMDenoiser` does it and :func:`edm_heun_sample` samples it
(Algorithm 1). :class:`GaussianMixtureModel` is exact — its ε, x₀ and velocity are posterior means in closed
form — so a sampler's error can be measured against the true ODE's solution, with no network.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from sdlearn.samplers import Sampler, alpha_bar_at, karras_sigmas, sigma_table, sigma_to_timestep
from sdlearn.schedules import FLOW, NoiseSchedule, shift_sigmas


# ---------------------------------------------------------------------------------------------------
# Samplers of a flow model
# ---------------------------------------------------------------------------------------------------
class FlowMatchSampler(Sampler):
    """What the flow samplers share: the noise levels σ (from 1 down to the smallest training σ, then a final 0),
    their timesteps σ·T, and the state x_σ itself (no rescaling: the path keeps x_σ's scale near 1).

    ``shift`` is SD3's resolution shift (:func:`sdlearn.schedules.shift_sigmas`), applied as diffusers applies it:
    to the training table of σ = t/T (t = 1…T), whose ends bound the inference σ, and again to the inference σ.
    """

    prediction_type = FLOW

    def __init__(self, num_train_timesteps: int = 1000, *, shift: float = 1.0):
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be a whole number ≥ 2, got {num_train_timesteps!r}")
        shift_sigmas(0.5, shift)  # checks shift > 0
        self.schedule = None  # a flow has no β schedule: the path is fixed, only its sampling σ are chosen
        self.num_train_timesteps, self.shift = num_train_timesteps, float(shift)
        train = shift_sigmas(np.arange(num_train_timesteps, 0, -1, dtype=np.float32) / num_train_timesteps, self.shift)
        self.sigma_max, self.sigma_min = float(train[0]), float(train[-1])  # 1 and the shifted 1/T
        self.timesteps: torch.Tensor | None = None
        self.num_inference_steps: int | None = None
        self.spacing: str | None = None
        self.last_x0: torch.Tensor | None = None

    def set_timesteps(self, num_inference_steps: int, spacing: str = "linspace", steps_offset: int = 0) -> None:
        """σ_i evenly spaced from σ_max = 1 to σ_min (then shifted): diffusers' only spacing for flows, so
        ``spacing`` must be "linspace" and ``steps_offset`` 0 (the arguments exist for the common interface)."""
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a whole number ≥ 1, got {num_inference_steps!r}")
        if spacing != "linspace" or steps_offset != 0:
            raise ValueError(f"a flow sampler spaces σ evenly (spacing 'linspace', steps_offset 0); got spacing "
                             f"{spacing!r}, steps_offset {steps_offset!r}")
        T, n = self.num_train_timesteps, int(num_inference_steps)
        sigmas = np.linspace(self.sigma_max * T, self.sigma_min * T, n) / T  # float64, as diffusers' np.linspace
        sigmas = torch.from_numpy(shift_sigmas(sigmas, self.shift)).float()  # [n]
        self.num_inference_steps, self.spacing, self.steps_offset = n, spacing, 0
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])  # [n + 1]: the last step lands on the data, σ = 0
        self._set_flow_timesteps(sigmas * T)
        self._step_index = None
        self.last_x0 = None

    def _set_flow_timesteps(self, timesteps: torch.Tensor) -> None:
        self.timesteps = timesteps

    @property
    def init_noise_sigma(self) -> float:
        """1: at σ = 1 the path is pure noise, x₁ = ε."""
        return 1.0

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """x_σ = (1 − σ) x₀ + σ ε at the σ of timestep ``t`` (one of ``timesteps``): diffusers' ``scale_noise``."""
        sigma = self.sigmas[int(self._matches(t)[0])].to(x0.dtype)
        return (1 - sigma) * x0 + sigma * noise

    def _read_velocity(self, model_output, x, sigma, dtype) -> torch.Tensor:
        """Keep x̂₀ = x − σ v (the path's start, read from the velocity) in ``last_x0``; → v."""
        self.last_x0 = (x - sigma * model_output).to(dtype)
        return model_output

    def _config(self) -> str:
        return f"shift={self.shift:g}, num_train_timesteps={self.num_train_timesteps}"

    def __repr__(self) -> str:
        steps = f", {self.num_inference_steps} steps" if self.timesteps is not None else ""
        return f"{type(self).__name__}({self._config()}{steps})"


class FlowMatchEulerSampler(FlowMatchSampler):
    """Euler's method on the flow ODE dx/dσ = v(x, σ) (Esser et al. 2024; diffusers'
    ``FlowMatchEulerDiscreteScheduler``): x_{i+1} = x_i + (σ_{i+1} − σ_i) v_θ(x_i, σ_i T), one model call a step.
    On a straight path, v is constant along each sample's line, so even one Euler step would be exact if the
    model knew which line x lies on; what it predicts is the average over the lines through x (the marginal
    velocity), and the curvature of those averaged paths is what more steps resolve."""

    name = "flow euler"

    def step(self, model_output, t, x, generator=None):
        """One Euler step from σ_i to σ_{i+1}. ``generator`` is unused (the step is deterministic)."""
        model_output, x, dtype = self._check_step(model_output, x)
        i = self._eval_index(t)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        velocity = self._read_velocity(model_output, x, sigma, dtype)
        self._step_index = i + 1
        return (x + (sigma_next - sigma) * velocity).to(dtype)


class FlowMatchHeunSampler(FlowMatchSampler):
    """Heun's method on the flow ODE (diffusers' ``FlowMatchHeunDiscreteScheduler``): an Euler proposal
    x̃ = x_i + (σ_{i+1} − σ_i) v_i, then x_{i+1} = x_i + (σ_{i+1} − σ_i)(v_i + ṽ)/2 with ṽ = v_θ(x̃, σ_{i+1}); the last
    step, to σ = 0, is plain Euler. 2N − 1 model calls: ``timesteps`` lists each inner timestep twice, and
    ``step`` is called once per call (the first of a pair returns x̃, the second x_{i+1})."""

    name = "flow heun"
    order = 2

    def _set_flow_timesteps(self, timesteps):
        self.timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])  # [2n − 1]
        self._first_half = None

    def add_noise(self, x0, noise, t):
        """x_σ = (1 − σ) x₀ + σ ε at timestep ``t``: entry k of ``timesteps`` is at σ_{(k+1)//2} (inner ones twice)."""
        sigma = self.sigmas[(int(self._matches(t)[0]) + 1) // 2].to(x0.dtype)
        return (1 - sigma) * x0 + sigma * noise

    def step(self, model_output, t, x, generator=None):
        """Half of a Heun step (see the class docstring). ``generator`` is unused."""
        model_output, x, dtype = self._check_step(model_output, x)
        k = self._eval_index(t)
        i = (k + 1) // 2  # the σ this evaluation is at: k = 0 at σ_0, then k = 2i − 1 and k = 2i at σ_i
        velocity = self._read_velocity(model_output, x, self.sigmas[i], dtype)
        if k % 2 == 0:  # an Euler proposal from σ_i to σ_{i+1}
            dt = self.sigmas[i + 1] - self.sigmas[i]
            self._first_half = (x, velocity, dt)
            x_next = x + dt * velocity
        else:  # the correction, with the velocity at the proposal
            if getattr(self, "_first_half", None) is None:
                raise ValueError("Heun's correction step was called without its Euler step; step through "
                                 "sampler.timesteps in order")
            x_start, first_velocity, dt = self._first_half
            x_next = x_start + dt * (first_velocity + velocity) / 2
            self._first_half = None
        self._step_index = k + 1
        return x_next.to(dtype)


FLOW_SAMPLERS = {"euler": FlowMatchEulerSampler, "heun": FlowMatchHeunSampler}


def get_flow_sampler(name: str, num_train_timesteps: int = 1000, **kwargs) -> FlowMatchSampler:
    """A flow sampler by name: ``"euler"`` or ``"heun"``; keyword arguments (``shift``) go to its constructor."""
    key = name.lower() if isinstance(name, str) else name
    if key not in FLOW_SAMPLERS:
        raise ValueError(f"a flow model is sampled by {' or '.join(map(repr, FLOW_SAMPLERS))} (FlowMatchEulerSampler, "
                         f"FlowMatchHeunSampler); got {name!r}, a sampler for diffusion (ε, v or x₀) models")
    return FLOW_SAMPLERS[key](num_train_timesteps, **kwargs)


def check_sampler_fits(sampler, prediction_type: str) -> None:
    """Raise ``ValueError`` when ``sampler`` cannot read a model trained to predict ``prediction_type``: a flow
    sampler needs a flow model, a diffusion sampler a diffusion model (ε, v or x₀). The message names the
    objective the model was trained with."""
    flow_sampler = isinstance(sampler, FlowMatchSampler)
    if flow_sampler and prediction_type != FLOW:
        raise ValueError(f"{type(sampler).__name__} integrates a rectified-flow velocity, but this model was trained "
                         f"with the diffusion objective (prediction_type {prediction_type!r}); use a diffusion sampler "
                         "such as 'dpm++', 'ddim', 'euler' or 'heun'")
    if not flow_sampler and prediction_type == FLOW:
        raise ValueError(f"{type(sampler).__name__} reads diffusion predictions (ε, v or x₀), but this model was "
                         "trained with the rectified-flow objective (prediction_type 'flow'); use "
                         "FlowMatchEulerSampler or FlowMatchHeunSampler ('euler' or 'heun')")


# ---------------------------------------------------------------------------------------------------
# EDM: the σ-parameterisation, its preconditioning, and Heun in σ (Karras et al. 2022)
# ---------------------------------------------------------------------------------------------------
def edm_preconditioning(sigma, sigma_data: float = 0.5):
    """EDM's preconditioning (Karras et al. 2022, Table 1 and Appendix B.6) → ``(c_skip, c_out, c_in, c_noise)``:

        c_in = 1/√(σ² + σ_d²)            the network's input has unit variance at every σ;
        c_skip = σ_d²/(σ² + σ_d²)        the skip that makes the network's target F* = (x₀ − c_skip x)/c_out
        c_out = σ σ_d/√(σ² + σ_d²)       have unit variance, with c_skip chosen to make c_out smallest;
        c_noise = ¼ ln σ.

    D(x; σ) = c_skip x + c_out F(c_in x; c_noise). ``sigma``: a number or tensor (> 0)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / total.sqrt(), 1 / total.sqrt(), sigma.log() / 4


def vp_preconditioning(sigma, schedule: NoiseSchedule):
    """The coefficients that make a trained ε-network (on ``schedule``'s VP path) an EDM denoiser D(x; σ) of
    x = x₀ + σ ε (Karras et al. 2022, Table 1, "VP"): x = x_t/√ᾱ, so x_t = x/√(σ² + 1) and
    x̂₀ = x − σ ε̂ →  c_skip = 1, c_out = −σ, c_in = 1/√(σ² + 1), c_noise = t(σ), the (fractional) training
    timestep whose σ_t = √((1 − ᾱ_t)/ᾱ_t) is σ. → ``(c_skip, c_out, c_in, c_noise)`` (float64 tensors)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    c_noise = torch.from_numpy(sigma_to_timestep(np.atleast_1d(sigma.numpy()), sigma_table(schedule))).reshape(sigma.shape)
    return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt(), c_noise


class EDMDenoiser:
    """An ε-network seen through EDM: ``D(x, sigma)`` = c_skip x + c_out F(c_in x, c_noise) with
    :func:`vp_preconditioning`'s coefficients, F being ``model_fn(x_t, t)`` (an ε-prediction, e.g. a pipeline's
    guided model function or an exact model). It is the same network, only reparameterised: x̂₀ = x − σ ε̂(x_t, t)."""

    def __init__(self, model_fn: Callable, schedule: NoiseSchedule):
        self.model_fn, self.schedule = model_fn, schedule
        table = sigma_table(schedule)
        self.sigma_min, self.sigma_max = float(table[0]), float(table[-1])

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        c_skip, c_out, c_in, c_noise = (float(c) for c in vp_preconditioning(sigma, self.schedule))
        t = torch.tensor(min(c_noise, self.schedule.num_train_timesteps - 1), dtype=torch.float32)
        return c_skip * x + c_out * self.model_fn((c_in * x).to(x.dtype), t).to(x.dtype)


@torch.no_grad()
def edm_heun_sample(denoise: Callable, sigmas: Sequence[float] | torch.Tensor, noise: torch.Tensor,
                    heun: bool = True) -> tuple[torch.Tensor, int]:
    """EDM's deterministic sampler (Karras et al. 2022, Algorithm 1, no churn): x₀ = σ_0 ε, then for each i

        d_i = (x_i − D(x_i; σ_i))/σ_i,  x_{i+1} = x_i + (σ_{i+1} − σ_i) d_i,  corrected with the slope at x_{i+1}
        (Heun) unless σ_{i+1} = 0,

    along the given ``sigmas`` (descending; a final 0 is appended when missing). ``heun=False`` is plain Euler —
    which on this ODE is exactly DDIM (Song et al. 2021, §4.3). → ``(x at σ = 0, number of calls of D)``."""
    sigmas = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    if len(sigmas) < 1 or any(b >= a for a, b in zip(sigmas, sigmas[1:])) or sigmas[-1] < 0:
        raise ValueError("sigmas must be a descending list of noise levels ≥ 0")
    if sigmas[-1] != 0:
        sigmas.append(0.0)
    x, calls = noise.double() * sigmas[0], 0
    for sigma, sigma_next in zip(sigmas, sigmas[1:]):
        slope = (x - denoise(x, sigma).double()) / sigma
        calls += 1
        x_next = x + (sigma_next - sigma) * slope
        if heun and sigma_next > 0:
            slope_next = (x_next - denoise(x_next, sigma_next).double()) / sigma_next
            calls += 1
            x_next = x + (sigma_next - sigma) * (slope + slope_next) / 2
        x = x_next
    return x.to(noise.dtype), calls


def edm_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al.'s ρ-schedule (eq. 5) as a tensor ``[n]``: σ_i = (σ_max^{1/ρ} + i/(n−1)(σ_min^{1/ρ} −
    σ_max^{1/ρ}))^ρ, evenly spaced in σ^{1/ρ}. ρ = 1 is uniform in σ, ρ → ∞ uniform in log σ; ρ = 7 spends more
    steps at small σ, where Heun's truncation error per step (∝ the ODE's curvature) is largest."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min!r}, {sigma_max!r}")
    if n == 1:
        return torch.tensor([float(sigma_max)], dtype=torch.float64)
    return torch.from_numpy(karras_sigmas(sigma_min, sigma_max, n, rho))


# ---------------------------------------------------------------------------------------------------
# An exact model: data from a Gaussian mixture, for both paths
# ---------------------------------------------------------------------------------------------------
class GaussianMixtureModel:
    """Data x₀ ~ Σ_k π_k N(μ_k, s_k² I) in d dimensions, and the exact predictions any path x = a x₀ + b ε implies.

    Given component k, x ~ N(a μ_k, (a² s_k² + b²) I), so the posterior over components is a softmax of those
    Gaussian log-densities and E[x₀ | x] = Σ_k p(k | x) (μ_k + a s_k² (x − a μ_k)/(a² s_k² + b²)). From it:

    - VP diffusion (a = √ᾱ_t, b = √(1 − ᾱ_t)): E[ε | x_t] = (x_t − a E[x₀ | x_t])/b — :meth:`eps`, a ``model_fn``;
    - rectified flow (a = 1 − σ, b = σ): the marginal velocity E[ε − x₀ | x] = (x − E[x₀ | x])/σ — :meth:`velocity`,
      the field flow matching's regression converges to (Lipman et al. 2023, Thm. 2).

    ``means`` ``[K, d]``, ``stds`` ``[K]``, ``weights`` ``[K]`` (normalised here). All maths in float64.
    """

    def __init__(self, means, stds, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.dim() != 2:
            raise ValueError(f"means must be [K, d], got shape {list(self.means.shape)}")
        K = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(K).clone()
        if (self.stds <= 0).any():
            raise ValueError("stds must be positive")
        weights = torch.ones(K, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (K,) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be K = {K} non-negative numbers, not all 0")
        self.weights = weights / weights.sum()

    def x0(self, x: torch.Tensor, a, b) -> torch.Tensor:
        """E[x₀ | x] for x = a x₀ + b ε (``a``, ``b``: numbers or ``[B]`` tensors); ``x`` ``[B, d]``."""
        x = x.double()
        a = torch.as_tensor(a, dtype=torch.float64).reshape(-1, 1, 1)  # [B or 1, 1, 1]
        b = torch.as_tensor(b, dtype=torch.float64).reshape(-1, 1, 1)
        mu, s2 = self.means[None], self.stds[None, :, None] ** 2  # [1, K, d], [1, K, 1]
        var = a**2 * s2 + b**2  # [B, K, 1]
        residual = x[:, None, :] - a * mu  # [B, K, d]
        d = x.shape[1]
        log_p = self.weights.log()[None] - 0.5 * ((residual**2).sum(-1) / var[..., 0] + d * var[..., 0].log())  # [B, K]
        posterior = torch.softmax(log_p, dim=1)[..., None]  # [B, K, 1]
        return (posterior * (mu + a * s2 * residual / var)).sum(1)  # [B, d]

    def eps(self, x_t: torch.Tensor, t, schedule: NoiseSchedule) -> torch.Tensor:
        """E[ε | x_t] on ``schedule``'s VP path at timestep(s) ``t``; a fractional t interpolates σ between training
        steps (:func:`sdlearn.samplers.alpha_bar_at`, as the σ-space samplers place their steps)."""
        alpha_bar = alpha_bar_at(schedule, t)
        a, b = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        x0 = self.x0(x_t, a, b)
        return ((x_t.double() - a.reshape(-1, 1) * x0) / b.reshape(-1, 1)).to(x_t.dtype)

    def denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """EDM's ideal denoiser D(x; σ) = E[x₀ | x₀ + σ ε]."""
        return self.x0(x, 1.0, sigma).to(x.dtype)

    def velocity(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The marginal flow velocity E[ε − x₀ | x_σ] = (x − E[x₀ | x])/σ at σ ∈ (0, 1]."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
        return ((x.double() - self.x0(x, 1 - sigma, sigma)) / sigma).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws of x₀ ``[n, d]`` (float64)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn((n, self.means.shape[1]), generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * z

    def __repr__(self) -> str:
        return f"GaussianMixtureModel(K={self.means.shape[0]}, d={self.means.shape[1]})"


def flow_ode_reference(velocity: Callable, noise: torch.Tensor, steps: int = 2000) -> torch.Tensor:
    """A near-exact solution of dx/dσ = velocity(x, σ) from σ = 1 to 0 (classical RK4 on a uniform grid of
    ``steps``), to measure other solvers' error against."""
    x, h = noise.double(), -1.0 / steps
    for i in range(steps):
        s = 1.0 - i / steps
        k1 = velocity(x, s)
        k2 = velocity(x + h / 2 * k1, s + h / 2)
        k3 = velocity(x + h / 2 * k2, s + h / 2)
        s_end = max(s + h, 1e-12)
        k4 = velocity(x + h * k3, s_end)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


__all__ = [
    "FLOW_SAMPLERS", "EDMDenoiser", "FlowMatchEulerSampler", "FlowMatchHeunSampler", "FlowMatchSampler",
    "GaussianMixtureModel", "check_sampler_fits", "edm_heun_sample", "edm_preconditioning", "edm_sigmas",
    "flow_ode_reference", "get_flow_sampler", "vp_preconditioning",
]
