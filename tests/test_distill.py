"""The few-step student (sdlearn.distill, sdlearn.distill_recipes, load_pipeline(denoiser="fast"), the CLI)."""

from __future__ import annotations

import copy
import json
import shutil
import warnings

import pytest
import torch

from sdlearn import checkpoint
from sdlearn.__main__ import build_parser, main
from sdlearn.checkpoint import weights_path
from sdlearn.denoiser import Denoiser, DenoiserConfig
from sdlearn.distill import (
    ConsistencySampler,
    ConsistencyStudent,
    StudentConfig,
    consistency_distillation_loss,
    consistency_scalings,
    consistency_timesteps,
    grid_timesteps,
    update_target,
)
from sdlearn.pipeline import check_compatible
from sdlearn.pretrained import FastPipeline, load_pipeline, load_student, save_student
from sdlearn.samplers import sample
from sdlearn.schedules import NoiseSchedule

SCHEDULE = NoiseSchedule.from_name("scaled_linear")


def tiny_config(text_dim: int = 16) -> DenoiserConfig:
    return DenoiserConfig(width=32, depth=1, heads=2, text_dim=text_dim, frequency_dim=32)


def tiny_teacher(text_dim: int = 16, seed: int = 0) -> Denoiser:
    """A tiny DiT with random weights everywhere (the zero-initialised final layer too, so that ε̂ ≠ 0)."""
    torch.manual_seed(seed)
    teacher = Denoiser(tiny_config(text_dim))
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_(0, 0.05)
    return teacher.eval().requires_grad_(False)


def text(batch: int, length: int = 5, dim: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, dim, generator=g), torch.ones(batch, length, dtype=torch.bool)


# ----------------------------------------------------------------------------------------------------------
# The parameterisation


def test_boundary_condition_and_scalings():
    c_skip, c_out = consistency_scalings(torch.tensor([0, 19, 999]))
    assert c_skip[0] == 1 and c_out[0] == 0
    torch.testing.assert_close(c_skip**2 + c_out**2, torch.ones(3))
    assert c_skip[1] < 1e-5  # from the grid's first timestep on, f is the network's x̂₀
    student = ConsistencyStudent.from_teacher(tiny_teacher())
    x = torch.randn(3, 4, 8, 8)
    tokens, mask = text(3)
    assert torch.equal(student(x, 0, tokens, mask), x)  # f(x, t_min) = x exactly
    assert torch.equal(student(x, torch.zeros(3, dtype=torch.long), tokens, mask), x)


def test_student_starts_as_the_teachers_x0():
    teacher = tiny_teacher()
    student = ConsistencyStudent.from_teacher(teacher)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 999])
    tokens, mask = text(2)
    alpha = SCHEDULE.alphas_cumprod[t].view(2, 1, 1, 1)
    x0 = (x - (1 - alpha).sqrt() * teacher(x, t, tokens, mask)) / alpha.sqrt()
    torch.testing.assert_close(student(x, t, tokens, mask), x0, atol=1e-5, rtol=1e-5)
    # as a denoiser, the student predicts x₀ and fits the pipeline's checks like the teacher
    assert student.config.prediction_type == "sample"
    with pytest.raises(ValueError, match="whole-number"):
        student(x, 0.5, tokens, mask)


def test_config_round_trip_and_bad_values():
    config = StudentConfig(denoiser=tiny_config(), guidance_scale=3.0, distilled_steps=[4, 1, 2])
    again = StudentConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.distilled_steps == (1, 2, 4)
    assert again.latent_size == 8 and again.num_train_timesteps == 1000
    with pytest.raises(ValueError, match="grid_steps"):
        StudentConfig(denoiser=tiny_config(), grid_steps=33)
    with pytest.raises(ValueError, match="distilled_steps"):
        StudentConfig(denoiser=tiny_config(), distilled_steps=[0])
    with pytest.raises(ValueError, match="flow"):
        StudentConfig(denoiser=DenoiserConfig(prediction_type="flow"))


# ----------------------------------------------------------------------------------------------------------
# The sampler


