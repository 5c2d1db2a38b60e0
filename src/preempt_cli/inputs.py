"""Turning command-line paths (files, folders, globs, ``-`` for stdin) into an ordered list of inputs."""

from __future__ import annotations

import collections
import functools
import glob
import hashlib
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, TextIO

from .errors import ConfigError, InputError
from ._paths import expand_home
from .imageio import IMAGE_SUFFIXES

__all__ = ["InputFile", "collect_inputs", "as_input_files", "is_hidden_name", "output_path", "assign_outputs", "parse_shard", "in_shard",
           "shard_key", "paths_listed", "without_suffixed_outputs", "read_failure", "OUTPUT_MARKERS", "PROTECTED_SUFFIX",
           "REVERTED_SUFFIX"]

_logger = logging.getLogger(__name__)

#: The default name parts of protect's and revert's outputs: ``<stem>.protected.png``, ``<stem>.reverted.png``.
PROTECTED_SUFFIX, REVERTED_SUFFIX = ".protected", ".reverted"
#: Name parts of files preempt writes itself; folder walks skip them so re-runs never protect outputs.
OUTPUT_MARKERS = (PROTECTED_SUFFIX, REVERTED_SUFFIX)


@dataclass(frozen=True)
class InputFile:
    """One input: its path and the root it was found under (for --out-dir mirroring and folder labels)."""

    path: Path
    root: Path | None = None  # the folder argument it came from; None for files named directly
    #: several folders were given with it (counted even if some hold no image): with ``--out-dir``, each
    #: folder's files go under the folder's name
    among_folders: bool = False
    #: a pattern (an argument with glob characters) that matched nothing: kept as an input so that it
    #: fails alone, saying so, while the other arguments are processed
    unmatched_pattern: bool = False
    #: a folder of a walk that could not be listed, and why: kept as an input so that the run says so
    unlisted: str | None = None

    @property
    def relative(self) -> Path:
        if self.root is None:
            return Path(self.path.name)
        # what relative_to gives, from the parts: Python 3.12's relative_to costs ~25 us a call, and runs
        # take it for every file (output names, shards, folder labels)
        parts, root_parts = self.path.parts, self.root.parts
        if root_parts and parts[: len(root_parts)] == root_parts:
            return Path(*parts[len(root_parts) :])
        return self.path.relative_to(self.root)


def _is_output(path: Path, markers: tuple[str, ...]) -> bool:
    return path.suffix.lower() == ".png" and any(path.stem.endswith(m) for m in markers)


def _walk(folder: Path, markers: tuple[str, ...]) -> list[InputFile]:
    """The image files under ``folder``, sorted. A symbolic link that leads nowhere (its target gone, or a
    loop) is taken too, as a file it cannot read is: it fails with that reason instead of vanishing. So is
    a folder of the tree that cannot be listed (a path past 4,096 bytes, no permission): its images would
    vanish unseen. Links to folders are not followed (they can loop, or lead out of the tree): each is
    logged at ``-v``. Hidden entries are left out (see :func:`is_hidden_name`)."""
    found = []
    unlisted: list[OSError] = []
    for top, folders, files in os.walk(folder, onerror=unlisted.append):
        here = Path(top)
        for name in folders:
            if not is_hidden_name(name) and os.path.islink(here / name):
                _logger.info("%s: a link to a folder, not followed (name it to include its images)", here / name)
        folders[:] = [name for name in folders if not is_hidden_name(name)]
        for name in files:
            p = here / name
            if is_hidden_name(name) or os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES or _is_output(p, markers):
                continue
            if os.path.isfile(p) or _is_broken_link(p) or _cannot_look_at(p):
                found.append(InputFile(p, folder))
    found.extend(InputFile(Path(e.filename), folder, unlisted=e.strerror or str(e)) for e in unlisted
                 if e.filename is not None and not isinstance(e, FileNotFoundError))  # gone since: nothing lost
    return sorted(found, key=lambda item: item.path)


