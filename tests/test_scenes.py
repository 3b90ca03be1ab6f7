"""Tests of Shapes scenes (one or two objects per image) and of object phrases with open attributes."""

import itertools
import random

import numpy as np
import pytest
import torch

from sdlearn import data
from sdlearn.data import (
    ATTRIBUTES,
    COLORS,
    CORNERS,
    HELDOUT_PAIRS,
    POSITION_CENTERS,
    POSITIONS,
    SHAPES,
    SIZE_PIXELS,
    SIZES,
    TEMPLATES,
    VOCABULARY,
    SceneBatch,
    ShapesBatch,
    ShapesDataset,
    caption_for,
    object_phrase,
    parse_prompt,
    render_batch,
    render_scene,
    render_scene_batch,
    render_shape,
    sample_batch,
    split_words,
)

N = 4000


def obj(color, shape="square", size="large", position="top left"):
    return dict(color=color, shape=shape, size=size, position=position)


def pairs_of(batch: SceneBatch) -> list[list[tuple[str, str]]]:
    """Each item's (colour, shape) pairs, object by object."""
    colors, shapes = batch.objects["color"].tolist(), batch.objects["shape"].tolist()
    return [[(list(COLORS)[c], SHAPES[s]) for c, s in zip(cs, ss) if c >= 0] for cs, ss in zip(colors, shapes)]


def reach_mask(o: dict, margin: float = 0.0) -> torch.Tensor:
    """[32, 32] bool: pixels an object can touch (its box, plus the ±1 px jitter and ``margin``)."""
    x, y = POSITION_CENTERS[o["position"]]
    reach = SIZE_PIXELS[o["size"]] / 2 + 1 + margin
    ys, xs = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    return ((xs - x).abs() <= reach + 0.5) & ((ys - y).abs() <= reach + 0.5)


@pytest.fixture(scope="module")
def scenes():
    return {split: ShapesDataset(N, split, seed=0, num_objects=2).batch(range(N)) for split in data.SPLITS}


# ---------------------------------------------------------------------------------------------- the rules


def test_two_object_scenes_use_two_corners_and_two_colours(scenes):
    for split, b in scenes.items():
        assert isinstance(b, SceneBatch) and b.images.shape == (N, 3, 32, 32)
        assert all(v.shape == (N, 2) and v.dtype == torch.long for v in b.objects.values())
        assert (b.objects["color"] >= 0).all()  # every item has its two objects
        position, color = b.objects["position"], b.objects["color"]
        assert (position[:, 0] != position[:, 1]).all() and (position < len(CORNERS)).all()  # never the centre
        assert (color[:, 0] != color[:, 1]).all()
        # Sizes, shapes and the 12 ordered corner pairs are all used, roughly evenly.
        corner_pairs = torch.bincount(position[:, 0] * 4 + position[:, 1], minlength=16)
        assert (corner_pairs.view(4, 4).diagonal() == 0).all() and corner_pairs.max() < 1.3 * N / 12, split
        assert corner_pairs.sum() - corner_pairs.view(4, 4).diagonal().sum() == N
        assert corner_pairs[corner_pairs > 0].min() > 0.7 * N / 12
        assert 0.45 < (b.objects["size"] == 0).float().mean() < 0.55
        assert set(b.objects["shape"].flatten().tolist()) == set(range(len(SHAPES)))


def test_train_scenes_never_show_a_heldout_pair_and_heldout_scenes_always_do(scenes):
    heldout = set(HELDOUT_PAIRS)
    train_pairs = [p for item in pairs_of(scenes["train"]) for p in item]
    assert not set(train_pairs) & heldout
    assert len(set(train_pairs)) == 28  # every other pair appears
    heldout_items = pairs_of(scenes["heldout"])
    assert all(set(item) & heldout for item in heldout_items)  # at least one object of a held-out pair
    assert {p for item in heldout_items for p in item} >= heldout
    assert any(set(item) <= heldout for item in heldout_items)  # both may be held out...
    assert any(not set(item) <= heldout for item in heldout_items)  # ...or only one
    assert len({p for item in pairs_of(scenes["all"]) for p in item}) == 32
    sampled = sample_batch(N, "train", torch.Generator().manual_seed(1), num_objects=2)
    assert not {p for item in pairs_of(sampled) for p in item} & heldout


