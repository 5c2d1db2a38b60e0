"""Image I/O: faithful reads of every mode, budget-safe quantization, atomic PNG writes, clear read errors."""

from __future__ import annotations

import errno
import os
import time
import warnings
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import PIL
from PIL import Image, UnidentifiedImageError, features

from conftest import CudaLikeDivision, LiveBuffers, avif_without_its_image
from preempt_cli import imageio
from preempt_cli.errors import ImageReadError, ImageWriteError
from preempt_cli.imageio import (
    Picture,
    levels_to_float,
    quantize,
    quantize_batch,
    quantize_batch_on_device,
    read_image,
    read_png_text,
    stack_levels,
    write_png,
)

_PILLOW = tuple(int(part) for part in PIL.__version__.split(".")[:2])

#: Mode each shared photo must keep (the JPEGs are RGB).
PHOTO_MODES = {
    "astronaut.png": "RGB",
    "camera.png": "L",
    "chelsea.png": "RGB",
    "coffee.png": "RGB",
    "hubble_deep_field.jpg": "RGB",
    "logo.png": "RGBA",
    "motorcycle_left.png": "RGB",
    "rocket.jpg": "RGB",
}


def _perturb(picture: Picture, eps: float, seed: int, overshoot: float = 1.0) -> torch.Tensor:
    """The picture's tensor plus uniform noise of up to ``overshoot * eps`` (not clipped to the budget)."""
    x = picture.to_tensor()
    g = torch.Generator().manual_seed(seed)
    noise = (torch.rand(x.shape, generator=g) * 2 - 1) * eps * overshoot
    return (x + noise).clamp(0.0, 1.0)


def _png_ihdr(path: Path) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from a PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height, depth, color_type = struct.unpack(">IIBB", data[16:26])
    return width, height, depth, color_type


def _png_bytes(width: int, height: int, *, depth: int = 8, color_type: int = 2, idat: bytes = b"") -> bytes:
    """A PNG file with the given header (its pixel data need not match)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(idat)) + chunk(b"IEND", b"")


def _temp_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith("."))


# -- round trip of the real photos --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PHOTO_MODES))
@pytest.mark.parametrize("eps", [8 / 255, 0.0314])
def test_photo_round_trip_keeps_size_mode_alpha_and_budget(name, eps, photos_dir, tmp_path) -> None:
    src = photos_dir / name
    if not src.is_file():
        pytest.skip(f"{src} missing from the shared photos")
    pic = read_image(src)
    assert pic.mode == PHOTO_MODES[name]
    with Image.open(src) as raw:
        assert pic.source_format == raw.format
        raw_size = raw.size
    # Upright size: equal to the stored one, or swapped by an EXIF rotation.
    assert pic.size in (raw_size, raw_size[::-1])
    assert pic.color.dtype == np.uint8
    assert pic.channels == (1 if pic.mode in ("L", "LA") else 3)
    assert (pic.alpha is not None) == pic.mode.endswith("A")

    perturbed = _perturb(pic, eps, seed=len(name), overshoot=1.3)  # overshoots: quantize must clip
    color = quantize(perturbed, pic.color, eps)
    assert color.shape == pic.color.shape and color.dtype == pic.color.dtype
    out = tmp_path / "out" / (Path(name).stem + ".png")
    text = {"preempt": f"eps={eps:.6f}; backbone=tiny", "Software": "preempt-cli tests ü"}
    write_png(out, pic, color, text=text)
    assert _temp_leftovers(out.parent) == []

    back = read_image(out)
    assert back.size == pic.size
    assert back.mode == pic.mode
    assert back.source_format == "PNG"
    np.testing.assert_array_equal(back.color, color)  # lossless
    if pic.alpha is None:
        assert back.alpha is None
    else:
        np.testing.assert_array_equal(back.alpha, pic.alpha)
    diff = np.abs(back.color.astype(np.int64) - pic.color.astype(np.int64))
    limit = int(np.floor(eps * 255 + 1e-9))
    assert diff.max() <= limit
    assert diff.max() == limit  # the overshooting noise reaches the budget: quantize clipped, not shrank
    assert read_png_text(out) == text
    if pic.icc_profile:
        with Image.open(out) as written:
            assert written.info.get("icc_profile") == pic.icc_profile


def test_photos_folder_has_the_documented_pictures(photos_dir) -> None:
    assert set(PHOTO_MODES) <= {p.name for p in photos_dir.iterdir()}


# -- sizes from headers -------------------------------------------------------------------------------------


def _header_cases(folder: Path) -> list[Path]:
    """Files of the modes and formats read_image keeps apart, each a different size (width != height)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 36, 3), dtype=np.uint8)
    gray = rgb[:, :, 0]
    rotated = Image.Exif()
    rotated[0x0112] = 6
    cases = {
        "rgb.png": (Image.fromarray(rgb), {}),
        "rgba.png": (Image.fromarray(rng.integers(0, 256, (20, 36, 4), dtype=np.uint8)), {}),
        "gray.png": (Image.fromarray(gray), {}),
        "gray_alpha.png": (Image.fromarray(gray).convert("LA"), {}),
        "gray_trns.png": (Image.fromarray(gray), {"transparency": int(gray[0, 0])}),
        "rgb_trns.png": (Image.fromarray(rgb), {"transparency": tuple(int(v) for v in rgb[0, 0])}),
        "palette.png": (Image.fromarray(rgb).quantize(16), {}),
        "palette_trns.png": (Image.fromarray(rgb).quantize(16), {"transparency": 3}),
        "bilevel.png": (Image.fromarray(gray).convert("1"), {}),
        "gray16.png": (Image.fromarray((gray.astype(np.uint16) * 257)), {}),
        "rotated.png": (Image.fromarray(rgb), {"exif": rotated.tobytes()}),
        "late_exif.png": (Image.fromarray(rgb), {}),  # its eXIf after the pixels: added below
        "rotated.jpg": (Image.fromarray(rgb), {"exif": rotated.tobytes()}),
        "gray.jpg": (Image.fromarray(gray), {}),
        "progressive.jpg": (Image.fromarray(rgb), {"progressive": True}),
        "cmyk.jpg": (Image.fromarray(rgb).convert("CMYK"), {}),
        "palette_trns.gif": (Image.fromarray(rgb).quantize(16), {"transparency": 3}),
        "rgb.tif": (Image.fromarray(rgb), {}),
        "rgba.tif": (Image.fromarray(rng.integers(0, 256, (20, 36, 4), dtype=np.uint8)), {}),
        "gray16.tif": (Image.fromarray((gray.astype(np.uint16) * 257)), {}),
        "rgb.bmp": (Image.fromarray(rgb), {}),
        "rgb.ppm": (Image.fromarray(rgb), {}),
    }
    if features.check("webp"):
        cases["rgba.webp"] = (Image.fromarray(rng.integers(0, 256, (20, 36, 4), dtype=np.uint8)), {"lossless": True})
    folder.mkdir(parents=True, exist_ok=True)
    for name, (img, extra) in cases.items():
        img.save(folder / name, **extra)
    _add_png_chunk_after_the_pixels(folder / "late_exif.png", b"eXIf", rotated.tobytes()[6:])
    return [folder / name for name in cases]


def _add_png_chunk_after_the_pixels(path: Path, kind: bytes, body: bytes) -> None:
    """Insert a chunk into the PNG at ``path`` between its image data and its end (IEND)."""
    data = path.read_bytes()
    end = data.rindex(b"IEND") - 4  # the IEND chunk's length field
    crc = struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    path.write_bytes(data[:end] + struct.pack(">I", len(body)) + kind + body + crc + data[end:])


