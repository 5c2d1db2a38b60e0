"""Build a registered model, load its weights safely, and wrap it to take [0, 1] images of any size."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from ..errors import (
    ConfigError,
    InputError,
    NonFiniteWeightsError,
    PreemptError,
    RegistryError,
    WeightsMetadataMismatchError,
    WeightsMismatchError,
    WeightsNotFoundError,
    clip,
    first_line,
)
from .._paths import expand_home
from ..device import resolve_device
from ..hub import (
    check_safetensors_header,
    check_served_copy,
    hub_download,
    hub_errors,
    unparsable_weights,
    verified_weights,
)
from ..registry import ModelConfig, get_model_config, timm_arch_mismatch, timm_pretrained_cfg
from ._fusion import fuse_model
from ._registry import arch_defaults, create_arch, is_arch

__all__ = ["ImageModel", "load_model", "build_model", "resize"]

_logger = logging.getLogger(__name__)


#: Identity rows resized at once by :func:`_resize_matrix` (times 2 columns and the input's side, in floats):
#: the whole identity of a 40000-pixel panorama's side took 12.8 GB, and a 100000x20 strip could not run.
_RESIZE_MATRIX_ELEMENTS = 1 << 22
#: Beyond this side :func:`resize` calls ``F.interpolate`` itself on a CPU: reading the matrix off the
#: identity costs the side squared (1.4 s at 16384, 9 s at 40000 on a 2-core CPU), and so long an image is
#: rare. On a GPU the matrix is still used (its kernel refuses such scales: see :func:`_resize_matrix`).
_RESIZE_MATRIX_MAX_SIDE = 16384


@lru_cache(maxsize=64)
def _resize_matrix(size_in: int, size_out: int, device: torch.device) -> torch.Tensor:
    """[size_out, size_in]: the 1-D antialiased bilinear resize of ``F.interpolate`` as a matrix (read off
    by resizing the identity along one axis, a block of its rows at a time: each row is an image of the
    batch, resized alone, so the blocks give the same bits as the whole identity at once), on ``device``.

    Read off on the CPU whatever the device: the CUDA kernel keeps an output's weights in shared memory,
    and refuses the large scales of a big photo into a small model ("Too much shared memory required")."""
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor: autograd may save it later
        step = max(1, _RESIZE_MATRIX_ELEMENTS // (2 * size_in))
        blocks = []
        for start in range(0, size_in, step):
            count = min(step, size_in - start)
            eye = torch.zeros(count, size_in)
            eye[torch.arange(count), torch.arange(start, start + count)] = 1
            # one image per input row, two columns wide: a width of 1 would make the layout ambiguous
            # (contiguous and channels-last at once) and send interpolate down another kernel
            eye = eye.view(count, 1, size_in, 1).expand(-1, -1, -1, 2).contiguous()
            rows = F.interpolate(eye, size=(size_out, 2), mode="bilinear", align_corners=False, antialias=True)
            blocks.append(rows[:, 0, :, 0])
        return torch.cat(blocks).t().contiguous().to(device)


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of NCHW ``x`` to ``size`` (``F.interpolate(..., antialias=True)``).

    Large downscales (a photo into a 32x32 or 224x224 model) run as two matrix products with the same
    weights: the same function up to float rounding, but its backward pass is a matmul instead of
    ``F.interpolate``'s scatter, about 10x faster on CPU at 512x512 -> 32x32 with N = 20 samples. The
    resize stays in fp32 under autocast: bf16 would round the pixels themselves."""
    h, w = x.shape[-2:]
    # small changes: the direct kernel is as fast; very long sides on a CPU: the matrices cost their side
    # squared, and the CPU kernel takes any scale
    if h * w < 4 * size[0] * size[1] or (max(h, w) > _RESIZE_MATRIX_MAX_SIDE and x.device.type == "cpu"):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        rows = _resize_matrix(h, size[0], x.device)  # [H', H]
        cols = _resize_matrix(w, size[1], x.device)  # [W', W]
        lead = x.shape[:-2]
        # width first, as one large [N*C*H, W] x [W, W'] product (a single GEMM runs near peak, a batched
        # one with a broadcast operand does not), then height on the much smaller result
        narrow = x.reshape(-1, w).mm(cols.t()).view(*lead, h, size[1])
        out = narrow.transpose(-1, -2).reshape(-1, h).mm(rows.t())
        return out.view(*lead, size[1], size[0]).transpose(-1, -2)


