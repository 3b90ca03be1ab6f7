"""The text encoder: tokenizer round trips, specials, masks and warnings; the transformer's shapes and
padding invariance; the contrastive loss against a hand computation; TinyCLIP's temperature clamp, that
it learns, and the shipped weights' zero-shot accuracy."""

import math
import warnings

import pytest
import torch

from sdlearn import data, metrics
from sdlearn.checkpoint import count_parameters
from sdlearn.data import VOCABULARY, ShapesDataset, caption_variants, split_words
from sdlearn.pretrained import WEIGHTS_DIR, save_clip
from sdlearn.recipes import train_clip
from sdlearn.text import (
    ATTRIBUTE_VALUES,
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    TextEncoder,
    TextEncoderConfig,
    TinyCLIP,
    TinyCLIPConfig,
    Tokenizer,
    clip_batch,
    contrastive_loss,
    partial_caption,
    soft_contrastive_loss,
    zero_shot_accuracy,
    zero_shot_prompts,
)

TINY_TEXT = TextEncoderConfig(width=32, depth=1, heads=2)
TINY_CLIP = TinyCLIPConfig(text=TINY_TEXT, image_channels=(8, 16, 16, 16), embed_dim=32)
SHIPPED = WEIGHTS_DIR / "clip.safetensors"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


# ---------------------------------------------------------------------------------------------- tokenizer


