"""Tests for rectified flow and EDM (sdlearn.flow, the flow parts of sdlearn.schedules, denoiser, pipeline,
pretrained, recipes and the CLI): parity with diffusers' flow schedulers, bad input, the maths of the straight
path, the exact Gaussian-mixture model, EDM's preconditioning and samplers, training and shipping a flow model."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from sdlearn import samplers as S
from sdlearn.__main__ import main
from sdlearn.checkpoint import CheckpointError, file_sha256
from sdlearn.denoiser import Denoiser, DenoiserConfig, denoiser_loss
from sdlearn.flow import (
    EDMDenoiser,
    FlowMatchEulerSampler,
    FlowMatchHeunSampler,
    FlowMatchSampler,
    GaussianMixtureModel,
    check_sampler_fits,
    edm_heun_sample,
    edm_preconditioning,
    edm_sigmas,
    flow_ode_reference,
    get_flow_sampler,
    vp_preconditioning,
)
from sdlearn.pipeline import LatentDiffusionPipeline
from sdlearn.pretrained import load_flow, load_pipeline, save_clip, save_denoiser, save_flow, save_vae
from sdlearn.recipes import latent_batch_fn, train_denoiser, train_flow
from sdlearn.schedules import (
    FLOW,
    MODEL_PREDICTION_TYPES,
    NoiseSchedule,
    check_model_prediction_type,
    check_prediction_type,
    flow_interpolate,
    flow_matched_timesteps,
    flow_target,
    logit_normal_sigmas,
    shift_sigmas,
)
from sdlearn.text import TextEncoder, TextEncoderConfig, TinyCLIP, TinyCLIPConfig, Tokenizer
from sdlearn.vae import VAE, VAEConfig, psnr

# diffusers 0.42 calls np.array(tensor, copy=False)-style conversions that numpy 2 flags; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

SCHEDULE = NoiseSchedule.from_name("scaled_linear")
T = SCHEDULE.num_train_timesteps  # 1000
SHAPE = (2, 4, 8, 8)
STEP_COUNTS = (1, 2, 4, 8, 28, 50)
SHIFTS = (1.0, 3.0)
FLOW_SAMPLER_CLASSES = {"euler": FlowMatchEulerSampler, "heun": FlowMatchHeunSampler}
PROMPT = "a large red circle in the top left"

# A mixture in 2-D whose components are far apart (≥ 5 standard deviations), so the flow between them bends.
MIXTURE = GaussianMixtureModel(means=[[-2.0, 0.0], [1.5, 1.0], [0.0, -1.5]], stds=[0.3, 0.5, 0.4], weights=[0.5, 0.3, 0.2])

# FlowMatchHeunSampler.add_noise indexes the un-repeated ``sigmas`` [n + 1] with an entry of the repeated
# ``timesteps`` [2n − 1] (``self.sigmas[int(self._matches(t)[0])]``), so every timestep but the first gets the
# wrong σ, and the last ones an IndexError. _SigmaSampler.add_noise maps entry k to σ_{(k+1)//2}; the flow
# Heun sampler needs the same. It breaks img2img (sample(x0=..., strength=...)) and pipe.inpaint with "heun".
def toy_velocity(x, t):
    """A fixed smooth, non-linear stand-in for a flow network that depends on x and on t (so timesteps must agree)."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return 0.8 * torch.sin(x + t / 250) + 0.3 * x - 0.2


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


def exact_velocity(mixture=MIXTURE):
    """The mixture's exact velocity as a ``model_fn(x, t)`` of the flow samplers (t = σT)."""
    return lambda x, t: mixture.velocity(x, torch.as_tensor(t, dtype=torch.float64) / T)


def mixture_moments(mixture=MIXTURE):
    """Mean and std per dimension of the mixture Σ π_k N(μ_k, s_k² I)."""
    w, mu, s2 = mixture.weights[:, None], mixture.means, mixture.stds[:, None] ** 2
    mean = (w * mu).sum(0)
    return mean, ((w * (s2 + mu**2)).sum(0) - mean**2).sqrt()


# ---------------------------------------------------------------------------------------------------
# Parity with diffusers
# ---------------------------------------------------------------------------------------------------
def run_flow_both(ours, theirs, num_steps, seed=0):
    """Drive our flow sampler and diffusers' with the same velocity model and noise → per model call, (our state,
    theirs, our last_x0, x − σ v computed here)."""
    ours.set_timesteps(num_steps)
    theirs.set_timesteps(num_steps)
    assert ours.timesteps.dtype == theirs.timesteps.dtype == torch.float32
    assert torch.equal(ours.timesteps, theirs.timesteps)
    x_ours = x_theirs = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * ours.init_noise_sigma
    trajectory = []
    for t in ours.timesteps:
        sigma = t / T  # the σ this call is at
        velocity = toy_velocity(ours.scale_model_input(x_ours, t), t)
        x0_expected = x_ours - sigma * velocity
        x_ours = ours.step(velocity, t, x_ours)
        x_theirs = theirs.step(toy_velocity(x_theirs, t), t, x_theirs).prev_sample
        trajectory.append((x_ours, x_theirs, ours.last_x0, x0_expected))
    return trajectory


@pytest.mark.parametrize("num_steps", STEP_COUNTS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_flow_euler_trajectory_equals_diffusers(diffusers, shift, num_steps):
    ours, theirs = FlowMatchEulerSampler(shift=shift), diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    trajectory = run_flow_both(ours, theirs, num_steps)
    assert len(trajectory) == num_steps
    torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=0, atol=0)
    assert ours.timesteps[0] == T and ours.sigmas[-1] == 0  # from pure noise (σ = 1) to the data (σ = 0)
    for i, (x_ours, x_theirs, x0_ours, x0_expected) in enumerate(trajectory):
        torch.testing.assert_close(x_ours, x_theirs, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"step {i}: {m}")
        torch.testing.assert_close(x0_ours, x0_expected, rtol=1e-5, atol=1e-5)  # x̂₀ = x − σ v


@pytest.mark.parametrize("num_steps", STEP_COUNTS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_flow_heun_trajectory_equals_diffusers(diffusers, shift, num_steps):
    ours, theirs = FlowMatchHeunSampler(shift=shift), diffusers.FlowMatchHeunDiscreteScheduler(shift=shift)
    trajectory = run_flow_both(ours, theirs, num_steps)
    assert len(trajectory) == 2 * num_steps - 1  # 2N − 1 model calls
    for i, (x_ours, x_theirs, x0_ours, x0_expected) in enumerate(trajectory):
        # diffusers reads the velocity back as (x − (x − σ v))/σ in float32: a rounding of |x|·2⁻²⁴/σ that grows as σ
        # shrinks (up to ~5e-5 absolute on these randn-scale states at σ_min = 1e-3), where we use v itself. Hence a
        # relative tolerance of 1e-4 (and the same absolute floor), not the 1e-5 of the Euler parity.
        torch.testing.assert_close(x_ours, x_theirs, rtol=1e-4, atol=1e-4, msg=lambda m, i=i: f"call {i}: {m}")
        torch.testing.assert_close(x0_ours, x0_expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_steps", [1, 2, 5, 10, 25, 50])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpm_solver_lu_lambdas_equals_diffusers(diffusers, prediction_type, num_steps):
    ours = S.DPMSolverSampler(SCHEDULE, prediction_type=prediction_type, use_lu_lambdas=True)
    theirs = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                   use_lu_lambdas=True, prediction_type=prediction_type)
    ours.set_timesteps(num_steps)
    theirs.set_timesteps(num_steps)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas.float(), rtol=1e-5, atol=0)
    x_ours = x_theirs = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    for i, t in enumerate(ours.timesteps):
        x_ours = ours.step(toy_velocity(x_ours, t), t, x_ours)
        x_theirs = theirs.step(toy_velocity(x_theirs, t), t, x_theirs).prev_sample
        # both in float32 with their own σ rounding (ours from float32 σ, theirs from float64): ~1e-6 measured
        scale = x_theirs.abs().max().item()
        torch.testing.assert_close(x_ours, x_theirs, rtol=1e-4, atol=1e-4 * scale, msg=lambda m, i=i: f"step {i}: {m}")


