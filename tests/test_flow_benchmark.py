"""benchmarks/flow.py (issue 15) runs end to end in ``--quick`` mode on a weights folder holding the shipped VAE, text
tower and ε-DiT beside a flow DiT trained two steps by the recipe, prints every target with a verdict, and writes the
same report to the results folder. It measures nothing here: a smoke test (and a check of its parity section)."""

import importlib.util
import re
import shutil
from pathlib import Path

import pytest
import torch

from sdlearn.pretrained import WEIGHTS_DIR, load_flow
from sdlearn.recipes import train_flow

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "flow.py"
SHIPPED = all((WEIGHTS_DIR / f"{name}.safetensors").is_file() for name in ("vae", "clip", "denoiser", "scene_reader"))
pytestmark = pytest.mark.skipif(not SHIPPED, reason="shipped vae, clip, denoiser and scene reader weights needed")


def load_script():
    spec = importlib.util.spec_from_file_location("flow_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The shipped vae.*, clip.* and denoiser.*, and flow.* from ``train_flow(steps=2)``."""
    folder = tmp_path_factory.mktemp("weights")
    for name in ("vae", "clip", "denoiser"):
        for suffix in (".safetensors", ".json"):
            shutil.copy(WEIGHTS_DIR / f"{name}{suffix}", folder / f"{name}{suffix}")
    torch.set_num_threads(1)
    train_flow(folder, steps=2, batch_size=8, latent_window=64, latent_refresh=4, eval_images=0, device="cpu",
               progress=False)
    return folder


@pytest.mark.slow  # runs the benchmark script end to end
def test_quick_run_prints_every_target_and_writes_the_report(folder, tmp_path, capsys):
    script = load_script()
    path = script.main(["--weights", str(folder), "--quick", "--threads", "1", "--out"], results_dir=tmp_path)
    printed = capsys.readouterr().out
    assert path is not None and re.fullmatch(r"flow-\d{8}-\d{4}-quick\.txt", path.name)
    written = path.read_text()
    assert written.strip() and written in printed
    assert not [p for p in tmp_path.iterdir() if p != path]  # no temporary file left beside it
    summary = written[written.index("summary"):]
    for target in script.TARGETS:
        assert target in summary
    assert re.search(r"FlowMatchEulerSampler vs diffusers.* met", summary)  # diffusers is a test dependency
    # the training record of the 2-step model is what the script reports
    steps = load_flow(folder).training_info["steps"]
    assert f"flow-model: {load_flow(folder).training_info['minutes']} min, {steps} steps" in written
    for sampler in script.EPSILON_SAMPLERS:
        assert f"ε-model, 4 {sampler} steps" in written


def test_parity_section_catches_a_sampler_that_drifts(monkeypatch):
    """A FlowMatchEulerSampler off by 1e-4 in its step must be reported as MISSED."""
    pytest.importorskip("diffusers")
    script = load_script()
    step = script.FlowMatchEulerSampler.step
    monkeypatch.setattr(script.FlowMatchEulerSampler, "step",
                        lambda self, out, t, x, generator=None: step(self, out, t, x) + 1e-4)
    report = script.Report()
    script.parity(report)
    figure, met = report.verdicts[next(iter(script.TARGETS))]
    assert met is False and float(figure) >= 1e-4


def test_bad_arguments_get_one_line(folder, capsys):
    script = load_script()
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--weights", str(folder), "--images", "0"])
    assert exit_info.value.code == 2
    assert "--images must be ≥ 1" in capsys.readouterr().err
