"""Data: the procedural Shapes dataset, a captioned image folder, and a bundled photograph.

Shapes is the course's stand-in for LAION: every image is a 32×32 RGB picture of one (or, in a
scene, two) coloured objects on a black background, with an English caption that names an
object's four attributes,

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
- diamond: a square rotated by 45° whose two diagonals equal the side;
- star (``CONCEPT_SHAPES``, never in :class:`ShapesDataset`: the new concept of the personalisation chapter): a
  regular five-pointed star, point up, outer radius half the side, inner radius ``STAR_INNER_RATIO`` × the outer.

Anti-aliasing is by supersampling: each pixel is tested at a regular 4×4 grid of sub-pixel
points, and the fraction inside the shape is its coverage α ∈ [0, 1]. The pixel is then
α · colour over black. Jitter, drawn per image:

- colour: each RGB channel of the base colour (0..255) moves by a continuous uniform offset in
  [−10, +10] (then clipped to 0..255);
- position: the box's centre moves by a continuous uniform offset in [−1, +1] px along x and y
  (continuous rather than whole pixels, so sub-pixel placement and anti-aliasing both show).

Scenes (``num_objects=2``): the two objects sit at two different corners (never the centre) and
have two different colours; sizes and shapes are free. Each is rendered exactly as a single
object is (its own jitter, its own coverage α), and the later one is composited over the earlier
one with its coverage, premultiplied: pixel = α₂·colour₂ + (1 − α₂)·α₁·colour₁. Away from the
other object, an object's pixels are bit for bit those of its single-object image.

Captions (:mod:`sdlearn.captions`, re-exported here) come from several templates and synonyms; :func:`parse_caption`
is their exact inverse.
:func:`object_phrase` words one object, naming only the attributes it is given. Four (colour,
shape) pairs are held out of ``split="train"`` to measure compositional generalisation:
``HELDOUT_PAIRS``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from sdlearn.captions import (  # noqa: F401  (the attributes' names and the captions, re-exported)
    ATTRIBUTE_VALUES,
    ATTRIBUTES,
    CENTER_WORDS,
    COLORS,
    CONCEPT_SHAPES,
    CONCEPT_WORDS,
    CORNERS,
    HORIZONTAL_WORDS,
    JOIN_WORD,
    MAX_CAPTION_WORDS,
    MAX_OBJECTS,
    NOUN_WORDS,
    PHRASE_TEMPLATES,
    POSITIONS,
    SHAPE_WORDS,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    TEMPLATES,
    VERTICAL_WORDS,
    VOCABULARY,
    attribute_index,
    caption_for,
    caption_from_uniforms,
    caption_variants,
    check_attributes,
    check_scene_objects,
    fill_template,
    object_phrase,
    parse_caption,
    parse_prompt,
    phrase_choices,
    phrase_from_uniforms,
    place_phrases,
    random_caption,
    split_objects,
    split_words,
    uniforms_from,
)
from sdlearn.images import IMAGE_EXTENSIONS, ImageFolderDataset, load_photo  # noqa: F401  (re-exported)

_fill, _phrase_choices = fill_template, phrase_choices  # their names from before sdlearn.captions existed

# ----------------------------------------------------------------------------------------------
# The attributes and their exact values

IMAGE_SIZE = 32
STAR_INNER_RATIO = 0.381966  # inner / outer radius of a regular pentagram: cos 72° / cos 36° = 1/φ²
STAR_EXAMPLE_COLORS: tuple[str, ...] = ("red", "yellow", "blue", "white")  # the colours of star_examples()
SIZE_PIXELS: dict[str, int] = {"small": 9, "large": 15}  # side of the bounding box
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

COLOR_JITTER = 10.0  # ± per RGB channel, in 0..255 units, uniform
POSITION_JITTER = 1.0  # ± px along x and y, uniform
SUPERSAMPLE = 4  # sub-pixel samples per pixel along each axis (4×4 = 16 per pixel)

_COLOR_TABLE = torch.tensor(list(COLORS.values()), dtype=torch.float32)  # [8, 3]
_HALF_SIDE = torch.tensor([SIZE_PIXELS[s] / 2 for s in SIZES], dtype=torch.float32)  # [2]
_CENTER_TABLE = torch.tensor([POSITION_CENTERS[p] for p in POSITIONS], dtype=torch.float32)  # [5, 2]


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


def _inside_star(u, v, h):
    # Fold the angle from "up" into one half-point, φ ∈ [0°, 36°] (the star repeats every 72° and is mirrored
    # about each point); there the edge runs from the tip (0, h) to the inner vertex r·(sin 36°, cos 36°).
    phi = (torch.remainder(torch.atan2(u, -v) + math.pi / 5, 2 * math.pi / 5) - math.pi / 5).abs()
    rho = torch.sqrt(u * u + v * v)
    x, y, r = rho * torch.sin(phi), rho * torch.cos(phi), STAR_INNER_RATIO * h
    return r * math.sin(math.pi / 5) * (y - h) + (h - r * math.cos(math.pi / 5)) * x <= 0  # the centre's side


_INSIDE = (_inside_circle, _inside_square, _inside_triangle, _inside_diamond, _inside_star)  # SHAPES, then the star


def _as_indices(values, kind: str) -> torch.Tensor:
    """Attribute values (names, or integer indices) → a long tensor ``[B]`` of indices."""
    names = ATTRIBUTE_VALUES[kind]
    if isinstance(values, (str, int)):
        values = [values]
    if isinstance(values, torch.Tensor | np.ndarray):
        idx = torch.as_tensor(values).reshape(-1)
        if idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise ValueError(f"{kind} indices must be integers, got dtype {idx.dtype}")
        idx = given = idx.long()
    else:
        values = list(values)
        idx = torch.tensor([attribute_index(kind, x) if isinstance(x, str) else int(x) for x in values],
                           dtype=torch.long)
        given = torch.tensor([int(x) for x in values if not isinstance(x, str)], dtype=torch.long)
    if given.numel() and (given.min() < 0 or given.max() >= len(names)):  # indices (not names) count in SHAPES
        raise ValueError(f"{kind} indices must lie in 0..{len(names) - 1} ({', '.join(names)}), "
                         f"got {given.min().item()}..{given.max().item()}")
    return idx


def random_jitter(batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the per-image jitter: ``rgb_offset`` [B, 3] uniform in ±10 and ``xy_offset`` [B, 2] uniform in ±1 px."""
    u = torch.rand(batch_size, 5, generator=generator)  # [B, 5]
    return (2 * u[:, :3] - 1) * COLOR_JITTER, (2 * u[:, 3:] - 1) * POSITION_JITTER


