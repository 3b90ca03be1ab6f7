"""The shared training loop: budgets, EMA, checkpoints (atomic, validated, resumable), the divergence guard."""

import json
import math
import os

import pytest
import torch
import torch.nn as nn

from sdlearn import training
from sdlearn.training import (
    EMA,
    CheckpointError,
    NonFiniteLossError,
    checkpoint_paths,
    load_checkpoint,
    load_module_state,
    resolve_device,
    save_checkpoint,
    train,
    train_vae,
)
from sdlearn.vae import VAE, VAEConfig

TINY_VAE = VAEConfig(base_channels=8, channel_multipliers=(1, 2, 2), num_res_blocks=(0, 1, 1), norm_groups=4)


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 1))


def batch_fn(step):  # a pure function of the step, as resuming needs
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 4, generator=g)
    return {"x": x, "y": x.sum(dim=1, keepdim=True)}


def loss_fn(model, batch, step):
    noise = 0.01 * torch.randn(batch["y"].shape)  # global RNG, as dropout: restored on resume
    loss = (model(batch["x"]) - batch["y"] - noise).pow(2).mean()
    return loss, {"noise": noise.abs().mean().item()}


def run(model, **kwargs):
    kwargs = {"lr": 1e-2, "progress": False, "seed": 0, **kwargs}
    return train(model, loss_fn, batch_fn, **kwargs)


# ------------------------------------------------------------------------------------------------
# Checkpoint files


def test_save_load_round_trip(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b/c": torch.arange(5), "scalar": torch.tensor(2.5), "bytes": torch.zeros(3, dtype=torch.uint8)}
    written = save_checkpoint(tmp_path / "ckpt", tensors, {"kind": "test", "step": 7, "nested": {"x": [1, 2]}})
    assert written == tmp_path / "ckpt.safetensors" and (tmp_path / "ckpt.json").is_file()
    document = json.loads((tmp_path / "ckpt.json").read_text())
    assert document["format_version"] == training.FORMAT_VERSION
    assert document["tensors"]["a"] == {"dtype": "float32", "shape": [3, 4]}
    for path in (tmp_path / "ckpt", tmp_path / "ckpt.safetensors", tmp_path / "ckpt.json"):
        loaded, config = load_checkpoint(path)
        assert config == {"kind": "test", "step": 7, "nested": {"x": [1, 2]}}
        assert loaded.keys() == tensors.keys()
        assert all(torch.equal(loaded[k], tensors[k]) and loaded[k].dtype == tensors[k].dtype for k in tensors)
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_checkpoint_paths():
    assert checkpoint_paths("d/x") == checkpoint_paths("d/x.json") == checkpoint_paths("d/x.safetensors")
    assert [p.name for p in checkpoint_paths("d/vae")] == ["vae.safetensors", "vae.json"]


def test_interrupted_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    old = {"w": torch.ones(4)}
    save_checkpoint(tmp_path / "ckpt", old, {"step": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(*args, **kwargs):
        raise OSError("simulated power cut during the rename")

    monkeypatch.setattr(training.os, "replace", crash)  # dies after the temporary file is written
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path / "ckpt", {"w": torch.zeros(4)}, {"step": 2})
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files left, old bytes kept
    tensors, config = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(tensors["w"], old["w"]) and config == {"step": 1}


def test_interrupted_write_midway_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(4)}, {"step": 1})
    real_fsync = os.fsync

    def crash(fd):
        raise OSError("simulated crash before the data reached the disk")

    monkeypatch.setattr(training.os, "fsync", crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path / "ckpt", {"w": torch.zeros(4)}, {"step": 2})
    monkeypatch.setattr(training.os, "fsync", real_fsync)
    tensors, config = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(tensors["w"], torch.ones(4)) and config == {"step": 1}


def test_save_interrupted_between_the_two_files_still_loads_one_consistent_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(4)}, {"step": 1})
    real_replace, calls = os.replace, []

    def replace_then_crash(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the .safetensors was renamed; crash before the .json is
            raise OSError("simulated crash between the two renames")
        real_replace(src, dst)

    monkeypatch.setattr(training.os, "replace", replace_then_crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path / "ckpt", {"w": torch.zeros(4)}, {"step": 2})
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="another save"):
        tensors, config = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(tensors["w"], torch.zeros(4)) and config == {"step": 2}  # the new pair, consistent


def test_missing_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="nothing.safetensors.*not found"):
        load_checkpoint(tmp_path / "nothing")


