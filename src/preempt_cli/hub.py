"""Where weights files come from: local files, the Hugging Face Hub cache, and sha256 pins.

Downloads go through ``huggingface_hub.hf_hub_download`` and so into its one standard cache (``HF_HOME``,
``HF_HUB_CACHE``) with its offline mode (``HF_HUB_OFFLINE=1``); preempt never keeps a second cache.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .errors import HashMismatchError, OfflineWeightsError, UnsafeWeightsError, WeightsNotFoundError
from .registry import ModelConfig

__all__ = ["models_dir_from_env", "resolve_weights", "sha256_file", "check_safetensors_header", "save_safetensors"]

MODELS_DIR_ENV = "PREEMPT_MODELS_DIR"


def models_dir_from_env() -> Path | None:
    """The models dir named by ``PREEMPT_MODELS_DIR``, if set."""
    value = os.environ.get(MODELS_DIR_ENV)
    return Path(value).expanduser() if value else None


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def check_safetensors_header(model: str, path: Path) -> None:
    """Refuse files that are not safetensors (pickles, zip checkpoints) before anything parses them.

    A safetensors file starts with an 8-byte little-endian header length followed by a JSON object.

    Raises:
        UnsafeWeightsError: the file is not safetensors.
    """
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        raise UnsafeWeightsError(model, path)
    header_len = int.from_bytes(head[:8], "little")
    if head[8:9] != b"{" or header_len > 100_000_000:
        raise UnsafeWeightsError(model, path)


def _local_candidates(cfg: ModelConfig, models_dir: Path | None) -> list[Path]:
    raw = Path(cfg.source.location).expanduser()
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


def _hf_download(cfg: ModelConfig) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    src = cfg.source
    try:
        return Path(hf_hub_download(repo_id=src.location, filename=src.filename, revision=src.revision))
    except LocalEntryNotFoundError as e:  # offline, or the hub cannot be reached, and nothing cached
        reason = "HF_HUB_OFFLINE is set" if _hf_offline() else "the Hub cannot be reached"
        raise OfflineWeightsError(cfg.name, str(src), reason) from e
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
        raise WeightsNotFoundError(
            cfg.name, Path(str(src)), hint=f"The Hub says: {type(e).__name__}. Check the registry's source."
        ) from e


def _hf_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def resolve_weights(cfg: ModelConfig, models_dir: Path | None = None, *, verify_hash: bool = True) -> Path:
    """A local path to the weights file of ``cfg``, downloaded into the Hub cache if needed.

    Local relative paths are looked up in ``models_dir``, then ``PREEMPT_MODELS_DIR``, then the folder of
    the registry file that defined the model, then the weights shipped with preempt.

    Raises:
        WeightsNotFoundError: a local file is missing, or the Hub has no such file.
        OfflineWeightsError: the weights are remote, not cached, and the Hub cannot be reached.
        HashMismatchError: the file does not match the registry's sha256 pin.
        UnsafeWeightsError: the file is not safetensors.
        ValueError: the source kind is ``timm`` (timm resolves its own weights; see ``load_model``).
    """
    kind = cfg.source.kind
    if kind == "file":
        candidates = _local_candidates(cfg, models_dir)
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            hint = (
                f"Looked in: {', '.join(str(p.parent) for p in candidates)}. Pass --models-dir DIR "
                f"(or set {MODELS_DIR_ENV}) to the folder that holds {cfg.source.location}."
            )
            if cfg.notes:
                hint += f" How to get it: {cfg.notes}"
            raise WeightsNotFoundError(cfg.name, candidates[0], hint=hint)
    elif kind == "hf":
        path = _hf_download(cfg)
    else:
        raise ValueError(f"source kind {kind!r} has no weights file of its own")
    check_safetensors_header(cfg.name, path)
    if verify_hash and cfg.sha256:
        actual = sha256_file(path)
        if actual != cfg.sha256:
            raise HashMismatchError(cfg.name, path, cfg.sha256, actual)
    return path


def save_safetensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` as safetensors, atomically (a temporary file beside it, renamed into
    place only once complete), so an interrupted write never leaves a truncated weights file.

    Raises:
        ImageWriteError: the file cannot be written.
    """
    import tempfile

    from safetensors.torch import save_file

    from .errors import ImageWriteError

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except OSError as e:
        raise ImageWriteError(path, f"cannot write: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
