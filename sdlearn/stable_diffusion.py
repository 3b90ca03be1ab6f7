"""The real Stable Diffusion v1, read through the course: its sizes, its map, and its weights run by sdlearn's loop.

Stable Diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models") is three
networks and a loop: a KL-regularised autoencoder (§3.1) that turns 512 × 512 images into 4 × 64 × 64 latents, a
frozen CLIP ViT-L/14 text tower (Radford et al. 2021) that turns the prompt into 77 tokens of 768 numbers, and a
U-Net (§3.3) that predicts the noise in a latent while reading those tokens by cross-attention; a sampler walks
from noise to a latent under classifier-free guidance (Ho & Salimans 2022), and the decoder paints it. Every one of
those pieces has a course-sized twin in sdlearn. This module holds the bridge:

- :func:`sd_v1_parameter_counts` builds SD v1.5's U-Net (sdlearn's own :class:`~sdlearn.unet.UNet`), VAE and text
  encoder from their published configurations *on the meta device* (shapes only: no memory, no weights, no
  download) and counts their parameters: 859,520,964 + 83,653,863 + 123,060,480.
- :func:`sd_v1_block_map` lists SD v1.5 block by block (module, output shape at 512 × 512, parameters) beside the
  notebook and sdlearn module that teach it (notebook 10 shows it as a table).
- :func:`load_diffusers_pipeline` opens a *local* diffusers-format Stable Diffusion folder and returns a
  :class:`SDPipeline`: sdlearn's U-Net (the folder's weights, converted as :meth:`UNet.from_diffusers` converts them),
  sdlearn's samplers configured from the folder's ``scheduler/scheduler_config.json``, sdlearn's classifier-free
  guidance, with the folder's VAE, CLIP text encoder and tokenizer. For the same seed, sampler and settings its
  images equal diffusers' ``StableDiffusionPipeline`` on that folder (tests/test_stable_diffusion.py checks it
  within 1e-3 on a tiny random folder). With ``low_memory=True`` (the command line's choice) it holds one network
  at a time, loading each when its stage comes, and draws the same images.
- :func:`write_tiny_sd_folder` writes such a folder, tiny and random, for when no real SD is on disk.

sdlearn never *needs* diffusers or transformers: they are imported inside the functions that read their models
(the VAE, the text encoder and tokenizer of a folder), and a missing one raises an ``ImportError`` naming it.
Nothing here touches the network: every ``from_pretrained`` runs with ``local_files_only=True``, and only
safetensors weights are read (no pickle).
"""

from __future__ import annotations

import gc
import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sdlearn.checkpoint import count_parameters
from sdlearn.samplers import (
    SAMPLER_NAMES,
    SPACINGS,
    VARIANCE_TYPES,
    Sampler,
    classifier_free_guidance,
    get_sampler,
    sample,
)
from sdlearn.schedules import PREDICTION_TYPES, NoiseSchedule, make_betas, rescale_zero_terminal_snr
from sdlearn.unet import (
    UNet,
    UNetConfig,
    check_storage_dtype,
    convert_diffusers_state_dict,
    sdlearn_name,
    store_weights,
)

# ----------------------------------------------------------------------------------------------------------
# SD v1.5's published configurations
#
# Source: the model repository runwayml/stable-diffusion-v1-5 on the Hugging Face Hub (now mirrored as
# stable-diffusion-v1-5/stable-diffusion-v1-5), files unet/config.json, vae/config.json, text_encoder/config.json
# and scheduler/scheduler_config.json, copied here field by field (the "_diffusers_version"/"transformers_version"
# bookkeeping and the text encoder's "_name_or_path" = "openai/clip-vit-large-patch14" left out). The text encoder
# is the text tower of OpenAI's CLIP ViT-L/14 (Radford et al. 2021), unchanged.

