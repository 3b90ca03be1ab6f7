"""Loading the shipped weights (``sdlearn/weights/``): safetensors + JSON, no network, no pickle.

Each model is a pair ``NAME.safetensors`` (its tensors) + ``NAME.json`` (``"kind"``, its
``"model_config"`` and notes on how it was trained), written by
:func:`sdlearn.training.save_checkpoint`. ``sdlearn/weights/README.md`` says how each was trained.

Adding a model is one line on top of :func:`load_module`:

    def load_denoiser(path=None, device="cpu"):
        return load_module(Denoiser, DenoiserConfig, "denoiser", path, device)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from sdlearn.training import CheckpointError, checkpoint_paths, load_checkpoint, load_module_state
from sdlearn.vae import VAE, VAEConfig

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def weights_path(name: str, path: str | os.PathLike | None = None) -> Path:
    """Where ``NAME.safetensors`` is: ``path`` may be None (the shipped weights), a folder holding
    ``NAME.safetensors``, or the file (``.safetensors`` / ``.json``) or its stem."""
    if path is None:
        return WEIGHTS_DIR / f"{name}.safetensors"
    path = Path(path)
    if path.is_dir():
        return path / f"{name}.safetensors"
    return checkpoint_paths(path)[0]


def load_module(cls, config_cls, name: str, path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Build ``cls(config_cls.from_dict(json["model_config"]))``, load its weights, move it to ``device``
    and put it in eval mode; ``model.training_info`` holds the JSON's notes on its training. A missing, damaged or mismatched file raises :class:`CheckpointError`
    (a ``ValueError``) naming the file and what is wrong."""
    st_path = weights_path(name, path)
    if not st_path.is_file() and path is None:
        raise CheckpointError(
            f"shipped weights {str(st_path)!r} not found; is sdlearn installed from a full checkout? "
            f"Train them with `python -m sdlearn train {name}`"
        )
    tensors, info = load_checkpoint(st_path)
    if info.get("kind") != name:
        raise CheckpointError(f"{str(st_path)!r} holds a {info.get('kind')!r} model, not a {name!r}")
    try:
        config = config_cls.from_dict(info["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{str(checkpoint_paths(st_path)[1])!r} has no valid model_config: {e}") from None
    model = cls(config)
    load_module_state(model, tensors, st_path)
    model.training_info = info.get("training", {})  # how these weights were made (command, time, metrics)
    return model.to(torch.device(device)).eval()


def load_vae(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> VAE:
    """The VAE, in eval mode: the shipped one (``sdlearn/weights/vae.*``), or one written by
    ``python -m sdlearn train vae --out DIR`` when ``path`` is that folder or its ``vae.safetensors``."""
    return load_module(VAE, VAEConfig, "vae", path, device)


def load_classifier(path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """The attribute classifier (:class:`sdlearn.metrics.AttributeClassifier`), in eval mode: the shipped one
    (``sdlearn/weights/classifier.*``), or one written by ``python -m sdlearn train classifier --out DIR``."""
    from sdlearn.metrics import AttributeClassifier, ClassifierConfig

    return load_module(AttributeClassifier, ClassifierConfig, "classifier", path, device)


# The text tower (sdlearn.text, notebook 07): TinyCLIP, its text encoder, and the tokenizer it was trained with.


def load_clip(path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """The TinyCLIP (text + image towers), in eval mode: the shipped one (``sdlearn/weights/clip.*``), or one
    written by ``python -m sdlearn train clip --out DIR`` when ``path`` is that folder or its ``clip.safetensors``."""
    from sdlearn.text import TinyCLIP, TinyCLIPConfig

    return load_module(TinyCLIP, TinyCLIPConfig, "clip", path, device)


def load_text_encoder(path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """TinyCLIP's text tower alone (a :class:`sdlearn.text.TextEncoder`, eval mode), as the denoiser uses it."""
    clip = load_clip(path, device)
    encoder = clip.text_encoder
    encoder.training_info = clip.training_info
    return encoder


def load_tokenizer(path: str | os.PathLike | None = None):
    """The :class:`sdlearn.text.Tokenizer` the shipped (or ``path``'s) TinyCLIP was trained with."""
    from sdlearn.text import Tokenizer
    from sdlearn.training import read_checkpoint_config

    info = read_checkpoint_config(weights_path("clip", path))
    if "tokenizer" not in info:
        raise CheckpointError(f"{str(checkpoint_paths(weights_path('clip', path))[1])!r} records no tokenizer")
    return Tokenizer.from_dict(info["tokenizer"])


# The denoiser (sdlearn.denoiser, notebooks 04, 05 and 07).


def load_denoiser(path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """The text-conditioned :class:`sdlearn.denoiser.Denoiser` (EMA weights, eval mode): the shipped one
    (``sdlearn/weights/denoiser.*``), or one written by ``python -m sdlearn train denoiser --out DIR``.

    The weights are stored as float16 and cast to the model's float32 on loading. ``denoiser.schedule_name``
    is the noise schedule it was trained for (a :func:`sdlearn.schedules.make_betas` name) and
    ``denoiser.text_encoder_info`` the text tower it reads (source, sha256 of its file, config; None when it
    was trained unconditionally); ``config.prediction_type`` says what it predicts."""
    from sdlearn.denoiser import Denoiser, DenoiserConfig
    from sdlearn.training import read_checkpoint_config

    denoiser = load_module(Denoiser, DenoiserConfig, "denoiser", path, device)
    info = read_checkpoint_config(weights_path("denoiser", path))
    denoiser.schedule_name = info.get("schedule", "scaled_linear")
    denoiser.text_encoder_info = info.get("text_encoder")
    return denoiser


# The whole text-to-image pipeline (sdlearn.pipeline, notebooks 00 and 08).


def load_pipeline(path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """The :class:`sdlearn.pipeline.LatentDiffusionPipeline` of the shipped weights (``sdlearn/weights/``: ``vae.*``,
    ``clip.*`` for the text tower and its tokenizer, ``denoiser.*``), or of the folder ``path`` that
    ``python -m sdlearn train all --out DIR`` wrote. The noise schedule is the one the denoiser's JSON names.

    A missing folder or a missing, damaged or mismatched file raises :class:`CheckpointError` (a ``ValueError``)
    naming it. When the denoiser's JSON records the hash of the text tower it was trained with and ``clip``'s
    file differs, a warning says so (the pair would still run, but answer prompts badly)."""
    import warnings

    from sdlearn.pipeline import LatentDiffusionPipeline
    from sdlearn.schedules import NoiseSchedule
    from sdlearn.training import _file_sha256

    if path is not None and not Path(path).is_dir():
        raise CheckpointError(f"weights folder {str(path)!r} not found; expected a folder holding vae.*, clip.* and "
                              "denoiser.* (.safetensors + .json), as `python -m sdlearn train all --out DIR` writes")
    vae = load_vae(path, device)
    text_encoder = load_text_encoder(path, device)
    tokenizer = load_tokenizer(path)
    denoiser = load_denoiser(path, device)
    recorded = (denoiser.text_encoder_info or {}).get("sha256")
    clip_file = weights_path("clip", path)
    if recorded is not None and recorded != _file_sha256(clip_file):
        warnings.warn(f"the denoiser in {str(weights_path('denoiser', path))!r} was trained with another text tower "
                      f"than {str(clip_file)!r} (sha256 differs); its images may not follow the prompts", stacklevel=2)
    try:
        schedule = NoiseSchedule.from_name(denoiser.schedule_name)
    except ValueError as e:
        raise CheckpointError(f"{str(checkpoint_paths(weights_path('denoiser', path))[1])!r} names an unknown "
                              f"schedule: {e}") from None
    return LatentDiffusionPipeline(vae, text_encoder, tokenizer, denoiser, schedule)
