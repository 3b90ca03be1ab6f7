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

Checkpoints use the format of :mod:`sdlearn.checkpoint` (safetensors + JSON, written atomically, never
unpickled). The recipes that train each model of the course on this loop are in :mod:`sdlearn.recipes`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
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
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; expected 'auto', 'cpu', 'cuda' or 'mps'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu or auto")
    if resolved.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} asked for, but MPS is not available here; use --device cpu or auto")
    return resolved


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
    stopped_reason: str = ""  # "max_steps", "max_minutes" or "non-finite loss"
    checkpoint: Path | None = None
    ema: EMA | None = None
    record: dict | None = None  # train_all: what train_all.json records (the stages, the scores)

    @property
    def final_loss(self) -> float:
        """Mean loss over the last 50 steps (or fewer)."""
        tail = self.losses[-50:]
        return float(sum(tail) / len(tail)) if tail else math.nan


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
) -> TrainResult:
    """Train ``model`` by minimising ``loss_fn(model, batch_fn(step), step)`` until a budget is spent.

    See the module docstring for the behaviour of budgets, schedules, EMA, checkpoints, resume and the
    divergence guard. ``config`` (JSON-serialisable) is stored in every checkpoint; resuming with a
    different config raises :class:`CheckpointError`. ``seed`` seeds torch's global generator at the start
    of a fresh (not resumed) run. Returns a :class:`TrainResult`; the model is left in the mode it had.
    """
    if max_steps is None and max_minutes is None:
        raise ValueError("give a budget: max_steps, max_minutes, or both")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 0):
        raise ValueError(f"max_steps must be a non-negative integer, got {max_steps!r}")
    if max_minutes is not None and not (max_minutes >= 0 and math.isfinite(max_minutes)):
        raise ValueError(f"max_minutes must be a non-negative number, got {max_minutes!r}")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive integer or None, got {checkpoint_every!r}")
    config = dict(config or {})
    json.dumps(config, allow_nan=False)  # fail now, not at the first checkpoint
    device = next(model.parameters()).device
    if optimizer is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])  # the schedule multiplies this (as torch's LR schedulers do)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ema = EMA(model, ema_decay) if ema_decay is not None else None
    result = TrainResult(ema=ema)
    ckpt_path = Path(checkpoint_dir) / checkpoint_name if checkpoint_dir is not None else None

    if ckpt_path is not None and resume and checkpoint_paths(ckpt_path)[0].exists():
        _resume(ckpt_path, model, optimizer, ema, result, config)
        result.checkpoint = checkpoint_paths(ckpt_path)[0]
    elif seed is not None:
        torch.manual_seed(seed)
    result.start_step = result.step

    def save() -> None:
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
        result.checkpoint = save_checkpoint(ckpt_path, tensors, state)

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
    bar = tqdm(total=max_steps, initial=result.step, desc=desc, disable=not progress, dynamic_ncols=True)
    running = None
    last_saved = result.step
    clock = time.perf_counter()
    try:  # an interrupt (Ctrl-C) leaves the last periodic checkpoint, always taken between two steps
        while not (reason := budget_spent()):
            step = result.step
            factor = _schedule_factor(lr_schedule, budget_progress())
            if warmup_steps:
                factor *= min(1.0, (step + 1) / warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor

            out = loss_fn(model, _to_device(batch_fn(step), device), step)
            loss, logs = out if isinstance(out, tuple) else (out, {})
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise ValueError(f"loss_fn must return a scalar tensor (or (loss, logs)), got {type(loss).__name__}")
            loss_value = loss.item()
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
                save()
                last_saved = result.step
                clock = time.perf_counter()  # checkpoint time does not count as training time
        result.stopped_reason = reason
        if ckpt_path is not None and (last_saved != result.step or result.checkpoint is None):
            save()
    finally:
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

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}

    load_module_state(model, part("model/"), st_path)
    if ema is not None:
        if state.get("ema") is None:
            raise CheckpointError(f"{str(st_path)!r} has no EMA weights, but this run asks for ema_decay")
        ema.load_state_dict({"shadow": part("ema/"), **state["ema"]})
    _optimizer_from_flat(optimizer, {k: v for k, v in tensors.items() if k.startswith("optim/")}, state["optimizer"])
    _restore_rng({k: v for k, v in tensors.items() if k.startswith("rng/")})
    result.step = int(state["step"])
    result.seconds = float(state["seconds"])
    result.losses = tensors["history/loss"].tolist()
    result.logs = list(state.get("logs", []))
