"""Checkers of notebook 07, text and guidance: the tokenizer, CLIP's contrastive loss, the guidance combination.

In the order the notebook uses them: ``check_tokenize``, ``check_contrastive_loss``, ``check_cfg``.
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
        "the multiplier exp(t) = 1/τ (a number or 0-d tensor, NOT its log). logits = logit_scale · image_emb · "
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
                "you took exp(logit_scale): here logit_scale is already the multiplier exp(t) (TinyCLIP.scale() gives it)"),
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
    doc="the classifier-free guidance combination (Ho & Salimans 2022, eq. 6): ε̃ = ε_uncond + scale · (ε_cond − "
        "ε_uncond), for predictions of any shape (the same for both) and a number ``scale`` ≥ 0. Scale 1 gives "
        "ε_cond, scale 0 ε_uncond.",
    reference=lambda u, c, s: u + s * (c - u),
    make_cases=_cfg_combination_cases,
    hint="start from the unconditional prediction and move ``scale`` times the way the prompt moves it: "
         "eps_uncond + scale * (eps_cond - eps_uncond).",
    mistakes=(
        Mistake(lambda u, c, s: u + s * c, "you added scale · ε_cond: guidance scales the *difference* ε_cond − ε_uncond"),
        Mistake(lambda u, c, s: c + s * (c - u), "you started from ε_cond: the formula starts from ε_uncond, so that "
                                                   "scale 1 gives ε_cond"),
        Mistake(lambda u, c, s: c + s * (u - c), "you swapped ε_uncond and ε_cond: this pushes *away* from the prompt"),
        Mistake(lambda u, c, s: s * (c - u), "you returned only scale · (ε_cond − ε_uncond), the guidance direction: add it "
                                               "to ε_uncond"),
    ),
))
