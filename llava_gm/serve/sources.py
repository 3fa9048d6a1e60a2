"""Where a request's image comes from: a data: URL (always), a file under the folder the server was told to
allow (`--allow-files`), an http(s) URL only with `--allow-urls` (then with size and time caps). The server
fetches nothing by default. Decoding goes through llava_gm.images.load_image (modes, truncation, bombs)."""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlparse

from PIL import Image

from ..errors import LlavaGMError
from ..images import load_image
from .schema import ApiError, bad


@dataclass
class ImagePolicy:
    allow_files: Optional[Path] = None  # images may be read from files under this folder
    allow_urls: bool = False  # images may be fetched over http(s)
    max_bytes: int = 10 * 2**20  # an image's encoded size
    max_pixels: int = 4096 * 4096  # an image's declared size (decompression bombs)
    fetch_timeout_s: float = 10.0


def _data_url(url: str, param: str, policy: ImagePolicy) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:"):
        raise bad(f"{param}: a data URL is data:<type>;base64,<bytes>", param)
    if len(payload) > policy.max_bytes * 4 // 3 + 4:
        raise ApiError(413, f"{param}: the image is over {policy.max_bytes // 2**20} MiB", param, "image_too_large")
    if not head.endswith(";base64"):
        raise bad(f"{param}: only base64 data URLs are read (data:image/png;base64,...)", param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"{param}: the data URL's payload is not valid base64", param) from None


def _file(url: str, param: str, policy: ImagePolicy) -> bytes:
    if policy.allow_files is None:
        raise bad(f"{param}: local files are not served; send the image as a data URL (or start the server with --allow-files DIR)", param)
    raw = unquote(urlparse(url).path) if url.startswith("file:") else url
    root = policy.allow_files.resolve()
    path = (root / raw).resolve() if not Path(raw).is_absolute() else Path(raw).resolve()
    if not path.is_relative_to(root):
        raise bad(f"{param}: {raw} is outside the folder the server allows ({root})", param)
    if not path.is_file():
        raise bad(f"{param}: no image file {raw} in the allowed folder", param)
    if path.stat().st_size > policy.max_bytes:
        raise ApiError(413, f"{param}: the image is over {policy.max_bytes // 2**20} MiB", param, "image_too_large")
    return path.read_bytes()


def _fetch(url: str, param: str, policy: ImagePolicy) -> bytes:
    if not policy.allow_urls:
        raise bad(f"{param}: this server fetches no URLs; send the image as a data URL (or start it with --allow-urls)", param)
    import httpx

    try:
        with httpx.stream("GET", url, timeout=policy.fetch_timeout_s, follow_redirects=True) as r:
            if r.status_code != 200:
                raise bad(f"{param}: fetching the image gave HTTP {r.status_code}", param)
            data = bytearray()
            for chunk in r.iter_bytes():
                data += chunk
                if len(data) > policy.max_bytes:
                    raise ApiError(413, f"{param}: the image is over {policy.max_bytes // 2**20} MiB", param, "image_too_large")
            return bytes(data)
    except httpx.HTTPError as e:
        raise bad(f"{param}: cannot fetch the image ({type(e).__name__})", param) from None


def read_image(url: str, param: str, policy: ImagePolicy) -> tuple[Image.Image, bytes]:
    """(RGB image, its encoded bytes) for an image URL of a request; ApiError when it cannot be had."""
    scheme = urlparse(url).scheme.lower() if ":" in url[:12] else ""
    if scheme == "data":
        data = _data_url(url, param, policy)
    elif scheme in ("http", "https"):
        data = _fetch(url, param, policy)
    elif scheme in ("", "file") or len(scheme) == 1:  # a path (a Windows drive letter reads as a scheme)
        data = _file(url, param, policy)
    else:
        raise bad(f"{param}: {scheme}: URLs are not read; send a data URL", param)
    if len(data) > policy.max_bytes:
        raise ApiError(413, f"{param}: the image is over {policy.max_bytes // 2**20} MiB", param, "image_too_large")
    try:  # the declared size, before decoding anything
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w, h = Image.open(io.BytesIO(data)).size
        if w * h > policy.max_pixels:
            raise ApiError(413, f"{param}: the image is {w}x{h} pixels, over this server's {policy.max_pixels / 1e6:.1f}-megapixel limit; "
                                "resize it", param, "image_too_large")
    except ApiError:
        raise
    except Image.DecompressionBombError:
        raise ApiError(413, f"{param}: the image declares too many pixels (decompression-bomb guard); resize it", param,
                       "image_too_large") from None
    except Exception:
        pass  # not readable as an image: load_image says why
    try:
        return load_image(data, param), data
    except LlavaGMError as e:
        raise bad(str(e), param) from None