def test_lu_lambdas_are_uniform_in_log_sigma_and_differ_from_the_default_spacing():
    lu = S.DPMSolverSampler(SCHEDULE, use_lu_lambdas=True)
    lu.set_timesteps(10)
    log_sigma = lu.sigmas[:-1].double().log()
    steps = log_sigma.diff()
    torch.testing.assert_close(steps, steps.mean().expand_as(steps), rtol=1e-4, atol=1e-5)  # h the same at every step
    table = S.sigma_table(SCHEDULE)
    assert lu.sigmas[0].item() == pytest.approx(table[-1], rel=1e-6) and lu.sigmas[-2].item() == pytest.approx(table[0], rel=1e-6)
    plain = S.DPMSolverSampler(SCHEDULE)
    plain.set_timesteps(10)
    assert not torch.equal(plain.timesteps, lu.timesteps)
    assert "use_lu_lambdas=True" in repr(lu) and "use_lu_lambdas" not in repr(plain)


@pytest.mark.parametrize("shift", SHIFTS)
def test_flow_euler_add_noise_equals_diffusers_scale_noise(diffusers, shift):
    ours = FlowMatchEulerSampler(shift=shift)
    ours.set_timesteps(8)
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    for t in ours.timesteps:
        theirs = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
        theirs.set_timesteps(8)
        torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.scale_noise(x0, t.reshape(1), noise), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shift", SHIFTS)
def test_flow_heun_add_noise_equals_diffusers_scale_noise(diffusers, shift):
    ours = FlowMatchHeunSampler(shift=shift)
    ours.set_timesteps(4)
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    for t in ours.timesteps:
        theirs = diffusers.FlowMatchHeunDiscreteScheduler(shift=shift)  # its scale_noise keeps the first index it finds
        theirs.set_timesteps(4)
        torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.scale_noise(x0, t.reshape(1), noise), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", [
    "euler", "heun"])
def test_flow_add_noise_is_the_path_at_the_sigma_of_every_timestep(name):
    """A flow timestep is σT, so add_noise(x0, ε, t) must be (1 − t/T) x0 + (t/T) ε at every entry of timesteps."""
    sampler = FLOW_SAMPLER_CLASSES[name](shift=3.0)
    sampler.set_timesteps(6)
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    for t in sampler.timesteps:
        torch.testing.assert_close(sampler.add_noise(x0, noise, t), flow_interpolate(x0, noise, t / T), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", [
    "euler", "heun"])
def test_flow_img2img_starts_on_the_path_at_the_strength_step(name):
    """sample(x0=..., strength=0.5) with N steps starts at x_σ, σ the one of step N/2, and runs the rest."""
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    got = S.sample(toy_velocity, FLOW_SAMPLER_CLASSES[name](), SHAPE, 8, progress=False, noise=noise, x0=x0, strength=0.5)
    sampler = FLOW_SAMPLER_CLASSES[name]()
    sampler.set_timesteps(8)
    x = flow_interpolate(x0, noise, sampler.sigmas[4])  # 8 − ⌊8 · 0.5⌋ = 4 steps skipped
    for t in sampler.timesteps[4 * sampler.order:]:
        x = sampler.step(toy_velocity(x, t), t, x)
    torch.testing.assert_close(got, x, rtol=1e-6, atol=1e-6)


def test_sample_loop_with_flow_euler_equals_a_diffusers_loop(diffusers):
    """sample() runs the loop an SD3 pipeline runs: same noise in, same latents out."""
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    ours = S.sample(toy_velocity, FlowMatchEulerSampler(shift=3.0), SHAPE, 12, progress=False, noise=noise)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(12)
    x = noise
    for t in scheduler.timesteps:
        x = scheduler.step(toy_velocity(x, t), t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Bad input: the samplers, sample(), the pipeline, the CLI
# ---------------------------------------------------------------------------------------------------
BAD_SHIFTS = [0, 0.0, -1.0, float("nan"), float("inf"), "3", None, True, [3.0]]


@pytest.mark.parametrize("shift", BAD_SHIFTS, ids=repr)
@pytest.mark.parametrize("name", FLOW_SAMPLER_CLASSES)
def test_bad_shift_raises(name, shift):
    with pytest.raises(ValueError, match="shift must be a number > 0"):
        FLOW_SAMPLER_CLASSES[name](shift=shift)
    with pytest.raises(ValueError, match="shift"):
        get_flow_sampler(name, shift=shift)
    with pytest.raises(ValueError, match="shift"):
        shift_sigmas(0.5, shift)
    with pytest.raises(ValueError, match="shift"):
        logit_normal_sigmas(4, shift=shift)


@pytest.mark.parametrize("name", FLOW_SAMPLER_CLASSES)
def test_bad_flow_sampler_arguments_raise(name):
    cls = FLOW_SAMPLER_CLASSES[name]
    for T_bad in (1, 0, -5, 2.5, True, "1000"):
        with pytest.raises(ValueError, match="num_train_timesteps"):
            cls(T_bad)
    sampler = cls()
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):  # stepping before the timesteps are chosen
        sampler.step(x, 1000.0, x)
    for steps in (0, -1, 2.5, True, "4", None):
        with pytest.raises(ValueError, match="num_inference_steps must be a whole number ≥ 1"):
            sampler.set_timesteps(steps)
    for spacing, offset in (("leading", 0), ("trailing", 0), ("bogus", 0), ("linspace", 1)):
        with pytest.raises(ValueError, match="linspace"):
            sampler.set_timesteps(4, spacing=spacing, steps_offset=offset)
    sampler.set_timesteps(4)
    with pytest.raises(ValueError, match="not one of this sampler's timesteps"):
        sampler.step(x, 123.0, x)
    with pytest.raises(ValueError, match="must match"):
        sampler.step(x[:1], sampler.timesteps[0], x)
    t0, t1 = sampler.timesteps[0], sampler.timesteps[1]
    x = sampler.step(toy_velocity(x, t0), t0, x)
    with pytest.raises(ValueError, match="in order"):  # going back
        sampler.step(toy_velocity(x, t0), t0, x)
    assert sampler.timesteps[1] == t1


def test_get_flow_sampler_by_name_and_refusing_a_diffusion_name():
    assert type(get_flow_sampler("euler")) is FlowMatchEulerSampler
    assert type(get_flow_sampler("HEUN", shift=2.0)) is FlowMatchHeunSampler
    assert get_flow_sampler("heun", shift=2.0).shift == 2.0 and get_flow_sampler("euler", 500).num_train_timesteps == 500
    for name in ("ddim", "dpm++", "ddpm", "bogus", None):
        with pytest.raises(ValueError, match="a flow model is sampled by 'euler' or 'heun'"):
            get_flow_sampler(name)
    assert isinstance(FlowMatchEulerSampler(), S.Sampler) and FlowMatchHeunSampler().prediction_type == FLOW


def test_flow_sampler_is_a_flow_match_sampler():
    assert issubclass(FlowMatchEulerSampler, FlowMatchSampler) and issubclass(FlowMatchHeunSampler, FlowMatchSampler)
    sampler = FlowMatchEulerSampler(shift=3.0)
    assert repr(sampler) == "FlowMatchEulerSampler(shift=3, num_train_timesteps=1000)"
    sampler.set_timesteps(4)
    assert repr(sampler).endswith(", 4 steps)") and sampler.init_noise_sigma == 1.0
    assert sampler.sigma_max == 1.0 and sampler.sigma_min == pytest.approx(shift_sigmas(1 / T, 3.0), rel=1e-6)