def test_decoded_size_from_the_header_is_what_read_image_gives(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The pipeline bounds the bytes of the files it decodes ahead by their headers, before decoding them:
    each mode's header gives the picture's channels, upright height and width, and the bytes of its levels
    and alpha. PNGs and JPEGs without EXIF are read without Pillow (its JPEG header took 70 us a file)."""
    from preempt_cli.imageio import decoded_size

    paths = _header_cases(tmp_path)
    expected = {}
    for path in paths:
        picture = read_image(path)
        expected[path] = (picture.channels, picture.size[1], picture.size[0], picture.nbytes)
        assert tuple(decoded_size(path)) == expected[path], path.name

    def no_pillow(f):
        raise AssertionError("read through Pillow")

    monkeypatch.setattr(imageio, "_pillow_decoded_size", no_pillow)
    for path in paths:
        if path.suffix in (".png", ".jpg") and not path.stem.startswith("rotated"):
            assert tuple(decoded_size(path)) == expected[path], path.name


def test_decoded_size_of_the_shared_photos(photos_dir: Path) -> None:
    from preempt_cli.imageio import decoded_size

    for path in sorted(photos_dir.iterdir()):
        picture = read_image(path)
        expected = (picture.channels, picture.size[1], picture.size[0], picture.nbytes)
        assert tuple(decoded_size(path)) == expected, path.name


def test_decoded_size_of_files_that_fail_and_of_a_pipe(tmp_path: Path) -> None:
    """A file whose read fails on its header costs nothing (its decode fails and says why); a pipe is not
    opened (it is read once, by its decode): its size is unknown."""
    from preempt_cli.imageio import NO_PIXELS, decoded_size

    (tmp_path / "garbage.png").write_bytes(b"not an image at all" * 10)
    (tmp_path / "empty.png").write_bytes(b"")
    Image.new("RGB", (40, 30)).save(tmp_path / "big.png")
    assert decoded_size(tmp_path / "garbage.png") == NO_PIXELS
    assert decoded_size(tmp_path / "empty.png") == NO_PIXELS
    assert decoded_size(tmp_path / "missing.png") == NO_PIXELS
    assert decoded_size(tmp_path / "big.png", max_pixels=40 * 30 - 1) == NO_PIXELS
    assert decoded_size(tmp_path / "big.png", max_pixels=40 * 30).nbytes == 40 * 30 * 3
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.png")
        assert decoded_size(tmp_path / "pipe.png") is None  # returned at once: nobody writes to it


# -- EXIF orientation ---------------------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path) -> None:
    # Stored 40 wide x 20 high, left half red, right half blue; orientation 6 = rotate 90 deg clockwise.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(arr).save(path, quality=95, exif=exif.tobytes())
    with Image.open(path) as raw:
        assert raw.size == (40, 20) and raw.getexif().get(0x0112) == 6

    pic = read_image(path)
    assert pic.size == (20, 40) and pic.mode == "RGB"
    top, bottom = pic.color[:16].astype(int), pic.color[24:].astype(int)
    assert (top[..., 0] > 200).all() and (top[..., 2] < 60).all()  # the left half is now on top: red
    assert (bottom[..., 2] > 200).all() and (bottom[..., 0] < 60).all()

    # The protected PNG is stored upright, with no orientation left to apply twice.
    out = tmp_path / "rotated.png"
    write_png(out, pic)
    with Image.open(out) as written:
        assert written.size == (20, 40)
        assert written.getexif().get(0x0112) in (None, 1)
    assert read_image(out).size == (20, 40)



@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP", "JPEG"])
def test_every_exif_orientation_is_applied_as_pillow_does(tmp_path, fmt: str) -> None:
    """Orientations 1 to 8 in each container's own EXIF (a PNG's eXIf, a TIFF's tags, WebP's and JPEG's
    EXIF blocks) give the image ``ImageOps.exif_transpose`` gives, upright."""
    from PIL import ImageOps

    arr = np.random.default_rng(0).integers(0, 256, (6, 10, 3)).astype(np.uint8)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.{fmt.lower()}"
        extra = {"lossless": True} if fmt == "WEBP" else {"quality": 100} if fmt == "JPEG" else {}
        Image.fromarray(arr).save(path, format=fmt, exif=exif.tobytes(), **extra)
        with Image.open(path) as img:
            expected = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
        assert np.array_equal(read_image(path).color, expected), (fmt, orientation)
        assert read_image(path).size == ((10, 6) if orientation < 5 else (6, 10))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_an_orientation_in_xmp_alone_is_not_applied(tmp_path, fmt: str) -> None:
    """Browsers turn an image by its EXIF orientation only. Pillow's ``exif_transpose`` also took
    ``tiff:Orientation`` from XMP when EXIF had none: a 64x48 photo that browsers show 64x48 was written
    48x64, rotated against it. EXIF still wins where both are there."""
    from PIL import PngImagePlugin

    arr = np.random.default_rng(1).integers(0, 256, (48, 64, 3)).astype(np.uint8)
    xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF>'
           '</x:xmpmeta>')  # fmt: skip
    path = tmp_path / f"xmp.{fmt.lower()}"
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", xmp)
        Image.fromarray(arr).save(path, pnginfo=info)
    else:
        Image.fromarray(arr).save(path, quality=100, xmp=xmp.encode())
    with Image.open(path) as img:
        pillow_turns = img.getexif().get(0x0112) == 6
    # Pillow's own view since 11.3 (XMP's orientation in its EXIF): turned; the older ones do not read it
    assert pillow_turns or _PILLOW < (11, 3)
    assert read_image(path).size == (64, 48)
    exif = Image.Exif()
    exif[0x0112] = 3
    both = tmp_path / "both.jpg"
    Image.fromarray(arr).save(both, quality=100, xmp=xmp.encode(), exif=exif.tobytes())
    turned = read_image(both)  # EXIF's 180 degrees, not XMP's 90
    with Image.open(both) as img:
        assert np.array_equal(turned.color, np.asarray(img.convert("RGB"))[::-1, ::-1])


def test_an_orientation_in_a_png_raw_exif_profile_is_not_applied(tmp_path) -> None:
    """ImageMagick keeps a PNG's EXIF as a ``Raw profile type exif`` text chunk, which browsers do not read
    (they turn a PNG by its eXIf chunk alone), and Pillow's ``getexif`` does: a photo browsers show 64x48
    was written 48x64, rotated against it."""
    from PIL import PngImagePlugin

    arr = np.random.default_rng(2).integers(0, 256, (48, 64, 3)).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    raw = exif.tobytes().hex()
    text = f"\nexif\n{len(raw) // 2:8d}\n" + "\n".join(raw[i : i + 72] for i in range(0, len(raw), 72)) + "\n"
    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type exif", text, zip=True)
    Image.fromarray(arr).save(tmp_path / "magick.png", pnginfo=info)
    with Image.open(tmp_path / "magick.png") as img:
        assert img.getexif().get(0x0112) == 6  # what Pillow reads of it
    assert np.array_equal(read_image(tmp_path / "magick.png").color, arr)  # as browsers show it


def test_an_orientation_in_a_png_exif_chunk_after_the_pixels_is_not_applied(tmp_path) -> None:
    """Browsers ignore an orientation that comes after a file's image data (CSS Images 3; the web platform
    tests' "late EXIF data is ignored"): a PNG turns by an eXIf chunk before its IDAT only. Pillow reads a
    late eXIf as it loads the pixels, and a photo browsers show 64x48 was written 48x64, rotated against it
    (while the header read that sizes the batches took it as 64x48)."""
    from preempt_cli.imageio import decoded_size

    arr = np.random.default_rng(3).integers(0, 256, (48, 64, 3)).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "late.png")
    _add_png_chunk_after_the_pixels(tmp_path / "late.png", b"eXIf", exif.tobytes()[6:])  # without "Exif\0\0"
    with Image.open(tmp_path / "late.png") as img:
        img.load()
        assert img.getexif().get(0x0112) == 6  # what Pillow reads of it, once the pixels are loaded
    picture = read_image(tmp_path / "late.png")
    assert np.array_equal(picture.color, arr)  # as browsers show it
    assert tuple(decoded_size(tmp_path / "late.png")) == (3, 48, 64, arr.nbytes)
    Image.fromarray(arr).save(tmp_path / "early.png", exif=exif.tobytes())  # before the pixels: turned
    assert np.array_equal(read_image(tmp_path / "early.png").color, np.rot90(arr, -1))

# -- modes and formats --------------------------------------------------------------------------------------


def _gradient(h: int = 24, w: int = 32) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx + yy) * 255 // (h + w - 2)], -1).astype(np.uint8)


def test_grayscale_png_stays_single_channel(tmp_path) -> None:
    arr = _gradient()[..., 0]
    Image.fromarray(arr, "L").save(tmp_path / "g.png")
    pic = read_image(tmp_path / "g.png")
    assert pic.mode == "L" and pic.channels == 1 and pic.alpha is None
    np.testing.assert_array_equal(pic.color[..., 0], arr)
    assert pic.to_tensor().shape == (1, 24, 32)
    write_png(tmp_path / "out.png", pic)
    assert _png_ihdr(tmp_path / "out.png")[2:] == (8, 0)  # 8-bit grayscale


def test_bilevel_image_reads_as_grayscale(tmp_path) -> None:
    arr = (_gradient()[..., 0] > 127)
    Image.fromarray(arr).convert("1").save(tmp_path / "b.png")
    pic = read_image(tmp_path / "b.png")
    assert pic.mode == "L" and set(np.unique(pic.color)) <= {0, 255}


def test_palette_becomes_rgb(tmp_path) -> None:
    rgb = Image.fromarray(_gradient())
    pal = rgb.quantize(colors=16)
    pal.save(tmp_path / "p.png")
    pic = read_image(tmp_path / "p.png")
    assert pic.mode == "RGB" and pic.alpha is None and pic.channels == 3
    np.testing.assert_array_equal(pic.color, np.asarray(pal.convert("RGB")))


def test_palette_with_transparency_becomes_rgba(tmp_path) -> None:
    idx = (np.arange(24 * 32).reshape(24, 32) % 4).astype(np.uint8)
    img = Image.fromarray(idx, "P")
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 0] + [0] * (256 * 3 - 12))
    img.save(tmp_path / "pt.png", transparency=2)
    pic = read_image(tmp_path / "pt.png")
    assert pic.mode == "RGBA" and pic.channels == 3
    np.testing.assert_array_equal(pic.alpha, np.where(idx == 2, 0, 255).astype(np.uint8))
    np.testing.assert_array_equal(pic.color[idx == 0], np.tile([255, 0, 0], ((idx == 0).sum(), 1)))
    write_png(tmp_path / "out.png", pic, quantize(_perturb(pic, 8 / 255, 0), pic.color, 8 / 255))
    back = read_image(tmp_path / "out.png")
    assert back.mode == "RGBA"
    np.testing.assert_array_equal(back.alpha, pic.alpha)


def test_la_keeps_gray_and_alpha(tmp_path) -> None:
    gray = _gradient()[..., 0]
    alpha = _gradient()[..., 1]
    Image.fromarray(np.stack([gray, alpha], -1), "LA").save(tmp_path / "la.png")
    pic = read_image(tmp_path / "la.png")
    assert pic.mode == "LA" and pic.channels == 1
    np.testing.assert_array_equal(pic.color[..., 0], gray)
    np.testing.assert_array_equal(pic.alpha, alpha)
    color = quantize(_perturb(pic, 8 / 255, 1, overshoot=2), pic.color, 8 / 255)
    write_png(tmp_path / "out.png", pic, color)
    assert _png_ihdr(tmp_path / "out.png")[2:] == (8, 4)  # 8-bit gray + alpha
    back = read_image(tmp_path / "out.png")
    assert back.mode == "LA"
    np.testing.assert_array_equal(back.alpha, alpha)
    np.testing.assert_array_equal(back.color, color)


def test_16bit_grayscale_is_kept_16bit_with_budget_in_65535_levels(tmp_path) -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 65536, size=(24, 32), dtype=np.uint16)
    arr[0, :4] = [0, 1, 65534, 65535]
    Image.fromarray(arr.astype("<u2")).save(tmp_path / "g16.png")  # mode I;16 (Pillow 13 refuses mode=)
    assert _png_ihdr(tmp_path / "g16.png")[2:] == (16, 0)
    pic = read_image(tmp_path / "g16.png")
    assert pic.mode == "I;16" and pic.color.dtype == np.uint16 and pic.max_value == 65535
    np.testing.assert_array_equal(pic.color[..., 0], arr)
    assert torch.allclose(pic.to_tensor()[0], torch.from_numpy(arr.astype(np.float32) / 65535))

    eps = 8 / 255
    color = quantize(_perturb(pic, eps, 2, overshoot=1.5), pic.color, eps)
    assert color.dtype == np.uint16
    out = tmp_path / "out.png"
    write_png(out, pic, color, text={"preempt": "16-bit"})
    assert _png_ihdr(out)[2:] == (16, 0)  # still 16-bit grayscale on disk
    back = read_image(out)
    assert back.mode == "I;16" and back.color.dtype == np.uint16
    np.testing.assert_array_equal(back.color, color)
    diff = np.abs(back.color.astype(np.int64) - arr[..., None].astype(np.int64))
    assert diff.max() == int(np.floor(eps * 65535))  # 2056 levels of 65535, not 8 of 255
    assert read_png_text(out) == {"preempt": "16-bit"}


def test_gif_reads_first_frame(tmp_path) -> None:
    frames = [Image.new("RGB", (16, 12), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(tmp_path / "anim.gif") as raw:
        assert raw.n_frames == 3
    pic = read_image(tmp_path / "anim.gif")
    assert pic.source_format == "GIF" and pic.mode in ("RGB", "RGBA") and pic.size == (16, 12)
    assert (pic.color.reshape(-1, 3) == [255, 0, 0]).all()


@pytest.mark.parametrize(
    ("suffix", "save_args"),
    [
        (".webp", dict(lossless=True)),
        (".tif", dict()),
        (".tiff", dict(compression="tiff_lzw")),
        (".bmp", dict()),
        (".ppm", dict()),
        (".tga", dict()),
    ],
)
def test_lossless_formats_read_exactly(suffix, save_args, tmp_path) -> None:
    if suffix == ".webp" and not features.check("webp"):
        pytest.skip("Pillow built without WebP support")
    arr = _gradient()
    path = tmp_path / f"img{suffix}"
    Image.fromarray(arr).save(path, **save_args)
    pic = read_image(path)
    assert pic.mode == "RGB" and pic.size == (32, 24) and pic.alpha is None
    np.testing.assert_array_equal(pic.color, arr)
    assert suffix in imageio.IMAGE_SUFFIXES


def test_rgba_webp_keeps_alpha(tmp_path) -> None:
    if not features.check("webp"):
        pytest.skip("Pillow built without WebP support")
    arr = np.concatenate([_gradient(), _gradient()[..., :1]], -1)
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.webp", lossless=True, exact=True)
    pic = read_image(tmp_path / "a.webp")
    assert pic.mode == "RGBA"
    np.testing.assert_array_equal(pic.alpha, arr[..., 3])


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_a_transparent_colour_png_keeps_its_transparency_as_alpha(mode: str, tmp_path) -> None:
    arr = _gradient()[..., 0] if mode == "L" else _gradient()
    key = 0 if mode == "L" else (0, 0, 0)  # the gradient's first pixel
    Image.fromarray(arr, mode).save(tmp_path / "t.png", transparency=key)
    pic = read_image(tmp_path / "t.png")
    assert pic.mode == mode + "A" and pic.channels == (1 if mode == "L" else 3)
    transparent = np.all(arr.reshape(*arr.shape[:2], -1) == np.array(key).reshape(-1), axis=-1)
    assert 0 < transparent.sum() < transparent.size
    np.testing.assert_array_equal(pic.alpha, np.where(transparent, 0, 255).astype(np.uint8))
    write_png(tmp_path / "out.png", pic, quantize(_perturb(pic, 8 / 255, 0), pic.color, 8 / 255))
    np.testing.assert_array_equal(read_image(tmp_path / "out.png").alpha, pic.alpha)


def test_16bit_gray_with_a_transparent_level_is_refused_not_made_opaque(tmp_path) -> None:
    # written by hand: Pillow before 10.3 cannot save this mode with a transparency (the file is valid PNG)
    data = _png_bytes(2, 1, depth=16, color_type=0, idat=b"\x00" + bytes([0, 0, 0x80, 0x80]))
    at = data.index(b"IDAT") - 4
    trns = b"tRNS" + bytes(2)  # level 0 is transparent
    data = data[:at] + struct.pack(">I", 2) + trns + struct.pack(">I", zlib.crc32(trns)) + data[at:]
    (tmp_path / "t.png").write_bytes(data)
    with Image.open(tmp_path / "t.png") as img:
        assert img.mode.startswith("I") and img.info.get("transparency") == 0  # what the file is
    _assert_read_error(tmp_path / "t.png", "transparen")


def test_a_cmyk_colour_profile_is_not_attached_to_the_rgb_output(tmp_path) -> None:
    from PIL import ImageCms

    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(_gradient()).convert("CMYK").save(tmp_path / "c.tif", icc_profile=profile)
    Image.fromarray(_gradient()).save(tmp_path / "rgb.png", icc_profile=profile)
    assert read_image(tmp_path / "c.tif").icc_profile is None
    assert read_image(tmp_path / "rgb.png").icc_profile == profile  # same colour space: kept


def test_cmyk_becomes_rgb(tmp_path) -> None:
    Image.fromarray(_gradient()).convert("CMYK").save(tmp_path / "c.tif")
    pic = read_image(tmp_path / "c.tif")
    assert pic.mode == "RGB" and pic.source_mode == "CMYK" and pic.channels == 3


def _cmyk_profile() -> bytes:
    """A minimal ICC v2 CMYK printer profile (A2B0 alone: a lut8 on a grid of 2 points, PCS Lab) whose inks
    are not the naive ones: full black (K) is a dark warm grey, cyan a green-blue, as a press's are."""
    from PIL import ImageCms

    corners = []
    for c in (0, 1):  # the grid's first channel varies slowest
        for m in (0, 1):
            for y in (0, 1):
                for k in (0, 1):
                    rgb = np.array([0.97 - 0.87 * c, 0.93 - 0.73 * m, 0.85 - 0.70 * y])
                    corners.append(rgb * 0.25 + 0.08 if k else rgb)
    rgb = Image.fromarray((np.clip(corners, 0, 1) * 255).round().astype(np.uint8).reshape(1, 16, 3))
    lab = ImageCms.profileToProfile(rgb, ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"),
                                    outputMode="LAB")  # fmt: skip
    lab_bytes = (np.asarray(lab) ^ np.array([0, 128, 128], np.uint8)).tobytes()  # Pillow's a, b are signed
    identity = b"".join(struct.pack(">i", 65536 if i % 4 == 0 else 0) for i in range(9))
    ramp = bytes(range(256))
    lut = b"mft1" + bytes(4) + bytes([4, 3, 2, 0]) + identity + ramp * 4 + lab_bytes + ramp * 3
    white = struct.pack(">3i", 63190, 65536, 54061)  # D50
    desc = b"test CMYK\0"
    tags = [(b"desc", b"desc" + bytes(4) + struct.pack(">I", len(desc)) + desc + bytes(79)),
            (b"wtpt", b"XYZ " + bytes(4) + white), (b"cprt", b"text" + bytes(4) + b"none\0"), (b"A2B0", lut)]
    offset = 128 + 4 + 12 * len(tags)
    table, body = struct.pack(">I", len(tags)), b""
    for signature, data in tags:
        data += bytes(-len(data) % 4)
        table += signature + struct.pack(">II", offset + len(body), len(data))
        body += data
    header = (struct.pack(">I", offset + len(body)) + b"lcms" + bytes([2, 0x10, 0, 0]) + b"prtrCMYKLab "
              + bytes(12) + b"acsp" + bytes(28) + white + bytes(48))  # fmt: skip
    return header + table + body


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
def test_a_cmyk_photo_is_converted_through_its_colour_profile(tmp_path, suffix: str) -> None:
    """A CMYK original is shown by colour-managed viewers through its ICC profile. Converted without it,
    the output's colours were not those: its black (K) came out 0, where the profile's is a grey of 69-77
    (a print's ink on paper). The output is that conversion, tagged sRGB."""
    from PIL import ImageCms
    import io

    profile = _cmyk_profile()
    cmyk = Image.fromarray(_gradient()).convert("CMYK")
    path = tmp_path / f"c{suffix}"
    cmyk.save(path, icc_profile=profile, **({"quality": 100} if suffix == ".jpg" else {}))
    with Image.open(path) as img:
        shown = ImageCms.profileToProfile(img, ImageCms.ImageCmsProfile(io.BytesIO(profile)),
                                          ImageCms.createProfile("sRGB"), outputMode="RGB")  # fmt: skip
        naive = np.asarray(img.convert("RGB")).astype(int)
    pic = read_image(path)
    assert pic.mode == "RGB" and pic.source_mode == "CMYK" and pic.notes == ()
    assert np.array_equal(pic.color, np.asarray(shown))
    assert np.abs(pic.color.astype(int) - naive).max() > 40  # the two conversions differ: a real test
    assert pic.icc_profile is None and pic.colour_chunks == ((b"sRGB", b"\x00"),)
    write_png(tmp_path / "out.png", pic)
    with Image.open(tmp_path / "out.png") as out:
        assert out.info.get("srgb") == 0 and "icc_profile" not in out.info


