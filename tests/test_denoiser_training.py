"""Training the denoiser on VAE latents of Shapes: the batches (scenes, captions that leave attributes open),
caption dropout, resume, the float16 weights."""

import hashlib
import itertools
import warnings

import pytest
import torch

from sdlearn import recipes
from sdlearn.checkpoint import load_checkpoint
from sdlearn.data import (
    ATTRIBUTE_VALUES,
    ATTRIBUTES,
    COLORS,
    HELDOUT_PAIRS,
    MAX_CAPTION_WORDS,
    SHAPES,
    check_scene_objects,
    parse_caption,
)
from sdlearn.denoiser import Denoiser, DenoiserConfig, denoiser_loss
from sdlearn.pipeline import LatentDiffusionPipeline
from sdlearn.pretrained import WEIGHTS_DIR, load_denoiser, save_denoiser
from sdlearn.recipes import generate_for_eval, latent_batch_fn, train_denoiser
from sdlearn.schedules import NoiseSchedule
from sdlearn.text import TextEncoder, TextEncoderConfig, Tokenizer
from sdlearn.training import train
from sdlearn.vae import VAE, VAEConfig

TINY_VAE = VAEConfig(base_channels=8, channel_multipliers=(1, 2, 2), num_res_blocks=(0, 1, 1), norm_groups=4)
TINY_TEXT = TextEncoderConfig(width=16, depth=1, heads=2)
SCHEDULE = NoiseSchedule.from_name("scaled_linear")


def tiny_config(**kwargs):
    return DenoiserConfig(**{"width": 32, "depth": 1, "heads": 2, "text_dim": 16, "frequency_dim": 32, **kwargs})


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return VAE(TINY_VAE).eval()


@pytest.fixture(scope="module")
def text_encoder():
    torch.manual_seed(1)
    return TextEncoder(TINY_TEXT).eval()


def tiny_run(out_dir, steps, vae, text_encoder=None, **kwargs):
    config = tiny_config(text_dim=text_encoder.width if text_encoder is not None else 16)
    kwargs = {"batch_size": 8, "lr": 1e-3, "progress": False, "eval_images": 0, "latent_window": 64,
              "latent_refresh": 4, "config": config, "device": "cpu", **kwargs}
    return train_denoiser(out_dir, steps=steps, vae=vae, text_encoder=text_encoder, **kwargs)


# -- the batches ------------------------------------------------------------------------------------------------


def test_the_denoisers_data_is_one_function_wherever_it_is_imported_from():
    from sdlearn import denoiser_data, distill_recipes

    # notebooks 05, 10 and 11 import it from recipes; train_denoiser and the student's recipe use the same one
    assert recipes.latent_batch_fn is denoiser_data.latent_batch_fn is distill_recipes.latent_batch_fn


def test_batches_are_scaled_latents_with_matching_captions(vae, text_encoder):
    batch_fn = latent_batch_fn(vae, SCHEDULE, 64, seed=0, text_encoder=text_encoder, tokenizer=Tokenizer(),
                                caption_dropout=0.0, window=128, refresh=8)
    batch = batch_fn(0)
    assert batch["x0"].shape == batch["noise"].shape == (64, 4, 8, 8)
    assert batch["t"].shape == (64,) and 0 <= batch["t"].min() and batch["t"].max() < 1000
    assert batch["tokens"].shape[0] == 64 and batch["tokens"].shape[1] <= 21
    # each caption is true of the scene whose latent sits beside it (fresh wording; some attributes left open)
    window = batch_fn.window
    picks = torch.randint(128, (64,), generator=torch.Generator().manual_seed(0))  # the batch function's first draw
    scaled_mean = window.mean[picks] * vae.scaling_factor
    assert torch.allclose(batch["x0"], scaled_mean, atol=5 * vae.scaling_factor * window.std[picks].max().item())
    names = [parse_caption(c) for c in batch["captions"]]
    values = [list(COLORS), list(SHAPES), ["small", "large"], ["top left", "top right", "bottom left", "bottom right", "center"]]
    keys = ("color", "shape", "size", "position")
    counts = set()
    for rows, said in zip(window.objects[picks].tolist(), names):
        objects = [{k: values[a][i] for a, (k, i) in enumerate(zip(keys, row))} for row in rows if row[0] >= 0]
        said = said["objects"] if "objects" in said else [said]
        counts.add(len(objects))
        assert len(said) == len(objects)
        assert any(all(o.items() >= s.items() for o, s in zip(order, said)) for order in (objects, objects[::-1]))
    assert counts == {1, 2}  # scenes of one and of two objects
    # the training split never shows a held-out (colour, shape) pair, in any object
    seen = {(list(COLORS)[c], SHAPES[s]) for rows in window.objects.tolist() for c, s, *_ in rows if c >= 0}
    assert not seen & set(HELDOUT_PAIRS)


