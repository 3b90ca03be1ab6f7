"""The command line: what it writes, and one-line errors with exit status 2 on bad input."""

import subprocess
import sys

import pytest

from sdlearn.__main__ import main


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


def test_train_vae_writes_loadable_weights(tmp_path):
    from sdlearn.pretrained import load_vae

    result = run_cli("train", "vae", "--steps", "3", "--out", str(tmp_path), "--threads", "1", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    vae = load_vae(tmp_path)
    assert vae.training_info["steps"] == 3
