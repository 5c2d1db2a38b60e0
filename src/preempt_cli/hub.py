"""Where weights files come from: local files, the Hugging Face Hub cache, and sha256 pins.

Downloads go through ``huggingface_hub.hf_hub_download`` and so into its one standard cache (``HF_HOME``,
``HF_HUB_CACHE``) with its offline mode (``HF_HUB_OFFLINE=1``); preempt never keeps a second cache.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from .errors import (
    ConfigError,
    HashMismatchError,
    OfflineWeightsError,
    RegistryError,
    UnreadableWeightsError,
    UnsafeWeightsError,
    WeightsNotFoundError,
    error_chain,
    first_line,
)
from ._paths import expand_home, file_kind, open_regular_file
from .imageio import atomic_write
from .registry import ModelConfig

_logger = logging.getLogger(__name__)

__all__ = [
    "models_dir_from_env",
    "resolve_weights",
    "verified_weights",
    "VerifiedWeights",
    "unparsable_weights",
    "sha256_file",
    "check_safetensors_header",
    "check_served_copy",
    "save_safetensors",
    "hub_errors",
    "hub_cache_repo",
    "damaged_cache_copy_hint",
    "hub_download",
    "local_candidates",
]

MODELS_DIR_ENV = "PREEMPT_MODELS_DIR"


def models_dir_from_env() -> Path | None:
    """The models dir named by ``PREEMPT_MODELS_DIR``, if set."""
    value = os.environ.get(MODELS_DIR_ENV)
    return expand_home(value) if value else None


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    with path.open("rb") as f:
        return sha256_stream(f, chunk_size)


def sha256_stream(f: BinaryIO, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of what is left to read of the open file ``f``, read in chunks."""
    digest = hashlib.sha256()
    while chunk := f.read(chunk_size):
        digest.update(chunk)
    return digest.hexdigest()


#: How PyTorch checkpoints start: a zip archive (``torch.save``'s default) or a pickle (protocol 2 to 5;
#: the legacy ``torch.save`` format, and bare pickles).
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_STARTS = tuple(bytes([0x80, proto]) for proto in range(2, 6))


def looks_like_checkpoint(head: bytes) -> bool:
    """Whether a file starting with ``head`` is a PyTorch checkpoint (zip or pickle), by its first bytes."""
    return head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_STARTS)


def check_safetensors_header(model: str, path: Path) -> None:
    """Refuse files that are not safetensors (pickles, zip checkpoints, damaged files) before anything parses
    them.

    A safetensors file starts with an 8-byte little-endian header length followed by a JSON object.

    Raises:
        UnsafeWeightsError: the file is a pickle or zip checkpoint; :class:`UnreadableWeightsError` (a
            subclass) when it is no checkpoint either (empty, truncated, damaged).
        WeightsNotFoundError: the file is gone, or no regular file (a FIFO).
    """
    with _open_weights(model, path) as f:
        head = f.read(9)
        size = os.fstat(f.fileno()).st_size
    _check_header(model, path, head, size)


def _check_header(model: str, path: Path, head: bytes, size: int) -> None:
    header_len = int.from_bytes(head[:8], "little")
    if len(head) < 9 or head[8:9] != b"{" or header_len > 100_000_000:  # no safetensors header: what is it?
        # (checked only now: a header length such as 0x280 starts with the bytes of a pickle's PROTO 2)
        if looks_like_checkpoint(head):
            raise UnsafeWeightsError(model, path)  # a PyTorch checkpoint: `preempt models convert` reads it
        if size == 0:
            detail = "the file is empty"
        elif len(head) < 9:
            detail = f"the file is {size} byte{'s' * (size != 1)} long, too short for a safetensors header"
        else:
            detail = "it does not start with a safetensors header"
    elif 8 + header_len > size:
        detail = f"truncated: its header alone needs {8 + header_len} bytes, the file has {size}"
    else:
        return
    raise UnreadableWeightsError(model, path, detail, hint=damaged_cache_copy_hint(path))


