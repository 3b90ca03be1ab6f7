"""Issue 16, shipped: the star-aware judge (a scene reader whose shape head has "star"), load_pipeline(adapter=...),
and ``python -m sdlearn train adapter`` / ``generate --adapter``."""

import json

import pytest
import torch

from sdlearn.__main__ import main as cli
from sdlearn.adapt import lora_layers, prepare_adapter, save_adapter
from sdlearn.adapt_recipes import STAR_SHAPES, star_reader_accuracy, star_scene_batch, train_star_reader
from sdlearn.checkpoint import CheckpointError, file_sha256
from sdlearn.data import SHAPES, ShapesDataset, render_scene
from sdlearn.metrics import (
    SceneReader,
    SceneReaderConfig,
    default_scene_reader,
    prompt_accuracy,
    scene_targets,
)
from sdlearn.pretrained import WEIGHTS_DIR, load_pipeline, load_star_reader, save_scene_reader, weights_path

SHIPPED_BASE = all((WEIGHTS_DIR / f"{n}.safetensors").is_file() for n in ("vae", "clip", "denoiser", "scene_reader"))
needs_base = pytest.mark.skipif(not SHIPPED_BASE, reason="the shipped vae, clip, denoiser and scene reader are needed")
SHIPPED_ADAPTER = (WEIGHTS_DIR / "star_adapter.safetensors").is_file()
SHIPPED_JUDGE = (WEIGHTS_DIR / "scene_reader_star.safetensors").is_file()


def tiny_star_reader() -> SceneReader:
    torch.manual_seed(0)
    return SceneReader(SceneReaderConfig(widths=(4, 4, 4), feature_dim=8, shapes=STAR_SHAPES)).eval()


# ---- the config and the targets ------------------------------------------------------------------------------


def test_the_star_aware_config_adds_a_shape_class_and_round_trips():
    config = SceneReaderConfig(shapes=list(STAR_SHAPES))  # a JSON list comes back as a tuple
    assert config.shapes == SHAPES + ("star",) and SceneReaderConfig().shapes == SHAPES
    assert SceneReaderConfig.from_dict(config.to_dict()) == config
    reader = SceneReader(config)
    assert reader(torch.zeros(2, 3, 32, 32))["shape"].shape == (2, 5, 5)
    assert SceneReaderConfig.from_dict({k: v for k, v in SceneReaderConfig().to_dict().items() if k != "shapes"}).shapes \
        == SHAPES  # a file from before the field: the four shapes


@pytest.mark.parametrize("shapes", [("circle", "square"), SHAPES + ("moon",), SHAPES + ("star", "star"),
                                    ("star",) + SHAPES, "circle"])
def test_bad_shape_classes_are_refused(shapes):
    with pytest.raises(ValueError, match="shapes must be circle, square, triangle, diamond followed by any of star"):
        SceneReaderConfig(shapes=shapes)


def test_star_scenes_hold_stars_where_their_objects_say_and_targets_read_them():
    batch = star_scene_batch(64, torch.Generator().manual_seed(1), star_fraction=0.5)
    shape = batch.objects["shape"]  # [64, 2]
    assert batch.images.shape == (64, 3, 32, 32) and (shape == len(SHAPES)).any() and (shape[shape >= 0] < 4).any()
    j = int((shape[:, 1] == -1).logical_and(shape[:, 0] == len(SHAPES)).nonzero()[0, 0])  # a one-object star scene
    attributes = {k: batch.objects[k][j, 0].item() for k in ("color", "size", "position")}
    clean = render_scene([{"color": ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "white")[attributes["color"]],
                           "shape": "star", "size": ("small", "large")[attributes["size"]],
                           "position": ("top left", "top right", "bottom left", "bottom right", "center")[attributes["position"]]}])
    assert (batch.images[j] - clean).abs().mean() < 0.1  # the star, up to jitter
    targets = scene_targets(batch, STAR_SHAPES)
    assert (targets["shape"] == len(SHAPES)).sum() == (shape == len(SHAPES)).sum()
    with pytest.raises(ValueError, match=r"objects\['shape'\] must hold indices in 0..3"):
        scene_targets(batch)  # the four-shape reader's targets have no star
    every = star_scene_batch(16, torch.Generator().manual_seed(2), star_fraction=1.0)
    assert ((every.objects["shape"] == len(SHAPES)) == (every.objects["color"] >= 0)).all()
    none = star_scene_batch(16, torch.Generator().manual_seed(2), star_fraction=0.0)
    assert (none.objects["shape"] < len(SHAPES)).all()
    with pytest.raises(ValueError, match=r"star_fraction must lie in \[0, 1\]"):
        star_scene_batch(4, star_fraction=1.5)


