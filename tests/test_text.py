"""The text encoder: tokenizer round trips, specials, masks and warnings; the transformer's shapes and
padding invariance; the contrastive loss against a hand computation; TinyCLIP's temperature clamp, that
it learns, and the shipped weights' zero-shot accuracy."""

import itertools
import math
import random
import warnings

import pytest
import torch

from sdlearn import data, metrics
from sdlearn.checkpoint import count_parameters
from sdlearn.data import (
    ATTRIBUTES,
    MAX_CAPTION_WORDS,
    VOCABULARY,
    ShapesDataset,
    caption_for,
    caption_variants,
    parse_caption,
    parse_prompt,
    random_caption,
    sample_batch,
    split_words,
)
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
    captions_true_of,
    clip_batch,
    contrastive_loss,
    scene_table,
    soft_contrastive_loss,
    swapped_objects,
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
    assert tokenizer.vocab_size == 4 + len(VOCABULARY) == TextEncoderConfig().vocab_size == 44
    # room for the longest two-object caption (19 words) and <bos>, <eos>
    assert tokenizer.max_length == MAX_CAPTION_WORDS + 2 == TextEncoderConfig().max_length == 21


def test_every_caption_round_trips(tokenizer):
    attributes = ShapesDataset(1, "all", seed=0)[0]["attributes"]
    captions = caption_variants(attributes)  # every template and synonym for one object
    captions += [ShapesDataset(50, "all", seed=1)[i]["caption"] for i in range(50)]
    captions += [ShapesDataset(50, "all", seed=1, num_objects=2)[i]["caption"] for i in range(50)]  # "… and …"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a real caption never warns
        ids, mask = tokenizer.encode(captions)
    assert ids.shape == mask.shape == (len(captions), 21) and ids.dtype == torch.long and mask.dtype == torch.bool
    assert tokenizer.decode(ids) == [" ".join(split_words(c)) for c in captions]
    assert UNK_ID not in ids


def test_one_prompt_token_by_token(tokenizer):
    ids, mask = tokenizer("A big red disc, upper-left!")
    words = ["a", "big", "red", "disc", "upper", "left"]
    expected = [BOS_ID, *(tokenizer.token_to_id[w] for w in words), EOS_ID] + [PAD_ID] * 13
    assert ids.tolist() == [expected]
    assert mask.tolist() == [[True] * 8 + [False] * 13]
    assert tokenizer.tokens("A big red disc, upper-left!") == ["<bos>", *words, "<eos>"]
    assert tokenizer.decode(ids[0]) == "a big red disc upper left"  # 1-D ids → one string
    assert tokenizer.decode(ids[0].tolist()) == "a big red disc upper left"


def test_batch_encode_pads_each_prompt_to_max_length(tokenizer):
    ids, mask = tokenizer(["red", "a small blue square in the top left", ""])
    assert ids.shape == (3, 21)
    assert mask.sum(1).tolist() == [3, 10, 2]  # words + <bos> + <eos>
    assert (ids[~mask] == PAD_ID).all()
    assert ids[:, 0].tolist() == [BOS_ID] * 3
    assert ids[torch.arange(3), mask.sum(1) - 1].tolist() == [EOS_ID] * 3


