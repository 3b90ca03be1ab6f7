"""One training loop for every model of the course, with EMA, checkpoints and a divergence guard.

The VAE (notebook 03), the text encoder (07) and the denoiser (05) all train through :func:`train`:

    result = train(model, loss_fn, batch_fn, lr=1e-3, max_steps=2000, checkpoint_dir="runs/x")

- ``batch_fn(step) -> batch`` makes the batch of a given step (tensors, or tuples/dicts of them; they
  are moved to the model's device). Making it a pure function of ``step`` — e.g. a generator seeded
  by the step — is what lets a resumed run repeat an uninterrupted one exactly.
- ``loss_fn(model, batch, step) -> loss`` or ``(loss, logs)`` with ``logs`` a dict of floats.

Behaviour (decisions, written down):

- **Budgets** ``max_steps`` and ``max_minutes`` count the whole run, across resumes: resuming a run
  that was stopped after 4 of its 10 minutes trains 6 more. Whichever is reached first stops it.
- **Learning rate**: AdamW by default; ``warmup_steps`` of linear warm-up, then ``lr_schedule``
  ("constant" or "cosine", or a function of the run's progress in [0, 1] returning a factor).
  Progress is ``step / max_steps``, or the elapsed fraction of ``max_minutes`` when only a time budget
  is given (time-based progress is, of course, not exactly reproducible).
- **EMA** (``ema_decay``): an exponential moving average of the weights, θ̄ ← d·θ̄ + (1 − d)·θ
  (Polyak & Juditsky 1992), kept beside the raw weights; ``result.ema.copy_to(model)`` uses it.
- **Checkpoints** every ``checkpoint_every`` steps and at the end, into ``checkpoint_dir``: model,
  EMA, optimizer state, step, elapsed time, loss history and the torch RNG states, so that resuming
  (``resume=True``, the default, when a checkpoint exists) continues bit-for-bit on the same machine.
- **Divergence guard**: a non-finite loss or gradient norm stops training *before* the weights are
  updated and raises :class:`NonFiniteLossError` naming the step and the last good checkpoint, which
  is left untouched. We raise rather than return: a NaN run must not flow on into saved weights.
- **Interrupts**: while the loop runs (in the main thread), Ctrl-C (SIGINT) and SIGTERM ask it to stop
  *between* two steps: the step under way finishes, a checkpoint of the state after it is saved, and
  :class:`TrainingInterrupted` (a ``KeyboardInterrupt``) is raised naming it, so nothing since the last
  periodic checkpoint is lost and resuming repeats the uninterrupted run exactly. A second signal stops at
  once, as before.
- **Nothing lost to the disk**: the checkpoint folder is checked to be writable, with room for a checkpoint,
  before the first step (:func:`check_writable_folder`, :func:`check_free_space`). A periodic checkpoint that
  cannot be written (a full disk) warns and training goes on; the final one (or an interrupt's), if it still
  cannot be written, is saved to a rescue folder instead (:func:`write_or_rescue`) and a warning says where.

- **Several processes** (``torchrun --nproc_per_node=N``, detected by its variables ``RANK``, ``WORLD_SIZE`` and
  ``LOCAL_RANK``): :func:`train` starts a process group (gloo on CPU, nccl on CUDA, one GPU per process) and trains
  the model wrapped in ``DistributedDataParallel``, which averages the gradients of the N processes' batches
  (data parallelism, Li et al. 2020), so one step on N batches of B is one step on a batch of N·B. Each rank draws
  its own data and noise (:func:`rank_seed`); the ranks agree each step on the (mean) loss, on a signal and on the
  time budget, so they stop together; rank 0 alone writes checkpoints, the others wait for it; every rank resumes
  from rank 0's checkpoint. The EMA and the checkpoints hold the unwrapped model (no ``module.`` in names).
  Without those variables nothing of this happens. ``loss_fn`` must reach the parameters through ``model(...)``
  (the forward pass DDP watches); other attributes (``model.config``) are passed through to the model.

Checkpoints use the format of :mod:`sdlearn.checkpoint` (safetensors + JSON, written atomically, never
unpickled). The recipes that train each model of the course on this loop are in :mod:`sdlearn.recipes`.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from sdlearn.checkpoint import (
    CheckpointError,
    checkpoint_paths,
    describe_mismatch,
    load_checkpoint,
    load_module_state,
    save_checkpoint,
)


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss (or the gradient norm) became inf or NaN.

    Attributes: ``step`` (the step whose update was skipped), ``checkpoint`` (the last good checkpoint's
    path, or None) and ``result`` (the :class:`TrainResult` up to that step)."""

    def __init__(self, message: str, step: int, checkpoint: Path | None, result: TrainResult):
        super().__init__(message)
        self.step, self.checkpoint, self.result = step, checkpoint, result


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → cuda if available, else mps, else cpu; anything else is checked and returned."""
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'mps', got {device!r}")
    if device == "auto":
        if torch.cuda.is_available():
            return resolve_device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; expected 'auto', 'cpu', 'cuda' or 'mps'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu or auto")
    if resolved.type == "cuda" and resolved.index is None and launched_by_torchrun():
        resolved = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per process
    if resolved.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} asked for, but MPS is not available here; use --device cpu or auto")
    return resolved


def usable_cores() -> int:
    """The number of CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on every platform
        return os.cpu_count() or 1


