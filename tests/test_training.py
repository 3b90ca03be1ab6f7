"""The shared training loop: budgets, EMA, resumable checkpoints, the divergence guard; and the VAE recipe on it.

The checkpoint file format itself is tested in test_checkpoint.py."""

import json
import math

import pytest
import torch
import torch.nn as nn

from sdlearn.checkpoint import CheckpointError, load_checkpoint
from sdlearn.recipes import train_vae
from sdlearn.training import EMA, NonFiniteLossError, TrainResult, resolve_device, step_generator, train
from sdlearn.vae import VAEConfig

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
# The loop


def test_step_generator_is_a_pure_function_of_seed_and_step():
    draw = lambda seed, step: torch.randn(4, generator=step_generator(seed, step))  # noqa: E731
    assert torch.equal(draw(3, 7), draw(3, 7))  # a resumed run redraws exactly what it drew
    assert not torch.equal(draw(3, 7), draw(3, 8)) and not torch.equal(draw(3, 7), draw(4, 7))


def test_budget_is_required_and_respected():
    with pytest.raises(ValueError, match="budget"):
        run(make_model())
    result = run(make_model(), max_steps=7)
    assert isinstance(result, TrainResult) and result.record is None  # record: only train_all's summary
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


def test_non_finite_logged_metrics_do_not_break_checkpoints(tmp_path):
    def loss_with_odd_metric(model, batch, step):
        loss, _ = loss_fn(model, batch, step)
        return loss, {"ratio": float("inf")}

    result = train(make_model(), loss_with_odd_metric, batch_fn, max_steps=2, checkpoint_dir=tmp_path, progress=False)
    assert result.logs[0]["ratio"] == "inf" and load_checkpoint(tmp_path / "checkpoint")[1]["step"] == 2


# ------------------------------------------------------------------------------------------------
# The VAE recipe (sdlearn.recipes.train_vae) on the loop


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
