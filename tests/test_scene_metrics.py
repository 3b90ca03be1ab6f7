"""Metrics that fit scenes: prompt accuracy judged by a scene reader (one- and two-object prompts, binding errors
apart, a Wilson interval), open-attribute TV through the reader, and the Wilson interval itself.

The readers here are fakes whose readings the test controls (a :class:`SceneReader` whose ``predict`` returns a
given scene), so the scoring rules are checked exactly, whatever a trained reader would read."""

import math

import pytest
import torch

from sdlearn.data import ATTRIBUTE_VALUES, ShapesDataset, caption_for, random_caption, render_scene
from sdlearn.metrics import (
    PLACES,
    AttributeClassifier,
    ClassifierConfig,
    SceneReader,
    SceneReaderConfig,
    open_attribute_tv,
    prompt_accuracy,
    prompt_objects,
    scene_targets,
)
from sdlearn.stats import wilson_interval

FIELDS = ("color", "shape", "size")


def obj(color, shape, size="small", position="top left"):
    return {"color": color, "shape": shape, "size": size, "position": position}


class FakeReader(SceneReader):
    """Reads, for image j, exactly ``scenes[j]`` (a list of full attribute dicts), whatever the pixels."""

    def __init__(self, scenes):
        super().__init__(SceneReaderConfig(widths=(4,), feature_dim=4))
        self.scenes = scenes

    def predict(self, images, batch_size=512):
        assert len(images) == len(self.scenes)
        out = {name: torch.full((len(images), len(PLACES)), -1, dtype=torch.long) for name in FIELDS}
        for j, objects in enumerate(self.scenes):
            for o in objects:
                for name in FIELDS:
                    out[name][j, PLACES.index(o["position"])] = ATTRIBUTE_VALUES[name].index(o[name])
        return out


class OracleReader(SceneReader):
    """Reads a ShapesDataset batch's true scenes (set ``batch`` first)."""

    def __init__(self, batch):
        super().__init__(SceneReaderConfig(widths=(4,), feature_dim=4))
        self.batch = batch

    def predict(self, images, batch_size=512):
        return scene_targets(self.batch)


def blank(n):
    return torch.zeros(n, 3, 32, 32)


def test_binding_errors_are_counted_apart():
    prompt = "a red circle and a blue square"
    scenes = [
        [obj("red", "circle", position="top left"), obj("blue", "square", position="bottom right")],  # right
        [obj("blue", "circle", position="top left"), obj("red", "square", position="bottom right")],  # swapped colours
        [obj("red", "circle", position="top left"), obj("green", "square", position="bottom right")],  # a wrong colour
        [obj("red", "circle", position="top left")],  # one object missing
        [obj("blue", "square", position="top right"), obj("red", "circle", position="bottom left")],  # other order: right
    ]
    result = prompt_accuracy(blank(5), prompt, FakeReader(scenes))
    assert result.correct.tolist() == [True, False, False, False, True]
    assert result.binding.tolist() == [False, True, False, False, False]
    assert result.binding_errors == 1 and result.two_object_count == 5
    assert result.overall == pytest.approx(0.4) and result.object_count == pytest.approx(0.8)
    # each attribute on its own: colours match in images 0, 1, 4; shapes in 0, 1, 2, 4
    assert result.per_attribute == pytest.approx({"color": 0.6, "shape": 0.8})
    assert result.counts == {"color": 5, "shape": 5, "size": 0, "position": 0}
    assert result.interval == pytest.approx(wilson_interval(2, 5))
    text = str(result)
    assert "binding errors 1 of 5 two-object images" in text and "95% CI" in text
    assert len(result.read) == 5 and len(result.read[3]) == 1


def test_swapped_positions_and_shapes_are_binding_errors_too():
    scenes = [[obj("red", "square", position="top left"), obj("blue", "circle", position="bottom right")],
              [obj("red", "circle", position="bottom right"), obj("blue", "square", position="top left")]]
    prompts = ["a red circle and a blue square", "a red circle in the top left and a blue square in the bottom right"]
    result = prompt_accuracy(blank(2), prompts, FakeReader(scenes))
    assert result.correct.tolist() == [False, False] and result.binding.tolist() == [True, True]
    assert result.per_attribute["position"] == 1.0 and result.counts["position"] == 1


def test_partial_and_one_object_prompts_with_a_reader():
    scenes = [[obj("red", "circle", "large", "center")],
              [obj("red", "circle", "small", "top left"), obj("blue", "square", position="bottom left")],
              [obj("green", "diamond", "small", "bottom right")],
              []]
    result = prompt_accuracy(blank(4), ["a red circle", "a red shape", "a shape", "a shape"], FakeReader(scenes))
    # image 1 holds two objects where the prompt names one; image 3 none
    assert result.correct.tolist() == [True, False, True, False]
    assert result.binding_errors == 0 and result.two_object_count == 0 and "binding" not in str(result)
    assert result.per_attribute == {"color": 0.5, "shape": 1.0}
    assert result.counts == {"color": 2, "shape": 1, "size": 0, "position": 0}
    full = prompt_accuracy(blank(1), "a large red circle in the center", FakeReader(scenes[:1]))
    assert full.overall == 1.0 and set(full.per_attribute) == {"color", "shape", "size", "position"}
    wrong = prompt_accuracy(blank(1), "a small red circle in the center", FakeReader(scenes[:1]))
    assert wrong.overall == 0.0 and wrong.per_attribute["size"] == 0.0 and wrong.per_attribute["color"] == 1.0


