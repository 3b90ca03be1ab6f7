"""The denoiser's latent window of scenes and the captions drawn for it (issue 13): one- and two-object scenes,
captions that leave attributes open (sdlearn.data.random_caption), caption dropout."""

import itertools

import pytest
import torch

from sdlearn.data import (
    ATTRIBUTE_VALUES,
    ATTRIBUTES,
    HELDOUT_PAIRS,
    MAX_CAPTION_WORDS,
    check_scene_objects,
    parse_caption,
)
from sdlearn.recipes import latent_batch_fn
from sdlearn.schedules import NoiseSchedule
from sdlearn.text import TextEncoder, TextEncoderConfig, Tokenizer
from sdlearn.vae import VAE, VAEConfig

TINY_VAE = VAEConfig(base_channels=8, channel_multipliers=(1, 2, 2), num_res_blocks=(0, 1, 1), norm_groups=4)
SCHEDULE = NoiseSchedule.from_name("scaled_linear")


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return VAE(TINY_VAE).eval()


@pytest.fixture(scope="module")
def text_encoder():
    torch.manual_seed(1)
    return TextEncoder(TextEncoderConfig(width=16, depth=1, heads=2)).eval()


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


def test_caption_dropout_gives_the_empty_prompt_and_every_other_caption_says_something(vae, text_encoder):
    batch_fn = latent_batch_fn(vae, SCHEDULE, 512, seed=0, text_encoder=text_encoder, tokenizer=Tokenizer(),
                                caption_dropout=0.1, window=64, refresh=4)
    empty = 0
    for step in range(3):
        batch = batch_fn(step)
        dropped = torch.tensor([c == "" for c in batch["captions"]])
        empty += int(dropped.sum())
        real_tokens = batch["mask"].sum(dim=1)
        assert (real_tokens[dropped] == 2).all()  # "" is <bos> <eos>
        assert (real_tokens[~dropped] >= 3).all()  # the shortest caption, everything open, is one word: "shape"
    assert 110 <= empty <= 200  # 1,536 draws at p = 0.1: 154 ± 12
