"""benchmarks/compare_denoisers.py (issue 14, item 2) runs end to end in ``--quick`` mode on a weights folder holding
the shipped VAE, text tower and DiT beside a U-Net trained two steps by the recipe, prints one table with a DiT and a
U-Net column, and writes the same report to the results folder. It measures nothing here: a smoke test."""

import importlib.util
import re
import shutil
from pathlib import Path

import pytest
import torch

from sdlearn.checkpoint import count_parameters
from sdlearn.pretrained import WEIGHTS_DIR, load_denoiser, load_unet
from sdlearn.recipes import train_denoiser

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_denoisers.py"
SHIPPED = all((WEIGHTS_DIR / f"{name}.safetensors").is_file() for name in ("vae", "clip", "denoiser", "scene_reader"))
pytestmark = pytest.mark.skipif(not SHIPPED, reason="shipped vae, clip, denoiser and scene reader weights needed")


def load_script():
    spec = importlib.util.spec_from_file_location("compare_denoisers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The shipped vae.*, clip.* and denoiser.*, and unet.* from ``train_denoiser(denoiser="unet", steps=2)``."""
    folder = tmp_path_factory.mktemp("weights")
    for name in ("vae", "clip", "denoiser"):
        for suffix in (".safetensors", ".json"):
            shutil.copy(WEIGHTS_DIR / f"{name}{suffix}", folder / f"{name}{suffix}")
    torch.set_num_threads(1)
    train_denoiser(folder, steps=2, denoiser="unet", batch_size=8, latent_window=64, latent_refresh=4, eval_images=0,
                   device="cpu", progress=False)
    return folder


@pytest.mark.slow  # trains a U-Net, then judges and times both denoisers
def test_quick_run_prints_both_columns_and_writes_the_report(folder, tmp_path, capsys):
    script = load_script()
    path = script.main(["--weights", str(folder), "--quick", "--threads", "1", "--out"], results_dir=tmp_path)
    printed = capsys.readouterr().out
    assert path is not None and path.parent == tmp_path
    assert re.fullmatch(r"compare_denoisers-\d{8}-\d{4}-quick\.txt", path.name)
    written = path.read_text()
    assert written.strip() and written in printed  # the file is the report that was printed
    assert not [p for p in tmp_path.iterdir() if p != path]  # no temporary file left beside it

    header = next(line for line in written.splitlines() if line.strip() and line.split() == ["DiT", "U-Net"])
    dit_at, unet_at = header.index("DiT"), header.index("U-Net")
    assert dit_at < unet_at

    def cells(label):
        line = next(line for line in written.splitlines() if line.startswith(label))
        return line[dit_at:unet_at].strip(), line[unet_at : unet_at + script.COLUMN].strip()

    assert cells("  parameters") == (f"{count_parameters(load_denoiser(folder)):,}",
                                     f"{count_parameters(load_unet(folder)):,}")
    assert cells("  steps reached")[1] == "2"  # the U-Net's training record, read from its JSON
    for label in ("  training FLOPs per image", "  images/s generating", *(f"  KID, {k}" for k in script.KID_KINDS)):
        dit, unet_cell = cells(label)
        assert dit and unet_cell and dit != "not recorded"
    for kind in script.PROMPT_KINDS:  # every prompt kind judged for both, with an interval
        dit, unet_cell = cells(kind)
        assert re.fullmatch(r"[\d.]+% \[[\d.]+%, [\d.]+%\]", dit) and re.fullmatch(r"[\d.]+% \[[\d.]+%, [\d.]+%\]", unet_cell)
    assert "what each does well" in written
    assert "DiT clearly better" in written and "U-Net clearly better" in written


def test_bad_input_is_one_error_line(tmp_path, capsys):
    script = load_script()
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--weights", str(tmp_path / "missing"), "--quick"], results_dir=tmp_path)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # argparse: the usage, then one "PROG: error: ..." line
    assert "error: weights folder" in err and "not found" in err and not list(tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--images", "1"], results_dir=tmp_path)
    assert exit_info.value.code == 2 and "--images must be" in capsys.readouterr().err


def test_sign_test_is_mcnemars_exact_test():
    sign_test_p = load_script().sign_test_p
    assert sign_test_p(2, 13) == pytest.approx(2 * (1 + 15 + 105) / 2**15)  # 2 · P(X ≤ 2), X ~ Binomial(15, 1/2)
    assert sign_test_p(13, 2) == sign_test_p(2, 13)
    assert sign_test_p(0, 5) == pytest.approx(2 / 32)
    assert sign_test_p(0, 0) == sign_test_p(5, 5) == sign_test_p(0, 1) == 1.0  # no evidence either way