def test_a_cmyk_photo_whose_profile_cannot_be_applied_says_so(tmp_path) -> None:
    """A profile that is not a CMYK one (or is broken) cannot convert the image: it is converted uncorrected,
    as before, and the file's warning says that its colours may differ."""
    from PIL import ImageCms

    rgb_profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for name, profile in (("rgb-profile.tif", rgb_profile), ("broken.tif", b"not a profile" * 20)):
        Image.fromarray(_gradient()).convert("CMYK").save(tmp_path / name, icc_profile=profile)
        pic = read_image(tmp_path / name)
        assert pic.icc_profile is None and pic.colour_chunks == ()
        assert len(pic.notes) == 1 and "colour profile" in pic.notes[0] and "colours may differ" in pic.notes[0]
    Image.fromarray(_gradient()).convert("CMYK").save(tmp_path / "untagged.tif")
    assert read_image(tmp_path / "untagged.tif").notes == ()  # converted as viewers convert it: nothing to say


# -- quantize -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("eps", "levels"), [(8 / 255, 8), (4 / 255, 4), (0.0314, 8), (0.0335, 8), (0.02, 5), (1 / 255, 1)]
)
def test_quantize_never_exceeds_floor_eps_levels(eps, levels) -> None:
    assert int(np.floor(eps * 255 + 1e-9)) == levels
    rng = np.random.default_rng(1)
    ref = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    ref[0, 0] = (0, 128, 255)
    x = torch.from_numpy(ref.astype(np.float32) / 255).permute(2, 0, 1)
    for sign in (1.0, -1.0):
        # Exactly eps away: eps * 255 may round up past the budget (0.0335 -> 8.54 -> 9 levels).
        out = quantize((x + sign * eps).clamp(0, 1), ref, eps)
        diff = out.astype(int) - ref.astype(int)
        assert np.abs(diff).max() == levels
        assert (np.sign(diff) * sign >= 0).all()
    # Far outside the budget and outside [0, 1]: clipped to both.
    wild = quantize(x + 5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)), ref, eps)
    assert wild.dtype == np.uint8
    assert np.abs(wild.astype(int) - ref.astype(int)).max() == levels
    # Inside the budget: plain rounding.
    small = quantize(x + 0.4 / 255, ref, eps)
    np.testing.assert_array_equal(small, ref)


def test_quantize_keeps_the_budget_for_non_finite_values() -> None:
    # A broken model (NaN weights) or a non-finite step gives NaN/inf pixels: they must land inside the
    # budget like any other value, not at level 0 (torch.maximum passes NaN through).
    ref = np.full((2, 3, 3), 128, dtype=np.uint8)
    x = torch.full((3, 2, 3), 0.5)
    x[0, 0, 0], x[1, 0, 1], x[2, 1, 2] = float("nan"), float("inf"), -float("inf")
    out = quantize(x, ref, 8 / 255)
    assert np.abs(out.astype(int) - 128).max() <= 8


def test_quantize_16bit() -> None:
    ref = np.array([[[0]], [[30000]], [[65535]]], dtype=np.uint16).reshape(1, 3, 1)
    x = torch.from_numpy(ref.astype(np.float32) / 65535).permute(2, 0, 1)
    out = quantize(x + 0.0314, ref, 0.0314)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out[0, :, 0], [int(np.floor(0.0314 * 65535)), 30000 + 2057, 65535])


def test_rounding_a_photo_holds_two_buffers_of_its_size_beside_it() -> None:
    # Rounding a photo's protected floats to levels within the budget held the levels, the original's levels as
    # floats and a lower bound made from them: now the one copy of the original gives both bounds in turn.
    rng = np.random.default_rng(2)
    color = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    reference = stack_levels([color], "cpu")
    x = (reference.float() / 255 + torch.from_numpy(rng.uniform(-0.06, 0.06, reference.shape)).float()).clamp_(0, 1)
    with LiveBuffers(x.numel() * x.element_size()) as live:
        live.track(x)
        small, saved = quantize_batch_on_device(x, reference, 8 / 255, 255)
    assert live.peak <= 3  # x, the levels (returned as saved) and the copy of the original
    expected = quantize(x[0], color, 8 / 255)
    assert np.array_equal(small[0].permute(1, 2, 0).numpy(), expected)
    assert np.abs(expected.astype(int) - color).max() == 8


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_level_distance_is_exact_without_copies_of_the_photo(dtype) -> None:
    # The writer measures each output's distance to its original: as int64 copies of both whole arrays
    # (558 MiB for a 12-megapixel photo) beside the next photo's compute. Now in blocks of the arrays' own dtype.
    import tracemalloc

    top = np.iinfo(dtype).max
    rng = np.random.default_rng(0)
    color = rng.integers(0, top + 1, (1500, 1000, 3), dtype=dtype)
    levels = np.clip(color.astype(np.int64) + rng.integers(-9, 10, color.shape), 0, top).astype(dtype)
    levels[-1, -1, -1], color[-1, -1, -1] = 0, top  # the largest distance, in the last block, both ways round
    expected = int(np.abs(levels.astype(np.int64) - color.astype(np.int64)).max())
    assert expected == top
    tracemalloc.start()
    try:
        assert imageio.level_distance(levels, color) == expected
        assert imageio.level_distance(color, levels) == expected
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < color.nbytes // 4, f"{peak:,} bytes for arrays of {color.nbytes:,}"
    levels[-1, -1, -1] = top  # no wrap-around below the smaller value
    assert imageio.level_distance(levels, color) == int(np.abs(levels.astype(np.int64) - color.astype(np.int64)).max())
    with pytest.raises(ValueError, match="shapes"):
        imageio.level_distance(levels, color[:-1])


# -- read errors --------------------------------------------------------------------------------------------


def _assert_read_error(path: Path, *words: str, **kwargs) -> ImageReadError:
    with pytest.raises(ImageReadError) as info:
        read_image(path, **kwargs)
    message = str(info.value)
    assert str(path) in message
    reason = message[len(str(path)) :].strip(": ")
    assert len(reason) > 5, message
    for word in words:
        assert word in message.lower(), message
    assert info.value.path == path
    assert isinstance(info.value, OSError)
    return info.value


def test_corrupt_file_is_a_read_error(tmp_path) -> None:
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _assert_read_error(path, "not an image")


def _tiff_whose_second_page_has_no_width() -> bytes:
    """A two-page TIFF whose second page's ImageWidth tag is renamed away: Pillow's TIFF plugin raises
    TypeError ("Missing dimensions") as it counts the pages."""
    import io

    buf = io.BytesIO()
    pages = [Image.fromarray(_gradient()), Image.fromarray(_gradient()[::-1])]
    pages[0].save(buf, format="TIFF", save_all=True, append_images=pages[1:])
    data = bytearray(buf.getvalue())
    first = struct.unpack_from("<I", data, 4)[0]
    second = struct.unpack_from("<I", data, first + 2 + 12 * struct.unpack_from("<H", data, first)[0])[0]
    for entry in range(struct.unpack_from("<H", data, second)[0]):
        at = second + 2 + 12 * entry
        if struct.unpack_from("<H", data, at)[0] == 256:  # ImageWidth
            struct.pack_into("<H", data, at, 0x9999)
    return bytes(data)


def test_a_file_a_plugin_fails_on_with_its_own_error_is_a_read_error(tmp_path) -> None:
    """Pillow's plugins raise errors of their own for some broken files (AVIF's RuntimeError, TIFF's
    TypeError for a page without dimensions): read_image let them out, where its other broken files raise
    ImageReadError naming the file (protect said "cannot decode: TypeError: Missing dimensions")."""
    (tmp_path / "pages.tif").write_bytes(_tiff_whose_second_page_has_no_width())
    with Image.open(tmp_path / "pages.tif") as img, pytest.raises(TypeError):
        img.n_frames
    _assert_read_error(tmp_path / "pages.tif", "corrupt")  # the reason is Pillow's own, which its versions word apart
    if features.check("avif"):
        (tmp_path / "broken.avif").write_bytes(avif_without_its_image())
        _assert_read_error(tmp_path / "broken.avif", "corrupt", "failed to decode image")


def test_text_file_named_jpg_is_a_read_error(tmp_path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n" * 20)
    _assert_read_error(path, "not an image")


def test_empty_file_is_a_read_error(tmp_path) -> None:
    path = tmp_path / "empty.png"
    path.touch()
    _assert_read_error(path, "empty")


def test_missing_file_and_directory_are_read_errors(tmp_path) -> None:
    _assert_read_error(tmp_path / "absent.png", "no such file")
    (tmp_path / "dir.png").mkdir()
    _assert_read_error(tmp_path / "dir.png", "directory")


def test_truncated_png_is_a_read_error(tmp_path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)  # incompressible
    full = tmp_path / "full.png"
    Image.fromarray(noise).save(full)
    data = full.read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) * 6 // 10])
    _assert_read_error(path, "truncated")


def test_decompression_bomb_is_refused(tmp_path) -> None:
    # A tiny file that declares 100000 x 100000 pixels (over twice Pillow's limit: its DecompressionBombError)
    # is refused in our words, with the effective --max-pixels, not Pillow's limit of twice as many.
    huge = tmp_path / "bomb.png"
    huge.write_bytes(_png_bytes(100_000, 100_000))
    assert huge.stat().st_size < 200
    limit = imageio.DEFAULT_MAX_PIXELS
    err = _assert_read_error(huge, "decompression-bomb", "--max-pixels")
    assert err.reason == (f"100000x100000 = 10,000,000,000 pixels exceeds the limit of {limit:,} (decompression-bomb "
                          "protection; raise it with --max-pixels if the file is trusted)")  # fmt: skip
    err = _assert_read_error(huge, max_pixels=1000)
    assert "100000x100000 = 10,000,000,000 pixels exceeds the limit of 1,000 (" in err.reason
    # Above Pillow's warning threshold (~89 Mpx) but under its hard limit: still refused, in the same words.
    big = tmp_path / "big.png"
    big.write_bytes(_png_bytes(10_000, 10_000))
    with warnings.catch_warnings(record=True) as caught:  # Pillow's own multi-line warning: not printed
        warnings.simplefilter("always")
        err = _assert_read_error(big, "decompression")
    assert err.reason.startswith(f"10000x10000 = 100,000,000 pixels exceeds the limit of {limit:,} (")
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    # Our own limit, given explicitly, on an ordinary image.
    small = tmp_path / "small.png"
    Image.fromarray(_gradient()).save(small)
    err = _assert_read_error(small, "exceeds", "--max-pixels", max_pixels=32 * 24 - 1)
    assert "32x24" in err.reason
    assert read_image(small, max_pixels=32 * 24).size == (32, 24)


