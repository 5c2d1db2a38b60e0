"""The Bi-Level baseline (Moon et al., 2022): budget, determinism, effect on the loss, validation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import TEST_DEVICE, make_per_image_model, make_tiny_model
from preempt_cli.baselines import BILEVEL_OPTIMIZERS, BiLevel
from preempt_cli.errors import ConfigError, LabelError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

EPS = 8 / 255
#: Small settings so the tests stay fast: 5 outer steps of PGD-3.
FAST = dict(steps=5, inner_steps=3)


def _batch(n: int = 6, seed: int = 0, channels: int = 3, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, channels, size, size), generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


@pytest.mark.parametrize("optimizer", BILEVEL_OPTIMIZERS)
def test_keeps_budget_and_range(optimizer: str) -> None:
    model = make_tiny_model(0)
    x, y = _batch()
    x[0, :, :4, :4] = 0.0  # pixels at the edges of [0, 1]
    x[1, :, :4, :4] = 1.0
    out = BiLevel(model, eps=EPS, eta=1.0, optimizer=optimizer, **FAST).perturb(x, y)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert (out - x).abs().max() <= EPS + 1e-6
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert not torch.equal(out, x)


def test_input_not_modified_and_returned_on_input_dtype() -> None:
    model = make_tiny_model(0)
    x, y = _batch()
    x64, before = x.double(), x.double().clone()
    out = BiLevel(model, **FAST).perturb(x64, y)
    assert torch.equal(x64, before)
    assert out.dtype == torch.float64


@pytest.mark.parametrize("optimizer", BILEVEL_OPTIMIZERS)
def test_deterministic_by_seed(optimizer: str) -> None:
    model = make_tiny_model(0)
    x, y = _batch()
    a = BiLevel(model, optimizer=optimizer, seed=3, **FAST).perturb(x, y)
    torch.manual_seed(123)  # global random state must not matter
    b = BiLevel(model, optimizer=optimizer, seed=3, **FAST).perturb(x, y)
    c = BiLevel(model, optimizer=optimizer, seed=4, **FAST).perturb(x, y)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("optimizer", BILEVEL_OPTIMIZERS)
def test_an_image_gets_the_same_result_in_any_batch(optimizer: str) -> None:
    """Bi-Level's inner PGD drew its random starts by an image's place in the batch, so an image's result
    followed its batch (and ``eval`` keyed a Bi-Level set by the batch size). PGD's starts are per image now:
    with a backbone whose per-image outputs do not depend on the batch, the same bits in any batch."""
    model = make_per_image_model().to(TEST_DEVICE)
    x, y = (t.to(TEST_DEVICE) for t in _batch(7))
    bilevel = BiLevel(model, optimizer=optimizer, seed=3, **FAST)
    whole = bilevel.perturb(x, y)
    order = torch.tensor([4, 1, 6, 0, 3, 5, 2], device=TEST_DEVICE)
    pieces = torch.empty_like(whole)
    for chunk in order.split(3):
        pieces[chunk] = bilevel.perturb(x[chunk], y[chunk])
    if TEST_DEVICE.type == "cpu":
        assert torch.equal(pieces, whole)
    else:
        torch.testing.assert_close(pieces, whole, atol=1e-6, rtol=0)


@pytest.mark.parametrize("optimizer", BILEVEL_OPTIMIZERS)
def test_lowers_backbone_loss(optimizer: str) -> None:
    model = make_tiny_model(0)
    x, y = _batch(n=8, seed=1)
    out = BiLevel(model, eta=0.5, optimizer=optimizer, **FAST).perturb(x, y)
    before, after = _loss(model, x, y), _loss(model, out, y)
    assert after.mean() < before.mean()
    assert (after < before).float().mean() >= 0.75


def test_more_steps_lower_the_loss_further() -> None:
    model = make_tiny_model(0)
    x, y = _batch(n=8, seed=2)
    short = BiLevel(model, eta=0.2, steps=2, inner_steps=3).perturb(x, y)
    long = BiLevel(model, eta=0.2, steps=8, inner_steps=3).perturb(x, y)
    assert _loss(model, long, y).mean() < _loss(model, short, y).mean()


def test_grayscale_and_parameters_untouched() -> None:
    model = make_tiny_model(0, input_size=(1, 16, 16), frozen=False)
    model.train()
    x, y = _batch(channels=1)
    out = BiLevel(model, **FAST).perturb(x, y)
    assert out.shape == x.shape
    assert all(p.grad is None for p in model.parameters())
    assert model.training  # mode restored


def test_passes_per_image_and_defaults() -> None:
    model = make_tiny_model(0)
    default = BiLevel(model)
    assert (default.eps, default.eta, default.steps, default.inner_steps) == (EPS, 0.1, 100, 20)
    assert default.inner_step_size == pytest.approx(EPS / 4)
    assert default.optimizer == "sign"
    assert default.passes_per_image == 2000
    assert BiLevel(model, **FAST).passes_per_image == 15
    assert "BiLevel(" in repr(default)


def test_empty_batch() -> None:
    model = make_tiny_model(0)
    x = torch.empty((0, 3, 16, 16))
    out = BiLevel(model, **FAST).perturb(x, torch.empty((0,), dtype=torch.long))
    assert out.shape == x.shape


@pytest.mark.parametrize(
    "settings",
    [
        dict(eps=0),
        dict(eps=-0.1),
        dict(eps=1.5),
        dict(eps=1),  # one level, or the whole range? an int is refused
        dict(inner_step_size=2),
        dict(eps=math.nan),
        dict(eta=0),
        dict(eta=math.inf),
        dict(steps=0),
        dict(steps=2.5),
        dict(inner_steps=0),
        dict(inner_steps=True),
        dict(inner_step_size=0.0),
        dict(optimizer="adam"),
        dict(seed=-1),
    ],
)
def test_bad_settings(settings: dict) -> None:
    with pytest.raises(ConfigError):
        BiLevel(make_tiny_model(0), **settings)


def test_backbone_must_be_a_module() -> None:
    with pytest.raises(ConfigError):
        BiLevel(lambda x: x)  # type: ignore[arg-type]


def test_bad_inputs() -> None:
    defense = BiLevel(make_tiny_model(0), **FAST)
    x, y = _batch()
    with pytest.raises(ConfigError):
        defense.perturb(x[0], y)  # not NCHW
    with pytest.raises(ConfigError):
        defense.perturb(x, y[:-1])  # count mismatch
    with pytest.raises(ConfigError):
        defense.perturb(x * 2, y)  # outside [0, 1]
    with pytest.raises(ConfigError):
        defense.perturb(x, y.float())
    with pytest.raises(LabelError):
        defense.perturb(x, torch.full_like(y, 10))  # not a class of the 10-class backbone


@pytest.mark.parametrize("optimizer", BILEVEL_OPTIMIZERS)
def test_real_robust_backbone_lowers_loss(optimizer: str, cifar_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """On real CIFAR-10 images with the PGD-trained ResNet-20 as backbone (skips without ../shared)."""
    weights = SHARED / "models" / "cifar10_resnet20_pgdat_a.safetensors"
    if not weights.is_file():
        pytest.skip(f"real weights not available: {weights} is missing (they live in ../shared/models)")
    from preempt_cli.models import load_model

    model = load_model("cifar10-resnet20-pgdat-a", models_dir=SHARED / "models", device=cifar_batch[0].device)
    x, y = cifar_batch[0][:4], cifar_batch[1][:4]
    out = BiLevel(model, eta=0.5, steps=3, inner_steps=2, optimizer=optimizer).perturb(x, y)
    assert (out - x).abs().max() <= EPS + 1e-6
    before, after = _loss(model, x, y), _loss(model, out, y)
    assert (after < 0.8 * before).all()  # e.g. 0.12 -> 0.04 and 0.68 -> 0.30 with "sign"


def test_each_outer_step_moves_against_the_inner_pgd_attack(monkeypatch: pytest.MonkeyPatch) -> None:
    """The update as METHOD.md gives it: PGD-K (random start, step eps/4, budget eps around x_t, the given
    labels) predicts an attack on x_t, and x_{t+1} = clip(x_t - eta * (PGD(x_t) - x_t)) to the eps-ball
    around the ORIGINAL x and to [0, 1]."""
    from preempt_cli import baselines
    from preempt_cli.engine import project

    calls: list[tuple[baselines.PGD, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    original = baselines.PGD.perturb

    def spy(attack: baselines.PGD, x_t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x_adv = original(attack, x_t, labels)
        calls.append((attack, x_t.clone(), labels.clone(), x_adv.clone()))
        return x_adv

    monkeypatch.setattr(baselines.PGD, "perturb", spy)
    model = make_tiny_model(0)
    x, y = _batch(n=4, seed=3)
    eta = 0.3
    out = BiLevel(model, eta=eta, steps=3, inner_steps=2).perturb(x, y)
    assert len(calls) == 3
    x_t = x
    for attack, attacked, labels, x_adv in calls:
        assert (attack.norm, attack.eps, attack.steps, attack.random_start) == ("Linf", EPS, 2, True)
        assert attack.step_size == pytest.approx(EPS / 4)
        assert torch.equal(labels, y)
        assert torch.allclose(attacked, x_t, atol=1e-7)  # PGD attacks the current iterate, not x
        x_t = project(x_t - eta * (x_adv - x_t), x, EPS)
    assert torch.allclose(out, x_t, atol=1e-6)
    assert len({attack.seed for attack, *_ in calls}) == 3  # a fresh random start at every outer step