def test_check_sampler_fits_names_the_objective_the_model_was_trained_with():
    check_sampler_fits(FlowMatchEulerSampler(), "flow")
    check_sampler_fits(S.DDIMSampler(SCHEDULE), "epsilon")
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        with pytest.raises(ValueError, match=f"diffusion objective \\(prediction_type '{prediction_type}'\\)"):
            check_sampler_fits(FlowMatchHeunSampler(), prediction_type)
    for name in S.SAMPLER_NAMES:
        with pytest.raises(ValueError, match="trained with the rectified-flow objective"):
            check_sampler_fits(S.get_sampler(name, SCHEDULE), "flow")


def test_prediction_types_of_samplers_and_of_models():
    assert FLOW == "flow" and MODEL_PREDICTION_TYPES == ("epsilon", "v_prediction", "sample", "flow")
    with pytest.raises(ValueError, match="rectified-flow objective"):  # a diffusion sampler cannot read it
        check_prediction_type("flow")
    with pytest.raises(ValueError, match="rectified-flow objective"):
        S.DDIMSampler(SCHEDULE, prediction_type="flow")
    with pytest.raises(ValueError, match="unknown prediction_type 'velocity'"):
        check_prediction_type("velocity")
    check_model_prediction_type("flow")
    with pytest.raises(ValueError, match="expected one of epsilon, v_prediction, sample, flow"):
        check_model_prediction_type("velocity")
    with pytest.raises(ValueError, match="prediction_type"):
        DenoiserConfig(prediction_type="velocity")


def tiny_denoiser(prediction_type="epsilon", text_dim=16, seed=1) -> Denoiser:
    """A small random Denoiser whose output depends on its inputs (adaLN-Zero's zeros replaced by small weights)."""
    torch.manual_seed(seed)
    model = Denoiser(DenoiserConfig(width=32, depth=1, heads=2, text_dim=text_dim, frequency_dim=32,
                                    prediction_type=prediction_type))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and p.abs().max() == 0:
                p.normal_(std=0.05)
    return model.eval()


def timesteps_seen(model):
    """Record the timestep of every forward call of ``model`` → (list, hook handle)."""
    seen = []
    return seen, model.register_forward_pre_hook(lambda m, args: seen.append(torch.as_tensor(args[1]).clone()))


@pytest.mark.parametrize("sampler_name", S.SAMPLER_NAMES)
def test_sample_refuses_a_diffusion_sampler_for_a_flow_model(sampler_name):
    model = tiny_denoiser("flow")
    seen, handle = timesteps_seen(model)
    try:
        with pytest.raises(ValueError, match="trained with rectified flow"):
            S.sample(model, S.get_sampler(sampler_name, SCHEDULE), SHAPE, 2, progress=False)
    finally:
        handle.remove()
    assert seen == []  # refused before any model call


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("name", FLOW_SAMPLER_CLASSES)
def test_sample_refuses_a_flow_sampler_for_a_diffusion_model(name, prediction_type):
    model = tiny_denoiser(prediction_type)
    with pytest.raises(ValueError, match=f"trained with diffusion \\(prediction_type '{prediction_type}'\\)"):
        S.sample(model, FLOW_SAMPLER_CLASSES[name](), SHAPE, 2, progress=False)


@pytest.mark.parametrize("name", FLOW_SAMPLER_CLASSES)
def test_sample_runs_a_flow_model_from_sigma_one_and_refuses_other_spacings(name):
    model = tiny_denoiser("flow")
    seen, handle = timesteps_seen(model)
    try:
        x = S.sample(model, FLOW_SAMPLER_CLASSES[name](), SHAPE, 3, generator=torch.Generator().manual_seed(0), progress=False)
    finally:
        handle.remove()
    assert x.shape == SHAPE and torch.isfinite(x).all()
    assert seen[0].item() == T and len(seen) == 3 * FLOW_SAMPLER_CLASSES[name].order - (FLOW_SAMPLER_CLASSES[name].order - 1)
    with pytest.raises(ValueError, match="linspace"):
        S.sample(model, FLOW_SAMPLER_CLASSES[name](), SHAPE, 3, progress=False, spacing="leading")
    # the diffusion samplers still get their own default spacing ("leading") when none is given
    ddim = S.DDIMSampler(SCHEDULE)
    S.sample(tiny_denoiser("epsilon"), ddim, SHAPE, 4, progress=False)
    assert ddim.spacing == "leading" and ddim.timesteps.tolist() == [750, 500, 250, 0]


def tiny_vae() -> VAE:
    torch.manual_seed(3)
    return VAE(VAEConfig(base_channels=8, num_res_blocks=0)).eval()


def tiny_clip() -> TinyCLIP:
    torch.manual_seed(2)
    return TinyCLIP(TinyCLIPConfig(text=TextEncoderConfig(width=32, depth=1, heads=2), image_channels=(8, 16),
                                   embed_dim=16)).eval()


@pytest.fixture(scope="module")
def flow_pipe():
    return LatentDiffusionPipeline(tiny_vae(), tiny_clip().text_encoder, Tokenizer(), tiny_denoiser("flow", 32), "scaled_linear")


@pytest.fixture(scope="module")
def eps_pipe():
    return LatentDiffusionPipeline(tiny_vae(), tiny_clip().text_encoder, Tokenizer(), tiny_denoiser("epsilon", 32), "scaled_linear")


def test_pipeline_picks_the_flow_sampler_for_a_flow_denoiser(flow_pipe, eps_pipe):
    assert flow_pipe.is_flow and not eps_pipe.is_flow
    assert flow_pipe.default_sampler == "euler" and eps_pipe.default_sampler == "dpm++"
    assert type(flow_pipe.get_sampler()) is FlowMatchEulerSampler and type(flow_pipe.get_sampler("heun")) is FlowMatchHeunSampler
    assert type(flow_pipe.get_sampler("euler")) is FlowMatchEulerSampler
    assert type(eps_pipe.get_sampler()) is S.DPMSolverSampler and type(eps_pipe.get_sampler("euler")) is S.EulerSampler
    assert flow_pipe.flow_shift == 1.0 and flow_pipe.get_sampler().shift == 1.0
    mine = FlowMatchHeunSampler(shift=2.0)
    assert flow_pipe.get_sampler(mine) is mine


def test_pipeline_flow_shift_reaches_the_sampler():
    pipe = LatentDiffusionPipeline(tiny_vae(), tiny_clip().text_encoder, Tokenizer(), tiny_denoiser("flow", 32))
    pipe.flow_shift = 3.0
    sampler = pipe.get_sampler("heun")
    assert sampler.shift == 3.0
    sampler.set_timesteps(4)
    plain = FlowMatchHeunSampler()
    plain.set_timesteps(4)
    assert (sampler.timesteps[1:] > plain.timesteps[1:]).all()  # the shift moves the steps to higher noise


@pytest.mark.parametrize("sampler", ["ddim", "dpm++", "ddpm"])
def test_flow_pipeline_refuses_a_diffusion_sampler_naming_rectified_flow(flow_pipe, sampler):
    with pytest.raises(ValueError, match="a flow model is sampled by 'euler' or 'heun'"):
        flow_pipe.get_sampler(sampler)
    with pytest.raises(ValueError, match="flow model"):
        flow_pipe(PROMPT, sampler=sampler, num_inference_steps=2, seed=0, progress=False)
    with pytest.raises(ValueError, match="trained with the rectified-flow objective"):
        flow_pipe.get_sampler(S.get_sampler(sampler, SCHEDULE))
    with pytest.raises(ValueError, match="trained with the rectified-flow objective"):
        flow_pipe(PROMPT, sampler=S.get_sampler(sampler, SCHEDULE), num_inference_steps=2, seed=0, progress=False)


