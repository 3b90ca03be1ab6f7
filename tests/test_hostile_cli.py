"""Issue 20, the command line and the training loop under hostile input: nothing lost, nothing silently wrong.

Every case is one line on stderr and exit status 2 (130 for an interrupt), no traceback, no partial file, and no
work thrown away. A full disk is simulated by making the writer fail with ENOSPC; a read-only place by making
every attempt to create a file in it fail with EROFS (as a read-only file system does), because the tests may run
as root, whom ``chmod`` does not stop (the real ``chmod`` is also tried when not root).
"""

import builtins
import errno
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import sdlearn.checkpoint
from sdlearn.__main__ import GENERATE_BATCH, MAX_GRID_IMAGES, TRAINERS, generate_to_files, main
from sdlearn.checkpoint import CheckpointError, load_checkpoint
from sdlearn.pipeline import to_numpy
from sdlearn.pretrained import load_pipeline, load_vae
from sdlearn.recipes import train_vae
from sdlearn.training import TrainingInterrupted, train, usable_cores
from sdlearn.vae import VAEConfig

TINY_VAE = VAEConfig(base_channels=8, channel_multipliers=(1, 2, 2), num_res_blocks=(0, 1, 1), norm_groups=4)
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ------------------------------------------------------------------------------------------------
# Helpers