def test_max_pixels_can_allow_more_than_pillows_own_limit(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    big = tmp_path / "big.png"  # 10000 x 10000 declared (over Pillow's ~89 Mpx), no pixel data
    big.write_bytes(_png_bytes(10_000, 10_000))
    err = _assert_read_error(big, max_pixels=10**8)
    assert "decompression" not in str(err).lower() and "corrupt or truncated" in str(err)


def test_a_pillow_bomb_check_while_decoding_is_refused_in_our_words(tmp_path, monkeypatch) -> None:
    # Pillow checks some sizes only while decoding (a GIF frame, a TIFF tile): refused like any other
    frame = tmp_path / "frame.png"
    Image.fromarray(_gradient()).save(frame)

    def bomb(self):
        raise Image.DecompressionBombError("Image size (123456789 pixels) exceeds limit of 1 pixels, could be ...")

    from PIL import ImageFile

    monkeypatch.setattr(ImageFile.ImageFile, "load", bomb)
    err = _assert_read_error(frame, max_pixels=5000)
    assert err.reason.startswith("123,456,789 pixels exceeds the limit of 5,000 (") and "--max-pixels" in err.reason


def test_a_file_larger_than_any_allowed_image_is_refused_unread(tmp_path) -> None:
    # A small PNG padded (sparse) past the bytes any image within --max-pixels can take: refused from its
    # size, nothing read (the tester's 6 GB file reached 6.8 GB of memory)
    path = tmp_path / "padded.png"
    Image.fromarray(_gradient()).save(path)
    cap = imageio.max_file_bytes(32 * 24)
    assert cap >= 64 << 20 and imageio.max_file_bytes(10**9) >= 8 * 10**9  # 16-bit RGBA, uncompressed
    os.truncate(path, cap + 1)
    import tracemalloc

    tracemalloc.start()
    try:
        err = _assert_read_error(path, "too large", "--max-pixels", max_pixels=32 * 24)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"{cap + 1:,} bytes" in err.reason and f"{cap:,}" in err.reason and "768" in err.reason
    assert peak < 1 << 20  # not read into memory
    # at the limit it is read (Pillow ignores what follows the PNG), and hashed as read
    os.truncate(path, cap)
    picture = read_image(path, max_pixels=32 * 24)
    assert picture.size == (32, 24)
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    assert picture.source_sha256 == digest.hexdigest()


@pytest.mark.skipif(not Path("/dev/null").exists() or not Path("/dev/zero").exists(), reason="no /dev")
def test_a_device_is_refused_unread(monkeypatch) -> None:
    # `preempt protect /dev/zero` read until the run was killed for memory
    err = _assert_read_error(Path("/dev/null"), "character device")
    assert err.reason == "is a character device, not an image file"

    def endless(*args, **kwargs):  # reading /dev/zero would take all memory: the test fails instead
        raise AssertionError("a device was opened")

    monkeypatch.setattr(Path, "read_bytes", endless)
    monkeypatch.setattr(imageio, "open", endless, raising=False)
    err = _assert_read_error(Path("/dev/zero"), "character device")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_a_pipe_is_read_up_to_the_limit(tmp_path, monkeypatch) -> None:
    import threading

    monkeypatch.setattr(imageio, "_MIN_FILE_BYTES", 4096)
    monkeypatch.setattr(imageio, "_FILE_METADATA_BYTES", 4096)
    Image.fromarray(_gradient()).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    cap = imageio.max_file_bytes(32 * 24)
    assert cap > len(data)

    def feed(fifo: Path, payload: bytes) -> None:
        try:
            with open(fifo, "wb") as f:
                f.write(payload)
        except BrokenPipeError:  # the reader stopped at the limit
            pass

    for name, payload in (("fits.png", data), ("endless.png", data + bytes(cap))):  # (bounded, for the test)
        fifo = tmp_path / name
        os.mkfifo(fifo)
        writer = threading.Thread(target=feed, args=(fifo, payload), daemon=True)
        writer.start()
        if len(payload) > cap:
            err = _assert_read_error(fifo, "--max-pixels", max_pixels=32 * 24)
            assert f"grew past {cap:,} bytes" in err.reason
        else:
            picture = read_image(fifo, max_pixels=32 * 24)
            assert picture.size == (32, 24) and picture.source_sha256 == __import__("hashlib").sha256(data).hexdigest()
        writer.join(10)
        assert not writer.is_alive()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_a_fifo_nobody_writes_to_fails_instead_of_waiting_forever(tmp_path, monkeypatch) -> None:
    """A FIFO named as an input blocked its worker in open() (nobody writes to it) and with it the whole
    run, Ctrl-C included: it now fails after a bounded wait, saying why; pipes with a writer are still read
    (above), also one whose writer takes longer than that wait to write."""
    import threading

    monkeypatch.setattr(imageio, "FIFO_WRITER_WAIT", 0.2)
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    errors: list[BaseException] = []
    reader = threading.Thread(target=lambda: errors.append(_assert_read_error(fifo, "fifo", "nobody wrote")),
                              daemon=True)  # fmt: skip
    reader.start()
    reader.join(10)
    if reader.is_alive():  # blocked in open(): a writer end lets it go, so the test fails instead of hanging
        os.close(os.open(fifo, os.O_RDWR))
        pytest.fail("reading a FIFO nobody writes to blocked")
    assert len(errors) == 1

    # a writer that holds the pipe open but writes only after the wait: read, not refused
    Image.fromarray(_gradient()).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    slow = tmp_path / "slow.png"
    os.mkfifo(slow)

    def write_late() -> None:
        with open(slow, "wb") as f:
            time.sleep(0.6)
            f.write(data)

    writer = threading.Thread(target=write_late, daemon=True)
    writer.start()
    assert read_image(slow).size == (32, 24)
    writer.join(10)

    # a writer that opens and closes it without writing (`<(true)`): an empty pipe, said so, at once
    empty = tmp_path / "empty.png"
    os.mkfifo(empty)
    closer = threading.Thread(target=lambda: open(empty, "wb").close(), daemon=True)
    closer.start()
    time.sleep(0.1)
    _assert_read_error(empty, "empty pipe")
    closer.join(10)

def test_an_error_without_a_message_still_gives_a_reason(tmp_path, monkeypatch) -> None:
    # the tester saw `cannot decode: MemoryError: ` (nothing after the colon)
    Image.fromarray(_gradient()).save(tmp_path / "a.png")

    def fail(path, *, max_pixels):
        raise MemoryError()

    monkeypatch.setattr(imageio, "read_image", fail)
    (reason,) = imageio.read_images([str(tmp_path / "a.png")])
    assert reason.startswith("cannot decode: MemoryError (out of memory") and "--max-pixels" in reason
    monkeypatch.setattr(imageio, "read_image", lambda path, *, max_pixels: (_ for _ in ()).throw(KeyError()))
    (reason,) = imageio.read_images([str(tmp_path / "a.png")])
    assert reason == "cannot decode: KeyError (no details given)"
    # a message over several lines stays one line
    monkeypatch.setattr(imageio, "read_image", lambda path, *, max_pixels: (_ for _ in ()).throw(ValueError("a\nb")))
    assert imageio.read_images([str(tmp_path / "a.png")]) == ["cannot decode: ValueError: a b"]


def test_a_broken_symlink_says_so_and_quotes_an_odd_target(tmp_path) -> None:
    link = tmp_path / "link.png"
    link.symlink_to(tmp_path / "gone.png")
    err = _assert_read_error(link, "broken symbolic link")
    assert str(tmp_path / "gone.png") in err.reason
    odd = tmp_path / "odd.png"
    odd.symlink_to("new\nline.png")
    err = _assert_read_error(odd, "broken symbolic link")
    assert "\n" not in err.reason and "$'new\\nline.png'" in err.reason


def test_display_name_quotes_only_names_with_control_characters() -> None:
    assert imageio.display_name("plain name é.png") == "plain name é.png"
    assert imageio.display_name("a\nb.png") == "$'a\\nb.png'"
    assert imageio.display_name("it's\t\x01\x7f.png") == "$'it\\'s\\t\\x01\\x7f.png'"
    assert imageio.display_name(os.fsdecode(b"caf\xe9\n.png")) == "$'caf\\xe9\\n.png'"  # not UTF-8
    assert imageio.display_name(Path("x\u2028y")) == "$'x\\u2028y'"


def test_reads_record_the_sha256_of_the_file(tmp_path) -> None:
    import hashlib

    Image.fromarray(_gradient()).save(tmp_path / "a.png")
    assert read_image(tmp_path / "a.png").source_sha256 == hashlib.sha256((tmp_path / "a.png").read_bytes()).hexdigest()


def test_read_png_text_of_other_files_is_empty(tmp_path) -> None:
    assert read_png_text(tmp_path / "absent.png") == {}
    (tmp_path / "junk.png").write_bytes(b"junk" * 10)
    assert read_png_text(tmp_path / "junk.png") == {}
    Image.fromarray(_gradient()).save(tmp_path / "plain.jpg")
    assert read_png_text(tmp_path / "plain.jpg") == {}


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow reads no AVIF")
def test_read_png_text_of_a_file_any_plugin_fails_on_is_empty(tmp_path) -> None:
    """A broken AVIF named like an output (``a.protected.png``, beside ``a.png``) raised Pillow's AVIF
    plugin's RuntimeError out of read_png_text, and the whole protect run stopped with an internal error
    (exit 2, no file protected): a file whose metadata cannot be read has none."""
    (tmp_path / "broken.png").write_bytes(avif_without_its_image())
    with pytest.raises(RuntimeError):
        Image.open(tmp_path / "broken.png")
    assert read_png_text(tmp_path / "broken.png") == {}
    assert read_png_text(tmp_path / "broken.png", key="preempt") == {}



def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_with_text_after_the_pixels(path: Path, width: int, height: int, texts: dict[str, str]) -> None:
    """An RGBA PNG of zeros whose text chunks (tEXt) follow its image data, as some tools write them."""
    rows = zlib.compressobj(9)
    raw = b"".join(rows.compress(b"\0" * (1 + 4 * width)) for _ in range(height)) + rows.flush()
    after = b"".join(_png_chunk(b"tEXt", k.encode("latin-1") + b"\0" + v.encode("latin-1")) for k, v in texts.items())
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))
                     + _png_chunk(b"IDAT", raw) + after + _png_chunk(b"IEND", b""))


def test_read_png_text_finds_text_after_the_pixels_without_decoding_them(tmp_path, monkeypatch) -> None:
    # It decoded the whole image to reach them: whatever its size (up to twice Pillow's limit, past any
    # --max-pixels), 0.7 GB and a second for a crafted 170-megapixel PNG of 0.6 MB, for each file asked about
    _png_with_text_after_the_pixels(tmp_path / "a.png", 2000, 1500, {"other": "x", "preempt": "{}"})
    _png_with_text_after_the_pixels(tmp_path / "none.png", 2000, 1500, {})

    from PIL import ImageFile

    def no_decoding(*args: object) -> None:
        raise AssertionError("pixels decoded to read text chunks")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert read_png_text(tmp_path / "a.png", key="preempt") == {"other": "x", "preempt": "{}"}
    assert read_png_text(tmp_path / "a.png") == {"other": "x", "preempt": "{}"}
    assert read_png_text(tmp_path / "none.png", key="preempt") == {}
    monkeypatch.undo()  # and what Pillow reads in them, pixels decoded
    with Image.open(tmp_path / "a.png") as img:
        img.load()
        assert img.text == {"other": "x", "preempt": "{}"}


def test_read_png_text_of_a_cut_png_holds_what_precedes_the_cut(tmp_path) -> None:
    # cut in a text chunk's data, in its CRC, in the next chunk's header, or without IEND: the chunks whole
    # before the cut are read (a cut in a chunk's data lost them all, Pillow's read of it raising OSError)
    _png_with_text_after_the_pixels(tmp_path / "a.png", 64, 64, {"other": "x", "preempt": "{}"})
    data = (tmp_path / "a.png").read_bytes()
    second = data.rindex(b"tEXt")  # the preempt chunk's type
    for where, end in (("in its data", second + 6), ("in its CRC", second + 4 + len(b"preempt\0{}") + 2),
                       ("in its header", second - 2), ("without IEND", len(data) - 12)):
        (tmp_path / "cut.png").write_bytes(data[:end])
        expected = {"other": "x"} if where in ("in its data", "in its header") else {"other": "x", "preempt": "{}"}
        assert read_png_text(tmp_path / "cut.png", key="preempt") == expected, where


def test_read_png_text_of_a_png_broken_after_its_text_holds_the_text_before(tmp_path) -> None:
    # cut in a chunk's type (IEND's included), or a chunk type that is no name: Pillow's read raises
    # SyntaxError ("broken PNG file"), and every text chunk was lost, those whole before it too; 0.20.0,
    # which decoded the pixels, kept them (Pillow's own walk past the pixels stops there)
    _png_with_text_after_the_pixels(tmp_path / "a.png", 64, 64, {"other": "x", "preempt": "{}"})
    data = (tmp_path / "a.png").read_bytes()
    second = data.rindex(b"tEXt")  # the preempt chunk's type
    cases = (("in its type", data[: second + 2], {"other": "x"}),
             ("in IEND's type", data[:-6], {"other": "x", "preempt": "{}"}),
             ("a broken type", data[:second] + b"t\0Xt" + data[second + 4 :], {"other": "x"}))  # fmt: skip
    for where, cut, expected in cases:
        (tmp_path / "cut.png").write_bytes(cut)
        assert read_png_text(tmp_path / "cut.png", key="preempt") == expected, where
        assert read_png_text(tmp_path / "cut.png") == expected, where


# -- atomic writes ------------------------------------------------------------------------------------------


def _picture(tmp_path: Path) -> Picture:
    Image.fromarray(_gradient()).save(tmp_path / "src.png")
    return read_image(tmp_path / "src.png")


def test_write_png_leaves_no_temp_files_and_replaces_atomically(tmp_path) -> None:
    pic = _picture(tmp_path)
    out_dir = tmp_path / "deep" / "out"
    out = out_dir / "a.png"
    write_png(out, pic)  # creates missing folders
    np.testing.assert_array_equal(read_image(out).color, pic.color)
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.png"]
    # Overwrite with other colours: the new content replaces the old, still no leftovers.
    inverted = (255 - pic.color).astype(np.uint8)
    write_png(out, pic, inverted, text={"k": "v"})
    np.testing.assert_array_equal(read_image(out).color, inverted)
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.png"]
    assert read_png_text(out) == {"k": "v"}


def test_written_files_are_readable_as_umask_allows_not_private(tmp_path) -> None:
    import stat

    pic = Picture(Path("x.png"), np.zeros((4, 5, 3), np.uint8), None, "RGB", "RGB", "PNG")
    old = os.umask(0o027)
    try:
        write_png(tmp_path / "out.png", pic)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.png").stat().st_mode) == 0o640


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
@pytest.mark.parametrize(("original", "expected"), [
    (0o600, 0o600),  # a private photo: its copy is as private
    (0o640, 0o640),  # shared with its group alone: so is its copy
    (0o644, 0o644),
    (0o444, 0o644),  # read-only: the copy's owner bits are a new file's, so a re-run can replace it
    (0o666, 0o644),  # never more than the umask allows
])  # fmt: skip
def test_a_copy_is_never_readable_by_more_users_than_its_original(tmp_path, original: int, expected: int) -> None:
    import stat

    source = tmp_path / "private.png"
    Image.new("RGB", (5, 4), (10, 20, 30)).save(source)
    os.chmod(source, original)
    old = os.umask(0o022)
    try:
        picture = read_image(source)
        write_png(tmp_path / "private.protected.png", picture)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "private.protected.png").stat().st_mode) == expected
    assert stat.S_IMODE(source.stat().st_mode) == original  # the original's own mode is left as it was


def test_write_into_a_file_parent_fails_cleanly(tmp_path) -> None:
    pic = _picture(tmp_path)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    target = blocker / "out.png"
    with pytest.raises(ImageWriteError) as info:
        write_png(target, pic)
    assert str(info.value) == f"{target}: cannot create folder {blocker}: {blocker} is a file, not a folder"
    assert isinstance(info.value, OSError)
    assert blocker.read_text() == "a file, not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "src.png"]


