"""benchmarks/adapt.py (issue 16) runs end to end in ``--quick`` mode on an adapter trained two steps by the recipe and a
star-aware judge trained two steps, prints every target with a verdict, and writes the same report to the results
folder. It measures nothing here: a smoke test."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from sdlearn.adapt_recipes import STAR_SHAPES, train_adapter, train_star_reader
from sdlearn.metrics import SceneReaderConfig
from sdlearn.pretrained import WEIGHTS_DIR

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "adapt.py"
SHIPPED = all((WEIGHTS_DIR / f"{name}.safetensors").is_file() for name in ("vae", "clip", "denoiser"))
pytestmark = pytest.mark.skipif(not SHIPPED, reason="shipped vae, clip and denoiser weights needed")


def load_script():
    spec = importlib.util.spec_from_file_location("adapt_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_star_prompts_cycle_over_every_colour_size_and_position():
    script = load_script()
    prompts = script.star_prompts(script.UNSEEN_COLORS, 45)
    assert prompts[0] == "a small green star in the top left" and prompts[40] == prompts[0]
    assert len(set(prompts)) == 40 and not set(script.SEEN_COLORS) & set(script.UNSEEN_COLORS)
    assert set(script.SEEN_COLORS) == {"red", "yellow", "blue", "white"}


@pytest.mark.slow  # trains a 2-step adapter and judge, then runs the benchmark script end to end
def test_quick_run_prints_every_target_and_writes_the_report(tmp_path, capsys):
    torch.set_num_threads(1)
    train_adapter("ti+lora", steps=2, rank=2, num_prior=4, prior_steps=2, out_dir=tmp_path / "adapter", device="cpu",
                  progress=False)
    train_star_reader(tmp_path / "judge", steps=2, batch_size=8, device="cpu", progress=False,
                      config=SceneReaderConfig(widths=(4, 4, 4), feature_dim=8, shapes=STAR_SHAPES))
    script = load_script()
    results = tmp_path / "results"
    path = script.main(["--adapter", str(tmp_path / "adapter" / "adapter.safetensors"), "--judge",
                        str(tmp_path / "judge"), "--quick", "--threads", "1", "--out"], results_dir=results)
    printed = capsys.readouterr().out
    assert path is not None and re.fullmatch(r"adapt-\d{8}-\d{4}-quick\.txt", path.name)
    written = path.read_text()
    assert written.strip() and written in printed
    assert [p for p in results.iterdir()] == [path]  # no temporary file left beside it
    summary = written[written.index("summary"):]
    for target in script.TARGETS:
        assert target in summary
    assert re.search(r"adapter files \(bytes\) +[\d,]+ bytes .* met", summary)  # a rank-2 adapter is small
    assert "adapter: method ti+lora, rank 2, 2 steps" in written and "16 images per figure" in written
    assert re.search(r"base +: [\d.]+% \[", written) and re.search(r"adapted: [\d.]+% \[", written)
