"""Preemptive Reversion (Algorithm 2, Eq. 13) on tiny models: the formula, and that it moves against the
defense's own perturbation."""

from __future__ import annotations

import torch

from conftest import TEST_DEVICE, make_tiny_model
from preempt_cli import FastPreemption, ForeBackConfig
from preempt_cli.revert import Reverter


def _images(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(3)).to(TEST_DEVICE)


def test_reversion_is_twice_the_image_minus_the_defense_of_it() -> None:
    backbone = make_tiny_model(0).to(TEST_DEVICE)
    config = ForeBackConfig(samples=3)
    x = _images()
    y = torch.tensor([0, 3, 5, 9], device=TEST_DEVICE)
    reverted = Reverter(backbone, labels="backbone", config=config, seed=7).transform(x, y, noise_seeds=[1, 2, 3, 4])
    defended = FastPreemption(backbone, config=config, seed=7).perturb(x, y, noise_seeds=[1, 2, 3, 4])
    torch.testing.assert_close(reverted, (2 * x - defended).clamp(0, 1), atol=1e-6, rtol=0)
    # x~ - x = -(D(x) - x) wherever [0, 1] does not clip: the defense's step, taken backwards
    inside = ((2 * x - defended) > 0) & ((2 * x - defended) < 1)
    assert inside.float().mean() > 0.9
    torch.testing.assert_close((reverted - x)[inside], -(defended - x)[inside], atol=1e-6, rtol=0)
    assert (defended - x).abs().max() > 0.5 * config.eps  # the defense moved: the check is not of zeros
    assert (reverted - x).abs().max() <= config.eps + 1e-6


def test_reversion_labels_with_its_own_models() -> None:
    # Algorithm 2: the reverter labels x^r itself (its classifier, or its backbone): not the defender's labels
    backbone, classifier = make_tiny_model(0).to(TEST_DEVICE), make_tiny_model(1, name="clf").to(TEST_DEVICE)
    x = _images()
    by_classifier = Reverter(backbone, classifier, config=ForeBackConfig(samples=2))
    by_backbone = Reverter(backbone, labels="backbone", config=ForeBackConfig(samples=2))
    assert torch.equal(by_classifier.predict(x), classifier(x).argmax(1))
    assert torch.equal(by_backbone.predict(x), backbone(x).argmax(1))