def test_read_and_write_errors_fill_the_fields_of_the_oserror_they_are(tmp_path, monkeypatch) -> None:
    """ImageReadError and ImageWriteError are OSErrors: code reading ``e.filename`` (or ``e.errno``, for a
    read) found None, as if no file were involved. Their message stays the same."""
    missing = tmp_path / "missing.png"
    with pytest.raises(OSError) as info:
        read_image(missing)
    assert (info.value.filename, info.value.errno) == (str(missing), errno.ENOENT)
    assert str(info.value) == f"{missing}: no such file" and info.value.strerror == "no such file"
    with pytest.raises(OSError) as info:
        read_image(str(tmp_path))  # a str path: filename is what was given
    assert (info.value.filename, info.value.errno) == (str(tmp_path), errno.EISDIR)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError) as info:
        read_image(garbage)
    assert info.value.filename == str(garbage) and info.value.errno is None  # the system said nothing

    pic = _picture(tmp_path)
    monkeypatch.setattr(imageio.sys, "platform", "darwin")  # the file system's own refusal, as on macOS
    too_long = tmp_path / ("写" * 100 + ".png")
    with pytest.raises(ImageWriteError, match="name too long") as info:
        write_png(too_long, pic)
    assert (info.value.filename, info.value.errno) == (str(too_long), errno.ENAMETOOLONG)

    class DiskFull:
        def save(self, f, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(imageio, "_to_pil", lambda picture, color: DiskFull())
    with pytest.raises(OSError) as info:
        write_png(tmp_path / "out.png", pic)
    assert (info.value.filename, info.value.errno) == (str(tmp_path / "out.png"), errno.ENOSPC)
    assert str(info.value) == f"{tmp_path / 'out.png'}: cannot write: No space left on device"


def test_failure_while_saving_keeps_the_old_file_and_no_partial_output(tmp_path, monkeypatch) -> None:
    pic = _picture(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "a.png"
    target.write_bytes(b"previous content")

    class FailingImage:
        def save(self, f, **kwargs):
            f.write(b"\x89PNG partial data")
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(imageio, "_to_pil", lambda picture, color: FailingImage())
    with pytest.raises(ImageWriteError) as info:
        write_png(target, pic)
    assert "No space left on device" in str(info.value) and str(target) in str(info.value)
    assert target.read_bytes() == b"previous content"
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.png"]
    # A new target that fails is never created at all.
    with pytest.raises(ImageWriteError):
        write_png(out_dir / "new.png", pic)
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.png"]


def test_write_does_not_touch_the_original(tmp_path) -> None:
    pic = _picture(tmp_path)
    before = (tmp_path / "src.png").read_bytes()
    mtime = os.stat(tmp_path / "src.png").st_mtime_ns
    write_png(tmp_path / "protected.png", pic, (255 - pic.color).astype(np.uint8))
    assert (tmp_path / "src.png").read_bytes() == before
    assert os.stat(tmp_path / "src.png").st_mtime_ns == mtime


def test_picture_with_color_checks_shape() -> None:
    pic = Picture(Path("x.png"), np.zeros((4, 5, 3), np.uint8), None, "RGB", "RGB", "PNG")
    assert pic.size == (5, 4) and pic.channels == 3 and pic.max_value == 255
    other = pic.with_color(np.ones((4, 5, 3), np.uint8))
    assert other.color.sum() == 60 and pic.color.sum() == 0
    with pytest.raises(ValueError):
        pic.with_color(np.ones((4, 5, 3), np.uint16))
    with pytest.raises(ValueError):
        pic.with_color(np.ones((5, 4, 3), np.uint8))


@pytest.mark.parametrize("dtypes", [("u1", "u1", "u1"), ("u2", "u2"), ("u1", "u2", "u1")], ids=["8-bit", "16-bit", "mixed"])
def test_quantize_batch_equals_quantize_per_image(dtypes: tuple[str, ...]) -> None:
    rng = np.random.default_rng(3)
    refs = [rng.integers(0, np.iinfo(d).max + 1, (5, 7, 1), dtype=d) for d in dtypes]
    x = torch.stack([torch.from_numpy(r.astype(np.float32) / np.iinfo(r.dtype).max).permute(2, 0, 1) for r in refs])
    x = (x + torch.empty_like(x).uniform_(-0.05, 0.05, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    stacked = stack_levels(refs, "cpu")
    assert (stacked is None) == (len(set(dtypes)) > 1)  # one integer width per batch
    for reference_levels in (None, stacked):
        levels, saved = quantize_batch(x, refs, 8 / 255, reference_levels=reference_levels)
        for i, r in enumerate(refs):
            expected = quantize(x[i], r, 8 / 255)
            assert levels[i].dtype == r.dtype and np.array_equal(levels[i], expected)
            assert torch.equal(saved[i], torch.from_numpy(expected.astype(np.float32)).permute(2, 0, 1) / np.iinfo(r.dtype).max)


@pytest.mark.parametrize("dtype", ["u1", "u2"])
def test_stacked_levels_give_the_pictures_tensors(dtype: str) -> None:
    rng = np.random.default_rng(5)
    pictures = [Picture(Path(f"{i}.png"), rng.integers(0, np.iinfo(dtype).max + 1, (6, 4, 3), dtype=dtype), None,
                        "RGB", "RGB", "PNG") for i in range(3)]  # fmt: skip
    stacked = stack_levels([p.color for p in pictures], "cpu")
    assert stacked.shape == (3, 3, 6, 4) and not stacked.is_floating_point()
    x = levels_to_float(stacked, pictures[0].max_value)
    assert x.is_contiguous() and torch.equal(x, torch.stack([p.to_tensor() for p in pictures]))


@pytest.mark.parametrize("dtype", ["u1", "u2"])
def test_levels_become_the_pictures_floats_as_cuda_divides_too(dtype: str) -> None:
    """The pipeline turns a batch's levels into floats on its device, and rounds the protected images back to
    levels and floats there: on a GPU, ``levels / 255`` multiplied by the reciprocal, a last bit off
    ``Picture.to_tensor``'s floats for 126 of the 256 levels (emulated here on the CPU), so that a GPU
    protected other floats than the CPU did, and called the rounded ones what the files hold."""
    max_value = np.iinfo(dtype).max
    # every 8-bit level (16-bit: every multiple of 257, the same floats)
    color = (np.arange(16 * 16 * 3).reshape(16, 16, 3) * 257 % (max_value + 1)).astype(dtype)
    picture = Picture(Path("a.png"), color, None, "RGB", "RGB", "PNG")
    levels = stack_levels([color], "cpu")
    with CudaLikeDivision():
        x = levels_to_float(levels, max_value)
        _, saved = quantize_batch_on_device(x, levels, 8 / 255, max_value)
    assert torch.equal(x[0], picture.to_tensor()) and torch.equal(saved[0], picture.to_tensor())


def test_read_images_hashes_each_picture_where_it_decodes(tmp_path: Path) -> None:
    """The noise seed is computed by read_images (an I/O worker's work) and travels with the picture
    (pickled to the main process); a picture with other colours gets its own."""
    import pickle

    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (picture,) = imageio.read_images([str(tmp_path / "a.png")])
    assert "content_seed" in vars(picture)  # cached on the picture, not computed again where it lands
    assert picture.content_seed == imageio.content_seed(picture.color)
    travelled = pickle.loads(pickle.dumps(picture))
    assert vars(travelled)["content_seed"] == picture.content_seed
    other = picture.with_color(255 - picture.color)
    assert other.content_seed == imageio.content_seed(255 - picture.color) != picture.content_seed


def test_a_new_output_that_appears_while_it_is_written_is_left_as_is(tmp_path, monkeypatch) -> None:
    """Two runs writing the same outputs with other settings: the second replaced the first's files
    silently, both reporting every file done. An output that was not there when the run chose to write
    it is not replaced: that file fails, naming the output, and what appeared keeps its bytes."""
    import errno

    pic = _picture(tmp_path)
    target = tmp_path / "out" / "a.protected.png"
    target.parent.mkdir()
    target.write_bytes(b"the other run's output")
    (reason, _, _), = imageio.write_pngs([(target, pic, pic.color, {}, False, False)])  # fmt: skip
    assert reason == f"output {target}: appeared while this run was writing it (another run?); left as is"
    assert target.read_bytes() == b"the other run's output"
    assert _temp_leftovers(target.parent) == []
    fresh = tmp_path / "out" / "b.protected.png"  # nothing there: written
    assert imageio.write_pngs([(fresh, pic, pic.color, {}, False, False)]) == [(None, 0, None)]
    assert read_image(fresh).size == pic.size and _temp_leftovers(target.parent) == []
    write_png(target, pic, replace=True)  # an output the run chose to replace (--overwrite) is replaced
    assert read_image(target).size == pic.size

    def no_links(src, dst):  # FAT, some network file systems
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(imageio.os, "link", no_links)
    write_png(tmp_path / "out" / "c.png", pic, replace=False)  # renamed instead
    assert read_image(tmp_path / "out" / "c.png").size == pic.size and _temp_leftovers(target.parent) == []


def test_output_names_up_to_255_bytes_are_written_and_longer_ones_named_in_the_error(tmp_path) -> None:
    """The temporary file's name (``.NAME.xxxxxxxx.tmp``) went past 255 bytes for outputs of 242 to 255
    bytes, which failed with an error naming the input."""
    pic = _picture(tmp_path)
    longest = tmp_path / ("é" * 120 + ".protected.png")  # 254 bytes in UTF-8
    assert len(os.fsencode(longest.name)) == 254
    assert imageio.write_pngs([(longest, pic, pic.color, {}, False, False)]) == [(None, 0, None)]
    assert read_image(longest).size == pic.size and _temp_leftovers(tmp_path) == []
    too_long = tmp_path / ("x" * 250 + ".protected.png")
    (reason, _, _), = imageio.write_pngs([(too_long, pic, pic.color, {}, False, False)])  # fmt: skip
    assert reason.startswith(f"output {too_long}: name is 264 bytes long, more than the 255")
    assert "--suffix" in reason and sorted(p.name for p in tmp_path.iterdir()) == sorted([longest.name, "src.png"])


def test_a_write_error_names_the_output(tmp_path) -> None:
    """`cannot write: Permission denied` beside the input's name did not say which file could not be written."""
    pic = _picture(tmp_path)
    (tmp_path / "blocker").write_text("a file where the output folder would go")
    target = tmp_path / "blocker" / "a.png"
    (reason, _, _), = imageio.write_pngs([(target, pic, pic.color, {}, False, True)])  # fmt: skip
    assert reason == f"output {target}: cannot create folder {target.parent}: {target.parent} is a file, not a folder"


def test_a_write_error_keeps_the_system_s_error_number(tmp_path, monkeypatch) -> None:
    """A full disk (ENOSPC while the bytes go out) is told apart from other write errors by its number, also
    from a worker process's outcome: protect stops writing to that file system (the rest is not computed)."""
    import errno

    pic = _picture(tmp_path)
    (tmp_path / "out").mkdir()

    class FullDisk:  # what Pillow meets writing to a full disk
        def save(self, f, **kwargs) -> None:
            f.write(b"\x89PNG\r\n\x1a\n")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(imageio, "_to_pil", lambda picture, color: FullDisk())
        target = tmp_path / "out" / "a.png"
        assert imageio.write_pngs([(target, pic, pic.color, {}, False, True)]) == [
            (f"output {target}: cannot write: {os.strerror(errno.ENOSPC)}", 0, errno.ENOSPC)]
        with pytest.raises(ImageWriteError) as info:
            write_png(target, pic)
        assert info.value.errno == errno.ENOSPC and not target.exists() and _temp_leftovers(target.parent) == []
    (tmp_path / "blocker").write_text("a file where the output folder would go")
    (_, _, number), = imageio.write_pngs([(tmp_path / "blocker" / "a.png", pic, pic.color, {}, False, True)])  # fmt: skip
    assert number is not None and number != errno.ENOSPC  # the folder's own error (EEXIST, ENOTDIR)
    assert imageio.write_pngs([(target, pic, pic.color, {}, False, True)]) == [(None, 0, None)]


def test_written_together_each_output_is_on_disk_before_its_name_and_the_flushes_overlap(tmp_path, monkeypatch) -> None:
    """A worker's chunk flushed its files to disk one after another, each waiting for a journal commit of
    its own. They are now flushed at once: two flushes meet (a barrier of two that one-at-a-time flushes
    never pass), and still every output is on disk before it gets its name."""
    import threading

    pic = _picture(tmp_path)
    meet = threading.Barrier(2, timeout=5)
    met: list[bool] = []
    synced: set[tuple[int, int]] = set()
    placed_unsynced: list[str] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        if not met:
            try:
                meet.wait()  # one flush at a time: the first waits alone, and the barrier breaks
                met.append(True)
                meet.abort()  # two met: the others go on
            except threading.BrokenBarrierError:
                pass
        real_fsync(fd)
        st = os.fstat(fd)
        synced.add((st.st_dev, st.st_ino))

    def link(src, dst, **kwargs) -> None:
        st = os.stat(src)
        if (st.st_dev, st.st_ino) not in synced:
            placed_unsynced.append(str(dst))
        real_link(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    targets = [tmp_path / "out" / f"{i}.png" for i in range(40)]  # more than are written together
    outcomes = imageio.write_pngs([(t, pic, pic.color, {}, True, False) for t in targets])
    assert outcomes == [(None, 0, None)] * 40
    assert met, "the flushes to disk were made one after another"
    assert placed_unsynced == [] and len(synced) == 40
    assert all(read_image(t).color.tobytes() == pic.color.tobytes() for t in targets)
    assert _temp_leftovers(tmp_path / "out") == []


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="tells the file by its /proc/self/fd link")
def test_a_file_whose_flush_fails_fails_alone_and_an_interrupt_leaves_no_temporary(tmp_path, monkeypatch) -> None:
    """Among files written together, one whose flush to disk fails (EIO) is reported with its error and
    leaves nothing; the others are written. A Ctrl-C while the group's PNGs are being made leaves neither
    temporaries nor outputs of the files not yet in place."""
    import errno

    pic = _picture(tmp_path)
    real_fsync = os.fsync
    bad = tmp_path / "out" / "3.png"

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path / "out" / ".3.png.")):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    targets = [tmp_path / "out" / f"{i}.png" for i in range(6)]
    outcomes = imageio.write_pngs([(t, pic, pic.color, {}, True, False) for t in targets])
    assert outcomes[3] == (f"output {bad}: cannot write: {os.strerror(errno.EIO)}", 0, errno.EIO)
    assert outcomes[:3] + outcomes[4:] == [(None, 0, None)] * 5
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(t.name for t in targets if t != bad)

    real_start, started = imageio._png_in_temporary, []

    def interrupted(path, *args):
        if len(started) == 4:
            raise KeyboardInterrupt
        started.append(path)
        return real_start(path, *args)

    monkeypatch.setattr(imageio, "_png_in_temporary", interrupted)
    later = [tmp_path / "later" / f"{i}.png" for i in range(8)]
    with pytest.raises(KeyboardInterrupt):
        imageio.write_pngs([(t, pic, pic.color, {}, True, False) for t in later])
    assert len(started) == 4 and list((tmp_path / "later").iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_files_are_written_together_in_a_process_forked_after_its_parent_did(tmp_path) -> None:
    """The threads that flush files at once are not copied into a forked child: it makes its own (a copy of
    the parent's pool would take the work and never do it)."""
    import multiprocessing

    pic = _picture(tmp_path)
    imageio.write_pngs([(tmp_path / "parent" / f"{i}.png", pic, pic.color, {}, True, False) for i in range(4)])
    child = multiprocessing.get_context("fork").Process(
        target=imageio.write_pngs, args=([(tmp_path / "child" / f"{i}.png", pic, pic.color, {}, True, False)
                                          for i in range(4)],))  # fmt: skip
    child.start()
    child.join(timeout=30)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child waited forever on its parent's threads")
    assert child.exitcode == 0 and len(list((tmp_path / "child").iterdir())) == 4


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts this process's descriptors in /proc")
def test_files_written_together_under_a_low_limit_of_open_files(tmp_path) -> None:
    """Files written together hold two descriptors each until they are in place: under ``ulimit -n 64``,
    a worker's chunk of 40 outputs failed its last ones as "Too many open files", where one file at a time
    wrote them all. The group now ends with the files already open, and the next starts where it stopped."""
    import subprocess
    import sys

    Image.fromarray(_gradient()).save(tmp_path / "src.png")
    script = f"""
import os, resource, sys
from pathlib import Path
from preempt_cli import imageio
picture = imageio.read_image(Path({str(tmp_path / "src.png")!r}))
# room for 12 more descriptors: 6 files open at once, not 32
open_now = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 12, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
outcomes = imageio.write_pngs([(Path({str(tmp_path / "out")!r}) / f"{{i}}.png", picture, picture.color, {{}}, True, False)
                               for i in range(40)])
print([o for o in outcomes if o[0] is not None])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert len(list((tmp_path / "out").glob("*.png"))) == 40 and _temp_leftovers(tmp_path / "out") == []


def test_files_are_written_together_while_the_interpreter_shuts_down(tmp_path) -> None:
    """``write_pngs`` in an ``atexit`` handler (or a daemon thread still at work when the program ends):
    the threads that flush files at once take no more work then, and the whole chunk raised RuntimeError
    ("cannot schedule new futures after interpreter shutdown") where one file at a time wrote them. The
    flushes the threads refuse are made in the calling thread."""
    import subprocess
    import sys

    Image.fromarray(_gradient()).save(tmp_path / "src.png")
    script = f"""
import atexit
from pathlib import Path
from preempt_cli import imageio
picture = imageio.read_image(Path({str(tmp_path / "src.png")!r}))

def write(folder):
    return imageio.write_pngs([(Path({str(tmp_path)!r}) / folder / f"{{i}}.png", picture, picture.color, {{}}, True, True)
                               for i in range(4)])

atexit.register(lambda: print(write("at_exit")))
write("before")  # the threads made before
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Error" not in done.stderr, done.stderr
    assert done.stdout.strip() == str([(None, 0, None)] * 4)
    assert len(list((tmp_path / "at_exit").glob("*.png"))) == 4 and _temp_leftovers(tmp_path / "at_exit") == []


@pytest.mark.skipif(os.name == "nt", reason="POSIX processes")
def test_an_io_worker_ends_when_its_main_process_does(tmp_path) -> None:
    """Workers of a main process killed (kill -9) waited for work forever, holding its stderr open."""
    import subprocess
    import sys
    import time

    main = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    worker = subprocess.Popen([sys.executable, "-c", f"from preempt_cli.imageio import start_io_worker\n"
                                                     f"start_io_worker({main.pid})\nimport time; time.sleep(60)"])  # fmt: skip
    try:
        time.sleep(1)
        assert worker.poll() is None  # the main process lives: so does the worker
        main.kill()
        main.wait()
        worker.wait(timeout=10)
    finally:
        for proc in (main, worker):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_hard_link_answered_as_existing_by_nfs_or_refused_by_windows_fat(tmp_path, monkeypatch) -> None:
    """Publishing a new output by a hard link: NFS may answer a retried link() that did succeed with
    EEXIST (the output is then our own file, not another run's), and Windows reports a FAT volume's
    missing hard links as EINVAL "Incorrect function" (renamed instead, not failed)."""
    import errno

    Image.fromarray(_gradient()).save(tmp_path / "in.png")
    picture = read_image(tmp_path / "in.png")
    real_link = os.link

    def link_then_eexist(src, dst):
        real_link(src, dst)
        raise FileExistsError(errno.EEXIST, "File exists")

    monkeypatch.setattr(imageio.os, "link", link_then_eexist)
    write_png(tmp_path / "nfs.png", picture, replace=False)
    assert read_image(tmp_path / "nfs.png").size == picture.size

    def fat_on_windows(src, dst):
        error = OSError(errno.EINVAL, "Incorrect function")
        error.winerror = 1
        raise error

    monkeypatch.setattr(imageio.os, "link", fat_on_windows)
    write_png(tmp_path / "fat.png", picture, replace=False)
    assert read_image(tmp_path / "fat.png").size == picture.size
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_the_name_limit_is_checked_in_bytes_only_where_names_are_bytes(tmp_path, monkeypatch) -> None:
    """APFS, HFS+ and NTFS count 255 characters, not bytes: a 100-character CJK name (314 bytes) is legal
    there, and must not be refused by a count of bytes; only the file system's own refusal tells."""
    pic = _picture(tmp_path)
    monkeypatch.setattr(imageio.sys, "platform", "darwin")
    cjk = tmp_path / ("写" * 100 + ".protected.png")
    (reason, _, _), = imageio.write_pngs([(cjk, pic, pic.color, {}, False, False)])  # fmt: skip
    # this test's file system (Linux) refuses it in turn: said in the same words, naming the output
    assert reason == f"output {cjk}: name too long for this file system (use a shorter --suffix, or rename the input)"
    assert _temp_leftovers(tmp_path) == []


def test_write_png_refuses_colour_of_another_dtype_or_shape(tmp_path: Path) -> None:
    """``write_png(path, picture, color=floats / 255)`` wrote a near-black image without a word (floats cast to
    uint8), 16-bit levels cast to uint8 wrapped, and another size was written as given."""
    from PIL import Image

    from preempt_cli.imageio import read_image, write_png

    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(tmp_path / "a.png")
    picture = read_image(tmp_path / "a.png")
    for bad in (picture.color.astype(np.float32) / 255, picture.color.astype(np.uint16), picture.color[:2]):
        with pytest.raises(ValueError, match="does not fit"):
            write_png(tmp_path / "out.png", picture, color=bad)
        assert not (tmp_path / "out.png").exists()
    write_png(tmp_path / "out.png", picture, color=255 - picture.color)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), 255 - picture.color)


def test_png_text_of_a_pipe_is_empty_without_reading_it(tmp_path: Path) -> None:
    """Whether an input is an earlier output (its metadata) was asked of a FIFO input by opening it: that
    waited for a writer and consumed the bytes its own read needed."""
    import threading

    from preempt_cli.imageio import read_png_text

    os.mkfifo(tmp_path / "pipe.png")
    answers: list[dict] = []
    asking = threading.Thread(target=lambda: answers.append(read_png_text(tmp_path / "pipe.png", key="preempt")),
                              daemon=True)  # fmt: skip
    asking.start()
    asking.join(10)
    blocked = asking.is_alive()
    if blocked:  # release the blocked open before failing
        with open(tmp_path / "pipe.png", "wb"):
            pass
    assert not blocked and answers == [{}]
    assert read_png_text("/dev/null") == {}


@pytest.mark.parametrize("color_type, channels", [(2, 3), (6, 4), (4, 2)])
def test_a_png_of_16_bits_per_colour_channel_is_refused(tmp_path: Path, color_type: int, channels: int) -> None:
    """Pillow decodes 48-bit RGB (and 64-bit RGBA, 32-bit gray with alpha) to 8 bits a channel: the output was
    an 8-bit PNG, reported within 8 levels though 2059 of 65535 from the original."""
    from preempt_cli.errors import ImageReadError
    from preempt_cli.imageio import read_image

    rows = b"".join(b"\x00" + bytes(range(2 * channels * 2)) for _ in range(2))  # 2x2, filter 0 per row
    (tmp_path / "deep.png").write_bytes(_png_bytes(2, 2, depth=16, color_type=color_type, idat=rows))
    with pytest.raises(ImageReadError, match="16 bits per colour channel"):
        read_image(tmp_path / "deep.png")
    rows8 = b"".join(b"\x00" + bytes(range(2 * channels)) for _ in range(2))
    (tmp_path / "flat.png").write_bytes(_png_bytes(2, 2, depth=8, color_type=color_type, idat=rows8))
    assert read_image(tmp_path / "flat.png").color.dtype == np.uint8  # 8 bits a channel: read as before


@pytest.mark.parametrize("name, extra", [("anim.png", {}), ("anim.webp", {"lossless": True}), ("pages.tif", {}),
                                         ("anim.gif", {})])  # fmt: skip
def test_the_first_frame_is_read_and_the_others_are_named(tmp_path: Path, name: str, extra: dict) -> None:
    """An animated PNG or WebP, or a multi-page TIFF (a scanned document), became its first frame without a
    word (even at -v): the picture says how many frames the file has."""
    frames = [np.full((6, 8, 3), 40 * i, np.uint8) for i in range(1, 4)]
    first, *rest = [Image.fromarray(f) for f in frames]
    first.save(tmp_path / name, save_all=True, append_images=rest, **extra)
    picture = read_image(tmp_path / name)
    assert np.array_equal(picture.color, frames[0])
    assert picture.notes == ("has 3 frames (an animation or a multi-page file): only the first is protected",)
    first.save(tmp_path / f"one{Path(name).suffix}")
    assert read_image(tmp_path / f"one{Path(name).suffix}").notes == ()

def test_a_pngs_gamma_chromaticities_srgb_and_every_resolution_are_kept(tmp_path: Path) -> None:
    """gAMA, cHRM and sRGB say how a PNG's values are shown, as an ICC profile does (which was kept): a
    gamma of 1.0 dropped moved a level of 64 to about 136 in browsers that apply it. The print resolution
    (pHYs, JFIF density) was dropped too, changing a 300-dpi scan's printed size. Both are kept; a turned
    image's resolution turns with it."""
    import struct

    from PIL import PngImagePlugin

    arr = np.random.default_rng(0).integers(0, 256, (20, 24, 3)).astype(np.uint8)
    info = PngImagePlugin.PngInfo()
    info.add(b"gAMA", struct.pack(">I", 100000))
    info.add(b"cHRM", struct.pack(">8I", 31270, 32900, 64000, 33000, 30000, 60000, 15000, 6000))
    Image.fromarray(arr).save(tmp_path / "g.png", pnginfo=info, dpi=(300, 150))
    Image.fromarray(arr).save(tmp_path / "s.png", pnginfo=_with_chunk(b"sRGB", b"\x01"))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "r.jpg", dpi=(300, 100), exif=exif.tobytes(), quality=95)
    for name, expected in (("g.png", {"gamma": 1.0, "chromaticity": (0.3127, 0.329, 0.64, 0.33, 0.3, 0.6, 0.15, 0.06)}),
                           ("s.png", {"srgb": 1}), ("r.jpg", {})):  # fmt: skip
        write_png(tmp_path / f"{name}.out.png", read_image(tmp_path / name))
        with Image.open(tmp_path / name) as src, Image.open(tmp_path / f"{name}.out.png") as out:
            assert {k: out.info.get(k) for k in ("gamma", "chromaticity", "srgb") if k in out.info} == expected
            x, y = src.info.get("dpi", (None, None))
            if name == "r.jpg":  # turned upright by 90 degrees: x and y swap
                x, y = y, x
            if x is None:
                assert "dpi" not in out.info
            else:
                assert out.info["dpi"] == pytest.approx((x, y), abs=0.01)
    cmyk = tmp_path / "c.jpg"  # another colour space, the same resolution
    Image.fromarray(arr).convert("CMYK").save(cmyk, dpi=(72, 72))
    assert read_image(cmyk).dpi == (72, 72)