def is_hidden_name(part: str) -> bool:
    """A hidden entry (``.ipynb_checkpoints``, ``._name`` resource forks) or macOS's ``__MACOSX`` folder of
    resource forks: folder walks leave them out (protect's, and train's of an ImageFolder set)."""
    return part.startswith(".") or part == "__MACOSX"


def _is_broken_link(path: Path) -> bool:
    return os.path.islink(path) and not os.path.exists(path)


def _cannot_look_at(path: Path) -> bool:
    """Whether a name a folder listed cannot be looked at (a path of more than 4,096 bytes, deep in a tree):
    taken as an input, it fails with that reason instead of vanishing from the run."""
    try:
        os.lstat(path)
    except FileNotFoundError:  # gone since it was listed
        return False
    except OSError:
        return True
    return False


#: How the image formats preempt reads begin (BMP's two letters with its zero reserved field, which no list
#: of names has): a list of paths that starts so is an image piped in by mistake (``cat a.png | preempt
#: protect -``), whose bytes would otherwise become thousands of nonsense names.
_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", 0, "PNG"), (b"\xff\xd8\xff", 0, "JPEG"), (b"GIF8", 0, "GIF"),
                (b"II*\x00", 0, "TIFF"), (b"MM\x00*", 0, "TIFF"), (b"ftypavif", 4, "AVIF"),
                (b"\x00\x00\x00\x0cjP  ", 0, "JPEG 2000"), (b"\xff\x4f\xff\x51", 0, "JPEG 2000"))  # fmt: skip


def path_list_text(data: bytes, source: str = "stdin", encoding: str | None = None) -> str:
    """``data``, a list of paths read as bytes (from stdin), as text: each name decoded as the file system
    decodes names (``os.fsdecode``: on POSIX a name that is not UTF-8 keeps its bytes, whatever the locale),
    or with ``encoding`` (Windows, whose pipes carry the console's code page, not the file system's UTF-8).

    Raises:
        ConfigError: ``data`` is an image, not a list of paths.
    """
    kind = next((name for magic, at, name in _IMAGE_MAGIC if data[at : at + len(magic)] == magic), None)
    if kind is None and data[:2] == b"BM" and data[6:10] == b"\0\0\0\0":
        kind = "BMP"
    if kind is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        kind = "WebP"
    if kind is None:  # the formats without a signature above (Netpbm, TGA, ICO, ...): as Pillow knows them
        kind = _pillow_format(data)
    first = re.split(b"[\0\n]", data, maxsplit=1)[0]
    named = os.path.lexists(first) or os.path.lexists(first.strip())  # a line of a list may end in \r
    if kind is not None and not named:  # a list whose first file is named GIF89a.png is one
        raise ConfigError(f"{source} holds {kind} image data, not a list of paths: '-' reads the paths of the "
                          f"images, one per line (or NUL-separated); save the image to a file and name that")  # fmt: skip
    return os.fsdecode(data) if encoding is None else data.decode(encoding, errors="replace")


def _pillow_format(data: bytes) -> str | None:
    """The image format Pillow identifies ``data`` as (from its header alone), else None."""
    import io
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a header Pillow finds odd: no image either way
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.format or "image"
        except Exception:  # not an image (what a list of paths is), or one Pillow refuses: not identified
            return None


def paths_listed(text: str) -> list[str]:
    """Paths read from stdin: NUL-separated (``find -print0``) or one per line, blank lines skipped. A line
    is taken as it is, or without its surrounding blanks when only that names an existing file (a CRLF
    list's \r too, also where the file is missing). Lines end at \n alone: a name may hold any other
    character ``str.splitlines`` breaks at (\r, \f, U+0085, U+2028, ...), as ``ls`` lists it. A byte order
    mark before the first path (a list saved by Windows' Notepad or PowerShell) is dropped unless a file's
    name starts with it: invisible in the error, it failed a file that exists as "no such file"."""
    if text.startswith("\ufeff") and not os.path.lexists(re.split("[\0\n]", text, maxsplit=1)[0]):
        text = text[1:]
    if "\0" in text:
        return [p for p in text.split("\0") if p]
    paths = []
    for line in text.split("\n"):
        if line.endswith("\r") and not os.path.lexists(line):
            line = line[:-1]
        if line.strip():
            paths.append(line if os.path.exists(line) or not os.path.exists(line.strip()) else line.strip())
    return paths