def _jitter_for(lead: tuple[int, ...], generator, jitter: bool, rgb_offset, xy_offset) -> tuple[torch.Tensor, torch.Tensor]:
    """The jitter of ``lead`` objects (``(B,)`` images or ``(B, K)`` scene objects): ``rgb_offset``
    ``[*lead, 3]`` and ``xy_offset`` ``[*lead, 2]``, as given, else drawn (``jitter``) or zero."""
    if jitter and (rgb_offset is None or xy_offset is None):
        rgb, xy = random_jitter(int(np.prod(lead)), generator)  # [N, 3], [N, 2]
        drawn_rgb, drawn_xy = rgb.view(*lead, 3), xy.view(*lead, 2)
    else:
        drawn_rgb, drawn_xy = torch.zeros(*lead, 3), torch.zeros(*lead, 2)
    rgb_offset = drawn_rgb if rgb_offset is None else torch.as_tensor(rgb_offset, dtype=torch.float32)
    xy_offset = drawn_xy if xy_offset is None else torch.as_tensor(xy_offset, dtype=torch.float32)
    if rgb_offset.shape != (*lead, 3) or xy_offset.shape != (*lead, 2):
        dims = ", ".join(map(str, lead))
        raise ValueError(f"rgb_offset must be [{dims}, 3] and xy_offset [{dims}, 2], got "
                         f"{list(rgb_offset.shape)} and {list(xy_offset.shape)}")
    return rgb_offset, xy_offset


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
    rgb_offset, xy_offset = _jitter_for((B,), generator, jitter, rgb_offset, xy_offset)
    return _paint(c, s, z, p, rgb_offset, xy_offset)[1] - 1  # [B, 3, 32, 32]: α · colour over black is α · colour − 1