SD_V1_5_UNET_CONFIG: dict[str, Any] = {  # unet/config.json
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,  # the number of heads (diffusers' name; see sdlearn.unet)
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD_V1_5_VAE_CONFIG: dict[str, Any] = {  # vae/config.json (scaling_factor: diffusers' default 0.18215, SD v1's)
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD_V1_5_TEXT_ENCODER_CONFIG: dict[str, Any] = {  # text_encoder/config.json
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "float32",
    "vocab_size": 49408,
}
SD_V1_5_SCHEDULER_CONFIG: dict[str, Any] = {  # scheduler/scheduler_config.json (a PNDM scheduler, skip_prk_steps)
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SD_V1_5_PARAMETER_COUNTS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
"""What :func:`sd_v1_parameter_counts` finds (the U-Net is the "860M" of Rombach et al. 2022, Table 14)."""

SD_V1_TOKENS = 77  # CLIP's context: max_position_embeddings, the tokenizer's model_max_length


def _import(package: str, names: Sequence[str]):
    """``from package import names``, or an ImportError that says which package to install, in one line."""
    try:
        module = __import__(package, fromlist=list(names))
        return [getattr(module, name) for name in names]
    except ImportError:
        raise ImportError(f"this needs the {package!r} package (pip install {package}); sdlearn itself does not: "
                          f"only reading Stable Diffusion's own models does") from None


def sd_v1_unet() -> UNet:
    """SD v1.5's U-Net as a :class:`~sdlearn.unet.UNet` on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        return UNet(UNetConfig.from_diffusers(SD_V1_5_UNET_CONFIG))


def sd_v1_vae():
    """SD v1.5's VAE, diffusers' ``AutoencoderKL``, on the meta device (needs diffusers)."""
    (AutoencoderKL,) = _import("diffusers", ["AutoencoderKL"])
    with torch.device("meta"):
        return AutoencoderKL.from_config(SD_V1_5_VAE_CONFIG)


def sd_v1_text_encoder():
    """SD v1.5's text encoder, transformers' ``CLIPTextModel``, on the meta device (needs transformers)."""
    CLIPTextConfig, CLIPTextModel = _import("transformers", ["CLIPTextConfig", "CLIPTextModel"])
    config = {k: v for k, v in SD_V1_5_TEXT_ENCODER_CONFIG.items() if k not in ("architectures", "model_type", "torch_dtype")}
    with torch.device("meta"):
        return CLIPTextModel(CLIPTextConfig(**config))


def sd_v1_parameter_counts() -> dict[str, int | None]:
    """``{"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}``: SD v1.5's three networks built from
    their published configurations on the meta device (no weights, no download) and counted.

    The U-Net is sdlearn's own :class:`~sdlearn.unet.UNet` and needs nothing else; the VAE needs diffusers and the
    text encoder transformers: without one, its count is None and a warning names the missing package."""
    counts: dict[str, int | None] = {"unet": count_parameters(sd_v1_unet())}
    for name, build in (("vae", sd_v1_vae), ("text_encoder", sd_v1_text_encoder)):
        try:
            counts[name] = count_parameters(build())
        except ImportError as error:
            warnings.warn(f"SD v1.5's {name} not counted: {error}", stacklevel=2)
            counts[name] = None
    return counts


# ----------------------------------------------------------------------------------------------------------
# SD v1.5, block by block, beside the course


def _count(module, *names: str) -> int | None:
    if module is None:
        return None
    return sum(count_parameters(module.get_submodule(name)) for name in names)


def sd_v1_block_map(height: int = 512, width: int = 512) -> list[dict[str, Any]]:
    """SD v1.5 block by block, in the order one text-to-image call runs them, each row a dict:
    ``{"part", "module", "what", "output shape", "parameters", "course"}``.

    ``module`` is the name in diffusers' (or transformers') code; ``output shape`` is for one image of
    ``height`` × ``width`` (a multiple of 64: the VAE halves 3 times, the U-Net 3 more) and one prompt; under
    guidance the U-Net runs a batch of 2 (Ho & Salimans 2022). ``parameters`` is counted on the meta-device models
    of :func:`sd_v1_parameter_counts` (None for the VAE/text encoder without diffusers/transformers); each part's
    rows add up to its total. ``course`` names the notebook and the sdlearn module that teach the piece."""
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 64 or value % 64:
            raise ValueError(f"{name} must be a multiple of 64 (the VAE's factor 8 × the U-Net's 8), got {value!r}")
    unet = sd_v1_unet()
    try:
        vae = sd_v1_vae()
    except ImportError:
        vae = None
    try:
        text = sd_v1_text_encoder()
        text = getattr(text, "text_model", text)  # transformers < 5 wraps the tower in .text_model, 5 does not
    except ImportError:
        text = None
    c = SD_V1_5_UNET_CONFIG["block_out_channels"]
    L, D = SD_V1_TOKENS, SD_V1_5_TEXT_ENCODER_CONFIG["hidden_size"]
    h, w = height // 8, width // 8  # the latent's size
    rows = [
        ("tokenizer", "tokenizer", "CLIP's byte-pair tokenizer: 49,408 tokens, padded/truncated to 77", (1, L), 0,
         "07 · sdlearn.text.Tokenizer (word-level)"),
        ("text_encoder", "text_model.embeddings", "token embedding + learned position embedding", (1, L, D),
         _count(text, "embeddings"), "04, 07 · sdlearn.text.TextEncoder"),
        ("text_encoder", "text_model.encoder", "12 pre-norm transformer layers, causal self-attention, 12 heads", (1, L, D),
         _count(text, "encoder"), "04, 07 · sdlearn.text.TextEncoder"),
        ("text_encoder", "text_model.final_layer_norm", "LayerNorm; these 77 × 768 tokens condition the U-Net", (1, L, D),
         _count(text, "final_layer_norm"), "07 · sdlearn.text.TextEncoder"),
        ("scheduler", "scheduler", "scaled-linear β 0.00085 → 0.012, T = 1000; x_T ~ N(0, I)", (1, 4, h, w), 0,
         "01, 02, 06 · sdlearn.schedules, sdlearn.samplers"),
        ("unet", "time_proj + time_embedding", "sin-cos(t), 320 numbers → MLP → 1280", (1, 4 * c[0]),
         _count(unet, "time_mlp"), "04, 10 · sdlearn.unet.timestep_embedding"),
        ("unet", "conv_in", "3×3 conv, 4 → 320 channels", (1, c[0], h, w), _count(unet, "conv_in"),
         "10 · sdlearn.unet.UNet"),
    ]
    size = (h, w)
    for i, kind in enumerate(SD_V1_5_UNET_CONFIG["down_block_types"]):
        last = i == len(c) - 1
        attn = " + transformer (self-attn, cross-attn to the text, GEGLU)" if kind.startswith("CrossAttn") else ""
        what = f"{kind}: 2 × (ResBlock{attn})" + ("" if last else ", stride-2 conv")
        if not last:
            size = (size[0] // 2, size[1] // 2)
        rows.append(("unet", f"down_blocks.{i}", what, (1, c[i], *size), _count(unet, f"down.{i}"),
                     "10 · sdlearn.unet.ResBlock, SpatialTransformer"))
    rows.append(("unet", "mid_block", "UNetMidBlock2DCrossAttn: ResBlock, transformer, ResBlock", (1, c[-1], *size),
                 _count(unet, "mid"), "10 · sdlearn.unet.MidBlock"))
    for i, kind in enumerate(SD_V1_5_UNET_CONFIG["up_block_types"]):
        level = len(c) - 1 - i
        last = i == len(c) - 1
        attn = " + transformer" if kind.startswith("CrossAttn") else ""
        what = f"{kind}: 3 × (ResBlock on [h, skip]{attn})" + ("" if last else ", ×2 nearest + conv")
        if not last:
            size = (size[0] * 2, size[1] * 2)
        rows.append(("unet", f"up_blocks.{i}", what, (1, c[level], *size), _count(unet, f"up.{i}"),
                     "10 · sdlearn.unet.ResBlock, SpatialTransformer"))
    rows += [
        ("unet", "conv_norm_out + conv_out", "GroupNorm, SiLU, 3×3 conv → ε̂", (1, 4, h, w),
         _count(unet, "norm_out", "conv_out"), "10 · sdlearn.unet.UNet"),
        ("guidance", "classifier-free guidance", "ε̃ = ε_u + 7.5 (ε_c − ε_u), then one sampler step", (1, 4, h, w), 0,
         "06, 07 · sdlearn.samplers"),
        ("vae", "post_quant_conv", "1×1 conv on z / 0.18215", (1, 4, h, w), _count(vae, "post_quant_conv"),
         "03 · sdlearn.vae (scaling_factor)"),
        ("vae", "decoder", "conv, mid (ResBlocks + attention), 4 levels of 3 ResBlocks with ×2 upsampling",
         (1, 3, height, width), _count(vae, "decoder"), "03 · sdlearn.vae.VAE.decode"),
        ("vae", "encoder + quant_conv", "(img2img only) image → mean and log-variance of z",
         (1, 8, h, w), _count(vae, "encoder", "quant_conv"), "03 · sdlearn.vae.VAE.encode"),
    ]
    keys = ("part", "module", "what", "output shape", "parameters", "course")
    return [dict(zip(keys, row)) for row in rows]


# ----------------------------------------------------------------------------------------------------------
# The scheduler's configuration → sdlearn's schedule and sampler options

SCHEDULER_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def schedule_from_scheduler_config(config: Mapping[str, Any]) -> tuple[NoiseSchedule, dict[str, Any]]:
    """A diffusers ``scheduler_config.json`` (as a dict) → ``(schedule, options)``: the
    :class:`~sdlearn.schedules.NoiseSchedule` of its β's and the options sdlearn's samplers take from it:
    ``prediction_type``, ``steps_offset``, ``spacing`` (diffusers' ``timestep_spacing``), ``set_alpha_to_one``,
    ``clip_sample`` and ``variance_type``.

    Read as diffusers reads them, with diffusers' defaults where a field is absent (``beta_start`` 0.0001,
    ``beta_end`` 0.02, ``set_alpha_to_one`` True, ``timestep_spacing`` "leading"), except ``clip_sample``: absent, it
    is False, since clipping latents to [-1, 1] is wrong for SD (diffusers' DDIMScheduler defaults to True; SD's
    DDIM configs say False). ``trained_betas`` and ``rescale_betas_zero_snr`` (Lin et al. 2023) are honoured.
    Fields that pick how a particular diffusers scheduler steps (``skip_prk_steps``, ``use_karras_sigmas``,
    ``solver_order``, …) are not read: ``sampler=`` chooses sdlearn's method. A value sdlearn does not implement
    (``thresholding``, a ``clip_sample_range`` other than 1, an unknown spacing or β schedule) raises ValueError.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"expected a scheduler config (a dict), got {type(config).__name__}")
    where = "scheduler_config.json"

    def number(key, default, kind=(int, float)):
        value = config.get(key, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"{where}: {key} must be a number, got {value!r}")
        return value

    def flag(key, default):
        value = config.get(key, default)
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {key} must be true or false, got {value!r}")
        return value

    T = number("num_train_timesteps", 1000, int)
    if T < 2:
        raise ValueError(f"{where}: num_train_timesteps must be ≥ 2, got {T}")
    trained = config.get("trained_betas")
    if trained is not None:
        if not isinstance(trained, (list, tuple)) or len(trained) != T:
            raise ValueError(f"{where}: trained_betas must be a list of num_train_timesteps = {T} numbers")
        betas = torch.tensor(trained, dtype=torch.float32)
    else:
        name = config.get("beta_schedule", "linear")
        if name not in SCHEDULER_BETA_SCHEDULES:
            raise ValueError(f"{where}: beta_schedule={name!r} is not supported yet (sdlearn reads "
                             f"{', '.join(SCHEDULER_BETA_SCHEDULES)})")
        betas = make_betas(name, T, beta_start=float(number("beta_start", 0.0001)),
                           beta_end=float(number("beta_end", 0.02)))
    if flag("rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)

    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{where}: prediction_type={prediction_type!r} is not supported (sdlearn reads "
                         f"{', '.join(PREDICTION_TYPES)})")
    spacing = config.get("timestep_spacing", "leading")
    if spacing not in SPACINGS:
        raise ValueError(f"{where}: timestep_spacing={spacing!r} is not supported yet (sdlearn implements "
                         f"{', '.join(SPACINGS)})")
    if flag("thresholding", False):
        raise ValueError(f"{where}: thresholding=true (dynamic thresholding, Saharia et al. 2022) is not supported "
                         "yet; SD's folders say false")
    clip_sample = flag("clip_sample", False)
    if clip_sample and number("clip_sample_range", 1.0) != 1.0:
        raise ValueError(f"{where}: clip_sample_range={config['clip_sample_range']!r} is not supported yet "
                         "(sdlearn clips x̂₀ to [-1, 1] only)")
    steps_offset = number("steps_offset", 0, int)
    if not 0 <= steps_offset < T:
        raise ValueError(f"{where}: steps_offset must lie in [0, {T}), got {steps_offset}")
    variance_type = config.get("variance_type", "fixed_small")
    options = {
        "prediction_type": prediction_type,
        "steps_offset": steps_offset,
        "spacing": spacing,
        "set_alpha_to_one": flag("set_alpha_to_one", True),
        "clip_sample": clip_sample,
        "variance_type": variance_type if variance_type in VARIANCE_TYPES else "fixed_small",
    }
    return NoiseSchedule(betas), options


# ----------------------------------------------------------------------------------------------------------
# Reading a diffusers folder

SUPPORTED_PIPELINES = ("StableDiffusionPipeline",)
NETWORKS = ("text_encoder", "unet", "vae")  # in the order one call runs them
COMPONENT_FILES = {  # what a diffusers SD folder must hold, component by component
    "unet": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": ("tokenizer_config.json",),  # and vocab.json + merges.txt (SD v1.5), or tokenizer.json
    "scheduler": ("scheduler_config.json",),
}
COMPONENT_WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
COMPONENT_CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
                     "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast")}


def _read_json(path: Path) -> dict:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable JSON file: {error}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(document).__name__}")
    return document


