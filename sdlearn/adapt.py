"""Personalisation: teaching a trained model a concept it never saw, from a few examples (notebook 12).

The concept is the star (:func:`sdlearn.data.star_examples`: eight images, red, yellow, blue and white stars,
captioned "a large red star in the top left"). Shapes never shows a star, and the tokenizer has no word for it.
Three methods teach it, each changing a different, small part of the model:

1. **Textual inversion** (Gal et al. 2022, "An Image is Worth One Word: Personalizing Text-to-Image Generation
   using Textual Inversion"). Add a word to the tokenizer and one row v* to the text encoder's token table, then
   find

       v* = argmin_v  E_{z, y, ε, t} ‖ε − ε_θ(z_t, t, c_θ(y; v))‖²              (Gal et al., eq. 2)

   with the text encoder c_θ and the denoiser ε_θ frozen: the diffusion loss of the examples, minimised over one
   vector (128 numbers here). Gal et al. start v from the embedding of a coarse descriptor of the object; we start
   from "shape". Every old prompt gives bit for bit the images it gave before (nothing it reads has changed), so
   the model forgets nothing; but it can only find a word for what the frozen denoiser can already draw.

2. **LoRA** (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"). Freeze each adapted weight
   W₀ (out × in) and learn a low-rank change of it:

       h = W₀ x + (α / r) · B A x,      A: r × in, random;  B: out × r, zeros      (Hu et al., eq. 3 and §4.1)

   B = 0 at the start, so the adapted model starts exactly as the base model; r ≪ min(in, out) keeps the change
   (and the file) small: r · (in + out) numbers per layer instead of in · out. Dividing by r lets one learning
   rate serve every rank (§4.1: "we then scale ΔWx by α/r"). After training, W = W₀ + (α/r) BA can be *merged*
   into the weight, so inference costs nothing extra, and *unmerged* again. Unmerging restores a copy of W₀ kept
   while merged: subtracting (α/r) BA back would not, because floating-point addition rounds (W₀ + ΔW) − ΔW ≠ W₀
   in the last bits. Here LoRA adapts the attention projections of the denoiser (:data:`ATTENTION_TARGETS`: the
   queries, keys, values and outputs of self- and cross-attention; Hu et al. adapt W_q and W_v, the Stable
   Diffusion community all four). The DiT computes Q, K and V with one fused Linear (``qkv``), so one rank-r
   update adapts the three together.

3. **DreamBooth** (Ruiz et al. 2023, "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for Subject-Driven
   Generation"). Fine-tune the denoiser on the examples, captioned with a rare identifier, and keep it drawing the
   class as it did with a *prior-preservation* term on the model's own samples of the class prompt x_pr, made by
   the frozen model before training:

       L = E ‖ε − ε_θ(z_t, t, c)‖²  +  λ · E ‖ε' − ε_θ(z'_t', t', c_pr)‖²           (Ruiz et al., eq. 2, ε form)

   (:func:`prior_preservation_loss`). Ruiz et al.'s class prompt is "a [class noun]"; ours keeps each example's
   other attributes, "a large red shape in the top left" (:func:`class_prompt`), so the prior covers where and
   how large the examples are. The term fights the two failures the paper names: *language drift* (the class
   word coming to mean the subject, "a red shape" drawing stars) and loss of diversity. Full DreamBooth trains
   every weight of the denoiser (a whole new denoiser to ship); **LoRA-DreamBooth** trains only LoRA adapters
   with the same loss (a file of a few hundred kB).

Methods combine ("ti+lora": the new word's row and the adapters train together). Every method needs the word:
:func:`add_token` appends "star" to the tokenizer and a row to the token table, leaving every existing id and
embedding as it was. Textual inversion trains the row; DreamBooth and LoRA freeze it at a random vector as large
as the others, the "rare token" with a weak prior that Ruiz et al. choose for the identifier (started from
"shape", "a red star" would begin by meaning "a red shape").

Training runs on the generic loop, :func:`sdlearn.training.train`: :class:`AdaptedModel` (text encoder +
denoiser, one module), :func:`prepare_adapter` (the word, the adapters, what trains), :func:`adapter_batch_fn` and
:func:`prior_preservation_loss`; :func:`sdlearn.adapt_recipes.train_adapter` is the recipe. Files:
:func:`save_adapter` writes the new tokens' rows and the LoRA matrices as safetensors + JSON (the atomic format of
:mod:`sdlearn.checkpoint`) with the SHA-256 of the base model's files; :func:`load_adapter` refuses a file made for
another base model, naming both hashes. :func:`save_lora` and :func:`load_lora` are its LoRA-only case;
:func:`adapter_summary` gives the parameter counts and the file's size.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sdlearn.checkpoint import (
    CheckpointError,
    checkpoint_paths,
    count_parameters,
    load_checkpoint,
    save_checkpoint,
)
from sdlearn.checks import check_probability
from sdlearn.data import ATTRIBUTES, IMAGE_SIZE, POSITION_CENTERS, caption_for
from sdlearn.schedules import FLOW, training_timesteps
from sdlearn.text import TextEncoder, Tokenizer  # the word is added to the tokenizer and the text encoder

ATTENTION_TARGETS: tuple[str, ...] = ("self_attn.qkv", "self_attn.out", "cross_attn.q", "cross_attn.kv", "cross_attn.out")
"""The attention projections of the DiT (and of the course U-Net, whose attention layers have the same names)."""
METHODS: tuple[str, ...] = ("ti", "lora", "dreambooth")
"""What trains: the new word's embedding row, LoRA adapters, or every weight of the denoiser; "ti+lora" combines."""
ADAPTER_KIND = "adapter"  # the "kind" of an adapter file's JSON
BASE_PARTS: tuple[str, ...] = ("denoiser", "text_encoder")  # the base files an adapter records the hashes of

