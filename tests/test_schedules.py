"""Noise schedules and the forward process: parity with diffusers, statistics, bad input."""

import math

import pytest
import torch

from sdlearn.schedules import NoiseSchedule, make_betas, rescale_zero_terminal_snr

diffusers = pytest.importorskip("diffusers")

# (our name, diffusers' name, beta_start, beta_end)
CASES = [
    ("linear", "linear", 1e-4, 0.02),
    ("scaled_linear", "scaled_linear", 0.00085, 0.012),
    ("cosine", "squaredcos_cap_v2", 1e-4, 0.02),
    ("sigmoid", "sigmoid", 1e-4, 0.02),
]


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("T", [1000, 50])
@pytest.mark.parametrize("ours,theirs,start,end", CASES)
def test_matches_diffusers_ddpm_scheduler(ours, theirs, start, end, T, zero_snr):
    reference = diffusers.DDPMScheduler(
        num_train_timesteps=T, beta_schedule=theirs, beta_start=start, beta_end=end, rescale_betas_zero_snr=zero_snr
    )
    schedule = NoiseSchedule.from_name(ours, num_train_timesteps=T, beta_start=start, beta_end=end, zero_terminal_snr=zero_snr)
    torch.testing.assert_close(schedule.betas, reference.betas, atol=1e-6, rtol=0)
    torch.testing.assert_close(schedule.alphas, reference.alphas, atol=1e-6, rtol=0)
    torch.testing.assert_close(schedule.alphas_cumprod, reference.alphas_cumprod, atol=1e-6, rtol=0)


def test_default_is_stable_diffusion():
    betas = make_betas()
    assert betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(0.00085, rel=1e-5)
    assert betas[-1].item() == pytest.approx(0.012, rel=1e-5)


def test_add_noise_matches_diffusers():
    reference = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    schedule = NoiseSchedule.from_name("scaled_linear")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    torch.testing.assert_close(schedule.add_noise(x0, noise, t), reference.add_noise(x0, noise, t), atol=1e-6, rtol=0)
    torch.testing.assert_close(schedule.velocity(x0, noise, t), reference.get_velocity(x0, noise, t), atol=1e-6, rtol=0)


@pytest.mark.parametrize("t", [0, 100, 500, 999])
def test_add_noise_mean_and_variance(t):
    """x_t | x_0 ~ N(√ᾱ_t x_0, (1 − ᾱ_t) I): check both moments empirically."""
    schedule = NoiseSchedule.from_name("linear")
    g = torch.Generator().manual_seed(t)
    x0 = torch.full((200_000,), 0.7)
    x_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=g), t)
    a = schedule.alphas_cumprod[t].item()
    assert x_t.mean().item() == pytest.approx(math.sqrt(a) * 0.7, abs=0.01)
    assert x_t.var().item() == pytest.approx(1 - a, abs=0.01 * max(1 - a, 0.01) + 1e-4)


def test_step_by_step_equals_closed_form_in_distribution():
    """Applying q(x_t | x_{t-1}) t times gives the same distribution as one jump with ᾱ_t."""
    schedule = NoiseSchedule.from_name("linear", num_train_timesteps=100)
    g = torch.Generator().manual_seed(1)
    x0 = torch.full((100_000,), -0.5)
    x = x0.clone()
    for t in range(60):
        x = schedule.forward_step(x, torch.randn(x.shape, generator=g), t)
    a = schedule.alphas_cumprod[59].item()
    assert x.mean().item() == pytest.approx(math.sqrt(a) * -0.5, abs=0.01)
    assert x.std().item() == pytest.approx(math.sqrt(1 - a), abs=0.01)


def test_conversions_round_trip():
    schedule = NoiseSchedule.from_name("cosine")
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    t = torch.tensor([3, 200, 600, 900])
    x_t = schedule.add_noise(x0, eps, t)
    v = schedule.velocity(x0, eps, t)
    for got, want in [
        (schedule.x0_from_eps(x_t, eps, t), x0),
        (schedule.eps_from_x0(x_t, x0, t), eps),
        (schedule.x0_from_v(x_t, v, t), x0),
        (schedule.eps_from_v(x_t, v, t), eps),
        (schedule.v_from_eps(x_t, eps, t), v),
    ]:
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    for kind, output in [("epsilon", eps), ("v_prediction", v), ("sample", x0)]:
        torch.testing.assert_close(schedule.to_x0(output, x_t, t, kind), x0, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(schedule.to_eps(output, x_t, t, kind), eps, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(schedule.target(x0, eps, t, kind), output)


def test_snr_is_decreasing_and_zero_terminal():
    schedule = NoiseSchedule.from_name("scaled_linear")
    snr = schedule.snr()
    assert (snr[1:] < snr[:-1]).all()
    rescaled = NoiseSchedule(rescale_zero_terminal_snr(schedule.betas))
    assert rescaled.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert rescaled.snr(999).item() == pytest.approx(0.0, abs=1e-12)
    assert rescaled.alphas_cumprod[0].item() == pytest.approx(schedule.alphas_cumprod[0].item(), rel=1e-5)
    assert torch.isneginf(rescaled.log_snr()[-1])


def test_problems_detects_broken_schedules():
    assert NoiseSchedule.from_name("scaled_linear").problems() == []
    backwards = NoiseSchedule(make_betas("linear").flip(0))
    assert any("decreases" in p for p in backwards.problems())
    starts_at_one = NoiseSchedule(torch.linspace(1.0, 0.02, 1000))
    assert any("first step" in p for p in starts_at_one.problems())


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: make_betas("quadratic"), "linear, scaled_linear, cosine, sigmoid"),
        (lambda: make_betas("linear", num_train_timesteps=0), "positive integer"),
        (lambda: make_betas("linear", beta_start=-0.1), r"\(0, 1\]"),
        (lambda: NoiseSchedule([]), "non-empty"),
        (lambda: NoiseSchedule([0.1, 1.5]), r"\[0, 1\]"),
        (lambda: NoiseSchedule.from_name().add_noise(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1000])), r"\[0, 1000\)"),
        (lambda: NoiseSchedule.from_name().add_noise(torch.zeros(2, 3), torch.zeros(2, 4), 0), "shape"),
        (lambda: NoiseSchedule.from_name().to_x0(torch.zeros(1), torch.zeros(1), 0, "noise"), "epsilon, v_prediction, sample"),
    ],
)
def test_bad_input_says_what_is_allowed(call, match):
    with pytest.raises(ValueError, match=match):
        call()