def test_specials_and_vocabulary(tokenizer):
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert tokenizer.id_to_token[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert tokenizer.vocabulary == list(VOCABULARY)
    assert tokenizer.vocab_size == 4 + len(VOCABULARY) == TextEncoderConfig().vocab_size
    assert tokenizer.max_length == 16


def test_every_caption_round_trips(tokenizer):
    attributes = ShapesDataset(1, "all", seed=0)[0]["attributes"]
    captions = caption_variants(attributes)  # every template and synonym for one object
    captions += [ShapesDataset(50, "all", seed=1)[i]["caption"] for i in range(50)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a real caption never warns
        ids, mask = tokenizer.encode(captions)
    assert ids.shape == mask.shape == (len(captions), 16) and ids.dtype == torch.long and mask.dtype == torch.bool
    assert tokenizer.decode(ids) == [" ".join(split_words(c)) for c in captions]
    assert UNK_ID not in ids


def test_one_prompt_token_by_token(tokenizer):
    ids, mask = tokenizer("A big red disc, upper-left!")
    words = ["a", "big", "red", "disc", "upper", "left"]
    expected = [BOS_ID, *(tokenizer.token_to_id[w] for w in words), EOS_ID] + [PAD_ID] * 8
    assert ids.tolist() == [expected]
    assert mask.tolist() == [[True] * 8 + [False] * 8]
    assert tokenizer.tokens("A big red disc, upper-left!") == ["<bos>", *words, "<eos>"]
    assert tokenizer.decode(ids[0]) == "a big red disc upper left"  # 1-D ids → one string
    assert tokenizer.decode(ids[0].tolist()) == "a big red disc upper left"


def test_batch_encode_pads_each_prompt_to_max_length(tokenizer):
    ids, mask = tokenizer(["red", "a small blue square in the top left", ""])
    assert ids.shape == (3, 16)
    assert mask.sum(1).tolist() == [3, 10, 2]  # words + <bos> + <eos>
    assert (ids[~mask] == PAD_ID).all()
    assert ids[:, 0].tolist() == [BOS_ID] * 3
    assert ids[torch.arange(3), mask.sum(1) - 1].tolist() == [EOS_ID] * 3


def test_empty_prompt_is_bos_eos(tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids, mask = tokenizer("")
    assert ids[0, :3].tolist() == [BOS_ID, EOS_ID, PAD_ID]
    assert mask[0].tolist() == [True, True] + [False] * 14
    assert tokenizer.decode(ids) == [""]
    assert tokenizer("  ,. ")[0].equal(ids)  # punctuation only: nothing to say either


def test_unknown_words_warn_by_name(tokenizer):
    with pytest.warns(UserWarning, match=r"'zebra'.*'glowing'|'glowing'.*'zebra'") as record:
        ids, mask = tokenizer.encode("a glowing red zebra")
    assert len(record) == 1
    assert ids[0, :6].tolist() == [BOS_ID, tokenizer.token_to_id["a"], UNK_ID, tokenizer.token_to_id["red"], UNK_ID, EOS_ID]
    assert tokenizer.decode(ids[0]) == "a <unk> red <unk>"
    with pytest.warns(UserWarning, match="'purr'"):
        tokenizer(["red", "purr"])  # in a batch, and through __call__


def test_long_prompt_is_truncated_with_a_warning(tokenizer):
    prompt = " ".join(["red"] * 20)
    with pytest.warns(UserWarning, match=r"20 words.*truncated"):
        ids, mask = tokenizer(prompt)
    assert mask.all() and ids[0, -1] == EOS_ID and ids[0, 0] == BOS_ID
    assert tokenizer.decode(ids[0]) == " ".join(["red"] * 14)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenizer(" ".join(["red"] * 14))  # exactly fits: no warning


def test_tokenizer_bad_input(tokenizer):
    with pytest.raises(ValueError, match="prompt string"):
        tokenizer(3)
    with pytest.raises(ValueError, match="prompt string"):
        tokenizer(["red", None])
    with pytest.raises(ValueError, match="ids must lie in"):
        tokenizer.decode([1, 99])
    with pytest.raises(ValueError, match="max_length"):
        Tokenizer(max_length=1)
    with pytest.raises(ValueError, match="repeated"):
        Tokenizer(["red", "red"])
    assert Tokenizer.from_dict(tokenizer.to_dict()).id_to_token == tokenizer.id_to_token


# ---------------------------------------------------------------------------------------------- text encoder


def test_text_encoder_shapes_and_default_width(tokenizer):
    assert TextEncoderConfig().width == 128  # == DenoiserConfig.text_dim
    torch.manual_seed(0)
    encoder = TextEncoder(TINY_TEXT).eval()
    ids, mask = tokenizer(["a red circle", "", "a big green square at the upper right corner"])
    out = encoder(ids, mask)
    assert out.tokens.shape == (3, 16, 32) and out.pooled.shape == (3, 32) and out.mask.equal(mask)
    assert (out.tokens[~mask] == 0).all()  # padding is zeroed
    # pooled is the <eos> token's vector
    eos = mask.sum(1) - 1
    assert torch.equal(out.pooled, out.tokens[torch.arange(3), eos])
    same = encoder.encode_prompts(["a red circle", "", "a big green square at the upper right corner"])
    assert torch.equal(same.tokens, out.tokens)


def test_padding_does_not_change_real_tokens(tokenizer):
    torch.manual_seed(0)
    encoder = TextEncoder(TINY_TEXT).eval()
    ids, mask = tokenizer(["a small red circle in the top left", "blue"])
    reference = encoder(ids, mask)
    scrambled = ids.clone()
    scrambled[~mask] = torch.randint(0, TINY_TEXT.vocab_size, (int((~mask).sum()),))  # junk where padding was
    junk = encoder(scrambled, mask)
    assert torch.allclose(junk.tokens, reference.tokens, atol=1e-6)
    assert torch.allclose(junk.pooled, reference.pooled, atol=1e-6)
    # a shorter padded length gives the same real tokens
    short = encoder(ids[:, :10], mask[:, :10])
    assert torch.allclose(short.tokens, reference.tokens[:, :10], atol=1e-5)
    assert torch.allclose(short.pooled, reference.pooled, atol=1e-5)
    # and a prompt's encoding does not depend on the others in its batch
    alone = encoder(ids[1:], mask[1:])
    assert torch.allclose(alone.tokens, reference.tokens[1:], atol=1e-6)


def test_text_encoder_bad_input(tokenizer):
    encoder = TextEncoder(TINY_TEXT)
    ids, mask = tokenizer("red")
    with pytest.raises(ValueError, match="LongTensor"):
        encoder(ids.float(), mask)
    with pytest.raises(ValueError, match=r"mask must be a bool tensor \[1, 16\].*got dtype torch\.int64"):
        encoder(ids, mask.long())  # an integer mask is refused, as by the denoiser
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        encoder(ids, mask.float())
    with pytest.raises(ValueError, match=r"mask must be a bool tensor \[1, 16\]"):
        encoder(ids, mask[:, :8])
    with pytest.raises(ValueError, match="vocab_size"):
        encoder(ids + 100, mask)
    with pytest.raises(ValueError, match="1..16"):
        encoder(torch.ones(1, 17, dtype=torch.long), torch.ones(1, 17, dtype=torch.bool))
    holes = mask.clone()
    holes[0, 5] = True
    with pytest.raises(ValueError, match="prefix"):
        encoder(ids, holes)
    with pytest.raises(ValueError, match="tokenizer"):
        encoder.encode_prompts("red", Tokenizer(["red"]))


# ---------------------------------------------------------------------------------------------- contrastive loss


def test_contrastive_loss_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    s = 2.0  # logits = 2 · [[1, 0.6], [0, 0.8]] = [[2, 1.2], [0, 1.6]]
    rows = (-2 + math.log(math.exp(2) + math.exp(1.2))) + (-1.6 + math.log(math.exp(0) + math.exp(1.6)))
    cols = (-2 + math.log(math.exp(2) + math.exp(0))) + (-1.6 + math.log(math.exp(1.2) + math.exp(1.6)))
    expected = 0.5 * (rows / 2 + cols / 2)
    assert expected == pytest.approx(0.2987, abs=1e-4)
    assert contrastive_loss(image, text, s).item() == pytest.approx(expected, rel=1e-6)
    assert contrastive_loss(image, text, torch.tensor(s)).item() == pytest.approx(expected, rel=1e-6)


def test_contrastive_loss_is_symmetric_and_prefers_matches():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    b = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    assert contrastive_loss(a, b, 10.0).item() == pytest.approx(contrastive_loss(b, a, 10.0).item(), rel=1e-6)
    assert contrastive_loss(a, a, 10.0) < contrastive_loss(a, b, 10.0)
    assert contrastive_loss(a, a, 100.0) < 1e-3  # perfect matches, sharp temperature → ≈ 0


def test_soft_loss_reduces_to_the_plain_one_and_spreads_targets():
    torch.manual_seed(1)
    a = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    b = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    eye = torch.eye(5, dtype=torch.bool)
    assert soft_contrastive_loss(a, b, 7.0, eye).item() == pytest.approx(contrastive_loss(a, b, 7.0).item(), rel=1e-6)
    # two identical pairs: with both marked positive, swapping them costs nothing
    x = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    images, texts = x[[0, 0, 1]], x[[0, 0, 1]]
    both = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    swapped = texts[[1, 0, 2]]
    assert soft_contrastive_loss(images, texts, 5.0, both).item() == pytest.approx(
        soft_contrastive_loss(images, swapped, 5.0, both).item(), rel=1e-6)


def test_soft_contrastive_loss_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # logits at scale 2: [[2, 1.2], [0, 1.6]]
    positives = torch.tensor([[True, True], [False, True]])  # caption 1 is true of both images
    lse = lambda *x: math.log(sum(math.exp(v) for v in x))  # noqa: E731
    rows = (-(0.5 * 2 + 0.5 * 1.2) + lse(2, 1.2)) + (-1.6 + lse(0, 1.6))  # targets [½, ½] and [0, 1]
    cols = (-2 + lse(2, 0)) + (-(0.5 * 1.2 + 0.5 * 1.6) + lse(1.2, 1.6))  # targets [1, 0] and [½, ½]
    expected = 0.5 * (rows / 2 + cols / 2)
    assert expected == pytest.approx(0.4487, abs=1e-4)
    assert soft_contrastive_loss(image, text, 2.0, positives).item() == pytest.approx(expected, rel=1e-6)


def test_clip_batch_positives_are_exactly_the_captions_true_of_each_image():
    batch = clip_batch(64, torch.Generator().manual_seed(0))
    assert batch["images"].shape == (64, 3, 32, 32) and batch["ids"].shape == batch["mask"].shape == (64, 16)
    positives = batch["positives"]
    assert positives.diagonal().all()
    assert positives.sum() > 64  # Shapes batches do repeat: there are off-diagonal positives
    assert not positives.all()


def test_there_is_one_table_of_attribute_values():
    assert ATTRIBUTE_VALUES is data.ATTRIBUTE_VALUES is metrics.CLASS_NAMES
    assert list(ATTRIBUTE_VALUES) == list(data.ATTRIBUTES)
    assert ATTRIBUTE_VALUES["color"] == tuple(data.COLORS) and ATTRIBUTE_VALUES["shape"] == data.SHAPES
    assert {k: len(v) for k, v in ATTRIBUTE_VALUES.items()} == metrics.NUM_CLASSES


def test_partial_captions_and_zero_shot_prompts_use_known_words():
    assert partial_caption({"color": "red"}) == "red"
    assert partial_caption({"shape": "circle", "size": "small"}) == "a small circle"
    assert partial_caption({"color": "red", "shape": "circle", "size": "large", "position": "top left"}) == \
        "a large red circle in the top left"
    words = set(VOCABULARY)
    for attribute, values in ATTRIBUTE_VALUES.items():
        prompts = zero_shot_prompts(attribute)
        assert list(prompts) == list(values)
        assert all(set(split_words(p)) <= words for p in prompts.values())
    with pytest.raises(ValueError, match="unknown color"):
        partial_caption({"color": "pink"})
    with pytest.raises(ValueError, match="attributes"):
        partial_caption({})


# ---------------------------------------------------------------------------------------------- TinyCLIP


def test_logit_scale_starts_at_clip_value_and_is_clamped_at_100():
    clip = TinyCLIP(TINY_CLIP)
    assert clip.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        clip.logit_scale.fill_(10.0)  # e^10 ≫ 100
    assert clip.scale().item() == pytest.approx(100.0, rel=1e-6)
    images = torch.zeros(2, 3, 32, 32)
    ids, mask = Tokenizer()(["red", "blue"])
    image_emb, text_emb, scale = clip(images, ids, mask)
    assert image_emb.shape == text_emb.shape == (2, 32)
    assert torch.allclose(image_emb.norm(dim=1), torch.ones(2)) and torch.allclose(text_emb.norm(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        clip.encode_image(torch.zeros(2, 32, 32))


def test_default_clip_fits_in_3_mb():
    assert count_parameters(TinyCLIP()) * 4 <= 3e6


def test_a_short_training_run_lowers_the_loss():
    clip, result = train_clip(steps=40, batch_size=32, lr=3e-3, config=TINY_CLIP, progress=False,
                              device="cpu", eval_images=64)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert result.step == 40 and last < first - 0.3, (first, last)
    assert set(clip.training_info["zero_shot_accuracy"]) == {"train", "heldout"}


def test_checkpoint_round_trip(tmp_path):
    from sdlearn.pretrained import load_clip, load_text_encoder, load_tokenizer

    torch.manual_seed(0)
    clip = TinyCLIP(TINY_CLIP).eval()
    save_clip(clip, tmp_path / "clip", training={"note": "test"})
    loaded = load_clip(tmp_path)
    for name, tensor in clip.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    assert loaded.training_info == {"note": "test"}
    encoder = load_text_encoder(tmp_path / "clip.safetensors")
    assert isinstance(encoder, TextEncoder) and not encoder.training
    assert torch.equal(encoder.encode_prompts("red").tokens, clip.text_encoder.encode_prompts("red").tokens)
    assert load_tokenizer(tmp_path).id_to_token == Tokenizer().id_to_token


# ---------------------------------------------------------------------------------------------- shipped weights


@pytest.mark.skipif(not SHIPPED.exists(), reason="shipped clip weights not present")
def test_shipped_clip_classifies_attributes_zero_shot():
    from sdlearn.pretrained import load_clip, load_text_encoder

    clip = load_clip()
    assert clip.config.text.width == 128 and SHIPPED.stat().st_size <= 3e6
    accuracy = {split: zero_shot_accuracy(clip, n=200, seed=123, split=split) for split in ("train", "heldout")}
    for split, per_attribute in accuracy.items():
        for attribute, value in per_attribute.items():
            assert value >= 0.9, (split, attribute, value)
    encoder = load_text_encoder()
    assert torch.equal(encoder.token_embedding.weight, clip.text_encoder.token_embedding.weight)
    assert encoder.training_info == clip.training_info


def test_deprecated_text_names_still_work_and_warn():
    from sdlearn.text import encode_text

    torch.manual_seed(0)
    encoder = TextEncoder(TextEncoderConfig(width=16, depth=1, heads=2)).eval()
    expected = encoder.encode_prompts(["a red circle", ""])
    with pytest.warns(DeprecationWarning, match="encode_prompts"):
        method = encoder.encode_text(["a red circle", ""])
    with pytest.warns(DeprecationWarning, match="encode_prompts"):
        function = encode_text(encoder, ["a red circle", ""])
    for got in (method, function):
        assert torch.equal(got.tokens, expected.tokens) and torch.equal(got.mask, expected.mask)
    for model in (encoder, TinyCLIP(TinyCLIPConfig(text=TextEncoderConfig(width=16, depth=1, heads=2)))):
        with pytest.warns(DeprecationWarning, match="count_parameters"):
            assert model.num_parameters() == count_parameters(model)


def test_causal_text_tower_reads_only_earlier_tokens_and_defaults_off(tokenizer):
    torch.manual_seed(0)
    config = TextEncoderConfig(width=16, depth=2, heads=2, causal=True)
    encoder = TextEncoder(config).eval()
    ids, mask = tokenizer(["a red circle in the top left", "a red square in the top left"])
    out = encoder(ids, mask)
    same_prefix = 3  # <bos> a red: identical up to "circle"/"square"
    assert torch.equal(ids[0, :same_prefix], ids[1, :same_prefix]) and ids[0, same_prefix] != ids[1, same_prefix]
    torch.testing.assert_close(out.tokens[0, :same_prefix], out.tokens[1, :same_prefix])  # blind to what follows
    assert not torch.allclose(out.pooled[0], out.pooled[1])  # but <eos> has read the whole prompt
    bidirectional = TextEncoder(TextEncoderConfig(width=16, depth=2, heads=2)).eval()
    bidirectional.load_state_dict(encoder.state_dict())
    both = bidirectional(ids, mask)
    assert not torch.allclose(both.tokens[0, :same_prefix], both.tokens[1, :same_prefix])
    assert TextEncoderConfig().causal is False  # the shipped tower is bidirectional
    old = {k: v for k, v in TextEncoderConfig().to_dict().items() if k != "causal"}  # a JSON written before the field
    assert TextEncoderConfig.from_dict(old).causal is False
    with pytest.raises(ValueError, match="causal must be True or False"):
        TextEncoderConfig(causal=1)
