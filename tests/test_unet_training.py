"""Training the course U-Net by the DiT's recipe (``python -m sdlearn train unet``), its float16 weights, and
drawing with it: ``load_pipeline(denoiser="unet")`` and ``python -m sdlearn generate --denoiser unet``.

One real run of two steps (the default 3.9M-parameter U-Net, the shipped VAE and text tower, the evaluation on two
prompts per split) is shared by the module; the folder it writes into also holds copies of the shipped ``vae.*``,
``clip.*`` and ``denoiser.*``, as ``sdlearn/weights/`` will once a U-Net ships."""

import functools
import json
import shutil
import warnings

import pytest
import torch

from sdlearn import checkpoint, recipes
from sdlearn.__main__ import TRAINERS, main
from sdlearn.checkpoint import CheckpointError, file_sha256, load_checkpoint
from sdlearn.denoiser import Denoiser, DenoiserConfig
from sdlearn.pretrained import WEIGHTS_DIR, load_pipeline, load_unet
from sdlearn.recipes import train_denoiser, train_unet
from sdlearn.unet import UNet, UNetConfig

STEPS = 2
FAST = {"batch_size": 8, "latent_window": 64, "latent_refresh": 4, "device": "cpu", "progress": False}


def copy_shipped(folder, names=("vae", "clip", "denoiser")):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        for suffix in (".safetensors", ".json"):
            shutil.copy(WEIGHTS_DIR / f"{name}{suffix}", folder / f"{name}{suffix}")
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(folder, unet, result)`` of ``train_unet(folder, steps=2)`` into a folder beside the shipped models."""
    folder = copy_shipped(tmp_path_factory.mktemp("weights"))
    torch.set_num_threads(1)
    unet, result = train_unet(folder, steps=STEPS, eval_images=2, **FAST)
    return folder, unet, result


# -- the recipe -------------------------------------------------------------------------------------------------


def test_train_unet_writes_float16_weights_with_the_dits_record(trained):
    folder, unet, result = trained
    assert isinstance(unet, UNet) and not unet.training and result.step == STEPS
    assert unet.config == UNetConfig()  # the course configuration: 3,919,876 parameters, text tokens 128 wide
    assert (folder / "unet_checkpoint.safetensors").is_file() and (folder / "unet_checkpoint.json").is_file()
    assert not (folder / "denoiser_checkpoint.safetensors").exists()  # the DiT's files are not touched
    assert (folder / "unet.safetensors").stat().st_size <= 8_000_000  # float16: 7.8 MB (float32 would be 15.7)
    tensors, info = load_checkpoint(folder / "unet.safetensors")
    assert info["kind"] == "unet" and info["prediction_type"] == "epsilon" and info["schedule"] == "scaled_linear"
    recorded = json.loads((folder / "unet.json").read_text())[checkpoint.HASH_KEY]
    assert recorded == file_sha256(folder / "unet.safetensors")
    assert all(v.dtype == torch.float16 for v in tensors.values() if v.is_floating_point())
    record = info["training"]
    assert record["steps"] == STEPS and record["batch_size"] == 8 and record["lr"] == 1e-3
    assert record["ema_decay"] == 0.999 and record["caption_dropout"] == 0.1
    assert record["vae"]["sha256"] == file_sha256(WEIGHTS_DIR / "vae.safetensors")
    assert len(record["losses"]) == STEPS and record["weights"].startswith("EMA")
    assert set(record["evaluation"]["prompt_accuracy"]) == {"train", "heldout", "two_objects"}
    assert info["text_encoder"]["sha256"] == file_sha256(WEIGHTS_DIR / "clip.safetensors")


def test_load_unet_gives_the_trained_ema_weights(trained):
    folder, unet, _ = trained
    loaded = load_unet(folder)
    assert loaded.schedule_name == "scaled_linear" and loaded.text_encoder_info == unet.text_encoder_info
    for name, value in unet.state_dict().items():  # EMA weights, rounded to float16 and back
        torch.testing.assert_close(loaded.state_dict()[name], value.half().float(), rtol=0, atol=0)
    assert any(not torch.equal(unet.raw_state_dict[k], v) for k, v in unet.state_dict().items())  # EMA ≠ raw


def test_train_denoiser_refuses_a_config_of_the_other_model_and_an_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="config must be a UNetConfig for denoiser='unet', got DenoiserConfig"):
        train_unet(tmp_path, steps=1, config=DenoiserConfig(), **FAST)
    with pytest.raises(ValueError, match="config must be a DenoiserConfig for denoiser='dit', got UNetConfig"):
        train_denoiser(tmp_path, steps=1, config=UNetConfig(), **FAST)
    with pytest.raises(ValueError, match="denoiser must be one of 'dit', 'unet', 'flow', got 'mlp'"):
        train_denoiser(tmp_path, steps=1, denoiser="mlp", **FAST)
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_a_unet_whose_latents_do_not_fit_the_vae_is_refused(tmp_path):
    with pytest.raises(ValueError, match="the U-Net reads 3 channels"):
        train_unet(tmp_path, steps=1, config=UNetConfig(in_channels=3, out_channels=3), **FAST)
    with pytest.raises(ValueError, match="reads cross_attention_dim = 64"):
        train_unet(tmp_path, steps=1, config=UNetConfig(cross_attention_dim=64), **FAST)


# -- drawing with it --------------------------------------------------------------------------------------------


def test_load_pipeline_picks_the_denoiser(trained):
    folder, unet, _ = trained
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # trained with the very text tower beside it: no warning
        pipe = load_pipeline(folder, denoiser="unet")
    assert isinstance(pipe.denoiser, UNet) and isinstance(load_pipeline(folder).denoiser, Denoiser)
    for name, value in unet.state_dict().items():
        assert torch.equal(pipe.denoiser.state_dict()[name], value.half().float())
    images = pipe(["a red circle", "a large blue square in the top left"], num_inference_steps=3, seed=0,
                  progress=False)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all() and images.abs().max() <= 1
    dit_images = load_pipeline(folder)(["a red circle", "a large blue square in the top left"],
                                       num_inference_steps=3, seed=0, progress=False)
    assert not torch.allclose(images, dit_images)
    edited = pipe.img2img("a red circle", images[:1], strength=0.5, num_inference_steps=4, seed=0, progress=False)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :16, :] = 1
    painted = pipe.inpaint("a red circle", images[:1], mask, num_inference_steps=3, seed=0, progress=False)
    assert edited.shape == painted.shape == (1, 3, 32, 32)
    assert torch.equal(painted[..., 16:, :], images[:1, :, 16:, :])  # the kept half is pasted back


def test_a_folder_without_a_unet_says_how_to_train_one(tmp_path, monkeypatch):
    folder = copy_shipped(tmp_path / "weights")
    with pytest.raises(CheckpointError, match=r"holds no U-Net .*unet\.safetensors' not found.*python -m sdlearn train unet"):
        load_pipeline(folder, denoiser="unet")
    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", folder)  # shipped weights without a U-Net
    with pytest.raises(CheckpointError, match="the shipped weights hold no U-Net .*python -m sdlearn train unet"):
        load_pipeline(denoiser="unet")
    with pytest.raises(ValueError, match="denoiser must be one of 'dit', 'unet'.*got 'UNet'"):
        load_pipeline(folder, denoiser="UNet")


# -- the command line -------------------------------------------------------------------------------------------


def test_generate_denoiser_unet(trained, tmp_path, capsys):
    folder, _, _ = trained
    out = tmp_path / "grid.png"
    assert main(["generate", "a red circle", "--denoiser", "unet", "--weights", str(folder), "--steps", "2",
                 "--n", "2", "--out-dir", str(tmp_path / "images"), "--out", str(out)]) == 0
    assert out.is_file() and sorted(p.name for p in (tmp_path / "images").iterdir()) == ["000.png", "001.png"]
    capsys.readouterr()  # the progress bar
    empty = copy_shipped(tmp_path / "no_unet")
    assert main(["generate", "a red circle", "--denoiser", "unet", "--weights", str(empty), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and "python -m sdlearn train unet" in err[0]
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "a red circle", "--denoiser", "transformer", "--out", str(out)])
    assert exit_.value.code == 2 and "invalid choice: 'transformer'" in capsys.readouterr().err


def test_train_unet_on_the_command_line(tmp_path, monkeypatch, capsys):
    assert TRAINERS["unet"] is recipes.train_unet and TRAINERS["denoiser"] is recipes.train_denoiser
    # the real recipe, with a small batch and no evaluation (the CLI's own budget would draw 768 images at the end)
    monkeypatch.setitem(TRAINERS, "unet", functools.partial(train_unet, batch_size=4, latent_window=32,
                                                            latent_refresh=4, eval_images=0, progress=False))
    out = tmp_path / "run"
    assert main(["train", "unet", "--steps", "1", "--out", str(out), "--device", "cpu",
                 "--prediction-type", "v_prediction"]) == 0
    info = json.loads((out / "unet.json").read_text())
    assert info["kind"] == "unet" and info["prediction_type"] == "v_prediction" and info["training"]["steps"] == 1
    assert main(["train", "unet", "--data", str(tmp_path), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not 'train unet'" in err[0] and "train all --data FOLDER" in err[0]


def test_capture_attention_refuses_a_unet_instead_of_recording_nothing():
    from sdlearn.denoiser import capture_attention
    from sdlearn.unet import UNet, UNetConfig

    with pytest.raises(ValueError, match="UNet has none"):
        with capture_attention(UNet(UNetConfig(block_out_channels=(32, 64), norm_num_groups=8))):
            pass
