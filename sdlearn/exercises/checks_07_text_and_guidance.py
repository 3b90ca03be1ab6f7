"""Checkers of notebook 07, text and guidance: the tokenizer, CLIP's contrastive loss, the guidance combination,
guidance with a negative prompt beside the empty one, and the total variation of an open attribute.

In the order the notebook uses them: ``check_tokenize``, ``check_contrastive_loss``, ``check_cfg``,
``check_guidance_with_negative``, ``check_total_variation``.
"""

from __future__ import annotations

import math
import warnings

import torch

from sdlearn.data import VOCABULARY, split_words
from sdlearn.exercises.framework import Case, Checker, Mistake, register
from sdlearn.text import Tokenizer, contrastive_loss


def _tokenize_reference(prompt, vocabulary, max_length):
    with warnings.catch_warnings():  # unknown words and truncation warn; the checker's cases do both on purpose
        warnings.simplefilter("ignore")
        ids, _ = Tokenizer(vocabulary, max_length).encode(prompt)
    return ids[0]  # [max_length]


def _tokenize_rows(prompt, vocabulary, max_length, words=None, offset=4, unknown="unk", specials=True, keep_eos=True):
    """The tokenizer written with one deliberate difference (the mistakes below)."""
    to_id = {w: i + offset for i, w in enumerate(vocabulary)}
    words = split_words(prompt) if words is None else words
    ids = [to_id.get(w, 3) for w in words if unknown == "unk" or w in to_id]
    if specials and keep_eos:
        row = [1, *ids[: max_length - 2], 2]
    elif specials:
        row = [1, *ids, 2][:max_length]
    else:
        row = ids[:max_length]
    return torch.tensor(row + [0] * (max_length - len(row)), dtype=torch.long)


def _tokenize_cases(g):
    pets = ["cat", "dog", "mat", "on", "sat", "the"]
    return [
        Case("prompt 'a large red circle in the top left', the Shapes vocabulary (37 words), max_length 16",
             ("a large red circle in the top left", list(VOCABULARY), 16)),
        Case("prompt 'Big RED disc, upper-left!' (capitals and punctuation), the Shapes vocabulary, max_length 16",
             ("Big RED disc, upper-left!", list(VOCABULARY), 16)),
        Case("prompt 'a crimson circle' ('crimson' is not in the vocabulary), the Shapes vocabulary, max_length 16",
             ("a crimson circle", list(VOCABULARY), 16)),
        Case("the empty prompt '', the Shapes vocabulary, max_length 16", ("", list(VOCABULARY), 16)),
        Case("prompt 'a small blue square in the bottom right corner' (9 words), the Shapes vocabulary, max_length 8: "
             "too long, it must be truncated", ("a small blue square in the bottom right corner", list(VOCABULARY), 8)),
        Case(f"prompt 'The cat sat on the mat.', vocabulary {pets}, max_length 10",
             ("The cat sat on the mat.", pets, 10)),
    ]


check_tokenize = register(Checker(
    name="check_tokenize",
    signature="fn(prompt, vocabulary, max_length) -> ids",
    doc="a word-level tokenizer, as sdlearn.text.Tokenizer: split the prompt with ``sdlearn.data.split_words`` (lower "
        "case, punctuation dropped); ids are <pad> = 0, <bos> = 1, <eos> = 2, <unk> = 3, then ``vocabulary[i]`` is "
        "id 4 + i; an unknown word is <unk>; the row is <bos> w₁ … wₙ <eos>, keeping at most max_length − 2 words "
        "(<eos> stays last), then padded with <pad> to ``max_length``. Return a LongTensor [max_length] (the mask is "
        "then ids != 0).",
    reference=_tokenize_reference,
    make_cases=_tokenize_cases,
    hint="words = split_words(prompt)[: max_length - 2]; ids = [1] + [4 + vocabulary.index(w) if w in vocabulary else 3 "
         "for w in words] + [2]; then append 0s up to max_length and return torch.tensor(ids).",
    mistakes=(
        Mistake(lambda p, v, n: _tokenize_rows(p, v, n, offset=0),
                "you numbered the words from 0: ids 0–3 are the special tokens, so vocabulary[i] is id 4 + i"),
        Mistake(lambda p, v, n: _tokenize_rows(p, v, n, specials=False),
                "you left out <bos> (1) at the start and <eos> (2) after the last word"),
        Mistake(lambda p, v, n: _tokenize_rows(p, v, n, keep_eos=False),
                "you cut the padded row at max_length after adding <eos>, which cut <eos> off: keep at most "
                "max_length − 2 words, then add <eos>"),
        Mistake(lambda p, v, n: _tokenize_rows(p, v, n, unknown="drop"),
                "you dropped the unknown words: each becomes <unk> (3), so the model knows a word was there"),
        Mistake(lambda p, v, n: _tokenize_rows(p, v, n, words=p.split()),
                "you split with str.split(): 'Big' and 'disc,' are not in the vocabulary; use split_words, which "
                "lower-cases and drops punctuation"),
    ),
))