# ----------------------------------------------------------------------------------------------------------
# LoRA (Hu et al. 2021)


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update: ``y = base(x) + (alpha / rank) · B (A x)``.

    ``lora_A`` ``[rank, in]`` starts Kaiming-uniform (as ``nn.Linear`` initialises its weights, and as Hu et al.'s
    reference code does; the paper says "a random Gaussian initialization for A"), ``lora_B`` ``[out, rank]`` at
    zero, so the layer starts as ``base`` exactly. :meth:`merge` adds the update into ``base.weight`` (then the
    forward pass is one Linear again); :meth:`unmerge` restores the weight kept at merging, bit for bit."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        check_rank(rank, base.in_features, base.out_features)
        self.base = base.requires_grad_(False)
        self.rank, self.alpha = int(rank), check_alpha(alpha)
        self.scale = self.alpha / self.rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        self.merged = False
        self.kept_weight: torch.Tensor | None = None  # W₀ while merged

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, merged={self.merged}"

    def delta_weight(self) -> torch.Tensor:
        """The update ΔW = (α / r) · B A, ``[out, in]``: what merging adds to the weight."""
        return self.scale * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # W₀ x + b (W₀ + ΔW once merged)
        if self.merged:
            return y
        return y + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)  # + (α/r) B (A x): r-wide in between

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W₀ + ΔW, keeping W₀; a merged layer costs one matrix product. Merging twice changes nothing."""
        if not self.merged:
            self.kept_weight = self.base.weight.detach().clone()
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← the W₀ kept at merging, exactly. Unmerging an unmerged layer changes nothing."""
        if self.merged:
            self.base.weight.copy_(self.kept_weight)
            self.kept_weight, self.merged = None, False


def check_rank(rank, in_features: int, out_features: int, name: str = "this layer") -> int:
    """A LoRA rank is a whole number from 1 to min(in, out): beyond that, B A is no longer low-rank."""
    limit = min(in_features, out_features)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(f"LoRA rank must be a whole number from 1 to {limit} (the smaller width of {name}, "
                         f"{in_features} in, {out_features} out), got {rank!r}")
    return rank


def check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"LoRA alpha must be a positive number (the update is scaled by alpha / rank), got {alpha!r}")
    return float(alpha)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRA layers of ``model`` by name (``"blocks.0.self_attn.qkv"``), in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def linear_names(model: nn.Module) -> list[str]:
    """The names of ``model``'s Linear layers with block numbers as ``*`` ("blocks.*.self_attn.qkv"): what
    ``target_modules`` can name."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
    return list(dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", n) for n in names))


def add_lora(model: nn.Module, rank: int = 4, alpha: float | None = None,
             target_modules: str | Sequence[str] = ATTENTION_TARGETS, generator: torch.Generator | None = None) -> list[str]:
    """Wrap the Linear layers of ``model`` that ``target_modules`` names in :class:`LoRALinear` adapters of
    ``rank`` and ``alpha`` (default: alpha = rank, a scale of 1), freeze every other parameter of ``model``
    (Hu et al. train only A and B), and return the names of the adapted layers.

    A target names a layer by its full name or the end of it: "cross_attn.kv" adapts "blocks.0.cross_attn.kv",
    "blocks.1.cross_attn.kv", .... Raises ``ValueError``, changing nothing, for a target that matches no Linear
    layer (naming the ones there are), a rank below 1 or above a target layer's smaller width, a bad alpha, or a
    model that already has adapters (:func:`remove_lora` first)."""
    targets = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target_modules must name Linear layers (e.g. {', '.join(ATTENTION_TARGETS)}), got {target_modules!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a whole number ≥ 1, got {rank!r}")
    alpha = check_alpha(rank if alpha is None else alpha)
    if lora_layers(model):
        raise ValueError(f"this {type(model).__name__} already has LoRA adapters on {', '.join(lora_layers(model))}; "
                         "remove_lora(model) first")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen: dict[str, nn.Linear] = {}
    for target in targets:
        hits = {n: m for n, m in linears.items() if n == target or n.endswith("." + target)}
        if not hits:
            raise ValueError(f"target module {target!r} matches no Linear layer of this {type(model).__name__}; "
                             f"its Linear layers are: {', '.join(linear_names(model))}")
        chosen.update(hits)
    for name, layer in chosen.items():
        check_rank(rank, layer.in_features, layer.out_features, repr(name))
    model.requires_grad_(False)
    for name, layer in chosen.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(layer, rank, alpha, generator))
    return list(chosen)


def merge_lora(model: nn.Module) -> None:
    """Merge every LoRA layer of ``model`` into its weight (:meth:`LoRALinear.merge`)."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo :func:`merge_lora`: every weight is again exactly what it was (:meth:`LoRALinear.unmerge`)."""
    for layer in lora_layers(model).values():
        layer.unmerge()