def hub_cache_repo(path: Path) -> Path | None:
    """The Hugging Face cache's folder of the repository (``.../models--ORG--NAME``) whose snapshot holds
    ``path``, or None for a file elsewhere."""
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE).absolute()
    try:
        parts = Path(path).absolute().relative_to(cache).parts
    except ValueError:
        return None
    if len(parts) < 4 or parts[1] != "snapshots":  # models--ORG--NAME/snapshots/COMMIT/FILE
        return None
    return cache / parts[0]


def damaged_cache_copy_hint(path: Path) -> str:
    """What to do about a damaged file that is the Hugging Face cache's copy ("" for a file elsewhere).
    huggingface_hub uses a cached file as it is, unchecked, offline or not: running again, or "downloading
    again", reads the same damaged bytes until the cached copy is gone."""
    repo = hub_cache_repo(path)
    if repo is None:
        return ""
    return (f"the Hugging Face cache's copy is damaged or truncated (an interrupted download or copy?), and is "
            f"used as it is, never downloaded again: delete {repo} and run again with network access")  # fmt: skip


def _served_sha256(path: Path) -> str | None:
    """The sha256 the Hub gave for ``path``, a file of the Hugging Face cache (which names the blob of a Git
    LFS weights file by it), or None (a file elsewhere, or a blob named otherwise)."""
    if hub_cache_repo(path) is None:
        return None
    blob = Path(os.path.realpath(path)).name
    return blob if re.fullmatch(r"[0-9a-f]{64}", blob) else None


def local_candidates(cfg: ModelConfig, models_dir: Path | None) -> list[Path]:
    """The paths where a ``file:`` source's weights are looked for, in order: as given when absolute, else
    under ``models_dir``, ``PREEMPT_MODELS_DIR``, the folder of the registry that wrote the row, and the
    package's own weights."""
    raw = expand_home(cfg.source.location)
    if raw.is_absolute():
        return [raw]
    candidates = []
    if models_dir is not None:
        candidates.append(models_dir / raw)
    env_dir = models_dir_from_env()
    if env_dir is not None and env_dir != models_dir:
        candidates.append(env_dir / raw)
    if cfg.source_anchor is not None:  # the registry file whose row wrote this path (a base row's, if inherited)
        candidates.append(cfg.source_anchor.parent / raw)
    packaged = Path(__file__).with_name("weights") / raw
    candidates.append(packaged)
    return candidates


def _is_network_error(error: BaseException) -> bool:
    """Connection, proxy, TLS and timeout failures, whichever HTTP library huggingface_hub or timm uses."""
    top = type(error).__module__.split(".")[0]
    return isinstance(error, (ConnectionError, TimeoutError)) or top in {"httpx", "httpx2", "requests", "urllib", "urllib3"}


def _unreachable(model: str, src: str, reason: str) -> OfflineWeightsError:
    """The error for remote weights that cannot be fetched, with the way out that fits: unset
    ``HF_HUB_OFFLINE`` where it is set, else network access (it is no use to unset what is not set)."""
    error = OfflineWeightsError(model, src, reason)
    if _hf_offline():
        return error  # its own message says to unset HF_HUB_OFFLINE
    error.args = (
        f"weights of model {model!r} ({src}) are not in the local Hugging Face cache and cannot be downloaded "
        f"({reason}). Check the network connection (or the proxy: HTTPS_PROXY) and try again, or point the "
        "model at a local file with --registry.",
    )
    return error