def set_threads(threads: int) -> int:
    """``torch.set_num_threads(threads)``, capped at :func:`usable_cores` with a warning: more threads than cores
    only wait on each other, and a huge count crashes torch. Returns the count set."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    cores = usable_cores()
    if threads > cores:
        warnings.warn(f"{threads} threads asked for, but this machine has {cores} core{'s' * (cores > 1)}; "
                      f"using {cores}", stacklevel=2)
        threads = cores
    torch.set_num_threads(threads)
    return threads


# ------------------------------------------------------------------------------------------------
# Several processes: torchrun and DistributedDataParallel

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
RANK_SEED_STRIDE = 1_099_511_627_791  # the first prime above 2**40: rank r's seeds are seed + r·stride


def launched_by_torchrun() -> bool:
    """Whether this process is one of several that ``torchrun`` started: its variables ``RANK``, ``WORLD_SIZE`` and
    ``LOCAL_RANK`` are all set, with ``WORLD_SIZE`` > 1."""
    if not all(name in os.environ for name in TORCHRUN_VARIABLES):
        return False
    try:
        return int(os.environ["WORLD_SIZE"]) > 1
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be a whole number, got {os.environ['WORLD_SIZE']!r}") from None


def init_distributed(device: torch.device) -> bool:
    """Start the process group once, when :func:`launched_by_torchrun`: nccl for a CUDA ``device`` (which becomes
    this process's current GPU), gloo otherwise, meeting at ``MASTER_ADDR:MASTER_PORT`` (torchrun sets them).
    → whether a process group is running. It is shut down when the process exits."""
    if dist.is_available() and dist.is_initialized():
        return True
    if not launched_by_torchrun():
        return False
    if not dist.is_available():
        raise RuntimeError("torchrun started this process, but this build of torch has no torch.distributed")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(shut_down_distributed)
    return True


SHUTDOWN_WAIT = timedelta(seconds=60)


def shut_down_distributed() -> None:
    """Leave the process group once every rank has finished: without that wait, a rank that exits and closes its
    connections while another is still finishing the last collective can make gloo abort the other process
    ("terminate called without an active exception"). With gloo the wait gives up after ``SHUTDOWN_WAIT``
    (a rank that failed never arrives), and the group is left all the same. :func:`init_distributed` registers
    it to run at exit; it does nothing without a process group, so calling it earlier is safe."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "gloo" and distributed_world_size() > 1:
        with contextlib.suppress(RuntimeError):  # a rank that never arrived: its own error says why
            dist.monitored_barrier(timeout=SHUTDOWN_WAIT)
    dist.destroy_process_group()


def distributed_rank() -> int:
    """This process's rank in the process group, 0 when there is none."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def distributed_world_size() -> int:
    """How many processes train together, 1 when there is no process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Whether this process writes the files: rank 0, or the only process."""
    return distributed_rank() == 0


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for without a process group)."""
    if distributed_world_size() > 1:
        dist.barrier()


def rank_seed(seed: int) -> int:
    """``seed`` for rank 0 (and a single process), ``seed + rank · RANK_SEED_STRIDE`` for the others: each rank's
    own stream of data and noise, far from every other rank's streams."""
    return seed + distributed_rank() * RANK_SEED_STRIDE


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator a recipe's ``batch_fn`` draws step ``step`` from: a pure function of ``(seed, step)`` (and,
    under torchrun, of the rank: :func:`rank_seed`, so that each rank draws its own data), so that a resumed run
    repeats an uninterrupted one exactly."""
    return torch.Generator().manual_seed(rank_seed(seed * 1_000_003 + step))


def _all_ranks(values: list[float], device: torch.device, op) -> list[float]:
    """``values`` reduced over the ranks with ``op`` (a ``dist.ReduceOp``); unchanged in a single process."""
    if distributed_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


class _SharedModel(DistributedDataParallel):
    """``DistributedDataParallel`` that passes attribute look-ups it does not know (``model.config``) to the wrapped
    model, so that a ``loss_fn`` written for one process runs unchanged."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