def remove_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every :class:`LoRALinear` by its ``nn.Linear``: with ``merge`` the adapted weight W₀ + ΔW (a plain
    model with the concept built in, saved as any other), else the original W₀. Returns ``model``, whose weights
    stay frozen as :func:`add_lora` left them (``model.requires_grad_(True)`` to train it all)."""
    for name, layer in lora_layers(model).items():
        layer.unmerge()
        if merge:
            layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA matrices of ``model``: ``{"blocks.0.self_attn.qkv.lora_A": [r, in], "...lora_B": [out, r], ...}``."""
    return {f"{name}.{part}": getattr(layer, part).detach() for name, layer in lora_layers(model).items()
            for part in ("lora_A", "lora_B")}


# ----------------------------------------------------------------------------------------------------------
# A new word: textual inversion (Gal et al. 2022)


class AddedTokenEmbedding(nn.Module):
    """A token table with rows appended: the original ``nn.Embedding`` (frozen) and the new rows, ``added``
    ``[k, D]``, a parameter of their own, so that textual inversion trains them and nothing else (an optimizer's
    weight decay cannot touch the old rows either). ``weight`` is the whole table ``[V + k, D]``."""

    def __init__(self, base: nn.Embedding, rows: torch.Tensor):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.added = nn.Parameter(rows.detach().to(base.weight).clone())

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.base.weight, self.added])  # [V + k, D]

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings + self.added.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def add_token(tokenizer: Tokenizer, text_encoder: TextEncoder, word: str, *, init_word: str | None = None,
              embedding: torch.Tensor | None = None, generator: torch.Generator | None = None) -> int:
    """Teach ``tokenizer`` and ``text_encoder`` a new ``word`` → its id, ``vocab_size`` before the call (every
    existing token keeps its id and its embedding). Its row starts as ``embedding`` if given, else as a copy of
    ``init_word``'s row (Gal et al.: a coarse descriptor, e.g. "shape"), else random, N(0, s²) with s the standard
    deviation of the existing rows (a rare token, Ruiz et al.). The text encoder's ``config.vocab_size`` grows by one
    (a new config object: a TinyCLIP's ``config.text`` is left as it was) and its token table becomes an
    :class:`AddedTokenEmbedding`. Raises ``ValueError``, changing nothing, for a word the tokenizer knows, a word
    that is not lower-case letters, an unknown ``init_word`` or a tokenizer that does not fit the encoder."""
    if not isinstance(tokenizer, Tokenizer) or not isinstance(text_encoder, TextEncoder):
        raise ValueError(f"add_token needs a Tokenizer and a TextEncoder, got {type(tokenizer).__name__} and "
                         f"{type(text_encoder).__name__}")
    if tokenizer.vocab_size != text_encoder.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the text encoder "
                         f"{text_encoder.config.vocab_size}: use the tokenizer it was trained with")
    if not isinstance(word, str) or word in tokenizer.token_to_id:
        raise ValueError(f"the new word must be a word the tokenizer does not know yet, got {word!r}")
    table = text_encoder.token_embedding
    if embedding is not None:
        row = torch.as_tensor(embedding).detach()
        if row.shape != (text_encoder.width,) or not bool(torch.isfinite(row).all()):
            raise ValueError(f"embedding must be a finite vector of {text_encoder.width} numbers, got shape {list(row.shape)}")
    elif init_word is not None:
        if init_word not in tokenizer.token_to_id:
            raise ValueError(f"init_word {init_word!r} is not a token; choose one of: {', '.join(tokenizer.vocabulary)}")
        row = table.weight[tokenizer.token_to_id[init_word]].detach().clone()
    else:
        row = torch.randn(text_encoder.width, generator=generator) * table.weight.detach().std().item()
    (new_id,) = tokenizer.add_words([word])  # checks the word's spelling before anything changes
    if isinstance(table, AddedTokenEmbedding):
        table.added = nn.Parameter(torch.cat([table.added.detach(), row[None].to(table.added)]),
                                   requires_grad=table.added.requires_grad)
    else:
        text_encoder.token_embedding = AddedTokenEmbedding(table, row[None])
    text_encoder.config = dataclasses.replace(text_encoder.config, vocab_size=new_id + 1)
    return new_id


def added_words(tokenizer: Tokenizer, text_encoder: TextEncoder) -> list[str]:
    """The words :func:`add_token` taught the pair, in id order."""
    table = text_encoder.token_embedding
    return tokenizer.id_to_token[table.base.num_embeddings:] if isinstance(table, AddedTokenEmbedding) else []


# ----------------------------------------------------------------------------------------------------------
# Training: the model, what trains, the batches, the loss (Ruiz et al. 2023, eq. 2)


class AdaptedModel(nn.Module):
    """The text encoder and the denoiser as one module, so that :func:`sdlearn.training.train` (one model, one
    optimizer) trains parameters of either: ``model(x_t, t, ids, mask)`` encodes the token ids (through the new
    word's row, which textual inversion trains) and predicts with the denoiser."""

    def __init__(self, text_encoder: TextEncoder, denoiser: nn.Module):
        super().__init__()
        self.text_encoder, self.denoiser = text_encoder, denoiser

    @property
    def config(self):
        return self.denoiser.config

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        length = int(mask.sum(1).max())  # the padding beyond the longest prompt changes nothing: drop it
        text = self.text_encoder(ids[:, :length], mask[:, :length])
        return self.denoiser(x_t, t, text.tokens, text.mask)


