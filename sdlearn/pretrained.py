"""Saving and loading every model the course ships (``sdlearn/weights/``): safetensors + JSON, no network, no pickle.

Each model is a pair ``NAME.safetensors`` (its tensors) + ``NAME.json`` (``"kind"``, its ``"model_config"`` and
notes on how it was trained), in the format of :mod:`sdlearn.checkpoint`. ``sdlearn/weights/README.md`` says how
each shipped file was trained. Every ``save_NAME`` here is paired with its ``load_NAME``:

- :func:`save_vae` / :func:`load_vae`;
- :func:`save_clip` / :func:`load_clip` (and :func:`load_text_encoder`, :func:`load_tokenizer`: its text tower and
  the tokenizer it was trained with);
- :func:`save_classifier` / :func:`load_classifier`;
- :func:`save_scene_reader` / :func:`load_scene_reader`;
- :func:`save_denoiser` / :func:`load_denoiser` (the DiT);
- :func:`save_unet` / :func:`load_unet` (the course U-Net, notebook 10);
- :func:`save_student` / :func:`load_student` (the few-step consistency student, :mod:`sdlearn.distill`);
- :func:`load_pipeline`: the whole text-to-image pipeline of a folder, with either denoiser.

Adding a model is a pair of lines on top of :func:`sdlearn.checkpoint.save_module` and
:func:`sdlearn.checkpoint.load_module`:

    def load_denoiser(path=None, device="cpu"):
        return load_module(Denoiser, DenoiserConfig, "denoiser", path, device)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sdlearn.adapt import load_adapter, merge_lora
from sdlearn.checkpoint import (
    WEIGHTS_DIR,
    CheckpointError,
    checkpoint_paths,
    file_sha256,
    load_module,
    read_checkpoint_config,
    save_module,
    weights_path,
)
from sdlearn.control import ControlNet, ControlNetConfig
from sdlearn.denoiser import Denoiser, DenoiserConfig
from sdlearn.distill import ConsistencySampler, ConsistencyStudent, StudentConfig
from sdlearn.metrics import AttributeClassifier, ClassifierConfig, SceneReader, SceneReaderConfig
from sdlearn.pipeline import LatentDiffusionPipeline
from sdlearn.samplers import Sampler
from sdlearn.schedules import NoiseSchedule
from sdlearn.text import TextEncoder, TinyCLIP, TinyCLIPConfig, Tokenizer
from sdlearn.unet import UNet, UNetConfig
from sdlearn.vae import VAE, VAEConfig

__all__ = [
    "WEIGHTS_DIR", "weights_path", "load_module", "save_vae", "load_vae", "save_clip", "load_clip",
    "load_text_encoder", "load_tokenizer", "save_classifier", "load_classifier", "save_scene_reader",
    "load_scene_reader", "load_star_reader", "save_denoiser", "load_denoiser", "save_unet", "load_unet", "save_flow",
    "load_flow", "save_controlnet", "load_controlnet", "save_student", "load_student", "FAST_DENOISER", "FAST_STEPS", "FastPipeline",
    "DENOISERS",
    "ADAPTERS",
    "load_pipeline",
]

PathLike = str | os.PathLike


# The VAE (sdlearn.vae, notebook 03).


def save_vae(vae: VAE, path: PathLike, training: Mapping[str, Any] | None = None) -> Path:
    """Write a VAE as ``PATH.safetensors`` + ``PATH.json`` (its config, scaling factor included, and ``training``
    notes), the format :func:`load_vae` reads."""
    return save_module(vae, path, "vae", training)


def load_vae(path: PathLike | None = None, device: str | torch.device = "cpu") -> VAE:
    """The VAE, in eval mode: the shipped one (``sdlearn/weights/vae.*``), or one written by
    ``python -m sdlearn train vae --out DIR`` when ``path`` is that folder or its ``vae.safetensors``."""
    return load_module(VAE, VAEConfig, "vae", path, device)


# The text tower (sdlearn.text, notebook 07): TinyCLIP, its text encoder, and the tokenizer it was trained with.


def save_clip(clip: TinyCLIP, path: PathLike, training: Mapping[str, Any] | None = None,
              tokenizer: Tokenizer | None = None) -> Path:
    """Write a TinyCLIP as ``PATH.safetensors`` + ``PATH.json`` (its config, its tokenizer's vocabulary and
    ``training`` notes), the format :func:`load_clip` reads."""
    tokenizer = Tokenizer(max_length=clip.config.text.max_length) if tokenizer is None else tokenizer
    return save_module(clip, path, "clip", training, tokenizer=tokenizer.to_dict())


def load_clip(path: PathLike | None = None, device: str | torch.device = "cpu") -> TinyCLIP:
    """The TinyCLIP (text + image towers), in eval mode: the shipped one (``sdlearn/weights/clip.*``), or one
    written by ``python -m sdlearn train clip --out DIR`` when ``path`` is that folder or its ``clip.safetensors``."""
    return load_module(TinyCLIP, TinyCLIPConfig, "clip", path, device)


def load_text_encoder(path: PathLike | None = None, device: str | torch.device = "cpu") -> TextEncoder:
    """TinyCLIP's text tower alone (a :class:`sdlearn.text.TextEncoder`, eval mode), as the denoiser uses it."""
    clip = load_clip(path, device)
    encoder = clip.text_encoder
    encoder.training_info = clip.training_info
    return encoder