# ------------------------------------------------------------------------------------------------
# Where results go: checked before the first step, rescued when writing fails at the end


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def check_writable_folder(folder: str | os.PathLike, create: bool = True) -> Path:
    """Check, before any work, that files can be written into ``folder`` → the folder as a ``Path``.

    With ``create`` the folder (and its parents) is made; without, the nearest folder that exists on the way
    must be writable (so that it can be made later). The check writes and removes a small temporary file, so it
    sees what a permission bit does not: a read-only file system, or a file where a folder is expected. Raises
    ``NotADirectoryError``, ``PermissionError`` or ``OSError`` with a one-line message naming the folder."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == folder else f"cannot be made: {str(existing)!r} is a file"
        raise NotADirectoryError(f"{str(folder)!r} {where}, not a folder")
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
            existing = folder
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".sdlearn-write-test-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise type(error)(f"cannot write into {str(folder)!r} ({_reason(error)})") from None
    return folder


def checkpoint_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None = None) -> int:
    """About how many bytes a checkpoint of this run and the weights saved after it take: the model's state (twice:
    the checkpoint and the weights), the EMA's, and two tensors per parameter for the optimizer (Adam's moments;
    an over-estimate for plain SGD)."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    moments = 2 * sum(p.numel() * p.element_size() for group in optimizer.param_groups for p in group["params"])
    return 2 * state + moments + (state if ema is not None else 0)


