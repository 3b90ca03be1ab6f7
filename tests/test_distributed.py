"""Training in several processes (issue 19, item 5): :func:`sdlearn.training.train` under torchrun's variables
wraps the model in DistributedDataParallel (gloo on CPU). Two processes are started with
``torch.multiprocessing.spawn`` on a free local port; each test takes a few seconds."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from sdlearn.checkpoint import load_checkpoint
from sdlearn.training import (
    RANK_SEED_STRIDE,
    TrainingInterrupted,
    distributed_rank,
    distributed_world_size,
    launched_by_torchrun,
    rank_seed,
    shut_down_distributed,
    train,
)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this build of torch has no gloo backend")

WORLD = 2
HALF = 4  # samples per rank; the whole batch has WORLD · HALF


class Regressor(nn.Module):
    """A small model with an attribute the loss reads (as vae_loss reads ``vae.config``)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        self.loss_scale = 2.0

    def forward(self, x):
        return self.net(x)


def whole_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return torch.randn(WORLD * HALF, 3, generator=generator), torch.randn(WORLD * HALF, 2, generator=generator)


def step_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A different whole batch per step, a pure function of the step."""
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(WORLD * HALF, 3, generator=generator), torch.randn(WORLD * HALF, 2, generator=generator)


def mse(model, batch, step):
    x, y = batch
    return model.loss_scale * ((model(x) - y) ** 2).mean()


def fresh_model() -> Regressor:
    torch.manual_seed(0)
    return Regressor()


def my_half(batch):
    """This rank's half of a whole batch (rank 0 the first half, rank 1 the second)."""
    rank = distributed_rank()
    return tuple(t[rank * HALF:(rank + 1) * HALF] for t in batch)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(worker, folder: Path, *args) -> None:
    """Run ``worker(rank, folder, *args)`` in WORLD processes with torchrun's variables set, then clear them."""
    mp.spawn(_as_torchrun_rank, args=(worker, str(folder), free_port(), args), nprocs=WORLD, join=True)


def _as_torchrun_rank(rank: int, worker, folder: str, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    worker(rank, Path(folder), *args)
    shut_down_distributed()  # what the exit would do (init_distributed registers it); here so a test sees it work
    assert not dist.is_initialized()


def _save_parameters(model: nn.Module, path: Path) -> None:
    path.write_text(json.dumps({k: v.tolist() for k, v in model.state_dict().items()}))


def _load_parameters(path: Path) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v) for k, v in json.loads(path.read_text()).items()}


# ------------------------------------------------------------------------------------------------------------
# (a) one DDP step on two halves = one single-process step on the whole batch


def _one_step_on_half(rank: int, folder: Path) -> None:
    model = fresh_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    result = train(model, mse, lambda step: my_half(whole_batch()), optimizer=optimizer, max_steps=1,
                   checkpoint_dir=None, progress=False)
    assert distributed_world_size() == WORLD and result.step == 1
    _save_parameters(model, folder / f"rank{rank}.json")
    (folder / f"loss{rank}.json").write_text(json.dumps(result.losses))


@pytest.mark.slow  # two processes (gloo)
def test_one_ddp_step_on_two_halves_equals_one_step_on_the_whole_batch(tmp_path):
    spawn(_one_step_on_half, tmp_path)

    model = fresh_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    single = train(model, mse, lambda step: whole_batch(), optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                   max_steps=1, progress=False)
    for rank in range(WORLD):
        ranked = _load_parameters(tmp_path / f"rank{rank}.json")
        assert ranked.keys() == model.state_dict().keys()  # the unwrapped model: no "module." in the names
        for name, value in model.state_dict().items():
            assert not torch.equal(value, before[name])  # the step moved every tensor
            torch.testing.assert_close(ranked[name], value, atol=1e-5, rtol=0)
        # the loss recorded is the mean over the ranks' halves, which is the whole batch's loss
        assert json.loads((tmp_path / f"loss{rank}.json").read_text()) == pytest.approx(single.losses, abs=1e-6)


# ------------------------------------------------------------------------------------------------------------
# (b) an interrupted DDP run resumes from rank 0's checkpoint and finishes as an uninterrupted one


def _train_on_halves(rank: int, folder: Path, *runs: tuple[int, str]) -> None:
    """Each of ``runs`` (steps, checkpoint folder) in turn, in the same process group."""
    for steps, checkpoint_dir in runs:
        _train_once(rank, folder, steps, checkpoint_dir)


def _train_once(rank: int, folder: Path, steps: int, checkpoint_dir: str) -> None:
    model = fresh_model()
    result = train(model, mse, lambda step: my_half(step_batch(step)), lr=0.05, max_steps=steps, ema_decay=0.9,
                   checkpoint_dir=checkpoint_dir, checkpoint_every=2, seed=3, config={"test": "ddp"}, progress=False)
    (folder / f"{Path(checkpoint_dir).name}-{steps}-rank{rank}.json").write_text(json.dumps(
        {"start_step": result.start_step, "step": result.step, "losses": result.losses,
         "parameters": {k: v.tolist() for k, v in model.state_dict().items()},
         "ema": {k: v.tolist() for k, v in result.ema.shadow.items()}}))