class ImageModel(nn.Module):
    """A classifier that takes NCHW float images in [0, 1], of any size, with 1 or 3 channels.

    Normalization and resizing belong here, never to the caller: a grayscale batch is repeated to RGB, a
    batch of another size is resized to the model's input size with antialiased bilinear interpolation
    (differentiable, so gradients reach the image at its own resolution), then ``(x - mean) / std``.

    :func:`load_model` gives one; a net of your own is wrapped directly (README, "From Python")::

        ImageModel(net, ModelConfig(name="my-net", arch="my-net", source=Source("file", "my-net.safetensors"),
                                    input_size=(3, 32, 32), num_classes=10, mean=(...), std=(...)))

    Args:
        net: takes ``[B, *config.input_size]`` images, normalized by ``config.mean`` and ``config.std``
            (``None``: raw [0, 1]), and returns ``[B, config.num_classes]`` logits. Protecting runs it in
            eval mode and takes gradients with respect to the images only, whatever its mode and
            ``requires_grad``.
        config: its name, input size, normalization, classes and ``dataset`` (``imagenet...``: a default
            budget of 4/255, else 8/255); ``source`` is where :func:`load_model` finds its weights, unread here.
        weights_sha256: the sha256 of the file the weights were loaded from; without one, a protector
            records the sha256 of the net's state (:func:`weights_sha256`).
        weights_path, pin_verified: where the weights came from, and whether their sha256 was checked
            against the registry's pin (:func:`load_model` sets them).
    """

    def __init__(
        self,
        net: nn.Module,
        config: ModelConfig,
        weights_sha256: str | None = None,
        *,
        weights_path: str | None = None,
        pin_verified: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.config = config
        #: sha256 of the very bytes the weights were loaded from (None: timm's own weights, or none loaded)
        self.weights_sha256 = weights_sha256
        #: where the weights came from: the local file read, or the timm source
        self.weights_path = weights_path
        #: whether ``weights_sha256`` was checked against the registry's pin
        self.pin_verified = pin_verified
        channels = config.input_size[0]
        if config.mean is not None and config.std is not None:
            if len(config.mean) != channels or len(config.std) != channels:  # registry rows are checked when read
                raise ConfigError(f"model {config.name!r}: mean and std need {channels} values (one per input "
                                  f"channel), got {len(config.mean)} and {len(config.std)}")  # fmt: skip
            # float32 whatever torch's default dtype (float64 made every input float64, which the net refused)
            self.register_buffer("mean", torch.tensor(config.mean, dtype=torch.float32).view(1, channels, 1, 1),
                                 persistent=False)  # fmt: skip
            self.register_buffer("std", torch.tensor(config.std, dtype=torch.float32).view(1, channels, 1, 1),
                                 persistent=False)  # fmt: skip
        else:
            self.mean = None
            self.std = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.config.input_size[1], self.config.input_size[2]

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images of any size and 1 or 3 channels -> the net's normalized input, in the net's dtype."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            # torch's own errors named the bias's type, or 32 "channels" for one image without a batch
            what = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"{self.name} takes [N, C, H, W] float images in [0, 1], got {what}"
                             + (" (for uint8: x.float() / 255)" if isinstance(x, torch.Tensor) and x.dtype == torch.uint8 else ""))  # fmt: skip
        net_dtype = next((p.dtype for p in self.net.parameters() if p.is_floating_point()), None)
        # normalized in the mean's dtype (float32, unless the wrapper was cast whole), then given to the net in its
        # own: a net cast before it was wrapped (net.double()) took float32 images, and failed on them
        dtype = self.mean.dtype if self.mean is not None else net_dtype or x.dtype
        if x.dtype != dtype:  # float64 images into a float32 net (a net cast with .half() takes half images)
            x = x.to(dtype)
        channels = self.config.input_size[0]
        if x.shape[1] == 1 and channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != channels:
            raise InputError(f"{self.name} takes {channels}-channel images (or 1), got {x.shape[1]} channels")
        if tuple(x.shape[-2:]) != self.input_hw:
            x = resize(x, self.input_hw)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        if net_dtype is not None and x.dtype != net_dtype:
            x = x.to(net_dtype)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(x))