def test_mixed_mode_is_half_each_and_its_one_object_items_are_the_one_object_datasets():
    mixed = ShapesDataset(N, "all", seed=3, num_objects=(1, 2)).batch(range(N))
    single = ShapesDataset(N, "all", seed=3).batch(range(N))
    one = mixed.objects["color"][:, 1] < 0  # [N]
    assert 0.46 < one.float().mean() < 0.54
    assert torch.equal(mixed.images[one], single.images[one])
    assert [c for c, o in zip(mixed.captions, one) if o] == [c for c, o in zip(single.captions, one) if o]
    for k in ATTRIBUTES:
        assert torch.equal(mixed.objects[k][one, 0], single.attributes[k][one])
        assert (mixed.objects[k][one, 1] == -1).all()
    two = mixed.objects["position"][~one]
    assert (two[:, 0] != two[:, 1]).all() and (two < 4).all()
    sampled = sample_batch(512, "train", torch.Generator().manual_seed(0), num_objects=(1, 2))
    assert 0.4 < (sampled.objects["color"][:, 1] < 0).float().mean() < 0.6


# ---------------------------------------------------------------------------------------------- determinism and items


@pytest.mark.parametrize("num_objects", [2, (1, 2)])
def test_scene_items_are_deterministic_in_any_order_and_batch_equals_indexing(num_objects):
    a, b = ShapesDataset(40, "train", 5, num_objects), ShapesDataset(40, "train", 5, num_objects)
    forward = [a[i] for i in range(40)]
    backward = [b[i] for i in reversed(range(40))][::-1]
    batch = a.batch(range(40))
    for j, (x, y) in enumerate(zip(forward, backward)):
        assert torch.equal(x["image"], y["image"]) and x["caption"] == y["caption"] and x["objects"] == y["objects"]
        assert torch.equal(batch.images[j], x["image"]) and batch.captions[j] == x["caption"]
        assert batch.item_objects(j) == x["objects"]
    other = ShapesDataset(40, "train", 6, num_objects).batch(range(40))
    assert not torch.equal(other.images, batch.images)
    first = sample_batch(8, "all", torch.Generator().manual_seed(2), num_objects=num_objects)
    again = sample_batch(8, "all", torch.Generator().manual_seed(2), num_objects=num_objects)
    assert torch.equal(first.images, again.images) and first.captions == again.captions


def test_items_carry_their_objects():
    single = ShapesDataset(5, seed=1)[2]
    assert single["objects"] == [single["attributes"]] and single["objects"][0] is single["attributes"]
    assert list(single) == ["image", "caption", "attributes", "objects"]
    pair = ShapesDataset(5, seed=1, num_objects=2)[2]
    assert list(pair) == ["image", "caption", "objects"] and len(pair["objects"]) == 2
    assert all(set(o) == set(ATTRIBUTES) for o in pair["objects"])
    b = ShapesDataset(5, seed=1).batch(range(5))
    assert isinstance(b, ShapesBatch) and b.item_objects(2) == [b.item_attributes(2)]
    assert torch.equal(b.objects["shape"][:, 0], b.attributes["shape"]) and (b.objects["shape"][:, 1] == -1).all()
    assert repr(ShapesDataset(5, seed=1, num_objects=(1, 2))) == \
        "ShapesDataset(n=5, split='train', seed=1, num_objects=(1, 2))"
    mixed = ShapesDataset(6, num_objects=(1, 2))
    loader = torch.utils.data.DataLoader(mixed, batch_size=6, collate_fn=list)
    assert [len(item["objects"]) for item in next(iter(loader))] == [len(mixed[i]["objects"]) for i in range(6)]


def test_two_object_captions_name_both_objects_in_the_vocabulary(scenes):
    b = scenes["train"]
    for j in range(500):
        words = split_words(b.captions[j])
        assert set(words) <= set(VOCABULARY), b.captions[j]
        first, second = b.item_objects(j)
        assert words.index(first["color"]) < words.index(second["color"])  # named in drawing order
        for o in (first, second):
            assert set(words) & set(data.SHAPE_WORDS[o["shape"]])


# ---------------------------------------------------------------------------------------------- rendering


def test_a_one_object_scene_is_the_single_object_image():
    for attrs in (obj("red", "circle", "small", "center"), obj("cyan", "triangle", "large", "bottom right")):
        assert torch.equal(render_scene([attrs]), render_shape(**attrs))
        assert torch.equal(render_scene([attrs], rng=7), render_shape(**attrs, rng=7))
    g = torch.Generator().manual_seed(0)
    rgb, xy = torch.rand(3, 3) * 20 - 10, torch.rand(3, 2) * 2 - 1
    names = (["red", "cyan", "white"], ["circle", "triangle", "square"], ["large", "small", "large"],
             ["center", "top left", "bottom right"])
    singles = render_batch(*names, rgb_offset=rgb, xy_offset=xy)
    scenes = render_scene_batch(*([[x, None] for x in v] for v in names), rgb_offset=torch.stack([rgb, rgb], 1),
                                xy_offset=torch.stack([xy, xy], 1))
    assert torch.equal(scenes, singles)  # an absent second object leaves every bit alone
    assert render_scene_batch(*([[x] for x in v] for v in names), g).shape == (3, 3, 32, 32)