@pytest.mark.parametrize("name", FLOW_SAMPLER_CLASSES)
def test_diffusion_pipeline_refuses_a_flow_sampler_naming_its_objective(eps_pipe, name):
    with pytest.raises(ValueError, match="diffusion objective \\(prediction_type 'epsilon'\\)"):
        eps_pipe.get_sampler(FLOW_SAMPLER_CLASSES[name]())
    with pytest.raises(ValueError, match="diffusion objective"):
        eps_pipe(PROMPT, sampler=FLOW_SAMPLER_CLASSES[name](), num_inference_steps=2, seed=0, progress=False)


def test_flow_pipeline_refuses_a_sampler_of_another_length_and_a_non_sampler(flow_pipe):
    with pytest.raises(ValueError, match="T = 500"):
        flow_pipe.get_sampler(FlowMatchEulerSampler(500))
    with pytest.raises(ValueError, match="sampler must be one of euler, heun"):
        flow_pipe.get_sampler(3)


@pytest.mark.parametrize("sampler", [None, "euler", "heun"])
def test_flow_pipeline_draws_reproducible_images(flow_pipe, sampler):
    seen, handle = timesteps_seen(flow_pipe.denoiser)
    try:
        a = flow_pipe([PROMPT, "a blue square"], sampler=sampler, num_inference_steps=3, seed=4, progress=False)
    finally:
        handle.remove()
    b = flow_pipe([PROMPT, "a blue square"], sampler=sampler, num_inference_steps=3, seed=4, progress=False)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b) and a.min() >= -1 and a.max() <= 1
    assert seen[0].max().item() == T  # σ = 1 first: the flow's timesteps, not the ε-model's t < T
    assert len(seen) == (5 if sampler == "heun" else 3)


def test_flow_pipeline_img2img_with_euler(flow_pipe):
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = flow_pipe.img2img(PROMPT, image, strength=0.0, seed=0, progress=False)
    torch.testing.assert_close(out, flow_pipe.vae.decode(flow_pipe.vae.encode(image).mode()).clamp(-1, 1), atol=1e-5, rtol=0)
    a = flow_pipe.img2img(PROMPT, image, strength=0.5, num_inference_steps=4, seed=0, progress=False)
    assert a.shape == (2, 3, 32, 32) and torch.isfinite(a).all()


@pytest.mark.parametrize("sampler", [
    "euler", "heun"])
def test_flow_pipeline_inpaint_keeps_the_unmasked_region(flow_pipe, sampler):
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mask = torch.zeros(1, 32, 32)
    mask[:, :, 16:] = 1
    out = flow_pipe.inpaint(PROMPT, image, mask, sampler=sampler, num_inference_steps=4, seed=0, progress=False)
    assert psnr(out[..., :16], image[..., :16]).min() > 60
    # the kept latent cells end exactly as the encoded image, which needs add_noise at the right σ along the way
    final = {}
    flow_pipe.inpaint(PROMPT, image, mask, sampler=sampler, num_inference_steps=4, seed=0, progress=False,
                      paste_unmasked=False, callback=lambda i, t, x, x0: final.update(x=x.clone()))
    known = flow_pipe.encode_image(image)
    torch.testing.assert_close(final["x"][..., :4], known[..., :4], atol=1e-5, rtol=0)  # latent columns 0–3 are kept


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdlearn", *args], capture_output=True, text=True, timeout=300)


def test_cli_refuses_a_diffusion_sampler_for_the_flow_model_in_one_line():
    result = run_cli("generate", "a red circle", "--denoiser", "flow", "--sampler", "ddim")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0]
    assert "rectified flow" in lines[0] and "euler and heun" in lines[0]


@pytest.mark.parametrize("sampler", ["dpm++", "ddpm"])
def test_generate_flow_with_a_diffusion_sampler_exits_2_before_loading(tmp_path, capsys, sampler):
    out = tmp_path / "x.png"
    assert main(["generate", "a red circle", "--denoiser", "flow", "--sampler", sampler, "--out", str(out),
                 "--weights", str(tmp_path / "no such folder")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and "rectified flow" in err[0] and "not found" not in err[0]
    assert not out.exists()


def test_train_flow_refuses_a_prediction_type(tmp_path, capsys):
    assert main(["train", "flow", "--prediction-type", "epsilon", "--steps", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--prediction-type" in err[0]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


# ---------------------------------------------------------------------------------------------------
# The maths of the straight path
# ---------------------------------------------------------------------------------------------------
def test_flow_interpolate_joins_the_data_to_the_noise():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    assert torch.equal(flow_interpolate(x0, noise, 0.0), x0)
    assert torch.equal(flow_interpolate(x0, noise, 1.0), noise)
    torch.testing.assert_close(flow_interpolate(x0, noise, 0.25), 0.75 * x0 + 0.25 * noise)
    per_sample = flow_interpolate(x0, noise, torch.tensor([0.0, 1.0]))  # one σ per sample
    assert torch.equal(per_sample[0], x0[0]) and torch.equal(per_sample[1], noise[1])
    # unlike the VP path, the coefficients sum to 1 (not their squares): the midpoint of independent N(0, 1)s has std √½
    big = flow_interpolate(torch.randn(100_000, generator=g), torch.randn(100_000, generator=g), 0.5)
    assert big.std().item() == pytest.approx(math.sqrt(0.5), rel=0.02)


def test_the_derivative_of_the_path_is_the_flow_target():
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(SHAPE, generator=g, dtype=torch.float64), torch.randn(SHAPE, generator=g, dtype=torch.float64)
    target = flow_target(x0, noise)
    torch.testing.assert_close(target, noise - x0)
    for sigma in (torch.tensor(0.3, dtype=torch.float64), torch.tensor([0.1, 0.9], dtype=torch.float64)):
        _, derivative = torch.func.jvp(lambda s: flow_interpolate(x0, noise, s), (sigma,), (torch.ones_like(sigma),))
        torch.testing.assert_close(derivative, target)
    h = 1e-3  # and as a finite difference, at a few σ: the velocity does not depend on σ
    for sigma in (0.05, 0.5, 0.95):
        difference = (flow_interpolate(x0, noise, sigma + h) - flow_interpolate(x0, noise, sigma - h)) / (2 * h)
        torch.testing.assert_close(difference, target)


@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0, 6.0])
def test_shift_sigmas_divides_the_snr_by_shift_squared(shift):
    sigma = np.linspace(0.01, 0.99, 99)
    shifted = shift_sigmas(sigma, shift)
    snr = lambda s: ((1 - s) / s) ** 2  # noqa: E731
    np.testing.assert_allclose(snr(shifted), snr(sigma) / shift**2, rtol=1e-10)
    assert shift_sigmas(0.0, shift) == 0 and shift_sigmas(1.0, shift) == pytest.approx(1.0)
    assert (np.diff(shifted) > 0).all()  # still increasing: the order of the steps is kept
    if shift > 1:
        assert (shifted > sigma).all()  # more noise at every step
    tensor = shift_sigmas(torch.tensor(sigma), shift)
    assert isinstance(tensor, torch.Tensor)
    np.testing.assert_allclose(tensor.numpy(), shifted)
    assert shift_sigmas(0.5, shift) == pytest.approx(shift / (1 + shift))


def test_logit_normal_sigmas_are_reproducible_and_centred():
    sigmas = logit_normal_sigmas(100_000, torch.Generator().manual_seed(0))
    assert sigmas.shape == (100_000,) and sigmas.dtype == torch.float32
    assert (sigmas > 0).all() and (sigmas < 1).all()
    assert sigmas.median().item() == pytest.approx(0.5, abs=0.01)
    logits = torch.logit(sigmas.double())  # the logit of σ is N(mean, std²)
    assert logits.mean().item() == pytest.approx(0.0, abs=0.02) and logits.std().item() == pytest.approx(1.0, abs=0.02)
    assert torch.equal(sigmas, logit_normal_sigmas(100_000, torch.Generator().manual_seed(0)))
    assert not torch.equal(sigmas, logit_normal_sigmas(100_000, torch.Generator().manual_seed(1)))
    moved = logit_normal_sigmas(100_000, torch.Generator().manual_seed(0), mean=1.0, std=0.5)
    assert moved.median().item() == pytest.approx(1 / (1 + math.exp(-1)), abs=0.01)
    assert torch.logit(moved.double()).std().item() == pytest.approx(0.5, abs=0.01)
    shifted = logit_normal_sigmas(1000, torch.Generator().manual_seed(2), shift=3.0)
    torch.testing.assert_close(shifted, shift_sigmas(logit_normal_sigmas(1000, torch.Generator().manual_seed(2)), 3.0))
    for n in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="n must be a positive integer"):
            logit_normal_sigmas(n)
    for std in (0, -1.0, "1"):
        with pytest.raises(ValueError, match="std must be a number > 0"):
            logit_normal_sigmas(4, std=std)


def randomised_denoiser(prediction_type, seed=0) -> Denoiser:
    torch.manual_seed(seed)
    model = Denoiser(DenoiserConfig(width=32, depth=1, heads=2, text_dim=16, frequency_dim=32, prediction_type=prediction_type))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)  # zero-initialised layers would make every output 0
    return model.eval()


