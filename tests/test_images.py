"""The one image loader: every mode Pillow opens decodes to its 8-bit RGB equivalent; bad files are one clear error."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from llava_gm import images
from llava_gm.errors import LlavaGMError
from llava_gm.images import load_image


def _shape_rgb() -> Image.Image:
    """A red triangle on a varied background: the 8-bit RGB reference."""
    im = Image.new("RGB", (24, 20), (255, 255, 255))
    ImageDraw.Draw(im).polygon([(2, 18), (12, 2), (22, 18)], fill=(220, 30, 30))
    return im


def _grey_ramp() -> np.ndarray:
    return (np.arange(24 * 20).reshape(20, 24) * 7 % 256).astype(np.uint8)


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def _eq(a: Image.Image, b: Image.Image):
    assert a.mode == "RGB" and a.size == b.size
    assert np.array_equal(np.asarray(a), np.asarray(b.convert("RGB")))


def test_rgb_and_greyscale_as_is():
    ref = _shape_rgb()
    _eq(load_image(_save(ref, "PNG")), ref)
    grey = Image.fromarray(_grey_ramp())
    _eq(load_image(_save(grey, "PNG")), grey)
    bw = Image.fromarray(_grey_ramp() > 127)
    _eq(load_image(_save(bw, "PNG")), bw.convert("L"))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_greyscale_is_scaled_not_clipped(fmt):
    a8 = _grey_ramp()
    im16 = Image.fromarray(a8.astype(np.uint16) * 257)  # the 16-bit image whose 8-bit equivalent is a8
    assert im16.mode == "I;16"
    raw = _save(im16, fmt)
    assert not np.array_equal(np.asarray(Image.open(io.BytesIO(raw)).convert("L")), a8)  # Pillow alone clips
    _eq(load_image(raw), Image.fromarray(a8))


def test_32_bit_integer_and_float_greyscale():
    a8 = _grey_ramp()
    _eq(load_image(_save(Image.fromarray(a8.astype(np.int32) * 257), "TIFF")), Image.fromarray(a8))  # I: a 16-bit range
    _eq(load_image(_save(Image.fromarray(a8.astype(np.float32) / 255), "TIFF")), Image.fromarray(a8))  # F in [0, 1]
    _eq(load_image(_save(Image.fromarray(a8.astype(np.float32) + 0.2), "TIFF")), Image.fromarray(a8))  # F in 0..255


def test_transparent_background_composited_on_white():
    ref = _shape_rgb()
    rgba = Image.new("RGBA", ref.size, (0, 0, 0, 0))  # transparent black: Pillow's convert makes it black
    ImageDraw.Draw(rgba).polygon([(2, 18), (12, 2), (22, 18)], fill=(220, 30, 30, 255))
    raw = _save(rgba, "PNG")
    assert Image.open(io.BytesIO(raw)).convert("RGB").getpixel((0, 0)) == (0, 0, 0)
    _eq(load_image(raw), ref)
    # half-transparent pixels blend with white: 255 + a * (c - 255)
    half = Image.new("RGBA", (2, 1), (100, 0, 200, 128))
    got = np.asarray(load_image(_save(half, "PNG"))).astype(int)
    want = np.rint(255 + 128 / 255 * (np.array([100, 0, 200]) - 255))
    assert np.abs(got[0, 0] - want).max() <= 1


def test_la_and_palette_and_colour_key_transparency():
    a8 = _grey_ramp()
    la = Image.merge("LA", [Image.fromarray(a8), Image.fromarray(np.where(a8 > 100, 255, 0).astype(np.uint8))])
    want = Image.fromarray(np.where(a8 > 100, a8, 255).astype(np.uint8))
    _eq(load_image(_save(la, "PNG")), want)

    ref = _shape_rgb()
    pal = ref.quantize(colors=4)
    _eq(load_image(_save(pal, "PNG")), pal.convert("RGB"))  # palette without transparency
    _eq(load_image(_save(pal, "GIF")), pal.convert("RGB"))
    bg = pal.getpixel((0, 0))
    black_bg = pal.copy()
    black_bg.putpalette(pal.getpalette()[: 3 * bg] + [0, 0, 0] + pal.getpalette()[3 * bg + 3 :])
    for fmt in ("PNG", "GIF"):
        _eq(load_image(_save(black_bg, fmt, transparency=bg)), pal.convert("RGB"))  # transparent index -> white

    key = ref.copy()
    key.paste((0, 0, 0), (0, 0, 24, 4))  # a black band marked transparent by a tRNS colour key
    _eq(load_image(_save(key, "PNG", transparency=(0, 0, 0))), _band_white(ref))


def _band_white(ref):
    out = ref.copy()
    out.paste((255, 255, 255), (0, 0, 24, 4))
    return out


def test_cmyk_ycbcr_lab_modes():
    ref = _shape_rgb()
    _eq(load_image(_save(ref.convert("CMYK"), "TIFF")), ref)  # Pillow's RGB <-> CMYK round trip is exact
    _eq(load_image(ref.convert("CMYK")), ref)
    ycc = ref.convert("YCbCr")
    _eq(load_image(ycc), ycc.convert("RGB"))
    lab = Image.new("LAB", (1, 1), (136, 208, 195))  # L*=53, a*=80, b*=67: sRGB red
    r, g, b = load_image(lab).getpixel((0, 0))
    assert r > 240 and g < 20 and b < 20


def test_pil_image_passthrough_converts_modes():
    a8 = _grey_ramp()
    _eq(load_image(Image.fromarray(a8.astype(np.uint16) * 257)), Image.fromarray(a8))


def _png_header_claiming(w: int, h: int) -> bytes:
    """A tiny PNG whose header declares w x h pixels (a decompression bomb without the memory)."""
    raw = bytearray(_save(Image.new("L", (1, 1)), "PNG"))
    ihdr = raw[12:29]  # b"IHDR" + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", w, h)
    raw[12:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(raw)


def test_bad_images_are_one_clear_error_naming_where(tmp_path):
    where = "q.jsonl:7"
    good = _save(_shape_rgb(), "PNG")
    cases = {
        "missing.png": None,
        "empty.png": b"",
        "truncated.png": good[: len(good) // 2],
        "text.png": b"not an image at all",
        "bomb.png": _png_header_claiming(20000, 20000),
        "half-bomb.png": _png_header_claiming(10000, 10000),  # over the cap, under Pillow's hard limit: Pillow only warns
    }
    expect = {"missing.png": "not found", "empty.png": "empty", "truncated.png": "truncated", "text.png": "no format Pillow can read",
              "bomb.png": "megapixel limit", "half-bomb.png": "megapixel limit"}
    for name, data in cases.items():
        p = tmp_path / name
        if data is not None:
            p.write_bytes(data)
        with pytest.raises(LlavaGMError) as e:
            load_image(p, where)
        msg = str(e.value)
        assert msg.startswith(f"{where}: {p}: image ") and expect[name] in msg, msg
        if data:
            with pytest.raises(LlavaGMError, match=f"^{where}: image .*{expect[name]}"):
                load_image(data, where)
    with pytest.raises(LlavaGMError, match="image is a folder"):
        load_image(tmp_path)
    with pytest.raises(LlavaGMError, match="expected an image file path or bytes"):
        load_image(5, "row 3")


def test_pixel_cap_is_the_stated_limit(monkeypatch):
    raw = _save(Image.new("RGB", (10, 10)), "PNG")
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    assert load_image(raw).size == (10, 10)
    monkeypatch.setattr(images, "MAX_PIXELS", 99)
    with pytest.raises(LlavaGMError, match="10x10 = 0.0 megapixels, over the 0.0-megapixel limit"):
        load_image(raw)
