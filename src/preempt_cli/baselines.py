"""Baselines that Fast Preemption is compared with: Bi-Level preemptive robustification (Moon et al., 2022).

Bi-Level is *backward propagation only*, with a full PGD attack in place of Fast Preemption's averaged FGSM
samples (``N = 1``): at each of ``steps`` outer steps, PGD predicts an attack on the current iterate
``x_t`` (against the backbone, within ``eps`` of ``x_t`` and in [0, 1], random start), and the iterate moves
*against* it::

    d_t     = PGD(x_t) - x_t
    x_{t+1} = project(x_t - eta * d_t, x, eps)          # optimizer="sign"

where ``project`` clips to the ``eps``-ball around the ORIGINAL ``x`` and to [0, 1]
(:func:`preempt_cli.engine.project`). The inner attack is :class:`preempt_cli.attacks.PGD`, reused as is.
It costs ``steps * inner_steps`` forward+backward passes of the backbone per image (2000 with the
defaults, against 60 for Fast Preemption), plus one forward pass per outer step (PGD's check of its result).

This is Bi-Level as the Fast Preemption paper describes it (METHOD.md), not line for line the authors' code
(``snu-mllab/preemptive-robustification``), which optimizes a tanh reparametrization of the image with torch
RMSprop (lr 0.1) on the loss gradient at PGD's end point (first order, not unrolled through the attack),
from a random start in the ball, labelled by the robust model itself. A review ported that form and compared
it on 16 test images: the same backbone robust accuracy (13/16), the same victim robust accuracy (10/16),
outer losses within 0.02. ``eval`` labels Bi-Level as it labels Fast Preemption (the defense's classifier by
default; ``labels=backbone`` is the authors' choice), so the two are compared on equal terms.
"""

from __future__ import annotations

import itertools
import logging
import math

import torch
from torch import nn

from .attacks import _check_batch, check_int, PGD
from .engine import project, refuse_int_levels
from .errors import ConfigError

__all__ = ["BiLevel", "BILEVEL_OPTIMIZERS"]

_logger = logging.getLogger(__name__)

#: Outer-step rules of :class:`BiLevel`.
BILEVEL_OPTIMIZERS: tuple[str, ...] = ("sign", "rmsprop")

#: RMSprop decay of the running average of squared directions, and the constant added under the root.
_RMS_DECAY = 0.99
_RMS_EPS = 1e-8


