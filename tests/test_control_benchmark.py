"""benchmarks/control.py (issue 17) runs end to end in ``--quick`` mode on the shipped weights (the DiT, the ControlNet
and the student), prints every target with a verdict, and writes the same report to the results folder. It measures
nothing here (16 images per figure): a smoke test, and a check of its measuring helpers on known images."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from sdlearn.data import render_batch
from sdlearn.pretrained import WEIGHTS_DIR

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "control.py"
SHIPPED = all((WEIGHTS_DIR / f"{name}.safetensors").is_file()
              for name in ("vae", "clip", "denoiser", "scene_reader", "controlnet", "student"))
pytestmark = pytest.mark.skipif(not SHIPPED, reason="the shipped weights, ControlNet and student included, are needed")


def load_script():
    spec = importlib.util.spec_from_file_location("control_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_measures_read_known_images():
    script = load_script()
    images = render_batch(torch.tensor([0, 2]), torch.tensor([0, 1]), torch.tensor([1, 1]), ["top left", "center"],
                          jitter=False)
    assert torch.isinf(script.psnr(images, images)).logical_not().all()  # capped, finite
    assert (script.psnr(images, images) > 90).all()
    darker = images.clone()
    darker[0] = -1  # the first image's object erased: its error is all inside the object's mask
    outside = 1 - script.object_mask(images)
    assert script.psnr(darker, images, outside)[0] > 90 and script.psnr(darker, images)[0] < 25
    centres = script.centre(images)
    assert centres[1].tolist() == pytest.approx([15.5, 15.5], abs=0.6)  # the centre place's box is centred
    assert centres[0, 0] < 12 and centres[0, 1] < 12  # top left
    assert "± " in script.mean_interval(torch.tensor([1.0, 2.0, 3.0])) and "of 3" in script.rate_interval(
        torch.tensor([True, False, True]))
    images_, sources, targets, wanted = script.edit_prompts(8, "color", seed=0)
    assert images_.shape == (8, 3, 32, 32) and len(sources) == len(targets) == len(wanted) == 8
    assert all(s != t for s, t in zip(sources, targets))


@pytest.mark.slow  # runs the benchmark script end to end
def test_quick_run_prints_every_target_and_writes_the_report(tmp_path, capsys):
    script = load_script()
    path = script.main(["--quick", "--threads", "1", "--out"], results_dir=tmp_path)
    printed = capsys.readouterr().out
    assert path is not None and re.fullmatch(r"control-\d{8}-\d{4}-quick\.txt", path.name)
    written = path.read_text()
    assert written.strip() and written in printed
    assert not [p for p in tmp_path.iterdir() if p != path]  # no temporary file left beside it
    summary = written[written.index("summary"):]
    for target in script.TARGETS:
        assert re.search(re.escape(target) + r".*(met|MISSED)", summary), target