@contextmanager
def hub_errors(cfg: ModelConfig) -> Iterator[None]:
    """Turn what ``hf_hub_download`` (directly, or inside timm) raises into one-line preempt errors naming
    the model and its source as written.

    Raises:
        OfflineWeightsError: offline with nothing cached, or the Hub cannot be reached (proxy, TLS, timeout,
            a server error).
        WeightsNotFoundError: no such repository (or a private/gated one without access), revision or file.
        RegistryError: the source is not a valid Hub repo id.
        ConfigError: the cache cannot be written (no permission, a read-only file system, a full disk).
    """
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    src = str(cfg.source)
    try:
        yield
    except LocalEntryNotFoundError as e:  # offline, or the hub cannot be reached, and nothing cached
        if _hf_offline():
            reason = "HF_HUB_OFFLINE is set"
        else:  # huggingface_hub's own message is a paragraph; the connection error it wraps says why
            *_, cause = error_chain(e)  # the innermost: huggingface_hub wraps the connection error
            why = f"{type(cause).__name__}: {first_line(cause)}" if cause is not e else first_line(e)
            reason = f"the Hub cannot be reached: {why}"
        raise _unreachable(cfg.name, src, reason) from e
    except GatedRepoError as e:
        raise WeightsNotFoundError(cfg.name, src, hint=(
            "The repository is gated: accept its terms on the Hub, then log in ('hf auth login') or set HF_TOKEN."
        )) from e  # fmt: skip
    except RepositoryNotFoundError as e:  # the Hub answers 401 for a private repo without a token, too
        raise WeightsNotFoundError(cfg.name, src, hint=(
            "The Hub has no such repository, or it is private: check the registry's source, or log in "
            "('hf auth login') or set HF_TOKEN."
        )) from e  # fmt: skip
    except RevisionNotFoundError as e:
        rev = f" {cfg.source.revision or 'main'!r}" if cfg.source.kind == "hf" else ""
        raise WeightsNotFoundError(cfg.name, src, hint=f"The repository has no revision{rev}.") from e
    except EntryNotFoundError as e:
        raise WeightsNotFoundError(cfg.name, src, hint="The repository has no such file at that revision.") from e
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise WeightsNotFoundError(cfg.name, src, hint=(
                f"The Hub refused access (HTTP {status}): log in ('hf auth login') or set HF_TOKEN with access "
                "to the repository."
            )) from e  # fmt: skip
        reason = f"the Hub answered HTTP {status}" if status else f"the Hub failed: {first_line(e)}"
        raise _unreachable(cfg.name, src, reason) from e
    except HFValidationError as e:
        where = cfg.registry_file or "registry"
        raise RegistryError(where, f"model {cfg.name!r}: {src} is not a valid Hub source: {first_line(e)}") from e
    except Exception as e:
        if isinstance(e, OSError) and e.errno in _CACHE_ERRNOS and not _is_network_error(e):
            raise _unusable_cache(cfg.name, src, e) from e
        if not _is_network_error(e):
            raise
        raise _unreachable(cfg.name, src, f"the Hub cannot be reached: {type(e).__name__}: {first_line(e)}") from e


#: What huggingface_hub's own writes to its cache (lock files, blobs, refs) fail with on a folder that cannot be
#: written: a shared read-only cache, another user's, a full disk.
_CACHE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT})


def _unusable_cache(model: str, src: str, error: OSError) -> ConfigError:
    """The error for a Hugging Face cache that cannot be written: it read as preempt's own internal error."""
    from huggingface_hub import constants

    return ConfigError(f"weights of model {model!r} ({src}): huggingface_hub cannot use its cache "
                       f"{constants.HF_HUB_CACHE} ({type(error).__name__}: {first_line(error)}). Point HF_HUB_CACHE "
                       "(or HF_HOME) at a folder you can write, or, for weights the cache holds already, set "
                       "HF_HUB_OFFLINE=1 (which reads it without writing)")  # fmt: skip


def _hf_download(cfg: ModelConfig) -> Path:
    src = cfg.source
    return hub_download(cfg, src.location, src.filename, src.revision)


