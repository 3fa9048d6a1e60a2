"""The one image loader: every command reads images through `load_image`, so all of them accept the same files,
decode them the same way and name the same file or row when an image is bad.

Every mode Pillow opens becomes 8-bit RGB by a stated rule (`to_rgb`):
  - 16-bit greyscale (I;16*) and 32-bit integer (I) images are read as 0..65535 and scaled by 255/65535
    (Pillow's own convert would clip them to 255: a blank white image);
  - float (F) images are read as 0..1 when every value lies in [0, 1], else as 0..255 (clipped);
  - anything with transparency (RGBA, LA, PA, P or L/RGB with a transparent colour) is composited on white
    (Pillow's convert would drop the alpha: black behind a transparent shape);
  - palettes, CMYK, YCbCr, LAB, HSV and 1-bit images go through Pillow's conversion to RGB.
Multi-frame files (GIF, APNG, TIFF) give their first frame. EXIF orientation is not applied (as in LLaVA).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import LlavaGMError

# Decompression-bomb guard: a small file can declare a huge image. Pillow's own limit (~89.5 megapixels, e.g.
# 9459 x 9459), made a clear error in every command instead of Pillow's warning or traceback.
MAX_PIXELS = 89_478_485

ImageSource = Union[str, Path, bytes, Image.Image]


def load_image(source: ImageSource, where: str = "") -> Image.Image:
    """Decode an image file, its bytes, or a PIL image into 8-bit RGB; LlavaGMError (naming `where`, e.g.
    "questions.jsonl:12", and the file) when it is missing, empty, truncated, undecodable or too large."""
    if isinstance(source, Image.Image):
        return to_rgb(source, f"{where}: image" if where else "image")
    if isinstance(source, (bytes, bytearray, memoryview)):
        label, data = (f"{where}: image" if where else "image"), bytes(source)
    elif isinstance(source, (str, Path)):
        label = f"{where}: {source}: image" if where else f"{source}: image"
        data = _read_file(Path(source), label)
    else:
        raise LlavaGMError(f"{where or 'image'}: expected an image file path or bytes, got {type(source).__name__}")
    if not data:
        raise LlavaGMError(f"{label} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, as an error
            im = Image.open(io.BytesIO(data))
        _check_size(im.size, label)
        im.load()
    except LlavaGMError:
        raise
    except Image.DecompressionBombError:
        raise LlavaGMError(f"{label} is over the {MAX_PIXELS / 1e6:.1f}-megapixel limit (decompression-bomb guard); "
                           "resize it") from None
    except UnidentifiedImageError:
        raise LlavaGMError(f"{label} is in no format Pillow can read") from None
    except MemoryError:
        raise LlavaGMError(f"{label} is too large to decode in memory; resize it") from None
    except Exception as e:  # any decoder failure on broken bytes (OSError, SyntaxError, ValueError, ...)
        raise LlavaGMError(f"{label} is truncated or corrupt ({type(e).__name__}: {e})") from None
    return to_rgb(im, label)


def _read_file(path: Path, label: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise LlavaGMError(f"{label} not found (check the path or --image-folder)") from None
    except IsADirectoryError:
        raise LlavaGMError(f"{label} is a folder, not a file") from None
    except PermissionError:
        raise LlavaGMError(f"{label} cannot be read (permission denied)") from None
    except OSError as e:
        raise LlavaGMError(f"{label} cannot be read ({e.strerror or e})") from None


def _check_size(size: tuple[int, int], label: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise LlavaGMError(f"{label} has no pixels ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise LlavaGMError(f"{label} is {w}x{h} = {w * h / 1e6:.1f} megapixels, over the {MAX_PIXELS / 1e6:.1f}-megapixel "
                           "limit (decompression-bomb guard); resize it")


def to_rgb(im: Image.Image, label: str = "image") -> Image.Image:
    """An 8-bit RGB image that looks like `im` (the rules are in the module docstring)."""
    _check_size(im.size, label)
    mode = im.mode
    try:
        if mode == "RGB" and "transparency" not in im.info:
            return im.copy() if im.readonly else im
        if mode.startswith("I") or mode == "F":
            return _scale_to_l(im).convert("RGB")
        if mode in ("La", "RGBa"):  # premultiplied alpha: undo it first
            im = im.convert("LA" if mode == "La" else "RGBA")
            mode = im.mode
        if mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
            rgba = im.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise LlavaGMError(f"{label} has mode {mode}, which cannot be converted to RGB ({e})") from None


def _scale_to_l(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8-bit greyscale by scaling, not clipping."""
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0
    else:  # I;16, I;16B, I;16L, I;16N, I: a 16-bit range
        a = np.asarray(im.convert("I") if im.mode != "I" else im, dtype=np.float64) * (255.0 / 65535.0)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))  # uint8 2-D: mode L
