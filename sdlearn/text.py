"""The text encoder: a word-level tokenizer, a small transformer, and a tiny CLIP to pre-train it.

Stable Diffusion reads its prompt with the text tower of CLIP (Radford et al. 2021), pre-trained to
match 400M image–caption pairs, then frozen. The course does the same at Shapes scale:

1. **Tokenizer** — prompt → ids. Word-level over the caption vocabulary (``sdlearn.data.VOCABULARY``,
   40 words) plus four specials, ``<pad>`` = 0, ``<bos>``, ``<eos>``, ``<unk>``. Every prompt becomes
   ``<bos> w₁ … wₙ <eos> <pad> …``, padded to ``max_length`` = 21 (the longest two-object caption, 19
   words, with ``<bos>`` and ``<eos>``), with a mask that is True on the
   real tokens (``<bos>``/``<eos>`` included). The empty prompt "" is ``<bos> <eos>``: the
   unconditional prompt of classifier-free guidance.
2. **TextEncoder** — ids → one vector per token. Token + learned positional embedding, pre-LN
   transformer blocks (self-attention, MLP), a final LayerNorm (GPT-2's layout, as CLIP's text tower).
   Attention is causal, as in CLIP's text tower (token i reads tokens ≤ i only, so the pooled ``<eos>``
   state is the only one that has read the whole prompt), and padded tokens are masked out of the keys,
   so padding never changes a real token's output; ``causal=False`` gives a bidirectional tower (every
   token sees the whole prompt, BERT's choice). The *pooled* embedding is the final
   state of the ``<eos>`` token, as in CLIP (§2.4: "the activations of the highest layer of the
   transformer at the [EOS] token"): it has attended to every word, and the empty prompt still has one.
3. **TinyCLIP** — the text encoder + a small CNN image encoder, each followed by a linear projection
   into a shared 128-d space and L2-normalised, trained with the symmetric contrastive loss
   (CLIP Fig. 3) with a learned temperature. Its frozen text tower then conditions the denoiser.

Two Shapes-specific decisions, written down:

- **False negatives.** Shapes has only 320 attribute combinations (256 in the train split), so a batch
  of 128 holds ≈ 27 images whose attributes repeat another's, and a partial caption ("a red shape") is true of
  many images: plain CLIP would push apart pairs that truly match. :func:`soft_contrastive_loss` spreads each row's target uniformly over *every* caption in
  the batch that is true of the image (and each column's over every image the caption is true of).
  With one positive per row it is exactly :func:`contrastive_loss`.
- **Partial captions.** Half of the training captions leave attributes open ("a red circle", "a small
  shape in the top left"; :func:`sdlearn.data.random_caption`), and match every image they are true of.
- **Scenes and hard negatives.** Half of the images hold two objects, captioned "… and …". A contrastive
  text encoder trained only on true captions can behave like a bag of words (Yuksekgonul et al. 2023):
  "a red circle and a blue square" and "a blue circle and a red square" hold the same words. So each
  two-object caption also brings a *hard negative*: the same caption with one attribute swapped between
  its objects (NegCLIP), which the image must score below its true caption. This
  teaches the encoder what each word means on its own, which (a) makes zero-shot classification work
  from one-attribute prompts, (b) gives sensible embeddings to the partial prompts users will type,
  and (c) pushes the image encoder to represent colour and shape separately, which helps it
  generalise to the held-out (colour, shape) pairs it never sees.

Names, one per concept: :meth:`TextEncoder.encode_prompts` (strings → a :class:`TextEncoding`, what the denoiser
reads); :meth:`TinyCLIP.encode_text` and :meth:`TinyCLIP.encode_image` (token ids / images → unit vectors, CLIP's
own names); :meth:`TinyCLIP.embed_prompts` (strings → unit vectors). ``generator`` is always a
``torch.Generator``; model sizes are counted by :func:`sdlearn.checkpoint.count_parameters`.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sdlearn.checkpoint import MAX_CONFIG_DEPTH, ConfigMixin, count_parameters
from sdlearn.checks import check_batch, check_mask, warn_deprecated
from sdlearn.data import (
    ATTRIBUTE_VALUES,
    ATTRIBUTES,
    JOIN_WORD,
    MAX_CAPTION_WORDS,
    MAX_OBJECTS,
    VOCABULARY,
    ShapesDataset,
    caption_for,
    object_phrase,
    random_caption,
    sample_batch,
    split_words,
)
from sdlearn.denoiser import SelfAttention  # the same fused-QKV attention as the denoiser's, with a key mask

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
KNOWN_WORDS_SHOWN = 60  # an unknown-word warning lists at most this many known words (Shapes has 40)

# ----------------------------------------------------------------------------------------------------------
# The tokenizer


class Tokenizer:
    """Word-level tokenizer: prompt(s) → ``(ids [B, L], mask [B, L])`` with ``L = max_length``.

    Ids: ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3, then the vocabulary's words in
    order. Words are split as captions are (:func:`sdlearn.data.split_words`: lower case, punctuation
    dropped). An unknown word becomes ``<unk>`` with a warning naming it (and up to :data:`KNOWN_WORDS_SHOWN`
    of the words it knows); a prompt longer than ``max_length - 2`` words is truncated (its ``<eos>`` kept
    last) with a warning. With the Shapes vocabulary (the default), a prompt naming more than two objects
    (two "and"s) warns that a Shapes scene holds at most two; a vocabulary built from your own captions
    (:func:`sdlearn.own_data.caption_vocabulary`) makes no such claim.
    """

    def __init__(self, vocabulary: Sequence[str] = VOCABULARY, max_length: int = MAX_CAPTION_WORDS + 2):
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer ≥ 2 (room for <bos> and <eos>), got {max_length!r}")
        if isinstance(vocabulary, str) or not all(isinstance(w, str) for w in vocabulary):
            raise ValueError("vocabulary must be a sequence of word strings")
        words = list(vocabulary)
        bad = [w for w in words if split_words(w) != [w]]
        if bad:
            raise ValueError(f"vocabulary words must be lower-case letters only (as split_words gives them); got {bad[:5]}")
        if len(set(words)) != len(words):
            raise ValueError("vocabulary has repeated words")
        self.max_length = max_length
        # Shapes' words first (any learnt ones after them, add_words): then a prompt names at most MAX_OBJECTS objects
        self.is_shapes_vocabulary = words[:len(VOCABULARY)] == list(VOCABULARY)
        self.id_to_token: list[str] = [*SPECIAL_TOKENS, *words]
        self.token_to_id: dict[str, int] = {t: i for i, t in enumerate(self.id_to_token)}

    def add_words(self, words: Sequence[str]) -> list[int]:
        """Append new words to the vocabulary → their ids, ``vocab_size``, ``vocab_size + 1``, ...: every existing
        token keeps its id (textual inversion, :func:`sdlearn.adapt.add_token`, then learns their embeddings).
        Raises ``ValueError`` for a word already known or not lower-case letters only, adding none of them."""
        if isinstance(words, str) or not all(isinstance(w, str) for w in words):
            raise ValueError(f"words must be a list of word strings, got {words!r}")
        bad = [w for w in words if split_words(w) != [w]]
        known = [w for w in words if w in self.token_to_id]
        if bad or known or len(set(words)) != len(words):
            why = f"not lower-case letters only: {bad}" if bad else f"already tokens: {known}" if known else "repeated"
            raise ValueError(f"cannot add the words {list(words)}: {why}")
        self.id_to_token += list(words)
        self.token_to_id = {t: i for i, t in enumerate(self.id_to_token)}
        return [self.token_to_id[w] for w in words]

    @property
    def vocab_size(self) -> int:
        return len(self.id_to_token)

    @property
    def vocabulary(self) -> list[str]:
        """The words (specials excluded), in id order."""
        return self.id_to_token[len(SPECIAL_TOKENS):]

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, max_length={self.max_length})"

    def tokens(self, text: str) -> list[str]:
        """The tokens of one prompt, as strings, without padding: "A red circle!" → [<bos>, a, red, circle, <eos>]."""
        ids, mask = self.encode(text)
        return [self.id_to_token[i] for i in ids[0][mask[0]].tolist()]

    def encode(self, text: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt or list of prompts → ``ids`` LongTensor ``[B, max_length]`` and ``mask`` BoolTensor
        ``[B, max_length]`` (True on real tokens, ``<bos>`` and ``<eos>`` included). A single string gives B = 1."""
        prompts = [text] if isinstance(text, str) else text
        if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"expected a prompt string or a list of prompt strings, got {type(text).__name__}")
        ids = torch.full((len(prompts), self.max_length), PAD_ID, dtype=torch.long)  # [B, L]
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool)  # [B, L]
        room = self.max_length - 2  # words that fit between <bos> and <eos>
        for b, prompt in enumerate(prompts):
            words = split_words(prompt)
            unknown = [w for w in words if w not in self.token_to_id]
            if unknown:
                warnings.warn(
                    f"unknown word(s) {', '.join(repr(w) for w in dict.fromkeys(unknown))} in prompt {prompt!r} "
                    f"became <unk>; the tokenizer knows: {self._known_words()}",
                    UserWarning,
                    stacklevel=2,
                )
            if self.is_shapes_vocabulary and words.count(JOIN_WORD) >= MAX_OBJECTS:
                warnings.warn(
                    f"prompt {prompt!r} names {words.count(JOIN_WORD) + 1} objects, but a Shapes scene holds at most "
                    f"{MAX_OBJECTS}; the model was never shown such a scene, so expect at most two objects",
                    UserWarning,
                    stacklevel=2,
                )
            if len(words) > room:
                warnings.warn(
                    f"prompt {prompt!r} has {len(words)} words, but only {room} fit in max_length={self.max_length} "
                    f"tokens with <bos> and <eos>; truncated after {' '.join(words[:room])!r}",
                    UserWarning,
                    stacklevel=2,
                )
                words = words[:room]
            row = [BOS_ID, *(self.token_to_id.get(w, UNK_ID) for w in words), EOS_ID]
            ids[b, : len(row)] = torch.tensor(row)
            mask[b, : len(row)] = True
        return ids, mask

    __call__ = encode  # tokenizer(text) is tokenizer.encode(text)

    def _known_words(self) -> str:
        """The vocabulary for a warning: every word of a small one, the first :data:`KNOWN_WORDS_SHOWN` of a large one."""
        words = self.vocabulary
        if len(words) <= KNOWN_WORDS_SHOWN:
            return ", ".join(words)
        return ", ".join(words[:KNOWN_WORDS_SHOWN]) + f", ... ({len(words)} words in all)"

    def decode(self, ids) -> str | list[str]:
        """Ids → text: ``[L]`` (or a list of ints) gives a string, ``[B, L]`` a list of strings.
        ``<pad>``, ``<bos>`` and ``<eos>`` are dropped; ``<unk>`` is kept as "<unk>"."""
        ids = torch.as_tensor(ids)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() not in (1, 2):
            raise ValueError(f"expected integer ids [L] or [B, L], got {ids.dtype} of shape {list(ids.shape)}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids must lie in 0..{self.vocab_size - 1}, got {ids.min().item()}..{ids.max().item()}")
        if ids.dim() == 2:
            return [self.decode(row) for row in ids]
        skip = {PAD_ID, BOS_ID, EOS_ID}
        return " ".join(self.id_to_token[i] for i in ids.tolist() if i not in skip)

    def to_dict(self) -> dict:
        return {"vocabulary": self.vocabulary, "max_length": self.max_length}

    @classmethod
    def from_dict(cls, d: dict) -> Tokenizer:
        """The inverse of :meth:`to_dict`; anything else (a damaged file's entry) raises a ``ValueError`` saying what
        was expected."""
        if not isinstance(d, dict) or set(d) != {"vocabulary", "max_length"} or not isinstance(d["vocabulary"], list):
            shown = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise ValueError(f'a tokenizer is stored as {{"vocabulary": [words], "max_length": int}}, got {shown}')
        return cls(vocabulary=d["vocabulary"], max_length=d["max_length"])