def test_true_scenes_with_their_own_captions_score_one():
    data = ShapesDataset(64, "all", seed=3, num_objects=(1, 2))
    batch = data.batch(range(64))
    reader = OracleReader(batch)
    own = prompt_accuracy(batch.images, batch.captions, reader)
    assert own.overall == 1.0 and own.binding_errors == 0 and own.object_count == 1.0
    assert 0 < own.two_object_count < 64
    # partial captions of the same scenes (random_caption drops attributes): still all right
    rng = torch.Generator().manual_seed(0)
    partial = [random_caption(batch.item_objects(j), rng, open_fraction=1.0)[0] for j in range(64)]
    assert prompt_accuracy(batch.images, partial, reader).overall == 1.0
    shuffled = prompt_accuracy(batch.images, batch.captions[1:] + batch.captions[:1], reader)
    assert shuffled.overall < 0.3


def test_prompt_objects_and_bad_prompts():
    assert prompt_objects("a shape") == [{}]
    assert prompt_objects("a red circle and a blue object") == [{"color": "red", "shape": "circle"}, {"color": "blue"}]
    reader = FakeReader([[obj("red", "circle")]] * 3)
    x = blank(3)
    for bad in ("", "in the", "  !"):
        with pytest.raises(ValueError, match="names no attribute and no object"):
            prompt_accuracy(x, bad, reader)
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        prompt_accuracy(x, ["a red circle", "a blue square"], reader)
    with pytest.raises(ValueError, match="'giraffe'"):
        prompt_accuracy(x, "a red giraffe", reader)
    with pytest.raises(ValueError, match="prompt 0"):
        prompt_accuracy(x, "a red circle and a red square", reader)  # same colour twice
    with pytest.raises(ValueError, match="SceneReader, an AttributeClassifier"):
        prompt_accuracy(x, "a red circle", "resnet")
    classifier = AttributeClassifier(ClassifierConfig(widths=(4,), feature_dim=4))
    with pytest.raises(ValueError, match="names two objects.*SceneReader"):
        prompt_accuracy(x, "a red circle and a blue square", classifier)
    with pytest.raises(ValueError, match="names no attribute.*cannot count"):
        prompt_accuracy(x, "a shape", classifier)
    assert prompt_accuracy(x, "a red circle", classifier).count == 3  # one-object prompts: still judged


def test_open_attribute_tv_through_a_reader():
    scenes = [[obj("red", "circle", size, position)] for size in ("small", "large") for position in PLACES[:4]]
    scenes += [[], [obj("red", "circle"), obj("blue", "square", position="center")]]  # not one object: left out
    result = open_attribute_tv(blank(10), "a red circle", FakeReader(scenes))
    assert result.count == 8 and result.miscounted == 2 and "2 more not read as one object" in str(result)
    assert result.tv["size"] == pytest.approx(0.0)
    assert result.tv["position"] == pytest.approx(0.2)  # 4 of 5 places, ¼ each: ½ (4 · |¼ − ⅕| + ⅕)
    assert result.histogram["position"].tolist() == [2, 2, 2, 2, 0]
    with pytest.raises(ValueError, match="two objects"):
        open_attribute_tv(blank(10), "a red circle and a blue shape", FakeReader(scenes))
    empty = open_attribute_tv(blank(1), "a red circle", FakeReader([[]]))
    assert empty.count == 0 and math.isnan(empty.tv["size"])


def test_wilson_interval():
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    low, high = wilson_interval(256, 256)
    assert high == 1.0 and 0.98 < low < 0.99
    assert wilson_interval(81, 100, 0.99)[0] < wilson_interval(81, 100)[0]
    for bad, match in (((11, 10), "successes"), ((1, 0), "n must be"), ((1.5, 10), "successes")):
        with pytest.raises(ValueError, match=match):
            wilson_interval(*bad)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 2, 1.0)


def test_rendered_scene_fits_the_reader_interface():
    image = render_scene([obj("red", "circle", "large", "top left"), obj("blue", "square", "small", "bottom right")])
    image = image[None] if image.dim() == 3 else image
    prompt = caption_for({"objects": [obj("red", "circle", "large", "top left"),
                                      obj("blue", "square", "small", "bottom right")]}, 0)
    scenes = [[obj("red", "circle", "large", "top left"), obj("blue", "square", "small", "bottom right")]]
    assert prompt_accuracy(image, prompt, FakeReader(scenes)).overall == 1.0