def cli(capsys, *argv) -> tuple[int, str]:
    """``python -m sdlearn ARGV`` in this process → (exit status, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


def assert_one_error_line(err: str, *words: str) -> str:
    """No traceback, exactly one ``error:`` line, and it holds ``words``; returns the line."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def files_in(folder: Path) -> list[str]:
    """Every file under ``folder`` (temporary ones included), as relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture(autouse=True)
def ctrl_c_reaches_the_tests():
    """Ctrl-C as in a terminal. A shell that starts ``make test &`` in the background (or ``nohup``) hands the
    tests SIGINT *ignored*, which the training loop rightly respects (it then installs no handler)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def sigint_as_in_a_terminal() -> None:
    """For a child process (``preexec_fn``): SIGINT back to its default, which Python turns into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(folder)`` makes creating or opening for writing any file or folder under ``folder`` fail with
    EROFS, as on a read-only file system (reading still works)."""
    folders: list[Path] = []

    def inside(path) -> bool:
        if isinstance(path, int):
            return False
        where = Path(os.path.realpath(os.fsdecode(path)))
        return any(where == f or f in where.parents for f in folders)

    def refuse(path):
        raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def fake_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and inside(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            refuse(path)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    def fake_mkdir(path, mode=0o777, *, dir_fd=None):
        if inside(path):
            refuse(path)
        return real_mkdir(path, mode, dir_fd=dir_fd)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    return lambda folder: folders.append(Path(os.path.realpath(folder)))


@pytest.fixture
def rescue_tmp(tmp_path, monkeypatch):
    """The temporary folder (where rescued files go first), inside the test's own folder."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 1))


def batch_fn(step):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 4, generator=g)
    return {"x": x, "y": x.sum(dim=1, keepdim=True)}


def loss_fn(model, batch, step):
    noise = 0.01 * torch.randn(batch["y"].shape)  # the global RNG too, restored on resume
    return (model(batch["x"]) - batch["y"] - noise).pow(2).mean()


def interrupt_at(step_to_interrupt: int, signal_number=signal.SIGINT):
    """A loss function that sends this process ``signal_number`` in the middle of step ``step_to_interrupt``."""

    def loss(model, batch, step):
        if step == step_to_interrupt:
            os.kill(os.getpid(), signal_number)
        return loss_fn(model, batch, step)

    return loss


def tiny_trainer(loss=loss_fn, checkpoint_every=1000, calls=None):
    """A trainer with the recipes' signature that trains a tiny model on the generic loop, for the CLI's tests."""

    def trainer(out_dir, minutes, steps, device, seed):
        result = train(make_model(), loss, batch_fn, lr=1e-2, max_steps=steps, max_minutes=minutes,
                       checkpoint_dir=out_dir, checkpoint_every=checkpoint_every, seed=seed, progress=False)
        if calls is not None:
            calls.append(result)
        return None, result

    return trainer


# ------------------------------------------------------------------------------------------------
# 2. train checks --out before the first step, and never loses the run to a failed save


def test_train_refuses_an_out_that_is_a_file_before_the_first_step(tmp_path, capsys, monkeypatch):
    started = []
    monkeypatch.setitem(TRAINERS, "vae", lambda **kwargs: started.append(kwargs))
    (tmp_path / "taken").write_text("not a folder")
    code, err = cli(capsys, "train", "vae", "--steps", "5", "--out", tmp_path / "taken")
    assert code == 2 and not started
    assert_one_error_line(err, "--out", "taken", "not a folder")
    code, err = cli(capsys, "train", "vae", "--steps", "5", "--out", tmp_path / "taken" / "deeper")
    assert code == 2 and not started
    assert_one_error_line(err, "is a file")
    assert (tmp_path / "taken").read_text() == "not a folder"


def test_train_refuses_a_read_only_out_before_the_first_step(tmp_path, capsys, monkeypatch, read_only):
    started = []
    monkeypatch.setitem(TRAINERS, "vae", lambda **kwargs: started.append(kwargs))
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only(locked)
    for out in (locked, locked / "run"):  # the folder itself, or one to be made in it
        code, err = cli(capsys, "train", "vae", "--steps", "5", "--out", out)
        assert code == 2 and not started
        assert_one_error_line(err, "--out", "Read-only file system")
    assert files_in(locked) == []


@pytest.mark.skipif(IS_ROOT, reason="chmod does not stop root; the EROFS simulation above covers it")
def test_train_refuses_a_chmod_read_only_out(tmp_path, capsys, monkeypatch):
    started = []
    monkeypatch.setitem(TRAINERS, "vae", lambda **kwargs: started.append(kwargs))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, err = cli(capsys, "train", "vae", "--steps", "5", "--out", locked)
    finally:
        locked.chmod(0o700)
    assert code == 2 and not started
    assert_one_error_line(err, "--out", "locked")


def test_the_training_loop_checks_its_checkpoint_folder_before_the_first_step(tmp_path, read_only):
    steps_run = []

    def counting_batch_fn(step):
        steps_run.append(step)
        return batch_fn(step)

    (tmp_path / "a_file").write_text("")
    with pytest.raises(NotADirectoryError, match="a_file"):
        train(make_model(), loss_fn, counting_batch_fn, max_steps=3, checkpoint_dir=tmp_path / "a_file", progress=False)
    read_only(tmp_path / "locked")
    with pytest.raises(OSError, match="Read-only file system"):
        train(make_model(), loss_fn, counting_batch_fn, max_steps=3, checkpoint_dir=tmp_path / "locked", progress=False)
    assert steps_run == []


def disk_full_under(monkeypatch, folder: Path, failures: int | None = None):
    """Files under ``folder`` can be created but their data not flushed: ``fsync`` fails with ENOSPC, as on a full
    disk (ext4 with delayed allocation reports it there). ``failures``: only that many times, then space is freed."""
    real_fsync = os.fsync
    failed = []

    def fsync(fd):
        st = os.fstat(fd)
        under = any(p.is_file() and (p.stat().st_dev, p.stat().st_ino) == (st.st_dev, st.st_ino) for p in folder.rglob("*"))
        if under and (failures is None or len(failed) < failures):
            failed.append(fd)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return failed


def test_a_disk_full_at_the_end_of_training_saves_the_run_to_a_rescue_folder(tmp_path, capsys, monkeypatch, rescue_tmp):
    monkeypatch.setitem(TRAINERS, "vae", functools.partial(train_vae, config=TINY_VAE, batch_size=4))
    out = tmp_path / "run"
    disk_full_under(monkeypatch, out)
    code, err = cli(capsys, "train", "vae", "--steps", "2", "--out", out, "--device", "cpu")
    assert code == 2
    line = assert_one_error_line(err, "No space left on device", "vae.safetensors", "saved it to")
    assert any("warning: " in w and "checkpoint" in w and "saved it to" in w for w in err.splitlines()), err
    rescued = [p for p in rescue_tmp.iterdir() if p.name.startswith("sdlearn-rescue-")]
    assert len(rescued) == 1 and str(rescued[0]) in line
    assert {"vae.safetensors", "vae.json", "vae_checkpoint.safetensors", "vae_checkpoint.json"} <= set(files_in(rescued[0]))
    assert load_vae(rescued[0]).training_info["steps"] == 2  # the whole run, loadable
    assert files_in(out) == []  # and nothing half-written where the disk was full


def test_a_periodic_checkpoint_that_cannot_be_written_warns_and_training_goes_on(tmp_path, monkeypatch):
    failed = disk_full_under(monkeypatch, tmp_path, failures=1)  # the first save meets a full disk; then space is freed
    with pytest.warns(UserWarning, match="step 2 .*No space left.*training goes on"):
        result = train(make_model(), loss_fn, batch_fn, max_steps=5, checkpoint_dir=tmp_path, checkpoint_every=2,
                       progress=False)
    assert len(failed) == 1
    assert result.step == 5 and load_checkpoint(tmp_path / "checkpoint")[1]["step"] == 5


def test_a_disk_without_room_for_a_checkpoint_is_refused_before_the_first_step(tmp_path, capsys, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(OSError, match="only 0.0 MB free .* checkpoint and weights take about"):
        train(make_model(), loss_fn, lambda step: pytest.fail("trained"), max_steps=3, checkpoint_dir=tmp_path,
              progress=False)
    monkeypatch.setitem(TRAINERS, "vae", tiny_trainer(loss=lambda *args: pytest.fail("trained")))
    code, err = cli(capsys, "train", "vae", "--steps", "3", "--out", tmp_path / "run")
    assert code == 2
    assert_one_error_line(err, "MB free", "free some space")


# ------------------------------------------------------------------------------------------------
# 3. Ctrl-C and SIGTERM save a checkpoint, say how to resume, and exit 130


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupt_saves_the_step_it_stopped_at_and_resuming_repeats_the_uninterrupted_run(tmp_path, signal_number):
    straight = make_model()
    full = train(straight, loss_fn, batch_fn, lr=1e-2, max_steps=12, ema_decay=0.9, seed=0, progress=False)

    interrupted_model = make_model()
    with pytest.raises(TrainingInterrupted) as stopped:
        train(interrupted_model, interrupt_at(4, signal_number), batch_fn, lr=1e-2, max_steps=12, ema_decay=0.9, seed=0,
              checkpoint_dir=tmp_path, checkpoint_every=1000, progress=False)
    assert isinstance(stopped.value, KeyboardInterrupt)
    assert stopped.value.step == 5 and stopped.value.signal_name == signal.Signals(signal_number).name
    assert "step 5" in str(stopped.value) and "checkpoint.safetensors" in str(stopped.value)
    assert load_checkpoint(tmp_path / "checkpoint")[1]["step"] == 5  # the step under way finished and was saved
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back

    resumed_model = make_model(seed=7)
    torch.manual_seed(123)
    second = train(resumed_model, loss_fn, batch_fn, lr=1e-2, max_steps=12, ema_decay=0.9, seed=0,
                   checkpoint_dir=tmp_path, checkpoint_every=1000, progress=False)
    assert second.start_step == 5 and second.losses == full.losses
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[name], value), name


def test_ctrl_c_in_the_cli_prints_how_to_resume_in_one_line_and_exits_130(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setitem(TRAINERS, "vae", tiny_trainer(interrupt_at(2)))
    code, err = cli(capsys, "train", "vae", "--steps", "9", "--out", out)
    assert code == 130 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "SIGINT at step 3" in last and "checkpoint.safetensors" in last
    assert last.endswith(f"resume with: python -m sdlearn train vae --steps 9 --out {out}")
    calls = []
    monkeypatch.setitem(TRAINERS, "vae", tiny_trainer(calls=calls))
    assert cli(capsys, "train", "vae", "--steps", "9", "--out", out)[0] == 0
    assert calls[0].start_step == 3 and calls[0].step == 9


CHILD = textwrap.dedent("""
    import sys, time
    import torch
    from sdlearn.__main__ import TRAINERS, main
    from sdlearn.training import train

    def trainer(out_dir, minutes, steps, device, seed):
        model = torch.nn.Linear(4, 1)

        def loss_fn(model, batch, step):
            if step == 3:
                print("training", flush=True)
            time.sleep(0.02)
            return model(batch).pow(2).mean()

        train(model, loss_fn, lambda step: torch.full((2, 4), float(step)), max_steps=steps, checkpoint_dir=out_dir,
              checkpoint_every=10**6, progress=False)

    TRAINERS["vae"] = trainer
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow  # a training process, twice
@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_from_outside_stops_a_training_process_with_a_checkpoint(tmp_path, signal_number):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = tmp_path / "run"
    child = subprocess.Popen([sys.executable, str(script), "train", "vae", "--steps", "100000", "--out", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=sigint_as_in_a_terminal)
    killer = threading.Timer(240, child.kill)  # a hung child fails the test instead of hanging it
    killer.start()
    try:
        assert child.stdout.readline().strip() == "training"
        child.send_signal(signal_number)
        _, err = child.communicate(timeout=240)
    finally:
        killer.cancel()
    assert child.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert f"{signal.Signals(signal_number).name} at step" in last and "resume with: python -m sdlearn train vae" in last
    assert load_checkpoint(out / "checkpoint")[1]["step"] >= 4


# ------------------------------------------------------------------------------------------------
# 5. Limits: --n streams in batches, --threads is capped, non-finite images are refused


class FakePipeline:
    """Records the batch sizes it is asked for, and how many files were already on disk at each call."""

    def __init__(self, out_dir: Path | None = None):
        self.sizes, self.files_before, self.out_dir = [], [], out_dir

    def __call__(self, prompt, num_images_per_prompt=1, generator=None, **kwargs):
        self.sizes.append(num_images_per_prompt)
        if self.out_dir is not None:
            self.files_before.append(len(list(self.out_dir.glob("*.png"))) if self.out_dir.exists() else 0)
        return torch.rand((num_images_per_prompt, 3, 32, 32), generator=generator) * 2 - 1


def test_generate_draws_in_batches_and_writes_each_batch_before_the_next(tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "many"
    fake = FakePipeline(out_dir)
    monkeypatch.setattr("sdlearn.__main__.load_pipeline", lambda *args, **kwargs: fake)
    n = 2 * GENERATE_BATCH + 5
    code, err = cli(capsys, "generate", "a red circle", "--n", n, "--out-dir", out_dir)
    assert code == 0, err
    assert fake.sizes == [GENERATE_BATCH, GENERATE_BATCH, 5]  # memory holds one batch, whatever --n is
    assert fake.files_before == [0, GENERATE_BATCH, 2 * GENERATE_BATCH]  # streamed to disk as it goes
    assert len(files_in(out_dir)) == n


def test_generate_names_sort_in_order_beyond_a_thousand_images(tmp_path, monkeypatch):
    monkeypatch.setattr("sdlearn.__main__.load_pipeline", lambda *args, **kwargs: FakePipeline())
    written = generate_to_files("a red circle", out_dir=tmp_path, num_images_per_prompt=1001, batch_size=500,
                                progress=False)
    assert [p.name for p in written[:2]] == ["0000.png", "0001.png"] and written[-1].name == "1000.png"


def test_generating_in_batches_draws_the_images_of_one_call(tmp_path):
    """A deterministic sampler gives the same images in batches as in one call of the pipeline."""
    written = generate_to_files("a red circle", out_dir=tmp_path, num_images_per_prompt=7, num_inference_steps=2,
                                sampler="ddim", seed=3, batch_size=3, progress=False)
    batched = torch.stack([torch.from_numpy(np.array(Image.open(p))) for p in written])
    one_call = torch.from_numpy(to_numpy(load_pipeline()("a red circle", num_inference_steps=2, sampler="ddim", seed=3,
                                                          num_images_per_prompt=7, progress=False)))
    assert (batched.int() - one_call.int()).abs().max() <= 1  # equal, up to a rounding of the batch's arithmetic


def test_a_grid_of_too_many_images_is_refused_before_drawing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sdlearn.__main__.load_pipeline", lambda *a, **k: pytest.fail("drew images"))
    code, err = cli(capsys, "generate", "a red circle", "--n", MAX_GRID_IMAGES + 1, "--out", tmp_path / "grid.png")
    assert code == 2
    assert_one_error_line(err, "--out-dir", str(MAX_GRID_IMAGES))


def test_train_caps_threads_at_the_number_of_cores(tmp_path, capsys, monkeypatch):
    asked = []
    monkeypatch.setattr(torch, "set_num_threads", asked.append)  # the real call with 1,000,000 crashes torch
    monkeypatch.setitem(TRAINERS, "vae", lambda **kwargs: None)
    code, err = cli(capsys, "train", "vae", "--steps", "1", "--out", tmp_path, "--threads", "1000000")
    assert code == 0 and asked == [usable_cores()]
    assert any(line.startswith("warning: ") and "1000000 threads" in line and f"using {usable_cores()}" in line
               for line in err.splitlines()), err


def test_a_guidance_that_overflows_is_refused_and_writes_no_image(tmp_path, capsys):
    code, err = cli(capsys, "generate", "a red circle", "--steps", "2", "--guidance", "1e308", "--out",
                    tmp_path / "grid.png", "--out-dir", tmp_path / "each")
    assert code == 2
    assert_one_error_line(err, "NaN or infinite", "guidance", "nothing was written")
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "1e999"])
def test_a_guidance_that_is_not_a_finite_number_is_refused_by_the_parser(tmp_path, capsys, value):
    code, err = cli(capsys, "generate", "a red circle", "--guidance", value, "--out", tmp_path / "x.png")
    assert code == 2
    assert_one_error_line(err, "--guidance")


# ------------------------------------------------------------------------------------------------
# 7. --out into a folder, onto a read-only place, onto a full disk: one line, exit 2, no partial file


def test_generate_out_that_is_a_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "grid.png").mkdir()
    code, err = cli(capsys, "generate", "a red circle", "--steps", "2", "--out", tmp_path / "grid.png")
    assert code == 2
    assert_one_error_line(err, "grid.png", "is a folder")
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("option", ["--out", "--out-dir"])
def test_generate_onto_a_read_only_place_is_one_line(tmp_path, capsys, read_only, option):
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only(locked)
    target = locked / "grid.png" if option == "--out" else locked / "each"
    code, err = cli(capsys, "generate", "a red circle", "--steps", "2", option, target)
    assert code == 2
    assert_one_error_line(err, "Read-only file system")
    assert files_in(tmp_path) == []


