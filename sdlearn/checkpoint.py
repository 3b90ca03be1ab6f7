"""The file format of every model and checkpoint, and the config base class all configs share.

A checkpoint is a ``NAME.safetensors`` (every tensor) plus a ``NAME.json`` (config and scalars, the format
version, and each tensor's name, dtype and shape), both written atomically: to a temporary file in the same
folder, flushed and fsync'ed, then ``os.replace``d over the old one, so an interrupted save leaves the
previous checkpoint whole. Loading never unpickles (no ``torch.load``): :func:`load_checkpoint` reads
safetensors and JSON only, and reports damaged or mismatched files as :class:`CheckpointError` naming the
file and what is wrong.

- :func:`save_checkpoint`, :func:`load_checkpoint`, :func:`read_checkpoint_config` — the two files.
- :func:`load_module` — build a model from its JSON's ``model_config`` and load its weights, from the
  shipped folder (:data:`WEIGHTS_DIR`) or a folder of your own; ``sdlearn.pretrained`` builds on it.
- :func:`file_sha256` — the hash that ties a denoiser to the text tower it was trained with.
- :class:`ConfigMixin` — ``to_dict`` / ``from_dict`` for the dataclass configs (``VAEConfig``,
  ``DenoiserConfig``, ...), with one error wording for unknown fields.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes

from sdlearn.checks import check_positive_int

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

FORMAT = "sdlearn"
FORMAT_VERSION = 1
_RESERVED_KEYS = ("format", "format_version", "save_id", "tensors")
_EMBEDDED_KEY = "sdlearn_json"  # safetensors metadata entry holding a copy of the JSON document


class CheckpointError(ValueError):
    """A checkpoint or weights file is missing, damaged, or does not match the model."""



# ------------------------------------------------------------------------------------------------
# Checkpoint files: NAME.safetensors + NAME.json, written atomically, read without unpickling


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``"dir/name"``, ``"dir/name.safetensors"`` or ``"dir/name.json"`` → the two files of that checkpoint."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is always either the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable (POSIX); not possible on every platform
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def save_checkpoint(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Path:
    """Write ``tensors`` to ``PATH.safetensors`` and ``config`` (JSON-serialisable) to ``PATH.json``, atomically.

    The JSON also records the format version, each tensor's dtype and shape, and a ``save_id`` shared with
    the safetensors header, so that files from two different saves are never silently mixed. Returns the
    safetensors path."""
    st_path, json_path = checkpoint_paths(path)
    clash = [k for k in _RESERVED_KEYS if k in config]
    if clash:
        raise ValueError(f"config keys {clash} are reserved by the checkpoint format")
    st_path.parent.mkdir(parents=True, exist_ok=True)
    save_id = uuid.uuid4().hex
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **config,
        "save_id": save_id,
        "tensors": {name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)} for name, t in tensors.items()},
    }
    text = json.dumps(document, indent=1, allow_nan=False) + "\n"  # fails early if config is not JSON
    # The safetensors header carries a copy of the JSON, so the weights file alone is a complete checkpoint:
    # if a save is interrupted between the two renames below, loading still finds one consistent pair.
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "save_id": save_id, _EMBEDDED_KEY: text}
    atomic_write_bytes(st_path, safetensors_bytes(tensors, metadata=metadata))
    atomic_write_bytes(json_path, text.encode("utf-8"))
    return st_path


def _parse_document(text: str, where: str) -> dict:
    try:
        document = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where} is not valid JSON ({e}); the file is damaged") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT or not isinstance(document.get("tensors"), dict):
        raise CheckpointError(f"{where} is not an sdlearn checkpoint config (it lacks 'format': 'sdlearn' and 'tensors')")
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{where} has format_version {version!r}; this sdlearn reads version {FORMAT_VERSION}")
    return document


def read_checkpoint_config(path: str | os.PathLike) -> dict:
    """The JSON half of a checkpoint (format fields included), checked to be a readable sdlearn document."""
    _, json_path = checkpoint_paths(path)
    if not json_path.is_file():
        raise CheckpointError(f"checkpoint config {str(json_path)!r} not found")
    try:
        text = json_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{str(json_path)!r} is not text ({e}); the file is damaged") from None
    return _parse_document(text, repr(str(json_path)))


def _read_safetensors(st_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file, or a CheckpointError naming it."""
    if not st_path.is_file():
        raise CheckpointError(f"checkpoint weights {str(st_path)!r} not found")
    data = st_path.read_bytes()
    try:
        if len(data) < 8:
            raise ValueError(f"only {len(data)} bytes")
        header_len = int.from_bytes(data[:8], "little")
        if header_len > len(data) - 8:
            raise ValueError(f"the header claims {header_len} bytes but the file has {len(data)}")
        header = json.loads(data[8 : 8 + header_len])
        tensors = safetensors_load(data)
    except Exception as e:  # safetensors raises several types (SafetensorError, ValueError, ...) on bad bytes
        raise CheckpointError(f"{str(st_path)!r} is not a readable safetensors file (truncated or damaged?): {e}") from None
    return tensors, (header.get("__metadata__") or {})


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint written by :func:`save_checkpoint` → ``(tensors, config)``.

    Never unpickles. Raises :class:`CheckpointError` naming the file when the safetensors file is missing,
    truncated or not safetensors at all, or holds other tensors than its config lists. When the ``.json`` is
    missing, damaged or from another save (a save interrupted between its two renames), the copy of it
    inside the safetensors header is used instead, with a warning."""
    st_path, json_path = checkpoint_paths(path)
    tensors, metadata = _read_safetensors(st_path)
    problem = None
    try:
        document = read_checkpoint_config(path)
        if document.get("save_id") != metadata.get("save_id"):
            problem = f"{str(json_path)!r} comes from another save than {str(st_path)!r}"
    except CheckpointError as e:
        problem = str(e)
    if problem is not None:
        if _EMBEDDED_KEY not in metadata:
            raise CheckpointError(problem)
        document = _parse_document(metadata[_EMBEDDED_KEY], f"the config stored in {str(st_path)!r}")
        warnings.warn(f"{problem}; using the copy of the config stored in {str(st_path)!r}", stacklevel=2)
    listed = {name: tuple(spec["shape"]) for name, spec in document["tensors"].items()}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if listed != found:
        raise CheckpointError(
            f"{str(st_path)!r} does not hold the tensors its config lists: {describe_mismatch(listed, found)}"
        )
    config = {k: v for k, v in document.items() if k not in _RESERVED_KEYS}
    device = torch.device(device)
    return {name: t.to(device) for name, t in tensors.items()}, config


def describe_mismatch(expected: Mapping[str, tuple], found: Mapping[str, tuple]) -> str:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [f"{k}: expected {list(expected[k])}, found {list(found[k])}" for k in sorted(set(expected) & set(found)) if tuple(expected[k]) != tuple(found[k])]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            shown = ", ".join(items[:6]) + (f", ... ({len(items)} in all)" if len(items) > 6 else "")
            parts.append(f"{label}: {shown}")
    return "; ".join(parts) or "no difference"


def load_module_state(module: nn.Module, tensors: Mapping[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Copy ``tensors`` into ``module`` after checking names and shapes; a mismatch raises
    :class:`CheckpointError` naming ``source`` and listing missing/unexpected keys and shape differences."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != found:
        raise CheckpointError(
            f"{str(source)!r} does not match {type(module).__name__}'s configuration: {describe_mismatch(expected, found)}"
        )
    module.load_state_dict(dict(tensors))


# ------------------------------------------------------------------------------------------------
# EMA of the weights


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``module`` (only those with ``requires_grad`` if ``trainable_only``): the one way
    the package counts a model's size."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------
# Loading a model: the shipped weights (sdlearn/weights/) or a folder written by `python -m sdlearn train`


def weights_path(name: str, path: str | os.PathLike | None = None) -> Path:
    """Where ``NAME.safetensors`` is: ``path`` may be None (the shipped weights), a folder holding
    ``NAME.safetensors``, or the file (``.safetensors`` / ``.json``) or its stem."""
    if path is None:
        return WEIGHTS_DIR / f"{name}.safetensors"
    path = Path(path)
    if path.is_dir():
        return path / f"{name}.safetensors"
    return checkpoint_paths(path)[0]


def load_module(cls, config_cls, name: str, path: str | os.PathLike | None = None,
                device: str | torch.device = "cpu") -> nn.Module:
    """Build ``cls(config_cls.from_dict(json["model_config"]))``, load its weights, move it to ``device``
    and put it in eval mode; ``model.training_info`` holds the JSON's notes on its training. A missing,
    damaged or mismatched file raises :class:`CheckpointError` (a ``ValueError``) naming the file and what
    is wrong."""
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


def save_module(module: nn.Module, path: str | os.PathLike, kind: str, training: Mapping[str, Any] | None = None,
                dtype: torch.dtype | None = None, **info) -> Path:
    """Write a model that has a ``config`` as ``PATH.safetensors`` + ``PATH.json``: its ``kind``, its
    ``model_config``, ``info`` and ``training`` notes; the format :func:`load_module` reads. With ``dtype``,
    floating-point tensors are stored in it (loading casts them back to the model's dtype)."""
    if dtype not in (None, torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype!r}")
    tensors = module.state_dict()
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return save_checkpoint(path, tensors, {"kind": kind, "model_config": module.config.to_dict(), **info,
                                           "training": dict(training or {})})


# ------------------------------------------------------------------------------------------------
# Configs


def _jsonable(value):
    if isinstance(value, ConfigMixin):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


class ConfigMixin:
    """What every dataclass config of sdlearn shares: :meth:`to_dict` (JSON-ready: tuples become lists, nested
    configs dicts), :meth:`from_dict` (unknown fields are refused, naming the known ones) and
    :meth:`check_positive_ints`. A config whose JSON may predate a field overrides :meth:`upgrade_dict`."""

    def to_dict(self) -> dict:
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def upgrade_dict(cls, d: dict) -> dict:
        """Fill in what a dict written by an older sdlearn lacks; the default changes nothing."""
        return d

    @classmethod
    def from_dict(cls, d: Mapping):
        if not isinstance(d, Mapping):
            raise ValueError(f"{cls.__name__}.from_dict expects a dict of fields, got {type(d).__name__}")
        known = sorted(f.name for f in fields(cls))
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; known fields: {known}")
        return cls(**cls.upgrade_dict(dict(d)))

    @classmethod
    def resolve(cls, config):
        """``None`` → the default config; a config of this class → itself; anything else → a ValueError."""
        if config is None:
            return cls()
        if not isinstance(config, cls):
            raise ValueError(f"config must be a {cls.__name__}, got {type(config).__name__}")
        return config

    def check_positive_ints(self, *names: str) -> None:
        for name in names:
            check_positive_int(getattr(self, name), f"{type(self).__name__}.{name}")
