"""Every error that preempt raises on purpose.

Each class derives from :class:`PreemptError` *and* from the standard exception a caller would expect
(``FileNotFoundError``, ``ValueError``, ...), carries the fields that explain it, and says how to fix it.
The CLI maps them to an ``error:`` line on stderr and an exit code (see ``preempt_cli.cli``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

__all__ = [
    "PreemptError",
    "ConfigError",
    "RegistryError",
    "UnknownModelError",
    "WeightsNotFoundError",
    "OfflineWeightsError",
    "HashMismatchError",
    "UnsafeWeightsError",
    "WeightsMetadataMismatchError",
    "NonFiniteWeightsError",
    "UnreadableWeightsError",
    "WeightsMismatchError",
    "ImageReadError",
    "ImageWriteError",
    "LabelError",
    "InputError",
    "InputConfigError",
    "InputLabelError",
    "MissingDependencyError",
    "reason_of",
    "excerpt",
    "value_text",
    "first_line",
    "clip",
    "error_chain",
]


class PreemptError(Exception):
    """Base class of every error raised by preempt on purpose.

    Each one can be pickled (sent from a worker process, copied): as it was, its fields and message
    included, whatever its class's ``__init__`` takes (see :meth:`__reduce__`)."""

    def __reduce__(self) -> tuple:
        # Pickle's default re-creates an error as ``type(self)(*self.args)``: ``args`` holds the message alone,
        # which an ``__init__`` taking (path, reason) refused with TypeError, in the process that unpickled
        # it (a ProcessPoolExecutor's caller), hiding the error. Re-created without calling ``__init__``, from
        # its args and its state instead: the fields it set, and those of the standard error it also is.
        return _unpickled_error, (type(self), self.args), _error_state(self)


#: The fields that the standard exceptions keep outside an error's ``__dict__`` (in C), which a pickled
#: error must carry too: an ``OSError``'s ``errno`` and ``filename``, an ``ImportError``'s ``msg``.
_BUILTIN_FIELDS: tuple[tuple[type[BaseException], tuple[str, ...]], ...] = (
    (OSError, ("errno", "strerror", "filename", "filename2")),
    (ImportError, ("msg", "name", "path")),
)


def _error_state(error: BaseException) -> dict[str, object]:
    """What :func:`_unpickled_error`'s error gets set (``BaseException.__setstate__`` sets each as an
    attribute): ``error``'s ``__dict__`` and the fields it has of the standard exceptions it is."""
    state = dict(vars(error))
    for base, fields in _BUILTIN_FIELDS:
        if isinstance(error, base):
            # only those set: an OSError's str() is "[Errno None] None: None" once its filename is set, to None too
            state.update((name, value) for name in fields if (value := getattr(error, name)) is not None)
    return state


def _unpickled_error(cls: type[PreemptError], args: tuple) -> PreemptError:
    """An error of class ``cls`` with ``args``, its ``__init__`` not called (see :meth:`PreemptError.__reduce__`)."""
    error = cls.__new__(cls)
    error.args = args
    return error


class ConfigError(PreemptError, ValueError):
    """An option or setting is invalid (a usage error: exit code 2)."""


class RegistryError(PreemptError, ValueError):
    """A model registry file cannot be parsed or has an invalid entry."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class UnknownModelError(PreemptError, KeyError):
    """A model name is not in any registry."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        close = _close_names(name, known)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        super().__init__(
            f"unknown model {excerpt(name)}.{hint} Run 'preempt models list' to see the registered models, "
            "or add one with --registry FILE."
        )

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _close_names(name: str, known: list[str], most: int = 3) -> list[str]:
    """The names of ``known`` that ``name`` may have meant, at most ``most``, '_' read as '-' (a weights file's
    stem) and capitals as small letters: the name so read alone, else those holding it whole or held by it,
    then those spelt alike (a letter left out, two swapped)."""
    import difflib

    def plain(text: str) -> str:
        return text.lower().replace("_", "-")

    typed = plain(name)
    same = [k for k in known if plain(k) == typed]  # another case, or '_': that one alone is meant
    if same:
        return same[:most]
    by_plain = {plain(k): k for k in known}
    close = [k for k in known if typed in plain(k) or plain(k) in typed]
    close += [by_plain[k] for k in difflib.get_close_matches(typed, list(by_plain), n=most, cutoff=0.8)]
    return list(dict.fromkeys(close))[:most]