def test_flow_denoiser_loss_is_the_mse_to_the_velocity_on_the_straight_path():
    model = randomised_denoiser("flow")
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 3:] = False
    batch = {"x0": torch.randn(4, 4, 8, 8, generator=g), "noise": torch.randn(4, 4, 8, 8, generator=g),
             "t": torch.tensor([0.0, 250.5, 700.0, 1000.0]), "tokens": torch.randn(4, 5, 16, generator=g), "mask": mask}
    loss, logs = denoiser_loss(model, batch, SCHEDULE)
    assert logs == {} and loss.dim() == 0 and loss.requires_grad
    sigma = (batch["t"] / T)[:, None, None, None]  # σ = t/T
    x_sigma = (1 - sigma) * batch["x0"] + sigma * batch["noise"]
    prediction = model(x_sigma, batch["t"], batch["tokens"], batch["mask"])
    expected = (prediction - (batch["noise"] - batch["x0"])).pow(2).mean()  # ‖(ε − x₀) − v_θ(x_σ, σT)‖²
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # not what an ε-model of the same weights would be taught
    eps_model = randomised_denoiser("epsilon")
    batch["t"] = torch.tensor([0, 250, 700, 999])
    eps_loss = denoiser_loss(eps_model, batch, SCHEDULE)[0]
    flow_loss = denoiser_loss(model, batch, SCHEDULE)[0]
    assert abs(eps_loss.item() - flow_loss.item()) > 1e-3


def test_flow_denoiser_accepts_sigma_one_and_the_epsilon_denoiser_does_not():
    x = torch.randn(2, 4, 8, 8)
    flow, eps = randomised_denoiser("flow"), randomised_denoiser("epsilon")
    for t in (0, 0.0, 1000, 1000.0, torch.tensor([0.5, 1000.0])):
        assert flow(x, t).shape == x.shape
    for t in (1000.5, 1001, -0.1, torch.tensor([10.0, 1000.01])):
        with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\]"):
            flow(x, t)
    assert eps(x, 999).shape == x.shape
    for t in (1000, 1000.5, -1):
        with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\)"):
            eps(x, t)


# ---------------------------------------------------------------------------------------------------
# The exact Gaussian-mixture model
# ---------------------------------------------------------------------------------------------------
def monte_carlo_posterior_mean(mixture, x, a, b, n=400_000, seed=0):
    """E[x₀ | a x₀ + b ε = x] by self-normalised importance sampling with the prior as proposal."""
    x0 = mixture.sample(n, torch.Generator().manual_seed(seed))  # [n, d]
    log_w = -((x[:, None, :] - a * x0[None]) ** 2).sum(-1) / (2 * b**2)  # [B, n]
    w = torch.softmax(log_w, dim=1)
    ess = 1 / (w**2).sum(1)
    assert (ess > 1000).all(), "too few effective samples for the estimate"
    return w @ x0  # [B, d]


@pytest.mark.parametrize("a,b", [(0.5, 0.5), (0.8, 0.6), (0.3, 0.9)])
def test_mixture_x0_is_the_posterior_mean(a, b):
    x = torch.tensor([[-1.0, 0.2], [0.5, 0.5], [0.0, -0.8], [0.7, -0.2]], dtype=torch.float64)
    estimate = monte_carlo_posterior_mean(MIXTURE, x, a, b)
    # the Monte-Carlo error with ≥ 1000 effective samples is ≤ ~0.03 for posteriors of std ≤ 1
    torch.testing.assert_close(MIXTURE.x0(x, a, b), estimate, rtol=0, atol=0.04)
    # per-sample coefficients: row i with (a_i, b_i) is the same as alone
    per_sample = MIXTURE.x0(x, torch.tensor([a, 0.9, a, 0.2]), torch.tensor([b, 0.1, b, 0.7]))
    torch.testing.assert_close(per_sample[0], MIXTURE.x0(x[:1], a, b)[0])
    torch.testing.assert_close(per_sample[1], MIXTURE.x0(x[1:2], 0.9, 0.1)[0])


def test_one_component_mixture_is_the_gaussian_data_model():
    mean, std = 0.4, 0.7
    mixture = GaussianMixtureModel(means=[[mean] * 3], stds=[std])
    gaussian = S.GaussianDataModel(SCHEDULE, mean, std)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in (0, 10, 400, 999):
        torch.testing.assert_close(mixture.eps(x, t, SCHEDULE), gaussian.eps(x, t), rtol=1e-6, atol=1e-9)
        alpha_bar = SCHEDULE.alphas_cumprod[t].double()
        torch.testing.assert_close(mixture.x0(x, alpha_bar.sqrt(), (1 - alpha_bar).sqrt()), gaussian.x0(x, t), rtol=1e-6, atol=1e-9)
    # and the closed form itself: E[x₀ | x] = μ + a s² (x − a μ)/(a² s² + b²)
    a, b = 0.6, 0.8
    torch.testing.assert_close(mixture.x0(x, a, b), mean + a * std**2 * (x - a * mean) / (a**2 * std**2 + b**2))


