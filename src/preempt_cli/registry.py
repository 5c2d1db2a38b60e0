"""The model registry: ``models.toml`` rows as frozen :class:`ModelConfig` objects.

One row says where a model's weights come from *and* how to feed it (input size, normalization, classes),
like timm's ``PretrainedCfg``. Registries are layered, later ones adding or overriding entries by name:

1. the built-in ``models.toml`` shipped with preempt,
2. the user registry in the platform's config dir (``$XDG_CONFIG_HOME/preempt/models.toml`` on Linux,
   or the file named by ``PREEMPT_REGISTRY``),
3. files passed explicitly (``--registry FILE``), in order.

A row may name a ``base`` row and change only some fields (e.g. a private key trained from a public model).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import stat
import sys
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from ._paths import expand_home, make_folders
from .errors import ConfigError, ImageWriteError, RegistryError, UnknownModelError, clip, excerpt

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "ModelConfig",
    "Source",
    "parse_source",
    "builtin_registry_path",
    "builtin_class_sets",
    "dataset_class_set",
    "find_class",
    "user_registry_path",
    "load_registry",
    "list_models",
    "get_model_config",
    "register_model",
    "check_registrable",
    "arch_arg_value",
    "DEFAULT_BACKBONE",
    "DEFAULT_CLASSIFIER",
]

ROLES = ("backbone", "classifier", "victim", "any")

_logger = logging.getLogger(__name__)

#: A TOML bare key: anything else (a dot, say) must be quoted in a table header.
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
#: A full git commit hash: the only Hub revision that cannot move.
_COMMIT = re.compile(r"[0-9a-f]{40}")
#: ``scheme://`` at the start of a source: a URL, which (hf:// aside) is no local path.
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
#: The source forms a registry row may use, for error messages.
SOURCE_FORMS = ("use hf://ORG/REPO/FILE[@REVISION], timm:MODEL, file:PATH or a local path (absolute, or relative "
                "to --models-dir or to the registry file)")  # fmt: skip

#: The built-in models used when no --backbone / --classifier is given: small CIFAR-10 ResNet-20s shipped as
#: package data (``preempt_cli/weights/``), so ``preempt protect`` works offline on a fresh install. The
#: default backbone is public, hence no secret: make your own key with ``preempt keygen``.
DEFAULT_BACKBONE = "preempt-resnet20-at"
DEFAULT_CLASSIFIER = "preempt-resnet20-std"


@dataclass(frozen=True)
class Source:
    """Where weights come from: ``kind`` is ``hf``, ``timm`` or ``file``."""

    kind: str
    location: str  # hf: "org/repo"; timm: model name; file: path as written
    filename: str | None = None  # hf only
    revision: str | None = None  # hf only

    @property
    def pinned_to_commit(self) -> bool:
        """An ``hf`` source whose revision is a commit (40 hex digits): its files cannot change upstream."""
        return bool(self.revision and _COMMIT.fullmatch(self.revision))

    def __str__(self) -> str:
        if self.kind == "hf":
            rev = f"@{self.revision}" if self.revision else ""
            return f"hf://{self.location}/{self.filename}{rev}"
        if self.kind == "timm":
            return f"timm:{self.location}"
        return self.location


def parse_source(text: str) -> Source:
    """Parse ``hf://ORG/REPO/FILE@REVISION``, ``timm:MODEL``, ``file:PATH`` or a plain path.

    Raises:
        ValueError: the text is not a valid source.
    """
    text = text.strip()
    if text.startswith("hf://"):
        rest, _, revision = text[len("hf://") :].partition("@")
        parts = rest.split("/")
        if len(parts) < 3 or not all(parts):
            raise ValueError(f"hf source must look like hf://ORG/REPO/FILE[@REVISION], got {text!r}")
        return Source("hf", "/".join(parts[:2]), "/".join(parts[2:]), revision or None)
    if text.startswith("timm:"):
        name = text[len("timm:") :]
        if not name:
            raise ValueError(f"timm source must look like timm:MODEL_NAME, got {text!r}")
        return Source("timm", name)
    if text.startswith("file:"):
        text = text[len("file:") :]
    elif url := _URL_SCHEME.match(text):  # ftp://, https://, s3://...: not a path, and nothing preempt fetches
        raise ValueError(f"unsupported source {text!r}: preempt does not fetch {url.group(0)} URLs; {SOURCE_FORMS}")
    if not text:
        raise ValueError(f"empty source; {SOURCE_FORMS}")
    return Source("file", text)


def close_classes(label: str, names: Sequence[str], most: int = 3) -> list[str]:
    """The class names of ``names`` that ``label`` may have meant, at most ``most``: spelt alike to a name or,
    for timm's ImageNet names, to one of the synonyms it lists ("tench, Tinca tinca"); each given whole, as it
    is always taken. Alike: difflib's ratio 0.6 among a few names, short ones ("kat" for "cat"), 0.8 among
    more, where 0.6 finds words that merely share letters ("boots": "bookcase")."""
    import difflib

    by_word: dict[str, str] = {}
    for name in names:
        for word in (name, *name.split(",")):
            by_word.setdefault(word.strip().lower(), name)
    cutoff = 0.6 if len(by_word) <= 100 else 0.8
    close = difflib.get_close_matches(label.strip().lower(), list(by_word), n=most * 4, cutoff=cutoff)
    return list(dict.fromkeys(by_word[word] for word in close))[:most]


def close_classes_hint(label: str, names: Sequence[str]) -> str:
    """What an unknown class's message ends with: ". Did you mean 'cat'?" (:func:`close_classes`), or nothing."""
    close = close_classes(label, names)
    return f". Did you mean {', '.join(repr(name) for name in close)}?" if close else ""