def hub_download(cfg: ModelConfig, repo_id: str, filename: str, revision: str | None = None) -> Path:
    """``hf_hub_download`` of a file of ``cfg``'s weights, its errors turned into preempt's
    (:func:`hub_errors`). When the Hub cannot be reached, a copy in the cache is used (that copy of a branch
    may be older than the branch): huggingface_hub falls back to it itself, without a word, for most
    connection errors; for the others (a proxy's refusal, which failed runs whose weights were all cached)
    it raises, and the copy is used here, with a warning. With nothing cached, a Hub out of reach is said at
    once (:func:`_ask_the_hub_once_if_nothing_is_cached`), not after huggingface_hub's retries. A cache that
    cannot be written (a shared read-only one) serves its copy too, with a warning.

    Raises:
        see :func:`hub_errors`.
    """
    from huggingface_hub import hf_hub_download

    try:
        with hub_errors(cfg):
            _ask_the_hub_once_if_nothing_is_cached(repo_id, filename, revision)
            return Path(hf_hub_download(repo_id=repo_id, filename=filename, revision=revision))
    except OfflineWeightsError as unreachable:
        damaged = _dangling_cache_entry(repo_id, filename, revision)
        if damaged is not None:  # "not in the cache" alone sent users looking for a download that was there
            entry, repo = damaged
            unreachable.args = (f"{unreachable.args[0]} The cache holds a damaged entry: {entry} links to "
                                f"{os.readlink(entry)}, which is missing; delete {repo} and download the weights "
                                "again.",)  # fmt: skip
        if _hf_offline():
            raise
        try:
            cached = Path(hf_hub_download(repo_id=repo_id, filename=filename, revision=revision, local_files_only=True))
        except Exception:  # not cached either: the first error says why it cannot be had
            raise unreachable from None
        _logger.warning("model %s: the Hub cannot be reached (%s): using the cached copy of %s", cfg.name,
                        first_line(unreachable.__cause__ or unreachable), cfg.source)  # fmt: skip
        return cached
    except ConfigError as unwritable:  # a shared read-only cache: what it holds is usable without writing
        if not isinstance(unwritable.__cause__, OSError):
            raise
        try:
            cached = Path(hf_hub_download(repo_id=repo_id, filename=filename, revision=revision, local_files_only=True))
        except Exception:
            raise unwritable from None
        _logger.warning("model %s: the Hugging Face cache cannot be written (%s): using its copy of %s", cfg.name,
                        first_line(unwritable.__cause__), cfg.source)  # fmt: skip
        return cached
    raise AssertionError("unreachable")  # pragma: no cover - hub_errors re-raises


def _ask_the_hub_once_if_nothing_is_cached(repo_id: str, filename: str, revision: str | None) -> None:
    """With nothing in the cache, one request for the file's metadata (``HF_HUB_ETAG_TIMEOUT``, no retries)
    before ``hf_hub_download``; a network error (no DNS, connection refused, timeout, proxy) is raised at
    once, for :func:`hub_errors` to say.

    Where the Hub cannot be reached and nothing is cached, ``hf_hub_download`` (huggingface_hub 2.x) asks
    again with retries: 5 more requests, 60 s each at most, 1 + 2 + 4 + 8 + 8 s apart: 23 s before the
    error without DNS, minutes where packets are dropped. With a cached copy it falls back to it at once,
    and with ``HF_HUB_OFFLINE`` it asks nothing: both are left to it. Any other answer (a file that is not
    there, a refusal, a server's error) is left to ``hf_hub_download`` too, which meets it again and says it
    as before (a server's 5xx still gets its retries)."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str):
        return
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision), timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as e:
        if _is_network_error(e):
            raise


def _dangling_cache_entry(repo_id: str, filename: str, revision: str | None) -> tuple[Path, Path] | None:
    """The snapshot file of ``filename`` in the Hub's cache and its repository's folder, when the file is a
    link to a blob that is gone (a cache cleaned by hand, a copy that lost its blobs); else None."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    ref = revision or "main"
    try:
        commit = ref if re.fullmatch(r"[0-9a-f]{40}", ref) else (repo / "refs" / ref).read_text().strip()
    except (OSError, ValueError):
        return None
    entry = repo / "snapshots" / commit / filename
    return (entry, repo) if os.path.islink(entry) and not os.path.exists(entry) else None


def _hf_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _what_is_there(path: Path) -> str:
    """What ``path``, something that is no regular file nor folder, is: for a message ("is a FIFO (a named
    pipe), not a weights file")."""
    try:
        return f"is {file_kind(os.stat(path).st_mode)}, not a weights file"
    except FileNotFoundError:
        return f"is a symbolic link to {os.readlink(path)}, which is missing"
    except OSError as e:  # a looping link
        return f"cannot be read: {e.strerror or e}"


def _open_weights(model: str, path: Path) -> BinaryIO:
    """The weights file ``path`` of ``model`` opened for reading, refused unread where it is no regular file
    by the time it is opened (a FIFO swapped in for it: a blocking open waited for a writer, forever).

    Raises:
        WeightsNotFoundError: ``path`` is gone, cannot be opened, or is no regular file.
    """
    try:
        fd, mode = open_regular_file(path)
    except FileNotFoundError:
        raise WeightsNotFoundError(model, path) from None
    except OSError as e:
        raise WeightsNotFoundError(model, path, reason=f"{path} cannot be read: {e.strerror or e}") from None
    if fd is None:
        raise WeightsNotFoundError(model, path, reason=f"{path} is {file_kind(mode)}, not a weights file")
    return os.fdopen(fd, "rb")


