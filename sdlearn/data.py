"""Data: the procedural Shapes dataset, a captioned image folder, and a bundled photograph.

Shapes is the course's stand-in for LAION: every image is a 32×32 RGB picture of one coloured
object on a black background, with an English caption that names its four attributes,

    colour (8) × shape (4) × size (2) × position (5),

e.g. "a large red circle in the top left". It is procedural (rendered on the fly, so infinite),
deterministic (the same seed and index always give the same item) and fast: images are drawn
by a vectorised batch renderer, :func:`render_batch`, so that data never limits training.

Rendering. Pixel coordinates run x to the right and y downwards; pixel ``i``
covers ``[i, i + 1)``. The object fills a square bounding box of 9 px (small) or 15 px (large)
centred at x, y ∈ {9, 23} for the corners and (16, 16) for the centre:

- circle: the box's inscribed disc (diameter = side);
- square: the box itself, axis-aligned;
- triangle: pointing up, apex at the middle of the box's top edge, base = the box's bottom edge
  (base = height = side);
- diamond: a square rotated by 45° whose two diagonals equal the side.

Anti-aliasing is by supersampling: each pixel is tested at a regular 4×4 grid of sub-pixel
points, and the fraction inside the shape is its coverage α ∈ [0, 1]. The pixel is then
α · colour over black. Jitter, drawn per image:

- colour: each RGB channel of the base colour (0..255) moves by a continuous uniform offset in
  [−10, +10] (then clipped to 0..255);
- position: the box's centre moves by a continuous uniform offset in [−1, +1] px along x and y
  (continuous rather than whole pixels, so sub-pixel placement and anti-aliasing both show).

Captions come from several templates and synonyms; :func:`parse_caption` is their exact inverse.
Four (colour, shape) pairs are held out of ``split="train"`` to measure compositional
generalisation: ``HELDOUT_PAIRS``.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import matplotlib.cbook
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

# ----------------------------------------------------------------------------------------------
# The attributes and their exact values

IMAGE_SIZE = 32
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "orange": (240, 140, 30),
    "cyan": (40, 200, 210),
    "white": (235, 235, 235),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
SIZE_PIXELS: dict[str, int] = {"small": 9, "large": 15}  # side of the bounding box
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
POSITION_CENTERS: dict[str, tuple[float, float]] = {  # (x, y) of the bounding box's centre
    "top left": (9.0, 9.0),
    "top right": (23.0, 9.0),
    "bottom left": (9.0, 23.0),
    "bottom right": (23.0, 23.0),
    "center": (16.0, 16.0),
}
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("purple", "triangle"),
    ("orange", "diamond"),
    ("cyan", "circle"),
    ("white", "square"),
)
SPLITS: tuple[str, ...] = ("train", "heldout", "all")
ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size", "position")

COLOR_JITTER = 10.0  # ± per RGB channel, in 0..255 units, uniform
POSITION_JITTER = 1.0  # ± px along x and y, uniform
SUPERSAMPLE = 4  # sub-pixel samples per pixel along each axis (4×4 = 16 per pixel)

ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {  # the one table of every attribute's values, in index order
    "color": tuple(COLORS),
    "shape": SHAPES,
    "size": SIZES,
    "position": POSITIONS,
}
_COLOR_TABLE = torch.tensor(list(COLORS.values()), dtype=torch.float32)  # [8, 3]
_HALF_SIDE = torch.tensor([SIZE_PIXELS[s] / 2 for s in SIZES], dtype=torch.float32)  # [2]
_CENTER_TABLE = torch.tensor([POSITION_CENTERS[p] for p in POSITIONS], dtype=torch.float32)  # [5, 2]


def _check_name(kind: str, name) -> int:
    """Index of ``name`` among the valid values of attribute ``kind``; a clear ValueError otherwise."""
    names = ATTRIBUTE_VALUES[kind]
    if isinstance(name, str) and name in names:
        return names.index(name)
    raise ValueError(f"unknown {kind} {name!r}; expected one of: {', '.join(names)}")


def _pairs_for(split: str) -> list[tuple[int, int]]:
    """The (colour index, shape index) pairs a split draws from."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")
    colors = ATTRIBUTE_VALUES["color"]
    heldout = {(colors.index(c), SHAPES.index(s)) for c, s in HELDOUT_PAIRS}
    every = [(c, s) for c in range(len(colors)) for s in range(len(SHAPES))]
    if split == "train":
        return [pair for pair in every if pair not in heldout]
    if split == "heldout":
        return [pair for pair in every if pair in heldout]
    return every