def _positive_float(name: str, value: float, *, maximum: float | None = None) -> float:
    """A positive finite number (at most ``maximum``).

    Raises:
        ConfigError: not a number, not positive and finite, or above ``maximum``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out) or out <= 0:
        raise ConfigError(f"{name} must be positive and finite, got {value!r}")
    if maximum is not None and out > maximum:
        raise ConfigError(f"{name} must be at most {maximum}, got {value!r}")
    return out


class BiLevel:
    """Bi-Level preemptive robustification (Moon et al., AAAI 2022), the baseline of the paper.

    Backward propagation only (``N = 1``) with a PGD attack inside each outer step; see the module
    docstring for the update. Two outer-step rules:

    * ``"sign"``: the plain update ``x_{t+1} = project(x_t - eta * d_t)``, with the displacement as it is
      (no sign is taken: the name says that PGD's last step is a signed gradient step, so ``d_t`` is
      ``+-eps`` on ~90% of pixels) and each step moves at most ``eta * eps``.
    * ``"rmsprop"``: the displacement normalized by its running RMS, RMSprop-like (not the authors' update,
      which is torch ``RMSprop`` on the loss gradient in tanh space: see the module docstring):
      ``v_t = 0.99 * v_{t-1} + 0.01 * d_t**2`` per pixel (``v_0 = 0``), then
      ``x_{t+1} = project(x_t - clamp(eta * eps * d_t / sqrt(v_t + 1e-8), -eta * eps, eta * eps))``.
      The normalized direction is unit-free, so it is scaled by ``eta * eps``; the clamp caps a step at
      the largest step of ``"sign"`` (the first steps, where ``v`` is still small, hit the cap). Pixels
      whose attack direction keeps flipping take smaller steps. Since ``d_t`` is mostly ``+-eps``, it
      behaves much as ``"sign"`` does.

    Randomness is only PGD's random start: outer step ``t`` runs PGD with a seed derived from ``seed`` and
    ``t``, and PGD draws each image's start from that seed and the image's own pixels
    (:attr:`~preempt_cli.attacks.PGD.starts`), never from global random state. So the same inputs and seed
    give the same result, and an image's result does not depend on the other images of its batch, their
    order or the batch size: bit for bit where the backbone's outputs for an image do not depend on its
    batch (a CPU's or GPU's convolution kernels can round the last bit differently at another batch size, and
    2,000 signed steps can amplify that). Gradients are taken with respect to the input only; the backbone
    runs in eval mode (its modes restored afterwards) and its parameters are never touched.

    Args:
        backbone: a model taking [0, 1] images (normalization inside), e.g. ``load_model(...)``.
        eps: the L-inf budget around the original image (and the inner attack's budget around ``x_t``).
        eta: the outer learning rate.
        steps: outer steps (``T<-``).
        inner_steps: PGD iterations per outer step.
        inner_step_size: PGD's step size; ``eps / 4`` by default.
        optimizer: ``"sign"`` or ``"rmsprop"``.
        seed: seed of PGD's random starts.
        device: where to compute; the backbone's device by default.

    Raises:
        ConfigError: an invalid setting.
    """

    name = "bilevel"

    def __init__(
        self,
        backbone: nn.Module,
        *,
        eps: float = 8 / 255,
        eta: float = 0.1,
        steps: int = 100,
        inner_steps: int = 20,
        inner_step_size: float | None = None,
        optimizer: str = "sign",
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(backbone, nn.Module):
            raise ConfigError(f"backbone must be a torch.nn.Module, got {type(backbone).__name__}")
        self.backbone = backbone
        refuse_int_levels("eps", eps)
        refuse_int_levels("inner_step_size", inner_step_size)
        self.eps = _positive_float("eps", eps, maximum=1.0)
        self.eta = _positive_float("eta", eta)
        self.steps = check_int("steps", steps, 1)
        self.inner_steps = check_int("inner_steps", inner_steps, 1)
        self.inner_step_size = (
            self.eps / 4 if inner_step_size is None else _positive_float("inner_step_size", inner_step_size)
        )
        if optimizer not in BILEVEL_OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {optimizer!r}: choose one of {', '.join(BILEVEL_OPTIMIZERS)}")
        self.optimizer = optimizer
        self.seed = check_int("seed", seed, 0)
        if device is None:
            tensor = next(itertools.chain(backbone.parameters(), backbone.buffers()), None)
            device = tensor.device if tensor is not None else torch.device("cpu")
        self.device = torch.device(device)

    def __repr__(self) -> str:
        return (
            f"BiLevel(eps={self.eps:.6g}, eta={self.eta:.6g}, steps={self.steps}, inner_steps={self.inner_steps}, "
            f"inner_step_size={self.inner_step_size:.6g}, optimizer={self.optimizer!r}, seed={self.seed}, "
            f"device={str(self.device)!r})"
        )

    @property
    def passes_per_image(self) -> int:
        """Forward+backward passes of the backbone per image (``steps * inner_steps``)."""
        return self.steps * self.inner_steps

    def _step_seed(self, step: int) -> int:
        """The inner PGD's seed at outer step ``step``: base seed and step mixed into 63 bits."""
        return (self.seed * 0x9E3779B97F4A7C15 + step + 1) % (1 << 63)

    def _attack(self, step: int) -> PGD:
        return PGD(
            self.backbone,
            norm="Linf",
            eps=self.eps,
            steps=self.inner_steps,
            step_size=self.inner_step_size,
            restarts=1,
            random_start=True,
            seed=self._step_seed(step),
            device=self.device,
        )

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Protect a batch.

        Args:
            x: images, [B, C, H, W] floating point in [0, 1].
            y: labels, [B] integers (the classifier's, or ground truth).

        Returns:
            A new tensor on ``x``'s device with ``x``'s dtype: the protected images, within ``eps`` of ``x``
            in L-inf and in [0, 1]. ``x`` is not modified.

        Raises:
            InputConfigError: ``x`` or ``y`` of the wrong type, dtype or shape, or ``x`` outside [0, 1] (an
                ``InputError``, and the ``ConfigError`` it was before 0.22.0).
            InputLabelError: a negative label, or one that is not a class of the backbone (an ``InputError``
                and a ``LabelError``).
        """
        _check_batch(x, y, self.backbone)  # the attacks' checks: the inner PGD makes them again on x_t
        if x.shape[0] == 0:
            return x.detach().clone()

        x0 = x.detach().to(self.device, torch.float32)
        labels = y.detach().to(self.device, torch.long)
        x_t = x0.clone()
        avg_sq = torch.zeros_like(x0) if self.optimizer == "rmsprop" else None
        cap = self.eta * self.eps
        for step in range(self.steps):
            x_adv = self._attack(step).perturb(x_t, labels)  # validates labels against the backbone
            with torch.no_grad():
                direction = x_adv - x_t  # the predicted attack
                if avg_sq is None:
                    update = self.eta * direction
                else:
                    avg_sq.mul_(_RMS_DECAY).addcmul_(direction, direction, value=1 - _RMS_DECAY)
                    update = (cap * direction / torch.sqrt(avg_sq + _RMS_EPS)).clamp_(-cap, cap)
                x_t = project(x_t - update, x0, self.eps)
        _logger.debug(
            "Bi-Level: %d images, %d outer steps x PGD-%d (%s), mean |delta| %.4g",
            x0.shape[0],
            self.steps,
            self.inner_steps,
            self.optimizer,
            float((x_t - x0).abs().mean()),
        )
        return x_t.to(x.device, x.dtype)