def collect_inputs(
    args: Iterable[str | bytes | os.PathLike[str]] | str | bytes | os.PathLike[str], *, stdin: TextIO | None = None,
    skip_markers: tuple[str, ...] = OUTPUT_MARKERS,
) -> list[InputFile]:
    """Expand files, folders (recursive, sorted, hidden entries and links to folders skipped), globs and
    ``-`` (paths on stdin, taken as they are: a listed name is never a pattern). ``args`` is a list of
    paths, or one path (``collect_inputs("photos")``).

    A file named directly (or a pattern that matches nothing) is kept even if it does not exist or is not
    an image, so that it gets its own error later; so is a broken symbolic link in a folder. Folder walks
    leave out preempt's own outputs (names ending in one of ``skip_markers`` before ``.png``). Duplicates
    (one file under several names) are dropped: a name that is not a symbolic link wins over one that is,
    else the first occurrence wins, and it keeps its own place in the order.

    Raises:
        ConfigError: no argument was given, or an empty one.
    """
    # one path, not the list of its characters (iterating "photos" would walk "p", "h", ... and "/")
    args = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
    if not args:
        raise ConfigError("no input paths given")
    if any(os.fsdecode(a) == "" for a in args):  # as Path("") it would be the current folder, walked whole
        raise ConfigError("an empty input path (an unset variable?): name the files or folders to process")
    folders: list[Path] = []
    found = _collect(args, stdin, skip_markers, folders)
    if found:  # (with nothing found at all, the caller's error says so)
        seen = {os.path.abspath(i.root) for i in found if i.root is not None}
        for folder in folders:
            if os.path.abspath(folder) not in seen:  # named among files that were found, it went unnoticed
                seen.add(os.path.abspath(folder))
                _logger.warning("%s: a folder without images to process (preempt's outputs are left out): nothing "
                                "in it is processed", folder)  # fmt: skip
    # Several folders given: an empty one counts too, so that its neighbours' outputs do not move once it
    # holds images (a re-run would not find them)
    if len({os.path.abspath(f) for f in folders}) > 1:
        found = [InputFile(i.path, i.root, among_folders=True) if i.root is not None else i for i in found]
    # one file found under several names (a folder's `link.png -> real.png`): the real name wins, so that
    # its output is named after it, not after whichever link sorts first
    chosen: dict[Path, int] = {}
    for index, item in enumerate(found):
        key = item.path.resolve() if os.path.exists(item.path) else item.path.absolute()
        if key not in chosen or (os.path.islink(found[chosen[key]].path) and not os.path.islink(item.path)):
            chosen[key] = index
    return [found[index] for index in sorted(chosen.values())]


def as_input_files(items: Iterable[InputFile | str | os.PathLike[str]] | str | os.PathLike[str], *,
                   skip_markers: tuple[str, ...] = OUTPUT_MARKERS, suffix: str | None = None,
                   kind: str | None = None) -> list[InputFile]:  # fmt: skip
    """``items`` as inputs: :class:`InputFile` items as they are, paths (or one path) expanded by
    :func:`collect_inputs` with ``skip_markers``, leaving out of folder walks the outputs of this ``kind``
    of run named with ``suffix`` too (:func:`without_suffixed_outputs`); an empty list stays empty.

    Raises:
        InputError: inputs and paths mixed (give paths alone, or ``collect_inputs`` of them); a
            ``TypeError`` too.
        ConfigError: see :func:`collect_inputs`.
    """
    if isinstance(items, (str, bytes, os.PathLike)):
        items = [items]
    items = list(items)
    paths = [i for i in items if not isinstance(i, InputFile)]
    if not paths:  # all InputFile; one given twice would be processed twice into one output
        return list(dict.fromkeys(items))  # type: ignore[arg-type]
    if len(paths) < len(items):
        raise InputError("give InputFile items (from collect_inputs) or paths, not both in one list")
    return without_suffixed_outputs(collect_inputs(paths, skip_markers=skip_markers), suffix, skip_markers, kind)


