"""The explorers: they build, respond to their controls, and show what the controls say."""

import base64
import io
import re

import matplotlib

matplotlib.use("Agg")

import ipywidgets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from sdlearn.schedules import NoiseSchedule  # noqa: E402
from sdlearn.widgets import forward_noising_explorer, schedule_explorer  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _image():
    return torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_forward_noising_explorer_follows_its_t_slider():
    schedule = NoiseSchedule.from_name("linear", num_train_timesteps=200)
    explorer = forward_noising_explorer(_image(), schedule, seed=1)
    assert isinstance(explorer, ipywidgets.Widget)
    assert explorer.t_slider.max == 199 and explorer.t_slider.value == 100
    noise = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(explorer.x_t, schedule.add_noise(_image(), noise, 100))
    first = bytes(explorer.picture.value)
    assert first.startswith(PNG)

    explorer.t_slider.value = 199
    torch.testing.assert_close(explorer.x_t, schedule.add_noise(_image(), noise, 199))
    assert bytes(explorer.picture.value).startswith(PNG) and bytes(explorer.picture.value) != first
    a = schedule.alphas_cumprod[199].item()
    assert "t = 199" in explorer.readout.value and f"{a:.4f}" in explorer.readout.value
    assert f"{(1 - a) ** 0.5:.3f}" in explorer.readout.value

    explorer.new_noise_button.click()
    assert not torch.allclose(explorer.x_t, schedule.add_noise(_image(), noise, 199))
    explorer.t_slider.value = 0
    assert (explorer.x_t - _image()).abs().max() < 0.05  # t = 0 keeps the image


def test_forward_noising_explorer_accepts_a_name_and_rejects_bad_input():
    explorer = forward_noising_explorer(_image()[None], "cosine")
    torch.testing.assert_close(explorer.schedule.betas, NoiseSchedule.from_name("cosine").betas)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        forward_noising_explorer(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="NoiseSchedule or a schedule name"):
        forward_noising_explorer(_image(), schedule=[0.1, 0.2])
    with pytest.raises(ValueError, match="unknown schedule"):
        forward_noising_explorer(_image(), schedule="quadratic")


def test_forward_noising_explorer_defaults_to_the_bundled_photo():
    pytest.importorskip("sdlearn.data")
    explorer = forward_noising_explorer()
    assert explorer.x0.shape == (3, 96, 96) and bytes(explorer.picture.value).startswith(PNG)


def test_schedule_explorer_rebuilds_the_schedule_from_its_controls():
    explorer = schedule_explorer(_image())
    assert isinstance(explorer, ipywidgets.Widget)
    torch.testing.assert_close(explorer.schedule.betas, NoiseSchedule.from_name("scaled_linear").betas)
    assert explorer.problems == [] and "No problems" in explorer.readout.value
    first = bytes(explorer.picture.value)

    explorer.name.value = "linear"  # resets the β range to the linear schedule's defaults
    assert (explorer.beta_start.value, explorer.beta_end.value) == (1e-4, 0.02)
    torch.testing.assert_close(explorer.schedule.betas, NoiseSchedule.from_name("linear").betas)
    assert bytes(explorer.picture.value).startswith(PNG) and bytes(explorer.picture.value) != first

    explorer.num_steps.value = 100
    explorer.zero_terminal_snr.value = True
    expected = NoiseSchedule.from_name("linear", num_train_timesteps=100, zero_terminal_snr=True)
    torch.testing.assert_close(explorer.schedule.betas, expected.betas)
    assert explorer.schedule.alphas_cumprod[-1] == 0
    assert explorer.timesteps.tolist() == [0, 25, 50, 74, 99]
    torch.testing.assert_close(explorer.x_t[-1], explorer.noise)  # zero terminal SNR: pure noise at t = T−1

    explorer.name.value = "cosine"
    assert explorer.beta_start.disabled and explorer.beta_end.disabled


def test_schedule_explorer_warns_when_alpha_bar_reaches_zero_long_before_the_end():
    explorer = schedule_explorer(_image())
    explorer.name.value = "linear"
    assert explorer.problems == []  # DDPM's linear schedule: ᾱ < 1e-4 only from t = 954
    explorer.beta_end.value = 0.79  # ᾱ ≈ 0 from t ≈ 150: every picture after the first is pure noise
    assert explorer.schedule is not None
    assert [p for p in explorer.problems if "falls below 0.0001 already at t=149, before T/2 = 500" in p], explorer.problems
    assert "851 of the 1000 steps" in explorer.readout.value and "No problems" not in explorer.readout.value


