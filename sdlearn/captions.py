"""Captions: the attributes' names and the English that names them (split from :mod:`sdlearn.data`, which
re-exports every name here, so ``from sdlearn.data import caption_for`` keeps working).

A Shapes object has four attributes, colour (8) × shape (4) × size (2) × position (5); the star
(``CONCEPT_SHAPES``) is a fifth shape that captions can name but the dataset never draws. A caption names
them with one of several templates and synonyms ("a large red circle in the top left", "big red disc, upper
left corner"); :func:`caption_for` writes one, :func:`object_phrase` words an object naming only some of its
attributes, two objects' phrases are joined by "and", and :func:`parse_caption` is their exact inverse.
:func:`random_caption` draws the caption a training item gets. Randomness comes from any of an int seed,
``random.Random``, ``numpy.random.Generator`` or ``torch.Generator`` (:func:`uniforms_from`).
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Sequence

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------
# The attributes and their names

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
CONCEPT_SHAPES: tuple[str, ...] = ("star",)  # drawn and captioned like SHAPES, by name only; never in ShapesDataset
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
CORNERS: tuple[str, ...] = POSITIONS[:4]  # where the objects of a two-object scene may sit
MAX_OBJECTS = 2  # objects per scene, at most
ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size", "position")
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {  # the one table of every attribute's values, in index order
    "color": tuple(COLORS),
    "shape": SHAPES,
    "size": SIZES,
    "position": POSITIONS,
}


def attribute_index(kind: str, name) -> int:
    """Index of ``name`` among the valid values of attribute ``kind``; a clear ValueError otherwise."""
    names = ATTRIBUTE_VALUES[kind] + (CONCEPT_SHAPES if kind == "shape" else ())  # the star: index len(SHAPES)
    if isinstance(name, str) and name in names:
        return names.index(name)
    raise ValueError(f"unknown {kind} {name!r}; expected one of: {', '.join(names)}")


def uniforms_from(rng, count: int) -> list[float]:
    """``count`` uniforms in [0, 1) from any of the random sources captions and rendering accept."""
    if isinstance(rng, torch.Generator):
        return torch.rand(count, generator=rng, dtype=torch.float64).tolist()
    if isinstance(rng, np.random.Generator):
        return rng.random(count).tolist()
    if isinstance(rng, random.Random):
        return [rng.random() for _ in range(count)]
    if isinstance(rng, int) and not isinstance(rng, bool):
        return uniforms_from(random.Random(rng), count)
    raise ValueError(f"rng must be None, an int seed, random.Random, numpy.random.Generator or "
                     f"torch.Generator, got {type(rng).__name__}")


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
CONCEPT_WORDS = {"star": ("star",)}  # CONCEPT_SHAPES' nouns: read and written, but not in VOCABULARY (token ids stay)
NOUN_WORDS = ("shape", "object")  # the noun of an object whose shape a caption leaves open
JOIN_WORD = "and"  # joins the phrases of a scene's two objects
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


def check_attributes(attributes) -> tuple[str, str, str, str]:
    if not isinstance(attributes, dict):
        raise ValueError(f"attributes must be a dict with keys {', '.join(ATTRIBUTES)}, "
                         f"got {type(attributes).__name__}")
    missing = [k for k in ATTRIBUTES if k not in attributes]
    if missing:
        raise ValueError(f"attributes lack {', '.join(missing)}; expected keys {', '.join(ATTRIBUTES)}")
    for k in ATTRIBUTES:
        attribute_index(k, attributes[k])
    return tuple(attributes[k] for k in ATTRIBUTES)


def _choices(attributes) -> tuple[tuple[str, ...], ...]:
    """The independent choices a caption makes: template, size word, shape word, place phrase."""
    color, shape, size, position = check_attributes(attributes)
    return TEMPLATES, SIZE_WORDS[size], (SHAPE_WORDS | CONCEPT_WORDS)[shape], place_phrases(position)


def fill_template(color: str, template: str, size_word: str, shape_word: str, place: str) -> str:
    return template.format(size=size_word, color=color, shape=shape_word, place=place)


def _pick_each(choices, u: Sequence[float]) -> list[str]:
    """One option from each tuple of ``choices``, by one uniform in [0, 1) each."""
    return [opts[min(int(x * len(opts)), len(opts) - 1)] for opts, x in zip(choices, u)]


def caption_from_uniforms(attributes, u: Sequence[float]) -> str:
    """The caption picked by four uniforms in [0, 1) (template, size word, shape word, place)."""
    return fill_template(attributes["color"], *_pick_each(_choices(attributes), u))


def caption_for(attributes: dict, rng=None) -> str:
    """An English caption for one object's ``attributes`` or a scene ``{"objects": [dict, dict]}``.

    A dict with all four attributes (color, shape, size, position) and ``rng=None`` gives the canonical
    caption "a {size} {color} {shape} in the {position}", e.g. "a large red circle in the top left". With
    ``rng`` (an int seed, ``random.Random``, ``numpy.random.Generator`` or ``torch.Generator``) a template
    and synonyms are drawn from it, e.g. "big red circle, upper left corner".

    A dict naming only some attributes gives that object's phrase (:func:`object_phrase`: "a red circle",
    "a small shape in the top left"). ``{"objects": [a, b]}`` joins the two objects' phrases with "and":
    "a large red circle in the top left and a small blue square in the bottom right". :func:`parse_caption`
    reads every one of these back.
    """
    if isinstance(attributes, dict) and "objects" in attributes:
        objects = check_scene_objects(attributes["objects"])
        u = (0.0,) * (4 * len(objects)) if rng is None else uniforms_from(rng, 4 * len(objects))
        if len(objects) == 1 and all(k in objects[0] for k in ATTRIBUTES):
            return caption_from_uniforms(objects[0], u)
        return " and ".join(phrase_from_uniforms(o, u[4 * i:4 * i + 4]) for i, o in enumerate(objects))
    if isinstance(attributes, dict) and all(k in attributes for k in ATTRIBUTES):
        return caption_from_uniforms(attributes, (0.0,) * 4 if rng is None else uniforms_from(rng, 4))
    return object_phrase(attributes, rng)


def check_scene_objects(objects, text: str | None = None) -> list[dict]:
    """``objects`` (a list of one or two attribute dicts, each naming any of the attributes) checked against
    the rules of a scene: at most two objects; two objects have different colours and sit at two different
    corners, never the centre. Raises ``ValueError`` saying which rule ``text`` (or ``objects``) breaks."""
    what = repr(text) if text is not None else "the scene"
    if not isinstance(objects, list | tuple) or not all(isinstance(o, dict) for o in objects):
        raise ValueError(f"objects must be a list of one or two attribute dicts, got {type(objects).__name__}")
    if not 1 <= len(objects) <= MAX_OBJECTS:
        raise ValueError(f"{what} has {len(objects)} objects; a Shapes scene holds one or two")
    if len(objects) == 2:
        a, b = objects
        if "color" in a and a.get("color") == b.get("color"):
            raise ValueError(f"{what} makes both objects {a['color']}: the two objects of a scene have different colours")
        if "position" in a and a.get("position") == b.get("position"):
            raise ValueError(f"{what} puts both objects in the {a['position']}: the two objects of a scene sit at "
                             f"two different corners")
        if "center" in (a.get("position"), b.get("position")):
            raise ValueError(f"{what} puts an object in the center: the two objects of a scene sit at corners "
                             f"({', '.join(CORNERS)})")
    return list(objects)


def caption_variants(attributes: dict) -> list[str]:
    """Every caption :func:`caption_for` can produce for ``attributes``, canonical first."""
    return [fill_template(attributes["color"], *picked) for picked in itertools.product(*_choices(attributes))]


# An object's phrase: the templates that are noun phrases (so that two can later be joined), with
# the slots of the attributes a phrase leaves out removed along with their linking words.
PHRASE_TEMPLATES: tuple[str, ...] = tuple(TEMPLATES[i] for i in (0, 1, 2, 5))
_SLOT_FORMS = (" in the {%s}", " at the {%s}", ", {%s}", "{%s} ")  # tried in turn


def phrase_choices(attributes) -> tuple[tuple[str, ...], ...]:
    """Like :func:`_choices` for an object that may leave out its size, colour or position."""
    if not isinstance(attributes, dict):
        raise ValueError(f"attributes must be a dict with some of the keys {', '.join(ATTRIBUTES)}, "
                         f"got {type(attributes).__name__}")
    unknown = [k for k in attributes if k not in ATTRIBUTES]
    if unknown:
        raise ValueError(f"unknown attribute(s) {', '.join(map(repr, unknown))}; expected some of {', '.join(ATTRIBUTES)}")
    for k, v in attributes.items():
        attribute_index(k, v)
    templates = []
    for template in PHRASE_TEMPLATES:
        for slot in ("size", "color", "place"):
            if ("position" if slot == "place" else slot) not in attributes:
                form = next(f % slot for f in _SLOT_FORMS if f % slot in template)
                template = template.replace(form, "", 1)
        templates.append(template)
    size, position = attributes.get("size"), attributes.get("position")
    shape = attributes.get("shape")
    return (tuple(templates), SIZE_WORDS[size] if size else ("",), (SHAPE_WORDS | CONCEPT_WORDS)[shape] if shape else NOUN_WORDS,
            place_phrases(position) if position else ("",))


def phrase_from_uniforms(attributes, u: Sequence[float]) -> str:
    """The phrase picked by four uniforms in [0, 1) (template, size word, shape word, place)."""
    picked = _pick_each(phrase_choices(attributes), u)  # validates attributes first
    return fill_template(attributes.get("color", ""), *picked)


def object_phrase(attributes: dict, rng=None) -> str:
    """A noun phrase for one object, naming only the attributes in ``attributes`` (any of the four
    may be left out; with the shape left out the noun is "shape" or "object").

    ``rng=None`` gives the canonical phrase: {"color": "red", "shape": "circle"} → "a red circle",
    {"shape": "square", "position": "top left"} → "a square in the top left", {"color": "blue"} →
    "a blue shape", {} → "a shape"; with all four
    attributes it is :func:`caption_for`'s canonical caption. With ``rng`` (as in
    :func:`caption_for`) a template and synonyms are drawn from it ("big red disc, upper left").
    Only the vocabulary's words are used, and :func:`parse_prompt` reads back exactly ``attributes``.
    """
    return phrase_from_uniforms(attributes, (0.0,) * 4 if rng is None else uniforms_from(rng, 4))


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
_WORD_ROLE.update({w: ("noun", w) for w in NOUN_WORDS})
_WORD_ROLE[JOIN_WORD] = ("join", JOIN_WORD)
_FILLER_WORDS = sorted({w for t in TEMPLATES for w in split_words(re.sub(r"\{\w+\}", " ", t))} | {"corner"})
_WORD_ROLE.update({w: ("filler", w) for w in _FILLER_WORDS})
VOCABULARY: list[str] = sorted(_WORD_ROLE)
"""Every word a Shapes caption can contain (lower case, as :func:`split_words` splits them), sorted. A star's
caption adds its noun (``CONCEPT_WORDS``), which captions know but the tokenizer does not: its token is learnt
(:mod:`sdlearn.adapt`)."""
_WORD_ROLE.update({w: ("shape", s) for s, words in CONCEPT_WORDS.items() for w in words})


def _check_words(text) -> list[str]:
    if not isinstance(text, str):
        raise ValueError(f"expected a caption string, got {type(text).__name__}")
    words = split_words(text)
    # Name the words as written: split_words keeps a-z only, so "réd" would show up as 'r' and 'd'.
    unknown = [w for w in re.findall(r"[^\W\d_]+", text.lower()) if w not in _WORD_ROLE] or \
        [w for w in words if w not in _WORD_ROLE]
    if unknown:
        raise ValueError(f"cannot place the word(s) {', '.join(repr(w) for w in dict.fromkeys(unknown))} "
                         f"in {text!r}; known words: {', '.join(VOCABULARY)}")
    return words


def _parse_object(words: list[str], text: str) -> dict[str, str]:
    """The attributes one object's words name (what they leave open is left out)."""
    found: dict[str, str] = {}
    for word in words:
        role, value = _WORD_ROLE[word]
        if role in ("filler", "noun", "join"):
            continue
        if role in found and found[role] != value:
            raise ValueError(f"{text!r} names two {role}s for one object: {found[role]!r} and {value!r}")
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