def without_suffixed_outputs(items: list[InputFile], suffix: str | None, skip_markers: tuple[str, ...],
                             kind: str | None = None) -> list[InputFile]:  # fmt: skip
    """``items`` without the PNGs of folder walks named with this run's ``suffix`` that carry preempt's
    metadata (else a second run with ``--suffix _safe --overwrite`` would protect ``a_safe.png`` again);
    with ``kind`` (``"protected"``, ``"reverted"``), only those whose metadata says they are outputs of
    that kind of run: revert's inputs are protect's outputs, and ``revert --suffix d`` must still take
    ``a.protected.png``. Only those: an original that merely ends like the suffix (``banner-v2.png`` with
    ``--suffix -v2``) is still an input, and so is a file named directly."""
    from .protect import read_preempt_metadata_file  # here: protect imports this module

    if not suffix or suffix in skip_markers:  # the walk already left those out (by name alone)
        return items

    def is_output(item: InputFile) -> bool:
        if item.root is None or item.path.suffix.lower() != ".png" or not item.path.stem.endswith(suffix):
            return False
        meta = read_preempt_metadata_file(item.path)
        return meta is not None and (kind is None or meta.get("kind") == kind)

    return [i for i in items if not is_output(i)]


def _collect(args: list[str | os.PathLike[str]], stdin: TextIO | None, skip_markers: tuple[str, ...],
             folders: list[Path], *, patterns: bool = True) -> list[InputFile]:  # fmt: skip
    """The inputs of ``args`` (see :func:`collect_inputs`); the folders given are added to ``folders``.
    ``patterns``: a missing path with glob characters is a pattern the shell passed on (arguments), not
    one of a list of paths (stdin)."""
    found: list[InputFile] = []
    for arg in args:
        text = os.fsdecode(arg)  # str, bytes (a name as the OS gives it) or a Path
        if text == "-" and patterns:
            listed = paths_listed((stdin if stdin is not None else sys.stdin).read())
            # paths, as find and ls write them: a listed file gone since fails as missing; taken as a
            # pattern, it was replaced unseen by whatever files its name matched (q?.png: qq.png)
            found.extend(_collect(listed, None, skip_markers, folders, patterns=False))
            continue
        path = expand_home(text) if patterns else Path(text)  # a listed path is taken as it is
        if os.path.isdir(path):
            folders.append(path)
            found.extend(_walk(path, skip_markers))
        elif patterns and not os.path.exists(path) and glob.has_magic(text):
            # A pattern the shell passed on as is matched nothing: kept as an input of its own, it fails
            # with that reason while the other arguments are processed.
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
            if not matches:
                found.append(InputFile(path, unmatched_pattern=True))
            for m in matches:
                if os.path.isdir(m):
                    folders.append(m)
                    found.extend(_walk(m, skip_markers))
                else:
                    found.append(InputFile(m))
        else:
            found.append(InputFile(path))
    return found


def read_failure(item: InputFile, reason: str) -> str:
    """Why ``item`` could not be read, from the reader's ``reason``: a command-line pattern that matched
    nothing says so, where the reader (which gets a path, not where it came from) says "no such file"."""
    if item.unlisted is not None:
        return f"a folder that cannot be listed ({item.unlisted}): its images are left out"
    if item.unmatched_pattern and reason == "no such file":
        return "no file matches this pattern"
    if reason == "no such file" and item.root is None and str(item.path).startswith("~"):
        # a list on stdin is taken as it is (before 0.17.0 its ~ was expanded), as the shell leaves ~x
        return "no such file (its ~ was not expanded: no such user, or a path listed on stdin, taken as it is)"
    return reason