def test_truncated_file_is_reported_with_its_name(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", {"w": torch.randn(100, 100)}, {})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"ckpt\.safetensors.*not a readable safetensors file"):
        load_checkpoint(path)


@pytest.mark.parametrize("garbage", [b"", b"hello, I am not a weights file\n", b"\xff" * 64])
def test_not_safetensors_is_reported_with_its_name(tmp_path, garbage):
    path = save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(2)}, {})
    path.write_bytes(garbage)
    with pytest.raises(CheckpointError, match=r"ckpt\.safetensors"):
        load_checkpoint(path)


def test_damaged_or_missing_json_falls_back_to_the_copy_in_the_weights_file(tmp_path):
    save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(2)}, {"step": 3})
    (tmp_path / "ckpt.json").write_text("{ not json")
    with pytest.warns(UserWarning, match="not valid JSON"):
        assert load_checkpoint(tmp_path / "ckpt")[1] == {"step": 3}
    (tmp_path / "ckpt.json").unlink()
    with pytest.warns(UserWarning, match="not found"):
        assert load_checkpoint(tmp_path / "ckpt")[1] == {"step": 3}


def test_foreign_safetensors_without_config_is_rejected(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="other.json.*not found"):
        load_checkpoint(tmp_path / "other")


def test_wrong_shapes_and_names_are_listed(tmp_path):
    small = VAE(VAEConfig(base_channels=8, num_res_blocks=1, norm_groups=4))
    path = save_checkpoint(tmp_path / "vae", small.state_dict(), {})
    tensors, _ = load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"vae\.safetensors.*wrong shape: decoder\.") as error:
        load_module_state(VAE(VAEConfig()), tensors, path)
    assert "expected [" in str(error.value)
    with pytest.raises(CheckpointError, match="missing: .*unexpected: "):
        load_module_state(VAE(TINY_VAE), tensors, path)


# ------------------------------------------------------------------------------------------------
# The loop


def test_budget_is_required_and_respected():
    with pytest.raises(ValueError, match="budget"):
        run(make_model())
    result = run(make_model(), max_steps=7)
    assert result.step == 7 and len(result.losses) == 7 and result.stopped_reason == "max_steps"
    result = run(make_model(), max_minutes=0)
    assert result.step == 0 and result.stopped_reason == "max_minutes"


def test_loss_falls_and_model_mode_is_restored():
    model = make_model().eval()
    result = run(model, max_steps=150, lr=3e-2)
    assert sum(result.losses[-10:]) / 10 < sum(result.losses[:10]) / 10 / 5
    assert not model.training
    assert result.logs[0]["step"] == 1 and "noise" in result.logs[0] and "lr" in result.logs[0]


def test_warmup_and_cosine_schedule():
    seen = []

    def record(model, batch, step):
        seen.append(opt.param_groups[0]["lr"])
        return loss_fn(model, batch, step)

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train(model, record, batch_fn, optimizer=opt, max_steps=10, warmup_steps=4, lr_schedule="cosine", progress=False)
    expected = [0.1 * min(1, (s + 1) / 4) * 0.5 * (1 + math.cos(math.pi * s / 10)) for s in range(10)]
    assert seen == pytest.approx(expected)


def test_ema_follows_its_formula():
    model = nn.Linear(2, 1)
    ema = EMA(model, decay=0.9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # first update: d = min(0.9, 1/10) = 0.1
    assert torch.allclose(ema.shadow["weight"], 0.1 * start["weight"] + 0.9 * model.weight)
    for _ in range(200):
        ema.update(model)
    assert ema.current_decay() == 0.9
    assert torch.allclose(ema.shadow["weight"], model.weight)  # converges to constant weights
    other = nn.Linear(2, 1)
    ema.copy_to(other)
    assert torch.allclose(other.weight, model.weight)
    with pytest.raises(ValueError):
        EMA(model, decay=1.0)


def test_resume_repeats_an_uninterrupted_run_exactly(tmp_path):
    straight = make_model()
    full = run(straight, max_steps=20, ema_decay=0.9)

    halves = make_model()
    first = run(halves, max_steps=10, ema_decay=0.9, checkpoint_dir=tmp_path, checkpoint_every=3)
    assert first.step == 10 and (tmp_path / "checkpoint.safetensors").is_file()
    resumed_model = make_model(seed=123)  # a fresh process: different weights and RNG until resumed
    torch.manual_seed(999)
    second = run(resumed_model, max_steps=20, ema_decay=0.9, checkpoint_dir=tmp_path, checkpoint_every=3)

    assert second.start_step == 10 and second.step == 20
    assert second.losses == full.losses
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[name], value), name
    for name, value in full.ema.shadow.items():
        assert torch.equal(second.ema.shadow[name], value), name


