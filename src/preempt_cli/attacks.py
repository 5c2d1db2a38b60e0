"""Attacks that measure robust accuracy: PGD (ours) and AutoAttack (the reference code, wrapped).

Every attack follows the house contract (AutoAttack's own): built keyword-only from the model and its
settings (norm, eps, steps, step size, restarts, seed, device), then ``perturb(x, y) -> x_adv`` maps NCHW
float images in [0, 1] and their integer labels to adversarial images of the same shape, within ``eps`` of
``x`` in the attack's norm and inside [0, 1]. Models take [0, 1] images (normalization lives inside the
model wrapper). Attacks keep no state between calls: the same inputs and seed give the same outputs.

The registry maps names to attack classes (``ATTACKS``); :func:`create_attack` builds one by name, and
:func:`robust_accuracy` runs one the way AutoAttack reports it (only clean-correct points are attacked);
:func:`robust_correctness` does the same and says which images were right, for paired tests on the same images.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import numbers
from pathlib import Path
from typing import Any, Iterator, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ._percent import percent
from .device import model_device, to_device
from .engine import (NOISE_BLOCK_ELEMENTS, autograd_usable, check_batch, check_channels, check_unit_range,
                     content_seeds, eval_mode, hash_noise, noise_keys, refuse_int_levels, seeded_image_keys)
from .errors import ConfigError, InputConfigError, InputLabelError, MissingDependencyError

__all__ = [
    "Attack",
    "PGD",
    "AutoAttack",
    "ATTACKS",
    "NORMS",
    "AUTOATTACK_VERSIONS",
    "list_attacks",
    "create_attack",
    "robust_accuracy",
    "robust_correctness",
    "check_int",
]

_logger = logging.getLogger(__name__)

#: Norms the attacks support, as AutoAttack spells them.
NORMS: tuple[str, ...] = ("Linf", "L2")

#: AutoAttack versions offered: ``standard`` (APGD-CE, APGD-T, FAB-T, Square) for deterministic models,
#: ``rand`` (APGD-CE and APGD-DLR with EOT over 20 draws) for randomized defenses.
AUTOATTACK_VERSIONS: tuple[str, ...] = ("standard", "rand")

#: Levels of an 8-bit image (values k / 255).
_LEVELS = 255
#: Slack, in units of one 8-bit level, for float rounding when deciding which levels lie in the ball.
_LEVEL_TOL = 1e-4
#: The noise stream of PGD's random starts among those keyed as the engine keys its noise
#: (:func:`~preempt_cli.engine.seeded_image_keys`; the engine's is 0): an image never starts from the engine's noise.
_PGD_START_STREAM = 1


@runtime_checkable
class Attack(Protocol):
    """What every registered attack provides."""

    norm: str
    eps: float
    device: torch.device

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial versions of ``x`` (NCHW in [0, 1]) for labels ``y``, within ``eps`` of ``x``."""
        ...


# -- validation helpers --------------------------------------------------------------------------------------


def check_norm(norm: str) -> str:
    """``"Linf"``/``"L2"`` (any case) -> the canonical spelling.

    Raises:
        ConfigError: another norm.
    """
    canonical = {n.lower(): n for n in NORMS}.get(str(norm).lower()) if isinstance(norm, str) else None
    if canonical is None:
        raise ConfigError(f"unsupported norm {norm!r}: choose one of {', '.join(NORMS)}")
    return canonical


def check_attack_eps(eps: float, norm: str) -> float:
    """A positive finite budget (at most 1 for L-inf, where a larger one would be the whole cube).

    Raises:
        ConfigError: not a number, not positive, not finite, or above 1 for L-inf, or an int of 1 or more
            for L-inf (:func:`~preempt_cli.engine.refuse_int_levels`).
    """
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise ConfigError(f"eps must be a number, got {eps!r}")
    if norm == "Linf":
        refuse_int_levels("eps", eps)
    value = float(eps)
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"eps must be positive and finite, got {eps!r}")
    if norm == "Linf" and value > 1:
        raise ConfigError(f"an L-inf eps must be in (0, 1] for [0, 1] images, got {eps!r} (did you mean {eps}/255?)")
    return value