def _find_weights(cfg: ModelConfig, models_dir: Path | None) -> Path:
    kind = cfg.source.kind
    if kind == "file":
        candidates = local_candidates(cfg, models_dir)
        path = next((p for p in candidates if p.is_file()), None)
        folder = next((p for p in candidates if p.is_dir()), None)
        if path is None and folder is not None:  # "not found at" a folder that is there: say what it is
            raise WeightsNotFoundError(cfg.name, folder, reason=(
                f"{folder} is a folder, not a weights file: the source names the .safetensors file itself "
                f"(the folder holding it is --models-dir or {MODELS_DIR_ENV})"))  # fmt: skip
        other = next((p for p in candidates if os.path.lexists(p)), None)
        if path is None and other is not None:  # a FIFO, a looping or dangling link: "not found" was untrue
            raise WeightsNotFoundError(cfg.name, other, reason=f"{other} {_what_is_there(other)}")
        if path is None:
            hint = (
                f"Looked in: {', '.join(str(p.parent) for p in candidates)}. Pass --models-dir DIR "
                f"(or set {MODELS_DIR_ENV}) to the folder that holds {cfg.source.location}."
            )
            if cfg.notes:
                hint += f" How to get it: {cfg.notes}"
            raise WeightsNotFoundError(cfg.name, candidates[0], hint=hint)
        return path
    if kind == "hf":
        return _hf_download(cfg)
    raise ValueError(f"source kind {kind!r} has no weights file of its own")


def _check_pin(cfg: ModelConfig, path: Path, actual: str) -> None:
    if actual == (cfg.sha256 or "").lower():  # a hand-made config may give the hex in capitals
        return
    hint = ""
    rev = cfg.source.revision
    served = _served_sha256(path)
    if served is not None and served != actual:  # not upstream's change nor a wrong pin: not the Hub's file
        hint = f"It is not the file the Hub served (sha256 {served}): {damaged_cache_copy_hint(path)}."
    elif cfg.source.kind == "hf" and not cfg.source.pinned_to_commit:
        hint = (f"The source follows {f'the revision {rev!r}' if rev else 'the main branch'}, not a commit: "
                "the file may have changed upstream; pin a commit (@<40-hex sha>) once you trust the new file.")  # fmt: skip
    elif cfg.source.kind == "file":  # nothing to download (a private key made here): which registry pins it
        row = f" of its row in {cfg.registry_file}" if cfg.registry_file else ""
        hint = (f"The file is corrupt or not the one registered (changed or replaced since): put the registered "
                f"file back, or fix the pin{row}.")  # fmt: skip
    raise HashMismatchError(cfg.name, path, cfg.sha256 or "", actual, hint=hint)


def resolve_weights(cfg: ModelConfig, models_dir: Path | None = None, *, verify_hash: bool = True) -> Path:
    """A local path to the weights file of ``cfg``, downloaded into the Hub cache if needed.

    Local relative paths are looked up in ``models_dir``, then ``PREEMPT_MODELS_DIR``, then the folder of
    the registry file that wrote the path (a ``base`` row's, when inherited), then the weights shipped with
    preempt. To load the weights, use :func:`verified_weights`, which loads the very file it hashed.

    Raises:
        WeightsNotFoundError: a local file is missing, or the Hub has no such file.
        OfflineWeightsError: the weights are remote, not cached, and the Hub cannot be reached.
        HashMismatchError: the file does not match the registry's sha256 pin.
        UnsafeWeightsError: the file is not safetensors.
        ValueError: the source kind is ``timm`` (timm resolves its own weights; see ``load_model``).
    """
    path = _find_weights(cfg, models_dir)
    check_safetensors_header(cfg.name, path)
    if verify_hash and cfg.sha256:
        with _open_weights(cfg.name, path) as f:  # not by name: a FIFO swapped in since the header check
            _check_pin(cfg, path, sha256_stream(f))
    return path