def check_free_space(folder: str | os.PathLike, needed: int) -> None:
    """Raise an ``OSError`` (ENOSPC) saying so when the disk of ``folder`` has fewer than ``needed`` bytes free."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        error = OSError(f"only {free / 2**20:.1f} MB free on the disk of {str(folder)!r}, but this run's checkpoint "
                        f"and weights take about {needed / 2**20:.1f} MB: free some space, or choose another folder")
        error.errno = errno.ENOSPC
        raise error


class SavedElsewhereError(OSError):
    """A file could not be written where it was asked for, and was saved to a rescue folder instead.
    ``intended`` and ``saved_to`` are the two paths; the message names both."""

    def __init__(self, message: str, intended: Path, saved_to: Path):
        super().__init__(message)
        self.intended, self.saved_to = Path(intended), Path(saved_to)


_RESCUE_NAME = f"sdlearn-rescue-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def rescue_folders() -> list[Path]:
    """Where :func:`write_or_rescue` tries to save what could not be written, in order: a folder named
    ``sdlearn-rescue-DATE-TIME-PID`` (the same for the whole process) in the temporary folder, the home
    folder, and the current folder."""
    bases = [Path(tempfile.gettempdir()), Path.home(), Path.cwd()]
    return list(dict.fromkeys(base / _RESCUE_NAME for base in bases))


def write_or_rescue(write: Callable[[Path], Any], path: str | os.PathLike, what: str) -> Path:
    """``write(path)``; returns ``path``. If that raises an ``OSError`` (a full disk, a folder made read-only, a
    removed drive), ``write(folder / path.name)`` is tried in each of :func:`rescue_folders` and, once one works,
    :class:`SavedElsewhereError` is raised naming both places, so the work is kept and the caller is told. If no
    place works, an ``OSError`` naming the places tried is raised. ``what`` ("the checkpoint") is for messages."""
    path = Path(path)
    try:
        write(path)
        return path
    except OSError as error:
        failure = error
    tried = []
    for folder in rescue_folders():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write(folder / path.name)
        except OSError as error:
            tried.append(f"{str(folder)!r} ({_reason(error)})")
            continue
        raise SavedElsewhereError(f"could not write {what} to {str(path)!r} ({_reason(failure)}); saved it to "
                                  f"{str(folder / path.name)!r} instead", path, folder / path.name) from failure
    raise type(failure)(f"could not write {what} to {str(path)!r} ({_reason(failure)}), nor to a rescue folder: "
                        f"{'; '.join(tried)}") from failure


# ------------------------------------------------------------------------------------------------
# Interrupts: SIGINT and SIGTERM stop the loop between two steps


class TrainingInterrupted(KeyboardInterrupt):
    """Training was stopped by Ctrl-C (SIGINT) or SIGTERM between two steps.

    Attributes: ``step`` (the steps completed, all saved), ``checkpoint`` (the checkpoint written at that step, or
    None without a ``checkpoint_dir``), ``signal_name`` ("SIGINT" or "SIGTERM") and ``result`` (the
    :class:`TrainResult` up to that step). The message says what was saved and where."""

    def __init__(self, message: str, step: int, checkpoint: Path | None, signal_name: str, result: TrainResult):
        super().__init__(message)
        self.step, self.checkpoint, self.signal_name, self.result = step, checkpoint, signal_name, result


class _StopBetweenSteps:
    """While active (in the main thread only), SIGINT and SIGTERM set ``received`` instead of stopping the
    process; the loop checks it between steps. A second signal restores the old handlers and raises
    ``KeyboardInterrupt`` at once. Signals that were being ignored stay ignored."""

    def __init__(self, saving: bool):
        self.saving = saving
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopBetweenSteps:
        if threading.current_thread() is not threading.main_thread():
            return self
        for name in ("SIGINT", "SIGTERM"):
            number = getattr(signal, name, None)
            previous = signal.getsignal(number) if number is not None else None
            if previous is None or previous == signal.SIG_IGN:
                continue
            try:
                signal.signal(number, self._handle)
            except (ValueError, OSError):
                continue
            self._previous[number] = previous
        return self

    def _handle(self, number, frame) -> None:
        if self.received is not None:
            self._restore()
            raise KeyboardInterrupt
        self.received = signal.Signals(number).name
        then = ", then saving a checkpoint" if self.saving else ""
        print(f"\n{self.received}: stopping after this step{then}; send it again to stop at once",
              file=sys.stderr, flush=True)

    def _restore(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()

    def __exit__(self, *exc) -> None:
        self._restore()


# ------------------------------------------------------------------------------------------------

# EMA of the weights


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers:

        θ̄ ← d·θ̄ + (1 − d)·θ      after every optimizer step,

    with the warm-up d_n = min(decay, (1 + n) / (10 + n)) so early averages are not dominated by the
    random initialisation. The averaged weights usually sample better (Ho et al. 2020, Karras et al. 2024)."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        self.num_updates += 1
        state = model.state_dict()
        for name, avg in self.shadow.items():
            avg.lerp_(state[name].detach(), 1.0 - d)  # avg + (1 − d)(θ − avg)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s weights with the averages."""
        state = model.state_dict()
        for name, avg in self.shadow.items():
            state[name].copy_(avg)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: Mapping) -> None:
        shadow = state["shadow"]
        expected = {k: tuple(v.shape) for k, v in self.shadow.items()}
        found = {k: tuple(v.shape) for k, v in shadow.items()}
        if expected != found:
            raise CheckpointError(f"EMA state does not match the model: {describe_mismatch(expected, found)}")
        for name, avg in self.shadow.items():
            avg.copy_(shadow[name])
        self.decay, self.num_updates = float(state["decay"]), int(state["num_updates"])