def check_int(name: str, value: int, minimum: int) -> int:
    """An integer of at least ``minimum``.

    Raises:
        ConfigError: not an integer or too small.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)  # a numpy integer as the int it is


def _check_batch(x: torch.Tensor, y: torch.Tensor, model: nn.Module | None = None) -> None:
    """Images NCHW floating point in [0, 1] and one integer label (>= 0) per image; with a loaded ``model``,
    of a channel count it takes (its own, or 1). The engine's checks, in their words (a uint8 batch is told
    ``x.float() / 255``), raising errors that are also what this module raised before.

    Raises:
        InputConfigError: wrong types, dtypes or shapes, or values outside [0, 1] (an ``InputError`` and a
            ``ConfigError``).
        InputLabelError: negative labels (an ``InputError`` and a ``LabelError``).
    """
    check_batch(x, y, error=InputConfigError)
    input_size = getattr(getattr(model, "config", None), "input_size", None)
    if input_size is not None:
        check_channels(x, input_size[0], model="the model", error=InputConfigError)
    check_unit_range(x, error=InputConfigError)
    if y.numel() and y.min() < 0:
        raise InputLabelError(f"labels must be class indices >= 0, got {int(y.min())}")


def _check_num_classes(y: torch.Tensor, logits: torch.Tensor) -> None:
    """Raises InputLabelError (a LabelError) when a label is not a class of the model."""
    if y.numel() and int(y.max()) >= logits.shape[1]:
        raise InputLabelError(f"label {int(y.max())} is not a class of a model with {logits.shape[1]} outputs")


def _l2_norms(t: torch.Tensor) -> torch.Tensor:
    """Per-image L2 norms, shaped [N, 1, 1, 1] for broadcasting."""
    return t.flatten(1).norm(p=2, dim=1).view(-1, 1, 1, 1)


# -- PGD ------------------------------------------------------------------------------------------------------


class PGD:
    """Projected gradient descent on the cross-entropy loss (Madry et al.), L-inf or L2.

    Each restart starts from a random point of the ball (L-inf: uniform; L2: a random direction at a
    uniform radius), takes ``steps`` signed (L-inf) or normalized (L2) gradient-ascent steps, projecting
    onto the ball around ``x`` and onto [0, 1] after each. Across restarts each image keeps the first
    adversarial example found, else the one with the highest loss, so more restarts never do worse; only
    images not yet fooled run again. Gradients are taken with respect to the input only (no weight
    gradients are computed, parameters are never touched) and the model runs in eval mode, its modes
    restored afterwards.

    Random starts are per image (:attr:`starts`): an image's start at each restart is drawn from
    ``seed``, the restart's index and the image's own pixels (its noise seed,
    :func:`~preempt_cli.engine.content_seeds`), by the counter-based hash the engine draws its noise with
    (:func:`~preempt_cli.engine.hash_noise`), for the whole batch at once. So an image's result depends only
    on the image, its label, the model, the settings and the seed: not on its place in the batch, the batch
    size, the other images of the batch, nor which of them a restart still attacks. Bit for bit where the
    model's own outputs for an image do not depend on its batch; where they do (the matrix-product and
    convolution kernels of a CPU or GPU library can change in the last bit with the batch size: on a CPU, a
    small CNN's logits at batches of 1 or 3 against 8), up to what such differences move; on CUDA so may L2's
    per-image norms (sums whose order a GPU's reduction kernel can choose by the batch size). No global random
    state is used. (Up to 0.23.0 one generator seeded per call drew the starts of the whole batch, so they
    followed an image's place in it.) L2 starts take their Gaussian direction as ``erfinv`` of such
    uniform values (elementwise, so the same in any batch), and their radius from one more.

    With ``quantize=True`` the result is rounded to 8-bit levels (k / 255), as the evaluation protocol
    attacks 8-bit images: L-inf clips the rounded levels to those within ``eps`` of ``x`` (for ``x`` on the
    8-bit grid: ``floor(eps * 255)`` levels); L2 rounds to the nearest levels, else to those of the
    perturbation scaled down just enough (``s * (adv - x)``, the largest scale whose levels fit), else
    (only possible when ``x`` is off the grid) keeps the unrounded image. Success and loss for the choice
    across restarts are judged on the rounded images.

    Args:
        model: a classifier taking [0, 1] images and returning logits.
        norm: ``"Linf"`` or ``"L2"``.
        eps: the budget (radius of the ball around ``x``).
        steps: gradient steps per restart.
        step_size: the step length; ``eps / 4`` by default (2/255 for L-inf 8/255).
        restarts: random restarts (1 = a single run; without a random start, always a single run).
        random_start: start from a random point of the ball (else from ``x``).
        quantize: round the result to 8-bit levels, staying within the budget.
        seed: seed of the random starts.
        device: where to compute; the model's device by default.

    Raises:
        ConfigError: an invalid setting.
    """

    name = "pgd"
    #: How the random starts are drawn: per image, from its own pixels (see above). Records of results keep
    #: it (``preempt eval``'s settings, and the keys of the cells it resumes), so that results of the starts
    #: drawn by batch position (0.23.0 and earlier) are never taken for these.
    starts = "per-image"

    def __init__(
        self,
        model: nn.Module,
        *,
        norm: str = "Linf",
        eps: float = 8 / 255,
        steps: int = 20,
        step_size: float | None = None,
        restarts: int = 1,
        random_start: bool = True,
        quantize: bool = False,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.norm = check_norm(norm)
        self.eps = check_attack_eps(eps, self.norm)
        self.steps = check_int("steps", steps, 1)
        if step_size is None:
            step_size = self.eps / 4
        if isinstance(step_size, bool) or not isinstance(step_size, numbers.Real):
            raise ConfigError(f"step_size must be a number, got {step_size!r}")
        if self.norm == "Linf":
            refuse_int_levels("step_size", step_size)
        if not math.isfinite(step_size) or step_size <= 0:
            raise ConfigError(f"step_size must be positive and finite, got {step_size!r}")
        self.step_size = float(step_size)
        self.restarts = check_int("restarts", restarts, 1)
        self.random_start = bool(random_start)
        self.quantize = bool(quantize)
        self.seed = check_int("seed", seed, 0)
        self.device = torch.device(device) if device is not None else model_device(model)

    def __repr__(self) -> str:
        return (
            f"PGD(norm={self.norm!r}, eps={self.eps:.6g}, steps={self.steps}, step_size={self.step_size:.6g}, "
            f"restarts={self.restarts}, random_start={self.random_start}, quantize={self.quantize}, "
            f"seed={self.seed}, device={str(self.device)!r})"
        )

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial examples for ``x`` (NCHW in [0, 1]) and labels ``y``.

        Returns a new tensor on ``x``'s device with ``x``'s dtype; ``x`` is not modified.

        Raises:
            InputConfigError: ``x`` or ``y`` of the wrong type, dtype or shape, or ``x`` outside [0, 1] (an
                ``InputError``, and the ``ConfigError`` it was before 0.22.0).
            InputLabelError: a label that is not a class of the model (an ``InputError`` and a ``LabelError``).
        """
        _check_batch(x, y, self.model)
        if x.shape[0] == 0:
            return x.detach().clone()
        with torch.inference_mode(False):  # called under torch.inference_mode(): the gradients need autograd
            return self._perturb(x, y)

    def _perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x0, y0 = autograd_usable(x.detach().to(self.device, torch.float32), y.detach().to(self.device, torch.long))
        start_keys = self._start_keys(x0) if self.random_start else None

        best = x0.clone()
        best_loss = torch.full((x0.shape[0],), -math.inf, device=self.device)
        fooled = torch.zeros(x0.shape[0], dtype=torch.bool, device=self.device)
        restarts = self.restarts if self.random_start else 1  # without a random start, restarts repeat
        with eval_mode(self.model), torch.enable_grad():
            for restart in range(restarts):
                todo = (~fooled).nonzero().squeeze(1)
                if todo.numel() == 0:
                    break
                xs, ys = x0[todo], y0[todo]
                adv = self._run(xs, ys, None if start_keys is None else start_keys[todo, restart])
                if self.quantize:
                    adv = self._quantize(adv, xs)
                with torch.no_grad():
                    logits = self.model(adv)
                    loss = F.cross_entropy(logits, ys, reduction="none")
                    success = logits.argmax(dim=1) != ys
                better = success | (loss > best_loss[todo])
                best[todo[better]] = adv[better]
                best_loss[todo[better]] = loss[better]
                fooled[todo[success]] = True
                _logger.debug(
                    "PGD restart %d/%d: %d of %d images fooled so far",
                    restart + 1,
                    restarts,
                    int(fooled.sum()),
                    x0.shape[0],
                )
        return best.to(x.device, x.dtype)

    def _start_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Each image's key of its random start at each restart, [B, restarts] int64 on ``device``, from the
        seed and the image's own pixels, as the engine keys its noise. Hashed once per call: 6-12 ms for 256
        CIFAR-10 images on a shared 2-core CPU, and drawing their starts 9-17 ms per restart (4 ms from one
        generator), where PGD-20 on them took 12-16 s."""
        image_keys = seeded_image_keys(self.seed, content_seeds(x), stream=_PGD_START_STREAM)
        return noise_keys(to_device(image_keys, self.device), self.restarts, 1)[:, :, 0]

    def _run(self, x: torch.Tensor, y: torch.Tensor, start_keys: torch.Tensor | None) -> torch.Tensor:
        """One restart: random start (keyed per image by ``start_keys``, [B]), then ``steps`` projected
        ascent steps."""
        adv = self._project(x + self._random_start(x, start_keys), x) if start_keys is not None else x.clone()
        for step in range(self.steps):
            adv.requires_grad_(True)
            logits = self.model(adv)
            if step == 0:
                _check_num_classes(y, logits)
            loss = F.cross_entropy(logits, y, reduction="sum")  # per-image gradients, batch-independent
            (grad,) = torch.autograd.grad(loss, adv)
            with torch.no_grad():
                if self.norm == "Linf":
                    adv = adv + self.step_size * grad.sign()
                else:
                    adv = adv + self.step_size * grad / _l2_norms(grad).clamp_min(1e-12)
                adv = self._project(adv, x)
        return adv.detach()

    def _random_start(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """A random offset inside the ball for each image, drawn from its key (``keys``: [B] int64): every
        value a function of the key and the element's index alone, so an image draws the same offset in any
        batch."""
        block = NOISE_BLOCK_ELEMENTS.get(x.device.type, NOISE_BLOCK_ELEMENTS["cpu"])
        numel = x[0].numel()
        if self.norm == "Linf":  # uniform in [-eps, eps]
            return hash_noise(keys[:, None], numel, self.eps, block=block, dtype=x.dtype).view(x.shape)
        # L2: uniform values in [-1, 1) on a grid of 2^24, moved to the grid's midpoints (exact in float32):
        # none is -1, whose erfinv is -inf. erfinv of them is Gaussian (up to sqrt(2), which the norm takes
        # out), elementwise, so each value is the same in any batch; the last value gives the radius.
        u = hash_noise(keys[:, None], numel + 1, 1.0, block=block, dtype=x.dtype).view(x.shape[0], numel + 1)
        u.add_(2.0**-24)
        direction = torch.erfinv(u[:, :numel]).view(x.shape)
        direction = direction / _l2_norms(direction).clamp_min(1e-12)
        radius = u[:, numel:].add(1).mul_(0.5).view(-1, 1, 1, 1)  # uniform in (0, 1)
        return direction * radius * self.eps

    def _project(self, adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Onto the ball of radius ``eps`` around ``x``, then onto [0, 1] (which only shrinks the offset)."""
        if self.norm == "Linf":
            adv = torch.minimum(torch.maximum(adv, x - self.eps), x + self.eps)
        else:
            delta = adv - x
            delta = delta * (self.eps / _l2_norms(delta).clamp_min(1e-12)).clamp(max=1.0)
            adv = x + delta
        return adv.clamp(0.0, 1.0)

    def _quantize(self, adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Round ``adv`` to 8-bit levels while staying within ``eps`` of ``x`` (see the class docstring)."""
        return _quantize_8bit(adv, x, self.norm, self.eps)


def _quantize_8bit(adv: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Round ``adv`` to 8-bit levels (k / 255) while staying within ``eps`` of ``x`` in ``norm``.

    L-inf clips the rounded levels to those within ``eps`` of ``x`` (an empty interval, only possible for
    ``x`` off the grid and ``eps`` under one level, keeps the unrounded value). L2 takes the nearest levels
    where they lie within ``eps``; else the nearest levels of ``x + s * (adv - x)`` for the largest scale
    ``s`` in [0, 1] found (by bisection) whose levels do; else (only possible for ``x`` off the grid, whose
    nearest levels, those of ``s = 0``, are then the nearest grid point to it and lie outside ``eps``) the
    unrounded image.

    An L2 attack ends on the sphere, and rounding each of its thousands of pixels to the nearest level
    pushes almost every image just past ``eps`` (CIFAR-10 at 0.5: 503 of 518). Rounding those toward ``x``
    instead gave up ~9% of the budget and raised L2 robust accuracy by ~2.5 points (PGD-20 on 600 test
    images: 58.3% unrounded, 60.8% rounded so; 58.5% with the scale), so the scale comes first.
    """
    a = adv.double()
    xd = x.double()
    nearest = torch.round(a * _LEVELS)
    if norm == "Linf":
        low = torch.ceil((xd - eps) * _LEVELS - _LEVEL_TOL).clamp(min=0)
        high = torch.floor((xd + eps) * _LEVELS + _LEVEL_TOL).clamp(max=_LEVELS)
        clipped = torch.minimum(torch.maximum(nearest, low), high) / _LEVELS
        return torch.where(low <= high, clipped, a).to(adv.dtype)
    limit = eps * (1 + 1e-6)
    out = a.clone()
    rounded = nearest / _LEVELS
    pending = _l2_norms(rounded - xd).view(-1) > limit
    out[~pending] = rounded[~pending]
    if pending.any():  # bisected only where the nearest levels overshoot
        rows = pending.nonzero().view(-1)
        scaled, fits = _scaled_to_fit(xd[rows], a[rows] - xd[rows], limit)
        out[rows[fits]] = scaled[fits]
        pending[rows[fits]] = False
    if pending.any():
        _logger.debug("quantize: %d images kept unrounded (not on the 8-bit grid)", int(pending.sum()))
    return out.to(adv.dtype)


def _scaled_to_fit(x: torch.Tensor, delta: torch.Tensor, limit: float,
                   iterations: int = 30) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The 8-bit levels of ``x + s * delta`` for each image's largest scale ``s`` in [0, 1] that bisection
    finds with levels within ``limit`` of ``x`` (L2, float64; 30 halvings bring ``s`` within 1e-9 of that
    boundary), and whether they are (not where ``x`` is off the grid and its own nearest levels are outside
    ``limit``). The levels' norm is not exactly monotone in ``s``; bisection keeps a scale whose levels fit,
    which is all that counts."""
    shape = (-1,) + (1,) * (x.dim() - 1)

    def levels(scale: torch.Tensor) -> torch.Tensor:
        return torch.round((x + scale.view(shape) * delta) * _LEVELS).clamp(0, _LEVELS) / _LEVELS

    def fits(candidate: torch.Tensor) -> torch.Tensor:
        return _l2_norms(candidate - x).view(-1) <= limit

    low = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)  # fits where x is on the grid
    high = torch.ones_like(low)
    for _ in range(iterations):
        middle = (low + high) / 2
        ok = fits(levels(middle))
        low, high = torch.where(ok, middle, low), torch.where(ok, high, middle)
    result = levels(low)
    return result, fits(result)


# -- AutoAttack -------------------------------------------------------------------------------------------


def _import_autoattack() -> Any:
    """The ``pyautoattack`` module.

    Raises:
        MissingDependencyError: the package is not installed.
    """
    try:
        import pyautoattack
    except ImportError as e:
        raise MissingDependencyError("pyautoattack", "AutoAttack") from e
    return pyautoattack


#: The fewest classes a model needs for the reference's attacks on the DLR loss: APGD-DLR divides by the gap
#: between the largest logit and the 3rd, APGD-T (targeted DLR) by that to the mean of the 3rd and 4th.
_DLR_MIN_CLASSES = {"apgd-dlr": 3, "apgd-t": 4}


@contextlib.contextmanager
def _own_rng(device: torch.device) -> Iterator[None]:
    """Restore the global torch RNG states afterwards (the reference code reseeds them)."""
    devices: list[int] = []
    if torch.cuda.is_available():
        devices = [torch.cuda.current_device()]
        if device.type == "cuda" and device.index is not None and device.index not in devices:
            devices.append(device.index)
    with torch.random.fork_rng(devices=devices):
        yield


class AutoAttack:
    """AutoAttack (Croce & Hein, 2020) through its reference implementation, the package ``pyautoattack``.

    A thin wrapper: it builds ``pyautoattack.AutoAttack(model, norm=, eps=, version=, device=, seed=)`` at
    each call and returns the first element of ``run_standard_evaluation(x, y, batch_size=, state_path=)``.
    It only adds what the reference leaves to the caller: contiguous inputs, the model in eval mode
    (modes restored afterwards), the global torch RNG state restored afterwards (the reference
    reseeds it), and, for a model of fewer than 10 classes, as many target classes for APGD-T and FAB-T as
    it has other classes (the standard version's 9, the others of a 10-class model, indexed past its logits;
    a model of too few classes for the DLR loss, under 4 for ``standard`` and 3 for ``rand``, is refused).
    As in the reference, only points classified correctly are attacked, and each attack of
    the version runs only on the points still robust; points that resist keep their clean value.

    With ``quantize=True`` the attack is an 8-bit one, judged as :class:`PGD` judges its restarts: after
    each attack of the version's cascade (standard: APGD-CE, APGD-T, FAB-T, Square; rand: APGD-CE,
    APGD-DLR), its outputs are rounded to 8-bit levels within the budget (as PGD rounds them) and a point
    counts as fooled only if its *rounded* image fools the model; the next attack of the cascade runs on
    every point not fooled that way. Rounding the cascade's finished result once instead would bias robust
    accuracy upward: the reference stops attacking a point as soon as an unrounded output fools it, and
    FAB and Square leave it just across the boundary, where rounding can restore it with no later attack
    to retry it. The attacks themselves, their settings and seeds are the reference's, one call of
    ``run_standard_evaluation`` per attack; where rounding never restores a point, the cascade attacks
    the same points in the same batches as the reference would. ``state_path`` is not supported then.

    The reference logs through the standard logger named ``auto-attack`` (its progress at DEBUG level when
    ``verbose``, its sanity-check warnings always); it never prints.

    Unlike :class:`PGD`'s, its results depend on how the points are batched, which this wrapper leaves to the
    reference: for each attack of the cascade and each batch of up to ``batch_size`` points still robust,
    the reference reseeds torch's global generator with ``seed`` and draws for the batch as a whole (APGD's
    random starts, also those of its restarts on the points of the batch not yet fooled, and Square's random
    squares, whose positions all points of a batch share). So an image's result depends on which
    points share its batch and on its place among them: on ``batch_size``, on the other images passed in and
    their order, and on which points the earlier attacks left robust (with ``quantize``, each attack runs on
    the points left robust after rounding). The same image and seed reproduce its result only with the same
    images, in the same order, at the same batch size (and :func:`robust_correctness` passes only the
    clean-correct images, in chunks of its own ``batch_size``).

    Args:
        model: a classifier taking [0, 1] images and returning logits.
        norm: ``"Linf"`` or ``"L2"``.
        eps: the budget.
        version: ``"standard"`` or ``"rand"`` (for randomized defenses: APGD-CE and APGD-DLR, EOT 20).
        seed: the reference's seed.
        device: where the reference computes; the model's device by default.
        batch_size: images per batch inside the reference.
        verbose: log the reference's progress.
        state_path: a JSON file where the reference saves its progress (``None``: none). Note that
            ``pyautoattack`` 0.2.0 cannot read back the state files it writes: resuming from an existing
            file raises :class:`ConfigError`; delete the file to start over.
        quantize: attack 8-bit images, rounding after every attack of the cascade (see above).

    Raises:
        ConfigError: an invalid setting (``state_path`` with ``quantize``).
        MissingDependencyError: ``pyautoattack`` is not installed.
    """

    name = "autoattack"

    def __init__(
        self,
        model: nn.Module,
        *,
        norm: str = "Linf",
        eps: float = 8 / 255,
        version: str = "standard",
        seed: int = 0,
        device: torch.device | str | None = None,
        batch_size: int = 250,
        verbose: bool = False,
        state_path: Path | str | None = None,
        quantize: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.norm = check_norm(norm)
        self.eps = check_attack_eps(eps, self.norm)
        if version not in AUTOATTACK_VERSIONS:
            raise ConfigError(
                f"unsupported AutoAttack version {version!r}: choose one of {', '.join(AUTOATTACK_VERSIONS)}"
            )
        self.version = version
        self.seed = check_int("seed", seed, 0)
        self.device = torch.device(device) if device is not None else model_device(model)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.verbose = bool(verbose)
        self.state_path = Path(state_path) if state_path is not None else None
        self.quantize = bool(quantize)
        if self.quantize and self.state_path is not None:
            raise ConfigError("AutoAttack with quantize=True runs its attacks one by one and cannot keep a state file")
        self._reference = _import_autoattack()

    def __repr__(self) -> str:
        return (
            f"AutoAttack(norm={self.norm!r}, eps={self.eps:.6g}, version={self.version!r}, seed={self.seed}, "
            f"device={str(self.device)!r}, quantize={self.quantize})"
        )

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial examples for ``x`` (NCHW in [0, 1]) and labels ``y``, from the reference AutoAttack.

        Returns a new tensor on ``x``'s device with ``x``'s dtype (8-bit levels with ``quantize``).

        Raises:
            InputConfigError: ``x`` or ``y`` of the wrong type, dtype or shape, or ``x`` outside [0, 1] (an
                ``InputError``, and the ``ConfigError`` it was before 0.22.0).
            ConfigError: a state file the reference refuses to resume from.
            InputLabelError: negative labels (an ``InputError`` and a ``LabelError``).
        """
        return self._perturb(x, y, report=False)[0]

    def perturb_report(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`perturb`, with per-image flags (bool tensors on the CPU) for the same run:

        * ``fooled``: the returned image fools the model;
        * ``fooled_float``: some attack's unrounded output fooled it (the reference's criterion, on float
          images);
        * ``fooled_rounded_once``: the first unrounded output that fooled it still fools it once rounded,
          i.e. what rounding the reference's finished result once would report (biased: see the class).

        Without ``quantize`` the three are equal.
        """
        return self._perturb(x, y, report=True)

    def _predict(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.model(images[i : i + self.batch_size].to(self.device)).argmax(dim=1).cpu()
                              for i in range(0, images.shape[0], self.batch_size)])  # fmt: skip

    def _reference_attack(self, images: torch.Tensor) -> Any:
        """The reference's AutoAttack, its targeted attacks fitted to the number of classes of the model (read
        from its logits for the first of ``images``).

        Raises:
            ConfigError: a model of too few classes for the version's DLR loss.
        """
        aa = self._reference.AutoAttack(
            self.model, norm=self.norm, eps=self.eps, version=self.version, device=self.device, seed=self.seed
        )
        aa.verbose = self.verbose
        with torch.no_grad():
            num_classes = self.model(images[:1].to(self.device)).shape[1]
        for attack in getattr(aa, "attacks_to_run", None) or []:
            needed = _DLR_MIN_CLASSES.get(attack)
            if needed is not None and num_classes < needed:
                raise ConfigError(f"AutoAttack {self.version} needs a model of at least {needed} classes (its "
                                  f"{attack.upper()} loss takes the {needed} largest logits); this one has "
                                  f"{num_classes}")  # fmt: skip
        # The standard version targets 9 classes, the others of a 10-class model; the reference takes the
        # targets from the sorted logits and indexes past those of a model of fewer (an IndexError), where its
        # own check advises as many targets as there are other classes.
        for targeted in (getattr(aa, "apgd_targeted", None), getattr(aa, "fab", None)):
            if targeted is not None and targeted.n_target_classes > num_classes - 1:
                targeted.n_target_classes = num_classes - 1
        return aa

    def _perturb(self, x: torch.Tensor, y: torch.Tensor, *, report: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _check_batch(x, y, self.model)
        if x.shape[0] == 0:
            empty = torch.zeros(0, dtype=torch.bool)
            return x.detach().clone(), {"fooled": empty, "fooled_float": empty, "fooled_rounded_once": empty}
        # under torch.inference_mode() too: the reference's gradients need autograd
        with torch.inference_mode(False):
            xc, yc = autograd_usable(x.detach().float().contiguous(), y.detach().long().contiguous())
            return self._attack(x, xc, yc, report=report)

    def _attack(self, x: torch.Tensor, xc: torch.Tensor, yc: torch.Tensor, *, report: bool,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        with eval_mode(self.model), _own_rng(self.device):
            if self.quantize:
                x_adv, flags = self._cascade_8bit(xc, yc)
            else:
                x_adv = self._run_reference(xc, yc)
                flags = {}
                if report:
                    fooled = self._predict(x_adv) != yc.cpu()
                    flags = {"fooled": fooled, "fooled_float": fooled, "fooled_rounded_once": fooled}
        return x_adv.to(x.device, x.dtype), flags

    def _run_reference(self, xc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
        resuming = self.state_path is not None and self.state_path.exists()
        aa = self._reference_attack(xc)
        try:
            x_adv, _ = aa.run_standard_evaluation(xc, yc, batch_size=self.batch_size, state_path=self.state_path)
        except ValueError as e:
            if not resuming:
                raise
            raise ConfigError(
                f"AutoAttack cannot resume from the state file {self.state_path}: {e} "
                "Delete the file to start the evaluation over."
            ) from e
        return x_adv

    def _cascade_8bit(self, xc: torch.Tensor, yc: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The version's attacks one by one, each on the points its predecessors' rounded outputs left robust."""
        n = xc.shape[0]
        y_cpu = yc.cpu()
        best = xc.clone()
        pending = self._predict(xc) == y_cpu  # clean-correct and not fooled by a rounded output yet
        fooled = torch.zeros(n, dtype=torch.bool)
        fooled_float = torch.zeros(n, dtype=torch.bool)
        fooled_once = torch.zeros(n, dtype=torch.bool)
        aa = self._reference_attack(xc)
        robust_after = {"clean": pending.float().mean().item()}
        for attack in list(aa.attacks_to_run):
            todo = pending.nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            aa.attacks_to_run = [attack]
            idx = todo.to(xc.device)
            adv_float, _ = aa.run_standard_evaluation(xc[idx], yc[idx], batch_size=self.batch_size)
            adv_float = adv_float.to(xc.device, xc.dtype)
            adv = _quantize_8bit(adv_float, xc[idx], self.norm, self.eps)
            hit_float = self._predict(adv_float) != y_cpu[todo]
            hit = self._predict(adv) != y_cpu[todo]
            first = hit_float & ~fooled_float[todo]
            fooled_once[todo[first & hit]] = True
            fooled_float[todo[hit_float]] = True
            best[idx[hit.to(idx.device)]] = adv[hit.to(adv.device)]
            fooled[todo[hit]] = True
            pending[todo[hit]] = False
            robust_after[attack] = pending.float().mean().item()
            restored = int((hit_float & ~hit).sum())
            _logger.debug("AutoAttack %s: %d of %d fooled after rounding to 8 bits, %d restored by the rounding%s",
                          attack, int(hit.sum()), todo.numel(), restored,
                          " (attacked again by the next attack)" if restored else "")  # fmt: skip
        checks = getattr(self._reference, "checks", None)  # the reference's sanity check on Square, as in its run
        if checks is not None and hasattr(checks, "check_square_sr"):
            checks.check_square_sr(robust_after, logger=logging.getLogger("auto-attack"))
        return best, {"fooled": fooled, "fooled_float": fooled_float, "fooled_rounded_once": fooled_once}