class WeightsNotFoundError(PreemptError, FileNotFoundError):
    """A local weights file does not exist."""

    def __init__(self, model: str, path: Path | str, hint: str = "", *, reason: str = "") -> None:
        self.model = model
        self.path = path  # a str for a remote source (hf://...), kept as written
        if reason:  # something else is there (a folder): "not found at" it would be untrue
            super().__init__(f"weights of model {model!r}: {reason}" + (f". {hint}" if hint else ""))
            return
        super().__init__(
            f"weights of model {model!r} not found at {path}. "
            + (hint or "Pass --models-dir DIR (or set PREEMPT_MODELS_DIR) to the folder holding them.")
        )


class OfflineWeightsError(PreemptError, FileNotFoundError):
    """Remote weights are needed but the hub cannot be reached (offline, no cached copy)."""

    def __init__(self, model: str, source: str, reason: str) -> None:
        self.model = model
        self.source = source
        super().__init__(
            f"weights of model {model!r} ({source}) are not in the local Hugging Face cache and cannot be "
            f"downloaded ({reason}). Download them once with network access (unset HF_HUB_OFFLINE), "
            "or point the model at a local file with --registry."
        )


class HashMismatchError(PreemptError, ValueError):
    """A weights file does not match the sha256 pinned in the registry."""

    def __init__(self, model: str, path: Path, expected: str, actual: str, hint: str = "") -> None:
        self.model = model
        self.path = path
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"weights of model {model!r} at {path} have sha256 {actual}, but the registry pins {expected}. "
            + (hint or "The file is corrupt or not the one registered: download it again, or fix the pin.")
        )


class UnsafeWeightsError(PreemptError, ValueError):
    """A weights file is a pickle (or otherwise not safetensors): we never unpickle untrusted files."""

    def __init__(self, model: str, path: Path) -> None:
        self.model = model
        self.path = path
        super().__init__(
            f"weights of model {model!r} at {path} are not a safetensors file (it looks like a pickled "
            "PyTorch checkpoint, which can run arbitrary code when loaded). Convert it once with "
            f"'preempt models convert {path} OUT.safetensors' and register the safetensors file."
        )


class UnreadableWeightsError(UnsafeWeightsError):
    """A weights file that is not a readable safetensors file, nor a PyTorch checkpoint either: empty,
    truncated, damaged or of another format. Refused as every file that is not safetensors is (so a caller
    catching :class:`UnsafeWeightsError` catches it), with a reason of its own: converting cannot help."""

    def __init__(self, model: str, path: Path, detail: str, hint: str = "") -> None:
        self.model = model
        self.path = path
        self.detail = detail
        PreemptError.__init__(  # not UnsafeWeightsError's message, which advises converting a checkpoint
            self,
            f"weights of model {model!r} at {path} are not a readable safetensors file ({detail}): "
            + (hint or "it is damaged or truncated (an interrupted download or copy?) or of another format; fetch "
               "or copy it again"),
        )


class WeightsMismatchError(PreemptError, ValueError):
    """A weights file does not fit the registered architecture."""

    def __init__(self, model: str, path: Path, reason: str) -> None:
        self.model = model
        self.path = path
        super().__init__(f"weights of model {model!r} at {path} do not fit its architecture: {reason}")


class WeightsMetadataMismatchError(WeightsMismatchError):
    """A weights file's own metadata (architecture, preprocessing, classes) contradicts its registry row."""

    def __init__(self, model: str, path: Path, reason: str) -> None:
        self.model = model
        self.path = path
        PreemptError.__init__(self, f"weights of model {model!r} at {path} were saved for another registry "
                                    f"row: {reason}")  # fmt: skip