# ----------------------------------------------------------------------------------------------------------
# The text encoder


@dataclass
class TextEncoderConfig(ConfigMixin):
    """Hyper-parameters of :class:`TextEncoder`. ``width`` = 128 matches ``DenoiserConfig.text_dim``."""

    vocab_size: int = len(SPECIAL_TOKENS) + len(VOCABULARY)  # 44
    max_length: int = MAX_CAPTION_WORDS + 2  # longest token sequence (positions): 21
    width: int = 128  # D
    depth: int = 3  # transformer blocks
    heads: int = 4  # head size D / heads = 32
    mlp_ratio: float = 2.0  # MLP hidden width = mlp_ratio · D
    causal: bool = True  # token i attends to tokens ≤ i only, as in CLIP's text tower (Radford et al. 2021)

    @classmethod
    def upgrade_dict(cls, d: dict) -> dict:
        """A tower saved before ``causal`` existed was bidirectional."""
        return {"causal": False, **d}

    size_limits = {"depth": MAX_CONFIG_DEPTH, "vocab_size": 1 << 18}  # word-level vocabularies stay far below 262144

    def __post_init__(self):
        self.check_positive_ints("vocab_size", "max_length", "width", "depth", "heads")
        self.check_ratio("mlp_ratio")
        if self.width % self.heads:
            raise ValueError(f"TextEncoderConfig.width ({self.width}) must be divisible by heads ({self.heads})")
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, int | float) or self.mlp_ratio <= 0:
            raise ValueError(f"TextEncoderConfig.mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        if not isinstance(self.causal, bool):
            raise ValueError(f"TextEncoderConfig.causal must be True or False, got {self.causal!r}")



class TextEncoding(NamedTuple):
    """What the text encoder returns. Padded positions of ``tokens`` are zero."""

    tokens: torch.Tensor  # [B, L, D] one vector per token (what cross-attention reads)
    pooled: torch.Tensor  # [B, D] the <eos> token's vector (one vector per prompt)
    mask: torch.Tensor  # [B, L] bool, True on real tokens


class Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)) (GPT-2; Xiong et al. 2020)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(mlp_ratio * width)
        self.ln1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), key_mask)
        return x + self.mlp(self.ln2(x))


