"""Reading images as they are, writing protected PNGs faithfully and atomically.

A :class:`Picture` keeps what the perturbation must not touch (alpha, bit depth, mode, ICC profile) beside
the colour channels it works on. Writes go to a temporary file in the destination folder, then are renamed
over the target, so a crash never leaves a half-written output and never touches an original; the
temporary files that a killed run leaves are removed by the next write of their output.

Reading and writing need only Pillow and numpy; torch is imported by the functions that make or take
tensors. The I/O worker processes of ``preempt protect --io processes`` import this module alone, and
start in a tenth of a second instead of the second and a half that importing torch costs.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import logging
import numbers
import os
import re
import stat
import struct
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from ._paths import folder_blocker, make_folders
from .errors import ConfigError, ImageReadError, ImageWriteError, InputError, PreemptError, reason_of

try:
    import fcntl
except ImportError:  # Windows: no flock, so no removing of the temporary files that dead writers left
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    import torch

_logger = logging.getLogger(__name__)

__all__ = [
    "Picture",
    "content_seed",
    "read_image",
    "write_png",
    "read_png_text",
    "lift_pillow_pixel_limit",
    "atomic_write",
    "quantize",
    "quantize_batch",
    "quantize_batch_on_device",
    "levels_to_host",
    "nhwc_levels_to_arrays",
    "quantize_levels",
    "stack_levels",
    "levels_to_float",
    "divide_levels_",
    "read_images",
    "decoded_size",
    "DecodedSize",
    "NO_PIXELS",
    "write_pngs",
    "level_distance",
    "ignore_interrupts",
    "start_io_worker",
    "same_file",
    "is_fifo",
    "IMAGE_SUFFIXES",
    "DEFAULT_MAX_PIXELS",
    "max_file_bytes",
    "display_name",
    "quiet_pillow_warnings",
    "gray16_levels",
]

#: File suffixes picked up when a folder is given (any file Pillow reads is accepted when named directly).
#: Not SGI's other names (.rgb, .rgba, .bw): raw pixel dumps go by them, and walks would fail them.
#: A format this Pillow cannot read (AVIF, JPEG 2000 where built without them) fails with that reason,
#: rather than being passed over without a word.
IMAGE_SUFFIXES = frozenset(
    {".png", ".apng", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".tif", ".tiff", ".bmp", ".dib", ".gif", ".ppm",
     ".pgm", ".pbm", ".pnm", ".tga", ".avif", ".jp2", ".j2k", ".jpf", ".jpx", ".sgi", ".ico", ".pcx", ".qoi"}
)  # fmt: skip

#: Pillow's own decompression-bomb threshold (about 89 megapixels).
DEFAULT_MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)

#: The most bytes one pixel of the largest image --max-pixels allows can take in a file: 16-bit RGBA stored
#: uncompressed is 8; a quarter more covers the framing around it (a PNG row's filter byte, zlib's stored
#: blocks, a TIFF's strip tables)...
_FILE_BYTES_PER_PIXEL = 10
#: ...plus this much metadata (ICC profile, EXIF, XMP, text chunks, thumbnails)...
_FILE_METADATA_BYTES = 16 << 20
#: ...and never less than this, so that a small --max-pixels refuses no ordinary file on its size alone.
_MIN_FILE_BYTES = 64 << 20

#: Pillow's modes of 16-bit grayscale (read as 16-bit, scaled where 8 bits are needed)
GRAY16_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


def max_file_bytes(max_pixels: int) -> int:
    """The largest file read as an image of at most ``max_pixels`` pixels: larger ones are refused unread
    (a padded or endless input must not take the memory of the whole run)."""
    return max(_MIN_FILE_BYTES, max_pixels * _FILE_BYTES_PER_PIXEL + _FILE_METADATA_BYTES)


#: Characters that must not reach a one-line message as they are: C0/C1 controls (a newline, an escape
#: code), the Unicode line separators, and the stand-ins for bytes of a name that are not UTF-8.
UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\udc80-\udcff]")


def display_name(name: str | os.PathLike[str]) -> str:
    """``name`` as it is, or, when it holds control characters (a newline would split a one-line error),
    shell-quoted as ``$'...'``: escapes, bytes that are not UTF-8 as ``\\xHH``, pasteable into bash."""
    text = os.fspath(name)
    if not UNPRINTABLE.search(text):
        return text

    def escape(ch: str) -> str:
        code = ord(ch)
        if ch in "\\'":
            return "\\" + ch
        if ch in _SHELL_ESCAPES:
            return _SHELL_ESCAPES[ch]
        if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, as os.fsdecode keeps it
            return f"\\x{code - 0xDC00:02x}"
        if code < 0x20 or code == 0x7F:
            return f"\\x{code:02x}"
        if UNPRINTABLE.match(ch):
            return f"\\u{code:04x}"
        return ch

    return "$'" + "".join(escape(ch) for ch in text) + "'"


_SHELL_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\a": "\\a", "\b": "\\b", "\f": "\\f", "\v": "\\v",
                  "\x1b": "\\E"}  # fmt: skip

#: What an exception without a message means, by type.
_SILENT_ERRORS: dict[type[BaseException], str] = {
    MemoryError: "out of memory: use fewer --workers or a lower --max-pixels, or free memory",
    RecursionError: "nesting too deep",
}


def _error_text(e: BaseException) -> str:
    """``e``'s message on one line; its type and what that means where it has none."""
    message = " ".join(str(e).split())
    if message:
        return message
    meaning = next((m for t, m in _SILENT_ERRORS.items() if isinstance(e, t)), "no details given")
    return f"{type(e).__name__} ({meaning})"


def _typed_error_text(e: BaseException) -> str:
    """``TYPE: message`` on one line (the type and what it means where there is no message)."""
    message = " ".join(str(e).split())
    return f"{type(e).__name__}: {message}" if message else _error_text(e)


def _too_many_pixels(pixels_text: str, max_pixels: int) -> str:
    return (f"{pixels_text} exceeds the limit of {max_pixels:,} "
            "(decompression-bomb protection; raise it with --max-pixels if the file is trusted)")  # fmt: skip


_BOMB_PIXELS = re.compile(r"Image size \((\d+) pixels\)")


def _bomb_reason(error: BaseException, max_pixels: int, data: bytes | None = None) -> str:
    """The reason for an image Pillow's own bomb check refused, in our words with our limit: Pillow's
    limit is never below ``max_pixels`` (see :func:`_open`), so what it refuses is over ours too."""
    size = _declared_size(data) if data is not None else None
    if size is not None:
        return _too_many_pixels(f"{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels", max_pixels)
    found = _BOMB_PIXELS.search(str(error))
    if found:
        return _too_many_pixels(f"{int(found.group(1)):,} pixels", max_pixels)
    return _too_many_pixels(f"more than {Image.MAX_IMAGE_PIXELS or max_pixels:,} pixels", max_pixels)


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """The (width, height) a file's header declares, read as :func:`PIL.Image.open` does but without its
    bomb check (which hides the size); None when no format reads it so."""
    try:
        with warnings.catch_warnings():  # the size is what is wanted: not Pillow's warning of it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = _open_unchecked(io.BytesIO(data))
        return None if img is None else img.size
    except Exception:  # Pillow's internals moved: the message's pixel count serves
        return None


def _open_unchecked(fp: BinaryIO) -> Image.Image | None:
    """The image in ``fp`` opened as :func:`PIL.Image.open` opens it (its header read, no pixel decoded),
    the common formats tried first, but without its check of the size against the decompression-bomb
    limit, whose warning a caller could only keep quiet through ``warnings.catch_warnings`` (undone by
    other threads reading files at once); None when no format takes it."""
    prefix = fp.read(16)
    Image.preinit()
    for all_formats in (False, True):
        if all_formats:
            Image.init()
        for fmt in list(Image.ID):
            factory, accept = Image.OPEN[fmt]
            accepted = not accept or accept(prefix)
            if not accepted or isinstance(accepted, str):
                continue
            try:
                fp.seek(0)
                return factory(fp, "")
            except Exception:  # not this format (or a broken header): the next one
                continue
    return None


def content_seed(color: np.ndarray) -> int:
    """A per-image noise seed from its pixels (HWC integer levels, as ``Picture.color``): an image's result
    then does not depend on batch composition, order or sharding, nor on going through files or tensors."""
    return int.from_bytes(hashlib.sha256(np.ascontiguousarray(color).tobytes()).digest()[:8], "little") >> 1


@dataclass
class Picture:
    """An image as read from disk.

    ``color`` holds the channels the defense may change (H x W x C, C = 1 or 3, uint8 or uint16), ``alpha``
    the channel it must keep exactly. ``mode`` is the Pillow mode the PNG is written in.
    """

    path: Path
    color: np.ndarray
    alpha: np.ndarray | None
    mode: str
    source_mode: str
    source_format: str
    icc_profile: bytes | None = None
    text: dict[str, str] = field(default_factory=dict)
    source_sha256: str | None = None  # of the file's bytes as read: which original an output was made from
    notes: tuple[str, ...] = ()  # what the reader saw that a user should hear of (a file's other frames)
    # how the colour values are to be shown, from a PNG original (gAMA, cHRM, sRGB chunks as written), and
    # the print resolution (dots per inch, upright): kept, as the ICC profile, so the output shows and prints
    # as the original did
    colour_chunks: tuple[tuple[bytes, bytes], ...] = ()
    dpi: tuple[float, float] | None = None
    # a second digest of the file's bytes, never written anywhere: it keys what an output records of its
    # label (see source_label_key), which its published sha256 could not keep from a guess
    source_label_key: bytes | None = None
    # the permission bits of the file read (None: a pipe, or an image not read from a file): its outputs
    # are never readable by more users than it is (see derived_file_mode)
    permissions: int | None = None

    @property
    def max_value(self) -> int:
        return 65535 if self.color.dtype == np.uint16 else 255

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.color.shape[1], self.color.shape[0]

    @property
    def channels(self) -> int:
        return self.color.shape[2]

    @property
    def nbytes(self) -> int:
        """The bytes its levels take (colour and alpha): what :func:`decoded_size` gives from the header."""
        return self.color.nbytes + (0 if self.alpha is None else self.alpha.nbytes)

    def to_tensor(self) -> torch.Tensor:
        """The colour channels as float32 CHW in [0, 1]."""
        import torch

        t = torch.from_numpy(self.color.astype(np.float32, copy=False))
        return t.permute(2, 0, 1).contiguous().div_(self.max_value)

    @cached_property
    def content_seed(self) -> int:
        """:func:`content_seed` of the colour channels. Computed where the file is decoded (see
        :func:`read_images`), it travels with the picture: the thread that feeds the device does not hash
        each image of a batch between two batches."""
        return content_seed(self.color)

    def with_color(self, color: np.ndarray) -> "Picture":
        """A copy with other colour values (same shape and dtype), everything else kept.

        Raises:
            InputError: ``color`` is not a numpy array of the picture's shape and dtype (a ``ValueError``,
                and a ``TypeError``).
        """
        if not isinstance(color, np.ndarray):  # a list or a tensor failed with AttributeError ('shape')
            raise InputError(f"colour must be a numpy array {self.color.shape}/{self.color.dtype} (HWC levels), "
                             f"got {type(color).__name__}")  # fmt: skip
        if color.shape != self.color.shape or color.dtype != self.color.dtype:
            raise InputError(f"colour {color.shape}/{color.dtype} does not fit {self.color.shape}/{self.color.dtype}")
        return dataclasses.replace(self, color=color, text=dict(self.text))  # every other field kept, a new field too