def test_a_resolution_is_kept_as_the_file_states_it(tmp_path: Path) -> None:
    """A TIFF's resolution (a rational) was dropped; a JPEG whose EXIF states none got Pillow's 72 dpi,
    and one without a unit was read as inches."""
    arr = np.zeros((4, 6, 3), np.uint8)
    Image.fromarray(arr).save(tmp_path / "scan.tif", dpi=(300, 300))
    assert read_image(tmp_path / "scan.tif").dpi == (300.0, 300.0)
    for name, tags in (("none.jpg", {}), ("no-unit.jpg", {0x0128: 1, 0x011A: 300, 0x011B: 300}),
                       ("inch.jpg", {0x0128: 2, 0x011A: 300, 0x011B: 150}),
                       ("cm.jpg", {0x0128: 3, 0x011A: 100, 0x011B: 100})):  # fmt: skip
        exif = Image.Exif()
        exif[0x0112] = 1
        for tag, value in tags.items():
            exif[tag] = value
        Image.fromarray(arr).save(tmp_path / name, exif=exif.tobytes())  # no JFIF density unit
    assert read_image(tmp_path / "none.jpg").dpi is None
    assert read_image(tmp_path / "no-unit.jpg").dpi is None
    assert read_image(tmp_path / "inch.jpg").dpi == (300.0, 150.0)
    assert read_image(tmp_path / "cm.jpg").dpi == pytest.approx((254.0, 254.0))


def _psd_bytes(planes: np.ndarray, colour_mode: int, layers: tuple[np.ndarray, ...] = ()) -> bytes:
    """A Photoshop file of 8-bit ``planes`` (C x H x W: its composite image, uncompressed) in ``colour_mode``
    (1 gray, 3 RGB, 4 CMYK), with ``layers`` (H x W x 3 RGB each, the picture's size) before it."""
    channels, height, width = planes.shape
    layer_info = struct.pack(">I", 0)  # no layers
    if layers:
        records, data = b"", b""
        for i, layer in enumerate(layers):
            records += struct.pack(">4iH", 0, 0, height, width, 3)
            records += b"".join(struct.pack(">hI", c, height * width + 2) for c in range(3))
            name = bytes([2]) + b"L%d" % i + b"\0"  # a Pascal string padded to 4 bytes
            extra = struct.pack(">II", 0, 0) + name  # no mask, no blending ranges
            records += b"8BIMnorm" + bytes([255, 0, 0, 0]) + struct.pack(">I", len(extra)) + extra
            data += b"".join(struct.pack(">H", 0) + layer[:, :, c].tobytes() for c in range(3))
        info = struct.pack(">h", len(layers)) + records + data
        info += bytes(len(info) % 2)
        section = struct.pack(">I", len(info)) + info + struct.pack(">I", 0)  # no global mask
        layer_info = struct.pack(">I", len(section)) + section
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, channels, height, width, 8, colour_mode)
    no_palette_no_resources = struct.pack(">II", 0, 0)
    return header + no_palette_no_resources + layer_info + struct.pack(">H", 0) + planes.astype(np.uint8).tobytes()


def test_a_photoshop_file_is_read_as_its_composite_image(tmp_path: Path) -> None:
    """Pillow opens a PSD at its composite image (the picture as Photoshop shows it), which it numbers 1,
    before its layers (1..n): the seek to frame 0 of every read failed every PSD as "corrupt or truncated
    image data (attempt to seek outside sequence)". Its layers are not frames left out: no warning."""
    rng = np.random.default_rng(4)
    composite = rng.integers(0, 256, (20, 36, 3), dtype=np.uint8)
    layers = tuple(rng.integers(0, 256, (20, 36, 3), dtype=np.uint8) for _ in range(3))
    (tmp_path / "flat.psd").write_bytes(_psd_bytes(composite.transpose(2, 0, 1), 3))
    (tmp_path / "layers.psd").write_bytes(_psd_bytes(composite.transpose(2, 0, 1), 3, layers))
    (tmp_path / "gray.psd").write_bytes(_psd_bytes(composite[None, :, :, 0], 1))
    (tmp_path / "cmyk.psd").write_bytes(_psd_bytes(rng.integers(0, 256, (4, 20, 36), dtype=np.uint8), 4))
    with Image.open(tmp_path / "layers.psd") as img:
        assert img.n_frames == 3 and np.array_equal(np.asarray(img), composite)  # the file is as meant
    for name in ("flat.psd", "layers.psd"):
        picture = read_image(tmp_path / name)
        assert picture.source_format == "PSD" and picture.mode == "RGB" and picture.notes == ()
        assert np.array_equal(picture.color, composite), name
        write_png(tmp_path / f"{name}.png", picture)
        assert np.array_equal(read_image(tmp_path / f"{name}.png").color, composite)
    assert np.array_equal(read_image(tmp_path / "gray.psd").color[:, :, 0], composite[:, :, 0])
    assert read_image(tmp_path / "cmyk.psd").mode == "RGB"