def split_objects(text: str) -> list[list[str]]:
    """``text``'s words, one list per object: the phrases that "and" joins. Raises ``ValueError`` for an
    unknown word or an "and" with no phrase on one side."""
    words = _check_words(text)
    groups: list[list[str]] = [[]]
    for word in words:
        if word == JOIN_WORD:
            groups.append([])
        else:
            groups[-1].append(word)
    if len(groups) > 1 and not all(groups):
        raise ValueError(f"{text!r}: 'and' must join two object phrases (\"a red circle and a blue square\")")
    return groups


def parse_prompt(text: str) -> dict[str, str]:
    """The attributes a (possibly partial) one-object prompt names: "a red circle" → {"color": "red",
    "shape": "circle"}; "a blue shape" → {"color": "blue"}.

    Case and punctuation are ignored and synonyms understood ("Big red disc, upper-left!").
    Raises ``ValueError`` naming any word outside ``VOCABULARY``, a prompt naming two values of
    one attribute, half a position ("left" alone: a position is a corner or the centre), or two
    objects (use :func:`parse_caption`).
    """
    groups = split_objects(text)
    if len(groups) > 1:
        raise ValueError(f"{text!r} names {len(groups)} objects; parse_prompt reads one (parse_caption reads two)")
    return _parse_object(groups[0], text)


