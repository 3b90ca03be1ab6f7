"""Starting from given latents, DDIM inversion, inversion-based editing and the ControlNet plumbing of the pipeline.

Tiny randomly initialised models throughout (nothing here depends on training). A random tiny denoiser still
defines a smooth ODE, so DDIM inversion must undo DDIM sampling as it does for a trained one.
"""

import pytest
import torch

from sdlearn.control import ControlNet, edge_map
from sdlearn.denoiser import Denoiser, DenoiserConfig
from sdlearn.pipeline import LatentDiffusionPipeline
from sdlearn.text import TextEncoderConfig, TinyCLIP, TinyCLIPConfig, Tokenizer
from sdlearn.vae import VAE, VAEConfig

PROMPT = "a large red circle in the top left"
OTHER = "a small blue square in the bottom right"


def tiny_denoiser(depth: int = 2, prediction_type: str = "epsilon") -> Denoiser:
    """A random DiT whose output depends on its inputs (adaLN-Zero's zero layers get small random weights)."""
    torch.manual_seed(1)
    denoiser = Denoiser(DenoiserConfig(width=32, depth=depth, heads=2, text_dim=32, frequency_dim=32,
                                       prediction_type=prediction_type))
    with torch.no_grad():
        for p in denoiser.parameters():
            if p.dim() >= 2 and p.abs().max() == 0:
                p.normal_(std=0.05)
    return denoiser.eval()