#: What Pillow raises for a broken file besides OSError: its parsers' errors (a short chunk's SyntaxError,
#: EOFError, struct.error, IndexError) and its plugins' own (a TIFF page without dimensions: TypeError; AVIF's
#: decoder: RuntimeError). Not MemoryError, which says to use fewer workers (see read_images).
_BROKEN_FILE_ERRORS = (SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError, RuntimeError)


def _read_capped(path: Path, max_pixels: int) -> tuple[bytes, int | None]:
    """The file's bytes, read once, and its permission bits (None for a pipe): refused unread when it is a
    device or a socket, or larger than any image of at most ``max_pixels`` pixels (:func:`max_file_bytes`)
    needs. A pipe (``<(curl ...)``, a FIFO) is read up to that size; one nobody writes to fails after
    :data:`FIFO_WRITER_WAIT` seconds instead of holding the run forever."""
    cap = max_file_bytes(max_pixels)
    raise_it = "raise the limit with --max-pixels if the file is trusted"
    try:
        looked_at = os.stat(path).st_mode
        _refuse_special(path, looked_at)  # before opening: a device is not even opened
        # O_NONBLOCK: opening a FIFO does not wait for a writer (a blocking open of one nobody writes to
        # held the whole run): _first_bytes_of_a_pipe waits a bounded time instead. Only for a FIFO: Windows
        # has no non-blocking regular files, and a Linux file under a lease would fail instead of waiting.
        pipe_flags = getattr(os, "O_NONBLOCK", 0) if stat.S_ISFIFO(looked_at) else 0
        fd = os.open(path, os.O_RDONLY | pipe_flags | getattr(os, "O_BINARY", 0))
        with open(fd, "rb", buffering=0) as f:
            info = os.fstat(fd)  # what was opened, should the name have changed meanwhile
            _refuse_special(path, info.st_mode)
            chunks, total = [], 0
            if stat.S_ISFIFO(info.st_mode) and pipe_flags:
                chunks = [_first_bytes_of_a_pipe(path, fd)]
                total = len(chunks[0])
                os.set_blocking(fd, True)
            if info.st_size > cap:
                raise ImageReadError(path, f"file too large: {info.st_size:,} bytes, more than an image within "
                                           f"the pixel limit of {max_pixels:,} can take (at most {cap:,} bytes; {raise_it})")  # fmt: skip
            want = info.st_size + 1  # the file in one read, and its end seen
            while total <= cap:
                chunk = f.read(min(max(want, 1 << 20), cap + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                want = 0
            if total > cap:
                raise ImageReadError(path, f"file grew past {cap:,} bytes, more than an image within the pixel "
                                           f"limit of {max_pixels:,} can take ({raise_it})")  # fmt: skip
            # a pipe's bits (0600 for every `<(cmd)`) say nothing of the image's privacy
            permissions = stat.S_IMODE(info.st_mode) if stat.S_ISREG(info.st_mode) else None
            return b"".join(chunks), permissions  # one read: that same object, not a copy
    except ImageReadError:
        raise
    except FileNotFoundError:
        if os.path.islink(path):
            try:
                target = display_name(os.readlink(path))
            except OSError:
                target = "?"
            raise ImageReadError(path, f"broken symbolic link: its target {target} does not exist",
                                 errno=errno.ENOENT) from None  # fmt: skip
        raise ImageReadError(path, "no such file", errno=errno.ENOENT) from None
    except IsADirectoryError:
        raise ImageReadError(path, "is a directory", errno=errno.EISDIR) from None
    except OSError as e:
        raise ImageReadError(path, f"cannot read: {e.strerror or _error_text(e)}", errno=e.errno) from e


#: Seconds a FIFO named as an input may wait for a program to open it for writing (one that has it open
#: already, as ``<(...)`` does, is waited for as long as it writes).
FIFO_WRITER_WAIT = 5.0


def _first_bytes_of_a_pipe(path: Path, fd: int) -> bytes:
    """The first bytes of the pipe ``path`` open (non-blocking) at ``fd``; empty where a writer holds it
    and has written nothing yet (the caller's blocking reads wait for it).

    poll() waits for data, or for a writer that came and left; after that, a read tells a pipe nobody
    writes to (0 bytes, end of file) from one whose writer is still to write (EAGAIN).

    Raises:
        ImageReadError: no program opened the pipe for writing within :data:`FIFO_WRITER_WAIT` seconds, or
            its writer closed it without writing.
    """
    import select

    events = []
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        events = poller.poll(FIFO_WRITER_WAIT * 1000)
    try:
        first = os.read(fd, 1 << 16)
    except BlockingIOError:
        return b""
    if first:
        return first
    if events:
        raise ImageReadError(path, "an empty pipe: its writer closed it without writing anything")
    raise ImageReadError(path, f"a pipe nobody wrote to within {FIFO_WRITER_WAIT:g} s (no program writes to "
                               "this FIFO)")  # fmt: skip


def _refuse_special(path: Path, mode: int) -> None:
    """Refuse a device or a socket (endless, or not data at all); a pipe is read up to the size cap."""
    if stat.S_ISDIR(mode):
        raise ImageReadError(path, "is a directory", errno=errno.EISDIR)
    if stat.S_ISREG(mode) or stat.S_ISFIFO(mode):
        return
    kind = ("a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else None)  # fmt: skip
    raise ImageReadError(path, f"is {kind}, not an image file" if kind else "not a regular file")


def lift_pillow_pixel_limit(max_pixels: int) -> None:
    """Raise Pillow's own decompression-bomb limit to ``max_pixels``, so that ``--max-pixels`` can allow
    more than Pillow's default. Pillow's check reads a process-wide limit (it has none per call), and refuses
    even to open an image of more than twice it: a run lifts it before it reads any file, its metadata
    included (a protected 200-megapixel scan's text chunks were found missing). Only ever raised, so that
    threads agree; it stays raised for the process (said where max_pixels is documented)."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _open(path: Path, max_pixels: int) -> tuple[Image.Image, str, bytes, int | None]:
    """The image, opened from the file's bytes read once (see :func:`_read_capped`), the sha256 and
    :func:`source_label_key` of those same bytes, and the file's permission bits (None for a pipe)."""
    data, permissions = _read_capped(path, max_pixels)
    if not data:
        raise ImageReadError(path, "empty file (0 bytes)")
    lift_pillow_pixel_limit(max_pixels)  # ours is checked below
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        if img.format == "PNG":
            img.info["cicp"] = _png_cicp(data)
    except UnidentifiedImageError:
        deep_psd = _psd_depth(data)
        if deep_psd is not None:  # a usual working file, not a broken one
            raise ImageReadError(path, f"a Photoshop file (PSD) of {deep_psd} bits a channel, which Pillow does not "
                                       "read (only 8): protect an 8-bit copy") from None  # fmt: skip
        raise ImageReadError(path, "not an image Pillow can read (unknown or corrupt format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # over Pillow's limit, which is at least ours: our words, our limit (not Pillow's twice-as-high one)
        raise ImageReadError(path, _bomb_reason(e, max_pixels, data)) from None
    except OSError as e:
        raise ImageReadError(path, f"cannot open: {_error_text(e)}", errno=e.errno) from e
    except _BROKEN_FILE_ERRORS as e:  # a broken header (a short gAMA chunk, an AVIF without its image)
        raise ImageReadError(path, f"corrupt or truncated image data ({_error_text(e)})") from e
    width, height = img.size
    if width * height > max_pixels:
        img.close()
        raise ImageReadError(path, _too_many_pixels(f"{width}x{height} = {width * height:,} pixels", max_pixels))
    if width == 0 or height == 0:
        img.close()
        raise ImageReadError(path, f"image has no pixels ({width}x{height})")
    return img, hashlib.sha256(data).hexdigest(), source_label_key(data), permissions


def _psd_depth(data: bytes) -> int | None:
    """The bits a channel of the Photoshop file ``data`` is, where it is a PSD of 16 or 32 (which Pillow does
    not read), else None."""
    if len(data) < 26 or data[:6] != b"8BPS\x00\x01":  # the signature and version 1 (PSB, version 2: no)
        return None
    depth = struct.unpack(">H", data[22:24])[0]
    return depth if depth in (16, 32) else None


def source_label_key(data: bytes) -> bytes:
    """A digest of an original's bytes that keys the digest of its label in the output's metadata.

    An output records a digest of the label it was protected toward, not the label: its metadata is
    published with it, and the defender's label is what a reversion attack lacks (``eval_tables.md``:
    given the labels, reversion recovered 73-100% of the accuracy protection had taken). A plain hash of a
    class index is guessed in 10 tries, and the original's sha256 is in the metadata too; this key needs
    the original's bytes, which the defender has on a re-run and the attacker does not."""
    return _label_key_hash(data).digest()


def _label_key_hash(data: bytes = b"") -> "hashlib._Hash":
    return hashlib.blake2b(data, digest_size=32, person=b"preempt-label")


def file_digests(path: Path, chunk_size: int = 1 << 20) -> tuple[str, bytes]:
    """The sha256 (hex) and :func:`source_label_key` of a file's bytes, read once."""
    sha256, key = hashlib.sha256(), _label_key_hash()
    with path.open("rb") as f:
        while chunk := f.read(chunk_size):
            sha256.update(chunk)
            key.update(chunk)
    return sha256.hexdigest(), key.digest()


def read_image(path: Path | str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Picture:
    """Read any image Pillow reads, upright (EXIF orientation applied), the first frame of animations and
    of multi-page files (said in :attr:`Picture.notes`).

    Grayscale stays grayscale, 16-bit grayscale stays 16-bit, alpha is split off and kept exactly,
    palette images become RGB (RGBA if they have transparency), CMYK and other colour spaces become RGB (CMYK
    through its ICC profile, see :func:`_cmyk_as_srgb`).

    Raises:
        ImageReadError: missing, empty, not an image, truncated or corrupt, too many pixels, a PNG, TIFF
            PPM or SGI of more than 8 bits per colour channel (Pillow decodes it to 8).
    """
    path = Path(path)
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, numbers.Integral) or max_pixels < 1:
        # a float was stored into Pillow's limit, 0 and -1 taken
        raise ConfigError(f"max_pixels must be a whole number >= 1, got {max_pixels!r}")
    img, sha256, label_key, permissions = _open(path, max_pixels)
    try:
        source_format = img.format or "unknown"
        deeper = _deeper_than_decoded(img)
        if deeper:
            # 48- and 64-bit colour (and 16-bit gray with alpha): Pillow keeps the top 8 bits of each sample,
            # so the output would be 8-bit, and its budget would hold on that copy, not on the original
            raise ImageReadError(path, f"a {source_format} of {deeper}, which Pillow decodes to 8 bits: the "
                                       "output would lose depth unseen; protect an 8-bit copy")  # fmt: skip
        gray_transparency = _low_depth_gray_transparency(img)  # before a PNG's text, which loads it
        # A PNG's EXIF as its chunks before the image data give it, before its text loads the pixels: Pillow
        # takes an eXIf after them too as it loads, which browsers ignore (CSS Images 3 ignores an orientation
        # that comes after the image data): such a photo was written turned against how they show it.
        exif_before_pixels = img.info.get("exif")
        text = {k: v for k, v in getattr(img, "text", {}).items() if isinstance(v, str)}
        icc = img.info.get("icc_profile")
        first_frame = img.tell()  # 0, but a Photoshop file's composite image, numbered 1 before its layers
        # a PSD's layers are parts of its composite image, which is protected whole: not counted as frames (nor
        # read: a broken layer failed a file whose composite was whole)
        frames = 1 if source_format == "PSD" else getattr(img, "n_frames", 1)
        # an animation's other frames, a scan's other pages: not in the output, which says so
        # (a camera's MPO JPEG holds a preview or a depth map as its second frame: not content of its own)
        notes = ((f"has {frames} frames (an animation or a multi-page file): only the first is protected",)
                 if frames > 1 and source_format != "MPO" else ())  # fmt: skip
        # back to the first frame where counting them left another; a PSD refuses a seek to where it is
        # ("attempt to seek outside sequence"): seek(0) failed every one, and seek(1) one without layers
        if img.tell() != first_frame:
            img.seek(first_frame)
        tiff_orientation = None
        if source_format == "TIFF":
            # Pillow's TIFF plugin turns a TIFF upright as it loads it, and deletes its orientation tag; it
            # takes the orientation from XMP too, which browsers do not. Read here, and kept from Pillow:
            # applied below as for any other file (its resolution's axes swapped with it).
            tiff_orientation = _exif_orientation(img, _exif_block(img.info))
            img.getexif().pop(0x0112, None)
        img.load()  # may check a frame's or tile's size (GIF, TIFF, ICO) against Pillow's limit: see below
        if gray_transparency is not None:
            img.info["transparency"] = gray_transparency
        colour_chunks = _png_colour_chunks(img.info) if source_format == "PNG" else ()
        # parsed once: the resolution and the orientation are read from it
        exif = _exif_block({"exif": exif_before_pixels} if source_format == "PNG" else img.info)
        dpi = _dpi(img, exif)
        orientation = tiff_orientation if source_format == "TIFF" else _exif_orientation(img, exif)
        upright = _UPRIGHT.get(orientation)
        if upright is not None:
            img = img.transpose(upright)
            if dpi is not None and upright in _SWAPS_AXES:
                dpi = (dpi[1], dpi[0])
        source_mode = img.mode
        managed, colour_note = _cmyk_as_srgb(img, icc) if source_mode == "CMYK" else (None, None)
        color, alpha, mode = _split(img if managed is None else managed, path)
        if _colour_space(source_mode) != _colour_space(mode):
            # a CMYK (or Lab, YCbCr) profile describes the source's numbers, not the RGB ones written:
            # kept, it would be an invalid iCCP chunk and shift colours in viewers that honour it
            icc, colour_chunks = None, (_SRGB_CHUNKS if managed is not None else ())
        if colour_note is not None:
            notes += (colour_note,)
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # not an OSError: own words
        raise ImageReadError(path, _bomb_reason(e, max_pixels)) from None
    except (OSError, *_BROKEN_FILE_ERRORS) as e:  # broken data (a TIFF's page without dimensions too)
        raise ImageReadError(path, f"corrupt or truncated image data ({_error_text(e)})") from e
    finally:
        img.close()
    return Picture(path, color, alpha, mode, source_mode, source_format, icc, text, sha256, notes, colour_chunks,
                   dpi, label_key, permissions)  # fmt: skip


#: The PNG chunk saying that an output's colour values are sRGB (rendering intent perceptual): what a CMYK
#: original converted through its colour profile is written with.
_SRGB_CHUNKS = ((b"sRGB", bytes([0])),)


def _cmyk_as_srgb(img: Image.Image, icc: bytes | None) -> tuple[Image.Image | None, str | None]:
    """A CMYK image converted to sRGB through its ICC profile, as colour-managed viewers show it, or None
    (then converted uncorrected, by :func:`_split`), and what a user should hear of that.

    Colour-managed viewers show a CMYK file through its profile (a press's inks on paper: its black is a
    dark grey, not 0); Pillow's plain conversion is the naive one that browsers give an untagged file, so a
    file without a profile is converted so with nothing to say."""
    if not icc:
        return None, None
    uncorrected = "converted to RGB uncorrected: colours may differ from the original as viewers show it"
    try:
        from PIL import ImageCms
    except ImportError:  # a Pillow built without littlecms
        return None, f"its CMYK colour profile cannot be applied (this Pillow has no colour management): {uncorrected}"
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if profile.profile.xcolor_space.strip() != "CMYK":
            return None, f"its colour profile is not a CMYK one ({profile.profile.xcolor_space.strip()}): {uncorrected}"
        srgb = ImageCms.createProfile("sRGB")
        return ImageCms.profileToProfile(img, profile, srgb, renderingIntent=ImageCms.Intent.PERCEPTUAL,
                                         outputMode="RGB"), None  # fmt: skip
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as e:  # a broken or unusable profile
        return None, f"its colour profile cannot be applied ({_error_text(e)}): {uncorrected}"


#: EXIF orientation -> the transposition that shows the image upright (as ``ImageOps.exif_transpose``).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


#: Transpositions that swap width and height (and so a resolution's x and y).
_SWAPS_AXES = {Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE,
               Image.Transpose.ROTATE_90}  # fmt: skip


def _png_cicp(data: bytes) -> bytes | None:
    """The four bytes of a PNG's cICP chunk (the colour primaries, transfer function, matrix and range of
    Display P3, BT.2100 PQ or HLG images, which take precedence over an ICC profile), found in ``data``
    before the image data; None where there is none. Pillow skips this chunk, and reads no other copy."""
    pos = 8  # past the signature
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind in (b"IDAT", b"IEND"):
            return None
        if kind == b"cICP":
            body = data[pos + 8 : pos + 12]
            return body if length == 4 and len(body) == 4 else None
        pos += 12 + length
    return None


def _png_colour_chunks(info: Mapping[str, object]) -> tuple[tuple[bytes, bytes], ...]:
    """A PNG's gAMA, cHRM, sRGB and cICP chunks, rebuilt from what Pillow read of them (it keeps them as
    numbers: ``gamma``, ``chromaticity``, ``srgb``; ``cicp``, put there by :func:`_open`), to be written
    into the output. Without them a gamma of 1.0 showed a level of 64 at about 136 in browsers that apply
    it, and at 64 in the output; a Display P3 image was shown as sRGB."""
    chunks: list[tuple[bytes, bytes]] = []
    try:
        gamma = info.get("gamma")
        if isinstance(gamma, (int, float)) and 0 < gamma * 100000 < 2**31:
            chunks.append((b"gAMA", struct.pack(">I", round(gamma * 100000))))
        chromaticity = info.get("chromaticity")
        if isinstance(chromaticity, tuple) and len(chromaticity) == 8:
            chunks.append((b"cHRM", struct.pack(">8I", *(round(v * 100000) for v in chromaticity))))
        srgb = info.get("srgb")
        if isinstance(srgb, int) and 0 <= srgb <= 3:
            chunks.append((b"sRGB", bytes([srgb])))
        cicp = info.get("cicp")
        if isinstance(cicp, bytes) and len(cicp) == 4:
            chunks.append((b"cICP", cicp))
    except (struct.error, TypeError, ValueError, OverflowError):  # values no PNG chunk holds: left out
        return ()
    return tuple(chunks)


def _exif_block(info: Mapping[str, object]) -> Image.Exif | None:
    """The file's EXIF block, parsed (None: it has none; an empty one: what it has cannot be parsed, and so
    says nothing). Not a PNG's ``Raw profile type exif`` text chunk (ImageMagick's), which Pillow's
    ``getexif`` reads and browsers do not: its orientation turned the output against how they show the
    original."""
    raw = info.get("exif")
    exif = Image.Exif()
    try:
        if raw is None:
            return None
        exif.load(raw)
    except (SyntaxError, ValueError, TypeError, KeyError, IndexError, OSError, EOFError):  # broken EXIF
        return Image.Exif()
    return exif


def _low_depth_gray_transparency(img: Image.Image) -> int | None:
    """The transparent grey of a 2- or 4-bit grayscale PNG (tRNS) in the 0..255 levels Pillow decodes its
    pixels to, or None. Pillow scales those pixels (a 2-bit 3 becomes 255), not the tRNS value it reports
    (3): compared as they are, no pixel matched, and transparent pixels came out opaque."""
    raw_mode = getattr(getattr(img, "png", None), "im_rawmode", None) or ""
    transparency = img.info.get("transparency")
    match = re.fullmatch(r"L;([24])I?", raw_mode)
    if match is None or not isinstance(transparency, int):
        return None
    top = 2 ** int(match[1]) - 1
    return transparency * 255 // top if 0 <= transparency <= top else None


def _dpi(img: Image.Image, exif: Image.Exif | None) -> tuple[float, float] | None:
    """The print resolution the file states (PNG's pHYs, TIFF's, a JPEG's JFIF density or EXIF resolution),
    when it is one a PNG can hold. Of a JPEG, only one stated with its unit: Pillow gives 72 dpi to a
    JPEG whose EXIF has no resolution, and reads a resolution without a unit as inches."""
    value: object = img.info.get("dpi")
    if img.format in ("JPEG", "MPO") and img.info.get("jfif_unit") not in (1, 2):
        value = None
        unit, x, y = (exif.get(0x0128), exif.get(0x011A), exif.get(0x011B)) if exif is not None else (None,) * 3
        if unit in (2, 3) and x:  # ResolutionUnit inches or centimetres, X/YResolution
            per_inch = 2.54 if unit == 3 else 1.0
            try:
                value = (float(x) * per_inch, float(y or x) * per_inch)
            except (TypeError, ValueError, ZeroDivisionError):
                value = None
    if img.format == "TIFF" and 0x011A not in getattr(img, "tag_v2", {}):
        value = None  # no XResolution: Pillow's dpi is a default of 1, not the file's
    if not isinstance(value, tuple) or len(value) != 2:
        return None
    try:
        x, y = (float(v) for v in value)  # TIFF's and EXIF's are rationals (IFDRational)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return (x, y) if 0 < x < 1e6 and 0 < y < 1e6 else None  # finite, and pixels per metre a chunk holds


def _exif_orientation(img: Image.Image, exif: Image.Exif | None) -> int | None:
    """The file's EXIF orientation (None: none, or EXIF that cannot be parsed), from its EXIF block
    (:func:`_exif_block`) or, without one, a TIFF's own tags, and not from XMP. ``ImageOps.exif_transpose``
    also takes ``tiff:Orientation`` from XMP when EXIF has none, which browsers ignore: such a file was
    written rotated against how browsers show the original."""
    if exif is not None:
        value = exif.get(0x0112)
    else:
        tags = getattr(img, "tag_v2", None)  # a TIFF: its orientation is one of its own tags
        value = tags.get(0x0112) if tags is not None else None
    return value if isinstance(value, int) else None


def _deeper_than_decoded(img: Image.Image) -> str | None:
    """How the file's colour samples are deeper than the 8 bits Pillow decodes them to (before ``load``),
    or None: a PNG or TIFF of 16 bits per colour channel, a PPM (binary or plain) whose maximum is over 255.
    16-bit grayscale decodes to a mode of its own (``I;16``, ``I``), kept; a 16-bit BMP is 5-6-5 bits a
    pixel, which 8 bits a channel hold."""
    if img.mode.startswith(("I", "F")):
        return None
    if img.format == "PNG":
        raw_mode = getattr(getattr(img, "png", None), "im_rawmode", None) or ""
        return "16 bits per colour channel" if ";16" in raw_mode else None
    if img.format == "TIFF":
        depth = getattr(img, "tag_v2", {}).get(258)  # BitsPerSample: one per sample, or one for all
        depths = [d for d in (depth if isinstance(depth, tuple) else (depth,)) if isinstance(d, int)]
        return f"{max(depths)} bits per colour channel" if depths and max(depths) > 8 else None
    if img.format == "SGI":  # 2 bytes a sample (gray too: Pillow decodes it to mode L)
        for tile in getattr(img, "tile", None) or ():
            args = tile[3] if len(tile) > 3 else None
            if tile[0] == "SGI16" or (tile[0] == "sgi_rle" and isinstance(args, tuple) and args[-1] == 2):
                return "16 bits per channel"
    if img.format == "PPM":
        for tile in getattr(img, "tile", None) or ():
            args = tile[3] if len(tile) > 3 else None
            if tile[0] in ("ppm", "ppm_plain") and isinstance(args, tuple) and len(args) > 1 \
                    and isinstance(args[1], int) and args[1] > 255:  # fmt: skip
                return f"up to {args[1]} levels per channel (more than 8 bits)"
    return None


def _colour_space(mode: str) -> str:
    if mode in ("1", "L", "LA", "La", "I", "F") or mode.startswith("I;16"):
        return "gray"
    if mode in ("RGB", "RGBA", "RGBa", "RGBX", "P", "PA"):
        return "rgb"
    return mode


def gray16_levels(img: Image.Image, path: Path | str) -> np.ndarray | None:
    """The levels (H x W, uint16) of a 16-bit grayscale image, or of a 32-bit integer one whose values fit
    16 bits; None for an image of another mode.

    Raises:
        ImageReadError: a 32-bit integer image with values outside 0..65535, or a floating-point one (mode
            F: no range to scale from, 0..1 and 0..255 are both found).
    """
    if img.mode == "F":
        raise ImageReadError(path, "floating-point images (mode F) are not supported")
    if img.mode not in GRAY16_MODES and img.mode != "I":
        return None
    arr = np.asarray(img)
    if img.mode == "I" and arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise ImageReadError(path, "32-bit integer images with values outside 0..65535 are not supported")
    return arr.astype(np.uint16)


def _split(img: Image.Image, path: Path) -> tuple[np.ndarray, np.ndarray | None, str]:
    mode = img.mode
    if (mode in GRAY16_MODES or mode == "I") and "transparency" in img.info:
        # PNG tRNS: one grey level transparent; a 16-bit alpha has no mode
        raise ImageReadError(path, "16-bit grayscale with a transparent level (tRNS) is not supported: "
                                   "its transparency would be lost")  # fmt: skip
    levels = gray16_levels(img, path)
    if levels is not None:
        return levels[:, :, None], None, "I;16"
    if mode == "1":
        img, mode = img.convert("L"), "L"
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
        mode = img.mode
    if mode in ("L", "RGB") and "transparency" in img.info:  # PNG tRNS: one colour transparent
        img = img.convert(mode + "A")  # as an alpha channel, kept exactly: the perturbation must not move
        mode = img.mode  # pixels into or out of the transparent colour
    if mode == "La":
        img, mode = img.convert("LA"), "LA"
    if mode in ("RGBa",):
        img, mode = img.convert("RGBA"), "RGBA"
    if mode not in ("L", "LA", "RGB", "RGBA"):
        img, mode = img.convert("RGB"), "RGB"
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if mode in ("LA", "RGBA"):
        return np.ascontiguousarray(arr[:, :, :-1]), np.ascontiguousarray(arr[:, :, -1]), mode
    return np.ascontiguousarray(arr), None, mode


def quantize_levels(x: torch.Tensor, reference: torch.Tensor, eps: float, max_value: int = 255) -> torch.Tensor:
    """Round ``x`` (floats in [0, 1]) to integer levels within ``eps`` of ``reference`` (integer levels of
    the same shape), as int64.

    Rounding can push a value half a level past the budget; the result is clipped back so that the L-inf
    distance *in the saved file* is at most ``floor(eps * max_value)`` levels.
    """
    return _clip_levels(x, reference, eps, max_value).long()


def _clip_levels(x: torch.Tensor, reference: torch.Tensor, eps: float, max_value: int) -> torch.Tensor:
    import torch

    # In float32, where every level up to 65535 is exact: the same integers as in int64, at half the
    # memory traffic (this runs once per batch on the device, or on the CPU for every file).
    radius = float(np.floor(eps * max_value + 1e-6))
    levels = x.detach().float().mul(max_value).round_()
    ref = reference.to(levels.device, torch.float32, copy=True)  # changed in place below
    # fmax/fmin, not maximum/minimum: a NaN (a broken model's gradient) becomes the budget's bound instead
    # of passing through to level 0, so the budget holds whatever the engine computed. Both bounds in the
    # one copy (integers below 2^24 stay exact): a photo's rounding holds no other full-size buffer.
    levels = torch.fmax(levels, ref.sub_(radius), out=levels)
    return torch.fmin(levels, ref.add_(2 * radius), out=levels).clamp_(0, max_value)


def quantize(x: torch.Tensor, reference: np.ndarray, eps: float) -> np.ndarray:
    """Round ``x`` (CHW in [0, 1]) to the integer levels of ``reference`` (an HWC picture array), within
    ``eps`` of it (see :func:`quantize_levels`)."""
    import torch

    max_value = 65535 if reference.dtype == np.uint16 else 255
    ref = torch.from_numpy(reference.astype(np.int64)).permute(2, 0, 1)
    levels = quantize_levels(x.cpu(), ref, eps, max_value)
    return levels.permute(1, 2, 0).numpy().astype(reference.dtype)


def stack_levels(colors: Sequence[np.ndarray], device: torch.device | str) -> torch.Tensor | None:
    """Equal-shape, equal-depth picture arrays (HWC) as one integer [B, C, H, W] tensor on ``device``
    (8-bit as uint8, 16-bit as int32); None when the depths differ.

    The integers travel, not floats: a quarter of the bytes to a GPU for 8-bit images, and one conversion
    there instead of one per image on the host.
    """
    import torch

    from .device import to_device  # both import torch: not at this module's import (see its docstring)

    if len({c.dtype for c in colors}) != 1:
        return None
    host = np.stack(colors)
    if host.dtype == np.uint16:  # torch has no general-purpose uint16
        host = host.astype(np.int32)
    return to_device(torch.from_numpy(host), torch.device(device)).permute(0, 3, 1, 2)


def levels_to_float(levels: torch.Tensor, max_value: int) -> torch.Tensor:
    """Integer levels [B, C, H, W] as contiguous float32 in [0, 1] (the values of ``Picture.to_tensor``, on
    any device: see :func:`divide_levels_`)."""
    import torch

    return divide_levels_(levels.to(torch.float32, memory_format=torch.contiguous_format), max_value)


def divide_levels_(levels: torch.Tensor, max_value: int) -> torch.Tensor:
    """Float ``levels`` divided by ``max_value`` in place, correctly rounded on every device: the floats of
    ``Picture.to_tensor``. CUDA divides by a number as a product with its reciprocal (torch's kernel takes a
    host scalar divisor so), a last bit off for 126 of the 256 8-bit levels: the divisor is a tensor on
    ``levels``' device, which CUDA divides by (the CPU gives the same bits either way)."""
    import torch

    return levels.div_(torch.full((), max_value, dtype=levels.dtype, device=levels.device))


def quantize_batch(x: torch.Tensor, references: Sequence[np.ndarray], eps: float,
                   reference_levels: torch.Tensor | None = None) -> tuple[list[np.ndarray], torch.Tensor]:  # fmt: skip
    """:func:`quantize` for a batch ``x`` [B, C, H, W] (on any device) of equal-shape pictures: the rounding
    runs where ``x`` is, with one transfer of the batch to the host instead of one per image.

    ``reference_levels``: the references already on ``x``'s device, as :func:`stack_levels` gives them
    (saves building and sending them again).

    Returns:
        (the integer levels of each image, HWC like its reference; the same levels as [0, 1] floats,
        [B, C, H, W] on ``x``'s device: what the written files will hold).
    """
    import torch

    max_values = [65535 if r.dtype == np.uint16 else 255 for r in references]
    if len(set(max_values)) > 1:  # 8- and 16-bit pictures of one size: round each on its own grid
        levels = [quantize(x[i], r, eps) for i, r in enumerate(references)]
        saved = torch.stack([torch.from_numpy(lv.astype(np.float32)).permute(2, 0, 1) / m
                             for lv, m in zip(levels, max_values)])  # fmt: skip
        return levels, saved.to(x.device)
    max_value = max_values[0]
    if reference_levels is None:
        reference_levels = stack_levels(references, x.device)
    small, saved = quantize_batch_on_device(x, reference_levels, eps, max_value)
    return levels_to_host(small), saved


def quantize_batch_on_device(x: torch.Tensor, reference_levels: torch.Tensor, eps: float,
                             max_value: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The rounding of :func:`quantize_batch` for pictures of one depth, left on ``x``'s device (nothing
    waits for it): the levels [B, C, H, W] in the files' integer width (uint8 for 8-bit, int32 for 16-bit),
    and the same levels as [0, 1] floats. :func:`levels_to_host` brings the first back."""
    import torch

    clipped = _clip_levels(x, reference_levels, eps, max_value)
    small = clipped.to(torch.uint8 if max_value == 255 else torch.int32)
    return small, divide_levels_(clipped, max_value)


def levels_to_host(levels: torch.Tensor) -> list[np.ndarray]:
    """Levels from :func:`quantize_batch_on_device` as one HWC array per image (uint8, or uint16 for
    16-bit), in one transfer: a byte per 8-bit level crosses from a GPU."""
    return nhwc_levels_to_arrays(levels.permute(0, 2, 3, 1).contiguous().cpu())


def nhwc_levels_to_arrays(levels: torch.Tensor) -> list[np.ndarray]:
    """Integer levels [B, H, W, C] on the host (uint8, or int32 for 16-bit) as one HWC array per image
    (uint8 or uint16), copied out of the tensor's memory (pinned memory goes back to its pool)."""
    import torch

    return list(levels.numpy().astype(np.uint8 if levels.dtype == torch.uint8 else np.uint16))


def _to_pil(picture: Picture, color: np.ndarray) -> Image.Image:
    if picture.mode == "I;16":
        # No mode= here: Pillow >= 13 rejects fromarray(uint16, mode="I;16"); a little-endian uint16
        # array is read as I;16 by every supported Pillow.
        return Image.fromarray(np.ascontiguousarray(color[:, :, 0].astype("<u2")))
    planes = color if picture.alpha is None else np.concatenate([color, picture.alpha[:, :, None]], axis=2)
    if planes.shape[2] == 1:
        planes = planes[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(planes.astype(np.uint8)), mode=picture.mode)


def _umask_at_import() -> int:
    mask = os.umask(0o022)  # the only portable way to read it sets it, for every thread, for a moment:
    os.umask(mask)  # done once, at import, before any worker thread of ours exists
    return mask


_UMASK_AT_IMPORT = _umask_at_import()


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file now (0o666 less the umask). Files written through a temporary
    need it: mkstemp's are 0o600, which would leave a published image unreadable to a web server running
    as another user."""
    try:  # Linux reports the current umask without changing it
        with open("/proc/self/status", encoding="ascii") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = _UMASK_AT_IMPORT
    return 0o666 & ~mask


def derived_file_mode(source_permissions: int | None) -> int:
    """The mode of a file made from another whose permission bits are ``source_permissions`` (a protected
    or reverted copy of an image): a new file's (:func:`new_file_mode`), less the group's and others' bits
    the source lacks. Its pixels show the same picture: a photo only its owner may read (0600) must not get a
    copy every user of the machine can read (0644 under the usual umask). The owner's bits are a new file's
    (a read-only original's copy can still be replaced). None: a new file's mode."""
    mode = new_file_mode()
    return mode if source_permissions is None else mode & ~(0o077 & ~source_permissions)


#: The longest file name most file systems take: 255 bytes on Linux (ext4, XFS, btrfs), 255 characters on
#: APFS, HFS+ and NTFS, where a name of more bytes can be legal (see :func:`name_max`).
NAME_MAX = 255
#: What ``mkstemp`` adds around a temporary file's name part here: ``.`` + ``.XXXXXXXX`` + ``.tmp``.
_TEMP_NAME_EXTRA = 1 + 9 + 4
#: errno values of a file system that makes no hard links (FAT, some network file systems).
_NO_HARD_LINKS = {getattr(errno, name) for name in ("EPERM", "ENOTSUP", "EOPNOTSUPP", "EMLINK", "EXDEV", "ENOSYS")
                  if hasattr(errno, name)}  # fmt: skip


def name_max(folder: Path) -> int | None:
    """The longest file name, in bytes, that ``folder``'s file system takes, where names are counted in
    bytes (Linux: 255 mostly, 143 on eCryptfs); None elsewhere (macOS and Windows count characters, and
    only the file system's own refusal tells)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return NAME_MAX


def _temp_prefix(name: str, name_max: int) -> str:
    """``.NAME.``, ``NAME`` cut so that the temporary file's whole name fits in ``name_max`` bytes (an
    output named with 242 to 255 bytes is legal; its temporary file must be too)."""
    while name and len(os.fsencode(name)) > name_max - _TEMP_NAME_EXTRA:
        name = name[:-1]
    return f".{name}."


def folder_write_problem(path: Path) -> str | None:
    """Why no file could be written at ``path`` (its missing folders created first), or None: a file where
    one of its folders should be, a symbolic link to nowhere there, or a folder this process cannot write (a
    temporary file is created and removed there). Missing folders are not created here; their nearest
    existing one is tried. For checks before work whose result ``path`` would hold (a protected image, a
    trained model, a registry row)."""
    blocker = folder_blocker(path.parent)  # creating the folder would fail after the work
    if blocker is not None:
        return blocker
    folder = path.parent
    while not os.path.exists(folder) and folder != folder.parent:
        folder = folder.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".preempt-write-test.", dir=folder)
        try:
            os.close(fd)
        finally:  # also when the close fails or a Ctrl-C comes: a probe is never left in the user's folder
            os.unlink(probe)
    except OSError as e:
        return f"no file can be created in {folder} ({e.strerror or e})"
    return None


#: A temporary file of :func:`atomic_write`'s, as ``mkstemp`` names it: the prefix (``.NAME.``, see
#: :func:`_temp_prefix`; group 1), 8 of its random characters (``tempfile``'s lowercase letters, digits and
#: underscore), ``.tmp``. What a user named otherwise (``.NAME.mine.tmp``) is never taken for one.
_TEMP_NAME = re.compile(r"(\..*\.)[a-z0-9_]{8}\.tmp", re.DOTALL)
#: A temporary file untouched for less than this is left alone, unlocked or not: a writer that locks none
#: (an earlier release) may be writing it still. This release's writers lock theirs (see :func:`_new_temp`).
_STALE_AFTER_S = 2.0
#: How long a folder's listing of temporary files serves before the folder is listed again. Listed for each
#: file written, a folder of 10,000 files took 3.6 ms a file (50,000: 19 ms), time quadratic in its size.
_LISTING_SERVES_S = 60.0
#: How many folders' listings are kept (the oldest listed goes first).
_LISTINGS_KEPT = 256

_listings: dict[str, tuple[float, dict[str, list[str]]]] = {}  # folder: (when listed, {prefix: names})
_listings_lock = threading.Lock()
#: (st_dev, st_ino) of the temporary files this process is writing, which its other threads never take:
#: NFS emulates flock with POSIX locks, which a process does not hold against itself (and drops when it
#: closes any descriptor of the file).
_own_temps: set[tuple[int, int]] = set()


def _remove_stale_temps(path: Path, prefix: str) -> None:
    """Remove the temporary files (named ``prefix``, ``.NAME.``, then as ``mkstemp`` goes on) that writers
    of ``path`` left beside it when killed mid-write (kill -9, out of memory, a power loss): those no
    writer holds a lock on (each holds one on its own until it is renamed or removed, see
    :func:`_new_temp`), untouched for :data:`_STALE_AFTER_S`. Never raises: a file that cannot be looked at,
    locked or removed is left (said at debug level). Nothing is removed where there is no flock (Windows)."""
    if fcntl is None:
        return
    folder = path.parent
    try:
        names = _temp_names(folder, prefix)
    except OSError as e:
        _logger.debug("temporary files in %s not looked for: %s", display_name(folder), e)
        return
    removed = 0
    for name in names:
        temp = os.path.join(folder, name)
        try:
            removed += _remove_if_stale(temp)
        except OSError as e:
            _logger.debug("temporary file %s left: %s", display_name(temp), e)
    if removed:
        _logger.info("removed %d temporary file%s left by an interrupted write of %s", removed,
                     "s" * (removed > 1), display_name(path))


def remove_stale_temps(path: Path) -> None:
    """Remove the temporary files that writers of ``path`` killed mid-write left beside it, as its next write
    does (see :func:`_remove_stale_temps`): for an output a re-run skips, which no write of its own cleans.
    Never raises."""
    _remove_stale_temps(path, _temp_prefix(path.name, name_max(path.parent) or NAME_MAX))


def _temp_names(folder: Path, prefix: str) -> list[str]:
    """The names in ``folder`` of regular files named as :func:`atomic_write`'s temporaries starting with
    ``prefix``, from the folder's listing, made at most every :data:`_LISTING_SERVES_S` (a write of each
    output takes its names from the listing: the next write of the same output finds none)."""
    key = os.path.abspath(folder)
    now = time.monotonic()
    with _listings_lock:
        listed = _listings.get(key)
        if listed is not None and now - listed[0] < _LISTING_SERVES_S:
            return listed[1].pop(prefix, [])
    found: dict[str, list[str]] = {}
    with os.scandir(key) as entries:
        for entry in entries:
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                match = _TEMP_NAME.fullmatch(entry.name)
                if match and entry.is_file(follow_symlinks=False):
                    found.setdefault(match.group(1), []).append(entry.name)
    names = found.pop(prefix, [])
    with _listings_lock:
        _listings.pop(key, None)
        _listings[key] = (now, found)
        while len(_listings) > _LISTINGS_KEPT:
            del _listings[next(iter(_listings))]
    return names


def _remove_if_stale(temp: str) -> bool:
    """Remove ``temp`` if it is a regular file that no other writer holds (its flock is free: a dead
    process's went with it) and unchanged for :data:`_STALE_AFTER_S`; whether it was removed. Raises
    OSError where it cannot be looked at, locked or removed."""
    seen = os.lstat(temp)
    if not stat.S_ISREG(seen.st_mode) or (seen.st_dev, seen.st_ino) in _own_temps:
        return False
    flags = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(temp, os.O_RDWR | flags)  # NFS grants an exclusive flock only on a file open for writing
    except PermissionError:  # a read-only one (a private registry's)
        fd = os.open(temp, os.O_RDONLY | flags)
    try:
        before = os.fstat(fd)  # as the file's server has it, not an attribute cache
        if not os.path.samestat(before, seen) or time.time() - before.st_mtime < _STALE_AFTER_S:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its writer lives
            return False
        after = os.fstat(fd)
        if (after.st_mtime_ns, after.st_size) != (before.st_mtime_ns, before.st_size):
            return False  # written meanwhile: a writer without locks
        if not os.path.samestat(after, os.lstat(temp)):
            return False  # renamed away, another file now bears the name
        os.unlink(temp)
        return True
    finally:
        os.close(fd)


def _new_temp(folder: Path, prefix: str) -> tuple[int, str, tuple[int, tuple[int, int]] | None]:
    """A new temporary file in ``folder`` (``mkstemp``'s): its descriptor, its name, and what holds its lock
    (None where there is none): a second descriptor of it, holding an exclusive flock until the name is
    renamed or removed (then closed, with :func:`_unlock_temp`), and the file's (st_dev, st_ino). Other
    writers' :func:`_remove_stale_temps` leave a locked file alone. One that was taken between its creation
    and its lock (by a cleaner that found it unlocked) is not used: another is made."""
    for _ in range(5):
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
        if fcntl is None:
            return fd, name, None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while a cleaner looks at it
            except OSError as e:  # a file system without locks, where no cleaner can lock it either
                _logger.debug("temporary file %s not locked: %s", display_name(name), e)
                return fd, name, None
            mine = os.fstat(fd)
            try:
                taken = not os.path.samestat(mine, os.lstat(name))
            except FileNotFoundError:
                taken = True
            if not taken:
                key = (mine.st_dev, mine.st_ino)
                lock_fd = os.dup(fd)  # the lock outlives the file's closing, until its name is gone
                _own_temps.add(key)
                return fd, name, (lock_fd, key)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(name)
            except OSError:
                pass
            raise
        os.close(fd)  # its name is not unlinked: another file may bear it now
    raise OSError(errno.EAGAIN, "its temporary files were removed as soon as they were made")


def _unlock_temp(lock: tuple[int, tuple[int, int]] | None) -> None:
    """Release a lock from :func:`_new_temp` (once the temporary file's name is gone)."""
    if lock is not None:
        lock_fd, key = lock
        _own_temps.discard(key)
        os.close(lock_fd)


class _Temporary:
    """The temporary file beside ``path`` that a write of ``path`` goes through (see :func:`atomic_write`),
    from its creation (the stale ones of dead writers removed first, its lock taken, its mode set) to its
    renaming into place (:meth:`place`) or removal (:meth:`discard`, which always comes last). Raises the
    operating system's errors as they are (:func:`_write_errors` words them), and :class:`ImageWriteError`
    where it has words of its own: a name too long for the folder, a file that appeared at ``path`` (see
    :func:`_link_new`)."""

    def __init__(self, path: Path, mode: int | None = None) -> None:
        self.path = path
        try:
            make_folders(path.parent)
        except NotADirectoryError as e:  # ENOTDIR, never EEXIST: that says another run wrote ``path`` first
            raise ImageWriteError(path, e.strerror, errno=e.errno) from e
        longest = name_max(path.parent)
        name_bytes = len(os.fsencode(path.name))
        if longest is not None and name_bytes > longest:
            raise ImageWriteError(path, f"name is {name_bytes} bytes long, more than the {longest} a file name "
                                        f"can have here ({_SHORTER})")  # fmt: skip
        prefix = _temp_prefix(path.name, longest or NAME_MAX)
        _remove_stale_temps(path, prefix)
        fd, self.name, self._lock = _new_temp(path.parent, prefix)
        self.file: BinaryIO = os.fdopen(fd, "wb")
        try:
            os.chmod(self.name, new_file_mode() if mode is None else mode)
        except BaseException:
            self.discard()
            raise

    def flush(self, fsync: bool) -> None:
        """Hand what was written to the operating system and, with ``fsync``, have it on disk."""
        self.file.flush()
        if fsync:
            os.fsync(self.file.fileno())

    def place(self, replace: bool) -> None:
        """Put the file at ``path`` (see :func:`atomic_write` for ``replace``)."""
        self.file.close()
        if replace or not _link_new(self.name, self.path):
            os.replace(self.name, self.path)
            self.name = None
        # else linked: the temporary name goes (discard)

    def discard(self) -> None:
        """Close the file, remove its temporary name where it is left, let go of its lock (once more: nothing)."""
        try:
            self.file.close()
        except OSError:  # its last bytes not written: the file goes anyway
            pass
        if self.name is not None:
            try:
                os.unlink(self.name)
            except OSError:
                pass
            self.name = None
        _unlock_temp(self._lock)
        self._lock = None


_SHORTER = "use a shorter --suffix, or rename the input"


def _write_error(path: Path, e: OSError) -> ImageWriteError:
    """What an operating system's error in a write of ``path`` means for the user."""
    if e.errno == errno.ENAMETOOLONG:
        return ImageWriteError(path, f"name too long for this file system ({_SHORTER})", errno=e.errno)
    return ImageWriteError(path, f"cannot write: {e.strerror or e}", errno=e.errno)


@contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """The operating system's errors inside the block as :class:`ImageWriteError` for ``path``."""
    try:
        yield
    except ImageWriteError:
        raise
    except OSError as e:
        raise _write_error(path, e) from e


@contextmanager
def atomic_write(path: Path, *, fsync: bool = True, replace: bool = True, mode: int | None = None) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: a temporary file beside it, flushed to disk (``fsync``) and
    renamed over ``path`` only when the block completes, removed otherwise. Without ``fsync`` a power loss
    right after the rename can leave ``path`` empty (never a half-written file under its name otherwise).
    ``mode``: the permission bits the file gets (default: a new file's, see :func:`new_file_mode`), set
    before anything is written (a private file's content is never readable by others, even for a moment).

    The temporary files that writers of ``path`` killed mid-write left beside it (``.NAME.XXXXXXXX.tmp``)
    are removed first, never one that a live writer holds (see :func:`_remove_stale_temps`).

    ``replace=False``: ``path`` did not exist when the caller decided to write it, and is not replaced
    should it appear meanwhile (another run writing the same outputs): :class:`ImageWriteError` then, and
    the file that appeared is left as it is (where the file system makes no hard links, it is replaced).

    Raises:
        ImageWriteError: the folder cannot be created or written, the name is too long, or (``replace``
            False) ``path`` appeared while it was being written.
    """
    with _write_errors(path):
        temp = _Temporary(path, mode)
        try:
            yield temp.file
            temp.flush(fsync)
            temp.place(replace)
        finally:
            temp.discard()


def _link_new(tmp_name: str, path: Path) -> bool:
    """Put the finished temporary file at ``path`` too, only if nothing is there (a hard link fails if
    something is, where a rename would replace it); False where the file system makes no hard links (the
    caller renames instead)."""
    try:
        os.link(tmp_name, path)
    except FileExistsError:
        # NFS may answer a retried link() that did succeed with EEXIST: then ``path`` is our own file
        if same_file(tmp_name, path):
            return True
        # errno EEXIST: the caller can tell this from other failures (the output may be the one it would write)
        raise ImageWriteError(path, "appeared while this run was writing it (another run?); left as is",
                              errno=errno.EEXIST) from None
    except OSError as e:
        # Windows reports a FAT or exFAT volume's missing hard links as "Incorrect function" (EINVAL)
        if e.errno in _NO_HARD_LINKS or getattr(e, "winerror", None) in (1, 50):
            return False
        raise
    return True


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` are one file (false when either cannot be looked at)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


#: How every whole PNG ends: its IEND chunk (length 0, type, CRC).
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


#: How far from a PNG's end its IEND chunk is looked for: some tools append bytes after it.
_PNG_END_WINDOW = 4096


def png_is_whole(path: str | Path) -> bool:
    """Whether the PNG at ``path`` holds the chunk that ends a whole one (IEND), in its last few KB (bytes
    some tool appended after it are left alone): a file cut short (a full disk, an interrupted copy) does
    not. False when it cannot be read."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - _PNG_END_WINDOW))
            return _PNG_END in f.read()
    except OSError:
        return False


def is_fifo(path: str | Path) -> bool:
    """Whether ``path`` is a named pipe, which can be read only once (false when it cannot be looked at)."""
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


def write_png(
    path: Path | str,
    picture: Picture,
    color: np.ndarray | None = None,
    text: Mapping[str, str] | None = None,
    *,
    fsync: bool = True,
    replace: bool = True,
) -> None:
    """Write ``picture`` (with ``color`` replacing its colour channels) as a lossless PNG, atomically.

    The PNG goes to a temporary file beside ``path`` and is renamed over it only once complete (and, with
    ``fsync``, on disk). ``text`` entries become PNG text chunks. ``replace=False``: ``path`` is new, and
    a file that appears there meanwhile is not replaced (see :func:`atomic_write`). The file gets a new
    file's mode, less what the picture's own file did not allow its group and others
    (:func:`derived_file_mode`).

    Raises:
        InputError: ``color`` not a numpy array of the picture's shape and dtype (floats in [0, 1], levels
            of another bit depth or another size were written as garbage without a word); a ``ValueError``.
        ImageWriteError: the folder cannot be created or written, or ``path`` appeared (``replace`` False).
    """
    path = Path(path)
    temp = _png_in_temporary(path, picture, color, text)
    try:
        with _write_errors(path):
            temp.flush(fsync)
            temp.place(replace)
    finally:
        temp.discard()


def _png_in_temporary(path: Path, picture: Picture, color: np.ndarray | None,
                      text: Mapping[str, str] | None) -> _Temporary:  # fmt: skip
    """``picture`` (``color`` its colour channels) encoded as a PNG into a new temporary file beside ``path``,
    not yet flushed: the first half of :func:`write_png` (raises as it does)."""
    color = picture.color if color is None else picture.with_color(color).color  # checked as with_color does
    info = PngImagePlugin.PngInfo()
    for cid, data in picture.colour_chunks:  # Pillow writes them before the image data, where they belong
        info.add(cid, data)
    for key, value in (text or {}).items():
        info.add_itxt(key, value)
    extra = {"dpi": picture.dpi} if picture.dpi is not None else {}
    with _write_errors(path):
        temp = _Temporary(path, derived_file_mode(picture.permissions))
        try:
            _to_pil(picture, color).save(temp.file, format="PNG", pnginfo=info, icc_profile=picture.icc_profile,
                                         **extra)  # fmt: skip
        except BaseException:
            temp.discard()
            raise
    return temp


def read_images(paths: Sequence[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Picture | str]:
    """Each file read (:func:`read_image`), with its :attr:`Picture.content_seed`, or the reason it could
    not be: a chunk of an I/O worker's work (it needs no torch)."""
    out: list[Picture | str] = []
    for name in paths:
        try:
            picture = read_image(Path(name), max_pixels=max_pixels)
            picture.content_seed  # noqa: B018  # hashed here, on the worker (cached on the picture)
            out.append(picture)
        except ImageReadError as e:
            out.append(reason_of(e, Path(name)))
        except Exception as e:  # a decoder's own error, or memory: this file fails, not the chunk around it
            out.append(f"cannot decode: {_typed_error_text(e)}")
    return out


class DecodedSize(NamedTuple):
    """What :func:`read_image` makes of a file, known from its header: the picture's colour channels,
    height and width (upright), and the bytes of its levels (colour and alpha: :attr:`Picture.nbytes`)."""

    channels: int
    height: int
    width: int
    nbytes: int


#: The size of a file whose read fails before any pixel is decoded (its header says so).
NO_PIXELS = DecodedSize(0, 0, 0, 0)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: PNG colour type -> (samples a pixel of the file, colour channels of its picture)
_PNG_COLOUR_TYPES = {0: (1, 1), 2: (3, 3), 3: (3, 3), 4: (2, 1), 6: (4, 3)}


def decoded_size(path: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedSize | None:
    """What :func:`read_image` makes of the file at ``path`` (an upper bound of its bytes, exact for the
    usual modes), from its header alone: no pixel is decoded. A PNG's chunks before its pixels, or a JPEG's
    segments, are read directly (15-25 microseconds), other files (and those with EXIF) through Pillow's
    header parsing (70 microseconds for a JPEG: its quantization tables parsed in Python). For bounding the
    memory of the files decoded at once before decoding them.

    :data:`NO_PIXELS` for a file whose read fails on what its header says (none Pillow reads, more pixels
    than ``max_pixels``, none at all, or one that is not there); None where nothing is known without
    reading it: not a regular file (a pipe is read once, by its decode)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with open(path, "rb") as f:
            size = None
            for read_header in (_png_decoded_size, _jpeg_decoded_size, _pillow_decoded_size):
                f.seek(0)
                if (size := read_header(f)) is not None:
                    break
    except Exception:  # gone, unreadable, a header no format takes: its decode fails and says why
        return NO_PIXELS
    if size.height * size.width > max_pixels or size.nbytes == 0:
        return NO_PIXELS
    return size


def _png_decoded_size(f: BinaryIO) -> DecodedSize | None:
    """:func:`decoded_size` of the PNG open at ``f``, from its chunks before the first IDAT (IHDR, and
    whether it has tRNS: a transparent colour becomes an alpha channel); None when it is no PNG, or one
    with an eXIf chunk (its orientation: Pillow reads it)."""
    head = f.read(33)  # the signature and IHDR
    if head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR" or len(head) < 26:
        return None
    width, height, depth, colour_type = struct.unpack(">IIBB", head[16:26])
    if colour_type not in _PNG_COLOUR_TYPES:
        return None
    transparent = False
    f.seek(8 + 12 + struct.unpack(">I", head[8:12])[0])
    while len(chunk := f.read(8)) == 8:
        length, kind = struct.unpack(">I4s", chunk)
        if kind in (b"IDAT", b"IEND"):
            break
        if kind == b"eXIf":
            return None
        transparent = transparent or kind == b"tRNS"
        f.seek(length + 4, os.SEEK_CUR)  # the chunk's data and CRC
    samples, channels = _PNG_COLOUR_TYPES[colour_type]
    # 16-bit samples take two bytes (a palette's, and gray of 1-4 bits, one); a transparent colour, one more
    per_pixel = samples * (2 if depth == 16 else 1) + (transparent and colour_type in (0, 2, 3))
    return DecodedSize(channels, height, width, width * height * per_pixel)


#: JPEG start-of-frame markers (baseline, extended, progressive, lossless; Huffman or arithmetic coded)
_JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
#: JPEG components -> (colour channels of its picture, bytes a pixel): gray, YCbCr, CMYK (made RGB)
_JPEG_COMPONENTS = {1: (1, 1), 3: (3, 3), 4: (3, 3)}


def _jpeg_decoded_size(f: BinaryIO) -> DecodedSize | None:
    """:func:`decoded_size` of the JPEG open at ``f``, from its start-of-frame segment; None when it is no
    JPEG, one with EXIF (its orientation: Pillow reads it), or one whose frame this does not read (12-bit
    samples, a height given after the pixels)."""
    if f.read(3) != b"\xff\xd8\xff":
        return None
    f.seek(2)
    while len(marker := f.read(2)) == 2 and marker[0] == 0xFF:
        kind = marker[1]
        while kind == 0xFF:  # fill bytes before a marker
            kind = f.read(1)[0]
        if kind in (0x01, *range(0xD0, 0xD8)):  # no length
            continue
        if kind in (0xD9, 0xDA):  # the end, or the pixels, before any frame
            return None
        length = struct.unpack(">H", f.read(2))[0]
        segment = f.read(min(length - 2, 8))
        if kind == 0xE1 and segment.startswith(b"Exif\0\0"):
            return None
        if kind in _JPEG_FRAMES:
            precision, height, width, components = struct.unpack(">BHHB", segment[:6])
            if precision != 8 or height == 0 or components not in _JPEG_COMPONENTS:
                return None
            channels, per_pixel = _JPEG_COMPONENTS[components]
            return DecodedSize(channels, height, width, width * height * per_pixel)
        f.seek(length - 2 - len(segment), os.SEEK_CUR)
    return None


#: Pillow mode -> (colour channels of its picture, bytes a pixel of its levels and alpha), as _split keeps
#: them; other modes become RGB. L, RGB and P with a transparent colour get an alpha channel (a byte more).
_MODE_LEVELS = {"1": (1, 1), "L": (1, 1), "LA": (1, 2), "La": (1, 2), "P": (3, 3), "PA": (3, 4), "RGBA": (3, 4),
                "RGBa": (3, 4), "I": (1, 2), **{mode: (1, 2) for mode in GRAY16_MODES}}  # fmt: skip


def _pillow_decoded_size(f: BinaryIO) -> DecodedSize:
    """:func:`decoded_size` of the file open at ``f``, from the header Pillow reads.

    Raises:
        UnidentifiedImageError: no format takes it (and what a broken header raises)."""
    img = _open_unchecked(f)
    if img is None:
        raise UnidentifiedImageError("no format reads it")
    with img:
        channels, per_pixel = _MODE_LEVELS.get(img.mode, (3, 3))
        if img.mode in ("L", "RGB", "P") and "transparency" in img.info:
            per_pixel += 1
        width, height = img.size
        orientation = _exif_orientation(img, _exif_block(img.info))
        if _UPRIGHT.get(orientation) in _SWAPS_AXES:
            width, height = height, width
    return DecodedSize(channels, height, width, width * height * per_pixel)


#: How many outputs :func:`write_pngs` has open at once: their PNGs are written, then all flushed to disk
#: at once (two descriptors each while open).
_WRITTEN_TOGETHER = 32
#: Threads flushing those files to disk at once. On ext4, one fsync after another each waited for a
#: journal commit of its own; at once, they share commits and the disk's queue: 32 outputs of 32x32 were
#: written in 0.32-0.41 ms each instead of 0.45-1.28, with 15-30% less CPU time (2-core Xeon, 2026-11-27;
#: benchmarks/RESULTS.md).
_FLUSHING_THREADS = 8

_flushing_pool: ThreadPoolExecutor | None = None
_flushing_pool_lock = threading.Lock()


def write_pngs(tasks: Sequence[tuple[Path, Picture, np.ndarray, Mapping[str, str], bool, bool]],
               ) -> list[tuple[str | None, int, int | None]]:  # fmt: skip
    """:func:`write_png` for each (path, picture, colour, text, fsync, replace); per file, the reason it
    failed (or None), its :func:`level_distance` to the picture, and the operating system's error number of
    a failed write (``errno.ENOSPC``: the disk is full; else None). A chunk of an I/O worker process's work
    (``--io processes``), or the one file of an I/O thread's (``--io threads``): both write as this does.

    Each file is written as :func:`write_png` writes one (on disk before its rename, with ``fsync``), but
    up to :data:`_WRITTEN_TOGETHER` at a time, their flushes to disk made at once."""
    out: list[tuple[str | None, int, int | None]] = []
    while len(out) < len(tasks):  # each group writes at least its first file (see _write_together)
        out += _write_together(tasks[len(out) : len(out) + _WRITTEN_TOGETHER])
    return out


def _write_together(tasks: Sequence[tuple[Path, Picture, np.ndarray, Mapping[str, str], bool, bool]],
                    ) -> list[tuple[str | None, int, int | None]]:  # fmt: skip
    """:func:`write_pngs` of a few files: every PNG into its temporary file, the flushes to disk at once,
    then each renamed into place. A file that fails at one step fails alone.

    The outcomes of the first files of ``tasks``, at least one: a file that finds no descriptor left for
    its temporary file (a low ``ulimit -n``) while others are open ends the group there, and is left to
    the next group, which starts with it once these are closed."""
    outcomes: list[tuple[str | None, int, int | None] | None] = [None] * len(tasks)
    temps: dict[int, _Temporary] = {}
    try:
        for i, (path, picture, color, text, _, _) in enumerate(tasks):
            try:
                temps[i] = _png_in_temporary(path, picture, color, text)
            except Exception as e:  # an encoder's own error, or memory: this file fails, not the others
                if temps and _out_of_descriptors(e):
                    del outcomes[i:]
                    break
                outcomes[i] = _failed_write(path, e)
        fsynced = [i for i in temps if tasks[i][4]]  # the files whose task asks for fsync
        for i, error in zip(fsynced, _flush_at_once([temps[i] for i in fsynced])):
            if error is not None:
                path = tasks[i][0]
                outcomes[i] = _failed_write(path, _write_error(path, error))
                temps.pop(i).discard()
        for i, temp in temps.items():
            path, picture, color, _, _, replace = tasks[i]
            try:
                with _write_errors(path):
                    temp.place(replace)  # closing flushes those without fsync to the operating system
                outcomes[i] = (None, level_distance(color, picture.color), None)
            except Exception as e:
                outcomes[i] = _failed_write(path, e)
    finally:  # also on an interrupt: no temporary file of this process is left behind
        for temp in temps.values():
            temp.discard()
    return outcomes  # type: ignore[return-value]  # every task taken has its outcome


def _out_of_descriptors(e: Exception) -> bool:
    """Whether ``e`` says that this process (EMFILE) or the system (ENFILE) has no file descriptor left."""
    return isinstance(e, OSError) and e.errno in (errno.EMFILE, errno.ENFILE)


def _failed_write(path: Path, e: Exception) -> tuple[str, int, int | None]:
    """:func:`write_pngs`' outcome of a file that could not be written."""
    if isinstance(e, ImageWriteError):  # reported beside the input's name: this one names the output
        return f"output {path}: {reason_of(e, path)}", 0, e.errno
    if isinstance(e, PreemptError):
        return reason_of(e, path), 0, None
    return f"cannot encode: {_typed_error_text(e)}", 0, None


def _flush_at_once(temps: Sequence[_Temporary]) -> list[OSError | None]:
    """``flush(fsync=True)`` of each file, on threads of their own (:data:`_FLUSHING_THREADS`): the error of
    each (or None). Returns (or raises an interrupt) only once every flush is over: a file is closed only then.
    The flushes that the threads do not take (see :func:`_flushes_submitted`) are made in this thread."""
    if len(temps) <= 1:
        return [_flush_error(temp) for temp in temps]
    futures = _flushes_submitted(temps)
    try:
        refused = [_flush_error(temp) for temp in temps[len(futures) :]]
        return [future.result() for future in futures] + refused
    finally:
        wait_for_futures(futures)


def _flushes_submitted(temps: Sequence[_Temporary]) -> list[Future]:
    """The flushes of the first files of ``temps`` that the flushing threads took: all of them, unless the
    threads refuse work (RuntimeError): once the interpreter shuts down (``write_pngs`` in an ``atexit``
    handler, or in a daemon thread still at work when the program ends), or where no thread can be started."""
    futures: list[Future] = []
    try:
        for temp in temps:
            futures.append(_flushing_threads().submit(_flush_error, temp))
    except RuntimeError:
        pass
    return futures


def _flush_error(temp: _Temporary) -> OSError | None:
    try:
        temp.flush(True)
    except OSError as e:
        return e
    return None


def _flushing_threads() -> ThreadPoolExecutor:
    """This process's threads for :func:`_flush_at_once`, made on first use."""
    global _flushing_pool
    with _flushing_pool_lock:
        if _flushing_pool is None:
            _flushing_pool = ThreadPoolExecutor(_FLUSHING_THREADS, thread_name_prefix="preempt-fsync")
        return _flushing_pool


def _forget_flushing_threads() -> None:
    """In a forked child: a pool's threads are not copied into it (a copy of the parent's pool would take
    the work and never do it), nor is its lock's owner; the child makes its own."""
    global _flushing_pool, _flushing_pool_lock
    _flushing_pool, _flushing_pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_flushing_threads)


def ignore_interrupts() -> None:
    """Start of an I/O worker process: Ctrl-C reaches the whole process group (and a closed terminal's
    SIGHUP), and the main process is the one that stops the run (cancelling the queued work), not each
    worker with a traceback of its own. (SIGTERM stays deadly: the pool stops its workers with it.)"""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # held while the pool started (protect._interrupts_held): let go
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def quiet_pillow_warnings() -> None:
    """Keep Pillow's warnings about files off stderr, process-wide (the commands and their I/O worker
    processes; a library caller keeps Pillow's defaults unless it calls this):

    - ``DecompressionBombWarning``: every image's size is checked against preempt's own limit, which says
      so in one line naming the file; turned into an error only inside ``catch_warnings``, whose filters
      threads reading files at once can undo, it leaked as Pillow's multi-line warning beside that line;
    - broken EXIF or TIFF tags ("Corrupt EXIF data", "tag 274 had too many entries"): two lines each that
      name no file, about metadata an output does not keep (its orientation is read as before: what
      Pillow can make of it, else none)."""
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")


def start_io_worker(main_pid: int) -> None:
    """Start of an I/O worker process of the process ``main_pid``: interrupts ignored
    (:func:`ignore_interrupts`), and the worker ends when that process does. A main process killed (kill
    -9, or SIGTERM before it could stop its pool) left its workers waiting for work forever, and with them
    the forkserver and the resource tracker, holding its stderr open: ``preempt ... 2>&1 | cat`` never
    ended."""
    import threading

    ignore_interrupts()
    quiet_pillow_warnings()  # as the command that started it: these workers decode its files
    threading.Thread(target=_exit_when_gone, args=(main_pid,), name="preempt-watch-main", daemon=True).start()


def quiet_for_a_closed_pool(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    """``sys.excepthook`` of the forkserver of the I/O worker processes (its forked children inherit it):
    quiet for a worker that starts for a pool the main process has already closed, else Python's own.

    The forkserver prints a worker's failed start-up through ``sys.excepthook``. A Ctrl-C in the first
    second of a run closes the pool while workers are still starting, and each of those could no longer
    open the pool's semaphores (FileNotFoundError, in multiprocessing's ``SemLock.__setstate__``): a
    traceback of multiprocessing's internals came after preempt had said that it stopped. Nothing of the
    run is lost there; any other failure is printed as before."""
    if not _started_for_a_closed_pool(error, tb):
        sys.__excepthook__(kind, error, tb)


def _started_for_a_closed_pool(error: BaseException, tb: TracebackType | None) -> bool:
    import traceback

    if not isinstance(error, FileNotFoundError):
        return False
    frames = traceback.extract_tb(tb)
    return bool(frames) and frames[-1].name == "__setstate__" and os.path.basename(frames[-1].filename) == "synchronize.py"


def _exit_when_gone(pid: int) -> None:
    import select
    import time

    try:
        watch = os.pidfd_open(pid)  # readable once the process has ended (Linux >= 5.3)
    except (AttributeError, OSError):
        watch = None
    if watch is not None:
        select.select([watch], [], [])
        os._exit(1)
    if os.name == "nt":  # os.kill would end the process there (no forkserver workers there anyway)
        return
    while True:  # elsewhere: ask every half second
        try:
            os.kill(pid, 0)
        except OSError:  # gone (or its pid reused by another user's process: not ours to signal)
            os._exit(1)
        time.sleep(0.5)


#: :func:`level_distance` compares this many values at a time.
_DISTANCE_BLOCK_ELEMENTS = 1 << 18


def level_distance(levels: np.ndarray, color: np.ndarray) -> int:
    """L-inf distance of two pictures' colour arrays (of one shape), in integer levels.

    A block of values at a time, unsigned levels as the larger minus the smaller in their own dtype: int64
    copies of the whole arrays took 558 MiB and 0.8 s for a 12-megapixel photo (1 MiB and 0.08 s now),
    in the writer, while the next photo computed."""
    if levels.shape != color.shape:
        raise ValueError(f"level arrays of different shapes: {levels.shape} and {color.shape}")
    flat_levels, flat_color = levels.reshape(-1), color.reshape(-1)  # views of the pictures' contiguous arrays
    same_unsigned = levels.dtype == color.dtype and levels.dtype.kind == "u"
    worst = 0
    for start in range(0, flat_levels.size, _DISTANCE_BLOCK_ELEMENTS):
        a = flat_levels[start : start + _DISTANCE_BLOCK_ELEMENTS]
        b = flat_color[start : start + _DISTANCE_BLOCK_ELEMENTS]
        if same_unsigned:  # no wrap-around: the larger minus the smaller
            worst = max(worst, int(np.subtract(np.maximum(a, b), np.minimum(a, b)).max()))
        else:
            worst = max(worst, int(np.abs(a.astype(np.int64) - b.astype(np.int64)).max()))
    return worst


def read_png_text(path: Path | str, *, key: str | None = None) -> dict[str, str]:
    """The text chunks of a PNG (empty for other formats, unreadable files, and anything but a regular file).

    No pixel is decoded. With ``key``, a file whose chunk ``key`` precedes the image data (as Pillow, and
    so preempt, writes them) is answered from the chunks before it; otherwise the chunks after it are read
    too (:func:`_png_text_past_the_pixels`). A file cut short holds the text chunks whole before the cut.
    """
    try:
        # a pipe would be waited on and its bytes consumed (the read of the input then finds them gone), a
        # device read from: neither is a PNG a run wrote
        if not stat.S_ISREG(os.stat(path).st_mode):
            return {}
        with Image.open(path) as img:
            if img.format != "PNG":  # no text chunks to find: do not decode a JPEG for nothing
                return {}
            if key is not None and isinstance(img.info.get(key), str):
                return {k: v for k, v in img.info.items() if isinstance(v, str)}
            return {k: v for k, v in _png_text_past_the_pixels(img).items() if isinstance(v, str)}
    except Exception:
        # unreadable, broken or too large: no text. Any error, a plugin's own too: AVIF's RuntimeError stopped
        # the whole run that met a broken AVIF named as an output
        return {}


#: The chunks that hold a PNG's text.
_PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")


def _png_text_past_the_pixels(img: Image.Image) -> dict[str, str | bytes]:
    """The text chunks of an opened PNG, those after its image data too, read without decoding a pixel.

    ``img.load()`` reached them by decoding the whole image, whatever its size: up to twice Pillow's limit,
    past any ``--max-pixels`` (a crafted PNG of 170 megapixels of one colour, 0.6 MB on disk, took 0.7 GB
    and a second for each file it was asked about). The chunks are walked instead, each text chunk read by
    Pillow's own parser (its limits on compressed text included), the image data skipped unread. A file
    cut short, or broken after its image data, holds the chunks whole before the cut or the break.
    """
    stream, fp = img.png, img.fp  # Pillow's chunk reader, past the chunks before the image data
    fp.seek(img.tile[0][2] - 8)  # back to the first image data chunk's header
    while True:
        try:
            kind, position, length = stream.read()
        except (struct.error, SyntaxError):  # the file ends (cut short, or without IEND), or a chunk's type is
            break  # no name (cut in it, or broken): Pillow's own walk past the pixels stops there too
        if kind == b"IEND":
            break
        if kind in _PNG_TEXT_CHUNKS and length <= PngImagePlugin.MAX_TEXT_CHUNK:
            try:
                stream.call(kind, position, length)
            except OSError:  # the chunk is cut short (Pillow's "Truncated File Read"): the ones before it stand
                break
        fp.seek(position + length + 4)  # past its data and CRC, read or not
    return stream.im_text
