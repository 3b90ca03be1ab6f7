"""Tests of sdlearn.denoiser: shapes, adaLN-Zero init, gradients, masking, attention maps, bad input."""

import json

import pytest
import torch
import torch.nn.functional as F

from sdlearn.denoiser import (
    CrossAttention,
    Denoiser,
    DenoiserConfig,
    attention_weights,
    capture_attention,
    count_parameters,
    modulate,
    parameter_table,
    patchify,
    sincos_2d_pos_embed,
    timestep_embedding,
    unpatchify,
)
from sdlearn.schedules import PREDICTION_TYPES

TINY = dict(width=32, depth=2, heads=2, text_dim=16, frequency_dim=32)


def tiny(**overrides) -> Denoiser:
    torch.manual_seed(0)
    return Denoiser(DenoiserConfig(**{**TINY, **overrides}))


def perturbed(model: Denoiser, seed: int = 1) -> Denoiser:
    """Give the zero-initialised layers random weights, as training would, so every path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def inputs(batch=3, length=6, text_dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    tokens = torch.randn(batch, length, text_dim, generator=g)
    lengths = torch.tensor([length, 3, 2, 4, 5][:batch])
    mask = torch.arange(length)[None] < lengths[:, None]  # [B, L], True = real token
    return x, t, tokens, mask


# -- helpers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2, 4])
def test_patchify_round_trip_and_equals_strided_conv(p):
    x = torch.randn(2, 4, 8, 8)
    tokens = patchify(x, p)
    assert tokens.shape == (2, (8 // p) ** 2, 4 * p * p)
    assert torch.equal(unpatchify(tokens, p, 4, 8), x)
    conv = torch.nn.Conv2d(4, 5, p, stride=p)
    via_conv = conv(x).flatten(2).transpose(1, 2)  # [B, N, 5]
    via_linear = tokens @ conv.weight.flatten(1).T + conv.bias
    torch.testing.assert_close(via_linear, via_conv, atol=1e-5, rtol=1e-5)


def test_timestep_embedding_values():
    emb = timestep_embedding(torch.tensor([0, 10, 999]), 8)
    assert emb.shape == (3, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # cos(0) = 1, sin(0) = 0
    # the first frequency is 1: t = 10 gives cos(10), sin(10)
    torch.testing.assert_close(emb[1, [0, 4]], torch.tensor([torch.cos(torch.tensor(10.0)), torch.sin(torch.tensor(10.0))]))
    assert torch.all(emb.abs() <= 1)


def test_sincos_2d_pos_embed_is_distinct_per_position():
    emb = sincos_2d_pos_embed(32, 4)
    assert emb.shape == (16, 32)
    distances = torch.cdist(emb, emb) + torch.eye(16) * 1e3
    assert distances.min() > 0.1  # every position gets its own code
    # first half encodes the row: tokens 0..3 (row 0) share it
    assert torch.equal(emb[0, :16], emb[3, :16]) and not torch.equal(emb[0, :16], emb[4, :16])
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_pos_embed(30, 4)


def test_modulate():
    x, shift, scale = torch.randn(2, 5, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    torch.testing.assert_close(modulate(x, shift, scale), x * (1 + scale) + shift)


# -- the model ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("patch_size", [1, 2])
def test_output_shape(prediction_type, patch_size):
    model = perturbed(tiny(prediction_type=prediction_type, patch_size=patch_size))
    x, t, tokens, mask = inputs()
    assert model(x, t, tokens, mask).shape == x.shape
    assert model(x, t).shape == x.shape


def test_output_is_exactly_zero_at_init():
    model = tiny()
    x, t, tokens, mask = inputs()
    assert torch.equal(model(x, t, tokens, mask), torch.zeros_like(x))
    assert torch.equal(model(x, t), torch.zeros_like(x))


def test_default_config_size():
    model = Denoiser()
    n = count_parameters(model)
    assert 2_000_000 <= n <= 6_000_000
    table = parameter_table(model)
    assert sum(table.values()) == n
    assert set(table) == {"patch_embed", "timestep_embed", "text_pool", "blocks.self_attn",
                          "blocks.cross_attn", "blocks.mlp", "blocks.modulation", "final_layer"}


def test_at_init_only_the_output_layer_gets_gradient():
    """adaLN-Zero: every block is the identity and the output is 0, so the first step moves the last layer."""
    model = tiny()
    x, t, tokens, mask = inputs()
    F.mse_loss(model(x, t, tokens, mask), torch.randn_like(x)).backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.any()}
    assert with_grad == {"final_layer.linear.weight", "final_layer.linear.bias"}


def test_gradients_reach_every_parameter_after_a_few_steps():
    model = tiny()
    x, t, tokens, mask = inputs()
    target = torch.randn_like(x)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(4):
        opt.zero_grad()
        F.mse_loss(model(x, t, tokens, mask), target).backward()
        opt.step()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_one_batch_overfits():
    model = tiny()
    x, t, tokens, mask = inputs(batch=4)
    noise = torch.randn_like(x)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(100):
        loss = F.mse_loss(model(x, t, tokens, mask), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_padded_tokens_change_nothing_and_real_tokens_do():
    model = perturbed(tiny())
    x, t, tokens, mask = inputs()
    out = model(x, t, tokens, mask)
    changed_padding = tokens.clone()
    changed_padding[~mask] = 100 * torch.randn(int((~mask).sum()), tokens.shape[-1])
    torch.testing.assert_close(model(x, t, changed_padding, mask), out, atol=1e-6, rtol=0)
    changed_real = tokens.clone()
    changed_real[1, 0] += 1.0  # a real token of sample 1
    diff = (model(x, t, changed_real, mask) - out).abs().amax(dim=(1, 2, 3))
    assert diff[1] > 1e-3 and diff[0] == 0 and diff[2] == 0  # only sample 1 changes


def test_padding_equals_the_shorter_sequence():
    model = perturbed(tiny())
    x, t, tokens, mask = inputs()
    batched = model(x, t, tokens, mask)
    for i in range(x.shape[0]):
        n = int(mask[i].sum())
        alone = model(x[i : i + 1], t[i : i + 1], tokens[i : i + 1, :n])  # no padding, no mask
        torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=1e-5)


def test_unconditional_and_all_padding_rows():
    model = perturbed(tiny())
    x, t, tokens, mask = inputs()
    uncond = model(x, t)
    assert uncond.shape == x.shape and torch.isfinite(uncond).all()
    assert not torch.allclose(uncond, model(x, t, tokens, mask))  # the text matters
    mask[0] = False  # sample 0 has no real token at all: it is unconditional, not NaN
    out = model(x, t, tokens, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], uncond[0], atol=1e-6, rtol=0)


def test_pooled_text_argument():
    model = perturbed(tiny())
    x, t, tokens, mask = inputs()
    weights = mask.float()[..., None]
    mean = (tokens * weights).sum(1) / weights.sum(1)
    torch.testing.assert_close(model(x, t, tokens, mask, pooled_text=mean), model(x, t, tokens, mask))
    assert not torch.allclose(model(x, t, tokens, mask, pooled_text=torch.zeros_like(mean)), model(x, t, tokens, mask))


def test_without_pooled_text_cross_attention_alone_reads_the_text():
    model = perturbed(tiny(pooled_text=False))
    assert model.text_pool is None
    assert sum(p.numel() for p in tiny().parameters()) - sum(p.numel() for p in model.parameters()) == 16 * 32 + 32
    x, t, tokens, mask = inputs()
    uncond = model(x, t)
    assert not torch.allclose(uncond, model(x, t, tokens, mask))  # the text still matters, through cross-attention
    mask[0] = False  # a row without a real token is unconditional, as with the pooled path
    torch.testing.assert_close(model(x, t, tokens, mask)[0], uncond[0], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="cross-attention alone"):
        model(x, t, tokens, mask, pooled_text=tokens.mean(1))
    with pytest.raises(ValueError, match="pooled_text must be True or False"):
        DenoiserConfig(pooled_text="no")
    saved = DenoiserConfig(pooled_text=False).to_dict()
    assert DenoiserConfig.from_dict(saved).pooled_text is False
    del saved["pooled_text"]  # a config written before the option existed had the pooled path
    assert DenoiserConfig.from_dict(saved).pooled_text is True


@pytest.mark.parametrize("option", ["mlp_conv", "joint_attention"])
def test_mlp_conv_and_joint_attention_read_text_as_the_default_does(option):
    model = perturbed(tiny(**{option: True}))
    x, t, tokens, mask = inputs()
    out = model(x, t, tokens, mask)
    changed_padding = tokens.clone()
    changed_padding[~mask] = 100 * torch.randn(int((~mask).sum()), tokens.shape[-1])
    torch.testing.assert_close(model(x, t, changed_padding, mask), out, atol=1e-5, rtol=0)
    for i in range(x.shape[0]):  # padding equals the shorter sequence
        n = int(mask[i].sum())
        torch.testing.assert_close(out[i : i + 1], model(x[i : i + 1], t[i : i + 1], tokens[i : i + 1, :n]),
                                   atol=1e-5, rtol=1e-5)
    uncond = model(x, t)
    assert not torch.allclose(uncond, out)  # the text matters
    mask[0] = False  # a row without a real token is unconditional
    torch.testing.assert_close(model(x, t, tokens, mask)[0], uncond[0], atol=1e-5, rtol=0)
    saved = model.config.to_dict()
    assert DenoiserConfig.from_dict(json.loads(json.dumps(saved))) == model.config
    residuals = [torch.randn(3, 16, 32) for _ in range(2)]  # a ControlNet's residuals reach the image tokens
    assert not torch.allclose(model(x, t, tokens, block_residuals=residuals), model(x, t, tokens))


def test_conv_mlp_is_linear_depthwise_conv_gelu_linear():
    model = perturbed(tiny(mlp_conv=True))
    mlp = model.blocks[0].mlp
    tokens = torch.randn(2, 16, 32)  # [B, N, D]: a 4 × 4 grid
    h = tokens @ mlp.fc1.weight.T + mlp.fc1.bias  # [B, 16, hidden]
    grid = h.transpose(1, 2).reshape(2, -1, 4, 4)  # [B, hidden, 4, 4]
    h = F.conv2d(grid, mlp.conv.weight, mlp.conv.bias, padding=1, groups=grid.shape[1]).flatten(2).transpose(1, 2)
    expected = F.gelu(h, approximate="tanh") @ mlp.fc2.weight.T + mlp.fc2.bias
    torch.testing.assert_close(mlp(tokens), expected)
    assert mlp.conv.weight.shape == (32, 1, 3, 3)  # depthwise: one 3 × 3 filter per hidden channel


def test_joint_attention_runs_the_text_through_the_blocks():
    model = tiny(joint_attention=True)
    assert all(block.cross_attn is None for block in model.blocks) and model.text_embed is not None
    assert model.blocks[0].modulation.out_features == 6 * 32  # no cross-attention: six adaLN vectors, not nine
    x, t, tokens, mask = inputs()
    with capture_attention(model) as maps:
        model(x, t, tokens, mask)
    assert maps["blocks.0.self_attn"][0].shape == (3, 2, 16 + 6, 16 + 6)  # queries and keys: 16 image + 6 text tokens
    for flag in ("mlp_conv", "joint_attention"):  # configs written before the options load without them
        saved = DenoiserConfig().to_dict()
        del saved[flag]
        assert getattr(DenoiserConfig.from_dict(saved), flag) is False


def test_timesteps_scalar_broadcast_and_fractional():
    model = perturbed(tiny())
    x, _, tokens, mask = inputs()
    full = model(x, torch.full((3,), 250), tokens, mask)
    torch.testing.assert_close(model(x, 250, tokens, mask), full)
    torch.testing.assert_close(model(x, torch.tensor(250), tokens, mask), full)
    assert model(x, 249.5, tokens, mask).shape == x.shape  # samplers such as Euler use fractional t
    assert not torch.allclose(model(x, 10, tokens, mask), full)  # the timestep matters


def test_determinism_for_a_seed():
    a, b = perturbed(tiny()), perturbed(tiny())
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    x, t, tokens, mask = inputs()
    assert torch.equal(a(x, t, tokens, mask), b(x, t, tokens, mask))
    torch.manual_seed(1)
    c = Denoiser(DenoiserConfig(**TINY))
    assert not torch.equal(c.blocks[0].self_attn.qkv.weight, a.blocks[0].self_attn.qkv.weight)


def test_config_round_trips_through_json():
    cfg = DenoiserConfig(width=64, prediction_type="v_prediction")
    assert DenoiserConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match=r"unknown DenoiserConfig fields \['widht'\]; known fields: \["):
        DenoiserConfig.from_dict({**cfg.to_dict(), "widht": 3})


def test_config_written_before_cross_attn_ratio_loads_with_full_width_cross_attention():
    old = DenoiserConfig(width=64).to_dict()
    del old["cross_attn_ratio"]
    cfg = DenoiserConfig.from_dict(old)
    assert cfg.cross_width == 64
    assert Denoiser(cfg).blocks[0].cross_attn.q.weight.shape == (64, 64)
    assert Denoiser(DenoiserConfig(width=64)).blocks[0].cross_attn.q.weight.shape == (32, 64)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prediction_type="noise"), "epsilon, v_prediction, sample"),
        (dict(width=30, heads=4), "divisible by heads"),
        (dict(latent_size=8, patch_size=3), "divisible by patch_size"),
        (dict(depth=0), r"DenoiserConfig\.depth must be a positive integer, got 0"),
        (dict(heads=True), r"DenoiserConfig\.heads must be a positive integer, got True"),
        (dict(width=64, heads=4, cross_attn_ratio=0.1), "multiple of heads"),
        (dict(cross_attn_ratio=0), "multiple of heads"),
        (dict(mlp_conv="yes"), "mlp_conv must be True or False"),
        (dict(mlp_conv=True, joint_attention=True), "cannot be combined"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DenoiserConfig(**kwargs)


def _bad_calls():
    x, t, tokens, mask = inputs()
    return [
        ("wrong rank", (x[0], t), {}, r"\[B, 4, 8, 8\]"),
        ("wrong channels", (torch.randn(3, 3, 8, 8), t), {}, r"\[B, 4, 8, 8\]"),
        ("wrong size", (torch.randn(3, 4, 16, 16), t), {}, r"\[B, 4, 8, 8\]"),
        ("not a tensor", (x.numpy(), t), {}, r"\[B, 4, 8, 8\]"),
        ("t wrong length", (x, t[:2]), {}, r"shape \[3\]"),
        ("t negative", (x, torch.tensor([-1, 0, 0])), {}, r"\[0, 1000\)"),
        ("t too large", (x, 1000), {}, r"\[0, 1000\)"),
        ("tokens wrong width", (x, t, torch.randn(3, 6, 8)), {}, "text_dim=16"),
        ("tokens wrong batch", (x, t, tokens[:2]), {}, "B=3"),
        ("no tokens", (x, t, tokens[:, :0]), {}, "at least one token"),
        ("mask wrong shape", (x, t, tokens, mask[:, :4]), {}, r"text_mask must be a bool tensor \[3, 6\].*got \[3, 4\]"),
        ("float mask", (x, t, tokens, mask.float()), {}, "text_mask must be a bool tensor"),
        ("int mask", (x, t, tokens, mask.long()), {}, r"text_mask must be a bool tensor \[3, 6\].*got dtype torch\.int64"),
        ("uint8 mask", (x, t, tokens, mask.to(torch.uint8)), {}, "text_mask must be a bool tensor"),
        ("mask without tokens", (x, t, None, mask), {}, "need text_tokens"),
        ("pooled wrong width", (x, t, tokens, mask), {"pooled_text": torch.randn(3, 5)}, "pooled_text"),
    ]


@pytest.mark.parametrize("name, args, kwargs, match", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_input_raises_value_error(name, args, kwargs, match):
    model = tiny()
    with pytest.raises(ValueError, match=match):
        model(*args, **kwargs)


# -- attention maps -----------------------------------------------------------------------------------------


def test_captured_attention_maps():
    model = perturbed(tiny())
    x, t, tokens, mask = inputs()
    expected = model(x, t, tokens, mask)
    with capture_attention(model) as maps:
        out = model(x, t, tokens, mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)  # explicit softmax·V = SDPA
    assert set(maps) == {f"blocks.{i}.{kind}" for i in range(2) for kind in ("self_attn", "cross_attn")}
    self_map, cross_map = maps["blocks.1.self_attn"][0], maps["blocks.1.cross_attn"][0]
    assert self_map.shape == (3, 2, 16, 16) and cross_map.shape == (3, 2, 16, 6)  # [B, heads, N, M]
    for m in (self_map, cross_map):
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]))
    assert torch.all(cross_map.masked_select(~mask[:, None, None, :]) == 0)  # no weight on padding
    model(x, t, tokens, mask)  # outside the context nothing is recorded any more
    assert len(maps["blocks.1.self_attn"]) == 1 and model.blocks[0].self_attn.captured is None


def test_attention_weights_times_values_equal_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    mask = torch.rand(2, 1, 1, 7) > 0.3
    mask[..., 0] = True
    for m in (None, mask):
        w = attention_weights(q, k, m)
        torch.testing.assert_close(w @ v, F.scaled_dot_product_attention(q, k, v, attn_mask=m), atol=1e-5, rtol=1e-5)
    layer = CrossAttention(16, 8, heads=2)
    x, text = torch.randn(2, 4, 16), torch.randn(2, 7, 8)
    fast = layer(x, text, mask)
    layer.captured = []
    slow = layer(x, text, mask)
    torch.testing.assert_close(slow, fast, atol=1e-5, rtol=1e-5)
    assert layer.captured[0].shape == (2, 2, 4, 7)