def _contrastive_reference(image_emb, text_emb, logit_scale):
    return float(contrastive_loss(image_emb, text_emb, logit_scale))


def _contrastive_terms(image_emb, text_emb, logit_scale):
    logits = logit_scale * image_emb @ text_emb.T  # [B, B]
    labels = torch.arange(len(logits))
    return (torch.nn.functional.cross_entropy(logits, labels), torch.nn.functional.cross_entropy(logits.T, labels))


def _contrastive_cases(g):
    cases = []
    for B, E, scale, as_tensor in ((4, 8, 1 / 0.07, True), (6, 16, 20.6, False), (2, 4, 1.0, True), (8, 32, 100.0, True)):
        image = torch.nn.functional.normalize(torch.randn(B, E, generator=g), dim=1)
        text = torch.nn.functional.normalize(image + 0.8 * torch.randn(B, E, generator=g), dim=1)  # roughly matched
        shown = f"a 0-d tensor {scale:.4g}" if as_tensor else f"the float {scale}"
        cases.append(Case(f"{B} pairs of unit vectors of size {E} (image_emb and text_emb [{B}, {E}], row i of each "
                          f"a pair), logit_scale = {shown}",
                          (image, text, torch.tensor(scale) if as_tensor else scale)))
    return cases


check_contrastive_loss = register(Checker(
    name="check_contrastive_loss",
    signature="fn(image_emb, text_emb, logit_scale) -> loss",
    doc="CLIP's symmetric contrastive loss (Radford et al. 2021, Fig. 3), as sdlearn.text.contrastive_loss: "
        "``image_emb`` and ``text_emb`` are [B, E] unit vectors, row i of each a matching pair; ``logit_scale`` is "
        "the multiplier 1/τ, τ the temperature (a number or 0-d tensor, NOT its log). logits = logit_scale · image_emb · "
        "text_embᵀ [B, B]; the loss is ½ (cross-entropy of each row against its diagonal entry + cross-entropy of "
        "each column against its diagonal entry), each averaged over the batch. Return a number (0-d tensor or float).",
    reference=_contrastive_reference,
    make_cases=_contrastive_cases,
    hint="logits = logit_scale * image_emb @ text_emb.T; labels = torch.arange(B); loss = (F.cross_entropy(logits, "
         "labels) + F.cross_entropy(logits.T, labels)) / 2.",
    mistakes=(
        Mistake(lambda i, t, s: _contrastive_terms(i, t, s)[0],
                "you only kept the image → text direction (rows); CLIP averages it with text → image (columns, logits.T)"),
        Mistake(lambda i, t, s: _contrastive_terms(i, t, s)[1],
                "you only kept the text → image direction (columns); CLIP averages it with image → text (rows)"),
        Mistake(lambda i, t, s: sum(_contrastive_terms(i, t, s)),
                "you added the two directions without halving: the loss is their mean"),
        Mistake(lambda i, t, s: 0.5 * sum(_contrastive_terms(i, t, math.exp(float(s)))),
                "you took exp(logit_scale): here logit_scale is already the multiplier 1/τ (TinyCLIP.scale() gives it), "
                "not its log"),
        Mistake(lambda i, t, s: 0.5 * sum(_contrastive_terms(i, t, 1 / s)),
                "you divided the similarities by logit_scale: it is 1/τ, so multiply by it (dividing by τ)"),
        Mistake(lambda i, t, s: 0.5 * sum(_contrastive_terms(i, t, 1.0)),
                "you left out logit_scale: raw cosine similarities lie in [-1, 1], far too flat for a softmax"),
    ),
    atol=1e-5,
    rtol=1e-4,
))