def test_mixture_velocity_is_the_posterior_mean_velocity():
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for sigma in (0.05, 0.4, 0.9, 1.0):
        expected = (x - MIXTURE.x0(x, 1 - sigma, sigma)) / sigma
        torch.testing.assert_close(MIXTURE.velocity(x, sigma), expected)
    sigmas = torch.linspace(0.1, 1.0, 32, dtype=torch.float64)  # one σ per row
    torch.testing.assert_close(MIXTURE.velocity(x, sigmas)[5], MIXTURE.velocity(x[5:6], sigmas[5])[0])
    # the defining property of E[ε − x₀ | x_σ]: the residual has mean 0 and is uncorrelated with functions of x_σ
    g = torch.Generator().manual_seed(2)
    x0 = MIXTURE.sample(200_000, g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    for sigma in (0.3, 0.7):
        x_sigma = flow_interpolate(x0, noise, sigma)
        residual = flow_target(x0, noise) - MIXTURE.velocity(x_sigma, sigma)
        assert residual.mean(0).abs().max() < 0.02
        for feature in (x_sigma, x_sigma**2, torch.tanh(x_sigma)):
            feature = feature - feature.mean(0)
            assert (residual * feature).mean(0).abs().max() < 0.03
        # and it beats a wrong velocity (the marginal one at another σ) by a margin
        wrong = flow_target(x0, noise) - MIXTURE.velocity(x_sigma, sigma + 0.15)
        assert residual.pow(2).mean() < wrong.pow(2).mean() - 0.01


def test_mixture_eps_is_consistent_with_its_x0():
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for t in (5, 300, 900):
        alpha_bar = SCHEDULE.alphas_cumprod[t].double()
        a, b = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        torch.testing.assert_close(a * MIXTURE.x0(x, a, b) + b * MIXTURE.eps(x, t, SCHEDULE), x)  # x_t = a x̂₀ + b ε̂


def test_mixture_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"means must be \[K, d\]"):
        GaussianMixtureModel(means=[0.0, 1.0], stds=[1.0, 1.0])
    with pytest.raises(ValueError, match="stds must be positive"):
        GaussianMixtureModel(means=[[0.0], [1.0]], stds=[1.0, 0.0])
    for weights in ([1.0], [1.0, -1.0], [0.0, 0.0]):
        with pytest.raises(ValueError, match="weights"):
            GaussianMixtureModel(means=[[0.0], [1.0]], stds=[1.0, 1.0], weights=weights)
    assert torch.equal(GaussianMixtureModel([[0.0], [1.0]], 1.0, [1.0, 3.0]).weights, torch.tensor([0.25, 0.75], dtype=torch.float64))


def test_euler_on_the_exact_velocity_samples_the_mixture():
    n = 10_000
    x = S.sample(exact_velocity(), FlowMatchEulerSampler(), (n, 2), 100, generator=torch.Generator().manual_seed(0),
                 progress=False, dtype=torch.float64)
    mean, std = mixture_moments()
    # Monte-Carlo error of the moments ≈ std/√n ≈ 0.015, plus 100 Euler steps' bias (measured: all within 0.024)
    torch.testing.assert_close(x.mean(0), mean, rtol=0, atol=0.05)
    torch.testing.assert_close(x.std(0), std, rtol=0, atol=0.05)
    nearest = torch.cdist(x, MIXTURE.means).argmin(1)
    fractions = torch.bincount(nearest, minlength=3).double() / n
    torch.testing.assert_close(fractions, MIXTURE.weights, rtol=0, atol=0.02)  # measured within 0.008
    # inside each component the spread is its own std (the flow does not blur the modes together; measured within 2%)
    for k in range(3):
        spread = (x[nearest == k] - MIXTURE.means[k]).std().item()
        assert spread == pytest.approx(MIXTURE.stds[k].item(), rel=0.05)


@pytest.fixture(scope="module")
def flow_reference():
    """(noise, the exact flow's end point from it) for 256 starting points, by flow_ode_reference."""
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    reference = flow_ode_reference(MIXTURE.velocity, noise, steps=100)
    finer = flow_ode_reference(MIXTURE.velocity, noise, steps=200)
    assert (reference - finer).abs().max() < 1e-4  # RK4 has converged (the samplers' errors below are ≥ 4e-4)
    return noise, reference


def flow_errors(flow_reference, name, step_counts):
    noise, reference = flow_reference
    errors = {}
    for n in step_counts:
        x = S.sample(exact_velocity(), FLOW_SAMPLER_CLASSES[name](), noise.shape, n, noise=noise, progress=False,
                     dtype=torch.float64)
        errors[n] = (x - reference).abs().max().item()
    return errors


def test_flow_ode_reference_agrees_with_many_step_euler_at_first_order(flow_reference):
    errors = flow_errors(flow_reference, "euler", (25, 50, 100, 200))
    assert errors[200] < 0.06  # measured 0.044
    for n in (25, 50, 100):  # Euler is first order: twice the steps, half the error (measured ratios 2.0–2.3)
        assert 1.6 < errors[n] / errors[2 * n] < 2.7, errors


def test_flow_heun_converges_at_second_order_on_the_exact_velocity(flow_reference):
    euler, heun = flow_errors(flow_reference, "euler", (50, 100, 200)), flow_errors(flow_reference, "heun", (25, 50, 100))
    for n in (25, 50):
        assert 3.0 < heun[n] / heun[2 * n] < 5.0, heun  # ≈ 4 for a second-order method (measured 3.6–3.9)
    for n in (25, 50, 100):
        assert heun[n] < euler[2 * n] / 5, (heun, euler)  # far better than Euler at about the same number of calls


# ---------------------------------------------------------------------------------------------------
# EDM: preconditioning, the ε-network seen as a denoiser, Euler = DDIM, Heun's order, the ρ-schedule
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_edm_preconditioning_has_its_defining_properties(sigma_data):
    sigma = torch.logspace(-3, 2, 21, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma, sigma_data)
    torch.testing.assert_close(c_in**2 * (sigma**2 + sigma_data**2), torch.ones_like(sigma))  # unit-variance input
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    # the effective target F* = (x₀ − c_skip x)/c_out has unit variance when x₀ has std σ_d: its variance is
    # ((1 − c_skip)² σ_d² + c_skip² σ²)/c_out², which c_skip = σ_d²/(σ² + σ_d²) makes smallest
    torch.testing.assert_close(((1 - c_skip) ** 2 * sigma_data**2 + c_skip**2 * sigma**2) / c_out**2, torch.ones_like(sigma))
    for worse in (c_skip * 0.9, c_skip * 1.1):
        assert (((1 - worse) ** 2 * sigma_data**2 + worse**2 * sigma**2).sqrt() > c_out).all()
    # and numerically, on samples from a non-Gaussian x₀ of std σ_d (uniform on [−√3 σ_d, √3 σ_d])
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(200_000, generator=g, dtype=torch.float64) * 2 - 1) * math.sqrt(3) * sigma_data
    for s in (0.01, 0.3, 1.0, 5.0, 40.0):
        c_skip_s, c_out_s, c_in_s, _ = edm_preconditioning(s, sigma_data)
        x = x0 + s * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        assert ((x0 - c_skip_s * x) / c_out_s).std().item() == pytest.approx(1.0, abs=0.02)
        assert (c_in_s * x).std().item() == pytest.approx(1.0, abs=0.02)
    # as σ → 0 the denoiser is the identity: c_skip → 1, c_out → 0
    c_skip_0, c_out_0, _, _ = edm_preconditioning(1e-6, sigma_data)
    assert 1 - c_skip_0.item() < 1e-10 and 0 < c_out_0.item() < 1e-6
    assert c_skip.diff().lt(0).all() and edm_preconditioning(1e3, sigma_data)[1].item() == pytest.approx(sigma_data, rel=1e-6)


def test_vp_preconditioning_coefficients():
    table = S.sigma_table(SCHEDULE)
    for t in (0, 1, 250, 600, 999):
        c_skip, c_out, c_in, c_noise = vp_preconditioning(float(table[t]), SCHEDULE)
        assert c_skip.item() == 1 and c_out.item() == pytest.approx(-table[t], rel=1e-6)
        assert c_in.item() == pytest.approx(SCHEDULE.alphas_cumprod[t].sqrt().item(), rel=1e-6)  # x_t = √ᾱ x
        assert c_noise.item() == pytest.approx(t, abs=1e-3)
    between = math.sqrt(table[300] * table[301])  # halfway in log σ → halfway in t
    assert vp_preconditioning(between, SCHEDULE)[3].item() == pytest.approx(300.5, abs=1e-3)
    several = vp_preconditioning(torch.tensor([table[10], table[20]], dtype=torch.float64), SCHEDULE)[3]
    torch.testing.assert_close(several, torch.tensor([10.0, 20.0], dtype=torch.float64), rtol=0, atol=1e-3)