def _root_name(root: Path) -> str:
    """A folder argument's own name, as ``cp -r`` uses it (``.`` is the current folder's; a symlink keeps
    its name, not its target's)."""
    return Path(os.path.abspath(root)).name


def output_path(item: InputFile, *, suffix: str, out_dir: Path | None, full_name: bool = False,
                under_root_name: bool = False) -> Path:  # fmt: skip
    """``<stem><suffix>.png`` beside the input, or under ``out_dir`` mirroring the input tree.

    ``full_name`` keeps the input's extension in the name (``a.jpg`` -> ``a.jpg.protected.png``), used when
    two inputs of one folder share a stem. ``under_root_name`` puts a folder's files under ``out_dir/<the
    folder's name>`` (as ``cp -r a b DEST`` does), used when several folders are given.
    """
    return Path(_output_text(item, suffix, out_dir, full_name, under_root_name))


def _output_text(item: InputFile, suffix: str, out_dir: Path | None, full_name: bool, under_root_name: bool) -> str:
    """:func:`output_path` as a string. Joined as strings: pathlib's joins, parents and ``relative_to``
    cost microseconds each (tens on Python 3.12), and a run names an output for every input before its
    first file is decoded."""
    path = str(item.path)
    name = f"{item.path.name if full_name else item.path.stem}{suffix}.png"
    if out_dir is None:
        return os.path.join(os.path.dirname(path), name)
    root = str(item.root) if item.root is not None else None
    if root is None:
        folder = ""
    elif path.startswith(root) and path[len(root) : len(root) + 1] == os.sep and root not in (".", ""):
        folder = os.path.dirname(path[len(root) + 1 :])  # the common case: a file found under its folder
    else:
        folder = os.path.dirname(str(item.relative))
    if under_root_name and item.root is not None:
        folder = os.path.join(_root_name(item.root), folder)
    return os.path.join(str(out_dir), folder, name)


def _resolved(path: str) -> str:
    """``path`` absolute, the links of its folder resolved, case-folded: one key for a file however it is
    named (relative or absolute, through a linked folder, in another case on macOS and Windows). The file's
    own link is kept: writing an output over a link replaces the link, not what it points to."""
    folder, name = os.path.split(path)
    if name in ("", ".", ".."):
        return _real_folder(os.path.abspath(path)).casefold()
    return os.path.join(_real_folder(os.path.abspath(folder or ".")), name).casefold()


@functools.lru_cache(maxsize=4096)
def _real_folder(absolute: str) -> str:
    # once per folder, not per file: a run keys thousands of files of a few folders (cleared by each
    # assign_outputs, so links are taken as they are when a run starts)
    return os.path.realpath(absolute)


def _image_siblings(folder: str, listings: dict[str, dict[str, set[str]]]) -> dict[str, set[str]]:
    """The image files of ``folder`` on disk by case-folded stem (their case-folded names), listed once
    per folder into ``listings``; empty where it cannot be listed."""
    if folder not in listings:
        stems: dict[str, set[str]] = collections.defaultdict(set)
        try:
            with os.scandir(folder or ".") as entries:
                for entry in entries:
                    stem, extension = os.path.splitext(entry.name)
                    if extension.lower() in IMAGE_SUFFIXES and not entry.is_dir():
                        stems[stem.casefold()].add(entry.name.casefold())
        except OSError:
            pass
        listings[folder] = stems
    return listings[folder]


