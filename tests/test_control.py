"""The ControlNet (sdlearn.control, sdlearn.control_recipes): the edge map, the zero-initialised ControlNet, the DiT's
``block_residuals``, the recipe's data, a short training run, the metric and the file."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from sdlearn.captions import parse_prompt
from sdlearn.checkpoint import CheckpointError, checkpoint_paths
from sdlearn.control import ControlNet, ControlNetConfig, check_control_image, edge_map, object_coverage
from sdlearn.control_recipes import (
    COLOR_NAMES,
    control_batch,
    generated_colors,
    load_controlnet,
    mask_iou,
    save_controlnet,
    split_pairs,
    train_controlnet,
)
from sdlearn.data import COLORS, HELDOUT_PAIRS, POSITION_CENTERS, SIZE_PIXELS, render_batch
from sdlearn.denoiser import Denoiser, DenoiserConfig, patchify, timestep_embedding, unpatchify
from sdlearn.pipeline import LatentDiffusionPipeline
from sdlearn.schedules import NoiseSchedule
from sdlearn.text import TextEncoder, TextEncoderConfig, Tokenizer
from sdlearn.vae import VAE, VAEConfig

TINY_DENOISER = DenoiserConfig(width=32, depth=4, heads=2, text_dim=32, frequency_dim=32)


def tiny_denoiser(seed: int = 1, config: DenoiserConfig = TINY_DENOISER) -> Denoiser:
    """A random DiT whose output depends on every layer: the adaLN-Zero layers get small random weights."""
    torch.manual_seed(seed)
    denoiser = Denoiser(config)
    with torch.no_grad():
        for p in denoiser.parameters():
            if p.abs().max() == 0:
                p.normal_(std=0.05)
    return denoiser.eval()


def tiny_pipe() -> LatentDiffusionPipeline:
    torch.manual_seed(2)
    encoder = TextEncoder(TextEncoderConfig(width=32, depth=1, heads=2)).eval()
    torch.manual_seed(3)
    vae = VAE(VAEConfig(base_channels=8, num_res_blocks=0)).eval()
    return LatentDiffusionPipeline(vae, encoder, Tokenizer(), tiny_denoiser(), NoiseSchedule.from_name("scaled_linear"))


def inputs(batch: int = 3, seed: int = 0, text_dim: int = 32):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.randint(1000, (batch,), generator=g),
            torch.randn(batch, 5, text_dim, generator=g), mask)


def square_coverage(top: int, left: int, side: int) -> torch.Tensor:
    coverage = torch.zeros(1, 1, 32, 32)
    coverage[..., top:top + side, left:left + side] = 1.0
    return coverage


# ---------------------------------------------------------------------------------------------- the edge map


def test_edge_map_of_a_filled_square_is_its_outline():
    edges = edge_map(square_coverage(10, 12, 6))
    expected = torch.zeros(1, 1, 32, 32)
    expected[..., 10:16, 12:18] = 1.0
    expected[..., 11:15, 13:17] = 0.0  # the inside: all four neighbours are in the square
    assert edges.shape == (1, 1, 32, 32) and edges.dtype == torch.float32
    assert torch.equal(edges, expected)
    assert edges.sum() == 4 * 6 - 4


def test_edge_map_threshold_and_four_neighbours():
    coverage = torch.zeros(1, 1, 32, 32)
    coverage[..., 5:10, 5:10] = 0.5  # exactly 0.5 is in the object
    coverage[..., 20:25, 20:25] = 0.49  # just below is not
    edges = edge_map(coverage)
    assert edges[..., 5:10, 5:10].sum() == 16 and edges[..., 7, 7] == 0
    assert edges[..., 20:25, 20:25].sum() == 0
    # A pixel whose only missing neighbour is diagonal is inside: 4-neighbours, not 8.
    plus = square_coverage(10, 10, 3)
    plus[..., 9, 11] = plus[..., 13, 11] = plus[..., 11, 9] = plus[..., 11, 13] = 1.0
    plus[..., 10, 10] = 0.0  # a corner of the 3×3 block removed: (11, 11)'s diagonal neighbour
    assert edge_map(plus)[0, 0, 11, 11] == 0


def test_edge_map_counts_the_image_border_as_outline():
    edges = edge_map(square_coverage(0, 0, 5))  # touching the top and left borders
    expected = torch.zeros(1, 1, 32, 32)
    expected[..., 0:5, 0:5] = 1.0
    expected[..., 1:4, 1:4] = 0.0
    assert torch.equal(edges, expected)
    full = edge_map(torch.ones(2, 1, 32, 32))  # the whole image covered: only the border ring is outline
    assert full.sum() == 2 * (4 * 32 - 4) and full[:, :, 1:-1, 1:-1].sum() == 0


def test_edge_map_of_an_image_equals_that_of_its_coverage():
    # An anti-aliased disc, α·colour over black, in three colours: the coverage read from the image is α.
    yy, xx = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    alpha = ((7.3 - ((xx - 14.2) ** 2 + (yy - 19.6) ** 2).sqrt()).clamp(0, 1))[None, None]  # [1, 1, 32, 32]
    assert ((alpha > 0) & (alpha < 1)).any()  # fractional coverage on the rim
    for rgb in [(220, 40, 40), (40, 180, 60), (235, 235, 235)]:
        image = alpha * (torch.tensor(rgb, dtype=torch.float32) * (2 / 255))[None, :, None, None] - 1
        assert torch.allclose(object_coverage(image), alpha, atol=1e-6)
        assert torch.equal(edge_map(image), edge_map(alpha))
    # A rendered Shapes image: its edge map is that of the renderer's coverage (the same object drawn in pure white).
    kwargs = dict(sizes=["large"], positions=["center"], xy_offset=torch.tensor([[-3.3, 5.7]]))
    red = render_batch(["red"], ["diamond"], rgb_offset=torch.zeros(1, 3), **kwargs)
    white = render_batch(["white"], ["diamond"], rgb_offset=torch.full((1, 3), 20.0), **kwargs)  # 235 + 20 = 255
    assert torch.equal(edge_map(red), edge_map((white[:, :1] + 1) / 2)) and edge_map(red).sum() > 20


def test_an_all_black_image_has_no_outline():
    assert edge_map(-torch.ones(1, 3, 32, 32)).sum() == 0


@pytest.mark.parametrize("bad, words", [
    (torch.zeros(1, 2, 32, 32), "coverage map [B, 1, 32, 32]"),
    (torch.zeros(1, 32, 32), "got [1, 32, 32]"),
    (torch.zeros(1, 1, 16, 16), "got [1, 1, 16, 16]"),
    (torch.zeros(0, 1, 32, 32), "got [0, 1, 32, 32]"),
    (torch.full((1, 1, 32, 32), 1.5), "must lie in [0, 1]"),
    (torch.full((1, 1, 32, 32), -0.1), "must lie in [0, 1]"),
    (torch.full((1, 3, 32, 32), -1.2), "must lie in [-1, 1]"),
    (torch.full((1, 1, 32, 32), float("nan")), "NaN"),
    (torch.zeros(1, 1, 32, 32, dtype=torch.uint8), "floating-point"),
    ([[0.0]], "got list"),
])
def test_edge_map_refuses_bad_input_in_one_line(bad, words):
    with pytest.raises(ValueError) as info:
        edge_map(bad)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_check_control_image():
    edges = edge_map(square_coverage(3, 3, 9))
    assert check_control_image(edges, 1) is edges
    assert check_control_image(edges, 4).shape == (4, 1, 32, 32)  # one map for the whole batch
    assert check_control_image(edges.repeat(3, 1, 1, 1)).shape == (3, 1, 32, 32)
    for bad, words in [(edges.repeat(3, 1, 1, 1), "[2, 1, 32, 32]"), (edges[0], "got [1, 32, 32]"),
                       (edges * 2, "[0, 1]"), (edges - 1, "[0, 1]"), (edges.long(), "floating-point"),
                       (edges * float("inf"), "NaN or infinite"), (None, "got NoneType")]:
        with pytest.raises(ValueError) as info:
            check_control_image(bad, 2)
        assert words in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- the DiT's residuals


def test_block_residuals_are_added_after_each_block():
    denoiser = tiny_denoiser()
    x_t, t, _, _ = inputs()
    g = torch.Generator().manual_seed(7)
    residuals = [torch.randn(3, 16, 32, generator=g) for _ in range(2)]
    with torch.no_grad():  # the forward pass written out, residual i after block i
        x = denoiser.patch_embed(patchify(x_t, 2)) + denoiser.pos_embed
        c = F.silu(denoiser.timestep_embed(timestep_embedding(t, 32)))
        for i, block in enumerate(denoiser.blocks):
            x = block(x, c)
            x = x + residuals[i] if i < len(residuals) else x
        expected = unpatchify(denoiser.final_layer(x, c), 2, 4, 8)
        got = denoiser(x_t, t, block_residuals=residuals)
        assert torch.allclose(got, expected, atol=1e-6)
        assert not torch.allclose(got, denoiser(x_t, t), atol=1e-3)
        assert torch.equal(denoiser(x_t, t, block_residuals=None), denoiser(x_t, t))
        assert torch.equal(denoiser(x_t, t, block_residuals=[]), denoiser(x_t, t))


@pytest.mark.parametrize("residuals, words", [
    ([torch.zeros(3, 16, 32)] * 5, "at most 4 (depth)"),
    (torch.zeros(3, 16, 32), "got Tensor"),
    ([torch.zeros(3, 16, 32), torch.zeros(3, 16, 31)], "block_residuals[1] must be a floating-point tensor [3, 16, 32]"),
    ([torch.zeros(2, 16, 32)], "block_residuals[0]"),
    ([torch.zeros(3, 16, 32, dtype=torch.long)], "torch.int64"),
    ([None], "got NoneType"),
])
def test_block_residuals_are_checked(residuals, words):
    x_t, t, _, _ = inputs()
    with pytest.raises(ValueError) as info:
        tiny_denoiser()(x_t, t, block_residuals=residuals)
    assert words in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- the ControlNet


def test_from_denoiser_copies_the_first_half_and_shares_nothing():
    denoiser = tiny_denoiser()
    controlnet = ControlNet.from_denoiser(denoiser)
    assert controlnet.config.num_blocks == 2 and len(controlnet.blocks) == 2
    assert controlnet.config.denoiser.to_dict() == denoiser.config.to_dict()
    state, copied = denoiser.state_dict(), controlnet.state_dict()
    for name in [k for k in copied if k.split(".")[0] in ("patch_embed", "timestep_embed", "text_pool", "blocks")]:
        assert torch.equal(copied[name], state[name]), name
        assert copied[name].data_ptr() != state[name].data_ptr(), name
    assert all(int(k.split(".")[1]) < 2 for k in copied if k.startswith("blocks."))
    assert all((p == 0).all() for p in controlnet.outputs.parameters())
    assert all((p == 0).all() for p in controlnet.hint_encoder[-1].parameters())
    with torch.no_grad():
        controlnet.blocks[0].mlp[0].weight.add_(1.0)
    assert torch.equal(denoiser.blocks[0].mlp[0].weight, state["blocks.0.mlp.0.weight"])
    assert ControlNet.from_denoiser(denoiser, num_blocks=3).config.num_blocks == 3
    with pytest.raises(ValueError, match="cannot exceed the denoiser's depth"):
        ControlNet.from_denoiser(denoiser, num_blocks=5)
    with pytest.raises(ValueError, match="needs the DiT"):
        ControlNet.from_denoiser(torch.nn.Linear(2, 2))


def test_from_denoiser_follows_a_denoiser_without_pooled_text():
    denoiser = tiny_denoiser(config=replace(TINY_DENOISER, pooled_text=False))
    controlnet = ControlNet.from_denoiser(denoiser)
    assert controlnet.text_pool is None and not any(k.startswith("text_pool") for k in controlnet.state_dict())
    x_t, t, tokens, mask = inputs()
    edges = torch.zeros(3, 1, 32, 32)
    with torch.no_grad():
        residuals = controlnet(x_t, t, tokens, mask, edges)
        assert torch.equal(denoiser(x_t, t, tokens, mask, block_residuals=residuals), denoiser(x_t, t, tokens, mask))
    with pytest.raises(ValueError, match="cross-attention alone") as info:
        controlnet(x_t, t, tokens, mask, edges, pooled_text=torch.zeros(3, TINY_DENOISER.text_dim))
    assert "\n" not in str(info.value)


def test_from_denoiser_copies_conv_mlp_blocks_and_refuses_joint_attention():
    denoiser = tiny_denoiser(config=replace(TINY_DENOISER, mlp_conv=True))
    controlnet = ControlNet.from_denoiser(denoiser)
    for copied, block in zip(controlnet.blocks, denoiser.blocks):
        assert all(torch.equal(a, b) for a, b in zip(copied.state_dict().values(), block.state_dict().values()))
    x_t, t, tokens, mask = inputs()
    with torch.no_grad():
        residuals = controlnet(x_t, t, tokens, mask, torch.zeros(3, 1, 32, 32))
        assert torch.equal(denoiser(x_t, t, tokens, mask, block_residuals=residuals), denoiser(x_t, t, tokens, mask))
    with pytest.raises(ValueError, match="joint_attention=True") as info:
        ControlNet.from_denoiser(tiny_denoiser(config=replace(TINY_DENOISER, joint_attention=True)))
    assert "\n" not in str(info.value)


def test_zero_initialisation_leaves_the_denoiser_unchanged():
    denoiser = tiny_denoiser()
    controlnet = ControlNet.from_denoiser(denoiser)
    x_t, t, tokens, mask = inputs()
    edges = edge_map(square_coverage(4, 20, 9)).repeat(3, 1, 1, 1)
    with torch.no_grad():
        residuals = controlnet(x_t, t, tokens, mask, edges)
        assert len(residuals) == 2 and all(r.shape == (3, 16, 32) and (r == 0).all() for r in residuals)
        plain = denoiser(x_t, t, tokens, mask)
        assert torch.equal(denoiser(x_t, t, tokens, mask, block_residuals=residuals), plain)
        # Once the outputs are not zero, the edge map changes the prediction, and the scale scales the residuals.
        for layer in controlnet.outputs:
            layer.weight.normal_(std=0.1)
        controlnet.hint_encoder[-1].weight.normal_(std=0.1)
        steered = denoiser(x_t, t, tokens, mask, block_residuals=controlnet(x_t, t, tokens, mask, edges))
        assert not torch.allclose(steered, plain, atol=1e-4)
        other = edge_map(square_coverage(20, 2, 9)).repeat(3, 1, 1, 1)
        assert not torch.allclose(controlnet(x_t, t, tokens, mask, other)[0], controlnet(x_t, t, tokens, mask, edges)[0])
        half = controlnet(x_t, t, tokens, mask, edges, 0.5)
        assert torch.allclose(half[1], 0.5 * controlnet(x_t, t, tokens, mask, edges)[1])
        assert all((r == 0).all() for r in controlnet(x_t, t, tokens, mask, edges, 0.0))
        # One edge map for the whole batch, and no text at all, both work.
        assert controlnet(x_t, t, None, None, edges[:1])[0].shape == (3, 16, 32)


def test_controlnet_refuses_bad_input_in_one_line():
    controlnet = ControlNet.from_denoiser(tiny_denoiser())
    x_t, t, tokens, mask = inputs()
    edges = torch.zeros(3, 1, 32, 32)
    for args, words in [((x_t[:, :3], t, tokens, mask, edges), "x_t must be"),
                        ((x_t, t[:2], tokens, mask, edges), "t must be"),
                        ((x_t, t, tokens[..., :5], mask, edges), "text_tokens must be"),
                        ((x_t, t, tokens, mask.long(), edges), "text_mask"),
                        ((x_t, t, tokens, mask, edges[:2]), "control_image"),
                        ((x_t, t, tokens, mask, edges + 2), "[0, 1]"),
                        ((x_t, t, tokens, mask, edges, float("nan")), "conditioning_scale"),
                        ((x_t, t, None, None, edges), None)]:
        if words is None:  # the keyword: pooled text without text
            with pytest.raises(ValueError, match="need text_tokens"):
                controlnet(*args, pooled_text=tokens[:, 0])
            continue
        with pytest.raises(ValueError) as info:
            controlnet(*args)
        assert words in str(info.value) and "\n" not in str(info.value)


def test_controlnet_config():
    config = ControlNetConfig(TINY_DENOISER)
    assert config.num_blocks == 2 and config.hint_channels == (16, 32, 64, 128) and config.grid_size == 4
    assert ControlNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    patch1 = ControlNetConfig(DenoiserConfig(width=32, depth=2, heads=2, patch_size=1))  # an 8×8 token grid
    assert patch1.hint_channels == (16, 32, 64)
    for bad in [dict(hint_channels=(16, 32)), dict(num_blocks=0), dict(image_size=24)]:
        with pytest.raises(ValueError):
            ControlNetConfig(TINY_DENOISER, **bad)
    config.check_fits(tiny_denoiser())
    with pytest.raises(ValueError, match="differs in: depth"):
        config.check_fits(tiny_denoiser(config=DenoiserConfig(width=32, depth=2, heads=2, text_dim=32, frequency_dim=32)))


# ---------------------------------------------------------------------------------------------- the recipe's data and metric


def test_control_batch_places_objects_anywhere_and_leaves_position_out_of_the_caption():
    batch = control_batch(256, torch.Generator().manual_seed(0))
    assert batch.images.shape == (256, 3, 32, 32) and batch.edges.shape == (256, 1, 32, 32)
    assert torch.equal(batch.edges, edge_map(batch.images))
    half = torch.tensor([SIZE_PIXELS[s] / 2 for s in ("small", "large")])[batch.objects["size"]]
    centers = batch.objects["center"]
    assert ((centers >= half[:, None]) & (centers <= 32 - half[:, None])).all()  # the box fits
    named = torch.tensor(list(POSITION_CENTERS.values()))
    off_grid = (centers[:, None] - named[None]).abs().amax(-1).amin(1) > 1.0  # farther than the jitter from all five
    assert off_grid.float().mean() > 0.8
    assert centers[:, 0].min() < 7 and centers[:, 0].max() > 25
    for caption, c, s, z in zip(batch.captions, *(batch.objects[k].tolist() for k in ("color", "shape", "size"))):
        parsed = parse_prompt(caption)
        assert "position" not in parsed
        assert (parsed["color"], parsed["shape"], parsed["size"]) == (COLOR_NAMES[c], ("circle", "square", "triangle",
                                                                                       "diamond")[s], ("small", "large")[z])
    assert set(split_pairs("train")).isdisjoint(split_pairs("heldout")) and len(split_pairs("heldout")) == len(HELDOUT_PAIRS)
    # The object lies inside the image: nothing is cut off at the border (the image holds the whole coverage).
    assert ((batch.images + 1).amax(1)[:, [0, -1], :].amax((1, 2)) < 0.2).float().mean() > 0.5


def test_the_metric_reads_rendered_objects_right():
    batch = control_batch(64, torch.Generator().manual_seed(1))
    assert (generated_colors(batch.images) == batch.objects["color"]).all()
    made = object_coverage(batch.images) >= 0.5
    assert torch.equal(mask_iou(made, made), torch.ones(64))
    moved = torch.roll(made, 3, dims=-1)
    assert (mask_iou(made, moved) < 1).all()
    assert mask_iou(torch.zeros(1, 4, dtype=torch.bool), torch.zeros(1, 4, dtype=torch.bool)).item() == 1.0
    assert len(COLORS) == len(COLOR_NAMES)


# ---------------------------------------------------------------------------------------------- training and the file


def test_train_controlnet_runs_and_writes_a_loadable_file(tmp_path):
    pipe = tiny_pipe()
    before = {k: v.clone() for k, v in pipe.denoiser.state_dict().items()}
    controlnet, result = train_controlnet(tmp_path, steps=2, device="cpu", pipe=pipe, batch_size=4, eval_images=2,
                                          eval_steps=2, progress=False)
    assert result.step == 2 and len(result.losses) == 2
    assert all(torch.equal(v, pipe.denoiser.state_dict()[k]) for k, v in before.items())  # the DiT is locked
    assert any((p != 0).any() for p in controlnet.outputs.parameters())  # the zero layers have moved
    evaluation = controlnet.training_info["evaluation"]
    assert evaluation["n"] == 2 and 0 <= evaluation["iou_mean"] <= 1 and 0 <= evaluation["color_accuracy"] <= 1
    loaded = load_controlnet(tmp_path)
    assert loaded.training_info["steps"] == 2
    for name, value in controlnet.state_dict().items():
        assert loaded.state_dict()[name].dtype == torch.float32
        assert torch.equal(loaded.state_dict()[name], value.half().float()), name
    assert (tmp_path / "controlnet_checkpoint.safetensors").is_file()


def test_save_and_load_round_trip(tmp_path):
    controlnet = ControlNet.from_denoiser(tiny_denoiser())
    with torch.no_grad():
        for p in controlnet.outputs.parameters():
            p.normal_()
    path = save_controlnet(controlnet, tmp_path / "cn", training={"note": "test"}, denoiser_sha256="ab" * 32,
                           dtype=torch.float32)
    document = json.loads(checkpoint_paths(path)[1].read_text())
    assert document["kind"] == "controlnet" and document["denoiser_sha256"] == "ab" * 32 and "weights_sha256" in document
    loaded = load_controlnet(path)
    assert loaded.config == controlnet.config and loaded.denoiser_sha256 == "ab" * 32 and not loaded.training
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in controlnet.state_dict().items())
    assert not list(tmp_path.glob(".*tmp"))  # written atomically: no temporary file left
    with pytest.raises(CheckpointError, match="not found"):
        load_controlnet(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="writes a sdlearn.control.ControlNet"):
        save_controlnet(tiny_denoiser(), tmp_path / "d")


# ----------------------------------------------------------------------------------------------------------
# The shipped ControlNet, through load_pipeline


def test_load_pipeline_attaches_the_shipped_controlnet_and_refuses_other_denoisers():
    from sdlearn.checkpoint import file_sha256, weights_path
    from sdlearn.pretrained import load_pipeline

    pipe = load_pipeline(controlnet=True)
    assert isinstance(pipe.controlnet, ControlNet) and not pipe.controlnet.training
    assert pipe.controlnet.denoiser_sha256 == file_sha256(weights_path("denoiser"))  # trained on the shipped DiT
    assert load_pipeline().controlnet is None
    batch = control_batch(2, torch.Generator().manual_seed(0))
    kwargs = dict(num_inference_steps=4, seed=0, progress=False)
    steered = pipe(batch.captions, control_image=batch.edges, **kwargs)
    free = pipe(batch.captions, **kwargs)
    assert steered.shape == (2, 3, 32, 32) and (steered - free).abs().max() > 0.1
    for denoiser in ("unet", "flow", "fast"):
        with pytest.raises(ValueError, match=f"controlnet=True with denoiser='{denoiser}'"):
            load_pipeline(denoiser=denoiser, controlnet=True)
    with pytest.raises(ValueError, match="controlnet must be True or False"):
        load_pipeline(controlnet="yes")


def test_generate_draws_where_a_png_silhouette_says(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from sdlearn.__main__ import main

    silhouette = np.zeros((32, 32), dtype=np.uint8)
    silhouette[4:17, 15:28] = 255  # a 13 × 13 square off the five named places (centre 21.5, 10.5)
    Image.fromarray(silhouette).save(tmp_path / "where.png")
    out = tmp_path / "out"
    assert main(["generate", "a large red square", "--control-image", str(tmp_path / "where.png"), "--seed", "3",
                 "--out-dir", str(out)]) == 0
    (written,) = sorted(out.glob("*.png"))
    drawn = torch.from_numpy(np.asarray(Image.open(written).convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
    made = object_coverage(drawn[None] / 127.5 - 1) >= 0.5
    assert mask_iou(made, torch.from_numpy(silhouette >= 128)[None, None]).item() > 0.6
    nowhere = ["--out-dir", str(tmp_path / "never")]
    assert main(["generate", "a red square", "--control-image", str(written), "--denoiser", "unet", *nowhere]) == 2
    assert "--control-image steers the course's DiT" in capsys.readouterr().err
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tmp_path / "small.png")
    assert main(["generate", "a red square", "--control-image", str(tmp_path / "small.png"), *nowhere]) == 2
    assert "is 16 × 16 pixels; expected a 32 × 32 outline or silhouette" in capsys.readouterr().err
    (tmp_path / "not.png").write_text("hello")
    assert main(["generate", "a red square", "--control-image", str(tmp_path / "not.png"), *nowhere]) == 2
    assert "not an image PIL can read" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
