"""The scene reader: for each of the five places, empty or (colour, shape, size); its targets, loss, decoding,
training, saving and recipe."""

import pytest
import torch

from sdlearn.data import ATTRIBUTE_VALUES, ShapesDataset, sample_batch
from sdlearn.metrics import (
    PLACES,
    SceneReader,
    SceneReaderConfig,
    decode_scene,
    kid,
    scene_accuracy,
    scene_objects,
    scene_reader_loss,
    scene_targets,
)
from sdlearn.pretrained import load_scene_reader, save_scene_reader
from sdlearn.recipes import train_scene_reader

TINY = SceneReaderConfig(widths=(8, 16), feature_dim=32)
FIELDS = ("color", "shape", "size")


def index(attribute: str, value: str) -> int:
    return ATTRIBUTE_VALUES[attribute].index(value)


@pytest.fixture(scope="module")
def reader():
    torch.manual_seed(0)
    return SceneReader(TINY)


@pytest.fixture(scope="module")
def scenes():
    return ShapesDataset(16, "all", seed=5, num_objects=(1, 2)).batch(range(16))


def hand_made_objects():
    """Image 0: a small red circle top left and a large blue square bottom right; image 1: one small green
    triangle in the centre."""
    def column(attribute, first, second, third):
        return torch.tensor([[index(attribute, first), index(attribute, second)], [index(attribute, third), -1]])

    return {"color": column("color", "red", "blue", "green"), "shape": column("shape", "circle", "square", "triangle"),
            "size": column("size", "small", "large", "small"),
            "position": column("position", "top left", "bottom right", "center")}


def perfect_logits(targets):
    """Logits that say exactly ``targets`` (the tensor form), confidently."""
    occupied = targets["color"] >= 0  # [B, 5]
    logits = {"occupied": torch.where(occupied, 20.0, -20.0)}
    for name in FIELDS:
        k = len(ATTRIBUTE_VALUES[name])
        logits[name] = 40.0 * torch.nn.functional.one_hot(targets[name].clamp(min=0), k).float() - 20.0  # [B, 5, k]
    return logits


def test_outputs_have_the_documented_shapes(reader, scenes):
    logits = reader(scenes.images)
    assert {k: tuple(v.shape) for k, v in logits.items()} == {
        "occupied": (16, 5), "color": (16, 5, 8), "shape": (16, 5, 4), "size": (16, 5, 2)}
    assert reader.features(scenes.images).shape == (16, 32)
    predicted = reader.predict(scenes.images)
    assert set(predicted) == set(FIELDS) and all(v.shape == (16, 5) and v.dtype == torch.long for v in predicted.values())
    read = reader.read(scenes.images)
    assert len(read) == 16 and all(isinstance(objects, list) for objects in read)
    assert reader.training  # predict and read restore the mode they found


def test_targets_and_loss_on_a_hand_made_two_object_batch():
    targets = scene_targets(hand_made_objects())
    r, b, g = (index("color", c) for c in ("red", "blue", "green"))
    assert targets["color"].tolist() == [[r, -1, -1, b, -1], [-1, -1, -1, -1, g]]  # PLACES order: TL, TR, BL, BR, C
    assert targets["shape"].tolist() == [[0, -1, -1, 1, -1], [-1, -1, -1, -1, 2]]
    assert targets["size"].tolist() == [[0, -1, -1, 1, -1], [-1, -1, -1, -1, 0]]
    images = torch.zeros(2, 3, 32, 32)

    loss, logs = scene_reader_loss(lambda x: perfect_logits(targets), images, targets)
    assert loss.item() < 1e-6 and logs == {"acc_occupied": 1.0, "acc_color": 1.0, "acc_shape": 1.0, "acc_size": 1.0}
    wrong = perfect_logits(targets)
    wrong["color"][0, 0] = wrong["color"][0, 0].roll(1)  # the red circle read as another colour
    loss, logs = scene_reader_loss(lambda x: wrong, images, targets)
    assert loss.item() > 10 and logs["acc_color"] == pytest.approx(2 / 3) and logs["acc_shape"] == 1.0

    torch.manual_seed(0)
    loss, logs = scene_reader_loss(SceneReader(TINY), images, targets)
    assert torch.isfinite(loss) and loss.requires_grad and set(logs) == {"acc_occupied", "acc_color", "acc_shape", "acc_size"}