@pytest.mark.skipif(IS_ROOT, reason="chmod does not stop root; the EROFS simulation above covers it")
def test_generate_into_a_chmod_read_only_folder_is_one_line(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, err = cli(capsys, "generate", "a red circle", "--steps", "2", "--out", locked / "grid.png")
    finally:
        locked.chmod(0o700)
    assert code == 2
    assert_one_error_line(err, "locked")
    assert files_in(tmp_path) == []


def pil_fills_the_disk(self, fp, format=None, **params):
    """``Image.save`` on a disk that fills up: the file is created, then writing it fails."""
    if isinstance(fp, (str, os.PathLike)):
        open(fp, "wb").close()
    else:
        fp.write(b"\x89PNG\r\n")
    raise OSError(errno.ENOSPC, "No space left on device")


def fsync_on_a_full_disk(fd):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["encoding", "flushing"])
@pytest.mark.parametrize("option", ["--out", "--out-dir"])
def test_generate_onto_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, capsys, monkeypatch, where, option):
    if where == "encoding":
        monkeypatch.setattr(Image.Image, "save", pil_fills_the_disk)
    else:
        monkeypatch.setattr(os, "fsync", fsync_on_a_full_disk)
    target = tmp_path / "grid.png" if option == "--out" else tmp_path / "each"
    code, err = cli(capsys, "generate", "a red circle", "--steps", "2", option, target)
    assert code == 2
    assert_one_error_line(err, "No space left on device")
    assert files_in(tmp_path) == []  # no 0-byte PNG, no temporary file


