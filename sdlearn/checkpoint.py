"""The file format of every model and checkpoint, and the config base class all configs share.

A checkpoint is a ``NAME.safetensors`` (every tensor) plus a ``NAME.json`` (config and scalars, the format
version, each tensor's name, dtype and shape, and the SHA-256 of the ``.safetensors`` file), both written
atomically: to a temporary file in the same folder, flushed and fsync'ed, then ``os.replace``d over the old
one, so an interrupted save leaves the previous checkpoint whole (and never writes through a symbolic link:
the link itself is replaced). Temporary files that a killed save left behind (``.NAME.*.sdlearn.tmp``, whose
writing process has ended, or older than an hour) are deleted by the next save into that folder. Loading never unpickles (no ``torch.load``):
:func:`load_checkpoint` reads safetensors and JSON only, and reports damaged or mismatched files as
:class:`CheckpointError` naming the file and what is wrong:

- a ``.safetensors`` whose bytes no longer have the SHA-256 its JSON records is an error for the weights
  shipped in ``sdlearn/weights/`` and a warning naming the file for your own (files saved before the hash
  was recorded load without a word);
- weights holding NaN or infinities are refused (:func:`load_module_state`);
- a ``step`` that is not a whole number ≥ 0 is refused;
- model configs refuse sizes beyond sane bounds (:data:`MAX_CONFIG_SIZE`) before any model is built.

- :func:`save_checkpoint`, :func:`load_checkpoint`, :func:`read_checkpoint_config` — the two files.
- :func:`load_module` — build a model from its JSON's ``model_config`` and load its weights, from the
  shipped folder (:data:`WEIGHTS_DIR`) or a folder of your own; ``sdlearn.pretrained`` builds on it.
- :func:`file_sha256` — the hash of a file: it ties a denoiser to the text tower it was trained with, and
  each ``.safetensors`` to its JSON.
- :func:`atomic_write_bytes`, :func:`atomic_write_files` — the atomic writes every file of sdlearn goes through.
- :class:`ConfigMixin` — ``to_dict`` / ``from_dict`` for the dataclass configs (``VAEConfig``,
  ``DenoiserConfig``, ...), with one error wording for unknown fields.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
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
HASH_KEY = "weights_sha256"  # the JSON entry holding the SHA-256 of the .safetensors file
_RESERVED_KEYS = ("format", "format_version", "save_id", HASH_KEY, "tensors")
_EMBEDDED_KEY = "sdlearn_json"  # safetensors metadata entry holding a copy of the JSON document

TEMPORARY_SUFFIX = ".sdlearn.tmp"  # our temporary files: .NAME.<host>-<pid>.<random>.sdlearn.tmp
STALE_TEMPORARY_SECONDS = 3600  # a temporary file this old belongs to no save still running
_WRITER_RE = re.compile(r"\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.[^.]+" + re.escape(TEMPORARY_SUFFIX) + "$")

MAX_CONFIG_SIZE = 16384
"""The largest width, count or length a model config accepts: ten times the widest layer of Stable Diffusion
v1 (1280 channels). A larger value is a damaged or mistyped config, refused before any tensor is allocated."""
MAX_CONFIG_DEPTH = 1024
"""The most blocks (or residual blocks per level) a model config accepts."""
MAX_CONFIG_RATIO = 64.0
"""The largest width ratio (``mlp_ratio``, ``cross_attn_ratio``) a model config accepts."""


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


def _remove_quietly(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except OSError:  # already gone (renamed into place, or removed by another cleanup), or not ours to remove
        pass


def _host_token() -> str:
    """8 hex digits naming this machine in temporary file names (a process id means something on its host only)."""
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _writer_is_gone(file_name: str) -> bool:
    """Whether the process that wrote our temporary file ``file_name`` has ended: it ran on this machine and its
    process id no longer exists (POSIX only; a reused id merely keeps the file until it is old)."""
    found = _WRITER_RE.search(file_name)
    if found is None or found["host"] != _host_token() or os.name != "posix":
        return False
    try:
        os.kill(int(found["pid"]), 0)  # signal 0: no signal, only the check that the process exists
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        return False
    return False


def remove_stale_temporaries(folder: str | os.PathLike, name: str | None = None,
                             older_than: float = STALE_TEMPORARY_SECONDS) -> list[Path]:
    """Delete the temporary files that interrupted saves (a crash, ``kill -9``) left in ``folder``, and return them.

    Ours are recognisable by name, ``.NAME.<host>-<pid>.<random>.sdlearn.tmp``: one is deleted when the process
    that wrote it has ended (same machine, process id gone) or when it was last modified more than ``older_than``
    seconds ago, so that the temporary file of a save still under way (in another process) is left alone. With
    ``name``, the older form ``.NAME.<8 random characters>.tmp`` of that one file is deleted when that old too.
    Files that cannot be deleted are skipped."""
    folder = Path(folder)
    legacy = re.compile(rf"^\.{re.escape(name)}\.[a-z0-9_]{{8}}\.tmp$") if name is not None else None
    cutoff = time.time() - older_than
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        ours = entry.name.startswith(".") and entry.name.endswith(TEMPORARY_SUFFIX)
        if not (ours or (legacy is not None and legacy.match(entry.name))):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            if (ours and _writer_is_gone(entry.name)) or entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def write_temporary(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a new temporary file beside ``path`` (``.NAME.<host>-<pid>.<random>.sdlearn.tmp``,
    flushed and fsync'ed) and return its path; ``os.replace(temporary, path)`` then puts it in place atomically.
    If writing fails (a full disk, a read-only folder), the temporary file is removed and the ``OSError`` raised."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_host_token()}-{os.getpid()}.",
                               suffix=TEMPORARY_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _remove_quietly(tmp)
        raise
    return Path(tmp)


def _fsync_folder(folder: Path) -> None:
    """Make the renames in ``folder`` durable (POSIX); not possible on every platform."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is always either the old file or the whole new one.

    The bytes go to a temporary file in the same folder, which is then renamed over ``path``: a symbolic link at
    ``path`` is replaced, never written through. Stale temporary files of earlier, interrupted saves in that
    folder are deleted first (:func:`remove_stale_temporaries`)."""
    atomic_write_files([(path, data)])


def atomic_write_files(files: Sequence[tuple[str | os.PathLike, bytes]]) -> list[Path]:
    """Write several files all or nothing, as far as a file system allows: every file goes to its temporary file
    first, and only when all of them are written (the step that meets a full disk) are they renamed into place.
    If writing any of them fails, every temporary file is removed, no target is touched, and the ``OSError`` is
    raised. Returns the paths written."""
    files = [(Path(path), data) for path, data in files]
    for folder, name in {(path.parent, path.name) for path, _ in files}:
        remove_stale_temporaries(folder, name)
    written: list[tuple[Path, Path]] = []
    try:
        for path, data in files:
            written.append((write_temporary(path, data), path))
        for tmp, path in written:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in written:
            _remove_quietly(tmp)
        raise
    for folder in {path.parent for path, _ in files}:
        _fsync_folder(folder)
    return [path for path, _ in files]


def save_checkpoint(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Path:
    """Write ``tensors`` to ``PATH.safetensors`` and ``config`` (JSON-serialisable) to ``PATH.json``, atomically.

    The JSON also records the format version, each tensor's dtype and shape, a ``save_id`` shared with the
    safetensors header, so that files from two different saves are never silently mixed, and the SHA-256 of the
    safetensors file (``weights_sha256``), which loading checks. Returns the safetensors path."""
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
    data = safetensors_bytes(tensors, metadata=metadata)
    # The JSON on disk is the embedded copy plus the hash of the weights file (which cannot hold its own hash).
    tensor_specs = document.pop("tensors")
    document.update({HASH_KEY: hashlib.sha256(data).hexdigest(), "tensors": tensor_specs})
    atomic_write_bytes(st_path, data)
    atomic_write_bytes(json_path, (json.dumps(document, indent=1, allow_nan=False) + "\n").encode("utf-8"))
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


def read_checkpoint_config(path: str | os.PathLike, use_embedded_copy: bool = False) -> dict:
    """The JSON half of a checkpoint (format fields included), checked to be a readable sdlearn document.

    With ``use_embedded_copy``, a missing or damaged ``.json`` is replaced, with a warning, by the copy of it
    that the ``.safetensors`` header holds (only the header is read)."""
    st_path, json_path = checkpoint_paths(path)
    try:
        if not json_path.is_file():
            raise CheckpointError(f"checkpoint config {str(json_path)!r} not found")
        try:
            text = json_path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{str(json_path)!r} is not text ({e}); the file is damaged") from None
        return _parse_document(text, repr(str(json_path)))
    except CheckpointError as problem:
        if not use_embedded_copy or not st_path.is_file():
            raise
        with open(st_path, "rb") as f:
            prefix = f.read(8)
            header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
            header = f.read(min(header_len, st_path.stat().st_size))
        metadata = _parse_header(header, st_path) if header else {}
        if _EMBEDDED_KEY not in metadata:
            raise problem from None
        warnings.warn(f"{problem}; using the copy of the config stored in {str(st_path)!r}", stacklevel=2)
        return _parse_document(metadata[_EMBEDDED_KEY], f"the config stored in {str(st_path)!r}")


def _parse_header(header: bytes, st_path: Path) -> dict[str, str]:
    try:
        parsed = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{str(st_path)!r} is not a readable safetensors file (truncated or damaged?): "
                              f"its header is not JSON ({e})") from None
    metadata = parsed.get("__metadata__") if isinstance(parsed, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def _read_safetensors(st_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """Tensors, header metadata and SHA-256 (hex) of a safetensors file, or a CheckpointError naming it."""
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
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return tensors, (metadata if isinstance(metadata, dict) else {}), hashlib.sha256(data).hexdigest()


def is_shipped(path: str | os.PathLike) -> bool:
    """Whether ``path`` is one of the files shipped in ``sdlearn/weights/`` (whose damage is an error, not a warning)."""
    return Path(path).resolve().parent == WEIGHTS_DIR


def _check_hash(document: dict, actual: str, st_path: Path, json_path: Path) -> None:
    """Compare the SHA-256 the JSON records for the weights file with the file's: an error for the shipped
    weights, a warning for a user's own; nothing for a file saved before hashes were recorded."""
    recorded = document.get(HASH_KEY)
    if recorded is None or recorded == actual:
        return
    problem = (f"{str(st_path)!r} has changed since it was saved: its sha256 is {actual[:16]}…, but "
               f"{str(json_path)!r} records {str(recorded)[:16]}…")
    if is_shipped(st_path):
        raise CheckpointError(f"{problem}. It is damaged; restore the weights shipped with sdlearn "
                              "(git checkout -- sdlearn/weights, or reinstall sdlearn)")
    warnings.warn(f"{problem} (damaged, or edited by hand); loading it anyway", stacklevel=3)


