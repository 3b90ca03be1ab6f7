"""Input checks shared by every module, so that the same mistake gets the same one-line message everywhere.

Conventions, written down once:

- **Batches.** Every model and metric takes a batch ``[B, ...]``, never a single item: a single image
  ``[3, 32, 32]`` is refused with a hint to add the batch dimension (``image[None]``), by the VAE, the
  classifier, the text encoder's image tower and the pipeline alike.
- **Masks.** A text mask is a ``bool`` tensor ``[B, L]``, True where a token is real (the tokenizer's
  convention); an integer or float mask is refused, in the denoiser and the text encoder alike.
- **Counts.** A count (a size, a number of steps, a batch size) is an ``int`` ≥ 1; ``True`` is not a count.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch


def check_positive_int(value, name: str, allow_none: bool = False, maximum: int | None = None) -> None:
    """Raise ``ValueError("NAME must be a positive integer, got VALUE")`` unless ``value`` is an int ≥ 1
    (``bool`` is refused; ``None`` passes when ``allow_none``), and ``ValueError("NAME must be at most
    MAXIMUM, got VALUE")`` when it exceeds ``maximum``."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be a positive integer{extra}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value!r}")


def check_probability(value, name: str) -> None:
    """Raise ``ValueError("NAME must be a probability in [0, 1], got VALUE")`` unless ``value`` is a number in
    [0, 1] (``bool`` is refused)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def check_batch(x, item_shape: Sequence[int], what: str, name: str | None = None, min_count: int = 1,
                finite: bool = False) -> torch.Tensor:
    """``x`` as a floating-point batch ``[B, *item_shape]`` with B ≥ ``min_count``, or a ValueError saying what
    was expected: e.g. ``check_batch(images, (3, 32, 32), "image")``. ``name`` is how the message calls the
    argument (default: "the {what} batch"); ``finite`` also refuses NaN and infinities."""
    expected = f"[B, {', '.join(str(s) for s in item_shape)}]"
    label = name or f"the {what} batch"
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{label} must be a torch.Tensor of shape {expected}, got {type(x).__name__}")
    if tuple(x.shape) == tuple(item_shape):
        raise ValueError(f"{label} must be a batch of shape {expected}, got one {what} {list(x.shape)}: "
                         "add the batch dimension with x[None]")
    if x.dim() != len(item_shape) + 1 or tuple(x.shape[1:]) != tuple(item_shape):
        raise ValueError(f"{label} must have shape {expected}, got {list(x.shape)}")
    if len(x) < min_count:
        raise ValueError(f"{label} must hold at least {min_count} {what}(s), got {len(x)}")
    if not x.is_floating_point():
        raise ValueError(f"{label} must be a floating-point tensor of shape {expected}, got dtype {x.dtype}")
    if finite and not torch.isfinite(x).all():
        raise ValueError(f"{label} contains NaN or infinite values")
    return x


def check_mask(mask, shape: Sequence[int], name: str = "text_mask") -> torch.Tensor:
    """``mask`` as a bool tensor of ``shape`` (``[B, L]``, True where a token is real), or a ValueError."""
    expected = f"[{', '.join(str(s) for s in shape)}]"
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(shape):
        got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a bool tensor {expected} (True where a token is real), got {got}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor {expected} (True where a token is real), got dtype {mask.dtype}; "
                         "the tokenizer returns one")
    return mask


def warn_deprecated(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn that ``old`` is deprecated in favour of ``new``: old names keep working for one release."""
    warnings.warn(f"{old} is deprecated and will be removed in the next release; use {new}", DeprecationWarning,
                  stacklevel=stacklevel)