def assign_outputs(items: list[InputFile], *, suffix: str, out_dir: Path | None) -> dict[InputFile, Path | str]:
    """Output path of every input, or why it gets none.

    With ``out_dir``, one folder's tree is mirrored in it; several folders each go under their own name
    (``out_dir/photos/...``), so that their files of the same name do not meet. An input with an image of
    the same stem beside it on disk (``a.jpg``, ``a.png``; not a file named as an output, ``*<suffix>.png``),
    or sharing a stem with another input of the run
    in one output folder, keeps its extension in the name (``a.jpg.protected.png``): the name does not
    depend on which of them a run was given. Names are compared case-folded, as case-insensitive file
    systems (macOS, Windows) see them, and through linked folders. An output that would still be written
    for two inputs (files of the same name named directly or from stdin, or folders of the same name, with
    ``--out-dir``) is refused for every input concerned: silently keeping the last one written would lose
    the others' results. An output that is the input itself, or another existing input of the run that is
    not an earlier output (a PNG with preempt's metadata, which re-runs judge), is refused too, as is one
    that an input links to: writing it would destroy an original, with or without ``--overwrite``.
    """
    from .protect import has_preempt_metadata  # here: protect imports this module

    _real_folder.cache_clear()  # links as they are now: a long-lived process must not keep old ones
    listings: dict[str, dict[str, set[str]]] = {}

    # this run's outputs (and an earlier run's) beside their originals are no images of another original:
    # counted, `z.jpeg`'s output z.protected.png renamed the output of `z.protected.tif` on a re-run
    output_ending = f"{suffix}.png".casefold()

    def has_sibling(item: InputFile) -> bool:
        path = str(item.path)
        names = _image_siblings(os.path.dirname(path), listings).get(item.path.stem.casefold(), set())
        return any(name != item.path.name.casefold() and not name.endswith(output_ending) for name in names)

    # the folders given, not those of this shard's items: every shard of a job must name outputs alike
    # (and those without images too: see collect_inputs)
    several_roots = any(item.among_folders for item in items) or len({i.root for i in items if i.root is not None}) > 1
    first = {item: _output_text(item, suffix, out_dir, False, several_roots) for item in items}
    first_keys = {item: _resolved(p) for item, p in first.items()}
    counts = collections.Counter(first_keys.values())
    chosen: dict[InputFile, tuple[str, str]] = {}
    for item, p in first.items():
        if counts[first_keys[item]] > 1 or has_sibling(item):
            p = _output_text(item, suffix, out_dir, True, several_roots)
            chosen[item] = (p, _resolved(p))
        else:
            chosen[item] = (p, first_keys[item])
    owners: dict[str, list[InputFile]] = collections.defaultdict(list)
    for item, (_, k) in chosen.items():
        owners[k].append(item)
    inputs = {_resolved(str(item.path)): item for item in items}
    # an input that is a link stands for the file it points to: an output written there replaces that file
    inputs.update({os.path.realpath(item.path).casefold(): item for item in items if os.path.islink(item.path)})
    result: dict[InputFile, Path | str] = {}
    for item, (p, k) in chosen.items():
        others = [o for o in owners[k] if o is not item]
        replaced = inputs.get(k)
        # the folder resolved once per run (_real_folder), not once per file
        if out_dir is None and (kernel := _kernel_top(_real_folder(os.path.dirname(os.path.abspath(item.path))))):
            # /dev/fd/63 of `<(cmd)`, /dev/stdin: said before the work, where writing would fail after it
            # (or, for root, litter /dev)
            result[item] = f"no folder to write the output beside ({kernel} is the kernel's): give --out-dir"
        elif replaced is item:
            result[item] = f"output {Path(p)} would replace the input; change --suffix"
        elif replaced is not None and os.path.lexists(replaced.path) and not has_preempt_metadata(replaced.path):
            result[item] = (f"its output {Path(p)} would replace input {replaced.path}, which is not a preempt "
                            f"output: rename one, or change --suffix or --out-dir")  # fmt: skip
        elif others:
            other = others[0]
            if out_dir is None:
                hint = "rename one"
            elif (item.root is not None and other.root is not None and item.root != other.root
                  and _root_name(item.root) == _root_name(other.root)):  # fmt: skip
                hint = f"two folders named {_root_name(item.root)!r} were given: use one --out-dir for each"
            elif item.root is None or other.root is None:
                hint = "give their folders instead, to mirror the tree"
            else:
                hint = "rename one"
            # files of one name: the name they share, not the extension-keeping fallback that also met
            clash = first[item] if first_keys[item] == first_keys[other] else p
            result[item] = f"output {Path(clash)} would also be written for {other.path} ({hint})"
        else:
            result[item] = Path(p)
    return result