class VerifiedWeights:
    """What :func:`verified_weights` gives: the weights file's ``path``, its ``sha256``, its safetensors
    ``metadata`` and its tensors (``state``, mapped from the file, not copied: copy what is kept)."""

    def __init__(self, path: Path, sha256: str, metadata: dict[str, str], state: dict) -> None:
        self.path = path
        self.sha256 = sha256
        self.metadata = metadata
        self.state = state


@contextmanager
def verified_weights(cfg: ModelConfig, models_dir: Path | None = None, *,
                     verify_hash: bool = True) -> Iterator[VerifiedWeights]:  # fmt: skip
    """The weights file of ``cfg``, opened once, checked to be safetensors, hashed and checked against its pin
    (``verify_hash``; without a pin, a file of the Hugging Face cache against the sha256 the Hub served:
    :func:`_check_served`), then its tensors mapped from that same open file (safetensors' mmap), never read
    whole into memory: the file is read twice from the page cache, but held once (a copy of it in a bytes
    object, then a second in the tensors parsed from it, came on top of the net's own weights).

    What is loaded must be what was hashed. A file renamed over the path meanwhile (a download, ``preempt
    train``, ``cp`` to a temporary name then ``mv``) is not read: the tensors come from the file opened. A
    file written in place meanwhile is refused as the block ends (the caller copies the tensors into its
    net within it): its size, modification or change time moved since it was hashed. (Truncated in place
    while mapped, the process gets a SIGBUS, as with any mmap of a file: what safetensors, timm and
    huggingface_hub accept too.)

    Raises:
        The errors of :func:`resolve_weights`; UnreadableWeightsError: the file was written to while loaded, or
        the header looked whole, but safetensors cannot parse the file (:func:`unparsable_weights`).
    """
    from safetensors import SafetensorError, safe_open

    path = _find_weights(cfg, models_dir)
    with _open_weights(cfg.name, path) as f:
        before = os.fstat(f.fileno())
        _check_header(cfg.name, path, f.read(9), before.st_size)
        f.seek(0)
        actual = sha256_stream(f)
        if verify_hash and cfg.sha256:
            _check_pin(cfg, path, actual)
        elif verify_hash:
            _check_served(cfg, path, actual)
        opened = _same_open_file(f.fileno(), path)
        try:
            with safe_open(opened, framework="pt") as tensors:
                state = {name: tensors.get_tensor(name) for name in tensors.keys()}  # noqa: SIM118 - no mapping
                metadata = tensors.metadata() or {}
        except SafetensorError as e:  # a truncated or damaged file whose header looked whole
            raise unparsable_weights(cfg.name, path, e) from e
        if opened == path and not _same_inode(before, os.stat(path)):  # read by name: what is at it now
            raise _changed_while_loaded(cfg.name, path)
        weights = VerifiedWeights(path, actual, metadata, state)
        del state
        yield weights
        weights.state = {}  # the mapping goes with the last tensor
        if _written_since(before, os.fstat(f.fileno())):
            raise _changed_while_loaded(cfg.name, path)


def _same_open_file(fd: int, path: Path) -> Path:
    """A name of the very file open as ``fd``, for a library that opens a file by name: ``/proc/self/fd/N``
    (Linux), or ``path`` itself elsewhere (the caller then checks that it names the same file)."""
    proc = Path(f"/proc/self/fd/{fd}")
    try:
        return proc if _same_inode(os.fstat(fd), os.stat(proc)) else path
    except OSError:
        return path