def load_tokenizer(path: PathLike | None = None) -> Tokenizer:
    """The :class:`sdlearn.text.Tokenizer` the shipped (or ``path``'s) TinyCLIP was trained with (from ``clip.json``,
    or, with a warning, from the copy of it inside ``clip.safetensors`` when the JSON is missing or damaged).

    ``clip.json`` keeps the tokenizer's vocabulary and ``max_length`` under ``"tokenizer"``: the Shapes words, or
    the words of your own captions (``python -m sdlearn train all --data FOLDER``). A file that records no
    tokenizer was written before the vocabulary was saved, so it gets the Shapes vocabulary, provided its text
    tower has as many tokens."""
    return _tokenizer_from(read_checkpoint_config(weights_path("clip", path), use_embedded_copy=True), path)


def _tokenizer_from(info: Mapping[str, Any], path: PathLike | None) -> Tokenizer:
    where = repr(str(checkpoint_paths(weights_path("clip", path))[1]))
    try:
        if "tokenizer" in info:
            return Tokenizer.from_dict(info["tokenizer"])
        text = TinyCLIPConfig.from_dict(info["model_config"]).text
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{where} holds no usable tokenizer: {e}") from None
    shapes = Tokenizer(max_length=text.max_length)  # an older file: the Shapes vocabulary, the only one there was
    if text.vocab_size != shapes.vocab_size:
        raise CheckpointError(f"{where} records no tokenizer, and its text tower has {text.vocab_size} tokens, not "
                              f"the {shapes.vocab_size} of the Shapes vocabulary; add its \"tokenizer\" entry")
    return shapes


# The attribute classifier (sdlearn.metrics), the judge of prompt accuracy.


def save_classifier(classifier: AttributeClassifier, path: PathLike, training: Mapping[str, Any] | None = None) -> Path:
    """Write ``PATH.safetensors`` + ``PATH.json`` (config and ``training`` notes), the format
    :func:`load_classifier` reads."""
    return save_module(classifier, path, "classifier", training)


def load_classifier(path: PathLike | None = None, device: str | torch.device = "cpu") -> AttributeClassifier:
    """The attribute classifier (:class:`sdlearn.metrics.AttributeClassifier`), in eval mode: the shipped one
    (``sdlearn/weights/classifier.*``), or one written by ``python -m sdlearn train classifier --out DIR``."""
    return load_module(AttributeClassifier, ClassifierConfig, "classifier", path, device)


def save_scene_reader(reader: SceneReader, path: PathLike, training: Mapping[str, Any] | None = None) -> Path:
    """Write ``PATH.safetensors`` + ``PATH.json`` (config and ``training`` notes), the format
    :func:`load_scene_reader` reads."""
    return save_module(reader, path, "scene_reader", training)


def load_scene_reader(path: PathLike | None = None, device: str | torch.device = "cpu") -> SceneReader:
    """The scene reader (:class:`sdlearn.metrics.SceneReader`), in eval mode: the shipped one
    (``sdlearn/weights/scene_reader.*``), or one written by :func:`sdlearn.recipes.train_scene_reader` into ``path``."""
    return load_module(SceneReader, SceneReaderConfig, "scene_reader", path, device)