def eps_model(x_t, t):
    """The mixture's exact ε-prediction on SCHEDULE, as a model_fn, at integer timesteps: EDMDenoiser calls it at
    c_noise, which at a training σ is t only up to float rounding (1.9999996 for t = 2); rounding keeps these tests
    about the samplers, not about σ interpolation between training steps."""
    return MIXTURE.eps(x_t, torch.as_tensor(t).round(), SCHEDULE)


# EDMDenoiser hands its model_fn vp_preconditioning's c_noise, a hair below t at some training σ (32 of the 1000, e.g.
# 1.9999996 for t = 2): GaussianMixtureModel.eps must interpolate σ there (it once truncated to t − 1).
def test_edm_denoiser_of_the_mixtures_own_eps_is_exact_at_every_training_sigma():
    table = S.sigma_table(SCHEDULE)
    denoiser = EDMDenoiser(lambda x_t, t: MIXTURE.eps(x_t, t, SCHEDULE), SCHEDULE)
    g = torch.Generator().manual_seed(0)
    for t in range(0, T, 1):
        sigma = float(table[t])
        x = MIXTURE.sample(4, g) + sigma * torch.randn(4, 2, generator=g, dtype=torch.float64)
        torch.testing.assert_close(denoiser(x, sigma), MIXTURE.denoise(x, sigma), rtol=1e-5, atol=1e-5,
                                   msg=lambda m, t=t: f"t = {t}: {m}")


@pytest.mark.parametrize("t", [0, 10, 250, 600, 999])
def test_edm_denoiser_of_the_exact_eps_model_is_the_exact_denoiser(t):
    sigma = float(S.sigma_table(SCHEDULE)[t])  # a training timestep's σ, so the ε-model is called at exactly t
    g = torch.Generator().manual_seed(t)
    x = MIXTURE.sample(256, g) + sigma * torch.randn(256, 2, generator=g, dtype=torch.float64)
    denoiser = EDMDenoiser(eps_model, SCHEDULE)
    # σ and ᾱ come from float32 tables: D = x − σ ε̂ loses ~|x|·1e-7 to that rounding (|x| ≤ ~60 at t = 999)
    torch.testing.assert_close(denoiser(x, sigma), MIXTURE.denoise(x, sigma), rtol=1e-5, atol=1e-5)
    assert denoiser.sigma_min == pytest.approx(S.sigma_table(SCHEDULE)[0]) and denoiser.sigma_max == pytest.approx(
        S.sigma_table(SCHEDULE)[-1])


@pytest.mark.parametrize("num_steps", [1, 4, 10, 25])
def test_edm_euler_along_ddims_sigmas_is_ddim(num_steps):
    n = 256
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(num_steps), dtype=torch.float64)
    ddim = S.DDIMSampler(SCHEDULE)
    x_ddim = S.sample(eps_model, ddim, (n, 2), num_steps, noise=noise, progress=False, dtype=torch.float64)
    sigmas = S.sigma_table(SCHEDULE)[ddim.timesteps.numpy()].astype(np.float64)  # DDIM's t (leading) → σ, then 0
    # DDIM starts at x_T = ε; in EDM's x = x_t √(1 + σ²) = x₀ + σ ε that is noise·√(1 + σ₀²), and edm_heun_sample
    # starts at σ₀·noise: hand it noise·√(1 + σ₀²)/σ₀
    start = noise * math.sqrt(1 + sigmas[0] ** 2) / sigmas[0]
    x_edm, calls = edm_heun_sample(EDMDenoiser(eps_model, SCHEDULE), sigmas, start, heun=False)
    assert calls == num_steps
    torch.testing.assert_close(x_edm, x_ddim, rtol=1e-5, atol=1e-5)
    x_heun, heun_calls = edm_heun_sample(EDMDenoiser(eps_model, SCHEDULE), sigmas, start)
    assert heun_calls == 2 * num_steps - 1  # Heun corrects every step but the last, to σ = 0


def test_edm_heun_error_falls_faster_than_eulers_with_the_number_of_calls():
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma_min, sigma_max = 0.002, 80.0
    reference, _ = edm_heun_sample(MIXTURE.denoise, edm_sigmas(1024, sigma_min, sigma_max), noise)
    finer, _ = edm_heun_sample(MIXTURE.denoise, edm_sigmas(2048, sigma_min, sigma_max), noise)
    assert (reference - finer).abs().max() < 1e-4  # measured 4e-5, against errors ≥ 8e-3 below

    def slope(heun, steps):
        calls, errors = [], []
        for n in steps:
            x, nfe = edm_heun_sample(MIXTURE.denoise, edm_sigmas(n, sigma_min, sigma_max), noise, heun=heun)
            calls.append(nfe)
            errors.append((x - reference).abs().max().item())
        return np.polyfit(np.log(calls), np.log(errors), 1)[0], errors

    euler_slope, euler_errors = slope(False, (16, 32, 64, 128))
    heun_slope, heun_errors = slope(True, (8, 16, 32, 64))
    # Euler's error falls as NFE⁻¹, Heun's as NFE⁻² (measured slopes: −0.88 and −2.2)
    assert -1.5 < euler_slope < -0.6, euler_errors
    assert heun_slope < euler_slope - 0.5, (heun_errors, euler_errors)
    assert heun_errors[-1] < euler_errors[-1]  # 127 Heun calls beat 128 Euler calls


def test_edm_heun_sample_takes_sigmas_ending_in_zero_and_refuses_bad_ones():
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a, calls_a = edm_heun_sample(MIXTURE.denoise, [10.0, 1.0, 0.1], noise)
    b, calls_b = edm_heun_sample(MIXTURE.denoise, torch.tensor([10.0, 1.0, 0.1, 0.0], dtype=torch.float64), noise)
    assert torch.equal(a, b) and calls_a == calls_b == 5
    assert a.dtype == noise.dtype
    _, calls = edm_heun_sample(MIXTURE.denoise, [10.0], noise)
    assert calls == 1
    for bad in ([], [1.0, 2.0], [1.0, 1.0, 0.0], [1.0, -0.5]):
        with pytest.raises(ValueError, match="descending"):
            edm_heun_sample(MIXTURE.denoise, bad, noise)