def _init_weights(module: nn.Module) -> None:
    """GPT-2's initialisation: N(0, 0.02) for Linear and Embedding weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class TextEncoder(nn.Module):
    """Token ids ``[B, L]`` + mask ``[B, L]`` → :class:`TextEncoding` (tokens ``[B, L, D]``, pooled ``[B, D]``, mask)."""

    def __init__(self, config: TextEncoderConfig | None = None):
        super().__init__()
        config = TextEncoderConfig.resolve(config)
        self.config = config
        D = config.width
        self.token_embedding = nn.Embedding(config.vocab_size, D)
        self.position_embedding = nn.Embedding(config.max_length, D)
        self.blocks = nn.ModuleList(Block(D, config.heads, config.mlp_ratio) for _ in range(config.depth))
        self.ln_final = nn.LayerNorm(D)
        self.apply(_init_weights)

    @property
    def width(self) -> int:
        return self.config.width

    def num_parameters(self) -> int:
        """Deprecated: use :func:`sdlearn.checkpoint.count_parameters` (``count_parameters(model)``)."""
        warn_deprecated(f"{type(self).__name__}.num_parameters()", "sdlearn.checkpoint.count_parameters(model)")
        return count_parameters(self)

    def _check(self, ids, mask) -> None:
        cfg = self.config
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
            got = f"{ids.dtype} {list(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"ids must be a LongTensor [B, L] from the Tokenizer, got {got}")
        if not 1 <= ids.shape[1] <= cfg.max_length:
            raise ValueError(f"ids have L = {ids.shape[1]} tokens; this encoder takes 1..{cfg.max_length}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
            raise ValueError(f"ids must lie in 0..{cfg.vocab_size - 1} (vocab_size), got {ids.min().item()}..{ids.max().item()}")
        check_mask(mask, tuple(ids.shape), "mask")
        if ids.shape[0] and not (mask[:, 0].all() and (mask[:, :-1] >= mask[:, 1:]).all()):
            raise ValueError("mask must be True on a prefix of each row (<bos> … <eos>), then False on the padding")

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> TextEncoding:
        self._check(ids, mask)
        B, L = ids.shape
        positions = torch.arange(L, device=ids.device)
        x = self.token_embedding(ids) + self.position_embedding(positions)  # [B, L, D]
        key_mask = mask[:, None, None, :]  # [B, 1, 1, L]: no query attends to padding
        if self.config.causal:  # and, in a causal tower, none to a later token
            key_mask = key_mask & torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()  # [B, 1, L, L]
        for block in self.blocks:
            x = block(x, key_mask)
        x = self.ln_final(x) * mask[:, :, None]  # [B, L, D], padded positions zeroed
        eos = mask.sum(dim=1) - 1  # [B] position of <eos>, the last real token
        pooled = x[torch.arange(B, device=ids.device), eos]  # [B, D]
        return TextEncoding(x, pooled, mask)

    def encode_prompts(self, prompts: str | Sequence[str], tokenizer: Tokenizer | None = None) -> TextEncoding:
        """Tokenize ``prompts`` (``Tokenizer(max_length=config.max_length)`` by default) and encode them on
        this encoder's device → a :class:`TextEncoding` (token states, pooled state, mask)."""
        tokenizer = Tokenizer(max_length=self.config.max_length) if tokenizer is None else tokenizer
        if tokenizer.vocab_size != self.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but this encoder was built for "
                             f"{self.config.vocab_size}; use the tokenizer it was trained with")
        ids, mask = tokenizer(prompts)
        device = self.token_embedding.weight.device
        return self(ids.to(device), mask.to(device))


    def encode_text(self, prompts: str | Sequence[str], tokenizer: Tokenizer | None = None) -> TextEncoding:
        """Deprecated: use :meth:`encode_prompts` (``TinyCLIP.encode_text`` is CLIP's ids → unit vectors)."""
        warn_deprecated("TextEncoder.encode_text(prompts)", "TextEncoder.encode_prompts(prompts)")
        return self.encode_prompts(prompts, tokenizer)


