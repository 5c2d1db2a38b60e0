"""Measuring what protection buys, with the paper's protocol (Sec. 5) and its reversion protocol (Sec. 4.3).

For every victim x defense x attack *cell*: the victim's clean accuracy on the defended images and its
robust accuracy on adversarial examples crafted against it, starting from the defended image and within
eps of *that* image, on 8-bit images. Per defense: time per image, L-inf, SSIM and LPIPS (where available)
between original and defended images. Defended image sets and finished cells are saved under the output
folder, so an interrupted run resumes without recomputing them, each cell with its images' correctness: each
defense is tested against no defense on the same images (:meth:`Evaluator.paired_with_none`), and the defenses
against each other (:meth:`Evaluator.paired_between_defenses`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import numbers
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ._paths import output_folder
from ._percent import percent
from .attacks import PGD, AutoAttack, check_attack_eps, check_int, check_norm, robust_correctness
from .device import resolve_device
from .baselines import BILEVEL_OPTIMIZERS
from .engine import COMPILE_MODES, PRECISIONS, ForeBackConfig, check_seed, default_eps, eval_mode, parse_eps
from .errors import ConfigError, InputConfigError, LabelError
from .imageio import atomic_write, content_seed, display_name, levels_to_float, quantize_levels, read_image
from .inputs import PROTECTED_SUFFIX, REVERTED_SUFFIX, InputFile, collect_inputs
from .labels import read_label_file
from .registry import close_classes_hint, find_class
from .models import ImageModel, weights_sha256, weights_sha256_of
from .protect import Protector, read_preempt_metadata_file, regular_file_sha256
from .revert import Reverter

__all__ = [
    "Dataset",
    "load_dataset",
    "DefenseSpec",
    "AttackSpec",
    "DefendedSet",
    "Evaluator",
    "check_jpeg_quality",
    "check_reversion_options",
    "is_eval_output",
    "jpeg_roundtrip",
    "json_dumps",
    "format_p",
    "holm_adjusted",
    "mcnemar_exact",
    "P_FLOOR",
    "PAIRED_TEST",
    "PAIRED_BETWEEN_TEST",
    "perturbation_map_name",
    "reversion_protocol",
    "reversion_verdicts",
]

_logger = logging.getLogger(__name__)

#: The names of the ``labels=`` option that mean the dataset's own labels.
GROUND_TRUTH = ("ground-truth", "gt", "truth")

#: The qualities Pillow's JPEG encoder is given by the blind reversion (libjpeg's scale; 0 means 1 there).
JPEG_QUALITY_RANGE = (1, 100)

#: The names of the perturbation maps of a report (``perturbation_<spec key>.png``): the only images eval writes.
_PERTURBATION_MAP = re.compile(r"perturbation_[0-9a-f]{16}\.png")


def json_dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` for everything eval writes: strict JSON (``allow_nan=False``), so a value that was not
    measured has to be ``None`` (``null``); a NaN or infinity raises ``ValueError`` instead of writing a
    file no strict JSON reader can load."""
    return json.dumps(obj, allow_nan=False, **kwargs)


def _finite_or_none(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with NaN and infinite floats as ``None`` (cells written by 0.9.0 and earlier stored NaN for
    a value not measured)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


# -- data -------------------------------------------------------------------------------------------------
def perturbation_map_name(spec: "DefenseSpec") -> str:
    """The file name of the perturbation map of ``spec`` in eval's output folder."""
    return f"perturbation_{spec.key}.png"


def is_eval_output(path: Path) -> bool:
    """Whether ``path`` is an image eval writes (a perturbation map). Such files are never data, wherever
    ``--out`` put them: the default ``preempt-eval`` is inside the data when eval runs in the data folder,
    and so is any ``--out`` pointing there, of this run or an earlier one."""
    return _PERTURBATION_MAP.fullmatch(path.name) is not None


@dataclass
class Dataset:
    """Labelled images of one size: uint8 NCHW pixels and int64 labels, in a deterministic order."""

    root: Path
    paths: list[Path]
    images: torch.Tensor
    labels: torch.Tensor
    #: the class names that label i stands for (the models' order it was read in); None: labels are indices
    classes: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def hwc(self, i: int) -> np.ndarray:
        return self.images[i].permute(1, 2, 0).contiguous().numpy()

    def subset(self, n: int) -> "Dataset":
        return Dataset(self.root, self.paths[:n], self.images[:n], self.labels[:n], self.classes)


def _check_dataset(dataset: Any) -> None:
    """Refuse what is not a :class:`Dataset` of uint8 NCHW images with one integer label each (float images
    were divided by 255 again: a clean accuracy of 12.5% for 87.5%).

    Raises:
        InputConfigError: the dataset is not so (an ``InputError``, and the ``ConfigError`` it was before 0.22.0).
    """
    def described(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            return f"{value.dtype} tensor of shape {tuple(value.shape)}"
        return type(value).__name__

    images, labels = getattr(dataset, "images", None), getattr(dataset, "labels", None)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        raise InputConfigError(f"dataset images must be a uint8 [N, C, H, W] tensor of 8-bit levels (as "
                               f"load_dataset gives), got a {described(images)}")  # fmt: skip
    if (not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool
            or tuple(labels.shape) != (images.shape[0],)):  # fmt: skip
        raise InputConfigError(f"dataset labels must be {images.shape[0]} integer class indices (one per image), "
                               f"got a {described(labels)}")  # fmt: skip


def _class_list(names: Sequence[str]) -> str:
    return "[" + ", ".join(names[:3]) + (f", ... ({len(names)})]" if len(names) > 3 else "]")


def load_dataset(
    root: Path | str, *, classes: Sequence[str] | None, labels_file: Path | str | None = None, limit: int | None = None,
    synsets: Sequence[str] | None = None,
) -> Dataset:
    """An ImageFolder directory (labels from folder names) or files with a labels CSV/JSON. A label is a class
    index, a name of ``classes``, or a synset of ``synsets`` (ImageNet's folders: ``n01440764``).

    Files are ordered by file name (then path), so ``limit`` takes "the first N" deterministically (for
    CIFAR-10 test images named by index, the first N of the test set); a limit above the number of images
    takes them all, with a warning. Folder walks leave out eval's own
    perturbation maps (:func:`is_eval_output`) and preempt's outputs (``*.protected.png``, ``*.reverted.png``).

    Raises:
        ConfigError: no images, images of different sizes, images of more than 8 bits, or a bad limit.
        LabelError: a label is missing, negative, or not a class of the models (a class name with
            ``classes=None``).
        ImageReadError: a file that cannot be read as an image (``root`` itself missing: "no such file").
    """
    root = Path(root)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1):
        raise ConfigError(f"limit must be a whole number >= 1, got {limit!r}")
    found = [i for i in collect_inputs([root]) if not is_eval_output(i.path)]
    items = sorted(found, key=lambda i: (i.path.name, str(i.path)))
    if not items:
        raise ConfigError(f"no images found in {root}")
    if limit and limit > len(items):  # the rows say n; a table of "the first 1000" was of 932 without a word
        _logger.warning("limit %d is more than the %d images in %s: all %d are evaluated", limit, len(items), root,
                        len(items))  # fmt: skip
    items = items[:limit] if limit else items
    label_map = read_label_file(labels_file) if labels_file else None
    pixels, labels = [], []
    for item in items:
        picture = read_image(item.path)
        raw = label_map.lookup(item) if label_map else (item.relative.parts[0] if len(item.relative.parts) > 1 else None)
        if raw is None:
            raise LabelError(f"{item.path}: no label (use an ImageFolder layout ROOT/<class>/<file> or --labels-file)")
        if isinstance(raw, str) and not raw.strip().isdigit():
            # as protect reads a class name (ModelConfig.class_index): a folder `Cat` is the class cat there,
            # an ImageNet folder `n01440764` its class tench
            try:
                found = find_class(raw, classes, synsets)
            except ValueError as e:
                raise LabelError(f"{item.path}: {e}") from None
            if found is None:  # a mistyped folder or label: the classes meant, as protect says them
                raise LabelError(f"{item.path}: unknown class {raw!r}{close_classes_hint(raw, classes or ())}")
            label = found
        else:
            label = int(raw)
        if label < 0:  # a JSON -1: scored as wrong by every model, or refused only after the defenses ran
            raise LabelError(f"{item.path}: label {label} is no class index (they start at 0)")
        if picture.max_value != 255:  # the evaluation's images are 8-bit (uint8), as the attacks round them
            raise ConfigError(f"{item.path}: a 16-bit image; eval takes 8-bit images (convert them first)")
        pixels.append(torch.from_numpy(picture.color.astype(np.uint8)).permute(2, 0, 1))
        labels.append(label)
    shapes = {tuple(p.shape) for p in pixels}
    if len(shapes) > 1:
        raise ConfigError(f"eval needs images of one size and mode; {root} has {len(shapes)} ({sorted(shapes)[:3]})")
    return Dataset(root, [i.path for i in items], torch.stack(pixels), torch.tensor(labels),
                   tuple(classes) if classes else None)  # fmt: skip


# -- specs ------------------------------------------------------------------------------------------------
def _parse_options(text: str) -> dict[str, str]:
    options = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"expected key=value, got {part!r}")
        options[key.strip().replace("-", "_")] = value.strip()
    return options


_DEFENSE_ALIASES = {"none": "none", "fp": "fast-preemption", "fast-preemption": "fast-preemption",
                    "bilevel": "bi-level", "bi-level": "bi-level", "folder": "folder"}  # fmt: skip
_DEFENSE_OPTIONS = {
    "none": set(),
    "fast-preemption": {"backbone", "classifier", "labels", "preset", "eps", "eta", "forward", "backward", "samples",
                        "inner_steps", "seed", "precision", "compile", "name"},
    "bi-level": {"backbone", "classifier", "labels", "eps", "eta", "steps", "inner_steps", "optimizer", "seed", "name"},
    "folder": {"path", "name"},
}  # fmt: skip


def _whole_number(key: str, text: str, minimum: int) -> int:
    """An option's text as a whole number of at least ``minimum``.

    Raises:
        ConfigError: naming the option and its text, when it is no such number.
    """
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{key} must be a whole number >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise ConfigError(f"{key} must be a whole number >= {minimum}, got {text!r}")
    return value


def _number(key: str, text: str) -> float:
    """An option's text as a number (its range is the defense's to check).

    Raises:
        ConfigError: naming the option and its text, when it is not a number.
    """
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{key} must be a number, got {text!r}") from None


#: How the fp and bilevel options that are not names are read: a number's type and least value, a choice's
#: values. :meth:`DefenseSpec.parse` reads every one given, so that a bad value is a usage error before any
#: model loads; the defenses read them through :meth:`DefenseSpec.value`.
_DEFENSE_VALUES: dict[str, Callable[[str, str], Any]] = {
    "eps": lambda key, text: parse_eps(text),
    "eta": _number,
    "forward": lambda key, text: _whole_number(key, text, 0),
    "backward": lambda key, text: _whole_number(key, text, 0),
    "samples": lambda key, text: _whole_number(key, text, 1),
    "inner_steps": lambda key, text: _whole_number(key, text, 1),
    "steps": lambda key, text: _whole_number(key, text, 1),
    "seed": lambda key, text: check_seed(_whole_number(key, text, 0)),
}
_DEFENSE_CHOICES: dict[str, tuple[str, ...]] = {
    "labels": ("classifier", "backbone", *GROUND_TRUTH),
    "precision": PRECISIONS,
    "compile": COMPILE_MODES,
    "optimizer": BILEVEL_OPTIMIZERS,
}