def _paint(c, s, z, p, rgb_offset, xy_offset) -> tuple[torch.Tensor, torch.Tensor]:
    """One object per row → its coverage α ``[B, 32, 32]`` and α · colour ``[B, 3, 32, 32]`` in 0..2
    (colour mapped from 0..255 to 0..2, so that subtracting 1 puts it over black in [-1, 1])."""
    B = c.numel()
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

    return canvas, canvas[:, None] * (rgb * (2 / 255))[:, :, None, None]  # [B, 32, 32], [B, 3, 32, 32]


def render_shape(color: str, shape: str, size: str, position: str, rng=None) -> torch.Tensor:
    """Render one Shapes image → ``[3, 32, 32]`` in [-1, 1].

    With ``rng=None`` the object is drawn exactly at its nominal colour and position (no jitter);
    with ``rng`` (an int seed, ``random.Random``, ``numpy.random.Generator`` or ``torch.Generator``)
    the colour and position jitter are drawn from it, deterministically. ``shape`` may be "star" (``CONCEPT_SHAPES``).
    """
    names = [[v] for k, v in zip(ATTRIBUTES, (color, shape, size, position)) if attribute_index(k, v) >= 0]  # names only
    if rng is None:
        return render_batch(*names, jitter=False)[0]
    u = torch.tensor(uniforms_from(rng, 5), dtype=torch.float32)  # [5]
    rgb_offset = ((2 * u[:3] - 1) * COLOR_JITTER)[None]  # [1, 3]
    xy_offset = ((2 * u[3:] - 1) * POSITION_JITTER)[None]  # [1, 2]
    return render_batch(*names, rgb_offset=rgb_offset, xy_offset=xy_offset)[0]


# ----------------------------------------------------------------------------------------------
# Scenes: one or two objects per image


def _as_object_indices(values, kind: str) -> torch.Tensor:
    """Per-scene, per-object attribute values ``[B, K]`` (names or indices; None or -1 where a
    scene has no K-th object) → a long tensor ``[B, K]`` with -1 for no object."""
    named = None  # where a name was given (checked by attribute_index; the star's index lies beyond SHAPES)
    if not isinstance(values, torch.Tensor | np.ndarray):
        rows = [list(x) if isinstance(x, list | tuple | torch.Tensor | np.ndarray) else x for x in values]
        if not all(isinstance(r, list) for r in rows):
            raise ValueError(f"{kind}s must be [B, K] (scene, object): one list per scene, got {values!r}")
        if len({len(r) for r in rows}) > 1:
            raise ValueError(f"{kind}s must give every scene the same number of slots (None or -1 for no object), "
                             f"got rows of lengths {sorted({len(r) for r in rows})}")
        named = torch.tensor([[isinstance(x, str) for x in r] for r in rows], dtype=torch.bool).reshape(len(rows), -1)
        values = torch.tensor([[-1 if x is None else attribute_index(kind, x) if isinstance(x, str) else int(x)
                                for x in r] for r in rows], dtype=torch.long).reshape(len(rows), -1)
    idx = torch.as_tensor(values)
    if idx.dim() != 2:
        raise ValueError(f"{kind}s must be [B, K] (scene, object), got shape {list(idx.shape)}")
    _as_indices(idx[(idx != -1) & (True if named is None else ~named)], kind)  # the dtype and range of the indices given
    return idx.long()