def test_each_object_of_a_scene_is_its_single_render_away_from_the_other():
    b = ShapesDataset(300, "all", seed=4, num_objects=2).batch(range(300))
    g = torch.Generator().manual_seed(0)
    rgb, xy = torch.rand(300, 2, 3) * 20 - 10, torch.rand(300, 2, 2) * 2 - 1
    scenes = render_scene_batch(*(b.objects[k] for k in ATTRIBUTES), g, rgb_offset=rgb, xy_offset=xy)
    for k in range(2):
        alone = render_batch(*(b.objects[a][:, k] for a in ATTRIBUTES), rgb_offset=rgb[:, k], xy_offset=xy[:, k])
        for j in range(300):
            other = b.item_objects(j)[1 - k]
            away = ~reach_mask(other)  # pixels the other object cannot touch
            assert torch.equal(scenes[j][:, away], alone[j][:, away]), (j, k)
            assert (alone[j][:, away] > -1).any()  # and the object does show there
    # The dataset's own scenes: each object's colour shows, fully covered, away from the other one.
    for j in range(300):
        objects = b.item_objects(j)
        for k, o in enumerate(objects):
            region = reach_mask(o) & ~reach_mask(objects[1 - k])
            rgb = (b.images[j][:, region] + 1) / 2 * 255  # [3, pixels]
            base = torch.tensor(COLORS[o["color"]], dtype=torch.float32)[:, None]
            full = (rgb - base).abs().max(0).values <= 10 + 1e-3  # fully covered pixels, within the colour jitter
            assert full.sum() >= 3, (j, o)


def test_the_later_object_is_composited_over_the_earlier_with_its_coverage():
    a, b = obj("red", "square", "large", "top left"), obj("blue", "circle", "large", "top right")
    xy = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])  # push them together: the boxes overlap by 3 px
    idx = lambda objs: [[[o[k] for o in objs]] for k in ATTRIBUTES]
    ab = render_scene_batch(*idx([a, b]), jitter=False, xy_offset=xy)[0]
    ba = render_scene_batch(*idx([b, a]), jitter=False, xy_offset=xy.flip(1))[0]
    la = render_batch(*([a[k]] for k in ATTRIBUTES), jitter=False, xy_offset=xy[:, 0])[0] + 1  # α · colour
    lb = render_batch(*([b[k]] for k in ATTRIBUTES), jitter=False, xy_offset=xy[:, 1])[0] + 1
    alpha_b = lb[2] / (COLORS["blue"][2] * 2 / 255)  # [32, 32]
    alpha_a = la[0] / (COLORS["red"][0] * 2 / 255)
    assert torch.allclose(ab, lb + (1 - alpha_b) * la - 1, atol=1e-6)  # b over a
    assert torch.allclose(ba, la + (1 - alpha_a) * lb - 1, atol=1e-6)  # a over b
    overlap = (alpha_a > 0.99) & (alpha_b > 0.99)
    assert overlap.sum() >= 3
    assert torch.allclose(ab[:, overlap], lb[:, overlap] - 1) and torch.allclose(ba[:, overlap], la[:, overlap] - 1)
    assert torch.equal(ab[:, ~overlap & ((alpha_a == 0) | (alpha_b == 0))],
                       ba[:, ~overlap & ((alpha_a == 0) | (alpha_b == 0))])  # only the overlap depends on order
    assert (ab.max() <= 1) and (ab.min() >= -1)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("objects, message", [
    ([obj("red"), obj("blue")], "both objects are at the top left; two objects sit at two different corners"),
    ([obj("red", position="center"), obj("blue")], "at the center; two objects sit at two different corners, never"),
    ([obj("red"), obj("red", position="top right")], "both objects are red; the two objects of a scene have two "),
    ([obj("red"), obj("blue", position="top right"), obj("green", position="bottom left")], "at most two objects"),
    ([], "at least one"),
    (obj("red"), "a list of one or two attribute dicts"),
    ([{"color": "red", "shape": "circle"}], "attributes lack size, position"),
    ([obj("pink")], "unknown color 'pink'"),
])
def test_bad_scenes_raise_one_line_value_errors(objects, message):
    with pytest.raises(ValueError, match=message) as error:
        render_scene(objects)
    assert "\n" not in str(error.value)