def parse_method(method: str) -> frozenset[str]:
    """"ti", "lora", "dreambooth", or a combination joined by "+" ("ti+lora") → the set of its parts."""
    parts = method.split("+") if isinstance(method, str) else []
    unknown = [p for p in parts if p not in METHODS]
    if not parts or unknown or len(set(parts)) != len(parts) or {"lora", "dreambooth"} <= set(parts):
        raise ValueError(f"method must be one of {', '.join(METHODS)} or a combination such as 'ti+lora' "
                         f"(not lora and dreambooth together: dreambooth already trains every weight), got {method!r}")
    return frozenset(parts)


def set_trainable(model: AdaptedModel, method: str) -> list[nn.Parameter]:
    """Freeze everything in ``model``, then let ``method``'s parameters train → those parameters: "ti" the new
    words' rows, "lora" the adapters' A and B, "dreambooth" every weight of the denoiser."""
    parts = parse_method(method)
    model.requires_grad_(False)
    trainable: list[nn.Parameter] = []
    if "ti" in parts:
        table = model.text_encoder.token_embedding
        if not isinstance(table, AddedTokenEmbedding):
            raise ValueError("textual inversion trains a new word's embedding: add_token(...) first")
        trainable.append(table.added)
    if "lora" in parts:
        layers = lora_layers(model.denoiser)
        if not layers:
            raise ValueError("the denoiser has no LoRA adapters: add_lora(denoiser, ...) first")
        trainable += [p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)]
    if "dreambooth" in parts:
        trainable += list(model.denoiser.parameters())
    for p in trainable:
        p.requires_grad_(True)
    return trainable


def prepare_adapter(tokenizer: Tokenizer, text_encoder: TextEncoder, denoiser: nn.Module, method: str, *,
                    word: str = "star", init_word: str | None = None, rank: int = 4, alpha: float | None = None,
                    target_modules: str | Sequence[str] = ATTENTION_TARGETS,
                    generator: torch.Generator | None = None) -> AdaptedModel:
    """Everything a ``method`` needs before training, in place: the new ``word`` (:func:`add_token`, unless the
    tokenizer learnt it already; started from ``init_word``, by default "shape" when textual inversion trains it
    and random otherwise), LoRA adapters for "lora" (:func:`add_lora`), and what trains (:func:`set_trainable`).
    Returns the :class:`AdaptedModel`, in the training mode the denoiser had."""
    parts = parse_method(method)
    if word not in tokenizer.token_to_id:
        default = "shape" if "ti" in parts and "shape" in tokenizer.token_to_id else None
        add_token(tokenizer, text_encoder, word, init_word=init_word or default, generator=generator)
    elif word not in added_words(tokenizer, text_encoder):
        raise ValueError(f"{word!r} is already a word of the tokenizer's vocabulary; name the new concept with a new word")
    if "lora" in parts and not lora_layers(denoiser):
        add_lora(denoiser, rank, alpha, target_modules, generator)
    model = AdaptedModel(text_encoder, denoiser).train(denoiser.training)
    set_trainable(model, method)
    return model


def class_prompt(attributes: Mapping[str, str]) -> str:
    """The class prompt of an example for prior preservation: its caption with the shape left open, "a large red
    shape in the top left" for "a large red star in the top left" (Ruiz et al.'s "a [class noun]")."""
    return caption_for({k: v for k, v in attributes.items() if k != "shape"})


def example_caption(attributes: Mapping[str, str], generator: torch.Generator, open_fraction: float = 0.5) -> str:
    """A random caption of an example that always names its shape (the new word): a fraction ``open_fraction``
    leave each other attribute open with probability ½ ("a red star", "a star in the top left"), as the base model
    was trained on partial captions; the rest name all four, in any template and synonyms."""
    u = torch.rand(len(ATTRIBUTES) + 1, generator=generator).tolist()
    named = dict(attributes) if u[0] >= open_fraction else \
        {k: v for (k, v), x in zip(attributes.items(), u[1:]) if k == "shape" or x >= 0.5}
    return caption_for(named, generator)


AUGMENTATIONS: tuple[str, ...] = ("move", "mirror")
"""What :func:`augment_examples` may do to the learner's examples: move each to every position, mirror it left-right."""


