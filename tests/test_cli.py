"""The command line: what it writes, and one-line errors with exit status 2 on bad input."""

import subprocess
import sys

import pytest

from sdlearn.__main__ import TRAINERS, generate_to_files, main
from sdlearn.control_recipes import train_controlnet
from sdlearn.distill_recipes import train_distill
from sdlearn.recipes import (
    train_all,
    train_classifier,
    train_clip,
    train_denoiser,
    train_flow,
    train_scene_reader,
    train_unet,
    train_vae,
)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdlearn", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, words",
    [
        (["train", "bogus"], "invalid choice"),
        (["train", "vae", "--minutes", "-1"], "positive number"),
        (["train", "vae", "--steps", "0"], "positive integer"),
        (["train", "vae", "--data", "/no/such/folder", "--steps", "1"], "does not exist"),
        (["exercises", "notebooks"], "notebooks folder"),
        ([], "required"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, words):
    result = run_cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert words in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3  # argparse may print its usage line before the error


def test_exercises_writes_student_copies_and_refuses_a_non_empty_folder(tmp_path, capsys):
    out = tmp_path / "student"
    assert main(["exercises", str(out)]) == 0
    written = sorted(p.name for p in out.glob("*.ipynb"))
    assert written and all(name[:2].isdigit() for name in written)
    assert "# BEGIN SOLUTION" not in "".join(p.read_text() for p in out.glob("*.ipynb"))
    assert main(["exercises", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["exercises", str(out), "--force"]) == 0


@pytest.mark.slow  # a real training run in a new process
def test_train_vae_writes_loadable_weights(tmp_path):
    from sdlearn.pretrained import load_vae

    result = run_cli("train", "vae", "--steps", "3", "--out", str(tmp_path), "--threads", "1", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    vae = load_vae(tmp_path)
    assert vae.training_info["steps"] == 3


def test_train_names_the_recipes():
    assert TRAINERS == {"vae": train_vae, "clip": train_clip, "classifier": train_classifier,
                        "scene_reader": train_scene_reader, "denoiser": train_denoiser,
                        "unet": train_unet, "flow": train_flow, "all": train_all,
                        "distill": train_distill, "controlnet": train_controlnet}


def test_precision_is_refused_by_a_recipe_without_it(tmp_path, capsys):
    assert main(["train", "controlnet", "--steps", "1", "--precision", "bf16", "--out", str(tmp_path / "c")]) == 2
    assert "--precision is not an option of 'train controlnet'" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((), {}, "nothing to write"),
        (("x.png",), {"sampler": "bogus"}, "unknown sampler"),
        (("x.txt",), {}, "must name an image file"),
        ((), {"out_dir": "a_file"}, "exists and is not a folder"),
    ],
)
def test_generate_to_files_refuses_bad_arguments_before_loading_weights(tmp_path, args, kwargs, match):
    (tmp_path / "a_file").write_text("")
    args = tuple(str(tmp_path / a) for a in args)
    kwargs = {k: str(tmp_path / v) if k == "out_dir" else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=match):  # not the missing weights folder: the arguments are checked first
        generate_to_files("a red circle", *args, weights=tmp_path / "no such weights", **kwargs)
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]  # nothing written


def test_generate_warns_in_one_line_and_still_draws_a_three_object_prompt(tmp_path):
    out = tmp_path / "three.png"
    result = run_cli("generate", "a red circle and a blue square and a green hexagon", "--n", "1", "--steps", "2",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert any("'hexagon'" in line for line in warned)  # the unknown word, named
    assert any("names 3 objects" in line and "at most 2" in line for line in warned)
    assert "UserWarning" not in result.stderr and "ids, mask =" not in result.stderr  # no source lines
    assert out.is_file()