def test_grid_and_lcm_timesteps():
    grid = grid_timesteps(1000, 50)
    assert grid[0] == 19 and grid[-1] == 999 and len(grid) == 50
    assert consistency_timesteps(4).tolist() == [999, 759, 519, 279]
    assert consistency_timesteps(2).tolist() == [999, 499]
    assert consistency_timesteps(1).tolist() == [999]


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sampler_interface_on_distilled_steps(steps):
    sampler = ConsistencySampler(SCHEDULE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for a distilled step count
        sampler.set_timesteps(steps)
    assert sampler.timesteps.tolist() == consistency_timesteps(steps).tolist()
    assert sampler.init_noise_sigma == 1.0
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(sampler.scale_model_input(x, sampler.timesteps[0]), x)
    target = torch.full((2, 4, 8, 8), 0.25)
    calls = []

    def model_fn(x_t, t):  # an exact "consistency function" for data that is always `target`
        calls.append(int(t))
        return target

    out = sample(model_fn, ConsistencySampler(SCHEDULE), (2, 4, 8, 8), steps, generator=torch.Generator().manual_seed(0),
                 progress=False)
    assert calls == consistency_timesteps(steps).tolist()
    assert torch.equal(out, target)  # the last step returns x̂₀ itself


def test_sampler_step_renoises_to_the_next_timestep():
    sampler = ConsistencySampler(SCHEDULE)
    sampler.set_timesteps(2)
    x0, x = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    out = sampler.step(x0, 999, x, generator=torch.Generator().manual_seed(3))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    a = SCHEDULE.alphas_cumprod[499]
    torch.testing.assert_close(out, a.sqrt() * x0 + (1 - a).sqrt() * z)
    assert torch.equal(sampler.last_x0, x0)
    assert torch.equal(sampler.add_noise(x0, z, 499), SCHEDULE.add_noise(x0, z, 499))


def test_other_step_counts_warn_and_still_sample():
    sampler = ConsistencySampler(SCHEDULE)
    with pytest.warns(UserWarning, match="distilled for 1, 2, 4 steps, not 3"):
        sampler.set_timesteps(3)
    assert len(sampler.timesteps) == 3
    with pytest.raises(ValueError, match="num_inference_steps"):
        sampler.set_timesteps(0)
    with pytest.raises(ValueError, match="trailing"):
        sampler.set_timesteps(4, spacing="leading")


# ----------------------------------------------------------------------------------------------------------
# The loss


def test_loss_is_finite_and_decreases_on_a_tiny_model():
    teacher = tiny_teacher()
    student = ConsistencyStudent.from_teacher(teacher, guidance_scale=2.0).requires_grad_(True)
    target = copy.deepcopy(student).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(16, 4, 8, 8, generator=g), torch.randn(16, 4, 8, 8, generator=g)
    index = torch.randint(50, (16,), generator=g)
    tokens, mask = text(16)
    mask[:, 3:] = False  # padded captions
    uncond, uncond_mask = text(1, length=2, seed=5)
    optimizer = torch.optim.Adam(student.parameters(), lr=5e-4)
    losses = []
    for _ in range(20):
        update_target(target, student, 0.95)
        loss, logs = consistency_distillation_loss(student, target, teacher, x0, tokens, mask, uncond_tokens=uncond,
                                                   uncond_mask=uncond_mask, noise=noise, index=index)
        assert torch.isfinite(loss) and set(logs) == {"loss", "mse"}
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    for p in teacher.parameters():
        assert p.grad is None  # the teacher is never trained


def test_loss_target_at_the_boundary_is_the_teachers_ddim_step():
    """At grid entry 0 the target is f(x̂_{t'}, 0) = x̂_{t'}: the teacher's guided DDIM step to the clean end, i.e. its
    guided x̂₀; a perfect student predicting exactly that has loss 0."""
    teacher = tiny_teacher()
    student = ConsistencyStudent.from_teacher(teacher, guidance_scale=3.0)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    tokens, mask = text(2)
    uncond, uncond_mask = text(1, length=2, seed=5)
    t = torch.tensor([19, 19])
    a = SCHEDULE.alphas_cumprod[19]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    eps_u = teacher(x_t, t, uncond.expand(2, -1, -1), uncond_mask.expand(2, -1))
    eps_c = teacher(x_t, t, tokens, mask)
    eps = eps_u + 3.0 * (eps_c - eps_u)
    expected = (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    class Perfect(torch.nn.Module):
        config = student.config

        def forward(self, x, t, *args):
            return expected

    loss, _ = consistency_distillation_loss(Perfect(), student, teacher, x0, tokens, mask, uncond_tokens=uncond,
                                            uncond_mask=uncond_mask, noise=noise, index=torch.tensor([0, 0]))
    assert loss.item() < 1e-6


# ----------------------------------------------------------------------------------------------------------
# Files and the pipeline


def test_save_load_round_trip(tmp_path):
    student = ConsistencyStudent.from_teacher(tiny_teacher())
    path = save_student(student, tmp_path / "student", training={"note": "test"}, dtype=torch.float32)
    loaded = load_student(tmp_path)
    assert loaded.config == student.config and not loaded.training
    x, tokens_mask = torch.randn(2, 4, 8, 8), text(2)
    assert torch.equal(loaded(x, 759, *tokens_mask), student(x, 759, *tokens_mask))
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["kind"] == "student" and info["distilled_steps"] == [1, 2, 4] and info["prediction_type"] == "sample"
    with pytest.raises(ValueError, match="ConsistencyStudent"):
        save_student(tiny_teacher(), tmp_path / "teacher")


def test_default_student_file_fits_in_8_mb(tmp_path):
    student = ConsistencyStudent(StudentConfig())  # the shipped DiT's architecture
    path = save_student(student, tmp_path / "student")
    assert path.stat().st_size + path.with_suffix(".json").stat().st_size <= 8_000_000


def test_load_pipeline_fast_without_a_student(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="python -m sdlearn train distill"):
        load_pipeline(tmp_path, denoiser="fast")
    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", tmp_path)  # shipped weights without a student
    with pytest.raises(FileNotFoundError, match="the shipped weights hold no few-step student.*train distill"):
        load_pipeline(denoiser="fast")


@pytest.fixture
def fast_folder(tmp_path):
    """A weights folder: the shipped VAE and text tower, and a tiny random student that reads them."""
    for name in ("vae", "clip"):
        for suffix in (".safetensors", ".json"):
            shutil.copy(weights_path(name).with_suffix(suffix), tmp_path / f"{name}{suffix}")
    teacher = tiny_teacher(text_dim=128)
    save_student(ConsistencyStudent.from_teacher(teacher), tmp_path / "student")
    return tmp_path


def test_load_pipeline_fast(fast_folder):
    pipe = load_pipeline(fast_folder, denoiser="fast")
    assert isinstance(pipe, FastPipeline) and isinstance(pipe.denoiser, ConsistencyStudent)
    check_compatible(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.denoiser.config, pipe.schedule)
    steps = []
    images = pipe("a red circle", seed=0, progress=False, callback=lambda i, t, x, x0: steps.append(int(t)))
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    assert steps == [999, 759, 519, 279]  # 4 consistency steps by default
    again = pipe("a red circle", seed=0, progress=False, guidance_scale=1)
    assert torch.equal(images, again)
    with pytest.raises(ValueError, match="distilled in"):
        pipe("a red circle", guidance_scale=4.0, progress=False)
    with pytest.warns(UserWarning, match="not 3"):
        assert pipe("a red circle", num_inference_steps=3, seed=0, progress=False).shape == (1, 3, 32, 32)
    assert pipe.img2img("a red circle", images, strength=0.5, seed=0, progress=False).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="adapter"):
        load_pipeline(fast_folder, denoiser="fast", adapter="star")


def test_load_pipeline_fast_from_a_folder_holding_the_student_alone(tmp_path):
    """What `train distill --out DIR` writes (student.* only) loads with the shipped VAE and text tower."""
    save_student(ConsistencyStudent.from_teacher(tiny_teacher(text_dim=128)), tmp_path / "student")
    pipe = load_pipeline(tmp_path, denoiser="fast")
    assert pipe.vae.training_info == load_pipeline().vae.training_info
    assert pipe("a red circle", num_inference_steps=1, seed=0, progress=False).shape == (1, 3, 32, 32)


# ----------------------------------------------------------------------------------------------------------
# The command line


def test_cli_parses_train_distill_and_generate_fast():
    args = build_parser().parse_args(["train", "distill", "--minutes", "2", "--steps", "5", "--out", "x", "--threads", "1"])
    assert (args.model, args.minutes, args.steps, args.out, args.threads) == ("distill", 2.0, 5, "x", 1)
    args = build_parser().parse_args(["generate", "a red circle", "--denoiser", "fast"])
    assert args.denoiser == "fast" and args.steps is None


def test_cli_generate_fast(fast_folder, capsys):
    out = fast_folder / "grid.png"
    assert main(["generate", "a red circle", "--denoiser", "fast", "--weights", str(fast_folder), "--out", str(out)]) == 0
    assert out.is_file()
    capsys.readouterr()  # the first run's progress bar
    assert main(["generate", "a red circle", "--denoiser", "fast", "--weights", str(fast_folder), "--guidance", "4",
                 "--out", str(fast_folder / "no.png")]) == 2
    err = capsys.readouterr().err
    assert "distilled in" in err and len(err.strip().splitlines()) == 1 and not (fast_folder / "no.png").exists()


def test_cli_generate_fast_without_a_student(tmp_path, capsys):
    assert main(["generate", "a red circle", "--denoiser", "fast", "--weights", str(tmp_path), "--out",
                 str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "python -m sdlearn train distill" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_train_distill_writes_a_loadable_student(tmp_path):
    from sdlearn.distill_recipes import train_distill

    student, result = train_distill(tmp_path, steps=2, device="cpu", batch_size=4, eval_images=0, latent_window=32,
                                    latent_refresh=4, progress=False)
    assert result.step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    loaded = load_student(tmp_path)
    assert loaded.config.distilled_steps == (1, 2, 4) and loaded.training_info["steps"] == 2
    assert (tmp_path / "student_checkpoint.safetensors").is_file()
    # resuming a finished run trains no more steps and gives the same student
    again, result = train_distill(tmp_path, steps=2, device="cpu", batch_size=4, eval_images=0, latent_window=32,
                                  latent_refresh=4, progress=False)
    assert result.step == 2
    for (name, a), (_, b) in zip(student.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_loss_curve_stays_short():
    from sdlearn.distill_recipes import loss_curve

    assert loss_curve([1.0, 2.0, 3.0]) == {"losses": [1.0, 2.0, 3.0], "losses_every": 1}
    curve = loss_curve([1.0] * 6095 + [3.0], points=500)
    assert curve["losses_every"] == 13 and len(curve["losses"]) <= 500 and curve["losses"][0] == 1.0