def _shifted(image: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """``image`` ``[3, H, W]`` moved ``dx`` pixels right and ``dy`` down, the uncovered border black (-1)."""
    out = torch.full_like(image, -1.0)
    H, W = image.shape[-2:]
    out[:, max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
        image[:, max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)]
    return out


def _mirrored_position(position: str) -> str:
    """The position whose centre is the left-right mirror image of ``position``'s (x → IMAGE_SIZE − x)."""
    x, y = POSITION_CENTERS[position]
    return next(p for p, c in POSITION_CENTERS.items() if c == (IMAGE_SIZE - x, y))


def augment_examples(images: torch.Tensor, attributes: Sequence[Mapping[str, str]], augment: str = "move+mirror"
                     ) -> tuple[torch.Tensor, list[str], list[dict[str, str]]]:
    """More training images made from the learner's own examples (single objects on black, as Shapes draws them),
    with their captions and attribute dicts changed to match → ``(images [M, 3, H, W], captions, attributes)``.

    ``"move"``: each example shifted by whole pixels from its position's centre to every other position's
    (:data:`sdlearn.data.POSITION_CENTERS`), so every example is seen everywhere and the caption's position says
    where it now is; the pixels are the example's own, its jitter kept. ``"mirror"``: each example also flipped
    left-right (``x → W − x``, which maps each position's centre exactly onto its mirror image's, "top left" ↔ "top
    right"), for a concept that is itself mirror-symmetric, as the star is. "move+mirror" does both: 2 × 5 images
    per example, the original first. Nothing new is rendered: these are the operations a learner could apply to
    photographs of a subject (random crops and flips, Krizhevsky et al. 2012, §4.1)."""
    parts = augment.split("+") if isinstance(augment, str) else []
    if not parts or any(p not in AUGMENTATIONS for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)} or 'move+mirror', got {augment!r}")
    _check_examples(images, [caption_for(a) for a in attributes], attributes, "example")
    out_images, out_attributes = [], []
    for image, attrs in zip(images, attributes):
        if attrs.get("position") not in POSITION_CENTERS:
            raise ValueError(f"augmenting needs each example's position (one of {', '.join(POSITION_CENTERS)}), "
                             f"got {attrs!r}")
        views = [(image, attrs["position"])]
        if "mirror" in parts:
            views.append((image.flip(-1), _mirrored_position(attrs["position"])))
        for view, position in views:
            x0, y0 = POSITION_CENTERS[position]
            others = [p for p in POSITION_CENTERS if p != position] if "move" in parts else []
            for target in [position, *others]:
                x1, y1 = POSITION_CENTERS[target]
                out_images.append(_shifted(view, round(x1 - x0), round(y1 - y0)))
                out_attributes.append({**attrs, "position": target})
    return torch.stack(out_images), [caption_for(a) for a in out_attributes], out_attributes


def _check_examples(images, captions, attributes, what: str) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        got = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{what} images must be a tensor [N, 3, H, W] in [-1, 1], got {got}")
    n = images.shape[0]
    if n < 1:
        raise ValueError(f"need at least 1 {what} image, got 0")
    if isinstance(captions, str) or len(captions) != n or (attributes is not None and len(attributes) != n):
        raise ValueError(f"give one caption (and, if any, one attribute dict) per {what} image: {n} images, "
                         f"{len(captions)} captions")


ADAPTER_TIMESTEP_SAMPLINGS = ("uniform", "flow_matched")
"""How :func:`adapter_batch_fn` may draw training timesteps (:func:`sdlearn.schedules.training_timesteps`)."""