@pytest.mark.slow  # two processes (gloo), started twice
def test_an_interrupted_ddp_run_resumes_and_finishes_like_an_uninterrupted_one(tmp_path):
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    spawn(_train_on_halves, tmp_path, (3, str(stopped)))  # stops after 3 of 6 steps, with a checkpoint
    assert sorted(p.name for p in stopped.iterdir()) == ["checkpoint.json", "checkpoint.safetensors"]
    tensors, state = load_checkpoint(stopped / "checkpoint")
    assert state["step"] == 3 and not any("module." in name for name in tensors)

    # the same command with the whole budget, which resumes; and a run never interrupted
    spawn(_train_on_halves, tmp_path, (6, str(stopped)), (6, str(whole)))
    for rank in range(WORLD):
        resumed = json.loads((tmp_path / f"stopped-6-rank{rank}.json").read_text())
        uninterrupted = json.loads((tmp_path / f"whole-6-rank{rank}.json").read_text())
        assert resumed["start_step"] == 3 and resumed["step"] == 6 and uninterrupted["start_step"] == 0
        assert resumed["losses"] == pytest.approx(uninterrupted["losses"], abs=1e-6)
        for part in ("parameters", "ema"):
            for name, value in uninterrupted[part].items():
                torch.testing.assert_close(torch.tensor(resumed[part][name]), torch.tensor(value), atol=1e-6, rtol=0)
    # both ranks hold the same weights, and rank 0's checkpoint is the final state
    rank0, rank1 = (json.loads((tmp_path / f"whole-6-rank{r}.json").read_text()) for r in range(WORLD))
    assert rank0["parameters"] == rank1["parameters"]
    tensors, state = load_checkpoint(whole / "checkpoint")
    assert state["step"] == 6
    for name, value in rank0["parameters"].items():
        torch.testing.assert_close(tensors[f"model/{name}"], torch.tensor(value))


def _signalled_on_rank_one(rank: int, folder: Path) -> None:
    def loss_fn(model, batch, step):
        if rank == 1 and step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # as if only this process were told to stop
        return mse(model, batch, step)

    model = fresh_model()
    try:
        train(model, loss_fn, lambda step: my_half(step_batch(step)), max_steps=50, checkpoint_dir=folder / "run",
              checkpoint_every=None, progress=False)
        stopped = {"interrupted": False}
    except TrainingInterrupted as error:
        stopped = {"interrupted": True, "step": error.step, "checkpoint": str(error.checkpoint)}
    (folder / f"rank{rank}.json").write_text(json.dumps(stopped))


@pytest.mark.slow  # two processes (gloo)
def test_a_signal_to_one_rank_stops_every_rank_between_the_same_two_steps(tmp_path):
    spawn(_signalled_on_rank_one, tmp_path)
    outcomes = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD)]
    assert outcomes[0] == outcomes[1] == {"interrupted": True, "step": 2,
                                          "checkpoint": str(tmp_path / "run" / "checkpoint.safetensors")}
    _, state = load_checkpoint(tmp_path / "run" / "checkpoint")
    assert state["step"] == 2


# ------------------------------------------------------------------------------------------------------------
# Without torchrun's variables nothing changes


def test_a_single_process_is_not_distributed(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not launched_by_torchrun()
    assert distributed_rank() == 0 and distributed_world_size() == 1 and rank_seed(5) == 5
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not launched_by_torchrun()  # torchrun with one process: the single-process path
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched_by_torchrun()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be a whole number"):
        launched_by_torchrun()
    assert RANK_SEED_STRIDE > 2**40
    shut_down_distributed()  # without a process group: nothing to leave, and no error


# ------------------------------------------------------------------------------------------------------------
# Mixed precision: train(precision="bf16") computes under bf16 autocast over float32 weights


def test_bf16_autocast_keeps_float32_weights_optimizer_state_and_ema():
    model = fresh_model()
    seen = []

    def loss_fn(model, batch, step):
        x, y = batch
        prediction = model(x)
        seen.append(prediction.dtype)
        return ((prediction.float() - y) ** 2).mean()

    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    result = train(model, loss_fn, lambda step: whole_batch(), optimizer=optimizer, max_steps=30, ema_decay=0.9, precision="bf16",
                   progress=False)
    assert set(seen) == {torch.bfloat16}  # the forward pass ran in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the master weights did not
    assert all(v.dtype == torch.float32 for v in result.ema.shadow.values())
    assert all(t.dtype == torch.float32 for state in optimizer.state.values() for t in state.values() if t.dim())
    assert result.final_loss < result.losses[0]  # and it learns

    seen.clear()
    train(fresh_model(), loss_fn, step_batch, max_steps=1, progress=False)
    assert seen == [torch.float32]  # the default: no autocast


def test_an_unknown_precision_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"precision must be one of fp32, bf16, got 'fp16'"):
        train(fresh_model(), mse, step_batch, max_steps=1, precision="fp16", progress=False)