def encode_text(text_encoder: TextEncoder, prompts: str | Sequence[str], tokenizer: Tokenizer | None = None) -> TextEncoding:
    """Deprecated: use ``text_encoder.encode_prompts(prompts, tokenizer)``."""
    warn_deprecated("sdlearn.text.encode_text(text_encoder, prompts)", "text_encoder.encode_prompts(prompts)")
    return text_encoder.encode_prompts(prompts, tokenizer)


# ----------------------------------------------------------------------------------------------------------
# The contrastive loss


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale) -> torch.Tensor:
    """CLIP's symmetric contrastive loss (Radford et al. 2021, Fig. 3; InfoNCE, van den Oord et al. 2018).

    ``image_emb``, ``text_emb``: ``[B, E]``, L2-normalised, row i of each a matching pair.
    ``logit_scale``: the multiplier of the cosine similarities, exp(t) = 1 / temperature.

        logits = logit_scale · image_emb · text_embᵀ        [B, B]
        loss   = ½ (CE(logits, diag) + CE(logitsᵀ, diag)),

    the mean of "which caption is this image's?" and "which image is this caption's?" over the batch.
    """
    logits = logit_scale * image_emb @ text_emb.T  # [B, B]
    labels = torch.arange(logits.shape[0], device=logits.device)  # the pairs sit on the diagonal
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def soft_contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale, positives: torch.Tensor) -> torch.Tensor:
    """:func:`contrastive_loss` when a batch holds several true pairs per row, and extra captions.

    ``image_emb`` ``[B, E]``; ``text_emb`` ``[C, E]`` with ``C ≥ B``: the batch's own captions first (caption i
    is image i's), then any extra captions, such as hard negatives. ``positives`` bool ``[B, C]``:
    ``positives[i, j]`` is True when caption j is true of image i (the diagonal must be). Image i's target is
    uniform over its positive captions (an extra caption true of no image is a pure negative), caption j's
    over its positive images (for the captions true of some image), and each direction is the
    cross-entropy to that target. With ``positives`` the identity this is exactly :func:`contrastive_loss`.
    """
    logits = logit_scale * image_emb @ text_emb.T  # [B, C]
    targets = positives.float()
    image_to_text = -(targets / targets.sum(1, keepdim=True) * logits.log_softmax(dim=1)).sum(1).mean()
    true_of_some = targets.sum(0) > 0  # [C]
    t, lg = targets[:, true_of_some], logits[:, true_of_some]
    text_to_image = -(t / t.sum(0, keepdim=True) * lg.log_softmax(dim=0)).sum(0).mean()
    return 0.5 * (image_to_text + text_to_image)