def test_batches_are_a_function_of_the_step_so_a_resumed_window_matches(vae):
    stepped = latent_batch_fn(vae, SCHEDULE, 16, seed=3, window=32, refresh=4)
    for step in range(6):
        last = stepped(step)  # slides the window 4 images per step
    fresh = latent_batch_fn(vae, SCHEDULE, 16, seed=3, window=32, refresh=4)(5)  # builds step 5's window at once
    for key in ("x0", "noise", "t"):
        assert torch.equal(last[key], fresh[key])
    assert not torch.equal(stepped(6)["x0"], last["x0"])


def test_caption_dropout_replaces_about_ten_percent_by_the_empty_prompt(vae, text_encoder):
    batch_fn = latent_batch_fn(vae, SCHEDULE, 512, seed=0, text_encoder=text_encoder, tokenizer=Tokenizer(),
                                caption_dropout=0.1, window=64, refresh=4)
    empty = 0
    for step in range(4):
        batch = batch_fn(step)
        dropped = [c == "" for c in batch["captions"]]
        empty += sum(dropped)
        real_tokens = batch["mask"].sum(dim=1)
        assert (real_tokens[torch.tensor(dropped)] == 2).all()  # "" is <bos> <eos>
        assert (real_tokens[~torch.tensor(dropped)] >= 3).all()  # at least one word ("shape")
    assert 150 <= empty <= 260  # 2,048 draws at p = 0.1: 205 ± 14
    none_dropped = latent_batch_fn(vae, SCHEDULE, 512, seed=0, text_encoder=text_encoder, tokenizer=Tokenizer(),
                                    caption_dropout=0.0, window=64, refresh=4)(0)
    assert "" not in none_dropped["captions"]


# -- scenes and open captions in the window (issue 13) ---------------------------------------------------------


def scene_of(row: list[list[int]]) -> list[dict]:
    """A window row of object indices [2, 4] (-1: no object) → the scene's attribute dicts."""
    return [{k: ATTRIBUTE_VALUES[k][i] for k, i in zip(ATTRIBUTES, obj)} for obj in row if obj[0] >= 0]


def named_of(caption: str) -> list[dict]:
    parsed = parse_caption(caption)
    return parsed["objects"] if "objects" in parsed else [parsed]


def true_of(named: list[dict], objects: list[dict]) -> bool:
    return len(named) == len(objects) and any(
        all(o[k] == v for n, o in zip(named, order) for k, v in n.items())
        for order in itertools.permutations(objects))