def test_empty_prompt_is_bos_eos(tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids, mask = tokenizer("")
    assert ids[0, :3].tolist() == [BOS_ID, EOS_ID, PAD_ID]
    assert mask[0].tolist() == [True, True] + [False] * 19
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
    prompt = " ".join(["red"] * 25)
    with pytest.warns(UserWarning, match=r"25 words.*truncated"):
        ids, mask = tokenizer(prompt)
    assert mask.all() and ids[0, -1] == EOS_ID and ids[0, 0] == BOS_ID
    assert tokenizer.decode(ids[0]) == " ".join(["red"] * 19)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenizer(" ".join(["red"] * 19))  # exactly fits: no warning


def test_a_prompt_naming_three_objects_warns_and_is_still_encoded(tokenizer):
    prompt = "a red circle and a blue square and a green triangle"
    with pytest.warns(UserWarning, match=r"names 3 objects, but a Shapes scene holds at most 2") as record:
        ids, mask = tokenizer(prompt)
    assert len(record) == 1
    assert tokenizer.decode(ids[0]) == prompt and UNK_ID not in ids
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenizer(["a red circle and a blue square", "a shape and a object", "and"])  # at most one "and": quiet


def test_no_caption_is_ever_truncated(tokenizer):
    rng = random.Random(0)
    corners = [dict(zip(ATTRIBUTES, v)) for v in itertools.product(data.COLORS, data.SHAPES, data.SIZES, data.CORNERS)]
    captions = []
    for i in range(3000):
        a = rng.choice(corners)
        b = rng.choice([o for o in corners if o["color"] != a["color"] and o["position"] != a["position"]])
        captions.append(caption_for({"objects": [a, b]}, rng) if i % 2 else random_caption([a, b][: 1 + i % 3 // 2], rng)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither truncated nor unknown
        ids, mask = tokenizer(captions)
    assert mask.sum(1).max() == tokenizer.max_length  # the longest fills it exactly
    assert tokenizer.decode(ids) == [" ".join(split_words(c)) for c in captions]


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
    assert out.tokens.shape == (3, 21, 32) and out.pooled.shape == (3, 32) and out.mask.equal(mask)
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
    with pytest.raises(ValueError, match=r"mask must be a bool tensor \[1, 21\].*got dtype torch\.int64"):
        encoder(ids, mask.long())  # an integer mask is refused, as by the denoiser
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        encoder(ids, mask.float())
    with pytest.raises(ValueError, match=r"mask must be a bool tensor \[1, 21\]"):
        encoder(ids, mask[:, :8])
    with pytest.raises(ValueError, match="vocab_size"):
        encoder(ids + 100, mask)
    with pytest.raises(ValueError, match="1..21"):
        encoder(torch.ones(1, 22, dtype=torch.long), torch.ones(1, 22, dtype=torch.bool))
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


def test_soft_contrastive_loss_with_an_extra_caption_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])  # logits at scale 2: [[2, 1.2, 0], [0, 1.6, 2]]
    positives = torch.tensor([[True, False, False], [False, True, False]])  # caption 2: true of no image
    lse = lambda *x: math.log(sum(math.exp(v) for v in x))  # noqa: E731
    rows = (-2 + lse(2, 1.2, 0)) + (-1.6 + lse(0, 1.6, 2))  # the extra caption competes in each row
    cols = (-2 + lse(2, 0)) + (-1.6 + lse(1.2, 1.6))  # but has no image to pick: no column of its own
    expected = 0.5 * (rows / 2 + cols / 2)
    assert expected == pytest.approx(0.5228, abs=1e-4)
    assert soft_contrastive_loss(image, text, 2.0, positives).item() == pytest.approx(expected, rel=1e-6)
    # an extra caption true of image 1 shares its row's target and has a column of its own
    positives[1, 2] = True
    rows = (-2 + lse(2, 1.2, 0)) + (-(0.5 * 1.6 + 0.5 * 2) + lse(0, 1.6, 2))
    cols = (-2 + lse(2, 0)) + (-1.6 + lse(1.2, 1.6)) + (-2 + lse(0, 2))
    expected = 0.5 * (rows / 2 + cols / 3)
    assert soft_contrastive_loss(image, text, 2.0, positives).item() == pytest.approx(expected, rel=1e-6)


def old_soft_contrastive_loss(image_emb, text_emb, logit_scale, positives):
    """The loss as it was before extra captions ([B, B] only)."""
    logits = logit_scale * image_emb @ text_emb.T
    targets = positives.float()
    image_to_text = -(targets / targets.sum(1, keepdim=True) * logits.log_softmax(dim=1)).sum(1).mean()
    text_to_image = -(targets / targets.sum(0, keepdim=True) * logits.log_softmax(dim=0)).sum(0).mean()
    return 0.5 * (image_to_text + text_to_image)


def test_soft_contrastive_loss_with_extra_captions_is_the_old_one_plus_negatives_that_cost_when_scored_high():
    torch.manual_seed(3)
    images = torch.nn.functional.normalize(torch.randn(6, 8).abs(), dim=1)  # all in one orthant
    texts = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    positives = torch.eye(6, dtype=torch.bool) | (torch.rand(6, 6) < 0.2)
    base = soft_contrastive_loss(images, texts, 10.0, positives)
    assert base.item() == pytest.approx(old_soft_contrastive_loss(images, texts, 10.0, positives).item(), rel=1e-6)
    negatives = torch.cat([positives, torch.zeros(6, 1, dtype=torch.bool)], dim=1)  # [B, C = B + 1]
    direction = torch.nn.functional.normalize(torch.ones(1, 8), dim=1)  # scored alike by every image
    losses = []
    for c in (-3.0, -1.0, 0.0, 0.5, 1.0):
        loss = soft_contrastive_loss(images, torch.cat([texts, c * direction]), 10.0, negatives)
        assert torch.isfinite(loss) and loss >= base and (c < 0 or loss > base)
        losses.append(loss.item())
    assert losses == sorted(losses) and losses[0] - base.item() < 1e-3 < losses[-1] - base.item()  # cheap when scored low
    grad = torch.zeros(1, 8, requires_grad=True)
    soft_contrastive_loss(images, torch.cat([texts, direction + grad]), 10.0, negatives).backward()
    assert (grad.grad @ direction.T).item() > 0  # training pushes the negative's score down


# ---------------------------------------------------------------------------------------------- which captions are true


RED_CIRCLE_TL = {"color": "red", "shape": "circle", "size": "small", "position": "top left"}
BLUE_SQUARE_BR = {"color": "blue", "shape": "square", "size": "large", "position": "bottom right"}
RED_SQUARE_TR = {"color": "red", "shape": "square", "size": "large", "position": "top right"}
GREEN_CIRCLE_BL = {"color": "green", "shape": "circle", "size": "small", "position": "bottom left"}


def test_scene_table_marks_open_attributes_and_absent_objects():
    table = scene_table([[RED_CIRCLE_TL], [{"color": "blue"}, {}], [{"shape": "square", "position": "center"}]])
    assert table.shape == (3, 2, 4) and table.dtype == torch.long
    assert table[0].tolist() == [[0, 0, 0, 0], [-2, -2, -2, -2]]  # red circle small top-left; no second object
    assert table[1].tolist() == [[2, -1, -1, -1], [-1, -1, -1, -1]]
    assert table[2].tolist() == [[-1, 1, -1, 4], [-2, -2, -2, -2]]


def test_captions_true_of_hand_built_scenes():
    images = [[RED_CIRCLE_TL], [BLUE_SQUARE_BR, RED_CIRCLE_TL], [RED_SQUARE_TR, GREEN_CIRCLE_BL]]
    captions = [
        [{"color": "red"}],  # 0: one red object
        [{}],  # 1: any one object
        [{}, {}],  # 2: any two objects
        [{"color": "red", "shape": "circle"}, {"color": "blue"}],  # 3
        [{"color": "blue"}, {"color": "red", "shape": "circle"}],  # 4: 3 in the other order
        [{"color": "red", "shape": "circle"}, {}],  # 5: needs a red circle among two
        [{"color": "red"}, {"shape": "circle"}],  # 6: a red one and a circle: two different objects
        [{"color": "blue", "shape": "circle"}, {"color": "red", "shape": "square"}],  # 7: 3's binding swapped
        [{"position": "top right"}, {"position": "bottom left"}],  # 8
    ]
    got = captions_true_of(scene_table(captions), scene_table(images))
    expected = [
        [1, 1, 0, 0, 0, 0, 0, 0, 0],  # one object: only the one-object captions can be true
        [0, 0, 1, 1, 1, 1, 0, 0, 0],  # blue square + red circle: not "a red one and a circle" (one object each)
        [0, 0, 1, 0, 0, 0, 1, 0, 1],  # red square + green circle: "a red one and a circle", not "a red circle"
    ]
    assert got.dtype == torch.bool and got.tolist() == [[bool(v) for v in row] for row in expected]
    flipped = captions_true_of(scene_table([c[::-1] for c in captions]), scene_table([i[::-1] for i in images]))
    assert torch.equal(flipped, got)  # the order of the objects, in a caption or an image, does not matter


def test_swapped_objects_swaps_one_attribute_both_objects_name():
    red_circle, blue_square = {"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square", "size": "large"}
    seen = set()
    for seed in range(40):
        a, b = swapped_objects([red_circle, blue_square], torch.Generator().manual_seed(seed))
        assert a.keys() == red_circle.keys() and b.keys() == blue_square.keys()  # the same attributes named
        changed = [k for k in a if a[k] != red_circle[k]]
        assert len(changed) == 1 and b == {**blue_square, changed[0]: red_circle[changed[0]]}
        seen.add(changed[0])
    assert seen == {"color", "shape"}  # size is named by one object only: nothing to swap
    assert swapped_objects([red_circle]) is None  # one object
    assert swapped_objects([{"color": "red"}, {"shape": "square"}]) is None  # no attribute named by both
    assert swapped_objects([{"shape": "circle", "color": "red"}, {"shape": "circle"}]) is None  # both circles
    # a hard negative is false of the scene, unless the swap only reorders what is said
    scene = scene_table([[{**red_circle, "size": "small", "position": "top left"}, {**blue_square, "position": "top right"}]])
    negative = swapped_objects([red_circle, blue_square], torch.Generator().manual_seed(0))
    assert captions_true_of(scene_table([[red_circle, blue_square], negative]), scene).tolist() == [[True, False]]
    reordered = swapped_objects([{"color": "red"}, {"color": "blue"}])
    assert reordered == [{"color": "blue"}, {"color": "red"}]
    assert captions_true_of(scene_table([reordered]), scene).tolist() == [[True]]


def named_of(caption: str) -> list[dict]:
    parsed = parse_caption(caption)
    return parsed["objects"] if "objects" in parsed else [parsed]


def true_of(named: list[dict], objects: list[dict]) -> bool:
    """Independent of captions_true_of: one named dict per object, in some order."""
    return len(named) == len(objects) and any(
        all(o[k] == v for n, o in zip(named, order) for k, v in n.items())
        for order in itertools.permutations(objects))


def test_clip_batch_positives_are_exactly_the_captions_true_of_each_image(tokenizer):
    B = 64
    batch = clip_batch(B, torch.Generator().manual_seed(0))
    scenes = sample_batch(B, "train", torch.Generator().manual_seed(0), num_objects=(1, 2))  # clip_batch's first draw
    assert torch.equal(batch["images"], scenes.images)
    objects = [scenes.item_objects(j) for j in range(B)]
    assert {len(o) for o in objects} == {1, 2}
    captions = tokenizer.decode(batch["ids"])
    C = len(captions)
    assert batch["images"].shape == (B, 3, 32, 32) and batch["ids"].shape == batch["mask"].shape == (C, 21)
    assert batch["positives"].shape == (B, C) and batch["positives"].dtype == torch.bool
    named = [named_of(c) for c in captions]
    expected = torch.tensor([[true_of(n, o) for n in named] for o in objects])
    assert torch.equal(batch["positives"], expected)
    positives = batch["positives"]
    assert positives[:, :B].diagonal().all()  # caption i is image i's
    assert positives.sum() > B and not positives.all()  # Shapes batches do repeat, and partial captions fit many
    assert any(len(n[0]) < 4 for n in named[:B]) and any(len(n[0]) == 4 for n in named[:B])
    # one hard negative per two-object caption with an attribute both name differently, in the captions' order
    owners = [j for j in range(B) if len(named[j]) == 2 and
              any(k in named[j][0] and k in named[j][1] and named[j][0][k] != named[j][1][k] for k in ATTRIBUTES)]
    assert len(owners) == C - B > 5
    for k, j in enumerate(owners):
        (a, b), (na, nb) = named[j], named[B + k]
        swapped = [key for key in a if na[key] != a[key]]
        assert a.keys() == na.keys() and b.keys() == nb.keys() and len(swapped) == 1
        assert na == {**a, swapped[0]: b[swapped[0]]} and nb == {**b, swapped[0]: a[swapped[0]]}
        # false of its own image unless the swap leaves it true ("a red shape and a blue shape" reversed)
        assert positives[j, B + k] == true_of(named[B + k], objects[j])
    assert sum(not positives[j, B + k] for k, j in enumerate(owners)) >= 0.8 * len(owners)
    # options
    one = clip_batch(16, torch.Generator().manual_seed(1), num_objects=1, partial_fraction=0)
    assert one["positives"].shape == (16, 16) and all(len(named_of(c)) == 1 and len(named_of(c)[0]) == 4
                                                      for c in tokenizer.decode(one["ids"]))
    plain = clip_batch(16, torch.Generator().manual_seed(1), hard_negatives=False)
    assert plain["positives"].shape == (16, 16)


def test_there_is_one_table_of_attribute_values():
    assert ATTRIBUTE_VALUES is data.ATTRIBUTE_VALUES is metrics.CLASS_NAMES
    assert list(ATTRIBUTE_VALUES) == list(data.ATTRIBUTES)
    assert ATTRIBUTE_VALUES["color"] == tuple(data.COLORS) and ATTRIBUTE_VALUES["shape"] == data.SHAPES
    assert {k: len(v) for k, v in ATTRIBUTE_VALUES.items()} == metrics.NUM_CLASSES


def test_zero_shot_prompts_use_known_words():
    words = set(VOCABULARY)
    for attribute, values in ATTRIBUTE_VALUES.items():
        prompts = zero_shot_prompts(attribute)
        assert list(prompts) == list(values)
        assert all(set(split_words(p)) <= words for p in prompts.values())
        assert all(parse_prompt(p) == {attribute: v} for v, p in prompts.items())  # names that attribute only
    assert zero_shot_prompts("color")["red"] == "a red shape" and zero_shot_prompts("shape")["circle"] == "a circle"
    assert zero_shot_prompts("size")["small"] == "a small shape"
    assert zero_shot_prompts("position")["top left"] == "a shape in the top left"
    assert zero_shot_prompts("position")["center"] == "a shape in the center"


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


def test_causal_text_tower_reads_only_earlier_tokens_and_is_the_default(tokenizer):
    assert TextEncoderConfig().causal is True  # as CLIP's text tower (issue 13)
    torch.manual_seed(0)
    encoder = TextEncoder(TextEncoderConfig(width=16, depth=2, heads=2)).eval()
    ids, mask = tokenizer("a red circle in the top left and a blue square in the bottom right")
    n = int(mask.sum())
    reference = encoder(ids, mask)
    blue = tokenizer.token_to_id["blue"]
    for p in range(1, n - 1):  # change one word at a time (never <bos> or <eos>)
        changed = ids.clone()
        changed[0, p] = blue if ids[0, p] != blue else tokenizer.token_to_id["green"]
        out = encoder(changed, mask)
        torch.testing.assert_close(out.tokens[0, :p], reference.tokens[0, :p], rtol=0, atol=1e-6)  # blind to later words
        assert not torch.allclose(out.tokens[0, p], reference.tokens[0, p])
        assert not torch.allclose(out.pooled, reference.pooled)  # <eos> has read the whole prompt
    bidirectional = TextEncoder(TextEncoderConfig(width=16, depth=2, heads=2, causal=False)).eval()
    bidirectional.load_state_dict(encoder.state_dict())
    changed = ids.clone()
    changed[0, n - 2] = blue  # the last word
    before, after = bidirectional(ids, mask), bidirectional(changed, mask)
    assert not torch.allclose(before.tokens[0, 1], after.tokens[0, 1])  # every token reads every word


def test_text_config_json_without_causal_is_an_old_bidirectional_tower():
    old = {k: v for k, v in TextEncoderConfig().to_dict().items() if k != "causal"}  # a JSON written before the field
    assert TextEncoderConfig.from_dict(old).causal is False
    assert TextEncoderConfig.from_dict({**old, "causal": True}).causal is True
    assert TextEncoderConfig.from_dict(TextEncoderConfig().to_dict()) == TextEncoderConfig()
    clip = {**TinyCLIPConfig().to_dict(), "text": old}
    assert TinyCLIPConfig.from_dict(clip).text.causal is False
    with pytest.raises(ValueError, match="causal must be True or False"):
        TextEncoderConfig(causal=1)