def _same_inode(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _written_since(before: os.stat_result, now: os.stat_result) -> bool:
    """Whether the open file whose status was ``before`` has been written to since: its size or modification
    time moved, or its change time, which no one sets back by hand (``cp -p`` restores the modification
    time), unless a link to it came or went (a file renamed over its path or deleted: its bytes are as they
    were)."""
    if (now.st_size, now.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        return True
    return now.st_ctime_ns != before.st_ctime_ns and now.st_nlink == before.st_nlink


def _changed_while_loaded(model: str, path: Path) -> UnreadableWeightsError:
    return UnreadableWeightsError(model, path, "it was written to while it was being loaded, after its sha256 "
                                               "was checked", hint="run again once nothing writes to it")  # fmt: skip


def unparsable_weights(model: str, path: Path, error: Exception) -> UnreadableWeightsError:
    """A weights file whose header looked whole that safetensors cannot parse (damaged), with safetensors'
    reason and, for the Hugging Face cache's copy, what to do about it."""
    detail = first_line(error).removeprefix("Error while deserializing: ")
    detail = detail.removeprefix("Error while deserializing header: ")
    return UnreadableWeightsError(model, path, f"safetensors cannot parse it: {detail}",
                                  hint=damaged_cache_copy_hint(path))  # fmt: skip


def check_served_copy(cfg: ModelConfig, path: Path) -> None:
    """:func:`_check_served` of the file ``path`` (timm's weights, which timm reads itself from the Hugging Face
    cache: a ``timm:`` row has no pin, and huggingface_hub uses the cached copy unchecked).

    Raises:
        UnreadableWeightsError: the copy is not the file served; WeightsNotFoundError: it is gone.
    """
    if _served_sha256(path) is None:  # not the cache's, or a blob not named by its sha256: nothing to compare
        return
    with _open_weights(cfg.name, path) as f:
        _check_served(cfg, path, sha256_stream(f))


def _check_served(cfg: ModelConfig, path: Path, actual: str) -> None:
    """Refuse a file of the Hugging Face cache whose bytes are not those the Hub served (its blob is named by
    their sha256), pin or no pin: huggingface_hub uses a cached copy unchecked, so a copy damaged or changed
    since its download was loaded as the model.

    Raises:
        UnreadableWeightsError: the copy is not the file served, with the folder to delete.
    """
    served = _served_sha256(path)
    if served is not None and served != actual:
        raise UnreadableWeightsError(cfg.name, path, f"its sha256 is {actual}, not the {served} of the file the "
                                                     "Hub served: changed since its download",
                                     hint=damaged_cache_copy_hint(path))  # fmt: skip


def _unshared(tensors: dict) -> dict:
    """CPU, contiguous tensors, none sharing memory with another (safetensors refuses aliased tensors, e.g.
    tied weights): a tensor whose storage another one already uses is cloned."""
    import torch

    seen: set[tuple[str, int]] = set()
    out = {}
    for name, tensor in tensors.items():
        t = tensor.detach().cpu()
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if t.numel() and (key in seen or not t.is_contiguous() or storage.nbytes() != t.numel() * t.element_size()):
            t = t.clone(memory_format=torch.contiguous_format)
        elif t.numel():
            seen.add(key)
        out[name] = t.contiguous()
    return out


def save_safetensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None, *,
                     mode: int | None = None, replace: bool = True) -> None:  # fmt: skip
    """Write ``tensors`` to ``path`` as safetensors, atomically (:func:`~preempt_cli.imageio.atomic_write`: a
    temporary file beside it, flushed to disk and renamed into place only once complete, then the folder
    flushed), so an interrupted write never leaves a truncated weights file.
    Tensors sharing memory (tied weights) are written as copies; the file gets the permissions of a new file
    (``0o666`` less the umask), or ``mode`` (``0o600`` for a secret key, set before anything is written).
    ``replace=False``: ``path`` did not exist when the caller decided to write it, and a file that appeared
    there meanwhile (another run's) is left as it is.

    Raises:
        ImageWriteError: the file cannot be written, or (``replace`` False) appeared meanwhile.
    """
    from safetensors.torch import save

    data = save(_unshared(tensors), metadata=metadata)
    head, size = _canonical_header(data)
    with atomic_write(path, mode=mode, replace=replace) as f:
        f.write(head)
        # a view, not a slice: joining the header to a copy of the rest held the file three times in memory
        f.write(memoryview(data)[8 + size :])
    _fsync_dir(path.parent)


def _canonical_header(data: bytes) -> tuple[bytes, int]:
    """The start of ``data`` (a safetensors file) with its JSON header's keys sorted, its 8-byte length
    included, and the length of the header it replaces: the tensors' bytes follow it unchanged. safetensors
    writes the metadata in a hash map's order, which changes from run to run: two identical trainings gave
    files of different sha256, so a registry pin could not confirm a reproduced model. The tensors' offsets
    count from the end of the header, so a header of another length leaves them valid; it is padded with
    spaces to a multiple of 8 bytes, as safetensors pads it."""
    import json

    size = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header, size


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every platform opens directories)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