def test_the_window_holds_scenes_and_each_caption_is_true_of_its_scene(vae, text_encoder):
    batch_fn = latent_batch_fn(vae, SCHEDULE, 128, seed=0, text_encoder=text_encoder, tokenizer=Tokenizer(),
                                caption_dropout=0.0, window=128, refresh=8)
    batch = batch_fn(0)
    window = batch_fn.window
    assert window.objects.shape == (128, 2, 4) and window.objects.dtype == torch.long
    scenes = [scene_of(row) for row in window.objects.tolist()]
    assert {len(s) for s in scenes} == {1, 2}  # one and two objects, mixed
    for scene in scenes:
        check_scene_objects(scene)  # two objects: two colours, two corners
    pairs = {(o["color"], o["shape"]) for s in scenes for o in s}
    assert not pairs & set(HELDOUT_PAIRS)  # split "train", in any object
    assert (window.objects[:, 1] == -1).all(dim=1).equal((window.objects[:, 1] < 0).any(dim=1))  # a whole object or none

    picks = torch.randint(128, (128,), generator=torch.Generator().manual_seed(0))  # the batch function's first draw
    assert torch.allclose(batch["x0"], window.mean[picks] * vae.scaling_factor,
                          atol=5 * vae.scaling_factor * window.std[picks].max().item())
    open_captions = 0
    for caption, p in zip(batch["captions"], picks.tolist()):
        named = named_of(caption)
        assert true_of(named, scenes[p]), (caption, scenes[p])
        open_captions += any(len(o) < 4 for o in named)
    assert 30 < open_captions < 100  # open_fraction = 0.5 by default
    assert batch["tokens"].shape[:2] == batch["mask"].shape and batch["tokens"].shape[1] <= MAX_CAPTION_WORDS + 2
    assert batch["tokens"].shape[2] == 16


def test_open_fraction_zero_names_everything_and_one_object_windows_have_no_second(vae, text_encoder):
    full = latent_batch_fn(vae, SCHEDULE, 64, seed=1, text_encoder=text_encoder, tokenizer=Tokenizer(),
                           caption_dropout=0.0, open_fraction=0.0, window=64, refresh=4)
    batch = full(0)
    scenes = [scene_of(row) for row in full.window.objects.tolist()]
    for caption in batch["captions"]:
        named = named_of(caption)
        assert all(len(o) == 4 for o in named), caption
        assert any(true_of(named, s) for s in scenes)
    single = latent_batch_fn(vae, SCHEDULE, 16, seed=0, text_encoder=text_encoder, tokenizer=Tokenizer(),
                             caption_dropout=0.0, window=32, refresh=4, num_objects=1)
    captions = single(0)["captions"]
    assert (single.window.objects[:, 1] == -1).all() and (single.window.objects[:, 0] >= 0).all()
    assert all(len(named_of(c)) == 1 for c in captions)


# -- the loss and the loop ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_falls_on_a_fixed_batch(vae, text_encoder, prediction_type):
    batch = latent_batch_fn(vae, SCHEDULE, 32, seed=0, text_encoder=text_encoder, tokenizer=Tokenizer(),
                             window=64, refresh=4)(0)
    torch.manual_seed(0)
    model = Denoiser(tiny_config(prediction_type=prediction_type))
    with torch.no_grad():
        first = denoiser_loss(model, batch, SCHEDULE)[0].item()
    result = train(model, lambda m, b, s: denoiser_loss(m, b, SCHEDULE), lambda step: batch,
                   lr=3e-3, max_steps=250, progress=False)
    assert result.losses[0] == pytest.approx(first)
    assert result.final_loss < 0.3 * first, (result.final_loss, first)


