"""Tests of sdlearn.unet: parity with diffusers' UNet2DConditionModel (parameter counts, outputs, the mapping
table), unsupported diffusers configs, the zero init, text masking, one training step, bad input."""

import json

import pytest
import torch

from sdlearn.checkpoint import count_parameters
from sdlearn.denoiser import denoiser_loss
from sdlearn.schedules import NoiseSchedule
from sdlearn.unet import (
    DIFFUSERS_FIXED,
    ResBlock,
    SpatialTransformer,
    UNet,
    UNetConfig,
    convert_diffusers_state_dict,
    sdlearn_name,
    timestep_embedding,
)

CA, D, CU, U = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"

# Tiny configurations in diffusers' names, between them covering every option sdlearn implements.
TINY = {
    "sd-v1-like": dict(sample_size=8, block_out_channels=(32, 64), down_block_types=(CA, D), up_block_types=(U, CU),
                       layers_per_block=1, cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8),
    "sd-v2-like": dict(sample_size=8, block_out_channels=(32, 64), down_block_types=(CA, CA), up_block_types=(CU, CU),
                       layers_per_block=2, cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=16,
                       use_linear_projection=True, upcast_attention=True, transformer_layers_per_block=2),
    "three-levels": dict(sample_size=8, block_out_channels=(16, 32, 32), down_block_types=(D, CA, CA),
                         up_block_types=(CU, CU, U), layers_per_block=(1, 2, 1), cross_attention_dim=24,
                         attention_head_dim=(2, 2, 4), norm_num_groups=8, flip_sin_to_cos=False, freq_shift=1,
                         norm_eps=1e-6, in_channels=3, out_channels=5),
}


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