# ------------------------------------------------------------------------------------------------
# Training state ↔ flat tensors + JSON


def _optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state → tensors named ``optim/<param index>/<key>`` and a JSON part (param groups, scalars)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{index}/{key}"] = value
            else:
                scalars[f"{index}/{key}"] = value
    return tensors, {"class": type(optimizer).__name__, "param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], info: Mapping) -> None:
    if info.get("class") != type(optimizer).__name__:
        raise CheckpointError(f"the checkpoint's optimizer is {info.get('class')}, this run uses {type(optimizer).__name__}")
    per_param: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.removeprefix("optim/").split("/", 1)
        per_param.setdefault(int(index), {})[key] = value
    for name, value in info.get("scalars", {}).items():
        index, key = name.split("/", 1)
        per_param.setdefault(int(index), {})[key] = value
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()} for g in info["param_groups"]]
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = state
    return tensors


def _restore_rng(tensors: Mapping[str, torch.Tensor]) -> None:
    if "rng/torch" in tensors:
        torch.set_rng_state(tensors["rng/torch"].to("cpu", torch.uint8))
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda/")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.to("cpu", torch.uint8) for t in cuda])


# ------------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    """What a call to :func:`train` did. ``losses`` covers the whole run (resumed parts included)."""

    losses: list[float] = field(default_factory=list)
    logs: list[dict] = field(default_factory=list)  # every log_every steps: {"step", "loss", "lr", ...}
    step: int = 0  # steps completed in the whole run
    start_step: int = 0  # where this call started (> 0 after a resume)
    seconds: float = 0.0  # training time of the whole run
    stopped_reason: str = ""  # "max_steps", "max_minutes", "non-finite loss" or "interrupted"
    checkpoint: Path | None = None
    ema: EMA | None = None
    record: dict | None = None  # train_all: what train_all.json records (the stages, the scores)

    @property
    def final_loss(self) -> float:
        """Mean loss over the last 50 steps (or fewer)."""
        tail = self.losses[-50:]
        return float(sum(tail) / len(tail)) if tail else math.nan


PRECISIONS = ("fp32", "bf16")  # train(precision=...): float32 throughout, or bf16 autocast over float32 weights


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # NamedTuple
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


LR_SCHEDULES = ("constant", "cosine")
"""The learning-rate schedules :func:`train` knows by name (it also takes a function of the run's progress)."""


def _schedule_factor(lr_schedule, progress: float) -> float:
    if lr_schedule is None or lr_schedule == "constant":
        return 1.0
    if lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    if callable(lr_schedule):
        return float(lr_schedule(progress))
    raise ValueError(f"lr_schedule must be 'constant', 'cosine', a function of progress, or None; got {lr_schedule!r}")


