"""Checkers of notebook 12, personalisation: LoRA's forward pass and its merged weight, LoRA's parameter count
against the full matrix's, and the paired comparison that says what an adapter made the model forget.

In the order the notebook uses them: ``check_lora_forward`` and ``check_lora_merge`` (implement),
``check_lora_parameter_counts`` (derive), ``check_paired_change`` (experiment).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdlearn.exercises.checks_11_flow_matching import NamedValuesChecker
from sdlearn.exercises.framework import Case, Checker, Mistake, format_shape, register

# ---- Exercise 1 (implement): LoRA's forward pass -------------------------------------------------------------


def _lora_forward_reference(x, weight, bias, lora_A, lora_B, alpha):
    rank = lora_A.shape[0]  # A is [r, d_in]
    return F.linear(x, weight, bias) + (alpha / rank) * F.linear(F.linear(x, lora_A), lora_B)


def _lora_forward_with(scale=None, bias_in_update=False, scale_all=False):
    """The forward pass with one slip: ``scale(alpha, A, B)`` the update's factor, the bias added twice, or the
    whole output (base included) scaled."""
    def forward(x, weight, bias, lora_A, lora_B, alpha):
        factor = scale(alpha, lora_A, lora_B) if scale else alpha / lora_A.shape[0]
        update = F.linear(F.linear(x, lora_A), lora_B)
        if scale_all:
            return factor * (F.linear(x, weight, bias) + update)
        return F.linear(x, weight, bias) + factor * update + (bias if bias_in_update else 0)
    return forward


def _lora_forward_cases(g):
    cases = []
    for shape, d_in, d_out, rank, alpha, words in (
        ((4, 16, 192), 192, 576, 4, 4.0, "the tokens of 4 images through a DiT's fused qkv layer (192 → 576), rank 4, "
                                         "alpha 4"),
        ((6, 12), 12, 20, 2, 8.0, "6 feature vectors, 12 → 20, rank 2, alpha 8 (a scale α/r of 4)"),
        ((3, 10), 10, 10, 1, 0.5, "3 feature vectors, a square 10 → 10 layer, rank 1, alpha 0.5"),
        ((2, 5, 24), 24, 8, 8, 16.0, "2 sequences of 5 tokens, 24 → 8, rank 8 (the smaller width), alpha 16"),
    ):
        x = torch.randn(shape, generator=g)
        weight = torch.randn(d_out, d_in, generator=g) / d_in**0.5
        bias = torch.randn(d_out, generator=g) * 0.1
        lora_A = torch.randn(rank, d_in, generator=g) / d_in**0.5
        lora_B = torch.randn(d_out, rank, generator=g) * 0.3
        cases.append(Case(f"{words}: x {format_shape(x)}, weight {format_shape(weight)}, bias {format_shape(bias)}, "
                          f"lora_A {format_shape(lora_A)}, lora_B {format_shape(lora_B)}, alpha = {alpha}",
                          (x, weight, bias, lora_A, lora_B, alpha)))
    x = torch.randn(5, 12, generator=g)
    weight, bias = torch.randn(7, 12, generator=g), torch.randn(7, generator=g)
    cases.append(Case(f"at the start of training, lora_B = 0 (the layer must equal the base layer): x {format_shape(x)}, "
                      "weight [7, 12], bias [7], lora_A [3, 12] random, lora_B [7, 3] zeros, alpha = 3.0",
                      (x, weight, bias, torch.randn(3, 12, generator=g), torch.zeros(7, 3), 3.0)))
    return cases


check_lora_forward = register(Checker(
    name="check_lora_forward",
    signature="fn(x, weight, bias, lora_A, lora_B, alpha) -> y",
    doc="LoRA's forward pass (Hu et al. 2021, eq. 3 with the α/r scaling of §4.1): the frozen layer W₀ h + b plus "
        "the low-rank update (α / r) · B (A h), for every feature vector h along the last axis of ``x`` [..., d_in]; "
        "``weight`` W₀ [d_out, d_in], ``bias`` b [d_out], ``lora_A`` A [r, d_in], ``lora_B`` B [d_out, r], ``alpha`` α "
        "a number, and the rank r is A's number of rows. → ``y`` [..., d_out].",
    reference=_lora_forward_reference,
    make_cases=_lora_forward_cases,
    hint="r = lora_A.shape[0]; base = x @ weight.T + bias; update = (x @ lora_A.T) @ lora_B.T (first down to r "
         "numbers, then up to d_out); return base + (alpha / r) * update.",
    mistakes=(
        Mistake(_lora_forward_with(scale=lambda alpha, A, B: alpha),
                "you scaled the update by α, not α / r: Hu et al. divide by the rank so that one learning rate and "
                "one α serve every rank"),
        Mistake(_lora_forward_with(scale=lambda alpha, A, B: 1.0),
                "you left out the scale α / r of the update"),
        Mistake(_lora_forward_with(scale=lambda alpha, A, B: alpha / B.shape[0]),
                "you divided α by the layer's output width (lora_B.shape[0]); the rank r is lora_A.shape[0] (or "
                "lora_B.shape[1])"),
        Mistake(_lora_forward_with(scale_all=True),
                "you scaled the whole output, the frozen layer's W₀ h + b included; only the update B A h is scaled "
                "by α / r"),
        Mistake(_lora_forward_with(bias_in_update=True),
                "you added the bias twice (once with W₀ h and once with the update); the update B A h has no bias"),
    ),
    atol=1e-5,
    rtol=1e-4,
))


# ---- Exercise 2 (implement): merging the update into the weight ----------------------------------------------


def _merge_reference(weight, lora_A, lora_B, alpha):
    return weight + (alpha / lora_A.shape[0]) * (lora_B @ lora_A)


def _merge_cases(g):
    cases = []
    for d_in, d_out, rank, alpha, words in (
        (10, 10, 3, 1.5, "a square 10 → 10 layer, rank 3, alpha 1.5"),
        (192, 576, 4, 4.0, "a DiT's fused qkv layer (192 → 576), rank 4, alpha 4"),
        (12, 20, 2, 8.0, "12 → 20, rank 2, alpha 8"),
        (24, 8, 8, 16.0, "24 → 8, rank 8, alpha 16"),
    ):
        weight = torch.randn(d_out, d_in, generator=g) / d_in**0.5
        lora_A = torch.randn(rank, d_in, generator=g) / d_in**0.5
        lora_B = torch.randn(d_out, rank, generator=g) * 0.3
        cases.append(Case(f"{words}: weight {format_shape(weight)}, lora_A {format_shape(lora_A)}, lora_B "
                          f"{format_shape(lora_B)}, alpha = {alpha}", (weight, lora_A, lora_B, alpha)))
    return cases


check_lora_merge = register(Checker(
    name="check_lora_merge",
    signature="fn(weight, lora_A, lora_B, alpha) -> merged_weight",
    doc="LoRA's merged weight W = W₀ + (α / r) · B A (Hu et al. 2021, §4.1), so that the adapted layer is again one "
        "matrix product and costs nothing extra at inference: ``weight`` W₀ [d_out, d_in], ``lora_A`` A [r, d_in], "
        "``lora_B`` B [d_out, r], ``alpha`` α a number, r = A's number of rows. → a new tensor [d_out, d_in]; "
        "``weight`` itself must not change (unmerging restores it).",
    reference=_merge_reference,
    make_cases=_merge_cases,
    hint="return weight + (alpha / lora_A.shape[0]) * (lora_B @ lora_A): B A is [d_out, r] @ [r, d_in] = [d_out, d_in], "
         "the weight's shape. Write `weight + ...`, not `weight += ...`, which would change W₀ in place.",
    mistakes=(
        Mistake(lambda weight, A, B, alpha: weight + alpha * (B @ A),
                "you scaled B A by α, not α / r"),
        Mistake(lambda weight, A, B, alpha: weight + B @ A,
                "you left out the scale α / r"),
        Mistake(lambda weight, A, B, alpha: weight - (alpha / A.shape[0]) * (B @ A),
                "you subtracted the update: merging adds ΔW = (α / r) B A to W₀ (unmerging would take it away)"),
        Mistake(lambda weight, A, B, alpha: weight + (alpha / A.shape[0]) * (A.T @ B.T),
                "you multiplied the factors the other way round (Aᵀ Bᵀ is [d_in, d_out], the transpose of B A); "
                "the update is B @ A, [d_out, r] @ [r, d_in]"),
        Mistake(lambda weight, A, B, alpha: (alpha / A.shape[0]) * (B @ A),
                "you returned the update ΔW alone; the merged weight is W₀ + ΔW"),
    ),
    atol=1e-5,
    rtol=1e-4,
))


# ---- Exercise 3 (derive): LoRA's parameter count -------------------------------------------------------------


def _counts_reference(in_features, out_features, rank):
    lora = rank * (in_features + out_features)  # A: r × d_in, B: d_out × r
    full = in_features * out_features  # ΔW as a full matrix
    return lora, full, in_features * out_features / (in_features + out_features)  # r(d_in + d_out) = d_in d_out


def _counts_cases(g):
    return [Case(f"in_features = {i}, out_features = {o}, rank = {r}{words}", (i, o, r))
            for i, o, r, words in ((192, 576, 4, " (the DiT's fused qkv layer)"), (192, 192, 1, " (a square projection)"),
                                   (128, 384, 8, " (the cross-attention's fused kv, reading 128-wide text)"),
                                   (768, 3072, 16, ""), (10, 15, 2, ""))]


check_lora_parameter_counts = register(NamedValuesChecker(
    name="check_lora_parameter_counts",
    signature="fn(in_features, out_features, rank) -> (lora, full, break_even_rank)",
    doc="for one Linear layer d_in → d_out (whole numbers), how many numbers LoRA of rank r trains (A and B, no "
        "bias), how many a full update ΔW of the weight has, and the rank r at which the two are equal (a number, "
        "not rounded): past it a \"low-rank\" update costs more than the full matrix. → ``(lora, full, "
        "break_even_rank)``.",
    reference=_counts_reference,
    make_cases=_counts_cases,
    hint="A is r × d_in and B is d_out × r, so LoRA trains r · (d_in + d_out); ΔW is d_out × d_in; they are equal "
         "where r = d_in · d_out / (d_in + d_out), half the harmonic mean of the two widths.",
    mistakes=(
        Mistake(lambda i, o, r: (r * i * o, i * o, 1.0),
                "you counted r · d_in · d_out for LoRA: A and B are two thin matrices, r × d_in and d_out × r, "
                "r · (d_in + d_out) numbers, not r copies of the full matrix"),
        Mistake(lambda i, o, r: (r * (i + o) + o, i * o, i * o / (i + o)),
                "you gave LoRA a bias of its own (+ d_out); the update B A has none, the layer's bias stays frozen"),
        Mistake(lambda i, o, r: (2 * r * max(i, o), i * o, i * o / (2 * max(i, o))),
                "you counted both factors as r × max(d_in, d_out); A is r × d_in and B is d_out × r"),
        Mistake(lambda i, o, r: (r * (i + o), i * o, min(i, o) / 2),
                "your break-even rank is min(d_in, d_out) / 2; solve r (d_in + d_out) = d_in d_out for r"),
        Mistake(lambda i, o, r: (r * (i + o), i * o, float(min(i, o))),
                "your break-even rank is min(d_in, d_out), the largest rank B A can have; the counts are equal much "
                "earlier, at r = d_in d_out / (d_in + d_out)"),
    ),
    atol=1e-6,
    rtol=1e-6,
    value_names=("lora", "full", "break_even_rank"),
))


# ---- Exercise 4 (experiment): what the adapter made the model forget --------------------------------------------


def _paired_reference(base_correct, adapted_correct):
    base, adapted = base_correct.bool(), adapted_correct.bool()
    change = 100.0 * (adapted.float().mean() - base.float().mean()).item()  # points: adapted minus base
    return change, int((adapted & ~base).sum()), int((~adapted & base).sum())


def _paired_cases(g):
    cases = []
    for n, p_base, p_adapted, words in ((64, 0.95, 0.85, "an adapter that forgot some"),
                                        (40, 0.7, 0.8, "an adapter that does better than the base"),
                                        (16, 0.9, 0.9, "16 images, about as many right either way")):
        base = torch.rand(n, generator=g) < p_base
        adapted = torch.where(torch.rand(n, generator=g) < 0.7, base, torch.rand(n, generator=g) < p_adapted)
        cases.append(Case(f"{words}: base_correct and adapted_correct bool tensors [{n}] (image i drawn from the same "
                          f"noise by both)", (base, adapted)))
    same = torch.rand(12, generator=g) < 0.5
    cases.append(Case("the same 12 answers twice (no change): base_correct = adapted_correct, bool [12]",
                      (same, same.clone())))
    return cases


check_paired_change = register(NamedValuesChecker(
    name="check_paired_change",
    signature="fn(base_correct, adapted_correct) -> (change, only_adapted, only_base)",
    doc="the paired comparison of the same prompts drawn from the same noise with and without an adapter, as "
        "benchmarks/adapt.py makes it: ``base_correct`` and ``adapted_correct`` bool tensors [N], image i right or "
        "not. → ``change``: the adapted accuracy minus the base's, in percentage points (negative: the adapter "
        "forgot), ``only_adapted``: images right with the adapter and wrong without it, ``only_base``: right "
        "without it and wrong with it (McNemar's discordant pairs; the images right or wrong both ways say nothing "
        "about the difference).",
    reference=_paired_reference,
    make_cases=_paired_cases,
    hint="a, b = adapted_correct.bool(), base_correct.bool(); change = 100 * (a.float().mean() - b.float().mean()); "
         "only_adapted = (a & ~b).sum(); only_base = (~a & b).sum().",
    mistakes=(
        Mistake(lambda b, a: (100.0 * (b.float().mean() - a.float().mean()).item(),
                              int((a & ~b).sum()), int((~a & b).sum())),
                "your change has the wrong sign: it is the adapted accuracy minus the base's, negative when the "
                "adapter forgot"),
        Mistake(lambda b, a: ((a.float().mean() - b.float().mean()).item(), int((a & ~b).sum()), int((~a & b).sum())),
                "your change is a fraction; give it in percentage points (× 100)"),
        Mistake(lambda b, a: (100.0 * (a.float().mean() - b.float().mean()).item(), int(a.sum()), int(b.sum())),
                "you counted every image right with the adapter (and without it); count only the images on which "
                "the two disagree: right with the adapter and wrong without it, and the other way round"),
        Mistake(lambda b, a: (100.0 * (a.float().mean() - b.float().mean()).item(), int((~a & b).sum()),
                              int((a & ~b).sum())),
                "you swapped the two counts: only_adapted is right with the adapter and wrong without it"),
    ),
    atol=1e-4,
    rtol=1e-5,
    value_names=("change", "only_adapted", "only_base"),
))