# ----------------------------------------------------------------------------------------------
# The vectorised renderer

# The object (at most 15 px plus jitter) always fits a 16×16 pixel window whose corner is
# floor(box corner), so only that window is supersampled and then pasted into the 32×32 canvas.
_WINDOW = 16
_SUBPIXEL = (torch.arange(_WINDOW * SUPERSAMPLE, dtype=torch.float32) + 0.5) / SUPERSAMPLE  # [64]


def _inside_circle(u, v, h):  # u: [b, 1, W·S] (x offsets), v: [b, W·S, 1] (y offsets), h: [b, 1, 1]
    return u * u + v * v <= h * h


def _inside_square(u, v, h):
    return (u.abs() <= h) & (v.abs() <= h)


def _inside_triangle(u, v, h):
    # Apex (0, −h), base from (−h, h) to (h, h): the half-width at height v is (v + h) / 2.
    return (2 * u.abs() - v <= h) & (v <= h)


def _inside_diamond(u, v, h):
    return u.abs() + v.abs() <= h


_INSIDE = (_inside_circle, _inside_square, _inside_triangle, _inside_diamond)  # in SHAPES order


def _as_indices(values, kind: str) -> torch.Tensor:
    """Attribute values (names, or integer indices) → a long tensor ``[B]`` of indices."""
    names = ATTRIBUTE_VALUES[kind]
    if isinstance(values, (str, int)):
        values = [values]
    if isinstance(values, torch.Tensor | np.ndarray):
        idx = torch.as_tensor(values).reshape(-1)
        if idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise ValueError(f"{kind} indices must be integers, got dtype {idx.dtype}")
        idx = idx.long()
    else:
        values = list(values)
        idx = torch.tensor([_check_name(kind, x) if isinstance(x, str) else int(x) for x in values],
                           dtype=torch.long)
    if idx.numel() and (idx.min() < 0 or idx.max() >= len(names)):
        raise ValueError(f"{kind} indices must lie in 0..{len(names) - 1} ({', '.join(names)}), "
                         f"got {idx.min().item()}..{idx.max().item()}")
    return idx