def train(
    model: nn.Module,
    loss_fn: Callable,
    batch_fn: Callable[[int], Any],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    max_steps: int | None = None,
    max_minutes: float | None = None,
    warmup_steps: int = 0,
    lr_schedule: str | Callable[[float], float] | None = "constant",
    grad_clip: float | None = None,
    ema_decay: float | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_name: str = "checkpoint",
    checkpoint_every: int | None = 1000,
    resume: bool = True,
    seed: int | None = None,
    config: Mapping[str, Any] | None = None,
    progress: bool = True,
    log_every: int = 25,
    desc: str = "training",
    precision: str = "fp32",
) -> TrainResult:
    """Train ``model`` by minimising ``loss_fn(model, batch_fn(step), step)`` until a budget is spent.

    See the module docstring for the behaviour of budgets, schedules, EMA, checkpoints, resume and the
    divergence guard. ``config`` (JSON-serialisable) is stored in every checkpoint; resuming with a
    different config raises :class:`CheckpointError`. ``seed`` seeds torch's global generator at the start
    of a fresh (not resumed) run (:func:`rank_seed` of it, under torchrun). Returns a :class:`TrainResult`; the
    model is left in the mode it had (and unwrapped: the caller's ``model`` is trained in place).

    ``precision="bf16"`` runs ``loss_fn`` under ``torch.autocast`` in bfloat16 (on CUDA, and on the CPU, where it is
    correct but rarely faster): matrix products and convolutions compute in bf16, while the weights, the optimizer's
    state, the gradients and the EMA stay float32 (mixed precision, Micikevicius et al. 2018; bf16 keeps float32's
    exponent range, so no loss scaling is needed). ``"fp32"`` (the default) uses no autocast.
    """
    if max_steps is None and max_minutes is None:
        raise ValueError("give a budget: max_steps, max_minutes, or both")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 0):
        raise ValueError(f"max_steps must be a non-negative integer, got {max_steps!r}")
    if max_minutes is not None and not (max_minutes >= 0 and math.isfinite(max_minutes)):
        raise ValueError(f"max_minutes must be a non-negative number, got {max_minutes!r}")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive integer or None, got {checkpoint_every!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    config = dict(config or {})
    json.dumps(config, allow_nan=False)  # fail now, not at the first checkpoint
    if checkpoint_dir is not None:
        check_writable_folder(checkpoint_dir)  # now, not after an hour of training
    device = next(model.parameters()).device
    if precision == "bf16" and device.type not in ("cuda", "cpu"):
        raise ValueError(f"precision 'bf16' needs a CUDA device or the CPU, not {device.type!r}; use precision 'fp32'")
    shared = init_distributed(device) and distributed_world_size() > 1
    main = is_main_process()
    if optimizer is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])  # the schedule multiplies this (as torch's LR schedulers do)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ema = EMA(model, ema_decay) if ema_decay is not None else None
    result = TrainResult(ema=ema)
    ckpt_path = Path(checkpoint_dir) / checkpoint_name if checkpoint_dir is not None else None
    if ckpt_path is not None:
        check_free_space(ckpt_path.parent, checkpoint_bytes(model, optimizer, ema))

    if ckpt_path is not None and resume and checkpoint_paths(ckpt_path)[0].exists():
        _resume(ckpt_path, model, optimizer, ema, result, config)
        result.checkpoint = checkpoint_paths(ckpt_path)[0]
        if shared and not main:  # rank 0's generator state was restored: give this rank its own stream again
            torch.manual_seed(rank_seed((seed or 0) + result.step))
    elif seed is not None:
        torch.manual_seed(rank_seed(seed))
    result.start_step = result.step
    # the model loss_fn sees: DDP averages the gradients over the ranks during backward; it starts by sending rank
    # 0's weights to all. EMA, checkpoints and the caller keep the unwrapped model.
    shared_model = _SharedModel(model, device_ids=[device] if device.type == "cuda" else None) if shared else model

    def rank_zero_succeeded(succeeded: bool) -> bool:
        """Rank 0's outcome of a write, known to every rank (which waits for it): the ranks stay in step."""
        return bool(_all_ranks([float(succeeded or not main)], device, dist.ReduceOp.MIN)[0]) if shared else succeeded

    def save_to(path: Path) -> None:
        tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
        if ema is not None:
            tensors.update({f"ema/{k}": v for k, v in ema.shadow.items()})
        optim_tensors, optim_info = _optimizer_to_flat(optimizer)
        tensors.update(optim_tensors)
        tensors.update(_rng_tensors())
        tensors["history/loss"] = torch.tensor(result.losses, dtype=torch.float64)
        state = {
            "kind": "training_checkpoint",
            "config": config,
            "step": result.step,
            "seconds": result.seconds,
            "optimizer": optim_info,
            "ema": None if ema is None else {"decay": ema.decay, "num_updates": ema.num_updates},
            "logs": result.logs,
        }
        result.checkpoint = save_checkpoint(path, tensors, state)

    def save() -> bool:
        """The periodic checkpoint → whether it was written; if it cannot be (a full disk), warn and train on.
        Under torchrun rank 0 writes it and the others wait."""
        written = True
        if main:
            try:
                save_to(ckpt_path)
            except OSError as error:
                kept = f"the last one written is {str(result.checkpoint)!r}" if result.checkpoint else "none was written yet"
                warnings.warn(f"could not write the checkpoint {str(ckpt_path)!r} at step {result.step} "
                              f"({_reason(error)}); training goes on ({kept}), and the next save tries again", stacklevel=2)
                written = False
        written = rank_zero_succeeded(written)
        if written and not main:
            result.checkpoint = checkpoint_paths(ckpt_path)[0]
        return written

    def save_or_rescue() -> str:
        """The checkpoint that must not be lost (the end, an interrupt) → a note on where it went. Under torchrun
        rank 0 writes it and the others wait."""
        note, failure = "", None
        if main:
            try:
                note = save_or_rescue_here()
            except OSError as error:
                failure = error
        if not rank_zero_succeeded(failure is None):
            if failure is not None:
                raise failure
            raise OSError(f"rank 0 could not write the checkpoint {str(ckpt_path)!r}; its message says why")
        if not main:
            result.checkpoint = checkpoint_paths(ckpt_path)[0]
        return note

    def save_or_rescue_here() -> str:
        try:
            write_or_rescue(save_to, checkpoint_paths(ckpt_path)[0], "the checkpoint")
        except SavedElsewhereError as moved:
            result.checkpoint = checkpoint_paths(moved.saved_to)[0]
            return f"{moved}; to resume, move its .safetensors and .json files into {str(ckpt_path.parent)!r}"
        return ""

    def budget_progress() -> float:
        fractions = []
        if max_steps:
            fractions.append(result.step / max_steps)
        if max_minutes:
            fractions.append(result.seconds / (60 * max_minutes))
        return max(fractions, default=1.0)

    def budget_spent() -> str:
        if max_steps is not None and result.step >= max_steps:
            return "max_steps"
        if max_minutes is not None and result.seconds >= 60 * max_minutes:
            return "max_minutes"
        return ""

    was_training = model.training
    model.train()
    bar = tqdm(total=max_steps, initial=result.step, desc=desc, disable=not (progress and main), dynamic_ncols=True)
    running = None
    last_saved = result.step
    stop = _StopBetweenSteps(saving=ckpt_path is not None)

    def interrupted() -> TrainingInterrupted:
        note = ""
        if ckpt_path is not None and (last_saved != result.step or result.checkpoint is None):
            note = save_or_rescue()
        if ckpt_path is None:
            saved = "no checkpoint_dir was given, so nothing was saved"
        else:
            saved = note or f"checkpoint saved to {str(result.checkpoint)!r}"
        return TrainingInterrupted(f"{stop.received} at step {result.step}: {saved}", result.step, result.checkpoint,
                                   stop.received, result)

    def agreed_budget_spent() -> str:
        """:func:`budget_spent`, and under torchrun what all ranks agree on: a time budget spent or a signal
        received on any rank stops them all, between the same two steps."""
        reason = budget_spent()
        if shared:
            any_spent, any_signal = _all_ranks([float(bool(reason)), float(bool(stop.received))], device,
                                               dist.ReduceOp.MAX)
            if any_spent and not reason:
                reason = "max_minutes"  # the only budget that ranks can see differently
            if any_signal and not stop.received:
                stop.received = "SIGTERM"  # another rank was signalled
        return reason

    clock = time.perf_counter()
    try:
        stop.__enter__()
        while not (reason := agreed_budget_spent()):
            if stop.received:
                result.stopped_reason = "interrupted"
                raise interrupted()
            step = result.step
            factor = _schedule_factor(lr_schedule, budget_progress())
            if warmup_steps:
                factor *= min(1.0, (step + 1) / warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor

            mixed = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
            with mixed:
                out = loss_fn(shared_model, _to_device(batch_fn(step), device), step)
            loss, logs = out if isinstance(out, tuple) else (out, {})
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise ValueError(f"loss_fn must return a scalar tensor (or (loss, logs)), got {type(loss).__name__}")
            loss_value = loss.item()
            if shared:  # the mean over the ranks: every rank sees a non-finite loss anywhere, and skips together
                loss_value = _all_ranks([loss_value], device, dist.ReduceOp.SUM)[0] / distributed_world_size()
            grad_norm = math.nan
            if math.isfinite(loss_value):
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else math.inf))
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                what = f"the loss is {loss_value}" if not math.isfinite(loss_value) else f"the gradient norm is {grad_norm}"
                optimizer.zero_grad(set_to_none=True)
                result.stopped_reason = "non-finite loss"
                result.seconds += time.perf_counter() - clock
                clock = time.perf_counter()
                where = (
                    f"The last good checkpoint, {str(result.checkpoint)!r} (step {last_saved}), is untouched: resume from it"
                    if result.checkpoint is not None
                    else "No checkpoint had been written"
                )
                raise NonFiniteLossError(
                    f"training stopped at step {step}: {what}. The weights were not updated at this step. {where}. "
                    f"Try a lower learning rate (now {optimizer.param_groups[0]['initial_lr']:g}) or set grad_clip.",
                    step,
                    result.checkpoint,
                    result,
                )
            optimizer.step()
            if ema is not None:
                ema.update(model)

            result.step += 1
            result.losses.append(loss_value)
            now = time.perf_counter()
            result.seconds += now - clock
            clock = now
            running = loss_value if running is None else 0.95 * running + 0.05 * loss_value
            if result.step % log_every == 0 or result.step == 1:
                entry = {"step": result.step, "loss": loss_value, "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm}
                entry.update({k: float(v) for k, v in logs.items()})
                entry = {k: v if math.isfinite(v) else str(v) for k, v in entry.items()}  # JSON has no nan/inf
                result.logs.append(entry)
                bar.set_postfix(loss=f"{running:.4g}", refresh=False)
            bar.update(1)
            if ckpt_path is not None and checkpoint_every and result.step % checkpoint_every == 0:
                if save():
                    last_saved = result.step
                clock = time.perf_counter()  # checkpoint time does not count as training time
        result.stopped_reason = reason
        if ckpt_path is not None and (last_saved != result.step or result.checkpoint is None):
            note = save_or_rescue()
            last_saved = result.step
            if note:
                warnings.warn(note, stacklevel=2)
        if stop.received:  # asked to stop during the last step or the final save: the run is saved; stop as asked
            raise interrupted()
    finally:
        stop.__exit__()
        bar.close()
        model.train(was_training)
    return result


def _resume(path: Path, model, optimizer, ema, result: TrainResult, config: dict) -> None:
    tensors, state = load_checkpoint(path, device=next(model.parameters()).device)
    st_path = checkpoint_paths(path)[0]
    if state.get("kind") != "training_checkpoint":
        raise CheckpointError(f"{str(st_path)!r} is not a training checkpoint (kind {state.get('kind')!r})")
    if state.get("config") != config:
        raise CheckpointError(
            f"{str(st_path)!r} was written by a run with a different config; delete it to start over, or pass "
            f"resume=False.\n  checkpoint: {state.get('config')}\n  this run:   {config}"
        )

    step, seconds, history = state.get("step"), state.get("seconds"), tensors.get("history/loss")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{str(st_path)!r} says the run stopped at step {step!r}, but a step count is a whole "
                              "number ≥ 0: the file is damaged; delete it (and its .json) to start over")
    if history is None or history.dim() != 1 or len(history) != step:
        found = "no loss history" if history is None else f"a loss history of {history.numel()} steps"
        raise CheckpointError(f"{str(st_path)!r} says the run stopped at step {step} but holds {found}: the file is "
                              "damaged; delete it (and its .json) to start over")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (math.isfinite(seconds) and seconds >= 0):
        raise CheckpointError(f"{str(st_path)!r} says the run trained for {seconds!r} seconds, which is not a number "
                              "≥ 0: the file is damaged; delete it (and its .json) to start over")

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}

    load_module_state(model, part("model/"), st_path)
    if ema is not None:
        if state.get("ema") is None:
            raise CheckpointError(f"{str(st_path)!r} has no EMA weights, but this run asks for ema_decay")
        ema.load_state_dict({"shadow": part("ema/"), **state["ema"]})
    _optimizer_from_flat(optimizer, {k: v for k, v in tensors.items() if k.startswith("optim/")}, state["optimizer"])
    _restore_rng({k: v for k, v in tensors.items() if k.startswith("rng/")})
    result.step = step
    result.seconds = float(seconds)
    result.losses = history.tolist()
    result.logs = list(state.get("logs", []))