def test_a_full_disk_midway_says_how_many_images_were_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sdlearn.__main__.load_pipeline", lambda *args, **kwargs: FakePipeline())
    real = sdlearn.checkpoint.atomic_write_bytes
    monkeypatch.setattr("sdlearn.__main__.atomic_write_bytes", lambda path, data: (
        real(path, data) if int(Path(path).stem) < 70 else fsync_on_a_full_disk(None)))
    code, err = cli(capsys, "generate", "a red circle", "--n", "100", "--out-dir", tmp_path)
    assert code == 2
    assert_one_error_line(err, "070.png", "No space left on device", "the first 70 of 100 images")
    assert files_in(tmp_path) == [f"{i:03d}.png" for i in range(70)]  # each one whole


# ------------------------------------------------------------------------------------------------
# 8. The grid and an image in one place, seeds out of range, a damaged checkpoint's step


def test_a_grid_named_like_one_of_the_images_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sdlearn.__main__.load_pipeline", lambda *a, **k: pytest.fail("drew images"))
    folder = tmp_path / "D"
    code, err = cli(capsys, "generate", "a red circle", "--n", "3", "--out", folder / "000.png", "--out-dir", folder)
    assert code == 2
    assert_one_error_line(err, "000.png", "image 0", "overwrite")
    assert not folder.exists()
    # The same file reached by another spelling of the folder is caught too.
    code, err = cli(capsys, "generate", "a red circle", "--n", "3", "--out", folder / "002.png",
                    "--out-dir", tmp_path / "x" / ".." / "D")
    assert code == 2 and "image 2" in err