def random_jitter(batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the per-image jitter: ``rgb_offset`` [B, 3] uniform in ±10 and ``xy_offset`` [B, 2] uniform in ±1 px."""
    u = torch.rand(batch_size, 5, generator=generator)  # [B, 5]
    return (2 * u[:, :3] - 1) * COLOR_JITTER, (2 * u[:, 3:] - 1) * POSITION_JITTER


def render_batch(
    colors,
    shapes,
    sizes,
    positions,
    generator: torch.Generator | None = None,
    *,
    jitter: bool = True,
    rgb_offset: torch.Tensor | None = None,
    xy_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Render a batch of Shapes images → float32 ``[B, 3, 32, 32]`` in [-1, 1].

    ``colors``, ``shapes``, ``sizes``, ``positions``: length-B sequences (or tensors/arrays) of
    indices into ``COLORS``/``SHAPES``/``SIZES``/``POSITIONS``, or of the names themselves.
    Jitter: an explicit ``rgb_offset`` [B, 3] (0..255 units) or ``xy_offset`` [B, 2] (px) is used
    as given; one left out is drawn with :func:`random_jitter` from ``generator`` (torch's global
    generator if None) when ``jitter=True``, and is zero when ``jitter=False``.

    The function of its inputs is pure and per-image: an image does not depend on what else is
    in the batch, bit for bit.
    """
    c, s, z, p = (_as_indices(v, k) for v, k in zip((colors, shapes, sizes, positions), ATTRIBUTES))
    B = c.numel()
    if not (s.numel() == z.numel() == p.numel() == B):
        raise ValueError(f"colors, shapes, sizes and positions must have the same length, got "
                         f"{B}, {s.numel()}, {z.numel()}, {p.numel()}")
    drawn_rgb, drawn_xy = (random_jitter(B, generator) if jitter and (rgb_offset is None or xy_offset is None)
                           else (torch.zeros(B, 3), torch.zeros(B, 2)))
    rgb_offset = drawn_rgb if rgb_offset is None else torch.as_tensor(rgb_offset, dtype=torch.float32)
    xy_offset = drawn_xy if xy_offset is None else torch.as_tensor(xy_offset, dtype=torch.float32)
    if rgb_offset.shape != (B, 3) or xy_offset.shape != (B, 2):
        raise ValueError(f"rgb_offset must be [{B}, 3] and xy_offset [{B}, 2], got "
                         f"{list(rgb_offset.shape)} and {list(xy_offset.shape)}")

    rgb = (_COLOR_TABLE[c] + rgb_offset).clamp(0, 255)  # [B, 3]
    center = _CENTER_TABLE[p] + xy_offset  # [B, 2] (x, y)
    half = _HALF_SIDE[z]  # [B]
    corner = torch.floor(center - half[:, None]).clamp(0, IMAGE_SIZE - _WINDOW)  # [B, 2] window origin, px
    offsets = corner[:, :, None] + _SUBPIXEL - center[:, :, None]  # [B, 2, W·S] sample − centre

    # Coverage of every window pixel: the fraction of its S×S sub-pixel samples inside the shape.
    S, W = SUPERSAMPLE, _WINDOW
    coverage = torch.empty(B, W, W)  # [B, W, W]
    for k, inside in enumerate(_INSIDE):
        sel = (s == k).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        u = offsets[sel, 0][:, None, :]  # [b, 1, W·S] x offsets (columns)
        v = offsets[sel, 1][:, :, None]  # [b, W·S, 1] y offsets (rows)
        mask = inside(u, v, half[sel][:, None, None])  # [b, W·S, W·S] bool
        hits = mask.view(-1, W, S, W, S).sum(dim=(2, 4), dtype=torch.float32)  # [b, W, W]
        coverage[sel] = hits / (S * S)

    # Paste each window into its place on a black 32×32 canvas.
    canvas = torch.zeros(B, IMAGE_SIZE, IMAGE_SIZE)  # [B, 32, 32]
    window = torch.arange(W)
    ox, oy = corner.long().unbind(1)  # [B], [B]
    rows = (oy[:, None] + window)[:, :, None]  # [B, W, 1]
    cols = (ox[:, None] + window)[:, None, :]  # [B, 1, W]
    canvas[torch.arange(B)[:, None, None], rows, cols] = coverage

    # α · colour over black, mapped from 0..255 to [-1, 1]: black is -1.
    return canvas[:, None] * (rgb * (2 / 255))[:, :, None, None] - 1  # [B, 3, 32, 32]


def _uniforms_from(rng, count: int) -> list[float]:
    """``count`` uniforms in [0, 1) from any of the random sources this module accepts."""
    if isinstance(rng, torch.Generator):
        return torch.rand(count, generator=rng, dtype=torch.float64).tolist()
    if isinstance(rng, np.random.Generator):
        return rng.random(count).tolist()
    if isinstance(rng, random.Random):
        return [rng.random() for _ in range(count)]
    if isinstance(rng, int) and not isinstance(rng, bool):
        return _uniforms_from(random.Random(rng), count)
    raise ValueError(f"rng must be None, an int seed, random.Random, numpy.random.Generator or "
                     f"torch.Generator, got {type(rng).__name__}")


def render_shape(color: str, shape: str, size: str, position: str, rng=None) -> torch.Tensor:
    """Render one Shapes image → ``[3, 32, 32]`` in [-1, 1].

    With ``rng=None`` the object is drawn exactly at its nominal colour and position (no jitter);
    with ``rng`` (an int seed, ``random.Random``, ``numpy.random.Generator`` or ``torch.Generator``)
    the colour and position jitter are drawn from it, deterministically.
    """
    idx = [_check_name(k, v) for k, v in zip(ATTRIBUTES, (color, shape, size, position))]
    if rng is None:
        return render_batch(*([i] for i in idx), jitter=False)[0]
    u = torch.tensor(_uniforms_from(rng, 5), dtype=torch.float32)  # [5]
    rgb_offset = ((2 * u[:3] - 1) * COLOR_JITTER)[None]  # [1, 3]
    xy_offset = ((2 * u[3:] - 1) * POSITION_JITTER)[None]  # [1, 2]
    return render_batch(*([i] for i in idx), rgb_offset=rgb_offset, xy_offset=xy_offset)[0]


# ----------------------------------------------------------------------------------------------
# Captions

# Synonyms; the first of each list is the canonical word.
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
SHAPE_WORDS = {
    "circle": ("circle", "disc"),
    "square": ("square",),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
}
VERTICAL_WORDS = {"top": ("top", "upper"), "bottom": ("bottom", "lower")}
HORIZONTAL_WORDS = ("left", "right")
CENTER_WORDS = ("center", "centre", "middle")
# Templates; the first is the canonical one. {place} is a position phrase such as "top left",
# "upper left corner" or "middle".
TEMPLATES: tuple[str, ...] = (
    "a {size} {color} {shape} in the {place}",
    "a {size} {color} {shape} at the {place}",
    "{size} {color} {shape}, {place}",
    "there is a {size} {color} {shape} in the {place}",
    "in the {place}, a {size} {color} {shape}",
    "a {color} {shape}, {size}, {place}",
    "a picture of a {size} {color} {shape} in the {place}",
)


def place_phrases(position: str) -> tuple[str, ...]:
    """Every phrase naming a position, canonical first ("top left", "top left corner", "upper left", ...)."""
    if position == "center":
        return CENTER_WORDS
    vertical, horizontal = position.split()
    return tuple(f"{v} {horizontal}{corner}" for v in VERTICAL_WORDS[vertical] for corner in ("", " corner"))


def split_words(text: str) -> list[str]:
    """Lower-case ``text`` and split it into words; punctuation and digits separate words and are dropped."""
    return re.findall(r"[a-z]+", text.lower())


def _check_attributes(attributes) -> tuple[str, str, str, str]:
    if not isinstance(attributes, dict):
        raise ValueError(f"attributes must be a dict with keys {', '.join(ATTRIBUTES)}, "
                         f"got {type(attributes).__name__}")
    missing = [k for k in ATTRIBUTES if k not in attributes]
    if missing:
        raise ValueError(f"attributes lack {', '.join(missing)}; expected keys {', '.join(ATTRIBUTES)}")
    for k in ATTRIBUTES:
        _check_name(k, attributes[k])
    return tuple(attributes[k] for k in ATTRIBUTES)


def _choices(attributes) -> tuple[tuple[str, ...], ...]:
    """The independent choices a caption makes: template, size word, shape word, place phrase."""
    color, shape, size, position = _check_attributes(attributes)
    return TEMPLATES, SIZE_WORDS[size], SHAPE_WORDS[shape], place_phrases(position)


def _fill(color: str, template: str, size_word: str, shape_word: str, place: str) -> str:
    return template.format(size=size_word, color=color, shape=shape_word, place=place)


def _caption_from_uniforms(attributes, u: Sequence[float]) -> str:
    """The caption picked by four uniforms in [0, 1) (template, size word, shape word, place)."""
    choices = _choices(attributes)
    picked = [opts[min(int(x * len(opts)), len(opts) - 1)] for opts, x in zip(choices, u)]
    return _fill(attributes["color"], *picked)


def caption_for(attributes: dict, rng=None) -> str:
    """An English caption for ``attributes`` (a dict with color, shape, size, position).

    ``rng=None`` gives the canonical caption "a {size} {color} {shape} in the {position}", e.g.
    "a large red circle in the top left" or "a small blue diamond in the center". With ``rng``
    (an int seed, ``random.Random``, ``numpy.random.Generator`` or ``torch.Generator``) a
    template and synonyms are drawn from it, e.g. "big red circle, upper left corner".
    """
    if rng is None:
        return _caption_from_uniforms(attributes, (0.0, 0.0, 0.0, 0.0))
    return _caption_from_uniforms(attributes, _uniforms_from(rng, 4))


def caption_variants(attributes: dict) -> list[str]:
    """Every caption :func:`caption_for` can produce for ``attributes``, canonical first."""
    return [_fill(attributes["color"], *picked) for picked in itertools.product(*_choices(attributes))]


# Each word's role when reading a caption back.
_WORD_ROLE: dict[str, tuple[str, str]] = {}
for _color in COLORS:
    _WORD_ROLE[_color] = ("color", _color)
for _size, _words in SIZE_WORDS.items():
    _WORD_ROLE.update({w: ("size", _size) for w in _words})
for _shape, _words in SHAPE_WORDS.items():
    _WORD_ROLE.update({w: ("shape", _shape) for w in _words})
for _vertical, _words in VERTICAL_WORDS.items():
    _WORD_ROLE.update({w: ("vertical", _vertical) for w in _words})
_WORD_ROLE.update({w: ("horizontal", w) for w in HORIZONTAL_WORDS})
_WORD_ROLE.update({w: ("position", "center") for w in CENTER_WORDS})
_FILLER_WORDS = sorted({w for t in TEMPLATES for w in split_words(re.sub(r"\{\w+\}", " ", t))} | {"corner"})
_WORD_ROLE.update({w: ("filler", w) for w in _FILLER_WORDS})
VOCABULARY: list[str] = sorted(_WORD_ROLE)
"""Every word a caption can contain (lower case, as :func:`split_words` splits them), sorted."""


def parse_prompt(text: str) -> dict[str, str]:
    """The attributes a (possibly partial) prompt names: "a red circle" → {"color": "red", "shape": "circle"}.

    Case and punctuation are ignored and synonyms understood ("Big red disc, upper-left!").
    Raises ``ValueError`` naming any word outside ``VOCABULARY``, a prompt naming two values of
    one attribute, or half a position ("left" alone: a position is a corner or the centre).
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a caption string, got {type(text).__name__}")
    words = split_words(text)
    unknown = [w for w in words if w not in _WORD_ROLE]
    if unknown:
        raise ValueError(f"cannot place the word(s) {', '.join(repr(w) for w in dict.fromkeys(unknown))} "
                         f"in {text!r}; known words: {', '.join(VOCABULARY)}")
    found: dict[str, str] = {}
    for word in words:
        role, value = _WORD_ROLE[word]
        if role == "filler":
            continue
        if role in found and found[role] != value:
            raise ValueError(f"{text!r} names two {role}s: {found[role]!r} and {value!r}")
        found[role] = value
    vertical, horizontal = found.pop("vertical", None), found.pop("horizontal", None)
    if vertical or horizontal:
        if "position" in found:
            raise ValueError(f"{text!r} names two positions: 'center' and "
                             f"{' '.join(x for x in (vertical, horizontal) if x)!r}")
        if not (vertical and horizontal):
            raise ValueError(f"{text!r} names half a position ({vertical or horizontal!r}); "
                             f"expected one of: {', '.join(POSITIONS)}")
        found["position"] = f"{vertical} {horizontal}"
    return {k: found[k] for k in ATTRIBUTES if k in found}


def parse_caption(text: str) -> dict[str, str]:
    """The inverse of :func:`caption_for`: caption → {"color", "shape", "size", "position"}.

    Accepts every template and synonym (and ignores case and punctuation). Raises ``ValueError``
    naming the words it cannot place, or the attributes the caption does not state.
    """
    found = parse_prompt(text)
    missing = [k for k in ATTRIBUTES if k not in found]
    if missing:
        raise ValueError(f"caption {text!r} does not state its {', '.join(missing)} "
                         f"(expected e.g. {caption_for({'color': 'red', 'shape': 'circle', 'size': 'large', 'position': 'top left'})!r})")
    return found


# ----------------------------------------------------------------------------------------------
# The dataset: counter-based randomness, so item i depends only on (n, split, seed, i)

_STREAMS = 12  # uniforms per item: pair, size, position, 3 × colour jitter, 2 × position jitter, 4 × caption
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele et al. 2014): a bijective, well-mixing hash of uint64s."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _hashed_uniforms(seed: int, indices: np.ndarray) -> np.ndarray:
    """Uniforms in [0, 1), float64 ``[len(indices), _STREAMS]``, a pure function of (seed, index, stream)."""
    key = _mix64(np.array([seed % 2**64], dtype=np.uint64))  # [1]
    state = _mix64(key + indices.astype(np.uint64) * _GOLDEN)[:, None]  # [N, 1]
    streams = np.arange(1, _STREAMS + 1, dtype=np.uint64) * _GOLDEN  # [K]
    bits = _mix64(state + streams)  # [N, K]
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


class ShapesBatch(NamedTuple):
    """A batch of Shapes items. ``attributes`` maps each attribute name to a long tensor ``[B]`` of
    indices into ``COLORS``/``SHAPES``/``SIZES``/``POSITIONS`` (what a classifier trains on)."""

    images: torch.Tensor  # [B, 3, 32, 32] in [-1, 1]
    captions: list[str]
    attributes: dict[str, torch.Tensor]

    def item_attributes(self, j: int) -> dict[str, str]:
        """The attributes of item ``j`` as names, e.g. {"color": "red", ...}."""
        return {k: ATTRIBUTE_VALUES[k][int(self.attributes[k][j])] for k in ATTRIBUTES}


def _make_batch(u: np.ndarray, split: str) -> ShapesBatch:
    """Turn per-item uniforms ``[B, _STREAMS]`` into images, captions and attributes."""
    pairs = np.array(_pairs_for(split))  # [P, 2]
    pick = lambda x, n: np.minimum((x * n).astype(np.int64), n - 1)
    pair = pairs[pick(u[:, 0], len(pairs))]  # [B, 2]
    idx = {
        "color": torch.from_numpy(pair[:, 0].copy()),
        "shape": torch.from_numpy(pair[:, 1].copy()),
        "size": torch.from_numpy(pick(u[:, 1], len(SIZES))),
        "position": torch.from_numpy(pick(u[:, 2], len(POSITIONS))),
    }
    jitter = torch.from_numpy(2 * u[:, 3:8] - 1).float()  # [B, 5] in [-1, 1)
    images = render_batch(*(idx[k] for k in ATTRIBUTES),
                          rgb_offset=jitter[:, :3] * COLOR_JITTER, xy_offset=jitter[:, 3:] * POSITION_JITTER)
    columns = [[ATTRIBUTE_VALUES[k][i] for i in idx[k].tolist()] for k in ATTRIBUTES]
    captions = [_caption_from_uniforms(dict(zip(ATTRIBUTES, names)), uc)
                for names, uc in zip(zip(*columns), u[:, 8:12].tolist())]
    return ShapesBatch(images, captions, idx)


def sample_batch(batch_size: int, split: str = "train", generator: torch.Generator | None = None) -> ShapesBatch:
    """Fresh random Shapes items for a training loop, with no DataLoader in between.

    Returns ``ShapesBatch(images [B, 3, 32, 32], captions, attributes)``; unpacks as a tuple.
    Draws from ``generator`` (torch's global generator if None).
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    _pairs_for(split)  # validates the split name
    u = torch.rand(batch_size, _STREAMS, generator=generator, dtype=torch.float64).numpy()
    return _make_batch(u, split)


class ShapesDataset(Dataset):
    """``n`` captioned Shapes images: ``ds[i]`` → {"image": [3, 32, 32], "caption": str, "attributes": dict}.

    ``split``: "train" (every (colour, shape) pair except ``HELDOUT_PAIRS``), "heldout" (only
    those four pairs) or "all". Each item's randomness (attributes, jitter, caption wording) is a
    counter-based hash of ``(seed, i)``: items are uniform over the split's pairs, sizes and
    positions, cost no memory until read, and the same ``(n, split, seed, i)`` always gives the
    same item whatever the access order. ``ds.batch(indices)`` renders many at once, identically.
    """

    def __init__(self, n: int, split: str = "train", seed: int = 0):
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n <= 0:
            raise ValueError(f"n must be a positive integer (the number of items), got {n!r}")
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        _pairs_for(split)  # validates the split name
        self.n, self.split, self.seed = int(n), split, int(seed)

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"ShapesDataset(n={self.n}, split={self.split!r}, seed={self.seed})"

    def _indices(self, indices: Iterable[int]) -> np.ndarray:
        idx = np.asarray(indices if isinstance(indices, torch.Tensor | np.ndarray) else list(indices)).reshape(-1)
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"indices must be integers, got dtype {idx.dtype}")
        idx = idx.astype(np.int64)
        bad = idx[(idx < -self.n) | (idx >= self.n)]
        if bad.size:
            raise IndexError(f"index {int(bad[0])} out of range for {self!r}")
        return np.where(idx < 0, idx + self.n, idx)

    def batch(self, indices: Iterable[int]) -> ShapesBatch:
        """Items ``indices`` rendered in one vectorised pass; ``batch([i]).images[0]`` equals ``ds[i]["image"]``."""
        return _make_batch(_hashed_uniforms(self.seed, self._indices(indices)), self.split)

    def __getitem__(self, i: int) -> dict:
        if isinstance(i, bool) or not isinstance(i, int | np.integer):
            raise TypeError(f"ShapesDataset indices must be integers, got {type(i).__name__}")
        b = self.batch([int(i)])
        return {"image": b.images[0], "caption": b.captions[0], "attributes": b.item_attributes(0)}


# ----------------------------------------------------------------------------------------------
# Real images: a captioned folder and a bundled photograph

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _check_size(size) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive integer (pixels), got {size!r}")


def _pil_to_tensor(image, size: int | None) -> torch.Tensor:
    """PIL image → ``[3, H, W]`` float32 in [-1, 1]; with ``size``, centre-cropped to a square and
    resized to size×size (bicubic, which PIL low-pass filters when shrinking)."""
    image = image.convert("RGB")
    if size is not None:
        w, h = image.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32)  # [H, W, 3] in 0..255
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1  # [3, H, W]


