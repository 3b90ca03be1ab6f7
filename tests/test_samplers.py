"""Tests for sdlearn.samplers: parity with diffusers, the analytic Gaussian check, guidance, dtypes,
deprecated forms, bad input."""

import inspect
import warnings

import numpy as np
import pytest
import torch

from sdlearn import samplers as S
from sdlearn import schedules
from sdlearn.schedules import NoiseSchedule

# diffusers 0.42 calls np.array(tensor, copy=False)-style conversions that numpy 2 flags; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

SCHEDULE = NoiseSchedule.from_name("scaled_linear")
ZERO_SNR = NoiseSchedule.from_name("scaled_linear", zero_terminal_snr=True)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = (("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0))
SHAPE = (2, 4, 8, 8)

# (name, constructor kwargs): every sampler, and the options that change its arithmetic
CONFIGS = [
    ("ddpm", {"variance_type": "fixed_small"}),
    ("ddpm", {"variance_type": "fixed_large"}),
    ("ddpm", {"clip_sample": True}),
    ("ddim", {"eta": 0.0}),
    ("ddim", {"eta": 0.7}),
    ("ddim", {"set_alpha_to_one": False, "clip_sample": True}),
    ("euler", {}),
    ("euler", {"use_karras_sigmas": True}),
    ("heun", {}),
    ("dpm++", {}),
    ("dpm++", {"solver_order": 1}),
]


def toy_model(x, t):
    """A fixed smooth, non-linear stand-in for a denoiser (depends on t, so timesteps must agree too)."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return 0.8 * torch.sin(x + t / 250) + 0.3 * x


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


def diffusers_twin(diffusers, name, kwargs, prediction_type, spacing, steps_offset, zero_snr, rescale_flag=False):
    """The diffusers scheduler configured like our sampler, plus the extra kwargs its step takes.

    Zero terminal SNR: by default diffusers gets our rescaled betas and, for the σ-space schedulers, the
    cap ᾱ_{T−1} = 2⁻²⁴ that its ``rescale_betas_zero_snr`` applies; with ``rescale_flag`` it rescales
    the betas itself (equal to ours within 5e-7, a float rounding apart)."""
    config = dict(num_train_timesteps=1000, prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=steps_offset)
    if rescale_flag:
        config.update(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)
    else:
        config.update(trained_betas=(ZERO_SNR if zero_snr else SCHEDULE).betas.numpy())
    step_kwargs = {}
    if name == "ddpm":
        scheduler = diffusers.DDPMScheduler(variance_type=kwargs.get("variance_type", "fixed_small"),
                                            clip_sample=kwargs.get("clip_sample", False), **config)
    elif name == "ddim":
        scheduler = diffusers.DDIMScheduler(clip_sample=kwargs.get("clip_sample", False),
                                            set_alpha_to_one=kwargs.get("set_alpha_to_one", True), **config)
        step_kwargs["eta"] = kwargs.get("eta", 0.0)
    elif name == "euler":
        scheduler = diffusers.EulerDiscreteScheduler(use_karras_sigmas=kwargs.get("use_karras_sigmas", False), **config)
    elif name == "heun":
        with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
            warnings.simplefilter("ignore")  # its __init__ meets σ = ∞ at ᾱ = 0 before we cap it
            scheduler = diffusers.HeunDiscreteScheduler(**config)
    else:
        scheduler = diffusers.DPMSolverMultistepScheduler(solver_order=kwargs.get("solver_order", 2), **config)
    if zero_snr and not rescale_flag and name in ("euler", "heun", "dpm++"):
        scheduler.alphas_cumprod[-1] = 2**-24  # what rescale_betas_zero_snr=True does (HeunDiscrete lacks the flag)
    return scheduler, step_kwargs


def run_both(ours, theirs, step_kwargs, num_steps, spacing, steps_offset, seed=0, exact_timesteps=True):
    """Drive both with the same model and noise; return the per-evaluation states and x̂₀ of each."""
    ours.set_timesteps(num_steps, spacing=spacing, steps_offset=steps_offset)
    theirs.set_timesteps(num_steps)
    assert ours.timesteps.dtype == theirs.timesteps.dtype
    if exact_timesteps:
        assert torch.equal(ours.timesteps, theirs.timesteps)
    else:
        torch.testing.assert_close(ours.timesteps, theirs.timesteps, rtol=0, atol=1e-3)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    x_ours, x_theirs = noise * ours.init_noise_sigma, noise * theirs.init_noise_sigma
    g_ours, g_theirs = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
    if "generator" in theirs.step.__code__.co_varnames:
        step_kwargs = {**step_kwargs, "generator": g_theirs}
    trajectory = []
    for t in ours.timesteps:
        x_ours = ours.step(toy_model(ours.scale_model_input(x_ours, t), t), t, x_ours, generator=g_ours)
        out = theirs.step(toy_model(theirs.scale_model_input(x_theirs, t), t), t, x_theirs, **step_kwargs)
        x_theirs = out.prev_sample
        trajectory.append((x_ours, x_theirs, ours.last_x0, getattr(out, "pred_original_sample", None)))
    return trajectory


def assert_same_trajectory(trajectory):
    for i, (x_ours, x_theirs, x0_ours, x0_theirs) in enumerate(trajectory):
        assert torch.isfinite(x_ours).all()
        torch.testing.assert_close(x_ours, x_theirs, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"step {i}: {m}")
        if x0_theirs is not None:
            torch.testing.assert_close(x0_ours, x0_theirs, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"x0 at step {i}: {m}")


# ---------------------------------------------------------------------------------------------------
# Parity with diffusers
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("spacing,steps_offset", SPACINGS)
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=[f"{n}-{k}" for n, k in CONFIGS])
def test_trajectory_equals_diffusers(diffusers, name, kwargs, spacing, steps_offset, prediction_type):
    ours = S.get_sampler(name, SCHEDULE, prediction_type=prediction_type, **kwargs)
    theirs, step_kwargs = diffusers_twin(diffusers, name, kwargs, prediction_type, spacing, steps_offset, zero_snr=False)
    assert_same_trajectory(run_both(ours, theirs, step_kwargs, 12, spacing, steps_offset))


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=[f"{n}-{k}" for n, k in CONFIGS])
def test_zero_terminal_snr_trajectory_equals_diffusers(diffusers, name, kwargs, spacing, prediction_type):
    ours = S.get_sampler(name, ZERO_SNR, prediction_type=prediction_type, **kwargs)
    theirs, step_kwargs = diffusers_twin(diffusers, name, kwargs, prediction_type, spacing, 0, zero_snr=True)
    if name in ("ddpm", "ddim") and prediction_type == "epsilon" and spacing != "leading":
        # t = T-1 is visited, where ᾱ = 0 and ε says nothing about x₀: diffusers returns NaN, we refuse
        ours.set_timesteps(12, spacing=spacing)
        t = ours.timesteps[0]
        x = torch.randn(SHAPE)
        with pytest.raises(ValueError, match="v_prediction"):
            ours.step(toy_model(x, t), t, x)
        return
    assert_same_trajectory(run_both(ours, theirs, step_kwargs, 12, spacing, 0))


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("name,kwargs", [("ddpm", {}), ("ddim", {}), ("euler", {}), ("euler", {"use_karras_sigmas": True}),
                                         ("dpm++", {})])
def test_zero_terminal_snr_equals_diffusers_own_rescaling(diffusers, name, kwargs, spacing, prediction_type):
    ours = S.get_sampler(name, ZERO_SNR, prediction_type=prediction_type, **kwargs)
    theirs, step_kwargs = diffusers_twin(diffusers, name, kwargs, prediction_type, spacing, 0, zero_snr=True, rescale_flag=True)
    assert_same_trajectory(run_both(ours, theirs, step_kwargs, 12, spacing, 0, exact_timesteps=False))


@pytest.mark.parametrize("num_steps", [1, 2, 7, 25, 50])
@pytest.mark.parametrize("name", S.SAMPLER_NAMES)
def test_step_counts_equal_diffusers(diffusers, name, num_steps):
    ours = S.get_sampler(name, SCHEDULE)
    theirs, step_kwargs = diffusers_twin(diffusers, name, {}, "epsilon", "leading", 1, zero_snr=False)
    trajectory = run_both(ours, theirs, step_kwargs, num_steps, "leading", 1)
    assert len(trajectory) == num_steps * ours.order - (ours.order - 1)
    assert_same_trajectory(trajectory)


def test_schedules_and_dpm_defaults_match_diffusers(diffusers):
    # our zero-terminal-SNR schedule is diffusers' rescale up to float rounding (within 1e-6)
    ddpm = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)
    torch.testing.assert_close(ZERO_SNR.alphas_cumprod, ddpm.alphas_cumprod, rtol=0, atol=1e-6)
    # DPMSolverSampler is DPM-Solver++(2M) with diffusers' defaults; fail loudly if those change
    config = diffusers.DPMSolverMultistepScheduler().config
    assert (config.algorithm_type, config.solver_type, config.lower_order_final, config.final_sigmas_type) == (
        "dpmsolver++", "midpoint", True, "zero")


def test_per_sample_generators_match_diffusers(diffusers):
    ours = S.DDPMSampler(SCHEDULE)
    theirs = diffusers.DDPMScheduler(trained_betas=SCHEDULE.betas.numpy(), clip_sample=False)
    ours.set_timesteps(5)
    theirs.set_timesteps(5)
    x = torch.randn(SHAPE)
    t = ours.timesteps[0]
    ours_out = ours.step(toy_model(x, t), t, x, generator=[torch.Generator().manual_seed(s) for s in (3, 4)])
    theirs_out = theirs.step(toy_model(x, t), t, x, generator=[torch.Generator().manual_seed(s) for s in (3, 4)]).prev_sample
    torch.testing.assert_close(ours_out, theirs_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["ddpm", "euler", "dpm++"])
def test_add_noise_matches_diffusers(diffusers, name):
    ours = S.get_sampler(name, SCHEDULE)
    theirs, _ = diffusers_twin(diffusers, name, {}, "epsilon", "leading", 0, zero_snr=False)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    t = ours.timesteps[3]
    torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t.reshape(1)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", S.SAMPLER_NAMES)
def test_sample_loop_equals_a_diffusers_loop(diffusers, name):
    """sample() runs the same loop a diffusers pipeline runs: same noise in, same image out."""
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    ours = S.sample(toy_model, S.get_sampler(name, SCHEDULE), SHAPE, 10, generator=torch.Generator().manual_seed(8),
                    progress=False, noise=noise, spacing="trailing")
    scheduler, step_kwargs = diffusers_twin(diffusers, name, {}, "epsilon", "trailing", 0, zero_snr=False)
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(8)
    if "generator" in scheduler.step.__code__.co_varnames:
        step_kwargs["generator"] = generator
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(toy_model(scheduler.scale_model_input(x, t), t), t, x, **step_kwargs).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# The analytic check: data ~ N(μ, s²), exact model
# ---------------------------------------------------------------------------------------------------
MU, STD = 1.0, 0.5
ANALYTIC = [
    ("ddpm", {}), ("ddpm", {"variance_type": "fixed_large"}), ("ddim", {}), ("ddim", {"eta": 1.0}),
    ("euler", {}), ("euler", {"use_karras_sigmas": True}), ("heun", {}), ("dpm++", {}), ("dpm++", {"solver_order": 1}),
]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name,kwargs", ANALYTIC, ids=[f"{n}-{k}" for n, k in ANALYTIC])
def test_samples_of_a_gaussian_have_its_mean_and_std(name, kwargs, prediction_type):
    model = S.GaussianDataModel(SCHEDULE, MU, STD, prediction_type=prediction_type)
    sampler = S.get_sampler(name, SCHEDULE, prediction_type=prediction_type, **kwargs)
    x = S.sample(model, sampler, (4096,), 50, generator=torch.Generator().manual_seed(0), progress=False)
    # measured at 50 steps: |mean − μ| ≤ 0.04 (most of it the schedule's ᾱ_{T−1} > 0, not the sampler),
    # |std − s| ≤ 0.05 (DDPM's fixed_small variance under-disperses most)
    assert abs(x.mean().item() - MU) < 0.06
    assert abs(x.std().item() - STD) < 0.075


@pytest.mark.parametrize("name", S.SAMPLER_NAMES)
def test_zero_terminal_snr_removes_the_mean_bias(name):
    """With ᾱ_{T−1} = 0 the start is truly pure noise, so a v-prediction model gets μ right (Lin et al. 2023)."""
    model = S.GaussianDataModel(ZERO_SNR, MU, STD, prediction_type="v_prediction")
    sampler = S.get_sampler(name, ZERO_SNR, prediction_type="v_prediction")
    x = S.sample(model, sampler, (4096,), 50, generator=torch.Generator().manual_seed(0), progress=False, spacing="trailing")
    assert abs(x.mean().item() - MU) < 0.02
    assert abs(x.std().item() - STD) < 0.075


def exact_flow(sampler, noise):
    """Where the probability-flow ODE takes the start x_T for Gaussian data: (x − m_t)/std_t is conserved."""
    if isinstance(sampler, (S.EulerSampler, S.HeunSampler)):
        sigma = sampler.sigmas[0].double()
        a, x_T = 1 / (1 + sigma**2), noise.double() * sampler.init_noise_sigma / (1 + sigma**2).sqrt()
    else:
        a, x_T = SCHEDULE.alphas_cumprod[sampler.timesteps[0]].double(), noise.double()
    return MU + STD * (x_T - a.sqrt() * MU) / (a * STD**2 + 1 - a).sqrt()


def ode_error(name, num_steps, **kwargs):
    model = S.GaussianDataModel(SCHEDULE, MU, STD)
    sampler = S.get_sampler(name, SCHEDULE, **kwargs)
    noise = torch.randn(2048, generator=torch.Generator().manual_seed(0))
    x = S.sample(model, sampler, (2048,), num_steps, noise=noise, progress=False)
    return (x.double() - exact_flow(sampler, noise)).abs().max().item()


def test_deterministic_samplers_converge_to_the_exact_ode_solution_at_their_order():
    errors = {(n, k): ode_error(n, k) for n in ("ddim", "euler", "heun", "dpm++") for k in (10, 20, 50)}
    for name in ("ddim", "euler", "heun", "dpm++"):
        assert errors[name, 10] > errors[name, 20] > errors[name, 50]
    assert errors["euler", 50] < 0.15
    # second-order methods beat first-order ones at the same number of steps
    assert errors["heun", 20] < errors["euler", 20] / 5
    assert errors["dpm++", 20] < 0.8 * errors["euler", 20]
    assert errors["heun", 50] < 1e-2


def test_ddim_is_eulers_method_in_sigma():
    """Song et al. 2021 §4.3 / Karras et al. 2022 §3: deterministic DDIM = Euler on dx/dσ (same start, same steps)."""
    model = S.GaussianDataModel(SCHEDULE, MU, STD)
    noise = torch.randn(256, generator=torch.Generator().manual_seed(1))
    ddim = S.sample(model, S.DDIMSampler(SCHEDULE), (256,), 20, noise=noise, progress=False)
    euler = S.sample(model, S.EulerSampler(SCHEDULE), (256,), 20, noise=noise, progress=False)
    torch.testing.assert_close(ddim, euler, rtol=1e-4, atol=1e-4)


def test_gaussian_model_predicts_posterior_means():
    model = S.GaussianDataModel(SCHEDULE, mean=0.3, std=0.7)
    g = torch.Generator().manual_seed(0)
    x0, eps = model.sample_data((200_000,), generator=g), torch.randn(200_000, generator=g)
    for t in (10, 400, 990):
        x_t = SCHEDULE.add_noise(x0, eps, t)
        residual = eps - model.eps(x_t, t)
        # orthogonality principle: the error of the best predictor has mean 0 and is uncorrelated with x_t
        assert abs(residual.mean().item()) < 0.01
        assert abs((residual * (x_t - x_t.mean())).mean().item()) < 0.01
        # the three predictions are one and the same estimate
        torch.testing.assert_close(SCHEDULE.x0_from_eps(x_t, model.eps(x_t, t), t), model.x0(x_t, t), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(SCHEDULE.x0_from_v(x_t, model.prediction(x_t, t, "v_prediction"), t), model.x0(x_t, t),
                                   rtol=1e-4, atol=1e-4)


def test_gaussian_model_takes_fractional_and_per_sample_timesteps():
    a = S.alpha_bar_at(SCHEDULE, torch.tensor([10.0, 10.5, 11.0]))
    assert a[0] == SCHEDULE.alphas_cumprod[10].double() and a[2] == SCHEDULE.alphas_cumprod[11].double()
    assert a[1] < a[0] and a[1] > a[2]
    model = S.GaussianDataModel(SCHEDULE, mean=torch.tensor([0.0, 1.0]).reshape(2, 1), std=0.5)
    x, t = torch.randn(3, 2, 5), torch.tensor([5, 500, 999])
    batched = model.eps(x, t)
    for i in range(3):
        torch.testing.assert_close(batched[i], model.eps(x[i : i + 1], t[i])[0])


# ---------------------------------------------------------------------------------------------------
# sample(): callback, progress, seeds, image-to-image
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", S.SAMPLER_NAMES)
def test_callback_sees_every_step(name):
    seen = []
    sampler = S.get_sampler(name, SCHEDULE)
    out = S.sample(toy_model, sampler, SHAPE, 6, generator=torch.Generator().manual_seed(0), progress=False,
                   callback=lambda i, t, x, x0: seen.append((i, t, x.clone(), x0.clone())))
    assert [i for i, *_ in seen] == list(range(len(sampler.timesteps)))
    assert all(t == sampler.timesteps[i] for i, t, *_ in seen)
    assert all(x.shape == SHAPE and x0.shape == SHAPE for *_, x, x0 in seen)
    torch.testing.assert_close(seen[-1][2], out)


def test_callback_can_replace_the_state():
    fixed = torch.full(SHAPE, 0.25)
    out = S.sample(toy_model, S.DDIMSampler(SCHEDULE), SHAPE, 5, progress=False,
                   callback=lambda i, t, x, x0: fixed if i == 4 else None)
    assert torch.equal(out, fixed)


def test_same_seed_same_sample_different_seed_different_sample():
    def run(seed):
        return S.sample(toy_model, S.DDPMSampler(SCHEDULE), SHAPE, 5, generator=torch.Generator().manual_seed(seed), progress=False)

    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))


def test_progress_bar_can_be_turned_off(capsys):
    S.sample(toy_model, S.EulerSampler(SCHEDULE), SHAPE, 3, progress=False)
    assert capsys.readouterr().err == ""
    S.sample(toy_model, S.EulerSampler(SCHEDULE), SHAPE, 3, progress=True)
    assert "euler" in capsys.readouterr().err


@pytest.mark.parametrize("name", S.SAMPLER_NAMES)
def test_img2img_runs_the_last_steps_from_noised_input(name):
    calls = []
    x0 = torch.randn(SHAPE)
    model = lambda x, t: calls.append(float(t)) or toy_model(x, t)
    sampler = S.get_sampler(name, SCHEDULE)
    assert torch.equal(S.sample(model, sampler, SHAPE, 10, x0=x0, strength=0.0, progress=False), x0)
    assert calls == []
    S.sample(model, sampler, SHAPE, 10, x0=x0, strength=0.5, progress=False, generator=torch.Generator().manual_seed(0))
    assert calls == [float(t) for t in sampler.timesteps[5 * sampler.order :]]


def test_img2img_departs_from_the_input_as_strength_grows():
    model = S.GaussianDataModel(SCHEDULE, MU, STD)
    x0 = model.sample_data((4096,), generator=torch.Generator().manual_seed(0))
    change = []
    for strength in (0.02, 0.1, 0.3, 0.6, 1.0):
        out = S.sample(model, S.DDIMSampler(SCHEDULE), (4096,), 50, x0=x0, strength=strength, progress=False,
                       generator=torch.Generator().manual_seed(1))
        change.append((out - x0).abs().mean().item())
    assert change[0] < 0.05  # one step from t = 0
    assert all(a < b for a, b in zip(change, change[1:]))


# ---------------------------------------------------------------------------------------------------
# Guidance
# ---------------------------------------------------------------------------------------------------
def test_guidance_scale_one_is_conditional_and_zero_is_unconditional():
    g = torch.Generator().manual_seed(0)
    uncond, cond = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    torch.testing.assert_close(S.classifier_free_guidance(uncond, cond, 1.0), cond, rtol=0, atol=1e-6)
    assert torch.equal(S.classifier_free_guidance(uncond, cond, 0.0), uncond)
    torch.testing.assert_close(S.classifier_free_guidance(uncond, cond, 7.5, rescale=0.0), uncond + 7.5 * (cond - uncond))


def test_guidance_rescale_matches_diffusers(diffusers):
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    g = torch.Generator().manual_seed(0)
    uncond, cond = torch.randn(SHAPE, generator=g), 1.3 * torch.randn(SHAPE, generator=g)
    for rescale in (0.3, 0.7, 1.0):
        guided = uncond + 6.0 * (cond - uncond)
        torch.testing.assert_close(S.classifier_free_guidance(uncond, cond, 6.0, rescale=rescale),
                                   rescale_noise_cfg(guided, cond, guidance_rescale=rescale))
    # φ = 1 gives every sample the standard deviation of its conditional prediction
    full = S.classifier_free_guidance(uncond, cond, 6.0, rescale=1.0)
    torch.testing.assert_close(full.flatten(1).std(1), cond.flatten(1).std(1))


# ---------------------------------------------------------------------------------------------------
# Names and bad input
# ---------------------------------------------------------------------------------------------------
def test_get_sampler_by_name():
    classes = [S.DDPMSampler, S.DDIMSampler, S.EulerSampler, S.HeunSampler, S.DPMSolverSampler]
    for name, cls in zip(S.SAMPLER_NAMES, classes):
        assert type(S.get_sampler(name, SCHEDULE)) is cls
    assert S.get_sampler("ddim", SCHEDULE, eta=0.5).eta == 0.5
    with pytest.raises(ValueError, match="dpm\\+\\+"):
        S.get_sampler("plms", SCHEDULE)


def test_trailing_spacing_has_exactly_n_timesteps():
    # numpy's arange gives 62 points for N = 61 (diffusers then ends on t = -1); we keep N, all valid
    for n in (7, 61, 103, 1000):
        ts = S.DDIMSampler(SCHEDULE)
        ts.set_timesteps(n, spacing="trailing")
        assert len(ts.timesteps) == n and ts.timesteps.min() >= 0 and ts.timesteps[0] == 999


@pytest.mark.parametrize("name", S.SAMPLER_NAMES)
def test_bad_timestep_requests_raise(name):
    sampler = S.get_sampler(name, SCHEDULE)
    for n in (0, -3, 1001, 2.5, "20"):
        with pytest.raises(ValueError, match="num_inference_steps"):
            sampler.set_timesteps(n)
    with pytest.raises(ValueError, match="leading, trailing, linspace"):
        sampler.set_timesteps(10, spacing="uniform")
    with pytest.raises(ValueError, match="steps_offset"):
        sampler.set_timesteps(999, steps_offset=5)


@pytest.mark.parametrize("name", S.SAMPLER_NAMES)
def test_step_before_set_timesteps_raises(name):
    sampler = S.get_sampler(name, SCHEDULE)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        sampler.step(x, 999, x)
    with pytest.raises(ValueError, match="set_timesteps"):
        sampler.scale_model_input(x, 999)


def test_bad_constructor_arguments_raise():
    with pytest.raises(ValueError, match="epsilon, v_prediction, sample"):
        S.EulerSampler(SCHEDULE, prediction_type="eps")
    with pytest.raises(ValueError, match="fixed_small, fixed_large"):
        S.DDPMSampler(SCHEDULE, variance_type="learned")
    with pytest.raises(ValueError, match="eta"):
        S.DDIMSampler(SCHEDULE, eta=-0.1)
    with pytest.raises(ValueError, match="solver_order"):
        S.DPMSolverSampler(SCHEDULE, solver_order=3)
    with pytest.raises(ValueError, match="NoiseSchedule"):
        S.DDIMSampler(SCHEDULE.betas)


def test_misuse_of_step_raises():
    sampler = S.EulerSampler(SCHEDULE)
    sampler.set_timesteps(5)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="shape"):
        sampler.step(x[:1], sampler.timesteps[0], x)
    sampler.step(x, sampler.timesteps[0], x)
    with pytest.raises(ValueError, match="expected timestep"):
        sampler.step(x, sampler.timesteps[3], x)  # skipped steps 1 and 2
    ddpm = S.DDPMSampler(SCHEDULE)
    ddpm.set_timesteps(5)
    with pytest.raises(ValueError, match="not one of"):
        ddpm.step(x, 123, x)
    dpm = S.DPMSolverSampler(SCHEDULE)
    with pytest.raises(ValueError, match="repeat a timestep"):
        dpm.set_timesteps(1000)


def test_bad_guidance_and_sample_arguments_raise():
    a = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="≥ 0"):
        S.classifier_free_guidance(a, a, -1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        S.classifier_free_guidance(a, a, 5.0, rescale=1.5)
    with pytest.raises(ValueError, match="same shape"):
        S.classifier_free_guidance(a, a[:1], 5.0)
    with pytest.raises(ValueError, match="strength"):
        S.sample(toy_model, S.DDIMSampler(SCHEDULE), SHAPE, 5, x0=a, strength=1.5, progress=False)
    with pytest.raises(ValueError, match="num_inference_steps"):
        S.sample(toy_model, S.DDIMSampler(SCHEDULE), SHAPE, 0, progress=False)


# ---------------------------------------------------------------------------------------------------
# One conversion between ε, x₀ and v
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("name", S.SAMPLER_NAMES)
def test_every_sampler_reads_the_model_output_through_the_one_conversion(monkeypatch, name, prediction_type):
    calls = []
    original = schedules.convert_prediction_alpha_sigma

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    # convert_prediction calls it through sdlearn.schedules; the samplers that work in σ call it directly
    monkeypatch.setattr(schedules, "convert_prediction_alpha_sigma", counting)
    monkeypatch.setattr(S, "convert_prediction_alpha_sigma", counting)
    sampler = S.get_sampler(name, SCHEDULE, prediction_type=prediction_type)
    S.sample(toy_model, sampler, SHAPE, 6, generator=torch.Generator().manual_seed(0), progress=False)
    assert len(calls) == len(sampler.timesteps)  # once per model evaluation


# ---------------------------------------------------------------------------------------------------
# Constructors: prediction_type keyword-only and first; former positional orders deprecated
# ---------------------------------------------------------------------------------------------------
CLASSES = [S.DDPMSampler, S.DDIMSampler, S.EulerSampler, S.HeunSampler, S.DPMSolverSampler]


@pytest.mark.parametrize("cls", CLASSES + [S.GaussianDataModel])
def test_prediction_type_is_keyword_only_and_first_of_the_options(cls):
    parameters = list(inspect.signature(cls).parameters.values())
    keyword_only = [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert keyword_only[0] == "prediction_type"
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in parameters if p.name in ("schedule", "mean", "std"))


# (class, former positional arguments after the schedule, the same by keyword)
FORMER_ORDERS = [
    (S.DDPMSampler, ("fixed_large", "v_prediction", True), dict(variance_type="fixed_large", prediction_type="v_prediction", clip_sample=True)),
    (S.DDIMSampler, (0.5, "sample", False, True), dict(eta=0.5, prediction_type="sample", set_alpha_to_one=False, clip_sample=True)),
    (S.EulerSampler, (True, "v_prediction"), dict(use_karras_sigmas=True, prediction_type="v_prediction")),
    (S.HeunSampler, ("v_prediction",), dict(prediction_type="v_prediction")),
    (S.DPMSolverSampler, ("v_prediction", 1), dict(prediction_type="v_prediction", solver_order=1)),
]


@pytest.mark.parametrize("cls,positional,keywords", FORMER_ORDERS, ids=[c.__name__ for c, *_ in FORMER_ORDERS])
def test_former_positional_options_still_work_with_a_deprecation_warning(cls, positional, keywords):
    new = cls(SCHEDULE, **keywords)
    with pytest.warns(DeprecationWarning, match="by keyword") as caught:
        old = cls(SCHEDULE, *positional)
    assert caught[0].filename == __file__  # stacklevel points at the caller
    assert repr(old) == repr(new)
    a = S.sample(toy_model, old, SHAPE, 5, generator=torch.Generator().manual_seed(0), progress=False)
    b = S.sample(toy_model, new, SHAPE, 5, generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(a, b)
    # the first positional options only, the rest by keyword
    with pytest.warns(DeprecationWarning):
        partly = cls(SCHEDULE, positional[0], **{k: v for k, v in list(keywords.items())[1:]})
    assert repr(partly) == repr(cls(SCHEDULE, **keywords))


def test_former_positional_forms_that_cannot_be_read_raise():
    with pytest.raises(TypeError, match="at most"):
        S.HeunSampler(SCHEDULE, "epsilon", "extra")
    with pytest.raises(TypeError, match="multiple values"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        S.DDPMSampler(SCHEDULE, "fixed_large", variance_type="fixed_small")


def test_gaussian_model_prediction_type_by_position_is_deprecated():
    with pytest.warns(DeprecationWarning, match="prediction_type='v_prediction'"):
        old = S.GaussianDataModel(SCHEDULE, 0.5, 0.3, "v_prediction")
    assert old.prediction_type == "v_prediction"
    assert repr(old) == repr(S.GaussianDataModel(SCHEDULE, 0.5, 0.3, prediction_type="v_prediction"))


def test_keyword_construction_and_get_sampler_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        S.DDPMSampler(SCHEDULE, prediction_type="v_prediction", variance_type="fixed_large", clip_sample=True)
        S.get_sampler("ddim", SCHEDULE, prediction_type="sample", eta=0.5)
        S.get_sampler("dpm++", SCHEDULE, solver_order=1)
        S.GaussianDataModel(SCHEDULE, 0.5, 0.3, prediction_type="sample")


def test_guidance_former_keyword_names_still_work_with_a_deprecation_warning():
    g = torch.Generator().manual_seed(0)
    uncond, cond = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    new = S.classifier_free_guidance(eps_uncond=uncond, eps_cond=cond, scale=3.0, rescale=0.5)
    with pytest.warns(DeprecationWarning, match=r"eps_uncond=, eps_cond=") as caught:
        old = S.classifier_free_guidance(pred_uncond=uncond, pred_cond=cond, scale=3.0, rescale=0.5)
    assert len(caught) == 1 and caught[0].filename == __file__
    assert torch.equal(old, new)
    with pytest.warns(DeprecationWarning, match="eps_cond"):
        assert torch.equal(S.classifier_free_guidance(uncond, pred_cond=cond, scale=3.0, rescale=0.5), new)
    with pytest.raises(TypeError, match="both"):
        S.classifier_free_guidance(uncond, eps_cond=cond, pred_cond=cond, scale=3.0)
    assert list(inspect.signature(S.classifier_free_guidance).parameters) == ["eps_uncond", "eps_cond", "scale", "rescale"]


# ---------------------------------------------------------------------------------------------------
# dtypes: steps computed in (at least) float32, returned in the input's dtype
# ---------------------------------------------------------------------------------------------------
def started(name, prediction_type="epsilon", evaluations=3):
    """A sampler of each kind, stepped a few times in float32 so that the next step is a typical one (for
    Heun, the next is an Euler half-step; DPM++ has its history)."""
    sampler = S.get_sampler(name, SCHEDULE, prediction_type=prediction_type)
    sampler.set_timesteps(10)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * sampler.init_noise_sigma
    for t in sampler.timesteps[:evaluations]:
        x = sampler.step(toy_model(sampler.scale_model_input(x, t), t), t, x, generator=torch.Generator().manual_seed(1))
    return sampler, x, sampler.timesteps[evaluations]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("evaluations", [0, 3, 4])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("name", S.SAMPLER_NAMES)
def test_half_precision_steps_are_computed_in_float32(name, prediction_type, evaluations, dtype):
    """bfloat16/float16 → float32 is exact, so a half-precision step equals the float32 step on the same
    values, cast back: the step itself loses nothing to half precision."""
    half, x, t = started(name, prediction_type, evaluations)
    full, _, _ = started(name, prediction_type, evaluations)
    x = x.to(dtype)
    output = toy_model(half.scale_model_input(x, t), t).to(dtype)
    got = half.step(output, t, x, generator=torch.Generator().manual_seed(2))
    want = full.step(output.float(), t, x.float(), generator=torch.Generator().manual_seed(2))
    assert got.dtype == dtype and half.last_x0.dtype == dtype
    assert torch.equal(got, want.to(dtype))
    assert torch.equal(half.last_x0, full.last_x0.to(dtype))


@pytest.mark.parametrize("name", S.SAMPLER_NAMES)
def test_float64_steps_stay_float64(name):
    double, x, t = started(name)
    single, _, _ = started(name)
    output = toy_model(single.scale_model_input(x, t), t)
    got = double.step(output.double(), t, x.double(), generator=torch.Generator().manual_seed(2))
    want = single.step(output, t, x, generator=torch.Generator().manual_seed(2))
    assert got.dtype == torch.float64 and double.last_x0.dtype == torch.float64
    torch.testing.assert_close(double.last_x0.float(), single.last_x0, rtol=1e-5, atol=1e-5)
    if name != "ddpm":  # DDPM's noise is drawn in float64 here, in float32 there: another draw
        torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", S.SAMPLER_NAMES)
def test_step_returns_the_dtype_of_x_whatever_the_model_returns(name):
    sampler, x, t = started(name)
    output = toy_model(sampler.scale_model_input(x, t), t)
    assert sampler.step(output.to(torch.bfloat16), t, x, generator=torch.Generator().manual_seed(2)).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("name", S.SAMPLER_NAMES)
def test_sample_returns_its_dtype_and_draws_the_same_noise_in_every_dtype(name, dtype):
    inputs = []

    def recording(x, t):
        inputs.append(x)
        return toy_model(x.float(), t).to(x.dtype)

    sampler = S.get_sampler(name, SCHEDULE)
    out = S.sample(recording, sampler, SHAPE, 4, generator=torch.Generator().manual_seed(5), progress=False, dtype=dtype)
    assert out.dtype == dtype and all(x.dtype == dtype for x in inputs)
    assert torch.isfinite(out.float()).all()
    # the starting noise: drawn in float32 (float64 for float64) from the generator, then cast
    draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=draw_dtype).to(dtype)
    sampler.set_timesteps(4)
    assert torch.equal(inputs[0], sampler.scale_model_input(noise * sampler.init_noise_sigma, sampler.timesteps[0]))


def test_half_precision_samples_stay_close_to_float32_ones():
    model = S.GaussianDataModel(SCHEDULE, MU, STD)
    for name in S.SAMPLER_NAMES:
        full = S.sample(model, S.get_sampler(name, SCHEDULE), (512,), 20, generator=torch.Generator().manual_seed(0),
                        progress=False)
        half = S.sample(model, S.get_sampler(name, SCHEDULE), (512,), 20, generator=torch.Generator().manual_seed(0),
                        progress=False, dtype=torch.bfloat16)
        assert (half.float() - full).abs().max() < 0.1, name  # bfloat16 keeps 8 bits: ≈ 0.4% of |x| per rounding