# ---- prompt accuracy with a judge that knows the star ----------------------------------------------------------


def test_prompt_accuracy_judges_star_prompts_with_a_star_aware_reader(monkeypatch):
    reader = tiny_star_reader()
    images = torch.zeros(2, 3, 32, 32)
    read = {name: torch.full((2, 5), -1, dtype=torch.long) for name in ("color", "shape", "size")}
    read["color"][:, 0], read["shape"][:, 0], read["size"][:, 0] = 1, len(SHAPES), 0  # a small green star, top left
    monkeypatch.setattr(reader, "predict", lambda images, batch_size=512: read)
    result = prompt_accuracy(images, ["a small green star in the top left", "a small green circle in the top left"],
                             reader)
    assert result.correct.tolist() == [True, False] and result.read[0] == [
        {"color": "green", "shape": "star", "size": "small", "position": "top left"}]
    assert reader.read(images)[0][0]["shape"] == "star"
    if SHIPPED_BASE:
        with pytest.raises(ValueError, match="this judge knows only circle, square, triangle, diamond"):
            prompt_accuracy(images, "a small green star in the top left", default_scene_reader())


# ---- training, saving and loading the judge --------------------------------------------------------------------


def test_train_star_reader_writes_a_reader_that_loads_back(tmp_path):
    config = SceneReaderConfig(widths=(4, 4, 4), feature_dim=8, shapes=STAR_SHAPES)
    reader, result = train_star_reader(tmp_path, steps=2, batch_size=4, config=config, device="cpu", progress=False)
    assert result.step == 2 and (tmp_path / "scene_reader_star.safetensors").is_file()
    record = json.loads((tmp_path / "scene_reader_star.json").read_text())["training"]
    assert set(record["eval_accuracy"]) == {"star", "no_star"} and record["star_fraction"] == 0.5
    loaded = load_star_reader(tmp_path)
    images = star_scene_batch(8, torch.Generator().manual_seed(3)).images
    assert loaded.config.shapes == STAR_SHAPES
    for name, value in reader.predict(images).items():
        assert torch.equal(loaded.predict(images)[name], value)
    assert load_star_reader(tmp_path / "scene_reader_star.safetensors").config == loaded.config
    with pytest.raises(ValueError, match="config.shapes must include 'star'"):
        train_star_reader(None, steps=1, config=SceneReaderConfig(widths=(4, 4, 4)), progress=False)


def test_load_star_reader_refuses_a_missing_file_and_a_reader_without_the_star(tmp_path):
    with pytest.raises(CheckpointError, match="no star-aware scene reader"):
        load_star_reader(tmp_path)
    save_scene_reader(SceneReader(SceneReaderConfig(widths=(4, 4, 4), feature_dim=8)), tmp_path / "scene_reader_star")
    with pytest.raises(CheckpointError, match="do not include the star"):
        load_star_reader(tmp_path)
    with pytest.raises(ValueError, match="config.shapes include 'star'"):
        star_reader_accuracy(SceneReader(SceneReaderConfig(widths=(4, 4, 4), feature_dim=8)), 4)


@pytest.mark.skipif(not SHIPPED_JUDGE, reason="the shipped star-aware scene reader is needed")
def test_the_shipped_star_reader_reads_stars_and_the_old_shapes():
    reader = load_star_reader()
    accuracy = star_reader_accuracy(reader, 256, seed=777)
    assert accuracy["star"]["all"] >= 0.95 and accuracy["no_star"]["all"] >= 0.95, accuracy
    batch = ShapesDataset(64, "all", seed=778, num_objects=(1, 2)).batch(range(64))
    assert prompt_accuracy(batch.images, batch.captions, reader).overall >= 0.95


# ---- load_pipeline(adapter=...) --------------------------------------------------------------------------------


def test_bad_adapter_arguments_name_what_is_expected():
    with pytest.raises(ValueError, match=r"adapter='star' with denoiser='unet': adapters are trained on the DiT"):
        load_pipeline(adapter="star", denoiser="unet")
    with pytest.raises(ValueError, match=r"adapter='star' with denoiser='flow'"):
        load_pipeline(adapter="star", denoiser="flow")
    with pytest.raises(ValueError, match="adapter must be one of 'star' or the path of an adapter's .safetensors file"):
        load_pipeline(adapter="moon")


