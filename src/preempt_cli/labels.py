"""Ground-truth labels: from a CSV or JSON file, or from ImageFolder folder names.

Labels may be class indices or class names. A file's label is looked up by the longest trailing part of
its path that the file lists (with or without its extension), then by stem, so that ``cat/00003.png``,
``cat/00003``, ``00003.png`` and ``00003`` all work as keys, whatever folder the files are given from. A key
that names a folder is a file of that folder only: ``cat/00003.png`` is not ``dog/00003.png``'s label.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from .errors import LabelError, excerpt, first_line, value_text
from .imageio import IMAGE_SUFFIXES
from .inputs import InputFile
from .registry import ModelConfig

__all__ = ["LabelMap", "read_label_file", "folder_label"]

_FILE_COLUMNS = ("file", "path", "filename", "image", "name")
_LABEL_COLUMNS = ("label", "class", "target", "y")


_AMBIGUOUS = object()


class LabelMap:
    """Labels keyed by path, matched on the longest trailing part of a file's absolute path that an entry
    ends in, with or without the extension (``train/cat/1.png`` finds the entry ``cat/1.png``, then
    ``1.png``, then ``1``; the file ``cat/1.png`` finds the entry ``/data/train/cat/1.png``). An entry that
    names folders matches only files in a folder of that name: ``dog/1.png``, which the file leaves out,
    never takes ``cat/1.png``'s label through the name they share. A key that several entries share with
    different labels (``a/cat/1.png`` and ``b/cat/1.png`` both end in ``cat/1.png``) is ambiguous: a file
    found only through it fails instead of getting the first entry's label."""

    def __init__(self, entries: dict[str, str | int], source: Path) -> None:
        self.source = source
        self._exact: dict[str, str | int] = {}
        self._by_key: dict[str, object] = {}
        # an entry's file name, and its stem, to the entry: named when a file of that name in another
        # folder has no label (its entry names a folder, so is not that file's)
        self._elsewhere: dict[str, str] = {}
        for key, label in entries.items():
            p = Path(key.replace("\\", "/"))
            self._exact[p.as_posix()] = label
            # the entry whole, without its extension too (``cat/1`` finds ``cat/1.png``: the file converted
            # to another format); each trailing part that keeps a folder, with or without it; not the
            # name alone of an entry that names folders: another folder's file of that name is another file
            whole = [p.with_suffix("").as_posix()] if p.suffix.lower() in IMAGE_SUFFIXES else []
            trailing = [Path(*p.parts[i:]) for i in range(1, len(p.parts) - 1)]
            trailing_keys = [k for t in trailing for k in (t.as_posix(), t.with_suffix("").as_posix())]
            for k in dict.fromkeys(whole + trailing_keys):
                known = self._by_key.setdefault(k, label)
                if known is not _AMBIGUOUS and known != label:
                    self._by_key[k] = _AMBIGUOUS
            if len(p.parts) > 1:
                for name in (p.name, p.stem):
                    self._elsewhere.setdefault(name, p.as_posix())

    def __len__(self) -> int:
        return len(self._exact)

    def lookup(self, item: InputFile) -> str | int:
        """The label of ``item``. Raises ``LabelError`` when the file has none, or only an ambiguous one."""
        # absolute: `1.png`, named from its folder, is matched by that folder's name too
        parts = Path(os.path.abspath(item.path)).parts
        # each trailing part as listed with its extension or without (``cat/00003``: ImageNet's synset/id
        # lists), longest first; the stem alone comes last
        tails = [Path(*parts[i:]) for i in range(len(parts))]
        keys = dict.fromkeys(k for t in tails for k in (t.as_posix(), t.with_suffix("").as_posix()))
        for key in keys:
            found = self._exact.get(key, self._by_key.get(key))
            if found is _AMBIGUOUS:
                raise LabelError(f"label of {item.path} is ambiguous in {self.source}: several entries end in "
                                 f"{key!r} with different labels (give the paths relative to the input folder)")  # fmt: skip
            if found is not None:
                return found  # type: ignore[return-value]
        other = self._elsewhere.get(item.path.name, self._elsewhere.get(item.path.stem))
        where = f" ({other} is listed, in another folder)" if other is not None else ""
        raise LabelError(f"no label for {item.path.name} in {self.source}{where}")