def test_a_photoshop_file_whose_layers_are_broken_is_read_as_its_whole_composite(tmp_path: Path) -> None:
    """A PSD's layers are not read: a layer whose box reaches past the file's end made counting them (as
    frames) raise struct.error, and a file whose composite image is whole failed with "cannot decode"."""
    rng = np.random.default_rng(5)
    composite = rng.integers(0, 256, (20, 36, 3), dtype=np.uint8)
    layers = tuple(rng.integers(0, 256, (20, 36, 3), dtype=np.uint8) for _ in range(2))
    data = bytearray(_psd_bytes(composite.transpose(2, 0, 1), 3, layers))
    first_layer = 26 + 4 + 4 + 4 + 4 + 2  # header, no palette, no resources, section and layer info lengths, count
    struct.pack_into(">i", data, first_layer + 8, 100_000)  # its bottom: far past the file's end
    (tmp_path / "broken-layer.psd").write_bytes(data)
    try:
        img = Image.open(tmp_path / "broken-layer.psd")
    except UnidentifiedImageError:  # an older Pillow (10.1, the floor) reads the layers as it opens the file
        _assert_read_error(tmp_path / "broken-layer.psd", "not an image pillow can read")  # refused, not a crash
        pytest.skip("this Pillow reads a PSD's layers as it opens the file: a broken layer fails the file")
    with img:
        assert np.array_equal(np.asarray(img), composite)
        with pytest.raises(struct.error):
            img.n_frames
    picture = read_image(tmp_path / "broken-layer.psd")
    assert np.array_equal(picture.color, composite) and picture.notes == ()


def test_a_photoshop_file_of_16_or_32_bits_a_channel_says_so(tmp_path: Path) -> None:
    """Pillow reads PSDs of 8 bits a channel (and 1-bit ones) only: one of 16 or 32 bits, a usual working
    file, was refused as "not an image Pillow can read (unknown or corrupt format)", as if broken."""
    planes = np.zeros((3, 4, 6), np.uint8)
    for bits in (16, 32):
        data = bytearray(_psd_bytes(planes, 3))
        struct.pack_into(">H", data, 22, bits)  # the header's depth
        (tmp_path / f"deep{bits}.psd").write_bytes(data)
        _assert_read_error(tmp_path / f"deep{bits}.psd", f"{bits} bits", "8-bit copy")
    (tmp_path / "noise.psd").write_bytes(b"8BPS" + bytes(range(40)))  # not one: as before
    _assert_read_error(tmp_path / "noise.psd", "not an image pillow can read")


def test_a_16_bit_bmp_and_a_cameras_mpo_jpeg_read_as_before(tmp_path: Path) -> None:
    """A 5-6-5 BMP is 16 bits a pixel, not a channel: read, not refused as deep colour. A camera's MPO
    JPEG holds a preview as its second frame: no warning of frames left out."""
    import struct

    pixels = np.array([[0xF800, 0x07E0], [0x001F, 0xFFFF]], "<u2")  # red, green, blue, white
    header = struct.pack("<IiiHHIIiiII", 40, 2, -2, 1, 16, 3, pixels.nbytes, 2835, 2835, 0, 0)
    masks = struct.pack("<III", 0xF800, 0x07E0, 0x001F)
    body = header + masks + pixels.tobytes()
    (tmp_path / "565.bmp").write_bytes(b"BM" + struct.pack("<IHHI", 14 + len(body), 0, 0, 14 + 40 + 12) + body)
    color = read_image(tmp_path / "565.bmp").color
    assert color.dtype == np.uint8 and color[0, 0].tolist() == [255, 0, 0] and color[1, 1].tolist() == [255] * 3
    photo = Image.fromarray(np.full((8, 8, 3), 90, np.uint8))
    photo.save(tmp_path / "camera.jpg", format="MPO", save_all=True, append_images=[photo.resize((4, 4))])
    picture = read_image(tmp_path / "camera.jpg")
    assert picture.source_format == "MPO" and picture.notes == () and picture.size == (8, 8)


def test_a_broken_colour_chunk_fails_in_words(tmp_path: Path) -> None:
    """A PNG with a short gAMA chunk made Pillow's open raise a bare ValueError ("cannot decode:
    ValueError ..."): it is a corrupt file, and says so."""
    rows = b"\x00" + bytes(6)  # 2x1 RGB, filter 0
    data = _png_bytes(2, 1, depth=8, color_type=2, idat=rows)
    at = data.index(b"IDAT") - 4
    gama = struct.pack(">I", 2) + b"gAMA" + b"\x00\x01" + struct.pack(">I", zlib.crc32(b"gAMA\x00\x01"))
    (tmp_path / "short.png").write_bytes(data[:at] + gama + data[at:])
    # (Pillow before 12 refuses the file at open: "not an image Pillow can read (unknown or corrupt format)")
    _assert_read_error(tmp_path / "short.png", "corrupt")

def test_a_plain_ppm_of_more_than_8_bits_is_refused(tmp_path: Path) -> None:
    """P3 (plain text) decodes through another Pillow decoder than P6: it was cut to 8 bits unseen."""
    from preempt_cli.errors import ImageReadError

    (tmp_path / "deep.ppm").write_bytes(b"P3\n2 1\n65535\n0 1000 65535 300 2 3\n")
    with pytest.raises(ImageReadError, match="a PPM of up to 65535 levels per channel"):
        read_image(tmp_path / "deep.ppm")
    (tmp_path / "flat.ppm").write_bytes(b"P3\n2 1\n255\n0 100 255 30 2 3\n")
    assert read_image(tmp_path / "flat.ppm").color[0, 0].tolist() == [0, 100, 255]


def _png_chunk_types(path: Path) -> list[bytes]:
    """The chunk types of a PNG, in order."""
    import struct

    data, pos, kinds = path.read_bytes(), 8, []
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        kinds.append(kind)
        pos += 12 + length
    return kinds


def _pillow_writes_cicp() -> bool:
    """Whether this Pillow writes a cICP chunk given to it (13 does; 10.1, the floor, drops it)."""
    import io

    from PIL import PngImagePlugin

    info, written = PngImagePlugin.PngInfo(), io.BytesIO()
    info.add(b"cICP", bytes([1, 13, 0, 1]))
    Image.new("RGB", (1, 1)).save(written, format="PNG", pnginfo=info)
    return b"cICP" in written.getvalue()


@pytest.mark.skipif(not _pillow_writes_cicp(), reason="this Pillow writes no cICP chunk (nor can the test's input hold one)")
def test_a_pngs_cicp_colour_code_points_are_kept_before_its_pixels(tmp_path: Path) -> None:
    """cICP (PNG, third edition) says a PNG's values are Display P3, BT.2100 PQ or HLG, before any ICC
    profile; Pillow skips it, so outputs of a Display P3 PNG were shown as sRGB, in duller colours. It is
    kept (before the image data, as the standard wants); one after the image data, where no viewer reads
    it, is not."""
    import struct
    import zlib

    arr = np.random.default_rng(0).integers(0, 256, (20, 24, 3)).astype(np.uint8)
    p3 = bytes([12, 13, 0, 1])  # Display P3 primaries, the sRGB transfer function, RGB, full range
    Image.fromarray(arr).save(tmp_path / "p3.png", pnginfo=_with_chunk(b"cICP", p3))
    write_png(tmp_path / "out.png", read_image(tmp_path / "p3.png"))
    kinds = _png_chunk_types(tmp_path / "out.png")
    assert kinds.count(b"cICP") == 1 and kinds.index(b"cICP") < kinds.index(b"IDAT")
    data = (tmp_path / "out.png").read_bytes()
    at = data.index(b"cICP")
    assert data[at + 4 : at + 8] == p3
    assert read_image(tmp_path / "out.png").color.tobytes() == arr.tobytes()

    # after the image data, where the standard does not allow it (viewers ignore it there): not taken
    plain = tmp_path / "plain.png"
    Image.fromarray(arr).save(plain)
    data = plain.read_bytes()
    end = data.index(b"IEND") - 4
    late = data[:end] + struct.pack(">I", 4) + b"cICP" + p3 + struct.pack(">I", zlib.crc32(b"cICP" + p3)) + data[end:]
    (tmp_path / "late.png").write_bytes(late)
    write_png(tmp_path / "late-out.png", read_image(tmp_path / "late.png"))
    assert b"cICP" not in _png_chunk_types(tmp_path / "late-out.png")


def _with_chunk(cid: bytes, data: bytes):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add(cid, data)
    return info

def _tiff_16(path: Path, samples: np.ndarray) -> None:
    """An uncompressed little-endian TIFF of 16 bits per sample (H x W x 3 or 4), written by hand: Pillow
    cannot save one."""
    import struct

    h, w, c = samples.shape
    depths = struct.pack("<" + "H" * c, *[16] * c)
    pixels = samples.astype("<u2").tobytes()
    tags = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, c, 8), (259, 3, 1, 1), (262, 3, 1, 2),
            (273, 4, 1, 8 + len(depths)), (277, 3, 1, c), (278, 3, 1, h), (279, 4, 1, len(pixels)),
            (284, 3, 1, 1)] + ([(338, 3, 1, 2)] if c == 4 else [])  # fmt: skip
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHI", tag, kind, count) + (struct.pack("<HH", value, 0) if kind == 3 and count == 1
                                                 else struct.pack("<I", value))  # fmt: skip
        for tag, kind, count, value in tags) + struct.pack("<I", 0)
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8 + len(depths) + len(pixels)) + depths + pixels + ifd)


@pytest.mark.parametrize("channels", [3, 4])
def test_a_tiff_of_16_bits_per_colour_channel_is_refused(tmp_path: Path, channels: int) -> None:
    """As a 48-bit PNG: Pillow decodes a 16-bit RGB(A) TIFF to 8 bits a channel. It was protected as an
    8-bit output, exit 0 (and a 64-bit RGBA one's alpha lost its low bits), with nothing said."""
    from PIL import Image

    from preempt_cli.errors import ImageReadError
    from preempt_cli.imageio import read_image

    samples = np.random.default_rng(0).integers(0, 65536, (5, 6, channels)).astype(np.uint16)
    _tiff_16(tmp_path / "deep.tif", samples)
    with Image.open(tmp_path / "deep.tif") as img:  # the file is what it claims: Pillow reads it, to 8 bits
        assert np.array_equal(np.asarray(img), (samples >> 8).astype(np.uint8))
    with pytest.raises(ImageReadError, match="a TIFF of 16 bits per colour channel"):
        read_image(tmp_path / "deep.tif")


