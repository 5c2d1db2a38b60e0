"""Attacks: PGD keeps its budget and hurts a trained model, AutoAttack wraps the reference code, the registry
and ``robust_accuracy`` behave as AutoAttack reports.

Most tests use a tiny CNN trained in a second on synthetic 16x16 images whose class is a small colour shift
(so an L-inf 4/255 attack can break it while random noise of the same budget cannot). The tests on the real
robust ResNet-20 and CIFAR-10 images skip when ``../shared`` is absent.
"""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F
from conftest import (FAKE_AUTOATTACK_MODULE, TEST_DEVICE, FakeReferenceAutoAttack, ThresholdModel,
                      make_per_image_model, make_tiny_model)
from torch import nn

from preempt_cli.attacks import (
    ATTACKS,
    PGD,
    Attack,
    AutoAttack,
    create_attack,
    list_attacks,
    robust_accuracy,
    robust_correctness,
)
from preempt_cli.errors import ConfigError, InputError, LabelError, MissingDependencyError

HW = 16
LINF_EPS = 8 / 255
L2_EPS = 0.5
#: Class k shifts the mean colour of a noisy grey image by 0.05 along COLORS[k].
COLORS = torch.tensor(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]]
    + [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [-1, -1, -1]],
    dtype=torch.float32,
)