@needs_base
def test_load_pipeline_applies_an_adapter_file_and_refuses_one_for_another_base(tmp_path):
    pipe = load_pipeline()
    model = prepare_adapter(pipe.tokenizer, pipe.text_encoder, pipe.denoiser, "ti+lora", rank=2,
                            generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in lora_layers(model.denoiser).values():
            layer.lora_B.normal_(0, 0.01)
    base = {"denoiser": file_sha256(weights_path("denoiser")), "text_encoder": file_sha256(weights_path("clip"))}
    good = save_adapter(tmp_path / "good", tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder,
                        denoiser=pipe.denoiser, base_hashes=base)
    adapted = load_pipeline(adapter=good)
    assert adapted.tokenizer.token_to_id["star"] == pipe.tokenizer.token_to_id["star"]
    assert adapted.adapter_info["lora"]["rank"] == 2
    assert all(layer.merged for layer in lora_layers(adapted.denoiser).values())
    images = adapted("a large red star in the center", num_inference_steps=2, seed=0, progress=False)
    pipe.denoiser.eval()
    expected = pipe("a large red star in the center", num_inference_steps=2, seed=0, progress=False)
    assert torch.allclose(images, expected, atol=1e-4)  # merged or not, the same model
    other = save_adapter(tmp_path / "other", tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder,
                         denoiser=pipe.denoiser, base_hashes={**base, "denoiser": "ab" * 32})
    with pytest.raises(CheckpointError, match=f"sha256 abababababababab…, but this denoiser's file has sha256 "
                                              f"{base['denoiser'][:16]}…"):
        load_pipeline(adapter=other)
    with pytest.raises(CheckpointError, match="adapter file .* not found"):
        load_pipeline(adapter=tmp_path / "missing.safetensors")


@pytest.mark.skipif(not (SHIPPED_BASE and SHIPPED_ADAPTER), reason="the shipped star adapter is needed")
def test_the_shipped_star_adapter_loads_under_a_megabyte():
    pipe = load_pipeline(adapter="star")
    assert "star" in pipe.tokenizer.token_to_id and pipe.adapter_info["training"]["command"]
    size = sum((WEIGHTS_DIR / f"star_adapter{s}").stat().st_size for s in (".safetensors", ".json"))
    assert size <= 1_000_000
    images = pipe("a small green star in the top left", num_inference_steps=4, seed=0, progress=False)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


# ---- the command line ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["train", "adapter", "--method", "bogus"], "method must be one of ti, lora, dreambooth"),
    (["train", "adapter", "--concept", "moon"], "invalid choice: 'moon'"),
    (["train", "adapter", "--method", "ti", "--rank", "4"], "--rank is LoRA's rank; method 'ti' trains no LoRA"),
    (["train", "adapter", "--data", "somewhere"], "--data is not an option of 'train adapter'"),
    (["train", "vae", "--method", "lora"], "--method is for 'train adapter', not 'train vae'"),
    (["train", "clip", "--prior", "class"], "--prior is for 'train adapter', not 'train clip'"),
    (["train", "vae", "--augment", "mirror"], "--augment is for 'train adapter', not 'train vae'"),
    (["train", "denoiser", "--timesteps", "flow_matched"], "--timesteps is for 'train adapter', not 'train denoiser'"),
    (["train", "adapter", "--timesteps", "logit_normal"], "invalid choice: 'logit_normal'"),
    (["train", "adapter", "--rank", "0"], "expected a positive integer, got '0'"),
    (["generate", "a red star", "--adapter", "star", "--denoiser", "unet", "--out", "x.png"],
     "adapter='star' with denoiser='unet'"),
])
def test_bad_adapter_options_exit_2_with_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        code = cli(args)
        raise SystemExit(code)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.slow  # loads the shipped pipeline, draws the prior images and trains 2 steps
@needs_base
def test_train_adapter_command_writes_an_adapter_that_generate_uses(tmp_path, capsys):
    out = tmp_path / "star"
    assert cli(["train", "adapter", "--concept", "star", "--method", "ti+lora", "--rank", "2", "--steps", "2",
                "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "adapter (ti+lora, concept star): 2 steps" in printed and (out / "adapter.safetensors").is_file()
    record = json.loads((out / "adapter.json").read_text())
    assert record["lora"]["rank"] == 2 and record["tokens"] == ["star"]
    assert record["training"]["prior"] == "shapes" and record["training"]["num_prior"] == 256
    assert record["training"]["augment"] == "move+mirror" and record["training"]["prior_target"] == "base"
    assert record["training"]["prior_caption_dropout"] == 0.1 and record["training"]["prior_weight"] == 0.5
    assert record["training"]["timesteps"] == "flow_matched" and record["training"]["lr_schedule"] == "cosine"
    assert record["base"]["denoiser"] == file_sha256(weights_path("denoiser"))
    assert cli(["generate", "a large red star in the center", "--adapter", str(out / "adapter.safetensors"),
                "--steps", "2", "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").is_file()