# -- registry ---------------------------------------------------------------------------------------------

#: Attack classes by name.
ATTACKS: dict[str, type] = {PGD.name: PGD, AutoAttack.name: AutoAttack}


def list_attacks() -> list[str]:
    """Names of the registered attacks, sorted."""
    return sorted(ATTACKS)


def create_attack(name: str, /, model: nn.Module, **kwargs: Any) -> Attack:
    """Build the attack registered as ``name`` on ``model``.

    Keyword arguments whose value is ``None`` are dropped (so a caller can pass every option it knows,
    unset ones as ``None``); the others must be settings of that attack.

    Raises:
        ConfigError: an unknown attack, a setting that attack does not take, or an invalid setting.
        MissingDependencyError: the attack needs a package that is not installed.
    """
    cls = ATTACKS.get(str(name).lower())
    if cls is None:
        raise ConfigError(f"unknown attack {name!r}: choose one of {', '.join(list_attacks())}")
    settings = {k: v for k, v in kwargs.items() if v is not None}
    accepted = [
        p.name for p in inspect.signature(cls).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise ConfigError(
            f"attack {cls.name!r} does not take {', '.join(unknown)}; its settings are {', '.join(accepted)}"
        )
    return cls(model, **settings)


# -- evaluation -------------------------------------------------------------------------------------------


def robust_accuracy(
    model: nn.Module,
    attack: Attack,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 250,
) -> tuple[float, float, torch.Tensor]:
    """Clean and robust accuracy of ``model`` on ``(x, y)`` under ``attack``, as AutoAttack reports them.

    Only the points ``model`` classifies correctly are attacked (in batches of ``batch_size``); a point is
    robust when it is classified correctly both clean and after the attack. The attack usually targets
    ``model`` itself, but may be built on another model (a transfer attack). :func:`robust_correctness`
    gives the same run image by image.

    Returns:
        ``(clean_acc, robust_acc, x_adv)``: fractions in [0, 1], and the adversarial images (the clean image
        for points not attacked), on ``x``'s device.

    Raises:
        ConfigError: an invalid batch size.
        InputConfigError: no images, or images or labels of the wrong type, dtype, shape or range (an
            ``InputError``, and the ``ConfigError`` it was before 0.22.0).
        InputLabelError: a label that is not a class of the model (an ``InputError`` and a ``LabelError``).
    """
    clean_ok, robust_ok, x_adv = robust_correctness(model, attack, x, y, batch_size=batch_size)
    return clean_ok.float().mean().item(), robust_ok.float().mean().item(), x_adv


def robust_correctness(
    model: nn.Module,
    attack: Attack,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 250,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`robust_accuracy` image by image: which images ``model`` classifies correctly clean, and which
    after ``attack`` (only the clean-correct ones are attacked, so a robust image is a clean-correct one).
    What a paired test of two defenses on the same images needs (their accuracies alone do not say which
    images changed).

    Returns:
        ``(clean_ok, robust_ok, x_adv)``: two bool CPU tensors of one entry per image, and the adversarial
        images (the clean image for points not attacked), on ``x``'s device.

    Raises:
        ConfigError: an invalid batch size.
        InputConfigError: no images, or images or labels of the wrong type, dtype, shape or range.
        InputLabelError: a label that is not a class of the model.
    """
    check_int("batch_size", batch_size, 1)
    _check_batch(x, y)
    n = x.shape[0]
    if n == 0:
        raise InputConfigError("robust accuracy needs at least one image")
    device = model_device(model)
    y_cpu = y.detach().long().cpu()
    clean_ok = torch.zeros(n, dtype=torch.bool)
    with eval_mode(model), torch.no_grad():
        for start in range(0, n, batch_size):
            logits = model(x[start : start + batch_size].detach().float().to(device))
            labels = y_cpu[start : start + batch_size]
            _check_num_classes(labels, logits)
            clean_ok[start : start + batch_size] = logits.argmax(dim=1).cpu() == labels

    robust_ok = torch.zeros(n, dtype=torch.bool)
    x_adv = x.detach().clone()
    for chunk in clean_ok.nonzero().squeeze(1).split(batch_size):
        idx = chunk.to(x.device)
        adv = attack.perturb(x[idx], y[idx.to(y.device)])
        x_adv[idx] = adv.to(x_adv.device, x_adv.dtype)
        with eval_mode(model), torch.no_grad():
            robust_ok[chunk] = model(adv.float().to(device)).argmax(dim=1).cpu() == y_cpu[chunk]

    clean_count, robust_count = int(clean_ok.sum()), int(robust_ok.sum())
    _logger.info(
        "%s: clean %d/%d (%.2f%%), robust %d/%d (%.2f%%)",
        getattr(attack, "name", type(attack).__name__),
        clean_count,
        n,
        percent(clean_count, n),  # as eval's rows give them
        robust_count,
        n,
        percent(robust_count, n),
    )
    return clean_ok, robust_ok, x_adv