def _cfg_combination_cases(g):
    cases = []
    for B, scale in ((2, 4.0), (3, 7.5), (1, 1.0), (2, 0.0), (4, 2)):
        u, c = torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 4, 8, 8, generator=g)
        cases.append(Case(f"eps_uncond and eps_cond of shape [{B}, 4, 8, 8], scale = {scale}", (u, c, scale)))
    return cases


check_cfg = register(Checker(
    name="check_cfg",
    signature="fn(eps_uncond, eps_cond, scale) -> guided",
    doc="the classifier-free guidance combination (Ho & Salimans 2022, eq. 6, whose w is our w − 1): ε̂ = ε̂_∅ + w · "
        "(ε̂_c − ε̂_∅), with ``eps_uncond`` = ε̂_∅, ``eps_cond`` = ε̂_c and ``scale`` = w ≥ 0, for predictions of any "
        "shape (the same for both). w = 1 gives ε̂_c, w = 0 gives ε̂_∅.",
    reference=lambda u, c, s: u + s * (c - u),
    make_cases=_cfg_combination_cases,
    hint="start from the unconditional prediction and move ``scale`` times the way the prompt moves it: "
         "eps_uncond + scale * (eps_cond - eps_uncond).",
    mistakes=(
        Mistake(lambda u, c, s: u + s * c, "you added w · ε̂_c: guidance scales the *difference* ε̂_c − ε̂_∅"),
        Mistake(lambda u, c, s: c + s * (c - u), "you started from ε̂_c: the formula starts from ε̂_∅, so that "
                                                   "w = 1 gives ε̂_c"),
        Mistake(lambda u, c, s: c + s * (u - c), "you swapped ε̂_∅ and ε̂_c: this pushes *away* from the prompt"),
        Mistake(lambda u, c, s: s * (c - u), "you returned only w · (ε̂_c − ε̂_∅), the guidance direction: add it "
                                               "to ε̂_∅"),
    ),
))


def _negative_guidance_reference(eps_empty, eps_cond, eps_neg, w, v):
    return eps_empty + w * (eps_cond - eps_empty) - v * (eps_neg - eps_empty)


def _negative_guidance_cases(g):
    cases = []
    for B, w, v in ((2, 4.0, 0.0), (3, 4.0, 3.0), (1, 7.5, 2.0), (2, 1.0, 1.0), (4, 2.0, 0.5)):
        empty, cond, neg = (torch.randn(B, 4, 8, 8, generator=g) for _ in range(3))
        cases.append(Case(f"eps_empty, eps_cond, eps_neg of shape [{B}, 4, 8, 8], w = {w}, v = {v}",
                          (empty, cond, neg, w, v)))
    return cases