def _config_error(cfg: ModelConfig, reason: str) -> PreemptError:
    """A bad registry row: a RegistryError naming its file when it has one."""
    if cfg.registry_file is not None:
        return RegistryError(cfg.registry_file, f"model {cfg.name!r}: {reason}")
    return ConfigError(f"model {cfg.name!r}: {reason}")


def _check_arch_known(cfg: ModelConfig) -> None:
    """Refuse an architecture neither built in nor known to timm: before any weights are looked for, so that
    a model no weights could make loadable is not met with advice on where to put its weights.

    Raises:
        ConfigError: the architecture is unknown (or timm is missing).
    """
    if is_arch(cfg.arch):
        return
    timm = _import_timm(f"architecture {cfg.arch!r}")
    if not timm.is_model(cfg.arch.split(".")[0]):
        raise ConfigError(
            f"model {cfg.name!r}: architecture {cfg.arch!r} is neither built into preempt nor known to timm "
            f"{timm.__version__}, so no weights file makes it loadable."
        )


def _build_net(cfg: ModelConfig, *, pretrained_timm: bool = False, weights_file: Path | None = None) -> nn.Module:
    """The bare network of ``cfg``: a preempt architecture, or any timm model by name.

    Raises:
        RegistryError (ConfigError for a config not read from a file): the architecture is unknown, or it
            rejects ``arch_args``.
    """
    if is_arch(cfg.arch):
        try:
            net = create_arch(cfg.arch, num_classes=cfg.num_classes, **cfg.arch_args)
        except (TypeError, ValueError) as e:
            raise _config_error(cfg, f"architecture {cfg.arch!r} rejects arch_args {dict(cfg.arch_args)}: {e}") from e
        _check_input_channels(cfg, net)
        return net.float()  # float32 whatever torch's default dtype (set to float64, the net was built in it)
    _check_arch_known(cfg)
    timm = _import_timm(f"architecture {cfg.arch!r}")

    name = cfg.source.location if pretrained_timm else cfg.arch
    try:
        # pretrained weights from the safetensors file given (timm's own lookup could unpickle a .bin)
        overlay = {"pretrained_cfg_overlay": {"file": str(weights_file), "source": ""}} if weights_file else {}
        net = timm.create_model(name, pretrained=pretrained_timm, num_classes=cfg.num_classes, **cfg.arch_args,
                                **overlay)  # fmt: skip
    except TypeError as e:  # an unexpected keyword reaches the model's constructor
        raise _config_error(cfg, f"timm's {name!r} rejects arch_args {dict(cfg.arch_args)}: {e}") from e
    _check_input_channels(cfg, net)
    return net.float()


#: How many keys (or shape errors) a weights mismatch names; the rest are counted.
_SHOWN_KEYS = 3


def _some(keys: list[str]) -> str:
    """The first few ``keys``, and how many more (a net of another architecture differs in hundreds)."""
    shown = ", ".join(repr(k) for k in keys[:_SHOWN_KEYS])
    return shown + (f" and {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else "")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(map(str, t.shape)) + "]"


def _stored_as(dtypes: set[torch.dtype]) -> str:
    """What non-float ``dtypes`` are, for a message: "integers" said so of complex64 weights too."""
    if all(d == torch.bool for d in dtypes):
        return "booleans"
    if all(not d.is_complex and d != torch.bool for d in dtypes):
        return "integers"
    if all(d.is_complex for d in dtypes):
        return "complex numbers"
    return "other types than float"