def adapter_batch_fn(vae, tokenizer: Tokenizer, schedule, images: torch.Tensor, captions: Sequence[str], *,
                     attributes: Sequence[Mapping[str, str]] | None = None, prior_images: torch.Tensor | None = None,
                     prior_captions: Sequence[str] | None = None, batch_size: int = 8,
                     prior_batch_size: int | None = None, open_fraction: float = 0.5,
                     prior_caption_dropout: float = 0.0, timesteps: str = "uniform", seed: int = 0
                     ) -> Callable[[int], dict[str, torch.Tensor]]:
    """``batch_fn(step)`` for :func:`sdlearn.training.train`, a pure function of ``(seed, step)``: ``batch_size``
    examples drawn with replacement, each as ``x0`` (a sample of the VAE's posterior q(z | x) times the scaling
    factor, as the denoiser was trained), ``noise``, a timestep ``t`` uniform in [0, T), and the token ``ids`` and
    ``mask`` of its caption: with ``attributes``, a fresh wording each time (:func:`example_caption`), else
    ``captions`` as given. With ``prior_images`` (the model's own samples of ``prior_captions``) the same for
    ``prior_batch_size`` (default ``batch_size``) of them, under ``prior_x0``, ``prior_noise``, ``prior_t``,
    ``prior_ids``, ``prior_mask``; each prior caption is the empty prompt "" with probability
    ``prior_caption_dropout``, as the base model was trained (so the unconditional prediction, which guidance
    amplifies, is preserved too). ``timesteps``: "uniform" t in [0, T) with unit weights (Ho et al. 2020), or
    "flow_matched" (:func:`sdlearn.schedules.flow_matched_timesteps`: SD3's rectified-flow noise levels read as an
    ε-loss), whose per-image weights come under ``loss_weight`` and ``prior_loss_weight``, as the shipped DiT was
    trained. The images are encoded once, here. Raises ``ValueError`` for no image or another ``timesteps``."""
    _check_examples(images, captions, attributes, "example")
    if prior_images is not None:
        _check_examples(prior_images, prior_captions if prior_captions is not None else [], None, "prior")
    for name, value in (("batch_size", batch_size), ("prior_batch_size", prior_batch_size or batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    check_probability(prior_caption_dropout, "prior_caption_dropout")
    if timesteps not in ADAPTER_TIMESTEP_SAMPLINGS:
        raise ValueError(f"timesteps must be one of {', '.join(map(repr, ADAPTER_TIMESTEP_SAMPLINGS))} (adapters train "
                         f"diffusion denoisers), got {timesteps!r}")
    device = next(vae.parameters()).device
    with torch.no_grad():
        posteriors = [vae.encode(x.to(device)) for x in (images, prior_images) if x is not None]
    moments = [(q.mean.cpu(), q.std.cpu()) for q in posteriors]
    scale = vae.scaling_factor

    def draw(generator, mean, std, count):
        picks = torch.randint(len(mean), (count,), generator=generator)  # [count]
        x0 = (mean[picks] + std[picks] * torch.randn(std[picks].shape, generator=generator)) * scale  # z ~ q(z|x)
        noise = torch.randn(x0.shape, generator=generator)
        t, weight = training_timesteps(timesteps, schedule, count, generator)  # [count] each; weight None if uniform
        return picks, x0, noise, t, weight

    def batch_fn(step: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        picks, x0, noise, t, weight = draw(generator, *moments[0], batch_size)
        words = [example_caption(attributes[i], generator, open_fraction) if attributes is not None else captions[i]
                 for i in picks.tolist()]
        ids, mask = tokenizer(words)
        batch = {"x0": x0, "noise": noise, "t": t, "ids": ids, "mask": mask}
        if weight is not None:
            batch["loss_weight"] = weight
        if len(moments) > 1:
            picks, x0, noise, t, weight = draw(generator, *moments[1], prior_batch_size or batch_size)
            dropped = (torch.rand(len(picks), generator=generator) < prior_caption_dropout).tolist()
            ids, mask = tokenizer(["" if drop else prior_captions[i] for i, drop in zip(picks.tolist(), dropped)])
            batch.update(prior_x0=x0, prior_noise=noise, prior_t=t, prior_ids=ids, prior_mask=mask)
            if weight is not None:
                batch["prior_loss_weight"] = weight
        return batch

    return batch_fn


def prior_preservation_loss(model: AdaptedModel, batch: Mapping[str, torch.Tensor], schedule,
                            prior_weight: float = 1.0, base_model: nn.Module | None = None
                            ) -> tuple[torch.Tensor, dict[str, float]]:
    """DreamBooth's loss (Ruiz et al. 2023, eq. 2, in the ε form that Stable Diffusion trains with):

        L = ‖target − f(x_t, t, c)‖²  (the examples)  +  prior_weight · ‖target' − f(x'_t', t', c_pr)‖²  (the prior),

    each term a mean over its batch, x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε and the target ε (or v, or x₀, as the
    denoiser's ``prediction_type`` says). Without ``prior_*`` entries in ``batch`` (or with ``prior_weight`` 0) it
    is the plain diffusion loss of the examples, the loss of textual inversion (Gal et al., eq. 2) and of LoRA.
    Both halves go through the model as one batch. → ``(loss, {"instance": …, "prior": …})``.

    ``base_model`` (the model before adapting, frozen, called as ``model`` is): the prior's target' becomes its
    prediction f₀(x'_t', t', c_pr) instead of ε', so the term asks the adapted model to answer the old prompts
    *as the base model did*, the "learning without forgetting" form of the penalty (Li & Hoiem 2017, eq. 2, a
    squared error here). Its expectation is the DreamBooth term's minus a constant only when f₀ is the exact
    posterior mean; its variance is far smaller, since f₀ is a fixed function of x'_t', not a fresh ε'.

    With ``loss_weight`` (and ``prior_loss_weight``) in ``batch``, each image's squared error is weighted by it
    before the means: the flow-matched ε-loss of :func:`adapter_batch_fn` with ``timesteps="flow_matched"``."""
    prediction_type = model.config.prediction_type
    if prediction_type == FLOW:
        raise ValueError("adapters train diffusion denoisers (epsilon, v_prediction, sample); this one is a flow model")
    if isinstance(prior_weight, bool) or not isinstance(prior_weight, int | float) or not prior_weight >= 0:
        raise ValueError(f"prior_weight must be a number ≥ 0, got {prior_weight!r}")
    keys = ("x0", "noise", "t", "ids", "mask") + (("loss_weight",) if "loss_weight" in batch else ())
    with_prior = prior_weight > 0 and "prior_x0" in batch
    x0, noise, t, ids, mask, *weight = (torch.cat([batch[k], batch["prior_" + k]]) if with_prior else batch[k]
                                        for k in keys)
    x_t = schedule.add_noise(x0, noise, t)
    target = schedule.target(x0, noise, t, prediction_type)  # [B, C, h, w]
    n = batch["x0"].shape[0]
    if with_prior and base_model is not None:
        with torch.no_grad():  # the prior half's target: what the base model predicts there
            target = torch.cat([target[:n], base_model(x_t[n:], t[n:].to(x0.device), ids[n:], mask[n:])])
    errors = (model(x_t, t.to(x0.device), ids, mask) - target) ** 2
    per_image = errors.flatten(1).mean(dim=1)  # [B]: the squared error of each image
    if weight:  # the flow-matched ε-loss: each image's error times its weight
        per_image = per_image * weight[0].to(per_image.device)
    instance = per_image[:n].mean()
    if not with_prior:
        return instance, {"instance": instance.item()}
    prior = per_image[n:].mean()
    return instance + prior_weight * prior, {"instance": instance.item(), "prior": prior.item()}


# ----------------------------------------------------------------------------------------------------------
# Files: the new words' rows and the LoRA matrices, safetensors + JSON, tied to the base model's files


def _check_base_hashes(base_hashes) -> dict[str, str | None]:
    base = dict(base_hashes or {})
    bad = [k for k, v in base.items() if k not in BASE_PARTS or not (v is None or isinstance(v, str))]
    if bad:
        raise ValueError(f"base_hashes maps {' and '.join(BASE_PARTS)} to the SHA-256 (hex) of its weights file "
                         f"(sdlearn.checkpoint.file_sha256), or None; got {base_hashes!r}")
    return {part: base.get(part) for part in BASE_PARTS}


def save_adapter(path: str | Path, *, tokenizer: Tokenizer | None = None, text_encoder: TextEncoder | None = None,
                 denoiser: nn.Module | None = None, base_hashes: Mapping[str, str | None] | None = None,
                 training: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write an adapter as ``PATH.safetensors`` + ``PATH.json`` (atomically, :func:`sdlearn.checkpoint.save_checkpoint`):
    the rows of the words :func:`add_token` taught ``tokenizer`` and ``text_encoder`` (``token/WORD``), the LoRA
    matrices of ``denoiser`` (``lora/NAME.lora_A``, ``lora/NAME.lora_B``) with their rank, alpha and layers, the
    SHA-256 of the base model's files (``base_hashes``: ``{"denoiser": …, "text_encoder": …}``, the hashes of the
    ``.safetensors`` files the base was loaded from; None where unknown), and ``training`` notes. Tensors are stored
    as ``dtype`` (float16 halves the file). Returns the ``.safetensors`` path."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype!r}")
    info: dict[str, Any] = {"kind": ADAPTER_KIND, "base": _check_base_hashes(base_hashes), "tokens": [], "lora": None}
    tensors: dict[str, torch.Tensor] = {}
    if (tokenizer is None) != (text_encoder is None):
        raise ValueError("give both the tokenizer and the text encoder (the new words live in both), or neither")
    if text_encoder is not None and added_words(tokenizer, text_encoder):
        words = added_words(tokenizer, text_encoder)
        tensors.update({f"token/{w}": row for w, row in zip(words, text_encoder.token_embedding.added.detach())})
        info.update(tokens=words, base_vocab_size=text_encoder.token_embedding.base.num_embeddings)
    layers = lora_layers(denoiser) if denoiser is not None else {}
    if layers:
        shapes = {(layer.rank, layer.alpha) for layer in layers.values()}
        if len(shapes) > 1:
            raise ValueError(f"the LoRA layers have different ranks or alphas {sorted(shapes)}; an adapter file holds one")
        (rank, alpha), = shapes
        info["lora"] = {"rank": rank, "alpha": alpha, "layers": list(layers)}
        tensors.update({f"lora/{k}": v for k, v in lora_state_dict(denoiser).items()})
    if not tensors:
        raise ValueError("nothing to save: the text encoder has no new word (add_token) and the denoiser no LoRA "
                         "adapters (add_lora)")
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    return save_checkpoint(path, tensors, {**info, "training": dict(training or {})})


def save_lora(model: nn.Module, path: str | Path, *, base_hash: str | None,
              training: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """:func:`save_adapter` of ``model``'s LoRA matrices alone; ``base_hash``: the SHA-256 of the base model's
    ``.safetensors`` file (:func:`sdlearn.checkpoint.file_sha256`), or None if it has none."""
    return save_adapter(path, denoiser=model, base_hashes={"denoiser": base_hash}, training=training, dtype=dtype)


def load_adapter(path: str | Path, *, tokenizer: Tokenizer | None = None, text_encoder: TextEncoder | None = None,
                 denoiser: nn.Module | None = None, base_hashes: Mapping[str, str | None] | None = None) -> dict:
    """Apply the adapter file ``path`` (:func:`save_adapter`) in place: its words are added to ``tokenizer`` and
    ``text_encoder`` (:func:`add_token`), its LoRA matrices loaded into ``denoiser`` (adapters are added first if it
    has none). Returns the file's JSON (``tokens``, ``lora``, ``base``, ``training``).

    ``base_hashes`` (``{"denoiser": …, "text_encoder": …}``): the SHA-256 of the files the base models were loaded
    from. Where both the file and ``base_hashes`` name a hash and they differ, :class:`CheckpointError` names both:
    the adapter was trained on another model, whose weights it does not fit. None leaves that part unchecked.
    Everything is checked before anything changes: a file whose words or layers do not fit raises
    :class:`CheckpointError` (a ``ValueError``), a missing model ``ValueError``."""
    tensors, info = load_checkpoint(path)
    st_path = checkpoint_paths(path)[0]
    if info.get("kind") != ADAPTER_KIND:
        raise CheckpointError(f"{str(st_path)!r} holds a {info.get('kind')!r} model, not an adapter")
    given = _check_base_hashes(base_hashes)
    for part in BASE_PARTS:
        recorded = (info.get("base") or {}).get(part)
        if recorded and given[part] and recorded != given[part]:
            raise CheckpointError(f"{str(st_path)!r} was trained on another {part}: the adapter records its file's "
                                  f"sha256 {recorded[:16]}…, but this {part}'s file has sha256 {given[part][:16]}…")
    bad = [k for k, v in tensors.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{str(st_path)!r} holds NaN or infinite values (in {', '.join(bad[:4])}); it is damaged")
    words, lora = info.get("tokens") or [], info.get("lora")
    if words:
        if tokenizer is None or text_encoder is None:
            raise ValueError(f"{str(st_path)!r} teaches the word(s) {words}: pass tokenizer= and text_encoder=")
        known = [w for w in words if w in tokenizer.token_to_id]
        if tokenizer.vocab_size != info.get("base_vocab_size") or known:
            raise CheckpointError(f"{str(st_path)!r} adds {words} to a vocabulary of {info.get('base_vocab_size')} "
                                  f"tokens; this tokenizer has {tokenizer.vocab_size}" + (f" and knows {known}" * bool(known)))
        if tokenizer.vocab_size != text_encoder.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the text encoder {text_encoder.config.vocab_size}")
    if lora:
        if denoiser is None:
            raise ValueError(f"{str(st_path)!r} holds LoRA adapters for {len(lora['layers'])} layers: pass denoiser=")
        _check_lora_fits(denoiser, lora, tensors, st_path)
    for w in words:
        add_token(tokenizer, text_encoder, w, embedding=tensors[f"token/{w}"].to(text_encoder.token_embedding.weight))
    if lora:
        if not lora_layers(denoiser):
            add_lora(denoiser, lora["rank"], lora["alpha"], lora["layers"])
        layers = lora_layers(denoiser)
        with torch.no_grad():
            for name in lora["layers"]:
                for part in ("lora_A", "lora_B"):
                    getattr(layers[name], part).copy_(tensors[f"lora/{name}.{part}"])
    return info


def _check_lora_fits(denoiser: nn.Module, lora: Mapping, tensors: Mapping[str, torch.Tensor], st_path: Path) -> None:
    """The file's LoRA layers exist in ``denoiser`` as Linear layers (or adapters of the same rank, unmerged) of
    the shapes its matrices need."""
    layers, modules = lora_layers(denoiser), dict(denoiser.named_modules())
    if layers and (set(layers) != set(lora["layers"]) or any(x.rank != lora["rank"] for x in layers.values())):
        raise CheckpointError(f"{str(st_path)!r} holds rank-{lora['rank']} adapters for other layers than this "
                              f"denoiser's ({', '.join(layers)}); remove_lora(denoiser) first")
    if any(x.merged for x in layers.values()):
        raise ValueError("the denoiser's LoRA adapters are merged: unmerge_lora(denoiser) before loading others")
    for name in lora["layers"]:
        layer = modules.get(name)
        if not isinstance(layer, nn.Linear | LoRALinear):
            raise CheckpointError(f"{str(st_path)!r} adapts the layer {name!r}, which this "
                                  f"{type(denoiser).__name__} does not have (its Linear layers: {', '.join(linear_names(denoiser))})")
        want = {"lora_A": (lora["rank"], layer.in_features), "lora_B": (layer.out_features, lora["rank"])}
        for part, shape in want.items():
            found = tensors.get(f"lora/{name}.{part}")
            if found is None or tuple(found.shape) != shape:
                raise CheckpointError(f"{str(st_path)!r}: {name}.{part} should be {list(shape)} for this "
                                      f"{type(denoiser).__name__}, found {None if found is None else list(found.shape)}")


def load_lora(model: nn.Module, path: str | Path, *, base_hash: str | None) -> dict:
    """:func:`load_adapter` of a LoRA-only file into ``model``; ``base_hash``: the SHA-256 of the ``.safetensors``
    file ``model`` was loaded from (None: not checked). A file that also teaches words needs :func:`load_adapter`."""
    return load_adapter(path, denoiser=model, base_hashes={"denoiser": base_hash})


# ----------------------------------------------------------------------------------------------------------
# Sizes


@dataclasses.dataclass
class AdapterSummary:
    """What an adapter adds: the new words and their parameters, the LoRA layers and theirs, and the file's bytes."""

    words: list[str]
    token_parameters: int
    lora_layers: int
    rank: int | None
    alpha: float | None
    lora_parameters: int
    base_parameters: int  # the base denoiser's (without the adapters)
    file_bytes: int | None  # .safetensors + .json, when a path was given

    @property
    def parameters(self) -> int:
        return self.token_parameters + self.lora_parameters

    def __str__(self) -> str:
        parts = []
        if self.words:
            parts.append(f"new word(s) {', '.join(self.words)}: {self.token_parameters:,} parameters")
        if self.lora_layers:
            share = f" ({100 * self.lora_parameters / self.base_parameters:.2f}% of the denoiser's {self.base_parameters:,})" \
                if self.base_parameters else ""
            parts.append(f"LoRA rank {self.rank}, alpha {self.alpha:g}, on {self.lora_layers} layers: "
                         f"{self.lora_parameters:,} parameters{share}")
        if self.file_bytes is not None:
            parts.append(f"file {self.file_bytes / 1000:.1f} kB")
        return "; ".join(parts) or "no adapter"


def adapter_file_bytes(path: str | Path) -> int:
    """The bytes of an adapter's two files, ``PATH.safetensors`` and ``PATH.json``."""
    return sum(p.stat().st_size for p in checkpoint_paths(path))


def adapter_summary(*, denoiser: nn.Module | None = None, tokenizer: Tokenizer | None = None,
                    text_encoder: TextEncoder | None = None, path: str | Path | None = None) -> AdapterSummary:
    """The parameter counts of the adapters in ``denoiser`` (LoRA) and ``text_encoder`` (new words), and the size of
    the adapter file ``path`` if given; ``print(...)`` it."""
    layers = lora_layers(denoiser) if denoiser is not None else {}
    lora_params = sum(x.lora_A.numel() + x.lora_B.numel() for x in layers.values())
    base = count_parameters(denoiser) - lora_params if denoiser is not None else 0
    words = added_words(tokenizer, text_encoder) if tokenizer is not None and text_encoder is not None else []
    token_params = text_encoder.token_embedding.added.numel() if words else 0
    first = next(iter(layers.values()), None)
    return AdapterSummary(words, token_params, len(layers), first and first.rank, first and first.alpha, lora_params,
                          base, adapter_file_bytes(path) if path is not None else None)


def lora_summary(model: nn.Module, path: str | Path | None = None) -> AdapterSummary:
    """:func:`adapter_summary` of ``model``'s LoRA adapters (and of the file ``path``)."""
    return adapter_summary(denoiser=model, path=path)