def test_decoding_perfect_logits_inverts_the_targets(scenes):
    targets = scene_targets(scenes)
    assert {k: v.tolist() for k, v in decode_scene(perfect_logits(targets)).items()} == {k: v.tolist() for k, v in targets.items()}
    place = {p: i for i, p in enumerate(PLACES)}
    for j, objects in enumerate(scene_objects(targets)):
        assert objects == sorted(scenes.item_objects(j), key=lambda o: place[o["position"]])
    assert {len(objects) for objects in scene_objects(targets)} == {1, 2}
    one = ShapesDataset(4, "all", seed=1).batch(range(4))  # a ShapesBatch: one object each
    assert [objects for objects in scene_objects(scene_targets(one))] == [one.item_objects(j) for j in range(4)]


def test_a_tiny_reader_learns_a_fixed_batch():
    batch = sample_batch(32, "all", torch.Generator().manual_seed(3), num_objects=(1, 2))
    targets = scene_targets(batch)
    torch.manual_seed(0)
    model = SceneReader(TINY)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss, logs = scene_reader_loss(model, batch.images, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.02 * losses[0], (losses[0], losses[-1])
    assert logs == {"acc_occupied": 1.0, "acc_color": 1.0, "acc_shape": 1.0, "acc_size": 1.0}


def test_save_and_load_round_trip(tmp_path, reader, scenes):
    save_scene_reader(reader, tmp_path / "scene_reader", training={"note": "test"})
    loaded = load_scene_reader(tmp_path)
    assert loaded.config == reader.config and not loaded.training and loaded.training_info == {"note": "test"}
    reader.eval()
    try:
        assert all(torch.equal(a, b) for a, b in zip(loaded(scenes.images).values(), reader(scenes.images).values()))
    finally:
        reader.train()


def test_the_recipe_writes_loadable_weights_and_resumes(tmp_path):
    options = dict(device="cpu", batch_size=8, progress=False, config=TINY)
    model, result = train_scene_reader(tmp_path, steps=2, **options)
    assert result.step == 2
    assert (tmp_path / "scene_reader.safetensors").is_file() and (tmp_path / "scene_reader.json").is_file()
    loaded = load_scene_reader(tmp_path)
    assert loaded.training_info["steps"] == 2
    assert set(loaded.training_info["eval_accuracy"]) == {"train", "heldout"}
    assert set(loaded.training_info["eval_accuracy"]["train"]) == {"occupied", "color", "shape", "size", "all"}
    _, resumed = train_scene_reader(tmp_path, steps=3, **options)
    assert resumed.start_step == 2 and resumed.step == 3


def test_scene_accuracy_and_kid_on_the_reader(reader):
    accuracy = scene_accuracy(reader, 32, "train", seed=0)
    assert set(accuracy) == {"occupied", "color", "shape", "size", "all"}
    assert all(0 <= v <= 1 for v in accuracy.values())
    real = ShapesDataset(8, "all", seed=0, num_objects=(1, 2)).batch(range(8)).images
    fake = ShapesDataset(8, "all", seed=1, num_objects=(1, 2)).batch(range(8)).images
    assert kid(real, fake, reader, bootstrap=10).num_real == 8  # its features serve the distribution metrics


def one_line_error(fn, match):
    with pytest.raises(ValueError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


def test_bad_input_raises_one_line_errors(reader):
    one_line_error(lambda: reader(torch.zeros(2, 1, 32, 32)), "3, 32, 32")
    one_line_error(lambda: reader.read(torch.zeros(2, 3, 16, 16)), "3, 32, 32")
    one_line_error(lambda: reader.features(torch.full((1, 3, 32, 32), float("nan"))), "NaN|finite")
    one_line_error(lambda: reader.predict(torch.zeros(1, 3, 32, 32), batch_size=0), "batch_size")
    objects = hand_made_objects()
    one_line_error(lambda: scene_targets({"color": objects["color"]}), "SceneBatch")
    one_line_error(lambda: scene_targets({**objects, "size": objects["size"][:, :1]}), r"long \[B, K\]")
    one_line_error(lambda: scene_targets({**objects, "shape": objects["shape"].clamp(min=0)}), "exactly where")
    one_line_error(lambda: scene_targets({**objects, "color": objects["color"] + 8}), "0..7")
    same_place = {**objects, "position": torch.tensor([[0, 0], [4, -1]])}
    one_line_error(lambda: scene_targets(same_place), "same place")
    targets = scene_targets(objects)
    one_line_error(lambda: scene_reader_loss(reader, torch.zeros(3, 3, 32, 32), targets), "targets")
    one_line_error(lambda: scene_accuracy(object(), 4), "SceneReader")
    one_line_error(lambda: SceneReaderConfig(widths=()), "SceneReaderConfig.widths")
    one_line_error(lambda: SceneReader(object()), "SceneReaderConfig")
    one_line_error(lambda: train_scene_reader(steps=1, batch_size=0, progress=False), "batch_size")