class ImageFolderDataset(Dataset):
    """A folder of your own images (png, jpg, jpeg, bmp, webp; subfolders included), as
    ``{"image": [3, size, size] in [-1, 1], "caption": str, "file": relative path}``.

    Images are centre-cropped to a square and resized to ``size``×``size``. Captions come from
    ``root/captions`` (JSON Lines, one ``{"file": "a.png", "caption": "..."}`` per image, ``file``
    relative to ``root``); every image must have one. ``captions=None`` means uncaptioned
    images (caption ""). Problems (missing or empty folder, unreadable image, bad captions
    file) raise ``FileNotFoundError``/``ValueError`` naming the file and the reason.
    """

    def __init__(self, root, size: int = 32, captions: str | None = "captions.jsonl"):
        _check_size(size)
        self.root, self.size = Path(root), size
        if not self.root.exists():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist")
        if not self.root.is_dir():
            raise ValueError(f"{str(self.root)!r} is not a folder")
        self.files = sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*")
                            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {str(self.root)!r}")
        for name in self.files:  # read every header now, so a bad file fails here, by name
            try:
                with Image.open(self.root / name) as im:
                    im.verify()
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                raise ValueError(f"cannot read image {str(self.root / name)!r}: {e}") from None
        self.captions = {name: "" for name in self.files}
        if captions is not None:
            self.captions = self._read_captions(self.root / captions)

    def _read_captions(self, path: Path) -> dict[str, str]:
        if not path.is_file():
            raise FileNotFoundError(f"captions file {str(path)!r} not found; write one JSON line "
                                    f'{{"file": ..., "caption": ...}} per image, or pass captions=None')
        found: dict[str, str] = {}
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{str(path)!r} line {number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not (isinstance(entry, dict) and isinstance(entry.get("file"), str)
                    and isinstance(entry.get("caption"), str)):
                raise ValueError(f'{where}: expected {{"file": "<image>", "caption": "<text>"}}, got {line.strip()!r}')
            name = Path(entry["file"]).as_posix()
            if name not in self.captions:
                raise ValueError(f"{where}: {entry['file']!r} is not an image in {str(self.root)!r}")
            if name in found:
                raise ValueError(f"{where}: {entry['file']!r} is captioned twice")
            found[name] = entry["caption"]
        missing = [name for name in self.files if name not in found]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(f"{len(missing)} image(s) have no caption in {str(path)!r}: {shown}")
        return found

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        name = self.files[i]
        try:
            with Image.open(self.root / name) as im:
                image = _pil_to_tensor(im, self.size)
        except OSError as e:
            raise ValueError(f"cannot read image {str(self.root / name)!r}: {e}") from None
        return {"image": image, "caption": self.captions[name], "file": name}


def load_photo(size: int | None = None) -> torch.Tensor:
    """A real photograph, Grace Hopper (matplotlib's sample ``grace_hopper.jpg``, 512×600; no
    download), as ``[3, H, W]`` float32 in [-1, 1]; with ``size``, centre-cropped and resized to
    ``[3, size, size]``."""
    if size is not None:
        _check_size(size)
    try:
        path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise FileNotFoundError(f"matplotlib's sample photo grace_hopper.jpg is missing ({e}); "
                                f"reinstall matplotlib") from None
    with Image.open(path) as im:
        return _pil_to_tensor(im, size)
