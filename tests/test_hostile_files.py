"""Hostile input to the files sdlearn reads and writes (issue 20, the files half; and issue 19's exercise tracebacks).

Each test is one case of the issue: student copies never written through a link nor left half-written, damaged or
absurd weights refused before they give black images or allocate gigabytes, 16-bit and odd image modes read with
their true colours, stale temporary files cleaned, a lost JSON replaced by its embedded copy, checkpoint steps and
sampler timesteps checked, checkers that time out, and failures that show the learner's code, not the checker's.
"""

import errno
import json
import os
import shutil
import struct
import threading
import time
import zlib
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from PIL import Image

from sdlearn import checkpoint
from sdlearn import samplers as S
from sdlearn.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, save_module
from sdlearn.data import ImageFolderDataset, parse_caption
from sdlearn.exercises import ExerciseFailed, check, check_alphas_cumprod, write_student_copies
from sdlearn.exercises.framework import Case, ExerciseTimedOut
from sdlearn.schedules import NoiseSchedule
from sdlearn.vae import VAE, VAEConfig

TINY_VAE = VAEConfig(base_channels=8, channel_multipliers=(1, 2, 2), num_res_blocks=(0, 1, 1), norm_groups=4)


# ------------------------------------------------------------------------------------------------
# Helpers: a small course folder, PNG files written byte by byte


def make_course(folder: Path, names=("01_first.ipynb", "02_second.ipynb", "03_vae.ipynb")) -> Path:
    """A course folder of tiny notebooks, each with one solution region (never the real course's notebooks)."""
    folder.mkdir(parents=True)
    for name in names:
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(f"def f():\n    # BEGIN SOLUTION\n    return '{name} secret'\n    # END SOLUTION\n")]
        nbformat.write(nb, folder / name)
    return folder


def write_png(path: Path, rows, width: int, height: int, bit_depth: int, color_type: int) -> None:
    """A PNG file from its raw rows (bytes each, without the filter byte), compressed as a stream: PIL cannot write
    16-bit RGB, and a 15000 × 15000 image need not exist in memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor, parts = zlib.compressobj(9), []
    for row in rows:
        parts.append(compressor.compress(b"\x00" + row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def flip_bytes_in_data(path: Path, offset_from_end: int = 64, value: bytes | None = None) -> None:
    """Change bytes inside a safetensors file's tensor data (past its header), as a bad disk or copy would."""
    data = bytearray(path.read_bytes())
    position = len(data) - offset_from_end
    if value is None:
        data[position] ^= 0xFF
    else:
        data[position:position + len(value)] = value
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------------
# 1. exercises --force never writes through a link


def test_exercises_force_replaces_a_link_to_the_course_notebook_and_leaves_that_notebook_alone(tmp_path):
    course = make_course(tmp_path / "course")
    before = (course / "03_vae.ipynb").read_bytes()
    out = tmp_path / "students"
    out.mkdir()
    (out / "03_vae.ipynb").symlink_to(course / "03_vae.ipynb")
    written = write_student_copies(out, notebooks_dir=course, force=True)
    assert (course / "03_vae.ipynb").read_bytes() == before  # the course notebook keeps its solution
    copy = out / "03_vae.ipynb"
    assert copy in written and not copy.is_symlink() and copy.is_file()
    assert "secret" not in copy.read_text() and "NotImplementedError" in copy.read_text()


# ------------------------------------------------------------------------------------------------
# 4. Damaged tensor data: sha256 recorded and checked; non-finite weights refused


def test_every_shipped_json_records_the_sha256_of_its_weights_file():
    for json_path in sorted(checkpoint.WEIGHTS_DIR.glob("*.json")):
        recorded = json.loads(json_path.read_text())[checkpoint.HASH_KEY]
        assert recorded == checkpoint.file_sha256(json_path.with_suffix(".safetensors")), json_path.name


@pytest.fixture
def shipped_copy(tmp_path, monkeypatch):
    """A copy of the shipped weights that sdlearn takes for the shipped folder (the real one is never touched)."""
    folder = tmp_path / "weights"
    shutil.copytree(checkpoint.WEIGHTS_DIR, folder, ignore=shutil.ignore_patterns("*.md"))
    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", folder.resolve())
    return folder


def test_damaged_shipped_weights_are_an_error_naming_the_file(shipped_copy):
    from sdlearn.pretrained import load_vae

    flip_bytes_in_data(shipped_copy / "vae.safetensors")
    with pytest.raises(CheckpointError, match=r"vae\.safetensors.*sha256.*restore the weights shipped"):
        load_vae()