def _check_scenes(c: torch.Tensor, s, z, p) -> torch.Tensor:
    """The scene rules on index tensors ``[B, K]`` (-1: no object); returns ``[B, K]`` bool, True where an object is."""
    B, K = c.shape
    if K > MAX_OBJECTS:
        raise ValueError(f"a scene holds at most two objects, got {K} per scene")
    there = c >= 0  # [B, K]
    if K == 0 or not all(torch.equal(there, x >= 0) for x in (s, z, p)) or not there[:, 0].all() \
            or (there[:, 1:] & ~there[:, :1]).any():
        raise ValueError("every scene needs its first object, and an object all four of its attributes "
                         "(-1 or None in every attribute where a scene has no second object)")
    if K < 2:
        return there
    two = there[:, 1]  # [B]
    problems = (
        (two & (p[:, 0] == p[:, 1]), lambda j: f"both objects are at the {POSITIONS[p[j, 0]]}",
         "two objects sit at two different corners"),
        (two & ((p[:, 0] == 4) | (p[:, 1] == 4)), lambda j: "an object of a two-object scene is at the center",
         "two objects sit at two different corners, never the center"),
        (two & (c[:, 0] == c[:, 1]), lambda j: f"both objects are {ATTRIBUTE_VALUES['color'][c[j, 0]]}",
         "the two objects of a scene have two different colours"),
    )
    for bad, what, rule in problems:
        if bad.any():
            j = int(bad.nonzero()[0, 0])
            raise ValueError(f"{f'scene {j}: ' if B > 1 else ''}{what(j)}; {rule}")
    return there