def _check_step(config: Mapping, where: str) -> None:
    """A checkpoint's ``step`` counts steps done: a whole number ≥ 0, or the file is damaged."""
    if "step" in config:
        step = config["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise CheckpointError(f"{where} records step {step!r}; a checkpoint's step is a whole number ≥ 0 "
                                  "(the file was damaged or edited)")


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint written by :func:`save_checkpoint` → ``(tensors, config)``.

    Never unpickles. Raises :class:`CheckpointError` naming the file when the safetensors file is missing,
    truncated or not safetensors at all, or holds other tensors than its config lists, or when the config's
    ``step`` is not a whole number ≥ 0. When the ``.json`` is missing, damaged or from another save (a save
    interrupted between its two renames), the copy of it inside the safetensors header is used instead, with
    a warning. When the SHA-256 the ``.json`` records differs from the file's, the shipped weights
    (``sdlearn/weights/``) raise :class:`CheckpointError` and other files warn, naming the file."""
    st_path, json_path = checkpoint_paths(path)
    tensors, metadata, sha256 = _read_safetensors(st_path)
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
        where = f"the config stored in {str(st_path)!r}"
    else:
        _check_hash(document, sha256, st_path, json_path)
        where = repr(str(json_path))
    _check_step(document, where)
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
    """Copy ``tensors`` into ``module`` after checking names, shapes and values; a mismatch raises
    :class:`CheckpointError` naming ``source`` and listing missing/unexpected keys and shape differences, and so
    do weights holding NaN or infinities (a damaged file, or one saved from a run that diverged: such a model
    draws black or NaN images)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != found:
        raise CheckpointError(
            f"{str(source)!r} does not match {type(module).__name__}'s configuration: {describe_mismatch(expected, found)}"
        )
    not_finite = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if not_finite:
        shown = ", ".join(not_finite[:4]) + (f", ... ({len(not_finite)} in all)" if len(not_finite) > 4 else "")
        raise CheckpointError(f"{str(source)!r} holds NaN or infinite weights (in {shown}); the file is damaged, "
                              "or was saved from a run that diverged")
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
    and put it in eval mode; ``model.training_info`` holds the JSON's notes on its training and
    ``model.checkpoint_info`` the whole JSON (less the format's own fields). A missing, damaged or mismatched
    file raises :class:`CheckpointError` (a ``ValueError``) naming the file and what is wrong; the config's
    sizes are checked against sane bounds before the model is built."""
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
    model.checkpoint_info = info
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
    configs dicts), :meth:`from_dict` (unknown fields are refused, naming the known ones), and the checks of
    sizes, :meth:`check_positive_ints`, :meth:`check_sizes` and :meth:`check_ratio`, which also refuse values
    beyond sane bounds (a damaged or mistyped config) before any model is built. ``size_limits`` maps a field
    to its own bound where :data:`MAX_CONFIG_SIZE` does not fit it. A config whose JSON may predate a field
    overrides :meth:`upgrade_dict`."""

    size_limits: Mapping[str, int] = {"depth": MAX_CONFIG_DEPTH}

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
        """Each field in ``names`` is an int from 1 to its bound (``size_limits``, else :data:`MAX_CONFIG_SIZE`)."""
        for name in names:
            check_positive_int(getattr(self, name), f"{type(self).__name__}.{name}",
                               maximum=self.size_limits.get(name, MAX_CONFIG_SIZE))

    def check_sizes(self, name: str, values, maximum: int = MAX_CONFIG_SIZE, minimum: int = 1) -> None:
        """Every entry of the tuple ``values`` (the field ``name`` or one derived from it, e.g. the widths) is an int
        from ``minimum`` to ``maximum``."""
        label = f"{type(self).__name__}.{name}"
        if any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values):
            raise ValueError(f"{label} must be integers ≥ {minimum}, got {tuple(values)}")
        if any(v > maximum for v in values):
            raise ValueError(f"{label} must be at most {maximum} each, got {tuple(values)}")

    def check_ratio(self, name: str, maximum: float = MAX_CONFIG_RATIO) -> None:
        """A number in the field ``name`` (a width ratio such as ``mlp_ratio``) is finite and at most ``maximum``;
        its type and sign are the config's own checks."""
        value = getattr(self, name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not value <= maximum:
            raise ValueError(f"{type(self).__name__}.{name} must be a finite number at most {maximum:g}, got {value!r}")