def test_damaged_weights_of_your_own_warn_naming_the_file(tmp_path):
    from sdlearn.pretrained import load_vae

    vae = VAE(TINY_VAE)
    save_module(vae, tmp_path / "vae", "vae")
    flip_bytes_in_data(tmp_path / "vae.safetensors", value=struct.pack("<f", 0.5))  # a finite value, changed
    with pytest.warns(UserWarning, match=r"vae\.safetensors.*has changed since it was saved.*sha256"):
        load_vae(tmp_path)


def test_a_damaged_denoiser_in_a_weights_folder_warns_before_drawing(tmp_path):
    from sdlearn.pretrained import load_pipeline

    folder = tmp_path / "run"
    shutil.copytree(checkpoint.WEIGHTS_DIR, folder, ignore=shutil.ignore_patterns("*.md", "classifier.*", "scene_reader.*"))
    flip_bytes_in_data(folder / "denoiser.safetensors", offset_from_end=1000, value=struct.pack("<e", 0.25))
    with pytest.warns(UserWarning, match=r"denoiser\.safetensors.*has changed since it was saved"):
        load_pipeline(folder)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_holding_nan_or_infinity_are_refused(tmp_path, bad):
    from sdlearn.pretrained import load_vae

    vae = VAE(TINY_VAE)
    with torch.no_grad():
        next(vae.parameters()).view(-1)[3] = bad
    save_module(vae, tmp_path / "vae", "vae")
    with pytest.raises(CheckpointError, match=r"vae\.safetensors.*NaN or infinite weights"):
        load_vae(tmp_path)


def test_files_saved_before_hashes_were_recorded_load_without_a_word(tmp_path, recwarn):
    from sdlearn.pretrained import load_vae

    save_module(VAE(TINY_VAE), tmp_path / "vae", "vae")
    document = json.loads((tmp_path / "vae.json").read_text())
    del document[checkpoint.HASH_KEY]
    (tmp_path / "vae.json").write_text(json.dumps(document, indent=1))
    load_vae(tmp_path)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


# ------------------------------------------------------------------------------------------------
# 5. Sizes: absurd config fields refused before any model is built; decompression bombs refused


@pytest.mark.parametrize("field, value", [("width", 65536), ("depth", 10**6), ("mlp_ratio", 1e9), ("mlp_ratio", float("inf"))])
def test_an_absurd_size_in_a_weights_config_is_refused_before_any_model_is_built(tmp_path, monkeypatch, field, value):
    from sdlearn.denoiser import Denoiser
    from sdlearn.pretrained import load_denoiser

    folder = tmp_path / "run"
    folder.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(checkpoint.WEIGHTS_DIR / f"denoiser{suffix}", folder)
    document = json.loads((folder / "denoiser.json").read_text())
    document["model_config"][field] = value
    (folder / "denoiser.json").write_text(json.dumps(document))

    def built(*args, **kwargs):
        raise AssertionError("a model was built (and its memory allocated) before its config was checked")

    monkeypatch.setattr(Denoiser, "__init__", built)
    with pytest.raises(CheckpointError, match=rf"denoiser\.json.*{field} must be .*at most"):
        load_denoiser(folder)


def test_an_image_too_large_to_decode_is_refused_with_one_line(tmp_path):
    side = 15000  # 225 million pixels: PIL's DecompressionBombError
    zero_row = bytes((side + 7) // 8)  # 1-bit grey
    write_png(tmp_path / "huge.png", (zero_row for _ in range(side)), side, side, bit_depth=1, color_type=0)
    Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    with pytest.raises(ValueError) as error:
        ImageFolderDataset(tmp_path, captions=None)
    message = str(error.value)
    assert "huge.png" in message and "225,000,000 pixels" in message and "shrink it" in message
    assert "\n" not in message


# ------------------------------------------------------------------------------------------------
# 6. Image modes: 8 and 16 bits, grey, RGBA, palette, CMYK


def pixel(folder: Path, name: str) -> list[float]:
    dataset = ImageFolderDataset(folder, size=4, captions=None)
    item = dataset[dataset.files.index(name)]
    return [round(v, 3) for v in item["image"][:, 2, 2].tolist()]


def level(value_0_255: float) -> float:
    return round(value_0_255 / 127.5 - 1, 3)


def test_16_bit_grey_and_rgb_pngs_are_scaled_not_clipped_to_white(tmp_path):
    Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)).save(tmp_path / "grey16.png")  # 32896 = 128 × 257
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    rgb = np.zeros((8, 8, 3), dtype=">u2")
    rgb[..., 0], rgb[..., 1] = 65535, 16448  # 16448 = 64 × 257
    write_png(tmp_path / "rgb16.png", (row.tobytes() for row in rgb), 8, 8, bit_depth=16, color_type=2)
    assert pixel(tmp_path, "grey16.png") == [level(128)] * 3
    assert pixel(tmp_path, "rgb16.png") == [1.0, level(64), -1.0]


