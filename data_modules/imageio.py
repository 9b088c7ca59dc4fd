"""Robust image and mask decoding with PIL.

Every image comes back as ``uint8 [H, W, 3]`` and every mask as ``bool [H, W]`` whatever the file holds:
8/16-bit grayscale, palette, RGB(A), CMYK, 1-bit. Masks are binarised at load time (foreground = any value > 0),
which covers VisA's small-integer masks and 0/255 masks alike. JPEG masks (Kvasir, TN3K ship them) are the one
exception: compression rings put small non-zero values around every edge, so a lossy mask uses half of its
range as the threshold instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_modules.errors import DataError

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
LOSSY_EXTS = frozenset({".jpg", ".jpeg", ".webp"})


def is_image_file(path: Path) -> bool:
    """True for a visible file with an image extension (any case: ``.PNG``, ``.JPG`` …)."""
    return path.suffix.lower() in IMAGE_EXTS and not path.name.startswith(".")


def _open(path: Path) -> Image.Image:
    """Open and fully decode ``path``; a missing, unreadable or truncated file raises ``DataError`` naming it."""
    try:
        img = Image.open(path)
        img.load()  # decode now so that a truncated file fails here, with its name, not later in a worker
    except FileNotFoundError as exc:
        raise DataError(f"image file not found: {path}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc} (is the file truncated or not an image?)") from exc
    return img


def _to_uint8_gray(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale a high-bit-depth single-channel array to 8 bit by the maximum of its type (never by clipping)."""
    if mode.startswith("I;16") or arr.dtype == np.uint16:
        return (arr.astype(np.float32) * (255.0 / 65535.0)).round().astype(np.uint8)
    if mode == "I":
        # 16-bit PNGs decode to 'I' in some Pillow versions: values fit in 16 bits then.
        peak = 65535.0 if arr.max(initial=0) <= 65535 and arr.min(initial=0) >= 0 else float(2**31 - 1)
        return (np.clip(arr.astype(np.float64), 0, None) * (255.0 / peak)).round().astype(np.uint8)
    if mode == "F":
        peak = 1.0 if arr.max(initial=0) <= 1.0 else 255.0 if arr.max(initial=0) <= 255.0 else 65535.0
        return (np.clip(arr, 0, peak) * (255.0 / peak)).round().astype(np.uint8)
    return arr.astype(np.uint8)


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image to ``uint8 [H, W, 3]`` RGB.

    Grayscale is replicated to three channels, alpha is dropped (as CLIP's own preprocessing does), palette and
    CMYK are converted, and 16-bit data is scaled by 255/65535.
    """
    path = Path(path)
    img = _open(path)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        gray = _to_uint8_gray(np.asarray(img), img.mode)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DataError(f"cannot read image {path}: decoded to shape {arr.shape}, expected [H, W, 3]")
    return np.ascontiguousarray(arr)


def load_mask(path: str | Path) -> np.ndarray:
    """Decode a ground-truth mask to ``bool [H, W]`` (foreground = any value > 0; lossy files: > half range).

    Colour and palette masks count a pixel as foreground when any colour channel is non-zero; an RGBA mask whose
    colour is constant (a cut-out drawn only in alpha) uses its alpha channel.
    """
    path = Path(path)
    img = _open(path)
    if img.mode == "1":
        return np.asarray(img, dtype=bool)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return np.asarray(img) > 0  # threshold the raw values: a 16-bit 1 is foreground too
    if img.mode in ("L", "LA"):
        values = np.asarray(img.getchannel("L"))
    else:
        rgba = np.asarray(img.convert("RGBA"))
        values = rgba[..., :3].max(axis=2)
        if values.min() == values.max() and rgba[..., 3].min() != rgba[..., 3].max():
            values = rgba[..., 3]
    threshold = 127 if path.suffix.lower() in LOSSY_EXTS else 0
    return values > threshold


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` from the file header, without decoding the pixels."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError as exc:
        raise DataError(f"image file not found: {path}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
