"""sdlearn.stable_diffusion: SD v1.5's sizes and map, and sdlearn's loop over a diffusers folder, equal to diffusers.

A tiny, randomly initialised Stable Diffusion folder is written into a temporary directory (diffusers' U-Net and VAE,
transformers' CLIP text model, a CLIP tokenizer from a vocabulary written here, a DDIM scheduler with SD's
settings), every weight perturbed so that no block is the identity. Nothing touches the network.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import sys

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # a guard: nothing here may download
os.environ["TRANSFORMERS_OFFLINE"] = "1"

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from sdlearn import stable_diffusion as sd  # noqa: E402
from sdlearn.unet import UNet  # noqa: E402

SIZE = 32  # image side: the tiny VAE's factor 4 → 8 × 8 latents
STEPS = 3
PROMPTS = ["a red circle", "the blue square"]


# ----------------------------------------------------------------------------------------------------------
# The tiny folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    sd_folder = sd.write_tiny_sd_folder(tmp_path_factory.mktemp("tiny_sd") / "sd", seed=0)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(sd_folder / "tokenizer", local_files_only=True)
    assert len(tokenizer) == 2 + 26 + 26 + 8  # the vocabulary written was read: specials, letters, word ends, merges
    assert sd.TINY_SD_SIZE == SIZE
    return sd_folder


@pytest.fixture(scope="module")
def pipe(folder):
    return sd.load_diffusers_pipeline(folder)


@pytest.fixture(scope="module")
def diffusers_pipe(folder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                        requires_safety_checker=False)
    reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    return reference


def diffusers_images(reference, prompts, seed, guidance_scale, **kwargs) -> torch.Tensor:
    out = reference(prompts, num_inference_steps=STEPS, guidance_scale=guidance_scale, height=SIZE, width=SIZE,
                    generator=torch.Generator().manual_seed(seed), output_type="pt", eta=0.0, **kwargs)
    return out.images * 2 - 1  # [0, 1] → [-1, 1]


# ----------------------------------------------------------------------------------------------------------
# SD v1.5's sizes and map


def test_sd_v1_parameter_counts_are_the_published_ones():
    counts = sd.sd_v1_parameter_counts()
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert counts == sd.SD_V1_5_PARAMETER_COUNTS
    # the U-Net is sdlearn's own, on the meta device: nothing allocated
    unet = sd.sd_v1_unet()
    assert isinstance(unet, UNet) and all(p.is_meta for p in unet.parameters())


def test_the_unet_count_works_without_diffusers_and_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.warns(UserWarning) as record:
        counts = sd.sd_v1_parameter_counts()
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2 and "'diffusers' package" in messages[1] and "'transformers' package" in messages[0]
    assert counts == {"unet": 859_520_964, "vae": None, "text_encoder": None}
    with pytest.raises(ImportError, match="needs the 'transformers' package"):
        sd.sd_v1_text_encoder()
    with pytest.raises(ImportError, match="needs the 'diffusers' package"):
        sd.sd_v1_vae()


def test_the_block_map_adds_up_and_has_sd_shapes():
    rows = sd.sd_v1_block_map()
    assert all(set(row) == {"part", "module", "what", "output shape", "parameters", "course"} for row in rows)
    totals = {}
    for row in rows:
        if row["part"] in sd.SD_V1_5_PARAMETER_COUNTS:
            totals[row["part"]] = totals.get(row["part"], 0) + row["parameters"]
    assert totals == sd.SD_V1_5_PARAMETER_COUNTS  # every parameter of the three networks is in one row
    by_module = {row["module"]: row for row in rows}
    assert by_module["conv_in"]["output shape"] == (1, 320, 64, 64)
    assert by_module["down_blocks.0"]["output shape"] == (1, 320, 32, 32)
    assert by_module["down_blocks.3"]["output shape"] == (1, 1280, 8, 8)
    assert by_module["mid_block"]["output shape"] == (1, 1280, 8, 8)
    assert by_module["up_blocks.3"]["output shape"] == (1, 320, 64, 64)
    assert by_module["conv_norm_out + conv_out"]["output shape"] == (1, 4, 64, 64)
    assert by_module["decoder"]["output shape"] == (1, 3, 512, 512)
    assert by_module["text_model.encoder"]["output shape"] == (1, 77, 768)
    assert all(row["course"] for row in rows)
    small = {row["module"]: row["output shape"] for row in sd.sd_v1_block_map(256, 384)}
    assert small["conv_in"] == (1, 320, 32, 48) and small["decoder"] == (1, 3, 256, 384)
    with pytest.raises(ValueError, match="multiple of 64"):
        sd.sd_v1_block_map(500, 512)


# ----------------------------------------------------------------------------------------------------------
# The scheduler's config


def test_the_schedule_is_diffusers_schedule():
    from diffusers import DDIMScheduler

    config = dict(sd.SD_V1_5_SCHEDULER_CONFIG)
    schedule, options = sd.schedule_from_scheduler_config(config)
    reference = DDIMScheduler.from_config(config)
    torch.testing.assert_close(schedule.alphas_cumprod, reference.alphas_cumprod, atol=1e-7, rtol=0)
    assert options == {"prediction_type": "epsilon", "steps_offset": 1, "spacing": "leading", "set_alpha_to_one": False,
                       "clip_sample": False, "variance_type": "fixed_small"}
    # the defaults diffusers uses where a field is absent: linear 1e-4 → 0.02
    schedule, options = sd.schedule_from_scheduler_config({"prediction_type": "v_prediction"})
    torch.testing.assert_close(schedule.alphas_cumprod, DDIMScheduler().alphas_cumprod, atol=1e-7, rtol=0)
    assert options["prediction_type"] == "v_prediction" and options["set_alpha_to_one"] is True


@pytest.mark.parametrize("field, value, words", [
    ("timestep_spacing", "karras", "timestep_spacing='karras' is not supported yet"),
    ("thresholding", True, "thresholding=true"),
    ("beta_schedule", "exotic", "beta_schedule='exotic' is not supported yet"),
    ("prediction_type", "flow", "prediction_type='flow'"),
    ("steps_offset", -1, "steps_offset must lie in"),
])
def test_scheduler_values_sdlearn_does_not_implement_are_refused(field, value, words):
    config = {**sd.SD_V1_5_SCHEDULER_CONFIG, field: value}
    with pytest.raises(ValueError, match=words.replace("(", r"\(")) as error:
        sd.schedule_from_scheduler_config(config)
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------------------------------------
# The pipeline: sdlearn's loop over the folder equals diffusers' StableDiffusionPipeline


def test_the_pipeline_runs_sdlearns_pieces(pipe, folder):
    assert isinstance(pipe.unet, UNet)
    assert pipe.scaling_factor == pytest.approx(0.18215)
    assert pipe.steps_offset == 1 and pipe.spacing == "leading" and pipe.set_alpha_to_one is False
    assert pipe.default_size == SIZE  # sample_size · the VAE's factor, as diffusers (512 for SD v1.5)
    defaults = {name: p.default for name, p in inspect.signature(type(pipe).__call__).parameters.items()}
    assert defaults["guidance_scale"] == 7.5 and defaults["sampler"] == "ddim"
    # the keyword names of LatentDiffusionPipeline, plus height and width
    from sdlearn.pipeline import LatentDiffusionPipeline

    ours = set(inspect.signature(LatentDiffusionPipeline.__call__).parameters)
    assert ours - {"control_image", "controlnet_conditioning_scale"} | {"height", "width"} == set(defaults)
    # the U-Net is the folder's: equal outputs to diffusers' on the same input
    from diffusers import UNet2DConditionModel

    reference = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, 500, text), reference(x, 500, text).sample, atol=1e-4, rtol=0)


def test_images_equal_diffusers_for_the_same_seed(pipe, diffusers_pipe):
    ours = pipe(PROMPTS, num_inference_steps=STEPS, seed=0, height=SIZE, width=SIZE, progress=False)
    theirs = diffusers_images(diffusers_pipe, PROMPTS, 0, 7.5)
    assert ours.shape == (2, 3, SIZE, SIZE) and ours.min() >= -1 and ours.max() <= 1
    assert ours.std() > 0.05  # not a flat image: the comparison means something
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)
    # another seed gives other images, far beyond the tolerance
    other = pipe(PROMPTS, num_inference_steps=STEPS, seed=1, height=SIZE, width=SIZE, progress=False)
    assert (other - ours).abs().max() > 0.05


def test_negative_prompt_no_guidance_and_generators_equal_diffusers(pipe, diffusers_pipe):
    # a negative prompt, two images per prompt
    ours = pipe("a red circle", negative_prompt="blue", num_inference_steps=STEPS, seed=3, height=SIZE, width=SIZE,
                num_images_per_prompt=2, guidance_scale=5.0, progress=False)
    theirs = diffusers_images(diffusers_pipe, "a red circle", 3, 5.0, negative_prompt="blue", num_images_per_prompt=2)
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)
    # guidance 1: the conditional model alone, in both; a list of generators, one per image
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    ours = pipe(PROMPTS, num_inference_steps=STEPS, generator=gens, height=SIZE, width=SIZE, guidance_scale=1.0,
                progress=False)
    out = diffusers_pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=1.0, height=SIZE, width=SIZE,
                         generator=[torch.Generator().manual_seed(s) for s in (5, 6)], output_type="pt")
    torch.testing.assert_close(ours, out.images * 2 - 1, atol=1e-3, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# Bad input


def test_a_folder_that_is_not_a_diffusers_folder_names_the_missing_file(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="model_index.json is missing"):
        sd.load_diffusers_pipeline(tmp_path)
    with pytest.raises(FileNotFoundError, match="no folder at"):
        sd.load_diffusers_pipeline(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    shutil.copytree(folder, partial)
    (partial / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"scheduler_config\.json is missing"):
        sd.load_diffusers_pipeline(partial)
    for weights in (partial / "unet").glob("*.safetensors"):
        weights.unlink()
    (partial / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    shutil.copy(folder / "scheduler" / "scheduler_config.json", partial / "scheduler")
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.bin \(pickle\)"):
        sd.load_diffusers_pipeline(partial)


@pytest.mark.parametrize("index, words", [
    ({"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
      "unet": ["diffusers", "UNet2DConditionModel"]}, ["XL is not supported yet", "StableDiffusionXLPipeline",
                                                      "text_encoder_2"]),
    ({"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]},
     ["not supported yet", "StableDiffusion3Pipeline", "transformer"]),
    ({"_class_name": "KandinskyPipeline"}, ["'KandinskyPipeline', which is not supported yet"]),
])
def test_sdxl_and_sd3_folders_are_not_supported_yet(tmp_path, index, words):
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError) as error:
        sd.load_diffusers_pipeline(tmp_path)
    for word in words:
        assert word in str(error.value)
    assert "\n" not in str(error.value)


def test_a_size_the_vae_and_unet_cannot_take_is_refused(pipe):
    for size in ((30, SIZE), (SIZE, 36), (SIZE, 0)):
        with pytest.raises(ValueError, match=r"must be a multiple of 8 \(the VAE's factor 4"):
            pipe("a red circle", height=size[0], width=size[1], num_inference_steps=1, progress=False)


def test_an_unsupported_unet_config_names_the_field(tmp_path, folder):
    copy = tmp_path / "sd"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "unet" / "config.json").read_text())
    config["class_embed_type"] = "timestep"
    (copy / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="class_embed_type='timestep' is not supported"):
        sd.load_diffusers_pipeline(copy)


def test_other_bad_arguments_give_one_line(pipe):
    cases = [
        (dict(prompt=3), "prompt must be a string"),
        (dict(prompt="a", guidance_scale=-1), "guidance_scale must be a number ≥ 0"),
        (dict(prompt="a", num_inference_steps=0), "num_inference_steps must be a whole number ≥ 1"),
        (dict(prompt="a", sampler="plms"), "sampler must be one of"),
        (dict(prompt="a", seed=1, generator=torch.Generator()), "either seed or generator"),
        (dict(prompt=["a", "b"], negative_prompt=["c"]), "1 negative prompts for 2 prompts"),
    ]
    for kwargs, words in cases:
        with pytest.raises(ValueError, match=words) as error:
            pipe(**kwargs, progress=False)
        assert "\n" not in str(error.value)


def test_an_overlong_prompt_is_cut_with_a_warning_as_diffusers_cuts_it(pipe, diffusers_pipe):
    prompt = "the red circle " * 4  # 16 + 2 tokens: more than the tiny CLIP's 16
    with pytest.warns(UserWarning, match="CLIP reads 16, the rest is cut off"):
        ours = pipe(prompt, num_inference_steps=2, seed=7, height=SIZE, width=SIZE, progress=False)
    out = diffusers_pipe(prompt, num_inference_steps=2, guidance_scale=7.5, height=SIZE, width=SIZE,
                         generator=torch.Generator().manual_seed(7), output_type="pt")
    torch.testing.assert_close(ours, out.images * 2 - 1, atol=1e-3, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# python -m sdlearn generate --diffusers PATH


def test_the_command_line_draws_with_the_folder(folder, pipe, tmp_path, capsys):
    from PIL import Image

    from sdlearn.__main__ import main
    from sdlearn.pipeline import to_pil

    out_dir = tmp_path / "images"
    assert main(["generate", "a red circle", "--diffusers", str(folder), "--height", "32", "--width", "32",
                 "--steps", "3", "--n", "2", "--seed", "5", "--out-dir", str(out_dir)]) == 0
    written = sorted(out_dir.glob("*.png"))
    assert len(written) == 2
    # SD's defaults (7.5, ddim) when --guidance and --sampler are not given; the U-Net stored in float16
    half = sd.load_diffusers_pipeline(folder, storage_dtype="float16")
    expected = half("a red circle", num_inference_steps=3, guidance_scale=7.5, sampler="ddim", seed=5,
                    num_images_per_prompt=2, height=SIZE, width=SIZE, progress=False)
    for path, picture in zip(written, to_pil(expected)):
        with Image.open(path) as image:
            assert image.size == (SIZE, SIZE)
            assert list(image.convert("RGB").getdata()) == list(picture.convert("RGB").getdata())


@pytest.mark.parametrize("extra, words", [
    (["--height", "30"], "height must be a multiple of 8"),
    (["--weights", "somewhere"], "leave out --weights, --denoiser and --adapter"),
    (["--denoiser", "unet"], "leave out --weights, --denoiser and --adapter"),
])
def test_the_command_line_refuses_bad_diffusers_options_in_one_line(folder, tmp_path, capsys, extra, words):
    from sdlearn.__main__ import main

    assert main(["generate", "a", "--diffusers", str(folder), "--steps", "1", "--out", str(tmp_path / "x.png"),
                 *extra]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after transformers' "Loading weights" bar, if it loaded any
    assert err.startswith("python -m sdlearn generate: error: ") and words in err, err
    assert not (tmp_path / "x.png").exists()


def test_the_command_line_names_what_a_folder_lacks(tmp_path, capsys):
    from sdlearn.__main__ import main

    assert main(["generate", "a", "--diffusers", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "model_index.json is missing" in err and err.count("\n") == 1, err
    assert main(["generate", "a", "--height", "64", "--out", str(tmp_path / "x.png")]) == 2
    assert "--height and --width are for --diffusers" in capsys.readouterr().err


def test_given_latents_are_the_starting_noise(pipe):
    kwargs = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, progress=False)
    noise = torch.randn((2, 4, SIZE // 4, SIZE // 4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(pipe(PROMPTS, latents=noise, seed=9, **kwargs), pipe(PROMPTS, seed=0, **kwargs))
    for bad in (noise[:1], noise[..., :2], noise.long(), noise * float("nan"), [1.0]):
        with pytest.raises(ValueError, match=r"latents must be a finite float tensor of shape \[2, 4, 8, 8\]"):
            pipe(PROMPTS, latents=bad, **kwargs)