def test_8_bit_grey_rgba_palette_and_cmyk_images_keep_their_colours(tmp_path):
    Image.new("L", (8, 8), 200).save(tmp_path / "grey.png")
    Image.new("RGBA", (8, 8), (255, 0, 0, 128)).save(tmp_path / "half_transparent_red.png")
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.save(tmp_path / "palette_blue.png")
    transparent = Image.new("P", (8, 8), 1)
    transparent.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    transparent.save(tmp_path / "palette_transparent_white.png", transparency=1)
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk_red.jpg", quality=100)
    assert pixel(tmp_path, "grey.png") == [level(200)] * 3
    assert pixel(tmp_path, "half_transparent_red.png") == [level(128), -1.0, -1.0]  # composited over black
    assert pixel(tmp_path, "palette_blue.png") == [-1.0, -1.0, 1.0]
    assert pixel(tmp_path, "palette_transparent_white.png") == [-1.0, -1.0, -1.0]  # transparent: black
    red, green, blue = pixel(tmp_path, "cmyk_red.jpg")
    assert red > 0.9 and green < -0.9 and blue < -0.9


# ------------------------------------------------------------------------------------------------
# 7. exercises into a read-only place, onto a full disk, or onto a folder: one clear error, no partial file


def names_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_exercises_onto_a_full_disk_leave_no_partial_notebook(tmp_path, monkeypatch):
    course = make_course(tmp_path / "course")
    out = tmp_path / "students"
    write_student_copies(out, notebooks_dir=course)
    before = {name: (out / name).read_bytes() for name in names_in(out)}

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.os, "fsync", disk_full)  # the bytes went in part, then the disk filled up
    with pytest.raises(ValueError, match=r"cannot write the student notebooks into .*students: No space left on device.*nothing was written"):
        write_student_copies(out, notebooks_dir=course, force=True)
    assert {name: (out / name).read_bytes() for name in names_in(out)} == before  # no temporary file, old copies whole