def parse_caption(text: str) -> dict:
    """The inverse of :func:`caption_for`: caption → what it names.

    One object → its attribute dict, e.g. "a large red circle in the top left" → {"color": "red",
    "shape": "circle", "size": "large", "position": "top left"}; what the caption leaves open is left
    out, not guessed ("a red shape" → {"color": "red"}). Two objects joined by "and" →
    ``{"objects": [dict, dict]}`` in the caption's order. Accepts every template and synonym (and
    ignores case and punctuation). Raises ``ValueError`` naming the words it cannot place, or the rule
    a two-object caption breaks (more than two objects, both objects in one corner or the center,
    both the same colour).
    """
    groups = split_objects(text)
    objects = [_parse_object(g, text) for g in groups]
    if len(objects) == 1:
        return objects[0]
    return {"objects": check_scene_objects(objects, text)}


def random_caption(objects: Sequence[dict], rng, open_fraction: float = 0.5, drop: float = 0.5,
                   shared_open: float = 0.0, binding_fraction: float = 0.0) -> tuple[str, list[dict]]:
    """A random caption true of a scene's ``objects`` (one or two full attribute dicts), for training →
    ``(caption, named)``, ``named`` the attribute dicts the caption states, in its order.

    With probability ``1 − open_fraction`` every attribute is named (one object: any template,
    :func:`caption_for`; two: their phrases joined by "and"); otherwise each attribute of each object is
    left open with probability ``drop`` (:func:`object_phrase`: "a red shape", "a small circle"). Two
    objects come in either order. An image so teaches every partial prompt that is true of it, and a
    model learns to sample what a prompt leaves open as the data has it (classifier-free guidance's
    caption dropout is the case with everything open, done by the caller).

    With probability ``shared_open`` two objects leave the *same* attributes open, as people write them
    ("a red circle and a blue square"); left to chance alone, one such pattern is 1/256 of the open
    two-object captions. ``shared_open=0`` draws exactly the random numbers it drew before the option existed.

    With probability ``binding_fraction`` a two-object caption names each object's colour and shape and
    nothing else ("a red circle and a blue square"): the prompts where only the words, not the positions,
    say which colour goes with which shape. ``binding_fraction=0`` draws no extra random number.
    """
    objects = [dict(o) for o in check_scene_objects(objects)]  # not an empty, three-object or impossible scene
    u = uniforms_from(rng, 2 + 8 * len(objects))
    if len(objects) == 2 and u[1] < 0.5:
        objects.reverse()
    if len(objects) == 2 and shared_open > 0 and uniforms_from(rng, 1)[0] < shared_open:
        u[10:14] = u[2:6]  # the second object's open/named draws are the first's
    if len(objects) == 2 and binding_fraction > 0 and uniforms_from(rng, 1)[0] < binding_fraction:
        named = [{"color": o["color"], "shape": o["shape"]} for o in objects]
    elif u[0] >= open_fraction:
        named = objects
    else:
        named = [{k: o[k] for j, k in enumerate(ATTRIBUTES) if u[2 + 8 * i + j] >= drop} for i, o in enumerate(objects)]
    words = [u[6 + 8 * i:10 + 8 * i] for i in range(len(objects))]
    if len(named) == 1 and len(named[0]) == len(ATTRIBUTES):
        return caption_from_uniforms(named[0], words[0]), named
    return " and ".join(phrase_from_uniforms(o, w) for o, w in zip(named, words)), named


def _longest_caption() -> int:
    """Words in the longest caption :func:`caption_for` can write (two objects, longest synonyms)."""
    longest = {k: max(v, key=lambda w: len(w.split())) for k, v in
               (("size", SIZE_WORDS["small"]), ("place", place_phrases("top left")))}
    one = max(len(split_words(fill_template("red", t, longest["size"], "circle", longest["place"]))) for t in TEMPLATES)
    phrase = max(len(split_words(fill_template("red", t, longest["size"], "circle", longest["place"]))) for t in PHRASE_TEMPLATES)
    return max(one, 2 * phrase + 1)


MAX_CAPTION_WORDS = _longest_caption()
"""Words in the longest caption (two full phrases and "and"): the tokenizer's ``max_length`` is this + 2."""