# ----------------------------------------------------------------------------------------------------------
# TinyCLIP


@dataclass
class TinyCLIPConfig(ConfigMixin):
    """Hyper-parameters of :class:`TinyCLIP`: the text tower's config, the image encoder's widths, the
    shared embedding size, and the initial temperature (CLIP's: logit scale 1/0.07)."""

    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    image_size: int = 32
    image_channels: tuple[int, ...] = (16, 32, 64, 64)  # widths at 32, 16, 8, 4 px
    embed_dim: int = 128
    logit_scale_init: float = math.log(1 / 0.07)

    def __post_init__(self):
        if isinstance(self.text, dict):
            self.text = TextEncoderConfig.from_dict(self.text)
        if not isinstance(self.text, TextEncoderConfig):
            raise ValueError(f"TinyCLIPConfig.text must be a TextEncoderConfig, got {type(self.text).__name__}")
        self.image_channels = tuple(self.image_channels)
        if not self.image_channels or not all(isinstance(c, int) and c >= 8 and c % 8 == 0 for c in self.image_channels):
            raise ValueError(f"TinyCLIPConfig.image_channels must be multiples of 8, got {self.image_channels}")
        self.check_sizes("image_channels", self.image_channels)
        self.check_positive_ints("image_size")
        side = self.image_size / 2 ** (len(self.image_channels) - 1)
        if side < 1 or side != int(side):
            raise ValueError(f"image_size {self.image_size} cannot be halved {len(self.image_channels) - 1} times")
        self.check_positive_ints("embed_dim")