def _state_mismatch(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str:
    """Why ``state`` does not load into a net whose state dict is ``expected``, in one short line: the first
    few missing, unexpected and other-shape keys, with counts ("" when it fits). A missing BatchNorm
    ``num_batches_tracked`` is no mismatch (``load_state_dict`` fills it in)."""
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = sorted(k for k in state if k not in expected)
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the architecture's {len(expected)} keys missing ({_some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key{'s' * (len(unexpected) != 1)} ({_some(unexpected)})")
    if shapes:
        shown = "; ".join(f"{k!r}: file {_shape(state[k])}, architecture {_shape(expected[k])}"
                          for k in shapes[:_SHOWN_KEYS])  # fmt: skip
        more = f" and {len(shapes) - _SHOWN_KEYS} more" if len(shapes) > _SHOWN_KEYS else ""
        parts.append(f"{len(shapes)} tensor{'s' * (len(shapes) != 1)} of another shape ({shown}{more})")
    # an integer, bool or complex tensor where a float parameter goes: load_state_dict would cast it without
    # a word (dropping a complex tensor's imaginary part)
    kinds = [k for k in expected if k in state and k not in shapes and expected[k].is_floating_point()
             and not state[k].is_floating_point()]  # fmt: skip
    if kinds:
        shown = "; ".join(f"{k!r}: file {state[k].dtype}" for k in kinds[:_SHOWN_KEYS])
        more = f" and {len(kinds) - _SHOWN_KEYS} more" if len(kinds) > _SHOWN_KEYS else ""
        stored = _stored_as({state[k].dtype for k in kinds})
        parts.append(f"{len(kinds)} float tensor{'s' * (len(kinds) != 1)} stored as {stored} ({shown}{more})")
    if unexpected and len(unexpected) == len(state):
        prefix = _extra_prefix(expected, state)
        if prefix is None:
            parts.append("none of the file's keys fit: weights of another architecture (or arch_args), or keys "
                         "saved with a prefix")  # fmt: skip
        else:
            # the prefixes given to convert replace its default: "--strip-prefix model." alone would leave the
            # "module." of a DataParallel-wrapped checkpoint on
            strip = f"--strip-prefix {prefix}" if prefix.startswith("module.") else f"--strip-prefix module. " \
                f"--strip-prefix {prefix} (those given replace the default module.)"
            parts.append(f"none of the file's keys fit: every key of the file starts with {prefix!r}, which the "
                         f"architecture's lack (weights saved from a wrapper); convert the checkpoint again with "
                         f"preempt models convert {strip}")  # fmt: skip
    return "; ".join(parts)


def _extra_prefix(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str | None:
    """The shortest dotted prefix that every key of ``state`` starts with and whose removal makes most of
    them keys of ``expected`` ("model." of weights saved from a wrapper module), or None."""
    first = next(iter(state), "")
    for end in (i + 1 for i, char in enumerate(first) if char == "."):
        prefix = first[:end]
        if not all(k.startswith(prefix) for k in state):
            return None
        if 2 * sum(k[end:] in expected for k in state) > len(state):
            return prefix
    return None


def _learned_tensor_names(net: nn.Module) -> set[str]:
    """The state-dict names of ``net``'s parameters and BatchNorm running statistics: what training makes.
    Other buffers are left out: a model may keep an attention mask of -inf there on purpose."""
    names = {name for name, _ in net.named_parameters(remove_duplicate=False)}
    for prefix, module in net.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            names.update(f"{prefix}.{stat}".lstrip(".") for stat in ("running_mean", "running_var"))
    return names


def _unusable_values(state: Mapping[str, torch.Tensor], learned: set[str]) -> str:
    """Which of the ``learned`` tensors of ``state`` hold values no trained model has, in one short line (""
    when none): NaN or inf, or a BatchNorm running variance below zero (its square root is NaN). Such weights
    load without an error and give NaN gradients: ``protect`` wrote images perturbed by nothing useful, and
    called them protected."""
    found = []
    for key, tensor in state.items():
        if key not in learned or not tensor.is_floating_point():
            continue
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            found.append(f"{key!r}: {bad} of {tensor.numel()} values NaN or inf")
        elif key.endswith("running_var") and bool((tensor < 0).any()):
            found.append(f"{key!r}: a negative variance ({float(tensor.min()):.3g})")
    if not found:
        return ""
    more = f" and {len(found) - _SHOWN_KEYS} more tensors" if len(found) > _SHOWN_KEYS else ""
    return "; ".join(found[:_SHOWN_KEYS]) + more


def _check_usable_values(cfg: ModelConfig, path: Path | str, net: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Refuse weights ``state`` for ``net`` with NaN, inf or negative variances (see :func:`_unusable_values`)."""
    problem = _unusable_values(state, _learned_tensor_names(net))
    if problem:
        raise NonFiniteWeightsError(cfg.name, path, problem)


def _floats_or_none(text: str) -> tuple[float, ...] | None:
    return None if text.strip().lower() == "none" else tuple(float(v) for v in text.split(","))


def _metadata_mismatch(cfg: ModelConfig, meta: Mapping[str, str]) -> str:
    """How a weights file's own metadata contradicts ``cfg`` ("" when it does not). preempt's files (the
    shared ones, ``preempt train``'s) record the architecture and its arguments, the normalization, input
    size, classes and dataset they were saved with; weights loaded under a row with another shortcut,
    normalization or class order load without an error, and give wrong answers. Values another tool
    wrote in a form not read here are left alone."""
    found: list[str] = []

    def compare(key: str, file_value: Any, row_value: Any, same: bool | None = None) -> None:
        """Note the two values where they differ (``same``: the caller's own judgement of that)."""
        if not (file_value == row_value if same is None else same):
            found.append(f"{key} {_shown(file_value)} in the file, {_shown(row_value)} in the row")

    if "arch" in meta and is_arch(meta["arch"]):
        compare("arch", meta["arch"], cfg.arch)
    if is_arch(cfg.arch) and meta.get("arch", cfg.arch) == cfg.arch:
        recorded: dict[str, Any] = {}
        try:
            recorded = dict(json.loads(meta["arch_args"])) if "arch_args" in meta else {}
        except (ValueError, TypeError):
            pass
        if "shortcut" in meta:
            recorded.setdefault("shortcut", meta["shortcut"])
        effective = {**arch_defaults(cfg.arch), **cfg.arch_args}
        for key, value in recorded.items():
            if key in effective:  # as JSON values: a default tuple is the file's list
                compare(f"arch_args.{key}", value, _as_json(effective[key]))
    for key in ("mean", "std"):
        try:
            file_value = _floats_or_none(meta[key]) if key in meta else ...
        except ValueError:
            continue
        if file_value is not ...:
            compare(key, file_value, getattr(cfg, key), same=_close(file_value, getattr(cfg, key)))
    if "input_size" in meta:
        try:
            size = tuple(int(v) for v in meta["input_size"].split(","))
        except ValueError:
            size = ()
        if len(size) in (1, 3):
            row_size = cfg.input_size if len(size) == 3 else (cfg.input_size[1],)
            compare("input_size", list(size), list(row_size))
    if meta.get("num_classes", "").isdigit():
        compare("num_classes", int(meta["num_classes"]), cfg.num_classes)
    if meta.get("classes") and cfg.classes:  # compared joined, as files write them: a name may hold a comma
        compare("classes", meta["classes"].split(","), list(cfg.classes), same=meta["classes"] == ",".join(cfg.classes))
    datasets = [re.sub(r"[^0-9a-z]", "", d.casefold()) for d in (meta.get("dataset", ""), cfg.dataset)]
    if all(d and d != "unknown" for d in datasets) and datasets[0] != datasets[1]:
        # a name only (a row may evaluate CIFAR-10 weights on CIFAR-10-C): said, not refused; the budget
        # of a run comes from the row's
        _logger.warning("model %s: its weights were saved for dataset %r, its registry row says %r", cfg.name,
                        meta["dataset"], cfg.dataset)  # fmt: skip
    if not found:
        return ""
    return "; ".join(found) + (" (fix the row, or its base, to match the weights; then redo what the old row "
                               "made: protect --overwrite, a fresh eval --out)")  # fmt: skip


def _as_json(value: Any) -> Any:
    """``value`` as it would read back from JSON (tuples as lists), where it can be written as JSON."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return value


def _close(a: tuple[float, ...] | None, b: tuple[float, ...] | None) -> bool:
    """Whether two normalizations are the same (files record them to 6 significant digits)."""
    if a is None or b is None:
        return a is None and b is None
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-6) for x, y in zip(a, b))


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list) and len(value) > 4:
        return "[" + ", ".join(map(str, value[:3])) + f", ... ({len(value)})]"
    return repr(value) if isinstance(value, str) else str(value)


def _check_input_channels(cfg: ModelConfig, net: nn.Module) -> None:
    """Refuse a row whose ``input_size`` has another channel count than the net's first layer takes (it
    would fail at the first forward pass, deep inside the net), or that gives a mean and std to a net
    that normalizes its input itself (it would be normalized twice, without an error)."""
    if getattr(net, "normalizes_input", False) and cfg.mean is not None:
        raise _config_error(cfg, f"architecture {cfg.arch!r} normalizes its input itself (with the mean and std "
                                 'its weights hold): set mean = "none" and std = "none"')  # fmt: skip
    first = next((m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if isinstance(first, nn.Conv2d) and first.in_channels != cfg.input_size[0]:
        raise _config_error(cfg, f"input_size {list(cfg.input_size)} has {cfg.input_size[0]} channel(s), but "
                                 f"architecture {cfg.arch!r} takes {first.in_channels}-channel images: fix "
                                 "input_size (and mean/std), or the architecture's arch_args")  # fmt: skip


def weights_sha256(model: nn.Module) -> str:
    """What tells ``model``'s weights apart: the sha256 of the file they were loaded from
    (:attr:`ImageModel.weights_sha256`), else a sha256 of its state (:func:`state_sha256`: a net of the
    caller's, timm's own weights), so that other weights under one name are never taken for the same."""
    return getattr(model, "weights_sha256", None) or state_sha256(model)


def weights_sha256_of(model: nn.Module) -> str:
    """What :func:`weights_sha256` of ``model`` hashes: ``"file"``, the bytes of the weights file it was loaded
    from, or ``"state"``, its state (:func:`state_sha256`), which no file's sha256 equals: a record must say
    which, or timm's own weights look like a file that cannot be found."""
    return "file" if getattr(model, "weights_sha256", None) else "state"


def state_sha256(model: nn.Module) -> str:
    """sha256 of a model's state (names, dtypes, shapes and bytes of every tensor of its ``state_dict``);
    a model compiled with ``torch.compile`` gives its own model's (the same weights)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile prefixes every name with "_orig_mod."
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(json.dumps([name, str(t.dtype), list(tensor.shape)]).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def build_model(cfg: ModelConfig) -> ImageModel:
    """The wrapped model of ``cfg`` with freshly initialized weights (tests, training from scratch)."""
    return ImageModel(_build_net(cfg), cfg)


def _load_timm_pretrained(cfg: ModelConfig, verify_hash: bool) -> nn.Module:
    if cfg.sha256 and verify_hash:  # registry files refuse this; a hand-made config must not pass silently
        raise _config_error(cfg, "a sha256 pin cannot be checked on a timm: source (timm fetches and loads its own "
                                 "file); remove the pin, or use an hf:// or file: source")  # fmt: skip
    mismatch = timm_arch_mismatch(cfg.arch, cfg.source.location)  # a registry file refuses it already
    if mismatch:
        raise _config_error(cfg, mismatch)
    _check_arch_known(cfg)
    pretrained = timm_pretrained_cfg(cfg.source.location)
    if pretrained is None:
        raise _config_error(cfg, f"timm {_timm_version()} has no pretrained weights {cfg.source.location!r} "
                                 "(an unknown model or tag)")  # fmt: skip
    if pretrained.num_classes and pretrained.num_classes != cfg.num_classes:
        raise _config_error(cfg, f"num_classes = {cfg.num_classes}, but timm's pretrained {cfg.source.location!r} "
                                 f"has {pretrained.num_classes} classes: timm would replace its head with a random "
                                 "one. Remove num_classes (timm's is used) or fix it")  # fmt: skip
    weights = _timm_safetensors(cfg, pretrained)
    check_safetensors_header(cfg.name, weights)  # a pickle or a damaged file in the cache: refused as any other
    if verify_hash:  # a copy changed since its download is not timm's model, as for an hf:// source
        check_served_copy(cfg, weights)
    with hub_errors(cfg):
        try:
            net = _build_net(cfg, pretrained_timm=True, weights_file=weights)
            _check_usable_values(cfg, weights, net, net.state_dict())
            return net
        except RuntimeError as e:  # load_state_dict's: torch's message lists every key, kilobytes of them
            raise WeightsMismatchError(cfg.name, weights, clip(" ".join(str(e).split()), 400)) from e
        except SafetensorError as e:  # a damaged file whose header looked whole
            raise unparsable_weights(cfg.name, weights, e) from e
    raise AssertionError("unreachable")  # pragma: no cover - hub_errors re-raises


def _timm_version() -> str:
    return _import_timm("timm's weights").__version__


def _import_timm(needed_by: str) -> Any:
    """The ``timm`` module, for ``needed_by`` (what the message names).

    Raises:
        ConfigError: timm is missing, or its import fails: a torchvision built for another torch (pip pairs
            a CPU torch from one index with torchvision from another) raises RuntimeError ("operator
            torchvision::nms does not exist"), which read as preempt's own internal error.
    """
    try:
        import timm
    except ImportError as e:
        raise ConfigError(f"{needed_by} needs timm, which is not installed: pip install timm") from e
    except Exception as e:  # a broken install: say which, and that the built-in models do not need it
        reason = f"{type(e).__name__}: {first_line(e)}"
        hint = ""
        if "torchvision" in reason:
            from importlib.metadata import PackageNotFoundError, version

            try:
                hint = (f"; torchvision {version('torchvision')} does not match torch {torch.__version__}: install "
                        f"the torchvision built for this torch, or uninstall torchvision")  # fmt: skip
            except PackageNotFoundError:
                pass
        raise ConfigError(f"{needed_by} needs timm, which cannot be imported ({reason}){hint} "
                          f"(preempt's built-in architectures do not need it)") from e  # fmt: skip
    return timm


def _timm_safetensors(cfg: ModelConfig, pretrained: Any) -> Path:
    """timm's pretrained weights of ``cfg`` as the safetensors file of their Hub repository (through the
    Hub's cache). Left to itself, timm falls back to a pickle (``pytorch_model.bin``, or a URL's checkpoint)
    where a repository has no safetensors; preempt loads safetensors only.

    Raises:
        WeightsNotFoundError: timm's weights have no safetensors copy on the Hub.
        OfflineWeightsError, ...: see :func:`~preempt_cli.hub.hub_errors`.
    """
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    hub_id = getattr(pretrained, "hf_hub_id", None)
    convert = ("preempt loads safetensors only: download them, convert them once ('preempt models convert'), "
               "and register the file as a file: source")  # fmt: skip
    if not hub_id:
        raise WeightsNotFoundError(cfg.name, str(cfg.source), hint=f"timm has these weights only as a pickled "
                                                                   f"checkpoint at a URL; {convert}.")  # fmt: skip
    try:
        return hub_download(cfg, hub_id, "model.safetensors")
    except WeightsNotFoundError as e:
        missing = e.__cause__
        if not isinstance(missing, EntryNotFoundError) or isinstance(missing, LocalEntryNotFoundError):
            raise  # no such repository, or access refused: said as for any Hub source
        raise WeightsNotFoundError(cfg.name, str(cfg.source), hint=(
            f"its Hub repository {hub_id} holds no model.safetensors (only a pickle); {convert}.")) from missing  # fmt: skip


def load_model(
    model: str | ModelConfig,
    *,
    device: torch.device | str = "cpu",
    models_dir: Path | str | None = None,
    registry: Sequence[Path | str] | Path | str = (),
    verify_hash: bool = True,
    fuse: bool = True,
) -> ImageModel:
    """Load a registered model for inference: weights loaded, eval mode, parameters frozen, BatchNorm
    folded into convolutions and convolutions fused with their ReLU (``fuse``: :mod:`._fusion`),
    channels-last memory layout.

    Args:
        model: a registry name or a config.
        device: where the model lives: ``cpu``, ``cuda``, ``cuda:I``, ``mps`` or ``auto`` (see
            :func:`~preempt_cli.device.resolve_device`).
        models_dir: folder holding local weights files (else ``PREEMPT_MODELS_DIR``).
        registry: extra registry files, or one (they override the built-in and user registries).
        verify_hash: check the registry's sha256 pin (on the bytes loaded), and that a copy in the Hugging Face
            cache (hf:// and timm: sources) is the file the Hub served.
        fuse: fold BatchNorm into the convolutions and fuse convolutions with their ReLU (faster). Folding
            rounds differently: logits move by about 1e-5, and a protected image may differ by a few levels
            on about 0.1% of pixels from one made with ``fuse=False``; the same seed gives the same bits
            with the same ``fuse`` (the CLI always fuses).

    Raises:
        UnknownModelError, WeightsNotFoundError, OfflineWeightsError, HashMismatchError,
        UnsafeWeightsError (``UnreadableWeightsError``: an empty, truncated or damaged file),
        WeightsMismatchError (``NonFiniteWeightsError``: NaN, inf or a negative BatchNorm variance in the
        weights), ConfigError, RegistryError (a row the architecture rejects, an input_size
        with other channels than the architecture takes, or a timm row whose num_classes differs from
        timm's pretrained head).
    """
    device = resolve_device(device)  # before any loading: "cuda" without a GPU is a ConfigError, not torch's
    if not isinstance(model, (str, ModelConfig)):
        raise ConfigError(f"model must be a registry name or a ModelConfig, got {model!r}")
    for name, flag in (("verify_hash", verify_hash), ("fuse", fuse)):
        if not isinstance(flag, bool):  # "no" or "false" is true: a pin left unchecked without a word
            raise ConfigError(f"{name} must be True or False, got {flag!r}")
    cfg = model if isinstance(model, ModelConfig) else get_model_config(model, registry)
    models_dir = expand_home(models_dir) if models_dir is not None else None
    sha = None
    pin_verified = False
    # the net's random initial weights, which its file's replace, are drawn from a generator of their own: they
    # advanced the caller's (torch.manual_seed(0); load_model(...); torch.rand(...) drew other numbers)
    own_rng = partial(torch.random.fork_rng, devices=[])
    if cfg.source.kind == "timm":
        with own_rng():
            net = _load_timm_pretrained(cfg, verify_hash)
        where = str(cfg.source)
    else:
        _check_arch_known(cfg)
        # one open file: the bytes hashed (and checked against the pin) are the bytes loaded, mapped, not read whole
        with verified_weights(cfg, models_dir, verify_hash=verify_hash) as weights:
            path, sha = weights.path, weights.sha256
            where = str(path)
            mismatch = _metadata_mismatch(cfg, weights.metadata)
            if mismatch:
                raise WeightsMetadataMismatchError(cfg.name, path, mismatch)
            with own_rng():
                net = _build_net(cfg)
            state = {k: v.float() if v.is_floating_point() else v for k, v in weights.state.items()}
            mismatch = _state_mismatch(net.state_dict(), state)  # torch's own message lists every key
            if mismatch:
                raise WeightsMismatchError(cfg.name, path, mismatch)
            _check_usable_values(cfg, path, net, state)
            try:
                net.load_state_dict(state, strict=True)  # copies: the net keeps nothing of the mapped file
            except RuntimeError as e:  # what the comparison above does not see (a module's own load hook)
                raise WeightsMismatchError(cfg.name, path, clip(" ".join(str(e).split()), 400)) from e
            del state
        pin_verified = bool(verify_hash and cfg.sha256)
        _logger.debug("loaded %s from %s (sha256 %s)", cfg.name, path, sha)
    net = fuse_model(net) if fuse else net.eval()
    wrapped = ImageModel(net, cfg, sha, weights_path=where, pin_verified=pin_verified).eval()
    for p in wrapped.parameters():
        p.requires_grad_(False)
    return wrapped.to(device, memory_format=torch.channels_last)