def test_a_grid_beside_the_images_with_another_name_is_fine(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sdlearn.__main__.load_pipeline", lambda *args, **kwargs: FakePipeline())
    folder = tmp_path / "D"
    code, err = cli(capsys, "generate", "a red circle", "--n", "3", "--out", folder / "003.png", "--out-dir", folder)
    assert code == 0, err
    assert files_in(folder) == ["000.png", "001.png", "002.png", "003.png"]


@pytest.mark.parametrize("command, seed", [
    ("generate", 2**64), ("generate", -1), ("generate", 10**30), ("train", 2**64), ("train", 2**32), ("train", -5),
])
def test_a_seed_out_of_range_is_named(tmp_path, capsys, monkeypatch, command, seed):
    monkeypatch.setitem(TRAINERS, "vae", lambda **kwargs: pytest.fail("trained"))
    args = ["generate", "a red circle", "--out", tmp_path / "x.png"] if command == "generate" else \
        ["train", "vae", "--steps", "1", "--out", tmp_path]
    code, err = cli(capsys, *args, "--seed", seed)
    assert code == 2
    assert_one_error_line(err, "--seed", str(seed), "out of range")


def test_the_pipeline_names_a_seed_out_of_range():
    with pytest.raises(ValueError, match=f"seed {2**64} is out of range"):
        load_pipeline()("a red circle", num_inference_steps=1, seed=2**64, progress=False)


@pytest.mark.parametrize("field, value, words", [
    ("step", -5, "step -5"),
    ("step", 2, "loss history of 3 steps"),
    ("step", 2.5, "step 2.5"),
    ("seconds", -1.0, "-1.0 seconds"),
])
def test_resuming_from_a_checkpoint_with_an_impossible_step_is_refused(tmp_path, capsys, monkeypatch, field, value, words):
    train(make_model(), loss_fn, batch_fn, max_steps=3, checkpoint_dir=tmp_path, progress=False)
    document = json.loads((tmp_path / "checkpoint.json").read_text())
    document[field] = value
    (tmp_path / "checkpoint.json").write_text(json.dumps(document))
    steps_run = []
    with pytest.raises(CheckpointError, match=words):
        train(make_model(), loss_fn, lambda step: steps_run.append(step) or batch_fn(step), max_steps=6,
              checkpoint_dir=tmp_path, progress=False)
    assert steps_run == []
    monkeypatch.setitem(TRAINERS, "vae", tiny_trainer())  # and on the command line, one line
    code, err = cli(capsys, "train", "vae", "--steps", "6", "--out", tmp_path)
    assert code == 2
    assert_one_error_line(err, words, "damaged")
