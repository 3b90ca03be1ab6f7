"""Checkers of notebook 05, training: the diffusion loss, the EMA update, the v-prediction target.

In the order the notebook uses them: ``check_diffusion_loss``, ``check_ema_update``, ``check_v_target``.
"""

from __future__ import annotations

import torch

from sdlearn.exercises.framework import (
    Case,
    Checker,
    DictChecker,
    Mistake,
    per_sample,
    register,
    sd_alphas_cumprod,
)


def _diffusion_toy_model(x_t, t):
    """A deterministic stand-in for ε_θ(x_t, t): any change in what it is fed changes its output."""
    t = torch.as_tensor(t, dtype=x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))  # [B, 1, 1, 1]
    return 0.9 * torch.tanh(x_t) + 1e-4 * t


def _diffusion_loss_reference(model, x0, noise, t, alphas_cumprod, target="noise", noised="sqrt", reduce="mean"):
    a = per_sample(alphas_cumprod[t], x0)  # [B, 1, 1, 1]
    if noised == "sqrt":
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise  # Ho et al. 2020, eq. 4
    elif noised == "no sqrt":
        x_t = a * x0 + (1 - a) * noise
    else:  # the clean input itself
        x_t = x0
    error = (model(x_t, t) - (noise if target == "noise" else x0)) ** 2
    return error.mean() if reduce == "mean" else error.sum()


def _diffusion_loss_cases(g):
    ac = sd_alphas_cumprod()
    cases = []
    for B, ts in ((4, (10, 250, 500, 999)), (2, (0, 0)), (3, (999, 998, 1)), (8, None)):
        x0 = torch.randn(B, 4, 8, 8, generator=g)
        t = torch.tensor(ts) if ts is not None else torch.randint(1000, (B,), generator=g)
        cases.append(Case(f"x0 and noise of shape [{B}, 4, 8, 8], t = {t.tolist()}, Stable Diffusion's alphas_cumprod [1000], "
                          "model = a toy ε-predictor", (_diffusion_toy_model, x0, torch.randn(B, 4, 8, 8, generator=g), t, ac)))
    return cases


check_diffusion_loss = register(Checker(
    name="check_diffusion_loss",
    signature="fn(model, x0, noise, t, alphas_cumprod) -> loss",
    doc="the training loss of one batch (Ho et al. 2020, eq. 14, \"L_simple\"): noise the clean latents, "
        "x_t = √ᾱ_t x0 + √(1 − ᾱ_t) noise with ᾱ_t = alphas_cumprod[t] per sample, call ``model(x_t, t)`` once, and return "
        "the mean squared error between its prediction and ``noise`` as a 0-d tensor (so that ``loss.backward()`` works). "
        "``x0`` and ``noise`` are [B, C, H, W], ``t`` a long tensor [B], ``alphas_cumprod`` [T].",
    reference=_diffusion_loss_reference,
    make_cases=_diffusion_loss_cases,
    hint="a = alphas_cumprod[t].reshape(-1, 1, 1, 1); x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise; then "
         "((model(x_t, t) - noise) ** 2).mean() (or torch.nn.functional.mse_loss).",
    mistakes=(
        Mistake(lambda m, x0, n, t, ac: _diffusion_loss_reference(m, x0, n, t, ac, target="x0"),
                "you compared the prediction with x0: this objective's target is the noise ε that was added"),
        Mistake(lambda m, x0, n, t, ac: _diffusion_loss_reference(m, x0, n, t, ac, noised="clean"),
                "you fed the model the clean x0: it must see the noisy x_t, or it has nothing to find the noise in"),
        Mistake(lambda m, x0, n, t, ac: _diffusion_loss_reference(m, x0, n, t, ac, noised="no sqrt"),
                "you noised with ᾱ_t x0 + (1 − ᾱ_t) noise: the coefficients are the square roots, √ᾱ_t and √(1 − ᾱ_t), "
                "so that x_t keeps unit variance"),
        Mistake(lambda m, x0, n, t, ac: _diffusion_loss_reference(m, x0, n, t, ac, reduce="sum"),
                "you summed the squared errors: take their mean, so the loss (and the learning rate that suits it) "
                "does not depend on the batch size or the latent's size"),
    ),
))


def _ema_update_reference(ema_params, params, decay):
    return {name: decay * ema_params[name] + (1 - decay) * params[name] for name in ema_params}