@dataclass(frozen=True)
class DefenseSpec:
    """A defense to compare: ``none``, ``fp[:k=v,...]``, ``bilevel[:k=v,...]`` or ``folder:PATH``. Values are
    read when the text is parsed, so that a bad one is refused before any work (:meth:`value` gives them typed).

    ``fp`` options: backbone, classifier, labels (classifier|ground-truth|backbone), preset, eps, eta,
    forward, backward, samples, inner_steps, seed, precision (fp32|bf16|auto), compile (off|default|
    reduce-overhead|max-autotune), name. ``bilevel``: backbone, classifier, labels, eps,
    eta, steps, inner_steps, optimizer, seed, name.
    """

    kind: str
    options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str, defaults: dict[str, str] | None = None) -> "DefenseSpec":
        """``text`` as a spec; ``defaults`` (backbone, classifier, seed) fill in what an fp or bilevel defense omits.

        Raises:
            ConfigError: an unknown defense or option, a missing backbone or path, or a bad value (naming the
                option and the value).
        """
        head, _, rest = text.partition(":")
        written = head.strip().lower()  # messages name the defense as the user spelt it (bilevel, not bi-level)
        kind = _DEFENSE_ALIASES.get(written)
        if kind is None:
            raise ConfigError(f"unknown defense {head!r}: use none, fp, bilevel or folder:PATH")
        if kind == "folder":
            if not rest:
                raise ConfigError("folder defense needs a path: folder:PATH")
            options = {"path": rest} if "=" not in rest else _parse_options(rest)
        else:
            options = _parse_options(rest)
        unknown = set(options) - _DEFENSE_OPTIONS[kind]
        if unknown:
            raise ConfigError(f"defense {written} does not take {', '.join(sorted(unknown))}")
        if kind in ("fast-preemption", "bi-level"):
            for key, value in (defaults or {}).items():
                if value is not None:
                    options.setdefault(key, value)
            if "backbone" not in options:
                raise ConfigError(f"defense {written} needs a backbone (--backbone or {written}:backbone=NAME)")
        elif kind == "folder" and not options.get("path"):
            raise ConfigError("folder defense needs a path: folder:PATH")
        spec = cls(kind, tuple(sorted(options.items())))
        spec._check_values()
        return spec

    def _check_values(self) -> None:
        """Read every option of an fp or bilevel defense as the defense will, and its settings of Algorithm 1
        together (at least one forward or backward step).

        Raises:
            ConfigError: an option without a value, or a value of the wrong type, out of range or not one of
                its choices, naming the option and the value.
        """
        if self.kind not in ("fast-preemption", "bi-level"):
            return
        for key, text in self.options:
            if not text:
                raise ConfigError(f"{key}= needs a value")
            if key in _DEFENSE_CHOICES and text not in _DEFENSE_CHOICES[key]:
                raise ConfigError(f"{key} must be one of {', '.join(_DEFENSE_CHOICES[key])}, got {text!r}")
            self.value(key)
        self.settings()

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)

    def value(self, key: str, default: Any = None) -> Any:
        """Option ``key`` read as its type (a whole number, a number, eps as a fraction of the range; names
        and choices as written), or ``default`` when it is not given.

        Raises:
            ConfigError: a value that is not of its type, or below its least value.
        """
        text = self.get(key)
        if text is None:
            return default
        read = _DEFENSE_VALUES.get(key)
        return read(key, text) if read else text

    def settings(self, dataset: str | None = None) -> ForeBackConfig:
        """The settings of Algorithm 1 this spec gives (fp; bilevel takes its eps from them): its preset with
        the options given; without ``eps=``, the paper's budget for the backbone's ``dataset``.

        Raises:
            ConfigError: an unknown preset, or a value of the wrong type or out of range.
        """
        return ForeBackConfig.from_preset(
            self.get("preset", "paper"), dataset=dataset, eps=self.value("eps"), eta=self.value("eta"),
            forward_steps=self.value("forward"), backward_steps=self.value("backward"),
            samples=self.value("samples"), inner_steps=self.value("inner_steps"),
        )  # fmt: skip

    @property
    def name(self) -> str:
        if self.get("name"):
            return str(self.get("name"))
        if self.kind == "none":
            return "none"
        if self.kind == "folder":  # as given: two folders of one name (a/protected, b/protected) are two rows
            return f"folder:{display_name(self.get('path'))}"  # its bytes shown, as tables and CSV can write them
        # every option, the classifier too: rows of a classifier ablation were named alike
        return f"{'FP' if self.kind == 'fast-preemption' else 'Bi-Level'}({', '.join(f'{k}={v}' for k, v in self.options)})"

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps([self.kind, self.options]).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class AttackSpec:
    """An attack: ``pgd[:norm=Linf,eps=,steps=20,step_size=eps/4,restarts=1]`` or
    ``autoattack[:version=standard,norm=Linf,eps=]`` (alias ``aa``); both take ``limit=N`` (attack only
    the first N images) and ``seed``. Without ``eps``: in L-inf the victim's dataset's budget, as the
    defense's (8/255 CIFAR-10, 4/255 ImageNet: :meth:`for_dataset`), in L2 0.5.

    Both attack 8-bit images, in both norms: PGD rounds each restart's result, AutoAttack rounds
    after every attack of its cascade and attacks the points rounding restored again with the next one
    (:class:`~preempt_cli.attacks.AutoAttack` ``quantize``); success is judged on the rounded images."""

    kind: str
    options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> "AttackSpec":
        head, _, rest = text.partition(":")
        kind = {"pgd": "pgd", "aa": "autoattack", "autoattack": "autoattack"}.get(head.strip().lower())
        if kind is None:
            raise ConfigError(f"unknown attack {head!r}: use pgd or aa (also spelled autoattack)")
        options = _parse_options(rest)
        allowed = {"norm", "eps", "steps", "step_size", "restarts", "limit", "seed"} if kind == "pgd" else {
            "norm", "eps", "version", "limit", "seed"}  # fmt: skip
        unknown = set(options) - allowed
        if unknown:
            raise ConfigError(f"attack {kind} does not take {', '.join(sorted(unknown))}")
        spec = cls(kind, tuple(sorted(options.items())))
        _ = spec.limit  # refuses a limit= that is no whole number >= 1
        spec.build(None, check_only=True)
        return spec

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)

    def for_dataset(self, dataset: str) -> "AttackSpec":
        """This attack with, where no ``eps`` is given in L-inf, the budget of ``dataset``'s images that the
        defense uses too (4/255 for ImageNet: an 8/255 default attacked a 4/255 defense with twice its
        budget); CIFAR-10's 8/255 is the default already."""
        budget = default_eps(dataset)
        if self.norm != "Linf" or self.get("eps") is not None or abs(budget - 8 / 255) < 1e-12:
            return self
        return AttackSpec(self.kind, tuple(sorted({**dict(self.options), "eps": f"{round(budget * 255)}/255"}.items())))

    @property
    def norm(self) -> str:
        return {"linf": "Linf", "l2": "L2"}.get(str(self.get("norm", "Linf")).lower(), str(self.get("norm")))

    @property
    def eps(self) -> float:
        default = "8/255" if self.norm == "Linf" else "0.5"
        text = str(self.get("eps", default))
        if self.norm == "L2":  # L2 budgets are not in pixel levels: never rescale them
            from fractions import Fraction

            try:
                return float(Fraction(text))
            except (ValueError, ZeroDivisionError) as e:
                raise ConfigError(f"invalid eps {text!r}") from e
        return parse_eps(text)

    @property
    def limit(self) -> int | None:
        """``limit=N``: attack only the first N images (None: all).

        Raises:
            ConfigError: N is not a whole number >= 1.
        """
        value = self.get("limit")
        if value is None:
            return None
        try:
            limit = int(value)
        except ValueError:
            raise ConfigError(f"limit must be a whole number >= 1, got {value!r}") from None
        if limit < 1:
            raise ConfigError(f"limit must be >= 1 (the number of images to attack), got {limit}")
        return limit

    @property
    def name(self) -> str:
        """The row's name: kind, steps or version, norm and budget, then in parentheses every other setting
        that is not the default (PGD's step size and restarts, the seed) and the limit, so that rows of two
        attacks are never named alike (``pgd`` and ``pgd:restarts=5`` were both "PGD-20 Linf 8/255")."""

        def budget(value: float) -> str:
            levels = value * 255
            return f"{round(levels)}/255" if self.norm == "Linf" and abs(levels - round(levels)) < 1e-6 else f"{value:g}"

        notes = []
        if self.kind == "pgd":
            label = f"PGD-{self._whole('steps', 20)} {self.norm}"
            step = self._step_size()
            if step is not None and abs(step - self.eps / 4) > 1e-12:
                notes.append(f"step {budget(step)}")
            restarts = self._whole("restarts", 1)
            if restarts != 1:
                notes.append(f"{restarts} restarts")
        else:
            label = f"AA-{self.get('version', 'standard')} {self.norm}"
        seed = self._whole("seed", 0)
        if seed != 0:
            notes.append(f"seed {seed}")
        if self.limit:
            notes.append(f"first {self.limit}")
        return f"{label} {budget(self.eps)}" + (f" ({', '.join(notes)})" if notes else "")

    def settings(self) -> dict[str, Any]:
        """Every setting this attack runs with, its defaults filled in (the seed of its random starts too):
        what a reader needs to run it again, kept in ``run.json``."""
        record: dict[str, Any] = {"name": self.name, "kind": self.kind, "norm": self.norm, "eps": self.eps,
                                  "seed": self._whole("seed", 0), "limit": self.limit}  # fmt: skip
        if self.kind == "pgd":
            step = self._step_size()
            record.update(steps=self._whole("steps", 20), step_size=self.eps / 4 if step is None else step,
                          restarts=self._whole("restarts", 1), starts=PGD.starts)  # fmt: skip
        else:
            record["version"] = str(self.get("version", "standard"))
        return record

    def _step_size(self) -> float | None:
        """PGD's ``step_size=`` as a number (L-inf: in levels as eps is, ``2`` = 2/255); None: not given.

        Raises:
            ConfigError: not a number.
        """
        step_size = self.get("step_size")
        if not step_size:
            return None
        try:
            return parse_eps(step_size) if self.norm == "Linf" else float(step_size)
        except ValueError:
            raise ConfigError(f"invalid step_size {step_size!r}") from None

    def _whole(self, key: str, default: int) -> int:
        value = self.get(key, default)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a whole number, got {value!r}") from None

    def build(self, model: torch.nn.Module | None, *, check_only: bool = False, batch_size: int = 250) -> Any:
        """The attack on ``model``; with ``check_only``, only its settings checked (``parse`` does, so that a
        bad value is refused before any defense is computed).

        Raises:
            ConfigError: a setting the attack refuses (steps or restarts below 1, an unknown norm, ...).
        """
        seed = self._whole("seed", 0)
        if self.kind == "pgd":
            steps = self._whole("steps", 20)
            kwargs = dict(norm=self.norm, eps=self.eps, steps=steps, step_size=self._step_size(),
                          restarts=self._whole("restarts", 1), quantize=True, seed=seed)  # fmt: skip
            # built on a stand-in model to check the values: PGD's own checks, before any work
            attack = PGD(model if model is not None else torch.nn.Identity(), **kwargs)
            return None if check_only else attack
        version = str(self.get("version", "standard"))
        if version not in ("standard", "rand"):
            raise ConfigError(f"AutoAttack version must be standard or rand, got {version!r}")
        check_norm(self.norm)
        check_attack_eps(self.eps, self.norm)
        check_int("seed", seed, 0)
        if check_only:
            return None
        # an 8-bit attack, rounded after every attack of the cascade (not once at its end: see AutoAttack), in
        # L2 too: its rows were float images, beside PGD-L2's rounded ones and a report saying "8-bit" of all
        return AutoAttack(model, norm=self.norm, eps=self.eps, version=version, seed=seed, batch_size=batch_size,
                          quantize=True)  # fmt: skip