class NonFiniteWeightsError(WeightsMismatchError):
    """A weights file that loads but holds values no trained model has: NaN or inf, or a BatchNorm running
    variance below zero. Such a model's gradients are NaN: protecting with it wrote images that protect
    nothing, and said they were protected."""

    def __init__(self, model: str, path: Path | str, reason: str) -> None:
        self.model = model
        self.path = path
        PreemptError.__init__(self, f"weights of model {model!r} at {path} are unusable: {reason} (a training "
                                    "that diverged, or a damaged file or conversion?); fetch, convert or train "
                                    "them again")  # fmt: skip


class _FileError(PreemptError, OSError):
    """A file that cannot be read or written: ``path`` (a Path) and ``reason``, and the fields of the
    ``OSError`` it is, for code that reads them: ``filename`` (``path`` as given, a str), ``strerror``
    (``reason``), ``errno`` (the operating system's error number where it said why, else None)."""

    def __init__(self, path: Path | str, reason: str, errno: int | None = None) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")
        # OSError sets these only from (errno, strerror, filename) arguments, which would make its own str()
        self.errno = errno
        self.strerror = reason
        self.filename = os.fspath(path)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class ImageReadError(_FileError):
    """An input file cannot be read as an image; ``errno``: the operating system's error number where it
    said why (``errno.ENOENT``: no such file), else None (not an image, too large)."""


class ImageWriteError(_FileError):
    """An output file cannot be written; ``errno``: the operating system's error number where it said why
    (``errno.ENOSPC``: the disk is full), else None."""


class LabelError(PreemptError, ValueError):
    """Ground-truth labels are missing or invalid."""


class InputError(PreemptError, ValueError, TypeError):
    """Images, labels or other objects handed to the Python API that it cannot take: a wrong type, dtype,
    shape or value (a model name where a loaded model goes, colours of another shape than the picture's;
    a ``ValueError`` and a ``TypeError``: catch either)."""


class InputConfigError(InputError, ConfigError):
    """Images or other objects that an API which refused them with :class:`ConfigError` before 0.22.0 cannot
    take (the attacks, :class:`~preempt_cli.baselines.BiLevel`, the quality metrics, ``Evaluator``'s data):
    an :class:`InputError`, as README says, and still a :class:`ConfigError`, so that a caller catching that
    catches it as it did."""


class InputLabelError(InputError, LabelError):
    """Labels of a value that is no class (negative, or past the model's classes) handed to an API that
    refused them with :class:`LabelError` before: an :class:`InputError`, and still a :class:`LabelError`."""


class MissingDependencyError(PreemptError, ImportError):
    """An optional package is needed for a feature."""

    def __init__(self, package: str, feature: str) -> None:
        self.package = package
        super().__init__(f"{feature} needs the package {package!r}: pip install {package}")


def reason_of(error: Exception, path: Path) -> str:
    """``error``'s message for a report line that already names ``path`` (its ``path: `` prefix removed)."""
    reason = getattr(error, "reason", None) or str(error)
    prefix = f"{path}: "
    return reason[len(prefix) :] if reason.startswith(prefix) else reason


def first_line(error: BaseException) -> str:
    """``error``'s first line of message (its type's name when it has none): libraries' messages run on."""
    lines = str(error).strip().splitlines()
    return lines[0].strip() if lines else type(error).__name__


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ``...`` marking the cut, for a one-line message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: The most characters of a value read from a file that a message shows (see :func:`excerpt`).
EXCERPT_CHARS = 80


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """``value`` for a message, as ``repr`` writes it (quoted, control characters escaped), a long one cut to
    its first ``limit`` characters, ``…`` and its length: a value read from a file (a model name in an
    edited PNG's metadata) can be a megabyte, which a message must not pour onto the terminal or the log."""
    if isinstance(value, str):  # cut before repr: a megabyte is not escaped whole to show 80 characters
        return repr(value) if len(value) <= limit else f"{value[:limit]!r}… ({len(value):,} characters)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


def value_text(value: object) -> str:
    """``str(value)`` for a message where it is short and printable (a setting: ``0.0314``, ``tiny-key``),
    else its :func:`excerpt` (quoted, escaped, cut): a setting read from a file may be neither."""
    text = str(value)
    return text if len(text) <= EXCERPT_CHARS and text.isprintable() else excerpt(value)


def error_chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the errors it was raised from or while handling (``__cause__``, else
    ``__context__``), innermost last; each once, should the chain loop."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__