#: Folders of the kernel's (Linux), which hold devices and processes, not anyone's files; ``/dev/shm`` is
#: the exception, a file system in memory for files.
KERNEL_FOLDERS = ("/proc", "/dev", "/sys")


def kernel_folder(path: str | os.PathLike[str]) -> str | None:
    """Which of :data:`KERNEL_FOLDERS` ``path`` leads into (``/dev/fd/63`` of ``<(cmd)`` leads into
    ``/proc``), or None."""
    return _kernel_top(os.path.realpath(path))


def _kernel_top(real: str) -> str | None:
    """:func:`kernel_folder` of a path already resolved (no links left)."""

    def under(top: str) -> bool:
        return real == top or real.startswith(top + "/")

    return None if under("/dev/shm") else next((top for top in KERNEL_FOLDERS if under(top)), None)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``K/N`` (1 <= K <= N) -> (K, N).

    Raises:
        ConfigError: malformed.
    """
    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9]+)\s*/\s*([0-9]+)\s*", text)  # digits only: int() also takes 1_0 and ٣
    if match is None:
        raise ConfigError(f"--shard must look like K/N (e.g. 1/4), got {text!r}")
    k, n = int(match[1]), int(match[2])
    if k == 0 and n > 0:  # a job array numbered from 0 (Slurm's default, xargs' slots)
        raise ConfigError(f"--shard K/N counts K from 1, got {text!r} (a job array numbered from 0: "
                          f"--shard $((SLURM_ARRAY_TASK_ID + 1))/{n})")  # fmt: skip
    if not 1 <= k <= n:
        raise ConfigError(f"--shard K/N needs 1 <= K <= N, got {text!r}")
    return k, n


def shard_key(item: InputFile, output: Path | str | None = None, out_dir: Path | str | None = None) -> str:
    """What ``--shard`` hashes: the item's ``output`` (see :func:`assign_outputs`; the input itself where
    it has none) relative to ``out_dir``, or, in place, its last two parts (folder and file name);
    case-folded, with ``/`` between parts.

    So runs that write the same outputs split them alike however they name the inputs (relative or
    absolute paths, ``src`` or ``src/*``, a folder or its files listed on stdin, in any order), and wherever
    the files are: copied to each node's own disk, or mounted at another path on each. In place, two files
    of one name in folders of one name share a key, and so a shard (each file is still in exactly one).
    """
    path = output if isinstance(output, Path) else item.path
    if out_dir is not None and isinstance(output, Path):
        relative = os.path.relpath(os.path.abspath(path), os.path.abspath(out_dir))
        return Path(relative).as_posix().casefold()
    return "/".join(Path(os.path.abspath(path)).parts[-2:]).casefold()


def in_shard(item: InputFile, shard: tuple[int, int] | None, output: Path | str | None = None,
             out_dir: Path | str | None = None) -> bool:  # fmt: skip
    """Whether ``item`` belongs to shard K of N: a stable hash of :func:`shard_key`, the same on every
    machine. ``output``: the item's entry in :func:`assign_outputs`, and ``out_dir`` the run's (without
    them, the input's path is hashed, which splits a run otherwise: give them wherever they are known)."""
    if shard is None:
        return True
    k, n = shard
    digest = hashlib.sha256(os.fsencode(shard_key(item, output, out_dir)))
    return int.from_bytes(digest.digest()[:8], "big") % n == k - 1