def _ema_update_cases(g):
    cases = []
    for decay, shapes in ((0.9, {"weight": (3, 4), "bias": (4,)}), (0.999, {"linear.weight": (8, 8)}),
                          (0.99, {"a": (2, 3, 4), "b": (5,), "c": ()}), (0.0, {"weight": (2, 2)})):
        ema = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        params = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        listed = ", ".join(f"{k!r}: [{', '.join(map(str, s))}]" for k, s in shapes.items())
        cases.append(Case(f"ema_params and params with entries {{{listed}}}, decay = {decay}", (ema, params, decay)))
    return cases


check_ema_update = register(DictChecker(
    name="check_ema_update",
    signature="fn(ema_params, params, decay) -> new_ema_params",
    doc="one update of an exponential moving average of the weights (Polyak & Juditsky 1992): for every name, "
        "θ̄ ← decay · θ̄ + (1 − decay) · θ. ``ema_params`` and ``params`` are dicts name → tensor with the same keys "
        "and shapes (like a state dict), ``decay`` a float in [0, 1); return the new dict.",
    reference=_ema_update_reference,
    make_cases=_ema_update_cases,
    hint="{name: decay * ema_params[name] + (1 - decay) * params[name] for name in ema_params}: the average keeps "
         "most of itself and takes a small step (1 − decay) towards the current weights.",
    mistakes=(
        Mistake(lambda ema, params, d: _ema_update_reference(params, ema, d),
                "you swapped the two: decay multiplies the old average θ̄, and only (1 − decay) goes to the new weights θ"),
        Mistake(lambda ema, params, d: {k: d * ema[k] + params[k] for k in ema},
                "you added the whole of θ: its weight is (1 − decay), so that the weights of the average sum to 1"),
        Mistake(lambda ema, params, d: {k: v.clone() for k, v in params.items()},
                "you returned the current weights θ: the average moves only a step (1 − decay) towards them"),
    ),
))


def _v_target_reference(x0, noise, alpha_bar_t):
    a = per_sample(alpha_bar_t, x0)  # [B, 1, 1, 1]
    return a.sqrt() * noise - (1 - a).sqrt() * x0  # Salimans & Ho 2022, §4


def _v_target_cases(g):
    cases = []
    for abar in ((0.5, 0.9, 0.01, 0.999), (1.0, 0.0), (0.3,), (0.0047, 0.25, 0.75)):
        B = len(abar)
        x0, noise = torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 4, 8, 8, generator=g)
        cases.append(Case(f"x0 and noise of shape [{B}, 4, 8, 8], alpha_bar_t = {list(abar)}",
                          (x0, noise, torch.tensor(abar))))
    return cases


check_v_target = register(Checker(
    name="check_v_target",
    signature="fn(x0, noise, alpha_bar_t) -> v",
    doc="the v-prediction target (Salimans & Ho 2022, §4): v = √ᾱ_t · ε − √(1 − ᾱ_t) · x0, per sample. ``x0`` and "
        "``noise`` (ε) are [B, C, H, W]; ``alpha_bar_t`` [B] holds each sample's ᾱ_t.",
    reference=_v_target_reference,
    make_cases=_v_target_cases,
    hint="a = alpha_bar_t.reshape(-1, 1, 1, 1); return a.sqrt() * noise - (1 - a).sqrt() * x0. Check the ends: "
         "at ᾱ = 1 (no noise) v is ε, at ᾱ = 0 (pure noise) v is −x0.",
    mistakes=(
        Mistake(lambda x0, n, a: -_v_target_reference(x0, n, a),
                "you returned −v = √(1 − ᾱ) x0 − √ᾱ ε: the signs are the other way round (v = √ᾱ ε − √(1 − ᾱ) x0)"),
        Mistake(lambda x0, n, a: per_sample((1 - a).sqrt(), x0) * n - per_sample(a.sqrt(), x0) * x0,
                "you swapped the coefficients: ε is multiplied by √ᾱ (the signal's coefficient) and x0 by √(1 − ᾱ)"),
        Mistake(lambda x0, n, a: per_sample(a, x0) * n - per_sample(1 - a, x0) * x0,
                "you left out the square roots: v = √ᾱ ε − √(1 − ᾱ) x0"),
        Mistake(lambda x0, n, a: per_sample(a.sqrt(), x0) * x0 + per_sample((1 - a).sqrt(), x0) * n,
                "you returned the noisy latent x_t = √ᾱ x0 + √(1 − ᾱ) ε: v is the velocity, √ᾱ ε − √(1 − ᾱ) x0"),
    ),
))