def check_diffusers_folder(path: str | Path) -> dict:
    """Check that ``path`` is a diffusers-format Stable Diffusion (v1/v2) folder sdlearn can run, and return its
    ``model_index.json``. A missing file raises ``FileNotFoundError`` naming it; an SDXL, SD3 or other pipeline raises
    ``ValueError`` "… not supported yet", naming what was found; weights only in pickle (``.bin``) files are refused."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder at {folder} (expected a diffusers Stable Diffusion folder)")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers Stable Diffusion folder: {index_path} is missing "
                                f"(expected model_index.json, {', '.join(c + '/' for c in COMPONENT_FILES)})")
    index = _read_json(index_path)
    kind = index.get("_class_name")
    if "text_encoder_2" in index or (isinstance(kind, str) and "XL" in kind):
        raise ValueError(f"{folder}: Stable Diffusion XL is not supported yet (model_index.json has "
                         f"_class_name={kind!r}{', text_encoder_2' if 'text_encoder_2' in index else ''}); "
                         "sdlearn runs SD v1/v2 folders")
    if "transformer" in index or (folder / "transformer").is_dir() or (isinstance(kind, str) and "3" in kind):
        raise ValueError(f"{folder}: Stable Diffusion 3 and other transformer-based pipelines are not supported yet "
                         f"(found _class_name={kind!r}{', transformer/' if 'transformer' in index else ''}); "
                         "sdlearn runs SD v1/v2 folders (a U-Net)")
    if kind not in SUPPORTED_PIPELINES:
        raise ValueError(f"{folder}: model_index.json has _class_name={kind!r}, which is not supported yet; sdlearn "
                         f"runs {', '.join(SUPPORTED_PIPELINES)} folders")
    for component, files in COMPONENT_FILES.items():
        for name in files:
            if not (folder / component / name).is_file():
                raise FileNotFoundError(f"{folder} is not a complete diffusers Stable Diffusion folder: "
                                        f"{folder / component / name} is missing")
        tokenizer = folder / "tokenizer"
        if component == "tokenizer" and not (tokenizer / "tokenizer.json").is_file():
            for name in ("vocab.json", "merges.txt"):
                if not (tokenizer / name).is_file():
                    raise FileNotFoundError(f"{folder} is not a complete diffusers Stable Diffusion folder: "
                                            f"{tokenizer / name} (or tokenizer.json) is missing")
        expected = COMPONENT_CLASSES.get(component)
        entry = index.get(component)
        if expected is not None and isinstance(entry, list) and len(entry) == 2 and entry[1] not in (expected if isinstance(expected, tuple)
                                                                            else (expected,)):
            raise ValueError(f"{folder}: model_index.json has {component} = {entry!r}, which is not supported yet "
                             f"(expected {expected})")
    for component, stem in COMPONENT_WEIGHTS.items():
        sub = folder / component
        if not any(sub.glob(f"{stem}*.safetensors")):
            pickled = sorted(p.name for p in sub.glob(f"{stem}*.bin"))
            if pickled:
                raise ValueError(f"{sub} holds its weights only as {pickled[0]} (pickle), which sdlearn does not load; "
                                 "convert them to safetensors")
            raise FileNotFoundError(f"{folder} is not a complete diffusers Stable Diffusion folder: "
                                    f"{sub / (stem + '.safetensors')} is missing")
    return index


TINY_SD_SIZE = 32  # the tiny folder's image side: its VAE's factor 4 → 8 × 8 latents


def write_tiny_sd_folder(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny, randomly initialised Stable Diffusion v1 folder at ``path`` (made if needed; returns it), in
    diffusers' format exactly as SD v1.5 is published: ``model_index.json``, ``unet/`` (a 2-level
    ``UNet2DConditionModel``, cross-attention 32 wide), ``vae/`` (a 3-level ``AutoencoderKL``: factor 4, so
    32 × 32 images have 8 × 8 latents), ``text_encoder/`` (a 2-layer ``CLIPTextModel``), ``tokenizer/`` (a CLIP BPE
    tokenizer over the 26 letters and a few merges, written here) and ``scheduler/`` (DDIM with SD's settings). Every
    weight is perturbed by noise from ``seed`` so that no block is the identity. A few megabytes, written in seconds,
    no network: what the tests and notebook 10 run :func:`load_diffusers_pipeline` on when no real SD is on disk.
    Needs diffusers and transformers."""
    AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel = _import(
        "diffusers", ["AutoencoderKL", "DDIMScheduler", "StableDiffusionPipeline", "UNet2DConditionModel"])
    CLIPTextConfig, CLIPTextModel, CLIPTokenizer = _import(
        "transformers", ["CLIPTextConfig", "CLIPTextModel", "CLIPTokenizer"])
    import tempfile

    folder = Path(path)
    size = TINY_SD_SIZE
    torch.manual_seed(seed)
    noise = torch.Generator().manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=size // 4, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=4,
        sample_size=size)
    letters = "abcdefghijklmnopqrstuvwxyz"  # a CLIP BPE vocabulary: each letter alone and at a word's end, 8 merges
    merges = [("r", "e"), ("re", "d</w>"), ("c", "i"), ("ci", "r"), ("b", "l"), ("bl", "u"), ("t", "h"), ("th", "e</w>")]
    vocabulary = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters), *(a + b for a, b in merges)]
    with tempfile.TemporaryDirectory() as vocab_dir:
        (Path(vocab_dir) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocabulary)}))
        (Path(vocab_dir) / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        tokenizer = CLIPTokenizer.from_pretrained(vocab_dir, local_files_only=True, model_max_length=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocabulary), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=1, pad_token_id=1))
    with torch.no_grad():  # norms stop being 1 and biases 0
        for module, scale in ((unet, 0.05), (vae, 0.02), (text_encoder, 0.05)):
            for p in module.parameters():
                p.add_(scale * torch.randn(p.shape, generator=noise))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _fused_part(diffusers_name: str) -> bool:
    """True for a diffusers tensor that sdlearn concatenates with others into one tensor (``attn1.to_q`` …)."""
    try:
        return sdlearn_name(diffusers_name)[2] > 1
    except KeyError:  # not sdlearn's: convert_diffusers_state_dict names it
        return False