def read_label_file(path: Path | str) -> LabelMap:
    """Read labels from CSV (columns file,label; a header row is optional) or JSON (``{file: label}`` or
    a list of ``{"file": ..., "label": ...}``): by the name's ``.json``, or, for a name without ``.csv``
    (a pipe), by a first character ``{`` or ``[``.

    Raises:
        LabelError: missing, unreadable or malformed file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise LabelError(f"cannot read label file {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:  # e.g. a CSV that Excel saved in a Windows code page
        line = e.object[: e.start].count(b"\n") + 1
        raise LabelError(f"{path}: not UTF-8 text (line {line}); save it as UTF-8") from e
    entries: dict[str, str | int] = {}
    # JSON by its name, or by its first character where the name says nothing (a pipe: --labels <(cmd))
    if path.suffix.lower() == ".json" or (path.suffix.lower() != ".csv" and text.lstrip()[:1] in ("{", "[")):
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as e:  # RecursionError: nested past the parser's depth
            raise LabelError(f"{path}: not valid JSON ({first_line(e)})") from e
        if isinstance(doc, dict):
            entries = {str(k): v for k, v in doc.items()}
        elif isinstance(doc, list) and all(isinstance(r, dict) for r in doc):
            for row in doc:
                f = next((row[c] for c in _FILE_COLUMNS if c in row), None)
                lab = next((row[c] for c in _LABEL_COLUMNS if c in row), None)
                if f is None or lab is None:
                    raise LabelError(f"{path}: each entry needs a file and a label field, got {excerpt(row)}")
                entries[str(f)] = lab
        else:
            raise LabelError(f"{path}: expected an object {{file: label}} or a list of objects")
    else:
        try:
            rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
        except csv.Error as e:  # a field past csv's limit (128 KiB): an internal error before
            raise LabelError(f"{path}: not valid CSV ({first_line(e)})") from e
        header = [c.strip().lower() for c in rows[0]] if rows else []
        # a header: one that starts with the file's column, or names a file and a label column in any order
        # ("label,file"; "id,file,label")
        if header and (header[0] in _FILE_COLUMNS or (any(c in _FILE_COLUMNS for c in header)
                                                      and any(c in _LABEL_COLUMNS for c in header))):  # fmt: skip
            fi = next(i for i, c in enumerate(header) if c in _FILE_COLUMNS)
            li = next((header.index(c) for c in _LABEL_COLUMNS if c in header), 1)
            # a row without the label's column fails as one column short, not as the first two taken instead
            rows = [[r[fi], r[li]] if len(r) > max(fi, li) else r[:1] for r in rows[1:]]
        for n, row in enumerate(rows, 1):
            if len(row) < 2:
                raise LabelError(f"{path}: row {n} needs two columns (file,label), got {excerpt(row)}")
            file, label = row[0].strip(), row[1].strip()
            if entries.get(file, label) != label:
                raise LabelError(f"{path}: row {n} gives {value_text(file)} the label {excerpt(label)}, an earlier row "
                                  f"{excerpt(entries[file])}")  # fmt: skip
            entries[file] = label
    if not entries:
        raise LabelError(f"{path}: no labels found")
    for key, value in entries.items():
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise LabelError(f"{path}: label of {value_text(key)} must be a class index or name, got {excerpt(value)}")
    return LabelMap(entries, path)


def folder_label(item: InputFile) -> str:
    """The ImageFolder label of ``item``: the name of its class folder. For a file inside a subfolder of a
    folder argument (``ROOT/<class>/<file>``, given ``ROOT``), that subfolder: the first folder under the
    root; for any other file, the folder holding it: a class folder given itself (``ROOT/*`` names each
    one, as ``--shard`` and ``--out-dir`` take alike), a file named directly, or listed on stdin
    (``find ROOT -name '*.png' | preempt protect - --labels folders``). Those failed, saying that the file
    was not inside a class folder.

    Raises:
        LabelError: the file is in no folder (the file system's root).
    """
    if item.root is not None and item.relative.parent != Path("."):
        return item.relative.parts[0]
    folder = Path(os.path.abspath(item.path)).parent.name
    if not folder:
        raise LabelError(f"{item.path}: --labels folders needs inputs inside class folders (ROOT/<class>/<file>)")
    return folder


def resolve_label(label: str | int, cfg: ModelConfig, where: str) -> int:
    """Class index of ``label`` for the model ``cfg``. Raises ``LabelError``."""
    try:
        return cfg.class_index(label)
    except ValueError as e:
        raise LabelError(f"{where}: {e}") from None