def test_resuming_with_another_config_is_refused(tmp_path):
    run(make_model(), max_steps=2, checkpoint_dir=tmp_path, config={"width": 16})
    with pytest.raises(CheckpointError, match="different config"):
        run(make_model(), max_steps=4, checkpoint_dir=tmp_path, config={"width": 32})
    assert run(make_model(), max_steps=4, checkpoint_dir=tmp_path, config={"width": 32}, resume=False).start_step == 0


@pytest.mark.parametrize("poison", ["loss", "grad"])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, poison):
    def poisoned(model, batch, step):
        loss, logs = loss_fn(model, batch, step)
        if step == 7:
            if poison == "loss":
                return loss * float("nan"), logs
            return loss + (model[0].weight * 0).abs().sqrt().sum(), logs  # finite loss, infinite gradient
        return loss, logs

    model = make_model()
    with pytest.raises(NonFiniteLossError, match="step 7.*step 5.*lower learning rate") as error:
        train(model, poisoned, batch_fn, lr=1e-2, max_steps=20, checkpoint_dir=tmp_path, checkpoint_every=5, progress=False)
    assert error.value.step == 7 and error.value.result.step == 7
    assert error.value.checkpoint == tmp_path / "checkpoint.safetensors"
    assert "checkpoint.safetensors" in str(error.value) and "step 5" in str(error.value)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step was not applied
    tensors, state = load_checkpoint(tmp_path / "checkpoint")
    assert state["step"] == 5 and all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("model/"))
    # ... and training can resume from it with a healthy loss.
    assert train(make_model(), loss_fn, batch_fn, lr=1e-2, max_steps=8, checkpoint_dir=tmp_path, progress=False).start_step == 5


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu please")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_train_vae_writes_loadable_weights_and_resumes(tmp_path):
    from sdlearn.pretrained import load_vae

    vae, result = train_vae(tmp_path, steps=3, device="cpu", batch_size=4, config=TINY_VAE, progress=False)
    assert result.step == 3 and (tmp_path / "vae_checkpoint.safetensors").is_file()
    info = json.loads((tmp_path / "vae.json").read_text())
    assert info["kind"] == "vae" and info["training"]["steps"] == 3 and "eval_psnr_db" in info["training"]
    assert info["model_config"]["scaling_factor"] == pytest.approx(vae.scaling_factor)
    loaded = load_vae(tmp_path)
    assert not loaded.training and loaded.config == vae.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), vae.state_dict().values()))
    _, more = train_vae(tmp_path, steps=5, device="cpu", batch_size=4, config=TINY_VAE, progress=False)
    assert more.start_step == 3 and more.step == 5


def test_load_vae_errors_name_the_file(tmp_path):
    from sdlearn.pretrained import load_vae

    with pytest.raises(CheckpointError, match="vae.safetensors.*not found"):
        load_vae(tmp_path)
    save_checkpoint(tmp_path / "vae", {"w": torch.ones(1)}, {"kind": "denoiser", "model_config": {}})
    with pytest.raises(CheckpointError, match="'denoiser' model, not a 'vae'"):
        load_vae(tmp_path / "vae.safetensors")
    small = VAE(TINY_VAE)
    config = TINY_VAE.to_dict()
    config["base_channels"] = 16
    save_checkpoint(tmp_path / "vae", small.state_dict(), {"kind": "vae", "model_config": config})
    with pytest.raises(CheckpointError, match=r"vae\.safetensors.*does not match VAE's configuration: wrong shape"):
        load_vae(tmp_path)


def test_train_vae_on_a_folder_of_images(tmp_path):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = torch.Generator().manual_seed(0)
    for i in range(3):
        pixels = torch.randint(0, 256, (40, 48, 3), generator=rng, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    vae, result = train_vae(tmp_path / "out", steps=2, data=folder, batch_size=2, config=TINY_VAE, progress=False)
    assert result.step == 2 and vae.training_info["eval_images"].startswith("3 training images")
    with pytest.raises(FileNotFoundError):
        train_vae(None, steps=1, data=tmp_path / "no such folder", config=TINY_VAE, progress=False)


def test_non_finite_logged_metrics_do_not_break_checkpoints(tmp_path):
    def loss_with_odd_metric(model, batch, step):
        loss, _ = loss_fn(model, batch, step)
        return loss, {"ratio": float("inf")}

    result = train(make_model(), loss_with_odd_metric, batch_fn, max_steps=2, checkpoint_dir=tmp_path, progress=False)
    assert result.logs[0]["ratio"] == "inf" and load_checkpoint(tmp_path / "checkpoint")[1]["step"] == 2