def test_denoiser_loss_returns_the_loss_and_empty_logs_like_every_loss(vae, text_encoder):
    batch = latent_batch_fn(vae, SCHEDULE, 8, seed=0, text_encoder=text_encoder, tokenizer=Tokenizer(),
                            window=64, refresh=4)(0)
    torch.manual_seed(0)
    model = randomised(tiny_config())
    out = denoiser_loss(model, batch, SCHEDULE)
    assert isinstance(out, tuple) and len(out) == 2
    loss, logs = out
    assert logs == {}
    assert loss.dim() == 0 and loss.requires_grad and torch.isfinite(loss)
    x_t = SCHEDULE.add_noise(batch["x0"], batch["noise"], batch["t"])  # L_simple, by hand: ‖ε − ε̂(x_t, t, text)‖²
    expected = (model(x_t, batch["t"], batch["tokens"], batch["mask"]) - batch["noise"]).pow(2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_batch_weight_weights_each_samples_squared_error(vae, text_encoder):
    batch = latent_batch_fn(vae, SCHEDULE, 8, seed=0, text_encoder=text_encoder, tokenizer=Tokenizer(),
                            window=64, refresh=4)(0)
    torch.manual_seed(0)
    model = randomised(tiny_config())
    with torch.no_grad():
        plain = denoiser_loss(model, batch, SCHEDULE)[0]
        assert denoiser_loss(model, {**batch, "weight": torch.ones(8)}, SCHEDULE)[0].item() == pytest.approx(plain.item(), rel=1e-6)
        x_t = SCHEDULE.add_noise(batch["x0"], batch["noise"], batch["t"])
        errors = (model(x_t, batch["t"], batch["tokens"], batch["mask"]) - batch["noise"]).pow(2).flatten(1).mean(1)
        weight = torch.zeros(8)
        weight[3] = 2.0
        assert denoiser_loss(model, {**batch, "weight": weight}, SCHEDULE)[0].item() == pytest.approx(2 * errors[3].item() / 8, rel=1e-5)


def test_flow_matched_batches_carry_flow_noise_levels_and_weights(vae, text_encoder, tmp_path):
    batch = latent_batch_fn(vae, SCHEDULE, 512, seed=0, window=64, refresh=4, timesteps="flow_matched")(0)
    t, weight = batch["t"], batch["weight"]
    assert t.dtype == torch.long and weight.shape == (512,) and bool((weight > 0).all())
    log_snr = SCHEDULE.log_snr(t)
    assert abs(log_snr.median().item()) < 0.4  # log SNR ~ N(0, 4): centred on SNR 1
    assert 1.6 < log_snr.std().item() < 2.4
    assert latent_batch_fn(vae, SCHEDULE, 8, seed=0, window=64, refresh=4)(0).get("weight") is None  # uniform: none
    with pytest.raises(ValueError, match="'uniform' or 'flow_matched'"):
        latent_batch_fn(vae, SCHEDULE, 8, seed=0, window=64, refresh=4, timesteps="cosine")
    for bad in ({"timesteps": "logit_normal"}, {"timesteps": "flow_matched", "prediction_type": "flow", "denoiser": "flow"},
                {"timesteps": "sometimes"}):
        with pytest.raises(ValueError, match="timesteps must be"):
            tiny_run(tmp_path / "bad", 1, vae, text_encoder, **bad)
    with pytest.raises(ValueError, match="shared_open"):
        tiny_run(tmp_path / "bad", 1, vae, text_encoder, shared_open=1.5)
    with pytest.raises(ValueError, match="binding_fraction"):
        tiny_run(tmp_path / "bad", 1, vae, text_encoder, binding_fraction=-0.1)
    _, result = tiny_run(tmp_path / "run", 3, vae, text_encoder, timesteps="flow_matched", shared_open=0.5,
                         binding_fraction=0.25)
    saved = load_checkpoint(tmp_path / "run" / "denoiser.safetensors")[1]["training"]
    assert saved["timesteps"] == "flow_matched" and saved["shared_open"] == 0.5 and saved["binding_fraction"] == 0.25


def test_the_dits_defaults_are_the_shipped_recipe_and_the_unet_keeps_the_earlier_one(vae, text_encoder, tmp_path):
    dit, result = tiny_run(tmp_path / "dit", 1, vae, text_encoder, config=None)
    assert dit.config.mlp_conv  # the Mix-FFN DiT
    saved = load_checkpoint(tmp_path / "dit" / "denoiser.safetensors")[1]["training"]
    assert {k: saved[k] for k in recipes.DIT_CAPTIONS} == recipes.DIT_CAPTIONS == \
        {"open_fraction": 0.75, "shared_open": 1.0, "binding_fraction": 0.5}
    assert saved["timesteps"] == "flow_matched"
    _, result = tiny_run(tmp_path / "v", 1, vae, text_encoder, prediction_type="v_prediction",
                         config=tiny_config(text_dim=text_encoder.width, prediction_type="v_prediction"))
    saved = load_checkpoint(tmp_path / "v" / "denoiser.safetensors")[1]["training"]
    assert saved.get("timesteps", "uniform") == "uniform"  # the flow-matched weight is an ε-loss's
    _, result = tiny_run(tmp_path / "unet", 1, vae, text_encoder, denoiser="unet", config=None)
    saved = load_checkpoint(tmp_path / "unet" / "unet.safetensors")[1]["training"]
    assert saved["open_fraction"] == 0.5 and "binding_fraction" not in saved and "timesteps" not in saved


def test_train_denoiser_returns_ema_weights_and_writes_loadable_files(tmp_path, vae, text_encoder):
    denoiser, result = tiny_run(tmp_path, 12, vae, text_encoder)
    assert result.step == 12 and all(map(torch.isfinite, torch.tensor(result.losses)))
    ema = result.ema.shadow
    assert all(torch.equal(v, ema[k]) for k, v in denoiser.state_dict().items() if k in ema)
    assert any(not torch.equal(v, ema[k]) for k, v in denoiser.raw_state_dict.items() if k in ema)
    loaded = load_denoiser(tmp_path)
    assert loaded.config == denoiser.config and loaded.text_encoder_info["source"].startswith("a TextEncoder")
    assert loaded.schedule_name == "scaled_linear"
    assert loaded.training_info["steps"] == 12 and loaded.training_info["caption_dropout"] == 0.1
    assert loaded.training_info["losses"] == pytest.approx(result.losses, rel=1e-3)  # notebook 05 plots it
    tensors, info = load_checkpoint(tmp_path / "denoiser_checkpoint")
    assert {k.split("/")[0] for k in tensors} >= {"model", "ema", "optim"}  # raw and EMA weights both kept


def test_resuming_an_interrupted_run_repeats_an_uninterrupted_one(tmp_path, vae, text_encoder, monkeypatch):
    whole, whole_result = tiny_run(tmp_path / "whole", 6, vae, text_encoder, checkpoint_every=3)
    make_batch_fn = recipes.latent_batch_fn  # train_denoiser looks the module-level name up at each call

    def interrupted(*args, **kwargs):  # Ctrl-C while step 4's batch is being made
        batch_fn = make_batch_fn(*args, **kwargs)

        def wrapped(step):
            if step == 4:
                raise KeyboardInterrupt
            return batch_fn(step)

        return wrapped

    monkeypatch.setattr(recipes, "latent_batch_fn", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny_run(tmp_path / "parts", 6, vae, text_encoder, checkpoint_every=3)
    monkeypatch.setattr(recipes, "latent_batch_fn", make_batch_fn)
    resumed, resumed_result = tiny_run(tmp_path / "parts", 6, vae, text_encoder, checkpoint_every=3)
    assert resumed_result.start_step == 3
    assert resumed_result.losses == whole_result.losses
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_unconditional_training_needs_no_text(tmp_path, vae):
    denoiser, result = tiny_run(None, 4, vae, None)
    assert result.step == 4
    pipe = LatentDiffusionPipeline(vae, None, None, denoiser, "scaled_linear")
    images = generate_for_eval(pipe, ["a red circle", "a blue square"], steps=3)  # the prompts only count the images
    assert images.shape == (2, 3, 32, 32)
    assert torch.equal(images, generate_for_eval(pipe, ["", ""], steps=3))


# -- the float16 weights ------------------------------------------------------------------------------------------


def randomised(config, seed=0):
    torch.manual_seed(seed)
    model = Denoiser(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)  # zero-initialised layers would make every output 0
    return model.eval()


def test_float16_weights_round_trip(tmp_path):
    model = randomised(tiny_config())
    save_denoiser(model, tmp_path / "denoiser")
    half = load_denoiser(tmp_path / "denoiser.safetensors")
    assert all(p.dtype == torch.float32 for p in half.parameters())
    for k, v in model.state_dict().items():
        assert torch.allclose(half.state_dict()[k], v, rtol=2**-10, atol=1e-7), k
    x = torch.randn(8, 4, 8, 8)
    tokens = torch.randn(8, 5, 16)
    with torch.no_grad():
        full_out, half_out = model(x, 500, tokens), half(x, 500, tokens)
    assert (half_out - full_out).norm() / full_out.norm() < 1e-2
    save_denoiser(model, tmp_path / "full", dtype=torch.float32)
    sizes = [(tmp_path / f"{name}.safetensors").stat().st_size for name in ("denoiser", "full")]
    assert sizes[0] < 0.6 * sizes[1]


def test_generate_for_eval_guides_with_the_unconditional_pass_first(vae, text_encoder):
    model = randomised(tiny_config())
    prompts = ["a small red circle in the top left", "a large blue square in the center"]
    pipe = LatentDiffusionPipeline(vae, text_encoder, Tokenizer(), model, "scaled_linear")
    pipe.guidance_interval = (0, 1000)  # guidance at every step, so that scale 0 is the unconditional model throughout
    common = {"steps": 4, "seed": 7}
    scale0 = generate_for_eval(pipe, prompts, ["", "red"], guidance_scale=0.0, **common)
    uncond = generate_for_eval(pipe, ["", "red"], prompts, guidance_scale=1.0, **common)
    assert torch.allclose(scale0, uncond, atol=1e-5)
    assert scale0.shape == (2, 3, 32, 32) and scale0.abs().max() <= 1
    guided = generate_for_eval(pipe, prompts, guidance_scale=4.0, **common)
    assert not torch.allclose(guided, scale0, atol=1e-3)
    with pytest.raises(ValueError, match="negative prompts"):
        generate_for_eval(pipe, prompts, [""], **common)
    one_by_one = generate_for_eval(pipe, prompts, guidance_scale=4.0, batch_size=1, **common)
    assert torch.allclose(one_by_one, guided, atol=1e-5)  # image i's noise comes from seed + i, whatever the chunks


# -- bad arguments ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"prediction_type": "noise"}, "prediction_type"),
        ({"caption_dropout": 1.5}, "caption_dropout"),
        ({"lr": -1.0}, "lr"),
        ({"threads": 0}, "threads"),
        ({"text_encoder": 42}, "text_encoder"),
        ({"vae": 3}, "vae"),
        ({"config": "big"}, "DenoiserConfig"),
        ({"config": tiny_config(text_dim=64)}, "text_dim"),
        ({"config": tiny_config(prediction_type="v_prediction")}, "prediction_type"),
        ({"latent_window": 0}, "latent_window"),
        ({"eval_images": -1}, "eval_images"),
    ],
)
def test_bad_arguments_raise_value_error(vae, text_encoder, kwargs, message):
    kwargs = {"config": tiny_config(), "text_encoder": text_encoder, "vae": vae, **kwargs}
    with pytest.raises(ValueError, match=message):
        train_denoiser(None, steps=1, device="cpu", progress=False, **kwargs)


# -- the shipped weights ------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (WEIGHTS_DIR / "denoiser.safetensors").exists(), reason="no shipped denoiser weights")
def test_shipped_denoiser_loads_and_names_its_text_encoder():
    denoiser = load_denoiser()
    assert not denoiser.training and all(p.dtype == torch.float32 for p in denoiser.parameters())
    assert denoiser.schedule_name == "scaled_linear"
    info = denoiser.text_encoder_info
    assert info is not None and info["config"]["width"] == denoiser.config.text_dim
    clip_file = WEIGHTS_DIR / "clip.safetensors"
    if clip_file.exists():
        assert info["sha256"] == hashlib.sha256(clip_file.read_bytes()).hexdigest(), "trained on another text tower"
    with torch.no_grad(), warnings.catch_warnings():
        out = denoiser(torch.randn(2, 4, 8, 8), 999, torch.randn(2, 3, denoiser.config.text_dim))
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all() and out.abs().max() > 0