@pytest.mark.slow  # a child process that imports sdlearn; the simulated full disk above stays fast
def test_exercises_past_a_real_file_size_limit_leave_no_truncated_notebook(tmp_path):
    """A disk that fills up, for real: RLIMIT_FSIZE makes every write past 600 bytes fail (EFBIG), in a child
    process, whatever code does the writing."""
    import subprocess
    import sys

    resource = pytest.importorskip("resource")
    if not hasattr(resource, "RLIMIT_FSIZE"):
        pytest.skip("no RLIMIT_FSIZE here")
    course = make_course(tmp_path / "course")
    out = tmp_path / "students"
    write_student_copies(out, notebooks_dir=course)
    before = {name: (out / name).read_bytes() for name in names_in(out)}
    assert min(len(data) for data in before.values()) > 600
    script = f"""
import resource, signal
from sdlearn.exercises import write_student_copies
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (600, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    write_student_copies({str(out)!r}, notebooks_dir={str(course)!r}, force=True)
except ValueError as error:
    print("ValueError:", error)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr  # no traceback
    assert done.stdout.startswith("ValueError: cannot write the student notebooks into") and "File too large" in done.stdout
    assert {name: (out / name).read_bytes() for name in names_in(out)} == before  # nothing truncated, nothing left


def test_exercises_into_a_read_only_place_is_one_clear_error(tmp_path, monkeypatch):
    course = make_course(tmp_path / "course")
    out = tmp_path / "students"
    out.mkdir()
    if os.geteuid() != 0:  # a real read-only folder (root may write anyway)
        out.chmod(0o555)
    else:
        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(out))

        monkeypatch.setattr(checkpoint.tempfile, "mkstemp", read_only)
    try:
        with pytest.raises(ValueError, match=r"cannot write the student notebooks into .*students: (Read-only file system|Permission denied)"):
            write_student_copies(out, notebooks_dir=course)
    finally:
        out.chmod(0o755)
    assert names_in(out) == []


def test_exercises_where_a_folder_has_a_notebooks_name_write_nothing(tmp_path):
    course = make_course(tmp_path / "course")
    out = tmp_path / "students"
    (out / "02_second.ipynb").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"02_second\.ipynb is a folder"):
        write_student_copies(out, notebooks_dir=course, force=True)
    assert names_in(out) == ["02_second.ipynb"] and not any((out / "02_second.ipynb").iterdir())


def test_the_command_line_reports_a_folder_with_a_notebooks_name_in_one_line(tmp_path, capsys):
    from sdlearn.__main__ import main

    name = sorted(p.name for p in Path(__file__).resolve().parent.parent.joinpath("notebooks").glob("0*.ipynb"))[0]
    out = tmp_path / "students"
    (out / name).mkdir(parents=True)
    assert main(["exercises", str(out), "--force"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and f"{name} is a folder" in err
    assert names_in(out) == [name]


def test_exercises_into_an_empty_name_is_refused_not_taken_for_here(tmp_path, monkeypatch):
    course = make_course(tmp_path / "course")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    with pytest.raises(ValueError, match="empty name"):
        write_student_copies("", notebooks_dir=course)
    assert names_in(here) == []


# ------------------------------------------------------------------------------------------------
# 8. Stale temporaries, a lost JSON, checkpoint steps, sampler timesteps, checker timeouts, caption words


def ended_process_id() -> int:
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_save_cleans_the_temporary_files_of_killed_saves(tmp_path):
    import hashlib
    import socket

    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]  # how a temporary file names its machine
    dead, alive = ended_process_id(), os.getpid()
    hour_ago = time.time() - 2 * checkpoint.STALE_TEMPORARY_SECONDS
    old = [tmp_path / ".ckpt.safetensors.k2j3h4g5.tmp",  # the form before the writer was named
           tmp_path / f".ckpt.json.{host}-{alive}.abc123.sdlearn.tmp", tmp_path / ".other.bin.xyz.sdlearn.tmp"]
    writer_gone = [tmp_path / f".ckpt.safetensors.{host}-{dead}.k2j3h4g5.sdlearn.tmp"]  # kill -9 a moment ago
    keep = [tmp_path / f".ckpt.safetensors.{host}-{alive}.now.sdlearn.tmp",  # a save under way
            tmp_path / f".ckpt.safetensors.0badc0de-{dead}.now.sdlearn.tmp",  # another machine's save under way
            tmp_path / ".notes.txt.k2j3h4g5.tmp",  # not ours
            tmp_path / "mine.tmp"]
    for path in old + writer_gone + keep:
        path.write_bytes(b"x" * 100)
    for path in old + keep[2:]:
        os.utime(path, (hour_ago, hour_ago))
    save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(2)}, {"step": 1})
    assert not any(p.exists() for p in old + writer_gone)
    assert all(p.exists() for p in keep)


def test_a_killed_save_leaves_no_temporary_file_behind_once_the_next_save_runs(tmp_path):
    import signal
    import subprocess
    import sys

    script = (f"import torch; from sdlearn.checkpoint import save_checkpoint\n"
              f"while True: save_checkpoint({str(tmp_path / 'ckpt')!r}, {{'w': torch.zeros(2_000_000)}}, {{'step': 1}})\n")
    process = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(tmp_path.glob(".*.tmp")):
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    if not list(tmp_path.glob(".*.tmp")):
        pytest.skip("the save was never caught half-way")
    save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(2)}, {"step": 2})  # the next run, at once
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_deleted_denoiser_json_is_replaced_by_its_embedded_copy(tmp_path):
    from sdlearn.pretrained import load_pipeline

    folder = tmp_path / "run"
    shutil.copytree(checkpoint.WEIGHTS_DIR, folder, ignore=shutil.ignore_patterns("*.md", "classifier.*", "scene_reader.*"))
    (folder / "denoiser.json").unlink()
    (folder / "clip.json").unlink()
    with pytest.warns(UserWarning, match="using the copy of the config stored in") as warned:
        pipe = load_pipeline(folder)
    assert len(warned) == 2  # one for each lost file, once
    images = pipe("a red circle", num_inference_steps=2, seed=0, progress=False)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


@pytest.mark.parametrize("step", [-5, 2.5, True, "3"])
def test_a_checkpoint_step_that_is_not_a_count_is_refused(tmp_path, step):
    save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(2)}, {"step": 3})
    document = json.loads((tmp_path / "ckpt.json").read_text())
    document["step"] = step  # edited by hand, keeping the save_id
    (tmp_path / "ckpt.json").write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match=r"ckpt\.json.*step .*whole number ≥ 0"):
        load_checkpoint(tmp_path / "ckpt")


SCHEDULE = NoiseSchedule.from_name("scaled_linear")


def stepped(name: str, evaluations: int | None = None):
    """A sampler of ``name`` with 5 steps, stepped through ``evaluations`` of its timesteps (all by default)."""
    sampler = S.get_sampler(name, SCHEDULE)
    sampler.set_timesteps(5)
    x = torch.zeros(1, 2)
    for t in sampler.timesteps[:evaluations]:
        x = sampler.step(torch.zeros_like(x), t, x, generator=torch.Generator().manual_seed(0))
    return sampler, x


@pytest.mark.parametrize("name", S.SAMPLER_NAMES)
def test_every_sampler_refuses_to_step_past_the_end(name):
    sampler, x = stepped(name)
    with pytest.raises(ValueError, match="stepped through"):
        sampler.step(torch.zeros_like(x), sampler.timesteps[-1], x)


@pytest.mark.parametrize("t", [3, 400.5, -1, 1000, 10**6, float("nan")])
@pytest.mark.parametrize("name", S.SAMPLER_NAMES)
def test_every_sampler_refuses_a_timestep_that_is_not_one_of_its_own(name, t):
    sampler, x = stepped(name, evaluations=0)
    with pytest.raises(ValueError, match="timestep"):
        sampler.step(torch.zeros_like(x), t, x)


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_ddpm_and_ddim_refuse_going_back_but_may_skip(name):
    sampler, x = stepped(name, evaluations=0)
    out = torch.zeros_like(x)
    sampler.step(out, sampler.timesteps[0], x)
    sampler.step(out, sampler.timesteps[3], x)  # one step tried alone, as notebook 06 does: allowed
    with pytest.raises(ValueError, match="already passed"):
        sampler.step(out, sampler.timesteps[1], x)


def never_returns(betas):
    deadline = time.monotonic() + 60  # "never", for a test: the checker must stop it long before
    while time.monotonic() < deadline:
        try:
            pass
        except Exception:  # a learner's catch-all does not swallow the checker's timeout
            pass
    return 1 - betas


def test_a_checker_stops_a_function_that_never_returns():
    started = time.monotonic()
    with pytest.raises(ExerciseTimedOut, match=r"did not return within 0\.5 s.*\n.*It was stopped"):
        check(never_returns, lambda betas: 1 - betas, [Case("ten betas", (torch.zeros(10),))], "check_demo", timeout=0.5)
    assert time.monotonic() - started < 10


def test_a_checker_off_the_main_thread_times_out_too():
    outcome = {}

    def run():
        try:
            check(lambda betas: time.sleep(3), lambda betas: 1 - betas, [Case("ten betas", (torch.zeros(10),))],
                  "check_demo", timeout=0.3)
        except ExerciseTimedOut as error:
            outcome["message"] = str(error)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(20)
    assert "did not return within 0.3 s" in outcome["message"] and "restart the kernel" in outcome["message"]


def test_an_unknown_caption_word_is_named_as_written():
    with pytest.raises(ValueError) as error:
        parse_caption("réd circle")
    assert "'réd'" in str(error.value) and "'r'" not in str(error.value) and "'d'" not in str(error.value)


# ------------------------------------------------------------------------------------------------
# Issue 19: a failing check shows the learner's frames and the hint, not the checker's


def learners_cumprod(betas):
    return betas[len(betas)]  # IndexError, in the learner's own code


def test_a_failing_check_shows_the_learners_frames_and_the_hint_not_the_checkers():
    with pytest.raises(ExerciseFailed) as error:
        check_alphas_cumprod(learners_cumprod)
    shown = "\n".join(error.value._render_traceback_())  # what IPython and Jupyter display
    assert "sdlearn/exercises" not in shown and "sdlearn\\exercises" not in shown
    assert "in learners_cumprod" in shown and "return betas[len(betas)]" in shown  # the learner's failing line
    assert "check_alphas_cumprod(learners_cumprod)" in shown  # and the line that called the checker
    assert "IndexError" in shown and "Hint:" in shown
    assert shown.rstrip().splitlines()[-1].lstrip().startswith("Hint:")  # the message ends the display