def load_star_reader(path: PathLike | None = None, device: str | torch.device = "cpu") -> SceneReader:
    """The star-aware scene reader, the judge of star prompts (notebook 12; its shape head also has "star"), in
    eval mode: the shipped one (``sdlearn/weights/scene_reader_star.*``), or one written by
    :func:`sdlearn.adapt_recipes.train_star_reader` (a folder holding ``scene_reader_star.safetensors``, or the file).
    A reader without the star class raises :class:`CheckpointError`."""
    path = weights_path("scene_reader_star", path)
    if not path.is_file():
        raise CheckpointError(f"no star-aware scene reader at {str(path)!r}; train one with "
                              f"sdlearn.adapt_recipes.train_star_reader")
    reader = load_module(SceneReader, SceneReaderConfig, "scene_reader", path, device)
    if "star" not in reader.config.shapes:
        raise CheckpointError(f"{str(path)!r} holds a scene reader whose shapes ({', '.join(reader.config.shapes)}) "
                              f"do not include the star")
    return reader


# The denoiser (sdlearn.denoiser, notebooks 04, 05 and 07).


def save_denoiser(
    denoiser: Denoiser,
    path: PathLike,
    training: Mapping[str, Any] | None = None,
    *,
    schedule: str = "scaled_linear",
    text_encoder: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write a denoiser as ``PATH.safetensors`` + ``PATH.json``, the format :func:`load_denoiser` reads: its
    config, the noise ``schedule`` name and prediction type it was trained for, the ``text_encoder`` it was
    trained with (source, file hash, config; None = unconditional) and ``training`` notes.

    Tensors are stored as ``dtype``, float16 by default: half the bytes, and loading casts them back to float32.
    float16 rounds each weight by at most 2⁻¹¹ relative; ``python benchmarks/pipeline.py`` measures what that
    changes in the images."""
    return _save_sampling_model(denoiser, path, "denoiser", training, schedule, text_encoder, dtype)


def _save_sampling_model(model: Denoiser | UNet, path: PathLike, kind: str, training, schedule: str, text_encoder,
                         dtype: torch.dtype) -> Path:
    """What :func:`save_denoiser` and :func:`save_unet` write: the module, plus what sampling needs to know."""
    return save_module(model, path, kind, training, dtype=dtype, schedule=schedule,
                       prediction_type=model.config.prediction_type,
                       text_encoder=None if text_encoder is None else dict(text_encoder))


def _sampling_info(model: Denoiser | UNet) -> Denoiser | UNet:
    """Set ``schedule_name`` and ``text_encoder_info`` of a loaded denoiser from its JSON (or from the copy of it
    in the .safetensors when the JSON is lost)."""
    info = model.checkpoint_info
    model.schedule_name = info.get("schedule", "scaled_linear")
    model.text_encoder_info = info.get("text_encoder")
    return model


def load_denoiser(path: PathLike | None = None, device: str | torch.device = "cpu") -> Denoiser:
    """The text-conditioned :class:`sdlearn.denoiser.Denoiser` (EMA weights, eval mode): the shipped one
    (``sdlearn/weights/denoiser.*``), or one written by ``python -m sdlearn train denoiser --out DIR``.

    The weights are stored as float16 and cast to the model's float32 on loading. ``denoiser.schedule_name``
    is the noise schedule it was trained for (a :func:`sdlearn.schedules.make_betas` name) and
    ``denoiser.text_encoder_info`` the text tower it reads (source, sha256 of its file, config; None when it
    was trained unconditionally); ``config.prediction_type`` says what it predicts."""
    return _sampling_info(load_module(Denoiser, DenoiserConfig, "denoiser", path, device))


# The course U-Net (sdlearn.unet, notebook 10): the same file format as the DiT's, kind "unet".


def save_unet(
    unet: UNet,
    path: PathLike,
    training: Mapping[str, Any] | None = None,
    *,
    schedule: str = "scaled_linear",
    text_encoder: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write a :class:`sdlearn.unet.UNet` as ``PATH.safetensors`` + ``PATH.json``, the format :func:`load_unet`
    reads; the same entries as :func:`save_denoiser` (config in diffusers' names, ``schedule``, prediction type,
    ``text_encoder``, ``training``), tensors as ``dtype`` (float16 by default: the course U-Net is 7.8 MB)."""
    return _save_sampling_model(unet, path, "unet", training, schedule, text_encoder, dtype)


def load_unet(path: PathLike | None = None, device: str | torch.device = "cpu") -> UNet:
    """The course :class:`sdlearn.unet.UNet` (EMA weights, eval mode): the shipped one (``sdlearn/weights/unet.*``),
    or one written by ``python -m sdlearn train unet --out DIR``; ``schedule_name`` and ``text_encoder_info`` as
    in :func:`load_denoiser`."""
    return _sampling_info(load_module(UNet, UNetConfig, "unet", path, device))


# The whole text-to-image pipeline (sdlearn.pipeline, notebooks 00 and 08).


DENOISERS = {"dit": "denoiser", "unet": "unet", "flow": "flow"}
"""``load_pipeline(denoiser=NAME)`` → the stem of the weights it loads: the DiT (``denoiser.*``, the default), the
course U-Net (``unet.*``) or the DiT trained with rectified flow (``flow.*``)."""
ADAPTERS = {"star": "star_adapter"}
"""``load_pipeline(adapter=NAME)`` → the stem of the adapter file it applies (``sdlearn/weights/star_adapter.*``:
the star, taught to the shipped DiT and text tower by ``python -m sdlearn train adapter --concept star``)."""


def save_flow(flow: Denoiser, path: PathLike, training: Mapping[str, Any] | None = None, *, schedule: str = "scaled_linear",
              text_encoder: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float16) -> Path:
    """Write the flow DiT as ``PATH.safetensors`` + ``PATH.json`` (kind "flow"), the format :func:`load_flow` reads;
    the entries of :func:`save_denoiser` (``schedule`` is kept only for the timestep count and the interface)."""
    if flow.config.prediction_type != "flow":
        raise ValueError(f"save_flow writes a flow model (prediction_type 'flow'); this one predicts "
                         f"{flow.config.prediction_type!r}: use save_denoiser")
    return _save_sampling_model(flow, path, "flow", training, schedule, text_encoder, dtype)


def load_flow(path: PathLike | None = None, device: str | torch.device = "cpu") -> Denoiser:
    """The DiT trained with rectified flow (``config.prediction_type == "flow"``; EMA weights, eval mode): the
    shipped one (``sdlearn/weights/flow.*``), or one written by ``python -m sdlearn train flow --out DIR``. The file
    format is :func:`save_denoiser`'s, kind "flow"; ``schedule_name`` and ``text_encoder_info`` as in
    :func:`load_denoiser`."""
    model = _sampling_info(load_module(Denoiser, DenoiserConfig, "flow", path, device))
    if model.config.prediction_type != "flow":
        raise CheckpointError(f"{str(weights_path('flow', path))!r} holds a denoiser with prediction_type "
                              f"{model.config.prediction_type!r}, not a flow model")
    return model


# The few-step student (sdlearn.distill, notebook 13): consistency-distilled from the DiT, guidance baked in.

FAST_DENOISER = "student"
"""``load_pipeline(denoiser="fast")`` loads ``student.*``: the consistency student of :mod:`sdlearn.distill`, written
by ``python -m sdlearn train distill``."""
FAST_STEPS = 4
"""The fast pipeline's default number of steps (one student call each)."""


def save_student(student: ConsistencyStudent, path: PathLike, training: Mapping[str, Any] | None = None, *,
                 text_encoder: Mapping[str, Any] | None = None, teacher: Mapping[str, Any] | None = None,
                 dtype: torch.dtype = torch.float16) -> Path:
    """Write a :class:`sdlearn.distill.ConsistencyStudent` as ``PATH.safetensors`` + ``PATH.json`` (kind
    "student"), the format :func:`load_student` reads: its config (the teacher's architecture, schedule, boundary
    scalings, the guidance distilled in, and ``distilled_steps``, the step counts it was distilled for), the
    ``text_encoder`` and ``teacher`` it was distilled with (source, sha256) and ``training`` notes; tensors as
    ``dtype`` (float16: the DiT's 7.9 MB)."""
    if not isinstance(student, ConsistencyStudent):
        raise ValueError(f"save_student writes a ConsistencyStudent (sdlearn.distill), got {type(student).__name__}")
    return save_module(student, path, "student", training, dtype=dtype, schedule=student.config.schedule,
                       prediction_type=student.config.prediction_type,
                       distilled_steps=list(student.config.distilled_steps),
                       text_encoder=None if text_encoder is None else dict(text_encoder),
                       teacher=None if teacher is None else dict(teacher))


def load_student(path: PathLike | None = None, device: str | torch.device = "cpu") -> ConsistencyStudent:
    """The consistency student (EMA weights, eval mode): the shipped one (``sdlearn/weights/student.*``), or one
    written by ``python -m sdlearn train distill --out DIR`` (that folder, or its ``student.safetensors``).
    ``schedule_name`` and ``text_encoder_info`` as in :func:`load_denoiser`; ``config.distilled_steps`` the step
    counts it was distilled for."""
    return _sampling_info(load_module(ConsistencyStudent, StudentConfig, "student", path, device))


class FastPipeline(LatentDiffusionPipeline):
    """The pipeline of ``load_pipeline(denoiser="fast")``: a :class:`LatentDiffusionPipeline` whose denoiser is a
    consistency student (:mod:`sdlearn.distill`) and whose default sampler is its
    :class:`~sdlearn.distill.ConsistencySampler`, with :data:`FAST_STEPS` = 4 steps by default.

    Guidance is distilled into the student (w = ``denoiser.config.guidance_scale`` inside the teacher's guidance
    interval), so each step is one conditional call: ``guidance_scale`` must be left out or 1 (no extra guidance);
    any other value raises ``ValueError`` rather than run a guidance the student was not trained for (and a
    negative prompt, which only acts through guidance, does nothing). A step count other than the student's
    ``distilled_steps`` (1, 2, 4) warns and still draws. ``sampler`` may still name another sampler (they read the
    student's x₀ predictions), or ``"lcm"`` for the consistency sampler."""

    def _guidance(self, guidance_scale) -> float:
        if guidance_scale is not None and guidance_scale != 1:
            raise ValueError(f"the fast student has guidance {self.denoiser.config.guidance_scale:g} distilled in; "
                             f"leave guidance_scale out (or 1), got {guidance_scale!r}")
        return 1.0

    @property
    def default_sampler(self) -> Sampler:
        """A fresh :class:`~sdlearn.distill.ConsistencySampler` for the student's grid and distilled step counts."""
        config = self.denoiser.config
        return ConsistencySampler(self.schedule, grid_steps=config.grid_steps, distilled_steps=config.distilled_steps)

    def get_sampler(self, sampler: str | Sampler | None = None) -> Sampler:
        """As :meth:`LatentDiffusionPipeline.get_sampler`, and ``"lcm"`` (or None) is the consistency sampler."""
        return super().get_sampler(self.default_sampler if sampler in (None, "lcm") else sampler)

    def __call__(self, prompt, negative_prompt=None, num_inference_steps=None, guidance_scale=None, *args, **kwargs):
        """``pipe(prompt, ...)`` as :meth:`LatentDiffusionPipeline.__call__`, 4 steps by default, no guidance option."""
        steps = FAST_STEPS if num_inference_steps is None else num_inference_steps
        return super().__call__(prompt, negative_prompt, steps, self._guidance(guidance_scale), *args, **kwargs)

    def img2img(self, prompt, image, strength: float = 0.6, **kwargs):
        """:meth:`LatentDiffusionPipeline.img2img` with the student: 4 steps by default, no guidance option."""
        kwargs["guidance_scale"] = self._guidance(kwargs.get("guidance_scale"))
        kwargs.setdefault("num_inference_steps", FAST_STEPS)
        return super().img2img(prompt, image, strength, **kwargs)

    def inpaint(self, prompt, image, mask, paste_unmasked: bool = True, **kwargs):
        """:meth:`LatentDiffusionPipeline.inpaint` with the student: 4 steps by default, no guidance option."""
        kwargs["guidance_scale"] = self._guidance(kwargs.get("guidance_scale"))
        kwargs.setdefault("num_inference_steps", FAST_STEPS)
        return super().inpaint(prompt, image, mask, paste_unmasked, **kwargs)


# The ControlNet (sdlearn.control, notebook 13): steers the DiT with an edge map.


def save_controlnet(controlnet: ControlNet, path: PathLike, training: Mapping[str, Any] | None = None, *,
                    denoiser_sha256: str | None = None, dtype: torch.dtype = torch.float16) -> Path:
    """Write a ControlNet as ``PATH.safetensors`` + ``PATH.json`` (kind "controlnet": its config, the SHA-256 of the
    denoiser file it was trained on, ``training`` notes), atomically and with the weights' SHA-256, the format
    :func:`load_controlnet` reads. Tensors are stored as ``dtype`` (float16: half the bytes; loading casts back)."""
    if not isinstance(controlnet, ControlNet):
        raise ValueError(f"save_controlnet writes a sdlearn.control.ControlNet, got {type(controlnet).__name__}")
    return save_module(controlnet, path, "controlnet", training, dtype=dtype, denoiser_sha256=denoiser_sha256)


def load_controlnet(path: PathLike | None = None, device: str | torch.device = "cpu") -> ControlNet:
    """The :class:`sdlearn.control.ControlNet` (float32 weights, eval mode) of ``path`` (a folder holding
    ``controlnet.safetensors``, or the file), or the shipped one when ``path`` is None. ``controlnet.denoiser_sha256``
    is the SHA-256 of the denoiser file it was trained with (None if not recorded). A missing, damaged or mismatched
    file raises :class:`sdlearn.checkpoint.CheckpointError`."""
    model = load_module(ControlNet, ControlNetConfig, "controlnet", path, device)
    model.denoiser_sha256 = model.checkpoint_info.get("denoiser_sha256")
    return model


def load_pipeline(path: PathLike | None = None, device: str | torch.device = "cpu", *,
                  denoiser: str = "dit", adapter: str | os.PathLike | None = None,
                  controlnet: bool = False) -> LatentDiffusionPipeline:
    """The :class:`sdlearn.pipeline.LatentDiffusionPipeline` of the shipped weights (``sdlearn/weights/``: ``vae.*``,
    ``clip.*`` for the text tower and its tokenizer, ``denoiser.*``), or of the folder ``path`` that
    ``python -m sdlearn train all --out DIR`` wrote. The noise schedule is the one the denoiser's JSON names.

    ``denoiser``: ``"dit"`` (default) loads the transformer, ``denoiser.*``; ``"unet"`` the course U-Net,
    ``unet.*`` (:func:`load_unet`, written by ``python -m sdlearn train unet``), with the same VAE and text tower.
    A folder without that file raises :class:`CheckpointError` saying how to train one. ``"fast"`` loads the few-step
    consistency student, ``student.*`` (:func:`load_student`, written by ``python -m sdlearn train distill``), into a
    :class:`FastPipeline`: its consistency sampler by default, 4 steps, guidance distilled in (``guidance_scale``
    other than 1 raises ``ValueError``), other step counts than 1, 2, 4 warn; without that file
    ``FileNotFoundError`` says how to train it. A folder holding ``student.*`` but neither ``vae.*`` nor ``clip.*``
    (what ``train distill --out DIR`` writes) gets the shipped VAE and text tower, the ones it was distilled with.

    A missing folder or a missing, damaged or mismatched file raises :class:`CheckpointError` (a ``ValueError``)
    naming it; so does a shipped file whose bytes differ from the SHA-256 its JSON records (your own files warn).
    A lost ``.json`` is replaced, with a warning, by the copy of it inside its ``.safetensors``. When the
    denoiser's JSON records the hash of the text tower it was trained with and ``clip``'s file differs, a
    warning says so (the pair would still run, but answer prompts badly).

    ``adapter``: ``"star"`` applies the adapter that teaches the word "star" (:data:`ADAPTERS`; ``path/star_adapter.*``
    when the folder holds one, else the shipped file), or the path of an adapter file
    (:func:`sdlearn.adapt.save_adapter`, as ``python -m sdlearn train adapter --out DIR`` writes ``DIR/adapter.*``).
    Its LoRA matrices are merged into the denoiser's weights. An adapter made for other base files raises
    :class:`CheckpointError` naming both SHA-256s; an adapter with a denoiser other than ``"dit"`` (the model
    adapters are trained on) raises ``ValueError``.

    ``controlnet=True`` attaches the ControlNet (``path/controlnet.*`` when the folder holds one, else the shipped
    file; :func:`load_controlnet`, written by ``python -m sdlearn train controlnet``) as ``pipe.controlnet``, so that
    ``pipe(prompt, control_image=edges)`` draws the object where the edge map says. It steers the DiT it was trained
    on: with another denoiser ``ValueError``; when its JSON records another DiT file than the one loaded, a warning."""
    if adapter is not None:
        named = isinstance(adapter, str) and adapter in ADAPTERS
        if not named and not (isinstance(adapter, str | os.PathLike) and str(adapter).endswith(".safetensors")):
            raise ValueError(f"adapter must be one of {', '.join(map(repr, ADAPTERS))} or the path of an adapter's "
                             f".safetensors file, got {adapter!r}")
        if denoiser != "dit":
            raise ValueError(f"adapter={adapter!r} with denoiser={denoiser!r}: adapters are trained on the DiT "
                             f"(denoiser='dit'); the {denoiser} has other layers")
    if not isinstance(controlnet, bool):
        raise ValueError(f"controlnet must be True or False, got {controlnet!r}")
    if controlnet and denoiser != "dit":
        raise ValueError(f"controlnet=True with denoiser={denoiser!r}: the ControlNet steers the DiT it was trained on "
                         f"(denoiser='dit')")
    fast = denoiser == "fast"
    if not isinstance(denoiser, str) or (denoiser not in DENOISERS and not fast):
        raise ValueError(f"denoiser must be one of {', '.join(map(repr, DENOISERS))} (the DiT, the course U-Net, the "
                         "flow DiT) or 'fast' (the few-step student), "
                         f"got {denoiser!r}")
    name = FAST_DENOISER if fast else DENOISERS[denoiser]
    if path is not None and not Path(path).is_dir():
        raise CheckpointError(f"weights folder {str(path)!r} not found; expected a folder holding vae.*, clip.* and "
                              f"{name}.* (.safetensors + .json), as `python -m sdlearn train all --out DIR` writes")
    if denoiser in ("unet", "flow") and not weights_path(name, path).is_file():
        where = "the shipped weights hold" if path is None else f"{str(path)!r} holds"
        what = "U-Net" if denoiser == "unet" else "flow model"
        raise CheckpointError(f"{where} no {what} ({str(weights_path(name, path))!r} not found); train one with "
                              f"`python -m sdlearn train {denoiser} --out DIR` (it reads the shipped VAE and text tower) "
                              f"and put DIR/{name}.safetensors + {name}.json beside the vae.* and clip.* it was trained with")
    if fast and not weights_path(name, path).is_file():
        where = "the shipped weights hold" if path is None else f"{str(path)!r} holds"
        raise FileNotFoundError(f"{where} no few-step student ({str(weights_path(name, path))!r} not found); train "
                                f"it with `python -m sdlearn train distill --out DIR`, then load_pipeline(DIR, "
                                f"denoiser='fast') or `generate --denoiser fast --weights DIR`")
    parts = path  # the folder of the VAE and the text tower
    if fast and path is not None and not any(weights_path(part, path).is_file() for part in ("vae", "clip")):
        parts = None  # the folder `train distill` wrote holds the student alone: the shipped parts it was distilled with
    vae = load_vae(parts, device)
    clip = load_clip(parts, device)
    text_encoder = clip.text_encoder
    text_encoder.training_info = clip.training_info
    tokenizer = _tokenizer_from(clip.checkpoint_info, parts)
    model = {"unet": load_unet, "flow": load_flow, "dit": load_denoiser, "fast": load_student}[denoiser](path, device)
    recorded = (model.text_encoder_info or {}).get("sha256")
    clip_file = weights_path("clip", parts)
    if recorded is not None and recorded != file_sha256(clip_file):
        warnings.warn(f"the denoiser in {str(weights_path(name, path))!r} was trained with another text tower "
                      f"than {str(clip_file)!r} (sha256 differs); its images may not follow the prompts", stacklevel=2)
    try:
        schedule = NoiseSchedule.from_name(model.schedule_name)
    except ValueError as e:
        raise CheckpointError(f"{str(checkpoint_paths(weights_path(name, path))[1])!r} names an unknown "
                              f"schedule: {e}") from None
    pipe = (FastPipeline if fast else LatentDiffusionPipeline)(vae, text_encoder, tokenizer, model, schedule)
    if adapter is not None:
        file = Path(adapter)
        if isinstance(adapter, str) and adapter in ADAPTERS:  # the folder's own adapter, else the shipped one
            own = weights_path(ADAPTERS[adapter], path) if path is not None else None
            file = own if own is not None and own.is_file() else weights_path(ADAPTERS[adapter])
        if not Path(file).is_file():
            raise CheckpointError(f"adapter file {str(file)!r} not found; train one with `python -m sdlearn train "
                                  f"adapter --concept star --out DIR` and pass adapter='DIR/adapter.safetensors'")
        base = {"denoiser": file_sha256(weights_path(name, path)), "text_encoder": file_sha256(clip_file)}
        pipe.adapter_info = load_adapter(file, tokenizer=tokenizer, text_encoder=text_encoder, denoiser=model,
                                         base_hashes=base)
        merge_lora(model)
    if controlnet:
        own = weights_path("controlnet", path) if path is not None else None
        file = own if own is not None and own.is_file() else weights_path("controlnet")
        if not file.is_file():
            raise CheckpointError(f"no ControlNet at {str(file)!r}; train one with `python -m sdlearn train controlnet "
                                  f"--out DIR` and put DIR/controlnet.safetensors + .json in the weights folder")
        pipe.controlnet = load_controlnet(file, device)
        pipe.controlnet.config.check_fits(model)
        trained_on, loaded = pipe.controlnet.denoiser_sha256, file_sha256(weights_path(name, path))
        if trained_on is not None and trained_on != loaded:
            warnings.warn(f"the ControlNet in {str(file)!r} was trained on another DiT than "
                          f"{str(weights_path(name, path))!r} (sha256 differs); it may not steer it well", stacklevel=2)
    return pipe


# -- what a recipe was handed: the shipped weights, a path, or a model -----------------------------------
def resolve_text_encoder(text_encoder, device):
    """``"shipped"`` / a folder or file / a TextEncoder / None → ``(encoder or None, tokenizer or None, record)``."""
    if text_encoder is None:
        return None, None, None
    if isinstance(text_encoder, TextEncoder):
        tokenizer = Tokenizer(max_length=text_encoder.config.max_length)
        if tokenizer.vocab_size != text_encoder.config.vocab_size:
            raise ValueError(f"the text encoder has vocab_size {text_encoder.config.vocab_size}; the Shapes tokenizer has {tokenizer.vocab_size}")
        record = {"source": "a TextEncoder object passed in (not saved)", "config": text_encoder.config.to_dict()}
        return text_encoder.to(device).eval().requires_grad_(False), tokenizer, record
    if isinstance(text_encoder, (str, os.PathLike)):
        path = None if str(text_encoder) == "shipped" else text_encoder
        st_path = weights_path("clip", path)
        encoder = load_text_encoder(path, device=device).requires_grad_(False)
        record = {
            "source": "shipped: sdlearn/weights/clip.safetensors" if path is None else str(st_path),
            "sha256": file_sha256(st_path),
            "config": encoder.config.to_dict(),
        }
        return encoder, load_tokenizer(path), record
    raise ValueError(
        f"text_encoder must be 'shipped', a path to TinyCLIP weights, a TextEncoder, or None (unconditional); "
        f"got {type(text_encoder).__name__}"
    )


def resolve_vae(vae, device):
    """None (the shipped VAE) / a folder or file / a VAE → ``(vae, record)``, frozen, for a recipe that encodes with it."""
    if vae is None or isinstance(vae, (str, os.PathLike)):
        st_path = weights_path("vae", vae)
        model = load_vae(vae, device=device)
        source = "shipped: sdlearn/weights/vae.safetensors" if vae is None else str(st_path)
        return model.requires_grad_(False), {"source": source, "sha256": file_sha256(st_path), "scaling_factor": model.scaling_factor}
    if isinstance(vae, VAE):
        record = {"source": "a VAE object passed in (not saved)", "scaling_factor": vae.scaling_factor}
        return vae.to(device).eval().requires_grad_(False), record
    raise ValueError(f"vae must be None (the shipped VAE), a path to VAE weights, or a VAE; got {type(vae).__name__}")
