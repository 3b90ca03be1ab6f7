"""Checkers of notebook 13, control and speed: the edge map a ControlNet reads, one step of DDIM inversion, the
consistency model's boundary scalings, and a well-formed measurement of how closely generated objects follow
their edge maps.

In the order the notebook uses them: ``check_edge_map`` and ``check_inversion_step`` (implement),
``check_consistency_scalings`` (derive), ``check_iou_sweep`` (experiment).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sdlearn.control import COVERAGE_THRESHOLD, edge_map, object_coverage
from sdlearn.data import render_batch
from sdlearn.distill import consistency_scalings
from sdlearn.exercises.checks_11_flow_matching import NamedValuesChecker
from sdlearn.exercises.framework import (
    Case,
    Checker,
    Mistake,
    PerSettingChecker,
    format_shape,
    register,
)

# ---- Exercise 1 (implement): the edge map of a coverage map ------------------------------------------------


def _inside(coverage: torch.Tensor) -> torch.Tensor:
    return coverage >= COVERAGE_THRESHOLD  # [B, 1, H, W] bool


def _edges_with(neighbours: str = "4", border_inside: bool = False, strict: bool = False) -> Callable:
    """The edge map with one slip: ``neighbours`` "8" also looks at the diagonals, ``border_inside`` treats the world
    outside the image as part of the object, ``strict`` thresholds with > 0.5."""
    def edges(coverage):
        inside = coverage > COVERAGE_THRESHOLD if strict else _inside(coverage)
        padded = F.pad(inside.float(), (1, 1, 1, 1), value=1.0 if border_inside else 0.0)
        if neighbours == "8":
            all_in = -F.max_pool2d(-padded, 3, 1) > 0.5  # the minimum over the 3×3 window
        else:
            all_in = (padded[..., :-2, 1:-1] * padded[..., 2:, 1:-1] * padded[..., 1:-1, :-2] * padded[..., 1:-1, 2:]) > 0.5
        return (inside & ~all_in).float()
    return edges


def _outer_edges(coverage):
    """The outline drawn *outside* the object: pixels not in it with a 4-neighbour in it."""
    inside = _inside(coverage).float()
    padded = F.pad(inside, (1, 1, 1, 1))
    any_in = (padded[..., :-2, 1:-1] + padded[..., 2:, 1:-1] + padded[..., 1:-1, :-2] + padded[..., 1:-1, 2:]) > 0
    return (any_in & (inside < 0.5)).float()


def _edge_map_cases(g):
    size = 32
    square = torch.zeros(1, 1, size, size)
    square[..., 10:22, 8:20] = 1.0
    images = render_batch(["red", "blue", "green"], ["circle", "triangle", "diamond"], ["large", "small", "large"],
                          ["center", "top left", "bottom right"], jitter=False,
                          xy_offset=torch.tensor([[3.0, -2.0], [-5.0, -5.0], [8.0, 8.0]]))
    shapes = object_coverage(images)  # [3, 1, 32, 32]: anti-aliased coverage, two objects touching the border
    half = torch.zeros(1, 1, size, size)
    half[..., 4:12, 4:28] = 1.0
    half[..., 12, 4:28] = 0.5  # a row of coverage exactly 0.5: in the object (≥ 0.5)
    half[..., 3, 4:28] = 0.49
    bar = torch.zeros(1, 1, size, size)
    bar[..., :, 0:3] = 0.8  # a bar along the left border, from top to bottom
    noise = torch.rand(2, 1, size, size, generator=g)
    return [
        Case(f"one filled 12×12 square of coverage 1 in the middle, coverage {format_shape(square)}", (square,)),
        Case("a circle, a triangle and a diamond drawn by sdlearn.data.render_batch (anti-aliased coverage; the "
             f"triangle and the diamond touch the image's border), coverage {format_shape(shapes)}", (shapes,)),
        Case("a rectangle of coverage 1 whose bottom row has coverage exactly 0.5 and whose top neighbour row 0.49, "
             f"coverage {format_shape(half)}", (half,)),
        Case(f"a bar of coverage 0.8 along the left border, top to bottom, coverage {format_shape(bar)}", (bar,)),
        Case(f"random coverage, uniform in [0, 1] at every pixel, {format_shape(noise)}", (noise,)),
    ]


check_edge_map = register(Checker(
    name="check_edge_map",
    signature="fn(coverage) -> edges",
    doc="the edge map of notebook 13 (sdlearn.control.edge_map): ``coverage`` [B, 1, 32, 32] in [0, 1]; a pixel is in "
        "the object when its coverage is ≥ 0.5, and on the outline when it is in the object and one of its four "
        "neighbours (up, down, left, right) is not, or it lies on the image's border (outside the image counts as "
        "empty). → a float tensor [B, 1, 32, 32], 1 on the outline and 0 elsewhere.",
    reference=edge_map,
    make_cases=_edge_map_cases,
    hint="inside = coverage >= 0.5; padded = F.pad(inside, (1, 1, 1, 1), value=False) so that outside the image is "
         "empty; the four neighbours are padded[..., :-2, 1:-1] (up), padded[..., 2:, 1:-1] (down), "
         "padded[..., 1:-1, :-2] (left), padded[..., 1:-1, 2:] (right); edges = inside & ~(all four in); return "
         "edges.float().",
    mistakes=(
        Mistake(lambda coverage: _inside(coverage).float(),
                "you returned the whole object (coverage ≥ 0.5), not its outline: keep only the pixels of the object "
                "that have a neighbour outside it"),
        Mistake(_edges_with(neighbours="8"),
                "you looked at all eight neighbours (diagonals too); the outline uses the four that share a side "
                "with the pixel, so a staircase edge is not thickened"),
        Mistake(_outer_edges,
                "you drew the outline just outside the object (pixels not in it, next to it); the outline is made of "
                "the object's own pixels that touch the outside"),
        Mistake(_edges_with(border_inside=True),
                "you treated the world outside the image as part of the object (padding with True, or wrapping "
                "around): an object cut by the image's border must have an outline along the border"),
        Mistake(_edges_with(strict=True),
                "you used coverage > 0.5; a pixel with coverage exactly 0.5 is in the object (≥ 0.5)"),
        Mistake(lambda coverage: edge_map(coverage).bool(),
                "you returned a bool tensor; the control image is a float map of 0s and 1s (edges.float())"),
    ),
    atol=0.0,
    rtol=0.0,
))


# ---- Exercise 2 (implement): one step of DDIM inversion ----------------------------------------------------


def _inversion_step_reference(x_prev, eps, alpha_bar_prev, alpha_bar_t):
    x0 = (x_prev - (1 - alpha_bar_prev).sqrt() * eps) / alpha_bar_prev.sqrt()  # x̂₀ read at the lower point, with ε̂ given
    return alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * eps  # DDIM's eq. 12 (η = 0) from t' up to t


def _inversion_cases(g):
    cases = []
    for shape, a_prev, a_t, words in (
        ((3, 4, 8, 8), 0.85, 0.8, "latents, one step of a 20-step grid up at low noise (ᾱ_{t'} = 0.85, ᾱ_t = 0.8)"),
        ((2, 4, 8, 8), 1.0, 0.9915, "latents, the first step up from the clean latents (ᾱ_{t'} = 1: t' is below the "
                                    "grid's first timestep)"),
        ((4, 4, 8, 8), 0.02, 0.0047, "latents, the last step up to the noisiest timestep (ᾱ_{t'} = 0.02, ᾱ_t = 0.0047)"),
        ((5, 2), 0.5, 0.3, "2-D points, ᾱ_{t'} = 0.5, ᾱ_t = 0.3"),
    ):
        x_prev = torch.randn(shape, generator=g)
        eps = torch.randn(shape, generator=g)
        cases.append(Case(f"{words}: x_prev and eps {format_shape(x_prev)}, alpha_bar_prev = torch.tensor({a_prev}), "
                          f"alpha_bar_t = torch.tensor({a_t})", (x_prev, eps, torch.tensor(a_prev), torch.tensor(a_t))))
    return cases


check_inversion_step = register(Checker(
    name="check_inversion_step",
    signature="fn(x_prev, eps, alpha_bar_prev, alpha_bar_t) -> x_t",
    doc="one step of DDIM inversion (Song et al. 2021, eq. 12 with η = 0, read from the lower noise level t' up to the "
        "higher t): with the network's ε̂ (``eps``) taken as known, x̂₀ = (x_prev − √(1 − ᾱ_{t'}) ε̂) / √ᾱ_{t'} and "
        "x_t = √ᾱ_t x̂₀ + √(1 − ᾱ_t) ε̂. ``x_prev`` and ``eps``: tensors of one shape; ``alpha_bar_prev`` > ``alpha_bar_t``: "
        "0-dim tensors. → ``x_t``, the shape of ``x_prev``.",
    reference=_inversion_step_reference,
    make_cases=_inversion_cases,
    hint="x0 = (x_prev - (1 - alpha_bar_prev).sqrt() * eps) / alpha_bar_prev.sqrt(); then return alpha_bar_t.sqrt() * x0 + "
         "(1 - alpha_bar_t).sqrt() * eps. It is the sampling step with t' and t exchanged.",
    mistakes=(
        Mistake(lambda x_prev, eps, a_prev, a_t: _inversion_step_reference(x_prev, eps, a_t, a_prev),
                "you took the sampling step (from t down to t') instead of going up: read x̂₀ with ᾱ_{t'}, the noise level "
                "x_prev is at, and re-noise it with ᾱ_t, the higher one"),
        Mistake(lambda x_prev, eps, a_prev, a_t: a_t.sqrt() * x_prev + (1 - a_t).sqrt() * eps,
                "you noised x_prev as if it were clean (√ᾱ_t x_prev + √(1 − ᾱ_t) ε̂); x_prev already holds noise: first "
                "remove it, x̂₀ = (x_prev − √(1 − ᾱ_{t'}) ε̂) / √ᾱ_{t'}"),
        Mistake(lambda x_prev, eps, a_prev, a_t: a_t * (x_prev - (1 - a_prev) * eps) / a_prev + (1 - a_t) * eps,
                "you used ᾱ where its square root belongs: the signal is scaled by √ᾱ and the noise by √(1 − ᾱ)"),
        Mistake(lambda x_prev, eps, a_prev, a_t: a_t.sqrt() * (x_prev - (1 - a_prev).sqrt() * eps) + (1 - a_t).sqrt() * eps,
                "you forgot to divide by √ᾱ_{t'} when reading x̂₀ = (x_prev − √(1 − ᾱ_{t'}) ε̂) / √ᾱ_{t'}"),
        Mistake(lambda x_prev, eps, a_prev, a_t: x_prev + ((1 - a_t).sqrt() - (1 - a_prev).sqrt()) * eps,
                "you only added the extra noise (√(1 − ᾱ_t) − √(1 − ᾱ_{t'})) ε̂; the signal must also shrink from √ᾱ_{t'} to "
                "√ᾱ_t"),
    ),
    atol=1e-5,
    rtol=1e-4,
))


# ---- Exercise 3 (derive): the consistency model's boundary scalings ----------------------------------------


def _scalings_with(c_skip=None, c_out=None):
    def scalings(t, sigma_data, timestep_scaling):
        sigma = torch.as_tensor(t, dtype=torch.float64) * timestep_scaling  # the noise level σ = s·t
        d = sigma_data
        reference = (d**2 / (sigma**2 + d**2), sigma / (sigma**2 + d**2).sqrt())
        return tuple((own(sigma, d) if own else ref).float() for own, ref in zip((c_skip, c_out), reference))
    return scalings


def _scalings_cases(g):
    t = torch.tensor([0.0, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 19.0, 259.0, 999.0])
    return [Case(f"t = torch.tensor({[round(v, 2) for v in t.tolist()]}), sigma_data = {d}, timestep_scaling = {s}"
                 f"{words}", (t.clone(), d, s))
            for d, s, words in ((0.5, 10.0, " (LCM's values)"), (0.5, 1.0, " (no timestep scaling)"),
                                (1.0, 10.0, ""), (0.25, 3.0, ""))]


check_consistency_scalings = register(NamedValuesChecker(
    name="check_consistency_scalings",
    signature="fn(t, sigma_data, timestep_scaling) -> (c_skip, c_out)",
    doc="the boundary scalings of a latent consistency model (Song et al. 2023, §3; Luo et al. 2023, §4.2): "
        "f(x, t) = c_skip(t) x + c_out(t) x̂₀(x, t) with EDM's c_skip read at the noise level σ = s·t "
        "(s = ``timestep_scaling``), c_skip = σ_d² / (σ² + σ_d²), and c_out = σ / √(σ² + σ_d²) (EDM's c_out divided by "
        "σ_d, as LCM uses it), so that c_skip(0) = 1 and c_out(0) = 0: f(x, 0) = x. ``t``: a tensor [K] of timesteps; "
        "``sigma_data`` σ_d and ``timestep_scaling`` s: numbers. → ``(c_skip, c_out)``, each a tensor [K].",
    reference=lambda t, sigma_data, timestep_scaling: consistency_scalings(t, sigma_data, timestep_scaling),
    make_cases=_scalings_cases,
    hint="sigma = t * timestep_scaling; c_skip = sigma_data**2 / (sigma**2 + sigma_data**2); c_out = sigma / (sigma**2 + "
         "sigma_data**2).sqrt(). Check the ends: at t = 0, c_skip = 1 and c_out = 0; for large t, c_skip → 0 and "
         "c_out → 1.",
    mistakes=(
        Mistake(_scalings_with(c_skip=lambda sigma, d: sigma**2 / (sigma**2 + d**2), c_out=lambda sigma, d: d / (sigma**2 + d**2).sqrt()),
                "you swapped the roles: at t = 0 the boundary condition f(x, 0) = x needs c_skip = 1 and c_out = 0, "
                "and at high noise the network's x̂₀ must take over (c_out → 1)"),
        Mistake(_scalings_with(c_out=lambda sigma, d: d * sigma / (sigma**2 + d**2).sqrt()),
                "you kept EDM's factor σ_d in c_out (σ_d σ / √(σ² + σ_d²)); LCM's c_out is σ / √(σ² + σ_d²), which "
                "tends to 1 so that f becomes the network's own x̂₀ at high noise"),
        Mistake(_scalings_with(c_out=lambda sigma, d: sigma / (sigma**2 + d**2)),
                "c_out lacks its square root: σ / √(σ² + σ_d²)"),
        Mistake(_scalings_with(c_skip=lambda sigma, d: d / (sigma**2 + d)),
                "you forgot to square σ_d in c_skip: σ_d² / (σ² + σ_d²)"),
        Mistake(lambda t, d, s: consistency_scalings(t, d, 1.0),
                "you left out the timestep scaling: the scalings are read at σ = s·t, so that with s = 10 c_skip is "
                "already below 10⁻⁵ at the grid's first timestep"),
    ),
    atol=1e-6,
    rtol=1e-4,
    value_names=("c_skip", "c_out"),
))


# ---- Exercise 4 (experiment): how closely generated objects follow their edge maps ---------------------------


def _masks(images: torch.Tensor) -> torch.Tensor:
    return object_coverage(images) >= COVERAGE_THRESHOLD  # [B, 1, H, W] bool: the generated objects


def _per_image_iou(made: torch.Tensor, wanted: torch.Tensor, empty: float = 1.0) -> torch.Tensor:
    made, wanted = made.flatten(1), wanted.flatten(1)
    union = (made | wanted).sum(1)
    return torch.where(union > 0, (made & wanted).sum(1) / union.clamp(min=1), torch.full(union.shape, empty))


def _iou_sweep_reference(draw, wanted, scales):
    return [float(_per_image_iou(_masks(draw(scale)), wanted).mean()) for scale in scales]


def _sweep_with(mask_of=None, score=None):
    """The reference with one slip: ``mask_of(images)`` the generated masks, ``score(made, wanted)`` → a float."""
    def sweep(draw, wanted, scales):
        results = []
        for scale in scales:
            made = (mask_of or _masks)(draw(scale))
            results.append(float(score(made, wanted)) if score else float(_per_image_iou(made, wanted).mean()))
        return results
    return sweep


def _pooled_iou(made, wanted):
    return (made & wanted).sum() / (made | wanted).sum().clamp(min=1)


def _recall(made, wanted):
    return ((made & wanted).flatten(1).sum(1) / wanted.flatten(1).sum(1).clamp(min=1)).mean()


def _synthetic_draw(colors, shapes, sizes, targets, drift, empty_rows=()):
    """``draw(scale)``: the objects rendered at ``targets`` (centres, px) moved by ``(1 − scale) · drift`` — a model
    whose objects leave their edge maps as the control weakens; rows in ``empty_rows`` are all black."""
    def draw(scale):
        middle = torch.tensor([16.0, 16.0])
        images = render_batch(colors, shapes, sizes, ["center"] * len(colors), jitter=False,
                              xy_offset=targets - middle + (1 - scale) * drift)
        for row in empty_rows:
            images[row] = -1.0
        return images
    return draw


def _iou_sweep_cases(g):
    cases = []
    for n, scales, words, empty_rows in (
        (4, [0.0, 0.5, 1.0], "4 objects that drift away from their edge maps as the scale falls", ()),
        (6, [1.0, 0.25], "6 objects, one of them blue (its red channel is dark), scales [1.0, 0.25]", ()),
        (5, [0.0, 1.0], "5 objects; image 0 is empty (all black) and so is its wanted mask", (0,)),
    ):
        colors = torch.randint(8, (n,), generator=g)
        if n == 6:
            colors[0] = 2  # blue
        shapes = torch.randint(4, (n,), generator=g)
        sizes = torch.randint(2, (n,), generator=g)
        targets = 10 + torch.rand(n, 2, generator=g) * 12  # centres in [10, 22] px
        drift = (torch.rand(n, 2, generator=g) - 0.5) * 12
        draw = _synthetic_draw(colors, shapes, sizes, targets, drift, empty_rows)
        wanted = _masks(draw(1.0))  # at scale 1 the objects sit exactly on their edge maps
        for row in empty_rows:
            wanted[row] = False
        cases.append(Case(f"draw(scale) renders {words}; wanted {format_shape(wanted)} (bool), scales = {scales}",
                          (draw, wanted, scales)))
    return cases


check_iou_sweep = register(PerSettingChecker(
    name="check_iou_sweep",
    signature="fn(draw, wanted, scales) -> ious",
    doc="how closely generated objects follow their edge maps, at each control strength: for each ``scale`` in "
        "``scales``, ``draw(scale)`` returns images [B, 3, 32, 32] in [-1, 1]; an image's object is where its coverage "
        "(sdlearn.control.object_coverage) is ≥ 0.5; compare it with ``wanted`` [B, 1, 32, 32] (bool, the object each "
        "edge map encloses) by the intersection over union of the two masks, per image (1 when both are empty), and "
        "average over the images. → a list of floats, the mean IoU at each scale, in the order of ``scales``.",
    reference=_iou_sweep_reference,
    make_cases=_iou_sweep_cases,
    hint="for scale in scales: made = object_coverage(draw(scale)) >= 0.5; inter = (made & wanted).flatten(1).sum(1); "
         "union = (made | wanted).flatten(1).sum(1); iou = torch.where(union > 0, inter / union.clamp(min=1), 1.0); "
         "append iou.mean().item().",
    mistakes=(
        Mistake(_sweep_with(score=_pooled_iou),
                "you pooled the pixels of the whole batch (one intersection over one union); take the IoU of each "
                "image, then the mean, so that each image counts once whatever its object's size"),
        Mistake(_sweep_with(score=_recall),
                "you divided by the wanted object's area (the fraction of it covered), not by the union: an object "
                "drawn too large would score 1"),
        Mistake(_sweep_with(mask_of=lambda images: (images[:, :1] + 1) / 2 >= COVERAGE_THRESHOLD),
                "you thresholded the red channel; the coverage is the brightest channel over the image's peak "
                "(object_coverage), so that a blue object counts too"),
        Mistake(_sweep_with(score=lambda made, wanted: _per_image_iou(made, wanted, empty=0.0).mean()),
                "an image with no object where none was wanted scores 0 in your IoU; it matches perfectly: count it as 1"),
    ),
    atol=1e-5,
    rtol=1e-4,
    setting="scale",
    quantity="the mean IoU at that scale",
))