def _grey_fraction(png: bytes) -> float:
    """The share of a picture's pixels that are the explorer's "no schedule" grey (0.85 × 255)."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return float((abs(pixels - 217) <= 1).all(axis=-1).mean())


def test_schedule_explorer_names_the_underflow_that_zero_terminal_snr_cannot_rescale_and_greys_its_plots():
    explorer = schedule_explorer(_image())
    explorer.name.value = "linear"
    explorer.beta_end.value = 0.3  # ᾱ underflows to 0 in float32 before the last step
    assert explorer.schedule.alphas_cumprod[-2] == 0
    drawn = bytes(explorer.picture.value)
    assert _grey_fraction(drawn) < 0.01
    explorer.zero_terminal_snr.value = True
    assert explorer.schedule is None and explorer.x_t is None
    (problem,) = explorer.problems
    assert "zero terminal SNR cannot rescale this schedule: ᾱ underflows to 0 in float32 at t = " in problem
    assert "0/0" in problem and "finite" not in problem
    assert "Cannot build this schedule" in explorer.readout.value and "underflows" in explorer.readout.value
    greyed = bytes(explorer.picture.value)
    assert greyed != drawn and _grey_fraction(greyed) > 0.05  # no stale plot beside the error

    explorer.beta_end.value = 0.02  # rescalable again: the plots come back
    assert explorer.schedule is not None and explorer.schedule.alphas_cumprod[-1] == 0
    assert _grey_fraction(bytes(explorer.picture.value)) < 0.01


def test_schedule_explorer_explains_broken_schedules_instead_of_raising():
    explorer = schedule_explorer(_image())
    explorer.beta_start.value, explorer.beta_end.value = 0.5, 0.001  # starts large and runs backwards
    assert any("β decreases" in p for p in explorer.problems)
    assert any("first step already destroys" in p for p in explorer.problems)
    assert "Problems:" in explorer.readout.value and "β decreases" in explorer.readout.value

    explorer.beta_start.value = explorer.beta_end.value = 1.0  # pure noise from the first step
    assert explorer.schedule is not None and explorer.schedule.alphas_cumprod[0] == 0
    explorer.zero_terminal_snr.value = True  # cannot be rescaled: 0 / 0
    assert explorer.schedule is None and "Cannot build this schedule" in explorer.readout.value
    assert "β = 1 at t = 0" in explorer.readout.value
    explorer.zero_terminal_snr.value = False
    assert explorer.schedule is not None


# -- the sampler scrubber ------------------------------------------------------------------------------
def test_sampler_scrubber_records_every_model_evaluation_and_follows_its_controls():
    from sdlearn.samplers import DDIMSampler, GaussianDataModel, sample
    from sdlearn.widgets import sampler_scrubber

    schedule = NoiseSchedule.from_name("scaled_linear")
    model = GaussianDataModel(schedule, mean=_image()[:, :8, :8], std=0.05)  # data: one 8×8 image, slightly blurred
    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    scrubber = sampler_scrubber(model, schedule, noise=noise, sampler="ddim", num_inference_steps=10, max_images=2)
    assert isinstance(scrubber, ipywidgets.Widget)
    assert len(scrubber.frames) == 11 and scrubber.step.max == 10 and scrubber.step.value == 0
    torch.testing.assert_close(scrubber.x_t, noise)  # the first model input is x_T itself
    expected = sample(model, DDIMSampler(schedule), noise.shape, 10, progress=False, noise=noise)
    torch.testing.assert_close(scrubber.sample, expected)
    assert [f["t"] for f in scrubber.frames[:-1]] == [float(t) for t in range(900, -1, -100)]
    first = bytes(scrubber.picture.value)
    assert first.startswith(PNG) and "model evaluation 1 of 10" in scrubber.readout.value and "t = 900" in scrubber.readout.value

    scrubber.step.value = 5  # x_t and the x̂₀ predicted from it, at the 6th evaluation (t = 400)
    torch.testing.assert_close(scrubber.x0, model.x0(scrubber.x_t, 400))
    assert "t = 400" in scrubber.readout.value and bytes(scrubber.picture.value) != first
    scrubber.step.value = 10
    torch.testing.assert_close(scrubber.x0, expected)
    assert "finished sample" in scrubber.readout.value
    assert (scrubber.x0 - model.mean.float()).abs().max() < 0.3  # 10 DDIM steps land near the image

    scrubber.sampler.value = "heun"  # 2N − 1 evaluations, same starting noise, slider kept at the end
    assert len(scrubber.frames) == 20 and scrubber.step.max == 19 and scrubber.step.value == 19
    scrubber.step.value = 0
    torch.testing.assert_close(scrubber.x_t, noise)  # Heun's model input x/√(σ²+1) is the same x_T
    scrubber.steps.value = 3
    assert len(scrubber.frames) == 6 and scrubber.step.value == 0


def test_sampler_scrubber_rejects_bad_input():
    from sdlearn.samplers import GaussianDataModel
    from sdlearn.widgets import sampler_scrubber

    schedule = NoiseSchedule.from_name("scaled_linear")
    model = GaussianDataModel(schedule)
    with pytest.raises(ValueError, match="unknown sampler"):
        sampler_scrubber(model, schedule, (1, 3, 4, 4), sampler="plms")
    with pytest.raises(ValueError, match="give the shape"):
        sampler_scrubber(model, schedule)
    with pytest.raises(ValueError, match="model_fn must be a function"):
        sampler_scrubber(None, schedule, (1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        sampler_scrubber(model, schedule, (2, 16), num_inference_steps=2)  # not images, and no decode
    scrubber = sampler_scrubber(model, schedule, (2, 16), num_inference_steps=2,
                                decode=lambda x: x.reshape(-1, 1, 4, 4))  # decode turns states into images
    assert len(scrubber.frames) == 3


# -- the prompt playground ------------------------------------------------------------------------------
def _tiny_pipeline():
    """A small randomly initialised text-to-image pipeline (no shipped weights needed); adaLN-Zero's zero
    layers get small random weights so that the output depends on the prompt and the noise."""
    from sdlearn.denoiser import Denoiser, DenoiserConfig
    from sdlearn.pipeline import LatentDiffusionPipeline
    from sdlearn.text import TextEncoderConfig, TinyCLIP, TinyCLIPConfig, Tokenizer
    from sdlearn.vae import VAE, VAEConfig

    torch.manual_seed(0)
    vae = VAE(VAEConfig(base_channels=8, num_res_blocks=0)).eval()
    text = TinyCLIP(TinyCLIPConfig(text=TextEncoderConfig(width=32, depth=1, heads=2), image_channels=(8, 16),
                                   embed_dim=16)).text_encoder.eval()
    denoiser = Denoiser(DenoiserConfig(width=32, depth=1, heads=2, text_dim=32, frequency_dim=32))
    with torch.no_grad():
        for p in denoiser.parameters():
            if p.dim() >= 2 and p.abs().max() == 0:
                p.normal_(std=0.05)
    return LatentDiffusionPipeline(vae, text, Tokenizer(), denoiser.eval(), "scaled_linear")


def test_prompt_playground_generates_what_its_controls_say_when_generate_is_clicked():
    from sdlearn.widgets import prompt_playground

    pipe = _tiny_pipeline()
    playground = prompt_playground(pipe, "a small blue square", num_inference_steps=3, num_images_per_prompt=2, seed=5)
    assert isinstance(playground, ipywidgets.Widget)
    expected = pipe("a small blue square", num_inference_steps=3, seed=5, num_images_per_prompt=2, progress=False)
    torch.testing.assert_close(playground.images, expected)
    first = bytes(playground.picture.value)
    assert first.startswith(PNG)
    assert "2 images of <i>a small blue square</i>" in playground.readout.value and "3 steps of dpm++" in playground.readout.value

    # moving the controls does nothing until Generate is pressed
    playground.prompt.value = "a big green triangle in the center"
    playground.negative.value = "red"
    playground.steps.value, playground.guidance.value, playground.seed.value = 4, 2.5, 9
    playground.num_images_per_prompt.value, playground.sampler.value = 3, "ddim"
    torch.testing.assert_close(playground.images, expected)
    playground.generate_button.click()
    expected = pipe("a big green triangle in the center", negative_prompt="red", num_inference_steps=4,
                    guidance_scale=2.5, sampler="ddim", seed=9, num_images_per_prompt=3, progress=False)
    assert playground.images.shape == (3, 3, 32, 32)
    torch.testing.assert_close(playground.images, expected)
    assert bytes(playground.picture.value) != first and not playground.generate_button.disabled
    assert "negative <i>red</i>" in playground.readout.value and "seed 9" in playground.readout.value


def test_prompt_playground_reports_warnings_and_errors_in_words():
    from sdlearn.widgets import prompt_playground

    pipe = _tiny_pipeline()
    playground = prompt_playground(pipe, "a red zebra", num_inference_steps=2, num_images_per_prompt=1)
    assert playground.images.shape == (1, 3, 32, 32)
    assert "unknown word" in playground.readout.value and "zebra" in playground.readout.value

    pipe.text_encoder = pipe.tokenizer = None  # an unconditional pipeline refuses a prompt: no traceback, a message
    playground.prompt.value = "a red circle"
    playground.generate_button.click()
    assert playground.images is None and "Cannot generate" in playground.readout.value
    assert "no text encoder" in playground.readout.value

    with pytest.raises(ValueError, match="unknown sampler"):
        prompt_playground(pipe, sampler="plms", generate=False)
    with pytest.raises(ValueError, match="LatentDiffusionPipeline"):
        prompt_playground("not a pipeline")


def test_prompt_playground_quotes_a_long_prompt_once():
    from sdlearn.widgets import prompt_playground

    pipe = _tiny_pipeline()
    prompt = " and ".join(["a large red circle in the top left", "a small blue square in the bottom right"] * 3)
    playground = prompt_playground(pipe, prompt, num_inference_steps=1, num_images_per_prompt=1, negative_prompt="red")
    readout = playground.readout.value
    assert readout.count(prompt) == 1, readout
    assert "the prompt names 6 objects" in readout and "the prompt has " in readout  # its warnings, still said
    assert readout.count("⚠") == 2


def test_prompt_playground_old_num_images_keyword_still_works_with_a_deprecation_warning():
    from sdlearn.widgets import prompt_playground

    pipe = _tiny_pipeline()
    with pytest.warns(DeprecationWarning, match="num_images_per_prompt"):
        playground = prompt_playground(pipe, "a red circle", num_inference_steps=2, num_images=2)
    assert playground.images.shape == (2, 3, 32, 32)
    with pytest.warns(DeprecationWarning, match="num_images_per_prompt"):
        assert playground.num_images is playground.num_images_per_prompt


# -- a picture before running (issue 19) ------------------------------------------------------------------
def _explorers():
    from sdlearn.samplers import GaussianDataModel
    from sdlearn.widgets import prompt_playground, sampler_scrubber

    schedule = NoiseSchedule.from_name("scaled_linear")
    yield forward_noising_explorer(_image(), "linear")
    yield schedule_explorer(_image())
    yield sampler_scrubber(GaussianDataModel(schedule), schedule, (2, 3, 8, 8), num_inference_steps=3)
    yield prompt_playground(_tiny_pipeline(), "a red circle", num_inference_steps=1, num_images_per_prompt=2)


def test_every_explorer_displays_a_picture_of_its_first_frame_beside_the_widget_view():
    from IPython.core.formatters import DisplayFormatter

    for explorer in _explorers():
        data, _ = DisplayFormatter().format(explorer)  # what the kernel publishes for a cell that ends with it
        name = type(explorer).__name__
        assert data["application/vnd.jupyter.widget-view+json"]["model_id"] == explorer.model_id
        assert base64.b64decode(data["image/png"]) == bytes(explorer.picture.value), name
        text = data["text/plain"]
        assert text.startswith(f"{name}: ") and "\n" not in text and len(text) < 160 and "children=" not in text


def test_a_playground_that_has_not_generated_yet_displays_no_picture():
    from sdlearn.widgets import prompt_playground

    data = prompt_playground(_tiny_pipeline(), generate=False)._repr_mimebundle_()
    assert "image/png" not in data and data["text/plain"].startswith("PromptPlayground: ")


@pytest.mark.slow  # a Jupyter kernel
def test_an_executed_notebook_shows_the_explorer_as_a_picture_in_html_without_javascript(tmp_path):
    """``make notebooks`` executes without storing widget state; nbconvert's HTML then shows each explorer's PNG
    as a plain <img> (with widget state it would pick the widget view, which needs JavaScript from a CDN)."""
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import torch\nfrom sdlearn.widgets import forward_noising_explorer\n"
        "forward_noising_explorer(torch.zeros(3, 8, 8), 'linear')")])
    NotebookClient(nb, timeout=300, kernel_name="python3", store_widget_state=False,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    (output,) = nb.cells[0].outputs
    assert "widgets" not in nb.metadata
    html_page, _ = HTMLExporter().from_notebook_node(nb)
    assert re.search(rf'<img [^>]*src="data:image/png;base64,{re.escape(output.data["image/png"])}"', html_page)
    assert "ForwardNoisingExplorer: " not in html_page and "children=" not in html_page


def test_every_explorer_in_the_committed_notebooks_shows_a_picture_without_a_kernel():
    """The README's promise, "you can read the results before running anything", for the explorers' cells: each
    widget output of the committed notebooks carries its PNG, and no notebook stores widget state (which makes
    nbconvert and notebook viewers pick the widget view, blank without JavaScript). Re-execute the notebooks with
    ``make notebooks`` after a change to an explorer."""
    import nbformat

    from sdlearn.exercises import default_notebooks_dir

    without_picture, with_state = [], []
    paths = sorted(default_notebooks_dir().glob("[0-9][0-9]_*.ipynb"))
    assert paths, f"no notebooks in {default_notebooks_dir()}"
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        if "widgets" in nb.metadata:
            with_state.append(path.name)
        for index, cell in enumerate(nb.cells):
            for output in cell.get("outputs", []):
                data = output.get("data", {})
                if "application/vnd.jupyter.widget-view+json" in data and "image/png" not in data:
                    without_picture.append(f"{path.name} cell {index}: {data.get('text/plain', '')[:60]}")
    assert without_picture == [], "explorer outputs without a picture (re-execute: make notebooks)"
    assert with_state == [], "notebooks that store widget state (re-execute: make notebooks)"