def test_bad_scene_batches_and_num_objects_raise():
    with pytest.raises(ValueError, match="scene 1: both objects are blue"):
        render_scene_batch([[0, 1], [2, 2]], [[0, 0], [0, 0]], [[0, 0], [0, 0]], [[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="scene 0: an object of a two-object scene is at the center"):
        render_scene_batch([[0, 1], [2, 3]], [[0, 0], [0, 0]], [[0, 0], [0, 0]], [[4, 1], [2, 3]])
    with pytest.raises(ValueError, match="at most two objects"):
        render_scene_batch([[0, 1, 2]], [[0, 0, 0]], [[0, 0, 0]], [[0, 1, 2]])
    with pytest.raises(ValueError, match="every scene needs its first object"):
        render_scene_batch([[-1, 1]], [[-1, 0]], [[-1, 0]], [[-1, 1]])
    with pytest.raises(ValueError, match="all four of its attributes"):
        render_scene_batch([[0, 1]], [[0, -1]], [[0, 0]], [[0, 1]])
    for flat in (["red", "blue"], torch.tensor([0, 1])):
        with pytest.raises(ValueError, match=r"colors must be \[B, K\] \(scene, object\)"):
            render_scene_batch(flat, [[0, 0]], [[0, 0]], [[0, 1]])
    with pytest.raises(ValueError, match="same shape"):
        render_scene_batch([[0, 1]], [[0, 0], [0, 0]], [[0, 0]], [[0, 1]])
    with pytest.raises(ValueError, match=r"rgb_offset must be \[1, 2, 3\]"):
        render_scene_batch([[0, 1]], [[0, 0]], [[0, 0]], [[0, 1]], rgb_offset=torch.zeros(1, 3))
    with pytest.raises(ValueError, match="at most two objects; num_objects must be 1, 2 or"):
        ShapesDataset(10, num_objects=3)
    for bad in (0, True, "2", (2, 1), 1.5, 2.0):
        with pytest.raises(ValueError, match=r"num_objects must be 1, 2 or \(1, 2\)"):
            ShapesDataset(10, num_objects=bad)
    with pytest.raises(ValueError, match="num_objects must be"):
        sample_batch(4, num_objects=4)


# ---------------------------------------------------------------------------------------------- object phrases


def test_object_phrase_names_only_what_it_is_given():
    assert object_phrase({"color": "red", "shape": "circle"}) == "a red circle"
    assert object_phrase({"shape": "square", "position": "top left"}) == "a square in the top left"
    assert object_phrase({"shape": "diamond", "size": "small"}) == "a small diamond"
    assert object_phrase({"shape": "triangle"}) == "a triangle"
    full = obj("green", "triangle", "small", "bottom right")
    assert object_phrase(full) == caption_for(full) == "a small green triangle in the bottom right"
    assert set(data.PHRASE_TEMPLATES) <= set(TEMPLATES)  # no new words: the token ids stay


def test_every_object_phrase_reads_back_exactly_its_attributes():
    values = {k: data.ATTRIBUTE_VALUES[k] for k in ATTRIBUTES}
    seen = set()
    for shape in SHAPES:
        for kept in itertools.chain.from_iterable(itertools.combinations(("color", "size", "position"), r)
                                                  for r in range(4)):
            for choice in itertools.product(*(values[k] for k in kept)):
                attributes = {"shape": shape, **dict(zip(kept, choice))}
                for rng in (None, 0, 1, 2, random.Random(3), np.random.default_rng(4)):
                    phrase = object_phrase(attributes, rng)
                    assert parse_prompt(phrase) == attributes, (attributes, phrase)
                    assert set(split_words(phrase)) <= set(VOCABULARY), phrase
                    seen.add(phrase)
    assert len(seen) > 2000  # wording varies
    attributes = {"color": "blue", "shape": "circle", "position": "center"}
    assert object_phrase(attributes, 5) == object_phrase(attributes, 5)
    assert len({object_phrase(attributes, s) for s in range(60)}) > 8


@pytest.mark.parametrize("attributes, message", [
    ({"shape": "circle", "hue": "red"}, "unknown attribute.*'hue'"),
    ({"shape": "hexagon"}, "unknown shape 'hexagon'"),
    ({"shape": "circle", "position": "left"}, "unknown position 'left'"),
    ("a red circle", "attributes must be a dict"),
])
def test_bad_object_phrase_input_raises(attributes, message):
    with pytest.raises(ValueError, match=message):
        object_phrase(attributes)


def test_scene_api_is_exported():
    for name in ("render_scene", "render_scene_batch", "object_phrase", "SceneBatch", "CORNERS", "MAX_OBJECTS",
                 "PHRASE_TEMPLATES"):
        assert hasattr(data, name)
    assert CORNERS == POSITIONS[:4] and data.MAX_OBJECTS == 2 and SIZES == ("small", "large")