class ImageEncoder(nn.Module):
    """A small CNN: ``[B, 3, 32, 32]`` in [-1, 1] → ``[B, E]``.

    conv → GELU, then per further width a stride-2 conv → GroupNorm → GELU (32 → 16 → 8 → 4 px). Two heads
    read the final ``[B, C, 4, 4]`` map and are summed: a Linear of the *pooled* features (mean and max over
    space: what the object is — colour, shape, size — wherever it is) and a Linear of the *flattened* map
    (where it is). Without the pooled head, every colour would have to be learnt separately at every
    position; with it, what is learnt at one position holds at all of them."""

    def __init__(self, channels: Sequence[int], image_size: int, embed_dim: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 3, padding=1), nn.GELU()]
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.GELU()]
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** (len(channels) - 1)
        self.pooled_proj = nn.Linear(2 * channels[-1], embed_dim)
        self.spatial_proj = nn.Linear(channels[-1] * side * side, embed_dim, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.features(images)  # [B, C, s, s]
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)  # [B, 2C]
        return self.pooled_proj(pooled) + self.spatial_proj(h.flatten(1))  # [B, E]


class TinyCLIP(nn.Module):
    """Contrastive image–text pre-training at Shapes scale (CLIP, Radford et al. 2021).

    ``text_encoder``: a :class:`TextEncoder` whose pooled (``<eos>``) vector is projected by
    ``text_proj``; ``image_encoder``: :class:`ImageEncoder`. Both embeddings are L2-normalised; their
    dot products, times ``exp(logit_scale)`` (clamped at 100 as in CLIP), are the logits.
    """

    def __init__(self, config: TinyCLIPConfig | None = None):
        super().__init__()
        config = TinyCLIPConfig.resolve(config)
        self.config = config
        self.text_encoder = TextEncoder(config.text)
        self.text_proj = nn.Linear(config.text.width, config.embed_dim, bias=False)
        self.image_encoder = ImageEncoder(config.image_channels, config.image_size, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))  # log of the multiplier
        nn.init.normal_(self.text_proj.weight, std=config.text.width**-0.5)

    MAX_LOGIT_SCALE = 100.0

    def num_parameters(self) -> int:
        """Deprecated: use :func:`sdlearn.checkpoint.count_parameters` (``count_parameters(model)``)."""
        warn_deprecated(f"{type(self).__name__}.num_parameters()", "sdlearn.checkpoint.count_parameters(model)")
        return count_parameters(self)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) clamped to at most 100 (CLIP §2.5: "to prevent scaling the logits by more than 100")."""
        return self.logit_scale.clamp(max=math.log(self.MAX_LOGIT_SCALE)).exp()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, S, S]`` in [-1, 1] → unit vectors ``[B, E]``."""
        S = self.config.image_size
        check_batch(images, (3, S, S), "image", "images")
        return F.normalize(self.image_encoder(images), dim=-1)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, L]`` and mask → unit vectors ``[B, E]`` (the projected pooled embedding)."""
        return F.normalize(self.text_proj(self.text_encoder(ids, mask).pooled), dim=-1)

    def embed_prompts(self, prompts: str | Sequence[str], tokenizer: Tokenizer | None = None) -> torch.Tensor:
        """Prompt strings → unit vectors ``[B, E]``, on this model's device."""
        tokenizer = Tokenizer(max_length=self.config.text.max_length) if tokenizer is None else tokenizer
        ids, mask = tokenizer(prompts)
        device = self.logit_scale.device
        return self.encode_text(ids.to(device), mask.to(device))

    def forward(self, images, ids, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """→ ``(image_emb [B, E], text_emb [B, E], scale)``: the inputs of :func:`contrastive_loss`."""
        return self.encode_image(images), self.encode_text(ids, mask), self.scale()


# ----------------------------------------------------------------------------------------------------------
# Zero-shot classification


def zero_shot_prompts(attribute: str) -> dict[str, str]:
    """The prompt for each value of ``attribute``: color → "a red shape", …; shape → "a circle", …; size →
    "a small shape", "a large shape"; position → "a shape in the top left", … (:func:`sdlearn.data.object_phrase`
    of the one attribute, the way the training captions leave the others open)."""
    if attribute not in ATTRIBUTE_VALUES:
        raise ValueError(f"unknown attribute {attribute!r}; expected one of: {', '.join(ATTRIBUTES)}")
    return {value: object_phrase({attribute: value}) for value in ATTRIBUTE_VALUES[attribute]}


def _embed_images(clip: TinyCLIP, images: torch.Tensor) -> torch.Tensor:
    device = clip.logit_scale.device
    return torch.cat([clip.encode_image(chunk.to(device)) for chunk in images.split(512)])  # [B, E]


def _nearest_prompt(clip: TinyCLIP, image_emb: torch.Tensor, attribute: str, tokenizer: Tokenizer | None) -> torch.Tensor:
    text_emb = clip.embed_prompts(list(zero_shot_prompts(attribute).values()), tokenizer)  # [V, E]
    return (image_emb @ text_emb.T).argmax(dim=1).cpu()  # [B] index of the most similar prompt


@torch.no_grad()
def zero_shot_classify(clip: TinyCLIP, images: torch.Tensor, attribute: str, tokenizer: Tokenizer | None = None) -> torch.Tensor:
    """Classify ``images`` ``[B, 3, 32, 32]`` by one attribute, zero-shot (CLIP §3.1.2): embed one prompt per
    value (:func:`zero_shot_prompts`) and pick the most similar → LongTensor ``[B]`` of indices into
    ``COLORS``/``SHAPES``/``SIZES``/``POSITIONS`` (the convention of ``ShapesBatch.attributes``)."""
    return _nearest_prompt(clip, _embed_images(clip, images), attribute, tokenizer)


CLIP_EVAL_SEED = 30_000  # zero-shot evaluation images: ShapesDataset(n, split, seed=30_000), never trained on


@torch.no_grad()
def zero_shot_accuracy(clip: TinyCLIP, n: int = 1000, seed: int = CLIP_EVAL_SEED, split: str = "all",
                       tokenizer: Tokenizer | None = None) -> dict[str, float]:
    """Zero-shot accuracy per attribute on ``ShapesDataset(n, split, seed)`` → {"color": 0.99, ...}."""
    was_training = clip.training
    clip.eval()
    batch = ShapesDataset(n, split, seed=seed).batch(range(n))
    image_emb = _embed_images(clip, batch.images)  # [n, E]
    accuracy = {}
    for attribute in ATTRIBUTES:
        predicted = _nearest_prompt(clip, image_emb, attribute, tokenizer)
        accuracy[attribute] = (predicted == batch.attributes[attribute]).float().mean().item()
    clip.train(was_training)
    return accuracy


@torch.no_grad()
def caption_retrieval_accuracy(clip: TinyCLIP, n: int = 1000, seed: int = CLIP_EVAL_SEED, split: str = "all",
                               tokenizer: Tokenizer | None = None) -> float:
    """Fraction of ``ShapesDataset(n, split, seed)`` images whose most similar caption, among the canonical
    captions of all 320 attribute combinations ("a small red circle in the top left", ...), names all four
    attributes right: zero-shot classification into 320 classes, a test of the full-caption embeddings."""
    combos = list(itertools.product(*(ATTRIBUTE_VALUES[k] for k in ATTRIBUTES)))  # 320 × (color, shape, size, position)
    was_training = clip.training
    clip.eval()
    text_emb = clip.embed_prompts([caption_for(dict(zip(ATTRIBUTES, c))) for c in combos], tokenizer)  # [320, E]
    batch = ShapesDataset(n, split, seed=seed).batch(range(n))
    best = (_embed_images(clip, batch.images) @ text_emb.T).argmax(dim=1).cpu()  # [n]
    truth = torch.stack([batch.attributes[k] for k in ATTRIBUTES], dim=1)  # [n, 4]
    index = torch.tensor([[ATTRIBUTE_VALUES[k].index(v) for k, v in zip(ATTRIBUTES, c)] for c in combos])  # [320, 4]
    clip.train(was_training)
    return (index[best] == truth).all(dim=1).float().mean().item()


# ----------------------------------------------------------------------------------------------------------
# Training batches and loss (the recipe is sdlearn.recipes.train_clip: `python -m sdlearn train clip`)

_UNNAMED = -1  # in an attribute table, "this caption does not say"
_ABSENT = -2  # in an attribute table, "no such object"


def scene_table(scenes: Sequence[Sequence[dict]]) -> torch.Tensor:
    """Scenes (lists of one or two attribute dicts, as captions name them) → value indices ``[N, 2, 4]``:
    ``_UNNAMED`` (-1) for an attribute left open, ``_ABSENT`` (-2) for every attribute of a missing object."""
    table = torch.full((len(scenes), MAX_OBJECTS, len(ATTRIBUTES)), _ABSENT, dtype=torch.long)
    for n, objects in enumerate(scenes):
        for o, obj in enumerate(objects):
            table[n, o] = torch.tensor([ATTRIBUTE_VALUES[k].index(obj[k]) if k in obj else _UNNAMED for k in ATTRIBUTES])
    return table


def captions_true_of(caption_table: torch.Tensor, image_table: torch.Tensor) -> torch.Tensor:
    """Which captions are true of which images → bool ``[B, C]`` from tables ``[C, 2, 4]`` (captions,
    :func:`scene_table`) and ``[B, 2, 4]`` (images, every attribute named). True when the caption names as
    many objects as the image holds and, in one of the two orders, every attribute it names is the image's."""
    caption, image = caption_table[None], image_table[:, None]  # [1, C, 2, 4], [B, 1, 2, 4]

    def match(c):
        return ((c == image) | ((c == _UNNAMED) & (image >= 0))).all(dim=3).all(dim=2)  # [B, C]

    return match(caption) | match(caption.flip(2))


def swapped_objects(named: list[dict], generator: torch.Generator | None = None) -> list[dict] | None:
    """A hard negative for a two-object caption (NegCLIP, Yuksekgonul et al. 2023): the objects ``named``
    with one attribute that both name, with different values, swapped between them ("a red circle and a
    blue square" → "a blue circle and a red square"); None when there is none to swap."""
    if len(named) != 2:
        return None
    a, b = named
    options = [k for k in ATTRIBUTES if k in a and k in b and a[k] != b[k]]
    if not options:
        return None
    k = options[int(torch.randint(len(options), (1,), generator=generator))]
    return [{**a, k: b[k]}, {**b, k: a[k]}]


def clip_batch(batch_size: int, generator: torch.Generator | None = None, tokenizer: Tokenizer | None = None,
               partial_fraction: float = 0.5, split: str = "train", num_objects=(1, 2),
               hard_negatives: bool = True) -> dict[str, torch.Tensor]:
    """A training batch: fresh Shapes scenes and, for each, a caption true of it → dict of ``images
    [B, 3, 32, 32]``, ``ids``/``mask [C, L]`` and ``positives [B, C]`` (caption j true of image i), with C = B
    plus one hard negative per two-object caption that has an attribute to swap (:func:`swapped_objects`).

    A fraction ``partial_fraction`` of the captions leave attributes open (:func:`sdlearn.data.random_caption`);
    the others name everything (every template). ``num_objects`` as in :class:`sdlearn.data.ShapesDataset`."""
    tokenizer = Tokenizer() if tokenizer is None else tokenizer
    batch = sample_batch(batch_size, split, generator, num_objects=num_objects)
    scenes = [batch.item_objects(j) for j in range(batch_size)]
    captions, named = [], []
    for objects in scenes:
        caption, said = random_caption(objects, generator, open_fraction=partial_fraction)
        captions.append(caption)
        named.append(said)
    if hard_negatives:
        for said in list(named):
            negative = swapped_objects(said, generator)
            if negative is not None:
                captions.append(caption_for({"objects": negative}, generator))
                named.append(negative)
    positives = captions_true_of(scene_table(named), scene_table(scenes))  # [B, C]
    ids, mask = tokenizer(captions)
    return {"images": batch.images, "ids": ids, "mask": mask, "positives": positives}


def clip_loss(clip: TinyCLIP, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """:func:`soft_contrastive_loss` of a :func:`clip_batch`, and logs (scale, image→text top-1 accuracy)."""
    image_emb, text_emb, scale = clip(batch["images"], batch["ids"], batch["mask"])
    loss = soft_contrastive_loss(image_emb, text_emb, scale, batch["positives"])
    with torch.no_grad():
        best = (image_emb @ text_emb.T).argmax(dim=1)  # [B]
        top1 = batch["positives"].gather(1, best[:, None]).float().mean().item()
    return loss, {"scale": scale.item(), "top1": top1}
