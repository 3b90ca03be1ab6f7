"""Real images: a captioned folder of the user's own pictures, and a bundled photograph.

:class:`ImageFolderDataset` reads a folder of images (with optional captions in ``captions.jsonl``) into
the same item dicts as :class:`sdlearn.data.ShapesDataset`; :func:`load_photo` returns the photograph that
matplotlib ships in its sample data (no download). ``sdlearn.data`` re-exports both.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib.cbook
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _check_size(size) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive integer (pixels), got {size!r}")


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
"""PIL's modes for one channel of 16-bit integers (``"I"``: how some PIL versions open 16-bit PNGs and TIFFs),
read as 0..65535."""


def _to_rgb(image):
    """An image of any PIL mode as an 8-bit RGB PIL image.

    - 16-bit grey (:data:`SIXTEEN_BIT_MODES`): 0..65535 scaled to 0..255 and rounded (``convert("RGB")`` would
      clip it at 255: white). PIL itself reads 16-bit RGB(A) PNGs as 8-bit RGB(A).
    - Transparency (RGBA, LA, PA, a palette or grey image with a transparent colour): composited over black,
      the background of the Shapes images, so that a transparent pixel never shows the colour hidden under it.
    - Everything else (1-bit, grey, palette, CMYK, YCbCr, ...): PIL's own conversion to RGB.
    """
    if image.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(image).astype(np.float64) * (255 / 65535)  # [H, W]
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey] * 3, axis=-1), mode="RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)  # [H, W, 4] in 0..255
        rgb = np.rint(rgba[..., :3] * (rgba[..., 3:] / 255))  # over black
        return Image.fromarray(rgb.astype(np.uint8), mode="RGB")
    return image.convert("RGB")


def _pil_to_tensor(image, size: int | None) -> torch.Tensor:
    """PIL image of any mode (8 or 16 bits, grey, palette, CMYK, with or without transparency: see
    :func:`_to_rgb`) → ``[3, H, W]`` float32 in [-1, 1]; with ``size``, centre-cropped to a square and resized
    to size×size (bicubic, which PIL low-pass filters when shrinking)."""
    image = _to_rgb(image)
    if size is not None:
        w, h = image.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32)  # [H, W, 3] in 0..255
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1  # [3, H, W]


def _open_image(path: Path):
    """``Image.open(path)``, with PIL's decompression-bomb error (an image of more than twice
    ``PIL.Image.MAX_IMAGE_PIXELS`` pixels, 179 million by default, whose decoding alone could exhaust the
    memory) turned into a ``ValueError`` that says what to do. Such an image is refused, not downscaled:
    decoding it is the danger."""
    try:
        return Image.open(path)
    except Image.DecompressionBombError as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found[1]):,} pixels" if found else "too many pixels"
        raise ValueError(f"it has {size}, more than the {2 * Image.MAX_IMAGE_PIXELS:,} that PIL decodes safely; "
                         "shrink it first (the dataset resizes every image anyway)") from None


class ImageFolderDataset(Dataset):
    """A folder of your own images (png, jpg, jpeg, bmp, webp; subfolders included), as
    ``{"image": [3, size, size] in [-1, 1], "caption": str, "file": relative path}``.

    Images are centre-cropped to a square and resized to ``size``×``size``; 8- and 16-bit, grey, palette
    and CMYK images are read with their true colours, and transparent pixels become black (see
    :func:`_to_rgb`). An image too large to decode safely (PIL's decompression-bomb limit) is refused with a
    ``ValueError``. Captions come from
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
                with _open_image(self.root / name) as im:
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
            with _open_image(self.root / name) as im:
                image = _pil_to_tensor(im, self.size)
        except (OSError, ValueError) as e:
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