def color_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` synthetic 8-bit images (values k/255) and labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = 0.5 + 0.05 * COLORS[y].view(n, 3, 1, 1) + 0.15 * (torch.rand(n, 3, HW, HW, generator=g) - 0.5)
    return torch.round(x.clamp(0, 1) * 255) / 255, y


def budget(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-image distance in ``norm``."""
    d = (x_adv - x).flatten(1)
    return d.abs().amax(dim=1) if norm == "Linf" else d.norm(dim=1)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def on_8bit_grid(x: torch.Tensor) -> bool:
    return bool(((x * 255 - torch.round(x * 255)).abs() < 1e-4).all())


def assert_in_budget(x_adv: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> None:
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert budget(x_adv, x, norm).max().item() <= eps * (1 + 1e-5) + 1e-6


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: these models are tiny, and on a busy 2-core machine two OpenMP threads spinning
    against other processes made the AutoAttack runs 10-20 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """The tiny CNN trained on ``color_data`` (about 80% test accuracy), eval mode, parameters frozen."""
    gen_state = torch.random.get_rng_state()
    model = make_tiny_model(0, input_size=(3, HW, HW), frozen=False)
    x, y = color_data(512, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(60):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.random.set_rng_state(gen_state)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(TEST_DEVICE)  # trained on the CPU (the same weights everywhere), attacked on the test device


@pytest.fixture(scope="module")
def test_set(trained: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = color_data(48, seed=1)
    x, y = x.to(TEST_DEVICE), y.to(TEST_DEVICE)
    assert accuracy(trained, x, y) >= 0.6, "the tiny model did not learn the synthetic task"
    return x, y


# -- PGD --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("norm", "eps"), [("Linf", LINF_EPS), ("L2", L2_EPS)])
@pytest.mark.parametrize("random_start", [True, False])
def test_pgd_stays_within_budget_and_range(norm: str, eps: float, random_start: bool) -> None:
    model = make_tiny_model(3, input_size=(3, HW, HW))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, HW, HW, generator=g)  # off the 8-bit grid
    x[0] = 0.0  # the box binds everywhere
    x[1] = 1.0
    y = torch.arange(6) % 10
    x_before = x.clone()
    x_adv = PGD(model, norm=norm, eps=eps, steps=5, step_size=eps, random_start=random_start, restarts=2).perturb(
        x, y
    )
    assert torch.equal(x, x_before)
    assert_in_budget(x_adv, x, norm, eps)
    assert (budget(x_adv, x, norm)[2:] > eps / 2).all()  # it moves, up to the boundary with a large step


def test_pgd_is_reproducible_by_seed_and_leaves_global_rng_alone(trained: nn.Module, test_set) -> None:
    x, y = test_set
    state = torch.random.get_rng_state()
    a = PGD(trained, eps=LINF_EPS, steps=3, seed=7).perturb(x, y)
    b = PGD(trained, eps=LINF_EPS, steps=3, seed=7).perturb(x, y)
    attack = PGD(trained, eps=LINF_EPS, steps=3, seed=8)
    c = attack.perturb(x, y)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(attack.perturb(x, y), c)  # no state carried between calls
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize(("norm", "eps"), [("Linf", LINF_EPS), ("L2", L2_EPS)])
@pytest.mark.parametrize("quantize", [False, True])
def test_pgd_gives_an_image_the_same_result_in_any_batch(norm: str, eps: float, quantize: bool) -> None:
    """PGD drew its random starts from one generator per call, so an image started from the noise of its
    place in the batch: another batch size, order or company (and so ``eval``'s ``--limit`` or attack batch
    size) gave it another result, and restarts drew for the images still unfooled. Starts now come from each
    image's pixels, the seed and the restart: with a model whose per-image outputs do not depend on the
    batch, the same bits in any batch, and so the same per-image correctness."""
    model = make_per_image_model().to(TEST_DEVICE)
    g = torch.Generator().manual_seed(11)
    x = (torch.randint(0, 256, (24, 3, HW, HW), generator=g).float() / 255).to(TEST_DEVICE)
    with torch.no_grad():
        y = model(x).argmax(1)  # all clean-correct: every image is attacked
    attack = PGD(model, norm=norm, eps=eps, steps=1, step_size=eps / 8, restarts=3, quantize=quantize, seed=3)
    whole = attack.perturb(x, y)
    with torch.no_grad():
        fooled = model(whole).argmax(1) != y
    assert 0 < int(fooled.sum()) < len(y)  # restarts ran on a subset, and correctness can tell batchings apart
    order = torch.randperm(len(y), generator=g).to(TEST_DEVICE)
    for size in (1, 5, 7):
        pieces = torch.empty_like(whole)
        for chunk in order.split(size):
            pieces[chunk] = attack.perturb(x[chunk], y[chunk])
        if TEST_DEVICE.type == "cpu":
            assert torch.equal(pieces, whole), size
        with torch.no_grad():
            assert torch.equal(model(pieces).argmax(1) != y, fooled), size
    # the same through robust_correctness at two batch sizes, the images in another order
    _, robust_a, adv_a = robust_correctness(model, attack, x, y, batch_size=4)
    _, robust_b, adv_b = robust_correctness(model, attack, x[order], y[order], batch_size=9)
    assert torch.equal(robust_a[order.cpu()], robust_b) and torch.equal(robust_a, ~fooled.cpu())
    if TEST_DEVICE.type == "cpu":
        assert torch.equal(adv_a[order], adv_b)
    # the starts still follow the seed, and differ between restarts and between images of equal labels
    other = PGD(model, norm=norm, eps=eps, steps=1, step_size=eps / 8, restarts=3, quantize=quantize, seed=4)
    assert all(not torch.equal(a, b) for a, b in zip(other.perturb(x, y), whole))
    keys = attack._start_keys(x)
    assert keys.shape == (len(y), 3) and keys.unique().numel() == keys.numel()


def test_pgd_touches_neither_weights_nor_modes() -> None:
    net = nn.Sequential(nn.BatchNorm2d(3), make_tiny_model(0, input_size=(3, HW, HW), frozen=False))
    net.train()
    net[1].eval()  # mixed modes must come back as they were
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = color_data(8, seed=2)
    PGD(net, eps=LINF_EPS, steps=3).perturb(x, y)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # BN stats too: ran in eval
    assert all(p.grad is None for p in net.parameters())
    assert net.training and net[0].training and not net[1].training


@pytest.mark.parametrize(("norm", "eps"), [("Linf", 4 / 255), ("L2", L2_EPS)])
def test_pgd_lowers_accuracy_more_than_noise(trained: nn.Module, test_set, norm: str, eps: float) -> None:
    x, y = test_set
    clean, robust, x_adv = robust_accuracy(trained, PGD(trained, norm=norm, eps=eps, steps=10), x, y)
    g = torch.Generator().manual_seed(0)
    if norm == "Linf":
        noise = torch.sign(torch.rand(x.shape, generator=g) - 0.5) * eps
    else:
        noise = torch.randn(x.shape, generator=g)
        noise = noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps
    noise = noise.to(x.device)
    noisy = accuracy(trained, (x + noise).clamp(0, 1), y)
    assert clean == pytest.approx(accuracy(trained, x, y))
    assert robust <= clean - 0.4
    assert noisy >= clean - 0.1  # the same budget spent at random barely matters
    assert_in_budget(x_adv, x, norm, eps)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_pgd_restarts_never_do_worse(trained: nn.Module, test_set, norm: str) -> None:
    x, y = test_set
    eps = 2 / 255 if norm == "Linf" else 0.15  # a weak attack, so that restarts matter
    kw = dict(norm=norm, eps=eps, steps=2, seed=3)
    one = PGD(trained, restarts=1, **kw).perturb(x, y)
    many = PGD(trained, restarts=4, **kw).perturb(x, y)
    with torch.no_grad():
        logits_one, logits_many = trained(one), trained(many)
    fooled_one = logits_one.argmax(1) != y
    fooled_many = logits_many.argmax(1) != y
    assert 0 < fooled_one.sum() < len(y)
    assert (fooled_many | ~fooled_one).all()  # every image fooled with one restart stays fooled
    assert fooled_many.sum() >= fooled_one.sum()
    loss_one = F.cross_entropy(logits_one, y, reduction="none")
    loss_many = F.cross_entropy(logits_many, y, reduction="none")
    resisted = ~fooled_many
    assert (loss_many[resisted] >= loss_one[resisted] - 1e-6).all()
    assert_in_budget(many, x, norm, eps)


@pytest.mark.parametrize(
    ("norm", "eps", "bound"), [("Linf", 8 / 255, 8 / 255), ("Linf", 8.7 / 255, 8 / 255), ("L2", 0.5, 0.5)]
)
def test_pgd_quantize_gives_8bit_images_within_budget(trained: nn.Module, test_set, norm, eps, bound) -> None:
    x, y = test_set
    assert on_8bit_grid(x)
    clean, robust, x_adv = robust_accuracy(trained, PGD(trained, norm=norm, eps=eps, steps=5, quantize=True), x, y)
    assert on_8bit_grid(x_adv)
    assert_in_budget(x_adv, x, norm, bound)
    assert robust < clean  # still an attack after rounding


def test_pgd_quantize_off_grid_inputs_stay_within_budget() -> None:
    model = make_tiny_model(4, input_size=(3, HW, HW))
    x = torch.rand(4, 3, HW, HW, generator=torch.Generator().manual_seed(1))
    y = torch.arange(4)
    for norm, eps in (("Linf", LINF_EPS), ("Linf", 0.5 / 255), ("L2", L2_EPS)):
        assert_in_budget(PGD(model, norm=norm, eps=eps, steps=3, quantize=True).perturb(x, y), x, norm, eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_l2_rounding_keeps_the_budget_of_an_attack_on_the_sphere(dtype: torch.dtype) -> None:
    """An L2 attack ends on the sphere; rounding its 3,072 pixels to the nearest levels pushes it just past
    eps, and rounding all of them toward x instead gave up ~9% of the budget in PGD (robust accuracy 1-3
    points too high on CIFAR-10; ~16% here). The rounded image stays within eps and keeps nearly all of it,
    in a batch that mixes that case with images whose nearest levels fit, images on the box's edges, and an
    attack that changed nothing."""
    from preempt_cli.attacks import _quantize_8bit

    g = torch.Generator().manual_seed(0)
    x = torch.randint(8, 248, (16, 3, 32, 32), generator=g).to(dtype) / 255  # on the grid
    x[12] = (x[12] > 0.5).to(dtype)  # on the box's edges: the clamp to [0, 1] binds
    direction = torch.randn(x.shape, generator=g, dtype=dtype)
    radius = torch.full((16, 1, 1, 1), L2_EPS, dtype=dtype)
    radius[13], radius[14] = 0.0, 0.2  # no change at all; well inside the ball
    adv = (x + radius * direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).clamp(0, 1)
    nearest = torch.round(adv * 255) / 255
    overshoot = budget(nearest, x, "L2") > L2_EPS
    assert overshoot[:12].all() and not overshoot[13:15].any()  # the cases are those
    rounded = _quantize_8bit(adv, x, "L2", L2_EPS)
    assert rounded.dtype == dtype and on_8bit_grid(rounded)
    assert_in_budget(rounded, x, "L2", L2_EPS)
    assert budget(rounded, x, "L2")[:12].min() > 0.99 * L2_EPS  # the old rule kept ~0.84 of it here
    assert torch.equal(rounded[13:15], nearest[13:15])  # where the nearest levels fit, they are taken


def test_pgd_default_step_size_is_a_quarter_of_eps(tiny_backbone) -> None:
    assert PGD(tiny_backbone, eps=8 / 255).step_size == pytest.approx(2 / 255)
    assert PGD(tiny_backbone, norm="L2", eps=0.5).step_size == pytest.approx(0.125)
    assert PGD(tiny_backbone, norm="linf").norm == "Linf"


@pytest.mark.parametrize("step_size", [0.3, 2.0])  # inside the ball; far outside it (the projection binds)
def test_pgd_l2_step_is_the_normalized_gradient_projected(step_size: float) -> None:
    """One L2 step without a random start, by hand: x + step * g / ||g||_2 per image, projected onto the
    L2 ball of radius eps around x, then onto [0, 1]."""
    model = make_tiny_model(5, input_size=(3, HW, HW))
    g = torch.Generator().manual_seed(4)
    x = torch.rand(3, 3, HW, HW, generator=g)
    x[0, :, :4] = 0.0  # some pixels on the box, where the clamp binds
    x[1, :, :4] = 1.0
    y = torch.tensor([1, 4, 7])
    eps = 0.5
    x_adv = PGD(model, norm="L2", eps=eps, steps=1, step_size=step_size, random_start=False).perturb(x, y)

    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    norms = grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert (norms > 1e-6).all()
    delta = step_size * grad / norms
    delta = delta * (eps / delta.flatten(1).norm(dim=1)).clamp(max=1.0).view(-1, 1, 1, 1)
    expected = (x + delta).clamp(0, 1)
    torch.testing.assert_close(x_adv, expected, atol=1e-6, rtol=0)
    # a real L2 step: not the signed (L-inf) step, whose direction differs once projected
    signed = x + step_size * grad.sign()
    signed = x + (signed - x) * (eps / (signed - x).flatten(1).norm(dim=1)).clamp(max=1.0).view(-1, 1, 1, 1)
    assert (x_adv - signed.clamp(0, 1)).abs().max() > 1e-2


# -- invalid settings and inputs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(norm="L1"),
        dict(norm="inf"),
        dict(eps=0),
        dict(eps=-8 / 255),
        dict(eps=math.nan),
        dict(eps=math.inf),
        dict(eps=8),  # 8 meant 8/255: an L-inf eps above 1 is the whole cube
        dict(eps=1),  # one level (as the CLI reads it) or the whole cube: an int is refused
        dict(step_size=1),
        dict(eps="8/255"),
        dict(steps=0),
        dict(steps=2.5),
        dict(restarts=0),
        dict(step_size=0),
        dict(step_size=-0.1),
        dict(seed=-1),
    ],
)
def test_pgd_invalid_settings_raise_config_error(tiny_backbone, kwargs) -> None:
    with pytest.raises(ConfigError):
        PGD(tiny_backbone, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(version="plus"),
        dict(version="custom"),
        dict(version="Standard"),
        dict(norm="L1"),
        dict(eps=0),
        dict(eps=2.0),
        dict(eps=1),
    ],
)
def test_autoattack_invalid_settings_raise_config_error(tiny_backbone, kwargs) -> None:
    with pytest.raises(ConfigError):
        AutoAttack(tiny_backbone, **kwargs)


def test_invalid_inputs_raise(tiny_backbone) -> None:
    attack = PGD(tiny_backbone, steps=1)
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ConfigError):
        attack.perturb(x * 2 - 1, torch.tensor([0, 1]))  # normalized images instead of [0, 1]
    with pytest.raises(ConfigError):
        attack.perturb(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ConfigError):
        attack.perturb(x[0], torch.tensor([0]))
    with pytest.raises(LabelError):
        attack.perturb(x, torch.tensor([0, 10]))  # a 10-class model
    with pytest.raises(LabelError):
        attack.perturb(x, torch.tensor([0, -1]))
    assert attack.perturb(x[:0], torch.tensor([], dtype=torch.long)).shape == (0, 3, 32, 32)


#: Batches the attacks cannot take, each with what their message must say: the engine's words and hints.
BAD_BATCHES = [
    pytest.param(lambda x, y: (x.numpy(), y), "torch.from_numpy", id="numpy images"),
    pytest.param(lambda x, y: ((x * 255).to(torch.uint8), y), r"x\.float\(\) / 255", id="uint8 images"),
    pytest.param(lambda x, y: (x[0], y[:1]), r"x\[None\]", id="one image without a batch dimension"),
    pytest.param(lambda x, y: (x * 2 - 1, y), "not normalized ones", id="normalized images"),
    pytest.param(lambda x, y: (x * 255, y), "x / 255", id="0..255 float images"),
    pytest.param(lambda x, y: (x, y.float()), "integer class indices", id="float labels"),
    pytest.param(lambda x, y: (x, y.tolist()), "labels must be a torch.Tensor", id="labels in a list"),
    pytest.param(lambda x, y: (x, y[:1]), "expected 2 labels", id="too few labels"),
]


@pytest.mark.parametrize(("make_bad", "message"), BAD_BATCHES)
@pytest.mark.parametrize("entry", ["PGD.perturb", "AutoAttack.perturb", "robust_accuracy"])
def test_bad_batches_raise_input_errors_that_callers_of_config_error_still_catch(
    tiny_backbone, entry: str, make_bad, message: str
) -> None:
    """README: images or labels of the wrong type, dtype, shape or value raise InputError (a ValueError and a
    TypeError), with the engine's hints; the attacks raised a bare ConfigError, which callers may catch."""
    x, y = make_bad(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))
    run = {
        "PGD.perturb": lambda: PGD(tiny_backbone, steps=1).perturb(x, y),
        "AutoAttack.perturb": lambda: AutoAttack(tiny_backbone, eps=LINF_EPS).perturb(x, y),
        "robust_accuracy": lambda: robust_accuracy(tiny_backbone, PGD(tiny_backbone, steps=1), x, y),
    }[entry]
    with pytest.raises(InputError, match=message) as caught:
        run()
    assert isinstance(caught.value, ConfigError) and isinstance(caught.value, TypeError)


@pytest.mark.parametrize("labels", [[0, -1], [0, 10]], ids=["negative", "past the 10 classes"])
def test_labels_of_no_class_raise_input_errors_that_callers_of_label_error_still_catch(tiny_backbone, labels) -> None:
    x, y = torch.rand(2, 3, 32, 32, device=TEST_DEVICE), torch.tensor(labels, device=TEST_DEVICE)
    for run in (lambda: PGD(tiny_backbone, steps=1).perturb(x, y),
                lambda: robust_accuracy(tiny_backbone, PGD(tiny_backbone, steps=1), x, y)):  # fmt: skip
        with pytest.raises(InputError) as caught:
            run()
        assert isinstance(caught.value, LabelError)


# -- registry ---------------------------------------------------------------------------------------------


def test_registry_lists_and_creates_attacks(tiny_backbone) -> None:
    assert list_attacks() == ["autoattack", "pgd"]
    pgd = create_attack("PGD", tiny_backbone, norm="L2", eps=0.5, steps=None, step_size=None, restarts=2)
    assert isinstance(pgd, PGD) and isinstance(pgd, Attack)
    assert (pgd.norm, pgd.eps, pgd.steps, pgd.restarts) == ("L2", 0.5, 20, 2)
    aa = create_attack("autoattack", model=tiny_backbone, eps=4 / 255, steps=None, version="rand")
    assert isinstance(aa, AutoAttack) and isinstance(aa, Attack) and aa.version == "rand"
    with pytest.raises(ConfigError, match="unknown attack"):
        create_attack("cw", tiny_backbone)
    with pytest.raises(ConfigError, match="does not take steps"):
        create_attack("autoattack", tiny_backbone, steps=10)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_registered_attack_keeps_budget_and_hurts(trained: nn.Module, test_set, name: str) -> None:
    x, y = test_set
    x, y = x[:6], y[:6]
    attack = create_attack(name, trained, eps=LINF_EPS)
    x_nhwc = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # a non-contiguous (channels-last) batch
    assert not x_nhwc.is_contiguous()
    clean, robust, x_adv = robust_accuracy(trained, attack, x_nhwc, y)
    assert clean > 0 and robust < clean
    assert_in_budget(x_adv, x, "Linf", LINF_EPS)


# -- AutoAttack -------------------------------------------------------------------------------------------


# Standard L-inf runs in the registry and eval-mode tests; "rand" (100 APGD steps x EOT 20) is the slow one.
@pytest.mark.parametrize(
    ("version", "norm", "eps"), [("standard", "L2", L2_EPS), ("rand", "Linf", LINF_EPS)]
)
def test_autoattack_versions_and_norms(trained: nn.Module, test_set, version: str, norm: str, eps: float) -> None:
    x, y = test_set
    x, y = x[:4], y[:4]
    attack = AutoAttack(trained, norm=norm, eps=eps, version=version, seed=3)
    built = []
    reference = attack._reference.AutoAttack

    def recording(model, **kwargs):  # the reference class, its settings recorded
        built.append((model, kwargs))
        return reference(model, **kwargs)

    attack._reference = types.SimpleNamespace(AutoAttack=recording)
    x_adv = attack.perturb(x, y)
    assert len(built) == 1 and built[0][0] is trained
    assert built[0][1] == dict(norm=norm, eps=eps, version=version, device=attack.device, seed=3)
    assert_in_budget(x_adv, x, norm, eps)
    with torch.no_grad():
        correct = trained(x).argmax(1) == y
    assert 0 < correct.sum() < len(y)
    # it fools some point the model got right (a do-nothing attack would not); the wrong ones are left alone
    assert accuracy(trained, x_adv, y) < correct.float().mean().item()
    assert torch.equal(x_adv[~correct], x[~correct])


class _RecordingReference(FakeReferenceAutoAttack):
    """The stand-in reference, recording the settings it is built with."""

    built: list[dict] = []

    def __init__(self, model, **kwargs) -> None:
        _RecordingReference.built.append(kwargs)
        super().__init__(model, **kwargs)


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize(("version", "norm", "eps"), [("rand", "L2", 0.25), ("standard", "Linf", 3 / 255)])
def test_autoattack_builds_the_reference_with_its_settings(version: str, norm: str, eps: float,
                                                           quantize: bool) -> None:  # fmt: skip
    model = ThresholdModel(100.3 / 255)
    x = torch.full((2, 3, 8, 8), 100 / 255)
    y = torch.zeros(2, dtype=torch.long)
    attack = AutoAttack(model, norm=norm, eps=eps, version=version, seed=7, device="cpu", quantize=quantize)
    attack._reference = types.SimpleNamespace(AutoAttack=_RecordingReference)
    _RecordingReference.built.clear()
    attack.perturb(x, y)
    assert _RecordingReference.built == [dict(norm=norm, eps=eps, version=version, device=torch.device("cpu"), seed=7)]


def test_autoattack_runs_in_eval_mode_and_restores_rng(trained: nn.Module, test_set) -> None:
    net = nn.Sequential(nn.BatchNorm2d(3), trained).to(TEST_DEVICE)  # default BN stats: identity in eval mode
    net.train()
    x, y = test_set
    before = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    x_adv = AutoAttack(net, eps=LINF_EPS).perturb(x[:4], y[:4])
    assert torch.equal(torch.random.get_rng_state(), state)  # the reference reseeds; we restore
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert net.training and net[0].training
    assert_in_budget(x_adv, x[:4], "Linf", LINF_EPS)


def test_autoattack_state_path_is_passed_through(trained: nn.Module, test_set, tmp_path: Path) -> None:
    x, y = test_set
    state = tmp_path / "aa-state.json"
    attack = AutoAttack(trained, eps=LINF_EPS, state_path=str(state))
    attack.perturb(x[:4], y[:4])
    saved = json.loads(state.read_text())
    assert saved["_clean_accuracy"] == pytest.approx(accuracy(trained, x[:4], y[:4]))
    assert "apgd-ce" in saved["_run_attacks"]
    # pyautoattack 0.2.0 writes its set of attacks as a string and then refuses its own file: the wrapper
    # turns that into a ConfigError that says what to do (a fixed release would simply resume).
    try:
        x_adv = attack.perturb(x[:4], y[:4])
    except ConfigError as e:
        assert "Delete the file" in str(e)
    else:
        assert_in_budget(x_adv, x[:4], "Linf", LINF_EPS)


@pytest.mark.parametrize("quantize", [False, True])
def test_autoattack_targets_every_other_class_of_a_model_of_fewer_than_ten(quantize: bool) -> None:
    model = make_tiny_model(2, input_size=(3, 8, 8), num_classes=5)
    x = torch.round(torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 255) / 255
    with torch.no_grad():
        y = model(x).argmax(1)
    attack = AutoAttack(model, eps=LINF_EPS, seed=1, quantize=quantize)
    built = []
    reference = attack._reference.AutoAttack

    def recording(model, **kwargs):  # the reference class, the object built kept
        built.append(reference(model, **kwargs))
        return built[-1]

    attack._reference = types.SimpleNamespace(AutoAttack=recording)
    # the standard version's 9 target classes indexed past the 5 logits: an IndexError in APGD-T
    x_adv = attack.perturb(x, y)
    assert_in_budget(x_adv, x, "Linf", LINF_EPS)
    assert [(aa.apgd_targeted.n_target_classes, aa.fab.n_target_classes) for aa in built] == [(4, 4)]
    # a model of 10 classes keeps the reference's 9
    assert reference(make_tiny_model(2, input_size=(3, 8, 8)), norm="Linf", eps=LINF_EPS, version="standard",
                     device="cpu", seed=0).apgd_targeted.n_target_classes == 9  # fmt: skip


@pytest.mark.parametrize(("version", "num_classes"), [("standard", 3), ("rand", 2)])
def test_autoattack_refuses_a_model_of_too_few_classes_for_its_dlr_loss(version: str, num_classes: int) -> None:
    # 2 classes: a threshold far out of reach, so that APGD-CE leaves the points to APGD-DLR
    model = make_tiny_model(2, input_size=(3, 8, 8), num_classes=3) if num_classes == 3 else ThresholdModel(0.5)
    x = torch.full((2, 3, 8, 8), 0.2)
    with torch.no_grad():
        y = model(x).argmax(1)  # points the model gets right: the reference attacks them
    with pytest.raises(ConfigError, match=f"at least {num_classes + 1} classes"):
        AutoAttack(model, eps=LINF_EPS, version=version).perturb(x, y)


def test_autoattack_without_the_package_raises_missing_dependency(
    tiny_backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # makes "import pyautoattack" fail
    with pytest.raises(MissingDependencyError, match="pip install pyautoattack"):
        create_attack("autoattack", tiny_backbone)
    PGD(tiny_backbone)  # the rest of the module does not need it


def test_autoattack_quantize_attacks_again_the_points_rounding_restores() -> None:
    model = ThresholdModel(100.3 / 255)
    x = torch.full((3, 3, 8, 8), 100 / 255)
    x[2] = 90 / 255  # "nudge" does not reach the threshold: only "push" could, and it does not either
    y = torch.zeros(3, dtype=torch.long)
    plain = AutoAttack(model, eps=LINF_EPS)
    plain._reference = FAKE_AUTOATTACK_MODULE
    FakeReferenceAutoAttack.runs.clear()
    rounded_once = torch.round(plain.perturb(x, y) * 255) / 255  # the reference's result, rounded at the end
    assert accuracy(model, rounded_once, y) == 1.0  # rounding restored every nudged point: biased upward

    attack = AutoAttack(model, eps=LINF_EPS, quantize=True)
    attack._reference = FAKE_AUTOATTACK_MODULE
    FakeReferenceAutoAttack.runs.clear()
    x_adv, flags = attack.perturb_report(x, y)
    assert on_8bit_grid(x_adv) and accuracy(model, x_adv, y) == pytest.approx(1 / 3)
    assert_in_budget(x_adv, x, "Linf", LINF_EPS)
    assert FakeReferenceAutoAttack.runs == [("nudge", 3), ("push", 3)]  # the restored points were attacked again
    assert flags["fooled"].tolist() == [True, True, False]
    assert flags["fooled_float"].tolist() == [True, True, False]
    assert flags["fooled_rounded_once"].tolist() == [False, False, False]
    assert torch.equal(attack.perturb(x, y), x_adv)
    with pytest.raises(ConfigError, match="state file"):
        AutoAttack(model, quantize=True, state_path="state.json")


# -- robust_accuracy --------------------------------------------------------------------------------------


class _Recorder:
    """An attack that records what it is given and returns the images unchanged."""

    name = "recorder"
    norm = "Linf"
    eps = 0.0
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.clone())
        return x.clone()


def test_robust_accuracy_attacks_only_clean_correct_points(trained: nn.Module, test_set) -> None:
    x, y = test_set
    with torch.no_grad():
        correct = trained(x).argmax(1) == y
    assert not correct.all()
    recorder = _Recorder()
    clean, robust, x_adv = robust_accuracy(trained, recorder, x, y, batch_size=5)
    assert clean == robust == pytest.approx(correct.float().mean().item())
    assert all(len(b) <= 5 for b in recorder.batches)
    assert torch.equal(torch.cat(recorder.batches), x[correct])
    assert torch.equal(x_adv, x)

    clean, robust, x_adv = robust_accuracy(trained, PGD(trained, eps=LINF_EPS, steps=5), x, y, batch_size=16)
    assert torch.equal(x_adv[~correct], x[~correct])  # wrong points are not attacked
    with torch.no_grad():
        still = trained(x_adv).argmax(1) == y
    # robust: right clean and still right after the attack, point by point
    assert robust == pytest.approx((correct & still).float().mean().item())
    assert robust < clean  # measured: PGD fools every point (robust 0)


def test_robust_accuracy_rejects_bad_arguments(trained: nn.Module, test_set) -> None:
    x, y = test_set
    attack = _Recorder()
    with pytest.raises(ConfigError):
        robust_accuracy(trained, attack, x[:0], y[:0])
    with pytest.raises(ConfigError):
        robust_accuracy(trained, attack, x, y, batch_size=0)
    with pytest.raises(LabelError):
        robust_accuracy(trained, attack, x[:2], torch.tensor([3, 10]))


# -- the real robust model (../shared) -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def robust_resnet20(shared_models_dir: Path) -> nn.Module:
    from preempt_cli.models import load_model

    return load_model("cifar10-resnet20-pgdat-a", models_dir=shared_models_dir, device=TEST_DEVICE)


@pytest.mark.shared
def test_pgd_on_the_real_robust_model(robust_resnet20: nn.Module, cifar_batch) -> None:
    x, y = cifar_batch
    assert on_8bit_grid(x)
    pgd = PGD(robust_resnet20, eps=LINF_EPS, steps=10, quantize=True)
    clean, robust, x_adv = robust_accuracy(robust_resnet20, pgd, x, y)
    noise = torch.sign(torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) - 0.5).to(x.device) * LINF_EPS
    noisy = accuracy(robust_resnet20, (x + noise).clamp(0, 1), y)
    assert clean >= 0.5
    assert robust < clean
    assert robust < noisy
    assert on_8bit_grid(x_adv)
    assert_in_budget(x_adv, x, "Linf", LINF_EPS)


@pytest.mark.shared
def test_autoattack_on_the_real_robust_model(robust_resnet20: nn.Module, cifar_batch) -> None:
    """AutoAttack standard on 4 real images (about 1.5 s on 2 CPU cores: APGD breaks all four, so the costly
    FAB-T and Square never run)."""
    x, y = cifar_batch
    x, y = x[:4], y[:4]
    clean, robust, x_adv = robust_accuracy(robust_resnet20, AutoAttack(robust_resnet20, eps=LINF_EPS), x, y)
    assert robust < clean  # it breaks some of the points the model gets right (measured: all four)
    assert accuracy(robust_resnet20, x_adv, y) == pytest.approx(robust)  # what it returns is what it counted
    assert_in_budget(x_adv, x, "Linf", LINF_EPS)


class _GradientReference:
    """A stand-in for the reference AutoAttack that takes a gradient, as each of its attacks does."""

    def __init__(self, model, *, norm, eps, version, device, seed) -> None:
        self.model, self.eps, self.verbose = model, eps, False

    def run_standard_evaluation(self, x, y, *, batch_size=250, state_path=None):
        x = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(self.model(x), y), x)
        return (x + self.eps * grad.sign()).clamp(0, 1).detach(), None


def test_attacks_run_under_inference_mode_as_outside_it(tiny_backbone) -> None:
    """``with torch.inference_mode(): PGD(...).perturb(x, y)`` failed with autograd's own error; Protector
    and the engine already left inference mode for their gradients."""
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(TEST_DEVICE)
    y = torch.tensor([1, 2, 3], device=TEST_DEVICE)
    pgd = PGD(tiny_backbone, steps=3, seed=1)
    expected = pgd.perturb(x, y)
    with torch.inference_mode():
        x_inf, y_inf = x.clone(), y.clone()  # inference tensors, as a caller's pipeline makes them
        assert torch.equal(pgd.perturb(x_inf, y_inf), expected)
    assert not torch.equal(expected, x)  # the attack moved: the comparison is not of two copies of x
    attack = AutoAttack(tiny_backbone, eps=LINF_EPS)
    attack._reference = types.SimpleNamespace(AutoAttack=_GradientReference)
    expected = attack.perturb(x, y)
    with torch.inference_mode():
        assert torch.equal(attack.perturb(x.clone(), y.clone()), expected)


def test_attack_inputs_are_checked_against_the_model(tiny_backbone) -> None:
    import numpy as np

    y = torch.zeros(2, dtype=torch.long, device=TEST_DEVICE)
    with pytest.raises(ConfigError, match="4 channels but the model takes 3"):
        PGD(tiny_backbone, steps=1).perturb(torch.rand(2, 4, 32, 32, device=TEST_DEVICE), y)
    PGD(tiny_backbone, steps=1).perturb(torch.rand(2, 1, 32, 32, device=TEST_DEVICE), y)  # gray: the wrapper's
    assert PGD(tiny_backbone, seed=np.int64(5)).seed == 5 and type(PGD(tiny_backbone, seed=np.int64(5)).seed) is int