def tiny_pipe(prediction_type: str = "epsilon") -> LatentDiffusionPipeline:
    torch.manual_seed(2)
    clip = TinyCLIP(TinyCLIPConfig(text=TextEncoderConfig(width=32, depth=1, heads=2), image_channels=(8, 16),
                                   embed_dim=16)).eval()
    torch.manual_seed(3)
    vae = VAE(VAEConfig(base_channels=8, num_res_blocks=0)).eval()
    return LatentDiffusionPipeline(vae, clip.text_encoder, Tokenizer(), tiny_denoiser(prediction_type=prediction_type))


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipe()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1], read in [0, 1]."""
    mse = (((a + 1) / 2 - (b + 1) / 2) ** 2).mean().item()
    return 10 * torch.log10(torch.tensor(1 / max(mse, 1e-12))).item()


def shapes(n: int = 2) -> torch.Tensor:
    from sdlearn.data import ShapesDataset

    return ShapesDataset(n, "train", seed=7).batch(range(n)).images  # [n, 3, 32, 32]


RUN = {"num_inference_steps": 10, "progress": False}

# ------------------------------------------------------------------------------------------------------------
# latents=


@pytest.mark.parametrize("sampler", ["ddim", "euler", "ddpm"])
def test_latents_are_x_T_exactly_as_drawn_noise_is(pipe, sampler):
    """The latents replace the noise a seed draws (scaled by init_noise_sigma in the same way, Euler's ≠ 1); the
    generator then serves only a stochastic sampler's steps (DDPM's), so it continues where the draw left it."""
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn((2, 4, 8, 8), generator=generator)
    drawn = pipe(PROMPT, num_images_per_prompt=2, seed=5, sampler=sampler, **RUN)
    given = pipe(PROMPT, num_images_per_prompt=2, latents=noise, sampler=sampler, generator=generator, **RUN)
    assert torch.equal(drawn, given)
    other = pipe(PROMPT, num_images_per_prompt=2, latents=noise * 0.5, sampler=sampler, seed=5, **RUN)
    assert (other - drawn).abs().max() > 1e-3


def test_same_latents_same_images_whatever_the_seed(pipe):
    latents = torch.randn(2, 4, 8, 8)
    a = pipe([PROMPT, OTHER], latents=latents, sampler="ddim", seed=0, **RUN)
    b = pipe([PROMPT, OTHER], latents=latents.clone(), sampler="ddim", seed=1, **RUN)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b)


@pytest.mark.parametrize("latents, words", [
    (torch.zeros(1, 4, 8, 8), "[2, 4, 8, 8]"),  # N = 1 prompt × 2 images
    (torch.zeros(2, 4, 4, 4), "[2, 4, 8, 8]"),
    (torch.zeros(4, 8, 8), "[2, 4, 8, 8]"),
    (torch.zeros(2, 4, 8, 8, dtype=torch.long), "float"),
    ([[0.0]], "[2, 4, 8, 8]"),
    (torch.full((2, 4, 8, 8), float("nan")), "NaN"),
])
def test_bad_latents_raise_value_error_naming_the_shape(pipe, latents, words):
    with pytest.raises(ValueError, match="latents") as info:
        pipe(PROMPT, num_images_per_prompt=2, latents=latents, **RUN)
    assert words in str(info.value)


# ------------------------------------------------------------------------------------------------------------
# invert


def test_invert_then_regenerate_reconstructs_the_models_own_sample(pipe):
    """A DDIM sample of the model, inverted and regenerated at guidance 1, comes back up to the VAE's round trip.

    Measured (10 steps, this tiny model): the plain regeneration is 20.8 dB from the VAE round trip of the sample
    (the best reachable), a fresh sample from other noise 12.2 dB; with fixed-point refinement 34.7 dB (1 iteration
    a step), 49.2 dB (2), 88.9 dB (5): the iteration converges to the exact inverse of the DDIM step. (A random
    tiny model's ε changes fast between steps; the trained one's does not, and plain inversion then suffices.)"""
    images = pipe([PROMPT, OTHER], seed=3, sampler="ddim", guidance_scale=1.0, **RUN)
    reachable = pipe.decode_latents(pipe.encode_image(images))  # what the VAE can give back at best
    latents = pipe.invert(images, [PROMPT, OTHER], **RUN)
    assert latents.shape == (2, 4, 8, 8) and torch.isfinite(latents).all()
    again = pipe([PROMPT, OTHER], latents=latents, sampler="ddim", guidance_scale=1.0, **RUN)
    fresh = pipe([PROMPT, OTHER], seed=4, sampler="ddim", guidance_scale=1.0, **RUN)
    assert psnr(again, reachable) > 18 > 15 > psnr(fresh, reachable)
    refined = pipe.invert(images, [PROMPT, OTHER], fixed_point_iterations=5, **RUN)
    refined_again = pipe([PROMPT, OTHER], latents=refined, sampler="ddim", guidance_scale=1.0, **RUN)
    assert psnr(refined_again, reachable) > 80  # reading ε at the step's lower timestep instead plateaus at 58 dB


def test_inverted_latents_are_noisier_than_the_image(pipe):
    """x_T is at the top of the sampler's grid: the image's latent signal is scaled by √ᾱ_T there."""
    image = shapes(1)
    z0 = pipe.encode_image(image)
    latents = pipe.invert(image, PROMPT, **RUN)
    sampler = pipe.get_sampler("ddim")
    sampler.set_timesteps(10)
    alpha = sampler.alphas_cumprod[int(sampler.timesteps[0])]
    correlation = torch.corrcoef(torch.stack([latents.flatten(), z0.flatten()]))[0, 1]
    assert alpha < 0.02 and correlation < 0.9
    assert not torch.allclose(latents, z0, atol=0.1)


def test_invert_pairs_prompts_and_images_and_uses_guidance(pipe):
    images = shapes(2)
    assert pipe.invert(images, PROMPT, **RUN).shape == (2, 4, 8, 8)
    assert pipe.invert(images[:1], [PROMPT, OTHER], **RUN).shape == (2, 4, 8, 8)
    plain = pipe.invert(images, PROMPT, **RUN)
    guided = pipe.invert(images, PROMPT, guidance_scale=3.0, guidance_interval=(0, 1000), **RUN)
    assert (plain - guided).abs().max() > 1e-3


def test_invert_runs_a_flow_denoiser_backwards():
    flow = tiny_pipe("flow")
    images = flow(PROMPT, seed=3, guidance_scale=1.0, **RUN)
    reachable = flow.decode_latents(flow.encode_image(images))
    latents = flow.invert(images, PROMPT, fixed_point_iterations=2, **RUN)
    again = flow(PROMPT, latents=latents, sampler="euler", guidance_scale=1.0, **RUN)
    assert psnr(again, reachable) > 80  # measured 99 dB (plain: 45 dB; a fresh sample: 12 dB)


@pytest.mark.parametrize("kwargs, words", [
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": -3}, "num_inference_steps"),
    ({"num_inference_steps": 2.5}, "num_inference_steps"),
    ({"num_inference_steps": True}, "num_inference_steps"),
    ({"fixed_point_iterations": -1}, "fixed_point_iterations"),
    ({"guidance_scale": -1.0}, "guidance_scale"),
])
def test_invert_bad_arguments_raise_value_error(pipe, kwargs, words):
    with pytest.raises(ValueError, match=words):
        pipe.invert(shapes(1), PROMPT, **({"progress": False} | kwargs))


@pytest.mark.parametrize("image, words", [
    (torch.zeros(3, 32, 32), r"x\[None\]"),
    (torch.zeros(1, 3, 16, 16), "shape"),
    (torch.zeros(1, 1, 32, 32), "shape"),
    (torch.full((1, 3, 32, 32), 255.0), r"\[-1, 1\]"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "floating-point"),
    (torch.full((1, 3, 32, 32), float("nan")), "NaN"),
    ("image.png", "torch.Tensor"),
])
def test_invert_bad_image_raises_value_error(pipe, image, words):
    with pytest.raises(ValueError, match=words):
        pipe.invert(image, PROMPT, **RUN)


# ------------------------------------------------------------------------------------------------------------
# edit


def pipeline_state(pipe) -> dict:
    return {"guidance_interval": pipe.guidance_interval, "flow_shift": pipe.flow_shift, "controlnet": pipe.controlnet,
            "training": [m.training for m in (pipe.vae, pipe.text_encoder, pipe.denoiser)],
            "weights": {k: v.clone() for k, v in pipe.denoiser.state_dict().items()}}


def test_edit_returns_images_and_leaves_the_pipeline_alone(pipe):
    before = pipeline_state(pipe)
    images = shapes(2)
    out = pipe.edit(images, PROMPT, OTHER, **RUN)
    assert out.shape == (2, 3, 32, 32) and out.min() >= -1 and out.max() <= 1
    assert pipe.edit(images[:1], PROMPT, [OTHER, PROMPT], **RUN).shape == (2, 3, 32, 32)
    assert pipe.edit(images, [PROMPT, OTHER], [OTHER, PROMPT], **RUN).shape == (2, 3, 32, 32)
    after = pipeline_state(pipe)
    assert {k: v for k, v in before.items() if k != "weights"} == {k: v for k, v in after.items() if k != "weights"}
    assert all(torch.equal(before["weights"][k], v) for k, v in after["weights"].items())


def test_edit_is_inversion_then_regeneration_with_the_target(pipe):
    images = shapes(2)
    edited = pipe.edit(images, PROMPT, OTHER, guidance_scale=1.0, **RUN)
    latents = pipe.invert(images, PROMPT, fixed_point_iterations=1, **RUN)  # edit's default: one re-read a step
    by_hand = pipe(OTHER, num_images_per_prompt=2, latents=latents, sampler="ddim", guidance_scale=1.0, **RUN)
    assert torch.allclose(edited, by_hand, atol=1e-5)
    plain = pipe.edit(images, PROMPT, OTHER, guidance_scale=1.0, fixed_point_iterations=0, **RUN)
    by_hand = pipe(OTHER, num_images_per_prompt=2, latents=pipe.invert(images, PROMPT, **RUN), sampler="ddim",
                   guidance_scale=1.0, **RUN)
    assert torch.allclose(plain, by_hand, atol=1e-5) and not torch.allclose(plain, edited, atol=1e-5)
    same = pipe.edit(images, PROMPT, PROMPT, guidance_scale=1.0, **RUN)  # nothing to change: the reconstruction
    assert psnr(same, pipe.decode_latents(pipe.encode_image(images))) > 18  # measured 21.0 dB (10 steps)


def test_edit_strength(pipe):
    images = shapes(2)
    reconstruction = pipe.decode_latents(pipe.encode_image(images))
    assert torch.equal(pipe.edit(images, PROMPT, OTHER, strength=0.0, **RUN), reconstruction)
    full, partial = (pipe.edit(images, PROMPT, OTHER, strength=s, **RUN) for s in (1.0, 0.3))
    assert psnr(partial, reconstruction) > psnr(full, reconstruction)


@pytest.mark.parametrize("kwargs, words", [
    ({"source_prompt": [PROMPT, OTHER], "target_prompt": [OTHER, PROMPT, PROMPT]}, "source prompts"),
    ({"target_prompt": 3}, "target_prompt"),
    ({"strength": 1.5}, "strength"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"image": torch.zeros(3, 32, 32)}, r"x\[None\]"),
])
def test_edit_bad_arguments_raise_value_error(pipe, kwargs, words):
    arguments = {"image": shapes(1), "source_prompt": PROMPT, "target_prompt": OTHER, "progress": False} | kwargs
    with pytest.raises(ValueError, match=words):
        pipe.edit(**arguments)


# ------------------------------------------------------------------------------------------------------------
# control_image


@pytest.fixture()
def control_pipe():
    """A fresh pipeline (the tests attach ControlNets) with a depth-2 DiT, whose ControlNet copies one block."""
    return tiny_pipe()


def control_image(n: int = 1) -> torch.Tensor:
    return edge_map(shapes(n))  # [n, 1, 32, 32] of 0/1


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_a_zero_initialised_controlnet_changes_nothing(control_pipe, guidance_scale):
    control_pipe.controlnet = ControlNet.from_denoiser(control_pipe.denoiser).eval()
    args = {"guidance_scale": guidance_scale, "guidance_interval": (0, 1000), "seed": 0, **RUN}
    without = control_pipe([PROMPT, OTHER], **args)
    with_control = control_pipe([PROMPT, OTHER], control_image=control_image(2), **args)
    assert torch.equal(without, with_control)


def trained_like(controlnet: ControlNet) -> ControlNet:
    """The ControlNet with its zero output layers given weights, as training would."""
    torch.manual_seed(9)
    with torch.no_grad():
        for layer in controlnet.outputs:
            layer.weight.normal_(std=0.2)
    return controlnet.eval()


def test_control_steers_the_denoiser_in_both_halves_of_the_guided_batch(control_pipe):
    control_pipe.controlnet = trained_like(ControlNet.from_denoiser(control_pipe.denoiser))
    seen = []
    handle = control_pipe.controlnet.register_forward_hook(lambda m, args, out: seen.append(args))
    try:
        args = {"guidance_scale": 4.0, "guidance_interval": (0, 1000), "seed": 0, **RUN}
        without = control_pipe([PROMPT, OTHER], **args)
        edges = control_image(2)
        steered = control_pipe([PROMPT, OTHER], control_image=edges, **args)
    finally:
        handle.remove()
    assert (steered - without).abs().max() > 1e-3
    x, t, tokens, mask, control, scale = seen[0]
    assert x.shape[0] == 4 and control.shape == (4, 1, 32, 32) and scale == 1.0  # [uncond; cond] of 2 images
    assert torch.equal(control[:2], edges) and torch.equal(control[2:], edges)
    zero_scale = control_pipe([PROMPT, OTHER], control_image=edges, controlnet_conditioning_scale=0.0, **args)
    assert torch.allclose(zero_scale, without, atol=1e-6)
    one = control_pipe([PROMPT, OTHER], control_image=edges[:1], **args)  # one control image for both
    both = control_pipe([PROMPT, OTHER], control_image=edges[:1].expand(2, -1, -1, -1), **args)
    assert torch.equal(one, both)
    assert torch.equal(control_pipe([PROMPT, OTHER], control_image=edges[0], **args), one)  # [1, 32, 32]


@pytest.mark.parametrize("image, words", [
    (torch.zeros(3, 1, 32, 32), "control_image"),  # 3 maps for 2 images
    (torch.zeros(2, 3, 32, 32), "control_image"),
    (torch.zeros(2, 1, 16, 16), "control_image"),
    (torch.full((2, 1, 32, 32), 2.0), r"\[0, 1\]"),
    (torch.full((2, 1, 32, 32), -0.5), r"\[0, 1\]"),
    (torch.full((2, 1, 32, 32), float("nan")), "NaN"),
])
def test_bad_control_image_raises_value_error(control_pipe, image, words):
    control_pipe.controlnet = ControlNet.from_denoiser(control_pipe.denoiser).eval()
    with pytest.raises(ValueError, match=words):
        control_pipe([PROMPT, OTHER], control_image=image, **RUN)


def test_bad_conditioning_scale_raises_value_error(control_pipe):
    control_pipe.controlnet = ControlNet.from_denoiser(control_pipe.denoiser).eval()
    with pytest.raises(ValueError, match="controlnet_conditioning_scale"):
        control_pipe(PROMPT, control_image=control_image(), controlnet_conditioning_scale=float("inf"), **RUN)


def test_control_image_without_a_controlnet_says_how_to_load_one(pipe):
    assert pipe.controlnet is None
    with pytest.raises(ValueError, match=r"load_pipeline\(controlnet=True\)"):
        pipe(PROMPT, control_image=control_image(), **RUN)


def test_a_controlnet_made_for_another_denoiser_is_refused(control_pipe):
    control_pipe.controlnet = ControlNet.from_denoiser(tiny_denoiser(depth=4)).eval()
    with pytest.raises(ValueError, match="another denoiser"):
        control_pipe(PROMPT, control_image=control_image(), **RUN)