def test_edm_sigmas_run_from_sigma_max_to_sigma_min():
    for n, rho in ((2, 7.0), (10, 7.0), (50, 3.0)):
        sigmas = edm_sigmas(n, 0.002, 80.0, rho)
        assert sigmas.shape == (n,) and sigmas.dtype == torch.float64
        assert sigmas[0].item() == pytest.approx(80.0, rel=1e-12) and sigmas[-1].item() == pytest.approx(0.002, rel=1e-9)
        assert (sigmas.diff() < 0).all()
        root = sigmas ** (1 / rho)  # evenly spaced in σ^{1/ρ}
        torch.testing.assert_close(root.diff(), root.diff().mean().expand(n - 1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(edm_sigmas(5, 1.0, 5.0, rho=1.0), torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    ratios = edm_sigmas(6, 0.01, 100.0, rho=1e4).log().diff()  # ρ → ∞: evenly spaced in log σ
    torch.testing.assert_close(ratios, ratios.mean().expand(5), rtol=1e-3, atol=0)
    # ρ = 7 makes the steps shorter as σ falls (uniform σ would not): most of them in the lower half of [σ_min, σ_max]
    steps = edm_sigmas(20, 0.002, 80.0).diff().abs()
    assert (steps.diff() < 0).all() and (edm_sigmas(20, 0.002, 80.0) < 40.0).sum() > 14
    assert torch.equal(edm_sigmas(1, 0.002, 80.0), torch.tensor([80.0], dtype=torch.float64))
    for n in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="n must be a positive integer"):
            edm_sigmas(n, 0.002, 80.0)
    for lo, hi in ((0.0, 80.0), (-1.0, 80.0), (80.0, 80.0), (90.0, 80.0)):
        with pytest.raises(ValueError, match="0 < sigma_min < sigma_max"):
            edm_sigmas(10, lo, hi)


# ---------------------------------------------------------------------------------------------------
# Training and shipping a flow model
# ---------------------------------------------------------------------------------------------------
TINY_VAE = VAEConfig(base_channels=8, channel_multipliers=(1, 2, 2), num_res_blocks=(0, 1, 1), norm_groups=4)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return VAE(TINY_VAE).eval()


@pytest.fixture(scope="module")
def text_encoder():
    torch.manual_seed(1)
    return TextEncoder(TextEncoderConfig(width=16, depth=1, heads=2)).eval()


def flow_config(**kwargs):
    return DenoiserConfig(**{"width": 32, "depth": 1, "heads": 2, "text_dim": 16, "frequency_dim": 32,
                             "prediction_type": "flow", **kwargs})


def test_latent_batches_for_a_flow_have_logit_normal_float_timesteps(vae):
    flow = latent_batch_fn(vae, SCHEDULE, 256, seed=0, window=64, refresh=4, timesteps="logit_normal")(0)["t"]
    assert flow.shape == (256,) and flow.is_floating_point()
    assert (flow > 0).all() and (flow < T).all() and (flow != flow.round()).any()
    assert abs(flow.median().item() - T / 2) < 100  # centred on σ = ½
    uniform = latent_batch_fn(vae, SCHEDULE, 256, seed=0, window=64, refresh=4)(0)["t"]
    assert not uniform.is_floating_point() and 0 <= uniform.min() and uniform.max() < T
    with pytest.raises(ValueError, match="timesteps must be 'uniform'"):
        latent_batch_fn(vae, SCHEDULE, 8, seed=0, window=64, refresh=4, timesteps="bogus")


def test_train_flow_writes_flow_files_that_load_back(tmp_path, vae, text_encoder):
    model, result = train_flow(tmp_path, steps=2, device="cpu", vae=vae, text_encoder=text_encoder, config=flow_config(),
                               eval_images=0, latent_window=64, latent_refresh=4, batch_size=8, progress=False)
    assert result.step == 2 and all(math.isfinite(loss) for loss in result.losses)
    assert model.config.prediction_type == "flow"
    assert (tmp_path / "flow.safetensors").is_file() and (tmp_path / "flow.json").is_file()
    assert not (tmp_path / "denoiser.safetensors").exists()
    loaded = load_flow(tmp_path)
    assert loaded.config == model.config and not loaded.training
    assert loaded.training_info["steps"] == 2 and loaded.schedule_name == "scaled_linear"
    for k, v in model.state_dict().items():  # the EMA weights, stored in float16
        torch.testing.assert_close(loaded.state_dict()[k], v.half().float(), rtol=0, atol=0)
    assert json.loads((tmp_path / "flow.json").read_text())["kind"] == "flow"


def test_train_denoiser_keeps_the_flow_name_and_objective_together(tmp_path):
    for kwargs in ({"denoiser": "flow", "prediction_type": "epsilon"}, {"denoiser": "dit", "prediction_type": "flow"}):
        with pytest.raises(ValueError, match="denoiser='flow' is the DiT trained with prediction_type 'flow'"):
            train_denoiser(tmp_path, steps=1, device="cpu", progress=False, **kwargs)
    with pytest.raises(ValueError, match="config.prediction_type is 'epsilon'"):
        train_flow(tmp_path, steps=1, device="cpu", progress=False, config=flow_config(prediction_type="epsilon"))
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_save_and_load_flow_refuse_a_model_of_the_other_objective(tmp_path):
    with pytest.raises(ValueError, match="save_flow writes a flow model"):
        save_flow(randomised_denoiser("epsilon"), tmp_path / "flow")
    assert not (tmp_path / "flow.safetensors").exists()
    save_denoiser(randomised_denoiser("epsilon"), tmp_path / "flow")  # an ε-model's files under the flow's name
    with pytest.raises(CheckpointError, match="'denoiser' model, not a 'flow'"):
        load_flow(tmp_path)
    # a file of kind "flow" whose config says ε (edited by hand): refused too
    other = tmp_path / "edited"
    save_flow(randomised_denoiser("flow"), other / "flow")
    info = json.loads((other / "flow.json").read_text())
    info["model_config"]["prediction_type"] = "epsilon"
    (other / "flow.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="prediction_type 'epsilon', not a flow model"):
        load_flow(other)


@pytest.fixture(scope="module")
def flow_weights(tmp_path_factory):
    """A folder as `train all` + `train flow` write it: vae, clip and flow (tiny random models)."""
    folder = tmp_path_factory.mktemp("flow_weights")
    save_vae(tiny_vae(), folder / "vae")
    save_clip(tiny_clip(), folder / "clip")
    record = {"source": str(folder / "clip.safetensors"), "sha256": file_sha256(folder / "clip.safetensors")}
    save_flow(tiny_denoiser("flow", 32), folder / "flow", text_encoder=record)
    return folder


def test_load_pipeline_with_the_flow_denoiser_draws_images(flow_weights):
    pipe = load_pipeline(flow_weights, denoiser="flow")
    assert pipe.is_flow and pipe.default_sampler == "euler"
    images = pipe(PROMPT, num_inference_steps=2, seed=0, progress=False)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_load_pipeline_without_a_flow_model_says_how_to_train_one(tmp_path):
    save_vae(tiny_vae(), tmp_path / "vae")
    save_clip(tiny_clip(), tmp_path / "clip")
    with pytest.raises(CheckpointError, match="python -m sdlearn train flow"):
        load_pipeline(tmp_path, denoiser="flow")


@pytest.mark.parametrize("sampler", [None, "heun"])
def test_generate_denoiser_flow_writes_a_png(flow_weights, tmp_path, capsys, sampler):
    out = tmp_path / "grid.png"
    argv = ["generate", PROMPT, "--denoiser", "flow", "--weights", str(flow_weights), "--steps", "2", "--out", str(out)]
    assert main(argv + (["--sampler", sampler] if sampler else [])) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out


def test_flow_matched_timesteps_are_a_logit_normal_flows_noise_levels_and_weights():
    schedule = NoiseSchedule.from_name("scaled_linear")
    t, weight = flow_matched_timesteps(schedule, 200_000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) <= 999
    log_snr = schedule.log_snr(t)
    # log SNR ~ N(0, 2²) to within a level's spacing: median 0, and P(log SNR < 2) = Φ(1)
    assert abs(log_snr.median().item()) < 0.05 and abs((log_snr < 2).float().mean().item() - 0.8413) < 0.01
    snr = schedule.snr(t).double()
    expected = (1 + snr.rsqrt()) ** 2 / (1 + 2 * math.exp(0.5) + math.exp(2))  # 1/(1 − σ)², normalised
    assert torch.allclose(weight.double(), expected, rtol=1e-5)
    assert 0.85 < weight.mean().item() < 1.05  # about 1: the clamped tail at t = 999 takes a little
    high = weight[t > 800].sum() / weight.sum()  # the flow's weighting puts far more of the loss at high noise
    assert high > 0.35 and (t > 800).float().mean() < 0.2
    again, _ = flow_matched_timesteps(schedule, 16, torch.Generator().manual_seed(1))
    assert torch.equal(again, flow_matched_timesteps(schedule, 16, torch.Generator().manual_seed(1))[0])
    for bad in ({"n": 0}, {"n": 4, "std": 0}):
        with pytest.raises(ValueError, match="n must be|std must be"):
            flow_matched_timesteps(schedule, **{"n": 4, **bad})
