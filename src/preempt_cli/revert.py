"""Preemptive Reversion (Algorithm 2): the adaptive attack on Fast Preemption.

Given a protected image x^r, run the same defense again and subtract the second perturbation:
``x~ = x^r - (D(x^r) - x^r) = 2 x^r - D(x^r)`` (Eq. 13). The paper reports that with the user's backbone
and settings (white-box) this largely erases the protection and with another backbone (black-box) it does
not. Measured here (benchmarks/RESULTS.md), it erases it in neither case once the reverter labels the
protected images itself, as this class does; handed the defender's labels, every backbone reverts alike.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .engine import ForeBackConfig
from .imageio import levels_to_float
from .inputs import REVERTED_SUFFIX
from .protect import Protector

__all__ = ["Reverter", "white_box_settings"]


class Reverter(Protector):
    """Preemptive Reversion of protected images, with the attacker's backbone, classifier and settings.

    Takes the same arguments as :class:`~preempt_cli.protect.Protector`. Its :meth:`run` takes paths as
    ``preempt revert`` does (folder walks take the protected files, and every other image but reversion
    outputs: a black-box attacker's copies often carry no metadata; outputs are ``*.reverted.png``); inputs
    collected beforehand need ``collect_inputs(paths, skip_markers=Reverter.skip_markers)``, since
    :func:`~preempt_cli.inputs.collect_inputs` leaves protected files out of folder walks by default.
    """

    kind = "reverted"
    output_suffix = REVERTED_SUFFIX
    skip_markers = (REVERTED_SUFFIX,)  # protected files are what it reverts
    skipped_kinds = ("reverted",)
    verb = "reverts"

    def transform(self, x: torch.Tensor, y: torch.Tensor, noise_seeds: Sequence[int] | None = None) -> torch.Tensor:
        """``2 x - D(x)``, clipped to [0, 1] (it stays within eps of ``x``, as D(x) does)."""
        return _reflected(x, self.engine.perturb(x, y, noise_seeds=noise_seeds))

    def transform_levels(self, levels: torch.Tensor, max_value: int, y: torch.Tensor,
                         noise_seeds: Sequence[int] | None = None) -> torch.Tensor:  # fmt: skip
        """:meth:`transform` of the images integer ``levels`` hold (see :meth:`Protector.transform_levels`): their
        floats are made again for the reflection, not held while D(x) is computed."""
        twice = self.engine.perturb_levels(levels, max_value, y, noise_seeds=noise_seeds)
        return _reflected(levels_to_float(levels, max_value), twice)

    def transform_keyed(self, x: torch.Tensor, y: torch.Tensor, image_keys: torch.Tensor) -> torch.Tensor:
        """:meth:`transform` from the images' noise keys (what a CUDA graph of a batch captures)."""
        return _reflected(x, self.engine.perturb_keyed(x, y, image_keys))

    def _extra_metadata(self, meta: dict[str, Any] | None) -> dict[str, Any]:
        if not meta:
            return {}
        keys = ("backbone", "backbone_sha256", "backbone_sha256_of", "classifier", "preset")
        return {"protected_with": {k: meta.get(k) for k in keys}}


def _reflected(x: torch.Tensor, twice: torch.Tensor) -> torch.Tensor:
    """``2 x - twice``, clipped to [0, 1]: ``x`` moved as far from ``twice`` (D(x)) as D moved it."""
    # where the engine returned it (the backbone's device), as float32: x may be elsewhere, or half; detached,
    # as D(x) is: a caller's x that requires grad gave an output in its autograd graph (no .numpy())
    return (2 * x.detach().to(twice.device, torch.float32) - twice).clamp_(0.0, 1.0)


#: The most backbone passes per image that ``revert --white-box`` takes from a file's metadata: 1,000x the
#: paper's 60 (F1-B2, N 20). Metadata is the file's to say; edited to ``samples = 10**9`` it made one file
#: allocate until the kernel killed the whole run, the other files with it.
MAX_RECORDED_PASSES = 60_000


def white_box_settings(meta: dict[str, Any]) -> dict[str, Any]:
    """The defense settings recorded in a protected PNG's metadata (for ``revert --white-box``).

    Raises:
        KeyError: the metadata lacks a setting.
        ValueError: the settings ask for more than :data:`MAX_RECORDED_PASSES` passes per image.
    """
    keys = ("eps", "eta", "forward_steps", "backward_steps", "samples", "sample_projection", "inner_steps")
    settings = {k: meta[k] for k in keys}
    try:
        passes = ForeBackConfig(**settings).passes_per_image
    except (TypeError, ValueError):  # settings no defense has: building the reversion says what is wrong
        passes = 0
    if passes > MAX_RECORDED_PASSES:
        raise ValueError(f"its metadata asks for {passes:,} backbone passes per image (steps x samples), more "
                         f"than the {MAX_RECORDED_PASSES:,} a white-box reversion takes from a file (edited, or made with "
                         f"settings past that cap: revert it black-box with them)")
    settings["precision"] = meta.get("precision", "fp32")  # files of preempt < 0.2 were made in fp32
    return settings
