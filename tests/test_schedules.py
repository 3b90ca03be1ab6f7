"""Noise schedules and the forward process: parity with diffusers, statistics, bad input."""

import math

import pytest
import torch

from sdlearn import schedules
from sdlearn.schedules import (
    DEFAULT_BETA_RANGE,
    PREDICTION_TYPES,
    NoiseSchedule,
    check_prediction_type,
    convert_prediction,
    convert_prediction_alpha_sigma,
    make_betas,
    rescale_zero_terminal_snr,
)

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
        torch.testing.assert_close(schedule.to_x0(output, t, x_t, kind), x0, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(schedule.to_eps(output, t, x_t, kind), eps, atol=1e-3, rtol=1e-3)
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
        (lambda: NoiseSchedule.from_name().to_x0(torch.zeros(1), 0, torch.zeros(1), "noise"), "epsilon, v_prediction, sample"),
        (lambda: convert_prediction(torch.zeros(1), 0.5, torch.zeros(1), "noise"), "epsilon, v_prediction, sample"),
        (lambda: check_prediction_type("eps"), "epsilon, v_prediction, sample"),
    ],
)
def test_bad_input_says_what_is_allowed(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------------
# One conversion between ε, x₀ and v; argument order; deprecated forms
# ---------------------------------------------------------------------------------------------------
def noisy_batch(schedule, seed=3):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    t = torch.tensor([3, 200, 600, 900])
    return x0, eps, t, schedule.add_noise(x0, eps, t)


def test_convert_prediction_recovers_x0_and_eps_from_every_prediction_type():
    schedule = NoiseSchedule.from_name("cosine")
    x0, eps, t, x_t = noisy_batch(schedule)
    alpha_bar = schedule.alpha_bar(t)  # [B]: lined up with the batch, as t is
    for kind in PREDICTION_TYPES:
        x0_hat, eps_hat = convert_prediction(schedule.target(x0, eps, t, kind), alpha_bar, x_t, kind)
        torch.testing.assert_close(x0_hat, x0, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(eps_hat, eps, atol=1e-3, rtol=1e-3)
        # the schedule's methods are the same function, to the bit
        assert torch.equal(schedule.to_x0(schedule.target(x0, eps, t, kind), t, x_t, kind), x0_hat)
        assert torch.equal(schedule.to_eps(schedule.target(x0, eps, t, kind), t, x_t, kind), eps_hat)


def test_convert_prediction_takes_numbers_scalars_and_broadcast_shapes():
    schedule = NoiseSchedule.from_name("scaled_linear")
    x0, eps, _, _ = noisy_batch(schedule)
    x_t = schedule.add_noise(x0, eps, 500)
    a = schedule.alpha_bar(500)
    expected = schedule.x0_from_eps(x_t, eps, 500)
    for alpha_bar in (a, a.item(), a.reshape(1, 1, 1, 1), a.repeat(4), a.repeat(4).reshape(4, 1, 1, 1)):
        torch.testing.assert_close(convert_prediction(eps, alpha_bar, x_t)[0], expected)
    # float64 in, float64 out; the coefficients are computed in ᾱ's dtype
    assert convert_prediction(eps.double(), a, x_t.double())[0].dtype == torch.float64


def test_sigma_view_conversion_agrees_with_the_variance_preserving_one():
    """Karras's x = x_t / √ᾱ = x₀ + σ ε (α = 1, σ = √((1 − ᾱ)/ᾱ)) reads every output as x_t does."""
    schedule = NoiseSchedule.from_name("scaled_linear")
    x0, eps, t, x_t = noisy_batch(schedule)
    a = schedule.alpha_bar(t).double().reshape(-1, 1, 1, 1)
    sigma = ((1 - a) / a).sqrt()
    x = x_t.double() / a.sqrt()
    for kind in PREDICTION_TYPES:
        output = schedule.target(x0, eps, t, kind).double()
        vp = convert_prediction(output, a, x_t.double(), kind)
        ve = convert_prediction_alpha_sigma(output, 1, sigma, x, kind, variance_preserving=False)
        for got, want in zip(ve, vp):
            torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


def test_eps_prediction_at_zero_snr_gives_nan_and_v_prediction_is_exact():
    schedule = NoiseSchedule.from_name("scaled_linear", zero_terminal_snr=True)
    x0, eps, _, _ = noisy_batch(schedule)
    t = torch.full((4,), 999)
    x_t = schedule.add_noise(x0, eps, t)
    assert torch.equal(x_t, eps)
    assert schedule.to_x0(eps, t, x_t, "epsilon").isnan().all()  # ε says nothing about x₀ at ᾱ = 0
    assert torch.equal(schedule.to_x0(schedule.velocity(x0, eps, t), t, x_t, "v_prediction"), x0)


def test_every_conversion_goes_through_the_one_function(monkeypatch):
    calls = []
    original = schedules.convert_prediction_alpha_sigma

    def counting(*args, **kwargs):
        calls.append(args[4] if len(args) > 4 else kwargs.get("prediction_type", "epsilon"))
        return original(*args, **kwargs)

    monkeypatch.setattr(schedules, "convert_prediction_alpha_sigma", counting)
    schedule = NoiseSchedule.from_name("scaled_linear")
    x0, eps, t, x_t = noisy_batch(schedule)
    schedule.x0_from_eps(x_t, eps, t)
    schedule.eps_from_x0(x_t, x0, t)
    schedule.x0_from_v(x_t, eps, t)
    schedule.eps_from_v(x_t, eps, t)
    schedule.to_x0(eps, t, x_t, "sample")
    schedule.to_eps(eps, t, x_t, "v_prediction")
    convert_prediction(eps, 0.5, x_t, "epsilon")
    assert calls == ["epsilon", "sample", "v_prediction", "v_prediction", "sample", "v_prediction", "epsilon"]


@pytest.mark.parametrize("method", ["to_x0", "to_eps"])
@pytest.mark.parametrize("t", [torch.tensor([3, 200, 600, 900]), 250])
def test_former_argument_order_still_works_with_a_deprecation_warning(method, t):
    schedule = NoiseSchedule.from_name("scaled_linear")
    x0, eps, _, _ = noisy_batch(schedule)
    x_t = schedule.add_noise(x0, eps, t)
    v = schedule.velocity(x0, eps, t)
    new = getattr(schedule, method)(v, t, x_t, "v_prediction")
    with pytest.warns(DeprecationWarning, match=rf"{method}\(model_output, t, x_t, prediction_type\)") as caught:
        old = getattr(schedule, method)(v, x_t, t, "v_prediction")
    assert caught[0].filename == __file__  # stacklevel points at the caller
    assert torch.equal(old, new)
    # keywords are unambiguous in either order
    assert torch.equal(getattr(schedule, method)(v, x_t=x_t, t=t, prediction_type="v_prediction"), new)


def test_default_beta_range_is_public_and_the_private_name_is_deprecated():
    assert make_betas("linear")[0].item() == pytest.approx(DEFAULT_BETA_RANGE["linear"][0])
    with pytest.warns(DeprecationWarning, match="DEFAULT_BETA_RANGE"):
        from sdlearn.schedules import _DEFAULT_RANGE
    assert _DEFAULT_RANGE is DEFAULT_BETA_RANGE
    with pytest.raises(AttributeError):
        schedules.no_such_name  # noqa: B018

