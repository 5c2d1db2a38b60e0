"""Architectures: every registered builder runs, and the CIFAR ResNets match the shared weight files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from preempt_cli.models import create_arch, is_arch, list_archs
from preempt_cli.models.cifar_resnet import PadShortcut

SHARED_MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"

# Real forward passes only for nets small enough to run in well under a second on one CPU core;
# the wide ones (36M-267M parameters) are checked for shapes on the meta device.
MAX_PARAMS_FOR_CPU_FORWARD = 20_000_000


def _num_params_on_meta(name: str) -> int:
    with torch.device("meta"):
        net = create_arch(name)
    return sum(p.numel() for p in net.parameters())


def test_registry_lists_expected_archs() -> None:
    expected = {
        "cifar_resnet20",
        "cifar_resnet32",
        "cifar_resnet44",
        "cifar_resnet56",
        "resnet18_cifar",
        "preact_resnet18",
        "wide_resnet",
        "wide_resnet28_10",
        "wide_resnet34_10",
        "wide_resnet34_20",
        "wide_resnet70_16",
        "resnext29_32x4d",
    }
    assert expected <= set(list_archs())
    assert list_archs() == sorted(list_archs())
    assert all(is_arch(name) for name in expected)
    assert not is_arch("resnet9000")


def test_unknown_arch_raises_key_error_listing_known_names() -> None:
    with pytest.raises(KeyError, match="cifar_resnet20") as info:
        create_arch("resnet9000")
    assert "resnet9000" in str(info.value)


@pytest.mark.parametrize("name", list_archs())
def test_output_shape_on_meta(name: str) -> None:
    with torch.device("meta"):
        net = create_arch(name, num_classes=7)
        out = net(torch.empty(2, 3, 32, 32))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("name", list_archs())
def test_forward_gives_finite_logits(name: str) -> None:
    if _num_params_on_meta(name) > MAX_PARAMS_FOR_CPU_FORWARD:
        pytest.skip(f"{name} is too big for a fast CPU forward (shape checked on meta)")
    torch.manual_seed(0)
    net = create_arch(name).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_small_wide_resnet_forward_gives_finite_logits() -> None:
    torch.manual_seed(0)
    net = create_arch("wide_resnet", depth=10, widen_factor=2, num_classes=5).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 5)
    assert torch.isfinite(out).all()


def test_num_classes_is_honoured() -> None:
    net = create_arch("cifar_resnet20", num_classes=100).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 3, 32, 32)).shape == (1, 100)


def test_pad_shortcut_puts_zero_channels_where_asked() -> None:
    x = torch.ones(1, 4, 4, 4)
    both = PadShortcut(4, 8, stride=2, mode="pad_both")(x)
    end = PadShortcut(4, 8, stride=2, mode="pad_end")(x)
    assert both.shape == end.shape == (1, 8, 2, 2)
    assert both.sum(dim=(0, 2, 3)).tolist() == [0, 0, 4, 4, 4, 4, 0, 0]
    assert end.sum(dim=(0, 2, 3)).tolist() == [4, 4, 4, 4, 0, 0, 0, 0]


def test_shortcut_variants_differ_with_the_same_weights() -> None:
    torch.manual_seed(0)
    both = create_arch("cifar_resnet20", shortcut="pad_both").eval()
    end = create_arch("cifar_resnet20", shortcut="pad_end").eval()
    end.load_state_dict(both.state_dict(), strict=True)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(both(x), end(x))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("cifar_resnet20", {"shortcut": "zeros"}),
        ("wide_resnet", {"depth": 27}),
    ],
)
def test_invalid_arguments_raise_value_error(name: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        create_arch(name, **kwargs)


def _shared_weights(stem: str) -> dict[str, torch.Tensor]:
    path = SHARED_MODELS / f"{stem}.safetensors"
    if not path.is_file():
        pytest.skip(f"../shared/models not found: {path} is absent (real weights are only on dev machines)")
    from safetensors.torch import load_file

    return load_file(path)


@pytest.mark.shared
@pytest.mark.parametrize(
    ("name", "kwargs", "stem"),
    [
        ("cifar_resnet20", {"shortcut": "pad_end"}, "cifar10_resnet20_pgdat_a"),
        ("resnet18_cifar", {}, "cifar10_resnet18_std"),
    ],
)
def test_key_names_match_shared_weights(name: str, kwargs: dict[str, str], stem: str) -> None:
    weights = _shared_weights(stem)
    net = create_arch(name, **kwargs)
    assert set(net.state_dict()) == set(weights)
    net.load_state_dict(weights, strict=True)


@pytest.mark.parametrize(("shape", "size"), [((2, 3, 512, 512), (32, 32)), ((1, 1, 300, 451), (32, 32)),
                                             ((1, 3, 40, 700), (32, 32)), ((1, 3, 48, 48), (32, 32))])  # fmt: skip
def test_resize_equals_antialiased_interpolate_with_its_gradient(shape, size) -> None:
    from preempt_cli.models._load import resize

    x = torch.rand(shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    ref = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    out = resize(x, size)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    w = torch.rand(ref.shape, generator=torch.Generator().manual_seed(1))
    (g_ref,) = torch.autograd.grad((ref * w).sum(), x)
    (g_out,) = torch.autograd.grad((out * w).sum(), x)
    torch.testing.assert_close(g_out, g_ref, atol=1e-6, rtol=0)
    with torch.inference_mode():  # matrices first built here must still work with autograd later
        resize(torch.rand(1, 3, 96, 96), (16, 16))
    y = torch.rand(1, 3, 96, 96, requires_grad=True)
    resize(y, (16, 16)).sum().backward()
    assert y.grad is not None