def test_a_ppm_of_more_than_8_bits_is_refused_and_16_bit_gray_kept(tmp_path: Path) -> None:
    """A PPM whose maximum is over 255 was scaled to 8 bits unseen; a 16-bit PGM is 16-bit gray, kept."""
    from preempt_cli.errors import ImageReadError
    from preempt_cli.imageio import read_image

    levels = np.random.default_rng(0).integers(0, 1001, (4, 5, 3)).astype(">u2")
    (tmp_path / "deep.ppm").write_bytes(b"P6\n5 4\n1000\n" + levels.tobytes())
    with pytest.raises(ImageReadError, match="a PPM of up to 1000 levels per channel"):
        read_image(tmp_path / "deep.ppm")
    (tmp_path / "flat.ppm").write_bytes(b"P6\n5 4\n255\n" + (levels // 4).astype(np.uint8).tobytes())
    assert read_image(tmp_path / "flat.ppm").color.dtype == np.uint8
    (tmp_path / "gray.pgm").write_bytes(b"P5\n5 4\n65535\n" + (levels[:, :, 0].astype(np.uint32) * 65)
                                        .astype(">u2").tobytes())  # fmt: skip
    gray = read_image(tmp_path / "gray.pgm")
    assert gray.color.dtype == np.uint16 and np.array_equal(gray.color[:, :, 0], levels[:, :, 0] * 65)


def test_a_tiff_is_turned_by_its_own_orientation_tag_alone_and_its_resolution_with_it(tmp_path) -> None:
    """Pillow's TIFF plugin turns a TIFF as it loads it, taking the orientation from XMP too, and deletes
    the tag: an XMP-only TIFF was written rotated, and a tagged one kept its resolution's axes unswapped."""
    from PIL import ImageOps, TiffImagePlugin

    arr = np.random.default_rng(2).integers(0, 256, (48, 40, 3)).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "o6.tif", exif=exif.tobytes(), dpi=(72, 144))
    turned = read_image(tmp_path / "o6.tif")
    with Image.open(tmp_path / "o6.tif") as img:
        assert np.array_equal(turned.color, np.asarray(ImageOps.exif_transpose(img)))
    assert turned.size == (48, 40) and turned.dpi == pytest.approx((144, 72))
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[700] = xmp
    tags.tagtype[700] = 1
    Image.fromarray(arr).save(tmp_path / "xmp6.tif", tiffinfo=tags)
    as_stored = read_image(tmp_path / "xmp6.tif")
    assert as_stored.size == (40, 48) and np.array_equal(as_stored.color, arr)
    assert as_stored.dpi is None  # no resolution tags: not Pillow's default of 1 dpi (a 40-inch print)


@pytest.mark.parametrize("bits", [2, 4])
def test_a_low_depth_gray_pngs_transparent_level_becomes_alpha(tmp_path, bits: int) -> None:
    """Pillow scales a 2- or 4-bit PNG's pixels to 0..255 but reports its tRNS grey as stored: compared as
    they were, no pixel was transparent in the output."""
    levels = np.random.default_rng(3).integers(0, 2**bits, (16, 16)).astype(np.uint8)
    top = 2**bits - 1
    rows = b"".join(b"\0" + np.packbits(np.unpackbits(r[:, None], axis=1)[:, 8 - bits :].ravel()).tobytes()
                    for r in levels)  # fmt: skip

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path = tmp_path / f"g{bits}.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, bits, 0, 0, 0, 0))
                     + chunk(b"tRNS", struct.pack(">H", top)) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))  # fmt: skip
    picture = read_image(path)
    assert picture.mode == "LA"
    assert np.array_equal(picture.alpha == 0, levels == top) and (levels == top).any()
    assert np.array_equal(picture.color[:, :, 0], (levels.astype(np.int64) * 255 // top).astype(np.uint8))


def test_an_sgi_of_16_bits_a_channel_is_refused(tmp_path) -> None:
    """Pillow decodes an SGI of 2 bytes a sample to 8 bits, as it does 48-bit PNGs and TIFFs."""
    arr = np.random.default_rng(4).integers(0, 65536, (8, 8, 3)).astype(np.uint16)
    Image.fromarray((arr >> 8).astype(np.uint8)).save(tmp_path / "rgb24.sgi", format="SGI")
    assert read_image(tmp_path / "rgb24.sgi").mode == "RGB"  # 8 bits: read as it is
    header = struct.pack(">hBBHHHHiI", 474, 0, 2, 3, 8, 8, 3, 0, 65535).ljust(512, b"\0")
    (tmp_path / "rgb48.sgi").write_bytes(header + b"".join(arr[::-1, :, c].astype(">u2").tobytes() for c in range(3)))
    with pytest.raises(ImageReadError, match="a SGI of 16 bits per channel, which Pillow decodes to 8 bits"):
        read_image(tmp_path / "rgb48.sgi")


def test_a_png_with_bytes_after_its_end_is_whole(tmp_path) -> None:
    """Some tools append bytes after IEND: such an output is whole, not cut short (a re-run replaced it)."""
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    whole = path.read_bytes()
    assert imageio.png_is_whole(path)
    path.write_bytes(whole + b"trailer")
    assert imageio.png_is_whole(path)
    path.write_bytes(whole[:-20])
    assert not imageio.png_is_whole(path)


# -- temporary files that killed writers left ---------------------------------------------------------------

_POSIX_LOCKS = pytest.mark.skipif(os.name == "nt", reason="flock: POSIX only (no cleaning on Windows)")


def _left_temp(folder: Path, name: str, age: float = 60.0) -> Path:
    """A temporary file as a writer killed mid-write leaves it: unlocked, last written ``age`` seconds ago."""
    temp = folder / name
    temp.write_bytes(b"\x89PNG cut short")
    os.utime(temp, (time.time() - age, time.time() - age))
    return temp


def _writer(target: Path) -> str:
    """A script that writes ``target`` through atomic_write, printing "writing" once its temporary file exists,
    then finishing when a line comes on stdin (or never, until killed)."""
    return ("import sys\nfrom pathlib import Path\nfrom preempt_cli import imageio\n"
            f"with imageio.atomic_write(Path({str(target)!r}), fsync=False) as f:\n"
            f"    f.write(b'theirs')\n    print('writing', flush=True)\n    sys.stdin.readline()\n")  # fmt: skip


@_POSIX_LOCKS
def test_a_write_removes_the_temporaries_that_killed_writers_left_for_its_output(tmp_path, caplog) -> None:
    """A run killed mid-write (kill -9, out of memory, a power loss) left its ``.NAME.XXXXXXXX.tmp`` files in
    the user's folders for good; the next write of the same output removes them, said in a log record.
    Those of other outputs wait for their own, and one written less than two seconds ago (a writer of an
    earlier release, which locks nothing, may be writing it still) is left."""
    import logging

    pic = _picture(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    stale = [_left_temp(out, ".a.png.k3_x9zqw.tmp"), _left_temp(out, ".a.png.00000000.tmp", age=3)]
    young = _left_temp(out, ".a.png.y0ung123.tmp", age=0)
    other = _left_temp(out, ".b.png.k3_x9zqw.tmp")
    with caplog.at_level(logging.INFO, logger="preempt_cli.imageio"):
        write_png(out / "a.png", pic)
    assert not any(p.exists() for p in stale)
    assert young.exists() and other.exists()
    assert read_image(out / "a.png").size == pic.size
    assert [r.getMessage() for r in caplog.records] == [
        f"removed 2 temporary files left by an interrupted write of {out / 'a.png'}"]
    write_png(out / "b.png", pic, replace=False)
    assert not other.exists() and _temp_leftovers(out) == [young.name]


@_POSIX_LOCKS
def test_a_temporary_a_live_writer_holds_is_kept_and_removed_once_it_is_killed(tmp_path, monkeypatch) -> None:
    """Another process writing the same output (a second run, another shard, --overwrite) holds a lock on
    its temporary file: it is never removed, however old, and that writer finishes its write; once such a
    writer is killed (kill -9), its lock goes with it and the next write removes what it left."""
    import subprocess
    import sys

    monkeypatch.setattr(imageio, "_STALE_AFTER_S", 0.0)  # its age does not protect it: its lock does
    monkeypatch.setattr(imageio, "_LISTING_SERVES_S", 0.0)  # each write lists the folder again
    pic = _picture(tmp_path)
    target = tmp_path / "a.png"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(imageio.__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    for ending in ("finishes", "killed"):
        live = subprocess.Popen([sys.executable, "-c", _writer(target)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
        try:
            assert live.stdout.readline() == "writing\n"
            (theirs,) = [p for p in tmp_path.iterdir() if p.name.startswith(".a.png.")]
            os.utime(theirs, (time.time() - 3600, time.time() - 3600))  # old: only its lock keeps it
            write_png(target, pic)
            assert theirs.exists() and read_image(target).size == pic.size
            if ending == "finishes":
                live.communicate("go\n", timeout=30)
                assert live.returncode == 0 and target.read_bytes() == b"theirs" and not theirs.exists()
            else:
                live.kill()
                live.wait(timeout=30)
                write_png(target, pic)
                assert not theirs.exists() and read_image(target).size == pic.size
        finally:
            if live.poll() is None:
                live.kill()
                live.wait()
    assert _temp_leftovers(tmp_path) == []


@_POSIX_LOCKS
def test_files_that_only_look_like_temporaries_are_kept(tmp_path) -> None:
    """Only regular files named exactly as atomic_write's mkstemp names them (``.NAME.`` + 8 of its random
    characters + ``.tmp``) are removed: not the user's own ``.NAME.notours.tmp``, nor another output's, nor
    a symbolic link (nor what it points at), a folder or a pipe of such a name."""
    pic = _picture(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = _left_temp(tmp_path, "precious.png")
    kept = [_left_temp(out, name) for name in (".a.png.notours.tmp", ".a.png.ABCDEFGH.tmp", ".a.png.abcdefghi.tmp",
                                                ".a.png.abcd-fgh.tmp", "a.png.abcdefgh.tmp", ".a.png.abcdefgh.tmp.bak",
                                                ".a.png.abcdefgh.TMP", "..a.png.abcdefgh.tmp", ".xa.png.abcdefgh.tmp",
                                                ".a.pn.abcdefgh.tmp")]  # fmt: skip
    (out / ".a.png.symlink1.tmp").symlink_to(elsewhere)
    (out / ".a.png.folder00.tmp").mkdir()
    os.mkfifo(out / ".a.png.fifo0000.tmp")
    kept += [out / ".a.png.symlink1.tmp", out / ".a.png.folder00.tmp", out / ".a.png.fifo0000.tmp"]
    stale = _left_temp(out, ".a.png.abcdefgh.tmp")
    write_png(out / "a.png", pic)
    assert not stale.exists()
    assert all(os.path.lexists(p) for p in kept) and elsewhere.read_bytes() == b"\x89PNG cut short"


@_POSIX_LOCKS
def test_a_temporary_taken_before_it_was_locked_is_replaced_by_another(tmp_path, monkeypatch) -> None:
    """mkstemp then flock is not atomic: another writer's cleaning may remove a temporary file between its
    creation and its lock. The write then goes to a new one, not to a file without a name (whose rename
    failed with "cannot write: No such file or directory")."""
    real_mkstemp = imageio.tempfile.mkstemp
    taken: list[str] = []

    def mkstemp_then_taken(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        if not taken:
            os.unlink(name)  # as a cleaner that found it unlocked would
            taken.append(name)
        return fd, name

    monkeypatch.setattr(imageio.tempfile, "mkstemp", mkstemp_then_taken)
    pic = _picture(tmp_path)
    write_png(tmp_path / "a.png", pic)
    assert taken and read_image(tmp_path / "a.png").size == pic.size
    assert _temp_leftovers(tmp_path) == []


@_POSIX_LOCKS
def test_cleaning_never_fails_a_write_and_is_off_without_flock(tmp_path, monkeypatch, caplog) -> None:
    """A leftover that cannot be looked at or removed, or a folder that cannot be listed, is left as it is
    (said at debug level) and the write goes on; where there is no fcntl (Windows) nothing is removed."""
    import logging

    pic = _picture(tmp_path)
    first, second = _left_temp(tmp_path, ".a.png.aaaaaaaa.tmp"), _left_temp(tmp_path, ".a.png.bbbbbbbb.tmp")
    real_remove = imageio._remove_if_stale

    def fails_on_the_first(temp: str) -> bool:
        if temp == str(first):
            raise PermissionError(13, "Permission denied")
        return real_remove(temp)

    monkeypatch.setattr(imageio, "_remove_if_stale", fails_on_the_first)
    with caplog.at_level(logging.DEBUG, logger="preempt_cli.imageio"):
        write_png(tmp_path / "a.png", pic)
    assert first.exists() and not second.exists() and read_image(tmp_path / "a.png").size == pic.size
    assert f"temporary file {first} left: [Errno 13] Permission denied" in caplog.messages

    def unlistable(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(imageio.os, "scandir", unlistable)
    write_png(tmp_path / "new" / "b.png", pic)
    assert read_image(tmp_path / "new" / "b.png").size == pic.size
    monkeypatch.undo()

    monkeypatch.setattr(imageio, "fcntl", None)
    windows = _left_temp(tmp_path / "new", ".c.png.cccccccc.tmp")
    write_png(tmp_path / "new" / "c.png", pic)
    assert windows.exists() and read_image(tmp_path / "new" / "c.png").size == pic.size


@_POSIX_LOCKS
def test_a_folder_is_listed_once_for_its_writes_not_once_a_file(tmp_path, monkeypatch) -> None:
    """Listing the folder for each output took time quadratic in its size (3.6 ms a file in a folder of
    10,000 files, 19 ms at 50,000): it is listed once, and again only after _LISTING_SERVES_S (a run killed
    meanwhile has its leftovers removed by the writes after that)."""
    listed: list[str] = []
    real_scandir = os.scandir

    def counted(path):
        listed.append(path)
        return real_scandir(path)

    monkeypatch.setattr(imageio.os, "scandir", counted)
    pic = _picture(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    stale = _left_temp(out, ".7.png.abcdefgh.tmp")
    for i in range(20):
        write_png(out / f"{i}.png", pic, fsync=False)
    assert listed == [str(out)] and not stale.exists()
    later = _left_temp(out, ".3.png.abcdefgh.tmp")  # left after the folder was listed
    write_png(out / "3.png", pic, fsync=False)
    assert later.exists() and len(listed) == 1
    monkeypatch.setattr(imageio, "_LISTING_SERVES_S", 0.0)
    write_png(out / "3.png", pic, fsync=False)
    assert not later.exists() and len(listed) == 2


@_POSIX_LOCKS
def test_two_processes_writing_the_same_output_never_take_each_others_temporaries(tmp_path) -> None:
    """Two runs with --overwrite on one folder: each write cleans (here with no wait and a new listing each
    time), and neither removes a temporary file the other is writing (which failed its write)."""
    import subprocess
    import sys

    target = tmp_path / "a.png"
    stale = _left_temp(tmp_path, ".a.png.abcdefgh.tmp")
    script = ("import sys\nfrom pathlib import Path\nfrom preempt_cli import imageio\n"
              "imageio._STALE_AFTER_S = 0.0\nimageio._LISTING_SERVES_S = 0.0\n"
              f"for i in range(300):\n    with imageio.atomic_write(Path({str(target)!r}), fsync=False) as f:\n"
              "        f.write(sys.argv[1].encode() * 20000)\n")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(imageio.__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    writers = [subprocess.Popen([sys.executable, "-c", script, tag], stderr=subprocess.PIPE, text=True, env=env)
               for tag in "xy"]  # fmt: skip
    errors = [w.communicate(timeout=120)[1] for w in writers]
    assert [w.returncode for w in writers] == [0, 0], errors
    assert target.read_bytes() in (b"x" * 20000, b"y" * 20000)
    assert not stale.exists() and _temp_leftovers(tmp_path) == []


def test_a_folder_probe_is_never_left_in_the_folder(tmp_path, monkeypatch) -> None:
    """folder_write_problem's probe file was removed only after its close: a close that failed (NFS reports
    deferred errors there) or a Ctrl-C between the two (protect probes every output folder before its
    compute) left a ``.preempt-write-test.XXXXXXXX`` in the user's folder for good."""
    import errno

    real_close = os.close
    for error in (OSError(errno.EIO, os.strerror(errno.EIO)), KeyboardInterrupt()):

        def close(fd: int, error: BaseException = error) -> None:
            real_close(fd)
            raise error

        with monkeypatch.context() as m:
            m.setattr(imageio.os, "close", close)
            if isinstance(error, OSError):
                problem = imageio.folder_write_problem(tmp_path / "a.png")
            else:
                with pytest.raises(KeyboardInterrupt):
                    imageio.folder_write_problem(tmp_path / "a.png")
        if isinstance(error, OSError):
            assert problem == f"no file can be created in {tmp_path} (Input/output error)"
        assert list(tmp_path.iterdir()) == []
    assert imageio.folder_write_problem(tmp_path / "new" / "a.png") is None and list(tmp_path.iterdir()) == []


def test_a_folder_that_is_a_link_to_nowhere_cannot_be_written(tmp_path) -> None:
    """A dangling symbolic link where an output's folder goes passed the check (its parent was probed), and
    the write failed after the work ("File exists": mkdir does not follow it): protect computed each of its
    files to fail, train trained for hours. It is a problem found before."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sub").symlink_to(tmp_path / "gone")
    for path in (tmp_path / "out" / "sub" / "a.png", tmp_path / "out" / "sub" / "deeper" / "a.png"):
        assert imageio.folder_write_problem(path) == (f"{tmp_path / 'out' / 'sub'} is a symbolic link to nowhere "
                                                      "(its target does not exist)")  # fmt: skip
    with pytest.raises(ImageWriteError, match="is a symbolic link to nowhere") as raised:  # what the write meets
        write_png(tmp_path / "out" / "sub" / "a.png", _picture(tmp_path))
    assert raised.value.errno == errno.ENOTDIR
    (tmp_path / "gone").mkdir()
    assert imageio.folder_write_problem(tmp_path / "out" / "sub" / "a.png") is None


@pytest.mark.parametrize("output, blocker", [("out/a.png", "out"), ("out/sub/a.png", "out"),
                                             ("out/sub/deeper/a.png", "out")])  # fmt: skip
def test_a_file_where_an_output_folder_goes_is_named_and_is_no_file_exists(tmp_path, output: str,
                                                                          blocker: str) -> None:  # fmt: skip
    """A file where an output's folder goes failed the write with "cannot write: File exists" and errno
    EEXIST (mkdir's, for the folder), which a run reads as its output written first by another run. The
    error names the folder and the file in the way, with errno ENOTDIR."""
    (tmp_path / blocker).write_text("a file, not a folder")
    path = tmp_path / output
    with pytest.raises(ImageWriteError) as raised:
        write_png(path, _picture(tmp_path))
    blocked = f"{tmp_path / blocker} is a file, not a folder"
    assert str(raised.value) == f"{path}: cannot create folder {path.parent}: {blocked}"
    assert raised.value.errno == errno.ENOTDIR and raised.value.filename == str(path)
    assert (tmp_path / blocker).read_text() == "a file, not a folder"