# -- defenses -------------------------------------------------------------------------------------------
@dataclass
class DefendedSet:
    """The images a defense produced (uint8), with its cost and the visual-quality metrics."""

    spec: DefenseSpec
    images: torch.Tensor
    seconds_per_image: float | None  # None: not measured (a folder of images protected elsewhere)
    linf: float  # max over images, in [0, 1] units
    ssim: float | None = None
    lpips: float | None = None
    lpips_note: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"defense": self.spec.name, "seconds_per_image": self.seconds_per_image, "linf": self.linf,
                "ssim": self.ssim, "lpips": self.lpips, "lpips_note": self.lpips_note or None}  # fmt: skip


def check_jpeg_quality(quality: int, option: str = "JPEG quality") -> None:
    """Refuse a JPEG quality outside 1..100.

    Raises:
        ConfigError: ``quality`` is not a whole number in 1..100.
    """
    lo, hi = JPEG_QUALITY_RANGE
    if isinstance(quality, bool) or not isinstance(quality, int) or not lo <= quality <= hi:
        raise ConfigError(f"{option} must be a whole number in {lo}..{hi} (Pillow's JPEG quality scale), "
                          f"got {quality!r}")  # fmt: skip


def check_reversion_options(flip_fraction: float, jpeg_quality: int, reverter_labels: str,
                            defense: DefenseSpec | None = None) -> None:  # fmt: skip
    """Refuse settings of :func:`reversion_protocol` that cannot work (the CLI checks them before any model
    loads).

    Raises:
        ConfigError: a flip fraction outside [0, 1], a JPEG quality outside 1..100, unknown reverter labels, or
            a flip fraction above 0 with a ``defense`` that declares labels other than the ground truth.
    """
    if not 0 <= flip_fraction <= 1:
        raise ConfigError(f"--flip-fraction must be in [0, 1], got {flip_fraction:g}")
    declared = defense.get("labels") if defense is not None else None
    if flip_fraction > 0 and declared is not None and declared not in GROUND_TRUTH:
        # the flips replace the defense's labels: labels=backbone was protected with flipped ground truth unsaid
        raise ConfigError(f"--flip-fraction labels the defense with flipped ground truth, not labels={declared}; "
                          f"drop labels={declared} (or --flip-fraction)")  # fmt: skip
    check_jpeg_quality(jpeg_quality, "--jpeg-quality")
    if reverter_labels not in REVERTER_LABELS:
        raise ConfigError(f"reverter labels (--reversion-labels) must be one of {', '.join(REVERTER_LABELS)}, got "
                          f"{reverter_labels!r}")  # fmt: skip


def jpeg_roundtrip(images: torch.Tensor, quality: int = 50) -> torch.Tensor:
    """Blind reversion: encode each uint8 NCHW image as JPEG at ``quality`` (1..100) and decode it.

    Raises:
        ConfigError: ``quality`` out of 1..100 (libjpeg would clamp it, and the stage be misnamed).
    """
    check_jpeg_quality(quality)
    out = []
    for img in images:
        buf = io.BytesIO()
        arr = img.permute(1, 2, 0).numpy()
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(buf, format="JPEG", quality=quality)
        back = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
        out.append(torch.from_numpy(back.reshape(arr.shape).copy()).permute(2, 0, 1))
    return torch.stack(out)