def render_scene_batch(
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
    """Render a batch of scenes of one or two objects → float32 ``[B, 3, 32, 32]`` in [-1, 1].

    ``colors``, ``shapes``, ``sizes``, ``positions``: ``[B, K]`` (K ≤ 2; tensors, arrays or nested
    lists) of indices or names per scene and object, with -1 (or None) where a scene has no
    second object. Jitter is per object: ``rgb_offset`` ``[B, K, 3]``, ``xy_offset`` ``[B, K, 2]``,
    drawn or zeroed as in :func:`render_batch` when left out. Each object is drawn by the same
    code as :func:`render_batch`, and object k is composited over objects < k with its coverage α:
    a one-object scene equals its :func:`render_batch` image bit for bit. Scenes breaking the rules
    (two objects at one corner or at the centre, or of one colour) raise ``ValueError``.
    """
    c, s, z, p = (_as_object_indices(v, k) for v, k in zip((colors, shapes, sizes, positions), ATTRIBUTES))
    if not (c.shape == s.shape == z.shape == p.shape):
        raise ValueError(f"colors, shapes, sizes and positions must have the same shape [B, K], got "
                         f"{list(c.shape)}, {list(s.shape)}, {list(z.shape)}, {list(p.shape)}")
    there = _check_scenes(c, s, z, p)  # [B, K]
    B, K = c.shape
    rgb_offset, xy_offset = _jitter_for((B, K), generator, jitter, rgb_offset, xy_offset)
    out = _paint(c[:, 0], s[:, 0], z[:, 0], p[:, 0], rgb_offset[:, 0], xy_offset[:, 0])[1]  # [B, 3, 32, 32] α · colour
    for k in range(1, K):  # later objects over earlier ones
        rows = there[:, k].nonzero().squeeze(1)  # [b] scenes with a k-th object
        if rows.numel() == 0:
            continue
        alpha, layer = _paint(c[rows, k], s[rows, k], z[rows, k], p[rows, k], rgb_offset[rows, k], xy_offset[rows, k])
        out[rows] = layer + (1 - alpha[:, None]) * out[rows]  # premultiplied "over": exact where α = 0
    return out - 1  # over black


def _check_objects(objects) -> list[tuple[str, str, str, str]]:
    """A scene's list of one or two attribute dicts → their (color, shape, size, position) tuples."""
    if isinstance(objects, dict) or not isinstance(objects, list | tuple):
        raise ValueError(f"objects must be a list of one or two attribute dicts, got {type(objects).__name__}")
    if not 1 <= len(objects) <= MAX_OBJECTS:
        raise ValueError(f"a scene holds at most two objects (and at least one), got {len(objects)}")
    return [check_attributes(a) for a in objects]


def render_scene(objects: Sequence[dict], rng=None) -> torch.Tensor:
    """Render one scene of one or two objects → ``[3, 32, 32]`` in [-1, 1].

    ``objects``: a list of attribute dicts (color, shape, size, position), drawn in order, the
    second over the first. Two objects must sit at two different corners and have two different
    colours (``ValueError`` otherwise). ``rng`` as in :func:`render_shape`: None for no jitter, or a
    source from which each object's five jitter uniforms are drawn in turn, so a one-object scene
    equals ``render_shape(**objects[0], rng=rng)``.
    """
    rows = _check_objects(objects)
    idx = [[[obj[a] for obj in rows]] for a in range(len(ATTRIBUTES))]  # 4 × [1, K] names (a star's too)
    if rng is None:
        return render_scene_batch(*idx, jitter=False)[0]
    u = 2 * torch.tensor(uniforms_from(rng, 5 * len(rows)), dtype=torch.float32).view(1, len(rows), 5) - 1
    return render_scene_batch(*idx, rgb_offset=u[..., :3] * COLOR_JITTER, xy_offset=u[..., 3:] * POSITION_JITTER)[0]


class ConceptExamples(NamedTuple):
    """Example images of a concept outside the data, with their canonical captions and attribute dicts."""

    images: torch.Tensor  # [n, 3, 32, 32] in [-1, 1]
    captions: list[str]
    attributes: list[dict[str, str]]


def star_examples(n: int = 8, seed: int = 0) -> ConceptExamples:
    """The learner's ``n`` example images of the star (notebook 12), a pure function of ``(n, seed)``: colours
    ``STAR_EXAMPLE_COLORS`` in turn, two of each (red, red, yellow, yellow, ...); each pair one small and one
    large star in random order; positions a random order of the five, drawn again when spent (so 8 examples show
    every position); colour and position jittered as in Shapes. Captions are canonical: "a large red star in
    the top left"."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer (at least 1 example image), got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    rng = random.Random(seed)
    sizes = [s for _ in range(-(-n // 2)) for s in rng.sample(SIZES, 2)]
    positions = [p for _ in range(-(-n // len(POSITIONS))) for p in rng.sample(POSITIONS, len(POSITIONS))]
    attributes = [{"color": STAR_EXAMPLE_COLORS[i // 2 % len(STAR_EXAMPLE_COLORS)], "shape": "star",
                   "size": sizes[i], "position": positions[i]} for i in range(n)]
    images = torch.stack([render_shape(**a, rng=rng) for a in attributes])  # [n, 3, 32, 32]
    return ConceptExamples(images, [caption_for(a) for a in attributes], attributes)


# ----------------------------------------------------------------------------------------------
# The dataset: counter-based randomness, so item i depends only on (n, split, seed, num_objects, i)

_STREAMS = 12  # uniforms per item: pair, size, position, 3 × colour jitter, 2 × position jitter, 4 × caption
# A scene's item draws 11 more, after those 12 (which a one-object item uses exactly as above):
# one or two objects (mixed mode), the second object's size, its 5 jitters and its 4 caption choices.
_SCENE_STREAMS = _STREAMS + 11
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele et al. 2014): a bijective, well-mixing hash of uint64s."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _hashed_uniforms(seed: int, indices: np.ndarray, count: int = _STREAMS) -> np.ndarray:
    """Uniforms in [0, 1), float64 ``[len(indices), count]``, a pure function of (seed, index, stream):
    the first ``_STREAMS`` columns do not depend on ``count``."""
    key = _mix64(np.array([seed % 2**64], dtype=np.uint64))  # [1]
    state = _mix64(key + indices.astype(np.uint64) * _GOLDEN)[:, None]  # [N, 1]
    streams = np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN  # [K]
    bits = _mix64(state + streams)  # [N, K]
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _item_objects(objects, j: int) -> list[dict[str, str]]:
    """The objects of scene ``j`` of per-object indices ``[B, K]`` (tensors or nested lists; -1: no
    object), as name dicts."""
    return [{k: ATTRIBUTE_VALUES[k][int(objects[k][j][o])] for k in ATTRIBUTES}
            for o in range(len(objects["color"][j])) if objects["color"][j][o] >= 0]


class ShapesBatch(NamedTuple):
    """A batch of Shapes items. ``attributes`` maps each attribute name to a long tensor ``[B]`` of
    indices into ``COLORS``/``SHAPES``/``SIZES``/``POSITIONS`` (what a classifier trains on)."""

    images: torch.Tensor  # [B, 3, 32, 32] in [-1, 1]
    captions: list[str]
    attributes: dict[str, torch.Tensor]

    def item_attributes(self, j: int) -> dict[str, str]:
        """The attributes of item ``j`` as names, e.g. {"color": "red", ...}."""
        return {k: ATTRIBUTE_VALUES[k][int(self.attributes[k][j])] for k in ATTRIBUTES}

    @property
    def objects(self) -> dict[str, torch.Tensor]:
        """Per-object indices ``[B, 2]`` as in :class:`SceneBatch`: the second column is all -1."""
        return {k: torch.stack([v, torch.full_like(v, -1)], dim=1) for k, v in self.attributes.items()}

    def item_objects(self, j: int) -> list[dict[str, str]]:
        """The objects of item ``j``: a list of one attribute dict."""
        return [self.item_attributes(j)]


class SceneBatch(NamedTuple):
    """A batch of scenes of one or two objects. ``objects`` maps each attribute name to a long
    tensor ``[B, 2]`` of indices (object 0, object 1), -1 where an item has no second object."""

    images: torch.Tensor  # [B, 3, 32, 32] in [-1, 1]
    captions: list[str]
    objects: dict[str, torch.Tensor]  # each [B, 2]

    def item_objects(self, j: int) -> list[dict[str, str]]:
        """The objects of item ``j`` as a list of name dicts, in drawing order."""
        return _item_objects(self.objects, j)


def _scene_pairs_for(split: str) -> np.ndarray:
    """The ((colour, shape), (colour, shape)) index pairs a split's two-object scenes draw from,
    ``[P, 2, 2]``: two different colours; in "train" no held-out pair, in "heldout" at least one."""
    train, every = set(_pairs_for("train")), _pairs_for("all")
    keep = {"train": lambda n: n == 2, "heldout": lambda n: n < 2, "all": lambda n: True}[split]
    return np.array([(a, b) for a in every for b in every if a[0] != b[0] and keep((a in train) + (b in train))])


_CORNER_PAIRS = np.array([(a, b) for a in range(len(CORNERS)) for b in range(len(CORNERS)) if a != b])  # [12, 2]
_SCENE_PAIRS = {split: _scene_pairs_for(split) for split in SPLITS}  # train 684, heldout 212, all 896


def _pick(x: np.ndarray, n: int) -> np.ndarray:
    """Uniforms in [0, 1) → indices in 0..n-1, uniformly."""
    return np.minimum((x * n).astype(np.int64), n - 1)


def _make_scenes(u: np.ndarray, split: str, two: np.ndarray) -> SceneBatch:
    """Per-item uniforms ``[B, _STREAMS]`` (or ``[B, _SCENE_STREAMS]`` where ``two`` [B] has a
    True) → the items, with two objects where ``two``. A one-object item uses only the first
    ``_STREAMS`` columns: its (colour, shape) pair, size, position, jitter and caption wording."""
    B, one = len(u), ~two
    idx = {k: np.full((B, MAX_OBJECTS), -1, dtype=np.int64) for k in ATTRIBUTES}  # [B, 2] each
    pairs = np.array(_pairs_for(split))  # [P, 2]
    idx["color"][one, 0], idx["shape"][one, 0] = pairs[_pick(u[one, 0], len(pairs))].T
    idx["size"][one, 0], idx["position"][one, 0] = _pick(u[one, 1], len(SIZES)), _pick(u[one, 2], len(POSITIONS))
    jitter = np.zeros((B, MAX_OBJECTS, 5))  # [B, 2, 5] in [-1, 1): rgb, then xy
    jitter[:, 0] = 2 * u[:, 3:8] - 1
    if two.any():
        scene_pairs = _SCENE_PAIRS[split][_pick(u[two, 0], len(_SCENE_PAIRS[split]))]  # [b, 2 objects, 2]
        idx["color"][two], idx["shape"][two] = scene_pairs[..., 0], scene_pairs[..., 1]
        idx["size"][two] = _pick(u[two][:, [1, _STREAMS + 1]], len(SIZES))
        idx["position"][two] = _CORNER_PAIRS[_pick(u[two, 2], len(_CORNER_PAIRS))]
        jitter[two, 1] = 2 * u[two, _STREAMS + 2:_STREAMS + 7] - 1
    jitter = torch.from_numpy(jitter).float()
    objects = {k: torch.from_numpy(v) for k, v in idx.items()}
    images = render_scene_batch(*(objects[k] for k in ATTRIBUTES),
                                rgb_offset=jitter[..., :3] * COLOR_JITTER, xy_offset=jitter[..., 3:] * POSITION_JITTER)
    captions, rows = [], {k: v.tolist() for k, v in idx.items()}
    for j, row in enumerate(u.tolist()):
        items = _item_objects(rows, j)
        if len(items) == 1:
            captions.append(caption_from_uniforms(items[0], row[8:12]))
        else:  # the two objects' phrases, joined by "and"
            captions.append(" and ".join(phrase_from_uniforms(a, uc) for a, uc in
                                      zip(items, (row[8:12], row[_STREAMS + 7:_STREAMS + 11]))))
    return SceneBatch(images, captions, objects)


def _make_batch(u: np.ndarray, split: str) -> ShapesBatch:
    """Turn per-item uniforms ``[B, _STREAMS]`` into one-object images, captions and attributes."""
    b = _make_scenes(u, split, np.zeros(len(u), dtype=bool))
    return ShapesBatch(b.images, b.captions, {k: v[:, 0].contiguous() for k, v in b.objects.items()})


def _check_num_objects(num_objects) -> int | tuple[int, int]:
    if isinstance(num_objects, list | tuple) and list(num_objects) == [1, 2]:
        return (1, 2)
    whole = isinstance(num_objects, int | np.integer) and not isinstance(num_objects, bool)
    if whole and num_objects in (1, 2):
        return int(num_objects)
    limit = "a scene holds at most two objects; " if whole and num_objects > 2 else ""
    raise ValueError(f"{limit}num_objects must be 1, 2 or (1, 2) (mixed, half each), got {num_objects!r}")


def _two_objects(u: np.ndarray, num_objects) -> np.ndarray:
    """Which items ``[B]`` hold two objects: all, none, or (mixed) those whose uniform says so, half."""
    if num_objects == (1, 2):
        return u[:, _STREAMS] >= 0.5
    return np.full(len(u), num_objects == 2)


def sample_batch(batch_size: int, split: str = "train", generator: torch.Generator | None = None,
                 num_objects: int | tuple[int, int] = 1) -> ShapesBatch | SceneBatch:
    """Fresh random Shapes items for a training loop, with no DataLoader in between.

    Returns ``ShapesBatch(images [B, 3, 32, 32], captions, attributes)``; unpacks as a tuple.
    With ``num_objects`` 2 or (1, 2), a :class:`SceneBatch` as :meth:`ShapesDataset.batch` gives.
    Draws from ``generator`` (torch's global generator if None).
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    _pairs_for(split)  # validates the split name
    num_objects = _check_num_objects(num_objects)
    u = torch.rand(batch_size, _STREAMS if num_objects == 1 else _SCENE_STREAMS, generator=generator,
                   dtype=torch.float64).numpy()  # [B, streams]
    return _make_batch(u, split) if num_objects == 1 else _make_scenes(u, split, _two_objects(u, num_objects))


class ShapesDataset(Dataset):
    """``n`` captioned Shapes images: ``ds[i]`` → {"image": [3, 32, 32], "caption": str, "attributes": dict,
    "objects": [dict]}.

    ``split``: "train" (every (colour, shape) pair except ``HELDOUT_PAIRS``), "heldout" (only
    those four pairs) or "all". Each item's randomness (attributes, jitter, caption wording) is a
    counter-based hash of ``(seed, i)``: items are uniform over the split's pairs, sizes and
    positions, cost no memory until read, and the same ``(n, split, seed, num_objects, i)`` always
    gives the same item whatever the access order. ``ds.batch(indices)`` renders many at once, identically.

    ``num_objects``: 1 (the default), 2 (scenes of two objects) or (1, 2) (mixed: each item holds
    one or two objects, half each, decided by its own hash). A two-object item is uniform over
    the split's allowed scenes: two different corners (in either order), two different colours,
    any sizes and shapes; in "train" neither object is a held-out pair, in "heldout" at least one
    is (the scenes "all" has and "train" never shows; for one object, exactly the held-out pairs).
    A two-object item is {"image", "caption", "objects": [dict, dict]}; its caption is the two
    objects' phrases (:func:`object_phrase`) joined by "and".
    A one-object item is the same as ``num_objects=1`` gives for its index, and keeps "attributes"
    (the same dict as ``objects[0]``). With num_objects 2 or (1, 2), ``batch`` returns a
    :class:`SceneBatch`, and a DataLoader needs ``collate_fn=list`` (items differ in their keys).
    """

    def __init__(self, n: int, split: str = "train", seed: int = 0, num_objects: int | tuple[int, int] = 1):
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n <= 0:
            raise ValueError(f"n must be a positive integer (the number of items), got {n!r}")
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        _pairs_for(split)  # validates the split name
        self.n, self.split, self.seed = int(n), split, int(seed)
        self.num_objects = _check_num_objects(num_objects)

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        scenes = "" if self.num_objects == 1 else f", num_objects={self.num_objects}"
        return f"ShapesDataset(n={self.n}, split={self.split!r}, seed={self.seed}{scenes})"

    def _indices(self, indices: Iterable[int]) -> np.ndarray:
        idx = np.asarray(indices if isinstance(indices, torch.Tensor | np.ndarray) else list(indices)).reshape(-1)
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"indices must be integers, got dtype {idx.dtype}")
        idx = idx.astype(np.int64)
        bad = idx[(idx < -self.n) | (idx >= self.n)]
        if bad.size:
            raise IndexError(f"index {int(bad[0])} out of range for {self!r}")
        return np.where(idx < 0, idx + self.n, idx)

    def batch(self, indices: Iterable[int]) -> ShapesBatch | SceneBatch:
        """Items ``indices`` rendered in one vectorised pass; ``batch([i]).images[0]`` equals ``ds[i]["image"]``."""
        if self.num_objects == 1:
            return _make_batch(_hashed_uniforms(self.seed, self._indices(indices)), self.split)
        u = _hashed_uniforms(self.seed, self._indices(indices), _SCENE_STREAMS)  # [B, _SCENE_STREAMS]
        return _make_scenes(u, self.split, _two_objects(u, self.num_objects))

    def __getitem__(self, i: int) -> dict:
        if isinstance(i, bool) or not isinstance(i, int | np.integer):
            raise TypeError(f"ShapesDataset indices must be integers, got {type(i).__name__}")
        b = self.batch([int(i)])
        objects = b.item_objects(0)
        item = {"image": b.images[0], "caption": b.captions[0]}
        return item | ({"attributes": objects[0], "objects": objects} if len(objects) == 1 else {"objects": objects})