@dataclass(frozen=True)
class ModelConfig:
    """One registry row: architecture, preprocessing, classes and weights source of a model."""

    name: str
    arch: str
    source: Source
    dataset: str = "unknown"
    input_size: tuple[int, int, int] = (3, 32, 32)
    mean: tuple[float, ...] | None = None  # None: the net takes raw [0, 1] RGB
    std: tuple[float, ...] | None = None
    num_classes: int = 10
    classes: tuple[str, ...] | None = None
    arch_args: Mapping[str, Any] = field(default_factory=dict)
    sha256: str | None = None
    role: str = "any"
    description: str = ""
    paper_name: str = ""  # the name under which the paper or RobustBench lists the model
    notes: str = ""  # how to obtain the weights when no automatic source exists
    registry_file: Path | None = None  # where this row was defined
    #: the registry file whose row set ``source`` (a ``base`` row's, when inherited): a relative ``file:`` path
    #: resolves against its folder; None means ``registry_file``
    source_registry: Path | None = None

    @property
    def source_anchor(self) -> Path | None:
        """The registry file a relative ``file:`` source resolves against."""
        return self.source_registry or self.registry_file

    @property
    def setup_sha256(self) -> str:
        """A digest (16 hex digits) of how the row builds and feeds its weights: architecture and its
        arguments, input size, normalization and classes. Outputs record it beside the weights' sha256: the
        same file under a row fixed since (another shortcut, normalization or class order) is another
        model, whose outputs a re-run must redo."""
        import hashlib
        import json

        setup = [self.arch, dict(self.arch_args), list(self.input_size), self.mean and list(self.mean),
                 self.std and list(self.std), self.num_classes, self.classes and list(self.classes)]  # fmt: skip
        return hashlib.sha256(json.dumps(setup, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def classes_from(self) -> str | None:
        """Where :attr:`class_names` come from, told without reading them: ``"registry"`` (the row's own
        ``classes``), ``"timm"`` (its dataset's, ImageNet-1k's, see :func:`dataset_class_set`), or None (no
        names: labels are class indices)."""
        if self.classes:
            return "registry"
        return "timm" if _takes_timm_classes(self.dataset, self.num_classes) else None

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """The names of the classes: the row's, else its dataset's as timm gives them (ImageNet-1k's, see
        :func:`dataset_class_set`), else None."""
        if self.classes:
            return self.classes
        known = dataset_class_set(self.dataset, self.num_classes)
        return known.names if known else None

    @property
    def class_synsets(self) -> tuple[str, ...] | None:
        """The WordNet synset of each class (``n01440764``: the folders of ImageNet's own layout) where the
        row's dataset has them and the row names no classes of its own, else None."""
        known = None if self.classes else dataset_class_set(self.dataset, self.num_classes)
        return known.synsets if known else None

    def class_name(self, index: int) -> str:
        """Human-readable class name of ``index`` (the index itself when names are unknown)."""
        names = self.class_names
        if names and 0 <= index < len(names):
            return names[index]
        return str(index)

    def class_index(self, label: str | int) -> int:
        """Class index of a label given as index, name or synset. Raises ``ValueError`` if unknown or ambiguous."""
        if isinstance(label, int) or (isinstance(label, str) and label.strip().lstrip("-").isdigit()):
            index = int(label)
            if not 0 <= index < self.num_classes:
                raise ValueError(f"class index {index} out of range 0..{self.num_classes - 1}")
            return index
        found = find_class(label, self.class_names, self.class_synsets)
        if found is None:  # a typo in a label file or folder name: the classes meant, as for a model's name
            hint = close_classes_hint(label, self.class_names or ())
            raise ValueError(f"unknown class {label!r} for model {self.name} ({self.dataset}){hint}")
        return found


@dataclass(frozen=True)
class ClassSet:
    """A data set's classes in the order its models output them: names, and WordNet synsets."""

    names: tuple[str, ...]
    synsets: tuple[str, ...]


#: The data sets whose class names and synsets timm ships (``timm.data.ImageNetInfo``), with their class count:
#: a row of such a dataset with that many classes and no ``classes`` of its own takes them.
_TIMM_CLASS_SETS = {"imagenet-1k": 1000}


def dataset_class_set(dataset: str, num_classes: int) -> ClassSet | None:
    """The classes of ``dataset`` as timm gives them (ImageNet-1k's: names such as ``tench, Tinca tinca`` and
    synsets such as ``n01440764``) where it has ``num_classes`` classes; None for another data set or count,
    or where timm cannot give them."""
    if not _takes_timm_classes(dataset, num_classes):
        return None
    return _timm_class_set(dataset)


def _takes_timm_classes(dataset: str, num_classes: int) -> bool:
    return _TIMM_CLASS_SETS.get(dataset) == num_classes


@lru_cache(maxsize=None)
def _timm_class_set(dataset: str) -> ClassSet | None:
    # read when a label is first resolved, not with the registry: importing timm takes seconds, which listing
    # models or protecting with a CIFAR-10 model should not pay
    try:
        from timm.data import ImageNetInfo

        info = ImageNetInfo(dataset)
        synsets, names = tuple(info.label_names()), tuple(info.label_descriptions())
    except Exception as e:  # missing or broken timm: labels may still be indices
        _logger.warning("timm gives no class names for %s (%s): labels must be class indices", dataset, e)
        return None
    if len(synsets) != _TIMM_CLASS_SETS[dataset] or len(names) != len(synsets):
        _logger.warning("timm gives %d class names for %s, not %d: labels must be class indices", len(synsets),
                        dataset, _TIMM_CLASS_SETS[dataset])  # fmt: skip
        return None
    return ClassSet(names, synsets)


def find_class(label: str, names: Sequence[str] | None, synsets: Sequence[str] | None = None) -> int | None:
    """Index of the class that ``label`` names: a class name as written, else in another case, else a synset
    (``n01440764``); None when it is none of them. Classes with synsets are WordNet's (ImageNet's, as timm
    gives them), whose names list synonyms (``tench, Tinca tinca``): there a label is also any one synonym
    (``tench``), each form in any case, and one that several classes share is ambiguous, a class's whole
    name included (``maillot`` is one class's name and another's synonym).

    Raises:
        ValueError: the name is several classes' (ImageNet's ``crane``, the bird and the machine; ``panda``,
            the lesser and the giant), each named with its synset where known, to be named by that instead.
    """
    text = label.strip()
    if synsets:
        tiers = [list(_wordnet_index(tuple(names or ()), tuple(synsets)).get(text.lower(), ()))]
    else:
        tiers = [[i for i, c in enumerate(names or ()) if c == text],
                 [i for i, c in enumerate(names or ()) if c.lower() == text.lower()]]  # fmt: skip
    for matches in tiers:
        if len(matches) > 1:
            if synsets:  # with the names, which say which synset is the one meant
                named = names or ()
                which = ", ".join(f"{i} ({synsets[i]}: {named[i]})" if i < len(named) else f"{i} ({synsets[i]})"
                                  for i in matches)  # fmt: skip
            else:
                which = ", ".join(map(str, matches))
            raise ValueError(f"class name {label!r} is ambiguous: it names classes {which}; give the index"
                             + (" or the synset" if synsets else ""))  # fmt: skip
        if matches:
            return matches[0]
    return None


@lru_cache(maxsize=4)
def _wordnet_index(names: tuple[str, ...], synsets: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """Each lower-case form that names a WordNet class (its whole name, each synonym the name lists, its synset)
    to the classes it names, in order: built once, not for each of ImageNet's 50000 files."""
    index: dict[str, list[int]] = {}
    for i, synset in enumerate(synsets):
        name = names[i] if i < len(names) else ""
        for form in {f.strip().lower() for f in (name, *name.split(","), synset)} - {""}:
            index.setdefault(form, []).append(i)
    return {form: tuple(found) for form, found in index.items()}


def builtin_registry_path() -> Path:
    """The ``models.toml`` shipped with preempt (package data, or the repository root in a checkout)."""
    packaged = Path(__file__).with_name("models.toml")
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / "models.toml"


def user_config_dir() -> Path:
    """The platform's per-user config directory for preempt."""
    if sys.platform == "win32":
        base = Path(os.environ.get("APPDATA", Path.home() / "AppData" / "Roaming"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "preempt"


def user_registry_path() -> Path:
    """The user registry: ``$PREEMPT_REGISTRY`` or ``<config dir>/models.toml`` (may not exist)."""
    env = os.environ.get("PREEMPT_REGISTRY")
    return expand_home(env) if env else user_config_dir() / "models.toml"


def _floats(value: Any, path: Path, name: str, key: str) -> tuple[float, ...] | None:
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        return None
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        return tuple(float(v) for v in value)
    raise RegistryError(path, f"model {name!r}: {key} must be a list of numbers or \"none\", got {value!r}")


def _short(value: Any) -> str:
    """``repr(value)``, cut for a one-line message."""
    return clip(repr(value), 60)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(row: Mapping[str, Any], key: str, default: str, path: Path, name: str, *, empty_ok: bool = False) -> str:
    """The string field ``key`` of a row (``default`` when absent): refused when not a string, or empty where
    a name is meant (``empty_ok`` for free text, where ``""`` clears an inherited value)."""
    value = row.get(key, default)
    if not isinstance(value, str) or not (empty_ok or value.strip()):
        kind = "a string" if empty_ok else "a non-empty string"
        raise RegistryError(path, f"model {name!r}: {key} must be {kind}, got {_short(value)}")
    return value


def timm_pretrained_cfg(model: str) -> Any:
    """timm's pretrained config of ``model`` (``name.tag``), offline; None when timm does not know it."""
    try:
        from timm.models import get_pretrained_cfg
    except Exception:  # missing, or broken (a torchvision of another torch): loading the model says which
        return None
    try:
        return get_pretrained_cfg(model)
    except Exception:  # an unknown tag raises RuntimeError
        return None


def timm_arch_mismatch(arch: str, location: str) -> str | None:
    """Why ``arch`` cannot be the architecture of the ``timm:`` source ``location`` (``name.tag``), or None.
    timm builds the model the source names; an ``arch`` of preempt's own would be built instead, with
    random weights, and any other name would be ignored."""
    model = location.split(".")[0]
    if arch in (model, location):
        return None
    return f"source timm:{location} loads timm's {model!r}: arch must be {model!r}, not {arch!r}"


def _timm_defaults(name: str, row: Mapping[str, Any], source: Source, path: Path) -> dict[str, Any]:
    """The classes, input size and normalization a ``timm:`` row leaves out, from timm's pretrained config:
    timm drops a pretrained head of another size, so a guessed class count would be a random head."""
    missing = [k for k in ("num_classes", "input_size", "mean", "std") if k not in row]
    if not missing:
        return {}
    pretrained = timm_pretrained_cfg(source.location)
    if pretrained is None:
        if "num_classes" in missing:
            raise RegistryError(path, f"model {name!r}: timm has no pretrained config for {source.location!r} "
                                      "to take num_classes from; give num_classes")  # fmt: skip
        return {}
    defaults: dict[str, Any] = {}
    if "num_classes" in missing:
        if not pretrained.num_classes:
            raise RegistryError(path, f"model {name!r}: timm's {source.location!r} has no classifier head")
        defaults["num_classes"] = int(pretrained.num_classes)
    if "input_size" in missing and pretrained.input_size:
        defaults["input_size"] = list(pretrained.input_size)
    if "mean" in missing and "std" in missing and pretrained.mean and pretrained.std:
        defaults["mean"], defaults["std"] = list(pretrained.mean), list(pretrained.std)
    return defaults


def _check_hf_source(name: str, source: Source, sha: Any, path: Path) -> None:
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return
    try:
        validate_repo_id(source.location)
    except HFValidationError as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RegistryError(path, f"model {name!r}: {source.location!r} is not a valid Hub repo id: {reason}") from e
    if ".." in Path(source.filename or "").parts:  # the Hub refuses it only at download, with its own error
        raise RegistryError(path, f"model {name!r}: {source} names a file outside its repository ('..')")
    if sha and not source.pinned_to_commit:
        _logger.warning(
            "%s: model %r pins a sha256 but its source %s follows %s, which can move: pin a commit (@<40-hex sha>)",
            path, name, source, f"the revision {source.revision!r}" if source.revision else "the main branch",
        )


#: Keyword arguments of ``timm.create_model`` that load weights or choose them: never from ``arch_args``.
_WEIGHT_LOADING_ARGS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                                  "cache_dir"})  # fmt: skip


def _all_finite(value: Any) -> bool:
    """Whether every float in ``value`` (a TOML value: tables and arrays looked into) is finite."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, Mapping):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_all_finite(v) for v in value)
    return True


def arch_arg_value(text: str) -> Any:
    """``text`` (a value of ``train --arch-arg KEY=VALUE``) as a row's ``arch_args`` would give it: TOML's integers,
    floats, booleans, quoted strings and arrays, else the text as it is (a bare word: ``shortcut=pad_end``).
    Whole numbers are integers also where TOML refuses them (``08``).

    Raises:
        ValueError: a number that is not finite (``nan``, ``inf``), which no row may hold.
    """
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    if not _plain(value):  # a TOML date or table (or an array holding one): as text
        return text
    if not _all_finite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


def _plain(value: Any) -> bool:
    """A boolean, number or string, or an array of those."""
    return isinstance(value, (bool, int, float, str)) or (isinstance(value, list) and all(map(_plain, value)))


#: A sha256 pin as a row may write it: 64 hex digits, in either case, after an optional ``sha256:`` (the form
#: of pip's ``--hash`` and of OCI digests).
_PIN = re.compile(r"(?:sha256:)?([0-9a-f]{64})", re.IGNORECASE)


def _pin(value: Any, path: Path, name: str) -> str | None:
    """The ``sha256`` of a row as 64 lower-case hex digits (None when absent).

    Raises:
        RegistryError: anything else, named with what was given and how long it is.
    """
    if value is None:
        return None
    match = _PIN.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        # whole up to a prefixed pin's length and more: a cut pin would hide where it is wrong
        given = f"{clip(repr(value), 100)} ({len(value)} characters)" if isinstance(value, str) else _short(value)
        raise RegistryError(path, f"model {name!r}: sha256 must be 64 hex digits (a string, 'sha256:' before them "
                                  f"allowed), got {given}")  # fmt: skip
    return match.group(1).lower()


def _parse_row(
    name: str, row: Mapping[str, Any], path: Path, class_sets: Mapping[str, Any], source_registry: Path | None = None
) -> ModelConfig:
    if not name.strip():  # [models.""]: no command could name it, and every "did you mean" offered it
        raise RegistryError(path, "a model has an empty name ([models.\"\"])")
    known = {
        "arch", "source", "dataset", "input_size", "mean", "std", "num_classes", "classes", "arch_args",
        "sha256", "role", "description", "paper_name", "notes", "base",
    }  # fmt: skip
    unknown = set(row) - known
    tables = sorted(k for k in unknown if isinstance(row[k], dict))
    if tables:  # [models.key.v2] nests a table "v2" in the row "key": a name holding a dot must be quoted
        dotted = _toml_key(f"{name}.{tables[0]}")
        raise RegistryError(path, f"model {name!r}: unknown field(s) {', '.join(sorted(unknown))}: for a model "
                                  f"named {name}.{tables[0]}, quote the name in its header: [models.{dotted}]")  # fmt: skip
    if unknown:
        raise RegistryError(path, f"model {name!r}: unknown field(s) {', '.join(sorted(unknown))}")
    for required in ("arch", "source"):
        if required not in row:
            raise RegistryError(path, f"model {name!r}: missing field {required!r}")
    arch = _text(row, "arch", "", path, name)
    texts = {key: _text(row, key, default, path, name, empty_ok=key != "dataset")
             for key, default in (("dataset", "unknown"), ("description", ""), ("paper_name", ""), ("notes", ""))}  # fmt: skip
    if not isinstance(row["source"], str):
        raise RegistryError(path, f"model {name!r}: source must be a string; {SOURCE_FORMS}")
    try:
        source = parse_source(row["source"])
    except ValueError as e:
        raise RegistryError(path, f"model {name!r}: {e}") from e
    sha = _pin(row.get("sha256"), path, name)
    if source.kind == "timm":
        mismatch = timm_arch_mismatch(arch, source.location)
        if mismatch:
            raise RegistryError(path, f"model {name!r}: {mismatch}")
        if sha:
            raise RegistryError(path, f"model {name!r}: a sha256 pin cannot be checked on a timm: source (timm "
                                      "fetches and loads its own file); remove the pin, or register the weights "
                                      "as an hf:// or file: source")  # fmt: skip
        row = {**row, **_timm_defaults(name, row, source, path)}
    elif source.kind == "hf":
        _check_hf_source(name, source, sha, path)
    size = row.get("input_size", [3, 32, 32])
    if _is_int(size):
        size = [3, size, size]
    if not (isinstance(size, list) and len(size) == 3 and all(_is_int(s) and s > 0 for s in size)):
        raise RegistryError(path, f"model {name!r}: input_size must be [C, H, W] or an int, got {size!r}")
    classes = row.get("classes")
    if isinstance(classes, str):
        if classes not in class_sets:
            raise RegistryError(path, f"model {name!r}: unknown class set {classes!r}")
        classes = class_sets[classes]
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise RegistryError(path, f"model {name!r}: classes must be a list of names or a class-set name")
    num_classes = row.get("num_classes", len(classes) if classes else 10)
    if not _is_int(num_classes) or num_classes < 1:
        raise RegistryError(path, f"model {name!r}: num_classes must be a positive integer, got {num_classes!r}")
    if classes and len(classes) != num_classes:
        raise RegistryError(path, f"model {name!r}: {len(classes)} class names for {num_classes} classes")
    mean = _floats(row.get("mean"), path, name, "mean")
    std = _floats(row.get("std"), path, name, "std")
    if (mean is None) != (std is None):
        raise RegistryError(path, f"model {name!r}: give both mean and std, or neither")
    if mean is not None and std is not None:
        if len(mean) != size[0] or len(std) != size[0]:
            raise RegistryError(path, f"model {name!r}: mean and std need {size[0]} values (one per input channel), "
                                      f"got {len(mean)} and {len(std)}")  # fmt: skip
        if not all(math.isfinite(v) for v in (*mean, *std)):  # nan/inf in TOML: every pixel would be NaN or 0
            raise RegistryError(path, f"model {name!r}: mean and std must be finite numbers, got {list(mean)} and "
                                      f"{list(std)}")  # fmt: skip
        if any(s <= 0 for s in std):
            raise RegistryError(path, f"model {name!r}: std values must be positive, got {list(std)}")
    arch_args = row.get("arch_args", {})
    if not isinstance(arch_args, Mapping):
        raise RegistryError(path, f"model {name!r}: arch_args must be a table (e.g. {{ depth = 28 }}), got {arch_args!r}")
    loaders = sorted(_WEIGHT_LOADING_ARGS & set(arch_args))
    if loaders:
        # timm.create_model takes them: a checkpoint_path loads a pickle over the row's source and pin
        raise RegistryError(path, f"model {name!r}: arch_args cannot set {', '.join(loaders)}: a model's weights "
                                  "come from its source (and are checked against its sha256): convert them to "
                                  "safetensors and give source = \"file:PATH\"")  # fmt: skip
    if not _all_finite(arch_args):
        raise RegistryError(path, f"model {name!r}: arch_args must hold finite numbers, got {dict(arch_args)}")
    role = row.get("role", "any")
    if not isinstance(role, str) or role not in ROLES:
        raise RegistryError(path, f"model {name!r}: role must be one of {', '.join(ROLES)}")
    return ModelConfig(
        name=name,
        arch=arch,
        source=source,
        dataset=texts["dataset"],
        input_size=(size[0], size[1], size[2]),
        mean=mean,
        std=std,
        num_classes=num_classes,
        classes=tuple(classes) if classes else None,
        arch_args=dict(arch_args),
        sha256=sha,
        role=role,
        description=texts["description"],
        paper_name=texts["paper_name"],
        notes=texts["notes"],
        registry_file=path,
        source_registry=source_registry if source_registry is not None and source_registry != path else None,
    )


def _binary_kind(data: bytes) -> str | None:
    """What a file passed as a registry is, when it is recognisably weights rather than text."""
    from .hub import looks_like_checkpoint  # here: hub imports this module

    if len(data) > 9 and b"\0" in data[:8] and data[8:9] == b"{" and int.from_bytes(data[:8], "little") <= len(data) - 8:
        return "a safetensors weights file"
    if looks_like_checkpoint(data[:4]):
        return "a PyTorch checkpoint"
    return None


def _not_text(data: bytes, error: UnicodeDecodeError) -> str:
    """Why ``data`` (not UTF-8) is no registry."""
    where = f"byte 0x{data[error.start]:02x} at offset {error.start}" if error.start < len(data) else "its end"
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return f"UTF-16 text, not UTF-8 ({where}): a TOML registry must be UTF-8; save it again as UTF-8"
    return f"not UTF-8 text ({where}): a TOML registry must be UTF-8 text"


def _read_toml(path: Path) -> dict[str, Any]:
    """A registry file's TOML document, with its ``models`` and ``classes`` checked to be tables.

    Raises:
        RegistryError: the file is missing, a directory, unreadable, not UTF-8, not TOML, or not shaped as a
            registry.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise RegistryError(path, "registry file not found") from e
    except IsADirectoryError as e:
        raise RegistryError(path, "is a directory, not a registry file (a TOML file)") from e
    except OSError as e:
        raise RegistryError(path, f"cannot be read: {e.strerror or e}") from e
    return _parse_registry(path, data)


def _parse_registry(path: Path, data: bytes) -> dict[str, Any]:
    """The TOML document of ``data``, the registry file ``path``'s bytes: see :func:`_read_toml`.

    Raises:
        RegistryError: ``data`` is not UTF-8, not TOML, or not shaped as a registry.
    """
    binary = _binary_kind(data)
    if binary:
        raise RegistryError(path, f"not a TOML registry but {binary}: name weights in a registry row's source, "
                                  "and pass the registry (.toml) with --registry")  # fmt: skip
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark (Windows editors) is no TOML: left out
    except UnicodeDecodeError as e:
        raise RegistryError(path, _not_text(data, e)) from e
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RegistryError(path, f"not valid TOML: {e}") from e
    for table, example in (("models", "[models.NAME]"), ("classes", "[classes] NAME = [...]")):
        value = doc.get(table, {})
        if not isinstance(value, dict):
            raise RegistryError(path, f"{table!r} must be a table ({example}), got {_short(value)}")
    for set_name, names in doc.get("classes", {}).items():
        if not (isinstance(names, list) and names and all(isinstance(c, str) for c in names)):
            raise RegistryError(path, f"class set {set_name!r} must be a list of class names, got {_short(names)}")
    return doc


def builtin_class_sets() -> dict[str, tuple[str, ...]]:
    """The class sets of the built-in registry (``[classes]``: e.g. ``cifar10``), by name.

    Raises:
        RegistryError: the built-in registry cannot be read (a broken install).
    """
    return {name: tuple(names) for name, names in _read_toml(builtin_registry_path()).get("classes", {}).items()}


@lru_cache(maxsize=32)
def _load_cached(paths: tuple[tuple[Path, float], ...]) -> dict[str, ModelConfig]:
    models: dict[str, ModelConfig] = {}
    class_sets: dict[str, Any] = {}
    for path, _mtime in paths:
        doc = _read_toml(path)
        extra = set(doc) - {"classes", "models"}
        if extra:
            raise RegistryError(path, f"unknown top-level table(s) {', '.join(sorted(extra))}")
        class_sets.update(doc.get("classes", {}))
        _load_file(path, doc.get("models", {}), models, class_sets)
    return models


def _load_file(path: Path, rows: Mapping[str, Any], models: dict[str, ModelConfig], class_sets: Mapping[str, Any]) -> None:
    """Add the rows of one registry file to ``models`` (the lower registries' models), in file order, each
    ``base`` row after the row of this file it names (wherever it is written); a row naming itself as its
    base extends the lower registries' row of that name.

    Raises:
        RegistryError: an invalid row, an undefined base, or bases that form a cycle.
    """
    lower = dict(models)
    for name, row in rows.items():
        if not isinstance(row, dict):
            raise RegistryError(path, f"model {name!r}: expected a table")
    done: set[str] = set()

    def add(name: str, chain: tuple[str, ...]) -> None:
        row = rows[name]
        replaced = lower.get(name)
        if replaced is not None and replaced.registry_file != path and row.get("base") != name:
            # a row that names its own base extends the lower one on purpose; anything else hides it
            _logger.warning("%s: model %r replaces the one defined in %s", path, name, replaced.registry_file)
        source_registry = None
        if "base" in row:
            base_name = row["base"]
            if not isinstance(base_name, str) or not base_name:
                raise RegistryError(path, f"model {name!r}: base must be a model name (a string), got {_short(base_name)}")
            if base_name == name:  # extends the row of that name in a lower registry
                base = lower.get(name)
                if base is None:
                    raise RegistryError(path, f"model {name!r}: base is the model itself (a cycle: {name} -> {name}), "
                                              f"and no lower registry defines {name!r} for it to extend")  # fmt: skip
            elif base_name in rows:  # a row of this file: it comes first, wherever it is written
                if base_name in chain:
                    cycle = " -> ".join(chain[chain.index(base_name) :] + (name, base_name))
                    raise RegistryError(path, f"model {name!r}: base models form a cycle: {cycle}")
                if base_name not in done:
                    add(base_name, chain + (name,))
                base = models[base_name]
            else:
                base = models.get(base_name)
                if base is None:
                    raise RegistryError(path, f"model {name!r}: base model {base_name!r} is not defined")
            inherited = _as_row(base)
            if "source" in row and "sha256" not in row:
                inherited.pop("sha256")  # the base's pin describes the base's file, not this new one
            if "source" not in row:
                source_registry = base.source_anchor  # a relative path stays relative to where it was written
            if "classes" not in row and row.get("num_classes", inherited.get("num_classes")) != inherited.get("num_classes"):
                inherited.pop("classes", None)  # the base's names are of its classes, not of another count
            row = {**inherited, **{k: v for k, v in row.items() if k != "base"}}
        models[name] = _parse_row(name, row, path, class_sets, source_registry)
        done.add(name)

    for name in rows:
        if name not in done:
            add(name, ())


def _as_row(cfg: ModelConfig) -> dict[str, Any]:
    """A config back as a registry row (for ``base`` inheritance)."""
    return {
        "arch": cfg.arch,
        "source": str(cfg.source) if cfg.source.kind != "file" else cfg.source.location,
        "dataset": cfg.dataset,
        "input_size": list(cfg.input_size),
        "mean": list(cfg.mean) if cfg.mean else "none",
        "std": list(cfg.std) if cfg.std else "none",
        "num_classes": cfg.num_classes,
        "classes": list(cfg.classes) if cfg.classes else None,
        "arch_args": dict(cfg.arch_args),
        "sha256": cfg.sha256,
        "role": cfg.role,
        "description": cfg.description,
        "paper_name": cfg.paper_name,
        "notes": cfg.notes,
    }


def _existing_user_registry() -> Path | None:
    """The user registry file, or None where the default one (in the config dir) does not exist yet.

    Raises:
        RegistryError: ``PREEMPT_REGISTRY`` names no file (a typo would otherwise drop its models without a
            word, as a missing ``--registry`` file does not), or the user registry is a folder or not a
            regular file.
    """
    user = user_registry_path()
    named = bool(os.environ.get("PREEMPT_REGISTRY"))
    if os.path.isfile(user):
        return user
    if os.path.exists(user):  # a folder there is a mistake to name, not "no registry"
        kind = "a directory" if os.path.isdir(user) else "not a regular file"
        raise RegistryError(user, f"{'PREEMPT_REGISTRY' if named else 'the user registry'} is {kind}, not a "
                                  "registry file (a TOML file)")  # fmt: skip
    if named:  # the default one is created by the first train or keygen; a file named is meant to exist
        raise RegistryError(user, "PREEMPT_REGISTRY names no file (registry file not found): correct it, create "
                                  "the file (an empty one is an empty registry), or unset PREEMPT_REGISTRY")  # fmt: skip
    return None


def registry_files(extra: Iterable[Path | str] | Path | str = ()) -> list[Path]:
    """The registry files in effect, lowest precedence first. ``extra``: files, or one file."""
    if isinstance(extra, (str, os.PathLike)):  # one file, not the list of its characters ("r", "e", ...)
        extra = [extra]
    files = [builtin_registry_path()]
    user = _existing_user_registry()
    if user is not None:
        files.append(user)
    for p in extra:
        p = expand_home(p)
        if os.path.isdir(p):
            raise RegistryError(p, "is a directory, not a registry file (a TOML file)")
        if not os.path.isfile(p):
            raise RegistryError(p, "registry file not found" if not os.path.exists(p) else "not a regular file")
        files.append(p)
    return files


def load_registry(extra: Sequence[Path | str] | Path | str = ()) -> dict[str, ModelConfig]:
    """All registered models by name (built-in, user, then ``extra`` files).

    Raises:
        RegistryError: a file is missing, not TOML, or has an invalid row.
    """
    files = registry_files(extra)
    key = tuple((p.resolve(), p.stat().st_mtime) for p in files)
    return dict(_load_cached(key))


def list_models(extra: Sequence[Path | str] | Path | str = (), *, role: str | None = None) -> list[str]:
    """Registered model names, sorted; optionally only those of one role (with those of role ``any``).

    Raises:
        ConfigError: ``role`` is none of :data:`ROLES` (it listed the rows of role any, as if valid).
    """
    if role is not None and role not in ROLES:
        raise ConfigError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    models = load_registry(extra)
    return sorted(n for n, c in models.items() if role is None or c.role in (role, "any"))


def get_model_config(name: str, extra: Sequence[Path | str] | Path | str = ()) -> ModelConfig:
    """The config registered under ``name``.

    Raises:
        UnknownModelError: no registry has that name.
        ConfigError: ``name`` is not a string (it failed with AttributeError).
        RegistryError: see :func:`load_registry`.
    """
    if not isinstance(name, str):
        raise ConfigError(f"model name must be a string, got {excerpt(name)} ({type(name).__name__})")
    models = load_registry(extra)
    try:
        return models[name]
    except KeyError:
        raise UnknownModelError(name, sorted(models)) from None


def with_source(cfg: ModelConfig, source: str) -> ModelConfig:
    """A copy of ``cfg`` whose weights come from ``source`` instead."""
    return replace(cfg, source=parse_source(source), sha256=None)


def _toml_key(key: str) -> str:
    """``key`` as a TOML key: bare when it can be, else quoted (a dot would otherwise nest tables)."""
    return key if _BARE_KEY.fullmatch(key) else _toml_value(key)


def _toml_value(value: Any) -> str:
    """``value`` as a TOML literal (the scalar, list and inline-table values a registry row uses)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _builtin_names() -> set[str]:
    return set(_read_toml(builtin_registry_path()).get("models", {}))


def _link_target(path: Path) -> Path:
    """The file a write to the registry ``path`` changes: where a symbolic link leads (a registry kept in a
    dotfiles repository), not the link, which renaming a new file into place would replace."""
    return Path(os.path.realpath(path))


def _check_writable(path: Path) -> None:
    """Refuse a registry file that could not be written, before the work whose result it would hold (a
    trained model): a folder or a looping link there, a file where its folder should be, or a folder this
    process cannot write (a temporary file is created and removed there; missing folders are not created
    yet, their nearest existing one is tried).

    Raises:
        RegistryError: one line saying which.
    """
    target = _link_target(path)
    if os.path.islink(target):  # realpath stops at a loop
        raise RegistryError(path, "is a symbolic link that leads to no file (a loop): point it at a file")
    if os.path.exists(target) and not os.path.isfile(target):
        kind = "a directory" if os.path.isdir(target) else "not a regular file"
        raise RegistryError(path, f"is {kind}, not a registry file (a TOML file)")
    from .imageio import folder_write_problem  # not at the top: `preempt models list` need not import Pillow

    problem = folder_write_problem(target)  # its missing folders are created when the registry is written
    if problem:
        raise RegistryError(path, f"cannot be written: {problem}")


#: what a model's name is made of, as messages say it
MODEL_NAME_CHARACTERS = "letters, digits, '-', '_', '.'"


def valid_model_name(name: str) -> bool:
    """Whether ``name`` can name a model in a registry: one or more letters, digits, ``-``, ``_``, ``.``."""
    return bool(name) and all(c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_." for c in name)


def check_registrable(name: str, path: Path | str | None = None, *, overwrite: bool = False) -> Path:
    """Check, before any work is done, that ``register_model(name, ..., path, overwrite=overwrite)`` can
    succeed: a valid name, not a built-in model's (unless ``overwrite``), not already in ``path`` (unless
    ``overwrite``), and a registry file that can be written. Returns the registry file that would be written
    (default: the user registry).

    Raises:
        RegistryError: the name is invalid, a built-in model's, or already registered there; the registry
            file cannot be written; ``PREEMPT_REGISTRY`` names no file.
    """
    if path is None:
        _existing_user_registry()  # a PREEMPT_REGISTRY naming no file is refused here too
        path = user_registry_path()
        try:
            _check_writable(path)
        except RegistryError as e:  # the user did not name this file: say how to register elsewhere
            raise RegistryError(path, f"{e.reason}; name a registry you can write with PREEMPT_REGISTRY, or "
                                      "pass --no-register") from None  # fmt: skip
    else:
        path = expand_home(path)
        _check_writable(path)
    if not valid_model_name(name):
        raise RegistryError(path, f"invalid model name {name!r} ({MODEL_NAME_CHARACTERS})")
    if overwrite:
        # a row in a form that cannot be replaced is found now, not after the training it would register
        if path.is_file() and name in _read_toml(path).get("models", {}):
            _text_without_row(path, path.read_text(encoding="utf-8-sig"), name)
        return path
    builtin = builtin_registry_path()
    if name in _builtin_names() and not (path.is_file() and path.resolve() == builtin.resolve()):
        raise RegistryError(path, f"{name!r} is a built-in model; registering it would hide the built-in one from "
                                  "every command: choose another name (--name), or pass --overwrite to replace "
                                  "it")  # fmt: skip
    if path.is_file() and name in _read_toml(path).get("models", {}):
        raise RegistryError(path, f"model {name!r} is already registered here (replace it with --overwrite)")
    return path


def register_model(name: str, row: Mapping[str, Any], path: Path | None = None, *, overwrite: bool = False) -> Path:
    """Add (or with ``overwrite`` replace) the row ``[models.NAME]`` in a registry file, by default the user
    registry; other rows and comments are kept. Returns the file written. A name that is not a TOML bare key
    (``key.v2``) is written quoted (``[models."key.v2"]``).

    A registry that is a symbolic link is written through: its target changes, keeping its permissions
    (it lists where private keys are).

    Raises:
        RegistryError: the name is invalid, a built-in model's or already registered here and ``overwrite``
            is false, the row is invalid, or the file cannot be written.
    """
    path = check_registrable(name, path, overwrite=overwrite)
    target = _link_target(path)  # a link is written through, not replaced by a file of its own
    with _registry_lock(target):  # two jobs registering at once each kept only its own row
        _register_locked(name, row, target, overwrite=overwrite)
    _load_cached.cache_clear()
    return path


@contextlib.contextmanager
def _registry_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path``'s read-modify-write, on a lock file beside it (the registry is
    replaced, not rewritten, so a lock on the file itself would be on an inode no longer read). Where the
    platform has no ``fcntl`` (Windows), there is no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    lock_path = path.with_name(f".{path.name}.lock")
    try:
        make_folders(path.parent)  # a file in its way: named, not "File exists"
        lock = open(lock_path, "a")
    except OSError as e:  # checked before the work, but the folder may have changed since
        raise RegistryError(path, f"cannot be written: cannot create its lock file {lock_path} "
                                  f"({e.strerror or e})") from None  # fmt: skip
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _without_row(text: str, name: str) -> str:
    """``text`` without the ``[models.NAME]`` table (its header may carry a comment). Comment lines just
    before the next table stay: they describe that one."""
    headers = {f"[models.{_toml_key(name)}]", f"[models.{name}]", f'[models."{name}"]', f"[models.'{name}']"}
    kept: list[str] = []
    pending: list[str] = []  # comments and blank lines met while skipping: the next table's, if one follows
    skipping = False
    string_end: str | None = None  # inside a multi-line string: its closing quotes (its lines are no headers)
    for line in text.splitlines():
        stripped = line.strip()
        in_string = string_end is not None
        string_end = _multiline_string_end(line, string_end)
        if in_string:
            if not skipping:
                kept.append(line)
            else:
                pending = []  # a value of the table removed
            continue
        if stripped.startswith("["):
            if skipping:
                kept.extend(pending)
                pending = []
            skipping = stripped.split("#", 1)[0].strip() in headers
        if not skipping:
            kept.append(line)
        elif not stripped or stripped.startswith("#"):
            pending.append(line)
        else:
            pending = []  # a key of the table removed: the comments before it were its own
    return "\n".join(kept).rstrip() + "\n" if any(line.strip() for line in kept) else ""


def _without_empty_models(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` without a ``models`` table that is empty (the last row removed may take its header along)."""
    return {k: v for k, v in doc.items() if not (k == "models" and not v)}


def _multiline_string_end(line: str, string_end: str | None) -> str | None:
    """After ``line``: the closing quotes of the multi-line string it leaves open (three double or three
    single quotes), else None; ``string_end``: the one open before it. Quotes in comments and one-line
    strings do not count."""
    i = 0
    while i < len(line):
        if string_end is not None:
            end = line.find(string_end, i)
            if end < 0:
                return string_end
            while end > 0 and string_end == '"""' and _escaped(line, end):
                end = line.find(string_end, end + 1)
                if end < 0:
                    return string_end
            i, string_end = end + 3, None
            while i < len(line) and line[i] == line[i - 1]:  # up to two quotes more belong to the string
                i += 1
            continue
        c = line[i]
        if c == "#":
            return None
        if line.startswith(('"""', "'''"), i):
            string_end, i = line[i : i + 3], i + 3
            continue
        if c in "\"'":  # a one-line string: to its closing quote
            j = i + 1
            while j < len(line) and not (line[j] == c and not (c == '"' and _escaped(line, j))):
                j += 1
            i = j + 1
            continue
        i += 1
    return string_end


def _escaped(line: str, index: int) -> bool:
    """Whether the character at ``index`` follows an odd number of backslashes (a basic string's escape)."""
    count = 0
    while index - count - 1 >= 0 and line[index - count - 1] == "\\":
        count += 1
    return count % 2 == 1


def _text_without_row(path: Path, text: str, name: str) -> str:
    """``path``'s ``text`` without the row of ``name`` (see :func:`_without_row`), checked: the rest of the
    file must read as it did.

    Raises:
        RegistryError: the row is there in a form that cannot be removed so (``mk = { ... }`` inside a
            ``[models]`` table, say), or removing it would change the rest of the file.
    """
    by_hand = "edit the file by hand"
    without = _without_row(text, name)
    try:
        before, after = tomllib.loads(text), tomllib.loads(without)
    except tomllib.TOMLDecodeError:  # (where in the rewritten text would mean nothing to the user)
        raise RegistryError(path, f"model {name!r} cannot be removed from it line by line: {by_hand}") from None
    if name in after.get("models", {}):
        raise RegistryError(path, f"model {name!r} is written there in a form preempt cannot replace (not a "
                                  f"[models.{name}] table): {by_hand}")  # fmt: skip
    expected = {**before, "models": {k: v for k, v in before.get("models", {}).items() if k != name}}
    if _without_empty_models(after) != _without_empty_models(expected):
        raise RegistryError(path, f"model {name!r} cannot be removed from it line by line without changing "
                                  f"other entries: {by_hand}")  # fmt: skip
    return without


def _register_locked(name: str, row: Mapping[str, Any], path: Path, *, overwrite: bool) -> None:
    try:
        existed = path.is_file()
        data = path.read_bytes() if existed else b""
        mode = stat.S_IMODE(path.stat().st_mode) if existed else None  # kept: a private registry stays private
    except OSError as e:
        raise RegistryError(path, f"cannot be read: {e.strerror or e}") from None
    # checked again under the lock: the file may have been edited by hand since check_registrable read it (a
    # half-done edit raised TOMLDecodeError here, an internal error); it is left as it is
    existing = _parse_registry(path, data).get("models", {})
    text = data.decode("utf-8-sig")  # rewritten without a byte-order mark
    if name in existing and not overwrite:  # registered meanwhile by another job
        raise RegistryError(path, f"model {name!r} is already registered here (replace it with --overwrite)")
    header = f"[models.{_toml_key(name)}]"
    if name in existing:
        text = _text_without_row(path, text, name)
    block = [header] + [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in row.items() if v is not None]
    new_text = (text.rstrip() + "\n\n" if text.strip() else "") + "\n".join(block) + "\n"
    try:  # validate before writing: a broken user registry would break every command
        doc = tomllib.loads(new_text)
        written = doc.get("models", {}).get(name)
        if not isinstance(written, dict):
            raise RegistryError(path, f"registering {name!r} would not give a [models.{name}] table")
        _parse_row(name, written, path, {**_read_toml(builtin_registry_path()).get("classes", {}),
                                          **doc.get("classes", {})})  # fmt: skip
    except tomllib.TOMLDecodeError as e:
        raise RegistryError(path, f"registering {name!r} would not give valid TOML: {e}") from e
    try:
        encoded = new_text.encode("utf-8")
    except UnicodeEncodeError as e:  # a file name in another encoding (os.fsdecode's surrogates): no TOML text
        line = new_text[: e.start].count("\n")
        raise RegistryError(path, f"the row of {name!r} holds text that is not UTF-8 (a file name in another "
                                  "encoding?), which a TOML registry cannot hold: "
                                  f"{excerpt(new_text.splitlines()[line])}") from None  # fmt: skip
    from .imageio import atomic_write  # not at the top: `preempt models list` need not import Pillow

    try:
        with atomic_write(path, mode=mode) as f:  # a crash mid-write must not leave the user's registry truncated
            f.write(encoded)
    except ImageWriteError as e:  # a setup error (exit 2), as the registry's other errors, not a failed input
        raise RegistryError(path, e.reason) from None