def _to_float(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """8-bit ``images`` as [0, 1] floats on ``device``: the same floats on every device (a GPU's x / 255 is
    not), so that PGD's random starts, drawn from an image's levels, are too."""
    return levels_to_float(images.to(device), 255)


#: Part of every resume key (defenses, and so the cells that attack them): raised when the same spec text
#: computes something else. 2 (0.6.0): a bare ``eps=1`` is one level, no longer the whole range, and photos
#: draw their noise per sample.
_RESUME_FORMAT = 2

#: Part of every cell's resume key besides :data:`_RESUME_FORMAT`: raised when the same cell computes or
#: names something else (a defended set, kept under its own key, is not computed again for it).
#: 1 (0.16.0): AutoAttack L2 rounds to 8 bits as L-inf does; rows name every option of a defense.
#: 2 (0.18.0): L2 rounding keeps the budget (an L2 cell of 1 read 1.1-3.1 points high).
_CELL_FORMAT = 2

#: Keys of a cell's resume file that hold its images' correctness, one character per image in the data's
#: order ("1": right, "0": wrong); robust: None for a clean cell. Cell files of 0.22.0 and earlier lack them.
_CLEAN_CORRECT, _ROBUST_CORRECT = "clean_correct", "robust_correct"

#: What :meth:`Evaluator.paired_with_none` computes, as its results and the report say it.
PAIRED_TEST = ("Exact two-sided McNemar test (a sign test on the images whose correctness differs) of each "
               "defense against none, for the same victim and attack, on the same images")  # fmt: skip

#: What :meth:`Evaluator.paired_between_defenses` computes, as its results and the report say it.
PAIRED_BETWEEN_TEST = ("Exact two-sided McNemar test (a sign test on the images whose correctness differs) of "
                       "each pair of defenses other than none, the one given second against the one given first, "
                       "for the same victim and attack, on the same images")  # fmt: skip


def _bits(correct: torch.Tensor) -> str:
    """Per-image correctness as a cell file keeps it: "1" or "0" per image."""
    return "".join("1" if right else "0" for right in correct.tolist())


def _from_bits(bits: str | None) -> torch.Tensor | None:
    """What :func:`_bits` wrote, as a bool tensor (None: not kept)."""
    return None if bits is None else torch.tensor([b == "1" for b in bits], dtype=torch.bool)


def _percent(correct: torch.Tensor) -> float:
    """A cell's accuracy from its images' correctness, as its row gives it: :func:`percent` of the images
    right."""
    return percent(int(correct.sum()), len(correct))


def _percent_before_0_28(correct: torch.Tensor) -> float:
    """:func:`_percent` as preempt 0.27.0 and earlier computed it, the float32 mean rounded: a cell file they
    wrote holds it. It differs from :func:`_percent` only on a tie (1 image of 160: 0.63, not 0.62) or, above
    about 2,000 images, by 0.01 points where the float32 mean was off."""
    return round(100 * correct.float().mean().item(), 2)


def _check_correctness(row: dict[str, Any], n: int) -> None:
    """Refuse a cell file that is not of the cell's ``n`` images, or whose per-image correctness (where it
    keeps any) is not one "0"/"1" per image, does not give its accuracies exactly, or has a robust image that
    was wrong clean: a paired test on it would be of other images than the row's.

    Raises:
        ValueError: saying which.
    """
    if isinstance(row["n"], bool) or not isinstance(row["n"], int) or row["n"] != n:
        raise ValueError(f"n is {row['n']!r}, not the cell's {n} images")
    for key, acc_key in ((_CLEAN_CORRECT, "clean_acc"), (_ROBUST_CORRECT, "robust_acc")):
        bits, acc = row.get(key), row.get(acc_key)
        if bits is None:
            if key == _ROBUST_CORRECT and acc is not None and row.get(_CLEAN_CORRECT) is not None:
                raise ValueError(f"{acc_key} without {key}")
            continue
        if not isinstance(bits, str) or re.fullmatch(r"[01]*", bits) is None or len(bits) != n:
            raise ValueError(f"{key} is not one 0 or 1 per image of its {n}")
        # computed as the row's was (as this release computes it, or as 0.27.0 and earlier did: such a cell is
        # resumed, its figure computed again from its correctness): a NaN, or an image changed (0.01 points of
        # 10,000), is another number. The old figure is never that of one image more or fewer up to 10,000
        # images: it is off by 0.01 only where the exact one lies within float32's error of a rounding boundary
        correct = _from_bits(bits)
        if (isinstance(acc, bool) or not isinstance(acc, (int, float))
                or acc not in (_percent(correct), _percent_before_0_28(correct))):  # fmt: skip
            raise ValueError(f"{key} gives {_percent(correct)}%, its {acc_key} {acc}")
    robust, clean = row.get(_ROBUST_CORRECT), row.get(_CLEAN_CORRECT)
    if robust is not None and (clean is None or any(r == "1" and c == "0" for r, c in zip(robust, clean))):
        raise ValueError(f"{_ROBUST_CORRECT} has images {_CLEAN_CORRECT} has wrong")


@dataclass
class _GivenCell:
    """A cell an :class:`Evaluator` gave: its row and its images' correctness (None where its resume file kept
    none; ``missing`` says why)."""

    victim: str
    spec: DefenseSpec
    row: dict[str, Any]
    clean: torch.Tensor | None
    robust: torch.Tensor | None
    missing: str = ""


#: Part of a ``folder`` defense's resume key, raised when the same folder gives other images. 2 (after
#: 0.15.0): an image is matched to what preempt protect made from it, never to a copy of itself (1 took the
#: originals copied beside the outputs for defended images).
_FOLDER_FORMAT = 2


def _folder_images(folder: Path) -> list[InputFile]:
    """What a ``folder`` defense can take from ``folder``: its folder walk, less reversions and eval's own
    perturbation maps."""
    return [i for i in collect_inputs([folder], skip_markers=(REVERTED_SUFFIX,)) if not is_eval_output(i.path)]


def _folder_fingerprint(folder: Path) -> list[list[Any]]:
    """Relative path, size and modification time of every image a ``folder`` defense can take from
    ``folder`` (eval's results and resume state, with ``--out`` inside it, do not change it between runs)."""
    if not folder.is_dir():
        return []
    rows: list[list[Any]] = []
    for item in _folder_images(folder):
        try:
            stat = item.path.stat()
        except OSError:  # a link leading nowhere: its name alone (reading it fails, saying why)
            rows.append([item.relative.as_posix()])
            continue
        rows.append([item.relative.as_posix(), stat.st_size, stat.st_mtime_ns])
    return rows


class Evaluator:
    """Runs the evaluation grid, caching defended sets and cells under ``out_dir`` (when given).

    Args:
        dataset: the labelled images.
        load: returns a loaded model by registry name (cached by the caller as it likes).
        device: where to compute (a ``torch.device`` or a name: ``cpu``, ``cuda:1``, ``auto``).
        out_dir: where defended sets (``defenses/``) and finished cells (``cells/``) are kept (a ``str`` or
            ``os.PathLike``, kept as a ``Path``: :attr:`out_dir`).
        resume: reuse what ``out_dir`` holds instead of recomputing it.
        batch_size: images per defense batch (default: 50 on CPU, 256 on GPU).

    What ``out_dir`` keeps is keyed by everything that decides it: the spec, a fingerprint of the data
    (sha256 of the pixels, their shape and the labels) and the weights of every model involved (the
    ``weights_sha256`` a loaded model records, else a sha256 of its state) with how its registry row sets
    them up (``setup_sha256``: architecture, normalization, input size, classes), plus, for a ``folder``
    defense, the names, sizes and modification times of the folder's files. Another data folder of the
    same size, retrained weights under the same name, or the same weights under a row fixed since, are
    computed afresh, never reused.

    A victim that is the defense's backbone or classifier (same name or same weights) is evaluated, with a
    warning: that is a white-box setting, not the paper's transferable one.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        load: Callable[[str], ImageModel],
        device: torch.device | str,
        out_dir: str | os.PathLike[str] | None = None,
        resume: bool = False,
        batch_size: int | None = None,
        attack_batch_size: int = 250,
    ) -> None:
        _check_dataset(dataset)
        for name, value in (("batch_size", batch_size), ("attack_batch_size", attack_batch_size)):
            # a negative batch ran no batch at all: uninitialized memory was scored as the defended images
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
                raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
        self.dataset = dataset
        self._load_model = load
        self.device = resolve_device(device)
        # a str too, as RunOptions takes it; kept as a Path
        self.out_dir: Path | None = output_folder(out_dir)
        self.resume = resume
        self.batch_size = batch_size or (256 if self.device.type == "cuda" else 50)
        self.attack_batch_size = attack_batch_size
        self._defended: dict[str, DefendedSet] = {}
        self._scored: set[str] = set()  # the keys of the defended sets whose SSIM and LPIPS were measured
        #: who computed each defended set and cell this evaluator gave: (resumed, computed_by); see provenance
        self._origins: dict[str, list[tuple[bool, dict[str, str]]]] = {"defenses": [], "cells": []}
        self._computed_by: dict[str, str] | None = None
        self._data_fingerprint: str | None = None
        self._model_fingerprints: dict[str, str] = {}
        #: what each of those hashes: "file" or "state" (:func:`~preempt_cli.models.weights_sha256_of`)
        self._model_fingerprints_of: dict[str, str] = {}
        self._defense_keys: dict[str, str] = {}
        self._warned: set[tuple[str, str, str]] = set()
        self._num_classes: int | None = None  # of the first model loaded, where the data names no classes
        #: the settings of every defense and attack a cell was given for, by name (see provenance)
        self._settings: dict[str, dict[str, dict[str, Any]]] = {"defenses": {}, "attacks": {}}
        #: every cell given, with its images' correctness (see paired_with_none, paired_between_defenses)
        self._given: list[_GivenCell] = []

    def load(self, name: str) -> ImageModel:
        """The model ``name``, from the ``load`` given."""
        return self._load_model(name)

    def load_victim(self, name: str) -> ImageModel:
        """The model ``name``, checked to label the data's classes, as a model scored against the data's
        labels (a victim) or protecting with them (a defense labelled with the ground truth) must. A
        defense that labels with its own classifier or backbone needs not: it protects data of other
        classes too.

        Raises:
            ConfigError: the model has other classes than the data's labels (or the first victim's).
        """
        model = self.load(name)
        self._check_classes(model)
        return model

    def _check_classes(self, model: ImageModel) -> None:
        """Refuse a model whose class i is not the data's class i: every label would be another class for it
        (a victim with its class list in another order was scored 5% where it scored 90%, and its place in
        the list of victims decided which)."""
        config = getattr(model, "config", None)
        if config is None:  # a bare module (tests): nothing to compare
            return
        names = config.class_names
        data = self.dataset
        if data.classes is not None and names is not None and names != data.classes:
            raise ConfigError(f"{model.name} names its classes in another order or other names than the data's "
                              f"labels were read with ({_class_list(names)} against {_class_list(data.classes)}): "
                              "evaluate models of the same classes together")  # fmt: skip
        expected = len(data.classes) if data.classes is not None else self._num_classes
        if expected is not None and config.num_classes != expected:
            raise ConfigError(f"{model.name} has {config.num_classes} classes, the data's labels {expected} "
                              "(the classes of the first model): evaluate models of the same classes together")  # fmt: skip
        self._num_classes = config.num_classes
        if len(data.labels) and int(data.labels.max()) >= config.num_classes:
            raise ConfigError(f"label {int(data.labels.max())} of the data is no class of {model.name} "
                              f"({config.num_classes} classes)")  # fmt: skip

    # -- fingerprints (what the resume state is keyed by) -----------------------------------------------------
    @property
    def data_fingerprint(self) -> str:
        """sha256 (hex, 16 digits) of the dataset's pixels, their shape and its labels."""
        if self._data_fingerprint is None:
            ds = self.dataset
            digest = hashlib.sha256(json.dumps([list(ds.images.shape), str(ds.images.dtype)]).encode())
            digest.update(ds.images.contiguous().numpy().tobytes())
            digest.update(ds.labels.to(torch.int64).contiguous().numpy().tobytes())
            self._data_fingerprint = digest.hexdigest()[:16]
        return self._data_fingerprint

    def _model_fingerprint(self, name: str) -> str:
        """The weights' sha256 a loaded model records, else a sha256 of its state (tests, in-memory models)."""
        if name not in self._model_fingerprints:
            model = self.load(name)
            self._model_fingerprints[name] = weights_sha256(model)
            self._model_fingerprints_of[name] = weights_sha256_of(model)
        return self._model_fingerprints[name]

    def _model_fingerprint_of(self, name: str) -> str:
        """What :meth:`_model_fingerprint` of ``name`` hashes: its weights file (``"file"``) or, for timm's own
        weights and in-memory models, its state (``"state"``)."""
        self._model_fingerprint(name)
        return self._model_fingerprints_of[name]

    def _model_setup(self, name: str) -> str | None:
        """The digest of how the model's registry row builds and feeds its weights (architecture and its
        arguments, input size, normalization, classes: ``ModelConfig.setup_sha256``); None for a model
        without a row (a bare module)."""
        return getattr(getattr(self.load(name), "config", None), "setup_sha256", None)

    def _model_identity(self, name: str) -> list[Any]:
        """What a resume key holds of a model: its weights' fingerprint and its row's setup. The same weights
        file under a row fixed since (another normalization or shortcut) is another model: its cells were
        reused by ``--resume``."""
        return [self._model_fingerprint(name), self._model_setup(name)]

    @staticmethod
    def defense_models(spec: DefenseSpec) -> list[tuple[str, str]]:
        """(role, name) of the models a defense computes with."""
        if spec.kind not in ("fast-preemption", "bi-level"):
            return []
        models = [("backbone", str(spec.get("backbone")))]
        if spec.get("labels", "classifier") == "classifier" and spec.get("classifier"):
            models.append(("classifier", str(spec.get("classifier"))))
        return models

    def defense_key(self, spec: DefenseSpec) -> str:
        """The key of a defended set: spec, data and the weights of its models (and a folder's files)."""
        if spec.key not in self._defense_keys:  # once per run: a folder defense's files are walked for it
            self._defense_keys[spec.key] = self._compute_defense_key(spec)
        return self._defense_keys[spec.key]

    def _compute_defense_key(self, spec: DefenseSpec) -> str:
        parts: list[Any] = [_RESUME_FORMAT, spec.kind, spec.options, self.data_fingerprint,
                            [[name, *self._model_identity(name)] for _, name in self.defense_models(spec)]]  # fmt: skip
        if spec.kind == "folder":
            parts += [_FOLDER_FORMAT, _folder_fingerprint(Path(spec.get("path")))]
        elif spec.kind == "bi-level":
            # its inner PGD draws its random starts per image (PGD.starts), so its images no longer depend on
            # the batch size, which the key held up to 0.23.0; a set of the starts drawn by batch position is
            # not reused for them
            parts.append(PGD.starts)
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    def _warn_white_box(self, victim_name: str, spec: DefenseSpec) -> None:
        """One warning per victim, defense and role when the victim is a model the defense computes with."""
        for role, name in self.defense_models(spec):
            if (victim_name, spec.key, role) in self._warned:
                continue
            if name == victim_name or self._model_fingerprint(name) == self._model_fingerprint(victim_name):
                self._warned.add((victim_name, spec.key, role))
                _logger.warning("victim %s is the %s of defense %s: a white-box setting, not the paper's "
                                "transferable one (victim, backbone and classifier all differ)",
                                victim_name, role, spec.name)  # fmt: skip

    # -- defended sets ------------------------------------------------------------------------------------
    def _labels_for(self, spec: DefenseSpec, protector: Protector) -> Callable[[torch.Tensor, slice], torch.Tensor]:
        source = spec.get("labels", "classifier")
        if source in GROUND_TRUTH:
            return lambda x, sl: self.dataset.labels[sl].to(self.device)
        if source not in ("classifier", "backbone"):
            raise ConfigError(f"labels must be classifier, backbone or ground-truth, got {source!r}")
        return lambda x, sl: protector.predict(x)

    def _protector(self, spec: DefenseSpec, cls: type[Protector] = Protector) -> Protector:
        labels = spec.get("labels", "classifier")
        # protecting with the data's labels, the backbone must name the data's classes as the labels do
        backbone = (self.load_victim if labels in GROUND_TRUTH else self.load)(spec.get("backbone"))
        classifier = self.load(spec.get("classifier")) if (labels == "classifier" and spec.get("classifier")) else None
        if labels == "classifier" and classifier is None:
            raise ConfigError(f"defense {spec.name} labels with a classifier: give --classifier or classifier=NAME")
        config = spec.settings(backbone.config.dataset)
        if spec.kind == "bi-level":  # only its budget is Algorithm 1's: its eta and inner steps are BiLevel's own
            config = ForeBackConfig.from_preset(dataset=backbone.config.dataset, eps=config.eps)
        return cls(backbone, classifier, config=config, seed=spec.value("seed", 0),
                   labels="backbone" if labels == "backbone" else "classifier", preset=spec.get("preset", "paper"),
                   precision=spec.get("precision", "fp32"), compile=spec.get("compile", "off"))  # fmt: skip

    def _run_batches(self, images: torch.Tensor, fn: Callable[[torch.Tensor, slice], torch.Tensor],
                     eps: float) -> tuple[torch.Tensor, float]:  # fmt: skip
        """Apply ``fn`` batch by batch to uint8 ``images``; return uint8 results and seconds per image."""
        out = torch.empty_like(images)
        start = time.perf_counter()
        for lo in range(0, len(images), self.batch_size):
            sl = slice(lo, lo + self.batch_size)
            x = _to_float(images[sl], self.device)
            x_new = fn(x, sl)
            out[sl] = quantize_levels(x_new, images[sl], eps).to(torch.uint8).cpu()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return out, (time.perf_counter() - start) / max(1, len(images))

    def _compute_defense(self, spec: DefenseSpec, count: int | None = None) -> DefendedSet:
        """The defended set of ``spec``; with ``count``, of the data's first ``count`` images only (an fp or
        bilevel defense: its batches those of the whole set's first ones)."""
        ds = self.dataset if count is None else self.dataset.subset(count)
        if spec.kind == "none":
            return DefendedSet(spec, ds.images.clone(), 0.0, 0.0)
        if spec.kind == "folder":
            return self._folder_defense(spec)
        protector = self._protector(spec)
        labels = self._labels_for(spec, protector)
        eps = protector.config.eps
        if spec.kind == "fast-preemption":
            seeds = [content_seed(ds.hwc(i)) for i in range(len(ds))]

            def fn(x: torch.Tensor, sl: slice) -> torch.Tensor:
                return protector.transform(x, labels(x, sl), noise_seeds=seeds[sl])
        else:
            from .baselines import BiLevel

            kwargs = {k: spec.value(k) for k in ("eta", "steps", "inner_steps", "optimizer") if spec.get(k) is not None}
            bilevel = BiLevel(protector.backbone, eps=eps, seed=spec.value("seed", 0), device=self.device, **kwargs)

            def fn(x: torch.Tensor, sl: slice) -> torch.Tensor:
                return bilevel.perturb(x, labels(x, sl))

        images, seconds = self._run_batches(ds.images, fn, eps)
        return DefendedSet(spec, images, seconds, 0.0, meta={"eps": eps})

    def _folder_defense(self, spec: DefenseSpec) -> DefendedSet:
        """The images of ``folder:PATH``, one per image of the dataset: the output ``preempt protect`` made
        from it (found by the original's sha256 its metadata records, whatever its ``--suffix``, name or
        place in PATH; an output older than 0.5.0, which records none, by its name ``<stem>.protected.png``)
        or, in a folder holding no output of preempt, another tool's file of the image's relative path,
        name or stem (named ``<stem>.protected.png`` or as the image, at its place first).

        Raises:
            ConfigError: PATH is not a folder; an image has no defended image there (in a folder of
                preempt's outputs, a file without preempt's metadata is an original copied beside them,
                never taken), has outputs of several runs none of which has its name, or has one with its
                own pixels (a copy of the original); an image there is not of the dataset's size.
        """
        folder = Path(spec.get("path"))
        if not os.path.isdir(folder):
            raise ConfigError(f"folder defense: {folder} is not a folder")
        outputs: dict[str, list[InputFile]] = {}  # preempt protect's outputs, by the sha256 of their original
        output_names: dict[str, Path] = {}  # and by name
        old_outputs: dict[str, Path] = {}  # by name: outputs older than 0.5.0 record no original
        others: dict[str, Path] = {}  # by name: files without preempt's metadata
        for item in _folder_images(folder):
            meta = read_preempt_metadata_file(item.path) if item.path.suffix.lower() == ".png" else None
            if meta is not None and meta.get("kind", "protected") != "protected":
                continue  # a reversion under another suffix: not a defended image
            if meta is not None and isinstance(meta.get("source_sha256"), str):
                outputs.setdefault(meta["source_sha256"], []).append(item)
                index = output_names
            else:
                index = others if meta is None else old_outputs
            for key in (item.relative.as_posix(), item.path.name, item.path.stem):
                index.setdefault(key, item.path)
        # a folder of preempt's outputs: a file there of an image's own name is the original copied beside them
        by_name = old_outputs if (outputs or old_outputs) else others
        found: list[Path] = []
        missing: list[tuple[Path, list[str]]] = []
        for path in self.dataset.paths:
            rel = path.relative_to(self.dataset.root)
            protected = f"{path.stem}{PROTECTED_SUFFIX}"
            names = [rel.with_name(f"{protected}.png").as_posix(), rel.as_posix(),
                     f"{protected}.png", path.name, protected, path.stem]  # fmt: skip
            made = outputs.get(regular_file_sha256(path) or "", []) if outputs else []
            if made:  # one output, whatever its name; of several (runs with other settings), the one of its names
                named = {key: i.path for i in made for key in (i.relative.as_posix(), i.path.name, i.path.stem)}
                match = next((named[n] for n in names if n in named), made[0].path if len(made) == 1 else None)
                if match is None:
                    raise ConfigError(f"folder defense: {made[0].path} and {made[1].path} were both protected "
                                      f"from {rel}: keep one of them in {folder}")  # fmt: skip
            else:
                match = next((by_name[n] for n in names if n in by_name), None)
                if match is None:
                    missing.append((rel, names))
            found.append(match)
        if missing:
            rel, names = missing[0]
            if by_name is others:
                what = f"no image for {rel}"
            else:  # an output of this image's name, made from another file (the data was edited since)
                other = output_names.get(names[0])  # at the image's place: a name alone may be another folder's
                what = f"no output of preempt protect made from {rel}" + (f" ({other} was made from another file)"
                                                                          if other else "")  # fmt: skip
            more = f" ({len(missing)} of the {len(found)} images have none)" if len(missing) > 1 else ""
            raise ConfigError(f"folder defense: {what} in {folder}{more}")
        images = []
        for path, original, pixels in zip(found, self.dataset.paths, self.dataset.images):
            image = torch.from_numpy(read_image(path).color.astype(np.uint8)).permute(2, 0, 1)
            if image.shape != pixels.shape:
                raise ConfigError(f"folder defense: {path} does not match the dataset's size")
            if torch.equal(image, pixels):
                raise ConfigError(f"folder defense: {path} has the pixels of {original}: a copy of the original, "
                                  "not a defended image")  # fmt: skip
            images.append(image)
        return DefendedSet(spec, torch.stack(images), None, 0.0)  # protected elsewhere: its time is not measured here

    def check_ssim_size(self) -> None:
        """Refuse images SSIM cannot score: smaller than its 11x11 window. Every defended set is scored with
        SSIM (:meth:`defend`), which refused such images only once the defense had been computed; a grid of
        them ran its first defense to fail there.

        Raises:
            InputConfigError: naming the data's images (all of one size) and theirs.
        """
        from .quality import SSIM_WINDOW

        height, width = self.dataset.images.shape[-2:]
        if height >= SSIM_WINDOW and width >= SSIM_WINDOW:
            return
        paths = self.dataset.paths
        which = (str(paths[0]) if len(paths) == 1 else f"{paths[0]} and the {len(paths) - 1} other images" if paths
                 else f"the images of {self.dataset.root}")  # fmt: skip
        raise InputConfigError(f"{which} {'is' if len(paths) == 1 else 'are'} {height}x{width} pixels: eval scores "
                               f"every defense with SSIM, whose {SSIM_WINDOW}x{SSIM_WINDOW} window needs images of "
                               f"at least {SSIM_WINDOW}x{SSIM_WINDOW}")  # fmt: skip

    def defend(self, spec: DefenseSpec, *, quality: bool = True) -> DefendedSet:
        """The defended images of ``spec`` (computed once, cached on disk when ``out_dir`` is set), with their
        L-inf and, with ``quality``, their SSIM and LPIPS (measured once). Without ``quality`` those two stay
        None unless an earlier call measured them: a report's perturbation maps need a set's images alone,
        and scoring every image again (LPIPS's network over all of them) for a set whose cells were all
        resumed, their rows holding its scores, gave the maps nothing.

        Raises:
            InputConfigError: with ``quality``, images SSIM cannot score (:meth:`check_ssim_size`), before the
                defense is computed.
        """
        if quality:
            self.check_ssim_size()
        key = self.defense_key(spec)
        result = self._defended.get(key)
        if result is None:
            result = self._defended[key] = self._defended_set(spec, key)
        if quality and key not in self._scored:
            self._quality(result)
            self._scored.add(key)
        return result

    def _defended_set(self, spec: DefenseSpec, key: str) -> DefendedSet:
        """The defended set of ``spec`` (``key``: its :meth:`defense_key`), resumed from ``out_dir`` or computed
        (and kept there), with its L-inf; its SSIM and LPIPS not measured."""
        cache = self.out_dir / "defenses" / f"{key}.pt" if self.out_dir else None
        saved = self._load_defense(cache) if (cache is not None and self.resume and cache.is_file()) else None
        if saved is not None:
            images, seconds, computed_by = saved
            result = DefendedSet(spec, images, seconds, 0.0, meta=self._defense_meta(spec))
            self._origins["defenses"].append((True, computed_by))
            _logger.info("resumed defense %s from %s", spec.name, cache)
        else:
            _logger.info("computing defense %s on %d images", spec.name, len(self.dataset))
            result = self._compute_defense(spec)
            computed_by = self.computed_by()
            self._origins["defenses"].append((False, computed_by))
            if cache is not None:
                # serialized first: torch's writer turns a full disk into a RuntimeError that names no file
                buffer = io.BytesIO()
                torch.save({"images": result.images, "seconds_per_image": result.seconds_per_image,
                            "computed_by": computed_by}, buffer)  # fmt: skip
                with atomic_write(cache) as f:  # --resume must never find a truncated cache
                    f.write(buffer.getbuffer())
        levels = (result.images.long() - self.dataset.images.long()).abs().amax().item()
        result.linf = levels / 255  # exact: measured on the integer levels
        return result

    def map_images(self, spec: DefenseSpec, count: int = 8) -> tuple[torch.Tensor, torch.Tensor, float]:
        """What a perturbation map of ``spec`` draws: the data's first ``count`` images and their defended ones
        (uint8), and the budget the map spans (Eq. 14: an fp or bilevel defense's eps; another's largest change
        of a pixel, at least one level). The defended images are the set's (:meth:`defend`, its SSIM and LPIPS
        not measured); where neither this evaluator nor ``out_dir`` holds the set (a resume whose cells were
        all finished, ``defenses/`` deleted or damaged), an fp or bilevel defense computes only the batches
        that hold them, the first batches of the whole set, rather than the whole set again for a figure."""
        head = slice(0, min(count, len(self.dataset)))
        key = self.defense_key(spec)
        cache = self.out_dir / "defenses" / f"{key}.pt" if self.out_dir else None
        held = key in self._defended or (cache is not None and self.resume and cache.is_file())
        if held or spec.kind not in ("fast-preemption", "bi-level"):  # a folder's largest change is the set's
            defended = self.defend(spec, quality=False)
            eps = defended.meta.get("eps") or max(defended.linf, 1 / 255)
            return self.dataset.images[head], defended.images[head], eps
        batches = math.ceil(head.stop / self.batch_size)
        _logger.info("computing defense %s on its first %d images, for its perturbation map", spec.name,
                     min(batches * self.batch_size, len(self.dataset)))  # fmt: skip
        leading = self._compute_defense(spec, count=min(batches * self.batch_size, len(self.dataset)))
        return self.dataset.images[head], leading.images[head], leading.meta["eps"]

    def defense_settings(self, spec: DefenseSpec) -> dict[str, Any]:
        """Every setting ``spec`` computes with, its defaults filled in (the seed of its noise or random
        starts too): what a reader needs to run it again, kept in ``run.json``. An fp defense: the settings
        of Algorithm 1 of its preset and options; a bilevel one: its budget and BiLevel's steps."""
        record: dict[str, Any] = {"name": spec.name, "kind": spec.kind, "options": dict(spec.options)}
        if spec.kind not in ("fast-preemption", "bi-level"):
            return record
        config = spec.settings(self.load(spec.get("backbone")).config.dataset)
        record.update(labels=spec.get("labels", "classifier"), seed=spec.value("seed", 0), eps=config.eps)
        if spec.kind == "fast-preemption":
            record.update(preset=spec.get("preset", "paper"), eta=config.eta, forward=config.forward_steps,
                          backward=config.backward_steps, samples=config.samples, inner_steps=config.inner_steps,
                          sample_projection=config.sample_projection, precision=spec.get("precision", "fp32"),
                          compile=spec.get("compile", "off"))  # fmt: skip
        else:
            import inspect

            from .baselines import BiLevel

            defaults = inspect.signature(BiLevel).parameters  # what _compute_defense leaves to BiLevel
            record.update({k: spec.value(k, defaults[k].default) for k in ("eta", "steps", "inner_steps", "optimizer")})
            record["starts"] = PGD.starts  # how its inner PGD draws its random starts: per image
        return record

    def _defense_meta(self, spec: DefenseSpec) -> dict[str, Any]:
        """What a defended set records besides its images, for one resumed as for one computed: the budget of
        an fp or bilevel defense (its perturbation maps span [-eps, eps]; a resumed set had none, and its
        maps spanned its largest change instead, another figure than an uninterrupted run's)."""
        if spec.kind not in ("fast-preemption", "bi-level"):
            return {}
        return {"eps": spec.settings(self.load(spec.get("backbone")).config.dataset).eps}

    def _load_defense(self, cache: Path) -> tuple[torch.Tensor, float | None, dict[str, str]] | None:
        """The images, seconds per image and :meth:`computed_by` a resume file holds; None, with a warning
        naming the file, when it cannot be read or does not hold this dataset's defended images (the defense
        is then computed again and the file replaced)."""
        try:
            saved = torch.load(cache, map_location="cpu", weights_only=True)
            images, seconds = saved["images"], saved["seconds_per_image"]
            computed_by = _computed_by_record(saved.get("computed_by"))
            if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
                raise ValueError("no uint8 images in it")
            if images.shape != self.dataset.images.shape:
                raise ValueError(f"images of shape {tuple(images.shape)}, expected {tuple(self.dataset.images.shape)}")
            if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))):
                raise ValueError(f"seconds_per_image is {seconds!r}")
        except Exception as e:  # any damage (truncated zip, wrong content): the entry is recomputed
            self._warn_broken(cache, e, "defense")
            return None
        seconds = None if seconds is None or not math.isfinite(seconds) else float(seconds)
        return images, seconds, computed_by

    @staticmethod
    def _warn_broken(path: Path, error: BaseException, what: str) -> None:
        try:
            empty = path.stat().st_size == 0
        except OSError:
            empty = False
        reason = "empty file" if empty else str(error).splitlines()[0] if str(error).strip() else "no detail"
        if len(reason) > 120:  # torch's own advice after the first sentence adds nothing here
            reason = reason.split(". ")[0]
        _logger.warning("--resume: %s is unreadable or damaged (%s: %s); computing that %s again and "
                        "replacing the file", path, type(error).__name__, reason, what)  # fmt: skip

    def _load_cell(self, path: Path, n: int) -> dict[str, Any] | None:
        """A finished cell's row from its resume file; None, with a warning naming the file, when it cannot
        be read or is not a row of the cell's ``n`` images (the cell is then computed again and the file
        replaced)."""
        try:
            row = json.loads(path.read_text())
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not a row")
            missing = [k for k in ("victim", "defense", "attack", "n", "clean_acc", "robust_acc") if k not in row]
            if missing:
                raise ValueError(f"no {', '.join(missing)}")
            _check_correctness(row, n)
        except Exception as e:  # truncated or edited: the entry is recomputed
            self._warn_broken(path, e, "cell")
            return None
        return _finite_or_none(row)

    def _quality(self, result: DefendedSet) -> None:
        from .quality import LpipsUnavailableError, load_lpips, lpips_distance, lpips_status, ssim

        orig = self.dataset.images.float().div(255)
        new = result.images.float().div(255)
        result.ssim = float(torch.cat([ssim(orig[i:i + 256], new[i:i + 256]) for i in range(0, len(orig), 256)]).mean())
        ok, why = lpips_status()
        if ok:
            try:  # the pieces are there, but building can still fail (a damaged checkpoint, another torchvision)
                net = load_lpips()  # built once, not per chunk
            except LpipsUnavailableError as e:
                ok, why = False, e.reason
        if ok:
            result.lpips = float(torch.cat([lpips_distance(orig[i:i + 64], new[i:i + 64], model=net)
                                            for i in range(0, len(orig), 64)]).mean())  # fmt: skip
        else:
            result.lpips_note = f"LPIPS unavailable: {why}"

    # -- cells ----------------------------------------------------------------------------------------------
    def cell(self, victim_name: str, spec: DefenseSpec, attack: AttackSpec | None) -> dict[str, Any]:
        """Clean (and robust, with an attack) accuracy of one victim on one defense's images.

        An AutoAttack row also carries ``robust_acc_float`` (the reference's criterion: a point is
        fooled once an unrounded output fools it) and ``robust_acc_rounded_once`` (the cascade's float result
        rounded once at the end, as preempt 0.4.0 and earlier reported it: biased upward), from the same run.
        """
        self._warn_white_box(victim_name, spec)
        if attack is not None:  # the victim's budget where the spec gives none
            attack = attack.for_dataset(getattr(getattr(self.load(victim_name), "config", None), "dataset", ""))
            self._settings["attacks"].setdefault(attack.name, attack.settings())
        self._settings["defenses"].setdefault(spec.name, self.defense_settings(spec))
        # AutoAttack's batch size is part of what it computes: the reference draws its random starts per batch
        # of the points attacked, so another batch size starts an image elsewhere. PGD draws them per image
        # (PGD.starts, in its key instead: a cell of the starts drawn by batch position, by 0.23.0 and earlier,
        # is computed again), the same at any batch size.
        batching = PGD.starts if attack is not None and attack.kind == "pgd" else self.attack_batch_size
        parts = [_RESUME_FORMAT, _CELL_FORMAT, victim_name, *self._model_identity(victim_name),
                 self.defense_key(spec), attack and [attack.kind, attack.options, batching]]  # fmt: skip
        key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
        path = self.out_dir / "cells" / f"{key}.json" if self.out_dir else None
        n = min(attack.limit, len(self.dataset)) if (attack and attack.limit) else len(self.dataset)
        if path is not None and self.resume and path.is_file():
            row = self._load_cell(path, n)
            if row is not None:
                computed_by = _computed_by_record(row.pop("computed_by", None))
                self._origins["cells"].append((True, computed_by))
                clean_bits, robust_bits = row.pop(_CLEAN_CORRECT, None), row.pop(_ROBUST_CORRECT, None)
                # named as this release names them: the key decides what was computed, not how a row is named
                row.update(victim=victim_name, defense=spec.name, attack=attack.name if attack else "none")
                clean_ok, robust_ok = _from_bits(clean_bits), _from_bits(robust_bits)
                # as this release computes them (a cell of 0.27.0 or earlier may hold a tie rounded otherwise):
                # a resumed run reports the figures an uninterrupted one does
                for correct, acc_key in ((clean_ok, "clean_acc"), (robust_ok, "robust_acc")):
                    if correct is not None:
                        row[acc_key] = _percent(correct)
                # a copy: a caller may change the row it is given
                given = _GivenCell(victim_name, spec, dict(row), clean_ok, robust_ok)
                if given.clean is None:  # a cell file of 0.22.0 or earlier: its accuracies only
                    given.missing = (f"the cell ({spec.name}, {row['attack']}) was resumed from {path.name} (computed "
                                     f"by preempt {computed_by['preempt']}), which keeps no per-image correctness "
                                     "(cell files of 0.22.0 and earlier keep none); run without --resume to measure "
                                     "it")  # fmt: skip
                self._given.append(given)
                return row
        defended = self.defend(spec)
        victim = self.load_victim(victim_name)
        x = _to_float(defended.images[:n], self.device)
        y = self.dataset.labels[:n].to(self.device)
        start = time.perf_counter()
        extra: dict[str, Any] = {}
        robust_ok: torch.Tensor | None = None
        if attack is None:
            with torch.inference_mode(), eval_mode(victim):  # as robust_accuracy does: a caller's model may train
                clean_ok = torch.cat([victim(x[i:i + 500]).argmax(1) == y[i:i + 500] for i in range(0, n, 500)]).cpu()
            robust = None
        else:
            model_attack = attack.build(victim, batch_size=self.attack_batch_size)
            if getattr(model_attack, "quantize", False) and hasattr(model_attack, "perturb_report"):
                model_attack = _Reporting(model_attack)
            # image by image: the paired test against no defense needs which images each cell got right
            clean_ok, robust_ok, _ = robust_correctness(victim, model_attack, x, y, batch_size=self.attack_batch_size)
            robust = _percent(robust_ok)
            if isinstance(model_attack, _Reporting):
                clean_count = int(clean_ok.sum())
                for flag, column in (("fooled_float", "robust_acc_float"), ("fooled_rounded_once", "robust_acc_rounded_once")):
                    extra[column] = percent(clean_count - model_attack.count(flag), n)
        row = {
            "victim": victim_name,
            "defense": spec.name,
            "attack": attack.name if attack else "none",
            "n": n,
            "clean_acc": _percent(clean_ok),
            "robust_acc": robust,
            **extra,
            "attack_seconds": round(time.perf_counter() - start, 2),
            **{k: v for k, v in defended.summary().items() if k != "defense"},
        }
        computed_by = self.computed_by()
        self._origins["cells"].append((False, computed_by))
        self._given.append(_GivenCell(victim_name, spec, dict(row), clean_ok, robust_ok))  # a copy, as above
        if path is not None:
            correctness = {_CLEAN_CORRECT: _bits(clean_ok),
                           _ROBUST_CORRECT: None if robust_ok is None else _bits(robust_ok)}  # fmt: skip
            text = json_dumps({**row, "computed_by": computed_by, **correctness}, indent=1)
            with atomic_write(path) as f:  # --resume must never find a truncated cell
                f.write(text.encode())
        return row

    def grid(self, victims: Sequence[str], defenses: Sequence[DefenseSpec],
             attacks: Sequence[AttackSpec]) -> Iterator[dict[str, Any]]:  # fmt: skip
        """Every cell, defenses first (each computed once), yielding rows as they finish."""
        for spec in defenses:
            for victim in victims:
                for attack in attacks or [None]:
                    yield self.cell(victim, spec, attack)

    def paired_with_none(self) -> list[dict[str, Any]]:
        """Each defense against no defense (``none``) on the same images, from the cells this evaluator gave:
        per victim and defense, clean accuracy (from its cell of the most images) and the robust accuracy
        under each attack, each paired with the ``none`` cell of the same victim and attack. What protection
        buys is a difference on the same images: this tests it (:data:`PAIRED_TEST`), where the rows'
        accuracies alone cannot.

        Returns one record per victim, defense and metric, in the order the cells were given: ``victim``,
        ``defense``, ``metric`` (``clean_acc`` or ``robust_acc``), ``attack`` (the cell's: the attack, or
        ``none`` for a cell without one; clean accuracy is measured before it attacks), ``n``,
        ``none_acc`` and ``defense_acc`` (the rows'), then from the images' correctness ``gain_points``
        (defense minus none), ``gained`` (images right only with the defense), ``lost`` (right only without
        it), ``p_value`` (of :func:`mcnemar_exact`) and ``p_holm`` (``p_value`` adjusted by
        :func:`holm_adjusted` over every record tested here: a table of many tests finds some below 0.05
        by chance, and a ``p_holm`` below a level keeps the chance of any false finding in the table below
        it; the defenses against each other, :meth:`paired_between_defenses`, are a family of their own); these
        five are None where either cell keeps no per-image correctness (resumed from a file of
        0.22.0 or earlier), and ``not_tested`` says why (None where tested). A defense without a ``none``
        cell of its victim and attack has no record.
        """
        baseline: dict[tuple[str, str], _GivenCell] = {}
        for given in self._given:
            if given.spec.kind == "none":
                baseline.setdefault((given.victim, given.row["attack"]), given)
        cleans: dict[tuple[str, str], tuple[_GivenCell, _GivenCell]] = {}  # the cell of most images
        robusts: dict[tuple[str, str], list[tuple[_GivenCell, _GivenCell]]] = {}
        for given in self._given:
            none = baseline.get((given.victim, given.row["attack"]))
            if given.spec.kind == "none" or none is None:
                continue
            key = (given.victim, given.spec.key)
            if key not in cleans or given.row["n"] > cleans[key][0].row["n"]:
                cleans[key] = (given, none)
            if given.row["robust_acc"] is not None:
                pairs = robusts.setdefault(key, [])
                if all(p[0].row["attack"] != given.row["attack"] for p in pairs):  # a cell given twice: once
                    pairs.append((given, none))
        records = []
        for key, (given, none) in cleans.items():
            records.append(_paired_record(given, none, "clean_acc"))
            records += [_paired_record(g, b, "robust_acc") for g, b in robusts.get(key, [])]
        _holm_over(records)
        return records

    def paired_between_defenses(self) -> list[dict[str, Any]]:
        """The defenses other than ``none`` against each other on the same images, from the cells this
        evaluator gave (:data:`PAIRED_BETWEEN_TEST`): per victim and unordered pair of its defenses, clean
        accuracy (from the two defenses' cells of one attack, that of the most images) and the robust accuracy
        under each attack both were attacked with. Whether Fast Preemption's robust accuracy differs from
        Bi-Level's is a difference on the same images, as what protection buys is (:meth:`paired_with_none`).

        Each pair is ordered as the defenses were first given to this evaluator (``preempt eval``: the order
        of ``--defense``): ``first`` before ``second``, and every difference is the second minus the first.
        Returns one record per victim, pair and metric, by victim, then pair, then clean before robust (each
        attack in the order the first defense's cells were given): ``victim``, ``first`` and ``second`` (the
        defenses' names), ``metric``, ``attack``, ``n``, ``first_acc`` and ``second_acc`` (the rows'), then from
        the images' correctness ``gain_points`` (second minus first, in points), ``gained`` (images right only
        with the second), ``lost`` (right only with the first), ``p_value`` (of :func:`mcnemar_exact`) and
        ``p_holm``, and ``not_tested``: as the records of :meth:`paired_with_none`, a robust image being one
        right clean and under the attack, and with the same None where a cell keeps no per-image correctness
        (resumed from a file of 0.22.0 or earlier), ``not_tested`` saying why. ``p_holm`` is ``p_value``
        adjusted by :func:`holm_adjusted` over the records tested here: a family of its own, apart from the
        tests against none (whose ``p_holm`` this leaves as it is). A pair has no record on a victim where
        the two have no cell of one attack (or both of none) there; fewer than two defenses other than
        ``none``: no record at all.
        """
        cells: dict[tuple[str, str, str], _GivenCell] = {}  # a cell given twice: once, as paired_with_none
        defenses: dict[str, str] = {}  # spec key -> name, in the order first given (a dict keeps it)
        victims: dict[str, None] = {}
        for given in self._given:
            if given.spec.kind == "none":
                continue
            cells.setdefault((given.victim, given.spec.key, given.row["attack"]), given)
            defenses.setdefault(given.spec.key, given.spec.name)
            victims.setdefault(given.victim)
        order = list(defenses)
        records = []
        for victim in victims:
            for i, first_key in enumerate(order):
                firsts = [c for (v, k, _), c in cells.items() if v == victim and k == first_key]
                for second_key in order[i + 1:]:
                    both = [(c, cells[(victim, second_key, c.row["attack"])]) for c in firsts
                            if (victim, second_key, c.row["attack"]) in cells]  # fmt: skip
                    if not both:
                        continue
                    # clean accuracy is measured before any attack: once, from the two cells of the most images
                    clean = max(both, key=lambda pair: pair[0].row["n"])  # the first given of them on a tie
                    records.append(_between_record(*clean, "clean_acc"))
                    records += [_between_record(first, second, "robust_acc") for first, second in both
                                if first.row["robust_acc"] is not None and second.row["robust_acc"] is not None]
        _holm_over(records)
        return records

    def computed_by(self) -> dict[str, str]:
        """What computes here: preempt's version (its own decides how attacks round, see
        :data:`_CELL_FORMAT`), torch's, and the device. Kept in every defended set and cell written to
        ``out_dir``, so that a resumed result names the run that computed it, not the one that resumed it.
        Found once per evaluator (a copy each call)."""
        if self._computed_by is None:
            import platform

            from . import __version__

            device = str(self.device)
            if self.device.type == "cuda":
                device += f" ({torch.cuda.get_device_name(self.device)})"
            else:
                device += f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
            # plain str: torch.__version__ is a TorchVersion, which a weights-only torch.load of the cache refuses
            self._computed_by = {"preempt": __version__, "torch": str(torch.__version__), "device": device}
        return dict(self._computed_by)

    def provenance(self, models: Sequence[str] = ()) -> dict[str, Any]:
        """What this evaluator's results were computed with, to be kept beside them: this process's
        :meth:`computed_by` (and Python, the platform), the data (its folder and fingerprint), the sha256 of
        each of ``models``' weights and the digest of its row's setup, and how many defended sets and cells
        were resumed from ``out_dir``, with every distinct :meth:`computed_by` of what it gave; the images
        by file (relative to the data folder), the batch sizes, the versions of the other packages that
        compute, and the settings (seeds included, defaults filled in) of every defense and attack a cell was
        computed or resumed for. A figure without these could not be told apart from one computed by
        another release, or run again."""
        import platform

        origins = [origin for kind in ("defenses", "cells") for _, origin in self._origins[kind]]
        return {
            **self.computed_by(),
            "packages": _package_versions(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "data": str(self.dataset.root),
            "images": len(self.dataset),
            "image_files": [_relative(path, self.dataset.root) for path in self.dataset.paths],
            "data_fingerprint": self.data_fingerprint,
            "batch_size": self.batch_size,
            "attack_batch_size": self.attack_batch_size,
            "defenses": list(self._settings["defenses"].values()),
            "attacks": list(self._settings["attacks"].values()),
            "weights_sha256": {name: self._model_fingerprint(name) for name in dict.fromkeys(models)},
            # a state's sha256 (timm's own weights) is no file's: say which each is
            "weights_sha256_of": {name: self._model_fingerprint_of(name) for name in dict.fromkeys(models)},
            "setup_sha256": {name: self._model_setup(name) for name in dict.fromkeys(models)},
            "resumed": {kind: sum(resumed for resumed, _ in self._origins[kind]) for kind in ("defenses", "cells")},
            "computed_by": [dict(t) for t in dict.fromkeys(tuple(sorted(o.items())) for o in origins)],
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


#: Packages besides torch whose version can change a figure: timm builds the timm models, numpy reads the
#: images, pyautoattack is AutoAttack.
_RESULT_PACKAGES = ("timm", "numpy", "pyautoattack")


def _package_versions() -> dict[str, str | None]:
    """The installed version of each of :data:`_RESULT_PACKAGES` (None: not installed), from the
    installed distributions, without importing them."""
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {}
    for name in _RESULT_PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to the data folder ``root`` (as given, where it is not inside it)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _computed_by_record(value: Any) -> dict[str, str]:
    """A resume file's ``computed_by``, as :meth:`Evaluator.computed_by` wrote it (``unknown`` where the file
    has none or something else)."""
    keys = ("preempt", "torch", "device")
    if isinstance(value, dict) and all(isinstance(value.get(k), str) for k in keys):
        return {k: value[k] for k in keys}
    return dict.fromkeys(keys, "unknown")


class _Reporting:
    """Passes an attack's :meth:`perturb_report` flags through :func:`robust_accuracy`, chunk by chunk."""

    def __init__(self, attack: Any) -> None:
        self.attack = attack
        self.name = getattr(attack, "name", "attack")
        self.flags: dict[str, list[torch.Tensor]] = {}

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        adv, flags = self.attack.perturb_report(x, y)
        for key, value in flags.items():
            self.flags.setdefault(key, []).append(value)
        return adv

    def count(self, flag: str) -> int:
        return int(sum(int(v.sum()) for v in self.flags.get(flag, [])))


# -- reversion protocol -----------------------------------------------------------------------------------
#: Significance level of the reversion verdicts.
REVERSION_ALPHA = 0.05
#: Who labels the protected images for a reversion: ``own`` (each reverter its own labeller, as ``preempt
#: revert`` does) or ``defender`` (the defender's labels: an oracle, the worst case for the defender).
REVERTER_LABELS = ("own", "defender")


#: The smallest p-value :func:`mcnemar_exact` gives (the smallest normal float): one below it is given as
#: it, an upper bound, where it would round to 0.0 or to a subnormal of a few significant bits.
P_FLOOR = sys.float_info.min


def format_p(p: float) -> str:
    """A p-value as eval's tables and verdicts print it: two significant digits, and one below 1e-300 as
    "<1e-300" (:func:`mcnemar_exact` gives one past the floats' range as :data:`P_FLOOR`, a bound, not a
    value to print as measured)."""
    return "<1e-300" if p < 1e-300 else f"{p:.2g}"


def mcnemar_exact(before: torch.Tensor, after: torch.Tensor) -> tuple[int, int, float]:
    """Exact two-sided McNemar test (a sign test on the discordant pairs) of two per-image correctness
    vectors on the same images.

    Returns ``(gained, lost, p)``: images correct only ``after``, images correct only ``before``, and the
    two-sided p-value of ``gained`` under Binomial(gained + lost, 1/2) (1.0 with no discordant image). A p
    below the smallest normal float (:data:`P_FLOOR`, about 2.2e-308: over 1,000 discordant images nearly
    all one way) is given as it, an upper bound, never as 0.
    """
    gained = int((after & ~before).sum())
    lost = int((before & ~after).sum())
    n = gained + lost
    if n == 0:
        return gained, lost, 1.0
    # the tail's binomial coefficients term by term, in exact integers: comb(n, i + 1) = comb(n, i) (n - i) / (i + 1)
    # (math.comb for each took 11 s for 5,000 discordant images each way)
    term = tail = 1
    for i in range(min(gained, lost)):
        term = term * (n - i) // (i + 1)
        tail += term
    # one exact division, rounded once; past the floats' range it rounded to 0.0, read as a certainty
    return gained, lost, max(P_FLOOR, min(1.0, 2 * tail / 2**n))


def holm_adjusted(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of ``p_values`` (one family of tests), in their order: the i-th smallest
    of m is multiplied by m - i + 1, made no smaller than the adjusted ones before it, and capped at 1.
    Rejecting where an adjusted p is below alpha keeps the chance of any false rejection in the family
    below alpha, whatever the tests' dependence (Holm 1979); it never rejects less than Bonferroni."""
    m = len(p_values)
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def _paired_test(before: _GivenCell, after: _GivenCell, metric: str, cells: tuple[str, str],
                 names: tuple[str, str]) -> dict[str, Any]:  # fmt: skip
    """The paired test of ``after``'s ``metric`` against ``before``'s on the same images, as a paired record
    holds it: ``gain_points`` (after minus before), ``gained`` (right only ``after``), ``lost`` (right only
    ``before``), ``p_value``, ``p_holm`` (None: the family's to adjust) and ``not_tested`` (why not; None where
    tested). ``cells`` and ``names`` name the two cells in a reason, as "<cell> cell keeps..." and "<name> was
    measured on..."."""
    result: dict[str, Any] = {"gain_points": None, "gained": None, "lost": None, "p_value": None, "p_holm": None,
                              "not_tested": None}  # fmt: skip
    def correct(cell: _GivenCell) -> torch.Tensor | None:
        return cell.clean if metric == "clean_acc" else cell.robust

    absent = [(side, cell) for side, cell in zip(cells, (before, after)) if correct(cell) is None]
    if absent:
        result["not_tested"] = "; ".join(cell.missing or f"{side} cell keeps no per-image correctness"
                                         for side, cell in absent)  # fmt: skip
    elif before.row["n"] != after.row["n"]:  # the same attack attacks as many images of each: never, but say so
        result["not_tested"] = f"{names[0]} was measured on {before.row['n']} images, {names[1]} on {after.row['n']}"
    else:
        gained, lost, p = mcnemar_exact(correct(before), correct(after))
        result.update(gain_points=percent(gained - lost, after.row["n"]), gained=gained, lost=lost,
                      p_value=p)  # fmt: skip
    return result


def _paired_record(given: _GivenCell, none: _GivenCell, metric: str) -> dict[str, Any]:
    """One record of :meth:`Evaluator.paired_with_none`: ``given``'s ``metric`` against ``none``'s."""
    return {"victim": given.victim, "defense": given.spec.name, "metric": metric, "attack": given.row["attack"],
            "n": given.row["n"], "none_acc": none.row[metric], "defense_acc": given.row[metric],
            **_paired_test(none, given, metric, ("none", "the defense's"), ("none", "the defense"))}  # fmt: skip


def _between_record(first: _GivenCell, second: _GivenCell, metric: str) -> dict[str, Any]:
    """One record of :meth:`Evaluator.paired_between_defenses`: ``second``'s ``metric`` against ``first``'s."""
    names = (first.spec.name, second.spec.name)
    return {"victim": first.victim, "first": names[0], "second": names[1], "metric": metric,
            "attack": first.row["attack"], "n": first.row["n"], "first_acc": first.row[metric],
            "second_acc": second.row[metric],
            **_paired_test(first, second, metric, (f"the {names[0]}", f"the {names[1]}"), names)}  # fmt: skip


def _holm_over(records: list[dict[str, Any]]) -> None:
    """Set ``p_holm`` of every record tested (``p_value`` not None): its ``p_value`` adjusted by
    :func:`holm_adjusted` over those records, one family."""
    tested = [r for r in records if r["p_value"] is not None]
    for record, adjusted in zip(tested, holm_adjusted([r["p_value"] for r in tested])):
        record["p_holm"] = adjusted


def reversion_verdicts(
    correct: dict[str, torch.Tensor], alpha: float = REVERSION_ALPHA
) -> tuple[dict[str, str], dict[str, float], dict[str, list[int]], bool]:
    """Verdicts of the reversion protocol from per-image correctness (bool tensors on the same images) of the
    stages ``original``, ``protected`` and any others (see :func:`reversion_protocol`).

    Returns ``(verdicts, p_values, discordant, precondition_met)``: a verdict and a p-value per stage
    (``protected``: against ``original``; the others: against ``protected``), and per reversion stage the
    discordant counts ``[gained, lost]`` (images correct only after it, only before it).
    """
    # counts, not float means: the same images, so a count orders stages as accuracy does, and the points and
    # share of the drop the verdicts give are percent()'s, rounded as every other figure
    right = {stage: int(c.sum()) for stage, c in correct.items()}
    orig, prot, n = right["original"], right["protected"], len(correct["original"])
    _, _, p_drop = mcnemar_exact(correct["original"], correct["protected"])
    met = prot < orig and p_drop < alpha
    verdicts: dict[str, str] = {}
    p_values: dict[str, float] = {"protected": p_drop}
    discordant: dict[str, list[int]] = {}
    for stage in correct:
        if stage in ("original", "protected"):
            continue
        gained, lost, p = mcnemar_exact(correct["protected"], correct[stage])
        p_values[stage], discordant[stage] = p, [gained, lost]
        if not met:
            why = ("did not lower clean accuracy" if prot >= orig
                   else f"lowered clean accuracy within noise, p={format_p(p_drop)}")  # fmt: skip
            verdicts[stage] = f"protocol not met (protection {why})"
        elif right[stage] > prot and p < alpha:
            recovered = percent(right[stage] - prot, orig - prot, decimals=0)
            verdicts[stage] = f"reverted ({recovered:.0f}% of the drop recovered, p={format_p(p)})"
        elif right[stage] > prot:
            verdicts[stage] = f"within noise (+{percent(right[stage] - prot, n):.2f} points, p={format_p(p)})"
        else:
            verdicts[stage] = f"distorted (accuracy did not climb back, p={format_p(p)})"
    return verdicts, p_values, discordant, met


def _labeller(protector: Protector) -> str:
    """The model ``protector.predict`` labels with."""
    if protector.labels == "classifier" and protector.classifier is not None:
        return f"classifier {protector.classifier.name}"
    return f"backbone {protector.backbone.name}"


def reversion_protocol(
    evaluator: Evaluator,
    *,
    victims: Sequence[str],
    defense: DefenseSpec,
    black_box_backbone: str | Sequence[str] | None,
    jpeg_quality: int = 50,
    flip_fraction: float = 0.0,
    seed: int = 0,
    black_box_classifier: str | None = None,
    reverter_labels: str = "own",
    alpha: float = REVERSION_ALPHA,
) -> dict[str, Any]:
    """Sec. 4.3: protect with deliberately poor labels (a weak classifier in ``defense``, or a fraction of
    flipped ground-truth labels), so that clean accuracy after protection is below the original; then
    revert white-box (same backbone and settings), black-box (each other backbone given) and blindly (JPEG), and
    report clean accuracy at every stage with a verdict per method.

    The defense labels the originals as ``defense`` declares (its classifier, its backbone or the ground
    truth), or with ``flip_fraction`` > 0 with the ground truth, that fraction of its labels flipped (the nearest
    whole number of images, drawn with ``seed``; the results' ``labels`` says how many).

    A reversion runs the defense again on the protected image (Algorithm 2), and the defense labels its
    input itself: each reverter labels the *protected* images with its own labeller, as ``preempt revert``
    does (``reverter_labels="own"``, the default). The white-box reverter labels with what ``preempt revert
    --white-box`` finds recorded in a file protected this way: the defense's classifier when the defense
    labelled with it, else (labels from the backbone, the ground truth, or flipped ground truth: a label
    file, no classifier recorded) the backbone. The ground truth or the defender's labels are not the
    attacker's to have. A black-box reverter is the white-box one with another backbone: it labels with the
    same (public) classifier when the white-box one does, else with its own backbone; with
    ``black_box_classifier`` it labels with that classifier instead. ``reverter_labels="defender"`` hands
    every reverter the defender's labels instead (an oracle: the worst case for the defender, the only
    protocol of preempt 0.4.0 and earlier).

    Verdicts are tested, not read off the accuracies: an exact two-sided McNemar test (sign test on the
    images whose correctness differs) of each stage against the protected stage, on the same images. The
    protocol's precondition holds when protection lowered clean accuracy significantly (the same test,
    original vs protected); a stage "reverted" when its accuracy is higher than the protected one's at
    p < ``alpha``, is "within noise" when higher but not significantly, and "distorted" otherwise. The
    p-values and discordant counts are in the results.
    """
    ds = evaluator.dataset
    check_reversion_options(flip_fraction, jpeg_quality, reverter_labels, defense)
    check_seed(seed)  # -1 and an alpha of 2 were taken
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < 1:
        raise ConfigError(f"alpha (the tests' significance level) must be in (0, 1), got {alpha!r}")
    if flip_fraction > 0:  # labelled with flipped ground truth: its classifier, unused, is neither loaded nor
        # reported (nor warned of as the victim's), and the results name the labels the defense used
        options = {k: v for k, v in defense.options if k != "classifier"} | {"labels": GROUND_TRUTH[0]}
        defense = DefenseSpec(defense.kind, tuple(sorted(options.items())))
    others = [black_box_backbone] if isinstance(black_box_backbone, str) else list(black_box_backbone or [])
    key = defense.get("backbone")
    for other in others:  # before any work: the key's own weights would revert white-box under a black-box name
        if key is not None and (other == key or evaluator._model_identity(other) == evaluator._model_identity(key)):
            same = "" if other == key else f" ({key}'s weights)"
            raise ConfigError(f"black-box backbone {other}{same} is the defense's backbone, the key: its reversion "
                              f"is the white-box one; give a backbone the attacker could hold instead")  # fmt: skip
    protector = evaluator._protector(defense)
    eps = protector.config.eps
    seeds = [content_seed(ds.hwc(i)) for i in range(len(ds))]
    gen = torch.Generator().manual_seed(seed)
    source = defense.get("labels", "classifier")
    if flip_fraction > 0:
        # exactly the fraction (the nearest whole number of images): those of the smallest draws. A draw below
        # the fraction per image flipped a binomial number, said to be the fraction: 0.3 of 48 images flipped 18
        # (37.5%). Every label flipped, the draws and offsets are as they were.
        draws = torch.rand(len(ds), generator=gen)
        flipped = min(len(ds), math.floor(flip_fraction * len(ds) + 0.5))
        flip = torch.zeros(len(ds), dtype=torch.bool)
        flip[draws.argsort(stable=True)[:flipped]] = True
        offset = torch.randint(1, protector.backbone.config.num_classes, (len(ds),), generator=gen)
        labels = torch.where(flip, (ds.labels + offset) % protector.backbone.config.num_classes, ds.labels)
        label_note = (f"ground truth with {flip_fraction:.0%} of labels flipped ({flipped} of {len(ds)} "
                      f"image{'s' if len(ds) != 1 else ''})")  # fmt: skip
        label_seconds = 0.0
    else:
        labelled = evaluator._labels_for(defense, protector)
        start = time.perf_counter()
        labels = torch.cat([labelled(_to_float(ds.images[lo : lo + evaluator.batch_size], evaluator.device),
                                     slice(lo, lo + evaluator.batch_size)).cpu()
                            for lo in range(0, len(ds), evaluator.batch_size)])  # fmt: skip
        label_seconds = (time.perf_counter() - start) / len(ds)
        label_note = "ground truth" if source in GROUND_TRUTH else f"labels of {_labeller(protector)}"
    labels = labels.to(evaluator.device)
    protected, t_prot = evaluator._run_batches(
        ds.images, lambda x, sl: protector.transform(x, labels[sl], noise_seeds=seeds[sl]), eps
    )
    t_prot += label_seconds
    protected_seeds = [content_seed(protected[i].permute(1, 2, 0).contiguous().numpy()) for i in range(len(ds))]

    def revert_with(reverter: Protector) -> torch.Tensor:
        if reverter_labels == "defender":
            fn = lambda x, sl: reverter.transform(x, labels[sl], noise_seeds=protected_seeds[sl])  # noqa: E731
        else:  # the reverter's own labeller, on the protected images it is given
            fn = lambda x, sl: reverter.transform(x, reverter.predict(x), noise_seeds=protected_seeds[sl])  # noqa: E731
        images, _ = evaluator._run_batches(protected, fn, eps)
        return images

    # The attacker's defense: the defender's, labelled as a protected file's metadata would let it label.
    uses_classifier = source == "classifier" and flip_fraction == 0 and defense.get("classifier")
    attacker = dict(defense.options) | ({} if uses_classifier else {"labels": "backbone"})
    white_box = evaluator._protector(DefenseSpec(defense.kind, tuple(sorted(attacker.items()))), Reverter)
    stages: dict[str, torch.Tensor] = {"original": ds.images, "protected": protected}
    reverter_notes: dict[str, str] = {}
    defender_note = "the defender's labels (oracle: the worst case for the defender)"
    stages["white-box reversion"] = revert_with(white_box)
    reverter_notes["white-box reversion"] = defender_note if reverter_labels == "defender" else _labeller(white_box)
    for other in others:  # one stage per guessed backbone; named after it when there are several
        options = attacker | {"backbone": other}
        if black_box_classifier:
            options |= {"classifier": black_box_classifier, "labels": "classifier"}
        bb_spec = DefenseSpec(defense.kind, tuple(sorted(options.items())))
        stage = "black-box reversion" if len(others) == 1 else f"black-box reversion ({other})"
        reverter = evaluator._protector(bb_spec, Reverter)
        stages[stage] = revert_with(reverter)
        reverter_notes[stage] = defender_note if reverter_labels == "defender" else _labeller(reverter)
    stages[f"JPEG-{jpeg_quality}"] = jpeg_roundtrip(protected, jpeg_quality)

    results: dict[str, Any] = {
        "labels": label_note, "defense": defense.name, "seconds_per_image": t_prot, "n": len(ds),
        "reverter_labels": reverter_notes,
        "test": f"Exact two-sided McNemar test against the protected stage (original: the precondition), "
                f"alpha {alpha:g}",
        # what runs it again: the flips' seed is the protocol's own, not the defense's
        "settings": {"seed": seed, "flip_fraction": flip_fraction, "jpeg_quality": jpeg_quality, "alpha": alpha,
                     "reverter_labels": reverter_labels, "black_box_backbones": others,
                     "black_box_classifier": black_box_classifier, "defense": evaluator.defense_settings(defense)},
        "victims": {},
    }  # fmt: skip
    for victim_name in victims:
        evaluator._warn_white_box(victim_name, defense)
        victim = evaluator.load_victim(victim_name)
        accs, correct = {}, {}
        for stage, images in stages.items():
            x = _to_float(images, evaluator.device)
            with torch.inference_mode(), eval_mode(victim):
                pred = torch.cat([victim(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])
            correct[stage] = pred.cpu() == ds.labels
            accs[stage] = _percent(correct[stage])
        verdicts, p_values, discordant, met = reversion_verdicts(correct, alpha)
        results["victims"][victim_name] = {"clean_acc": accs, "verdict": verdicts, "p_value": p_values,
                                           "discordant": discordant, "precondition_met": met}  # fmt: skip
    return results