def diffusers_unet(diffusers, config: dict, seed: int = 0, perturb: bool = True):
    """A seeded, randomly initialised diffusers U-Net; with ``perturb`` every parameter also gets random noise, so
    that no weight is zero (a zero-initialised output would hide a mapping error) and norms are not all 1."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**config).eval()
    if perturb:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def inputs(config: dict, batch=3, length=6, size=(8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.get("in_channels", 4), *size, generator=g)
    t = torch.tensor([0, 517, 999, 250, 31][:batch])
    tokens = torch.randn(batch, length, config["cross_attention_dim"], generator=g)
    lengths = torch.tensor([length, 2, 4, 1, 5][:batch])
    mask = torch.arange(length)[None] < lengths[:, None]  # [B, L], True = real token; every sample has one
    return x, t, tokens, mask


# -- parity with diffusers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TINY))
def test_from_diffusers_has_equal_parameter_count_and_equal_outputs(diffusers, name):
    config = TINY[name]
    theirs = diffusers_unet(diffusers, config)
    ours = UNet.from_diffusers(theirs).eval()
    assert count_parameters(ours) == count_parameters(theirs)
    x, t, tokens, mask = inputs(config)
    with torch.no_grad():
        expected = theirs(x, t, tokens).sample
        assert expected.abs().mean() > 0.1  # the comparison below is not between zeros
        torch.testing.assert_close(ours(x, t, tokens), expected, atol=1e-4, rtol=0)
        masked = theirs(x, t, tokens, encoder_attention_mask=mask).sample
        assert (masked - expected).abs().max() > 1e-3  # the mask matters here
        torch.testing.assert_close(ours(x, t, tokens, mask), masked, atol=1e-4, rtol=0)


def test_from_diffusers_agrees_on_other_sizes_and_timestep_forms(diffusers):
    config = TINY["three-levels"]
    theirs = diffusers_unet(diffusers, config, seed=3)
    ours = UNet.from_diffusers(theirs).eval()
    x, t, tokens, mask = inputs(config, batch=2, size=(12, 8))  # not square, not sample_size
    with torch.no_grad():
        for timestep in (417, 37.25, torch.tensor(999), torch.tensor([3.5, 640.0])):
            expected = theirs(x, timestep, tokens, encoder_attention_mask=mask).sample
            torch.testing.assert_close(ours(x, timestep, tokens, mask), expected, atol=1e-4, rtol=0)


def test_from_diffusers_at_default_init_and_the_course_configuration(diffusers):
    theirs = diffusers_unet(diffusers, UNetConfig().to_diffusers(), perturb=False)
    ours = UNet.from_diffusers(theirs).eval()
    assert count_parameters(ours) == count_parameters(theirs) == count_parameters(UNet())
    x, t, tokens, mask = inputs({"cross_attention_dim": 128}, length=16)
    with torch.no_grad():
        expected = theirs(x, t, tokens, encoder_attention_mask=mask).sample
        torch.testing.assert_close(ours(x, t, tokens, mask), expected, atol=1e-4, rtol=0)


def test_every_diffusers_parameter_has_one_place_in_the_table(diffusers):
    for config in TINY.values():
        theirs = diffusers_unet(diffusers, config, perturb=False)
        ours = UNet(UNetConfig.from_diffusers(dict(theirs.config)))
        targets: dict[str, list[int]] = {}
        for name in theirs.state_dict():
            target, part, parts = sdlearn_name(name)
            targets.setdefault(target, []).append(part)
            assert parts == {"qkv": 3, "kv": 2}.get(target.split(".")[-2], 1), name
        assert set(targets) == set(ours.state_dict())
        assert all(sorted(parts) == list(range(len(parts))) for parts in targets.values())


def test_every_norm_has_diffusers_epsilon_and_groups(diffusers):
    """ε differences hide below the 1e-4 tolerance of the output checks, so the norms are compared one by one."""
    for config in TINY.values():
        theirs = diffusers_unet(diffusers, config, perturb=False)
        ours = dict(UNet.from_diffusers(theirs).named_modules())
        norms = [(name, m) for name, m in theirs.named_modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
        assert len(norms) > 10
        for name, norm in norms:
            mine = ours[sdlearn_name(name + ".weight")[0].removesuffix(".weight")]
            assert type(mine) is type(norm) and mine.eps == norm.eps, name
            assert getattr(mine, "num_groups", None) == getattr(norm, "num_groups", None), name


def test_sdlearn_name_examples():
    assert sdlearn_name("conv_in.weight") == ("conv_in.weight", 0, 1)
    assert sdlearn_name("time_embedding.linear_2.bias") == ("time_mlp.2.bias", 0, 1)
    assert sdlearn_name("down_blocks.1.resnets.0.conv_shortcut.weight") == ("down.1.res.0.skip.weight", 0, 1)
    assert sdlearn_name("down_blocks.0.downsamplers.0.conv.bias") == ("down.0.resample.bias", 0, 1)
    assert sdlearn_name("mid_block.attentions.0.transformer_blocks.0.attn1.to_k.weight") == (
        "mid.attn.blocks.0.self_attn.qkv.weight", 1, 3)
    assert sdlearn_name("up_blocks.2.attentions.1.transformer_blocks.3.attn2.to_v.weight") == (
        "up.2.attn.1.blocks.3.cross_attn.kv.weight", 1, 2)
    assert sdlearn_name("up_blocks.0.attentions.2.transformer_blocks.0.ff.net.0.proj.weight") == (
        "up.0.attn.2.blocks.0.ff.proj.weight", 0, 1)
    assert sdlearn_name("mid_block.resnets.1.time_emb_proj.weight") == ("mid.res2.time_proj.weight", 0, 1)
    with pytest.raises(KeyError, match="add_embedding.linear_1.weight"):
        sdlearn_name("add_embedding.linear_1.weight")


def test_convert_refuses_left_over_missing_and_misshapen_weights(diffusers):
    theirs = diffusers_unet(diffusers, TINY["sd-v1-like"], perturb=False)
    ours = UNet.from_diffusers(theirs)
    state, own = dict(theirs.state_dict()), ours.state_dict()
    with pytest.raises(ValueError, match="no row of the diffusers → sdlearn table matches 'class_embedding.weight'"):
        convert_diffusers_state_dict({**state, "class_embedding.weight": torch.zeros(3)}, own)
    partial = {k: v for k, v in state.items() if k != "conv_out.bias"}
    with pytest.raises(ValueError, match=r"nothing for \['conv_out.bias'\]"):
        convert_diffusers_state_dict(partial, own)
    no_v = {k: v for k, v in state.items() if k != "mid_block.attentions.0.transformer_blocks.0.attn1.to_v.weight"}
    with pytest.raises(ValueError, match="mid.attn.blocks.0.self_attn.qkv.weight' is fused from 3"):
        convert_diffusers_state_dict(no_v, own)
    with pytest.raises(ValueError, match=r"'conv_in.weight' has shape \[32, 4, 3, 3\] here but \[32, 4, 3, 5\]"):
        convert_diffusers_state_dict({**state, "conv_in.weight": torch.zeros(32, 4, 3, 5)}, own)
    with pytest.raises(ValueError, match="expected a diffusers UNet2DConditionModel"):
        UNet.from_diffusers(torch.nn.Linear(2, 2))


def test_config_round_trips_through_diffusers(diffusers):
    for config in TINY.values():
        ours = UNetConfig(**config)
        assert UNetConfig.from_diffusers(dict(diffusers.UNet2DConditionModel(**ours.to_diffusers()).config)) == ours
    extra = UNetConfig.from_diffusers(UNetConfig().to_diffusers(), prediction_type="v_prediction")
    assert extra.prediction_type == "v_prediction"


def test_timestep_embedding_equals_diffusers(diffusers):
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    for flip in (True, False):
        for shift in (0, 1):
            torch.testing.assert_close(timestep_embedding(t, 32, flip, shift),
                                       get_timestep_embedding(t, 32, flip, shift), atol=1e-6, rtol=0)


# -- unsupported diffusers configurations ---------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("class_embed_type", "timestep"),
    ("addition_embed_type", "text_time"),
    ("time_cond_proj_dim", 256),
    ("resnet_time_scale_shift", "scale_shift"),
    ("only_cross_attention", True),
    ("only_cross_attention", [False, True]),
    ("num_class_embeds", 10),
    ("dual_cross_attention", True),
    ("encoder_hid_dim", 64),
    ("conv_in_kernel", 1),
    ("attention_type", "gated"),
    ("downsample_padding", 0),
    ("dropout", 0.1),
    ("center_input_sample", True),
    ("mid_block_only_cross_attention", True),
])
def test_unsupported_diffusers_fields_are_refused_by_name(field, value):
    config = {**UNetConfig().to_diffusers(), **{k: v[0] for k, v in DIFFUSERS_FIXED.items()}, field: value}
    with pytest.raises(ValueError, match=rf"the diffusers config field {field}=.* is not supported"):
        UNetConfig.from_diffusers(config)


@pytest.mark.parametrize("field, value, message", [
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn", "mid_block_type must be one of UNetMidBlock2DCrossAttn"),
    ("down_block_types", ("CrossAttnDownBlock2D", "AttnDownBlock2D"), r"down_block_types\[1\] must be one of"),
    ("up_block_types", ("SimpleCrossAttnUpBlock2D", "UpBlock2D"), r"up_block_types\[0\] must be one of"),
    ("cross_attention_dim", (16, 32), "cross_attention_dim=.* is not supported"),
    ("sample_size", (8, 16), "sample_size=.* is not supported"),
    ("norm_num_groups", None, "norm_num_groups=None is not supported"),
    ("shiny_new_option", 3, "unknown diffusers config field 'shiny_new_option'"),
    ("_class_name", "UNet2DModel", "expected a UNet2DConditionModel config, got _class_name='UNet2DModel'"),
])
def test_other_unsupported_diffusers_configs_are_refused_by_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig.from_diffusers({**UNetConfig().to_diffusers(), field: value})


def test_an_unsupported_diffusers_model_is_refused_naming_the_field(diffusers):
    model = diffusers.UNet2DConditionModel(**{**TINY["sd-v1-like"], "time_cond_proj_dim": 8})
    with pytest.raises(ValueError, match="time_cond_proj_dim=8 is not supported"):
        UNet.from_diffusers(model)
    model = diffusers.UNet2DConditionModel(**{**TINY["sd-v1-like"], "resnet_time_scale_shift": "scale_shift"})
    with pytest.raises(ValueError, match="resnet_time_scale_shift='scale_shift' is not supported"):
        UNet.from_diffusers(model)


def test_the_values_sd_uses_are_accepted():
    config = {**UNetConfig().to_diffusers(), **{k: v[-1] for k, v in DIFFUSERS_FIXED.items()},
              "only_cross_attention": [False, False], "_class_name": "UNet2DConditionModel", "_diffusers_version": "x",
              "addition_embed_type_num_heads": 64}
    assert UNetConfig.from_diffusers(config) == UNetConfig()


# -- the model on its own --------------------------------------------------------------------------------------


def test_zero_init_makes_the_untrained_unet_predict_zero():
    torch.manual_seed(0)
    model = UNet(UNetConfig(**TINY["sd-v2-like"]))
    x, t, tokens, mask = inputs(TINY["sd-v2-like"])
    assert torch.equal(model(x, t, tokens, mask), torch.zeros_like(x))
    zeros = [m.conv2 for m in model.modules() if isinstance(m, ResBlock)]
    zeros += [m.proj_out for m in model.modules() if isinstance(m, SpatialTransformer)] + [model.conv_out]
    assert len(zeros) == (4 + 6 + 2) + (4 + 6 + 1) + 1  # ResBlocks (down, up, mid), transformers, conv_out
    assert all(not layer.weight.any() and not layer.bias.any() for layer in zeros)
    assert model.down[0].res[0].conv1.weight.std() > 0.01  # and nothing else is zero


def perturbed(model: UNet, seed: int = 1) -> UNet:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_padding_tokens_change_nothing_and_no_text_skips_cross_attention():
    config = TINY["sd-v1-like"]
    torch.manual_seed(0)
    model = perturbed(UNet(UNetConfig(**config)))
    x, t, tokens, mask = inputs(config)
    with torch.no_grad():
        out = model(x, t, tokens, mask)
        noisy_padding = torch.where(mask[..., None], tokens, 100 * torch.randn_like(tokens))
        torch.testing.assert_close(model(x, t, noisy_padding, mask), out, atol=1e-5, rtol=0)
        short = model(x[1:2], t[1:2], tokens[1:2, :2])  # sample 1 has two real tokens: the same without padding
        torch.testing.assert_close(short, out[1:2], atol=1e-5, rtol=0)
        unconditional = model(x, t)
        assert (unconditional - out).abs().max() > 1e-2
        empty = mask.clone()
        empty[0] = False  # sample 0 has no real token: it is unconditional, the others are not affected
        both = model(x, t, tokens, empty)
        torch.testing.assert_close(both[0], unconditional[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(both[1:], out[1:], atol=1e-5, rtol=0)
        torch.testing.assert_close(model(x, t, tokens, torch.ones_like(mask)), model(x, t, tokens), atol=0, rtol=0)


def test_one_training_step_with_denoiser_loss_moves_every_parameter():
    torch.manual_seed(0)
    config = UNetConfig(**TINY["sd-v1-like"], prediction_type="v_prediction")
    model = UNet(config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = NoiseSchedule.from_name("scaled_linear")
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(3):  # the zero-initialised layers pass gradients on from the second and third steps
        x, t, tokens, mask = inputs(TINY["sd-v1-like"], batch=4, seed=len(losses))
        batch = {"x0": x, "noise": torch.randn(x.shape, generator=g), "t": t, "tokens": tokens, "mask": mask}
        loss, logs = denoiser_loss(model, batch, schedule)
        assert logs == {} and torch.isfinite(loss)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    unmoved = [name for name, p in model.named_parameters() if torch.equal(p, before[name])]
    assert unmoved == []
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_default_is_the_course_unet():
    model = UNet()
    assert count_parameters(model) == 3_919_876  # the DiT's size; 7.8 MB in float16
    x = torch.randn(2, 4, 8, 8)
    assert model(x, 10, torch.randn(2, 16, 128)).shape == x.shape


def test_float16_with_upcast_attention_runs():
    torch.manual_seed(0)
    config = TINY["sd-v2-like"]
    model = perturbed(UNet(UNetConfig(**config)))
    x, t, tokens, mask = inputs(config)
    with torch.no_grad():
        full = model(x, t, tokens, mask)
        half = model.to(torch.bfloat16)(x.bfloat16(), t, tokens.bfloat16(), mask)
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().mean() < 0.05 * full.abs().mean()


# -- configuration and bad input -------------------------------------------------------------------------------


def test_config_json_round_trip():
    config = UNetConfig(**TINY["three-levels"])
    assert UNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("overrides, message", [
    (dict(block_out_channels=(32, 48), norm_num_groups=32), r"norm_num_groups \(32\) must divide .*\[1\] = 48"),
    (dict(attention_head_dim=(2, 3)), r"attention_head_dim\[1\] = 3 heads .* must divide block_out_channels\[1\]"),
    (dict(down_block_types=("CrossAttnDownBlock2D",)), "down_block_types must have one entry per level"),
    (dict(up_block_types=("UpBlock2D", "UpBlock")), r"up_block_types\[1\] must be one of"),
    (dict(layers_per_block=(1, 2, 3)), "layers_per_block must be one number or one per level"),
    (dict(layers_per_block=0), "layers_per_block must be integers ≥ 1"),
    (dict(block_out_channels=(64, 128.0)), "block_out_channels must be integers"),
    (dict(block_out_channels=()), "block_out_channels must be a non-empty list"),
    (dict(block_out_channels=(64, 96), norm_num_groups=64), r"norm_num_groups \(64\) must divide .*\[1\] = 96"),
    (dict(block_out_channels=(30, 60), norm_num_groups=15, attention_head_dim=1, freq_shift=15), "freq_shift"),
    (dict(cross_attention_dim=0), "cross_attention_dim must be a positive integer"),
    (dict(prediction_type="eps"), "unknown prediction_type 'eps'"),
    (dict(use_linear_projection="yes"), "use_linear_projection must be True or False"),
    (dict(norm_eps=0), "norm_eps must be a number in"),
])
def test_bad_config_names_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig(**overrides)


def test_bad_input_gets_one_clear_error():
    model = UNet(UNetConfig(**TINY["sd-v1-like"]))
    x, t, tokens, mask = inputs(TINY["sd-v1-like"])
    cases = [
        ((x[0], t), r"x_t must be a latent tensor \[B, 4, H, W\] with H and W multiples of 2; got \[4, 8, 8\]"),
        ((x[:, :3], t), r"got \[3, 3, 8, 8\]"),
        ((torch.randn(3, 4, 7, 8), t), r"multiples of 2; got \[3, 4, 7, 8\]"),
        ((x.long(), t), "x_t must be a floating-point tensor"),
        ((x, t[:2]), r"t must be a number, a 0-d tensor or a tensor of shape \[3\]"),
        ((x, 1000), r"timesteps must lie in \[0, 1000\)"),
        ((x, -1), r"timesteps must lie in \[0, 1000\)"),
        ((x, "5"), "t must be a number"),
        ((x, t, tokens[..., :8]), r"text_tokens must be \[B=3, L, cross_attention_dim=16\]; got \[3, 6, 8\]"),
        ((x, t, tokens[:, :0]), "at least one token"),
        ((x, t, tokens, mask.long()), "text_mask must be a bool tensor"),
        ((x, t, tokens, mask[:, :3]), r"text_mask must be a bool tensor \[3, 6\]"),
        ((x, t, None, mask), "text_mask needs text_tokens"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            model(*args)
    with pytest.raises(ValueError, match="config must be a UNetConfig"):
        UNet({"block_out_channels": (32, 64)})