def read_safetensors(files: Sequence[str | Path], storage_dtype: torch.dtype | str = torch.float32,
                     chunk_bytes: int = 256 * 10**6) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors ``files``, by name, for loading into a model.

    - float32: each tensor is a view of the file's memory map, not a copy; its pages become resident when the
      model first reads them, once.
    - float16 or bfloat16: the tensors of two dimensions or more (the Linear and conv weights) are converted to it
      as they are read, the others (biases, normalisation) are read as float32 (:func:`~sdlearn.unet.store_weights`
      then decides what stays half). The file is opened anew every ``chunk_bytes`` of float32 data and closed
      again, so its pages do not stay resident beside the converted copies: memory holds the half-precision
      weights and one chunk, not the float32 file as well."""
    from safetensors import safe_open

    storage_dtype = check_storage_dtype(storage_dtype)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt") as whole:
            names = list(whole.keys())
            if storage_dtype == torch.float32:  # views of the memory map; the fused parts through a second map
                with safe_open(file, framework="pt") as parts:
                    for name in names:
                        state[name] = (parts if _fused_part(name) else whole).get_tensor(name)
                continue
            sizes = [math.prod(whole.get_slice(name).get_shape()) * 4 for name in names]
        start = 0
        while start < len(names):  # one chunk of names, read through its own memory map, released at its end
            end, total = start, 0
            while end < len(names) and (end == start or total + sizes[end] <= chunk_bytes):
                total, end = total + sizes[end], end + 1
            with safe_open(file, framework="pt") as chunk:
                for name in names[start:end]:
                    tensor = chunk.get_tensor(name)
                    state[name] = tensor.to(storage_dtype if tensor.ndim >= 2 else torch.float32, copy=True)
                    del tensor
            start = end
    return state


def unet_from_pretrained(folder: str | Path, storage_dtype: torch.dtype | str = torch.float32,
                         **sdlearn_fields) -> UNet:
    """The folder's ``unet/`` (diffusers' ``UNet2DConditionModel`` format) as sdlearn's :class:`~sdlearn.unet.UNet`,
    read without diffusers: ``unet/config.json`` through :meth:`UNetConfig.from_diffusers` (an unsupported field
    raises ``ValueError`` naming it) and ``unet/diffusion_pytorch_model.safetensors`` (or its shards, listed in
    ``….safetensors.index.json``) through :func:`~sdlearn.unet.convert_diffusers_state_dict`, exactly the steps of
    :meth:`UNet.from_diffusers`. ``sdlearn_fields``: ``num_train_timesteps``/``prediction_type`` (from the scheduler's
    config).

    ``storage_dtype`` float32 (the default): the weights are in memory once (an SD U-Net: 3.44 GB). The U-Net is
    built on the meta device and takes the file's tensors over: a float32 tensor is a view of the file's memory map,
    not a copy, so its pages become resident when the U-Net first reads them. The only copies are the Linears
    sdlearn fuses (Q, K, V → ``qkv``; K, V → ``kv``: 56 M of SD's 860 M parameters); their parts are read through a
    second memory map of the file, released as soon as they are concatenated.

    ``storage_dtype`` float16 (or bfloat16): the Linear and conv weights are converted as they are read
    (:func:`read_safetensors`) and kept in half precision, computed in float32 (:func:`~sdlearn.unet.store_weights`):
    half the memory (SD's U-Net: 1.72 GB), outputs that differ from float32's only by the weights' rounding."""
    sub = Path(folder) / "unet"
    storage_dtype = check_storage_dtype(storage_dtype)
    config = UNetConfig.from_diffusers(_read_json(sub / "config.json"), **sdlearn_fields)
    single, index = sub / "diffusion_pytorch_model.safetensors", sub / "diffusion_pytorch_model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = sorted({sub / name for name in _read_json(index).get("weight_map", {}).values()})
    else:
        raise FileNotFoundError(f"{single} is missing (sdlearn reads the float32 safetensors file, or its shards)")
    state = read_safetensors(files, storage_dtype)
    with torch.device("meta"):
        unet = UNet(config)
    converted = convert_diffusers_state_dict(state, unet.state_dict())
    del state
    half = {f"{prefix}.{name}" for prefix, layer in unet.named_modules()  # what store_weights keeps in storage_dtype
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) for name in ("weight", "bias")}
    unet.load_state_dict({name: tensor.to(storage_dtype if name in half else torch.float32)
                          for name, tensor in converted.items()}, assign=True)
    return store_weights(unet, storage_dtype).eval().requires_grad_(False)


def load_diffusers_pipeline(path: str | Path, device: str | torch.device = "cpu", low_memory: bool = False,
                            storage_dtype: torch.dtype | str = torch.float32) -> SDPipeline:
    """A local diffusers-format Stable Diffusion folder → an :class:`SDPipeline` that runs sdlearn's loop on it.

    The folder holds ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and
    ``scheduler/`` (as ``StableDiffusionPipeline.save_pretrained`` writes it, or as SD v1.5 is published). Everything
    is read with ``local_files_only=True`` (never a download) from safetensors files, in float32:

    - the U-Net → sdlearn's :class:`~sdlearn.unet.UNet` (:func:`unet_from_pretrained`, read first: a U-Net
      configuration sdlearn does not support is refused before anything else is loaded);
    - the VAE → diffusers' ``AutoencoderKL`` with its ``scaling_factor``;
    - the text encoder and tokenizer → transformers' ``CLIPTextModel`` and ``CLIPTokenizer``;
    - ``scheduler/scheduler_config.json`` → the noise schedule and sampler options
      (:func:`schedule_from_scheduler_config`).

    ``low_memory=True`` holds one network at a time (what ``python -m sdlearn generate --diffusers`` does): the
    pipeline keeps the three configurations (its ``unet``, ``vae`` and ``text_encoder`` are built on the meta
    device: shapes, no weights) and each call loads the text encoder, encodes, frees it; loads the U-Net, denoises,
    frees it; loads the VAE, decodes, frees it. The images are the same; memory holds the largest network (SD's
    U-Net) instead of all three, and each call pays for reading the weights again. See :class:`SDPipeline`.

    ``storage_dtype`` float16 (or bfloat16) keeps the U-Net's Linear and conv weights in half precision and computes
    in float32 (:func:`unet_from_pretrained`): SD's U-Net then takes 1.72 GB instead of 3.44 GB, and the images
    differ from float32's only by the weights' rounding (the command line's choice, with ``low_memory=True``: a
    laptop with 8 GB stays usable).

    Bad folders are refused before any weight is read (:func:`check_diffusers_folder`). Needs diffusers and
    transformers (an ImportError names the one missing)."""
    if not isinstance(low_memory, bool):
        raise ValueError(f"low_memory must be True or False, got {low_memory!r}")
    storage_dtype = check_storage_dtype(storage_dtype)
    folder = Path(path)
    check_diffusers_folder(folder)
    (AutoencoderKL,) = _import("diffusers", ["AutoencoderKL"])
    CLIPTextConfig, CLIPTextModel, CLIPTokenizer = _import("transformers", ["CLIPTextConfig", "CLIPTextModel",
                                                                            "CLIPTokenizer"])
    schedule, options = schedule_from_scheduler_config(_read_json(folder / "scheduler" / "scheduler_config.json"))
    fields = {"num_train_timesteps": schedule.num_train_timesteps, "prediction_type": options["prediction_type"]}
    local = {"local_files_only": True, "use_safetensors": True}

    def ready(module):  # float32, for inference
        return module.float().eval().requires_grad_(False)

    loaders = {  # each reads one network from the folder
        "unet": lambda: unet_from_pretrained(folder, storage_dtype, **fields),
        "vae": lambda: ready(AutoencoderKL.from_pretrained(folder / "vae", **local)),
        "text_encoder": lambda: ready(CLIPTextModel.from_pretrained(folder / "text_encoder", **local)),
    }
    if low_memory:  # the configurations only, on the meta device; an unsupported U-Net config is refused here
        with torch.device("meta"):
            unet = UNet(UNetConfig.from_diffusers(_read_json(folder / "unet" / "config.json"), **fields))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae", local_files_only=True))
            text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder", local_files_only=True))
    else:
        unet, vae, text_encoder = (loaders[name]() for name in ("unet", "vae", "text_encoder"))
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    pipe = SDPipeline(unet, vae, text_encoder, tokenizer, schedule, **options, loaders=loaders if low_memory else None)
    return pipe.to(device)


# ----------------------------------------------------------------------------------------------------------
# The pipeline


def _whole(value, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be a whole number ≥ {low}, got {value!r}")
    return value


def _prompts(prompt, name: str = "prompt") -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}")
    return list(prompts)


class SDPipeline:
    """Stable Diffusion v1/v2 text-to-image, run by sdlearn's loop over a diffusers folder's models.

    Made by :func:`load_diffusers_pipeline`. ``pipe(prompt, ...)`` takes the keyword arguments of
    :class:`sdlearn.pipeline.LatentDiffusionPipeline` plus ``height``/``width``, with Stable Diffusion's defaults,
    and returns images ``[N, 3, H, W]`` in [-1, 1]. One call (Rombach et al. 2022, Fig. 3):

    1. **Text**: the prompts and the unconditional prompts ("" or ``negative_prompt``) are tokenized to CLIP's 77
       tokens (padded with the end token, as SD was trained) and encoded once → ``[2P, 77, D]``; the U-Net reads
       all 77 (no padding mask, as in SD).
    2. **Noise**: x_T = ``init_noise_sigma`` · N(0, I) ``[N, 4, H/8, W/8]``, drawn from the generator on its own
       device as diffusers draws it (one ``randn`` of the whole batch, or one per image for a list of generators).
    3. **Denoising**: sdlearn's sampler (:mod:`sdlearn.samplers`) with the folder's ``timestep_spacing`` and
       ``steps_offset``; at each step the U-Net sees ``[uncond; cond]`` as one batch and classifier-free guidance
       (Ho & Salimans 2022, eq. 6) combines them: ε̃ = ε_u + w (ε_c − ε_u).
    4. **Decoding**: images = VAE.decode(z₀ / scaling_factor), clamped to [-1, 1].

    Guidance: as in sdlearn, w = 1 is the conditional model alone (one pass) and any other w ≥ 0 guides (w = 0 is
    the unconditional model); diffusers guides only when w > 1 and otherwise ignores w. Unlike
    :class:`~sdlearn.pipeline.LatentDiffusionPipeline`, guidance applies at every step by default, as in SD.

    **Low memory.** Given ``loaders`` (``{"text_encoder": f, "unet": g, "vae": h}``, each a function that loads that
    network; ``load_diffusers_pipeline(path, low_memory=True)`` passes them), the pipeline holds one network at a
    time: ``unet``, ``vae`` and ``text_encoder`` are then only their configurations (modules on the meta device),
    and each stage above loads its network, runs it and drops it (``gc.collect()``) before the next is loaded. The
    stages compute exactly what they compute with the three networks held, so the images are the same.
    """

    def __init__(self, unet: UNet, vae, text_encoder, tokenizer, schedule: NoiseSchedule, *,
                 prediction_type: str = "epsilon", steps_offset: int = 0, spacing: str = "leading",
                 set_alpha_to_one: bool = True, clip_sample: bool = False, variance_type: str = "fixed_small",
                 loaders: Mapping[str, Callable[[], Any]] | None = None):
        if loaders is not None and not (isinstance(loaders, Mapping) and set(loaders) == set(NETWORKS)
                                        and all(callable(load) for load in loaders.values())):
            raise ValueError(f"loaders must map {', '.join(map(repr, NETWORKS))} each to a function that loads that "
                             f"network, or be None, got {loaders!r}")
        if not isinstance(unet, UNet):
            raise ValueError(f"unet must be a sdlearn.unet.UNet, got {type(unet).__name__}")
        latent_channels = vae.config.latent_channels
        if unet.config.in_channels != latent_channels or unet.config.out_channels != latent_channels:
            raise ValueError(f"the U-Net takes {unet.config.in_channels} channels and makes {unet.config.out_channels} "
                             f"but the VAE's latents have {latent_channels}: not supported yet (an inpainting U-Net?)")
        if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
            raise ValueError(f"the U-Net reads text tokens {unet.config.cross_attention_dim} wide but the text encoder "
                             f"makes {text_encoder.config.hidden_size}")
        if unet.config.num_train_timesteps != schedule.num_train_timesteps:
            raise ValueError(f"the U-Net was configured for T = {unet.config.num_train_timesteps}, the schedule has "
                             f"{schedule.num_train_timesteps}")
        self.unet, self.vae, self.text_encoder, self.tokenizer, self.schedule = unet, vae, text_encoder, tokenizer, schedule
        self.prediction_type, self.steps_offset, self.spacing = prediction_type, steps_offset, spacing
        self.set_alpha_to_one, self.clip_sample, self.variance_type = set_alpha_to_one, clip_sample, variance_type
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)  # 8 for SD
        self.scaling_factor = float(vae.config.scaling_factor)  # 0.18215 for SD v1
        shift = getattr(vae.config, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0
        self.latent_channels = latent_channels
        size = unet.config.sample_size
        self.default_size = size * self.vae_scale_factor if size is not None else 512  # 64 · 8 = 512 for SD v1.5
        self.loaders = dict(loaders) if loaders is not None else None
        self._device = torch.device("cpu")  # where a low-memory pipeline puts each network it loads

    @property
    def low_memory(self) -> bool:
        """True when the pipeline holds one network at a time (it was given ``loaders``)."""
        return self.loaders is not None

    @property
    def device(self) -> torch.device:
        return self._device if self.low_memory else next(self.unet.parameters()).device

    def to(self, device: str | torch.device) -> SDPipeline:
        """Move the three networks to ``device`` (low memory: load each there); returns the pipeline."""
        if self.low_memory:
            self._device = torch.device(device)
        else:
            for module in (self.unet, self.vae, self.text_encoder):
                module.to(device)
        return self

    def network(self, name: str):
        """The network ``name`` (``"text_encoder"``, ``"unet"`` or ``"vae"``) for one stage: the pipeline's own, or
        in low-memory mode one loaded now onto :attr:`device`, which the stage drops when it ends."""
        if name not in NETWORKS:
            raise ValueError(f"name must be one of {', '.join(NETWORKS)}, got {name!r}")
        return self.loaders[name]().to(self._device) if self.low_memory else getattr(self, name)

    def _release(self) -> None:
        """After a stage dropped its network: in low-memory mode, collect it now (its memory returns before the next
        network is loaded); otherwise nothing."""
        if self.low_memory:
            gc.collect()

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: the VAE's factor × the U-Net's 2^(levels − 1) (64 for SD)."""
        return self.vae_scale_factor * 2 ** (self.unet.config.num_levels - 1)

    def __repr__(self) -> str:
        def millions(m):
            return f"{count_parameters(m) / 1e6:.1f}M"

        return (f"SDPipeline(U-Net {millions(self.unet)} (sdlearn), VAE {millions(self.vae)}, text encoder "
                f"{millions(self.text_encoder)}, {self.prediction_type}, spacing={self.spacing!r}, "
                f"steps_offset={self.steps_offset}, {self.default_size}×{self.default_size}, device {self.device}"
                f"{', low memory: one network at a time' if self.low_memory else ''})")

    # -- the pieces -----------------------------------------------------------------------------------

    def get_sampler(self, sampler: str | Sampler = "ddim", **options) -> Sampler:
        """sdlearn's sampler by name (``"ddpm"``, ``"ddim"``, ``"euler"``, ``"heun"``, ``"dpm++"``) with the folder's
        options (DDIM: ``set_alpha_to_one``, ``clip_sample``; DDPM: ``clip_sample``, ``variance_type``), overridden
        by ``options`` (e.g. ``eta=0.5``); or a :class:`~sdlearn.samplers.Sampler` built by hand, checked."""
        if isinstance(sampler, Sampler):
            if sampler.prediction_type != self.prediction_type:
                raise ValueError(f"the sampler reads {sampler.prediction_type!r} predictions but this U-Net makes "
                                 f"{self.prediction_type!r} ones")
            if not torch.equal(sampler.schedule.alphas_cumprod, self.schedule.alphas_cumprod):
                raise ValueError("the sampler's noise schedule differs from the folder's (pipe.schedule)")
            return sampler
        name = sampler.lower() if isinstance(sampler, str) else sampler
        if name not in SAMPLER_NAMES:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLER_NAMES)} or a Sampler, got {sampler!r}")
        folder = {"ddim": {"set_alpha_to_one": self.set_alpha_to_one, "clip_sample": self.clip_sample},
                  "ddpm": {"clip_sample": self.clip_sample, "variance_type": self.variance_type}}.get(name, {})
        return get_sampler(name, self.schedule, prediction_type=self.prediction_type, **{**folder, **options})

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts (B strings) → CLIP's last hidden states ``[B, 77, D]``, as SD's pipeline encodes them: padded to
        the tokenizer's ``model_max_length`` with its pad token, truncated beyond it (with a warning)."""
        prompts = list(prompts)
        tokenizer = self.tokenizer
        length = tokenizer.model_max_length
        ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                        return_tensors="pt").input_ids  # [B, 77]
        longest = max(len(tokenizer(p).input_ids) for p in prompts)
        if longest > length:
            warnings.warn(f"a prompt is {longest} tokens long; CLIP reads {length}, the rest is cut off", stacklevel=3)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = (ids != tokenizer.pad_token_id).long().to(self.device)
        encoder = self.network("text_encoder")
        try:
            return encoder(ids.to(self.device), attention_mask=mask)[0]  # [B, 77, D]
        finally:
            del encoder
            self._release()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents ``[B, 4, H/8, W/8]`` → images ``[B, 3, H, W]`` in [-1, 1] (clamped)."""
        z = latents.to(self.device) / self.scaling_factor + self.shift_factor
        vae = self.network("vae")
        try:
            return vae.decode(z).sample.clamp(-1, 1)
        finally:
            del vae
            self._release()

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [-1, 1] → diffusion latents ``[B, 4, H/8, W/8]`` (the posterior's mode, scaled)."""
        vae = self.network("vae")
        try:
            z = vae.encode(images.to(self.device)).latent_dist.mode()
        finally:
            del vae
            self._release()
        return (z - self.shift_factor) * self.scaling_factor

    def image_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """``(height, width)``, each the model's default when None, checked: a multiple of :attr:`size_multiple`,
        or ``ValueError``."""
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        m, f = self.size_multiple, self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < m or value % m:
                raise ValueError(f"{name} must be a multiple of {m} (the VAE's factor {f} × the U-Net's "
                                 f"{m // f} from its {self.unet.config.num_levels - 1} halvings), got {value!r}")
        return height, width

    def draw_noise(self, shape: tuple[int, ...], generator) -> torch.Tensor:
        """N(0, I) of ``shape`` drawn as diffusers' ``randn_tensor`` draws it: on the generator's device (the CPU
        for a seed), one ``randn`` for the batch, or one per image for a list of generators; moved to the device."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != shape[0]:
                raise ValueError(f"got {len(generator)} generators for {shape[0]} images; give one per image")
            noise = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device) for g in generator])
        else:
            noise = torch.randn(shape, generator=generator, device=generator.device if generator is not None else "cpu")
        return noise.to(self.device)  # [N, 4, H/8, W/8]

    # -- text → image -------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        sampler: str | Sampler = "ddim",
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | None = None,
        num_images_per_prompt: int = 1,
        progress: bool = True,
        callback: Callable | None = None,
        guidance_interval: tuple[float, float] | None = None,
        height: int | None = None,
        width: int | None = None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Images for ``prompt`` → ``[N, 3, height, width]`` in [-1, 1] on ``pipe.device``,
        N = len(prompts) · ``num_images_per_prompt``, grouped by prompt.

        The keyword arguments are :class:`~sdlearn.pipeline.LatentDiffusionPipeline`'s with SD's defaults: 50
        steps, ``guidance_scale`` 7.5, ``sampler`` "ddim", and ``height``/``width`` from the U-Net's ``sample_size``
        (512 × 512 for SD v1.5), each a multiple of :attr:`size_multiple` (64 for SD) or ``ValueError``. ``seed``
        or ``generator`` (a ``torch.Generator``, or a list of one per image); ``callback(i, t, latents, x0_pred)``
        after each step; ``guidance_interval`` ``(t_low, t_high)`` guides only at those timesteps (None: every
        step, as SD); ``latents`` ``[N, 4, height/8, width/8]``: the starting noise x_T instead of a draw (as diffusers
        takes it: multiplied by the sampler's ``init_noise_sigma``)."""
        steps = _whole(num_inference_steps, "num_inference_steps")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
                or not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a number ≥ 0 (7.5 is SD's default, 1 = no guidance), "
                             f"got {guidance_scale!r}")
        prompts = _prompts(prompt)
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        else:
            negatives = _prompts(negative_prompt, "negative_prompt")
            negatives = negatives * len(prompts) if isinstance(negative_prompt, str) else negatives
            if len(negatives) != len(prompts):
                raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts; give one string "
                                 f"for all, or a list of {len(prompts)}")
        k = _whole(num_images_per_prompt, "num_images_per_prompt")
        height, width = self.image_size(height, width)
        if guidance_interval is not None:
            ok = isinstance(guidance_interval, (tuple, list)) and len(guidance_interval) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in guidance_interval)
            if not ok or not 0 <= guidance_interval[0] <= guidance_interval[1]:
                raise ValueError(f"guidance_interval must be (t_low, t_high) with 0 ≤ t_low ≤ t_high, or None (guide "
                                 f"at every step), got {guidance_interval!r}")
        solver = self.get_sampler(sampler)
        if seed is not None:
            if generator is not None:
                raise ValueError("give either seed or generator, not both")
            if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
                raise ValueError(f"seed must be a whole number in [-2**63, 2**64), got {seed!r}")
            generator = torch.Generator().manual_seed(seed)
        elif generator is not None and not isinstance(generator, torch.Generator) and not (
                isinstance(generator, (list, tuple)) and all(isinstance(g, torch.Generator) for g in generator)):
            raise ValueError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")

        guided = guidance_scale != 1.0
        tokens = self.encode_prompt(negatives + prompts if guided else prompts)  # [2P or P, 77, D]
        tokens = tokens.repeat_interleave(k, dim=0)  # [2N or N, 77, D]
        n = len(prompts) * k
        shape = (n, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            noise = self.draw_noise(shape, generator)  # [N, 4, H/8, W/8]
        elif not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape \
                or not latents.is_floating_point() or not bool(torch.isfinite(latents).all()):
            raise ValueError(f"latents must be a finite float tensor of shape {list(shape)} (images, latent channels, "
                             f"height/{self.vae_scale_factor}, width/{self.vae_scale_factor}), got "
                             f"{list(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__}")
        else:
            noise = latents.float().to(self.device)
        unet = self.network("unet")

        def model_fn(x: torch.Tensor, t: torch.Tensor, unet: UNet = unet) -> torch.Tensor:  # (bound: del frees it)
            if not guided:
                return unet(x, t, tokens)
            if guidance_interval is not None and not guidance_interval[0] <= float(t) <= guidance_interval[1]:
                return unet(x, t, tokens[n:])  # outside the interval: the conditional prediction alone
            uncond, cond = unet(torch.cat([x, x]), t, tokens).chunk(2)  # one batch of 2N → 2 × [N, 4, h, w]
            return classifier_free_guidance(uncond, cond, guidance_scale)

        try:
            latents = sample(model_fn, solver, shape, steps, generator=generator, progress=progress, callback=callback,
                             spacing=self.spacing, steps_offset=self.steps_offset, noise=noise)
        finally:
            del unet, model_fn  # the U-Net's last references, dropped before the VAE is loaded
            self._release()
        return self.decode_latents(latents)  # [N, 3, H, W]