check_guidance_with_negative = register(Checker(
    name="check_guidance_with_negative",
    signature="fn(eps_empty, eps_cond, eps_neg, w, v) -> guided",
    doc="the noise prediction that samples p(x_t) p(c | x_t)^w / p(c_neg | x_t)^v, from the three predictions of "
        "one network at the same x_t and t: ε̂_∅ (the empty prompt), ε̂_c (the prompt) and ε̂_neg (the negative "
        "prompt). Bayes' rule gives each implicit classifier's score as a difference of two scores, and ε̂ ≈ "
        "−√(1 − ᾱ_t) · score converts scores into noise predictions (Ho & Salimans 2022, §3; Liu et al. 2022, "
        "'Compositional visual generation with composable diffusion models', its NOT operator). Predictions of any shape (the same for all three); w, v numbers.",
    reference=_negative_guidance_reference,
    make_cases=_negative_guidance_cases,
    hint="score of the target = ∇log p(x_t) + w (∇log p(x_t | c) − ∇log p(x_t)) − v (∇log p(x_t | c_neg) − "
         "∇log p(x_t)); multiply every score by −√(1 − ᾱ_t) to turn it into a noise prediction.",
    mistakes=(
        Mistake(lambda e, c, n, w, v: e + w * (c - e) + v * (n - e),
                "you added v · (ε̂_neg − ε̂_∅): dividing by p(c_neg | x_t)^v *subtracts* v times that classifier's "
                "score, so the term enters with a minus sign, as the prompt's enters with a plus"),
        Mistake(lambda e, c, n, w, v: e + w * (c - e) - v * n,
                "you subtracted v · ε̂_neg alone: the negative prompt's implicit classifier is a difference, "
                "∇log p(c_neg | x_t) = ∇log p(x_t | c_neg) − ∇log p(x_t), so subtract v · (ε̂_neg − ε̂_∅)"),
        Mistake(lambda e, c, n, w, v: e + w * (c - e) - v * (n - c),
                "you measured the negative prompt against ε̂_c; Bayes' rule compares p(x_t | c_neg) with p(x_t), "
                "so its classifier is ε̂_neg − ε̂_∅"),
        Mistake(lambda e, c, n, w, v: n + w * (c - n),
                "this is Stable Diffusion's negative prompt, ε̂_neg + w (ε̂_c − ε̂_neg): it is the special case "
                "v = w − 1 of the answer; keep ε̂_∅ as the base and v as its own scale"),
        Mistake(lambda e, c, n, w, v: e + w * (c - e) - w * (n - e),
                "you scaled the negative prompt's term by w; its exponent, and so its scale, is v"),
    ),
))


def _total_variation_reference(counts):
    p = torch.as_tensor(counts, dtype=torch.float64)
    return float(0.5 * (p / p.sum() - 1 / len(p)).abs().sum())


def _total_variation_with(half=0.5, normalise=True, values=None, reduce="sum"):
    def tv(counts):
        p = torch.as_tensor(counts, dtype=torch.float64)
        k = int((p > 0).sum()) if values == "seen" else len(p)
        p = p / p.sum() if normalise else p
        gap = (p - 1 / k).abs()
        return float(half * (gap.sum() if reduce == "sum" else gap.max()))
    return tv


def _total_variation_cases(g):
    return [
        Case("colour counts [3, 2, 4, 19, 7, 18, 10, 1] (64 images, 8 colours)",
             (torch.tensor([3, 2, 4, 19, 7, 18, 10, 1]),)),
        Case("colour counts [0, 0, 0, 60, 2, 0, 2, 0] (one colour took over)", (torch.tensor([0, 0, 0, 60, 2, 0, 2, 0]),)),
        Case("counts [8, 8, 8, 8, 8, 8, 8, 8] (exactly uniform)", (torch.full((8,), 8),)),
        Case("size counts [20, 36] (2 values)", (torch.tensor([20, 36]),)),
        Case("position counts [10, 0, 0, 0, 0] (5 values, all in one)", (torch.tensor([10, 0, 0, 0, 0]),)),
        Case("random counts of 6 values", (torch.randint(0, 30, (6,), generator=g) + 1,)),
    ]


check_total_variation = register(Checker(
    name="check_total_variation",
    signature="fn(counts) -> tv",
    doc="the total-variation distance between a histogram and the uniform distribution over its k values: "
        "``counts`` is a tensor [k] of how many images took each value; p = counts / counts.sum(); "
        "TV = ½ Σ_i |p_i − 1/k|, 0 when uniform, 1 − 1/k when every image took one value (as "
        "sdlearn.metrics.open_attribute_tv computes it). Return a number.",
    reference=_total_variation_reference,
    make_cases=_total_variation_cases,
    hint="p = counts / counts.sum(); return (0.5 * (p - 1 / len(p)).abs().sum()).item()",
    mistakes=(
        Mistake(_total_variation_with(half=1.0),
                "you left out the ½: TV = ½ Σ |p_i − q_i|, so that it lies between 0 and 1 (this is the L1 distance)"),
        Mistake(_total_variation_with(normalise=False),
                "you compared the raw counts with 1/k: divide the counts by their total first, to get frequencies"),
        Mistake(_total_variation_with(values="seen"),
                "you took k as the number of values that occur; the uniform distribution is over all k values, the "
                "ones no image took included (len(counts))"),
        Mistake(_total_variation_with(half=1.0, reduce="max"),
                "you took the largest gap |p_i − 1/k|; TV sums the gaps (and halves the sum)"),
    ),
))
